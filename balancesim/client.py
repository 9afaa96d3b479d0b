"""An async client of the balancesim protocol, for scripts, scenarios and load.

Built on Tornado's ``AsyncHTTPClient`` and ``websocket_connect``; one IOLoop
drives thousands of them. Example::

    import asyncio
    from balancesim.client import Client

    async def main():
        boss = await Client.login("http://127.0.0.1:3000", "superadmin", "superadmin123")
        alice = await Client.login("http://127.0.0.1:3000", "alice", "alice123")
        session = await alice.session()                  # live, checked for order and gaps
        await boss.deposit(alice.user_id, "25", description="gift")
        update = await session.wait_for("balance_update")
        print(update["balance"], session.problems)       # problems: [] when in order
        await session.close()

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import WebSocketClientConnection, websocket_connect

__all__ = ["ApiError", "Client", "LoginRefused", "Session", "Stream", "Unreachable", "OWN_TYPES", "configure_http", "out_of_sync"]

OWN_TYPES = ("balance_update", "trade_update", "trading_control_update")
UNAUTHORIZED_CLOSE = 4001
RECONNECT_ATTEMPTS = 50


def configure_http(max_clients: int) -> str:
    """Use libcurl (keep-alive) when pycurl is installed, else Tornado's own client.

    Tornado's simple client opens a TCP connection per request; with many clients on
    few cores those connects cost more than the requests. Returns the client's name.
    """
    try:
        import pycurl  # noqa: F401
    except ImportError:
        AsyncHTTPClient.configure(None, max_clients=max_clients)
        return "simple"
    AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient", max_clients=max_clients)
    return "curl"


class Unreachable(ConnectionError):
    """No answer from the server at all: refused, reset or timed out."""

    def __init__(self, base_url: str, reason: Exception) -> None:
        super().__init__(f"cannot reach {base_url}: {reason}")
        self.base_url = base_url


class ApiError(Exception):
    """A 4xx/5xx answer: ``status``, PROTOCOL.md ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class LoginRefused(ApiError):
    """``/api/login`` said no (401 wrong credentials, 429 too many tries): which user, where."""

    def __init__(self, base_url: str, username: str, error: ApiError) -> None:
        super().__init__(error.status, error.code, error.message)
        self.base_url, self.username = base_url, username


