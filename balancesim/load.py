"""``balancesim load``: many users over real HTTP and WebSocket, and a verdict on what arrived.

Each user logs in and holds its own session, then loops: pick an operation from
the mix, do it, think for a random moment. Deposits and control changes are made
for the user by a superadmin participant. Every HTTP call is timed, and so is
every mutation until its ``balance_update`` reaches the owner's session. The
report says what ran, how fast, and whether every session stayed in sync.
"""

from __future__ import annotations

import asyncio
import collections
import html
import json
import os
import random
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hdrh.histogram import HdrHistogram

from balancesim.client import ApiError, Client, Session, configure_http, out_of_sync
from balancesim.reports import verify
from balancesim.serveproc import ServerProcess

__all__ = ["LoadOptions", "run_load", "render_chart", "DEFAULT_MIX", "parse_mix"]

DEFAULT_MIX = {"option": 5, "spot": 3, "deposit": 2, "control": 1}
PERCENTILES = (50, 90, 99, 99.9)


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
    users: int
    duration_s: float
    url: str | None = None
    admin_user: str = "superadmin"
    admin_password: str = "superadmin123"
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    think_s: float = 1.0
    db: str | None = None
    progress: Callable[[float, dict[str, Any]], None] | None = None


class Latency:
    """An HDR histogram in microseconds, plus a per-second series for the chart."""

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, 120_000_000, 3)
        self.series: dict[int, HdrHistogram] = {}

    def record(self, seconds: float, at_s: float) -> None:
        micros = max(1, int(seconds * 1e6))
        self.hist.record_value(micros)
        self.series.setdefault(int(at_s), HdrHistogram(1, 120_000_000, 3)).record_value(micros)

    def summary(self) -> dict[str, float]:
        if self.hist.get_total_count() == 0:
            return {"count": 0}
        out: dict[str, float] = {"count": self.hist.get_total_count()}
        for p in PERCENTILES:
            out[f"p{p:g}_ms"] = round(self.hist.get_value_at_percentile(p) / 1000, 2)
        out["max_ms"] = round(self.hist.get_max_value() / 1000, 2)
        return out

    def per_second(self) -> list[dict[str, float]]:
        return [{"t": t, "count": h.get_total_count(), "p50_ms": h.get_value_at_percentile(50) / 1000,
                 "p99_ms": h.get_value_at_percentile(99) / 1000} for t, h in sorted(self.series.items())]


