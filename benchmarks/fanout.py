"""WebSocket fan-out: delivery latency under load, and the admin-monitor rate beside bare Tornado.

Usage: ``python benchmarks/fanout.py [--sessions 1000] [--rate 1000] [--seconds 10] [--burst 100]``
(needs the ``bench`` extra for pycurl: ``pip install -e '.[bench]'``)

The server (engine + gateway, and a bare Tornado broadcaster on another port) runs
in this process; the clients, all on one IOLoop, run in a child process, so the
two do not share a GIL. Phase 1: ``--sessions`` users each hold a session while
a superadmin deposits to random users at ``--rate`` per second over HTTP; the
latency is from the start of the HTTP call to the owner's ``balance_update``.
Phase 2: the same number of admin sessions; ``--burst`` deposits fan out as
``admin_balance_monitor`` to every one of them, and then the bare server
broadcasts the same number of same-sized messages to the same clients.

Phase 1 also reports the server's CPU per deposit (every thread: HTTP, engine,
fan-out): at ``--rate`` × that, the one core Python can use is that busy, and
latency beyond it is queueing. Phase 0 is the floor under it: the same clients
post the same bodies at the same rate to a bare Tornado handler in the same
process that parses the JSON and answers 201 with JSON, and the server's CPU per
request is measured the same way.

The last line is ``{"p50_ms", "p99_ms", "fanout_msgs_per_s", "bare_tornado_msgs_per_s",
"server_cpu_us_per_deposit", "bare_tornado_post_cpu_us"}``.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402
from tornado.httpserver import HTTPServer  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.web import Application, RequestHandler  # noqa: E402
from tornado.websocket import WebSocketHandler, websocket_connect  # noqa: E402

from balancesim.actors import RealClock  # noqa: E402
from balancesim.client import configure_http  # noqa: E402
from balancesim.engine import Engine  # noqa: E402
from balancesim.gateway import Principal, make_app, tune_gc  # noqa: E402
from benchmarks._common import emit  # noqa: E402


# -- the bare Tornado broadcaster ------------------------------------------------------


class BareSession(WebSocketHandler):
    def initialize(self, sessions: set) -> None:
        self.sessions = sessions

    def open(self) -> None:
        self.sessions.add(self)

    def on_close(self) -> None:
        self.sessions.discard(self)


class BareBroadcast(RequestHandler):
    def initialize(self, sessions: set) -> None:
        self.sessions = sessions

    def post(self) -> None:
        count, text = int(self.get_argument("n")), self.request.body.decode()
        for _ in range(count):
            for session in list(self.sessions):
                session.write_message(text)
        self.finish("ok")


class BarePost(RequestHandler):
    """A JSON POST and nothing behind it: what Tornado alone costs per deposit."""

    def post(self) -> None:
        body = json.loads(self.request.body)
        self.set_status(201)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"transaction": {"user_id": body["user_id"], "amount": body["amount"],
                                                "description": body["description"]}}))


class CpuMark(RequestHandler):
    """The server process's CPU seconds so far, so the client can bracket a phase."""

    def get(self) -> None:
        self.finish(str(time.process_time()))


def bare_app() -> Application:
    sessions: set = set()
    return Application([(r"/ws", BareSession, {"sessions": sessions}),
                        (r"/broadcast", BareBroadcast, {"sessions": sessions}),
                        (r"/deposits", BarePost),
                        (r"/cpu", CpuMark)], log_function=lambda handler: None)


def listen(app: Application) -> int:
    sockets = bind_sockets(0, "127.0.0.1")
    HTTPServer(app).add_sockets(sockets)
    return sockets[0].getsockname()[1]


# -- the client process ------------------------------------------------------------------


async def connect_all(urls: list[str], *, greeted: bool = True) -> list:
    """Connect in waves of 100; with ``greeted``, read each session's ``user_balance_init``."""
    conns = []
    for start in range(0, len(urls), 100):
        conns += await asyncio.gather(*(websocket_connect(u, max_message_size=1 << 20) for u in urls[start:start + 100]))
    if greeted:
        for conn in conns:
            await conn.read_message()
    return conns


