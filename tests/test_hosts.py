"""Many machines: a cluster over three hosts, built from network namespaces on this one.

Issue 15's deployment across machines, as the roles' own commands run it
(``balancesim.cluster._hosts``): host A runs ``redis-server`` (TCP only, bound to A's
address, an ACL user with a password, no default user) and shard 0; host B runs shard 1;
host C runs one gateway and has no data directory at all. The hosts are network
namespaces joined by a bridge in a fourth; nothing is added to the root namespace, and
every packet stays between namespaces this test made.

A scenario runs against host C's gateway from host C and passes; ``cluster status``
(from C, over TCP) lists both shards and the gateway with the pids started here; after an
orderly stop, ``ledger verify --db`` holds on each shard's file.

A partition: host B (shard 1) is cut off the network for 12 s under deposits, then healed.
B's accounts get only 503 or 504 meanwhile while shard 0's keep working; after the heal
each 504 settles with its key, and every session on host C's gateway reaches its
ledger's version with no gap and no duplicate.

Every process is stopped and every namespace deleted at the end, whatever happened.

Creating namespaces needs root (CI runs as root): without it this test fails and says
so; it never skips.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from balancesim.cluster import HostsCluster, HostsUnavailable, hosts_unavailable
from balancesim.cluster._hosts import ADDRESS, GATEWAY_PORT, HOSTNAME

ADMIN = ("superadmin", "hosts-superadmin-pw")


def balancesim_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "balancesim.cli", *args]


def start_hosts(cluster: HostsCluster) -> HostsCluster:
    """Start the layout, or fail (never skip) saying what is missing: the test exists to
    prove the deployment across machines. Called in the test, so a missing privilege is
    reported as the test's failure."""
    missing = hosts_unavailable()
    if missing:
        pytest.fail(f"tests/test_hosts.py: {missing}; run it as root (CI does)")
    try:
        return cluster.start()
    except HostsUnavailable as error:
        pytest.fail(f"cannot build the three hosts with network namespaces: {error}")


@pytest.fixture
def hosts(tmp_path):
    made: list[HostsCluster] = []

    def make(**options) -> HostsCluster:
        cluster = HostsCluster(tmp_path, admin=ADMIN, **options)
        made.append(cluster)
        return start_hosts(cluster)

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()  # whatever happened: every process stopped, every namespace deleted


