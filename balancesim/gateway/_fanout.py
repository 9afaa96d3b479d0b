"""The session hub: engine events to the WebSocket sessions that may see them.

The engine publishes a batch per group commit on the ledger writer's thread. The
hub appends it to an inbox and schedules *one* ``IOLoop.add_callback`` for all
batches waiting, so the hand-off costs one wake-up per burst, not per message.
On the loop, each event is routed (``balancesim.routing.route``), encoded once,
and the same bytes are written to every session in its audience. A session that
cannot keep up is closed by the session itself (4008) and never delays the rest.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any, Protocol

from tornado.ioloop import IOLoop

from balancesim.actors import PriceTicked
from balancesim.engine import Engine
from balancesim.gateway._metrics import Metrics
from balancesim.routing import ADMINS, EVERYONE, OWNER, Delivery, route

__all__ = ["Hub", "Subscriber"]


class Subscriber(Protocol):
    """What the hub needs of a session."""

    user_id: int
    is_admin: bool

    def deliver(self, message: dict[str, Any], data: bytes) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Hub:
    """Routes every engine event to the sessions in its audience.

    Args:
        engine: where events come from and usernames are looked up.
        metrics: counts messages by type.
        tick_interval_s: the least time between two ``price_tick`` messages.
    """

    def __init__(self, engine: Engine, metrics: Metrics, *, tick_interval_s: float = 0.5) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tick_interval_s = tick_interval_s
        self.loop: IOLoop | None = None
        self._owners: dict[int, set[Subscriber]] = collections.defaultdict(set)
        self._admins: set[Subscriber] = set()
        self._everyone: set[Subscriber] = set()
        self._inbox: collections.deque[list[Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._usernames: dict[int, str] = {}
        self._tick: PriceTicked | None = None
        self._tick_sent_at = 0.0
        self._tick_timer: object | None = None
        self._unsubscribe = lambda: None

    def start(self) -> None:
        """Subscribe to the engine; must run on the IOLoop that serves the sessions."""
        self.loop = IOLoop.current()
        self._usernames = {user["user_id"]: user["username"] for user in self.engine.users()}
        self._unsubscribe = self.engine.subscribe(self._on_events)

    def stop(self, code: int = 1001) -> None:
        """Unsubscribe and close every session (1001: going away)."""
        self._unsubscribe()
        for session in list(self._everyone):
            session.close(code, "server shutting down")

    def add(self, session: Subscriber) -> None:
        self._owners[session.user_id].add(session)
        self._everyone.add(session)
        if session.is_admin:
            self._admins.add(session)

    def remove(self, session: Subscriber) -> None:
        owners = self._owners.get(session.user_id)
        if owners is not None:
            owners.discard(session)
            if not owners:
                del self._owners[session.user_id]
        self._admins.discard(session)
        self._everyone.discard(session)

    def remember(self, user_id: int, username: str) -> None:
        """Note an account's name for the admin monitor (a new account, or a session's own)."""
        self._usernames[user_id] = username

    def counts(self) -> dict[str, int]:
        """Connected sessions: all and admins."""
        return {"sessions": len(self._everyone), "admins": len(self._admins)}

    def _on_events(self, batch: list[Any]) -> None:
        # Runs on the publisher's thread: hand over and return.
        with self._lock:
            self._inbox.append(batch)
            if self._scheduled:
                return
            self._scheduled = True
        assert self.loop is not None
        self.loop.add_callback(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batches = list(self._inbox)
            self._inbox.clear()
            self._scheduled = False
        for batch in batches:
            for event in batch:
                if isinstance(event, PriceTicked):
                    self._throttle_tick(event)
                    continue
                for delivery in route(event, self._username):
                    self._deliver(delivery)

    def _deliver(self, delivery: Delivery) -> None:
        if delivery.audience == OWNER:
            targets: Any = self._owners.get(delivery.user_id, ())
        elif delivery.audience == ADMINS:
            targets = self._admins
        else:
            targets = self._everyone
        if not targets:
            return
        data = json.dumps(delivery.message).encode()
        for session in list(targets):
            session.deliver(delivery.message, data)
        self.metrics.messages.labels(delivery.message["type"]).inc(len(targets))

    def _throttle_tick(self, tick: PriceTicked) -> None:
        self._tick = tick
        if self._tick_timer is not None:
            return
        wait_s = self._tick_sent_at + self.tick_interval_s - time.monotonic()
        if wait_s <= 0:
            self._send_tick()
        else:
            assert self.loop is not None
            self._tick_timer = self.loop.call_later(wait_s, self._send_tick)

    def _send_tick(self) -> None:
        self._tick_timer = None
        tick, self._tick = self._tick, None
        if tick is None:
            return
        self._tick_sent_at = time.monotonic()
        for delivery in route(tick, self._username):
            self._deliver(delivery)

    def _username(self, user_id: int) -> str | None:
        name = self._usernames.get(user_id)
        if name is None:
            user = self.engine.user(user_id)
            if user is not None:
                name = self._usernames[user_id] = user["username"]
        return name
