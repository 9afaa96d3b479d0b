"""The pure transitions, without threads or a ledger."""

import dataclasses

import pytest

from balancesim import errors
from balancesim.actors import (
    AccountState,
    Adjust,
    Confirmed,
    ControlModeSet,
    Deposit,
    ForceOption,
    OpenOption,
    OptionOpened,
    OptionSettled,
    PlaceSpotOrder,
    Posted,
    Rejected,
    SetControlMode,
    SettleOption,
    Withdraw,
    apply_all,
    decide,
)
from balancesim.money import UNIT

NOW = 1_000.0
RATE_10 = UNIT // 10


def funded(usdt: int = 100 * UNIT, **extra: int) -> AccountState:
    return AccountState(7, {"USDT": usdt, "BTC": extra.get("btc", 0), "ETH": 0}, version=3)


def run(state: AccountState, command, now: float = NOW) -> tuple[AccountState, tuple]:
    verdict = decide(state, command, now)
    assert isinstance(verdict, Confirmed), verdict
    return apply_all(state, verdict.events), verdict.events


def rejected(state: AccountState, command) -> str:
    verdict = decide(state, command, NOW)
    assert isinstance(verdict, Rejected)
    return verdict.error.code


def test_a_deposit_posts_one_entry_with_the_next_version():
    state, events = run(funded(), Deposit(7, 5 * UNIT, description="gift"))
    (entry,) = events
    assert (entry.version, entry.amount, entry.balance_after, entry.type) == (4, 5 * UNIT, 105 * UNIT, "deposit")
    assert state.balances["USDT"] == 105 * UNIT and state.version == 4


def test_decide_never_mutates_the_state_it_is_given():
    state = funded()
    before = dataclasses.replace(state, balances=dict(state.balances))
    decide(state, Withdraw(7, UNIT), NOW)
    assert state == before


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (Withdraw(7, 101 * UNIT), "insufficient_funds"),
        (Adjust(7, -101 * UNIT), "insufficient_funds"),
        (Deposit(7, 0), "invalid_amount"),
        (Deposit(7, -5), "invalid_amount"),
        (Adjust(7, 0), "invalid_amount"),
        (Deposit(7, UNIT, asset="DOGE"), "invalid_request"),
        (OpenOption(7, "DOGEUSDT", "up", UNIT, 30, RATE_10, UNIT), "invalid_request"),
        (OpenOption(7, "BTCUSDT", "sideways", UNIT, 30, RATE_10, UNIT), "invalid_request"),
        (OpenOption(7, "BTCUSDT", "up", UNIT, 45, RATE_10, UNIT), "invalid_request"),
        (OpenOption(7, "BTCUSDT", "up", 101 * UNIT, 30, RATE_10, UNIT), "insufficient_funds"),
        (SetControlMode(7, "always-win", 1), "invalid_request"),
        (ForceOption(7, "T7-99", "win", 1), "conflict"),
        (SettleOption(7, "T7-99", UNIT, NOW), "conflict"),
        (PlaceSpotOrder(7, "BTCUSDT", "buy", UNIT, 65_000 * UNIT), "insufficient_funds"),
        (PlaceSpotOrder(7, "BTCUSDT", "sell", UNIT, 65_000 * UNIT), "insufficient_funds"),
        (PlaceSpotOrder(7, "BTCUSDT", "hold", UNIT, 65_000 * UNIT), "invalid_request"),
        (PlaceSpotOrder(7, "BTCUSDT", "sell", 1, 1), "invalid_amount"),
    ],
)
def test_bad_commands_are_rejected_with_their_protocol_code(command, code):
    assert rejected(funded(), command) == code


def test_a_balance_may_not_grow_past_the_storable_maximum():
    state = AccountState(7, {"USDT": 10**18 - 1, "BTC": 0, "ETH": 0})
    assert rejected(state, Deposit(7, 2)) == "invalid_amount"


