"""Many machines: a cluster over three hosts, built from network namespaces on this one.

Issue 15's deployment across machines, as the roles' own commands run it: host A runs
``redis-server`` (TCP only, bound to A's address, an ACL user with a password, no default
user) and shard 0; host B runs shard 1; host C runs one gateway and has no data directory
at all. The hosts are network namespaces (``ip netns``), each with one veth leg to a
bridge that lives in a fourth namespace (the "switch"), addressed in 10.77.0.0/24. Nothing
is added to the root namespace (each host also gets its own host name), so two runs side by side do not collide, and every
packet stays between namespaces this test made. Each host has its own working directory.

A scenario runs against host C's gateway from host C and passes; ``cluster status``
(from C, over TCP) lists both shards and the gateway with the pids started here; after an
orderly stop, ``ledger verify --db`` holds on each shard's file. Every process is stopped
and every namespace deleted at the end, whatever happened.

Creating namespaces needs root (CI runs as root): without it this test fails and says
so; it never skips.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import balancesim
from balancesim.cluster import SECRET_ENV, Placement, shard_of_username
from balancesim.cluster._watchdog import WATCHDOG_FD_ENV, die_with_parent_preexec

SUBNET = "10.77.0"
ADDRESS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2", "c": f"{SUBNET}.3"}
HOSTNAME = {"a": "host-a", "b": "host-b", "c": "host-c"}
REDIS_PORT = 6379
GATEWAY_PORT = 3000  # a fresh namespace has every port free
REDIS_USER = "balancesim"
ADMIN = ("superadmin", "hosts-superadmin-pw")
SHARDS = 2
WAIT_S = 60.0  # a start takes seconds on 2 busy cores; far above normal, never asserted as speed
REPO = str(Path(balancesim.__file__).resolve().parent.parent)


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


class Line:
    """Reads a child's stdout on a thread, so a wait for its ready line has a bound."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        threading.Thread(target=self._pump, args=(process.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        with stream:  # closed here, once the child is gone: never under this thread's feet
            for line in stream:
                self.lines.put(line)
        self.lines.put("")

    def wait_for(self, prefix: str, timeout_s: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r} within {timeout_s:g} s; saw {self.seen}") from None
            if not line:
                raise AssertionError(f"the process ended before printing {prefix!r}; saw {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line.strip()


class Lan:
    """Three hosts (``a``, ``b``, ``c``) on a bridge, each a namespace with a working directory.

    ``start`` runs a command inside a host (``ip netns exec``), in its directory; ``run``
    runs one to completion. ``close`` stops every process (SIGTERM, then SIGKILL) and
    deletes every namespace, which takes their veths with them.
    """

    def __init__(self, root: Path) -> None:
        tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
        self.netns = {host: f"bsh-{host}-{tag}" for host in ("a", "b", "c")}
        self.switch = f"bsh-sw-{tag}"
        self.dirs = {host: root / f"host-{host}" for host in self.netns}
        self.logs = root / "logs"  # outside every host's directory: host C's stays empty
        self.made: list[str] = []
        self.processes: list[tuple[str, subprocess.Popen]] = []
        # Children of shard and gateway watch this pipe: if this test process is killed
        # outright, they stop by themselves instead of keeping ledgers and ports.
        self.watch_read, self.watch_write = os.pipe()
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop(SECRET_ENV, None)

    def build(self) -> "Lan":
        for directory in (*self.dirs.values(), self.logs):
            directory.mkdir(parents=True)
        for name in (self.switch, *self.netns.values()):
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, name in self.netns.items():
            leg = f"leg-{host}"
            # Both ends are made straight inside their namespaces: the root namespace never sees them.
            ip("link", "add", leg, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", self.switch, "link", "set", leg, "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{ADDRESS[host]}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        return self

    def _argv(self, host: str, argv: list[str]) -> list[str]:
        # Its own network namespace, and its own host name (a UTS namespace), so that
        # cluster status tells the hosts apart; each step execs, so the pid is the command's.
        return ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "--", "sh", "-c",
                f'hostname {HOSTNAME[host]} && exec "$@"', "sh", *argv]

    def start(self, host: str, role: str, argv: list[str], env: dict[str, str] | None = None,
              watchdog: bool = True) -> tuple[subprocess.Popen, Line]:
        child_env = {**self.env, **(env or {})}
        if watchdog:
            child_env[WATCHDOG_FD_ENV] = str(self.watch_read)
        with open(self.logs / f"{role}.log", "ab") as log:
            process = subprocess.Popen(
                self._argv(host, argv), cwd=self.dirs[host], env=child_env, stdout=subprocess.PIPE,
                stderr=log, text=True, pass_fds=(self.watch_read,) if watchdog else (),
                # Redis cannot watch a pipe: the kernel kills it with this process's main thread.
                preexec_fn=None if watchdog else (lambda parent=os.getpid(): die_with_parent_preexec(parent)))
        self.processes.append((role, process))
        return process, Line(process)

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(host, argv), cwd=self.dirs[host], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout_s)

    def log(self, role: str) -> str:
        try:
            return (self.logs / f"{role}.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        try:
            for _, process in reversed(self.processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for _, process in reversed(self.processes):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=20)
            os.close(self.watch_write)
            os.close(self.watch_read)
        finally:
            problems = []
            for name in reversed(self.made):
                try:
                    ip("netns", "del", name)
                except RuntimeError as error:
                    problems.append(str(error))
            assert not problems, f"namespaces left behind: {problems}"


def balancesim_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "balancesim.cli", *args]


