"""Fan-out across processes: the cluster's admin monitor beside python-socketio's Redis adapter.

Usage: ``python benchmarks/fanout_cluster.py [--sessions 1000] [--burst 100] [--rounds 3]
[--client-procs 2] [--deposit-users 20]`` (needs the ``bench`` extra: ``pip install -e
'.[bench]'``, and Debian's ``redis-server``).

Issue 16's "Fan-out across processes" benchmark. Two deployments run side by side in one
run, each on its own ``redis-server``:

* **balancesim**: ``serve --workers 2 --shards 2 --data-dir`` (started by
  ``benchmarks/_common.py`` as for ``benchmarks/cluster.py``). ``--sessions`` admin sessions (logged in as
  ``--admin-accounts`` admin accounts in turn: a gateway's fan-out costs per session, an
  account only setup time) are spread evenly over the two gateways. They share one
  listening socket, so where a connection lands is the kernel's choice; each connection's
  gateway is read from ``/proc`` (which gateway process holds the server end of its TCP
  connection), and connections are opened and closed until each gateway holds exactly half. ``cluster status --json`` (the
  gateways' heartbeats) confirms the split. A burst is ``--burst`` concurrent durable
  ``POST /api/admin/deposits`` over ``--deposit-users`` accounts on both shards, each fanned
  out by its shard through Redis to both gateways and by each gateway as
  ``admin_balance_monitor`` to every admin session. A deposit refused with ``503`` or ``504``
  is repeated with its ``Idempotency-Key`` (so each is applied, and announced, once) and
  counted: ``cluster_deposit_refusals``.
* **socket.io**: two python-socketio ``AsyncServer`` processes (aiohttp), each with
  ``client_manager=AsyncRedisManager(url)``, on their own ports; the same number of
  sessions, half on each; a burst is ``--burst`` concurrent ``emit``\\ s to everyone from an
  external ``AsyncRedisManager(write_only=True)`` in this process, each padded so that its
  WebSocket frame is as long as the balancesim frame measured in the warm-up.

The sessions are held by ``--client-procs`` client processes (each holds its share of both
sides' sessions) on a minimal WebSocket client written here on ``asyncio.Protocol``: it
parses frames, answers engine.io's handshake and pings, and per session marks each burst
message's sequence number (every message carries ``fanout <n>``) in a bitmap, so a lost
message and a duplicate are both counted. The same client serves both sides, so neither
pays for a heavier one.

Rate = messages received by all sessions ÷ (first send → last message received), on one
clock (``CLOCK_MONOTONIC`` is system-wide). The sides' bursts alternate over ``--rounds``
rounds (after a warm-up burst on each), so a neighbour's load hits both alike; the figures
are the median over rounds. CPU per process role (utime + stime from ``/proc``, every
thread) is taken over each burst and reported as µs per message delivered.

The last line is JSON: ``{"cluster_fanout_msgs_per_s", "socketio_redis_msgs_per_s", "ratio",
"cluster_lost", "socketio_lost", "cluster_deposit_refusals", "frame_bytes", ...}``; the
``*_cpu_us`` keys are µs of CPU per message delivered, by role, over all the timed bursts.
Exit 1 when a message was lost or the cluster did not drain cleanly. ``--py-spy DIR``
profiles one gateway and one socket.io server over the first timed burst.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balancesim.client import ApiError, Client, configure_http  # noqa: E402
from balancesim.cluster import placement_of_data_dir, shard_of_user_id  # noqa: E402
from benchmarks._common import (SERVE_ARGS, SUPERADMIN, Deployment, emit, load, role_cpu_s,  # noqa: E402
                                start_cluster)

ADMIN_PASSWORD = "bench-pw"
EVENT = "admin_balance_monitor"
#: Every burst message carries ``fanout <n>`` (the deposit's description, the emit's too).
SEQ_MARK = b'"fanout '
#: serve's --time-scale: the price feed ticks once a simulated second, so at 60 an admin
#: session gets a ``price_tick`` a minute rather than two a second: frames that are not the
#: burst's and that the socket.io side has no counterpart of. Deposits do not depend on it.
TIME_SCALE = 60
#: The clients' clock: CLOCK_MONOTONIC is one clock for every process on the machine.
now_s = time.monotonic


# -- the WebSocket client (runs in the client processes) -------------------------------------


class Window:
    """The burst a client process is waiting for: sequence numbers ``first`` … ``first + count - 1``."""

    def __init__(self, first: int, count: int, sessions: int) -> None:
        self.first, self.count = first, count
        self.incomplete = sessions
        self.done = asyncio.Event()
        self.first_s = 0.0  # when the first burst message arrived (any session)
        self.last_s = 0.0  # when the last burst message arrived (any session)
        if sessions == 0:
            self.done.set()


class WsSession(asyncio.Protocol):
    """One WebSocket connection that counts burst messages and answers what it must.

    ``kind`` is ``balancesim`` (ready on ``user_balance_init``) or ``socketio`` (engine.io
    v4 over a WebSocket: answers the open packet with a namespace connect, ready on the
    connect's ack, answers each ping). Server frames are never masked, and neither server
    fragments a message, so a frame is a message.
    """

    def __init__(self, kind: str, host: str, port: int, path: str, owner: ClientProcess) -> None:
        self.kind, self.host, self.port, self.path, self.owner = kind, host, port, path, owner
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.closed = False
        self.seen = bytearray()
        self.received = 0
        self.duplicates = 0
        self.payload_bytes = 0
        self.sample: bytes | None = None

    @property
    def local_port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def arm(self, window: Window) -> None:
        self.seen = bytearray(window.count)
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                        .encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))
        self.owner.lost_session(self)

    def send_text(self, text: bytes) -> None:
        """A masked text frame (a client must mask; the frames sent here are a few bytes)."""
        assert self.transport is not None and len(text) < 126
        mask = os.urandom(4)
        self.transport.write(bytes((0x81, 0x80 | len(text))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            mask = os.urandom(4)
            status = (1000).to_bytes(2, "big")  # a normal closure
            self.transport.write(bytes((0x88, 0x82)) + mask + bytes(b ^ mask[i] for i, b in enumerate(status)))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(bytes(buffer[:200]).decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            del buffer[:end + 4]
        at, size = 0, len(buffer)
        while size - at >= 2:
            opcode, length = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
            header = 2
            if length == 126:
                if size - at < 4:
                    break
                length, header = int.from_bytes(buffer[at + 2:at + 4], "big"), 4
            elif length == 127:
                if size - at < 10:
                    break
                length, header = int.from_bytes(buffer[at + 2:at + 10], "big"), 10
            if size - at < header + length:
                break
            payload = bytes(buffer[at + header:at + header + length])
            at += header + length
            if opcode == 1:
                self.on_text(payload)
            elif opcode == 9:  # a WebSocket ping: pong with the same payload
                assert self.transport is not None and length < 126
                self.transport.write(bytes((0x8A, 0x80 | length)) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                assert self.transport is not None
                self.transport.close()
                return
        del buffer[:at]

    def on_text(self, payload: bytes) -> None:
        mark = payload.find(SEQ_MARK)
        if mark >= 0 and EVENT.encode() in payload:
            start = mark + len(SEQ_MARK)
            self.owner.count(self, int(payload[start:payload.index(b'"', start)]), len(payload))
            if self.sample is None:
                self.sample = payload
            return
        if self.kind == "balancesim":
            if not self.ready.done() and b'"user_balance_init"' in payload[:64]:
                self.ready.set_result(None)
            return
        # engine.io v4: 0 = open, 2 = ping, 4 = message; socket.io inside 4: 0 = connect (ack).
        if payload[:1] == b"2":
            self.send_text(b"3")
        elif payload[:1] == b"0":
            self.send_text(b"40")
        elif payload[:2] == b"40" and not self.ready.done():
            self.ready.set_result(None)
        elif payload[:2] == b"44" and not self.ready.done():
            self.ready.set_exception(ConnectionError(payload.decode(errors="replace")))


class ClientProcess:
    """A client process: its sessions by side, the burst it waits for, and its commands."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[WsSession]] = {"balancesim": [], "socketio": []}
        self.window: Window | None = None
        self.window_side = ""
        self.closed_during_burst = 0

    def count(self, session: WsSession, seq: int, size: int) -> None:
        window = self.window
        if window is None or session.kind != self.window_side:
            return
        index = seq - window.first
        if not 0 <= index < window.count:
            return
        if session.seen[index]:
            session.duplicates += 1
            return
        session.seen[index] = 1
        session.received += 1
        session.payload_bytes += size
        window.last_s = now_s()
        if not window.first_s:
            window.first_s = window.last_s
        if session.received == window.count:
            window.incomplete -= 1
            if window.incomplete == 0:
                window.done.set()

    def lost_session(self, session: WsSession) -> None:
        if self.window is not None and session.kind == self.window_side:
            self.closed_during_burst += 1

    async def connect(self, kind: str, targets: list[dict[str, Any]]) -> list[int]:
        """Open one session per target (``{port, path}``), 100 at a time; their local ports."""
        loop = asyncio.get_running_loop()
        opened: list[WsSession] = []
        for start in range(0, len(targets), 100):
            wave = []
            for target in targets[start:start + 100]:
                _, session = await loop.create_connection(
                    lambda t=target: WsSession(kind, "127.0.0.1", t["port"], t["path"], self), "127.0.0.1",
                    target["port"])
                wave.append(session)
            await asyncio.wait_for(asyncio.gather(*(s.ready for s in wave)), 60)
            opened += wave
        self.sessions[kind] += opened
        return [s.local_port for s in opened]

    def close(self, kind: str, ports: list[int]) -> int:
        """Close this side's sessions whose local port is in ``ports``; how many."""
        doomed = set(ports)
        keep, gone = [], []
        for session in self.sessions[kind]:
            (gone if session.local_port in doomed else keep).append(session)
        for session in gone:
            session.close()
        self.sessions[kind] = keep
        return len(gone)

    def arm(self, kind: str, first: int, count: int) -> None:
        live = [s for s in self.sessions[kind] if not s.closed]
        self.window, self.window_side, self.closed_during_burst = Window(first, count, len(live)), kind, 0
        for session in self.sessions[kind]:
            session.arm(self.window)
            session.duplicates = session.payload_bytes = 0

    async def wait(self, idle_s: float, limit_s: float) -> dict[str, Any]:
        """Until every session has the whole burst, or nothing arrived for ``idle_s``; the counts."""
        window = self.window
        assert window is not None
        started = now_s()
        while not window.done.is_set():
            try:
                await asyncio.wait_for(window.done.wait(), 0.5)
            except asyncio.TimeoutError:
                quiet_since = max(window.last_s, started)
                if now_s() - quiet_since > idle_s or now_s() - started > limit_s:
                    break
        sessions = self.sessions[self.window_side]
        received = sum(s.received for s in sessions)
        result = {"sessions": len(sessions), "received": received,
                  "lost": window.count * len(sessions) - received,
                  "duplicates": sum(s.duplicates for s in sessions), "last_s": window.last_s,
                  "first_s": window.first_s,
                  "payload_bytes": sum(s.payload_bytes for s in sessions),
                  "closed": self.closed_during_burst, "cpu_s": time.process_time()}
        self.window = None
        return result

    def sample(self, kind: str) -> str | None:
        for session in self.sessions[kind]:
            if session.sample is not None:
                return session.sample.decode()
        return None


async def client_main() -> None:
    """Serve the orchestrator's commands, one JSON line each way, on stdin and stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    me = ClientProcess()

    def answer(result: Any) -> None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        if op == "connect":
            answer(await me.connect(command["kind"], command["targets"]))
        elif op == "close":
            answer(me.close(command["kind"], command["ports"]))
        elif op == "arm":
            me.arm(command["kind"], command["first"], command["count"])
            answer(True)
        elif op == "wait":
            answer(await me.wait(command["idle_s"], command["limit_s"]))
        elif op == "sample":
            answer(me.sample(command["kind"]))
        elif op == "quit":
            for kind in me.sessions:
                me.close(kind, [s.local_port for s in me.sessions[kind]])
            answer(True)
            return


# -- the socket.io server (runs in the socket.io server processes) ---------------------------


async def socketio_server_main(redis_url: str) -> None:
    """A python-socketio ``AsyncServer`` on aiohttp with the Redis manager; prints its port."""
    import socketio
    from aiohttp import web

    server = socketio.AsyncServer(client_manager=socketio.AsyncRedisManager(redis_url), async_mode="aiohttp",
                                  cors_allowed_origins="*")
    app = web.Application()
    server.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, backlog=4096).start()
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    # Until the orchestrator closes our stdin (or dies): nothing else ends this process.
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    await runner.cleanup()


# -- the orchestrator ------------------------------------------------------------------------


class Child:
    """A child process of this script that takes JSON commands (a client process)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            limit=1 << 24)
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ask(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"client process {self.pid} died (exit {await self.process.wait()})")
        return json.loads(line)


