"""``balancesim serve`` as a child process: started, killed, restarted on the same port."""

from __future__ import annotations

import signal
import subprocess
import sys

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server on ``db``; ``args`` are extra ``serve`` options.

    ``start()`` returns once the server printed its ``listening on`` line, so it
    answers ``/healthz``; ``port`` and ``url`` are then known. The server's log
    (its stderr) goes to ``log_path``, by default the ledger's path plus ``.log``.
    In cluster mode (``args`` with ``--workers``), give ``data_dir`` instead of a
    ``db`` (``None``): the server runs on ``--data-dir data_dir``, logging to
    ``data_dir`` plus ``.log``.
    """

    def __init__(self, db: str | None, *args: str, log_path: str | None = None, data_dir: str | None = None) -> None:
        if (db is None) == (data_dir is None):
            raise ValueError("give a ledger file (db) or a cluster's data directory (data_dir)")
        self.db, self.args, self.data_dir = db, args, data_dir
        self.log_path = log_path or f"{db if db is not None else data_dir}.log"
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.url = ""
        self.output: list[str] = []

    def start(self, port: int | None = None) -> ServerProcess:
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "balancesim.cli", "serve", "--port", str(self.port if port is None else port),
                 *(("--db", self.db) if self.db is not None else ("--data-dir", self.data_dir)), *self.args],
                # Its own session: a Ctrl-C at the terminal reaches only the parent, which
                # stops the server itself once it has finished reporting on it.
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            )
        assert self.process.stdout is not None
        while not (line := self.process.stdout.readline()).startswith("listening on "):
            if not line:
                self.process.wait()
                raise RuntimeError(f"balancesim serve did not start: {''.join(self.output)}{self.log()[-4000:]}")
            self.output.append(line)
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    @property
    def mode(self) -> str:
        """``embedded`` (one process on a ledger file) or ``cluster`` (on a data directory)."""
        return "embedded" if self.db is not None else "cluster"

    def ledger_args(self) -> tuple[str, str]:
        """The options that name this server's ledger to the offline commands (``ledger
        verify``, ``scenario run --url``): ``--db FILE`` or ``--data-dir DIR``."""
        return ("--db", self.db) if self.db is not None else ("--data-dir", self.data_dir)  # type: ignore[return-value]

    def log(self) -> str:
        """What the server has logged so far."""
        try:
            with open(self.log_path) as log:
                return log.read()
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        """The ``serve`` process's id."""
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        assert self.process is not None
        self.process.kill()
        self._reap()

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout_s)

    def _reap(self, timeout_s: float = 60) -> int:
        assert self.process is not None and self.process.stdout is not None
        code = self.process.wait(timeout=timeout_s)
        self.process.stdout.close()
        return code
