"""``balancesim load``: many users over real HTTP and WebSocket, and a verdict on what arrived.

Each user logs in and holds its own session, then loops: pick an operation from
the mix, do it, think for a random moment. Deposits and control changes are made
for the user by a superadmin participant. Every HTTP call is timed, and so is
every mutation until its ``balance_update`` reaches the owner's session. The
report says what ran, how fast, and whether every session stayed in sync.

Example::

    report = asyncio.run(run_load(LoadOptions(users=50, duration_s=5)))
    print(report["throughput_ops_per_s"], report["verdict"]["ok"])
    write_report(report, "load.json")      # and load.html, the chart
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from hdrh.histogram import HdrHistogram

from balancesim.charts import render_chart
from balancesim.client import ApiError, Client, Session, configure_http, out_of_sync
from balancesim.operations import OPERATIONS, perform, transactions_of
from balancesim.reports import verify
from balancesim.serveproc import ServerProcess
from balancesim.vocabulary import SYMBOLS

__all__ = [
    "LoadOptions", "run_load", "render_chart", "render_text", "write_report", "summary", "DEFAULT_MIX",
    "REFUSALS", "parse_mix", "tally",
]

DEFAULT_MIX = {"option": 5, "spot": 3, "deposit": 2, "control": 1}
PERCENTILES = (50, 90, 99, 99.9)
# Business refusals: what PROTOCOL.md promises for a valid request the account's state does not
# allow (selling BTC it has not bought). They are counted apart from errors: a 5xx, a timeout,
# an unreachable server or any other refusal means something is wrong.
REFUSALS = frozenset({"insufficient_funds", "conflict"})
# The change types of the mutations load makes itself, so the ones it waits to see delivered.
TIMED = frozenset({"deposit", "spot_buy", "spot_sell", "option_stake"})
# Throwaway users: a cheap scrypt cost lets 1,000 of them log in within seconds.
EMBEDDED_ARGS = ("--demo", "--time-scale", "0.05", "--password-cost", "1024", "--log-level", "warning")
SETUP_CONCURRENCY = 32
CHART_POINTS = 300


def parse_mix(text: str) -> dict[str, int]:
    """``option=5,spot=3`` → weights; unknown names or non-positive weights raise ``ValueError``."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in DEFAULT_MIX or not weight.strip().isdigit() or int(weight) <= 0:
            raise ValueError(f"{part!r}: use names from {', '.join(DEFAULT_MIX)} with positive weights")
        mix[name.strip()] = int(weight)
    return mix


@dataclass
class LoadOptions:
    """What to run.

    Attributes:
        users: how many users, each logged in with its own session.
        duration_s: seconds of load after setup.
        url: a running server; ``None`` starts an embedded one (a subprocess).
        admin_user: the superadmin participant that creates users, deposits and sets modes.
        admin_password: its password.
        mix: operation → weight (see ``DEFAULT_MIX``).
        think_s: mean seconds between one user's operations.
        db: the server's ledger file, to run ``ledger verify`` on (embedded: set for you).
        data_dir: or a cluster's data directory, to run it on every shard file.
        progress: called about once a second with the elapsed seconds and ``{ok, refused, errors}``.
    """

    users: int
    duration_s: float
    url: str | None = None
    admin_user: str = "superadmin"
    admin_password: str = "superadmin123"
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    think_s: float = 1.0
    db: str | None = None
    progress: Callable[[float, dict[str, int]], None] | None = None
    data_dir: str | None = None


class Latency:
    """An HDR histogram in microseconds, plus one per time bucket for the chart."""

    def __init__(self, bucket_s: float) -> None:
        self.bucket_s = bucket_s
        self.hist = _histogram()
        self.series: dict[int, HdrHistogram] = {}

    def record(self, seconds: float, at_s: float) -> None:
        micros = max(1, int(seconds * 1e6))
        self.hist.record_value(micros)
        bucket = int(at_s / self.bucket_s)
        if bucket not in self.series:
            self.series[bucket] = _histogram()
        self.series[bucket].record_value(micros)

    def summary(self) -> dict[str, float]:
        """count, p50/p90/p99/p99.9 and max, in milliseconds."""
        if self.hist.get_total_count() == 0:
            return {"count": 0}
        out: dict[str, float] = {"count": self.hist.get_total_count()}
        for p in PERCENTILES:
            out[f"p{p:g}_ms"] = round(self.hist.get_value_at_percentile(p) / 1000, 2)
        out["max_ms"] = round(self.hist.get_max_value() / 1000, 2)
        return out

    def over_time(self) -> list[dict[str, float]]:
        """Per bucket: its start ``t`` (s), count, p50 and p99 (ms)."""
        return [{"t": round(b * self.bucket_s, 2), "count": h.get_total_count(),
                 "p50_ms": h.get_value_at_percentile(50) / 1000, "p99_ms": h.get_value_at_percentile(99) / 1000}
                for b, h in sorted(self.series.items())]

    def distribution(self) -> list[list[float]]:
        """``[percentile, ms]`` pairs along the whole distribution, denser in the tail."""
        if self.hist.get_total_count() == 0:
            return []
        return [[round(step.percentile_level_iterated_to, 5), step.value_iterated_to / 1000]
                for step in self.hist.get_percentile_iterator(5)]


