"""Who may see what: every bus event as PROTOCOL.md messages with their audiences.

One pure function, shared by the gateway's hub and the in-process scenario
runner, so a scenario proves the same isolation the server enforces: an
account's own changes go to its own sessions, the admin monitor goes to every
admin and superadmin session, price ticks go to everyone.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Collection, Generic, Hashable, TypeVar

from balancesim.actors import (
    ControlModeSet,
    OptionForced,
    OptionOpened,
    OptionSettled,
    Posted,
    PriceTicked,
    UserUpdated,
    iso,
)
from balancesim.money import format_amount
from balancesim.views import balance_update, control_update, trade_view, user_update
from balancesim.vocabulary import ADMIN_ROLES as _ADMIN_ROLES

__all__ = ["OWNER", "ADMINS", "EVERYONE", "Delivery", "route", "Audiences", "ADMIN_ROLES"]

S = TypeVar("S", bound=Hashable)

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
    if isinstance(event, UserUpdated):
        return [Delivery(ADMINS, user_update(event))]
    if isinstance(event, PriceTicked):
        prices = {symbol: format_amount(price) for symbol, price in event.prices.items()}
        return [Delivery(EVERYONE, {"type": "price_tick", "prices": prices, "ts": iso(event.ts)})]
    return []


class Audiences(Generic[S]):
    """The sessions of one place (a gateway's hub, a scenario world), indexed by audience.

    ``of(delivery)`` is the one definition of who receives a delivery: the
    owner's sessions, every admin's, or everyone's.
    """

    def __init__(self) -> None:
        self.owners: dict[int, set[S]] = collections.defaultdict(set)
        self.admins: set[S] = set()
        self.everyone: set[S] = set()

    def add(self, session: S, user_id: int, admin: bool) -> None:
        """A session of ``user_id`` joins; ``admin`` sessions also see the admin audience."""
        self.owners[user_id].add(session)
        self.everyone.add(session)
        if admin:
            self.admins.add(session)

    def remove(self, session: S, user_id: int) -> None:
        """A session leaves (a no-op for one that never joined)."""
        owned = self.owners.get(user_id)
        if owned is not None:
            owned.discard(session)
            if not owned:
                del self.owners[user_id]
        self.admins.discard(session)
        self.everyone.discard(session)

    def of(self, delivery: Delivery) -> Collection[S]:
        """The sessions that receive ``delivery``."""
        if delivery.audience == OWNER:
            return self.owners.get(delivery.user_id, ())  # type: ignore[arg-type]
        if delivery.audience == ADMINS:
            return self.admins
        return self.everyone
