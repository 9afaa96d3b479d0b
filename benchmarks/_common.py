"""Helpers shared by the benchmarks: CPU pinning, peak RSS, a JSON last line, and the
deployments (embedded ``serve``, ``serve --workers 2 --shards 2``) with their processes'
roles and CPU, users to load them with, and the ledger checks after."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancesim.client import Client, configure_http
from balancesim.serveproc import ServerProcess

__all__ = ["pin_to_one_core", "peak_rss_mb", "emit", "run_self", "SUPERADMIN", "SERVE_ARGS", "USER_PASSWORD",
           "Deployment", "start_embedded", "start_cluster", "process_tree", "is_balancesim_cli", "role_of",
           "roles_below", "cpu_s", "role_cpu_s", "create_users", "verify_ledgers", "load"]

SUPERADMIN = ("superadmin", "superadmin123")  # created by ``serve --demo``
SERVE_ARGS = ("--demo", "--password-cost", "1024", "--log-level", "warning")  # + --time-scale (see each benchmark)
USER_PASSWORD = "bench-pw"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pin_to_one_core() -> None:
    """Pin this process (and every thread it starts later) to its first allowed CPU."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict[str, Any]) -> None:
    """Print the machine-readable last line."""
    print(json.dumps(result), flush=True)


def run_self(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter and return its last line as JSON."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines()[:-1]:
        print("   ", line)
    return json.loads(out.splitlines()[-1])


# -- deployments: what a mode starts, and its processes' roles and CPU -------------------


@dataclass
class Deployment:
    """A running system under test.

    ``roles`` maps a role (``server``; ``supervisor``, ``gateway``, ``shard``, ``redis``) to the pids
    whose CPU is charged to it; ``ledgers`` are the SQLite files that hold its deposits.
    """

    url: str
    roles: dict[str, list[int]]
    ledgers: list[str]
    stop: Callable[[], int]
    log: Callable[[], str] = field(default=lambda: "")


def start_embedded(workdir: str, serve_args: tuple[str, ...]) -> Deployment:
    """Today's ``balancesim serve``: one process, one ledger file."""
    db = os.path.join(workdir, "embedded.db")
    server = ServerProcess(db, *serve_args).start()
    assert server.process is not None
    return Deployment(url=server.url, roles={"server": [server.process.pid]}, ledgers=[db],
                      stop=server.stop, log=server.log)


def process_tree(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (``task/*/children`` of each of its threads)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(child) for child in children.read().split()]
            except FileNotFoundError:
                continue
            found += kids
            frontier += kids
    return found


def is_balancesim_cli(arg: str) -> bool:
    """Whether a command-line argument is the module of ``python -m balancesim.cli``."""
    return arg == "balancesim.cli"


def role_of(pid: int, program: Callable[[str], bool] = is_balancesim_cli) -> str | None:
    """``gateway``, ``shard`` or ``redis`` from a child's name and command line; ``None`` for anything else.

    ``program`` spots the argument after which the role's word comes (``-m balancesim.cli
    shard …``; for the bare cluster, ``…/bare_cluster.py shard …``).
    """
    try:
        # redis-server rewrites its argv into a title ("/usr/bin/redis-server unixsocket:/…"); comm stays.
        with open(f"/proc/{pid}/comm") as comm:
            if comm.read().strip() == "redis-server":
                return "redis"
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
    except FileNotFoundError:
        return None
    for at, arg in enumerate(argv[:-1]):
        if program(arg) and argv[at + 1] in ("gateway", "shard"):
            return argv[at + 1]
    return None


def roles_below(parent: int, expected: dict[str, int], program: Callable[[str], bool] = is_balancesim_cli,
                what: str = "") -> dict[str, list[int]]:
    """The pids of each role in ``parent``'s process tree, the parent as ``supervisor``;
    ``RuntimeError`` unless every role of ``expected`` has exactly that many."""
    roles: dict[str, list[int]] = {"supervisor": [parent], **{role: [] for role in expected}}
    for pid in process_tree(parent):
        if (role := role_of(pid, program)) is not None:
            roles[role].append(pid)
    if {role: len(roles[role]) for role in expected} != expected:
        raise RuntimeError(f"{what}: expected {expected} below pid {parent}, found {roles}")
    return roles


def start_cluster(workdir: str, serve_args: tuple[str, ...]) -> Deployment:
    """``serve --workers 2 --shards 2``: the ``serve`` parent (the supervisor), two gateways on
    its shared socket, two shards and its private ``redis-server``, found in its process tree."""
    data_dir = os.path.join(workdir, "data")
    server = ServerProcess(None, "--workers", "2", "--shards", "2", *serve_args, data_dir=data_dir).start()
    try:
        roles = roles_below(server.pid, {"gateway": 2, "shard": 2, "redis": 1}, what="serve --workers 2 --shards 2")
    except BaseException:
        server.stop()
        raise
    return Deployment(url=server.url, roles=roles, ledgers=[os.path.join(data_dir, f"shard-{k}.db") for k in range(2)],
                      stop=server.stop, log=server.log)


async def create_users(url: str, count: int, *, max_clients: int = 32) -> tuple[str, list[dict]]:
    """The superadmin's token, and ``count`` new users, each logged in: ``{user_id, token}``.

    It configures the process's HTTP client (``max_clients``) before its first request:
    Tornado keeps one client per IOLoop, so that choice holds for the rest of the loop.
    """
    configure_http(max_clients=max_clients)
    boss = await Client.login(url, *SUPERADMIN)
    users: list[dict] = []
    for start in range(0, count, 32):
        names = [f"bench{i:05d}" for i in range(start, min(count, start + 32))]
        await asyncio.gather(*(boss.create_user(name, USER_PASSWORD) for name in names))
        clients = await asyncio.gather(*(Client.login(url, name, USER_PASSWORD) for name in names))
        users += [{"user_id": c.user_id, "token": c.token} for c in clients]
    assert boss.token is not None
    return boss.token, users


def verify_ledgers(ledgers: list[str]) -> list[str]:
    """``balancesim ledger verify`` on every file; the failures' reports."""
    failures = []
    for path in ledgers:
        done = subprocess.run([sys.executable, "-m", "balancesim.cli", "ledger", "verify", "--db", path],
                              capture_output=True, text=True)
        if done.returncode != 0:
            failures.append(f"{path}: exit {done.returncode}: {done.stdout}{done.stderr}".strip())
    return failures


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces; fields after its ')' are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def role_cpu_s(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far per role, each the sum over its processes."""
    return {role: sum(cpu_s(pid) for pid in pids) for role, pids in roles.items()}


def load() -> str:
    """The 1- and 5-minute load averages, for a report line: other work on the machine skews every figure."""
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"
