"""Message types: commands (imperative), events (past tense), and replies.

These records are the engine's whole interface: commands go in, replies
(``Confirmed`` with the committed events, or ``Rejected`` with an error) and
numbered events come out. Every record is a small frozen dataclass (or, on the
hot path, a named tuple) of plain values, so it can cross threads without copies
and cross processes through ``balancesim.actors.encode`` / ``decode``. Amounts
and prices are integer units of 1e-8; times are seconds since the epoch as given
by the engine's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from balancesim.vocabulary import ASSETS, CONTROL_MODES, SYMBOLS

__all__ = [
    "ASSETS",
    "SYMBOLS",
    "CONTROL_MODES",
    "Trade",
    "Deposit",
    "Withdraw",
    "Adjust",
    "OpenOption",
    "ForceOption",
    "SettleOption",
    "PlaceSpotOrder",
    "SetControlMode",
    "Command",
    "Posted",
    "OptionOpened",
    "OptionForced",
    "OptionSettled",
    "ControlModeSet",
    "PriceTicked",
    "Event",
    "Confirmed",
    "Rejected",
    "CreateUser",
    "UserCreated",
    "UpdateUser",
    "UserUpdated",
    "COMMAND_TYPES",
    "EVENT_TYPES",
]


@dataclass(frozen=True)
class Trade:
    """An options trade; ``status`` is ``open`` until it settles exactly once."""

    trade_id: str
    user_id: int
    symbol: str
    direction: str
    amount: int
    duration: int
    payout_rate: int
    entry_price: int
    opened_at: float
    expires_at: float
    status: str = "open"
    exit_price: int | None = None
    decided_by: str | None = None
    settled_at: float | None = None
    payout: int | None = None
    forced_outcome: str | None = None
    forced_by: int | None = None


# Commands. ``initiated_by`` is the user id of whoever asked (None for the engine).


@dataclass(frozen=True)
class _MoneyCommand:
    user_id: int
    amount: int
    asset: str = "USDT"
    description: str = ""
    initiated_by: int | None = None


@dataclass(frozen=True)
class Deposit(_MoneyCommand):
    """Credit ``amount`` of ``asset``."""


@dataclass(frozen=True)
class Withdraw(_MoneyCommand):
    """Debit ``amount`` of ``asset``; never below zero."""


@dataclass(frozen=True)
class Adjust(_MoneyCommand):
    """A signed correction; the balance may never go below zero."""


@dataclass(frozen=True)
class OpenOption:
    """Stake ``amount`` on ``symbol`` moving ``direction`` within ``duration`` s.

    ``payout_rate`` and ``entry_price`` are looked up by the engine when it builds
    the command (``None`` when ``duration`` or ``symbol`` is not one we know, which
    ``decide`` then refuses).
    """

    user_id: int
    symbol: str
    direction: str
    amount: int
    duration: int
    payout_rate: int | None
    entry_price: int | None
    initiated_by: int | None = None
    # Wall-clock seconds to expiry; shorter than ``duration`` under a time scale.
    expires_in_s: float | None = None


@dataclass(frozen=True)
class ForceOption:
    """An admin fixes the outcome of an open trade, applied at its expiry."""

    user_id: int
    trade_id: str
    outcome: str
    admin_id: int


@dataclass(frozen=True)
class SettleOption:
    """Sent at expiry. ``at`` is the settlement time; ``note`` lands in the metadata."""

    user_id: int
    trade_id: str
    exit_price: int
    at: float
    note: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlaceSpotOrder:
    """Buy or sell ``quantity`` at ``price`` (``None``: an unknown symbol): two legs at once."""

    user_id: int
    symbol: str
    side: str
    quantity: int
    price: int | None
    initiated_by: int | None = None


@dataclass(frozen=True)
class SetControlMode:
    """A superadmin sets how the account's next settlements are decided."""

    user_id: int
    mode: str
    set_by: int


@dataclass(frozen=True)
class CreateUser:
    """Open an account. The password arrives hashed: the engine hashes off the IOLoop."""

    username: str
    role: str
    password_hash: str
    created_by: int | None = None


@dataclass(frozen=True)
class UpdateUser:
    """A superadmin disables or re-enables an account, or changes its role (``None``: unchanged)."""

    user_id: int
    disabled: bool | None
    role: str | None
    set_by: int


Command = (
    Deposit | Withdraw | Adjust | OpenOption | ForceOption | SettleOption
    | PlaceSpotOrder | SetControlMode | CreateUser | UpdateUser
)
COMMAND_TYPES: tuple[type, ...] = (
    Deposit, Withdraw, Adjust, OpenOption, ForceOption, SettleOption, PlaceSpotOrder,
    SetControlMode, CreateUser, UpdateUser,
)


# Events: what happened, in the order it happened to one account.


class Posted(NamedTuple):
    """One ledger entry: a signed change of one asset, with the account's next version.

    ``transaction_id`` is 0 until the ledger writer numbers it at commit. A named
    tuple rather than a frozen dataclass: it is built twice per mutation, and a
    frozen dataclass's ``__init__`` cost four times as much.
    """

    user_id: int
    version: int
    asset: str
    amount: int
    balance_after: int
    type: str
    description: str
    metadata: Mapping[str, Any]
    ts: float
    initiated_by: int | None
    transaction_id: int = 0

    def numbered(self, transaction_id: int) -> Posted:
        """This entry with its transaction id."""
        return Posted(*self[:10], transaction_id)


@dataclass(frozen=True)
class OptionOpened:
    """A trade was opened (its stake is the ``Posted`` before it)."""

    trade: Trade


@dataclass(frozen=True)
class OptionForced:
    """An admin fixed the outcome of an open trade."""

    trade: Trade


@dataclass(frozen=True)
class OptionSettled:
    """A trade settled exactly once; ``trade.decided_by`` says by what."""

    trade: Trade


@dataclass(frozen=True)
class ControlModeSet:
    """The account's control mode changed."""

    user_id: int
    mode: str
    set_by: int
    ts: float


@dataclass(frozen=True)
class PriceTicked:
    """The market moved; ``prices`` maps symbol to price units. Not a ledger event."""

    prices: Mapping[str, int]
    ts: float


@dataclass(frozen=True)
class UserCreated:
    """An account was opened (with zero balances, at version 0)."""

    user_id: int
    username: str
    role: str
    ts: float


@dataclass(frozen=True)
class UserUpdated:
    """An account's role or disabled flag changed (its tokens are no longer good)."""

    user_id: int
    username: str
    role: str
    disabled: bool
    set_by: int
    ts: float


Event = Posted | OptionOpened | OptionForced | OptionSettled | ControlModeSet | UserCreated | UserUpdated
EVENT_TYPES: tuple[type, ...] = (
    Posted, OptionOpened, OptionForced, OptionSettled, ControlModeSet, UserCreated, UserUpdated,
    PriceTicked,
)


@dataclass(frozen=True)
class Confirmed:
    """``decide`` accepted the command: these events happen, in this order."""

    events: tuple[Event, ...]


@dataclass(frozen=True)
class Rejected:
    """``decide`` refused the command; ``error`` carries the PROTOCOL.md code."""

    error: Exception

    def __eq__(self, other: object) -> bool:
        # Exceptions compare by identity; two rejections are equal by code and message.
        return isinstance(other, Rejected) and (type(self.error), str(self.error)) == (
            type(other.error), str(other.error))

    def __hash__(self) -> int:
        return hash((type(self.error), str(self.error)))
