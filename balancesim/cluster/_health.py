"""What a gateway knows of the cluster's health, without asking on the request path.

``/readyz`` must answer at once and never block the gateway's loop, yet "ready" means
"Redis answers and every shard is alive". So a background task reads the shards'
heartbeats (``bs:shard:<k>``, see ``_processes``) every ``refresh_s``, and the
handler reads the cached verdict. A shard whose heartbeat is older than
``STALE_AFTER_S`` (or missing) is down; so is every shard while Redis does not answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio

__all__ = ["ShardHealth", "STALE_AFTER_S", "shard_heartbeat_key"]

log = logging.getLogger(__name__)

# Shards beat every second: three missed beats is a shard that is down or stuck, not
# one that was briefly slow.
STALE_AFTER_S = 3.0


def shard_heartbeat_key(index: int) -> str:
    """Where shard ``index`` announces itself."""
    return f"bs:shard:{index}"


class ShardHealth:
    """A cached view of which shards are alive, refreshed in the background.

    Args:
        redis_url: the fabric.
        shards: how many shards the placement has.
        refresh_s: how often the heartbeats are read.
    """

    def __init__(self, redis_url: str, shards: int, *, refresh_s: float = 0.5) -> None:
        self.redis_url = redis_url
        self.shards = shards
        self.refresh_s = refresh_s
        self.redis_ok = False
        self._beat_ts: dict[int, float] = {}
        self._read_at_ts = 0.0  # wall clock when the last read of the heartbeats was sent
        self._task: asyncio.Task[None] | None = None
        self._client: redis.asyncio.Redis | None = None

    async def start(self) -> ShardHealth:
        """Read the heartbeats once (so the first answer is not a guess), then keep reading."""
        self._client = redis.asyncio.Redis.from_url(self.redis_url, socket_timeout=2.0,
                                                    socket_connect_timeout=2.0)
        await self.refresh()
        self._task = asyncio.ensure_future(self._run())
        return self

    async def aclose(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.aclose()

    async def refresh(self) -> None:
        """Read every shard's heartbeat now."""
        assert self._client is not None
        # When asked, not when the answer is handled: a loop busy for seconds between the two
        # would otherwise charge its own delay to the beats.
        asked_at_ts = time.time()
        try:
            raws = await self._client.mget([shard_heartbeat_key(k) for k in range(self.shards)])
        except (OSError, redis.exceptions.RedisError) as error:  # type: ignore[attr-defined]
            if self.redis_ok:
                log.warning("cannot read the shards' heartbeats: %s", error)
            self.redis_ok = False
            return
        self.redis_ok = True
        self._read_at_ts = asked_at_ts
        self._beat_ts = {}
        for index, raw in enumerate(raws):
            if raw is not None:
                try:
                    self._beat_ts[index] = float(json.loads(raw)["ts"])
                except (ValueError, KeyError, TypeError):
                    pass  # not a heartbeat we can read: as good as missing

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    def alive(self, index: int) -> bool:
        """Whether shard ``index`` beat recently, as of the last refresh (wall clock)."""
        ts = self._beat_ts.get(index)
        if not self.redis_ok or ts is None:
            return False
        # A beat's age is taken when it was read, not now: a gateway whose loop was busy
        # for seconds (a fan-out of thousands of frames on a loaded machine) has not read
        # since, which says nothing of the shard, and its requests queued meanwhile would
        # all be refused 503. While the refresher runs, a read is at most ``refresh_s``
        # plus the loop's lag old, and a Redis that stops answering clears ``redis_ok``
        # within the client's timeout. Should the refresher have stopped, age from now.
        refreshing = self._task is not None and not self._task.done()
        return (self._read_at_ts if refreshing else time.time()) - ts < STALE_AFTER_S

    def down(self) -> list[int]:
        """The shards that are not alive (all of them while Redis does not answer)."""
        return [index for index in range(self.shards) if not self.alive(index)]

    def ready(self) -> bool:
        """Redis answers and every shard is alive."""
        return self.redis_ok and not self.down()
