"""A private ``redis-server`` child process: the fabric ``serve`` starts when given no URL.

Redis here holds nothing that cannot be lost (the shards' ledgers are the source of
truth), so the server is started to forget: no RDB snapshot (``save ""``), no AOF, and
``dir`` is the data directory so that a dump, if one were ever written, would be seen
there. It listens on a Unix socket in the data directory (mode 700) and, only when asked,
on TCP. Clients authenticate as one ACL user with a generated password; the ``default``
user is disabled, so nothing on the socket or the network gets in without the password.

The whole configuration, password included, goes into a file of mode 600 rather than on
the command line, where every local user could read it in ``/proc/PID/cmdline``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

__all__ = ["RedisServer", "RedisNotFound"]

# sun_path is 108 bytes on Linux, with the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107


class RedisNotFound(RuntimeError):
    """``redis-server`` is not on ``PATH``."""

    def __init__(self) -> None:
        super().__init__("redis-server is not on PATH; install Debian's redis-server")


class RedisServer:
    """One ``redis-server`` child on a private Unix socket (and optionally TCP).

    ``RedisServer(data_dir).start()`` returns once the server answers ``PING`` as
    its ACL user; ``url`` is what redis-py's ``from_url`` takes. ``restart()`` keeps
    the password, socket and port, so a client's URL stays valid across it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str | None = None,
        port: int = 0,
        user: str = "balancesim",
        password: str | None = None,
        binary: str = "redis-server",
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        """``host``/``port``: also listen on TCP (``port`` 0, the default, means no TCP).
        ``die_with_parent``: the kernel kills the server when the thread that starts it
        ends (``PR_SET_PDEATHSIG``), for a supervisor that starts it from its main thread."""
        if (host is None) != (port == 0):
            raise ValueError("TCP needs both host and a non-zero port")
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"the Unix socket path {self.socket_path} is longer than "
                f"{_MAX_SOCKET_PATH_BYTES} bytes; use a data directory with a shorter path"
            )
        self.host = host
        self.port = port
        self.user = user
        self._password = password or secrets.token_hex(24)
        self._binary = binary
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self.die_with_parent = die_with_parent

    def __repr__(self) -> str:
        # Never the password: a repr ends up in logs and tracebacks.
        return f"RedisServer({str(self.data_dir)!r}, pid={self.pid})"

    @property
    def password(self) -> str:
        """The ACL user's password (keep it out of logs)."""
        return self._password

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs, else ``None``."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (not whether it answers)."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """``unix://user:pass@/DIR/redis.sock`` for redis-py."""
        return f"unix://{self._credentials()}@{self.socket_path}"

    @property
    def tcp_url(self) -> str:
        """``redis://user:pass@host:port``; only when started with TCP."""
        if self.host is None:
            raise ValueError("this server was started without TCP")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{self._credentials()}@{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the server writes its log (read it when it will not start)."""
        return self.data_dir / "redis.log"

    def _credentials(self) -> str:
        return f"{quote(self.user, safe='')}:{quote(self._password, safe='')}"

    def _config(self) -> str:
        lines = [
            "daemonize no",
            f"dir {self.data_dir}",
            # Nothing from a previous run may come back: no snapshot, no AOF.
            'save ""',
            "appendonly no",
            f"unixsocket {self.socket_path}",
            "unixsocketperm 700",
            f"port {self.port}",
            f"logfile {self.log_path}",
            # Commands wait for a shard, never for Redis to free memory by evicting.
            "maxmemory-policy noeviction",
            "user default off resetpass nocommands",
            # Everything the fabric needs, nothing that reconfigures or wipes the server.
            f"user {self.user} on >{self._password} ~* &* +@all -@dangerous +info",
        ]
        if self.host is not None:
            lines.append(f"bind {self.host}")
        else:
            # Redis binds every interface by default; port 0 already disables TCP, and this
            # keeps it so if someone sets a port later.
            lines.append("bind 127.0.0.1 -::1")
        return "\n".join(lines) + "\n"

    def start(self) -> "RedisServer":
        """Start the child and wait (bounded) until it answers ``PING``."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        binary = shutil.which(self._binary)
        if binary is None:
            raise RedisNotFound()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        os.chmod(config, 0o600)  # in case it existed with a looser mode
        self._process = subprocess.Popen(
            [binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=self._preexec() if self.die_with_parent else None,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    @staticmethod
    def _preexec():  # type: ignore[no-untyped-def]
        from balancesim.cluster._watchdog import die_with_parent_preexec

        parent = os.getpid()
        return lambda: die_with_parent_preexec(parent)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode} at start: "
                    f"{self._log_tail()}"
                )
            try:
                client = redis.Redis.from_url(
                    self.url, socket_timeout=1.0, socket_connect_timeout=1.0
                )
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError) as error:
                last_error = error
            time.sleep(0.02)
        raise TimeoutError(
            f"redis-server did not answer PING within {self.start_timeout_s} s "
            f"({last_error}): {self._log_tail()}"
        )

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL; the exit status, or ``None`` if not running."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL the child and reap it (a crash, for fault tests)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self) -> "RedisServer":
        """Stop, then start again on the same socket, port and password (empty: no dump)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "RedisServer":
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
