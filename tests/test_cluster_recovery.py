"""Recovery under faults, with real processes: ``serve --workers 2 --shards 2`` (a
supervisor, its private redis-server, two shards, two gateways on one shared port),
faults injected with real signals, and real clients (``balancesim.client``) watching.

- a SIGKILLed gateway's sessions reconnect (with ``since``) to the surviving one, and the
  supervisor starts a new gateway;
- a SIGKILLed shard's accounts answer a prompt ``503`` (or a keyed ``504``) while the
  other shard's accounts go on working, until the supervisor has restarted it;
- a SIGKILLed redis-server is restarted by the supervisor, and every gateway and shard
  reconnects by itself, with no balancesim process restarted;
- ``chaos --cluster --trials 5`` passes the four fault kinds of one host, and with
  ``--hosts`` (three hosts from network namespaces; needs root, as CI has) all five, the
  partition of a shard's host included.

Waits are bounded far above normal (a restart takes a few seconds on 2 busy cores),
and nothing here asserts a speed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable

import pytest

from balancesim.chaos import _remembered, cluster_children, raw_call, session_in_sync
from balancesim.client import Client, Session, configure_http
from balancesim.cluster import Placement, read_redis_url, shard_of_user_id
from balancesim.cluster._processes import cluster_status
from balancesim.serveproc import ServerProcess

CLUSTER_ARGS = ("--workers", "2", "--shards", "2", "--demo", "--time-scale", "0.02", "--password-cost", "1024",
                "--timeout-s", "2")
WAIT_S = 60.0
PLACEMENT = Placement.for_new(2)


@pytest.fixture
def cluster(tmp_path):
    data_dir = str(tmp_path / "data")
    server = ServerProcess(None, *CLUSTER_ARGS, data_dir=data_dir).start()
    try:
        yield server, data_dir
    finally:
        if server.running():
            server.stop()


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.2)


async def people(url: str, count: int, prefix: str) -> tuple[Client, list[Client], list[Session]]:
    """The superadmin, and ``count`` new users with a live session each and 100 USDT."""
    configure_http(32)
    boss = await Client.login(url, "superadmin", "superadmin123")
    clients, sessions = [], []
    for i in range(count):
        made = await boss.create_user(f"{prefix}{i}", "pw")
        await boss.deposit(made["user_id"], "100", key=f"{prefix}-start-{i}")
        client = await Client.login(url, f"{prefix}{i}", "pw")
        clients.append(client)
        sessions.append(await client.session())
    return boss, clients, sessions


async def deposit_settled(url: str, boss: Client, user_id: int, amount: str, key: str,
                          timeout_s: float = WAIT_S, *, data_dir: str | None = None) -> dict | None:
    """A deposit, repeated with its key through 503s, 504s and cut-off connections until it
    has an answer that settles it; the 2xx body. With ``data_dir``, ``None`` when the first
    send expired in its shard's queue (past its deadline while the shard was down): the
    shard remembered that refusal under the key, on disk, and every repeat gets it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await raw_call(url, "POST", "/api/admin/deposits",
                                      {"user_id": user_id, "amount": amount}, token=boss.token, key=key)
        if status == 201:
            return body
        assert status in (0, 503, 504), (status, body)
        if status == 503 and data_dir is not None and _remembered(data_dir, key) is False:
            return None
        if time.monotonic() > deadline:
            raise AssertionError(f"deposit {key} still {status} after {timeout_s:g} s: {body}")
        await asyncio.sleep(0.2)


async def all_in_sync(boss: Client, clients: list[Client], sessions: list[Session]) -> None:
    for client, session in zip(clients, sessions):
        problem = await session_in_sync(session, lambda c=client: boss.balance(c.user_id))
        assert problem is None, f"user {client.user_id}: {problem}"
        assert session.problems == [], f"user {client.user_id}: {session.problems}"


