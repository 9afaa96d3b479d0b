"""Several machines on this one: hosts built from network namespaces, and a cluster across them.

Issue 15's deployment across machines, as the roles' own commands run it, and issue 16's
faults on it (a host cut off the network). ``Lan`` makes three hosts (``a``, ``b``,
``c``): network namespaces (``ip netns``), each with one veth leg to a bridge that lives in
a fourth namespace (the "switch"), addressed in 10.77.0.0/24. Nothing is added to the root
namespace (each host also gets its own host name), so two runs side by side do not
collide, and every packet stays between namespaces made here. Each host has its own
working directory.

``HostsCluster`` runs a cluster on them: ``redis-server`` on host A (TCP only, bound to A's
address, an ACL user with a password, no default user) and shard 0; shard 1 on host B;
gateways on the hosts asked for (host C only by default: it keeps no data at all). There
is no ``serve`` supervisor across machines, so whoever runs it restarts what dies (its
``start_*`` methods). ``cut``/``heal`` take a host off the network and put it back.

Both need root (namespaces) and Debian's ``ip``, ``unshare`` and ``redis-server``:
``hosts_unavailable()`` says in one line what is missing. ``close()`` stops every process
and deletes every namespace, whatever happened before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from balancesim.cluster._supervisor import REDIS_URL_ENV
from balancesim.cluster._watchdog import WATCHDOG_FD_ENV, die_with_parent_preexec
from balancesim.cluster._wire import SECRET_ENV

__all__ = ["Lan", "Line", "HostsCluster", "HostsUnavailable", "hosts_unavailable", "in_netns", "ip",
           "redis_config", "ADDRESS", "HOSTNAME", "HOSTS", "GATEWAY_PORT", "REDIS_PORT", "REDIS_USER"]

HOSTS = ("a", "b", "c")
SUBNET = "10.77.0"
ADDRESS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}
HOSTNAME = {"a": "host-a", "b": "host-b", "c": "host-c"}
REDIS_PORT = 6379
GATEWAY_PORT = 3000  # a fresh namespace has every port free
REDIS_USER = "balancesim"
# A start takes seconds on 2 busy cores: far above normal, and never a measure of speed.
WAIT_S = 60.0

_CLONE_NEWNET = 0x40000000


class HostsUnavailable(RuntimeError):
    """The namespace layout cannot be built here; the message says why in one line."""


def hosts_unavailable() -> str | None:
    """Why this machine cannot build the hosts (one line), or ``None`` when it can."""
    if os.geteuid() != 0:
        return "the namespace layout (ip netns) needs root"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("redis-server", "redis-server")):
        if shutil.which(tool) is None:
            return f"the namespace layout needs {tool}: apt-get install -y {package}"
    return None


def ip(*args: str) -> None:
    """``ip ARGS``; ``HostsUnavailable`` with its error on a failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the calling thread inside namespace ``name`` (as ``ip netns exec`` runs a command),
    then return it to where it was.

    For a client in this process: sockets made meanwhile belong to the host, and so do
    threads started meanwhile. Python 3.11 has no ``os.setns``, hence libc's.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns back home: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(home)


