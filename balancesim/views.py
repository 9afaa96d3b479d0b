"""Records → the JSON shapes of PROTOCOL.md (decimal strings, ISO timestamps).

The edge's business, not the engine's: the engine answers with ``Confirmed``
events, and the gateway, the scenario worlds and the CLI show them with these.
``result_of`` is a pure function of the committed events, so an idempotent
repeat rebuilt from the stored events answers byte for byte what the first did.
"""

from __future__ import annotations

from typing import Any, Mapping

from balancesim.actors._clock import iso
from balancesim.actors._messages import (
    Confirmed, ControlModeSet, OptionForced, OptionOpened, OptionSettled, Posted, Trade, UserCreated,
    UserUpdated,
)
from balancesim.money import format_amount

__all__ = [
    "transaction_view",
    "trade_view",
    "balances_view",
    "balance_update",
    "control_update",
    "user_update",
    "metadata_view",
    "result_of",
]

_MONEY_KEYS = {"quantity", "price", "total", "entry_price", "exit_price", "payout"}


def metadata_view(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with its unit amounts as decimal strings."""
    if not metadata:
        return {}
    return {
        key: format_amount(value) if key in _MONEY_KEYS and isinstance(value, int) else value
        for key, value in metadata.items()
    }


def _opt_amount(units: int | None) -> str | None:
    return None if units is None else format_amount(units)


def _opt_iso(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def transaction_view(entry: Posted) -> dict[str, Any]:
    """PROTOCOL.md's ``Transaction``."""
    return {
        "transaction_id": entry.transaction_id,
        "user_id": entry.user_id,
        "asset": entry.asset,
        "amount": format_amount(entry.amount),
        "balance_after": format_amount(entry.balance_after),
        "type": entry.type,
        "description": entry.description,
        "metadata": metadata_view(entry.metadata),
        "version": entry.version,
        "ts": iso(entry.ts),
        "initiated_by": entry.initiated_by,
    }


def trade_view(trade: Trade) -> dict[str, Any]:
    """PROTOCOL.md's ``Trade`` (plus ``forced_outcome`` while a force is pending)."""
    return {
        "trade_id": trade.trade_id,
        "user_id": trade.user_id,
        "symbol": trade.symbol,
        "direction": trade.direction,
        "amount": format_amount(trade.amount),
        "duration": trade.duration,
        "payout_rate": format_amount(trade.payout_rate),
        "entry_price": format_amount(trade.entry_price),
        "exit_price": _opt_amount(trade.exit_price),
        "status": trade.status,
        "decided_by": trade.decided_by,
        "opened_at": iso(trade.opened_at),
        "expires_at": iso(trade.expires_at),
        "settled_at": _opt_iso(trade.settled_at),
        "payout": _opt_amount(trade.payout),
        "forced_outcome": trade.forced_outcome,
    }


def balances_view(balances: dict[str, int]) -> dict[str, str]:
    """``{USDT, BTC, ETH}`` as decimal strings."""
    return {asset: format_amount(units) for asset, units in balances.items()}


def balance_update(entry: Posted) -> dict[str, Any]:
    """PROTOCOL.md's ``balance_update`` message for one committed entry."""
    return {
        "type": "balance_update",
        "user_id": entry.user_id,
        "asset": entry.asset,
        "balance": format_amount(entry.balance_after),
        "change": format_amount(entry.amount),
        "change_type": entry.type,
        "description": entry.description,
        "transaction_id": entry.transaction_id,
        "version": entry.version,
        "metadata": metadata_view(entry.metadata),
        "ts": iso(entry.ts),
    }


def user_update(event: UserUpdated) -> dict[str, Any]:
    """PROTOCOL.md's ``user_update`` message (to the admins)."""
    return {
        "type": "user_update",
        "user_id": event.user_id,
        "username": event.username,
        "role": event.role,
        "disabled": event.disabled,
        "set_by": event.set_by,
        "ts": iso(event.ts),
    }


def control_update(event: ControlModeSet) -> dict[str, Any]:
    """PROTOCOL.md's ``trading_control_update`` message."""
    return {
        "type": "trading_control_update",
        "user_id": event.user_id,
        "mode": event.mode,
        "set_by": event.set_by,
        "ts": iso(event.ts),
    }


def result_of(confirmed: Confirmed) -> dict[str, Any]:
    """The success body of a committed command, from its events alone."""
    events = confirmed.events
    first = events[0]
    if len(events) == 1 and type(first) is Posted:  # a deposit, a withdrawal: the hot path
        return {"transaction": transaction_view(first)}
    trades = [event.trade for event in events if isinstance(event, (OptionOpened, OptionForced, OptionSettled))]
    if trades:
        return {"trade": trade_view(trades[-1])}
    if isinstance(first, ControlModeSet):
        return {"user_id": first.user_id, "mode": first.mode}
    if isinstance(first, UserCreated):
        return {"user_id": first.user_id, "username": first.username, "role": first.role}
    if isinstance(first, UserUpdated):
        return {"user_id": first.user_id, "username": first.username, "role": first.role,
                "disabled": first.disabled}
    posted = [event for event in events if isinstance(event, Posted)]
    meta = posted[0].metadata
    if "order_id" in meta:
        return {
            "order": {
                "order_id": meta["order_id"],
                "symbol": meta["symbol"],
                "side": meta["side"],
                "quantity": format_amount(meta["quantity"]),
                "price": format_amount(meta["price"]),
                "total": format_amount(meta["total"]),
                "transactions": [transaction_view(entry) for entry in posted],
            }
        }
    return {"transaction": transaction_view(posted[0])}
