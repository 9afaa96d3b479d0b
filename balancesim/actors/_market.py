"""The market: seeded random-walk prices, and the expiry of options trades.

Trade expiry uses no thread per trade and no timer thread of its own: each open
trade is one entry in the clock's timer heap, whose callback only ``tell``s this
actor ``Expire``. Ticks reach the same actor the same way, so ticks and expiries
are handled in clock order by one thread: a trade's exit price is the last price
ticked at or before its expiry, and under the virtual clock every run with the
same seed settles the same trades at the same prices.

The data path runs one way. The market subscribes to committed events: an
``OptionOpened`` puts the trade's expiry on the clock (on the writer's thread,
before the opener's reply completes, so no caller can advance a virtual clock
past an expiry that is not yet scheduled). At expiry it submits a
``SettleOption`` command through the engine's command door, like any other
client; the account decides the outcome (admin force, control mode, market) and
settles at most once. The market keeps only the settlements still in flight.

Prices are integer units of 1e-8 and move by whole basis points, so the walk is
exact and the same on every machine.
"""

from __future__ import annotations

import collections
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pykka

from balancesim import errors
from balancesim.actors._bus import EventBus
from balancesim.actors._clock import Clock, Timer
from balancesim.actors._messages import Command, OptionOpened, PriceTicked, SettleOption, Trade
from balancesim.actors._reply import Reply
from balancesim.money import UNIT
from balancesim.vocabulary import SYMBOLS

__all__ = ["MarketActor", "PriceBoard", "Feed", "FeedStore", "START_PRICES", "sync"]

# The simulation's opening prices, one per symbol of the vocabulary.
START_PRICES = dict(zip(SYMBOLS, (65_000 * UNIT, 3_500 * UNIT), strict=True))


class PriceBoard:
    """The latest prices, written by the market actor and read by any thread.

    Replacing the whole mapping is one reference assignment, so readers always
    see one consistent tick.
    """

    def __init__(self, prices: Mapping[str, int]) -> None:
        self.prices: Mapping[str, int] = dict(prices)
        self.ts: float = 0.0

    def stale(self, now: float, max_age_s: float) -> bool:
        """Whether the last tick is older than ``max_age_s`` (a followed feed went quiet)."""
        return now - self.ts > max_age_s


class FeedStore:
    """Where a cluster's one price feed keeps its place: the last prices, their time and
    how many ticks came before, in the feed shard's own file. After a restart the walk
    goes on from there (reseeded by the tick count, so it does not replay its steps)
    instead of starting again at the opening prices.

    Saved at most every ``every_s`` of real time and on stop: a tick per second at a time
    scale of 0.01 would otherwise be a hundred fsyncs a second.
    """

    def __init__(self, path: str, *, every_s: float = 1.0) -> None:
        import sqlite3

        self.every_s = every_s
        self._conn = sqlite3.connect(path, check_same_thread=False)
        self._conn.execute("CREATE TABLE IF NOT EXISTS market_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._conn.commit()
        self._saved_at = 0.0

    def load(self) -> tuple[dict[str, int], float, int] | None:
        """``(prices, ts, ticks)`` as last saved, or ``None`` for a feed never run."""
        import json

        row = self._conn.execute("SELECT value FROM market_state WHERE key = 'feed'").fetchone()
        if row is None:
            return None
        state = json.loads(row[0])
        return {s: int(p) for s, p in state["prices"].items()}, float(state["ts"]), int(state["ticks"])

    def save(self, prices: Mapping[str, int], ts: float, ticks: int, *, force: bool = False) -> None:
        import json
        import time

        if not force and time.monotonic() - self._saved_at < self.every_s:
            return
        self._saved_at = time.monotonic()
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO market_state (key, value) VALUES ('feed', ?)",
                               (json.dumps({"prices": dict(prices), "ts": ts, "ticks": ticks}),))

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Feed:
    """A tick of a feed this market follows (in cluster mode, shard 0's), numbered."""

    prices: Mapping[str, int]
    ts: float


@dataclass(frozen=True)
class _Tick:
    ts: float


@dataclass(frozen=True)
class _Expire:
    trade: Trade
    note: Mapping[str, Any]
    at: float


@dataclass(frozen=True)
class _Sync:
    """Answered with the settlement replies still in flight."""


