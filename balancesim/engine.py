"""The engine facade that the gateway, the CLI and the scenarios all use.

The engine's interface is records: ``submit(command)`` takes a command (see
``balancesim.actors``) and returns a ``Reply`` completed, after the ledger
commit, with ``Confirmed(events)`` or with the ``BalancesimError`` that
``decide`` or the ledger raised; committed events go out to ``subscribe``rs,
numbered, in commit order. The named methods (``deposit``, ``open_option`` …)
turn decimal strings into units, build the command and return a reply whose
value is shown as PROTOCOL.md's success body (``balancesim.views.result_of``).

Nothing here blocks its caller, so the gateway may call it on its IOLoop. Work
that blocks (password hashing, a ledger read for an account not seen yet, an
idempotency look-up) runs on the engine's own threads and completes the reply
from there. The reads (``balance``, ``history``, ``users``, ``authenticate`` …)
block: callers on an event loop run them in an executor.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Mapping

import pykka

from balancesim import errors
from balancesim.actors import (
    Adjust,
    AccountRegistry,
    Clock,
    Command,
    Confirmed,
    CreateUser,
    Deposit,
    Envelope,
    EventBus,
    Feed,
    FeedStore,
    ForceOption,
    Ledger,
    MarketActor,
    OpenOption,
    PlaceSpotOrder,
    Posted,
    PriceBoard,
    RealClock,
    Rejected,
    Reply,
    SetControlMode,
    START_PRICES,
    UpdateUser,
    UserCreated,
    UserUpdated,
    VirtualClock,
    Withdraw,
    check_password,
    completed,
    failed,
    iso,
    is_text,
    market_sync,
    validate,
)
from balancesim.actors._ledger import Submission, connect, create_schema, insert_user
from balancesim.auth import DEFAULT_COST, hash_password, verify_password
from balancesim.money import format_amount, parse_amount
from balancesim.views import balances_view, result_of, trade_view, transaction_view

if TYPE_CHECKING:  # imported when used: the embedded mode needs nothing of the cluster package
    from balancesim.cluster import ShardIds

__all__ = ["Engine", "DEFAULT_PAYOUT_RATES", "MAX_KEY_LENGTH", "create_user_in", "deadline"]

# The deadline of the commands submitted in this context (a shard serving a call sets
# it from the call): past it, the ledger refuses to commit them.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


@contextlib.contextmanager
def deadline(at: float | None) -> Any:
    """Commands submitted inside are not committed after ``at`` (seconds since the epoch)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)

DEFAULT_PAYOUT_RATES = {30: "0.10", 60: "0.15"}
MAX_KEY_LENGTH = 128


