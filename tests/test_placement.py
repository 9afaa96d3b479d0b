"""Placement: an account's name and id name the same shard, ids fit JavaScript, and
every shard file records the cluster's placement, which later commands must agree with."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancesim.actors import connect, create_schema
from balancesim.cluster import (
    MAX_ID,
    MAX_SHARDS,
    PARTITIONS,
    Placement,
    PlacementError,
    ShardRecord,
    check,
    partition_of_username,
    placement_of_data_dir,
    record,
    recorded,
    shard_file,
    shard_of_user_id,
    shard_of_username,
    split_transaction_id,
    split_user_id,
    transaction_id_for,
    user_id_for,
)

usernames = st.text(max_size=64)
shard_counts = st.integers(min_value=1, max_value=MAX_SHARDS)
# Up to the last sequence whose id is still below 2^53.
user_sequences = st.integers(min_value=1, max_value=(MAX_ID - 1) // PARTITIONS - 1)


# The hash is part of the data format: a data directory made by this release must
# place a name on the same shard in every later release and in every process. If
# one of these changes, existing clusters misroute: change HASH_SCHEME too.
VECTORS = [
    # (username, its partition of 256, the full 64-bit value before the modulus)
    ("alice", 175, 0x2BD806C97F0E00AF),
    ("bob", 218, 9346719481748178650),
    ("admin", 21, 10117748766825055253),
    ("superadmin", 161, 1760053635363594401),
    ("Ünïcødé", 212, 13758865640603935444),
    ("交易员", 201, 16298781885848072393),
    ("", 20, 16406829232824261652),
    ("user-1", 178, 14322161379998172594),
]


def test_partitions_is_the_documented_power_of_two():
    assert PARTITIONS == 256 and MAX_SHARDS == 256 and MAX_ID == 2**53


@pytest.mark.parametrize(("name", "partition", "full"), VECTORS)
def test_fixed_vectors_pin_the_hash(name, partition, full):
    assert partition_of_username(name) == partition
    assert partition_of_username(name, 2**64) == full


def test_another_process_with_another_hash_seed_places_names_the_same():
    script = ("from balancesim.cluster import partition_of_username as p;"
              f"print([p(n) for n in {[v[0] for v in VECTORS]!r}])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str([v[1] for v in VECTORS])


def test_a_name_no_account_can_have_still_has_a_partition():
    assert 0 <= partition_of_username("\ud800") < PARTITIONS  # a lone surrogate, as a login may send


@settings(max_examples=300, deadline=None)
@given(usernames, shard_counts, user_sequences)
def test_the_id_allocated_for_a_name_names_the_same_shard(name, shards, sequence):
    placement = Placement.for_new(shards)
    user_id = user_id_for(partition_of_username(name), sequence)
    assert 0 < user_id < MAX_ID
    assert shard_of_user_id(placement, user_id) == shard_of_username(placement, name)
    assert split_user_id(user_id) == (partition_of_username(name), sequence)


@given(st.integers(min_value=0, max_value=PARTITIONS - 1))
def test_the_last_user_id_of_a_partition_is_below_2_53_and_the_next_is_refused(partition):
    last = (MAX_ID - 1 - partition) // PARTITIONS
    assert user_id_for(partition, last) < MAX_ID
    with pytest.raises(PlacementError, match=r"partition \d+ has no user ids left.*2\*\*53"):
        user_id_for(partition, last + 1)


def test_user_ids_start_above_zero_and_refuse_nonsense():
    assert user_id_for(0, 1) == PARTITIONS
    assert user_id_for(5, 1) == PARTITIONS + 5
    with pytest.raises(ValueError, match="count from 1"):
        user_id_for(0, 0)
    with pytest.raises(ValueError, match="outside"):
        user_id_for(PARTITIONS, 1)
    with pytest.raises(ValueError, match="outside"):
        split_user_id(MAX_ID)


@given(shard_counts)
def test_partitions_spread_evenly_over_shards(shards):
    placement = Placement.for_new(shards)
    owned = [len(placement.partitions_of(k)) for k in range(shards)]
    assert sum(owned) == PARTITIONS
    assert max(owned) <= math.ceil(PARTITIONS / shards)
    assert min(owned) >= 1


def test_more_shards_than_partitions_is_refused():
    with pytest.raises(PlacementError, match="1 to 256 shards, not 257"):
        Placement.for_new(MAX_SHARDS + 1)
    with pytest.raises(PlacementError, match="not 0"):
        Placement.for_new(0)
    with pytest.raises(PlacementError, match="power of two"):
        Placement(1, 100, (0,) * 100)
    with pytest.raises(PlacementError, match="outside"):
        Placement(2, 4, (0, 1, 2, 0))


@given(st.integers(min_value=0, max_value=MAX_SHARDS - 1), st.integers(min_value=0, max_value=MAX_SHARDS - 1),
       st.integers(min_value=1, max_value=(MAX_ID - 1) // MAX_SHARDS - 1),
       st.integers(min_value=1, max_value=(MAX_ID - 1) // MAX_SHARDS - 1))
def test_transaction_ids_of_different_shards_never_collide(a, b, seq_a, seq_b):
    id_a, id_b = transaction_id_for(a, seq_a), transaction_id_for(b, seq_b)
    assert 0 < id_a < MAX_ID and 0 < id_b < MAX_ID
    assert split_transaction_id(id_a) == (a, seq_a)
    assert (id_a == id_b) == ((a, seq_a) == (b, seq_b))


def test_transaction_ids_stop_before_2_53():
    last = (MAX_ID - 1 - (MAX_SHARDS - 1)) // MAX_SHARDS
    assert transaction_id_for(MAX_SHARDS - 1, last) < MAX_ID
    with pytest.raises(PlacementError, match="no transaction ids left"):
        transaction_id_for(MAX_SHARDS - 1, last + 1)
    with pytest.raises(ValueError, match="count from 1"):
        transaction_id_for(0, 0)  # 0 means "not numbered yet" in a Posted


# Recording the placement in shard files.


def make_shard(path, placement: Placement, index: int) -> None:
    """A shard file as a shard makes it: the ledger's schema and the placement, one transaction."""
    db = connect(str(path))
    create_schema(db)
    with db.conn:
        db.conn.execute("BEGIN IMMEDIATE")
        record(db, placement, index)
    db.conn.close()