class MarketActor(pykka.ThreadingActor):
    """Price feed and expiry scheduler in one actor, both driven by the clock.

    Args:
        clock: drives ticks and expiries.
        bus: where ticks are published and committed events come from.
        submit: the engine's command door; settlements go in through it.
        board: where the latest prices are shown to other threads.
        open_trades: trades open at start (from the ledger); overdue ones settle
            at once, at the first price, noted ``settled_after_restart``.
        store: keeps the feed's place across restarts (the cluster's one feed).
        follow: take prices from ``Feed`` messages (another process's feed) instead
            of walking them here; then a trade settles only once a tick at or after
            its expiry has been seen, so every shard settles an expiry at one price.
        seed: the random walk's seed.
        tick_s: simulated seconds between ticks.
        step_bp: the largest move of one tick, in basis points.
    """

    use_daemon_thread = True

    def __init__(
        self,
        clock: Clock,
        bus: EventBus,
        submit: Callable[[Command], Reply],
        board: PriceBoard,
        *,
        open_trades: tuple[Trade, ...] = (),
        follow: bool = False,
        store: FeedStore | None = None,
        seed: int = 0,
        tick_s: float = 1.0,
        step_bp: int = 10,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.bus = bus
        self.submit = submit
        self.seed = seed
        self.store = store
        self.ticks = 0
        saved = store.load() if store is not None else None
        if saved is not None:
            board.prices, board.ts, self.ticks = saved
        # Reseeded by the tick count: a restarted feed goes on, it does not replay its steps.
        self.rng = random.Random(f"{seed}:{self.ticks}" if saved is not None else seed)
        self.board = board
        self.tick_s = tick_s
        self.step_bp = step_bp
        self._ticker: Timer | None = None
        self.follow = follow
        self._held: list[_Expire] = []  # expiries waiting for a tick at or after them (follow)
        # Recent followed ticks: an expiry settles at the first tick at or after it, however
        # late its timer fires here, so every shard settles it at the same price.
        self._recent: collections.deque[Feed] = collections.deque(maxlen=600)
        # Settlements submitted and not yet answered; each removes itself when it is.
        self._in_flight: set[Reply] = set()
        self._lock = threading.Lock()
        now = clock.now()
        for trade in open_trades:
            self._schedule(trade, {"settled_after_restart": True} if trade.expires_at <= now else {})
        # Subscribed here, in the starter's thread, so no trade opened after start is missed.
        self._unsubscribe = bus.subscribe(self._on_committed)

    def on_start(self) -> None:
        if self.follow:
            return  # prices come as Feed messages; until the first, the board is stale
        self.board.ts = self.clock.now()
        self.bus.publish([PriceTicked(self.board.prices, self.board.ts)])
        self._ticker = self.clock.call_every(
            self.clock.scaled(self.tick_s), lambda: _tell(self.actor_ref, _Tick(self.clock.now()))
        )

    def on_stop(self) -> None:
        self._unsubscribe()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.store is not None:
            self.store.save(self.board.prices, self.board.ts, self.ticks, force=True)
            self.store.close()

    def _on_committed(self, events: list[Any]) -> None:
        # The bus calls this on the writer's thread: only put expiries on the clock.
        for event in events:
            if type(event) is OptionOpened:
                self._schedule(event.trade, {})

    def _schedule(self, trade: Trade, note: Mapping[str, Any]) -> None:
        now = self.clock.now()
        expire = _Expire(trade, dict(note), max(trade.expires_at, now))
        if trade.expires_at <= now:
            _tell(self.actor_ref, expire)
        else:
            self.clock.call_at(trade.expires_at, lambda: _tell(self.actor_ref, expire))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Tick):
            prices = {
                symbol: max(1, price + price * self.rng.randint(-self.step_bp, self.step_bp) // 10_000)
                for symbol, price in self.board.prices.items()
            }
            self.board.prices, self.board.ts = prices, message.ts
            self.ticks += 1
            if self.store is not None:
                self.store.save(prices, message.ts, self.ticks)
            self.bus.publish([PriceTicked(prices, message.ts)])
        elif isinstance(message, Feed):
            self.board.prices, self.board.ts = dict(message.prices), message.ts
            self._recent.append(message)
            due = [held for held in self._held if held.at <= message.ts]
            self._held = [held for held in self._held if held.at > message.ts]
            for expire in due:
                self._settle(expire)
        elif isinstance(message, _Expire):
            if self.follow and self.board.ts < message.at:
                self._held.append(message)  # no tick at or after the expiry seen yet
            else:
                self._settle(message)
        elif isinstance(message, _Sync):
            with self._lock:
                return list(self._in_flight)
        return None

    def _settle(self, message: _Expire) -> None:
        trade = message.trade
        prices = self.board.prices
        if self.follow:
            prices = next((tick.prices for tick in self._recent if tick.ts >= message.at), prices)
        reply = self.submit(SettleOption(
            trade.user_id, trade.trade_id, prices[trade.symbol], message.at, message.note,
        ))
        with self._lock:
            self._in_flight.add(reply)
        reply.add_done_callback(lambda done: self._answered(done, message))

    def _answered(self, reply: Reply, expire: _Expire) -> None:
        with self._lock:
            self._in_flight.discard(reply)
        try:
            reply.raw()
        except (errors.StorageUnavailable, errors.Unavailable):
            # Refused before COMMIT, nothing written: the account's earlier command failed or
            # expired (a shard cut off, then healed, meets its backlog of expired calls) and the
            # account reloads. Settle again a simulated second later; dropped, the trade would
            # stay open until the next start.
            self.clock.call_later(self.clock.scaled(1.0), lambda: _tell(self.actor_ref, expire))
        except Exception:  # noqa: BLE001 - refused for good (no longer open): nothing to retry
            pass


def sync(ref: pykka.ActorRef[Any], timeout_s: float = 10.0) -> list[Reply]:
    """Wait until the market has handled everything told so far; its settlements still in flight."""
    return ref.ask(_Sync(), timeout=timeout_s)


def _tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # the engine is stopping; the ledger keeps open trades for the next start
