"""WebSocket sessions: who receives what, replay across the seam, slow readers, bad frames."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from tornado.httpclient import HTTPClientError
from tornado.testing import gen_test
from tornado.websocket import websocket_connect

from balancesim.actors import as_asyncio
from balancesim.gateway import Principal, TokenStore
from tests.gateway_harness import WAIT_S, GatewayCase


class Routing(GatewayCase):
    async def three(self):
        self.boss = await self.account("boss", "superadmin")
        self.admin = await self.account("admin", "admin")
        self.alice = await self.account("alice", usdt="100")
        self.bob = await self.account("bob", usdt="100")
        self.ws = {name: await self.session(getattr(self, name)) for name in ("alice", "bob", "admin")}

    async def seen(self):
        return {name: await self.until_pong(ws) for name, ws in self.ws.items()}

    @gen_test
    async def test_a_deposit_reaches_its_owner_and_the_admin_monitor_and_nobody_else(self):
        await self.three()
        status, body = await self.call("POST", "/api/admin/deposits", {"user_id": self.alice["user_id"], "amount": "5", "description": "gift"}, self.boss["token"])
        assert status == 201
        seen = await self.seen()
        (update,) = seen["alice"]
        assert update == {
            "type": "balance_update", "user_id": self.alice["user_id"], "asset": "USDT", "balance": "105",
            "change": "5", "change_type": "deposit", "description": "gift",
            "transaction_id": body["transaction"]["transaction_id"], "version": 2, "metadata": {},
            "ts": body["transaction"]["ts"],
        }
        assert seen["bob"] == []
        (monitor,) = seen["admin"]
        assert monitor == {**update, "type": "admin_balance_monitor", "username": "alice"}

    @gen_test
    async def test_control_changes_and_trades_reach_the_owner_and_admins_only(self):
        await self.three()
        await self.call("PUT", f"/api/admin/controls/{self.alice['user_id']}", {"mode": "win"}, self.boss["token"])
        seen = await self.seen()
        expected = {"type": "trading_control_update", "user_id": self.alice["user_id"], "mode": "win", "set_by": self.boss["user_id"]}
        assert [{k: m[k] for k in expected} for m in seen["alice"]] == [expected]
        assert [m["type"] for m in seen["admin"]] == ["trading_control_update"]
        assert seen["bob"] == []

        status, opened = await self.call("POST", "/api/options", {"symbol": "ETHUSDT", "direction": "down", "amount": "10", "duration": 30}, self.alice["token"])
        self.engine.advance(30)
        seen = await self.seen()
        assert [m["type"] for m in seen["alice"]] == ["balance_update", "trade_update", "balance_update", "trade_update"]
        settled = seen["alice"][-1]["trade"]
        assert (settled["trade_id"], settled["status"], settled["decided_by"]) == (opened["trade"]["trade_id"], "won", "control_mode:win")
        assert seen["alice"][2]["change"] == "11" and seen["alice"][2]["version"] == 3
        assert [m["type"] for m in seen["admin"]] == ["admin_balance_monitor", "trade_update", "admin_balance_monitor", "trade_update"]
        assert seen["bob"] == []

    @gen_test
    async def test_price_ticks_reach_every_session(self):
        await self.three()
        self.engine.advance(1)
        for ws in self.ws.values():
            ticks = [m for m in await self.until_pong(ws, ticks=True) if m["type"] == "price_tick"]
            assert len(ticks) == 1 and set(ticks[0]["prices"]) == {"BTCUSDT", "ETHUSDT"}

    @gen_test
    async def test_the_init_message_has_the_protocol_fields(self):
        alice = await self.account("alice", usdt="3")
        ws = await self.connect(alice["token"])
        init = await self.receive(ws)
        assert set(init) == {"type", "user_id", "balances", "version", "control_mode", "ts"}
        assert (init["balances"]["USDT"], init["version"], init["control_mode"]) == ("3", 1, "normal")


class Replay(GatewayCase):
    @gen_test
    async def test_replay_with_since_meets_live_updates_with_no_gap_and_no_duplicate(self):
        alice = await self.account("alice")
        for _ in range(5):
            self.engine.deposit(alice["user_id"], "1").get(timeout=WAIT_S)
        total = 200

        async def keep_depositing():
            for _ in range(total - 5):
                await as_asyncio(self.engine.deposit(alice["user_id"], "1"))

        writer = asyncio.ensure_future(keep_depositing())
        await asyncio.sleep(0)
        ws = await self.connect(alice["token"], since=2)
        init = await self.receive(ws)
        assert init["type"] == "user_balance_init"
        versions = []
        while not versions or versions[-1] < total:
            message = await self.receive(ws)
            if message["type"] == "balance_update":
                versions.append(message["version"])
        await writer
        assert versions == list(range(3, total + 1))
        assert await self.until_pong(ws) == []

    @gen_test
    async def test_without_since_only_updates_after_the_snapshot_arrive(self):
        alice = await self.account("alice", usdt="10")
        ws = await self.connect(alice["token"])
        init = await self.receive(ws)
        self.engine.deposit(alice["user_id"], "1").get(timeout=WAIT_S)
        assert [m["version"] for m in await self.until_pong(ws)] == [init["version"] + 1]


CLOSED_SLOW = (4008).to_bytes(2, "big") + b"too slow"


class SlowReader(GatewayCase):
    app_options = {"max_pending_bytes": 32 * 1024, "send_buffer_bytes": 8 * 1024}

    def stalled_socket(self, token: str) -> socket.socket:
        """A WebSocket handshake on a raw socket with a tiny receive window, then never a read."""
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", self.get_http_port()))
        key = base64.b64encode(os.urandom(16)).decode()
        raw.sendall(
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return raw

    @gen_test(timeout=30)
    async def test_a_reader_that_keeps_up_receives_many_times_the_bound_and_stays_open(self):
        boss = await self.account("boss", "superadmin")
        watcher = await self.account("watcher", "admin")
        alice = await self.account("alice")
        ws = await self.session(watcher)
        sent_bytes = 0
        for _ in range(200):
            await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "1", "description": "x" * 400}, boss["token"])
            while (message := await self.receive(ws))["type"] != "admin_balance_monitor":
                pass
            sent_bytes += len(json.dumps(message))
        assert sent_bytes > 2 * self.app_options["max_pending_bytes"]
        assert self.ctx.metrics.slow_closed._value.get() == 0
        assert self.ctx.hub.counts()["admins"] == 1

    @gen_test(timeout=30)
    async def test_a_stalled_reader_is_closed_with_4008_while_a_normal_reader_keeps_receiving(self):
        boss = await self.account("boss", "superadmin")
        watcher = await self.account("watcher", "admin")
        staller = await self.account("staller", "admin")
        alice = await self.account("alice")
        raw = self.stalled_socket(staller["token"])
        ws = await self.session(watcher)
        while self.ctx.hub.counts()["admins"] < 2:
            await asyncio.sleep(0.01)
        received = 0
        for i in range(300):
            await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "1", "description": "x" * 400}, boss["token"])
            while True:
                message = await self.receive(ws)
                if message["type"] == "admin_balance_monitor":
                    received += 1
                    break
            if self.ctx.metrics.slow_closed._value.get() >= 1:
                break
        assert self.ctx.metrics.slow_closed._value.get() == 1, "the stalled session was closed"
        assert self.ctx.hub.counts()["admins"] == 1
        await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "1"}, boss["token"])
        assert [m["type"] for m in await self.until_pong(ws)] == ["admin_balance_monitor"]
        assert received == i + 1
        raw.setblocking(False)
        data = b""
        while True:
            try:
                chunk = raw.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not chunk:
                break
            data += chunk
            if CLOSED_SLOW in data:
                break
        raw.close()
        assert CLOSED_SLOW in data


class Frames(GatewayCase):
    @gen_test
    async def test_bad_frames_get_an_error_and_the_connection_stays_open(self):
        alice = await self.account("alice")
        ws = await self.session(alice)
        for frame, code in [("not json", "invalid_json"), ('{"type": "subscribe"}', "invalid_request"),
                            ("[1, 2]", "invalid_request"), (b"\x00\x01", "invalid_request"),
                            ('"' + "x" * (65 * 1024) + '"', "invalid_request")]:
            ws.write_message(frame, binary=isinstance(frame, bytes))
            message = await self.receive(ws)
            assert (message["type"], message["code"]) == ("error", code) and message["message"]
        ws.write_message(json.dumps({"type": "ping"}))
        assert (await self.receive(ws))["type"] == "pong"

    @gen_test
    async def test_a_bad_or_missing_token_is_refused_at_the_handshake_with_401(self):
        for query in ("", "?token=nope", "?token="):
            with pytest.raises(HTTPClientError) as refused:
                await websocket_connect(self.get_url(f"/ws{query}").replace("http", "ws", 1))
            assert refused.value.code == 401
        alice = await self.account("alice")
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(self.get_url(f"/ws?token={alice['token']}&since=-4").replace("http", "ws", 1))
        assert refused.value.code == 400


def test_tokens_expire(tmp_path):
    from balancesim.actors import connect, create_schema

    create_schema(connect(str(tmp_path / "t.db")))
    store = TokenStore(str(tmp_path / "t.db"), ttl_s=-1)
    token = store.issue(Principal(1, "alice", "user"))
    assert store.check_blocking(token) is None
    fresh = TokenStore(str(tmp_path / "t.db"))
    assert fresh.check_blocking(fresh.issue(Principal(1, "alice", "user"))) == Principal(1, "alice", "user")


def test_serve_prints_its_address_answers_healthz_and_exits_0_on_sigterm(tmp_path):
    import urllib.request

    process = subprocess.Popen(
        [sys.executable, "-m", "balancesim.cli", "serve", "--port", "0", "--db", str(tmp_path / "s.db"), "--demo"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        while not (line := process.stdout.readline()).startswith("listening on "):
            assert line, f"serve exited early: {lines}"
            lines.append(line)
        assert any("demo: created superadmin" in l for l in lines)
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/healthz", timeout=WAIT_S) as response:
            assert json.loads(response.read()) == {"status": "ok"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