def build_lan(net: Lan) -> None:
    """Build the hosts, or fail (never skip) saying what is missing: the test exists to
    prove the deployment across machines. Called in the test, so a missing privilege is
    reported as the test's failure."""
    if os.geteuid() != 0:
        pytest.fail("tests/test_hosts.py builds network namespaces (ip netns) and needs root; "
                    "run it as root (CI does)")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("redis-server", "redis-server")):
        if shutil.which(tool) is None:
            pytest.fail(f"tests/test_hosts.py needs {tool}: apt-get install -y {package}")
    try:
        net.build()
    except RuntimeError as error:
        pytest.fail(f"cannot build the three hosts with network namespaces: {error}")


@pytest.fixture
def lan(tmp_path):
    net = Lan(tmp_path)
    try:
        yield net
    finally:
        net.close()  # whatever happened: every process stopped, every namespace deleted


def redis_config(directory: Path, password: str) -> Path:
    """TCP only (no Unix socket), bound to host A's address; as ``RedisServer``: no dump, no
    default user, one ACL user that cannot reconfigure or wipe the server."""
    config = directory / "redis.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([
            "daemonize no",
            f"dir {directory}",
            'save ""',
            "appendonly no",
            f"bind {ADDRESS['a']}",
            f"port {REDIS_PORT}",
            f"logfile {directory / 'redis.log'}",
            "maxmemory-policy noeviction",
            "user default off resetpass nocommands",
            f"user {REDIS_USER} on >{password} ~* &* +@all -@dangerous +info",
        ]) + "\n")
    return config