class Run:
    def __init__(self, options: LoadOptions) -> None:
        self.o = options
        self.rng = random.Random(1)
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.http = Latency()
        self.delivery = Latency()
        self.started = 0.0
        self.stop = asyncio.Event()
        self.users: list[Client] = []
        self.sessions: dict[int, Session] = {}
        self.sent: dict[int, float] = {}
        self.arrived: dict[int, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def setup(self, url: str) -> float:
        begin = time.perf_counter()
        self.boss = await Client.login(url, self.o.admin_user, self.o.admin_password)
        tag = secrets.token_hex(3)
        password = secrets.token_urlsafe(12)
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> Client:
            async with gate:
                name = f"load-{tag}-{i}"
                made = await self.boss.create_user(name, password)
                await self.boss.deposit(made["user_id"], "100000", description="load starting balance")
                client = await Client.login(url, name, password)
                session = await client.session()
                session.on_message = self.on_message
                self.sessions[client.user_id] = session
                return client

        self.users = list(await asyncio.gather(*(one(i) for i in range(self.o.users))))
        return time.perf_counter() - begin

    def on_message(self, message: dict[str, Any], at: float) -> None:
        if message.get("type") != "balance_update":
            return
        tx = message["transaction_id"]
        started = self.sent.pop(tx, None)
        if started is None:
            self.arrived[tx] = at
            if len(self.arrived) > 100_000:  # settlements nobody waits for: keep the memory bounded
                del self.arrived[next(iter(self.arrived))]
        else:
            self.delivery.record(at - started, at - self.started)

    def delivered(self, transactions: list[dict[str, Any]], started: float) -> None:
        for tx in transactions:
            at = self.arrived.pop(tx["transaction_id"], None)
            if at is None:
                self.sent[tx["transaction_id"]] = started
            else:
                self.delivery.record(at - started, at - self.started)

    async def act(self, user: Client) -> None:
        kinds, weights = zip(*self.o.mix.items())
        while not self.stop.is_set():
            kind = self.rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                txs = await self.operation(kind, user, lambda s: self.http.record(s, time.perf_counter() - self.started))
                self.ops[kind]["ok"] += 1
                self.delivered(txs, started)
            except ApiError as error:
                self.ops[kind][error.code] += 1
            except Exception as error:  # noqa: BLE001 - counted by kind: the run goes on
                self.ops[kind][type(error).__name__] += 1
            try:
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(0.5, 1.5) * self.o.think_s)
            except asyncio.TimeoutError:
                pass

    async def operation(self, kind: str, user: Client, timing: Callable[[float], None]) -> list[dict]:
        r = self.rng
        if kind == "deposit":
            body = {"user_id": user.user_id, "amount": f"{r.randint(1, 500)}", "description": "load"}
            return [(await self.boss.request("POST", "/api/admin/deposits", body, timing=timing))["transaction"]]
        if kind == "control":
            body = {"mode": r.choice(["normal", "normal", "win", "lose"])}
            await self.boss.request("PUT", f"/api/admin/controls/{user.user_id}", body, timing=timing)
            return []
        if kind == "option":
            body = {"symbol": r.choice(["BTCUSDT", "ETHUSDT"]), "direction": r.choice(["up", "down"]),
                    "amount": f"{r.randint(1, 50)}", "duration": r.choice([30, 60])}
            trade = (await user.request("POST", "/api/options", body, timing=timing))["trade"]
            return await self.stake_of(user, trade)
        body = {"symbol": r.choice(["BTCUSDT", "ETHUSDT"]), "side": r.choice(["buy", "sell"]),
                "quantity": r.choice(["0.0001", "0.001", "0.01"])}
        return (await user.request("POST", "/api/spot/orders", body, timing=timing))["order"]["transactions"]

    async def stake_of(self, user: Client, trade: dict[str, Any]) -> list[dict[str, Any]]:
        # A trade's reply carries no transaction; its stake is the owner's update with its trade_id.
        session = self.sessions[user.user_id]
        for message in reversed(session.messages[-20:]):
            if message.get("type") == "balance_update" and message.get("metadata", {}).get("trade_id") == trade["trade_id"]:
                return [message]
        return []

    async def judge(self, db: str | None) -> dict[str, Any]:
        problems: list[str] = []

        async def check(user: Client) -> None:
            session = self.sessions[user.user_id]
            problems.extend(f"user {user.user_id}: {p}" for p in session.problems)
            problem = await out_of_sync(session, lambda: self.boss.balance(user.user_id), session.barrier)
            if problem:
                problems.append(f"user {user.user_id}: {problem}")

        await asyncio.gather(*(check(user) for user in self.users))
        ledger = verify(db).text() if db else "ledger not checked (give --db)"
        if db and not ledger.startswith("ledger OK"):
            problems.append(ledger)
        return {
            "ok": not problems, "problems": problems[:50], "sessions": len(self.sessions),
            "messages": sum(len(s.messages) for s in self.sessions.values()),
            "reconnects": sum(s.reconnects for s in self.sessions.values()), "ledger": ledger,
        }

    async def execute(self, url: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        setup_s = await self.setup(url)
        self.started = time.perf_counter()
        actors = [asyncio.ensure_future(self.act(user)) for user in self.users]
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
        verdict = await self.judge(self.o.db)
        for session in self.sessions.values():
            await session.close()
        totals = self.totals()
        return {
            "users": self.o.users, "duration_s": round(elapsed, 2), "setup_s": round(setup_s, 2),
            "interrupted": interrupted, "mix": self.o.mix,
            "operations": {kind: dict(counts) for kind, counts in self.ops.items()},
            "ok_ops": totals["ok"], "errors": totals["errors"],
            "throughput_ops_per_s": round(totals["ok"] / max(elapsed, 1e-9), 1),
            "http_latency": self.http.summary(), "delivery_latency": self.delivery.summary(),
            "undelivered": len(self.sent), "verdict": verdict,
            "series": {"http": self.http.per_second(), "delivery": self.delivery.per_second()},
        }

    def totals(self) -> dict[str, int]:
        ok = sum(c["ok"] for c in self.ops.values())
        return {"ok": ok, "errors": sum(sum(c.values()) for c in self.ops.values()) - ok}


# Throwaway users: a cheap scrypt cost lets 1,000 of them log in within seconds.
EMBEDDED_ARGS = ("--demo", "--time-scale", "0.05", "--password-cost", "1024")


async def run_load(options: LoadOptions) -> dict[str, Any]:
    """Run the load; without ``options.url`` against an embedded server subprocess."""
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
            verdict = report["verdict"]
            verdict["ledger"] = verify(server.db).text()
            verdict["ok"] = verdict["ok"] and verdict["ledger"].startswith("ledger OK")
            report["server"] = server.url
    report["http_client"] = http_client
    return report


def render_chart(report: dict[str, Any]) -> str:
    """A self-contained HTML page: latency over time and its distribution, as inline SVG."""

    def line_chart(series: list[dict[str, float]], title: str) -> str:
        if not series:
            return f"<h2>{html.escape(title)}</h2><p>no samples</p>"
        width, height = 800, 240
        t_max = max(p["t"] for p in series) or 1
        y_max = max(p["p99_ms"] for p in series) or 1

        def path(key: str) -> str:
            return " ".join(f"{40 + p['t'] / t_max * (width - 60):.1f},{height - 30 - p[key] / y_max * (height - 50):.1f}" for p in series)

        return (f"<h2>{html.escape(title)}</h2><svg width='{width}' height='{height}' role='img'>"
                f"<polyline fill='none' stroke='#2563eb' stroke-width='2' points='{path('p50_ms')}'/>"
                f"<polyline fill='none' stroke='#dc2626' stroke-width='2' points='{path('p99_ms')}'/>"
                f"<text x='40' y='14'>max {y_max:.1f} ms · blue p50 · red p99 · x: seconds 0–{t_max}</text></svg>")

    def bars(summary: dict[str, float], title: str) -> str:
        keys = [k for k in summary if k.endswith("_ms")]
        top = max((summary[k] for k in keys), default=1) or 1
        rows = "".join(f"<rect x='90' y='{20 + i * 26}' width='{summary[k] / top * 600:.1f}' height='18' fill='#16a34a'/>"
                       f"<text x='0' y='{34 + i * 26}'>{k[:-3]}</text><text x='{96 + summary[k] / top * 600:.1f}' y='{34 + i * 26}'>{summary[k]} ms</text>"
                       for i, k in enumerate(keys))
        return f"<h2>{html.escape(title)}</h2><svg width='800' height='{30 + len(keys) * 26}'>{rows}</svg>"

    verdict = report["verdict"]
    return (
        "<!doctype html><meta charset='utf-8'><title>balancesim load report</title>"
        "<body style='font-family:sans-serif;max-width:860px;margin:auto'>"
        f"<h1>balancesim load: {report['users']} users, {report['duration_s']} s — "
        f"{'in sync' if verdict['ok'] else 'OUT OF SYNC'}</h1>"
        f"<p>{report['ok_ops']} operations ({report['throughput_ops_per_s']}/s), {report['errors']} refused; "
        f"{verdict['messages']} messages to {verdict['sessions']} sessions; {html.escape(verdict['ledger'])}</p>"
        + line_chart(report["series"]["http"], "HTTP latency over time")
        + line_chart(report["series"]["delivery"], "Mutation → delivery latency over time")
        + bars(report["http_latency"], "HTTP latency distribution")
        + bars(report["delivery_latency"], "Mutation → delivery latency distribution")
        + "<h2>Report</h2><pre>" + html.escape(json.dumps({k: v for k, v in report.items() if k != "series"}, indent=2))
        + "</pre></body>"
    )
