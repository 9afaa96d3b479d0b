"""The processes of a cluster: a shard, and a gateway. ``balancesim shard`` and
``balancesim gateway`` run one each; ``serve --workers`` starts several of both.

Both announce themselves in Redis with a heartbeat (``bs:shard:<k>``,
``bs:gateway:<id>``, a few seconds of expiry) that ``cluster status`` and ``/readyz``
read; shards also publish the cluster's placement (``bs:placement``), which is how a
gateway on a machine with no data directory learns where accounts live. Redis may
lose all of it: the heartbeats put it back within a second. A heartbeat carries the
address of the process's ``/metrics`` (``metrics_address``).

``cluster status`` judges each shard of the placement: *missing* (no heartbeat), *silent*
(a heartbeat older than ``STALE_AFTER_S``: every gateway treats it as down), *lagging*
(a heartbeat late by a beat, or a command that has waited in its stream longer than
``LAGGING_AFTER_S``: it is alive but behind), or *ok*.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis.asyncio

from balancesim.actors import RealClock
from balancesim.cluster._backlog import Backlog, command_backlog
from balancesim.cluster._health import STALE_AFTER_S, ShardHealth, shard_heartbeat_key
from balancesim.cluster._metrics import MetricsServer, ShardMetrics
from balancesim.cluster._placement import Placement
from balancesim.cluster._remote import RemoteEngine, RemoteTokens, wire_gateway
from balancesim.cluster._service import ShardService
from balancesim.cluster._shard import ShardIds
from balancesim.engine import Engine
from balancesim.gateway import TokenStore, make_app, tune_gc
from balancesim.gateway._server import drain

__all__ = ["ShardOptions", "GatewayOptions", "run_shard", "run_gateway", "PLACEMENT_KEY", "HEARTBEAT_S",
           "read_placement", "cluster_status", "status_problems", "status_lags", "shard_state", "LATE_AFTER_S",
           "LAGGING_AFTER_S", "RedisUnreachable", "create_user_through"]

log = logging.getLogger(__name__)

PLACEMENT_KEY = "bs:placement"
HEARTBEAT_S = 1.0
HEARTBEAT_TTL_S = 5
#: A heartbeat older than this missed a beat (with a beat's margin): the shard's loop is
#: behind. Older than ``STALE_AFTER_S`` the gateways treat it as down.
LATE_AFTER_S = 2 * HEARTBEAT_S
#: A command that waited this long in a shard's stream means the shard is behind: far
#: above the milliseconds a working shard takes to read one, well below the gateway's
#: default deadline (5 s) after which the caller gets a 504.
LAGGING_AFTER_S = 1.0


@dataclass(frozen=True)
class ShardOptions:
    """One shard: ``index`` of ``placement``, its ledger file ``db``."""

    redis_url: str
    index: int
    placement: Placement
    db: str
    secret: bytes
    time_scale: float = 1.0
    seed: int | None = None
    password_cost: int = 2**14
    #: The address the metrics sockets are bound on (what the heartbeat shows).
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class GatewayOptions:
    """One gateway, serving on ``sockets`` (bound by whoever started it) or ``host:port``."""

    redis_url: str
    secret: bytes
    host: str = "127.0.0.1"
    port: int = 3000
    timeout_s: float = 5.0
    drain_s: float = 10.0
    trust_proxy: bool = False


async def _heartbeat(client: redis.asyncio.Redis, key: str, describe: Callable[[], dict[str, Any]],
                     extra: Callable[[redis.asyncio.Redis], Any] | None = None) -> None:
    """Announce this process every ``HEARTBEAT_S``; a Redis that is away is simply retried."""
    while True:
        try:
            await client.set(key, json.dumps({**describe(), "ts": time.time()}), ex=HEARTBEAT_TTL_S)
            if extra is not None:
                await extra(client)
        except (OSError, redis.exceptions.RedisError) as error:  # type: ignore[attr-defined]
            log.debug("heartbeat %s: %s", key, error)
        await asyncio.sleep(HEARTBEAT_S)


def _stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    return stopping


async def run_shard(options: ShardOptions, *, on_ready: Callable[[], None] = lambda: None,
                    metrics_sockets: list[socket.socket] | None = None) -> None:
    """Serve one shard until SIGINT/SIGTERM, then finish what was handed over and exit.

    With ``metrics_sockets`` (bound on ``options.metrics_host``), it serves ``/metrics`` there.

    Raises:
        ShardInUse: another process holds the shard file.
        PlacementError: the file records another placement or index.
    """
    tune_gc()
    # The engine locks the shard file itself (a second writer would reuse ids).
    engine = Engine(options.db, shard=ShardIds(options.placement, options.index),
                    clock=RealClock(options.time_scale),
                    seed=options.seed if options.seed is not None else int(time.time()) + options.index,
                    password_cost=options.password_cost, follow_feed=options.index != 0,
                    persist_feed=options.index == 0, inline_lookups=True).start()
    tokens = TokenStore(options.db)
    service = await ShardService(engine, tokens, redis_url=options.redis_url, index=options.index,
                                 secret=options.secret).start()
    client = redis.asyncio.Redis.from_url(options.redis_url)
    started = time.monotonic()
    metrics = ShardMetrics(service, options.redis_url)
    metrics_server = MetricsServer(metrics.scrape, metrics_sockets, options.metrics_host) if metrics_sockets else None

    def describe() -> dict[str, Any]:
        elapsed = max(time.monotonic() - started, 1e-9)
        return {"index": options.index, "host": socket.gethostname(), "pid": os.getpid(),
                "commits": engine.ledger.commits, "commits_per_s": round(engine.ledger.commits / elapsed, 1),
                "epoch": service.epoch, "calls_in_flight": service.calls_in_flight,
                "metrics_address": metrics_server.address if metrics_server is not None else None}

    async def publish_placement(c: redis.asyncio.Redis) -> None:
        await c.set(PLACEMENT_KEY, json.dumps({"shards": options.placement.shards,
                                               "partitions": options.placement.partitions,
                                               "table": list(options.placement.table)}))

    beat = asyncio.ensure_future(_heartbeat(client, shard_heartbeat_key(options.index), describe, publish_placement))
    stopping = _stop_on_signals(asyncio.get_running_loop())
    on_ready()
    try:
        await stopping.wait()
    finally:
        beat.cancel()
        if metrics_server is not None:
            metrics_server.stop()
        await service.stop()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        await metrics.aclose()
        tokens.close()
        await client.aclose()


async def read_placement(redis_url: str, *, timeout_s: float = 30.0) -> Placement:
    """The placement the shards publish; waits for the first shard up to ``timeout_s``."""
    client = redis.asyncio.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                raw = await client.get(PLACEMENT_KEY)
            except (OSError, redis.exceptions.RedisError):  # type: ignore[attr-defined]
                raw = None
            if raw is not None:
                data = json.loads(raw)
                return Placement(data["shards"], data["partitions"], tuple(data["table"]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no shard has published the placement within {timeout_s:g} s")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def run_gateway(options: GatewayOptions, sockets: list[socket.socket] | None = None, *,
                      on_ready: Callable[[str], None] = lambda url: None,
                      metrics_sockets: list[socket.socket] | None = None) -> None:
    """Serve HTTP and WebSocket over the cluster until SIGINT/SIGTERM, then drain.

    ``/metrics`` is served on the gateway's own port, and also on ``metrics_sockets``
    when given: gateways that share one port (``serve --workers``) can each be scraped there.
    """
    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    tune_gc()
    placement = await read_placement(options.redis_url)
    remote = await RemoteEngine(options.redis_url, placement, options.secret, timeout_s=options.timeout_s).start()
    remote.health = await ShardHealth(options.redis_url, placement.shards).start()
    tokens = RemoteTokens(remote)
    app = make_app(remote, tokens=tokens, trust_proxy=options.trust_proxy)
    ctx = app.settings["ctx"]
    wire_gateway(remote, tokens, ctx.hub)
    server = HTTPServer(app, xheaders=False, max_body_size=1 << 30)
    server.add_sockets(sockets if sockets is not None else bind_sockets(options.port, options.host, backlog=4096))
    port = server._sockets[next(iter(server._sockets))].getsockname()[1]  # noqa: SLF001 - the bound port
    url = f"http://{options.host}:{port}"
    client = redis.asyncio.Redis.from_url(options.redis_url)

    async def scrape() -> bytes:
        return ctx.metrics.render()

    metrics_server = MetricsServer(scrape, metrics_sockets, options.host) if metrics_sockets else None
    metrics_address = metrics_server.address if metrics_server is not None else f"{url}/metrics"

    def describe() -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "address": url,
                "sessions": ctx.hub.counts()["sessions"], "calls_in_flight": remote.calls_in_flight,
                "metrics_address": metrics_address}

    beat = asyncio.ensure_future(_heartbeat(client, f"bs:gateway:{remote.gateway_id}", describe))
    stopping = _stop_on_signals(asyncio.get_running_loop())
    # As the embedded serve: say "listening" only once /healthz answers through the
    # socket (with a shared socket, possibly another gateway's answer: the port works).
    await AsyncHTTPClient().fetch(f"{url}/healthz", request_timeout=30)
    on_ready(url)
    try:
        await stopping.wait()
    finally:
        beat.cancel()
        if metrics_server is not None:
            metrics_server.stop()
        await drain(server, app, options.drain_s)
        await remote.health.aclose()
        await remote.aclose()
        await client.aclose()


class RedisUnreachable(Exception):
    """The cluster's Redis does not answer (the message never carries the URL: it may hold
    Redis's password)."""


