"""Saturated durable HTTP deposits, by mode: the embedded ``serve``, the cluster, its bare request path.

Usage: ``python benchmarks/cluster.py [--users 200] [--connections 64] [--seconds 15]
[--warmup 3] [--threads 1] [--time-scale 1] [--modes embedded,cluster,bare]`` (needs Debian's
``wrk``: ``apt-get install -y wrk``, and ``redis-server`` for the cluster and bare modes).

This is the measuring tool of issue 15's benchmark. Each *mode* (the ``MODES`` table) starts
a deployment as subprocesses and says which processes play which role; the one driver
below does the rest, the same way for every mode:

1. gets ``--users`` users the mode's way (``Mode.users``): for balancesim, creates them
   through the demo superadmin and logs each in (their tokens are collected: a later
   per-user load, and the cluster's token placement, need them); the bare mode fakes them;
2. runs ``wrk`` for ``--warmup`` s, then for ``--seconds`` s, with ``--connections``
   keep-alive connections posting ``POST /api/admin/deposits`` as the superadmin. A Lua
   script, written to a temporary file, builds each body (``{"user_id": <id>, "amount": "1",
   ...}``) cycling over the created users' ids, so the load spreads over many accounts. Its
   ``response`` hook counts 2xx and non-2xx answers, and its ``done`` hook prints one JSON
   line with them, wrk's socket errors and its latency percentiles;
3. with that many connections, wrk keeps the server saturated, so the rate is the 2xx
   answers of the timed run divided by its duration. A run with any non-2xx answer or socket
   error is flagged, and its count is the ``errors`` key;
4. charges each role the CPU (utime + stime from ``/proc/<pid>/stat``, every thread) its
   processes used over the timed run, divided by the 2xx deposits of that run; and measures
   wrk's own CPU (``RUSAGE_CHILDREN`` around it) as a share of the whole machine;
5. stops the deployment (SIGTERM, drain) and checks durability: the mode's check of its
   files passes (``Mode.verify``: ``balancesim ledger verify`` on every ledger file; for the
   bare mode SQLite's ``integrity_check``), and each run's deposit entries (told apart by
   their ``description``) are at least the 2xx answers wrk counted for it.

Three modes, run one after the other in the same invocation (``--modes`` picks some):
``embedded`` (today's ``balancesim serve``, the baseline), ``cluster`` (``serve --workers 2
--shards 2 --data-dir``, whose gateways, shards and ``redis-server`` are found in the
``serve`` parent's process tree and charged as roles ``gateway``, ``shard`` and ``redis``,
each the sum over its processes; the parent itself is reported as ``supervisor``), and
``bare``, the yardstick: ``benchmarks/bare_cluster.py``, the cluster's request path with
nothing of balancesim on it (no auth, actors, HMAC or fan-out; a Tornado POST, a coalesced
``XADD``, a batched ``XREADGROUP`` and one SQLite commit per batch in the shard, a reply
through the gateway's own stream) on the same shape (two gateways on one shared socket, two
shards, a private ``redis-server`` on a Unix socket) and charged by the same roles. It
measures, in the same run and on the same machine, the floor issue 15 only quoted: if the
bare path alone costs more than 1.7 × the embedded server's CPU per deposit, no work on
balancesim's own layers can meet that target here.

The last line is JSON: ``{"embedded_deposits_per_s", "cluster_deposits_per_s", "ratio",
"embedded_cpu_us", "gateway_cpu_us", "shard_cpu_us", "redis_cpu_us", "embedded_p50_ms",
"embedded_p99_ms", "cluster_p50_ms", "cluster_p99_ms", "bare_deposits_per_s",
"bare_gateway_cpu_us", "bare_shard_cpu_us", "bare_redis_cpu_us", "bare_cpu_us", "bare_p50_ms",
"bare_p99_ms", "cluster_cpu_vs_embedded", "bare_cpu_vs_embedded", "wrk_cpu_share", "errors"}``,
keys of a mode that did not run (``--modes``) left out. CPU is in µs per deposit, each mode's
from its own saturated run; ``bare_cpu_us`` is the bare roles' sum; ``ratio`` is cluster ÷
embedded deposits/s; ``<mode>_cpu_vs_embedded`` is that mode's CPU per deposit summed over
its roles (supervisor left out) ÷ the embedded server's, present when embedded ran;
``wrk_cpu_share`` is the load generator's CPU over the timed runs as a fraction of all the
machine's cores. The default run (three modes) takes ≈ 1.5–2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (SERVE_ARGS, Deployment, create_users, emit, load, role_cpu_s,  # noqa: E402
                                roles_below, start_cluster, start_embedded, verify_ledgers)
from benchmarks.bare_cluster import BareCluster  # noqa: E402

WARMUP_DESCRIPTION = "bench warm-up"
TIMED_DESCRIPTION = "bench"


# -- deployments: what a mode starts (embedded and cluster: benchmarks/_common.py) -------


def start_bare(workdir: str, serve_args: tuple[str, ...]) -> Deployment:
    """``benchmarks/bare_cluster.py serve``: the request path alone (no auth, actors, HMAC
    or fan-out) on two gateways, two shards and a private ``redis-server``. ``serve_args``
    are ``balancesim serve``'s and mean nothing to it."""
    bare = BareCluster(os.path.join(workdir, "bare"), gateways=2, shards=2).start()
    try:
        roles = roles_below(bare.pid, {"gateway": 2, "shard": 2, "redis": 1},
                            program=lambda arg: os.path.basename(arg) == "bare_cluster.py",
                            what="bare_cluster.py serve")
    except BaseException:
        bare.stop()
        raise
    return Deployment(url=bare.url, roles=roles, ledgers=bare.ledgers, stop=bare.stop, log=bare.log)


