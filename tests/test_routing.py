"""Who sees what: the routing table of PROTOCOL.md as one pure function."""

from balancesim.actors import ControlModeSet, OptionOpened, Posted, PriceTicked, Trade
from balancesim.routing import ADMINS, EVERYONE, OWNER, route

ENTRY = Posted(7, 3, "USDT", -10 * 10**8, 90 * 10**8, "option_stake", "Option T7-3 opened",
               {"trade_id": "T7-3"}, 0.0, 7, transaction_id=42)


def test_a_ledger_entry_goes_to_its_owner_and_to_the_admin_monitor():
    owner, monitor = route(ENTRY, {7: "alice"}.get)
    assert (owner.audience, owner.user_id) == (OWNER, 7)
    assert owner.message == {
        "type": "balance_update", "user_id": 7, "asset": "USDT", "balance": "90", "change": "-10",
        "change_type": "option_stake", "description": "Option T7-3 opened", "transaction_id": 42,
        "version": 3, "metadata": {"trade_id": "T7-3"}, "ts": "1970-01-01T00:00:00.000Z",
    }
    assert monitor.audience == ADMINS
    assert monitor.message == {**owner.message, "type": "admin_balance_monitor", "username": "alice"}


def test_control_and_trade_updates_go_to_the_owner_and_the_admins():
    control = route(ControlModeSet(7, "win", 1, 0.0), lambda _: None)
    assert [(d.audience, d.user_id, d.message["type"]) for d in control] == [
        (OWNER, 7, "trading_control_update"), (ADMINS, None, "trading_control_update"),
    ]
    trade = Trade("T7-3", 7, "BTCUSDT", "up", 10, 30, 10, 100, 0.0, 30.0)
    opened = route(OptionOpened(trade), lambda _: None)
    assert [(d.audience, d.user_id) for d in opened] == [(OWNER, 7), (ADMINS, None)]
    assert opened[0].message["trade"]["trade_id"] == "T7-3"


def test_price_ticks_go_to_everyone_as_decimal_strings():
    (tick,) = route(PriceTicked({"BTCUSDT": 6_500_012_345_678}, 0.0), lambda _: None)
    assert tick.audience == EVERYONE
    assert tick.message["prices"] == {"BTCUSDT": "65000.12345678"}