def test_a_spot_buy_posts_both_legs_with_consecutive_versions():
    state, events = run(funded(), PlaceSpotOrder(7, "BTCUSDT", "buy", UNIT // 1000, 65_000 * UNIT))
    usdt, btc = events
    assert (usdt.asset, usdt.amount, usdt.version) == ("USDT", -65 * UNIT, 4)
    assert (btc.asset, btc.amount, btc.version) == ("BTC", UNIT // 1000, 5)
    assert usdt.metadata["order_id"] == btc.metadata["order_id"] == "S7-4"
    assert state.balances == {"USDT": 35 * UNIT, "BTC": UNIT // 1000, "ETH": 0}


def test_a_spot_order_whose_second_leg_fails_posts_neither():
    # Selling BTC the account does not hold fails the first leg; a buy beyond the
    # USDT balance fails before the asset leg: either way no entry at all.
    verdict = decide(funded(), PlaceSpotOrder(7, "BTCUSDT", "buy", 2 * UNIT, 65_000 * UNIT), NOW)
    assert isinstance(verdict, Rejected)


def open_trade(state: AccountState, direction: str = "up", entry: int = 100 * UNIT):
    state, events = run(state, OpenOption(7, "BTCUSDT", direction, 10 * UNIT, 30, RATE_10, entry))
    stake, opened = events
    assert stake.type == "option_stake" and stake.amount == -10 * UNIT
    assert isinstance(opened, OptionOpened) and opened.trade.expires_at == NOW + 30
    return state, opened.trade.trade_id


@pytest.mark.parametrize(
    ("direction", "exit_price", "status", "payout"),
    [
        ("up", 101, "won", 11 * UNIT),
        ("up", 99, "lost", 0),
        ("down", 99, "won", 11 * UNIT),
        ("down", 101, "lost", 0),
        ("up", 100, "draw", 10 * UNIT),
    ],
)
def test_the_market_decides_win_loss_and_draw_to_the_unit(direction, exit_price, status, payout):
    state, trade_id = open_trade(funded(), direction)
    state, events = run(state, SettleOption(7, trade_id, exit_price * UNIT, NOW + 30))
    settled = events[-1].trade
    assert (settled.status, settled.payout, settled.decided_by) == (status, payout, "market")
    assert state.balances["USDT"] == 90 * UNIT + payout
    assert [e.type for e in events if isinstance(e, Posted)] == (
        {"won": ["option_payout"], "draw": ["option_refund"], "lost": []}[status]
    )
    assert trade_id not in state.open_trades


def test_an_admin_force_beats_the_control_mode_which_beats_the_market():
    state, trade_id = open_trade(funded(), "up")
    state, _ = run(state, SetControlMode(7, "lose", 1))
    forced, _ = run(state, ForceOption(7, trade_id, "win", 2))
    *_, settled = run(forced, SettleOption(7, trade_id, 50 * UNIT, NOW + 30))[1]
    assert (settled.trade.status, settled.trade.decided_by) == ("won", "admin_force:2")
    *_, by_mode = run(state, SettleOption(7, trade_id, 150 * UNIT, NOW + 30))[1]
    assert (by_mode.trade.status, by_mode.trade.decided_by) == ("lost", "control_mode:lose")


def test_a_trade_settles_once_and_a_second_force_or_settle_is_a_conflict():
    state, trade_id = open_trade(funded())
    forced, _ = run(state, ForceOption(7, trade_id, "lose", 2))
    assert rejected(forced, ForceOption(7, trade_id, "win", 2)) == "conflict"
    settled, _ = run(forced, SettleOption(7, trade_id, UNIT, NOW + 30))
    assert rejected(settled, SettleOption(7, trade_id, UNIT, NOW + 30)) == "conflict"
    assert rejected(settled, ForceOption(7, trade_id, "win", 2)) == "conflict"


def test_a_control_mode_change_is_an_event_but_not_a_ledger_entry():
    state, events = run(funded(), SetControlMode(7, "win", 1))
    assert events == (ControlModeSet(7, "win", 1, NOW),)
    assert (state.control_mode, state.version) == ("win", 3)


def test_settlement_is_stamped_with_the_expiry_time_not_the_processing_time():
    state, trade_id = open_trade(funded())
    _, events = run(state, SettleOption(7, trade_id, 101 * UNIT, NOW + 30), now=NOW + 99)
    payout, settled = events
    assert payout.ts == settled.trade.settled_at == NOW + 30
    assert isinstance(settled, OptionSettled)
