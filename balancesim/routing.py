"""Who may see what: every bus event as PROTOCOL.md messages with their audiences.

One pure function, shared by the gateway's hub and the in-process scenario
runner, so a scenario proves the same isolation the server enforces: an
account's own changes go to its own sessions, the admin monitor goes to every
admin and superadmin session, price ticks go to everyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from balancesim.actors import (
    ControlModeSet,
    OptionForced,
    OptionOpened,
    OptionSettled,
    Posted,
    PriceTicked,
    iso,
)
from balancesim.money import format_amount
from balancesim.views import balance_update, control_update, trade_view
from balancesim.vocabulary import ADMIN_ROLES as _ADMIN_ROLES

__all__ = ["OWNER", "ADMINS", "EVERYONE", "Delivery", "route", "ADMIN_ROLES"]

OWNER = "owner"
ADMINS = "admins"
EVERYONE = "everyone"
ADMIN_ROLES = frozenset(_ADMIN_ROLES)


@dataclass(frozen=True)
class Delivery:
    """``message`` goes to ``audience``: the sessions of ``user_id`` (OWNER), ADMINS or EVERYONE."""

    audience: str
    message: dict[str, Any]
    user_id: int | None = None


def route(event: Any, username_of: Callable[[int], str | None]) -> list[Delivery]:
    """The messages one event becomes, and who receives each.

    Args:
        event: a bus event.
        username_of: looks up a username for the admin monitor.
    """
    if isinstance(event, Posted):
        update = balance_update(event)
        monitor = {**update, "type": "admin_balance_monitor", "username": username_of(event.user_id)}
        return [Delivery(OWNER, update, event.user_id), Delivery(ADMINS, monitor)]
    if isinstance(event, ControlModeSet):
        update = control_update(event)
        return [Delivery(OWNER, update, event.user_id), Delivery(ADMINS, update)]
    if isinstance(event, (OptionOpened, OptionForced, OptionSettled)):
        update = {"type": "trade_update", "trade": trade_view(event.trade)}
        return [Delivery(OWNER, update, event.trade.user_id), Delivery(ADMINS, update)]
    if isinstance(event, PriceTicked):
        prices = {symbol: format_amount(price) for symbol, price in event.prices.items()}
        return [Delivery(EVERYONE, {"type": "price_tick", "prices": prices, "ts": iso(event.ts)})]
    return []
