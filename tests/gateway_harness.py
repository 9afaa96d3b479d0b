"""A real gateway on an ephemeral port, with HTTP and WebSocket helpers for tests."""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

import pykka
from tornado.httpclient import HTTPClientError
from tornado.testing import AsyncHTTPTestCase
from tornado.websocket import WebSocketClientConnection, websocket_connect

from balancesim.actors import VirtualClock
from balancesim.engine import Engine
from balancesim.gateway import make_app

WAIT_S = 5


class GatewayCase(AsyncHTTPTestCase):
    """An engine on a temporary ledger (virtual clock) behind ``make_app``."""

    app_options: dict[str, Any] = {}

    def get_app(self):
        self.tmp = tempfile.mkdtemp()
        self.engine = Engine(f"{self.tmp}/ledger.db", clock=VirtualClock(), password_cost=2).start()
        self.sockets: list[WebSocketClientConnection] = []
        self.app = make_app(self.engine, **self.app_options)
        self.ctx = self.app.settings["ctx"]
        return self.app

    def tearDown(self):
        for ws in self.sockets:
            ws.close()
        self.app.close()
        super().tearDown()
        self.engine.stop()
        pykka.ActorRegistry.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- HTTP ----------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """``(status, parsed JSON)``, for any status."""
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            response = await self.http_client.fetch(
                self.get_url(path), method=method, body=data, headers=all_headers,
                allow_nonstandard_methods=True, raise_error=True,
            )
        except HTTPClientError as error:
            response = error.response
        return response.code, json.loads(response.body) if response.body else None

    async def login(self, username: str, password: str | None = None) -> dict[str, Any]:
        status, body = await self.call("POST", "/api/login", {"username": username, "password": password or f"{username}-pw"})
        assert status == 200, body
        return body

    async def account(self, username: str, role: str = "user", usdt: str | None = None) -> dict[str, Any]:
        """Create, fund and log in an account; its login body plus ``username``."""
        user_id = self.engine.create_user(username, f"{username}-pw", role).get(timeout=WAIT_S)["user_id"]
        self.ctx.hub.remember(user_id, username)
        if usdt:
            self.engine.deposit(user_id, usdt).get(timeout=WAIT_S)
        return {**await self.login(username), "username": username}

    # -- WebSocket -----------------------------------------------------------------

    async def connect(self, token: str, since: int | None = None) -> WebSocketClientConnection:
        url = self.get_url(f"/ws?token={token}" + ("" if since is None else f"&since={since}"))
        ws = await websocket_connect(url.replace("http", "ws", 1))
        self.sockets.append(ws)
        return ws

    async def receive(self, ws: WebSocketClientConnection) -> dict[str, Any]:
        message = await self.wait(ws.read_message())
        assert message is not None, f"closed with {ws.close_code}"
        return json.loads(message)

    async def session(self, user: dict[str, Any], since: int | None = None) -> WebSocketClientConnection:
        """A connected session whose ``user_balance_init`` has been read."""
        ws = await self.connect(user["token"], since)
        assert (await self.receive(ws))["type"] == "user_balance_init"
        return ws

    async def until_pong(self, ws: WebSocketClientConnection, *, ticks: bool = False) -> list[dict[str, Any]]:
        """Everything received before the answer to a ping sent now (price ticks left out)."""
        ws.write_message(json.dumps({"type": "ping"}))
        seen = []
        while (message := await self.receive(ws))["type"] != "pong":
            if ticks or message["type"] != "price_tick":
                seen.append(message)
        return seen

    async def wait(self, awaitable):
        import asyncio

        return await asyncio.wait_for(awaitable, WAIT_S)
