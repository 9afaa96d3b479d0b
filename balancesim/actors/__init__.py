"""The actor system: accounts, the ledger, the registry, the bus, the clock, the market.

Its interface is records (``_messages``): commands in; replies (``Confirmed`` /
``Rejected``) and numbered events out, each with a lossless, versioned round
trip to bytes (``encode`` / ``decode``).
"""

from balancesim.actors._account import AccountActor, Envelope
from balancesim.actors._bus import EventBus
from balancesim.actors._clock import Clock, RealClock, Timer, VirtualClock, iso
from balancesim.actors._codec import SCHEMA_VERSION, decode, encode
from balancesim.actors._ledger import Ledger, Submission, connect, create_schema, insert_user
from balancesim.actors._market import START_PRICES, Feed, FeedStore, MarketActor, PriceBoard
from balancesim.actors._market import sync as market_sync
from balancesim.actors._messages import (
    ASSETS,
    COMMAND_TYPES,
    CONTROL_MODES,
    EVENT_TYPES,
    SYMBOLS,
    Adjust,
    Command,
    Confirmed,
    ControlModeSet,
    CreateUser,
    Deposit,
    Event,
    ForceOption,
    OpenOption,
    OptionForced,
    OptionOpened,
    OptionSettled,
    PlaceSpotOrder,
    Posted,
    PriceTicked,
    Rejected,
    SetControlMode,
    SettleOption,
    Trade,
    UpdateUser,
    UserCreated,
    UserUpdated,
    Withdraw,
)
from balancesim.actors._registry import AccountRegistry
from balancesim.actors._reply import Reply, as_asyncio, completed, failed
from balancesim.actors._state import AccountState, apply, apply_all, check_password, decide, is_text, validate

__all__ = [
    "ASSETS", "COMMAND_TYPES", "CONTROL_MODES", "EVENT_TYPES", "SCHEMA_VERSION", "SYMBOLS",
    "START_PRICES", "AccountActor", "AccountRegistry", "AccountState", "Adjust", "Clock",
    "Command", "Confirmed", "ControlModeSet", "CreateUser", "Deposit", "Envelope", "Event",
    "EventBus", "Feed", "FeedStore", "ForceOption", "Ledger", "MarketActor", "OpenOption", "OptionForced",
    "OptionOpened", "OptionSettled", "PlaceSpotOrder", "Posted", "PriceBoard", "PriceTicked",
    "RealClock", "Rejected", "Reply", "SetControlMode", "SettleOption", "Submission", "Timer",
    "Trade", "UpdateUser", "UserCreated", "UserUpdated", "VirtualClock", "Withdraw", "apply", "apply_all", "as_asyncio",
    "check_password", "completed", "connect", "create_schema", "decide", "decode", "encode",
    "failed", "insert_user", "is_text", "iso", "market_sync", "validate",
]