async def create_user_through(redis_url: str, secret: bytes, username: str, password: str, role: str = "user",
                              *, timeout_s: float = 30.0) -> dict[str, Any]:
    """``users create --redis``: create an account through a running cluster, on its
    username's shard (the placement read from Redis), as a gateway would; its
    ``{user_id, username, role}``.

    Raises:
        RedisUnreachable: Redis does not answer.
        TimeoutError: no shard has published the placement within ``timeout_s``.
        BalancesimError: the shard's refusal (a taken name, a bad password …), or
            ``Unavailable`` / ``Timeout`` when the shard does not answer.
    """
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        await client.ping()
    except (OSError, redis.exceptions.RedisError) as error:  # type: ignore[attr-defined]
        raise RedisUnreachable(f"cannot reach the cluster's Redis: {type(error).__name__}: {error}") from None
    finally:
        await client.aclose()
    from balancesim.actors import as_asyncio

    placement = await read_placement(redis_url, timeout_s=timeout_s)
    remote = await RemoteEngine(redis_url, placement, secret, timeout_s=timeout_s).start()
    try:
        return await as_asyncio(remote.create_user(username, password, role))
    finally:
        await remote.aclose()


async def cluster_status(redis_url: str, expected_shards: int | None = None, *,
                         lagging_after_s: float = LAGGING_AFTER_S) -> dict[str, Any]:
    """``{shards: [...], gateways: [...], missing_shards: [...]}`` from the heartbeats, with
    their ages in seconds, and each shard's command backlog read from its stream.

    Every shard of the placement (``expected_shards``, else the one the shards published)
    is judged: a live one gets a ``state`` (``shard_state``), a missing one is listed in
    ``missing_shards`` with its backlog. ``lagging_after_s``: how long a command may wait
    in a shard's stream before the shard counts as lagging.
    """
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        now = time.time()
        shards, gateways = [], []
        async for key in client.scan_iter(match=shard_heartbeat_key(0)[:-1] + "*"):
            raw = await client.get(key)
            if raw is not None:
                beat = json.loads(raw)
                shards.append({"index": beat["index"], "host": beat["host"], "pid": beat["pid"],
                               "heartbeat_age_s": round(now - beat["ts"], 2), "commits_per_s": beat["commits_per_s"],
                               "metrics_address": beat.get("metrics_address"),
                               "calls_in_flight": beat.get("calls_in_flight")})
        async for key in client.scan_iter(match="bs:gateway:*"):
            raw = await client.get(key)
            if raw is not None:
                beat = json.loads(raw)
                gateways.append({"host": beat["host"], "pid": beat["pid"], "address": beat["address"],
                                 "sessions": beat["sessions"], "heartbeat_age_s": round(now - beat["ts"], 2),
                                 "metrics_address": beat.get("metrics_address"),
                                 "calls_in_flight": beat.get("calls_in_flight")})
        placement = await client.get(PLACEMENT_KEY)
        published = json.loads(placement)["shards"] if placement is not None else None
        expected = expected_shards if expected_shards is not None else published
        seen = {shard["index"] for shard in shards}
        missing = []
        for index in sorted(seen | set(range(expected or 0))):
            backlog = _backlog_fields(await command_backlog(client, index))
            if index in seen:
                shard = next(s for s in shards if s["index"] == index)
                shard.update(backlog)
                shard["state"] = shard_state(shard["heartbeat_age_s"], shard["oldest_command_age_s"],
                                             lagging_after_s=lagging_after_s)
            else:
                missing.append({"index": index, **backlog})
        return {"shards": sorted(shards, key=lambda s: s["index"]), "gateways": sorted(gateways, key=lambda g: g["pid"]),
                "missing_shards": missing, "expected_shards": expected}
    finally:
        await client.aclose()


