"""``balancesim serve`` as a subprocess on a free port, for tests that need a real server."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Iterator

import pytest


class Server:
    def __init__(self, db: str, *args: str) -> None:
        self.db, self.args = db, args
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.port = 0

    def start(self, port: int = 0) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "balancesim.cli", "serve", "--port", str(port), "--db", self.db, *self.args],
            stdout=subprocess.PIPE, text=True,
        )
        seen = []
        while not (line := self.process.stdout.readline()).startswith("listening on "):
            assert line, f"serve exited early: {seen}"
            seen.append(line)
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.process.stdout.close()
        return code


@pytest.fixture
def serve(tmp_path) -> Iterator:
    servers: list[Server] = []

    def start(*args: str, db: str | None = None) -> Server:
        server = Server(db or str(tmp_path / "served.db"), *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process and server.process.poll() is None:
            server.stop()
