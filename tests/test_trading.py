"""Options, control modes, spot orders and restarts, on the virtual clock: no sleeping."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from balancesim import errors
from balancesim.actors import ControlModeSet, OptionOpened, OptionSettled, Posted, RealClock, VirtualClock
from balancesim.reports import verify
from balancesim.scenarios import ledger_digest
from tests.conftest import TIMEOUT_S, Recorder, new_user


def place(engine, user_id, direction="up", amount="10", duration=30, symbol="BTCUSDT"):
    return engine.open_option(user_id, symbol, direction, amount, duration).get(timeout=TIMEOUT_S)["trade"]


def settled(engine, trade_id):
    (trade,) = [t for t in engine.trades(status="settled") if t["trade_id"] == trade_id]
    return trade


def pin_prices(engine, price="100"):
    """Freeze the market so the market's verdict is a draw unless something else decides."""
    engine.board.prices = {"BTCUSDT": int(price) * 10**8, "ETHUSDT": int(price) * 10**8}
    engine._market.proxy().step_bp = 0
    engine._market.proxy().step_bp.get(timeout=TIMEOUT_S)


def test_the_stake_is_debited_at_once_and_a_market_draw_refunds_it(engine, recorder):
    alice = new_user(engine, "alice", usdt="100")
    pin_prices(engine)
    trade = place(engine, alice)
    assert (trade["status"], trade["entry_price"], trade["payout_rate"]) == ("open", "100", "0.1")
    assert engine.balance(alice)["balances"]["USDT"] == "90"
    engine.advance(29)
    assert engine.trades(alice, "open")[0]["trade_id"] == trade["trade_id"]
    engine.advance(1)
    done = settled(engine, trade["trade_id"])
    assert (done["status"], done["decided_by"], done["payout"], done["exit_price"]) == ("draw", "market", "10", "100")
    assert done["settled_at"] == done["expires_at"]
    assert engine.balance(alice)["balances"]["USDT"] == "100"
    assert [type(e).__name__ for e in recorder.events if type(e).__name__ not in ("PriceTicked", "UserCreated")] == [
        "Posted", "Posted", "OptionOpened", "Posted", "OptionSettled",
    ]


def test_a_settlement_refused_before_commit_is_tried_again_and_settles_once(engine):
    # As after a healed partition: the account's earlier command expired in the queue, the
    # ledger refuses what follows for it until it reloads, and the expiry meets that refusal.
    alice = new_user(engine, "alice", usdt="100")
    pin_prices(engine)
    trade = place(engine, alice)
    from balancesim.actors._account import _Reload

    engine.ledger._poisoned.add(alice)  # what the expired command did to the account
    engine.advance(30)
    assert engine.trades(alice, "open")[0]["trade_id"] == trade["trade_id"]  # refused, nothing written
    engine.registry.tell(alice, _Reload())  # what it asked of the account: reload, which lifts the refusal
    engine.advance(1)  # the market settles it again a simulated second later
    done = settled(engine, trade["trade_id"])
    assert (done["status"], done["payout"], done["settled_at"]) == ("draw", "10", done["expires_at"])
    assert engine.balance(alice)["balances"]["USDT"] == "100"
    assert verify(engine.ledger.path).ok


def test_the_owners_control_mode_decides_when_no_admin_forced(engine):
    alice = new_user(engine, "alice", usdt="100")
    boss = new_user(engine, "boss", "superadmin")
    pin_prices(engine)
    engine.set_control_mode(alice, "win", boss).get(timeout=TIMEOUT_S)
    won = place(engine, alice, duration=60)
    engine.advance(60)
    assert settled(engine, won["trade_id"])["decided_by"] == "control_mode:win"
    assert engine.balance(alice)["balances"]["USDT"] == "101.5"
    engine.set_control_mode(alice, "lose", boss).get(timeout=TIMEOUT_S)
    lost = place(engine, alice)
    engine.advance(30)
    assert (settled(engine, lost["trade_id"])["status"], engine.balance(alice)["balances"]["USDT"]) == ("lost", "91.5")


def test_an_admin_force_beats_the_control_mode(engine):
    alice = new_user(engine, "alice", usdt="100")
    admin = new_user(engine, "admin", "admin")
    engine.set_control_mode(alice, "lose", admin).get(timeout=TIMEOUT_S)
    trade = place(engine, alice, "down", "20")
    forced = engine.force_option(trade["trade_id"], "win", admin).get(timeout=TIMEOUT_S)["trade"]
    assert (forced["status"], forced["forced_outcome"]) == ("open", "win")
    engine.advance(30)
    done = settled(engine, trade["trade_id"])
    assert (done["status"], done["decided_by"], done["payout"]) == ("won", f"admin_force:{admin}", "22")


