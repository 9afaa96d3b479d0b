"""Faults and abuse against real servers: crashes, shutdowns, storage errors, hostile clients."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from tornado.testing import gen_test

from balancesim.chaos import run_trials
from balancesim.client import ApiError, Client
from balancesim.reports import verify
from tests.gateway_harness import GatewayCase
from tests.serve_process import serve  # noqa: F401 - fixture


def test_five_kill_and_restart_trials_lose_nothing_acknowledged():
    results = asyncio.run(run_trials(5, users=5, seed=7))
    assert [r.problems for r in results] == [[]] * 5
    assert sum(r.acknowledged for r in results) > 200


def test_sigterm_under_load_completes_or_cleanly_refuses_every_request_and_closes_sessions_with_1001(serve):
    server = serve("--demo", "--password-cost", "1024")

    async def scenario():
        boss = await Client.login(server.url, "superadmin", "superadmin123")
        alice = await Client.login(server.url, "alice", "alice123")
        session = await alice.session()
        acknowledged, refused, bad = [], 0, []

        async def hammer():
            nonlocal refused
            while True:
                try:
                    acknowledged.append(await boss.deposit(alice.user_id, "1"))
                except ApiError as error:
                    if error.status >= 500 and error.code != "storage_unavailable":
                        bad.append(error)
                    refused += 1
                except Exception:  # noqa: BLE001 - connection refused or closed: a clean refusal
                    refused += 1
                    return

        workers = [asyncio.ensure_future(hammer()) for _ in range(8)]
        while len(acknowledged) < 50:
            await asyncio.sleep(0.01)
        session._closing = True  # record the close; do not reconnect
        code = await asyncio.get_running_loop().run_in_executor(None, server.stop)
        await asyncio.gather(*workers)
        close_code = session._conn.close_code
        return code, acknowledged, refused, bad, close_code

    code, acknowledged, refused, bad, close_code = asyncio.run(scenario())
    assert code == 0 and bad == [] and refused >= 1
    assert close_code == 1001
    report = verify(server.db)
    assert report.ok, report.text()
    with sqlite3.connect(server.db) as conn:
        stored = {row[0] for row in conn.execute("SELECT transaction_id FROM transactions")}
    assert {tx["transaction_id"] for tx in acknowledged} <= stored


class StorageFaults(GatewayCase):
    @gen_test
    async def test_a_failing_write_is_503_storage_unavailable_changes_nothing_and_recovers(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        ws = await self.session(alice)
        self.engine.ledger.inject_fault(sqlite3.OperationalError("disk I/O error"))
        status, body = await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"}, boss["token"])
        assert (status, body["error"]["code"]) == (503, "storage_unavailable")
        assert await self.until_pong(ws) == []
        assert self.engine.balance(alice["user_id"])["balances"]["USDT"] == "10"
        self.engine.ledger.inject_fault(None)
        status, body = await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"}, boss["token"])
        assert status == 201 and body["transaction"]["version"] == 2


class Abuse(GatewayCase):
    @gen_test
    async def test_a_user_cannot_reach_another_account_through_any_route_or_parameter(self):
        alice = await self.account("alice", usdt="100")
        bob = await self.account("bob", usdt="100")
        b = bob["user_id"]
        bob_ws = await self.session(bob)
        before = self.engine.balance(b)
        attempts = [
            ("GET", f"/api/users/{b}/balance", None), ("GET", f"/api/users/{b}/transactions", None),
            ("GET", f"/api/balance?user_id={b}", None), ("GET", f"/api/transactions?user_id={b}", None),
            ("GET", f"/api/options?user_id={b}", None),
            ("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "1", "duration": 30, "user_id": b}),
            ("POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "buy", "quantity": "0.0001", "user_id": b}),
            ("PUT", f"/api/admin/controls/{b}", {"mode": "lose"}),
            ("POST", "/api/admin/withdrawals", {"user_id": b, "amount": "1"}),
        ]
        for method, path, body in attempts:
            status, answer = await self.call(method, path, body, alice["token"])
            if status < 300:
                assert b not in {answer.get("user_id")} | {t.get("user_id") for t in answer.get("transactions", [])}, path
        assert self.engine.balance(b) == before
        assert await self.until_pong(bob_ws) == []
        ws = await self.connect(f"{alice['token']}&user_id={b}")
        assert (await self.receive(ws))["user_id"] == alice["user_id"]

    @gen_test
    async def test_an_oversized_body_is_refused_with_413_before_it_is_read(self):
        alice = await self.account("alice")
        stream = await self.wait(self._raw_connection())
        await stream.write(
            f"POST /api/options HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice['token']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {200 * 1024 * 1024}\r\n\r\n".encode()
        )
        head = await self.wait(stream.read_until(b"\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 413")
        stream.close()

    async def _raw_connection(self):
        from tornado.tcpclient import TCPClient

        return await TCPClient().connect("127.0.0.1", self.get_http_port())


def test_hundreds_of_sessions_stay_isolated_while_one_never_reads(serve):
    """Users' sessions see only their own account; a stalled admin session is cut off, nobody waits."""
    server = serve("--demo", "--password-cost", "1024", "--time-scale", "0.05")

    async def scenario():
        boss = await Client.login(server.url, "superadmin", "superadmin123")
        made = []
        for i in range(200):
            user = await boss.create_user(f"iso{i}", "pw")
            made.append(user)
        clients = await asyncio.gather(*(Client.login(server.url, f"iso{i}", "pw") for i in range(200)))
        sessions = await asyncio.gather(*(c.session() for c in clients))
        stalled = await _stalled_admin(server, boss)
        rss_before = _rss_mb(server)
        for round_ in range(25):
            await asyncio.gather(*(boss.deposit(u["user_id"], "1", description="x" * 400) for u in made))
        await asyncio.gather(*(s.barrier(30) for s in sessions))
        growth_mb = _rss_mb(server) - rss_before
        problems = [p for s in sessions for p in s.problems]
        foreign = [m for c, s in zip(clients, sessions) for m in s.messages
                   if m.get("type") == "balance_update" and m["user_id"] != c.user_id]
        delivered = sum(1 for s in sessions for m in s.messages if m.get("type") == "balance_update")
        metrics = (await boss.http.fetch(f"{server.url}/metrics")).body.decode()
        stalled.close()
        for s in sessions:
            await s.close()
        return problems, foreign, delivered, metrics, growth_mb

    problems, foreign, delivered, metrics, growth_mb = asyncio.run(scenario())
    assert problems == [] and foreign == []
    assert growth_mb < 64, f"server memory grew {growth_mb:.0f} MiB while a session stalled"
    assert delivered == 200 * 25
    assert "balancesim_sessions_closed_slow_total 1.0" in metrics


def _rss_mb(server) -> float:
    with open(f"/proc/{server.process.pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


async def _stalled_admin(server, boss):
    """An admin session on a raw socket that completes the handshake and never reads again."""
    import base64
    import os
    import socket

    await boss.create_user("staller", "pw", "admin")
    staller = await Client.login(server.url, "staller", "pw")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall(f"GET /ws?token={staller.token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    return raw
