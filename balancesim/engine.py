"""The engine facade that the gateway, the CLI and the scenarios all use.

Mutations return a ``Reply`` (a pykka future): ``.get(timeout=…)`` blocks, and
``as_asyncio(reply)`` awaits it on an event loop without blocking. A reply's
value is the PROTOCOL.md success body; a rejection raises a ``BalancesimError``
carrying the PROTOCOL.md code. A reply is set only after the ledger commit.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Mapping

import pykka

from balancesim import errors
from balancesim.actors import (
    Adjust,
    AccountRegistry,
    Clock,
    Command,
    Deposit,
    EventBus,
    ForceOption,
    Ledger,
    MarketActor,
    OpenOption,
    OptionOpened,
    PlaceSpotOrder,
    Posted,
    PriceBoard,
    RealClock,
    Reply,
    Request,
    SetControlMode,
    SettleOption,
    START_PRICES,
    VirtualClock,
    Withdraw,
    balances_view,
    completed,
    failed,
    iso,
    market_sync,
    trade_view,
    transaction_view,
)
from balancesim.auth import DEFAULT_COST, ROLES, hash_password, verify_password
from balancesim.money import format_amount, parse_amount

__all__ = ["Engine", "DEFAULT_PAYOUT_RATES"]

DEFAULT_PAYOUT_RATES = {30: "0.10", 60: "0.15"}
MAX_KEY_LENGTH = 128


def _is_text(value: Any) -> bool:
    """A string the ledger can store: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which UTF-8 cannot encode, and one such entry would fail its
    whole group commit."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


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
    ) -> None:
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
        self.ledger = Ledger(db_path, batch_max=batch_max)
        self.ledger.on_commit(self._schedule_opened)
        self.ledger.on_commit(self.bus.publish)
        self.registry = AccountRegistry(
            self.ledger, self.clock, idle_s=idle_s, max_live=max_live, threads=threads
        )
        self.board = PriceBoard(prices)
        self._market: pykka.ActorRef[Any] | None = None
        self._known_users: set[int] = set()
        self._idem_lock = threading.Lock()
        self._idem_inflight: dict[tuple[int, str], tuple[str, Reply]] = {}

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Engine:
        """Start the market and re-schedule every open trade (overdue ones settle at once)."""
        self._market = MarketActor.start(
            self.clock, self.bus, self._settle, self.board, seed=self.seed
        )
        now = self.clock.now()
        for trade in self.ledger.trades(status="open"):
            note = {"settled_after_restart": True} if trade.expires_at <= now else {}
            MarketActor.schedule(self._market, self.clock, trade, note)
        return self

    def stop(self) -> None:
        """Stop the market and every account, commit what is queued, close the ledger."""
        if self._market is not None:
            self._market.stop()
            self._market = None
        self.clock.stop()
        self.registry.stop_all()
        self.ledger.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- users ---------------------------------------------------------------------

    def create_user(self, username: str, password: str, role: str = "user") -> Reply:
        """Create an account; the reply is ``{user_id, username, role}``."""
        if not isinstance(username, str) or not 1 <= len(username) <= 64 or not username.isprintable():
            return failed(errors.InvalidRequest("username must be 1 to 64 printable characters"))
        if not _is_text(password) or not 1 <= len(password) <= 256:
            return failed(errors.InvalidRequest("password must be 1 to 256 characters"))
        if role not in ROLES:
            return failed(errors.InvalidRequest("role must be user, admin or superadmin"))
        created = self.ledger.create_user(
            username, role, hash_password(password, cost=self.password_cost), self.clock.now()
        )
        reply = Reply()

        def done(result: Reply) -> None:
            try:
                user_id = result.get(timeout=0)
            except errors.BalancesimError as error:
                reply.set_exception(error)
            else:
                self._known_users.add(user_id)
                reply.set({"user_id": user_id, "username": username, "role": role})

        created.add_done_callback(done)
        return reply

    def authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        """``{user_id, username, role}`` when the password matches, else ``None``."""
        if not (_is_text(username) and _is_text(password)):
            return None
        row = self.ledger.user(username=username)
        if row is None or not verify_password(password, row["password_hash"]):
            return None
        return {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}

    def user(self, user_id: int) -> dict[str, Any] | None:
        """``{user_id, username, role}`` or ``None``."""
        row = self.ledger.user(user_id=user_id) if self._storable(user_id) else None
        if row is None:
            return None
        self._known_users.add(user_id)
        return {"user_id": row["user_id"], "username": row["username"], "role": row["role"]}

    def users(self) -> list[dict[str, Any]]:
        """Every account as ``GET /api/users`` lists it."""
        return [self._snapshot_view(snap) for snap in self.ledger.snapshots()]

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

        def build() -> Command:
            if type(duration) is not int or duration not in self.payout_rates:
                raise errors.InvalidRequest("duration must be 30 or 60")
            if symbol not in self.board.prices:
                raise errors.InvalidRequest("symbol must be BTCUSDT or ETHUSDT")
            return OpenOption(
                user_id, symbol, direction, parse_amount(amount), duration,
                self.payout_rates[duration], self.board.prices[symbol], initiated_by=user_id,
                expires_in_s=self.clock.scaled(duration),
            )

        return self._submit(user_id, build, "option", params, user_id, idempotency_key)

    def force_option(self, trade_id: str, outcome: str, admin_id: int,
                     *, idempotency_key: str | None = None) -> Reply:
        """Fix the outcome of an open trade at expiry; ``conflict`` once it has settled."""
        trade = self.ledger.trade(trade_id) if _is_text(trade_id) else None
        if trade is None:
            return failed(errors.UnknownTrade(f"no trade {trade_id!r}"))
        if trade.status != "open":
            return failed(errors.Conflict(f"trade {trade_id} has already settled"))
        return self._submit(
            trade.user_id, lambda: ForceOption(trade.user_id, trade_id, outcome, admin_id),
            "force", {"trade_id": trade_id, "outcome": outcome}, admin_id, idempotency_key,
        )

    def spot_order(self, user_id: int, symbol: str, side: str, quantity: str,
                   *, idempotency_key: str | None = None) -> Reply:
        """Buy or sell ``quantity`` at the current price, both legs atomically; ``{order}``."""
        params = {"symbol": symbol, "side": side, "quantity": quantity}

        def build() -> Command:
            if symbol not in self.board.prices:
                raise errors.InvalidRequest("symbol must be BTCUSDT or ETHUSDT")
            return PlaceSpotOrder(
                user_id, symbol, side, parse_amount(quantity, field="quantity"),
                self.board.prices[symbol], initiated_by=user_id,
            )

        return self._submit(user_id, build, "spot", params, user_id, idempotency_key)

    def set_control_mode(self, user_id: int, mode: str, set_by: int,
                         *, idempotency_key: str | None = None) -> Reply:
        """Set the owner's control mode; published to the owner and the admins."""
        return self._submit(
            user_id, lambda: SetControlMode(user_id, mode, set_by), "control",
            {"mode": mode}, set_by, idempotency_key,
        )

    # -- reads ---------------------------------------------------------------------

    def balance(self, user_id: int) -> dict[str, Any]:
        """``{user_id, balances, version, control_mode}`` as committed."""
        snaps = self.ledger.snapshots(user_id) if self._storable(user_id) else []
        if not snaps:
            raise errors.UnknownUser(f"no user {user_id}")
        view = self._snapshot_view(snaps[0])
        del view["username"], view["role"]
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
        """``{prices, ts}`` as of the last tick."""
        return {
            "prices": {symbol: format_amount(p) for symbol, p in self.board.prices.items()},
            "ts": iso(self.board.ts or self.clock.now()),
        }

    def subscribe(self, callback: Callable[[list[Any]], None]) -> Callable[[], None]:
        """Receive every committed event batch (and price ticks); returns unsubscribe."""
        return self.bus.subscribe(callback)

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

        def build() -> Command:
            if not _is_text(description) or len(description) > 500:
                raise errors.InvalidRequest("description must be a string of at most 500 characters")
            if not isinstance(asset, str) or asset not in ("USDT", "BTC", "ETH"):
                raise errors.InvalidRequest("asset must be one of USDT, BTC, ETH")
            return kind(user_id, parse_amount(amount, signed=kind is Adjust), asset, description, initiated_by)

        caller = initiated_by if initiated_by is not None else user_id
        return self._submit(user_id, build, op, params, caller, key)

    def _submit(self, user_id: int, build: Callable[[], Command], op: str, params: dict,
                caller: int, key: str | None) -> Reply:
        try:
            self._require_user(user_id)
            if key is not None and (not _is_text(key) or not 1 <= len(key) <= MAX_KEY_LENGTH):
                raise errors.InvalidRequest("Idempotency-Key must be 1 to 128 characters")
            command = build()
        except errors.BalancesimError as error:
            return failed(error)
        if key is None:
            return self._send(command, None)
        fingerprint = json.dumps({"op": op, "user_id": user_id, **params}, sort_keys=True)
        return self._idempotent((caller, key), fingerprint, command)

    def _idempotent(self, ident: tuple[int, str], fingerprint: str, command: Command) -> Reply:
        reused = errors.Conflict("Idempotency-Key was already used for a different request")
        with self._idem_lock:
            pending = self._idem_inflight.get(ident)
        if pending is None:
            stored = self.ledger.remembered(*ident)
            if stored is not None:
                return completed(stored[1]) if stored[0] == fingerprint else failed(reused)
            with self._idem_lock:
                pending = self._idem_inflight.get(ident)
                if pending is None:
                    reply = self._send(command, (*ident, fingerprint), register=ident)
                    return reply
        return pending[1] if pending[0] == fingerprint else failed(reused)

    def _send(self, command: Command, idempotency: tuple[int, str, str] | None,
              register: tuple[int, str] | None = None) -> Reply:
        reply = Reply()
        if register is not None:
            self._idem_inflight[register] = (idempotency[2], reply)
            reply.add_done_callback(lambda _: self._forget(register))
        self.registry.tell(command.user_id, Request(command, reply, idempotency))
        return reply

    def _forget(self, ident: tuple[int, str]) -> None:
        with self._idem_lock:
            self._idem_inflight.pop(ident, None)

    def _require_user(self, user_id: int) -> None:
        if type(user_id) is not int:
            raise errors.InvalidRequest("user_id must be an integer")
        if user_id not in self._known_users and self.user(user_id) is None:
            raise errors.UnknownUser(f"no user {user_id}")

    @staticmethod
    def _storable(user_id: int) -> bool:
        # SQLite integers are 64-bit: a larger id cannot name any account.
        return type(user_id) is int and 0 < user_id < 2**63

    def _settle(self, command: SettleOption, reply: Reply) -> None:
        self.registry.tell(command.user_id, Request(command, reply))

    def _schedule_opened(self, events: list[Any]) -> None:
        # The writer publishes before it completes replies, so a trade's expiry is
        # on the clock before anyone learns that the trade is open.
        market = self._market
        for event in events:
            if isinstance(event, OptionOpened) and market is not None:
                MarketActor.schedule(market, self.clock, event.trade)

    @staticmethod
    def _snapshot_view(snap: dict[str, Any]) -> dict[str, Any]:
        return {**snap, "balances": balances_view(snap["balances"])}