def _backlog_fields(backlog: Backlog) -> dict[str, Any]:
    age = backlog.oldest_age_s
    return {"commands_waiting": backlog.waiting, "commands_pending": backlog.pending,
            "oldest_command_age_s": None if age is None else round(age, 2)}


def shard_state(heartbeat_age_s: float, oldest_command_age_s: float | None, *,
                lagging_after_s: float = LAGGING_AFTER_S) -> str:
    """A live shard's state: ``silent`` when its heartbeat is older than ``STALE_AFTER_S``
    (the gateways treat it as down), ``lagging`` when its heartbeat is late by a beat
    (``LATE_AFTER_S``) or a command has waited in its stream longer than
    ``lagging_after_s``, else ``ok``."""
    if heartbeat_age_s > STALE_AFTER_S:
        return "silent"
    if heartbeat_age_s > LATE_AFTER_S or (oldest_command_age_s is not None
                                          and oldest_command_age_s > lagging_after_s):
        return "lagging"
    return "ok"


def _backlog_text(entry: dict[str, Any]) -> str:
    waiting, pending, age = entry["commands_waiting"], entry["commands_pending"], entry["oldest_command_age_s"]
    if age is None:
        return "no command waiting"
    counted = "some" if waiting is None else str(waiting)
    return f"{counted} commands waiting and {pending} read but unacknowledged, the oldest {age:g} s old"


