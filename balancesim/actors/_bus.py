"""The event bus: committed events (and price ticks) to every subscriber.

Publishers hand over lists, so a subscriber gets a whole group commit in one call
and can pass it on in one hop (the gateway makes one ``IOLoop.add_callback`` per
batch). Callbacks run on the publisher's thread and must not block. The ledger
writer publishes each batch in commit order, so every account's events reach
every subscriber in version order. A subscriber that raises is logged and
skipped; the others still get the batch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

__all__ = ["EventBus"]

log = logging.getLogger(__name__)

Subscriber = Callable[[list[Any]], None]


class EventBus:
    """Fan-out of event batches to subscribers; copy-on-write, so publishing takes no lock."""

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def publish(self, events: list[Any]) -> None:
        """Give ``events`` to every subscriber, in subscription order."""
        for subscriber in self._subscribers:
            try:
                subscriber(events)
            except Exception:  # noqa: BLE001 - one bad subscriber must not starve the rest
                log.exception("event subscriber %r failed", subscriber)