def _histogram() -> HdrHistogram:
    # 1 µs to 2 minutes at 3 significant digits.
    return HdrHistogram(1, 120_000_000, 3)


class Crowd:
    """Setup: the superadmin participant and the users, each logged in with its session."""

    def __init__(self, options: LoadOptions) -> None:
        self.o = options
        self.boss: Client | None = None
        self.users: list[Client] = []
        self.sessions: dict[int, Session] = {}

    async def gather(self, url: str, on_message: Callable[[dict[str, Any], float], None]) -> None:
        """Create, fund, log in and connect every user, a few at a time (the server hashes passwords)."""
        self.boss = await Client.login(url, self.o.admin_user, self.o.admin_password)
        tag = secrets.token_hex(3)
        password = secrets.token_urlsafe(12)
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                name = f"load-{tag}-{i}"
                made = await self.boss.create_user(name, password)
                await self.boss.deposit(made["user_id"], "100000", description="load starting balance")
                client = await Client.login(url, name, password)
                session = await client.session()
                session.on_message = on_message
                self.sessions[client.user_id] = session
                self.users.append(client)

        await asyncio.gather(*(one(i) for i in range(self.o.users)))

    async def judge(self) -> dict[str, Any]:
        """Every session: versions without gap or duplicate, its own events only, showing what is stored."""
        problems: list[str] = []
        boss = self.boss
        assert boss is not None

        async def check(user: Client) -> None:
            session = self.sessions[user.user_id]
            problems.extend(f"user {user.user_id}: {p}" for p in session.problems)
            problem = await out_of_sync(session, lambda: boss.balance(user.user_id), session.barrier)
            if problem:
                problems.append(f"user {user.user_id}: {problem}")

        await asyncio.gather(*(check(user) for user in self.users))
        return {
            "ok": not problems, "problems": problems[:50], "sessions": len(self.sessions),
            "messages": sum(len(s.messages) for s in self.sessions.values()),
            "reconnects": sum(s.reconnects for s in self.sessions.values()),
        }

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()


