"""The engine through its facade: concurrency, durability, idempotency, passivation."""

from __future__ import annotations

import random
import sqlite3
import threading

import pytest

from balancesim import errors
from balancesim.actors import Posted
from balancesim.money import parse_amount
from balancesim.reports import verify
from tests.conftest import TIMEOUT_S, Recorder, new_user


def balances_from_entries(engine, user_id):
    totals = {"USDT": 0, "BTC": 0, "ETH": 0}
    for entry in engine.history(user_id, limit=100_000):
        totals[entry["asset"]] += parse_amount(entry["amount"], signed=True)
    return totals


def test_eight_threads_of_random_mutations_keep_every_invariant(engine, recorder):
    accounts = [new_user(engine, f"u{i}") for i in range(10)]
    acknowledged: list[dict] = []
    lock = threading.Lock()

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        replies = []
        for _ in range(1_000):
            user_id = rng.choice(accounts)
            amount = f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}"
            op = rng.choice([engine.deposit, engine.deposit, engine.withdraw, engine.adjust])
            if op is engine.adjust and rng.random() < 0.5:
                amount = "-" + amount
            replies.append(op(user_id, amount, rng.choice(["USDT", "BTC", "ETH"])))
        for reply in replies:
            try:
                result = reply.get(timeout=TIMEOUT_S)
            except errors.InsufficientFunds:
                continue
            with lock:
                acknowledged.append(result["transaction"])

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.ledger.flush().get(timeout=TIMEOUT_S)

    assert len(acknowledged) > 4_000
    stored = {(tx["user_id"], tx["version"]): tx for u in accounts for tx in engine.history(u, limit=100_000)}
    for tx in acknowledged:
        assert stored[(tx["user_id"], tx["version"])] == tx
    for user_id in accounts:
        balance = engine.balance(user_id)
        versions = [tx["version"] for tx in engine.history(user_id, limit=100_000)]
        assert versions == list(range(1, balance["version"] + 1))
        assert {a: parse_amount(v) if v != "0" else 0 for a, v in balance["balances"].items()} == balances_from_entries(engine, user_id)
        delivered = [e.version for e in recorder.of(Posted) if e.user_id == user_id]
        assert delivered == versions, "every event delivered once, in order"
    assert len(recorder.of(Posted)) == len(acknowledged)
    assert verify(engine.ledger.path).ok


def test_a_new_engine_on_the_same_file_has_identical_balances_and_versions(make_engine, db_path):
    first = make_engine()
    alice = new_user(first, "alice", usdt="100")
    first.spot_order(alice, "ETHUSDT", "buy", "0.01").get(timeout=TIMEOUT_S)
    first.set_control_mode(alice, "win", alice).get(timeout=TIMEOUT_S)
    before = first.balance(alice)
    first.stop()
    second = make_engine()
    assert second.balance(alice) == before
    assert second.deposit(alice, "1").get(timeout=TIMEOUT_S)["transaction"]["version"] == before["version"] + 1


def test_the_same_idempotency_key_twice_gives_one_entry_and_the_same_result(engine, recorder):
    alice = new_user(engine, "alice")
    first = engine.deposit(alice, "10", idempotency_key="k-1").get(timeout=TIMEOUT_S)
    second = engine.deposit(alice, "10", idempotency_key="k-1").get(timeout=TIMEOUT_S)
    assert first == second
    assert engine.balance(alice)["version"] == 1 and len(recorder.of(Posted)) == 1


def test_concurrent_repeats_of_one_key_commit_once(engine):
    alice = new_user(engine, "alice")
    replies = [engine.deposit(alice, "10", idempotency_key="same") for _ in range(20)]
    results = [reply.get(timeout=TIMEOUT_S) for reply in replies]
    assert all(result == results[0] for result in results)
    assert engine.balance(alice)["balances"]["USDT"] == "10"


def test_an_idempotency_key_reused_for_another_request_is_a_conflict(engine):
    alice = new_user(engine, "alice")
    engine.deposit(alice, "10", idempotency_key="k").get(timeout=TIMEOUT_S)
    with pytest.raises(errors.Conflict):
        engine.deposit(alice, "11", idempotency_key="k").get(timeout=TIMEOUT_S)