# -- what a mode needs besides a deployment: users, a ledger check -------------------------------


async def fake_users(url: str, count: int) -> tuple[str, list[dict]]:
    """For the bare cluster, which checks no token and knows no accounts: ids 1..``count``
    (spread over its shards by ``id % shards``, as balancesim's ids are by residue class) and
    one token that nothing reads."""
    return "bare", [{"user_id": i, "token": "bare"} for i in range(1, count + 1)]


def verify_bare(ledgers: list[str]) -> list[str]:
    """The bare shards' files hold no ledger to verify: SQLite's own ``integrity_check`` on
    each (the row count against the 2xx answers is the driver's common check)."""
    failures = []
    for path in ledgers:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if (verdict := db.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
                failures.append(f"{path}: integrity_check: {verdict}")
        finally:
            db.close()
    return failures


@dataclass
class Mode:
    """How to start one deployment, get it users, check its files, and the JSON keys its figures go to.

    ``cpu_keys`` maps a role to the key of its µs per deposit; ``summed_key``, when set, is
    the key of those roles' sum. The ``baseline`` mode (the embedded server) is the one every
    other mode's summed CPU per deposit is divided by, as ``<mode>_cpu_vs_<baseline>``.
    """

    start: Callable[[str, tuple[str, ...]], Deployment]  # (its directory, serve's options)
    cpu_keys: dict[str, str]
    users: Callable[[str, int], Awaitable[tuple[str, list[dict]]]] = create_users  # (url, count)
    verify: Callable[[list[str]], list[str]] = verify_ledgers  # the files' failures
    verify_name: str = "ledger verify"  # what ``verify`` is called in the report
    summed_key: str | None = None
    baseline: bool = False


MODES: dict[str, Mode] = {
    "embedded": Mode(start_embedded, {"server": "embedded_cpu_us"}, baseline=True),
    # The supervisor (the serve parent) is measured and reported, but is no role of the
    # issue's line: it only watches its children and beats.
    "cluster": Mode(start_cluster, {"gateway": "gateway_cpu_us", "shard": "shard_cpu_us", "redis": "redis_cpu_us"}),
    # The yardstick: what the cluster's request path costs with nothing of balancesim on it,
    # measured in the same run instead of quoted from issue 15's prototype.
    "bare": Mode(start_bare, {"gateway": "bare_gateway_cpu_us", "shard": "bare_shard_cpu_us",
                              "redis": "bare_redis_cpu_us"},
                 users=fake_users, verify=verify_bare, verify_name="integrity_check", summed_key="bare_cpu_us"),
}


#: The last line's keys come first in this order; the others (latencies, wrk, errors) follow.
HEAD_KEYS = ("embedded_deposits_per_s", "cluster_deposits_per_s", "ratio", "embedded_cpu_us", "gateway_cpu_us",
             "shard_cpu_us", "redis_cpu_us")


# -- CPU accounting ----------------------------------------------------------------------


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the load: wrk and its Lua script -----------------------------------------------------

LUA = r"""-- Written by benchmarks/cluster.py: durable deposits by the superadmin over many accounts.
local ids = {%(ids)s}
local token = "%(token)s"
local description = "%(description)s"
local threads = {}

function setup(thread)
  thread:set("offset", #threads)
  table.insert(threads, thread)
end

function init(args)
  -- each thread starts its cycle over the ids at a different place
  n = offset * math.floor(#ids / (#threads > 0 and #threads or 1) + 1)
  ok, non2xx, bad_status = 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  n = n + 1
  local id = ids[(n %% #ids) + 1]
  return wrk.format(nil, nil, nil,
    '{"user_id": ' .. id .. ', "amount": "1", "description": "' .. description .. '"}')
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    non2xx = non2xx + 1
    bad_status = status
  end
end

function done(summary, latency, requests)
  local total_ok, total_bad, last_bad = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok")
    total_bad = total_bad + thread:get("non2xx")
    if thread:get("bad_status") ~= 0 then last_bad = thread:get("bad_status") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %%.0f, "duration_us": %%.0f, "ok": %%.0f, "non2xx": %%.0f, ' ..
    '"last_bad_status": %%.0f, "connect": %%.0f, "read": %%.0f, "write": %%.0f, "timeout": %%.0f, ' ..
    '"p50_us": %%.0f, "p90_us": %%.0f, "p99_us": %%.0f, "max_us": %%.0f, "mean_us": %%.1f}\n',
    summary.requests, summary.duration, total_ok, total_bad, last_bad,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def write_lua(path: str, ids: list[int], token: str, description: str) -> None:
    with open(path, "w") as script:
        script.write(LUA % {"ids": ", ".join(map(str, ids)), "token": token, "description": description})


@dataclass
class WrkRun:
    """One wrk run: its Lua ``done`` line, its wall time and its own CPU."""

    result: dict
    wall_s: float
    cpu_s: float
    summary: list[str]

    @property
    def seconds(self) -> float:
        return self.result["duration_us"] / 1e6

    @property
    def errors(self) -> int:
        r = self.result
        return r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]


def run_wrk(url: str, script: str, *, seconds: float, connections: int, threads: int) -> WrkRun:
    """Run wrk; its result. Nothing else may be reaped meanwhile (its CPU is RUSAGE_CHILDREN's rise)."""
    before_cpu, started = children_cpu_s(), time.monotonic()
    completed = subprocess.run(
        ["wrk", f"--threads={threads}", f"--connections={connections}", f"--duration={seconds:g}s",
         "--timeout=30s", f"--script={script}", f"{url}/api/admin/deposits"],
        capture_output=True, text=True)
    wall, spent = time.monotonic() - started, children_cpu_s() - before_cpu
    lines = completed.stdout.splitlines()
    found = [line for line in lines if line.startswith("WRK_RESULT ")]
    if completed.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed (exit {completed.returncode}): {completed.stdout}{completed.stderr}")
    summary = [line for line in lines if not line.startswith("WRK_RESULT ")]
    return WrkRun(json.loads(found[-1].split(" ", 1)[1]), wall, spent, summary)


# -- the driver -----------------------------------------------------------------------------


def deposit_entries(ledgers: list[str], description: str) -> int:
    """Deposit entries with ``description`` across the ledger files (read only)."""
    total = 0
    for path in ledgers:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            total += db.execute("SELECT count(*) FROM transactions WHERE type = 'deposit' AND description = ?",
                                (description,)).fetchone()[0]
    return total


def run_mode(name: str, mode: Mode, args: argparse.Namespace, workdir: str) -> dict:
    """Start ``mode``, saturate it with deposits, stop it, check the ledgers; its figures."""
    home = os.path.join(workdir, name)
    os.makedirs(home)
    deployment = mode.start(home, (*SERVE_ARGS, "--time-scale", f"{args.time_scale:g}"))
    try:
        token, users = asyncio.run(mode.users(deployment.url, args.users))
        ids = [u["user_id"] for u in users]
        warm_script, timed_script = os.path.join(home, "warm-up.lua"), os.path.join(home, "timed.lua")
        write_lua(warm_script, ids, token, WARMUP_DESCRIPTION)
        write_lua(timed_script, ids, token, TIMED_DESCRIPTION)
        print(f"{name}: {len(users)} users ready; warm-up {args.warmup:g} s", flush=True)
        warm = run_wrk(deployment.url, warm_script, seconds=args.warmup, connections=args.connections,
                       threads=args.threads)
        load_before = load()
        before = role_cpu_s(deployment.roles)
        timed = run_wrk(deployment.url, timed_script, seconds=args.seconds, connections=args.connections,
                        threads=args.threads)
        after = role_cpu_s(deployment.roles)
        load_after = load()
    finally:
        code = deployment.stop()
    failures = mode.verify(deployment.ledgers)
    problems = [f"{mode.verify_name} failed: {f}" for f in failures]
    if code != 0:
        problems.append(f"the deployment exited {code} on SIGTERM")
    for run, description in ((warm, WARMUP_DESCRIPTION), (timed, TIMED_DESCRIPTION)):
        entries = deposit_entries(deployment.ledgers, description)
        if entries < run.result["ok"]:
            problems.append(f"only {entries} '{description}' deposit entries for {run.result['ok']} 2xx answers")
    ok = timed.result["ok"]
    cpu_us = {role: (after[role] - before[role]) / ok * 1e6 if ok else float("nan") for role in deployment.roles}
    return {
        "name": name, "mode": mode, "timed": timed, "warm": warm, "cpu_us": cpu_us,
        "cores": {role: (after[role] - before[role]) / timed.seconds for role in deployment.roles},
        "rate": ok / timed.seconds, "problems": problems, "verify_name": mode.verify_name, "load": (load_before, load_after),
        "entries": deposit_entries(deployment.ledgers, TIMED_DESCRIPTION),
    }


def report(figures: dict, args: argparse.Namespace) -> None:
    timed, r = figures["timed"], figures["timed"].result
    name = figures["name"]
    print(f"{name}: wrk, {args.connections} connections, {args.threads} thread(s), {timed.seconds:.1f} s "
          f"({figures['load'][0]} before, {figures['load'][1]} after):")
    for line in timed.summary:
        if line.strip():
            print("   ", line)
    print(f"  {r['ok']:,} durable deposits in {timed.seconds:.1f} s = {figures['rate']:,.0f}/s; latency "
          f"p50 {r['p50_us'] / 1000:.1f} ms, p90 {r['p90_us'] / 1000:.1f} ms, p99 {r['p99_us'] / 1000:.1f} ms, "
          f"max {r['max_us'] / 1000:.1f} ms")
    for role, us in figures["cpu_us"].items():
        print(f"  {role}: {us:,.0f} µs of CPU per deposit ({figures['cores'][role]:.2f} of a core)")
    cores = os.cpu_count() or 1
    print(f"  wrk: {timed.cpu_s:.2f} s of CPU in {timed.wall_s:.1f} s = {timed.cpu_s / timed.wall_s:.2f} of a core, "
          f"{timed.cpu_s / timed.wall_s / cores:.1%} of the machine's {cores} cores")
    checked = figures["verify_name"]
    print(f"  durability: {figures['entries']:,} deposit entries for {r['ok']:,} 2xx answers; {checked} "
          f"{'FAILED' if any(p.startswith(checked) for p in figures['problems']) else 'OK'}")
    if timed.errors or figures["warm"].errors:
        print(f"  FLAGGED: {timed.errors} errors in the timed run ({r['non2xx']} non-2xx, last status "
              f"{r['last_bad_status']}; socket: connect {r['connect']}, read {r['read']}, write {r['write']}, "
              f"timeout {r['timeout']}), {figures['warm'].errors} in the warm-up")
    for problem in figures["problems"]:
        print(f"  FAILED: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1 keeps its CPU low)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="serve's --time-scale. Deposits do not depend on it, but the price feed ticks "
                             "1/time-scale times per simulated second: at 0.01, 100 ticks/s cross Redis to every "
                             "shard and gateway, ≈ 0.3 of a core in the cluster (0.035 embedded) before any deposit")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmarks/cluster.py: wrk not found: install Debian's wrk (apt-get install -y wrk)", file=sys.stderr)
        sys.exit(2)
    names = [n for n in args.modes.split(",") if n]
    if unknown := [n for n in names if n not in MODES]:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")

    result: dict = {}
    per_deposit: dict[str, float] = {}  # µs per deposit, over the roles of each mode's cpu_keys
    errors, wrk_cpu, wrk_wall, failed = 0, 0.0, 0.0, False
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            figures = run_mode(name, MODES[name], args, workdir)
            report(figures, args)
            timed = figures["timed"]
            result[f"{name}_deposits_per_s"] = round(figures["rate"])
            for role, key in MODES[name].cpu_keys.items():
                result[key] = round(figures["cpu_us"][role])
            # The supervisor is left out of the sum, as out of the keys: it only watches.
            per_deposit[name] = sum(figures["cpu_us"][role] for role in MODES[name].cpu_keys)
            if (key := MODES[name].summed_key) is not None:
                result[key] = round(per_deposit[name])
            result[f"{name}_p50_ms"] = round(timed.result["p50_us"] / 1000, 1)
            result[f"{name}_p99_ms"] = round(timed.result["p99_us"] / 1000, 1)
            errors += timed.errors + figures["warm"].errors
            wrk_cpu, wrk_wall = wrk_cpu + timed.cpu_s, wrk_wall + timed.wall_s
            failed = failed or bool(figures["problems"])
    if "embedded_deposits_per_s" in result and "cluster_deposits_per_s" in result:
        result["ratio"] = round(result["cluster_deposits_per_s"] / result["embedded_deposits_per_s"], 2)
        summed = sum(result[key] for key in MODES["cluster"].cpu_keys.values())
        print(f"targets: cluster CPU per deposit summed over roles {summed:,} µs = "
              f"{summed / result['embedded_cpu_us']:.2f} × embedded's {result['embedded_cpu_us']:,} µs (target ≤ 1.7); "
              f"ratio {result['ratio']:.2f} (target ≥ 1.1)")
    if (baseline := next((n for n in names if MODES[n].baseline), None)) is not None:
        for name in names:
            if name != baseline:
                result[f"{name}_cpu_vs_{baseline}"] = round(per_deposit[name] / per_deposit[baseline], 2)
                print(f"{name}: {per_deposit[name]:,.0f} µs of CPU per deposit summed over roles = "
                      f"{per_deposit[name] / per_deposit[baseline]:.2f} × {baseline}'s {per_deposit[baseline]:,.0f} µs")
    if "cluster" in per_deposit and "bare" in per_deposit:
        # What the yardstick is for: how much of the cluster's cost the bare path already is.
        cluster, bare = per_deposit["cluster"], per_deposit["bare"]
        line = (f"cluster over its bare request path: {cluster / bare:.2f} × the CPU per deposit "
                f"({cluster - bare:,.0f} µs for auth, actors, HMAC and fan-out)")
        if "embedded" in per_deposit:
            line += (f"; the bare path alone is {bare / per_deposit['embedded']:.2f} × embedded's, "
                     f"{'within' if bare <= 1.7 * per_deposit['embedded'] else 'already past'} the 1.7 × target")
        print(line)
    result["wrk_cpu_share"] = round(wrk_cpu / wrk_wall / (os.cpu_count() or 1), 3)
    result["errors"] = errors
    emit({**{key: result[key] for key in HEAD_KEYS if key in result}, **result})
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
