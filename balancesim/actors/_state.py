"""An account's state and its transitions, as pure functions without threads.

This module is the one place where rules live. ``validate(command)`` judges
what can be judged without the account (fields in their sets, amounts in
range, text that is Unicode); ``decide(state, command, now)`` validates and
then judges the command against the state, and says what happens
(``Confirmed(events)``) or why not (``Rejected(error)``); ``apply(state,
event)`` folds one event into a new state. The account actor is a thin wrapper
that calls the two and hands the events to the ledger. The gateway only parses
types, and the engine facade only turns decimal strings into units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from balancesim import errors
from balancesim.actors._messages import (
    Adjust,
    Command,
    Confirmed,
    ControlModeSet,
    CreateUser,
    UpdateUser,
    Deposit,
    Event,
    ForceOption,
    OpenOption,
    OptionForced,
    OptionOpened,
    OptionSettled,
    PlaceSpotOrder,
    Posted,
    Rejected,
    SetControlMode,
    SettleOption,
    Trade,
    Withdraw,
)
from balancesim.money import MAX_AMOUNT_UNITS, mul_units
from balancesim.vocabulary import (
    ASSETS, CONTROL_MODES, DIRECTIONS, DURATIONS, OUTCOMES, ROLES, SIDES, SYMBOLS,
)

__all__ = [
    "AccountState", "decide", "validate", "check_password", "apply", "apply_all", "is_text", "MAX_BALANCE_UNITS",
    "DURATIONS", "MAX_DESCRIPTION", "MAX_USERNAME", "MAX_PASSWORD",
]

# SQLite stores 64-bit integers; stay well below so no sum can overflow.
MAX_BALANCE_UNITS = 10**18
MAX_DESCRIPTION = 500
MAX_USERNAME = 64
MAX_PASSWORD = 256


def is_text(value: object) -> bool:
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


def _one_of(name: str, values: tuple[str, ...] | dict[str, str]) -> str:
    names = list(values)
    listed = " or ".join(names) if len(names) == 2 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{name} must be {listed}"


@dataclass(frozen=True)
class AccountState:
    """What one account is, as of ``version`` (the number of entries so far)."""

    user_id: int
    balances: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(ASSETS, 0))
    version: int = 0
    control_mode: str = "normal"
    open_trades: Mapping[str, Trade] = field(default_factory=dict)


class _Entries:
    """Builds an account's next entries, numbering versions and running balances."""

    def __init__(self, state: AccountState, now: float, initiated_by: int | None) -> None:
        self._user_id = state.user_id
        self._balances = dict(state.balances)
        self._version = state.version
        self._now = now
        self._initiated_by = initiated_by
        self.events: list[Event] = []

    def post(self, asset: str, amount: int, type_: str, description: str, metadata: dict) -> None:
        after = self._balances[asset] + amount
        if after < 0:
            raise errors.InsufficientFunds(
                f"{asset} balance is too low for this operation"
            )
        if after > MAX_BALANCE_UNITS:
            raise errors.InvalidAmount(f"{asset} balance would exceed the maximum")
        self._balances[asset] = after
        self._version += 1
        self.events.append(Posted(
            self._user_id, self._version, asset, amount, after, type_, description, metadata,
            self._now, self._initiated_by,
        ))

    @property
    def next_version(self) -> int:
        return self._version + 1


def _check_amount(amount: int, *, signed: bool = False) -> None:
    if type(amount) is not int or (amount == 0 if signed else amount <= 0) or abs(amount) > MAX_AMOUNT_UNITS:
        raise errors.InvalidAmount("amount is outside the allowed range")


def _check_in(name: str, value: object, values: tuple | dict) -> None:
    if not isinstance(value, str) or value not in values:
        raise errors.InvalidRequest(_one_of(name, values))