def verify_data_dir(data_dir: str) -> None:
    verified = subprocess.run([sys.executable, "-m", "balancesim.cli", "ledger", "verify", "--data-dir", data_dir],
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_a_killed_gateways_sessions_reconnect_to_the_survivor_and_the_gateway_is_restarted(cluster):
    server, data_dir = cluster
    redis_url = read_redis_url(data_dir)

    async def scenario() -> None:
        boss, clients, sessions = await people(server.url, 8, "gw")

        async def busiest() -> dict | None:
            gateways = (await cluster_status(redis_url))["gateways"]
            ours = [g for g in gateways if g["pid"] in cluster_children(server.pid)["gateways"]]
            # Wait until the heartbeats count every session (one beat a second).
            return max(ours, key=lambda g: g["sessions"]) if sum(g["sessions"] for g in ours) >= 8 else None

        victim = await eventually(busiest, "the gateways' heartbeats count the 8 sessions")
        assert victim["sessions"] >= 1
        os.kill(victim["pid"], signal.SIGKILL)
        # Deposits after the kill reach every session, through whichever gateway is left.
        for n, client in enumerate(clients):
            await deposit_settled(server.url, boss, client.user_id, "7", f"gw-after-{n}")
        await all_in_sync(boss, clients, sessions)
        assert sum(s.reconnects for s in sessions) >= victim["sessions"]
        assert all(s.balances["USDT"] == "107" for s in sessions)

        async def replaced() -> bool:
            gateways = cluster_children(server.pid)["gateways"]
            return len(gateways) == 2 and victim["pid"] not in gateways

        await eventually(replaced, "the supervisor started a new gateway")
        for session in sessions:
            await session.close()

    asyncio.run(scenario())
    assert "gateway" in server.log() and "restarting it" in server.log()
    assert server.stop() == 0
    verify_data_dir(data_dir)


@pytest.mark.slow
def test_a_killed_shard_is_refused_promptly_while_the_other_shard_works_until_it_is_restarted(cluster):
    server, data_dir = cluster

    async def scenario() -> None:
        boss, clients, sessions = await people(server.url, 6, "sh")
        home = shard_of_user_id(PLACEMENT, boss.user_id)
        victim_index = 1 - home  # not the superadmin's own shard, which checks its token
        on_victim = [c for c in clients if shard_of_user_id(PLACEMENT, c.user_id) == victim_index]
        elsewhere = [c for c in clients if shard_of_user_id(PLACEMENT, c.user_id) == home]
        assert on_victim and elsewhere, "six new users landed on one shard"
        victim_pid = cluster_children(server.pid)["shards"][victim_index]
        os.kill(victim_pid, signal.SIGKILL)

        refused: list[tuple[int, Any]] = []
        unknown: list[str] = []
        back = asyncio.Event()

        async def probe(n: int) -> None:
            # One deposit to the killed shard's accounts: refused at once (503, known down
            # from the heartbeats), or 504 with its key, or 201 once the shard is back.
            key = f"sh-during-{n}"
            client = on_victim[n % len(on_victim)]
            status, body = await raw_call(server.url, "POST", "/api/admin/deposits",
                                          {"user_id": client.user_id, "amount": "1"}, token=boss.token, key=key)
            if status == 201:
                back.set()
                return
            assert status in (503, 504), (status, body)
            refused.append((status, body))
            if status == 504:
                # The outcome is open, and the answer says which key learns it.
                assert body.get("idempotency_key", body["error"].get("idempotency_key")) == key, body
                unknown.append(key)
            else:
                assert body["error"]["code"] == "unavailable", body

        async def others() -> None:
            # The other shard's accounts are unaffected meanwhile: every deposit succeeds.
            n = 0
            while not back.is_set():
                n += 1
                other = elsewhere[n % len(elsewhere)]
                status, body = await raw_call(server.url, "POST", "/api/admin/deposits",
                                              {"user_id": other.user_id, "amount": "1"}, token=boss.token,
                                              key=f"sh-other-{n}")
                assert status == 201 and body["transaction"]["user_id"] == other.user_id, (status, body)
                await asyncio.sleep(0.05)

        checking = asyncio.ensure_future(others())
        probes = []
        deadline = time.monotonic() + WAIT_S
        while not back.is_set():
            assert time.monotonic() < deadline, f"shard {victim_index} not back within {WAIT_S:g} s"
            probes.append(asyncio.ensure_future(probe(len(probes) + 1)))
            await asyncio.sleep(0.1)
        await asyncio.gather(*probes)
        await checking
        assert any(status == 503 for status, _ in refused), f"no 503 while the shard was down: {refused}"

        children = cluster_children(server.pid)
        assert children["shards"][victim_index] != victim_pid
        # Each 504, repeated with its key, has a real outcome now: applied, or expired in the
        # stream while the shard was down (refused, nothing changed).
        for key in unknown:
            client = on_victim[int(key.rsplit("-", 1)[1]) % len(on_victim)]
            await deposit_settled(server.url, boss, client.user_id, "1", key, data_dir=data_dir)
        # Its accounts work again, and every session caught up without gap or duplicate.
        for i, client in enumerate(on_victim):
            await deposit_settled(server.url, boss, client.user_id, "2", f"sh-after-{i}")
        await all_in_sync(boss, clients, sessions)
        for session in sessions:
            await session.close()

    asyncio.run(scenario())
    assert "shard" in server.log() and "restarting it" in server.log()
    verify_data_dir(data_dir)


@pytest.mark.slow
def test_a_restarted_redis_is_found_again_by_every_gateway_and_shard_without_restarting_them(cluster):
    server, data_dir = cluster

    async def scenario() -> None:
        boss, clients, sessions = await people(server.url, 6, "rd")
        before = cluster_children(server.pid)
        assert before["redis"] is not None and len(before["gateways"]) == 2 and len(before["shards"]) == 2
        os.kill(before["redis"], signal.SIGKILL)

        async def redis_back() -> bool:
            now = cluster_children(server.pid)["redis"]
            return now is not None and now != before["redis"]

        await eventually(redis_back, "the supervisor restarted redis-server")
        # Deposits work again (503/504 until the fabric is back; repeated with their keys).
        for n, client in enumerate(clients):
            await deposit_settled(server.url, boss, client.user_id, "3", f"rd-after-{n}")
        await all_in_sync(boss, clients, sessions)
        assert all(s.balances["USDT"] == "103" for s in sessions)
        after = cluster_children(server.pid)
        assert after["gateways"] == before["gateways"] and after["shards"] == before["shards"], (
            "a balancesim process was restarted", before, after)

        async def ready() -> bool:
            status, _ = await raw_call(server.url, "GET", "/readyz")
            return status == 200

        await eventually(ready, "/readyz is 200 again")
        for session in sessions:
            await session.close()

    asyncio.run(scenario())
    assert "redis-server restarted" in server.log()
    assert server.stop() == 0
    verify_data_dir(data_dir)


@pytest.mark.slow
def test_chaos_cluster_runs_the_four_fault_kinds_of_one_host_and_every_promise_holds():
    done = subprocess.run([sys.executable, "-m", "balancesim.cli", "chaos", "--cluster", "--trials", "5"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for number, kind in enumerate(("gateway", "shard", "redis", "stall"), 1):
        assert any(line.startswith(f"trial {number} ({kind}): OK") for line in lines), done.stdout
    # The fifth kind needs the namespace layout: said so, and not counted as run.
    assert any(line.startswith("trial 5 (partition): NOT RUN") and "--hosts" in line for line in lines), done.stdout
    assert lines[-1].startswith("4 of 5 trials run") and lines[-1].endswith(" 0 failed"), lines[-1]


@pytest.mark.slow
def test_chaos_cluster_on_three_namespace_hosts_runs_all_five_fault_kinds_the_partition_included():
    # The namespace layout needs root (CI runs as root): without it, chaos says so in one
    # line (exit 2) and this test fails with that line; it never skips.
    done = subprocess.run([sys.executable, "-m", "balancesim.cli", "chaos", "--cluster", "--hosts", "--trials", "5"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for number, kind in enumerate(("gateway", "shard", "redis", "stall", "partition"), 1):
        assert any(line.startswith(f"trial {number} ({kind}): OK") for line in lines), done.stdout
    assert not any("NOT RUN" in line for line in lines), done.stdout
    partition = next(line for line in lines if line.startswith("trial 5 (partition)"))
    assert "cut host B (shard 1) off the network" in partition, partition
    assert lines[-1].startswith("5 of 5 trials run,") and lines[-1].endswith(" 0 failed"), lines[-1]