@pytest.mark.slow
def test_redis_and_shard_0_on_a_shard_1_on_b_a_gateway_on_c(lan: Lan):
    build_lan(lan)
    password = secrets.token_hex(16)
    redis_url = f"redis://{REDIS_USER}:{password}@{ADDRESS['a']}:{REDIS_PORT}"
    secret = {SECRET_ENV: secrets.token_hex(32)}
    host_of_shard = {0: "a", 1: "b"}
    db = {k: lan.dirs[h] / "data" / f"shard-{k}.db" for k, h in host_of_shard.items()}

    # The superadmin goes into its username's shard file before that shard starts, on that
    # shard's host. users create --data-dir makes a new directory with every shard's file;
    # this host keeps only its own, and the other host's shard makes its own file.
    admin_shard = shard_of_username(Placement.for_new(SHARDS), ADMIN[0])
    admin_host = host_of_shard[admin_shard]
    made = lan.run(admin_host, balancesim_cli("users", "create", "--data-dir", "data", "--shards", str(SHARDS),
                                              "--username", ADMIN[0], "--password", ADMIN[1], "--role", "superadmin"))
    assert made.returncode == 0, made.stdout + made.stderr
    for path in (lan.dirs[admin_host] / "data").iterdir():
        if path.name != db[admin_shard].name:
            path.unlink()
    (lan.dirs[host_of_shard[1 - admin_shard]] / "data").mkdir()

    # Host A: Redis over TCP only.
    redis_process, _ = lan.start("a", "redis", ["redis-server", str(redis_config(lan.dirs["a"], password))],
                                 watchdog=False)
    redis_log = lan.dirs["a"] / "redis.log"
    deadline = time.monotonic() + WAIT_S
    while not (redis_log.exists() and "Ready to accept connections" in redis_log.read_text(errors="replace")):
        assert redis_process.poll() is None, f"redis-server exited {redis_process.returncode}: {lan.log('redis')}"
        assert time.monotonic() < deadline, f"redis-server not ready within {WAIT_S:g} s"
        time.sleep(0.1)
    assert not list(lan.dirs["a"].glob("*.sock")), "Redis must be reached over TCP only"

    # Hosts A and B: one shard each, on its host's own file.
    shards = {}
    for k, host in host_of_shard.items():
        process, out = lan.start(host, f"shard-{k}", balancesim_cli(
            "shard", "--redis", redis_url, "--index", str(k), "--shards", str(SHARDS), "--db", f"data/shard-{k}.db",
            "--time-scale", "0.01", "--password-cost", "1024", "--log-level", "warning"), env=secret)
        shards[k] = process, out
    for k, (process, out) in shards.items():
        try:
            assert out.wait_for(f"shard {k} of {SHARDS} on ").endswith(f"data/shard-{k}.db")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{lan.log(f'shard-{k}')}") from None

    # Host C: one gateway, no data directory.
    gateway, out = lan.start("c", "gateway", balancesim_cli(
        "gateway", "--redis", redis_url, "--host", ADDRESS["c"], "--port", str(GATEWAY_PORT),
        "--log-level", "warning"), env=secret)
    url = f"http://{ADDRESS['c']}:{GATEWAY_PORT}"
    try:
        assert out.wait_for("listening on ") == f"listening on {url}"
    except AssertionError as error:
        raise AssertionError(f"{error}\n{lan.log('gateway')}") from None

    # A scenario from host C through its gateway: users on both shards, the admin's monitor.
    ran = lan.run("c", balancesim_cli("scenario", "run", "superadmin-deposit", "--url", url,
                                      "--admin-user", ADMIN[0], "--admin-password", ADMIN[1]))
    assert ran.returncode == 0, f"{ran.stdout}{ran.stderr}\n{lan.log('gateway')}"

    # cluster status over TCP from host C: the three processes started here.
    listed = lan.run("c", balancesim_cli("cluster", "status", "--redis", redis_url, "--json"))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    status = json.loads(listed.stdout)
    assert [(s["index"], s["host"], s["pid"]) for s in status["shards"]] == [
        (k, HOSTNAME[host_of_shard[k]], shards[k][0].pid) for k in (0, 1)]
    assert [(g["host"], g["pid"], g["address"]) for g in status["gateways"]] == [(HOSTNAME["c"], gateway.pid, url)]
    assert all(s["commits_per_s"] >= 0 and s["heartbeat_age_s"] < 5 for s in status["shards"])
    assert password not in listed.stdout + listed.stderr

    # Orderly stop: the gateway, the shards (each commits what it was handed), then Redis.
    for role, process in (("gateway", gateway), *((f"shard-{k}", p) for k, (p, _) in shards.items()),
                          ("redis", redis_process)):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0, f"{role} did not exit 0 on SIGTERM:\n{lan.log(role)}"

    for k, host in host_of_shard.items():
        verified = lan.run(host, balancesim_cli("ledger", "verify", "--db", f"data/shard-{k}.db"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert sorted(p.name for p in lan.dirs["c"].iterdir()) == [], "host C keeps no data"
    assert not (lan.dirs["a"] / "data" / "shard-1.db").exists() and not (lan.dirs["b"] / "data" / "shard-0.db").exists()
