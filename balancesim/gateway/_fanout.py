"""The session hub: engine events to the WebSocket sessions that may see them.

The engine publishes a batch per group commit on the ledger writer's thread. The
hub appends it to an inbox and schedules *one* ``IOLoop.add_callback`` for all
batches waiting, so the hand-off costs one wake-up per burst, not per message.
On the loop, each event is routed (``balancesim.routing.route``), encoded once,
and the same bytes are written to every session in its audience. A session that
cannot keep up is closed by the session itself (4008) and never delays the rest.

A drain writes for at most ``SLICE_S`` and then lets the loop turn (it goes on in a
later callback, where it stopped): a group commit of a hundred deposits fanned out to
a thousand admin sessions is seconds of writes on a loaded machine, and a loop held
that long answers no request, runs no timer and reads no reply, so Redis clients
time out and commands in flight look lost.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Any, Protocol

from tornado.ioloop import IOLoop

from balancesim.actors import Posted, PriceTicked, UserCreated, UserUpdated
from balancesim.engine import Engine
from balancesim.gateway._auth import TokenStore
from balancesim.gateway._metrics import Metrics
from balancesim.routing import Audiences, Delivery, route

log = logging.getLogger(__name__)

__all__ = ["Hub", "Subscriber", "ACCOUNT_DISABLED", "ROLE_CHANGED"]

#: The longest one drain writes before it lets the loop serve everything else.
SLICE_S = 0.02

# Close reasons (4001) of a user change: the pages show each in plain words.
ACCOUNT_DISABLED = "the account was disabled"
ROLE_CHANGED = "the account's role changed: log in again"


class Subscriber(Protocol):
    """What the hub needs of a session."""

    user_id: int
    is_admin: bool

    def deliver(self, message: dict[str, Any], data: bytes) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Hub:
    """Routes every engine event to the sessions in its audience.

    Usernames for the admin monitor come from ``UserCreated`` events and the
    sessions themselves; one the hub has never seen (an account made by
    ``balancesim users create`` on the same file) is read on ``executor``, and
    the batches behind it wait, so the order of delivery never changes.

    Args:
        engine: where events come from and usernames are looked up.
        metrics: counts messages by type.
        executor: where a missing username is read from the ledger.
        tokens: revoked for an account whose role or disabled flag changes.
        tick_interval_s: the least time between two ``price_tick`` messages.
    """

    def __init__(self, engine: Engine, metrics: Metrics, *, executor: Executor | None = None,
                 tokens: TokenStore | None = None, tick_interval_s: float = 0.5) -> None:
        self.engine = engine
        self.tokens = tokens
        self.metrics = metrics
        self.executor = executor
        self.tick_interval_s = tick_interval_s
        self.loop: IOLoop | None = None
        self.audiences: Audiences[Subscriber] = Audiences()
        self._inbox: collections.deque[list[Any]] = collections.deque()
        self._held: collections.deque[list[Any]] = collections.deque()
        self._next_event = 0  # where routing stopped in ``_held[0]`` when a slice ran out
        self._resolving = False
        self._lock = threading.Lock()
        self._scheduled = False
        self._usernames: dict[int, str] = {}
        self._tick: PriceTicked | None = None
        self._tick_sent_at = 0.0
        self._tick_timer: object | None = None
        self._unsubscribe = lambda: None

    def start(self) -> None:
        """Subscribe to the engine; must run on the IOLoop that serves the sessions."""
        # Usernames are learnt as they come (``UserCreated``, sessions, a read off the
        # loop for one never seen): reading every account here would block the loop.
        self.loop = IOLoop.current()
        self._unsubscribe = self.engine.subscribe(self._on_events)

    def stop(self, code: int = 1001) -> None:
        """Unsubscribe and close every session (1001: going away)."""
        self._unsubscribe()
        for session in list(self.audiences.everyone):
            session.close(code, "server shutting down")

    def add(self, session: Subscriber) -> None:
        self.audiences.add(session, session.user_id, session.is_admin)

    def remove(self, session: Subscriber) -> None:
        self.audiences.remove(session, session.user_id)

    def remember(self, user_id: int, username: str) -> None:
        """Note an account's name for the admin monitor (a new account, or a session's own)."""
        self._usernames[user_id] = username

    def counts(self) -> dict[str, int]:
        """Connected sessions: all and admins."""
        return {"sessions": len(self.audiences.everyone), "admins": len(self.audiences.admins)}

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
            self._held.extend(self._inbox)
            self._inbox.clear()
            self._scheduled = False
        deadline_s = time.monotonic() + SLICE_S
        while self._held and not self._resolving:
            batch = self._held[0]
            if self._next_event == 0:
                missing = {event.user_id for event in batch
                           if type(event) is Posted and event.user_id not in self._usernames}
                if missing:
                    self._resolve(missing)
                    return
            if not self._route(batch, deadline_s):
                break
            self._held.popleft()
            self._next_event = 0
            if time.monotonic() >= deadline_s:
                break
        if self._held and not self._resolving:
            # Go on after whatever else the loop has waiting; batches arriving meanwhile
            # queue behind these, so the order of delivery is unchanged.
            assert self.loop is not None
            self.loop.add_callback(self._drain)

    def _route(self, batch: list[Any], deadline_s: float) -> bool:
        """Route ``batch`` from ``_next_event`` on; ``False`` when the slice ran out before its end."""
        routed = 0  # at least one event per call, so every slice makes progress
        while self._next_event < len(batch):
            if routed and time.monotonic() >= deadline_s:
                return False
            event = batch[self._next_event]
            self._next_event += 1
            routed += 1
            kind = type(event)
            if kind is PriceTicked:
                self._throttle_tick(event)
                continue
            if kind is UserCreated:
                self._usernames[event.user_id] = event.username
            elif kind is UserUpdated:
                self._revoke(event)
            for delivery in route(event, self._usernames.get):
                self._deliver(delivery)
        return True

    def close_sessions(self, user_id: int, token_digest: str | None = None, *, code: int = 4001,
                       reason: str = "logged out") -> int:
        """Close the account's sessions (only those of one token, if given); how many."""
        closing = [s for s in self.audiences.owners.get(user_id, ())
                   if token_digest is None or getattr(s, "token_digest", None) == token_digest]
        for session in closing:
            self.remove(session)
            session.close(code, reason)
        return len(closing)

    def _revoke(self, event: UserUpdated) -> None:
        # In event order, before the PATCH that caused it is answered (its reply
        # reaches the loop after this batch): no request of the old role gets through.
        if self.tokens is not None:
            assert self.loop is not None
            self.loop.add_future(asyncio.ensure_future(self.tokens.revoke_user(event.user_id)), _log_failure)
        self.close_sessions(event.user_id, reason=ACCOUNT_DISABLED if event.disabled else ROLE_CHANGED)

    def _resolve(self, user_ids: set[int]) -> None:
        """Read the names the hub lacks off the loop; the held batches wait for them."""
        assert self.loop is not None
        self._resolving = True

        def read() -> dict[int, str]:
            return {uid: (user or {}).get("username") for uid in user_ids
                    for user in [self.engine.user(uid)]}

        def done(future: Any) -> None:
            self._resolving = False
            try:
                self._usernames.update(future.result())
            except Exception:  # noqa: BLE001 - deliver without the name rather than never
                log.exception("could not read usernames %s", sorted(user_ids))
                self._usernames.update(dict.fromkeys(user_ids))
            self._drain()

        self.loop.add_future(self.loop.run_in_executor(self.executor, read), done)

    def _deliver(self, delivery: Delivery) -> None:
        targets = self.audiences.of(delivery)
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
        for delivery in route(tick, self._usernames.get):
            self._deliver(delivery)


def _log_failure(future: Any) -> None:
    if future.exception() is not None:
        log.error("revoking tokens failed", exc_info=future.exception())
