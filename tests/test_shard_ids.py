"""A shard's engine numbers by the placement: ids on two shard files never collide, an
account's id names the shard its username does, restarts continue the sequences, and a
shard file is locked for its one writer."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys

import pytest

from balancesim import errors, reports
from balancesim.cluster import (
    PARTITIONS,
    Placement,
    PlacementError,
    ShardFileInUse,
    ShardIds,
    lock_shard_file,
    partition_of_username,
    recorded,
    shard_file,
    shard_of_user_id,
    shard_of_username,
    split_transaction_id,
    split_user_id,
)
from balancesim.engine import create_user_in
from tests.conftest import TIMEOUT_S, new_user

PLACEMENT = Placement.for_new(2)


def names_on(shard_index: int, count: int, placement: Placement = PLACEMENT, prefix: str = "u") -> list[str]:
    """The first ``count`` names ``prefix0``, ``prefix1`` … that live on shard ``shard_index``."""
    names = (f"{prefix}{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if shard_of_username(placement, n) == shard_index), count))


def names_in(partition: int, count: int) -> list[str]:
    names = (f"p{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if partition_of_username(n) == partition), count))


@pytest.fixture
def shard_engine(make_engine, tmp_path):
    def make(index: int, placement: Placement = PLACEMENT, **kwargs):
        return make_engine(path=shard_file(tmp_path, index), shard=ShardIds(placement, index), **kwargs)
    return make


def test_two_shards_allocate_ids_that_name_them_and_never_collide(shard_engine, tmp_path):
    engines = [shard_engine(0), shard_engine(1)]
    users, transactions = {}, {}
    for index, engine in enumerate(engines):
        for name in names_on(index, 6):
            user_id = new_user(engine, name, usdt="10")
            users[user_id] = (index, name)
            entry = engine.history(user_id)[0]
            transactions[entry["transaction_id"]] = index
    assert len(users) == 12 and len(transactions) == 12  # no id twice, across both files
    for user_id, (index, name) in users.items():
        assert shard_of_user_id(PLACEMENT, user_id) == index == shard_of_username(PLACEMENT, name)
        assert split_user_id(user_id)[0] == partition_of_username(name)
        assert 0 < user_id < 2**53
    for transaction_id, index in transactions.items():
        assert split_transaction_id(transaction_id)[0] == index
    # Each shard's transactions count 1, 2, 3 … in its own sequence.
    for index in range(2):
        sequences = sorted(split_transaction_id(t)[1] for t, k in transactions.items() if k == index)
        assert sequences == list(range(1, 7))
    for index, engine in enumerate(engines):
        engine.stop()
        assert recorded(shard_file(tmp_path, index)) == (PLACEMENT, index)
        assert reports.verify(shard_file(tmp_path, index)).ok


def test_a_partitions_accounts_take_its_sequence_in_turn(shard_engine):
    partition = PLACEMENT.partitions_of(1)[3]
    engine = shard_engine(1)
    ids = [new_user(engine, name) for name in names_in(partition, 3)]
    assert ids == [PARTITIONS + partition, 2 * PARTITIONS + partition, 3 * PARTITIONS + partition]


def test_a_name_another_shard_owns_is_refused_before_anything_is_written(shard_engine):
    engine = shard_engine(0)
    (elsewhere,) = names_on(1, 1)
    with pytest.raises(errors.WrongShard, match=rf"username '{elsewhere}' belongs on shard 1, not on shard 0") as caught:
        engine.create_user(elsewhere, "pw").get(timeout=TIMEOUT_S)
    assert caught.value.code == "invalid_request" and caught.value.status == 400
    assert engine.users() == []


def test_the_ledger_itself_refuses_another_shards_name_without_failing_the_batch(shard_engine):
    from balancesim.actors import CreateUser, Reply, Submission, UserCreated

    engine = shard_engine(0)
    (here,), (elsewhere,) = names_on(0, 1), names_on(1, 1)
    replies = []
    for name in (elsewhere, here):
        reply = Reply()
        engine.ledger.append(Submission(None, CreateUser(name, "user", "x"), (UserCreated(0, name, "user", 0.0),), reply))
        replies.append(reply)
    with pytest.raises(errors.WrongShard):
        replies[0].get(timeout=TIMEOUT_S)
    (created,) = replies[1].get(timeout=TIMEOUT_S).events
    assert shard_of_user_id(PLACEMENT, created.user_id) == 0


def test_a_restart_continues_both_sequences(shard_engine):
    partition = PLACEMENT.partitions_of(0)[0]
    first, second = names_in(partition, 2)
    engine = shard_engine(0)
    a = new_user(engine, first, usdt="5")
    engine.deposit(a, "1").get(timeout=TIMEOUT_S)
    engine.stop()
    engine = shard_engine(0)
    b = new_user(engine, second, usdt="5")
    assert split_user_id(a) == (partition, 1) and split_user_id(b) == (partition, 2)
    sequences = [split_transaction_id(e["transaction_id"]) for user in (a, b) for e in engine.history(user)]
    assert sequences == [(0, 1), (0, 2), (0, 3)]


def test_a_taken_name_spends_no_sequence(shard_engine):
    partition = PLACEMENT.partitions_of(0)[0]
    first, second = names_in(partition, 2)
    engine = shard_engine(0)
    new_user(engine, first)
    with pytest.raises(errors.Conflict, match="is taken"):
        new_user(engine, first)
    assert split_user_id(new_user(engine, second)) == (partition, 2)


def test_the_cli_path_and_a_running_shard_share_one_sequence(shard_engine, tmp_path):
    # users create --data-dir writes into the file of a running shard, as --db does
    # into a running server's: both allocate in the file, in the write transaction.
    partition = PLACEMENT.partitions_of(1)[0]
    one, two, three = names_in(partition, 3)
    engine = shard_engine(1)
    ids = [new_user(engine, one)]
    ids.append(create_user_in(shard_file(tmp_path, 1), two, "pw", cost=2, shard=ShardIds(PLACEMENT, 1)))
    ids.append(new_user(engine, three))
    assert [split_user_id(i) for i in ids] == [(partition, 1), (partition, 2), (partition, 3)]


def test_opening_a_shard_file_as_another_shard_is_a_clear_error(shard_engine, make_engine, tmp_path):
    shard_engine(0).stop()
    path = shard_file(tmp_path, 0)
    with pytest.raises(PlacementError, match=r"shard-0.db has 2 shards; --shards 3 disagrees"):
        make_engine(path=path, shard=ShardIds(Placement.for_new(3), 0))
    with pytest.raises(PlacementError, match=r"shard-0.db is shard 0 of 2; --index 1 disagrees"):
        make_engine(path=path, shard=ShardIds(PLACEMENT, 1))
    moved = Placement(2, PARTITIONS, (1, 0) * (PARTITIONS // 2))
    with pytest.raises(PlacementError, match="records another partition table"):
        make_engine(path=path, shard=ShardIds(moved, 0))
    shard_engine(0)  # the failed opens released the lock


def test_an_embedded_ledger_with_accounts_is_not_adopted_as_a_shard(make_engine, db_path):
    engine = make_engine()
    new_user(engine, "ann")
    engine.stop()
    with pytest.raises(PlacementError, match="holds accounts but records no cluster placement"):
        make_engine(shard=ShardIds(PLACEMENT, 0))
    assert recorded(db_path) is None


def test_without_a_shard_the_embedded_ids_are_unchanged(make_engine):
    engine = make_engine()
    ids = [new_user(engine, name, usdt="1") for name in ("a", "b", "c")]
    assert ids == [1, 2, 3]
    assert [engine.history(i)[0]["transaction_id"] for i in ids] == [1, 2, 3]


# The lock.

HOLD = """
import sys, time
from balancesim.cluster import lock_shard_file
lock_shard_file(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding shard-0.db's lock."""
    path = shard_file(tmp_path, 0)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_shard_file_locked_by_another_process_is_refused_with_its_pid(holder, shard_engine, tmp_path):
    path = shard_file(tmp_path, 0)
    with pytest.raises(ShardFileInUse) as caught:
        lock_shard_file(path)
    assert str(caught.value) == f"{path} is in use by another process (pid {holder.pid})"
    with pytest.raises(ShardFileInUse, match=f"pid {holder.pid}"):
        shard_engine(0)
    assert not os.path.exists(path)  # refused before the ledger was opened
    holder.kill()
    holder.wait()
    shard_engine(0)  # the kernel dropped the dead process's lock


def test_a_second_engine_of_this_process_is_refused_until_the_first_stops(shard_engine, tmp_path):
    first = shard_engine(0)
    with pytest.raises(ShardFileInUse, match=rf"shard-0.db is in use by this process \(pid {os.getpid()}\)"):
        shard_engine(0)
    first.stop()
    shard_engine(0)


def test_a_released_lock_can_be_taken_again_and_release_is_idempotent(tmp_path):
    path = str(tmp_path / "shard-0.db")
    lock = lock_shard_file(path)
    lock.release()
    lock.release()
    again = lock_shard_file(path)
    again.release()
    with open(path + ".lock") as file:
        assert file.read() == f"{os.getpid()}\n"


def test_the_placement_sequences_live_in_the_file(shard_engine, tmp_path):
    engine = shard_engine(0)
    (name,) = names_on(0, 1)
    new_user(engine, name)
    engine.stop()
    rows = sqlite3.connect(shard_file(tmp_path, 0)).execute("SELECT partition, last FROM user_sequences").fetchall()
    assert rows == [(partition_of_username(name), 1)]
