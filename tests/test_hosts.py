"""Many machines: a cluster over three hosts, built from network namespaces on this one.

Issue 15's deployment across machines, as the roles' own commands run it
(``balancesim.cluster._hosts``): host A runs ``redis-server`` (TCP only, bound to A's
address, an ACL user with a password, no default user) and shard 0; host B runs shard 1;
host C runs one gateway and has no data directory at all. The hosts are network
namespaces joined by a bridge in a fourth; nothing is added to the root namespace, and
every packet stays between namespaces this test made.

A scenario runs against host C's gateway from host C and passes; ``cluster status``
(from C, over TCP) lists both shards and the gateway with the pids started here; after an
orderly stop, ``ledger verify --db`` holds on each shard's file. Every process is stopped
and every namespace deleted at the end, whatever happened.

Creating namespaces needs root (CI runs as root): without it this test fails and says
so; it never skips.
"""

from __future__ import annotations

import json
import sys

import pytest

from balancesim.cluster._hosts import ADDRESS, GATEWAY_PORT, HOSTNAME, HostsCluster, HostsUnavailable, hosts_unavailable

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