class Client:
    """One logged-in principal.

    Args:
        base_url: e.g. ``http://127.0.0.1:3000``.
        token: a Bearer token from ``/api/login``.
        user_id: the principal's account.
        role: ``user``, ``admin`` or ``superadmin``.
    """

    def __init__(self, base_url: str, token: str | None = None, user_id: int | None = None, role: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token, self.user_id, self.role = token, user_id, role
        self.http = AsyncHTTPClient()

    @classmethod
    async def login(cls, base_url: str, username: str, password: str) -> Client:
        """Log in; raises ``LoginRefused`` (an ``ApiError``: 401, 429) on refusal."""
        client = cls(base_url)
        try:
            body = await client.request("POST", "/api/login", {"username": username, "password": password})
        except ApiError as error:
            raise LoginRefused(client.base_url, username, error) from None
        client.token, client.user_id, client.role = body["token"], body["user_id"], body["role"]
        return client

    async def request(self, method: str, path: str, body: Any = None, *, key: str | None = None,
                      timing: Callable[[float], None] | None = None) -> Any:
        """One API call; the parsed JSON answer, or ``ApiError``."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if key:
            headers["Idempotency-Key"] = key
        started = time.perf_counter()
        try:
            response = await self.http.fetch(
                self.base_url + path, method=method, headers=headers, allow_nonstandard_methods=True,
                body=None if body is None else json.dumps(body), request_timeout=60,
            )
        except OSError as error:
            raise Unreachable(self.base_url, error) from None
        except HTTPClientError as error:
            if error.response is None:
                # No answer at all (libcurl reports refusals as 599): the server is unreachable.
                raise Unreachable(self.base_url, error) from None
            try:
                detail = json.loads(error.response.body)["error"]
            except (ValueError, KeyError, TypeError):
                detail = {"code": "http_error", "message": str(error)}
            raise ApiError(error.code, detail["code"], detail["message"]) from None
        finally:
            if timing is not None:
                timing(time.perf_counter() - started)
        return json.loads(response.body) if response.body else None

    # -- operations (PROTOCOL.md's table) ------------------------------------------

    # Every operation takes ``key=`` (an Idempotency-Key) and ``timing=`` (a callback
    # given the call's seconds), and raises ``ApiError`` on a refusal.

    async def create_user(self, username: str, password: str, role: str = "user", **kw: Any) -> dict:
        """Admin+: ``{user_id, username, role}``; a taken name is ``409 conflict``."""
        return await self.request("POST", "/api/users", {"username": username, "password": password, "role": role}, **kw)

    async def users(self) -> list[dict]:
        """Admin+: every account with its balances, version and control mode."""
        return (await self.request("GET", "/api/users"))["users"]

    async def balance(self, user_id: int | None = None) -> dict:
        """``{user_id, balances, version, control_mode}``: one's own, or (admin+) any account's."""
        return await self.request("GET", "/api/balance" if user_id is None else f"/api/users/{user_id}/balance")

    async def transactions(self, user_id: int | None = None, after_version: int = 0, limit: int = 100) -> list[dict]:
        """Entries above ``after_version``, oldest first: one's own, or (admin+) any account's."""
        path = "/api/transactions" if user_id is None else f"/api/users/{user_id}/transactions"
        return (await self.request("GET", f"{path}?after_version={after_version}&limit={limit}"))["transactions"]

    async def deposit(self, user_id: int, amount: str, asset: str = "USDT", description: str = "", **kw: Any) -> dict:
        """Superadmin: credit ``amount`` (a decimal string); the ``Transaction``."""
        return await self._money("deposits", user_id, amount, asset, description, **kw)

    async def withdraw(self, user_id: int, amount: str, asset: str = "USDT", description: str = "", **kw: Any) -> dict:
        """Superadmin: debit ``amount``; the ``Transaction`` (``409 insufficient_funds`` if short)."""
        return await self._money("withdrawals", user_id, amount, asset, description, **kw)

    async def adjust(self, user_id: int, amount: str, asset: str = "USDT", description: str = "adjustment", **kw: Any) -> dict:
        """Superadmin: a signed correction (``"-0.5"``); never below zero."""
        return await self._money("adjustments", user_id, amount, asset, description, **kw)

    async def _money(self, kind: str, user_id: int, amount: str, asset: str, description: str, **kw: Any) -> dict:
        body = {"user_id": user_id, "amount": amount, "asset": asset, "description": description}
        return (await self.request("POST", f"/api/admin/{kind}", body, **kw))["transaction"]

    async def set_control(self, user_id: int, mode: str, **kw: Any) -> dict:
        """Superadmin: ``normal``, ``win`` or ``lose`` for the account's next settlements."""
        return await self.request("PUT", f"/api/admin/controls/{user_id}", {"mode": mode}, **kw)

    async def force(self, trade_id: str, outcome: str, **kw: Any) -> dict:
        """Admin+: fix an open trade's outcome (``win``/``lose``) at expiry; the ``Trade``."""
        return (await self.request("POST", f"/api/admin/trades/{trade_id}/force", {"outcome": outcome}, **kw))["trade"]

    async def open_option(self, symbol: str, direction: str, amount: str, duration: int, **kw: Any) -> dict:
        """Stake ``amount`` USDT on ``symbol`` going ``up``/``down`` for 30 or 60 s; the open ``Trade``."""
        body = {"symbol": symbol, "direction": direction, "amount": amount, "duration": duration}
        return (await self.request("POST", "/api/options", body, **kw))["trade"]

    async def options(self, status: str | None = None) -> list[dict]:
        """One's own trades, ``open`` or ``settled`` or both."""
        return (await self.request("GET", "/api/options" + (f"?status={status}" if status else "")))["trades"]

    async def spot(self, symbol: str, side: str, quantity: str, **kw: Any) -> dict:
        """Buy or sell ``quantity`` at the market price; the order with both legs' transactions."""
        body = {"symbol": symbol, "side": side, "quantity": quantity}
        return (await self.request("POST", "/api/spot/orders", body, **kw))["order"]

    async def market(self) -> dict:
        """``{prices, ts}``."""
        return await self.request("GET", "/api/market")

    async def session(self, since: int | None = None) -> Session:
        """A connected WebSocket session (``user_balance_init`` received)."""
        session = Session(self, since)
        await session.connect()
        return session


class Stream:
    """The messages one session received, checked as they arrive.

    ``problems`` lists every gap or duplicate in the account's own versions and
    every event of another account that reached a ``user`` session. ``balances``
    is what the session shows: the init snapshot plus every own update.
    """

    def __init__(self, user_id: int, role: str, since: int | None = None) -> None:
        self.user_id, self.role = user_id, role
        self.messages: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.version: int | None = since
        self.balances: dict[str, str] = {}
        self.on_message: Callable[[dict[str, Any], float], None] | None = None

    def record(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "user_balance_init":
            self.balances = dict(message["balances"])
            if self.version is None:
                self.version = message["version"]
        elif kind == "balance_update" and message["user_id"] == self.user_id:
            version, expected = message["version"], (self.version or 0) + 1
            if version < expected:
                self.problems.append(f"duplicate: version {version} arrived again after {expected - 1}")
            elif version > expected:
                self.problems.append(f"gap: version {version} arrived, expected {expected}")
            self.version = max(expected - 1, version)
            self.balances[message["asset"]] = message["balance"]
        if kind in OWN_TYPES and self.role == "user":
            owner = message["trade"]["user_id"] if kind == "trade_update" else message["user_id"]
            if owner != self.user_id:
                self.problems.append(f"{kind} of account {owner} reached account {self.user_id}")
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message, time.perf_counter())

    def find(self, kind: str, match: Callable[[dict], bool] = lambda m: True, start: int = 0) -> int | None:
        """The index of the first message of ``kind`` at or after ``start`` that matches."""
        for index in range(start, len(self.messages)):
            message = self.messages[index]
            if message.get("type") == kind and match(message):
                return index
        return None


async def out_of_sync(stream: Stream, stored: Callable[[], Any], barrier: Callable[[], Any],
                      attempts: int = 20) -> str | None:
    """Compare what a session shows with the ledger at the same version; ``None`` when they agree.

    The ledger is read first, then everything routed to the session before now is
    awaited, so the session has at least the stored version unless an update went
    missing. If the account moved on meanwhile (a trade settled), read again.
    """
    for _ in range(attempts):
        balance = await stored()
        await barrier()
        shown = stream.version or 0
        if shown < balance["version"]:
            return f"the session is at version {shown} but the ledger at {balance['version']}"
        if shown == balance["version"]:
            if stream.balances != balance["balances"]:
                return f"the session shows {stream.balances} but the ledger has {balance['balances']}"
            return None
    return "the account kept changing; could not compare"


class Session(Stream):
    """A live WebSocket stream, checked as it arrives (see ``Stream``).

    On a drop (a 4008 close, a server restart, a broken connection) it reconnects
    with ``since`` = the last version it saw, so the server replays what it missed;
    after a 4001 close or a 401 it stops and says so in ``problems``.
    """

    def __init__(self, client: Client, since: int | None = None) -> None:
        super().__init__(client.user_id, client.role, since)
        self.client = client
        self.reconnects = 0
        self._conn: WebSocketClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._arrived = asyncio.Event()

    async def connect(self) -> None:
        """Open the socket (with ``since`` once a version is known) and read ``user_balance_init``.

        Raises:
            Unreachable: no server answers.
            ApiError: the handshake was refused (401 for a bad token), or the first
                message was not ``user_balance_init``.
        """
        url = self.client.base_url.replace("http", "ws", 1) + f"/ws?token={self.client.token}"
        if self.version is not None:
            url += f"&since={self.version}"
        try:
            self._conn = await websocket_connect(url, max_message_size=16 * 1024 * 1024)
        except OSError as error:
            raise Unreachable(self.client.base_url, error) from None
        except HTTPClientError as error:
            if error.response is None:
                raise Unreachable(self.client.base_url, error) from None
            raise ApiError(error.code, "unauthorized" if error.code == 401 else "http_error", str(error)) from None
        raw = await self._conn.read_message()
        init = json.loads(raw) if raw is not None else {"close_code": self._conn.close_code}
        if init.get("type") != "user_balance_init":
            raise ApiError(0, "protocol", f"expected user_balance_init, got {init}")
        self.record(init)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self._conn is not None
        while (raw := await self._conn.read_message()) is not None:
            try:
                self.record(json.loads(raw))
            except (ValueError, KeyError, TypeError) as error:
                self.problems.append(f"malformed message {raw[:200]!r}: {error!r}")
        if self._closing:
            return
        if self._conn.close_code == UNAUTHORIZED_CLOSE:
            # The token is no longer valid: reconnecting would be refused the same way.
            self.problems.append(f"closed with {UNAUTHORIZED_CLOSE}: {self._conn.close_reason or 'unauthorized'}")
            return
        self.reconnects += 1
        for attempt in range(RECONNECT_ATTEMPTS):
            try:
                await self.connect()
                return
            except ApiError as error:
                if error.status == 401:
                    self.problems.append(f"reconnecting was refused: {error}")
                    return
            except Exception:  # noqa: BLE001 - the server may be restarting: keep trying
                pass
            await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        self.problems.append(f"could not reconnect in {RECONNECT_ATTEMPTS} attempts")

    def record(self, message: dict[str, Any]) -> None:
        super().record(message)
        self._arrived.set()

    async def wait_for(self, kind: str, match: Callable[[dict], bool] = lambda m: True, *,
                       start: int = 0, timeout_s: float = 10.0) -> dict[str, Any]:
        """The first message of ``kind`` at or after index ``start`` that matches."""
        deadline = time.monotonic() + timeout_s
        while (index := self.find(kind, match, start)) is None:
            start = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} arrived within {timeout_s} s")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.messages[index]

    async def barrier(self, timeout_s: float = 10.0) -> None:
        """Return once everything the server routed here before now has arrived (ping → pong)."""
        start = len(self.messages)
        assert self._conn is not None
        await self._conn.write_message(json.dumps({"type": "ping"}))
        await self.wait_for("pong", start=start, timeout_s=timeout_s)

    async def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            self._conn.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
