"""Clocks: one real-time (with a time scale) and one virtual, advanced by hand.

Everything time-driven in the engine (price ticks, trade expiries, passivation
sweeps) is a callback on the clock. Callbacks must be quick: they ``tell`` an
actor and return. The real clock runs them on one timer thread in time order; the
virtual clock runs them in the caller of ``advance()``, so a scenario is
deterministic and nothing ever sleeps to wait for an expiry.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from datetime import datetime, timezone
from typing import Callable

__all__ = ["Clock", "RealClock", "VirtualClock", "Timer", "iso"]

VIRTUAL_EPOCH_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@functools.lru_cache(maxsize=4096)
def iso(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-01-01T00:00:00.000Z``."""
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Timer:
    """A handle to a scheduled callback; ``cancel()`` keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """A timer heap; subclasses decide what ``now`` is and who runs the callbacks."""

    time_scale: float = 1.0

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._lock = threading.Condition()

    def now(self) -> float:
        raise NotImplementedError

    def scaled(self, seconds: float) -> float:
        """Clock seconds for ``seconds`` of simulated duration."""
        return seconds * self.time_scale

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` at clock time ``when`` (at once if that has passed)."""
        timer = Timer(when, callback)
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._seq), timer))
            self._lock.notify()
        return timer

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` after ``delay_s`` clock seconds."""
        return self.call_at(self.now() + delay_s, callback)

    def call_every(self, interval_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` every ``interval_s``; cancel the returned handle to stop."""
        handle = Timer(0.0, callback)

        def tick(when: float) -> None:
            if handle.cancelled:
                return
            callback()
            self.call_at(when + interval_s, lambda: tick(when + interval_s))

        first = self.now() + interval_s
        self.call_at(first, lambda: tick(first))
        return handle

    def pending(self) -> int:
        """How many callbacks are scheduled."""
        with self._lock:
            return sum(1 for _, _, t in self._heap if not t.cancelled)

    def _pop_due(self, now: float) -> Timer | None:
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                timer = heapq.heappop(self._heap)[2]
                if not timer.cancelled:
                    return timer
            return None

    def stop(self) -> None:
        """Stop running callbacks (the real clock's thread ends)."""


class VirtualClock(Clock):
    """Deterministic time that moves only when ``advance()`` is called."""

    def __init__(self, start: float = VIRTUAL_EPOCH_S) -> None:
        super().__init__()
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> int:
        """Move time forward, running every callback due on the way in time order.

        Returns:
            How many callbacks ran.
        """
        target = self._now + seconds
        ran = 0
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > target:
                    break
                when = self._heap[0][0]
            self._now = max(self._now, when)
            timer = self._pop_due(self._now)
            if timer is not None:
                timer.callback()
                ran += 1
        self._now = target
        return ran


class RealClock(Clock):
    """Wall-clock time; callbacks run on one daemon timer thread.

    Args:
        time_scale: multiplies every simulated duration (0.01 → 100× sooner).
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        super().__init__()
        self.time_scale = time_scale
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="RealClock", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.time()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped:
                    wait_s = (self._heap[0][0] - self.now()) if self._heap else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._lock.wait(timeout=wait_s)
                if self._stopped:
                    return
            timer = self._pop_due(self.now())
            if timer is not None:
                timer.callback()
