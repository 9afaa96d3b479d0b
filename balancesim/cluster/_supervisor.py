"""``serve --workers N``: a whole cluster on one machine, under one parent process.

Order matters, so that a failed start changes nothing and says why in one line: bind
the port first (a busy port is exit 2 before anything else), lock the data directory
(a second ``serve`` on it is exit 2), the secret and the shard files, then
``redis-server`` (none on ``PATH``: exit 2). Only then come the children: ``S``
``balancesim shard`` processes, and once each beats in Redis, ``N`` ``balancesim
gateway`` processes that serve the socket bound here (passed down by descriptor, as
Tornado's ``fork_processes`` shares it by forking).

Children are exec'd, not forked: a forked child would inherit this process's locks,
threads and loop. Each child watches a pipe from this process (``_watchdog``), so a
SIGKILL of the parent takes every child with it; Redis, which cannot watch a pipe,
gets ``PR_SET_PDEATHSIG`` from the main thread. The secret and the Redis URL (which
carries Redis's password) go to the children in their environment, never on their
command line, which every local user can read in ``/proc``.

SIGTERM/SIGINT drains in dependency order: the gateways first (they close sessions
with 1001 and finish the requests in flight), then the shards (they commit what was
handed over), then Redis. A child that dies unasked is restarted with backoff, and so
is the private ``redis-server``: on the same socket, with the same ACL user and password,
so the shards and gateways (which reconnect by themselves) need no operator step. It
starts empty, which costs nothing: Redis holds nothing that cannot be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import redis.asyncio

from balancesim.cluster._backoff import Backoff
from balancesim.cluster._data_dir import make_data_dir
from balancesim.cluster._health import shard_heartbeat_key
from balancesim.cluster._placement import PlacementError, placement_of_data_dir
from balancesim.cluster._redis_server import RedisNotFound, RedisServer
from balancesim.cluster._watchdog import LISTEN_FDS_ENV, WATCHDOG_FD_ENV
from balancesim.cluster._wire import SECRET_ENV, SecretError, load_secret
from balancesim.gateway._server import CannotStart, listen

__all__ = ["SuperviseOptions", "supervise", "REDIS_URL_FILE", "REDIS_URL_ENV", "read_redis_url"]

log = logging.getLogger(__name__)

REDIS_URL_FILE = "redis.url"
REDIS_URL_ENV = "BALANCESIM_REDIS_URL"
_LOCK_FILE = "serve.lock"
# A child must say it is ready within this; far above a normal start (1-3 s here).
_START_TIMEOUT_S = 60.0
# A shard that fails at start may be an orphan of a killed serve still holding its file
# for a few seconds (its watchdog stops it): retry that long before giving up.
_START_RETRY_S = 15.0
# A child that ran this long before dying starts its backoff afresh.
_HEALTHY_RUN_S = 30.0
# How often the supervisor looks whether its private redis-server still runs.
_REDIS_CHECK_S = 0.2


@dataclass(frozen=True)
class SuperviseOptions:
    """``serve --workers N [--shards S] [--data-dir DIR] [--redis URL]`` and the options it shares with
    the embedded serve."""

    workers: int
    shards: int | None = None
    data_dir: str = "balancesim-data"
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 3000
    time_scale: float = 1.0
    seed: int | None = None
    demo: bool = False
    password_cost: int = 2**14
    log_level: str = "info"
    trust_proxy: bool = False
    drain_s: float = 10.0
    #: How long a gateway waits for a shard's answer (and as long again for its outcome)
    #: before it answers 504; ``None``: the gateway's default.
    timeout_s: float | None = None


def read_redis_url(data_dir: str) -> str:
    """The Redis URL that ``serve`` wrote into ``data_dir`` (``FileNotFoundError`` when no
    serve has run there)."""
    with open(os.path.join(data_dir, REDIS_URL_FILE)) as file:
        return file.read().strip()


def _write_private(path: str, text: str) -> None:
    # 0600 from the start: the URL carries Redis's password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")
    os.chmod(path, 0o600)


def _lock_data_dir(data_dir: str) -> int:
    """An ``flock`` on ``DIR/serve.lock`` for the life of this process (its fd)."""
    path = os.path.join(data_dir, _LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        try:
            holder = os.pread(fd, 32, 0).decode().strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CannotStart(f"the data directory {data_dir} is in use by another serve (pid {holder})") from None
        raise CannotStart(f"cannot lock {path}: {error.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class _Child:
    """One child process to keep running: ``role`` names it in logs (``shard 0``, ``gateway 1``)."""

    role: str
    argv: list[str]
    ready_prefix: str
    shard_index: int | None = None
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    drain: asyncio.Task[None] | None = field(default=None, repr=False)


class _ChildFailed(Exception):
    """A child exited (or never said it was ready) at start."""


class _Supervisor:
    def __init__(self, options: SuperviseOptions, echo: Callable[[str], None], sockets: list[socket.socket],
                 redis_url: str, secret: str, shards: int, redis_server: RedisServer | None) -> None:
        self.options = options
        self.echo = echo
        self.sockets = sockets
        self.redis_url = redis_url
        self.shards = shards
        self.redis_server = redis_server
        self.stopping = False
        self.redis_restarts = 0
        self.backoff = Backoff(initial_s=1.0, max_s=30.0)
        # The watchdog pipe: children read it, this process only holds the write end.
        self.watch_read_fd, self.watch_write_fd = os.pipe()
        base = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, REDIS_URL_ENV)}
        self.env = {**base, SECRET_ENV: secret, REDIS_URL_ENV: redis_url,
                    WATCHDOG_FD_ENV: str(self.watch_read_fd),
                    LISTEN_FDS_ENV: ",".join(str(s.fileno()) for s in sockets),
                    "PYTHONUNBUFFERED": "1"}
        self.pass_fds = (self.watch_read_fd, *(s.fileno() for s in sockets))
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://{options.host}:{self.port}"

    # -- children ------------------------------------------------------------------------

    def _shard(self, index: int) -> _Child:
        o = self.options
        argv = [sys.executable, "-m", "balancesim.cli", "shard", "--index", str(index),
                "--shards", str(self.shards), "--db", os.path.join(o.data_dir, f"shard-{index}.db"),
                "--time-scale", repr(o.time_scale), "--password-cost", str(o.password_cost),
                "--log-level", o.log_level, "--metrics-host", o.host, "--metrics-port", "0"]
        if o.seed is not None:
            argv += ["--seed", str(o.seed + index)]
        return _Child(f"shard {index}", argv, "shard ", shard_index=index)

    def _gateway(self, number: int) -> _Child:
        o = self.options
        # Each gateway's own metrics port: on the shared port, a scrape reaches any one of them.
        argv = [sys.executable, "-m", "balancesim.cli", "gateway", "--host", o.host, "--port", str(self.port),
                "--log-level", o.log_level, "--metrics-port", "0"]
        if o.trust_proxy:
            argv.append("--trust-proxy")
        if o.timeout_s is not None:
            argv += ["--timeout-s", repr(o.timeout_s)]
        return _Child(f"gateway {number}", argv, "listening on ")

    async def _spawn(self, child: _Child) -> None:
        """Start ``child`` and wait until it says it is ready (``_ChildFailed`` if it exits first)."""
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=self.env, pass_fds=self.pass_fds, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE)
        child.started_at = time.monotonic()
        assert child.process.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                while True:
                    line = (await child.process.stdout.readline()).decode(errors="replace")
                    if not line:
                        code = await child.process.wait()
                        raise _ChildFailed(f"{child.role} exited with {code} at start (its error is logged above)")
                    if line.startswith(child.ready_prefix):
                        break
        except TimeoutError:
            raise _ChildFailed(f"{child.role} did not start within {_START_TIMEOUT_S:g} s") from None
        # Keep reading its stdout, so that a child that prints never blocks on a full pipe.
        child.drain = asyncio.ensure_future(self._drain(child.process))
        log.info("%s started (pid %s)", child.role, child.process.pid)

    @staticmethod
    async def _drain(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while await process.stdout.readline():
            pass

    async def _spawn_retrying(self, child: _Child) -> None:
        """At start: retry a child that fails for ``_START_RETRY_S`` (an orphan of a killed
        serve may still hold its file), then give up with its failure."""
        deadline = time.monotonic() + _START_RETRY_S
        attempt = 0
        while True:
            try:
                await self._spawn(child)
                return
            except _ChildFailed:
                if time.monotonic() > deadline or self.stopping:
                    raise
                await asyncio.sleep(self.backoff.delay_s(attempt))
                attempt += 1

    async def _keep(self, child: _Child) -> None:
        """Restart ``child`` whenever it dies unasked, with backoff; logs each time."""
        attempt = 0
        while not self.stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping:
                return
            if time.monotonic() - child.started_at > _HEALTHY_RUN_S:
                attempt = 0
            delay_s = self.backoff.delay_s(attempt)
            log.warning("%s (pid %s) exited with %s; restarting it in %.1f s", child.role, child.process.pid,
                        code, delay_s)
            if child.shard_index is not None:
                await self._forget_shard(child.shard_index)
            await asyncio.sleep(delay_s)
            attempt += 1
            if self.stopping:
                return
            try:
                await self._spawn(child)
                child.restarts += 1
            except _ChildFailed as error:
                log.warning("%s", error)

    async def _keep_redis(self) -> None:
        """Restart the private ``redis-server`` whenever it dies unasked, with backoff.

        ``start()`` runs here, on the main thread (the loop's), so that the kernel's
        parent-death signal still ties the new server to this process. It blocks the
        loop while Redis starts (tens of milliseconds; bounded by its start timeout).
        """
        server = self.redis_server
        assert server is not None
        attempt = 0
        while not self.stopping:
            await asyncio.sleep(_REDIS_CHECK_S)
            if server.running or self.stopping:
                continue
            delay_s = min(self.backoff.delay_s(attempt), 5.0)
            log.warning("redis-server exited unasked; restarting it in %.1f s", delay_s)
            await asyncio.sleep(delay_s)
            attempt += 1
            if self.stopping:
                return
            try:
                server.start()
            except (RuntimeError, TimeoutError, OSError) as error:
                log.warning("cannot restart redis-server: %s", error)
                continue
            self.redis_restarts += 1
            attempt = 0
            log.warning("redis-server restarted (pid %s) on the same socket and ACL user", server.pid)

    async def _forget_shard(self, index: int) -> None:
        # The dead shard's heartbeat would live on for its expiry: delete it, so that
        # /readyz and `cluster status` say at once that the shard is down.
        client = redis.asyncio.Redis.from_url(self.redis_url, socket_timeout=2.0)
        try:
            await client.delete(shard_heartbeat_key(index))
        except (OSError, redis.exceptions.RedisError) as error:  # type: ignore[attr-defined]
            log.debug("cannot delete shard %s's heartbeat: %s", index, error)
        finally:
            await client.aclose()

    async def _wait_for_heartbeats(self) -> None:
        client = redis.asyncio.Redis.from_url(self.redis_url, socket_timeout=2.0)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                keys = [shard_heartbeat_key(index) for index in range(self.shards)]
                while None in await client.mget(keys):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise _ChildFailed(f"the shards did not beat in Redis within {_START_TIMEOUT_S:g} s") from None
        finally:
            await client.aclose()

    async def _stop_children(self, children: list[_Child], timeout_s: float) -> None:
        """SIGTERM every one of ``children`` at once, wait up to ``timeout_s``, then SIGKILL."""
        running = [c for c in children if c.process is not None and c.process.returncode is None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        for child in running:
            assert child.process is not None
            try:
                await asyncio.wait_for(child.process.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("%s (pid %s) did not stop within %g s: killing it", child.role, child.process.pid,
                            timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            if child.drain is not None:
                child.drain.cancel()

    # -- the whole -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop_asked = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_asked.set)
        shards = [self._shard(index) for index in range(self.shards)]
        gateways = [self._gateway(number) for number in range(self.options.workers)]
        keepers: list[asyncio.Future[None]] = []
        starting = asyncio.ensure_future(self._start(shards, gateways))
        stop_wait = asyncio.ensure_future(stop_asked.wait())
        try:
            await asyncio.wait([starting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal during the start: stop what was started
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, _ChildFailed):
                    await starting
            else:
                starting.result()  # raises _ChildFailed
                keepers = [asyncio.ensure_future(self._keep(child)) for child in shards + gateways]
                if self.redis_server is not None:
                    keepers.append(asyncio.ensure_future(self._keep_redis()))
                self.echo(f"listening on {self.url}")
                self.echo(f"dashboard: {self.url}/admin")
                await stop_wait
        finally:
            self.stopping = True
            stop_wait.cancel()
            for keeper in keepers:
                keeper.cancel()
            await self._stop_children(gateways, self.options.drain_s + 10)
            await self._stop_children(shards, 30)
            os.close(self.watch_write_fd)
            os.close(self.watch_read_fd)

    async def _start(self, shards: list[_Child], gateways: list[_Child]) -> None:
        await asyncio.gather(*(self._spawn_retrying(child) for child in shards))
        await self._wait_for_heartbeats()
        await asyncio.gather(*(self._spawn(child) for child in gateways))
        if self.options.demo:
            await self._demo()
        from tornado.httpclient import AsyncHTTPClient

        await AsyncHTTPClient().fetch(f"{self.url}/healthz", request_timeout=30)

    async def _demo(self) -> None:
        """The embedded serve's demo accounts, made through the cluster."""
        from balancesim.cluster._processes import read_placement
        from balancesim.cluster._remote import RemoteEngine
        from balancesim.gateway._server import create_demo

        placement = await read_placement(self.redis_url)
        remote = await RemoteEngine(self.redis_url, placement, self.env[SECRET_ENV].encode(), timeout_s=30).start()
        try:
            # RemoteEngine's blocking calls wait on this loop: run them on another thread.
            await asyncio.get_running_loop().run_in_executor(None, create_demo, remote, self.echo)
        finally:
            await remote.aclose()


def _shards_given(options: SuperviseOptions) -> int | None:
    """``--shards``, else ``N`` for a new directory, else whatever the files record."""
    if options.shards is not None:
        return options.shards
    try:
        placement_of_data_dir(options.data_dir, None)
    except PlacementError:
        return options.workers  # no shard files yet (any other problem is met again below)
    return None


def supervise(options: SuperviseOptions, echo: Callable[[str], None] = print) -> None:
    """Run a cluster on this machine until SIGINT/SIGTERM, then drain it and return.

    Raises:
        CannotStart: a busy port, a data directory in use or disagreeing with
            ``--shards``, an unusable secret, no ``redis-server``, or a child that
            cannot start; the message is one line.
    """

    def say(line: str) -> None:
        echo(line)
        sys.stdout.flush()

    sockets = listen(options.host, options.port)
    lock_fd: int | None = None
    redis_server: RedisServer | None = None
    url_file = os.path.join(options.data_dir, REDIS_URL_FILE)
    try:
        try:
            os.makedirs(options.data_dir, exist_ok=True)
        except OSError as error:
            raise CannotStart(f"cannot make the data directory {options.data_dir}: {error.strerror}") from None
        lock_fd = _lock_data_dir(options.data_dir)
        try:
            # The key is the secret's text (UTF-8), which the children get in their environment.
            secret = bytes(load_secret(options.data_dir)).decode("utf-8")
            cluster = make_data_dir(options.data_dir, _shards_given(options))
        except (SecretError, PlacementError) as error:
            raise CannotStart(str(error)) from None
        if options.redis_url is None:
            try:
                redis_server = RedisServer(options.data_dir, die_with_parent=True).start()
            except RedisNotFound:
                raise CannotStart("redis-server is not on PATH: install Debian's redis-server, "
                                  "or give --redis URL") from None
            except (RuntimeError, TimeoutError, ValueError) as error:
                raise CannotStart(f"cannot start redis-server: {error}") from None
        redis_url = redis_server.url if redis_server is not None else options.redis_url
        assert redis_url is not None
        _write_private(url_file, redis_url)
        supervisor = _Supervisor(options, say, sockets, redis_url, secret, cluster.placement.shards, redis_server)
        try:
            asyncio.run(supervisor.run())
        except _ChildFailed as error:
            raise CannotStart(str(error)) from None
        say("stopped")
    finally:
        if redis_server is not None:
            redis_server.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(url_file)  # no cluster behind it any more
        for sock in sockets:
            sock.close()
        if lock_fd is not None:
            os.close(lock_fd)