class Line:
    """Reads a child's stdout on a thread, so that a wait for its ready line has a bound."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        threading.Thread(target=self._pump, args=(process.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        with stream:  # closed here, once the child is gone: never under this thread's feet
            for line in stream:
                self.lines.put(line)
        self.lines.put("")

    def wait_for(self, prefix: str, timeout_s: float = WAIT_S) -> str:
        """The first line starting with ``prefix`` (stripped); ``AssertionError`` when the
        child ends first or ``timeout_s`` passes, with what it printed."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r} within {timeout_s:g} s; saw {self.seen}") from None
            if not line:
                raise AssertionError(f"the process ended before printing {prefix!r}; saw {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line.strip()


class Lan:
    """Three hosts (``a``, ``b``, ``c``) on a bridge, each a namespace with a working directory.

    ``build`` makes them; ``start`` runs a command inside a host (``ip netns exec``), in
    its directory; ``run`` runs one to completion. ``close`` stops every process
    (SIGTERM, then SIGKILL) and deletes every namespace, which takes their veths with them.
    """

    def __init__(self, root: Path) -> None:
        tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
        self.netns = {host: f"bsh-{host}-{tag}" for host in HOSTS}
        self.switch = f"bsh-sw-{tag}"
        self.dirs = {host: root / f"host-{host}" for host in self.netns}
        self.logs = root / "logs"  # outside every host's directory: host C's stays empty
        self.made: list[str] = []
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.closed = False
        # Children of shard and gateway watch this pipe: if this process is killed
        # outright, they stop by themselves instead of keeping ledgers and ports.
        self.watch_read, self.watch_write = os.pipe()
        repo = str(Path(__file__).resolve().parent.parent.parent)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        for private in (SECRET_ENV, REDIS_URL_ENV, WATCHDOG_FD_ENV):
            self.env.pop(private, None)

    def build(self) -> Lan:
        """Make the directories, the namespaces, the bridge and the legs (``HostsUnavailable``
        with the failing ``ip`` command's error)."""
        for directory in (*self.dirs.values(), self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        for name in (self.switch, *self.netns.values()):
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, name in self.netns.items():
            leg = self.leg(host)
            # Both ends are made straight inside their namespaces: the root namespace never sees them.
            ip("link", "add", leg, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", self.switch, "link", "set", leg, "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{ADDRESS[host]}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        return self

    @staticmethod
    def leg(host: str) -> str:
        """The switch's end of ``host``'s cable."""
        return f"leg-{host}"

    def cut(self, host: str) -> None:
        """Take ``host`` off the network: its leg on the switch goes down, as a pulled cable.
        Its processes keep running; their packets to and from the others are lost."""
        ip("-n", self.switch, "link", "set", self.leg(host), "down")

    def heal(self, host: str) -> None:
        """Put ``host`` back on the network."""
        ip("-n", self.switch, "link", "set", self.leg(host), "up")

    def _argv(self, host: str, argv: list[str]) -> list[str]:
        # Its own network namespace, and its own host name (a UTS namespace), so that
        # cluster status tells the hosts apart; each step execs, so the pid is the command's.
        return ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "--", "sh", "-c",
                f'hostname {HOSTNAME[host]} && exec "$@"', "sh", *argv]

    def start(self, host: str, role: str, argv: list[str], env: dict[str, str] | None = None,
              watchdog: bool = True) -> tuple[subprocess.Popen, Line]:
        """Start ``argv`` on ``host``, its stderr appended to ``logs/ROLE.log``; the process
        (its pid is the command's) and its stdout's reader."""
        child_env = {**self.env, **(env or {})}
        if watchdog:
            child_env[WATCHDOG_FD_ENV] = str(self.watch_read)
        with open(self.logs / f"{role}.log", "ab") as log:
            process = subprocess.Popen(
                self._argv(host, argv), cwd=self.dirs[host], env=child_env, stdout=subprocess.PIPE,
                stderr=log, text=True, pass_fds=(self.watch_read,) if watchdog else (),
                # Its own session: a Ctrl-C at the terminal reaches only this process, which
                # then stops everything in order (close).
                start_new_session=True,
                # Redis cannot watch a pipe: the kernel kills it with the thread that starts it
                # (callers start it from the main thread).
                preexec_fn=None if watchdog else (lambda parent=os.getpid(): die_with_parent_preexec(parent)))
        self.processes.append((role, process))
        return process, Line(process)

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` to completion, output captured."""
        return subprocess.run(self._argv(host, argv), cwd=self.dirs[host], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout_s)

    def log(self, role: str) -> str:
        """The end of ``role``'s log."""
        try:
            return (self.logs / f"{role}.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 20 s) and delete every namespace;
        ``HostsUnavailable`` naming any namespace left behind."""
        if self.closed:
            return
        self.closed = True
        try:
            for _, process in reversed(self.processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for _, process in reversed(self.processes):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=20)
            os.close(self.watch_write)
            os.close(self.watch_read)
        finally:
            problems = []
            for name in reversed(self.made):
                try:
                    ip("netns", "del", name)
                except HostsUnavailable as error:
                    problems.append(str(error))
            if problems:
                raise HostsUnavailable(f"namespaces left behind: {problems}")


def redis_config(directory: Path, password: str) -> Path:
    """TCP only (no Unix socket), bound to host A's address; as ``RedisServer``: no dump, no
    default user, one ACL user that cannot reconfigure or wipe the server."""
    config = directory / "redis.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([
            "daemonize no",
            f"dir {directory}",
            'save ""',
            "appendonly no",
            f"bind {ADDRESS['a']}",
            f"port {REDIS_PORT}",
            f"logfile {directory / 'redis.log'}",
            "maxmemory-policy noeviction",
            "user default off resetpass nocommands",
            f"user {REDIS_USER} on >{password} ~* &* +@all -@dangerous +info",
        ]) + "\n")
    return config


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "balancesim.cli", *args]


class HostsCluster:
    """A cluster of two shards across the three hosts of a ``Lan``.

    Redis and shard 0 on host A, shard 1 on host B, one gateway on each of
    ``gateway_hosts`` (port ``GATEWAY_PORT`` of its host's address). Each shard's file
    is in its own host's directory (``host-a/data/shard-0.db``, ``host-b/data/shard-1.db``); ``ledgers`` is an
    auditor's view of them (a directory of links to every host's file), which the
    ``--data-dir`` commands read as a data directory. The Redis URL and the secret reach
    the processes in their environment, never on their command line.

    Args:
        root: an empty directory for the hosts' directories, the logs and ``ledgers``.
        gateway_hosts: where gateways run.
        admin: the superadmin made in its shard's file before the shards start.
        shard_args, gateway_args: extra options for every shard and gateway.
    """

    SHARDS = 2
    HOST_OF_SHARD = {0: "a", 1: "b"}

    def __init__(self, root: Path, *, gateway_hosts: tuple[str, ...] = ("c",),
                 admin: tuple[str, str] = ("superadmin", "hosts-superadmin-pw"),
                 shard_args: tuple[str, ...] = ("--time-scale", "0.01", "--password-cost", "1024"),
                 gateway_args: tuple[str, ...] = ()) -> None:
        self.lan = Lan(Path(root))
        self.root = Path(root)
        self.gateway_hosts = gateway_hosts
        self.admin = admin
        self.shard_args = shard_args
        self.gateway_args = gateway_args
        self.password = secrets.token_hex(16)
        self.redis_url = f"redis://{REDIS_USER}:{self.password}@{ADDRESS['a']}:{REDIS_PORT}"
        self.env = {SECRET_ENV: secrets.token_hex(32), REDIS_URL_ENV: self.redis_url}
        self.ledgers = self.root / "ledgers"
        self.urls = {host: f"http://{ADDRESS[host]}:{GATEWAY_PORT}" for host in gateway_hosts}
        self.redis: subprocess.Popen | None = None
        self.shards: dict[int, subprocess.Popen] = {}
        self.gateways: dict[str, subprocess.Popen] = {}
        self._lines: dict[str, Line] = {}

    def shard_db(self, index: int) -> Path:
        """Shard ``index``'s file, in its host's directory."""
        return self.lan.dirs[self.HOST_OF_SHARD[index]] / "data" / f"shard-{index}.db"

    def start(self) -> HostsCluster:
        """Build the hosts, make the files and the superadmin, start Redis, the shards, then
        the gateways; returns once each said it is ready (``AssertionError`` with its log if
        one did not, ``HostsUnavailable`` if the hosts cannot be built)."""
        from balancesim.cluster._data_dir import create_user_in_data_dir

        self.lan.build()
        # Every shard's file, with the superadmin in its username's shard, made in the
        # auditor's view, then moved to its host; the view keeps a link to it.
        create_user_in_data_dir(str(self.ledgers), self.SHARDS, self.admin[0], self.admin[1], "superadmin",
                                cost=1024)
        for index in range(self.SHARDS):
            db = self.shard_db(index)
            db.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.ledgers / db.name, db)
            os.symlink(db, self.ledgers / db.name)
        self.start_redis()
        for index in range(self.SHARDS):
            self.start_shard(index, wait=False)
        for index in range(self.SHARDS):
            self._ready(f"shard-{index}", self._lines[f"shard-{index}"], f"shard {index} of {self.SHARDS} on ")
        for host in self.gateway_hosts:
            self.start_gateway(host)
        return self

    def _ready(self, role: str, line: Line, prefix: str) -> str:
        try:
            return line.wait_for(prefix)
        except AssertionError as error:
            raise AssertionError(f"{role}: {error}\n{self.lan.log(role)}") from None

    def start_redis(self) -> subprocess.Popen:
        """Start (or restart, same address, user and password) ``redis-server`` on host A, and
        wait until it accepts connections. Call from the main thread (see ``Lan.start``)."""
        directory = self.lan.dirs["a"]
        log = directory / "redis.log"
        seen = len(log.read_text(errors="replace")) if log.exists() else 0
        self.redis, _ = self.lan.start("a", "redis", ["redis-server", str(redis_config(directory, self.password))],
                                       watchdog=False)
        deadline = time.monotonic() + WAIT_S
        while not (log.exists() and "Ready to accept connections" in log.read_text(errors="replace")[seen:]):
            if self.redis.poll() is not None:
                raise AssertionError(f"redis-server exited {self.redis.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server not ready within {WAIT_S:g} s")
            time.sleep(0.05)
        return self.redis

    def start_shard(self, index: int, *, wait: bool = True) -> subprocess.Popen:
        """Start (or restart) shard ``index`` on its host, on its file; with ``wait``, return once it serves."""
        host = self.HOST_OF_SHARD[index]
        db = self.shard_db(index)
        process, line = self.lan.start(host, f"shard-{index}", _cli(
            "shard", "--index", str(index), "--shards", str(self.SHARDS), "--db", str(db.relative_to(self.lan.dirs[host])),
            *self.shard_args, "--log-level", "warning"), env=self.env)
        self.shards[index] = process
        self._lines[f"shard-{index}"] = line
        if wait:
            self._ready(f"shard-{index}", line, f"shard {index} of {self.SHARDS} on ")
        return process

    def start_gateway(self, host: str) -> subprocess.Popen:
        """Start (or restart) the gateway on ``host``; returns once it listens."""
        process, line = self.lan.start(host, f"gateway-{host}", _cli(
            "gateway", "--host", ADDRESS[host], "--port", str(GATEWAY_PORT), *self.gateway_args,
            "--log-level", "warning"), env=self.env)
        self.gateways[host] = process
        said = self._ready(f"gateway-{host}", line, "listening on ")
        if said != f"listening on {self.urls[host]}":
            raise AssertionError(f"gateway on {host} said {said!r}, not {self.urls[host]}")
        return process

    def cut(self, host: str) -> None:
        """Take ``host`` off the network (see ``Lan.cut``)."""
        self.lan.cut(host)

    def heal(self, host: str) -> None:
        """Put ``host`` back on the network."""
        self.lan.heal(host)

    def inside(self, host: str) -> contextlib.AbstractContextManager[None]:
        """Run this thread's network on ``host`` (``in_netns``): a client there."""
        return in_netns(self.lan.netns[host])

    def stop(self, timeout_s: float = WAIT_S) -> dict[str, int]:
        """The orderly stop: SIGTERM to the gateways (they drain), then the shards (each
        commits what it was handed), then Redis; each role's exit code."""
        codes: dict[str, int] = {}
        order = [*((f"gateway-{h}", p) for h, p in self.gateways.items()),
                 *((f"shard-{k}", p) for k, p in self.shards.items()),
                 *([("redis", self.redis)] if self.redis is not None else [])]
        for role, process in order:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            codes[role] = process.wait(timeout=timeout_s)
        return codes

    def close(self) -> None:
        """Stop everything and delete the hosts (see ``Lan.close``), whatever happened before."""
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(timeout_s=20)
        finally:
            self.lan.close()