def test_forcing_a_settled_or_unknown_trade_is_refused(engine):
    alice = new_user(engine, "alice", usdt="100")
    trade = place(engine, alice)
    engine.advance(30)
    with pytest.raises(errors.Conflict):
        engine.force_option(trade["trade_id"], "win", 1).get(timeout=TIMEOUT_S)
    with pytest.raises(errors.UnknownTrade):
        engine.force_option("T9-9", "win", 1).get(timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("DOGEUSDT", "up", "10", 30), errors.InvalidRequest),
        (("BTCUSDT", "sideways", "10", 30), errors.InvalidRequest),
        (("BTCUSDT", "up", "10", 45), errors.InvalidRequest),
        (("BTCUSDT", "up", "10", "30"), errors.InvalidRequest),
        (("BTCUSDT", "up", "0", 30), errors.InvalidAmount),
        (("BTCUSDT", "up", "1e2", 30), errors.InvalidAmount),
        (("BTCUSDT", "up", "1000", 30), errors.InsufficientFunds),
    ],
)
def test_bad_trades_change_nothing_and_publish_nothing(engine, recorder, args, error):
    alice = new_user(engine, "alice", usdt="100")
    published = len(recorder.of(Posted))
    with pytest.raises(error):
        engine.open_option(alice, *args).get(timeout=TIMEOUT_S)
    engine.ledger.flush().get(timeout=TIMEOUT_S)
    assert engine.balance(alice)["version"] == 1 and len(recorder.of(Posted)) == published
    assert engine.trades(alice) == []


def test_a_bad_control_mode_is_refused_and_a_good_one_is_published(engine, recorder):
    alice = new_user(engine, "alice")
    with pytest.raises(errors.InvalidRequest):
        engine.set_control_mode(alice, "always", 1).get(timeout=TIMEOUT_S)
    engine.set_control_mode(alice, "win", 1).get(timeout=TIMEOUT_S)
    (event,) = recorder.of(ControlModeSet)
    assert (event.user_id, event.mode, event.set_by) == (alice, "win", 1)
    assert engine.balance(alice)["control_mode"] == "win"


def test_a_force_racing_the_expiry_settles_the_trade_exactly_once(engine):
    alice = new_user(engine, "alice", usdt="10000")
    admin = new_user(engine, "admin", "admin")
    trades = [place(engine, alice, amount="1")["trade_id"] for _ in range(200)]
    forces = []

    def force_all():
        forces.extend(engine.force_option(t, "win", admin) for t in trades)

    racer = threading.Thread(target=force_all)
    racer.start()
    engine.clock.advance(30)
    racer.join()
    engine.settle_pending()
    outcomes = {"forced": 0, "conflict": 0}
    for reply in forces:
        try:
            reply.get(timeout=TIMEOUT_S)
            outcomes["forced"] += 1
        except (errors.Conflict, errors.UnknownTrade):
            outcomes["conflict"] += 1
    assert sum(outcomes.values()) == 200
    settlements = [e for e in engine.history(alice, limit=10_000) if e["type"] in ("option_payout", "option_refund")]
    by_trade = [e["metadata"]["trade_id"] for e in settlements]
    assert len(by_trade) == len(set(by_trade))
    assert all(t["status"] != "open" for t in engine.trades(alice))
    assert verify(engine.ledger.path).ok


def test_ten_thousand_open_trades_settle_with_gap_free_versions_and_bounded_threads(make_engine):
    engine = make_engine()
    users = [new_user(engine, f"u{i}", usdt="1000") for i in range(1000)]
    # After the users: their creation started the engine's (bounded) hashing threads.
    baseline = threading.active_count()
    replies = [engine.open_option(u, "ETHUSDT", "up", "1", 30) for _ in range(10) for u in users]
    for reply in replies:
        reply.get(timeout=60)
    assert len(engine.trades(status="open")) == 10_000
    peak = threading.active_count()
    engine.advance(30, timeout_s=120)
    peak = max(peak, threading.active_count())
    assert engine.trades(status="open") == []
    assert engine.registry.live_count() == 1000
    assert peak <= baseline, f"{peak} threads for 1,000 live accounts and 10,000 trades"
    report = verify(engine.ledger.path)
    assert report.ok, report.text()
    assert report.trades == 10_000


def test_a_spot_buy_and_sell_move_both_assets_atomically(engine):
    alice = new_user(engine, "alice", usdt="1000")
    pin_prices(engine, "500")
    order = engine.spot_order(alice, "ETHUSDT", "buy", "1.5").get(timeout=TIMEOUT_S)["order"]
    assert (order["price"], order["total"]) == ("500", "750")
    assert [(t["asset"], t["amount"], t["version"]) for t in order["transactions"]] == [("USDT", "-750", 2), ("ETH", "1.5", 3)]
    engine.spot_order(alice, "ETHUSDT", "sell", "0.5").get(timeout=TIMEOUT_S)
    assert engine.balance(alice)["balances"] == {"USDT": "500", "BTC": "0", "ETH": "1"}
    with pytest.raises(errors.InsufficientFunds):
        engine.spot_order(alice, "ETHUSDT", "sell", "2").get(timeout=TIMEOUT_S)
    with pytest.raises(errors.InsufficientFunds):
        engine.spot_order(alice, "ETHUSDT", "buy", "2").get(timeout=TIMEOUT_S)
    assert engine.balance(alice)["version"] == 5


