"""Tail latency, mutation → owner's ``balance_update``, at half of each mode's saturated rate.

Usage: ``python benchmarks/tail_latency.py [--users 200] [--seconds 30] [--saturate-seconds 5]
[--concurrency 64] [--fraction 0.5] [--slow-ms 50] [--stall-ms 10] [--modes embedded,cluster]``
(``redis-server`` for the cluster mode; pycurl, from the ``bench`` extra, keeps the HTTP
connections alive).

Issue 16's tail-latency benchmark. For each mode in turn, in the same run (the embedded
``serve``, then ``serve --workers 2 --shards 2``, both from ``benchmarks/_common.py``):

1. start the deployment with ``$BALANCESIM_COMMIT_LOG`` set, so every ledger writer appends
   a wall-clock line for each group commit that took ``--stall-ms`` or more (an fsync stall);
2. start the clients in a process of their own (a child of this driver, not of the server):
   it creates ``--users`` users through the demo superadmin, logs each in and opens one
   WebSocket session per user;
3. **saturated rate**: with the sessions open, a closed loop of ``--concurrency`` superadmin
   ``POST /api/admin/deposits`` in flight, over every user, for ``--warmup`` s then
   ``--saturate-seconds`` s; the rate is the 2xx answers of the timed part per second;
4. **open loop** at ``--fraction`` of that rate for ``--seconds`` s: Poisson arrivals from a
   fixed seed, each deposit sent without waiting for earlier answers, to a random user, with a
   unique ``description``. Its latency runs from the send to the owner's session receiving
   the ``balance_update`` with that description (its ``transaction_id`` is checked against
   the HTTP answer's). A deposit answered 2xx whose update has not come ``--drain`` s after
   the last send is *lost*; one that came after more than ``--late-ms`` is *late*. If more
   than a second's worth of sends was ever in flight at once, the run is flagged
   *overloaded*: the deployment fell behind (on a shared machine, its capacity drifts), and
   the figures are queueing. The closed loop runs once more afterwards, so the report shows
   the capacity on both sides of the open loop;
5. stop the deployment (SIGTERM, drain) and run ``ledger verify`` on its ledgers.

Then, per mode, the slow samples (over ``--slow-ms``, and over the p99) are laid beside
(a) the commits of the account's own ledger that took ``--stall-ms`` or more, (b) the client
process's own event-loop stalls of 20 ms or more (a late wake-up of a 5 ms sleep), and
counted by which of them overlap the sample's interval [send, receipt]. Each logged commit also
says how long its writer thread ran and waited for a CPU; the rest it was blocked, on the disk:
on a shared machine, a "slow commit" may be a descheduled writer, not an fsync. The CPU each role
used over the open loop (from ``/proc``; the client process too) says whether a process
was near one core, where latency becomes queueing.

The last line is JSON: ``{"embedded_rate", "embedded_p50_ms", "embedded_p99_ms",
"cluster_rate", "cluster_p50_ms", "cluster_p99_ms", …}``; ``*_rate`` is the open loop's
achieved send rate (deposits/s), and the other keys per mode are ``*_saturated_rate``,
``*_saturated_rate_after``, ``*_overloaded``, ``*_cpu_us_open`` and ``*_cpu_us_saturated`` (CPU µs
per deposit of the whole deployment, in each loop),
``*_p90_ms``, ``*_max_ms``, ``*_count``, ``*_lost``, ``*_late``, ``*_http_errors``,
``*_slow``, ``*_slow_on_fsync``, ``*_slow_on_disk_stall`` (beside such a commit that was mostly
blocked, not running or waiting for a CPU), ``*_slow_on_client_stall``, ``*_over_p99``,
``*_over_p99_on_fsync``, ``*_stalls`` (commits ≥ ``--stall-ms`` during the open loop),
``*_disk_stalls`` (those mostly blocked),
``*_stall_max_ms``, ``*_pong_p99_ms`` (ping → pong on ``--pingers`` sessions meanwhile: the
gateway's loop without the engine), ``*_slow_fsync_time_share`` (the share of the slow samples' time spent beside
such a commit), ``*_client_stalls``, ``*_run_delay_s_per_s`` (seconds per second the deployment's
threads sat runnable without a CPU: other work on the machine), ``*_wait_per_wakeup_ms``
(that wait per time one of its threads was put on a CPU: what each hop costs) and ``*_load`` (1-minute load
average at the end of the open loop).
Keys of a mode left out by ``--modes`` are absent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balancesim.actors._ledger import COMMIT_LOG_ENV, COMMIT_LOG_MS_ENV  # noqa: E402
from balancesim.client import ApiError, Client, Stream  # noqa: E402
from balancesim.cluster import split_transaction_id  # noqa: E402
from benchmarks._common import (SERVE_ARGS, Deployment, cpu_s, create_users, emit, load,  # noqa: E402
                                role_cpu_s, start_cluster, start_embedded, verify_ledgers)

MODES: dict[str, Callable[[str, tuple[str, ...]], Deployment]] = {
    "embedded": start_embedded,
    "cluster": start_cluster,
}
#: The last line's keys come first, in this order; the rest follow.
HEAD_KEYS = ("embedded_rate", "embedded_p50_ms", "embedded_p99_ms", "cluster_rate", "cluster_p50_ms", "cluster_p99_ms")
TAG = "tail-"  # the open loop's descriptions: TAG + its sequence number
CLIENT_STALL_MS = 20.0  # a client loop wake-up this late counts as a client stall
LAG_TICK_S = 0.005


# -- the client process ------------------------------------------------------------------


def mark(name: str) -> None:
    """Tell the driver a phase starts or ends, so it reads the processes' CPU right then."""
    print(f"MARK {name}", flush=True)


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Sent:
    """One open-loop deposit: to whom, when (wall, for other processes' logs; perf, to measure)."""

    user_id: int
    wall_s: float
    perf_s: float
    answer_s: float | None = None  # send → HTTP answer
    transaction_id: int | None = None  # from the 2xx answer
    error: str | None = None
    latency_s: float | None = None  # send → the owner's balance_update
    update_transaction_id: int | None = None