@dataclass
class SocketIoDeployment:
    """The peer: its Redis, its two servers (ports and pids) and the external emitter."""

    redis: Any
    servers: list[asyncio.subprocess.Process]
    ports: list[int]
    emitter: Any

    @property
    def roles(self) -> dict[str, list[int]]:
        assert self.redis.pid is not None
        return {"sio_server": [p.pid for p in self.servers], "sio_redis": [self.redis.pid]}

    async def stop(self) -> None:
        for server in self.servers:
            assert server.stdin is not None
            server.stdin.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait(), 10)
            except asyncio.TimeoutError:
                server.kill()
                await server.wait()
        self.redis.stop()


async def start_socketio(workdir: str) -> SocketIoDeployment:
    """A private ``redis-server`` (as a cluster's), two socket.io servers on it, and an emitter."""
    import socketio

    from balancesim.cluster import RedisServer

    redis = RedisServer(os.path.join(workdir, "sio-redis")).start()
    servers, ports = [], []
    for _ in range(2):
        server = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--socketio-server", redis.url,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the socket.io server did not start: {line!r}")
        servers.append(server)
        ports.append(int(line.split()[-1]))
    emitter = socketio.AsyncRedisManager(redis.url, write_only=True)
    return SocketIoDeployment(redis, servers, ports, emitter)