async def post(url: str, body: dict, token: str) -> None:
    await AsyncHTTPClient().fetch(url, method="POST", body=json.dumps(body),
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


async def server_cpu_s(cfg: dict) -> float:
    return float((await AsyncHTTPClient().fetch(f"http://{cfg['bare']}/cpu")).body)


async def paced(cfg: dict, url: str, sent: dict[tuple[int, str], float]) -> float:
    """Deposit to random users at ``cfg["rate"]`` for ``cfg["seconds"]``; the server's CPU s per call."""
    users, total = cfg["users"], cfg["rate"] * cfg["seconds"]
    cpu_before = await server_cpu_s(cfg)
    rng = random.Random(1)
    interval = 1 / cfg["rate"]
    begin = time.perf_counter()
    calls = []
    for i in range(total):
        target = begin + i * interval
        if (delay := target - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        user = rng.choice(users)
        sent[(user["user_id"], f"m{i}")] = time.perf_counter()
        calls.append(asyncio.ensure_future(post(url, {"user_id": user["user_id"], "amount": "1", "description": f"m{i}"},
                                                cfg["boss"])))
    await asyncio.gather(*calls)
    return (await server_cpu_s(cfg) - cpu_before) / total


async def latency_phase(cfg: dict) -> tuple[list[float], float]:
    """The latencies, and the server's CPU seconds per deposit while they ran."""
    base, users = cfg["base"], cfg["users"]
    conns = await connect_all([f"ws://{base}/ws?token={u['token']}" for u in users])
    sent: dict[tuple[int, str], float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    total = cfg["rate"] * cfg["seconds"]

    async def reader(conn, user_id: int) -> None:
        while (raw := await conn.read_message()) is not None:
            message = json.loads(raw)
            if message["type"] == "balance_update":
                started = sent.pop((user_id, message["description"]), None)
                if started is not None:
                    latencies.append((time.perf_counter() - started) * 1000)
                    if len(latencies) == total:
                        done.set()

    readers = [asyncio.ensure_future(reader(c, u["user_id"])) for c, u in zip(conns, users)]
    cpu_per_deposit_s = await paced(cfg, f"http://{base}/api/admin/deposits", sent)
    await asyncio.wait_for(done.wait(), 60)
    for conn in conns:
        conn.close()
    for task in readers:
        task.cancel()
    return latencies, cpu_per_deposit_s


async def burst_phase(urls: list[str], trigger, count: int, kind: str, *, greeted: bool) -> float:
    conns = await connect_all(urls, greeted=greeted)
    remaining = [count] * len(conns)
    finished = asyncio.Event()
    pending = [len(conns)]

    async def reader(index: int, conn) -> None:
        while (raw := await conn.read_message()) is not None:
            if f'"type": "{kind}"' in raw:
                remaining[index] -= 1
                if remaining[index] == 0:
                    pending[0] -= 1
                    if pending[0] == 0:
                        finished.set()
                    return

    readers = [asyncio.ensure_future(reader(i, c)) for i, c in enumerate(conns)]
    begin = time.perf_counter()
    await trigger()
    await asyncio.wait_for(finished.wait(), 300)
    elapsed = time.perf_counter() - begin
    for conn in conns:
        conn.close()
    for task in readers:
        task.cancel()
    return count * len(conns) / elapsed


async def client_main(cfg: dict) -> dict:
    configure_http(100)
    bare_post_cpu_s = await paced(cfg, f"http://{cfg['bare']}/deposits", {})
    latencies, cpu_per_deposit_s = await latency_phase(cfg)
    latencies.sort()
    base, boss, admins, burst = cfg["base"], cfg["boss"], cfg["admins"], cfg["burst"]

    async def deposits() -> None:
        await asyncio.gather(*(post(f"http://{base}/api/admin/deposits",
                                    {"user_id": cfg["users"][i % len(cfg["users"])]["user_id"], "amount": "1",
                                     "description": f"burst {i}"}, boss) for i in range(burst)))

    fanout = await burst_phase([f"ws://{base}/ws?token={a}" for a in admins], deposits, burst, "admin_balance_monitor",
                                 greeted=True)
    sample = json.dumps({"type": "admin_balance_monitor", "user_id": 1, "asset": "USDT", "balance": "100",
                         "change": "1", "change_type": "deposit", "description": "burst 0", "transaction_id": 1,
                         "version": 1, "metadata": {}, "ts": "2026-01-01T00:00:00.000Z", "username": "u1"})

    async def broadcast() -> None:
        await AsyncHTTPClient().fetch(f"http://{cfg['bare']}/broadcast?n={burst}", method="POST", body=sample)

    bare = await burst_phase([f"ws://{cfg['bare']}/ws"] * len(admins), broadcast, burst, "admin_balance_monitor",
                               greeted=False)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2)

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(latencies[-1], 2),
            "deliveries": len(latencies), "fanout_msgs_per_s": round(fanout), "bare_tornado_msgs_per_s": round(bare),
            "server_cpu_us_per_deposit": round(cpu_per_deposit_s * 1e6),
            "bare_tornado_post_cpu_us": round(bare_post_cpu_s * 1e6)}


# -- the server process ------------------------------------------------------------------


async def server_main(args: argparse.Namespace) -> dict:
    tune_gc()  # the policy balancesim serve runs with
    tmp = tempfile.mkdtemp()
    engine = Engine(f"{tmp}/fanout.db", clock=RealClock(), password_cost=2).start()
    app = make_app(engine, tick_interval_s=3600)
    tokens = app.settings["ctx"].tokens

    def account(name: str, role: str) -> tuple[int, str]:
        user = engine.create_user(name, "pw", role).get(timeout=60)
        return user["user_id"], tokens.issue(Principal(user["user_id"], name, role))

    boss = account("boss", "superadmin")
    users = [dict(zip(("user_id", "token"), account(f"u{i}", "user"))) for i in range(args.sessions)]
    admins = [account(f"a{i}", "admin")[1] for i in range(args.sessions)]
    port, bare_port = listen(app), listen(bare_app())
    cfg = {"base": f"127.0.0.1:{port}", "bare": f"127.0.0.1:{bare_port}", "boss": boss[1], "users": users,
           "admins": admins, "rate": args.rate, "seconds": args.seconds, "burst": args.burst}
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = await child.communicate(json.dumps(cfg).encode())
    await asyncio.get_running_loop().run_in_executor(None, engine.stop)
    return json.loads(out.decode().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--client", action="store_true")
    args = parser.parse_args()
    if args.client:
        emit(asyncio.run(client_main(json.loads(sys.stdin.read()))))
        return
    result = asyncio.run(server_main(args))
    print(f"{args.sessions} sessions, {args.rate} deposits/s for {args.seconds} s: HTTP call → owner's "
          f"balance_update p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms, "
          f"max {result['max_ms']} ms over {result['deliveries']} deliveries; the server spent "
          f"{result['server_cpu_us_per_deposit']} µs of CPU per deposit (all threads: HTTP, engine, fan-out), "
          f"so {args.rate} deposits/s kept it {result['server_cpu_us_per_deposit'] * args.rate / 1e4:.0f}% busy on one core")
    print(f"the same posts to a bare Tornado JSON handler in the same process: {result['bare_tornado_post_cpu_us']} µs of "
          f"CPU each, {result['bare_tornado_post_cpu_us'] * args.rate / 1e4:.0f}% of the core at {args.rate}/s before any work")
    print(f"admin monitor fan-out to {args.sessions} admin sessions: {result['fanout_msgs_per_s']:,} msgs/s; "
          f"bare Tornado broadcast of the same: {result['bare_tornado_msgs_per_s']:,} msgs/s "
          f"({result['fanout_msgs_per_s'] / result['bare_tornado_msgs_per_s']:.2f} ×)")
    emit({key: result[key] for key in ("p50_ms", "p99_ms", "fanout_msgs_per_s", "bare_tornado_msgs_per_s",
                                       "server_cpu_us_per_deposit", "bare_tornado_post_cpu_us")})


if __name__ == "__main__":
    main()
