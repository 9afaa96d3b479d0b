"""The actor system: accounts, the ledger, the registry, the bus, the clock, the market."""

from balancesim.actors._account import AccountActor, Request
from balancesim.actors._bus import EventBus
from balancesim.actors._clock import Clock, RealClock, Timer, VirtualClock, iso
from balancesim.actors._ledger import Ledger, Submission, connect, create_schema, insert_user
from balancesim.actors._market import START_PRICES, MarketActor, PriceBoard
from balancesim.actors._market import sync as market_sync
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
    PriceTicked,
    Rejected,
    SetControlMode,
    SettleOption,
    Trade,
    Withdraw,
)
from balancesim.actors._registry import AccountRegistry
from balancesim.actors._reply import Reply, as_asyncio, completed, failed
from balancesim.actors._state import AccountState, apply, apply_all, decide
from balancesim.actors._views import (
    balance_update,
    balances_view,
    control_update,
    result_of,
    trade_view,
    transaction_view,
)

__all__ = [
    "ASSETS", "CONTROL_MODES", "SYMBOLS", "START_PRICES",
    "AccountActor", "AccountRegistry", "AccountState", "Adjust", "Clock", "Command",
    "Confirmed", "ControlModeSet", "Deposit", "Event", "EventBus", "ForceOption", "Ledger",
    "MarketActor", "OpenOption", "OptionForced", "OptionOpened", "OptionSettled",
    "PlaceSpotOrder", "Posted", "PriceBoard", "PriceTicked", "RealClock", "Rejected", "Reply",
    "Request", "SetControlMode", "SettleOption", "Submission", "Timer", "Trade", "VirtualClock",
    "Withdraw", "apply", "apply_all", "as_asyncio", "balance_update", "balances_view",
    "completed", "connect", "control_update", "create_schema", "decide", "failed",
    "insert_user", "iso", "market_sync", "result_of", "trade_view", "transaction_view",
]