def _validate(cmd: Command) -> None:
    """The rules that need no account state; raises the first broken one."""
    if isinstance(cmd, (Deposit, Withdraw, Adjust)):
        if not is_text(cmd.description) or len(cmd.description) > MAX_DESCRIPTION:
            raise errors.InvalidRequest(f"description must be a string of at most {MAX_DESCRIPTION} characters")
        if not isinstance(cmd.asset, str) or cmd.asset not in ASSETS:
            raise errors.InvalidRequest(f"asset must be one of {', '.join(ASSETS)}")
        _check_amount(cmd.amount, signed=isinstance(cmd, Adjust))
    elif isinstance(cmd, OpenOption):
        if type(cmd.duration) is not int or cmd.duration not in DURATIONS or cmd.payout_rate is None:
            raise errors.InvalidRequest(f"duration must be {' or '.join(map(str, DURATIONS))}")
        _check_in("symbol", cmd.symbol, SYMBOLS)
        _check_in("direction", cmd.direction, DIRECTIONS)
        _check_amount(cmd.amount)
    elif isinstance(cmd, PlaceSpotOrder):
        _check_in("symbol", cmd.symbol, SYMBOLS)
        _check_in("side", cmd.side, SIDES)
        _check_amount(cmd.quantity)
    elif isinstance(cmd, ForceOption):
        _check_in("outcome", cmd.outcome, OUTCOMES)
    elif isinstance(cmd, SetControlMode):
        _check_in("mode", cmd.mode, CONTROL_MODES)
    elif isinstance(cmd, UpdateUser):
        if cmd.disabled is None and cmd.role is None:
            raise errors.InvalidRequest("give disabled, role or both")
        if cmd.disabled is not None and type(cmd.disabled) is not bool:
            raise errors.InvalidRequest("disabled must be true or false")
        if cmd.role is not None:
            _check_in("role", cmd.role, ROLES)
    elif isinstance(cmd, CreateUser):
        if not is_text(cmd.username) or not 1 <= len(cmd.username) <= MAX_USERNAME or not cmd.username.isprintable():
            raise errors.InvalidRequest(f"username must be 1 to {MAX_USERNAME} printable characters")
        _check_in("role", cmd.role, ROLES)


def validate(command: Command) -> Rejected | None:
    """``Rejected`` if ``command`` breaks a rule that needs no account state, else ``None``."""
    try:
        _validate(command)
    except errors.BalancesimError as error:
        return Rejected(error)
    return None


def check_password(password: object) -> None:
    """The rule for a new password (judged before it is hashed, so never in a command)."""
    if not is_text(password) or not 1 <= len(password) <= MAX_PASSWORD:  # type: ignore[arg-type]
        raise errors.InvalidRequest(f"password must be 1 to {MAX_PASSWORD} characters")


def _open_trade(state: AccountState, trade_id: str) -> Trade:
    trade = state.open_trades.get(trade_id)
    if trade is None:
        raise errors.Conflict(f"trade {trade_id} is not open")
    return trade


def _market_outcome(trade: Trade, exit_price: int) -> str:
    if exit_price == trade.entry_price:
        return "draw"
    rose = exit_price > trade.entry_price
    return "win" if rose == (trade.direction == "up") else "lose"


def _settle(state: AccountState, cmd: SettleOption, now: float, out: _Entries) -> None:
    trade = _open_trade(state, cmd.trade_id)
    if trade.forced_outcome is not None:
        outcome, decided_by = trade.forced_outcome, f"admin_force:{trade.forced_by}"
    elif state.control_mode != "normal":
        outcome, decided_by = state.control_mode, f"control_mode:{state.control_mode}"
    else:
        outcome, decided_by = _market_outcome(trade, cmd.exit_price), "market"
    payout = {
        "win": trade.amount + mul_units(trade.amount, trade.payout_rate),
        "draw": trade.amount,
        "lose": 0,
    }[outcome]
    metadata = {"trade_id": trade.trade_id, "decided_by": decided_by, **cmd.note}
    if outcome == "win":
        out.post("USDT", payout, "option_payout", f"Option {trade.trade_id} won", metadata)
    elif outcome == "draw":
        out.post("USDT", payout, "option_refund", f"Option {trade.trade_id} drew", metadata)
    status = {"win": "won", "draw": "draw", "lose": "lost"}[outcome]
    out.events.append(
        OptionSettled(
            dataclasses.replace(
                trade,
                status=status,
                exit_price=cmd.exit_price,
                decided_by=decided_by,
                settled_at=now,
                payout=payout,
            )
        )
    )


