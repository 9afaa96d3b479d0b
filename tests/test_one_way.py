"""The engine as a one-way service: records in, events out, nothing kept that grows."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from balancesim.actors import Confirmed, RealClock, UserCreated, decode, market_sync
from balancesim.gateway import TokenStore
from balancesim.gateway._auth import Principal
from conftest import TIMEOUT_S, new_user

ACTORS = pathlib.Path(__file__).parent.parent / "balancesim" / "actors"


def test_the_actor_system_knows_nothing_of_http_shapes():
    for module in ACTORS.glob("*.py"):
        source = module.read_text()
        assert "views" not in source and "result_of" not in source, module.name


def every_keyed_operation(engine, boss, alice):
    """One of each mutation, each under its own key, as (name, call)."""
    engine.deposit(alice, "1000", initiated_by=boss).get(timeout=TIMEOUT_S)
    trade = engine.open_option(alice, "BTCUSDT", "up", "5", 60, idempotency_key="o").get(timeout=TIMEOUT_S)["trade"]
    return [
        ("deposit", lambda e: e.deposit(alice, "2.5", "BTC", "gift", initiated_by=boss, idempotency_key="d")),
        ("withdraw", lambda e: e.withdraw(alice, "1", initiated_by=boss, idempotency_key="w")),
        ("adjust", lambda e: e.adjust(alice, "-0.5", description="fix", initiated_by=boss, idempotency_key="a")),
        ("option", lambda e: e.open_option(alice, "BTCUSDT", "up", "5", 60, idempotency_key="o")),
        ("spot", lambda e: e.spot_order(alice, "ETHUSDT", "buy", "0.01", idempotency_key="s")),
        ("control", lambda e: e.set_control_mode(alice, "win", boss, idempotency_key="c")),
        ("force", lambda e: e.force_option(trade["trade_id"], "lose", boss, idempotency_key="f")),
        ("user", lambda e: e.create_user("carol", "carol-pw", created_by=boss, idempotency_key="u")),
    ]


def test_a_keyed_repeat_answers_byte_for_byte_the_first_response_across_a_restart(make_engine, db_path):
    first = make_engine()
    boss, alice = new_user(first, "boss", "superadmin"), new_user(first, "alice")
    operations = every_keyed_operation(first, boss, alice)
    answers = {name: json.dumps(call(first).get(timeout=TIMEOUT_S)) for name, call in operations}
    first.stop()
    second = make_engine()
    for name, call in operations:
        assert json.dumps(call(second).get(timeout=TIMEOUT_S)) == answers[name], name
    # Nothing applied twice: one of each kind of entry, and carol once.
    types = [t["type"] for t in second.history(alice, limit=1000)]
    assert types.count("withdrawal") == 1 and types.count("spot_buy") == 2 and types.count("option_stake") == 1
    assert [u["username"] for u in second.users()].count("carol") == 1


def test_the_ledger_stores_events_not_response_bodies(engine):
    boss, alice = new_user(engine, "boss", "superadmin"), new_user(engine, "alice")
    engine.deposit(alice, "10", initiated_by=boss, idempotency_key="k").get(timeout=TIMEOUT_S)
    engine.create_user("dave", "dave-pw", created_by=boss, idempotency_key="u").get(timeout=TIMEOUT_S)
    with engine.ledger.reading() as db:
        stored = [decode(row[0]) for row in db.execute("SELECT result FROM idempotency ORDER BY key")]
    assert all(isinstance(record, Confirmed) for record in stored)
    deposit, created = stored
    assert deposit.events[0].amount == 10 * 10**8 and deposit.events[0].transaction_id > 0
    assert isinstance(created.events[0], UserCreated) and created.events[0].username == "dave"


def test_post_users_idempotency_survives_a_restart_and_refuses_another_request(make_engine):
    first = make_engine()
    boss = new_user(first, "boss", "superadmin")
    made = first.create_user("erin", "pw-1", created_by=boss, idempotency_key="k").get(timeout=TIMEOUT_S)
    first.stop()
    second = make_engine()
    assert second.create_user("erin", "pw-1", created_by=boss, idempotency_key="k").get(timeout=TIMEOUT_S) == made
    with pytest.raises(Exception, match="already used for a different request"):
        second.create_user("frank", "pw", created_by=boss, idempotency_key="k").get(timeout=TIMEOUT_S)


def test_the_market_keeps_nothing_per_settled_trade(make_engine):
    engine = make_engine(clock=RealClock(0.002))
    users = [new_user(engine, f"u{i}", usdt="1000") for i in range(20)]
    replies = [engine.open_option(u, "BTCUSDT", "up", "1", 30) for u in users for _ in range(10)]
    for reply in replies:
        reply.get(timeout=TIMEOUT_S)
    deadline = time.monotonic() + 30
    while engine.trades(status="open") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.trades(status="open") == []
    # What the market still holds of settled trades: before, one reply per trade, for ever.
    deadline = time.monotonic() + 10
    while market_sync(engine._market) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert market_sync(engine._market) == []


def test_the_token_cache_is_bounded_and_an_evicted_token_still_works(tmp_path):
    store = TokenStore(str(tmp_path / "t.db"), cache_max=5)
    tokens = [store.issue(Principal(i, f"u{i}", "user")) for i in range(1, 40)]
    assert len(store._cache) == 5
    assert store.check_blocking(tokens[0]) == Principal(1, "u1", "user")
    assert len(store._cache) == 5
    store.close()


def test_a_key_stored_by_an_older_release_still_answers_its_body(engine):
    boss, alice = new_user(engine, "boss", "superadmin"), new_user(engine, "alice")
    body = {"transaction": {"transaction_id": 7, "note": "as the old release answered"}}
    fingerprint = json.dumps({"op": "deposit", "user_id": alice, "amount": "5", "asset": "USDT",
                              "description": ""}, sort_keys=True)
    with engine.ledger._db.atomic():
        engine.ledger._db.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                                  (boss, "old", fingerprint, json.dumps(body)))
    assert engine.deposit(alice, "5", initiated_by=boss, idempotency_key="old").get(timeout=TIMEOUT_S) == body
    assert engine.history(alice) == []
