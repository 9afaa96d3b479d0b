"""A bare cluster: the yardstick for ``benchmarks/cluster.py``'s ``bare`` mode.

Usage: ``python benchmarks/bare_cluster.py serve --dir DIR [--host 127.0.0.1] [--port 0]
[--gateways 2] [--shards 2]``; it prints ``listening on http://HOST:PORT`` once it answers,
and drains and exits 0 on SIGTERM/SIGINT.

Issue 15 quotes a *bare prototype* of the cluster's request path (no auth, no actors, no
HMAC, no events fan-out) as the floor the real cluster is compared with. Quoted figures age
(the embedded server has become faster since), so this rebuilds that path with the cluster's
own libraries and Redis setup, to be measured in the same run as the real thing:

- ``serve`` (the parent, charged as ``supervisor``) binds the port, starts a private
  ``redis-server`` on a Unix socket (``balancesim.cluster.RedisServer``, as ``balancesim
  serve --workers`` does), then ``--shards`` shard processes and, once each says it is
  ready, ``--gateways`` gateway processes, which inherit the listening socket by descriptor
  (bind, then hand down, as the supervisor does). Children are exec'd and watch a pipe from
  the parent (``balancesim.cluster._watchdog``), so they die with it however it dies.
- A **gateway** is a bare Tornado app. Its only handler, ``POST /api/admin/deposits``,
  accepts any token and any user id: it parses the JSON body, picks the shard
  ``user_id % shards``, ``XADD``s the call to that shard's command stream through the
  project's coalescing ``Producer`` (one redis-py pipeline per loop turn), awaits the reply
  that a ``Tail`` on the gateway's own reply stream resolves by call id, and answers 200
  with a small JSON body (503 if the ``XADD`` failed, 504 after ``REPLY_TIMEOUT_S``).
- A **shard** reads its command stream with a ``Consumer`` (``XREADGROUP``, batches of
  1,000), inserts one row per deposit into its SQLite file (WAL, ``synchronous=FULL``, one
  transaction per batch), COMMITs, then ``XADD``s the replies (pipelined) and ``XACK``s
  the batch (the ack goes out with the next read). The rows land in a ``transactions``
  table with ``type = 'deposit'`` and the request's ``description``, so the driver's
  durability count works unchanged. No idempotency key: a batch redelivered after a crash
  would be inserted twice (the benchmark only asks "at least the 2xx answers").

Everything a real deposit does beyond that (token check, account actor, balance and
version updates, HMAC sealing, the events fan-out) is left out on purpose: the gap between
this and ``serve --workers 2 --shards 2`` is what those cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balancesim.cluster import Consumer, Entry, NotSent, Producer, RedisServer, Tail, Unknown  # noqa: E402
from balancesim.cluster._watchdog import WATCHDOG_FD_ENV, watch_parent  # noqa: E402

__all__ = ["BareCluster", "COMMANDS", "REPLIES", "SCHEMA", "shard_db"]

# The Redis URL carries Redis's password: children get it in their environment, never on
# their command line (readable by every local user in /proc).
REDIS_URL_ENV = "BARE_REDIS_URL"
LISTEN_FD_ENV = "BARE_LISTEN_FD"
READY = "ready"
COMMANDS = "bare:cmd:{shard}"
REPLIES = "bare:reply:{gateway}"
GROUP = "shard"
BATCH = 1000
# Far above a reply's normal time under saturation (tens of ms); a 504 means a lost shard.
REPLY_TIMEOUT_S = 30.0
# Children must say "ready" within this (≈ 1 s normally; far more on a loaded machine).
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SCHEMA = """CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    amount TEXT NOT NULL,
    description TEXT NOT NULL,
    call_id TEXT NOT NULL
)"""


def shard_db(directory: str | os.PathLike[str], index: int) -> str:
    """The SQLite file of shard ``index`` in ``directory``."""
    return os.path.join(directory, f"bare-shard-{index}.db")


def tune_gc() -> None:
    # As balancesim's gateways and shards do (gateway._server.tune_gc), so that the yardstick
    # is not charged collections the real processes do not make.
    gc.set_threshold(50_000, 10, 10)


def _stop_event() -> asyncio.Event:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    return stopping


def _say(line: str) -> None:
    print(line, flush=True)


# -- the gateway ---------------------------------------------------------------------------


async def run_gateway(index: int, shards: int, redis_url: str, sock: socket.socket) -> None:
    """Serve deposits on ``sock`` until SIGTERM, then stop accepting and finish what is in flight."""
    import tornado.web
    from tornado.httpserver import HTTPServer

    tune_gc()
    loop = asyncio.get_running_loop()
    producer = Producer(redis_url)
    waiting: dict[str, asyncio.Future[dict]] = {}
    reply_stream = REPLIES.format(gateway=index)
    call_ids = itertools.count()

    async def on_replies(entries: Sequence[Entry]) -> None:
        for entry in entries:
            future = waiting.pop(entry.fields[b"id"].decode(), None)
            if future is not None and not future.done():  # None: it timed out already
                future.set_result({"transaction_id": int(entry.fields[b"tx"])})

    # From the stream's current end: replies to a previous run's calls are nobody's.
    tail = Tail(redis_url, reply_stream, on_replies, start_id="$", count=BATCH).start()

    class Deposits(tornado.web.RequestHandler):
        async def post(self) -> None:
            # No auth, no validation beyond what the shard needs: the yardstick's floor.
            body = json.loads(self.request.body)
            user_id = int(body["user_id"])
            call_id = f"{index}-{next(call_ids)}"
            reply: asyncio.Future[dict] = loop.create_future()
            waiting[call_id] = reply
            try:
                await producer.add(COMMANDS.format(shard=user_id % shards), {
                    "id": call_id, "reply": reply_stream, "user_id": user_id,
                    "amount": str(body["amount"]), "description": str(body.get("description", "")),
                })
            except (NotSent, Unknown) as error:
                waiting.pop(call_id, None)
                self.set_status(503)
                self.finish({"error": "unavailable", "message": str(error)})
                return
            try:
                answer = await asyncio.wait_for(reply, REPLY_TIMEOUT_S)
            except asyncio.TimeoutError:
                waiting.pop(call_id, None)
                self.set_status(504)
                self.finish({"error": "timeout"})
                return
            self.finish({"ok": True, "user_id": user_id, **answer})

    app = tornado.web.Application([(r"/api/admin/deposits", Deposits)])
    server = HTTPServer(app)
    sock.setblocking(False)
    server.add_sockets([sock])
    stopping = _stop_event()
    _say(READY)
    try:
        await stopping.wait()
    finally:
        server.stop()
        deadline = time.monotonic() + 5.0
        while waiting and time.monotonic() < deadline:  # requests in flight get their answer
            await asyncio.sleep(0.05)
        await server.close_all_connections()
        await tail.stop()
        await producer.aclose()


# -- the shard ------------------------------------------------------------------------------


async def run_shard(index: int, redis_url: str, db_path: str) -> None:
    """Commit deposits from the command stream in batches and reply, until SIGTERM."""
    tune_gc()
    db = sqlite3.connect(db_path, isolation_level=None)  # autocommit: BEGIN/COMMIT are ours
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # as the real ledger: no reply before the fsync
    db.execute(SCHEMA)
    producer = Producer(redis_url)

    async def on_commands(entries: Sequence[Entry]) -> None:
        rows = [("deposit", int(e.fields[b"user_id"]), e.fields[b"amount"].decode(),
                 e.fields[b"description"].decode(), e.fields[b"id"].decode()) for e in entries]
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO transactions (type, user_id, amount, description, call_id) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
            # One writer: the batch's rowids are consecutive and end at the last one.
            last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        first = last - len(rows) + 1
        # All added in this turn: one pipeline. A failed reply only costs that caller a 504.
        await asyncio.gather(*(producer.add(e.fields[b"reply"].decode(), {"id": e.fields[b"id"], "tx": first + k})
                               for k, e in enumerate(entries)), return_exceptions=True)

    consumer = Consumer(redis_url, COMMANDS.format(shard=index), GROUP, f"shard-{index}", on_commands,
                        count=BATCH).start()
    stopping = _stop_event()
    _say(READY)
    try:
        await stopping.wait()
    finally:
        await consumer.stop()
        await producer.aclose()
        db.close()


# -- the parent ------------------------------------------------------------------------------


def _spawn(argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], log: Path) -> subprocess.Popen[str]:
    """Start a child and wait until it prints ``ready`` (``RuntimeError`` if it exits first)."""
    with open(log, "a") as errors:
        child = subprocess.Popen(argv, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
    assert child.stdout is not None
    # A child that hangs silently would block readline forever: killing it ends the read.
    watchdog = threading.Timer(START_TIMEOUT_S, child.kill)
    watchdog.start()
    try:
        while (line := child.stdout.readline()).strip() != READY:
            if not line:
                child.kill()
                child.wait()
                raise RuntimeError(f"{' '.join(argv[2:])} did not start within {START_TIMEOUT_S:g} s: "
                                   f"{log.read_text()[-2000:]}")
    finally:
        watchdog.cancel()
    return child


def _stop(children: list[subprocess.Popen[str]]) -> list[int]:
    """SIGTERM every child, wait (bounded), SIGKILL what is left; their exit codes."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    codes = []
    for child in children:
        try:
            codes.append(child.wait(timeout=STOP_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
        if child.stdout is not None:
            child.stdout.close()
    return codes


def serve(directory: str, host: str, port: int, gateways: int, shards: int) -> int:
    """Run the bare cluster until SIGTERM/SIGINT; 0 when every child stopped cleanly."""
    from tornado.netutil import bind_sockets

    # A flag, not a blocked mask: a mask would be inherited by the children (redis-server
    # included) across exec, a handler is reset to the default there. A signal during the
    # start is kept and acted on as soon as the children are up.
    stop_asked: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop_asked.append(signum))
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bare.log"
    sock = bind_sockets(port, host, family=socket.AF_INET, backlog=4096)[0]
    redis_server = RedisServer(root, die_with_parent=True).start()
    watch_read, watch_write = os.pipe()  # children see EOF when this process is gone
    env = {**os.environ, REDIS_URL_ENV: redis_server.url, WATCHDOG_FD_ENV: str(watch_read),
           LISTEN_FD_ENV: str(sock.fileno()), "PYTHONUNBUFFERED": "1"}
    script = [sys.executable, os.path.abspath(__file__)]
    shard_children: list[subprocess.Popen[str]] = []
    gateway_children: list[subprocess.Popen[str]] = []
    codes: list[int] = []
    try:
        for k in range(shards):
            shard_children.append(_spawn([*script, "shard", "--index", str(k), "--db", shard_db(root, k)],
                                         env, (watch_read,), log))
        for g in range(gateways):
            gateway_children.append(_spawn([*script, "gateway", "--index", str(g), "--shards", str(shards)],
                                           env, (watch_read, sock.fileno()), log))
        _say(f"listening on http://{host}:{sock.getsockname()[1]}")
        while not stop_asked:
            time.sleep(0.2)
            if dead := [c for c in (*shard_children, *gateway_children) if c.poll() is not None]:
                print(f"bare_cluster: {' '.join(map(str, dead[0].args[2:]))} exited {dead[0].returncode}",
                      file=sys.stderr)
                codes.append(1)
                break
    finally:
        # Dependency order: gateways finish their requests, then shards, then Redis.
        codes += _stop(gateway_children) + _stop(shard_children)
        redis_server.stop()
        sock.close()
        os.close(watch_write)
        os.close(watch_read)
    return 0 if all(code == 0 for code in codes) else 1


# -- driving it from the benchmark ---------------------------------------------------------


class BareCluster:
    """``bare_cluster.py serve`` as a child process (as ``balancesim.serveproc.ServerProcess``
    is for ``balancesim serve``): ``start()`` returns once it is listening."""

    def __init__(self, directory: str, *, gateways: int = 2, shards: int = 2) -> None:
        self.directory, self.gateways, self.shards = directory, gateways, shards
        self.log_path = os.path.join(directory, "bare.log")
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    @property
    def ledgers(self) -> list[str]:
        return [shard_db(self.directory, k) for k in range(self.shards)]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> BareCluster:
        os.makedirs(self.directory, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", "--dir", self.directory,
                 "--gateways", str(self.gateways), "--shards", str(self.shards)],
                # Its own session, as ServerProcess: a Ctrl-C reaches only the driver.
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        assert self.process.stdout is not None
        while not (line := self.process.stdout.readline()).startswith("listening on "):
            if not line:
                self.process.wait()
                raise RuntimeError(f"bare_cluster.py serve did not start: {self.log()[-4000:]}")
        self.url = line.split()[-1]
        return self

    def log(self) -> str:
        try:
            with open(self.log_path) as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None and self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout_s)
        self.process.stdout.close()
        return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("serve", help="the whole bare cluster (parent of the others)")
    p.add_argument("--dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p = roles.add_parser("gateway", help="started by serve")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p = roles.add_parser("shard", help="started by serve")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--db", required=True)
    args = parser.parse_args()
    if args.role == "serve":
        sys.exit(serve(args.dir, args.host, args.port, args.gateways, args.shards))
    # A child: it needs what its parent put in the environment.
    redis_url = os.environ.pop(REDIS_URL_ENV)
    watch_parent()
    if args.role == "gateway":
        sock = socket.socket(fileno=int(os.environ.pop(LISTEN_FD_ENV)))
        asyncio.run(run_gateway(args.index, args.shards, redis_url, sock))
    else:
        asyncio.run(run_shard(args.index, redis_url, args.db))


if __name__ == "__main__":
    main()
