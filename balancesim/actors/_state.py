"""An account's state and its transitions, as pure functions without threads.

``decide(state, command, now)`` validates a command against the state and says
what happens (``Confirmed(events)``) or why not (``Rejected(error)``);
``apply(state, event)`` folds one event into a new state. The account actor is a
thin wrapper that calls the two and hands the events to the ledger.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from balancesim import errors
from balancesim.actors._messages import (
    ASSETS,
    CONTROL_MODES,
    SYMBOLS,
    Adjust,
    Command,
    Confirmed,
    ControlModeSet,
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

__all__ = ["AccountState", "decide", "apply", "apply_all", "MAX_BALANCE_UNITS", "DURATIONS"]

# SQLite stores 64-bit integers; stay well below so no sum can overflow.
MAX_BALANCE_UNITS = 10**18
DURATIONS = (30, 60)


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


def _check_asset(asset: str) -> None:
    if asset not in ASSETS:
        raise errors.InvalidRequest(f"asset must be one of {', '.join(ASSETS)}")


def _check_amount(amount: int, *, signed: bool = False) -> None:
    if (amount == 0 if signed else amount <= 0) or abs(amount) > MAX_AMOUNT_UNITS:
        raise errors.InvalidAmount("amount is outside the allowed range")


def _check_symbol(symbol: str) -> str:
    if symbol not in SYMBOLS:
        raise errors.InvalidRequest(f"symbol must be one of {', '.join(SYMBOLS)}")
    return SYMBOLS[symbol]


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
    asset = _check_symbol(cmd.symbol)
    if cmd.side not in ("buy", "sell"):
        raise errors.InvalidRequest("side must be buy or sell")
    _check_amount(cmd.quantity)
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
    _check_symbol(cmd.symbol)
    if cmd.direction not in ("up", "down"):
        raise errors.InvalidRequest("direction must be up or down")
    if cmd.duration not in DURATIONS:
        raise errors.InvalidRequest("duration must be 30 or 60")
    _check_amount(cmd.amount)
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
    out = _Entries(state, now, getattr(cmd, "initiated_by", None))
    if isinstance(cmd, (Deposit, Withdraw, Adjust)):
        _check_asset(cmd.asset)
        _check_amount(cmd.amount, signed=isinstance(cmd, Adjust))
        kind = {Deposit: "deposit", Withdraw: "withdrawal", Adjust: "adjustment"}[type(cmd)]
        change = -cmd.amount if isinstance(cmd, Withdraw) else cmd.amount
        out.post(cmd.asset, change, kind, cmd.description, {})
    elif isinstance(cmd, OpenOption):
        _open_option(state, cmd, now, out)
    elif isinstance(cmd, SettleOption):
        _settle(state, cmd, now, out)
    elif isinstance(cmd, ForceOption):
        trade = _open_trade(state, cmd.trade_id)
        if cmd.outcome not in ("win", "lose"):
            raise errors.InvalidRequest("outcome must be win or lose")
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
        if cmd.mode not in CONTROL_MODES:
            raise errors.InvalidRequest("mode must be normal, win or lose")
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