def test_recorded_round_trips_on_a_real_ledger_file(tmp_path):
    path = tmp_path / "shard-1.db"
    placement = Placement.for_new(3)
    make_shard(path, placement, 1)
    assert recorded(str(path)) == ShardRecord(placement, 1)
    assert recorded(path) == (placement, 1)
    rows = dict(sqlite3.connect(path).execute("SELECT key, value FROM cluster").fetchall())
    assert set(rows) == {"shards", "partitions", "table", "index", "hash", "created_at"}
    assert rows["shards"] == "3" and rows["index"] == "1" and rows["created_at"].endswith("Z")


def test_recording_again_is_idempotent_and_another_placement_is_refused(tmp_path):
    path = str(tmp_path / "shard-0.db")
    record(path, Placement.for_new(2), 0)
    record(path, Placement.for_new(2), 0)
    with pytest.raises(PlacementError, match="already shard 0 of 2; it cannot become shard 1 of 3"):
        record(path, Placement.for_new(3), 1)
    assert recorded(path) == (Placement.for_new(2), 0)


def test_a_record_joins_the_callers_transaction_and_rolls_back_with_it(tmp_path):
    conn = sqlite3.connect(tmp_path / "shard-0.db", isolation_level=None)
    conn.execute("BEGIN")
    record(conn, Placement.for_new(2), 0)
    conn.execute("ROLLBACK")
    assert recorded(conn) is None


def test_a_file_without_a_placement_records_none(tmp_path):
    path = tmp_path / "ledger.db"
    create_schema(connect(str(path)))
    assert recorded(str(path)) is None


def test_check_names_the_disagreeing_number():
    rec = ShardRecord(Placement.for_new(2), 1)
    assert check(rec, None) == rec.placement
    assert check(rec, 2, index_given=1) == rec.placement
    with pytest.raises(PlacementError) as caught:
        check(rec, 3)
    assert str(caught.value) == "this data directory has 2 shards; --shards 3 disagrees"
    with pytest.raises(PlacementError, match="^shard-1.db is shard 1 of 2; --index 0 disagrees$"):
        check(rec, 2, index_given=0, source="shard-1.db")


