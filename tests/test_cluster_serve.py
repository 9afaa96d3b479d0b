"""``serve --workers 2 --shards 2``: a cluster of real processes (Redis, shards, gateways)
under one ``serve`` parent, and the ``shard``, ``gateway`` and ``cluster status`` roles.

Waits are bounded far above normal (a start takes a few seconds on 2 cores) and never
asserted as speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest
from click.testing import CliRunner

from balancesim.cli import REDIS_URL_ENV, cli
from balancesim.client import Client
from balancesim.cluster import SECRET_ENV, Placement, shard_of_user_id, shard_of_username
from balancesim.cluster._supervisor import REDIS_URL_ENV as SUPERVISOR_REDIS_URL_ENV
from balancesim.cluster._supervisor import read_redis_url
from balancesim.serveproc import ServerProcess
from tests.serve_process import stopped_after

CLUSTER_ARGS = ("--workers", "2", "--shards", "2", "--demo", "--time-scale", "0.01", "--password-cost", "1024")
WAIT_S = 20.0


def balancesim(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancesim.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout_s)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: no psutil here)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    parents[int(name)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def eventually(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)


def http(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def status_code(data_dir: str) -> tuple[int, dict]:
    """``cluster status --data-dir --json`` in this process (fast enough to catch a short outage)."""
    result = CliRunner().invoke(cli, ["cluster", "status", "--data-dir", data_dir, "--json"])
    return result.exit_code, json.loads(result.stdout) if result.exit_code in (0, 1) else {}


def shard_pids(data_dir: str) -> dict[int, int]:
    return {shard["index"]: shard["pid"] for shard in status_code(data_dir)[1].get("shards", [])}


@pytest.fixture
def cluster(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    yield from stopped_after(lambda *args, data_dir=None: ServerProcess(
        None, *CLUSTER_ARGS, *args, data_dir=data_dir or str(tmp_path / "data")))


def test_the_redis_url_travels_in_one_variable():
    assert REDIS_URL_ENV == SUPERVISOR_REDIS_URL_ENV


async def _protocol(url: str) -> tuple[str, int]:
    boss = await Client.login(url, "superadmin", "superadmin123")
    alice = await Client.login(url, "alice", "alice123")
    session = await alice.session()
    await boss.deposit(alice.user_id, "25", description="gift")
    update = await session.wait_for("balance_update", lambda m: m["description"] == "gift", timeout_s=WAIT_S)
    assert update["balance"] == "10025" and update["change"] == "25"
    assert {u["username"] for u in await boss.users()} >= {"superadmin", "admin", "alice", "bob"}
    assert session.problems == []
    await session.close()
    return alice.token, alice.user_id


@pytest.mark.slow
def test_serve_workers_runs_the_protocol_survives_a_shard_and_drains_on_sigterm(cluster, tmp_path):
    data_dir = str(tmp_path / "data")
    server = cluster(data_dir=data_dir)
    assert any(line.startswith("demo: created") for line in server.output)
    assert http(f"{server.url}/readyz") == 200
    token, _ = asyncio.run(_protocol(server.url))
    # Either gateway may take a connection on the shared socket: every one accepts the token.
    assert all(http(f"{server.url}/api/balance", token) == 200 for _ in range(20))

    listed = balancesim("cluster", "status", "--data-dir", data_dir, "--json")
    assert listed.returncode == 0, listed.stderr
    status = json.loads(listed.stdout)
    assert [s["index"] for s in status["shards"]] == [0, 1] and len(status["gateways"]) == 2
    # The contract's fields, and what observability added beside them (never instead).
    assert set(status) == {"shards", "gateways", "missing_shards", "problems"}
    assert status["missing_shards"] == [] and status["problems"] == []
    assert set(status["shards"][0]) == {"index", "host", "pid", "heartbeat_age_s", "commits_per_s", "state",
                                        "commands_waiting", "commands_pending", "oldest_command_age_s",
                                        "metrics_address", "calls_in_flight"}
    assert set(status["gateways"][0]) == {"host", "pid", "address", "sessions", "heartbeat_age_s",
                                          "metrics_address", "calls_in_flight"}
    assert balancesim("cluster", "status", "--data-dir", data_dir).stdout.startswith("shards: 2 of 2")

    # A gateway of its own (as on another machine), on the same Redis: the login works there too.
    env = {**os.environ, REDIS_URL_ENV: read_redis_url(data_dir)}
    with open(os.path.join(data_dir, "cluster.secret")) as secret:
        env[SECRET_ENV] = secret.read().strip()
    extra = subprocess.Popen([sys.executable, "-m", "balancesim.cli", "gateway", "--port", "0"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = extra.stdout.readline()
        assert line.startswith("listening on "), line
        assert http(f"{line.split()[-1]}/api/balance", token) == 200
    finally:
        extra.send_signal(signal.SIGTERM)
        assert extra.wait(timeout=WAIT_S) == 0
        extra.stdout.close()

    second = balancesim("serve", "--workers", "2", "--port", "0", "--data-dir", data_dir)
    assert second.returncode == 2 and "in use by another serve" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    # A stuck shard: not ready, and a list that needs every shard is 503, never partial.
    # (The stopped shard is not the superadmin's, whose token that shard checks.)
    boss = asyncio.run(Client.login(server.url, "superadmin", "superadmin123"))
    stuck = shard_pids(data_dir)[1 - shard_of_user_id(Placement.for_new(2), boss.user_id)]
    os.kill(stuck, signal.SIGSTOP)
    try:
        eventually(lambda: http(f"{server.url}/readyz") == 503, "/readyz says 503 with a shard stopped")
        assert http(f"{server.url}/api/users", boss.token) == 503
        assert status_code(data_dir)[0] == 1
    finally:
        os.kill(stuck, signal.SIGCONT)
    eventually(lambda: http(f"{server.url}/readyz") == 200, "/readyz is 200 again after SIGCONT")

    # A dead shard: status says so (exit 1) until the supervisor has restarted it.
    dead = shard_pids(data_dir)[0]
    os.kill(dead, signal.SIGKILL)
    eventually(lambda: status_code(data_dir)[0] == 1, "cluster status exits 1 with shard 0 killed")
    eventually(lambda: status_code(data_dir)[0] == 0 and shard_pids(data_dir).get(0) not in (None, dead),
               "shard 0 restarted", timeout_s=60)
    assert "shard 0 (pid" in server.log() and "restarting it" in server.log()
    eventually(lambda: http(f"{server.url}/readyz") == 200, "/readyz is 200 after the restart")
    assert http(f"{server.url}/api/balance", token) == 200  # tokens live in the shard's file

    children = descendants(server.pid)
    assert len(children) >= 5  # 2 shards, 2 gateways, redis-server
    assert server.stop() == 0
    assert [pid for pid in children if alive(pid)] == []
    assert not os.path.exists(os.path.join(data_dir, "redis.url"))
    verified = balancesim("ledger", "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert len(verified.stdout.strip().splitlines()) >= 2


@pytest.mark.slow
def test_sigkill_of_serve_takes_every_child_and_a_new_serve_simply_works(cluster, tmp_path):
    data_dir = str(tmp_path / "data")
    server = cluster(data_dir=data_dir)
    token, _ = asyncio.run(_protocol(server.url))
    children = descendants(server.pid)
    assert len(children) >= 5
    server.kill()
    eventually(lambda: not any(alive(pid) for pid in children), "every child gone after SIGKILL of serve",
               timeout_s=10)
    server.start()  # the same port and data directory
    assert http(f"{server.url}/readyz") == 200
    assert http(f"{server.url}/api/balance", token) == 200  # the login survived the whole cluster's death
    assert asyncio.run(Client.login(server.url, "alice", "alice123")).user_id is not None


def test_a_busy_port_is_exit_2_with_nothing_started(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = balancesim("serve", "--workers", "2", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stderr.startswith("Error: cannot listen on") and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "d")


def test_no_redis_server_on_path_is_exit_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    result = balancesim("serve", "--workers", "2", "--port", "0", "--data-dir", str(tmp_path / "d"), env=env)
    assert result.returncode == 2
    assert "redis-server is not on PATH" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "d" / "redis.url")


def test_shards_that_disagree_with_the_data_directory_are_exit_2(tmp_path):
    data_dir = str(tmp_path / "d")
    made = balancesim("users", "create", "--data-dir", data_dir, "--shards", "2", "--username", "u",
                      "--password", "pw-pw-pw")
    assert made.returncode == 0, made.stderr
    result = balancesim("serve", "--workers", "2", "--shards", "3", "--port", "0", "--data-dir", data_dir)
    assert result.returncode == 2 and "--shards 3 disagrees" in result.stderr


def test_the_roles_refuse_what_they_cannot_run_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    no_secret = balancesim("gateway", "--redis", "unix:///nowhere", "--port", "0", env=env)
    assert no_secret.returncode == 2 and SECRET_ENV in no_secret.stderr
    env[SECRET_ENV] = "x" * 40
    bad_index = balancesim("shard", "--redis", "unix:///nowhere", "--index", "2", "--shards", "2",
                           "--db", str(tmp_path / "s.db"), env=env)
    assert bad_index.returncode == 2 and "--index 2" in bad_index.stderr
    neither = balancesim("cluster", "status")
    assert neither.returncode == 2
    no_serve = balancesim("cluster", "status", "--data-dir", str(tmp_path))
    assert no_serve.returncode == 2 and "no serve is running" in no_serve.stderr


def request(url: str, method: str, path: str, body: dict | None = None, token: str | None = None,
            key: str | None = None) -> tuple[int, dict]:
    """``(status, parsed body)`` for any status."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key:
        headers["Idempotency-Key"] = key
    call = urllib.request.Request(url + path, method=method, headers=headers,
                                  data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def username_on(shard: int, prefix: str) -> str:
    placement = Placement.for_new(2)
    return next(f"{prefix}{n}" for n in range(10_000) if shard_of_username(placement, f"{prefix}{n}") == shard)


@pytest.mark.slow
def test_a_deposit_sent_to_a_stopped_shard_is_504_with_its_key_and_never_applies(cluster, tmp_path):
    # --timeout-s 1: a gateway waits 1 s for the answer, then 1 s for the outcome, then says 504.
    data_dir = str(tmp_path / "data")
    server = cluster("--timeout-s", "1", data_dir=data_dir)
    boss = request(server.url, "POST", "/api/login", {"username": "superadmin", "password": "superadmin123"})[1]
    # The stopped shard is not the superadmin's, whose shard checks the token on every gateway.
    stuck = 1 - shard_of_user_id(Placement.for_new(2), boss["user_id"])
    status, made = request(server.url, "POST", "/api/users",
                           {"username": username_on(stuck, "late-"), "password": "late-password"}, boss["token"])
    assert status == 201, made
    user_id = made["user_id"]
    assert shard_of_user_id(Placement.for_new(2), user_id) == stuck
    assert request(server.url, "POST", "/api/admin/deposits", {"user_id": user_id, "amount": "10"}, boss["token"])[0] == 201

    def account() -> tuple[dict, list]:
        balance = request(server.url, "GET", f"/api/users/{user_id}/balance", token=boss["token"])
        history = request(server.url, "GET", f"/api/users/{user_id}/transactions", token=boss["token"])
        assert balance[0] == history[0] == 200, (balance, history)
        return balance[1], history[1]["transactions"]

    before = account()
    pid = shard_pids(data_dir)[stuck]
    deposit = {"user_id": user_id, "amount": "5", "description": "sent to a stopped shard"}
    os.kill(pid, signal.SIGSTOP)  # before the deposit is sent
    try:
        started = time.monotonic()
        status, body = request(server.url, "POST", "/api/admin/deposits", deposit, boss["token"], key="late-1")
        assert (status, body["error"]["code"]) == (504, "timeout"), body
        assert body["idempotency_key"] == "late-1"
        assert time.monotonic() - started < 30  # bounded; its deadline (1 s on Redis's clock) is long past
        time.sleep(1.0)  # further past the deadline, still stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    eventually(lambda: http(f"{server.url}/readyz") == 200, "/readyz is 200 again after SIGCONT")
    # That was one gateway's view; the other refreshes its view of the heartbeats twice a
    # second, and until then it refuses the shard's accounts at once (503, nothing sent).
    time.sleep(1.5)

    # The shard read the deposit after its deadline: refused, never applied, and the key remembers why.
    status, body = request(server.url, "POST", "/api/admin/deposits", deposit, boss["token"], key="late-1")
    assert (status, body["error"]["code"]) == (503, "unavailable"), body
    assert "expired" in body["error"]["message"]
    assert account() == before
    # A new key applies, once however often it is repeated.
    first = request(server.url, "POST", "/api/admin/deposits", deposit, boss["token"], key="late-2")
    again = request(server.url, "POST", "/api/admin/deposits", deposit, boss["token"], key="late-2")
    assert first[0] == again[0] == 201 and first[1] == again[1], (first, again)
    balance, history = account()
    assert balance["balances"]["USDT"] == "15" and balance["version"] == before[0]["version"] + 1
    assert history == before[1] + [first[1]["transaction"]]

    assert server.stop() == 0
    verified = balancesim("ledger", "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    late = balancesim("ledger", "history", "--data-dir", data_dir, "--user", str(user_id), "--json")
    assert late.returncode == 0, late.stderr
    assert [entry["amount"] for entry in json.loads(late.stdout)] == ["10", "5"]


@pytest.mark.slow
def test_users_create_through_a_running_cluster_puts_each_account_on_its_username_s_shard(cluster, tmp_path):
    data_dir = str(tmp_path / "data")
    server = cluster(data_dir=data_dir)
    redis_url = read_redis_url(data_dir)
    with open(os.path.join(data_dir, "cluster.secret")) as secret:
        secret_env = {**os.environ, SECRET_ENV: secret.read().strip()}
    no_secret = {k: v for k, v in os.environ.items() if k != SECRET_ENV}

    made = {}
    for shard in (0, 1):
        name = username_on(shard, "remote-")
        # The secret from the data directory's cluster.secret.
        created = balancesim("users", "create", "--redis", redis_url, "--data-dir", data_dir, "--username", name,
                             "--password", f"{name}-password", env=no_secret)
        assert created.returncode == 0, created.stderr
        made[name] = int(created.stdout)
        assert shard_of_user_id(Placement.for_new(2), made[name]) == shard
    # The secret from the environment, as on a machine with no data directory; and a role.
    boss_name = username_on(1, "remote-boss-")
    created = balancesim("users", "create", "--redis", redis_url, "--username", boss_name, "--password",
                         "boss-password", "--role", "admin", env=secret_env)
    assert created.returncode == 0, created.stderr
    for name, password, role in [(n, f"{n}-password", "user") for n in made] + [(boss_name, "boss-password", "admin")]:
        status, login = request(server.url, "POST", "/api/login", {"username": name, "password": password})
        assert status == 200 and login["role"] == role, login
    status, listed = request(server.url, "GET", "/api/users", token=login["token"])
    assert status == 200 and {u["username"] for u in listed["users"]} >= set(made) | {boss_name}

    taken = balancesim("users", "create", "--redis", redis_url, "--username", next(iter(made)), "--password",
                       "another-password", env=secret_env)
    assert taken.returncode == 1 and taken.stderr.startswith("Error: ") and "is taken" in taken.stderr, taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1 and taken.stdout == ""

    for unreachable in ("redis://someone:hunter2-password@127.0.0.1:9", f"unix://{tmp_path}/no-redis.sock"):
        refused = balancesim("users", "create", "--redis", unreachable, "--username", "nobody", "--password",
                             "nobody-password", env=secret_env)
        assert refused.returncode == 2 and "cannot reach the cluster's Redis" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "hunter2" not in refused.stderr
    secretless = balancesim("users", "create", "--redis", redis_url, "--username", "nobody", "--password",
                            "nobody-password", env=no_secret)
    assert secretless.returncode == 2 and SECRET_ENV in secretless.stderr
    both = balancesim("users", "create", "--redis", redis_url, "--db", str(tmp_path / "x.db"), "--username",
                      "nobody", "--password", "nobody-password", env=secret_env)
    assert both.returncode == 2 and "--redis" in both.stderr

    assert server.stop() == 0
    verified = balancesim("ledger", "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
