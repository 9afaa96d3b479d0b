"""A pykka future that also calls back when it completes.

pykka's ``ThreadingFuture.get()`` blocks; awaiting it on the IOLoop would stall
every session. ``Reply.add_done_callback`` lets the gateway bridge a reply to an
asyncio future without blocking, while tests keep calling ``.get(timeout=1)``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import weakref
from typing import Any, Callable

import pykka

__all__ = ["Reply", "as_asyncio", "completed", "failed", "settle"]

log = logging.getLogger(__name__)


class Reply(pykka.Future[Any]):
    """A pykka future with done-callbacks, set once by whoever completes it.

    Built on a pre-acquired lock rather than pykka's ``Condition``: a reply is made
    for every mutation, and the condition's set-up was a measurable share of one.
    A waiter acquires the latch and releases it at once, so every waiter wakes.

    Args:
        view: shows the value to whoever reads it. The engine completes a
            mutation's reply with a ``Confirmed`` record; its facade gives the
            reply the edge's view of it, so readers get PROTOCOL.md's body while
            the ledger never builds one. Applied once, on first read.
    """

    def __init__(self, view: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self._view = view
        self._lock = threading.Lock()
        self._latch = threading.Lock()
        self._latch.acquire()
        self._outcome: tuple[Any, Any] | None = None  # (value, exc_info)
        self._raw: Any = None  # the value as set, before the view
        self._callbacks: list[Callable[[Reply], None]] | None = None

    def get(self, *, timeout: float | None = None) -> Any:
        if self._get_hook is not None:
            return super().get(timeout=timeout)
        if self._outcome is None:
            if not self._latch.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                raise pykka.Timeout(f"{timeout} seconds")
            self._latch.release()
        value, exc_info = self._outcome  # type: ignore[misc]
        if exc_info is None:
            if self._view is not None:
                with self._lock:  # two readers must not both see the raw value
                    if self._view is not None:
                        self._outcome = (self._view(value), None)
                        self._view = None
                    value = self._outcome[0]
            return value
        exc_type, exc_value, exc_traceback = exc_info
        if exc_value is None:
            exc_value = exc_type()
        if exc_value.__traceback__ is not exc_traceback:
            raise exc_value.with_traceback(exc_traceback)
        raise exc_value

    def set(self, value: Any | None = None) -> None:
        self._complete((value, None))

    def set_exception(self, exc_info: Any = None) -> None:
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        self._complete((None, exc_info or sys.exc_info()))

    def done(self) -> bool:
        """Whether the reply has been set."""
        return self._outcome is not None

    def raw(self) -> Any:
        """A completed reply's value as it was set, before any view (a ``Confirmed``
        record, which a shard sends on as it is); raises its error like ``get``."""
        self.get(timeout=0)
        return self._raw

    def add_done_callback(self, callback: Callable[[Reply], None]) -> None:
        """Call ``callback(self)`` once set: at once if it already is."""
        with self._lock:
            if self._outcome is None:
                if self._callbacks is None:
                    self._callbacks = [callback]
                else:
                    self._callbacks.append(callback)
                return
        callback(self)

    def _complete(self, outcome: tuple[Any, Any]) -> None:
        with self._lock:
            if self._outcome is not None or self._get_hook is not None:
                raise queue.Full
            self._outcome = outcome
            self._raw = outcome[0]
            callbacks, self._callbacks = self._callbacks, None
        self._latch.release()
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - the setter (often the ledger writer) must go on
                log.exception("reply callback %r failed", callback)


def completed(value: Any, view: Callable[[Any], Any] | None = None) -> Reply:
    """A reply that is already set to ``value`` (shown through ``view``)."""
    reply = Reply(view)
    reply.set(value)
    return reply


def failed(error: BaseException) -> Reply:
    """A reply that already carries ``error``."""
    reply = Reply()
    reply.set_exception(error)
    return reply


def as_asyncio(reply: Reply, *, raw: bool = False) -> asyncio.Future[Any]:
    """Bridge a reply into an asyncio future of the running loop, without blocking.

    With ``raw``, the future gets the value as it was set, not its view: a shard
    sends the ``Confirmed`` record on, and building the edge's body would be waste.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    bridge = _bridges.get(loop)
    if bridge is None:
        bridge = _bridges[loop] = _Bridge(loop)

    def resolve(done: Reply) -> None:
        try:
            value, error = (done.raw() if raw else done.get(timeout=0)), None
        except BaseException as raised:  # noqa: BLE001 - handed on to the awaiting side
            value, error = None, raised
        bridge.push(future, value, error)

    reply.add_done_callback(resolve)
    return future


class _Bridge:
    """Completed replies handed to one loop in bursts.

    The ledger writer completes a whole group commit's replies in a row; one
    ``call_soon_threadsafe`` (a write to the loop's wake-up socket) per burst
    instead of one per reply.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._lock = threading.Lock()

    def push(self, future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._pending.append((future, value, error))
            if len(self._pending) > 1:
                return
        if self.loop.is_closed():
            return
        if asyncio._get_running_loop() is self.loop:
            # Completed on the loop itself (a gateway's remote replies): no wake-up to write.
            self.loop.call_soon(self._drain)
        else:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for future, value, error in pending:
            settle(future, value, error)


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Bridge] = weakref.WeakKeyDictionary()


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Complete ``future`` with ``value``, or with ``error`` when there is one; a future
    already done (its waiter gave up) is left as it is."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
