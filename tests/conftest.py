"""Shared fixtures: an engine on a temporary ledger, stopped after every test."""

from __future__ import annotations

from typing import Iterator

import pykka
import pytest

from balancesim.actors import VirtualClock
from balancesim.engine import Engine
from balancesim.serveproc import ServerProcess

TIMEOUT_S = 10

#: The two ways ``balancesim serve`` runs: one process on a ledger file, or a cluster
#: (Redis, 2 shards, 2 gateways on the shared port) on a data directory.
SERVER_MODES = ("embedded", "cluster")
CLUSTER_ARGS = ("--workers", "2", "--shards", "2")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Mark a test whose body failed, so fixtures can save evidence (screenshots) in teardown."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed = True


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "ledger.db")


@pytest.fixture
def make_engine(db_path) -> Iterator:
    """Start engines on the test's ledger (virtual clock, cheap passwords); stop them all."""
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        kwargs.setdefault("clock", VirtualClock())
        kwargs.setdefault("password_cost", 2)
        engine = Engine(kwargs.pop("path", db_path), **kwargs).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        if engine.ledger._thread.is_alive():
            engine.stop()
    pykka.ActorRegistry.stop_all()


@pytest.fixture
def engine(make_engine) -> Engine:
    return make_engine()


@pytest.fixture(params=SERVER_MODES)
def server_mode(request) -> str:
    """Each test that uses it runs twice: against the embedded server and against a cluster."""
    return request.param


@pytest.fixture
def start_server(server_mode, tmp_path) -> Iterator:
    """``start(*args, name=...)``: ``balancesim serve *args`` in the test's mode, running;
    stopped after the test.

    Embedded: ``ServerProcess(tmp/NAME.db, *args)``. Cluster: ``serve --workers 2
    --shards 2 --data-dir tmp/NAME-data *args``. The same ``args`` either way
    (``--demo``, ``--time-scale``, ``--password-cost`` …): a test cannot tell the modes
    apart except through ``server.mode`` and ``server.ledger_args()``.
    """
    servers: list[ServerProcess] = []

    def start(*args: str, name: str = "server") -> ServerProcess:
        if server_mode == "embedded":
            server = ServerProcess(str(tmp_path / f"{name}.db"), *args)
        else:
            server = ServerProcess(None, *CLUSTER_ARGS, *args, data_dir=str(tmp_path / f"{name}-data"))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        if server.running():
            server.stop()


def new_user(engine: Engine, name: str, role: str = "user", usdt: str | None = None) -> int:
    """Create a user (and fund it) and return its id."""
    user_id = engine.create_user(name, f"{name}-pw", role).get(timeout=TIMEOUT_S)["user_id"]
    if usdt is not None:
        engine.deposit(user_id, usdt).get(timeout=TIMEOUT_S)
    return user_id


class Recorder:
    """Collects every event the bus publishes, in order."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, batch: list) -> None:
        self.events.extend(batch)

    def of(self, kind: type) -> list:
        return [event for event in self.events if isinstance(event, kind)]


@pytest.fixture
def recorder(engine) -> Recorder:
    rec = Recorder()
    engine.subscribe(rec)
    return rec