def status_problems(status: dict[str, Any], expected_shards: int | None = None) -> list[str]:
    """What is wrong in ``cluster_status``'s answer: each shard that is missing (of
    ``expected_shards``, else of the placement the shards published) or whose heartbeat
    is older than ``STALE_AFTER_S``. Empty when every shard is alive. (A lagging shard
    is alive: ``status_lags`` says which.)"""
    expected = expected_shards if expected_shards is not None else status.get("expected_shards")
    if expected is None:
        return ["no shard has published the placement: no shard is running"] if not status["shards"] else []
    seen = {shard["index"]: shard for shard in status["shards"]}
    missing = {entry["index"]: entry for entry in status.get("missing_shards", [])}
    problems = []
    for index in range(expected):
        shard = seen.get(index)
        if shard is None:
            entry = missing.get(index)
            problems.append(f"shard {index} is missing" + (f" ({_backlog_text(entry)})" if entry is not None
                                                            and entry["oldest_command_age_s"] is not None else ""))
        elif shard["heartbeat_age_s"] > STALE_AFTER_S:
            problems.append(f"shard {index}'s last heartbeat is {shard['heartbeat_age_s']:g} s old")
    return problems


def status_lags(status: dict[str, Any]) -> list[str]:
    """Each live shard that is lagging (``shard_state``), and why: alive, but behind."""
    lags = []
    for shard in status["shards"]:
        if shard.get("state") != "lagging":
            continue
        reasons = []
        if shard["heartbeat_age_s"] > LATE_AFTER_S:
            reasons.append(f"its last heartbeat is {shard['heartbeat_age_s']:g} s old")
        if shard["oldest_command_age_s"] is not None:
            reasons.append(_backlog_text(shard))
        lags.append(f"shard {shard['index']} is lagging: " + "; ".join(reasons))
    return lags
