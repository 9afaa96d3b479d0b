"""Activation and passivation of account actors.

pykka's own ``ActorRegistry`` is one global list scanned on every start and stop,
so lookups go through this registry's dict instead, and only recently used
accounts keep a live actor (its state in memory, its turns on the shared
dispatcher): an account idle for ``idle_s`` — or among the least recently used
once more than ``max_live`` are live — is stopped, and the next message to it
starts a fresh actor that loads its state from the ledger.

A ``tell`` to a live actor takes no registry lock: eight callers serialised on
one lock spent most of their time queueing for it. Passivation *seals* the
actor's inbox before it asks the actor to stop, so a message either went in
before the stop (and is handled) or is refused by the seal and takes the locked
path, which starts a successor. A successor waits for its predecessor to finish
before it loads, so no state is ever read stale.
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Any

import pykka

from balancesim.actors._account import AccountActor
from balancesim.actors._clock import Clock
from balancesim.actors._ledger import Ledger
from balancesim.actors._pooled import Dispatcher
from balancesim.actors._reply import Reply

__all__ = ["AccountRegistry"]


class AccountRegistry:
    """Finds or starts the actor of an account; passivates idle ones.

    Args:
        ledger: handed to every account actor.
        clock: handed to every account actor.
        idle_s: how long an account may be unused before its actor stops.
        max_live: the most actors kept live at once (beyond it, the least
            recently used sixteenth is passivated in one pass).
        threads: the dispatcher's worker threads.
    """

    def __init__(self, ledger: Ledger, clock: Clock, *, idle_s: float = 60.0, max_live: int = 10_000,
                 threads: int = 2) -> None:
        self.ledger = ledger
        self.clock = clock
        self.dispatcher = Dispatcher(threads, name="Accounts")
        self.idle_s = idle_s
        self.max_live = max_live
        self.activations = 0
        self.passivations = 0
        # Written only under the lock; read without it by ``tell``.
        self._live: dict[int, pykka.ActorRef[Any]] = {}
        # Last use per account, written without the lock (a stale entry only
        # makes an account look idle, and passivating it early is harmless).
        self._used: dict[int, float] = {}
        self._drained: dict[int, Reply] = {}
        self._stopping: dict[int, Reply] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="AccountSweeper", daemon=True)
        self._sweeper.start()

    def tell(self, user_id: int, message: Any) -> None:
        """Deliver ``message`` to the account's actor, starting it if needed."""
        ref = self._live.get(user_id)
        if ref is None or not ref.actor_inbox.offer(message):
            self._tell_starting(user_id, message)
        self._used[user_id] = time.monotonic()

    def live_count(self) -> int:
        """How many account actors are live."""
        with self._lock:
            return len(self._live)

    def passivate_idle(self, idle_s: float | None = None) -> int:
        """Stop every actor unused for ``idle_s`` (default: the configured one)."""
        limit = time.monotonic() - (self.idle_s if idle_s is None else idle_s)
        with self._lock:
            idle = [uid for uid in self._live if self._used.get(uid, 0.0) <= limit]
            for user_id in idle:
                self._passivate(user_id)
        return len(idle)

    def stop_all(self) -> None:
        """Stop every actor and wait until each has drained its in-flight commits."""
        self._closed.set()
        with self._lock:
            for user_id in list(self._live):
                self._passivate(user_id)
            stopping = list(self._stopping.values())
            self._stopping.clear()
        for drained in stopping:
            drained.get(timeout=60)
        self.dispatcher.shutdown()

    def _tell_starting(self, user_id: int, message: Any) -> None:
        with self._lock:
            ref = self._live.get(user_id)
            if ref is not None and ref.actor_inbox.offer(message):
                return
            ref = self._activate(user_id)
            ref.actor_inbox.offer(message)
            if len(self._live) > self.max_live:
                self._passivate_least_used(len(self._live) - self.max_live + self.max_live // 16)

    def _activate(self, user_id: int) -> pykka.ActorRef[Any]:
        predecessor = self._stopping.pop(user_id, None)
        if predecessor is not None and predecessor.done():
            predecessor = None
        drained = Reply()
        self._drained[user_id] = drained
        self.activations += 1
        ref = AccountActor.start(user_id, self.ledger, self.clock, self.dispatcher, drained, predecessor)
        self._live[user_id] = ref
        self._used[user_id] = time.monotonic()
        return ref

    def _passivate_least_used(self, count: int) -> None:
        used = self._used
        for user_id in heapq.nsmallest(count, self._live, key=lambda uid: used.get(uid, 0.0)):
            self._passivate(user_id)

    def _passivate(self, user_id: int) -> None:
        ref = self._live.pop(user_id)
        ref.actor_inbox.seal()
        ref.stop(block=False)
        self._used.pop(user_id, None)
        self._stopping[user_id] = self._drained.pop(user_id)
        self.passivations += 1

    def _sweep(self) -> None:
        while not self._closed.wait(timeout=max(0.05, self.idle_s / 2)):
            self.passivate_idle()
            with self._lock:
                for user_id in [u for u, drained in self._stopping.items() if drained.done()]:
                    del self._stopping[user_id]
                for user_id in [u for u in list(self._used) if u not in self._live]:
                    self._used.pop(user_id, None)
