"""A pykka future that also calls back when it completes.

pykka's ``ThreadingFuture.get()`` blocks; awaiting it on the IOLoop would stall
every session. ``Reply.add_done_callback`` lets the gateway bridge a reply to an
asyncio future without blocking, while tests keep calling ``.get(timeout=1)``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any, Callable

import pykka

__all__ = ["Reply", "as_asyncio", "completed", "failed"]

log = logging.getLogger(__name__)


class Reply(pykka.ThreadingFuture[Any]):
    """A ``ThreadingFuture`` with done-callbacks, set once by whoever completes it."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[Reply], None]] = []
        self._lock = threading.Lock()
        self._done = False

    def set(self, value: Any | None = None) -> None:
        super().set(value)
        self._fire()

    def set_exception(self, exc_info: Any = None) -> None:
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        super().set_exception(exc_info or sys.exc_info())
        self._fire()

    def done(self) -> bool:
        """Whether the reply has been set."""
        return self._done

    def add_done_callback(self, callback: Callable[[Reply], None]) -> None:
        """Call ``callback(self)`` once set: at once if it already is."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def _fire(self) -> None:
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - the setter (often the ledger writer) must go on
                log.exception("reply callback %r failed", callback)


def completed(value: Any) -> Reply:
    """A reply that is already set to ``value``."""
    reply = Reply()
    reply.set(value)
    return reply


def failed(error: BaseException) -> Reply:
    """A reply that already carries ``error``."""
    reply = Reply()
    reply.set_exception(error)
    return reply


def as_asyncio(reply: Reply) -> asyncio.Future[Any]:
    """Bridge a reply into an asyncio future of the running loop, without blocking."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def resolve(done: Reply) -> None:
        try:
            value, error = done.get(timeout=0), None
        except BaseException as raised:  # noqa: BLE001 - handed on to the awaiting side
            value, error = None, raised
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, future, value, error)

    reply.add_done_callback(resolve)
    return future


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
