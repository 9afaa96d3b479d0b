"""A gateway's cached view of the shards' heartbeats (``ShardHealth``), against a real redis-server.

The staleness bound is shrunk for the test (0.5 s for the real 3 s); waits stay far above
the refresh interval, never asserted as speed.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Iterator

import pytest
import redis

from balancesim.cluster import RedisServer, ShardHealth
from balancesim.cluster import _health
from balancesim.cluster._health import shard_heartbeat_key

STALE_S = 0.5


@pytest.fixture
def server(tmp_path_factory) -> Iterator[RedisServer]:
    """A fresh redis-server per test (short path: a Unix socket path is at most 107 bytes)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as started:
        yield started


def beat(url: str, index: int, ts: float) -> None:
    """Write shard ``index``'s heartbeat as the shard does (its wall clock in ``ts``)."""
    client = redis.Redis.from_url(url)
    try:
        client.set(shard_heartbeat_key(index), json.dumps({"ts": ts}))
    finally:
        client.close()


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def test_a_busy_loop_does_not_make_a_beating_shard_down_but_a_silent_shard_is(server, monkeypatch):
    monkeypatch.setattr(_health, "STALE_AFTER_S", STALE_S)

    async def scenario() -> None:
        beat(server.url, 0, time.time())
        health = await ShardHealth(server.url, 1, refresh_s=0.02).start()
        try:
            assert health.alive(0)
            # The gateway's loop busy for longer than the bound (a large fan-out): no refresh
            # can run. The requests served right after must not find the shard down: it
            # was beating when last read, and nothing since says otherwise.
            time.sleep(STALE_S * 2)
            assert health.alive(0) and health.ready()
            # Busy too between Redis's answer and its handling: the delay is the loop's, not the beat's.
            real_mget = health._client.mget

            async def late_mget(keys: list[str]) -> list:
                raws = await real_mget(keys)
                time.sleep(STALE_S * 2)
                return raws

            beat(server.url, 0, time.time())
            health._client.mget = late_mget  # type: ignore[method-assign]
            await health.refresh()
            health._client.mget = real_mget  # type: ignore[method-assign]
            assert health.alive(0)
            # A shard that stops beating is down once a read shows its beat too old.
            beat(server.url, 0, time.time() - STALE_S * 2)
            await until(lambda: not health.alive(0))
            assert health.down() == [0]
            beat(server.url, 0, time.time())
            await until(lambda: health.alive(0))
        finally:
            await health.aclose()
        # With the refresher stopped, the last read ages from now: a shard goes down.
        time.sleep(STALE_S * 2)
        assert not health.alive(0)

    asyncio.run(asyncio.wait_for(scenario(), 60))