@dataclass
class LoopWatch:
    """The client's own event-loop stalls: a 5 ms sleep that woke ``CLIENT_STALL_MS`` late or more.

    A slow sample that overlaps one may be the client's doing, not the server's.
    """

    stalls: list[tuple[float, float]] = field(default_factory=list)  # (wall start s, ms)
    max_ms: float = 0.0
    running: bool = True

    async def run(self) -> None:
        while self.running:
            before = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            late_s = time.perf_counter() - before - LAG_TICK_S
            self.max_ms = max(self.max_ms, late_s * 1000)
            if late_s * 1000 >= CLIENT_STALL_MS:
                self.stalls.append((time.time() - late_s - LAG_TICK_S, late_s * 1000))


async def ping_loop(sessions: list, rtts_s: list[float], running: list[bool], every_s: float = 0.1) -> None:
    """Ping → pong on a few sessions while the open loop runs: the gateway's own responsiveness
    (no engine or ledger on that path), beside the deposits' latency, which has both."""

    async def one(session: Any) -> None:
        while running[0]:
            before = time.perf_counter()
            try:
                await session.barrier(timeout_s=30)
            except Exception:  # noqa: BLE001 - no pong (timeout, a socket closing): the longest wait, counted
                rtts_s.append(30.0)
                await asyncio.sleep(every_s)
                continue
            rtts_s.append(time.perf_counter() - before)
            await asyncio.sleep(every_s)

    await asyncio.gather(*(one(session) for session in sessions))


async def open_sessions(clients: list[Client], wave: int = 50) -> list:
    """One session per client, ``wave`` handshakes at a time (a burst of 200 costs the server a stall of its own)."""
    sessions = []
    for start in range(0, len(clients), wave):
        sessions += await asyncio.gather(*(c.session() for c in clients[start:start + wave]))
    return sessions


async def closed_loop(boss: Client, user_ids: list[int], *, concurrency: int, warmup_s: float,
                      seconds: float, label: str = "saturate") -> tuple[float, int]:
    """Saturate: ``concurrency`` deposits always in flight; (2xx/s over the timed part, errors).

    Marks ``<label>_start`` and ``<label>_end`` around the timed part.
    """
    begin = time.perf_counter()
    timed_from, until = begin + warmup_s, begin + warmup_s + seconds
    ok, errors = 0, 0

    async def marks() -> None:
        # On a timer, not in a worker: with every worker waiting on a slow answer, the
        # driver must still read the CPU when the timed part starts and ends.
        await asyncio.sleep(warmup_s)
        mark(f"{label}_start")
        await asyncio.sleep(max(0.0, until - time.perf_counter()))
        mark(f"{label}_end")

    async def worker(offset: int) -> None:
        nonlocal ok, errors
        n = offset
        while time.perf_counter() < until:
            n += concurrency
            try:
                await boss.deposit(user_ids[n % len(user_ids)], "1", description="saturate")
            except (ApiError, ConnectionError):
                errors += 1
                await asyncio.sleep(0.01)  # a refusing server: do not spin
                continue
            if timed_from <= time.perf_counter() < until:
                ok += 1

    await asyncio.gather(marks(), *(worker(k) for k in range(concurrency)))
    return ok / seconds, errors


