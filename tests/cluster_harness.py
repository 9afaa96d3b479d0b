"""A cluster in one test process: a private redis-server, shards on their own threads, a gateway.

Each shard is what ``balancesim shard`` runs: an engine on its own shard file (ids by
the placement) behind a ``ShardService`` on its own event loop. The gateway is the
embedded server's ``make_app`` over a ``RemoteEngine``. Tests talk to it over real
HTTP and WebSocket, as to any server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from balancesim.actors import RealClock
from balancesim.cluster import Placement, RedisServer, shard_file, shard_of_username
from balancesim.cluster._remote import RemoteEngine, RemoteTokens
from balancesim.cluster._service import ShardService
from balancesim.cluster._shard import ShardIds
from balancesim.engine import Engine
from balancesim.gateway import TokenStore

SECRET = b"a test cluster's secret, 32+ bytes long"
# Simulated seconds (0.5 s real at the harness's time scale): long enough that a test on a
# loaded machine can act between stalling shard 0 and the follower calling the feed stale.
STALE_FEED_S = 50.0


class ShardThread(threading.Thread):
    """One shard: its engine and its service on a loop of its own."""

    def __init__(self, data_dir: str, placement: Placement, index: int, redis_url: str) -> None:
        super().__init__(daemon=True, name=f"shard-{index}")
        self.engine = Engine(shard_file(data_dir, index), shard=ShardIds(placement, index),
                             clock=RealClock(0.01), password_cost=2, follow_feed=index != 0,
                             persist_feed=index == 0, stale_feed_s=STALE_FEED_S).start()
        self.tokens = TokenStore(self.engine.ledger.path)
        self.service = ShardService(self.engine, self.tokens, redis_url=redis_url, index=index, secret=SECRET)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self.service.start()
        self.ready.set()
        await self._stopping.wait()
        await self.service.stop()

    def stall(self, seconds: float) -> threading.Event:
        """Block this shard's loop as SIGSTOP would (it reads and publishes nothing);
        the event is set once the stall has begun."""
        began = threading.Event()

        def sleep() -> None:
            began.set()
            time.sleep(seconds)

        assert self.loop is not None
        self.loop.call_soon_threadsafe(sleep)
        return began

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
            self.join(timeout=30)
        self.engine.stop()
        self.tokens.close()


class LocalCluster:
    """Redis and ``shards`` shards; ``gateway()`` makes a remote engine for a gateway."""

    def __init__(self, data_dir: str, shards: int = 2) -> None:
        self.data_dir = data_dir
        self.placement = Placement.for_new(shards)
        self.redis = RedisServer(data_dir)
        self.shards: list[ShardThread] = []

    def start(self) -> LocalCluster:
        self.redis.start()
        for index in range(self.placement.shards):
            shard = ShardThread(self.data_dir, self.placement, index, self.redis.url)
            shard.start()
            assert shard.ready.wait(timeout=30)
            self.shards.append(shard)
        return self

    def engine_of(self, username: str) -> Engine:
        """The engine of the shard that ``username``'s account lives on (for setting up)."""
        return self.shards[shard_of_username(self.placement, username)].engine

    async def gateway(self, **options: Any) -> tuple[RemoteEngine, RemoteTokens]:
        remote = await RemoteEngine(self.redis.url, self.placement, SECRET, **options).start()
        return remote, RemoteTokens(remote)

    def stop(self) -> None:
        for shard in self.shards:
            shard.stop()
        self.redis.stop()
