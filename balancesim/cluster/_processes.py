"""The processes of a cluster: a shard, and a gateway. ``balancesim shard`` and
``balancesim gateway`` run one each; ``serve --workers`` starts several of both.

Both announce themselves in Redis with a heartbeat (``bs:shard:<k>``,
``bs:gateway:<id>``, a few seconds of expiry) that ``cluster status`` and ``/readyz``
read; shards also publish the cluster's placement (``bs:placement``), which is how a
gateway on a machine with no data directory learns where accounts live. Redis may
lose all of it: the heartbeats put it back within a second.
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
from balancesim.cluster._health import STALE_AFTER_S, ShardHealth, shard_heartbeat_key
from balancesim.cluster._placement import Placement
from balancesim.cluster._remote import RemoteEngine, RemoteTokens, wire_gateway
from balancesim.cluster._service import ShardService
from balancesim.cluster._shard import ShardIds
from balancesim.engine import Engine
from balancesim.gateway import TokenStore, make_app, tune_gc
from balancesim.gateway._server import drain

__all__ = ["ShardOptions", "GatewayOptions", "run_shard", "run_gateway", "PLACEMENT_KEY", "HEARTBEAT_S",
           "read_placement", "cluster_status", "status_problems", "RedisUnreachable", "create_user_through"]

log = logging.getLogger(__name__)

PLACEMENT_KEY = "bs:placement"
HEARTBEAT_S = 1.0
HEARTBEAT_TTL_S = 5


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


async def run_shard(options: ShardOptions, *, on_ready: Callable[[], None] = lambda: None) -> None:
    """Serve one shard until SIGINT/SIGTERM, then finish what was handed over and exit.

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

    def describe() -> dict[str, Any]:
        elapsed = max(time.monotonic() - started, 1e-9)
        return {"index": options.index, "host": socket.gethostname(), "pid": os.getpid(),
                "commits": engine.ledger.commits, "commits_per_s": round(engine.ledger.commits / elapsed, 1),
                "epoch": service.epoch}

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
        await service.stop()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
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
                      on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve HTTP and WebSocket over the cluster until SIGINT/SIGTERM, then drain."""
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

    def describe() -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "address": url,
                "sessions": ctx.hub.counts()["sessions"]}

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


async def cluster_status(redis_url: str) -> dict[str, Any]:
    """``{shards: [...], gateways: [...]}`` from the heartbeats, with their ages in seconds."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        now = time.time()
        shards, gateways = [], []
        async for key in client.scan_iter(match=shard_heartbeat_key(0)[:-1] + "*"):
            raw = await client.get(key)
            if raw is not None:
                beat = json.loads(raw)
                shards.append({"index": beat["index"], "host": beat["host"], "pid": beat["pid"],
                               "heartbeat_age_s": round(now - beat["ts"], 2), "commits_per_s": beat["commits_per_s"]})
        async for key in client.scan_iter(match="bs:gateway:*"):
            raw = await client.get(key)
            if raw is not None:
                beat = json.loads(raw)
                gateways.append({"host": beat["host"], "pid": beat["pid"], "address": beat["address"],
                                 "sessions": beat["sessions"], "heartbeat_age_s": round(now - beat["ts"], 2)})
        placement = await client.get(PLACEMENT_KEY)
        expected = json.loads(placement)["shards"] if placement is not None else None
        return {"shards": sorted(shards, key=lambda s: s["index"]), "gateways": sorted(gateways, key=lambda g: g["pid"]),
                "expected_shards": expected}
    finally:
        await client.aclose()


def status_problems(status: dict[str, Any], expected_shards: int | None = None) -> list[str]:
    """What is wrong in ``cluster_status``'s answer: each shard that is missing (of
    ``expected_shards``, else of the placement the shards published) or whose heartbeat
    is older than ``STALE_AFTER_S``. Empty when every shard is alive."""
    expected = expected_shards if expected_shards is not None else status.get("expected_shards")
    if expected is None:
        return ["no shard has published the placement: no shard is running"] if not status["shards"] else []
    seen = {shard["index"]: shard for shard in status["shards"]}
    problems = []
    for index in range(expected):
        shard = seen.get(index)
        if shard is None:
            problems.append(f"shard {index} is missing")
        elif shard["heartbeat_age_s"] > STALE_AFTER_S:
            problems.append(f"shard {index}'s last heartbeat is {shard['heartbeat_age_s']:g} s old")
    return problems
