"""``users create`` and ``ledger verify|history|audit`` over a cluster's data directory
(``--data-dir``), through click's CliRunner: exit codes and exact output."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from click.testing import CliRunner

from balancesim.cli import cli
from balancesim.cluster import (
    Placement,
    ShardIds,
    recorded,
    shard_file,
    shard_of_user_id,
    shard_of_username,
    split_transaction_id,
)
from tests.conftest import TIMEOUT_S, new_user
from tests.test_shard_ids import names_on

PLACEMENT = Placement.for_new(2)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def create(data_dir, username: str, *extra: str):
    return run("users", "create", "--data-dir", str(data_dir), "--username", username, "--password", "pw", *extra)


def test_users_create_makes_a_new_directory_and_puts_each_account_on_its_shard(tmp_path):
    data_dir = tmp_path / "cluster"
    (ann,), (bob,) = names_on(0, 1, prefix="ann"), names_on(1, 1, prefix="bob")
    first = create(data_dir, ann, "--shards", "2")
    assert first.exit_code == 0, first.output
    second = create(data_dir, bob)  # --shards only for a new directory
    assert second.exit_code == 0, second.output
    for index, (result, name) in enumerate(((first, ann), (second, bob))):
        user_id = int(result.output)
        assert shard_of_user_id(PLACEMENT, user_id) == index == shard_of_username(PLACEMENT, name)
        rows = sqlite3.connect(shard_file(data_dir, index)).execute("SELECT user_id, username FROM users").fetchall()
        assert rows == [(user_id, name)]
    assert [recorded(shard_file(data_dir, k)) for k in range(2)] == [(PLACEMENT, 0), (PLACEMENT, 1)]
    same = create(data_dir, ann, "--shards", "2")
    assert (same.exit_code, same.output) == (1, f"Error: username '{ann}' is taken\n")


def test_a_shards_number_that_disagrees_is_one_line_and_exit_2(tmp_path):
    assert create(tmp_path, "ann", "--shards", "2").exit_code == 0
    result = create(tmp_path, "bob", "--shards", "3")
    assert (result.exit_code, result.output) == (2, "Error: this data directory has 2 shards; --shards 3 disagrees\n")
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".db")) == ["shard-0.db", "shard-1.db"]


def test_a_new_directory_without_shards_is_one_line_and_makes_nothing(tmp_path):
    data_dir = tmp_path / "new"
    result = create(data_dir, "ann")
    assert (result.exit_code, result.output) == (
        2, f"Error: {data_dir} has no shard files yet; give --shards for a new cluster\n")
    assert not data_dir.exists()


def test_a_bad_username_is_judged_before_a_directory_is_made(tmp_path):
    data_dir = tmp_path / "new"
    result = create(data_dir, "tab\there", "--shards", "2")
    assert (result.exit_code, result.output) == (1, "Error: username must be 1 to 64 printable characters\n")
    assert not data_dir.exists()


@pytest.mark.parametrize("command", [
    ["users", "create", "--username", "ann", "--password", "pw"],
    ["ledger", "verify"],
    ["ledger", "history", "--user", "ann"],
    ["ledger", "audit"],
])
def test_db_and_data_dir_together_is_one_line_and_exit_2(tmp_path, command):
    result = run(*command, "--db", str(tmp_path / "x.db"), "--data-dir", str(tmp_path))
    assert (result.exit_code, result.output) == (
        2, "Error: --db and --data-dir cannot be used together: --db is one ledger file, "
           "--data-dir a cluster's shard files\n")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("command", [["ledger", "verify"], ["ledger", "audit"]])
def test_a_ledger_command_needs_one_of_db_and_data_dir(command):
    result = run(*command)
    assert (result.exit_code, result.output) == (
        2, "Error: give --db FILE (a ledger file) or --data-dir DIR (a cluster's shard files)\n")


def test_shards_without_data_dir_is_one_line_and_exit_2(tmp_path):
    result = run("users", "create", "--db", str(tmp_path / "x.db"), "--shards", "2", "--username", "a", "--password", "p")
    assert (result.exit_code, result.output) == (2, "Error: --shards goes with --data-dir\n")


@pytest.fixture
def cluster(make_engine, tmp_path):
    """Two shards, an account on each with deposits, a spot order and a forced option."""
    data_dir = tmp_path / "cluster"
    data_dir.mkdir()
    users = {}
    for index in range(2):
        engine = make_engine(path=shard_file(data_dir, index), shard=ShardIds(PLACEMENT, index))
        (name,) = names_on(index, 1, prefix="trader")
        user_id = new_user(engine, name, usdt="100")
        engine.spot_order(user_id, "BTCUSDT", "buy", "0.0001").get(timeout=TIMEOUT_S)
        engine.set_control_mode(user_id, "win" if index else "lose", 1).get(timeout=TIMEOUT_S)
        engine.open_option(user_id, "BTCUSDT", "up", "10", 30).get(timeout=TIMEOUT_S)
        engine.advance(31)
        engine.stop()
        users[index] = (user_id, name)
    return str(data_dir), users


def test_ledger_verify_over_a_data_directory_says_each_shard_holds(cluster):
    data_dir, _ = cluster
    result = run("ledger", "verify", "--data-dir", data_dir)
    assert (result.exit_code, result.output) == (0, (
        "shard-0.db: ledger OK: 1 accounts, 4 entries, 1 trades checked\n"
        "shard-1.db: ledger OK: 1 accounts, 5 entries, 1 trades checked\n"
    ))


def test_ledger_verify_fails_when_one_shard_is_broken_and_says_which(cluster):
    data_dir, users = cluster
    with sqlite3.connect(shard_file(data_dir, 1)) as conn:
        conn.execute("UPDATE balances SET amount = 5 WHERE asset = 'ETH'")
    result = run("ledger", "verify", "--data-dir", data_dir)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "shard-0.db: ledger OK: 1 accounts, 4 entries, 1 trades checked"
    assert lines[1].startswith("shard-1.db: ledger BROKEN: 1 problem(s)")
    assert lines[2] == f"  - account {users[1][0]}: stored ETH balance 0.00000005 but the entries sum to 0"


def test_ledger_verify_catches_an_id_that_does_not_name_its_shard(cluster):
    data_dir, _ = cluster
    with sqlite3.connect(shard_file(data_dir, 0)) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("UPDATE transactions SET transaction_id = transaction_id + 1 WHERE transaction_id = "
                     "(SELECT MAX(transaction_id) FROM transactions)")
        (moved,) = conn.execute("SELECT MAX(transaction_id) FROM transactions").fetchone()
    assert split_transaction_id(moved)[0] == 1
    result = run("ledger", "verify", "--data-dir", data_dir)
    assert result.exit_code == 1
    assert f"  - transaction {moved}: not an id of shard 0" in result.output.splitlines()


def test_ledger_history_finds_the_account_by_username_or_id(cluster):
    data_dir, users = cluster
    user_id, name = users[1]
    by_name = run("ledger", "history", "--data-dir", data_dir, "--user", name, "--json")
    by_id = run("ledger", "history", "--data-dir", data_dir, "--user", str(user_id), "--json")
    assert by_name.exit_code == by_id.exit_code == 0
    entries = json.loads(by_name.output)
    assert entries == json.loads(by_id.output)
    assert [e["type"] for e in entries] == ["deposit", "spot_buy", "spot_buy", "option_stake", "option_payout"]
    assert {split_transaction_id(e["transaction_id"])[0] for e in entries} == {1}
    text = run("ledger", "history", "--data-dir", data_dir, "--user", name)
    assert text.exit_code == 0 and len(text.output.splitlines()) == 5
    missing = run("ledger", "history", "--data-dir", data_dir, "--user", "nobody")
    assert (missing.exit_code, missing.output) == (1, "Error: no user 'nobody'\n")


def test_ledger_audit_over_a_data_directory_merges_every_shard(cluster):
    data_dir, users = cluster
    result = run("ledger", "audit", "--data-dir", data_dir, "--json")
    assert result.exit_code == 0
    audit = json.loads(result.output)
    assert (audit["count"], audit["stakes"], audit["payouts"]) == (2, "20", "11")
    assert [a["user_id"] for a in audit["accounts"]] == sorted(user_id for user_id, _ in users.values())
    deciders = {a["user_id"]: a["by_decider"] for a in audit["accounts"]}
    assert deciders == {users[0][0]: {"control_mode:lose": 1}, users[1][0]: {"control_mode:win": 1}}
    text = run("ledger", "audit", "--data-dir", data_dir)
    assert text.output.splitlines()[0] == "2 settlement(s) not decided by the market; stakes 20 USDT, payouts 11 USDT"


@pytest.mark.parametrize("command", [["ledger", "verify"], ["ledger", "audit"], ["ledger", "history", "--user", "a"]])
def test_ledger_commands_on_a_directory_that_is_no_cluster_are_one_line_and_exit_2(tmp_path, command):
    result = run(*command, "--data-dir", str(tmp_path))
    assert (result.exit_code, result.output) == (
        2, f"Error: {tmp_path} has no shard files (shard-K.db): it is not a cluster's data directory\n")
    result = run(*command, "--data-dir", str(tmp_path / "none"))
    assert (result.exit_code, result.output) == (2, f"Error: {tmp_path / 'none'}: no such directory\n")


def test_ledger_commands_refuse_a_disagreeing_shards_and_a_missing_shard(cluster):
    data_dir, _ = cluster
    result = run("ledger", "verify", "--data-dir", data_dir, "--shards", "3")
    assert (result.exit_code, result.output) == (2, "Error: this data directory has 2 shards; --shards 3 disagrees\n")
    os.remove(shard_file(data_dir, 1))
    result = run("ledger", "audit", "--data-dir", data_dir)
    assert result.exit_code == 2
    assert result.output == f"Error: {data_dir} has 2 shards but shard-1.db is missing; restore it from a backup\n"
