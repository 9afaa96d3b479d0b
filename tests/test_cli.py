"""The command line, through click's CliRunner: exit codes and exact output."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from balancesim.cli import cli
from tests.conftest import TIMEOUT_S, new_user
from tests.serve_process import serve  # noqa: F401 - fixture

README = Path(__file__).resolve().parent.parent / "README.md"


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", list(all_commands(cli)), ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_users_create_prints_the_new_user_id_and_refuses_a_taken_name(db_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["users", "create", "--db", db_path, "--username", "ann", "--password", "pw"])
    assert (first.exit_code, first.output) == (0, "1\n")
    again = runner.invoke(cli, ["users", "create", "--db", db_path, "--username", "ann", "--password", "x"])
    assert again.exit_code == 1
    assert again.output == "Error: username 'ann' is taken\n"


@pytest.mark.parametrize("username, password, message", [
    ("x" * 65, "pw", "username must be 1 to 64 printable characters"),
    ("tab\there", "pw", "username must be 1 to 64 printable characters"),
    ("long-password", "p" * 257, "password must be 1 to 256 characters"),
])
def test_users_create_judges_by_the_engines_rules_as_the_api_does(db_path, username, password, message):
    result = CliRunner().invoke(cli, ["users", "create", "--db", db_path, "--username", username, "--password", password])
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")


@pytest.fixture
def filled(make_engine, db_path):
    engine = make_engine()
    alice = new_user(engine, "alice", usdt="100")
    engine.spot_order(alice, "BTCUSDT", "buy", "0.0001").get(timeout=TIMEOUT_S)
    engine.set_control_mode(alice, "win", 1).get(timeout=TIMEOUT_S)
    engine.open_option(alice, "BTCUSDT", "down", "10", 30).get(timeout=TIMEOUT_S)
    engine.advance(31)
    engine.stop()
    return db_path


def test_ledger_verify_passes_on_a_good_file(filled):
    result = CliRunner().invoke(cli, ["ledger", "verify", "--db", filled])
    assert result.exit_code == 0
    assert result.output == "ledger OK: 1 accounts, 5 entries, 1 trades checked\n"


def test_ledger_verify_fails_with_a_report_on_a_tampered_file(filled):
    with sqlite3.connect(filled) as conn:
        conn.execute("UPDATE transactions SET amount = amount + 1 WHERE version = 1")
        conn.execute("DELETE FROM transactions WHERE version = 2")
    result = CliRunner().invoke(cli, ["ledger", "verify", "--db", filled])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("ledger BROKEN: ")
    assert "  - account 1 v1 (transaction 1): balance_after 100 USDT but the entries sum to 100.00000001" in lines
    assert "  - account 1 v3 (transaction 3): version gap, expected v2" in lines
    assert any("spot order S1-2" in line for line in lines)


def test_ledger_verify_catches_a_negative_balance_and_a_wrong_stored_balance(filled):
    with sqlite3.connect(filled) as conn:
        conn.execute("UPDATE balances SET amount = 5 WHERE asset = 'ETH'")
    result = CliRunner().invoke(cli, ["ledger", "verify", "--db", filled])
    assert result.exit_code == 1
    assert "  - account 1: stored ETH balance 0.00000005 but the entries sum to 0" in result.output


def test_ledger_history_lists_entries_oldest_first(filled):
    result = CliRunner().invoke(cli, ["ledger", "history", "--db", filled, "--user", "alice", "--json"])
    assert result.exit_code == 0
    entries = json.loads(result.output)
    assert [e["version"] for e in entries] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in entries] == ["deposit", "spot_buy", "spot_buy", "option_stake", "option_payout"]
    text = CliRunner().invoke(cli, ["ledger", "history", "--db", filled, "--user", "1"])
    assert text.exit_code == 0 and len(text.output.splitlines()) == 5


def test_ledger_history_of_an_unknown_user_is_an_error(filled):
    result = CliRunner().invoke(cli, ["ledger", "history", "--db", filled, "--user", "nobody"])
    assert (result.exit_code, result.output) == (1, "Error: no user 'nobody'\n")


def test_ledger_audit_lists_forced_settlements_per_account(filled):
    result = CliRunner().invoke(cli, ["ledger", "audit", "--db", filled, "--json"])
    assert result.exit_code == 0
    audit = json.loads(result.output)
    assert (audit["count"], audit["stakes"], audit["payouts"]) == (1, "10", "11")
    (account,) = audit["accounts"]
    assert account["by_decider"] == {"control_mode:win": 1}
    assert [c["mode"] for c in account["control_changes"]] == ["win"]
    text = CliRunner().invoke(cli, ["ledger", "audit", "--db", filled])
    assert text.output.splitlines()[:2] == [
        "1 settlement(s) not decided by the market; stakes 10 USDT, payouts 11 USDT",
        "  user 1 (alice): 1 forced, stakes 10, payouts 11 [control_mode:win × 1]",
    ]


def test_a_missing_ledger_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["ledger", "verify", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 2


def test_ledger_verify_reads_one_snapshot_while_a_server_keeps_committing(make_engine):
    import threading

    from balancesim.actors import RealClock
    from balancesim.reports import verify

    engine = make_engine(clock=RealClock(time_scale=0.0005))
    users = [new_user(engine, f"u{i}", usdt="100000") for i in range(5)]
    done = threading.Event()

    def trade() -> None:
        while not done.is_set():
            for reply in [engine.open_option(u, "BTCUSDT", "up", "1", 30) for u in users]:
                reply.get(timeout=TIMEOUT_S)

    worker = threading.Thread(target=trade)
    worker.start()
    try:
        reports = [verify(engine.ledger.path) for _ in range(30)]
    finally:
        done.set()
        worker.join()
    assert all(report.ok for report in reports), next(r.text() for r in reports if not r.ok)
    assert reports[-1].trades > 0


# -- failing politely: one sentence on stderr and exit 2, never a traceback -----------------


def one_line_error(result) -> str:
    """The single ``Error: …`` line a refused command printed on stderr (and nothing on stdout)."""
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["verify"], ["history", "--user", "1"], ["audit"]], ids=" ".join)
def test_a_file_that_is_not_a_database_is_one_line_and_exit_2(command):
    readme = str(README)
    line = one_line_error(CliRunner().invoke(cli, ["ledger", *command, "--db", readme]))
    assert line == f"Error: {readme} is not a balancesim ledger: file is not a database"


def test_a_missing_or_foreign_ledger_file_is_one_line_and_exit_2(tmp_path):
    missing = CliRunner().invoke(cli, ["ledger", "verify", "--db", "/no/such/file"])
    assert one_line_error(missing) == "Error: /no/such/file: no such file"
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    assert one_line_error(CliRunner().invoke(cli, ["ledger", "audit", "--db", str(foreign)])) == (
        f"Error: {foreign} is not a balancesim ledger"
    )
    assert "is a directory" in one_line_error(CliRunner().invoke(cli, ["ledger", "verify", "--db", str(tmp_path)]))


def test_serve_with_a_ledger_in_a_missing_directory_is_one_line_and_exit_2():
    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--db", "/no/such/dir/x.db"])
    assert one_line_error(result) == (
        "Error: cannot open the ledger /no/such/dir/x.db: the directory /no/such/dir does not exist"
    )
    readme = str(README)
    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--db", readme])
    assert one_line_error(result) == f"Error: cannot open the ledger {readme}: file is not a database"


def test_serve_on_a_busy_port_says_so_before_it_touches_the_ledger(tmp_path):
    import socket
    import subprocess
    import sys

    db = tmp_path / "busy.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "balancesim.cli", "serve", "--demo", "--port", str(port), "--db", str(db)],
            capture_output=True, text=True, timeout=60,
        )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert not db.exists()  # no ledger opened, no demo accounts made


@pytest.mark.parametrize("command", [["scenario", "run", "options-trade"], ["load", "--users", "1", "--duration", "1"]],
                         ids=lambda c: c[0])
def test_a_url_without_a_scheme_is_one_line_and_exit_2(command):
    line = one_line_error(CliRunner().invoke(cli, [*command, "--url", "127.0.0.1:3000"]))
    assert line == "Error: --url '127.0.0.1:3000' needs a scheme and a host, like http://127.0.0.1:3000"


def test_a_wrong_admin_password_is_one_line_and_exit_2_not_a_failed_verdict(serve):
    server = serve("--demo", "--time-scale", "0.01")
    for command in (["scenario", "run", "options-trade"], ["load", "--users", "1", "--duration", "1"]):
        result = CliRunner().invoke(cli, [*command, "--url", server.url, "--admin-password", "nope"])
        assert one_line_error(result) == (
            f"Error: {server.url} refused the login of 'superadmin': wrong username or password "
            "(see --admin-user and --admin-password)"
        ), command


# -- serve's output and log ---------------------------------------------------------------


def test_serve_prints_the_dashboard_after_the_listening_line_and_logs_without_secrets(serve):
    import asyncio
    import threading

    from balancesim.client import ApiError, Client

    server = serve("--demo", "--time-scale", "0.01", "--password-cost", "1024")
    # Read in a thread: a server that never prints the line must fail the test, not hang it.
    following: list[str] = []
    reader = threading.Thread(target=lambda: following.append(server.process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    assert following == [f"dashboard: {server.url}/admin\n"]

    async def work() -> list[str]:
        boss = await Client.login(server.url, "superadmin", "superadmin123")
        alice = await Client.login(server.url, "alice", "alice123")
        with pytest.raises(ApiError):
            await Client.login(server.url, "alice", "not-alices-password")
        await boss.deposit(alice.user_id, "250.5", description="gift")
        await alice.spot("BTCUSDT", "buy", "0.0001")
        await alice.open_option("BTCUSDT", "up", "5", 30)
        with pytest.raises(ApiError):
            await boss.withdraw(alice.user_id, "999999")
        return [boss.token, alice.token]

    tokens = asyncio.run(work())
    assert server.stop() == 0
    log = server.log()
    for secret in [*tokens, "superadmin123", "alice123", "not-alices-password"]:
        assert secret not in log
    lines = log.splitlines()
    deposit = next(line for line in lines if "deposit committed" in line)
    assert " INFO balancesim.ops: deposit committed account=3 amount=250.5 USDT version=2 latency=" in deposit
    assert deposit.endswith("ms")
    assert any("spot committed account=3 amount=0.0001 BTCUSDT buy version=4 order=S3-3" in line for line in lines)
    assert any("option committed account=3 amount=5 USDT version=5 trade=T3-5" in line for line in lines)
    assert any(" WARNING balancesim.ops: POST /api/admin/withdrawals refused 409 insufficient_funds account=3 "
               "amount='999999' by=1 latency=" in line for line in lines)
    assert any(" WARNING balancesim.ops: POST /api/login refused 401 unauthorized " in line for line in lines)
    assert not any("tornado.access" in line for line in lines)  # per-request lines only at --log-level debug


@pytest.mark.parametrize("where, message", [
    ("missing-dir/shard-0.db", "does not exist"),
    ("shard-0.db", "cannot reach the cluster's Redis"),
])
def test_a_shard_that_cannot_start_says_why_in_one_line(tmp_path, where, message):
    import os
    import subprocess
    import sys

    env = {**os.environ, "BALANCESIM_CLUSTER_SECRET": "s" * 40}
    result = subprocess.run(
        [sys.executable, "-m", "balancesim.cli", "shard", "--redis", "redis://u:pw-not-shown@127.0.0.1:1",
         "--index", "0", "--shards", "2", "--db", str(tmp_path / where)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "pw-not-shown" not in result.stderr, result.stderr