# -- which gateway holds a connection ---------------------------------------------------------


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets that process ``pid`` holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def gateway_of_ports(server_port: int, client_ports: set[int], gateways: list[int]) -> dict[int, int]:
    """Map each client port (of a connection to ``server_port``) to the gateway pid holding its server end.

    The server end of a TCP connection is the line of ``/proc/net/tcp`` whose local port
    is the server's and remote port the client's; its inode is in exactly one gateway's fds.
    """
    owner = {inode: pid for pid in gateways for inode in socket_inodes(pid)}
    mapping: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], int(fields[9])
                if int(local.rsplit(":", 1)[1], 16) != server_port:
                    continue
                client_port = int(remote.rsplit(":", 1)[1], 16)
                if client_port in client_ports and inode in owner:
                    mapping[client_port] = owner[inode]
    return mapping


async def spread_over_gateways(clients: list[Child], tokens: list[str], port: int, gateways: list[int]) -> dict[int, int]:
    """Open ``len(tokens)`` admin sessions, exactly half on each gateway; the sessions per gateway pid.

    The gateways share one listening socket, so each connection lands where the kernel
    wakes a gateway first, and while one gateway is busier the other wins nearly every
    race. So: open, look each connection up, keep it while its gateway is short of half,
    close the rest; and open again, at least 20 at a time (a few connections alone all
    land on the idler gateway), until both hold half. A session may use any admin token:
    the fan-out costs per session.
    """
    quota = len(tokens) // len(gateways)
    held: dict[int, int] = dict.fromkeys(gateways, 0)
    missing, opened_total = quota * len(gateways), 0
    for attempt in range(30):
        if missing == 0:
            break
        batch = [tokens[(opened_total + i) % len(tokens)] for i in range(max(missing if attempt == 0 else 2 * missing, 20))]
        opened_total += len(batch)
        shares = [batch[i::len(clients)] for i in range(len(clients))]
        opened = await asyncio.gather(*(
            c.ask("connect", kind="balancesim", targets=[{"port": port, "path": f"/ws?token={t}"} for t in share])
            for c, share in zip(clients, shares)))
        placed = [(index, local) for index, ports in enumerate(opened) for local in ports]
        deadline = time.monotonic() + 5
        while True:
            where = gateway_of_ports(port, {local for _, local in placed}, gateways)
            if len(where) == len(placed) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        surplus: dict[int, list[int]] = {i: [] for i in range(len(clients))}
        for index, local in placed:
            pid = where.get(local)
            if pid is not None and held[pid] < quota:
                held[pid] += 1
            else:
                surplus[index].append(local)
        missing = quota * len(gateways) - sum(held.values())
        await asyncio.gather(*(clients[i].ask("close", kind="balancesim", ports=ports)
                               for i, ports in surplus.items() if ports))
        print(f"  sessions, attempt {attempt + 1}: " + ", ".join(f"gateway {pid} {n}" for pid, n in held.items())
              + f"; {missing} to place", flush=True)
    if missing:
        raise RuntimeError(f"could not spread {len(tokens)} sessions evenly over the gateways: {held}")
    return held