def test_idempotency_keys_survive_a_restart(make_engine):
    first = make_engine()
    alice = new_user(first, "alice")
    result = first.deposit(alice, "10", idempotency_key="k").get(timeout=TIMEOUT_S)
    first.stop()
    second = make_engine()
    assert second.deposit(alice, "10", idempotency_key="k").get(timeout=TIMEOUT_S) == result
    assert second.balance(alice)["version"] == 1


def test_an_idle_account_is_passivated_and_comes_back_with_the_same_state(engine):
    alice = new_user(engine, "alice", usdt="100")
    assert engine.registry.live_count() == 1
    assert engine.registry.passivate_idle(idle_s=0) == 1
    assert engine.registry.live_count() == 0
    result = engine.withdraw(alice, "40").get(timeout=TIMEOUT_S)["transaction"]
    assert (result["version"], result["balance_after"]) == (2, "60")
    assert engine.registry.activations == 2


def test_no_more_than_max_live_actors_run_at_once(make_engine):
    engine = make_engine(max_live=5)
    users = [new_user(engine, f"u{i}") for i in range(20)]
    replies = [engine.deposit(u, "1") for u in users for _ in range(3)]
    for reply in replies:
        reply.get(timeout=TIMEOUT_S)
    assert engine.registry.live_count() <= 5
    assert all(engine.balance(u)["version"] == 3 for u in users)


def test_mutations_racing_passivation_all_land_in_order_on_a_successor(engine):
    alice = new_user(engine, "alice")
    stop = threading.Event()

    def passivate_again_and_again() -> None:
        while not stop.wait(0.0005):  # paced, so the depositing thread still gets the lock
            engine.registry.passivate_idle(idle_s=0)

    passivator = threading.Thread(target=passivate_again_and_again)
    passivator.start()
    try:
        replies = []
        for i in range(300):
            replies.append(engine.deposit(alice, "1"))
            if i % 10 == 9:  # for certain, besides whatever the other thread hits
                engine.registry.passivate_idle(idle_s=0)
        versions = [reply.get(timeout=TIMEOUT_S)["transaction"]["version"] for reply in replies]
    finally:
        stop.set()
        passivator.join()
    assert versions == list(range(1, 301))
    assert engine.balance(alice)["balances"]["USDT"] == "300"
    assert engine.registry.activations >= 30


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda e, u: e.deposit(u, "0"), "invalid_amount"),
        (lambda e, u: e.deposit(u, "-5"), "invalid_amount"),
        (lambda e, u: e.deposit(u, "NaN"), "invalid_amount"),
        (lambda e, u: e.deposit(u, "Infinity"), "invalid_amount"),
        (lambda e, u: e.deposit(u, "1.123456789"), "invalid_amount"),
        (lambda e, u: e.deposit(u, "1000000000.1"), "invalid_amount"),
        (lambda e, u: e.deposit(u, 5), "invalid_amount"),
        (lambda e, u: e.deposit(u, "5", "DOGE"), "invalid_request"),
        (lambda e, u: e.deposit(9999, "5"), "unknown_user"),
        (lambda e, u: e.withdraw(u, "1000"), "insufficient_funds"),
        (lambda e, u: e.adjust(u, "-1000"), "insufficient_funds"),
        (lambda e, u: e.deposit(u, "5", idempotency_key="k" * 129), "invalid_request"),
        (lambda e, u: e.deposit(u, "5", description="\ud800"), "invalid_request"),
        (lambda e, u: e.deposit(u, "5", idempotency_key="\udfff"), "invalid_request"),
        (lambda e, u: e.force_option("T\ud800", "win", u), "unknown_trade"),
    ],
)
def test_bad_input_raises_its_code_and_changes_nothing(engine, recorder, call, code):
    alice = new_user(engine, "alice", usdt="100")
    before, published = engine.balance(alice), len(recorder.events)
    with pytest.raises(errors.BalancesimError) as raised:
        call(engine, alice).get(timeout=TIMEOUT_S)
    assert raised.value.code == code
    engine.ledger.flush().get(timeout=TIMEOUT_S)
    assert engine.balance(alice) == before
    assert len(recorder.events) == published


