"""The session hub writes a large burst in slices: the loop turns between them, the order holds."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from balancesim.actors import Posted
from balancesim.gateway import _fanout
from balancesim.gateway._fanout import Hub
from balancesim.gateway._metrics import Metrics


class FakeEngine:
    """Only what the hub needs: a subscription it can be handed batches through."""

    def __init__(self) -> None:
        self.publish: Callable[[list[Any]], None] = lambda batch: None

    def subscribe(self, callback: Callable[[list[Any]], None]) -> Callable[[], None]:
        self.publish = callback
        return lambda: None


class AdminSession:
    """An admin session that records the deposits' descriptions it was sent, in order."""

    user_id = 1
    is_admin = True

    def __init__(self) -> None:
        self.seen: list[str] = []

    def deliver(self, message: dict[str, Any], data: bytes) -> None:
        if message["type"] == "admin_balance_monitor":
            self.seen.append(message["description"])

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        pass


def deposit(user_id: int, version: int, description: str) -> Posted:
    return Posted(user_id, version, "USDT", 100, 100 * version, "deposit", description, {}, 0.0, 1, version)


def test_a_burst_is_written_in_slices_in_order_with_the_loop_turning_between(monkeypatch):
    # A slice of no time at all: one event per loop callback, the most slices there can be.
    monkeypatch.setattr(_fanout, "SLICE_S", 0.0)

    async def scenario() -> None:
        engine = FakeEngine()
        hub = Hub(engine, Metrics())  # type: ignore[arg-type]
        hub.start()
        hub.remember(7, "payee")
        sessions = [AdminSession() for _ in range(3)]
        for session in sessions:
            hub.add(session)
        turns = 0

        async def other_work() -> None:
            # Stands for the requests and timers that a drain must not starve.
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(other_work())
        expected = [f"d{i}" for i in range(40)]
        engine.publish([deposit(7, i + 1, d) for i, d in enumerate(expected[:25])])
        engine.publish([deposit(7, i + 26, d) for i, d in enumerate(expected[25:])])
        for _ in range(1000):
            if all(len(s.seen) == len(expected) for s in sessions):
                break
            await asyncio.sleep(0)
        ticker.cancel()
        assert all(s.seen == expected for s in sessions)
        # With one event per slice, other work ran between the slices, not only after all of them.
        assert turns >= len(expected) // 2

    asyncio.run(asyncio.wait_for(scenario(), 30))