def gateway_sessions_by_status(data_dir: str) -> dict[int, int]:
    """Sessions per gateway pid, as the gateways' heartbeats tell ``cluster status --json``."""
    done = subprocess.run([sys.executable, "-m", "balancesim.cli", "cluster", "status", "--data-dir", data_dir,
                           "--json"], capture_output=True, text=True)
    try:
        status = json.loads(done.stdout)
    except ValueError:
        return {}
    return {g["pid"]: g["sessions"] for g in status.get("gateways", [])}


#: The processes that serve each side (charged as "server" CPU; the clients and driver are not).
SERVER_ROLES = {"balancesim": ("gateway", "shard", "redis", "supervisor"), "socketio": ("sio_server", "sio_redis")}


# -- one burst and its figures ----------------------------------------------------------------


@dataclass
class Burst:
    """One burst's figures."""

    side: str
    messages: int
    expected: int
    lost: int
    duplicates: int
    closed: int
    elapsed_s: float
    payload_bytes: int
    cpu_s: dict[str, float]
    load: str
    sessions: int = 0
    send_s: float = 0.0  # first send → last send answered (the deposits' 2xx, or the emits' publish)
    first_s: float = 0.0  # first send → first message received
    began_s: float = 0.0  # the first send, on CLOCK_MONOTONIC
    load_1m: float = 0.0  # the machine's 1-minute load average as the burst began

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def burst(side: str, clients: list[Child], roles: dict[str, list[int]], first: int, count: int,
                send: Any, *, idle_s: float, limit_s: float) -> Burst:
    """Arm the clients for ``count`` messages from sequence ``first``, ``send`` them, wait; the figures."""
    await asyncio.gather(*(c.ask("arm", kind=side, first=first, count=count) for c in clients))
    load_before, load_1m = load(), os.getloadavg()[0]
    before = role_cpu_s(roles)
    began = now_s()
    await send(first, count)
    sent = now_s()
    results = await asyncio.gather(*(c.ask("wait", idle_s=idle_s, limit_s=limit_s) for c in clients))
    after = role_cpu_s(roles)
    last = max(r["last_s"] for r in results)
    sessions = sum(r["sessions"] for r in results)
    return Burst(side=side, messages=sum(r["received"] for r in results), expected=count * sessions,
                 lost=sum(r["lost"] for r in results), duplicates=sum(r["duplicates"] for r in results),
                 closed=sum(r["closed"] for r in results), elapsed_s=max(last, sent) - began,
                 payload_bytes=sum(r["payload_bytes"] for r in results),
                 cpu_s={role: after[role] - before[role] for role in roles}, load=f"{load_before} → {load()}",
                 sessions=sessions, send_s=sent - began, began_s=began, load_1m=round(load_1m, 2),
                 first_s=min((r["first_s"] for r in results if r["first_s"]), default=began) - began)