def test_a_spot_order_whose_commit_fails_leaves_both_balances_as_they_were(engine):
    alice = new_user(engine, "alice", usdt="1000")
    before = engine.balance(alice)
    engine.ledger.inject_fault(sqlite3.OperationalError("disk I/O error"), times=1)
    with pytest.raises(errors.StorageUnavailable):
        engine.spot_order(alice, "BTCUSDT", "buy", "0.01").get(timeout=TIMEOUT_S)
    assert engine.balance(alice) == before
    assert engine.history(alice, after_version=1) == []
    engine.spot_order(alice, "BTCUSDT", "buy", "0.01").get(timeout=TIMEOUT_S)
    assert [e["version"] for e in engine.history(alice)] == [1, 2, 3]


def test_open_trades_survive_a_restart_and_overdue_ones_settle_at_the_new_feeds_first_price(make_engine, db_path):
    clock = VirtualClock()
    first = make_engine(clock=clock)
    alice = new_user(first, "alice", usdt="100")
    short = place(first, alice, duration=30)
    long = place(first, alice, duration=60)
    first.stop()
    clock = VirtualClock(start=clock.now() + 45)
    second = make_engine(clock=clock, seed=7)
    second.settle_pending()
    overdue = settled(second, short["trade_id"])
    assert overdue["exit_price"] == "65000"
    payout = [e for e in second.history(alice) if e["metadata"].get("trade_id") == short["trade_id"]]
    assert all(e["metadata"].get("settled_after_restart") for e in payout[1:])
    assert second.trades(alice, "open")[0]["trade_id"] == long["trade_id"]
    second.advance(15)
    assert second.trades(alice, "open") == []
    assert verify(db_path).ok


def scripted_day(engine) -> None:
    users = [new_user(engine, f"u{i}", usdt="1000") for i in range(5)]
    for minute in range(5):
        replies = [
            engine.open_option(u, ("BTCUSDT", "ETHUSDT")[i % 2], ("up", "down")[(i + minute) % 2], "10", (30, 60)[i % 2])
            for i, u in enumerate(users)
        ]
        for reply in replies:
            reply.get(timeout=TIMEOUT_S)
        engine.advance(17)
        engine.spot_order(users[minute], "BTCUSDT", "buy", "0.001").get(timeout=TIMEOUT_S)
        engine.advance(43)


def test_the_same_seed_gives_an_identical_ledger(make_engine, tmp_path):
    digests = []
    for run in range(2):
        engine = make_engine(path=str(tmp_path / f"run{run}.db"), seed=42)
        scripted_day(engine)
        engine.stop()
        digests.append(ledger_digest(str(tmp_path / f"run{run}.db")))
    assert digests[0] == digests[1]
    other = make_engine(path=str(tmp_path / "other.db"), seed=43)
    scripted_day(other)
    other.stop()
    assert ledger_digest(str(tmp_path / "other.db")) != digests[0]


def test_under_a_real_clock_with_a_time_scale_trades_expire_sooner(make_engine):
    engine = make_engine(clock=RealClock(time_scale=0.001))
    alice = new_user(engine, "alice", usdt="100")
    done = threading.Event()
    engine.subscribe(lambda batch: any(isinstance(e, OptionSettled) for e in batch) and done.set())
    trade = place(engine, alice)
    assert done.wait(timeout=TIMEOUT_S), "a 30 s trade at time scale 0.001 settles within 30 ms"
    assert settled(engine, trade["trade_id"])["status"] in ("won", "lost", "draw")


def test_price_ticks_are_published_on_the_clock(engine):
    ticks = Recorder()
    engine.subscribe(ticks)
    engine.advance(5)
    assert len([e for e in ticks.events if type(e).__name__ == "PriceTicked"]) == 5
    assert set(engine.market()["prices"]) == {"BTCUSDT", "ETHUSDT"}


def test_a_persisted_feed_goes_on_from_where_it_stopped_and_does_not_replay(make_engine, db_path):
    first = make_engine(persist_feed=True, seed=7)
    first.advance(20)
    prices = dict(first.board.prices)
    first.stop()
    second = make_engine(persist_feed=True, seed=7)
    assert second.board.prices == prices  # its first tick, at the restart's time, is where it stopped
    second.advance(5)
    fresh = make_engine(path=db_path + ".other", persist_feed=True, seed=7)
    fresh.advance(25)
    # Had it started over with the same seed, it would now stand where a fresh feed does.
    assert second.board.prices != fresh.board.prices