@pytest.mark.slow
def test_redis_and_shard_0_on_a_shard_1_on_b_a_gateway_on_c(hosts):
    cluster: HostsCluster = hosts()
    lan = cluster.lan
    assert not list(lan.dirs["a"].glob("*.sock")), "Redis must be reached over TCP only"
    url = cluster.urls["c"]
    assert url == f"http://{ADDRESS['c']}:{GATEWAY_PORT}"

    # A scenario from host C through its gateway: users on both shards, the admin's monitor.
    ran = lan.run("c", balancesim_cli("scenario", "run", "superadmin-deposit", "--url", url,
                                      "--admin-user", ADMIN[0], "--admin-password", ADMIN[1]))
    assert ran.returncode == 0, f"{ran.stdout}{ran.stderr}\n{lan.log('gateway-c')}"

    # cluster status over TCP from host C: the three processes started here.
    listed = lan.run("c", balancesim_cli("cluster", "status", "--redis", cluster.redis_url, "--json"))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    status = json.loads(listed.stdout)
    assert [(s["index"], s["host"], s["pid"]) for s in status["shards"]] == [
        (k, HOSTNAME[cluster.HOST_OF_SHARD[k]], cluster.shards[k].pid) for k in (0, 1)]
    assert [(g["host"], g["pid"], g["address"]) for g in status["gateways"]] == [
        (HOSTNAME["c"], cluster.gateways["c"].pid, url)]
    assert all(s["commits_per_s"] >= 0 and s["heartbeat_age_s"] < 5 for s in status["shards"])
    assert cluster.password not in listed.stdout + listed.stderr

    # Orderly stop: the gateway, the shards (each commits what it was handed), then Redis.
    codes = cluster.stop()
    assert codes == {"gateway-c": 0, "shard-0": 0, "shard-1": 0, "redis": 0}, (
        codes, *(lan.log(role) for role, code in codes.items() if code))

    for k, host in cluster.HOST_OF_SHARD.items():
        verified = lan.run(host, balancesim_cli("ledger", "verify", "--db", f"data/shard-{k}.db"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert sorted(p.name for p in lan.dirs["c"].iterdir()) == [], "host C keeps no data"
    assert not (lan.dirs["a"] / "data" / "shard-1.db").exists() and not (lan.dirs["b"] / "data" / "shard-0.db").exists()


# -- a partition -------------------------------------------------------------------------

TIMEOUT_S = 2.0  # the gateway's command deadline (and as long again for the outcome query)
CUT_S = 12.0  # host B stays cut off this long: past the deadline and the stale-heartbeat limit
PROBE_S = CUT_S - 2 * TIMEOUT_S - 1.0  # requests for B's accounts are sent only this long into
# the cut, so that each one's deadline has passed before B is back: none may apply later
WAIT_S = 60.0  # every wait for the cluster: far above normal, never asserted as speed


async def _deposit_settled(url: str, boss, user_id: int, amount: str, key: str) -> dict:
    """A deposit, repeated with its key through 503s, 504s and cut-off connections until it applies."""
    from balancesim.chaos import raw_call

    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = await raw_call(url, "POST", "/api/admin/deposits", {"user_id": user_id, "amount": amount},
                                      token=boss.token, key=key)
        if status == 201:
            return body
        assert status in (0, 503, 504), (key, status, body)
        assert time.monotonic() < deadline, f"deposit {key} still {status} after {WAIT_S:g} s: {body}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
def test_a_healed_partition_converges_with_no_gap(hosts):
    """Host B (shard 1) is cut off for CUT_S under deposits, then healed: meanwhile its
    accounts' requests are 503 or 504 (never a 2xx, never applied later), shard 0's accounts
    keep working; afterwards each 504 is settled by repeating it with its key, B's accounts
    work again, every session (on host C's gateway, accounts on both shards) reaches the
    ledger's version with no gap and no duplicate, and ``ledger verify`` holds."""
    from balancesim.chaos import _remembered_keys, raw_call, session_in_sync
    from balancesim.client import Client, configure_http
    from balancesim.cluster import Placement, shard_of_user_id

    cluster: HostsCluster = hosts(gateway_args=("--timeout-s", repr(TIMEOUT_S)))
    url = cluster.urls["c"]
    placement = Placement.for_new(cluster.SHARDS)

    async def scenario() -> dict:
        configure_http(32)
        boss = await Client.login(url, *ADMIN)
        clients, sessions = [], []
        for i in range(6):
            made = await boss.create_user(f"part{i}", "pw", key=f"part-user-{i}")
            await _deposit_settled(url, boss, made["user_id"], "100", f"part-start-{i}")
            client = await Client.login(url, f"part{i}", "pw")
            clients.append(client)
            sessions.append(await client.session())
        on_b = [c for c in clients if shard_of_user_id(placement, c.user_id) == 1]
        on_a = [c for c in clients if shard_of_user_id(placement, c.user_id) == 0]
        assert on_b and on_a, "six new users landed on one shard"

        answers: dict[str, tuple[int, object]] = {}
        sent_after_cut: set[str] = set()
        cut_at = float("inf")

        async def probe(n: int) -> None:
            key = f"part-during-{n}"
            if time.monotonic() >= cut_at:
                sent_after_cut.add(key)
            client = on_b[n % len(on_b)]
            answers[key] = await raw_call(url, "POST", "/api/admin/deposits",
                                          {"user_id": client.user_id, "amount": "1"}, token=boss.token, key=key)

        # Deposits to B's accounts start before the cut, so that some are in flight (read by
        # shard 1, or committed with their events unpublished) at the moment it falls.
        probes = []
        for _ in range(20):
            probes.append(asyncio.ensure_future(probe(len(probes) + 1)))
            await asyncio.sleep(0.02)
        probes += [asyncio.ensure_future(probe(len(probes) + 1 + n)) for n in range(10)]
        await asyncio.sleep(0.01)  # they are on their way: sent, read, or committed unpublished
        cluster.cut("b")
        cut_at = time.monotonic()
        others = 0
        while time.monotonic() - cut_at < CUT_S:
            if time.monotonic() - cut_at < PROBE_S:
                probes.append(asyncio.ensure_future(probe(len(probes) + 1)))
            # Shard 0's accounts are unaffected: every deposit succeeds, at once.
            other = on_a[others % len(on_a)]
            others += 1
            status, body = await raw_call(url, "POST", "/api/admin/deposits",
                                          {"user_id": other.user_id, "amount": "2"}, token=boss.token,
                                          key=f"part-other-{others}")
            assert status == 201 and body["transaction"]["user_id"] == other.user_id, (status, body)
            await asyncio.sleep(0.2)
        await asyncio.gather(*probes)
        cut_for = time.monotonic() - cut_at
        cluster.heal("b")

        statuses = {key: status for key, (status, _) in answers.items()}
        assert set(statuses.values()) <= {201, 503, 504}, f"answers around the cut: {answers}"
        assert {statuses[key] for key in sent_after_cut} <= {503, 504}, f"answers during the cut: {answers}"
        assert 503 in statuses.values(), f"no prompt 503 once B's heartbeat was stale: {answers}"
        timeouts = [key for key, status in statuses.items() if status == 504]
        for key in timeouts:  # the 504 names the caller's key, which learns the outcome
            body = answers[key][1]
            assert body.get("idempotency_key", body["error"].get("idempotency_key")) == key, body

        # After the heal: each 504 repeated with its key has an answer that settles it: a
        # 201, or a 503 whose key shard 1 remembers as refused (it expired in B's queue; a
        # 503 before the gateway sees B's heartbeat again says only "not handed over").
        deadline = time.monotonic() + WAIT_S
        for key in timeouts:
            client = on_b[int(key.rsplit("-", 1)[1]) % len(on_b)]
            while True:
                status, body = await raw_call(url, "POST", "/api/admin/deposits",
                                              {"user_id": client.user_id, "amount": "1"}, token=boss.token, key=key)
                if status == 201 or status == 503 and _remembered_keys(str(cluster.ledgers), key).get(key) is False:
                    break
                assert status in (0, 503, 504), (key, status, body)
                assert time.monotonic() < deadline, f"{key} still {status} {WAIT_S:g} s after the heal: {body}"
                await asyncio.sleep(0.2)
            statuses[key] = status

        # B's accounts work again; a deposit to every account after the heal.
        for i, client in enumerate(clients):
            await _deposit_settled(url, boss, client.user_id, "3", f"part-after-{i}")
        for client, session in zip(clients, sessions):
            problem = await session_in_sync(session, lambda c=client: boss.balance(c.user_id))
            assert problem is None, f"user {client.user_id}: {problem}"
            assert session.problems == [], f"user {client.user_id}: {session.problems}"
        reconnects = sum(s.reconnects for s in sessions)
        for session in sessions:
            await session.close()
        return {"statuses": statuses, "others": others, "sent_after_cut": len(sent_after_cut), "cut_for": cut_for,
                "reconnects": reconnects}

    with cluster.inside("c"):  # the clients are on host C, as its gateway is
        found = asyncio.run(scenario())

    # On disk: nothing refused applied; a repeat's 201 is the one entry of its key.
    remembered = _remembered_keys(str(cluster.ledgers), "part-during-%")
    applied = {key for key, ok in remembered.items() if ok}
    assert applied == {key for key, status in found["statuses"].items() if status == 201}, (
        f"applied on disk: {sorted(applied)}; {found}")
    verified = cluster.lan.run("a", balancesim_cli("ledger", "verify", "--data-dir", str(cluster.ledgers)))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    final = list(found["statuses"].values())
    print(f"partition: cut for {found['cut_for']:.1f} s; B's accounts: {final.count(201)} applied, "
          f"{final.count(503)} refused ({found['sent_after_cut']} sent during the cut); shard 0's: "
          f"{found['others']} deposits applied during the cut; {found['reconnects']} session reconnects")


def test_chaos_hosts_without_root_or_without_ip_is_one_line_and_exit_2(monkeypatch):
    """No namespaces without root, none without ``ip``: one clear line, exit 2, no traceback
    (runs anywhere: nothing is built)."""
    import os

    from click.testing import CliRunner

    from balancesim.cli import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    done = CliRunner().invoke(cli, ["chaos", "--cluster", "--hosts"])
    assert done.exit_code == 2 and done.output == "Error: --hosts: the namespace layout (ip netns) needs root\n", (
        done.output)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    done = CliRunner().invoke(cli, ["chaos", "--cluster", "--hosts"])
    assert done.exit_code == 2 and done.output == (
        "Error: --hosts: the namespace layout needs ip: apt-get install -y iproute2\n"), done.output
    done = CliRunner().invoke(cli, ["chaos", "--hosts"])
    assert done.exit_code == 2 and done.output.splitlines() == [
        "Error: --hosts runs the cluster across namespace hosts: give --cluster too"], done.output
