"""A fixture that starts ``balancesim serve`` subprocesses and stops them after the test."""

from __future__ import annotations

from typing import Iterator

import pytest

from balancesim.serveproc import ServerProcess


@pytest.fixture
def serve(tmp_path) -> Iterator:
    servers: list[ServerProcess] = []

    def start(*args: str, db: str | None = None) -> ServerProcess:
        server = ServerProcess(db or str(tmp_path / "served.db"), *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.running():
            server.stop()
