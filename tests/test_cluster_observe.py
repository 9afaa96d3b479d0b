"""Observability of a cluster, with real processes: every shard's and gateway's ``/metrics``,
``cluster status`` telling a lagging shard from a missing one, and a full disk under one
shard (a real small tmpfs) that refuses that shard's accounts alone and heals by itself.

Waits are bounded far above normal (2 cores shared with other test runs); nothing here
asserts a speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable, Iterator

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from balancesim.chaos import cluster_children
from balancesim.cli import cli, status_table
from balancesim.cluster import Placement, shard_of_user_id, shard_of_username
from balancesim.cluster._processes import LATE_AFTER_S, shard_state, status_lags, status_problems
from balancesim.serveproc import ServerProcess
from tests.serve_process import stopped_after
from tests.test_cluster_serve import balancesim, request, username_on
from tests.test_storage_faults import fill

PLACEMENT = Placement.for_new(2)
BASE_ARGS = ("--workers", "2", "--shards", "2", "--time-scale", "0.01", "--password-cost", "1024")
WAIT_S = 30.0


def eventually(check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a ``/metrics`` page, by (name, sorted labels)."""
    with urllib.request.urlopen(address, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def status(data_dir: str, *args: str) -> tuple[int, dict, str]:
    """``cluster status --data-dir --json`` in this process: (exit code, JSON, stderr)."""
    result = CliRunner().invoke(cli, ["cluster", "status", "--data-dir", data_dir, "--json", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout), result.stderr


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    yield from stopped_after(lambda *args, data_dir=None: ServerProcess(
        None, *BASE_ARGS, *args, data_dir=data_dir or str(tmp_path / "data")))


def login(url: str, username: str, password: str) -> dict:
    code, body = request(url, "POST", "/api/login", {"username": username, "password": password})
    assert code == 200, body
    return body


def deposit(url: str, token: str, user_id: int, amount: str, key: str) -> tuple[int, dict]:
    return request(url, "POST", "/api/admin/deposits", {"user_id": user_id, "amount": amount}, token, key=key)


# -- the verdicts, without processes ----------------------------------------------------------


def test_a_shard_is_ok_lagging_or_silent_by_its_heartbeat_and_its_oldest_command():
    assert shard_state(0.4, None) == "ok"
    assert shard_state(0.4, 0.2) == "ok"
    assert shard_state(0.4, 1.5) == "lagging"
    assert shard_state(0.4, 0.5, lagging_after_s=0.3) == "lagging"
    assert shard_state(LATE_AFTER_S + 0.1, None) == "lagging"
    assert shard_state(3.5, None) == "silent"
    assert shard_state(3.5, 9.0) == "silent"


def _shard(index: int, age_s: float, oldest_s: float | None, waiting: int = 0, state: str = "ok") -> dict:
    return {"index": index, "host": "h", "pid": 10 + index, "heartbeat_age_s": age_s, "commits_per_s": 1.0,
            "metrics_address": f"http://h:{9000 + index}/metrics", "calls_in_flight": 0,
            "commands_waiting": waiting, "commands_pending": 0, "oldest_command_age_s": oldest_s, "state": state}


def test_lagging_is_said_but_only_a_missing_or_silent_shard_is_a_failure():
    lagging = {"shards": [_shard(0, 0.3, None), _shard(1, 0.5, 2.5, waiting=4, state="lagging")],
               "gateways": [], "missing_shards": [], "expected_shards": 2}
    assert status_problems(lagging) == []
    assert status_lags(lagging) == ["shard 1 is lagging: 4 commands waiting and 0 read but unacknowledged, "
                                    "the oldest 2.5 s old"]
    table = status_table(lagging, 2)
    assert table.startswith("shards: 2 of 2")
    assert "lagging" in table.splitlines()[3] and "http://h:9001/metrics" in table.splitlines()[3]

    missing = {"shards": [_shard(0, 0.3, None)], "gateways": [], "expected_shards": 2,
               "missing_shards": [{"index": 1, "commands_waiting": 3, "commands_pending": 1,
                                   "oldest_command_age_s": 6.0}]}
    assert status_problems(missing) == ["shard 1 is missing (3 commands waiting and 1 read but unacknowledged, "
                                        "the oldest 6 s old)"]
    assert "missing" in status_table(missing, 2).splitlines()[3]
    assert status_lags(missing) == []


# -- /metrics on every process ----------------------------------------------------------------


@pytest.mark.slow
def test_every_shard_and_gateway_serves_metrics_that_count_commands_timeouts_and_redis_reconnects(serve, tmp_path):
    data_dir = str(tmp_path / "data")
    # --timeout-s 1: a gateway waits 1 s for an answer, then 1 s for the outcome, then says 504.
    server = serve("--demo", "--timeout-s", "1", data_dir=data_dir)
    code, listed, _ = status(data_dir)
    assert code == 0
    shard_metrics = {s["index"]: s["metrics_address"] for s in listed["shards"]}
    gateway_metrics = [g["metrics_address"] for g in listed["gateways"]]
    assert sorted(shard_metrics) == [0, 1] and len(set(gateway_metrics)) == 2
    assert all(address.startswith("http://127.0.0.1:") and address.endswith("/metrics")
               for address in [*shard_metrics.values(), *gateway_metrics])

    boss = login(server.url, "superadmin", "superadmin123")
    home = shard_of_user_id(PLACEMENT, boss["user_id"])
    stuck = 1 - home  # not the superadmin's shard, which checks its token on every request
    users = {}
    for shard in (0, 1):
        code, made = request(server.url, "POST", "/api/users",
                             {"username": username_on(shard, "metered-"), "password": "metered-password"},
                             boss["token"])
        assert code == 201, made
        users[shard] = made["user_id"]

    before = {k: scrape(a) for k, a in shard_metrics.items()}
    for n in range(3):
        for shard, user_id in users.items():
            assert deposit(server.url, boss["token"], user_id, "5", f"m-{shard}-{n}")[0] == 201
    refused = request(server.url, "POST", "/api/admin/withdrawals", {"user_id": users[stuck], "amount": "1000"},
                      boss["token"])
    assert refused[1]["error"]["code"] == "insufficient_funds"
    after = {k: scrape(a) for k, a in shard_metrics.items()}
    for shard in (0, 1):
        grew = {name: value(after[shard], name, **labels) - value(before[shard], name, **labels)
                for name, labels in (("balancesim_shard_commands_total", {"op": "deposit", "outcome": "ok"}),
                                     ("balancesim_shard_commit_batch_size_count", {}),
                                     ("balancesim_shard_commit_seconds_count", {}),
                                     ("balancesim_shard_event_batches_published_total", {}))}
        assert grew["balancesim_shard_commands_total"] == 3, (shard, grew)
        assert all(g >= 1 for g in grew.values()), (shard, grew)
        assert value(after[shard], "balancesim_shard_info", shard=str(shard)) == 1
        assert value(after[shard], "balancesim_shard_redis_up") == 1
    assert value(after[stuck], "balancesim_shard_commands_total", op="withdraw", outcome="insufficient_funds") == 1
    gateways = [scrape(a) for a in gateway_metrics]
    assert sum(value(g, "balancesim_cluster_calls_total") for g in gateways) >= 7
    assert all(("balancesim_cluster_calls_in_flight", ()) in g for g in gateways)

    # A timeout: the deposit goes to a stopped shard, and the gateway that took it counts a 504.
    timeouts = sum(value(g, "balancesim_cluster_timeouts") for g in gateways)
    pid = cluster_children(server.pid)["shards"][stuck]
    os.kill(pid, signal.SIGSTOP)
    try:
        code, body = deposit(server.url, boss["token"], users[stuck], "1", "m-late")
        assert (code, body["error"]["code"]) == (504, "timeout"), body
        assert sum(value(scrape(a), "balancesim_cluster_timeouts") for a in gateway_metrics) == timeouts + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    # Woken, the shard reads the deposit past its deadline: refused and counted, never applied.
    eventually(lambda: value(scrape(shard_metrics[stuck]), "balancesim_shard_expired_total") >= 1,
               "the stopped shard counts the expired deposit")
    assert value(scrape(shard_metrics[stuck]), "balancesim_shard_commands_total", op="deposit",
                 outcome="unavailable") >= 1

    # Redis killed: the supervisor restarts it, and every reader of every process reconnects.
    reconnects_before = [value(scrape(a), "balancesim_cluster_redis_reconnects") for a in gateway_metrics]
    shard_reconnects_before = {k: value(scrape(a), "balancesim_shard_redis_reconnects_total")
                               for k, a in shard_metrics.items()}
    redis_pid = cluster_children(server.pid)["redis"]
    os.kill(redis_pid, signal.SIGKILL)
    eventually(lambda: cluster_children(server.pid)["redis"] not in (None, redis_pid), "redis-server restarted")
    eventually(lambda: all(value(scrape(a), "balancesim_cluster_redis_reconnects") > before_n
                           for a, before_n in zip(gateway_metrics, reconnects_before)),
               "every gateway counts its Redis reconnect")
    eventually(lambda: all(value(scrape(a), "balancesim_shard_redis_reconnects_total") > shard_reconnects_before[k]
                           for k, a in shard_metrics.items()),
               "every shard counts its Redis reconnect")
    eventually(lambda: all(value(scrape(a), "balancesim_shard_redis_up") == 1 for a in shard_metrics.values()),
               "every shard reads its backlog from the new Redis")
    assert server.stop() == 0
    verified = balancesim("ledger", "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- lagging, then missing, then clean ---------------------------------------------------------


@pytest.mark.slow
def test_cluster_status_shows_a_stopped_shard_lagging_then_missing_and_clean_after_sigcont(serve, tmp_path):
    data_dir = str(tmp_path / "data")
    server = serve("--demo", "--timeout-s", "2", data_dir=data_dir)
    boss = login(server.url, "superadmin", "superadmin123")
    stuck = 1 - shard_of_user_id(PLACEMENT, boss["user_id"])
    code, made = request(server.url, "POST", "/api/users",
                         {"username": username_on(stuck, "laggard-"), "password": "laggard-password"}, boss["token"])
    assert code == 201, made
    assert status(data_dir)[0] == 0

    pid = cluster_children(server.pid)["shards"][stuck]
    answers: list[int] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        # A few requests the stopped shard cannot read: they wait in its stream (504 later).
        senders = [threading.Thread(target=lambda n=n: answers.append(
            deposit(server.url, boss["token"], made["user_id"], "1", f"lag-{n}")[0])) for n in range(3)]
        for sender in senders:
            sender.start()
        seen: dict[str, tuple[int, dict, str]] = {}

        def judged() -> bool:
            code, listed, stderr = status(data_dir, "--lagging-after-s", "0.3")
            state = next((s["state"] for s in listed["shards"] if s["index"] == stuck), None)
            if any(m["index"] == stuck for m in listed["missing_shards"]):
                state = "missing"
            seen.setdefault(state or "?", (code, listed, stderr))
            return "missing" in seen

        eventually(judged, "the stopped shard's heartbeat expires (it is missing)")
        assert "lagging" in seen, f"never seen lagging, only {sorted(seen)}"
        code, listed, stderr = seen["lagging"]
        assert code == 0, stderr  # lagging alone: said, exit 0
        laggard = next(s for s in listed["shards"] if s["index"] == stuck)
        assert f"problem: shard {stuck} is lagging" in stderr
        assert laggard["oldest_command_age_s"] is not None or laggard["heartbeat_age_s"] > LATE_AFTER_S
        assert any(p.startswith(f"shard {stuck} is lagging") for p in listed["problems"])
        code, listed, stderr = seen["missing"]
        assert code == 1 and f"problem: shard {stuck} is missing" in stderr
        waiting = next(m for m in listed["missing_shards"] if m["index"] == stuck)
        assert waiting["oldest_command_age_s"] > 0.3 and (waiting["commands_waiting"] or 0) + waiting[
            "commands_pending"] >= 1, waiting
    finally:
        os.kill(pid, signal.SIGCONT)
    for sender in senders:
        sender.join(timeout=60)
    assert answers and all(code in (503, 504) for code in answers), answers

    def clean() -> bool:
        code, listed, stderr = status(data_dir, "--lagging-after-s", "0.3")
        return (code == 0 and stderr == "" and listed["missing_shards"] == []
                and all(s["state"] == "ok" and s["oldest_command_age_s"] is None for s in listed["shards"]))

    eventually(clean, "status is clean again after SIGCONT")
    table = CliRunner().invoke(cli, ["cluster", "status", "--data-dir", data_dir])
    assert table.exit_code == 0 and table.stdout.startswith("shards: 2 of 2")
    assert server.stop() == 0


# -- a full disk under one shard ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[str]:
    mount_point = str(tmp_path / "disk")
    os.mkdir(mount_point)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount_point], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", mount_point], check=True)


def _name_on(shard: int, prefix: str) -> str:
    return next(f"{prefix}{n}" for n in range(10_000) if shard_of_username(PLACEMENT, f"{prefix}{n}") == shard)


@pytest.mark.slow
def test_a_full_disk_under_one_shard_refuses_its_accounts_alone_and_heals_without_a_restart(serve, tmp_path,
                                                                                          small_disk):
    data_dir = str(tmp_path / "data")
    full, other = 1, 0
    # The superadmin lives on the healthy shard: its token is checked there on every request.
    boss_name, on_full, on_other = _name_on(other, "boss-"), _name_on(full, "full-"), _name_on(other, "fine-")
    for name, role in ((boss_name, "superadmin"), (on_full, "user"), (on_other, "user")):
        made = balancesim("users", "create", "--data-dir", data_dir, "--shards", "2", "--username", name,
                          "--password", f"{name}-password", "--role", role)
        assert made.returncode == 0, made.stderr
    # shard-1.db moves onto the small disk; the data directory keeps its name as a link.
    path = os.path.join(data_dir, f"shard-{full}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            shutil.move(path + suffix, os.path.join(small_disk, f"shard-{full}.db{suffix}"))
    os.symlink(os.path.join(small_disk, f"shard-{full}.db"), path)

    server = serve(data_dir=data_dir)
    boss = login(server.url, boss_name, f"{boss_name}-password")
    users = {full: login(server.url, on_full, f"{on_full}-password")["user_id"],
             other: login(server.url, on_other, f"{on_other}-password")["user_id"]}
    for shard, user_id in users.items():
        assert deposit(server.url, boss["token"], user_id, "100", f"first-{shard}")[0] == 201
    assert any(name.startswith(f"shard-{full}.db-wal") for name in os.listdir(small_disk)), (
        "the shard's WAL is not on the small disk", os.listdir(small_disk))
    shard_pid = cluster_children(server.pid)["shards"][full]
    metrics = {s["index"]: s["metrics_address"] for s in status(data_dir)[1]["shards"]}

    filler = fill(small_disk)
    try:
        for n in range(5):
            code, body = request(server.url, "POST", "/api/admin/deposits",
                                 {"user_id": users[full], "amount": "7", "description": "x" * 400},
                                 boss["token"], key=f"full-{n}")
            assert (code, body["error"]["code"]) == (503, "storage_unavailable"), body
            code, body = deposit(server.url, boss["token"], users[other], "1", f"fine-{n}")
            assert code == 201 and body["transaction"]["user_id"] == users[other], body
        code, balance = request(server.url, "GET", f"/api/users/{users[full]}/balance", token=boss["token"])
        assert code == 200 and balance["balances"]["USDT"] == "100" and balance["version"] == 1, balance
        samples = scrape(metrics[full])
        assert value(samples, "balancesim_shard_commit_failures_total") >= 1
        assert value(samples, "balancesim_shard_commands_total", op="deposit", outcome="storage_unavailable") == 5
    finally:
        os.remove(filler)

    # Space again: the same shard process commits again, with no restart and no operator step.
    def committed() -> dict | None:
        code, body = deposit(server.url, boss["token"], users[full], "3", "after-full")
        assert code in (201, 503), body
        return body if code == 201 else None

    after = eventually(committed, "the shard commits again once the disk has room")["transaction"]
    assert (after["version"], after["balance_after"]) == (2, "103"), after
    assert cluster_children(server.pid)["shards"][full] == shard_pid
    assert "restarting it" not in server.log()
    assert server.stop() == 0
    verified = balancesim("ledger", "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    history = balancesim("ledger", "history", "--data-dir", data_dir, "--user", str(users[full]), "--json")
    assert [entry["amount"] for entry in json.loads(history.stdout)] == ["100", "3"]


# -- the backlog, read from the stream alone (in one process) ---------------------------------


def test_a_stalled_shards_backlog_is_read_from_its_stream_and_its_metrics_show_it(tmp_path):
    import asyncio

    import redis.asyncio

    from balancesim.cluster import ShardMetrics, command_backlog
    from balancesim.cluster._rpc import FIELD, Call, commands_stream, pack
    from tests.cluster_harness import SECRET, LocalCluster

    cluster = LocalCluster(str(tmp_path), shards=2).start()
    try:
        shard = cluster.shards[1]

        async def scenario() -> None:
            client = redis.asyncio.Redis.from_url(cluster.redis.url)
            metrics = ShardMetrics(shard.service, cluster.redis.url)
            try:
                assert (await command_backlog(client, 1)).oldest_age_s is None
                assert shard.stall(2.5).wait(timeout=10)
                for n in range(3):
                    call = Call(f"t-{n}", "ping", {}, "bs:reply:t")
                    await client.xadd(commands_stream(1), {FIELD: pack(SECRET, call)})
                await asyncio.sleep(0.5)
                backlog = await command_backlog(client, 1)
                # The stalled shard read nothing (or one batch it has not acknowledged yet).
                assert (backlog.waiting or 0) + backlog.pending >= 3 and backlog.oldest_age_s >= 0.3, backlog
                text = (await metrics.scrape()).decode()
                assert "balancesim_shard_redis_up 1.0" in text
                assert "balancesim_shard_oldest_command_age_seconds 0.0" not in text
                assert (await command_backlog(client, 0)).oldest_age_s is None  # the other shard keeps up
                deadline = time.monotonic() + WAIT_S
                while (await command_backlog(client, 1)).oldest_age_s is not None:
                    assert time.monotonic() < deadline, "the shard did not catch up after its stall"
                    await asyncio.sleep(0.1)
                text = (await metrics.scrape()).decode()
                assert 'balancesim_shard_commands_total{op="ping",outcome="ok"} 3.0' in text, text
            finally:
                await metrics.aclose()
                await client.aclose()

        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_a_busy_metrics_port_is_one_line_and_exit_2(tmp_path):
    import socket

    env = {**os.environ, "BALANCESIM_CLUSTER_SECRET": "x" * 40}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        shard = balancesim("shard", "--redis", "unix:///nowhere", "--index", "0", "--shards", "1", "--db",
                           str(tmp_path / "s.db"), "--metrics-port", port, env=env)
        gateway = balancesim("gateway", "--redis", "unix:///nowhere", "--port", "0", "--metrics-port", port, env=env)
    for result in (shard, gateway):
        assert result.returncode == 2 and result.stderr.startswith("Error: --metrics-port: cannot listen on")
        assert len(result.stderr.strip().splitlines()) == 1