def _spot(state: AccountState, cmd: PlaceSpotOrder, out: _Entries) -> None:
    asset = SYMBOLS[cmd.symbol]
    # The user pays the rounded-up total and receives the rounded-down one, so
    # rounding never creates money.
    total = mul_units(cmd.quantity, cmd.price, round_up=cmd.side == "buy")
    if total == 0:
        raise errors.InvalidAmount("quantity is too small: the order total rounds to zero")
    order_id = f"S{state.user_id}-{out.next_version}"
    metadata = {
        "order_id": order_id,
        "symbol": cmd.symbol,
        "side": cmd.side,
        "quantity": cmd.quantity,
        "price": cmd.price,
        "total": total,
    }
    if cmd.side == "buy":
        description = f"Bought {cmd.symbol}"
        out.post("USDT", -total, "spot_buy", description, metadata)
        out.post(asset, cmd.quantity, "spot_buy", description, metadata)
    else:
        description = f"Sold {cmd.symbol}"
        out.post(asset, -cmd.quantity, "spot_sell", description, metadata)
        out.post("USDT", total, "spot_sell", description, metadata)


def _open_option(state: AccountState, cmd: OpenOption, now: float, out: _Entries) -> None:
    trade_id = f"T{state.user_id}-{out.next_version}"
    metadata = {
        "trade_id": trade_id,
        "symbol": cmd.symbol,
        "direction": cmd.direction,
        "duration": cmd.duration,
        "entry_price": cmd.entry_price,
    }
    out.post("USDT", -cmd.amount, "option_stake", f"Option {trade_id} opened", metadata)
    out.events.append(
        OptionOpened(
            Trade(
                trade_id=trade_id,
                user_id=state.user_id,
                symbol=cmd.symbol,
                direction=cmd.direction,
                amount=cmd.amount,
                duration=cmd.duration,
                payout_rate=cmd.payout_rate,
                entry_price=cmd.entry_price,
                opened_at=now,
                expires_at=now + (cmd.duration if cmd.expires_in_s is None else cmd.expires_in_s),
            )
        )
    )


def _decide(state: AccountState, cmd: Command, now: float) -> list[Event]:
    _validate(cmd)
    out = _Entries(state, now, getattr(cmd, "initiated_by", None))
    if isinstance(cmd, (Deposit, Withdraw, Adjust)):
        kind = {Deposit: "deposit", Withdraw: "withdrawal", Adjust: "adjustment"}[type(cmd)]
        change = -cmd.amount if isinstance(cmd, Withdraw) else cmd.amount
        out.post(cmd.asset, change, kind, cmd.description, {})
    elif isinstance(cmd, OpenOption):
        _open_option(state, cmd, now, out)
    elif isinstance(cmd, SettleOption):
        _settle(state, cmd, now, out)
    elif isinstance(cmd, ForceOption):
        trade = _open_trade(state, cmd.trade_id)
        if trade.forced_outcome is not None:
            raise errors.Conflict(f"trade {cmd.trade_id} is already forced")
        out.events.append(
            OptionForced(
                dataclasses.replace(trade, forced_outcome=cmd.outcome, forced_by=cmd.admin_id)
            )
        )
    elif isinstance(cmd, PlaceSpotOrder):
        _spot(state, cmd, out)
    elif isinstance(cmd, SetControlMode):
        out.events.append(ControlModeSet(state.user_id, cmd.mode, cmd.set_by, now))
    else:
        raise errors.InvalidRequest(f"unknown command {type(cmd).__name__}")
    return out.events


def decide(state: AccountState, command: Command, now: float) -> Confirmed | Rejected:
    """Decide what ``command`` does to ``state`` at time ``now``; never mutates."""
    if isinstance(command, SettleOption):
        now = command.at
    try:
        return Confirmed(tuple(_decide(state, command, now)))
    except errors.BalancesimError as error:
        return Rejected(error)


def apply(state: AccountState, event: Event) -> AccountState:
    """Fold one event into the state, returning a new state."""
    if isinstance(event, Posted):
        # The hot path: built directly, as dataclasses.replace costs several times more.
        balances = dict(state.balances)
        balances[event.asset] = event.balance_after
        return AccountState(state.user_id, balances, event.version, state.control_mode, state.open_trades)
    if isinstance(event, (OptionOpened, OptionForced)):
        trades = dict(state.open_trades)
        trades[event.trade.trade_id] = event.trade
        return dataclasses.replace(state, open_trades=trades)
    if isinstance(event, OptionSettled):
        trades = dict(state.open_trades)
        del trades[event.trade.trade_id]
        return dataclasses.replace(state, open_trades=trades)
    if isinstance(event, ControlModeSet):
        return dataclasses.replace(state, control_mode=event.mode)
    raise TypeError(f"not an event: {event!r}")


def apply_all(state: AccountState, events: tuple[Event, ...]) -> AccountState:
    """Fold events in order."""
    for event in events:
        state = apply(state, event)
    return state