class Engine:
    """Owns the ledger, the bus, the clock, the market and the account registry.

    Args:
        db_path: the SQLite file (created if missing).
        clock: a ``RealClock`` (default) or a ``VirtualClock``.
        seed: the market's seed.
        idle_s: how long an account actor may idle before it is passivated.
        max_live: the most account actors live at once.
        threads: the account dispatcher's worker threads.
        payout_rates: profit rate per duration, as decimal strings.
        start_prices: symbol → decimal string, the market's first prices.
        password_cost: scrypt's N for new passwords.
        batch_max: the most decisions in one group commit.
        follow_feed: take prices from ``feed()`` (another process's price feed)
            instead of walking them here: a cluster shard other than shard 0.
        stale_feed_s: with ``follow_feed``, prices older than this (on the clock's
            own scale) refuse new options and spot orders as ``503 unavailable``.
        stale_feed_min_s: but never fewer real seconds than this: the ticks cross
            processes and Redis, whose delays do not shrink with the time scale (at
            ``--time-scale 0.01``, 5 simulated seconds would be 50 ms, which a busy
            machine's scheduling alone exceeds).
        persist_feed: keep the price feed's place in the ledger file, so that after a
            restart the walk goes on (the cluster's one feed, in shard 0).
        shard: this engine is that shard of a cluster: the file is locked for it
            (``ShardFileInUse``) until ``stop``, its placement recorded or checked
            (``PlacementError``), ids name the shard, and a new account whose
            username another shard owns is refused (``WrongShard``). ``None``: the
            embedded mode.
        inline_lookups: look up the idempotency key of a keyed command for a known
            account on the caller's own thread, not on an engine thread. For a caller
            with no sessions to keep responsive (a shard's command loop, where every
            mutation is keyed): an indexed read costs ≈ 10–20 µs, the hop to a thread
            and back through the GIL several times that. ``False`` for an IOLoop that
            serves sessions, which must never wait on a read.
    """

    def __init__(
        self,
        db_path: str,
        *,
        clock: Clock | None = None,
        seed: int = 0,
        idle_s: float = 60.0,
        max_live: int = 10_000,
        threads: int = 2,
        payout_rates: Mapping[int, str] | None = None,
        start_prices: Mapping[str, str] | None = None,
        password_cost: int = DEFAULT_COST,
        batch_max: int = 1000,
        shard: ShardIds | None = None,
        follow_feed: bool = False,
        stale_feed_s: float = 5.0,
        stale_feed_min_s: float = 1.0,
        persist_feed: bool = False,
        inline_lookups: bool = False,
    ) -> None:
        self.shard = shard
        self.inline_lookups = inline_lookups
        self.clock = clock or RealClock()
        self.seed = seed
        self.password_cost = password_cost
        self.payout_rates = {
            duration: parse_amount(rate, field="payout rate")
            for duration, rate in (payout_rates or DEFAULT_PAYOUT_RATES).items()
        }
        prices = (
            {symbol: parse_amount(price, field=symbol) for symbol, price in start_prices.items()}
            if start_prices else START_PRICES
        )
        self.bus = EventBus()
        self._lock = None
        if shard is not None:
            from balancesim.cluster import lock_shard_file

            # Before the ledger opens: a second writer must not even record or check.
            self._lock = lock_shard_file(db_path)
        try:
            # One more reader for the caller's inline look-ups, so that they rarely find
            # the pool taken by the engine's and the caller's own reading threads.
            self.ledger = Ledger(db_path, batch_max=batch_max, ids=shard, readers=5 if inline_lookups else 4)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self.ledger.on_commit(self.bus.publish)
        self.registry = AccountRegistry(
            self.ledger, self.clock, idle_s=idle_s, max_live=max_live, threads=threads
        )
        self.board = PriceBoard(prices)
        self.follow_feed = follow_feed
        self.stale_feed_s = stale_feed_s
        self.stale_feed_min_s = stale_feed_min_s
        self.persist_feed = persist_feed
        self._market: pykka.ActorRef[Any] | None = None
        # Accounts known to exist: a command for one goes straight to its actor.
        self._known_users: set[int] = set()
        self.bus.subscribe(self._note_users)
        # Blocking work, off the caller's thread: ledger look-ups, and (apart, as
        # each takes tens of milliseconds) password hashing. One hashing thread
        # keeps creations in call order, so user ids are deterministic under a seed.
        # The hashing thread runs at a lower priority: scrypt is CPU-bound, and on
        # a small machine the gateway's IOLoop thread must win a core from it.
        self._io = ThreadPoolExecutor(4, thread_name_prefix="engine-io")
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="engine-hash", initializer=_lower_priority)
        self._idem_lock = threading.Lock()
        self._idem_inflight: dict[tuple[int, str], tuple[str, Reply]] = {}

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Engine:
        """Start the market; every open trade is scheduled again (overdue ones settle at once)."""
        self._market = MarketActor.start(
            self.clock, self.bus, self.submit, self.board,
            open_trades=tuple(self.ledger.trades(status="open")), seed=self.seed, follow=self.follow_feed,
            store=FeedStore(self.ledger.path) if self.persist_feed else None,
        )
        # The market starts its ticker in on_start, on its own thread: wait for it, so
        # that a virtual clock advanced right after start() does tick.
        market_sync(self._market)
        return self

    def stop(self) -> None:
        """Stop the market and every account, commit what is queued, close the ledger."""
        if self._market is not None:
            self._market.stop()
            self._market = None
        self.clock.stop()
        self._hashing.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self.registry.stop_all()
        self.ledger.close()
        if self._lock is not None:
            self._lock.release()

    def ready(self) -> bool:
        """Whether the engine takes commands: started, and its ledger writer alive."""
        return self._market is not None and self.ledger.alive()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the command door ----------------------------------------------------------

    def submit(self, command: Command) -> Reply:
        """Send ``command`` to its account; the reply is ``Confirmed(events)`` after the commit."""
        reply = Reply()
        self.registry.tell(command.user_id, Envelope(command, reply))
        return reply

    def subscribe(self, callback: Callable[[list[Any]], None]) -> Callable[[], None]:
        """Receive every committed event batch (and price ticks); returns unsubscribe."""
        return self.bus.subscribe(callback)

    def feed(self, prices: Mapping[str, int], ts: float) -> None:
        """A tick of the feed this engine follows (``follow_feed``)."""
        if self._market is not None:
            self._market.tell(Feed(dict(prices), ts))

    def _fresh_prices(self) -> None:
        max_age_s = max(self.clock.scaled(self.stale_feed_s), self.stale_feed_min_s)
        if self.follow_feed and self.board.stale(self.clock.now(), max_age_s):
            raise errors.Unavailable("the price feed is stale: no new options or spot orders until it ticks again")

    # -- users ---------------------------------------------------------------------

    def create_user(self, username: str, password: str, role: str = "user", *,
                    created_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        """Create an account; the reply is ``{user_id, username, role}``.

        The password is hashed on the engine's hashing threads. With a key, a
        repeat by the same creator answers the first creation, across restarts.
        """
        command = CreateUser(username, role, "", created_by)
        rejected = validate(command)
        if rejected is not None:
            return failed(rejected.error)
        try:
            if self.shard is not None:
                self.shard.partition_of(username)  # before hashing: the ledger would refuse it anyway
            check_password(password)
            self._check_key(idempotency_key)
        except errors.BalancesimError as error:
            return failed(error)
        reply = Reply(result_of)
        self._hashing.submit(self._create, reply, command, password, idempotency_key, _DEADLINE.get())
        return reply

    def update_user(self, user_id: int, *, disabled: bool | None = None, role: str | None = None,
                    set_by: int, idempotency_key: str | None = None) -> Reply:
        """Disable, re-enable or change the role of an account; ``{user_id, username, role, disabled}``.

        Recorded with who and when (``user_changes``); the ``UserUpdated`` event
        tells the gateway to revoke the account's tokens and close its sessions.
        """
        if type(user_id) is not int:
            return failed(errors.InvalidRequest("user_id must be an integer"))
        command = UpdateUser(user_id, disabled, role, set_by)
        rejected = validate(command)
        if rejected is not None:
            return failed(rejected.error)
        try:
            self._check_key(idempotency_key)
        except errors.BalancesimError as error:
            return failed(error)
        until = _DEADLINE.get()
        reply = Reply(result_of)

        def send(target: Reply, idempotency: tuple[int, str, str] | None) -> None:
            decided = UserUpdated(user_id, "", role or "", bool(disabled), set_by, self.clock.now())
            self.ledger.append(Submission(None, command, (decided,), target, None, idempotency, until))

        if idempotency_key is None:
            send(reply, None)
        else:
            fingerprint = json.dumps({"op": "update_user", "user_id": user_id, "disabled": disabled,
                                      "role": role}, sort_keys=True)
            self._io.submit(self._keyed, reply, set_by, idempotency_key, fingerprint, send)
        return reply

    def login(self, username: str, password: str) -> Reply:
        """``authenticate`` on the hashing thread: the reply is the user or ``None``."""
        reply = Reply()

        def check() -> None:
            try:
                reply.set(self.authenticate(username, password))
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                reply.set_exception(error)

        self._hashing.submit(check)
        return reply

    def authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        """``{user_id, username, role, disabled}`` when the password matches, else ``None``. Blocks."""
        if not (is_text(username) and is_text(password)):
            return None
        row = self.ledger.user(username=username)
        if row is None or not verify_password(password, row["password_hash"]):
            return None
        return {"user_id": row["user_id"], "username": row["username"], "role": row["role"],
                "disabled": bool(row["disabled"])}

    def user(self, user_id: int) -> dict[str, Any] | None:
        """``{user_id, username, role}`` or ``None``. Blocks."""
        row = self.ledger.user(user_id=user_id) if self._storable(user_id) else None
        if row is None:
            return None
        self._known_users.add(user_id)
        return {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}

    def users(self, *, with_disabled: bool = False) -> list[dict[str, Any]]:
        """Every account as ``GET /api/users`` lists it (``with_disabled``: and its flag). Blocks."""
        views = [self._snapshot_view(snap) for snap in self.ledger.snapshots()]
        if not with_disabled:
            for view in views:
                del view["disabled"]
        return views

    # -- mutations -----------------------------------------------------------------

    def deposit(self, user_id: int, amount: str, asset: str = "USDT", description: str = "",
                *, initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        """Credit ``amount`` of ``asset``; the reply is ``{transaction}``."""
        return self._money(Deposit, "deposit", user_id, amount, asset, description, initiated_by, idempotency_key)

    def withdraw(self, user_id: int, amount: str, asset: str = "USDT", description: str = "",
                 *, initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        """Debit ``amount``; ``insufficient_funds`` if the balance is lower."""
        return self._money(Withdraw, "withdrawal", user_id, amount, asset, description, initiated_by, idempotency_key)

    def adjust(self, user_id: int, amount: str, asset: str = "USDT", description: str = "",
               *, initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        """Apply a signed correction; never below zero."""
        return self._money(Adjust, "adjustment", user_id, amount, asset, description, initiated_by, idempotency_key)

    def open_option(self, user_id: int, symbol: str, direction: str, amount: str, duration: int,
                    *, idempotency_key: str | None = None) -> Reply:
        """Stake ``amount`` USDT on ``symbol`` going ``direction`` for ``duration`` s; ``{trade}``."""
        params = {"symbol": symbol, "direction": direction, "amount": amount, "duration": duration}

        def build(units: int) -> Command:
            self._fresh_prices()
            known = type(duration) is int and duration in self.payout_rates
            return OpenOption(
                user_id, symbol, direction, units, duration,
                self.payout_rates[duration] if known else None,
                self.board.prices.get(symbol) if isinstance(symbol, str) else None,
                initiated_by=user_id,
                expires_in_s=self.clock.scaled(duration) if known else None,
            )

        return self._submit(user_id, lambda: _parsed(amount, build), "option", params, user_id, idempotency_key)

    def force_option(self, trade_id: str, outcome: str, admin_id: int,
                     *, idempotency_key: str | None = None) -> Reply:
        """Fix the outcome of an open trade at expiry; ``conflict`` once it has settled."""
        rejected = validate(ForceOption(0, trade_id, outcome, admin_id))
        if rejected is not None:
            return failed(rejected.error)
        reply = Reply(result_of)
        self._io.submit(self._force, reply, trade_id, outcome, admin_id, idempotency_key, _DEADLINE.get())
        return reply

    def spot_order(self, user_id: int, symbol: str, side: str, quantity: str,
                   *, idempotency_key: str | None = None) -> Reply:
        """Buy or sell ``quantity`` at the current price, both legs atomically; ``{order}``."""
        params = {"symbol": symbol, "side": side, "quantity": quantity}

        def build(units: int) -> Command:
            self._fresh_prices()
            price = self.board.prices.get(symbol) if isinstance(symbol, str) else None
            return PlaceSpotOrder(user_id, symbol, side, units, price, initiated_by=user_id)

        return self._submit(user_id, lambda: _parsed(quantity, build, field="quantity"), "spot", params,
                            user_id, idempotency_key)

    def set_control_mode(self, user_id: int, mode: str, set_by: int,
                         *, idempotency_key: str | None = None) -> Reply:
        """Set the owner's control mode; published to the owner and the admins."""
        return self._submit(
            user_id, lambda: SetControlMode(user_id, mode, set_by), "control",
            {"mode": mode}, set_by, idempotency_key,
        )

    # -- reads (blocking) ------------------------------------------------------------

    def balance(self, user_id: int) -> dict[str, Any]:
        """``{user_id, balances, version, control_mode}`` as committed."""
        snaps = self.ledger.snapshots(user_id) if self._storable(user_id) else []
        if not snaps:
            raise errors.UnknownUser(f"no user {user_id}")
        view = self._snapshot_view(snaps[0])
        del view["username"], view["role"], view["disabled"]
        return view

    def history(self, user_id: int, after_version: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Committed transactions above ``after_version``, oldest first."""
        return [transaction_view(entry) for entry in self.ledger.history(user_id, after_version, limit)]

    def entries(self, user_id: int, after_version: int = 0, limit: int = 100) -> list[Posted]:
        """Committed entries above ``after_version`` as records (for replaying them as messages)."""
        return self.ledger.history(user_id, after_version, limit)

    def trades(self, user_id: int | None = None, status: str | None = None, *,
               newest_first: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        """Trades of one account (or all), ``open`` or ``settled`` or both; oldest first unless ``newest_first``."""
        return [trade_view(trade) for trade in self.ledger.trades(user_id, status, newest_first=newest_first, limit=limit)]

    def market(self) -> dict[str, Any]:
        """``{prices, ts}`` as of the last tick (in memory: does not block)."""
        return {
            "prices": {symbol: format_amount(p) for symbol, p in self.board.prices.items()},
            "ts": iso(self.board.ts or self.clock.now()),
        }

    # -- time ----------------------------------------------------------------------

    def advance(self, seconds: float, *, timeout_s: float = 30.0) -> None:
        """Virtual clock only: move time on and wait until all it triggered is committed."""
        if not isinstance(self.clock, VirtualClock):
            raise TypeError("advance() needs a VirtualClock")
        self.clock.advance(seconds)
        self.settle_pending(timeout_s=timeout_s)

    def settle_pending(self, *, timeout_s: float = 30.0) -> None:
        """Wait until every tick and expiry so far is handled and its settlement committed."""
        if self._market is None:
            return
        for reply in market_sync(self._market, timeout_s):
            try:
                reply.get(timeout=timeout_s)
            except errors.BalancesimError:
                pass  # settled already (an admin force won the race): nothing to wait for
        self.ledger.flush().get(timeout=timeout_s)

    # -- internals -----------------------------------------------------------------

    def _money(self, kind: type, op: str, user_id: int, amount: str, asset: str, description: str,
               initiated_by: int | None, key: str | None) -> Reply:
        params = {"amount": amount, "asset": asset, "description": description}
        signed = kind is Adjust

        def build(units: int) -> Command:
            return kind(user_id, units, asset, description, initiated_by)

        caller = initiated_by if initiated_by is not None else user_id
        return self._submit(user_id, lambda: _parsed(amount, build, signed=signed), op, params, caller, key)

    def _submit(self, user_id: int, make: Callable[[], Command], op: str, params: dict,
                caller: int, key: str | None) -> Reply:
        if type(user_id) is not int:
            return failed(errors.InvalidRequest("user_id must be an integer"))
        reply = Reply(result_of)
        until = _DEADLINE.get()
        if key is None and user_id in self._known_users:
            # The hot path: no I/O to do, so no thread hop.
            try:
                command = make()
            except errors.BalancesimError as error:
                reply.set_exception(error)
            else:
                self.registry.tell(user_id, Envelope(command, reply, None, until))
            return reply
        if self.inline_lookups and user_id in self._known_users:
            self._prepare(reply, user_id, make, op, params, caller, key, until)
            return reply
        self._io.submit(self._prepare, reply, user_id, make, op, params, caller, key, until)
        return reply

    def _prepare(self, reply: Reply, user_id: int, make: Callable[[], Command], op: str, params: dict,
                 caller: int, key: str | None, until: float | None = None) -> None:
        """On an engine thread: the checks that read the ledger, then the send."""
        try:
            if user_id not in self._known_users and self.user(user_id) is None:
                raise errors.UnknownUser(f"no user {user_id}")
            self._check_key(key)
            command = make()
        except errors.BalancesimError as error:
            reply.set_exception(error)
            return
        if key is None:
            self.registry.tell(user_id, Envelope(command, reply, None, until))
            return
        fingerprint = json.dumps({"op": op, "user_id": user_id, **params}, sort_keys=True)
        self._keyed(reply, caller, key, fingerprint,
                    lambda raw, idem: self.registry.tell(user_id, Envelope(command, raw, idem, until)))

    def _force(self, reply: Reply, trade_id: str, outcome: str, admin_id: int, key: str | None,
               until: float | None = None) -> None:
        trade = self.ledger.trade(trade_id) if is_text(trade_id) else None
        if trade is None:
            reply.set_exception(errors.UnknownTrade(f"no trade {trade_id!r}"))
        elif trade.status != "open":
            reply.set_exception(errors.Conflict(f"trade {trade_id} has already settled"))
        else:
            self._prepare(reply, trade.user_id, lambda: ForceOption(trade.user_id, trade_id, outcome, admin_id),
                          "force", {"trade_id": trade_id, "outcome": outcome}, admin_id, key, until)

    def _create(self, reply: Reply, command: CreateUser, password: str, key: str | None,
                until: float | None = None) -> None:
        """On a hashing thread: hash, then hand the new account to the ledger writer."""

        def send(target: Reply, idempotency: tuple[int, str, str] | None) -> None:
            hashed = CreateUser(command.username, command.role,
                                hash_password(password, cost=self.password_cost), command.created_by)
            decided = UserCreated(0, command.username, command.role, self.clock.now())
            self.ledger.append(Submission(None, hashed, (decided,), target, None, idempotency, until))

        if key is None:
            send(reply, None)
            return
        fingerprint = json.dumps({"op": "user", "username": command.username, "role": command.role},
                                 sort_keys=True)
        self._keyed(reply, command.created_by or 0, key, fingerprint, send)

    def _keyed(self, reply: Reply, caller: int, key: str, fingerprint: str,
               send: Callable[[Reply, tuple[int, str, str]], None]) -> None:
        """Answer a keyed command once: from the ledger if it committed, from the
        one in flight if there is one, else by sending it (``send(raw_reply, idempotency)``)."""
        ident = (caller, key)
        # One lock across the look-up and the registration: two repeats racing must
        # not both miss the ledger and both send. It is held on engine threads only.
        with self._idem_lock:
            pending = self._idem_inflight.get(ident)
            stored = self.ledger.remembered(caller, key) if pending is None else None
            fresh = pending is None and stored is None
            if fresh:
                pending = self._idem_inflight[ident] = (fingerprint, Reply())
                pending[1].add_done_callback(lambda _: self._forget(ident))
        if stored is not None:
            pending = stored
        if pending[0] != fingerprint:
            reply.set_exception(errors.Conflict("Idempotency-Key was already used for a different request"))
        elif isinstance(pending[1], Reply):
            _follow(pending[1], reply)
            if fresh:
                send(pending[1], (caller, key, fingerprint))
        elif isinstance(pending[1], Confirmed):
            reply.set(pending[1])
        elif isinstance(pending[1], Rejected):  # it expired before its commit: a repeat says so
            reply.set_exception(pending[1].error)
        else:  # a body stored by an older release, answered as it is
            reply._view = None
            reply.set(pending[1])

    def _forget(self, ident: tuple[int, str]) -> None:
        with self._idem_lock:
            self._idem_inflight.pop(ident, None)

    @staticmethod
    def _check_key(key: str | None) -> None:
        if key is not None and (not is_text(key) or not 1 <= len(key) <= MAX_KEY_LENGTH):
            raise errors.InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")

    def _note_users(self, events: list[Any]) -> None:
        for event in events:
            if type(event) is UserCreated:
                self._known_users.add(event.user_id)

    @staticmethod
    def _storable(user_id: int) -> bool:
        # SQLite integers are 64-bit: a larger id cannot name any account.
        return type(user_id) is int and 0 < user_id < 2**63

    @staticmethod
    def _snapshot_view(snap: dict[str, Any]) -> dict[str, Any]:
        return {**snap, "balances": balances_view(snap["balances"])}


def create_user_in(db_path: str, username: str, password: str, role: str = "user", *,
                   cost: int = DEFAULT_COST, now: float | None = None, shard: ShardIds | None = None) -> int:
    """Create an account in a ledger file directly (a server may be running on it); its id.

    The engine's own rules judge it (``validate`` and ``check_password``), so
    ``balancesim users create`` accepts exactly what ``POST /api/users`` does.
    With ``shard``, the file is that shard's (recorded when new, checked otherwise)
    and the id is allocated as that shard's engine does, in the same transaction as
    the row, so a running shard and this never hand out the same id.

    Raises:
        BalancesimError: ``invalid_request`` for a bad name, password or role
            (``WrongShard`` for another shard's name); ``conflict`` for a taken name.
        PlacementError: with ``shard``, the file is another shard's.
        sqlite3.Error: the file is not a ledger that can be written.
    """
    import time

    rejected = validate(CreateUser(username, role, ""))
    if rejected is not None:
        raise rejected.error
    if shard is not None:
        shard.partition_of(username)
    check_password(password)
    db = connect(db_path)
    try:
        if shard is None:
            create_schema(db)
            return insert_user(db, username, role, hash_password(password, cost=cost),
                               time.time() if now is None else now)
        hashed = hash_password(password, cost=cost)  # not inside the write transaction
        with db.atomic():
            # One transaction: a new shard file gets its tables, its placement and its account at once.
            create_schema(db)
            shard.claim(db.conn, db_path)
            return insert_user(db, username, role, hashed, time.time() if now is None else now, ids=shard)
    finally:
        db.close()


def _lower_priority() -> None:
    # SCHED_IDLE: the thread gets a core only when no other thread of the machine
    # wants one, so scrypt never delays the IOLoop; nice 19 where that is refused.
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: the thread runs at the process's priority


def _parsed(text: object, build: Callable[[int], Command], *, field: str = "amount",
            signed: bool = False) -> Command:
    """``build(units)`` of the decimal string ``text``. When ``text`` is not an amount,
    another field's error is reported first, as it always has been."""
    try:
        units = parse_amount(text, signed=signed, field=field)
    except errors.InvalidAmount:
        rejected = validate(build(-1 if signed else 1))
        if rejected is not None:
            raise rejected.error from None
        raise
    return build(units)


def _follow(source: Reply, target: Reply) -> None:
    """Complete ``target`` with ``source``'s raw outcome once it has one."""

    def copy(done: Reply) -> None:
        try:
            value = done.get(timeout=0)
        except BaseException as error:  # noqa: BLE001 - handed on as it is
            target.set_exception(error)
        else:
            target.set(value)

    source.add_done_callback(copy)