def test_a_failed_disk_write_fails_its_mutation_and_memory_stays_equal_to_the_ledger(engine, recorder):
    alice = new_user(engine, "alice", usdt="100")
    engine.ledger.inject_fault(sqlite3.OperationalError("disk I/O error"))
    with pytest.raises(errors.StorageUnavailable):
        engine.withdraw(alice, "30").get(timeout=TIMEOUT_S)
    engine.ledger.inject_fault(None)
    # The actor reloaded: a withdrawal of the full committed balance still succeeds.
    result = engine.withdraw(alice, "100").get(timeout=TIMEOUT_S)["transaction"]
    assert (result["version"], result["balance_after"]) == (2, "0")
    assert [e.version for e in recorder.of(Posted)] == [1, 2]
    assert verify(engine.ledger.path).ok


def test_decisions_queued_behind_a_failed_commit_fail_too_and_leave_no_gap(engine):
    alice = new_user(engine, "alice", usdt="100")
    engine.ledger.inject_fault(sqlite3.OperationalError("disk full"), times=1)
    replies = [engine.deposit(alice, "1") for _ in range(200)]
    outcomes = []
    for reply in replies:
        try:
            outcomes.append(reply.get(timeout=TIMEOUT_S)["transaction"]["version"])
        except errors.StorageUnavailable:
            outcomes.append(None)
    assert outcomes[0] is None
    committed = [v for v in outcomes if v is not None]
    assert committed == list(range(2, 2 + len(committed)))
    engine.deposit(alice, "1").get(timeout=TIMEOUT_S)
    versions = [tx["version"] for tx in engine.history(alice, limit=1000)]
    assert versions == list(range(1, len(versions) + 1))
    assert verify(engine.ledger.path).ok


def test_usernames_are_unique_and_passwords_are_checked(engine):
    new_user(engine, "alice")
    with pytest.raises(errors.Conflict):
        engine.create_user("alice", "other").get(timeout=TIMEOUT_S)
    assert engine.authenticate("alice", "alice-pw")["username"] == "alice"
    assert engine.authenticate("alice", "wrong") is None
    assert engine.authenticate("nobody", "x") is None
    assert engine.authenticate("alice", "\udc00") is None
    with pytest.raises(errors.InvalidRequest):
        engine.create_user("carol", "pw\ud800").get(timeout=TIMEOUT_S)
    stored = engine.ledger.user(username="alice")["password_hash"]
    assert "alice-pw" not in stored and stored.startswith("scrypt$")


def test_subscribers_see_nothing_for_a_rejected_command_and_one_bad_subscriber_harms_no_other(engine):
    alice = new_user(engine, "alice")

    def broken(batch):
        raise RuntimeError("subscriber bug")

    good = Recorder()
    engine.subscribe(broken)
    engine.subscribe(good)
    engine.deposit(alice, "3").get(timeout=TIMEOUT_S)
    assert [e.version for e in good.of(Posted)] == [1]


def test_an_account_that_cannot_be_loaded_answers_storage_unavailable_and_recovers(engine, monkeypatch):
    alice = new_user(engine, "alice", usdt="5")
    engine.registry.passivate_idle(idle_s=0)
    real_load = engine.ledger.load_account

    def broken(user_id):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(engine.ledger, "load_account", broken)
    with pytest.raises(errors.StorageUnavailable):
        engine.deposit(alice, "1").get(timeout=TIMEOUT_S)
    monkeypatch.setattr(engine.ledger, "load_account", real_load)
    assert engine.deposit(alice, "1").get(timeout=TIMEOUT_S)["transaction"]["balance_after"] == "6"


def test_the_commit_log_writes_one_line_per_commit_over_its_threshold(make_engine, monkeypatch, tmp_path):
    log_path = tmp_path / "commits.log"
    monkeypatch.setenv("BALANCESIM_COMMIT_LOG", str(log_path))
    monkeypatch.setenv("BALANCESIM_COMMIT_LOG_MS", "0")  # every commit is "slow"
    engine = make_engine()
    user_id = new_user(engine, "logged")
    engine.deposit(user_id, "1").get(timeout=TIMEOUT_S)
    engine.stop()
    lines = [line.split() for line in log_path.read_text().splitlines()]
    assert lines and all(len(fields) == 7 for fields in lines)
    wall_start_s, duration_ms, rows = float(lines[-1][0]), float(lines[-1][1]), int(lines[-1][2])
    cpu_ms, runq_ms = float(lines[-1][5]), float(lines[-1][6])
    assert wall_start_s > 1e9 and duration_ms >= 0 and rows >= 0
    assert lines[-1][3] == "ledger.db" and 0 <= cpu_ms and 0 <= runq_ms
    assert any(int(fields[2]) >= 1 for fields in lines)