def test_a_new_data_directory_needs_shards(tmp_path):
    with pytest.raises(PlacementError, match="no shard files yet; give --shards"):
        placement_of_data_dir(tmp_path, None)
    with pytest.raises(PlacementError, match="no shard files yet"):
        placement_of_data_dir(tmp_path / "not-there", None)
    assert placement_of_data_dir(tmp_path, 3) == Placement.for_new(3)
    assert os.listdir(tmp_path) == []  # reading the placement never creates files


def test_a_data_directory_gives_its_placement_and_refuses_another_number(tmp_path):
    placement = Placement.for_new(2)
    for index in range(2):
        make_shard(shard_file(tmp_path, index), placement, index)
    assert placement_of_data_dir(tmp_path, None) == placement
    assert placement_of_data_dir(str(tmp_path), 2) == placement
    with pytest.raises(PlacementError, match="^this data directory has 2 shards; --shards 3 disagrees$"):
        placement_of_data_dir(tmp_path, 3)


def test_a_missing_shard_file_is_an_error_not_a_new_shard(tmp_path):
    placement = Placement.for_new(3)
    for index in (0, 2):
        make_shard(shard_file(tmp_path, index), placement, index)
    with pytest.raises(PlacementError, match="has 3 shards but shard-1.db is missing; restore it"):
        placement_of_data_dir(tmp_path, 3)
    assert not os.path.exists(shard_file(tmp_path, 1))


def test_shard_files_that_disagree_are_an_error(tmp_path):
    make_shard(shard_file(tmp_path, 0), Placement.for_new(2), 0)
    make_shard(shard_file(tmp_path, 1), Placement.for_new(3), 1)
    with pytest.raises(PlacementError, match="disagree: .*shard-0.db records 2 shards, .*shard-1.db records 3"):
        placement_of_data_dir(tmp_path, None)


def test_a_moved_table_in_one_file_is_an_error(tmp_path):
    make_shard(shard_file(tmp_path, 0), Placement.for_new(2), 0)
    moved = Placement(2, PARTITIONS, (1, 0) * (PARTITIONS // 2))
    make_shard(shard_file(tmp_path, 1), moved, 1)
    with pytest.raises(PlacementError, match="record different partition tables"):
        placement_of_data_dir(tmp_path, 2)


def test_a_file_under_another_shards_name_is_an_error(tmp_path):
    make_shard(shard_file(tmp_path, 0), Placement.for_new(2), 1)
    make_shard(shard_file(tmp_path, 1), Placement.for_new(2), 0)
    with pytest.raises(PlacementError, match="shard-0.db records that it is shard 1, not 0"):
        placement_of_data_dir(tmp_path, 2)


def test_a_shard_file_without_a_placement_or_not_sqlite_is_an_error(tmp_path):
    make_shard(shard_file(tmp_path, 0), Placement.for_new(2), 0)
    create_schema(connect(shard_file(tmp_path, 1)))
    with pytest.raises(PlacementError, match="shard-1.db records no cluster placement"):
        placement_of_data_dir(tmp_path, 2)
    other = tmp_path / "other"
    other.mkdir()
    make_shard(shard_file(other, 0), Placement.for_new(2), 0)
    with open(shard_file(other, 1), "wb") as junk:
        junk.write(b"not a database, just some bytes" * 100)
    with pytest.raises(PlacementError, match="shard-1.db is not a balancesim shard file"):
        placement_of_data_dir(other, 2)


def test_a_file_made_with_another_hash_is_refused(tmp_path):
    path = shard_file(tmp_path, 0)
    make_shard(path, Placement.for_new(1), 0)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE cluster SET value = 'fnv1a' WHERE key = 'hash'")
    with pytest.raises(PlacementError, match="places usernames by 'fnv1a'"):
        placement_of_data_dir(tmp_path, 1)


def test_the_placement_reads_while_a_shard_is_writing(tmp_path):
    placement = Placement.for_new(1)
    make_shard(shard_file(tmp_path, 0), placement, 0)
    writer = connect(shard_file(tmp_path, 0))
    writer.conn.execute("BEGIN IMMEDIATE")  # a shard in the middle of a group commit
    try:
        assert placement_of_data_dir(tmp_path, 1) == placement
    finally:
        writer.conn.execute("ROLLBACK")
        writer.conn.close()