class Chooser:
    """Choice: the next operation of a user, drawn from the mix, as ``(name, args)``
    for ``balancesim.operations.perform``."""

    def __init__(self, mix: dict[str, int], seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.kinds, self.weights = zip(*mix.items())

    def next(self, user_id: int) -> tuple[str, dict[str, Any]]:
        r = self.rng
        kind = r.choices(self.kinds, self.weights)[0]
        if kind == "deposit":
            return kind, {"to": user_id, "amount": f"{r.randint(1, 500)}", "description": "load"}
        if kind == "control":
            return kind, {"to": user_id, "mode": r.choice(["normal", "normal", "win", "lose"])}
        symbol = r.choice(list(SYMBOLS))
        if kind == "option":
            return kind, {"symbol": symbol, "direction": r.choice(["up", "down"]),
                          "amount": f"{r.randint(1, 50)}", "duration": r.choice([30, 60])}
        return kind, {"symbol": symbol, "side": r.choice(["buy", "sell"]),
                      "quantity": r.choice(["0.0001", "0.001", "0.01"])}

    def think_s(self, mean_s: float) -> float:
        return self.rng.uniform(0.5, 1.5) * mean_s


class Deliveries:
    """Bookkeeping: ties each ``balance_update`` to the HTTP call that caused it, whichever
    arrives first, and records mutation → delivery latency."""

    def __init__(self, latency: Latency, epoch: Callable[[], float]) -> None:
        self.latency = latency
        self.epoch = epoch
        # Delivery keys (see ``delivery_key``) → perf_counter of the HTTP call's start,
        # or of the message's arrival when it beat the HTTP answer.
        self.sent: dict[str, float] = {}
        self.arrived: dict[str, float] = {}

    def on_message(self, message: dict[str, Any], at: float) -> None:
        if message.get("type") != "balance_update" or message["change_type"] not in TIMED:
            return
        key = delivery_key(message)
        started = self.sent.pop(key, None)
        if started is None:
            self.arrived[key] = at  # before the HTTP answer: ``answered`` records it
        else:
            self._record(started, at)

    def answered(self, body: dict[str, Any], started: float) -> None:
        for key in answer_keys(body):
            at = self.arrived.pop(key, None)
            if at is None:
                self.sent[key] = started  # not yet: ``on_message`` records it
            else:
                self._record(started, at)

    def _record(self, started: float, at: float) -> None:
        self.latency.record(at - started, at - self.epoch())


class Run:
    """One load run: the crowd gathers, every user loops over chosen operations, then the verdict."""

    def __init__(self, options: LoadOptions) -> None:
        self.o = options
        self.chooser = Chooser(options.mix)
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        bucket_s = max(1.0, math.ceil(options.duration_s / CHART_POINTS))
        self.http = Latency(bucket_s)
        self.deliveries = Deliveries(Latency(bucket_s), lambda: self.started)
        self.crowd = Crowd(options)
        self.started = 0.0
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def act(self, user: Client) -> None:
        boss = self.crowd.boss
        while not self.stop.is_set():
            name, args = self.chooser.next(user.user_id)
            started = time.perf_counter()
            try:
                body = await perform(boss if OPERATIONS[name].admin else user, name, args,
                                     timing=lambda s: self.http.record(s, time.perf_counter() - self.started))
                self.ops[name]["ok"] += 1
                self.deliveries.answered(body, started)
            except ApiError as error:
                self.ops[name][error.code] += 1
            except Exception as error:  # noqa: BLE001 - counted by kind: the run goes on
                self.ops[name][type(error).__name__] += 1
            try:
                await asyncio.wait_for(self.stop.wait(), self.chooser.think_s(self.o.think_s))
            except asyncio.TimeoutError:
                pass

    async def execute(self, url: str) -> dict[str, Any]:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.stop.set)
        begin = time.perf_counter()
        await self._unless_stopped(self.crowd.gather(url, self.deliveries.on_message))
        setup_s = time.perf_counter() - begin
        self.started = time.perf_counter()
        actors = [asyncio.ensure_future(self.act(user)) for user in self.crowd.users]
        while not self.stop.is_set() and self.now() < self.o.duration_s:
            try:
                await asyncio.wait_for(self.stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            if self.o.progress:
                self.o.progress(self.now(), self.totals())
        interrupted = self.stop.is_set()
        self.stop.set()
        await asyncio.gather(*actors)
        elapsed = self.now()
        verdict = await self.crowd.judge()
        await self.crowd.close()
        return self.report(elapsed, setup_s, interrupted, verdict)

    def report(self, elapsed: float, setup_s: float, interrupted: bool, verdict: dict[str, Any]) -> dict[str, Any]:
        """Judging's output as the JSON report (``render_text`` and the chart read it)."""
        totals = self.totals()
        delivery = self.deliveries.latency
        return {
            "users": self.o.users, "sessions": len(self.crowd.sessions), "duration_s": round(elapsed, 2),
            "setup_s": round(setup_s, 2), "interrupted": interrupted, "mix": self.o.mix,
            "operations": {kind: dict(counts) for kind, counts in self.ops.items()},
            "ok_ops": totals["ok"], "refused": totals["refused"], "errors": totals["errors"],
            "throughput_ops_per_s": round(totals["ok"] / max(elapsed, 1e-9), 1),
            "http_latency": self.http.summary(), "delivery_latency": delivery.summary(),
            "undelivered": len(self.deliveries.sent), "verdict": verdict,
            "series": {"bucket_s": self.http.bucket_s, "http": self.http.over_time(),
                       "delivery": delivery.over_time()},
            "distribution": {"http": self.http.distribution(), "delivery": delivery.distribution()},
        }

    async def _unless_stopped(self, work: Any) -> None:
        """Run ``work`` until done or Ctrl-C, whichever comes first (its errors propagate)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()

    def totals(self) -> dict[str, int]:
        return tally(self.ops.values())


def tally(outcomes: Iterable[dict[str, int]]) -> dict[str, int]:
    """``ok``, ``refused`` (business refusals, see ``REFUSALS``) and ``errors`` (the rest) of
    outcome counters such as ``{"ok": 12, "insufficient_funds": 3, "timeout": 1}``."""
    totals = {"ok": 0, "refused": 0, "errors": 0}
    for counts in outcomes:
        for outcome, n in counts.items():
            totals["ok" if outcome == "ok" else "refused" if outcome in REFUSALS else "errors"] += n
    return totals


def answer_keys(body: dict[str, Any]) -> list[str]:
    """The delivery keys of the ``balance_update``s an operation's answer causes."""
    if "trade" in body:
        return [f"trade:{body['trade']['trade_id']}"]
    return [tx["transaction_id"] for tx in transactions_of(body)]


def delivery_key(message: dict[str, Any]) -> str:
    """What ties a ``balance_update`` to the HTTP call that caused it."""
    # An option's answer is the trade, not its stake's transaction: the trade_id is shared.
    if message["change_type"] == "option_stake":
        return f"trade:{message['metadata']['trade_id']}"
    return message["transaction_id"]


async def run_load(options: LoadOptions) -> dict[str, Any]:
    """Run the load; without ``options.url`` against an embedded server subprocess.

    Raises:
        Unreachable: the server cannot be reached.
    """
    http_client = configure_http(max(64, min(options.users, 256)))
    if options.url:
        report = await Run(options).execute(options.url)
    else:
        with tempfile.TemporaryDirectory(prefix="balancesim-load-") as tmp:
            # A subprocess, so the server and the clients do not share one GIL.
            server = ServerProcess(os.path.join(tmp, "load.db"), *EMBEDDED_ARGS).start()
            options.db = server.db
            try:
                report = await Run(options).execute(server.url)
            finally:
                server.stop()
            report["server"] = server.url
            # Verified after the server drained, so every acknowledged mutation is in the file.
            _verify_ledger(report, server.db)
    if options.url:
        _verify_ledger(report, options.db, options.data_dir)
    report["http_client"] = http_client
    return report


def _verify_ledger(report: dict[str, Any], db: str | None, data_dir: str | None = None) -> None:
    verdict = report["verdict"]
    if data_dir is not None:
        from balancesim.cluster import verify_data_dir_as_one

        ledger = verify_data_dir_as_one(data_dir)
    elif db is None:
        verdict["ledger"] = "ledger not checked (give --db or --data-dir to verify the server's ledger)"
        return
    else:
        ledger = verify(db)
    verdict["ledger"] = ledger.text()
    verdict["ok"] = verdict["ok"] and ledger.ok


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its chart data, as printed."""
    return {k: v for k, v in report.items() if k not in ("series", "distribution")}


def render_text(report: dict[str, Any]) -> str:
    """The report as a person reads it: operations, throughput, latency percentiles, verdict."""
    verdict = report["verdict"]
    where = f", against {report['server']}" if report.get("server") else ""
    lines = [f"load: {report['users']} users for {report['duration_s']:g} s after {report['setup_s']:g} s of setup"
             f"{where}" + (" (interrupted)" if report["interrupted"] else ""), ""]
    lines.append(f"{'operation':<12}{'ok':>10}{'refused':>10}{'errors':>10}")
    for kind, counts in sorted(report["operations"].items()):
        row = tally([counts])
        detail = ", ".join(f"{code} × {n}" for code, n in sorted(counts.items()) if code != "ok")
        lines.append(f"{kind:<12}{row['ok']:>10}{row['refused']:>10}{row['errors']:>10}"
                     + (f"   {detail}" if detail else ""))
    lines.append(f"{'total':<12}{report['ok_ops']:>10}{report['refused']:>10}{report['errors']:>10}")
    lines += ["", f"throughput: {report['throughput_ops_per_s']:g} ok operations/s", ""]
    keys = [f"p{p:g}_ms" for p in PERCENTILES] + ["max_ms"]
    lines.append(f"{'latency (ms)':<24}" + "".join(f"{k.removesuffix('_ms'):>9}" for k in keys) + f"{'count':>9}")
    for name, label in (("http_latency", "HTTP"), ("delivery_latency", "mutation → delivery")):
        stats = report[name]
        lines.append(f"{label:<24}" + "".join(f"{stats.get(k, '–'):>9}" for k in keys) + f"{stats['count']:>9}")
    lines += ["", f"sessions {verdict['sessions']}, messages {verdict['messages']}, "
                  f"reconnects {verdict['reconnects']}, undelivered {report['undelivered']}"]
    lines.append(f"verdict: {'in sync' if verdict['ok'] else 'OUT OF SYNC'}")
    lines += [f"  - {problem}" for problem in verdict["problems"][:20]]
    if verdict.get("ledger"):
        lines.append(verdict["ledger"])
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str) -> str:
    """Write the JSON report to ``path`` and the chart beside it (``.html``); the chart's path."""
    with open(path, "w") as out:
        json.dump(report, out, indent=2)
    chart = os.path.splitext(path)[0] + ".html"
    with open(chart, "w") as out:
        out.write(render_chart(report))
    return chart