async def open_loop(boss: Client, user_ids: list[int], sent: list[Sent], *, rate_per_s: float, seconds: float,
                    seed: int) -> dict[str, Any]:
    """Poisson sends at ``rate_per_s`` for ``seconds``, none waiting for another; schedule figures."""
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    in_flight, max_in_flight = 0, 0
    schedule_lag_s: list[float] = []

    async def send(index: int, user_id: int) -> None:
        nonlocal in_flight
        record = sent[index]
        try:
            answer = await boss.deposit(user_id, "1", description=f"{TAG}{index}")
            record.transaction_id = answer["transaction_id"]
        except Exception as error:  # noqa: BLE001 - a refusal or a broken connection: counted, not fatal
            record.error = f"{type(error).__name__}: {error}"[:200]
        finally:
            record.answer_s = time.perf_counter() - record.perf_s
            in_flight -= 1

    mark("open_start")
    begin = time.perf_counter()
    due = begin
    while True:
        due += rng.expovariate(rate_per_s)
        if due - begin > seconds:
            break
        if (wait_s := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait_s)
        now = time.perf_counter()
        schedule_lag_s.append(now - due)
        user_id = rng.choice(user_ids)
        sent.append(Sent(user_id, time.time(), now))
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        task = asyncio.ensure_future(send(len(sent) - 1, user_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    elapsed_s = time.perf_counter() - begin
    mark("open_end")
    schedule_lag_s.sort()
    return {"elapsed_s": elapsed_s, "max_in_flight": max_in_flight, "tasks": tasks,
            "schedule_lag_p99_ms": 1000 * percentile(schedule_lag_s, 99) if schedule_lag_s else 0.0,
            "schedule_lag_max_ms": 1000 * schedule_lag_s[-1] if schedule_lag_s else 0.0}


async def client_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything the client process does; its figures and raw samples for the driver."""
    url = cfg["url"]
    started = time.perf_counter()
    boss_token, users = await create_users(url, cfg["users"], max_clients=cfg["max_clients"])
    boss = Client(url, boss_token, role="superadmin")
    clients = [Client(url, u["token"], u["user_id"], "user") for u in users]
    sessions = await open_sessions(clients)
    say(f"  {len(users)} users created, logged in, each with a session, in {time.perf_counter() - started:.1f} s")
    user_ids = [u["user_id"] for u in users]
    sent: list[Sent] = []
    matched = 0
    all_matched = asyncio.Event()
    expected = [0]  # 2xx answers so far; set once the sends are over
    stray = 0

    def on_message(stream: Stream) -> Callable[[dict[str, Any], float], None]:
        def received(message: dict[str, Any], now: float) -> None:
            nonlocal matched, stray
            if message.get("type") != "balance_update" or not str(message.get("description", "")).startswith(TAG):
                return
            index = int(message["description"][len(TAG):])
            record = sent[index]
            if record.user_id != stream.user_id or record.latency_s is not None:
                stray += 1  # another account's, or a second delivery: the session's checks count it too
                return
            record.latency_s = now - record.perf_s
            record.update_transaction_id = message["transaction_id"]
            matched += 1
            if expected[0] and matched >= expected[0]:
                all_matched.set()
        return received

    for session in sessions:
        session.on_message = on_message(session)
    watch = LoopWatch()
    watcher = asyncio.ensure_future(watch.run())

    rate, saturate_errors = await closed_loop(boss, user_ids, concurrency=cfg["concurrency"], warmup_s=cfg["warmup_s"],
                                              seconds=cfg["saturate_s"])
    say(f"  saturated: {rate:,.0f} deposits/s (closed loop, {cfg['concurrency']} in flight, {cfg['saturate_s']:g} s "
        f"after {cfg['warmup_s']:g} s warm-up, {saturate_errors} errors)")
    await asyncio.sleep(cfg["settle_s"])  # let the saturation's backlog of updates and commits clear
    watch.stalls.clear()
    watch.max_ms = 0.0
    target = rate * cfg["fraction"]
    if target <= 0:
        raise SystemExit(f"the closed loop got no deposit through ({saturate_errors} errors): no rate to halve")
    say(f"  open loop at {target:,.0f}/s for {cfg['seconds']:g} s")
    cpu_before = time.process_time()
    pongs_s: list[float] = []
    pinging = [True]
    pinger = asyncio.ensure_future(ping_loop(sessions[:cfg["pingers"]], pongs_s, pinging))
    schedule = await open_loop(boss, user_ids, sent, rate_per_s=target, seconds=cfg["seconds"], seed=cfg["seed"])
    pinging[0] = False
    cpu_used_s = time.process_time() - cpu_before
    await pinger
    if schedule["tasks"]:
        await asyncio.wait(schedule["tasks"], timeout=cfg["drain_s"])
    expected[0] = sum(1 for s in sent if s.error is None and s.transaction_id is not None)
    if matched < expected[0]:
        try:
            await asyncio.wait_for(all_matched.wait(), cfg["drain_s"])
        except asyncio.TimeoutError:
            pass
    watch.running = False
    await watcher
    # Again, now: on a shared machine the capacity drifts, and an open loop that outran the
    # deployment measures queueing. The two rates bracket what the open loop had to work with.
    rate_after, _ = await closed_loop(boss, user_ids, concurrency=cfg["concurrency"], warmup_s=cfg["warmup_s"] / 2,
                                      seconds=cfg["saturate_s"], label="resaturate")
    say(f"  saturated again after the open loop: {rate_after:,.0f} deposits/s")
    problems = [p for session in sessions for p in session.problems]
    for session in sessions:
        await session.close()
    return {
        "saturated_rate": rate, "saturate_errors": saturate_errors, "target_rate": target,
        "saturated_rate_after": rate_after,
        "elapsed_s": schedule["elapsed_s"], "max_in_flight": schedule["max_in_flight"],
        "schedule_lag_p99_ms": schedule["schedule_lag_p99_ms"], "schedule_lag_max_ms": schedule["schedule_lag_max_ms"],
        "client_cpu_s": cpu_used_s, "stray": stray, "session_problems": problems[:20],
        "session_problem_count": len(problems), "reconnects": sum(s.reconnects for s in sessions),
        "loop_stalls": watch.stalls, "loop_max_ms": watch.max_ms, "pongs_ms": sorted(1000 * s for s in pongs_s),
        # One row per send: user, wall send time, answer s, 2xx transaction id, error, latency s, update's id.
        "samples": [[s.user_id, s.wall_s, s.answer_s, s.transaction_id, s.error, s.latency_s, s.update_transaction_id]
                    for s in sent],
    }


# -- the driver ----------------------------------------------------------------------------


@dataclass
class Stall:
    """One commit of ``--stall-ms`` or more, from a ledger writer's commit log."""

    start_s: float  # wall clock
    ms: float
    rows: int
    ledger: str
    cpu_ms: float  # the writer thread on a CPU meanwhile (-1: unknown)
    runq_ms: float  # the writer thread runnable but without a CPU (-1: unknown)

    @property
    def end_s(self) -> float:
        return self.start_s + self.ms / 1000

    @property
    def blocked_ms(self) -> float:
        """Neither running nor waiting to run: blocked, for a commit mostly on the disk (fsync)."""
        return self.ms - max(0.0, self.cpu_ms) - max(0.0, self.runq_ms)

    @property
    def on_disk(self) -> bool:
        """Whether most of it was blocked (the disk's doing) rather than waiting for a CPU or running."""
        return self.blocked_ms >= self.ms / 2


def read_stalls(path: str) -> list[Stall]:
    """The commit log's lines (``wall_start_s duration_ms rows ledger pid cpu_ms runq_ms``); none if no
    commit was slow."""
    try:
        with open(path) as log:
            rows = [line.split() for line in log if line.strip()]
    except FileNotFoundError:
        return []
    return [Stall(float(r[0]), float(r[1]), int(r[2]), r[3], float(r[5]), float(r[6])) for r in rows]


def ledger_of(mode: str, transaction_id: int | None) -> str | None:
    """The ledger file's base name that committed ``transaction_id``: a cluster id names its shard."""
    if transaction_id is None:
        return None
    if mode == "embedded":
        return "embedded.db"
    return f"shard-{split_transaction_id(transaction_id)[0]}.db"


def overlap_s(start_s: float, end_s: float, spans: list[tuple[float, float]]) -> float:
    """How long [start_s, end_s] shares with ``spans`` (which do not overlap one another: one writer per ledger)."""
    return sum(max(0.0, min(end_s, e) - max(start_s, s)) for s, e in spans)


def overlaps(start_s: float, end_s: float, spans: list[tuple[float, float]]) -> bool:
    return any(s < end_s and start_s < e for s, e in spans)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` % of the values at or below it."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n p / 100)
    return sorted_values[int(rank) - 1]


def run_delay(pid: int) -> tuple[float, int]:
    """Seconds ``pid``'s threads have spent runnable but waiting for a CPU, and how many times
    they were put on one (``/proc/PID/task/*/schedstat``, its second and third fields): on a
    shared machine, the time other people's work took from this process, and per wake-up."""
    total_ns, runs = 0, 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0, 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                fields = stat.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        total_ns, runs = total_ns + int(fields[1]), runs + int(fields[2])
    return total_ns / 1e9, runs


@dataclass
class Snapshot:
    """The CPU seconds and run-queue delay of every role and of the client process at one moment."""

    at_s: float
    cpu_s: dict[str, float]  # per role, and "client"
    delay_s: dict[str, float]  # the same, waiting for a CPU
    runs: dict[str, float]  # the same, times put on a CPU
    load: str


def snapshot(deployment: Deployment, client_pid: int) -> Snapshot:
    roles = {**deployment.roles, "client": [client_pid]}
    delays = {role: [run_delay(pid) for pid in pids] for role, pids in roles.items()}
    return Snapshot(time.monotonic(), {**role_cpu_s(deployment.roles), "client": cpu_s(client_pid)},
                    {role: sum(d for d, _ in pairs) for role, pairs in delays.items()},
                    {role: float(sum(n for _, n in pairs)) for role, pairs in delays.items()}, load())


def run_client(deployment: Deployment, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Snapshot]]:
    """Run the client process against ``deployment``; its result and the CPU snapshots at its marks."""
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps({**cfg, "url": deployment.url}))
    child.stdin.close()
    marks: dict[str, Snapshot] = {}
    last = ""
    for line in child.stdout:
        if line.startswith("MARK "):
            marks[line.split()[1]] = snapshot(deployment, child.pid)
        elif line.startswith("{"):
            last = line
        else:
            print(line, end="", flush=True)
    if child.wait() != 0 or not last:
        raise RuntimeError(f"the client process failed (exit {child.returncode}); see its stderr above")
    return json.loads(last), marks


def per_s(marks: dict[str, Snapshot], start: str, end: str, what: str) -> dict[str, float]:
    """Seconds per second each role (and ``client``) spent between two marks: on a CPU (``what`` =
    ``cpu_s``, i.e. cores used) or runnable but waiting for one (``delay_s``)."""
    a, b = getattr(marks[start], what), getattr(marks[end], what)
    wall_s = marks[end].at_s - marks[start].at_s
    return {role: (b[role] - a[role]) / wall_s for role in a}


def analyse(mode: str, result: dict[str, Any], stalls: list[Stall], args: argparse.Namespace) -> dict[str, Any]:
    """Percentiles, lost and late samples, and the slow samples beside fsync stalls and client stalls."""
    rows = result["samples"]
    first_wall_s = min((r[1] for r in rows), default=0.0)
    last_wall_s = max((r[1] for r in rows), default=0.0)
    answered = [r for r in rows if r[4] is None and r[3] is not None]
    delivered = [r for r in answered if r[5] is not None]
    latencies_ms = sorted(r[5] * 1000 for r in delivered)
    answers_ms = sorted(r[2] * 1000 for r in rows if r[2] is not None and r[4] is None)
    mismatched = sum(1 for r in delivered if r[6] != r[3])
    p99_ms = percentile(latencies_ms, 99)
    window = [s for s in stalls if first_wall_s - 1 <= s.start_s <= last_wall_s + args.drain]
    by_ledger: dict[str, list[tuple[float, float]]] = {}
    disk_by_ledger: dict[str, list[tuple[float, float]]] = {}
    for s in window:
        by_ledger.setdefault(s.ledger, []).append((s.start_s, s.end_s))
        if s.on_disk:
            disk_by_ledger.setdefault(s.ledger, []).append((s.start_s, s.end_s))
    client_spans = [(start, start + ms / 1000) for start, ms in result["loop_stalls"]]

    def attribute(threshold_ms: float) -> dict[str, Any]:
        slow = [r for r in delivered if r[5] * 1000 > threshold_ms]
        fsync = disk = client = neither = 0
        slow_s = stalled_s = 0.0
        for r in slow:
            span = (r[1], r[1] + r[5])
            ledger = ledger_of(mode, r[3]) or ""
            stalls_of_ledger = by_ledger.get(ledger, [])
            on_fsync = overlaps(*span, stalls_of_ledger)
            disk += overlaps(*span, disk_by_ledger.get(ledger, []))
            on_client = overlaps(*span, client_spans)
            fsync += on_fsync
            client += on_client
            neither += not (on_fsync or on_client)
            slow_s += r[5]
            stalled_s += overlap_s(*span, stalls_of_ledger)
        # A long sample overlaps some stall by chance: the share of its time spent beside one says more.
        return {"slow": len(slow), "on_fsync": fsync, "on_disk": disk, "on_client_stall": client, "neither": neither,
                "fsync_time_share": stalled_s / slow_s if slow_s else 0.0}

    slices: list[tuple[float, float]] = []
    width_s = (last_wall_s - first_wall_s) / 6 or 1.0
    for k in range(6):
        part = sorted(r[5] * 1000 for r in delivered
                      if min(5, int((r[1] - first_wall_s) / width_s)) == k)
        slices.append((percentile(part, 50), percentile(part, 99)))

    stall_ms = sorted(s.ms for s in window)
    total_ms = sum(stall_ms) or 1.0
    span_s = max(1e-9, last_wall_s - first_wall_s)
    return {
        "sent": len(rows), "answered": len(answered), "http_errors": len(rows) - len(answered),
        "error_sample": next((r[4] for r in rows if r[4] is not None), None),
        "count": len(latencies_ms), "lost": len(answered) - len(delivered), "mismatched": mismatched,
        "late": sum(1 for ms in latencies_ms if ms > args.late_ms),
        "p50_ms": percentile(latencies_ms, 50), "p90_ms": percentile(latencies_ms, 90), "p99_ms": p99_ms,
        "max_ms": latencies_ms[-1] if latencies_ms else float("nan"),
        "answer_p50_ms": percentile(answers_ms, 50), "answer_p99_ms": percentile(answers_ms, 99),
        "rate": len(rows) / result["elapsed_s"] if result["elapsed_s"] else 0.0,
        "over_slow": attribute(args.slow_ms), "over_p99": attribute(p99_ms),
        "stalls": len(window), "stall_max_ms": stall_ms[-1] if stall_ms else 0.0,
        "stall_p50_ms": percentile(stall_ms, 50) if stall_ms else 0.0,
        "stall_share": sum(stall_ms) / 1000 / span_s / max(1, len(by_ledger)),
        "stall_ledgers": sorted(by_ledger), "slices": slices, "disk_stalls": sum(s.on_disk for s in window),
        "stall_split": {"on a CPU": sum(max(0.0, s.cpu_ms) for s in window) / total_ms,
                        "waiting for a CPU": sum(max(0.0, s.runq_ms) for s in window) / total_ms,
                        "blocked (disk)": sum(s.blocked_ms for s in window) / total_ms},
    }


def deployment_sum(cores_by_role: dict[str, float]) -> float:
    """A per-role figure (cores, waits) summed over the deployment's roles, the client left out."""
    return sum(c for role, c in cores_by_role.items() if role != "client")


def run_mode(name: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Start ``name``'s deployment with the commit log on, run the clients, stop it, check its ledgers."""
    home = os.path.join(workdir, name)
    os.makedirs(home)
    commit_log = os.path.join(home, "commits.log")
    # The deployment's processes inherit these (the cluster's shards from its supervisor).
    os.environ[COMMIT_LOG_ENV], os.environ[COMMIT_LOG_MS_ENV] = commit_log, f"{args.stall_ms:g}"
    print(f"{name}: starting ({load()})", flush=True)
    deployment = MODES[name](home, (*SERVE_ARGS, "--time-scale", f"{args.time_scale:g}"))
    cfg = {"users": args.users, "concurrency": args.concurrency, "warmup_s": args.warmup,
           "saturate_s": args.saturate_seconds, "fraction": args.fraction, "seconds": args.seconds,
           "drain_s": args.drain, "settle_s": args.settle, "seed": args.seed, "max_clients": args.max_clients,
           "pingers": args.pingers}
    try:
        result, marks = run_client(deployment, cfg)
    finally:
        code = deployment.stop()
        del os.environ[COMMIT_LOG_ENV], os.environ[COMMIT_LOG_MS_ENV]
    problems = [f"ledger verify failed: {f}" for f in verify_ledgers(deployment.ledgers)]
    if code != 0:
        problems.append(f"the deployment exited {code} on SIGTERM")
    problems += [f"session: {p}" for p in result["session_problems"]]
    figures = analyse(name, result, read_stalls(commit_log), args)
    open_cores = per_s(marks, "open_start", "open_end", "cpu_s")
    saturate_cores = per_s(marks, "saturate_start", "saturate_end", "cpu_s")
    figures.update(name=name, result=result, problems=problems, open_cores=open_cores, saturate_cores=saturate_cores,
                   open_delay=per_s(marks, "open_start", "open_end", "delay_s"),
                   # Mean wait for a CPU per time a thread was put on one: what each hop of a
                   # request (a process or thread waking up) costs on this machine.
                   wait_per_run_ms={role: 1000 * d / n if n else 0.0 for (role, d), n in zip(
                       per_s(marks, "open_start", "open_end", "delay_s").items(),
                       per_s(marks, "open_start", "open_end", "runs").values())},
                   deployment_wait_per_run_ms=1000 * deployment_sum(per_s(marks, "open_start", "open_end", "delay_s"))
                   / max(1e-9, deployment_sum(per_s(marks, "open_start", "open_end", "runs"))),
                   load=(marks["open_start"].load, marks["open_end"].load),
                   load_1m=float(marks["open_end"].load.split()[1].split("/")[0]),
                   cpu_us_open=deployment_sum(open_cores) * 1e6 / max(1e-9, figures["rate"]),
                   cpu_us_saturated=deployment_sum(saturate_cores) * 1e6 / max(1e-9, result["saturated_rate"]),
                   # Little's law: more than a second's sends outstanding means a mean wait over a second.
                   overloaded=result["max_in_flight"] > result["target_rate"] * 1.0)
    return figures


def report(f: dict[str, Any], args: argparse.Namespace) -> None:
    r = f["result"]
    print(f"{f['name']}: open loop {f['sent']:,} deposits in {r['elapsed_s']:.1f} s = {f['rate']:,.0f}/s "
          f"(target {r['target_rate']:,.0f}/s = {args.fraction:g} × saturated {r['saturated_rate']:,.0f}/s; "
          f"{f['load'][0]} at its start, {f['load'][1]} at its end)")
    print(f"  deposit sent → owner's balance_update: p50 {f['p50_ms']:.1f} ms, p90 {f['p90_ms']:.1f} ms, "
          f"p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms over {f['count']:,} samples; "
          f"lost {f['lost']}, late (> {args.late_ms:g} ms) {f['late']}, HTTP errors {f['http_errors']}"
          + (f" (first: {f['error_sample']})" if f["error_sample"] else "")
          + (f", {f['mismatched']} with a transaction id other than the answer's" if f["mismatched"] else ""))
    if f["overloaded"]:
        print(f"  OVERLOADED: {r['max_in_flight']} deposits in flight at once, over a second's worth at "
              f"{r['target_rate']:,.0f}/s: the deployment fell behind the open loop (it saturated at "
              f"{r['saturated_rate']:,.0f}/s before and {r['saturated_rate_after']:,.0f}/s after), so these "
              f"figures are queueing, not the tail at half load")
    print(f"  deposit sent → its 201: p50 {f['answer_p50_ms']:.1f} ms, p99 {f['answer_p99_ms']:.1f} ms; "
          f"most in flight {r['max_in_flight']}, send schedule lag p99 {r['schedule_lag_p99_ms']:.1f} ms, "
          f"max {r['schedule_lag_max_ms']:.1f} ms")
    print(f"  commits ≥ {args.stall_ms:g} ms (fsync stalls) over the open loop: {f['stalls']} on "
          f"{', '.join(f['stall_ledgers']) or 'no ledger'}, p50 {f['stall_p50_ms']:.1f} ms, "
          f"max {f['stall_max_ms']:.1f} ms, "
          f"{f['stall_share']:.1%} of each ledger's time; of their time the writer thread was "
          + ", ".join(f"{what} {share:.0%}" for what, share in f["stall_split"].items())
          + f"; {f['disk_stalls']} were mostly blocked (disk)")
    for label, a in ((f"> {args.slow_ms:g} ms", f["over_slow"]), (f"> p99 ({f['p99_ms']:.1f} ms)", f["over_p99"])):
        print(f"  slow samples {label}: {a['slow']}; during a commit ≥ {args.stall_ms:g} ms of the account's ledger "
              f"{a['on_fsync']} (of which beside one mostly blocked on the disk: {a['on_disk']}), "
              f"during a client loop stall ≥ {CLIENT_STALL_MS:g} ms {a['on_client_stall']}, "
              f"during neither {a['neither']}; {a['fsync_time_share']:.0%} of their time was beside such a commit")
    pongs = r["pongs_ms"]
    print(f"  ping → pong on {args.pingers} sessions meanwhile (the gateway alone): "
          f"p50 {percentile(pongs, 50):.1f} ms, "
          f"p99 {percentile(pongs, 99):.1f} ms, max {max(pongs, default=float('nan')):.1f} ms over {len(pongs)}")
    print(f"  client loop: {len(r['loop_stalls'])} stalls ≥ {CLIENT_STALL_MS:g} ms, "
          f"the longest {r['loop_max_ms']:.1f} ms")
    print("  cores used over the open loop: " + ", ".join(f"{role} {c:.2f}" for role, c in f["open_cores"].items())
          + "; while saturated: " + ", ".join(f"{role} {c:.2f}" for role, c in f["saturate_cores"].items()))
    print(f"  CPU per deposit, all the deployment's processes: {f['cpu_us_open']:,.0f} µs in the open loop, "
          f"{f['cpu_us_saturated']:,.0f} µs saturated (below saturation, each loop wake-up and each group commit "
          f"serves fewer deposits)")
    print("  waiting for a CPU over the open loop (run-queue delay, s per s, all threads): "
          + ", ".join(f"{role} {d:.2f}" for role, d in f["open_delay"].items())
          + "; per wake-up, ms: " + ", ".join(f"{role} {w:.2f}" for role, w in f["wait_per_run_ms"].items()))
    print("  by sixth of the open loop, p50/p99 ms: "
          + "; ".join(f"{p50:.0f}/{p99:.0f}" for p50, p99 in f["slices"]))
    if r["reconnects"] or r["stray"]:
        print(f"  sessions: {r['reconnects']} reconnects, {r['stray']} stray or repeated updates")
    for problem in f["problems"]:
        print(f"  FAILED: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="users, each with one session")
    parser.add_argument("--seconds", type=float, default=30, help="the open loop's length")
    parser.add_argument("--saturate-seconds", type=float, default=5, help="the closed loop's timed part")
    parser.add_argument("--warmup", type=float, default=2, help="the closed loop's untimed start")
    parser.add_argument("--concurrency", type=int, default=64, help="deposits in flight in the closed loop")
    parser.add_argument("--fraction", type=float, default=0.5, help="the open loop's rate ÷ the saturated rate")
    parser.add_argument("--slow-ms", type=float, default=50, help="a slow sample, for the fsync count")
    parser.add_argument("--stall-ms", type=float, default=10, help="a commit this long or longer is an fsync stall")
    parser.add_argument("--late-ms", type=float, default=1000, help="a delivered sample this slow is late")
    parser.add_argument("--drain", type=float, default=10, help="s after the last send before a sample is lost")
    parser.add_argument("--settle", type=float, default=2, help="s of rest between the closed and the open loop")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--pingers", type=int, default=10, help="sessions that ping every 0.1 s during the open loop")
    parser.add_argument("--max-clients", type=int, default=512,
                        help="HTTP connections the client may open: above the open loop's in-flight count, so "
                             "no send queues in the client")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="serve's --time-scale (deposits do not depend on it; a faster clock adds price ticks)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        emit(asyncio.run(client_main(json.loads(sys.stdin.read()))))
        return
    names = [n for n in args.modes.split(",") if n]
    if unknown := [n for n in names if n not in MODES]:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")

    out: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            f = run_mode(name, args, workdir)
            report(f, args)
            failed = failed or bool(f["problems"]) or f["lost"] > 0
            out.update({
                f"{name}_rate": round(f["rate"]), f"{name}_p50_ms": round(f["p50_ms"], 1),
                f"{name}_p99_ms": round(f["p99_ms"], 1), f"{name}_saturated_rate": round(f["result"]["saturated_rate"]),
                f"{name}_saturated_rate_after": round(f["result"]["saturated_rate_after"]),
                f"{name}_overloaded": f["overloaded"],
                f"{name}_cpu_us_open": round(f["cpu_us_open"]), f"{name}_cpu_us_saturated": round(f["cpu_us_saturated"]),
                f"{name}_p90_ms": round(f["p90_ms"], 1), f"{name}_max_ms": round(f["max_ms"], 1),
                f"{name}_count": f["count"], f"{name}_lost": f["lost"], f"{name}_late": f["late"],
                f"{name}_http_errors": f["http_errors"], f"{name}_slow": f["over_slow"]["slow"],
                f"{name}_slow_on_fsync": f["over_slow"]["on_fsync"],
                f"{name}_slow_on_client_stall": f["over_slow"]["on_client_stall"],
                f"{name}_slow_on_disk_stall": f["over_slow"]["on_disk"],
                f"{name}_over_p99": f["over_p99"]["slow"], f"{name}_over_p99_on_fsync": f["over_p99"]["on_fsync"],
                f"{name}_stalls": f["stalls"], f"{name}_disk_stalls": f["disk_stalls"],
                f"{name}_stall_max_ms": round(f["stall_max_ms"], 1),
                f"{name}_slow_fsync_time_share": round(f["over_slow"]["fsync_time_share"], 3),
                f"{name}_client_stalls": len(f["result"]["loop_stalls"]),
                f"{name}_pong_p99_ms": round(percentile(f["result"]["pongs_ms"], 99), 1),
                # Seconds per second the deployment's threads (all roles, summed) sat runnable without a CPU.
                f"{name}_run_delay_s_per_s": round(sum(d for role, d in f["open_delay"].items()
                                                       if role != "client"), 2),
                f"{name}_wait_per_wakeup_ms": round(f["deployment_wait_per_run_ms"], 2),
                f"{name}_load": f["load_1m"],
            })
    if "cluster_p99_ms" in out:
        verdicts = [f"p50 {out['cluster_p50_ms']} ms (target ≤ 15)", f"p99 {out['cluster_p99_ms']} ms (target ≤ 100)"]
        if "embedded_p99_ms" in out:
            verdicts.append(f"{'below' if out['cluster_p99_ms'] < out['embedded_p99_ms'] else 'NOT below'} the "
                            f"embedded p99 {out['embedded_p99_ms']} ms")
        print("targets for the cluster: " + "; ".join(verdicts))
    emit({**{key: out[key] for key in HEAD_KEYS if key in out}, **out})
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
