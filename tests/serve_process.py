"""Fixtures that start ``balancesim serve`` subprocesses and stop them after the test."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from balancesim.serveproc import ServerProcess


def stopped_after(make: Callable[..., ServerProcess]) -> Iterator[Callable[..., ServerProcess]]:
    """Yield ``start(*args, **kw)``, which starts ``make(*args, **kw)``; stop them all after."""
    servers: list[ServerProcess] = []

    def start(*args: str, **kw: str | None) -> ServerProcess:
        server = make(*args, **kw).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.running():
            server.stop()


@pytest.fixture
def serve(tmp_path) -> Iterator:
    yield from stopped_after(lambda *args, db=None: ServerProcess(db or str(tmp_path / "served.db"), *args))