def describe(b: Burst) -> str:
    per_msg = " ".join(f"{role} {seconds / max(b.messages, 1) * 1e6:.1f}" for role, seconds in b.cpu_s.items())
    cores = " ".join(f"{role} {seconds / b.elapsed_s:.2f}" for role, seconds in b.cpu_s.items())
    return (f"{b.messages:,}/{b.expected:,} messages to {b.sessions} sessions in {b.elapsed_s:.2f} s = "
            f"{b.rate:,.0f} msgs/s (the first arrived after {b.first_s * 1000:.0f} ms, the sends were "
            f"done after {b.send_s:.2f} s); lost {b.lost}, duplicates {b.duplicates}, "
            f"sessions closed {b.closed}; {b.payload_bytes / max(b.messages, 1):.0f} B/frame; {b.load}\n"
            f"      CPU µs per message: {per_msg}\n      cores busy: {cores}")


def py_spy(directory: str, side: str, pid: int) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` (every thread, not pausing it) into ``DIR/SIDE.txt``, collapsed stacks."""
    os.makedirs(directory, exist_ok=True)
    # pip puts py-spy beside the interpreter, which an unactivated venv leaves off PATH.
    binary = shutil.which("py-spy", path=os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", ""))))
    if binary is None:
        raise RuntimeError("--py-spy: py-spy not found (pip install py-spy)")
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--nonblocking", "--threads", "--format", "raw",
                             "--output", os.path.join(directory, f"{side}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the run -----------------------------------------------------------------------------------


async def create_accounts(url: str, admins: int, users: int) -> tuple[str, list[str], list[int]]:
    """The superadmin's token, ``admins`` admin accounts' tokens, and ``users`` users' ids."""
    boss = await Client.login(url, *SUPERADMIN)
    tokens: list[str] = []
    for start in range(0, admins, 32):
        names = [f"admin{i:05d}" for i in range(start, min(admins, start + 32))]
        await asyncio.gather(*(boss.create_user(name, ADMIN_PASSWORD, "admin") for name in names))
        logged = await asyncio.gather(*(Client.login(url, name, ADMIN_PASSWORD) for name in names))
        tokens += [c.token for c in logged if c.token]
    ids = [(await boss.create_user(f"payee{i:04d}", ADMIN_PASSWORD))["user_id"] for i in range(users)]
    assert boss.token is not None
    return boss.token, tokens, ids


def median_burst(bursts: list[Burst]) -> float:
    return statistics.median(b.rate for b in bursts)


async def run(args: argparse.Namespace, cluster: Deployment, data_dir: str, workdir: str) -> dict[str, Any]:
    started = time.monotonic()
    # Once, before the first client: Tornado keeps one HTTP client per loop, configured as it was first made.
    http = configure_http(max_clients=args.concurrency)
    boss, admin_tokens, payees = await create_accounts(cluster.url, min(args.admin_accounts, args.sessions),
                                                       args.deposit_users)
    placement = placement_of_data_dir(data_dir, None)
    shards = sorted({shard_of_user_id(placement, uid) for uid in payees})
    print(f"{len(admin_tokens)} admin accounts and {len(payees)} deposit accounts (on shards {shards}) in "
          f"{time.monotonic() - started:.1f} s; HTTP client: {http}", flush=True)
    if len(shards) < placement.shards:
        print(f"  NOTE: the deposits reach only shards {shards} of {placement.shards}: raise --deposit-users",
              flush=True)
    sio = await start_socketio(workdir)
    clients = [await Child.start("--client") for _ in range(args.client_procs)]
    try:
        port = int(cluster.url.rsplit(":", 1)[1])
        session_tokens = [admin_tokens[i % len(admin_tokens)] for i in range(args.sessions)]
        spread = await spread_over_gateways(clients, session_tokens, port, cluster.roles["gateway"])
        sio_targets = [{"port": sio.ports[i % 2], "path": "/socket.io/?EIO=4&transport=websocket"}
                       for i in range(args.sessions)]
        await asyncio.gather(*(c.ask("connect", kind="socketio", targets=sio_targets[i::len(clients)])
                               for i, c in enumerate(clients)))
        print(f"sessions open in {time.monotonic() - started:.1f} s: balancesim {spread} (by /proc); "
              f"socket.io {args.sessions} over ports {sio.ports}", flush=True)

        api = Client(cluster.url, token=boss)
        next_seq = [0]
        refusals: dict[str, int] = {}

        async def deposit(seq: int) -> None:
            # A 503 (refused, nothing sent) or a 504 (outcome open) is repeated with the same
            # key, as PROTOCOL.md says: the burst still delivers every message once, and the
            # refusals are counted and reported rather than ending the run.
            deadline_s, pause_s = now_s() + args.limit_seconds, 0.1
            while True:
                try:
                    await api.deposit(payees[seq % len(payees)], "1", description=f"fanout {seq}",
                                      key=f"fanout-{seq}")
                    return
                except ApiError as error:
                    if error.status not in (503, 504):
                        raise
                    refusals[f"{error.status} {error.message}"] = refusals.get(f"{error.status} {error.message}", 0) + 1
                    if now_s() > deadline_s:
                        raise RuntimeError(f"deposit fanout {seq}: still refused after {args.limit_seconds:g} s: "
                                           f"{error.status} {error.message}") from None
                    await asyncio.sleep(pause_s)
                    pause_s = min(pause_s * 2, 1.0)

        async def deposits(first: int, count: int) -> None:
            await asyncio.gather(*(deposit(first + i) for i in range(count)))

        padded: dict[str, Any] = {}

        in_flight = asyncio.Semaphore(args.concurrency)

        async def emit_one(seq: int) -> None:
            # As many in flight as the deposits have HTTP connections: the same offered load.
            async with in_flight:
                await sio.emitter.emit(EVENT, {**padded, "description": f"fanout {seq}"}, namespace="/")

        async def emits(first: int, count: int) -> None:
            await asyncio.gather(*(emit_one(first + i) for i in range(count)))

        bs_roles = {role: cluster.roles[role] for role in SERVER_ROLES["balancesim"]}
        sio_roles = sio.roles
        client_pids = {"client": [c.pid for c in clients], "driver": [os.getpid()]}

        async def one(side: str, count: int, profile: bool = False) -> Burst:
            roles = {**(bs_roles if side == "balancesim" else sio_roles), **client_pids}
            first, next_seq[0] = next_seq[0], next_seq[0] + count
            spy = py_spy(args.py_spy, side, roles["gateway" if side == "balancesim" else "sio_server"][0]) \
                if profile and args.py_spy else None
            try:
                return await burst(side, clients, roles, first, count, deposits if side == "balancesim" else emits,
                                   idle_s=args.idle_seconds, limit_s=args.limit_seconds)
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                    spy.wait(30)

        # Warm-up: every path once (and the frame size the socket.io messages must match).
        warm = await one("balancesim", args.warmup)
        sample = await clients[0].ask("sample", kind="balancesim")
        if sample is None:
            raise RuntimeError(f"no admin_balance_monitor frame arrived in the warm-up: {describe(warm)}")
        frame_bytes = len(sample.encode())
        padded.update(pad_to(json.loads(sample), frame_bytes))
        print(f"warm-up, balancesim: {describe(warm)}\n  a frame ({frame_bytes} B): {sample}", flush=True)
        warm = await one("socketio", args.warmup)
        print(f"warm-up, socket.io: {describe(warm)}\n  a frame: "
              f"{await clients[0].ask('sample', kind='socketio')}", flush=True)

        rounds: dict[str, list[Burst]] = {"balancesim": [], "socketio": []}
        for number in range(args.rounds):
            # Alternate which side goes first, so a drift in the neighbours' load is shared.
            order = ("balancesim", "socketio") if number % 2 == 0 else ("socketio", "balancesim")
            for side in order:
                result = await one(side, args.burst, profile=number == 0)
                rounds[side].append(result)
                print(f"round {number + 1}, {side}: {describe(result)}", flush=True)
        if status := gateway_sessions_by_status(data_dir):
            print(f"cluster status --json, sessions per gateway: {status}", flush=True)
        await asyncio.gather(*(c.ask("quit") for c in clients))
        if refusals:
            print(f"deposits refused and repeated with their key: {refusals}", flush=True)
        return {"rounds": rounds, "frame_bytes": frame_bytes, "spread": spread, "status": status,
                "refusals": sum(refusals.values())}
    finally:
        for client in clients:
            if client.process.returncode is None:
                client.process.kill()
            await client.process.wait()
        await sio.stop()


def pad_to(sample: dict[str, Any], frame_bytes: int) -> dict[str, Any]:
    """The balancesim message's fields, less ``type`` (socket.io sends the event name instead), with a
    ``pad`` field that makes the socket.io frame ``42["admin_balance_monitor",{…}]`` ``frame_bytes`` long.

    python-socketio encodes with compact separators; the sequence number's digits vary, so
    the length is matched for the sample's own description.
    """
    data = {key: value for key, value in sample.items() if key != "type"}
    data["pad"] = ""
    frame = "42" + json.dumps([EVENT, data], separators=(",", ":"))
    data["pad"] = "x" * max(0, frame_bytes - len(frame.encode()))
    return data


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rounds = result["rounds"]
    bs, sio = rounds["balancesim"], rounds["socketio"]
    out: dict[str, Any] = {
        "cluster_fanout_msgs_per_s": round(median_burst(bs)),
        "socketio_redis_msgs_per_s": round(median_burst(sio)),
    }
    out["ratio"] = round(out["cluster_fanout_msgs_per_s"] / max(out["socketio_redis_msgs_per_s"], 1), 2)
    out["cluster_lost"] = sum(b.lost for b in bs)
    out["socketio_lost"] = sum(b.lost for b in sio)
    out["cluster_duplicates"] = sum(b.duplicates for b in bs)
    out["socketio_duplicates"] = sum(b.duplicates for b in sio)
    out["cluster_deposit_refusals"] = result["refusals"]
    out["frame_bytes"] = result["frame_bytes"]
    out["sessions"] = args.sessions
    out["burst"] = args.burst
    out["rounds"] = args.rounds
    out["cluster_rates"] = [round(b.rate) for b in bs]
    out["socketio_rates"] = [round(b.rate) for b in sio]
    for side, bursts, prefix in (("balancesim", bs, "cluster"), ("socketio", sio, "socketio")):
        messages = sum(b.messages for b in bursts)
        for role in bursts[0].cpu_s:
            out[f"{prefix}_{role}_cpu_us"] = round(sum(b.cpu_s[role] for b in bursts) / max(messages, 1) * 1e6, 2)
    # The serving side's CPU per message (the clients and the driver left out): on a
    # machine shared with others the rates follow the neighbours, this much less.
    out["cluster_server_cpu_us"] = round(sum(out[f"cluster_{role}_cpu_us"] for role in SERVER_ROLES["balancesim"]), 2)
    out["socketio_server_cpu_us"] = round(sum(out[f"socketio_{role}_cpu_us"] for role in SERVER_ROLES["socketio"]), 2)
    out["cpu_ratio"] = round(out["socketio_server_cpu_us"] / max(out["cluster_server_cpu_us"], 1e-9), 2)
    out["load_avg_1m"] = [b.load_1m for b in sorted(bs + sio, key=lambda b: b.began_s)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="admin sessions per side, half per gateway")
    parser.add_argument("--burst", type=int, default=100, help="deposits (emits) per timed burst")
    parser.add_argument("--rounds", type=int, default=3, help="timed bursts per side, alternating")
    parser.add_argument("--warmup", type=int, default=20, help="deposits (emits) in each side's warm-up burst")
    parser.add_argument("--admin-accounts", type=int, default=100,
                        help="admin accounts the sessions log in as (round robin); the fan-out costs per session, "
                             "not per account, and each account costs setup time")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--deposit-users", type=int, default=20, help="accounts the deposits cycle over")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="deposits in flight (HTTP connections), and emits in flight")
    parser.add_argument("--idle-seconds", type=float, default=10, help="give up on a burst after this long quiet")
    parser.add_argument("--limit-seconds", type=float, default=120, help="give up on a burst after this long")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="profile one gateway and one socket.io server over each side's first timed burst "
                             "with py-spy (pip install py-spy) into DIR/balancesim.txt and DIR/socketio.txt "
                             "(collapsed stacks); sampling costs the profiled process a little CPU")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socketio-server", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main())
        return
    if args.socketio_server:
        asyncio.run(socketio_server_main(args.socketio_server))
        return
    if shutil.which("redis-server") is None:
        print("benchmarks/fanout_cluster.py: redis-server not found: apt-get install -y redis-server", file=sys.stderr)
        sys.exit(2)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fanout-") as workdir:
        cluster = start_cluster(workdir, (*SERVE_ARGS, "--time-scale", str(TIME_SCALE)))
        data_dir = os.path.dirname(cluster.ledgers[0])
        try:
            result = asyncio.run(run(args, cluster, data_dir, workdir))
        except BaseException:
            # The cluster's log goes with the temporary directory: show its end first.
            print(f"the cluster's log, last lines:\n{cluster.log()[-4000:]}", file=sys.stderr)
            raise
        finally:
            code = cluster.stop()
    summary = summarize(result, args)
    print(f"balancesim serve --workers 2 --shards 2 (exit {code} on SIGTERM): {summary['cluster_rates']} msgs/s; "
          f"socket.io AsyncRedisManager × 2 servers: {summary['socketio_rates']} msgs/s; median ratio "
          f"{summary['ratio']:.2f} (target ≥ 1.0); server CPU per message {summary['cluster_server_cpu_us']} µs / "
          f"{summary['socketio_server_cpu_us']} µs (socket.io ÷ balancesim {summary['cpu_ratio']:.2f}); "
          f"lost {summary['cluster_lost']} / {summary['socketio_lost']}; "
          f"whole run {time.monotonic() - began:.0f} s", flush=True)
    emit(summary)
    if summary["cluster_lost"] or summary["socketio_lost"] or code != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
