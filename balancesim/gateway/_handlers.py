"""Thin HTTP handlers: authenticate, parse, call the engine, answer.

Every answer is JSON; every refusal is PROTOCOL.md's error shape with its code. A
body larger than the limit is refused with 413 as soon as its declared length
(or, chunked, its running size) passes the limit: it is never held whole.
"""

from __future__ import annotations

import functools
import json
import re
import time
from typing import Any, Awaitable, Callable

from tornado.web import HTTPError, RequestHandler, StaticFileHandler, stream_request_body

from balancesim import errors
from balancesim.actors import as_asyncio
from balancesim.gateway import _oplog
from balancesim.gateway._auth import Principal, digest_of
from balancesim.gateway._context import Context
from balancesim.vocabulary import ADMIN_ROLES, MAY, ROLES

__all__ = [
    "AdminPageHandler", "AdminTradesHandler", "RootHandler", "StaticHandler", "BalanceHandler", "ControlHandler", "ForceHandler", "HealthHandler",
    "LoginHandler", "LogoutHandler", "ReadyHandler", "UserHandler", "MarketHandler", "MetricsHandler", "MoneyHandler", "NotFoundHandler",
    "OptionsHandler", "SpotHandler", "TransactionsHandler", "UsersHandler",
]

MAX_ID_DIGITS = 18
# Only bodies with such an escape can decode to a lone surrogate; a valid pair
# (an escaped emoji) passes the full check that follows.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

Result = tuple[int, dict[str, Any]] | None
_KIND_NAMES = {int: "an integer", str: "a string"}


def api(method: Callable[..., Awaitable[Result]]) -> Callable[..., Awaitable[None]]:
    """Answer ``(status, body)`` as JSON, or a domain error as PROTOCOL.md's error."""

    @functools.wraps(method)
    async def wrapper(self: ApiHandler, *args: str) -> None:
        try:
            result = await method(self, *args)
        except errors.BalancesimError as error:
            self.fail(error)
            return
        if result is not None:
            self.answer(*result)

    return wrapper


class JsonErrors(RequestHandler):
    """Tornado's own refusals (bad method, missing file, malformed request) as PROTOCOL.md errors."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        code = {404: "not_found", 413: "payload_too_large"}.get(status_code, "invalid_request")
        message = self._reason if status_code < 500 else "internal error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": code, "message": message}}))


@stream_request_body
class ApiHandler(JsonErrors):
    """Base of the JSON API: auth, bounded bodies, field parsing, error shape."""

    def initialize(self, ctx: Context, **options: Any) -> None:
        self.ctx = ctx
        self.options = options
        self._chunks: list[bytes] = []
        self._size = 0
        self._started = time.perf_counter()
        self._caller: int | None = None

    def prepare(self) -> None:
        self.ctx.in_flight += 1
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > self.ctx.max_body_bytes):
            self.fail(errors.PayloadTooLarge(f"bodies are limited to {self.ctx.max_body_bytes} bytes"))

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.ctx.max_body_bytes:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def on_finish(self) -> None:
        self.ctx.in_flight -= 1
        self.ctx.metrics.http_latency.labels(self.request.method, str(self.get_status())).observe(
            time.perf_counter() - self._started
        )

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def fail(self, error: errors.BalancesimError) -> None:
        retry_after_s = getattr(error, "retry_after_s", None)
        if retry_after_s is not None:  # PROTOCOL.md: 429 comes with Retry-After
            self.set_header("Retry-After", str(retry_after_s))
        body = b"".join(self._chunks) if self._size <= self.ctx.max_body_bytes else b""
        _oplog.refused(self.request.method, self.request.path, error, self._started, self._caller, body)
        self.answer(error.status, error.to_dict())

    # -- who -----------------------------------------------------------------------

    async def who(self, roles: tuple[str, ...] = ROLES) -> Principal:
        """The caller, if its token is live and its role is one of ``roles``."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        self.token = token.strip()
        principal = await self.ctx.tokens.check(self.token) if scheme.lower() == "bearer" else None
        if principal is None:
            raise errors.Unauthorized("a valid Bearer token is required")
        self._caller = principal.user_id
        if principal.role not in roles:
            raise errors.Forbidden(f"this needs the role {' or '.join(roles)}")
        return principal

    # -- input -----------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        if self._size > self.ctx.max_body_bytes:
            raise errors.PayloadTooLarge(f"bodies are limited to {self.ctx.max_body_bytes} bytes")
        raw = b"".join(self._chunks) or b"null"
        try:
            body = json.loads(raw)
        except ValueError as error:  # UnicodeDecodeError included
            raise errors.InvalidJson("the body is not valid JSON") from error
        if _SURROGATE_ESCAPE.search(raw):
            try:
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError as error:
                raise errors.InvalidJson("the body escapes a lone surrogate, which is not Unicode text") from error
        if not isinstance(body, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        return body

    @staticmethod
    def field(body: dict[str, Any], name: str, kind: type, *, default: Any = ..., money: bool = False) -> Any:
        """A body field of type ``kind``; a money field passes through for the engine to judge."""
        if name not in body:
            if default is ...:
                raise errors.InvalidRequest(f"{name} is required")
            return default
        value = body[name]
        if money:
            return value
        if type(value) is not kind:
            raise errors.InvalidRequest(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        if not raw.isdigit() or len(raw) > MAX_ID_DIGITS or not low <= int(raw) <= high:
            raise errors.InvalidRequest(f"{name} must be an integer from {low} to {high}")
        return int(raw)

    def idempotency_key(self) -> str | None:
        return self.request.headers.get("Idempotency-Key")

    @staticmethod
    def path_id(raw: str) -> int:
        if len(raw) > MAX_ID_DIGITS:
            raise errors.UnknownUser(f"no user {raw}")
        return int(raw)

    async def commit(self, reply: Any, status: int, kind: str) -> Result:
        """Await an engine reply (without blocking the loop) and count the mutation."""
        result = await as_asyncio(reply)
        self.ctx.metrics.mutations.labels(kind).inc()
        _oplog.committed(kind, result, self._started)
        return status, result

    async def target(self, raw_id: str | None) -> int:
        """The account a read is about: the caller's own, or (admins only) one in the path."""
        if raw_id is None:
            return (await self.who()).user_id
        await self.who(MAY["read_all"])
        return self.path_id(raw_id)


class LoginHandler(ApiHandler):
    @api
    async def post(self) -> Result:
        address = self.client_address()
        if self.ctx.limiter.blocked(address):
            raise errors.RateLimited("too many failed logins; try again in a minute",
                                     retry_after_s=self.ctx.limiter.retry_after_s(address))
        body = self.body()
        username, password = self.field(body, "username", str), self.field(body, "password", str)
        user = await as_asyncio(self.ctx.engine.login(username, password))
        if user is None:
            self.ctx.limiter.failed(address)
            raise errors.Unauthorized("wrong username or password")
        if user["disabled"]:
            raise errors.Unauthorized("this account is disabled")
        principal = Principal(user["user_id"], user["username"], user["role"])
        token = await self.ctx.blocking(self.ctx.tokens.issue, principal)
        return 200, {"token": token, "user_id": principal.user_id, "role": principal.role}

    def client_address(self) -> str:
        """Whom the login limiter counts: the peer, or behind a trusted proxy the
        address that proxy appended to ``X-Forwarded-For`` (the last one: what came
        before it, the client could have written itself)."""
        if self.ctx.trust_proxy:
            forwarded = self.request.headers.get("X-Forwarded-For", "")
            hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
            if hops:
                return hops[-1]
        return self.request.remote_ip or "?"


class LogoutHandler(ApiHandler):
    """The caller's token dies at once; the sessions opened with it are closed (4001)."""

    @api
    async def post(self) -> Result:
        me = await self.who()
        await self.ctx.tokens.revoke(self.token)
        self.ctx.hub.close_sessions(me.user_id, digest_of(self.token))
        self.set_status(204)
        self.finish()
        return None


class UserHandler(ApiHandler):
    """``PATCH /api/users/{id}``: a superadmin disables, re-enables or changes the role of an account."""

    FIELDS = {"disabled": bool, "role": str}

    @api
    async def patch(self, raw_id: str) -> Result:
        me = await self.who(MAY["manage_users"])
        body = self.body()
        unknown = sorted(set(body) - set(self.FIELDS))
        if unknown:
            raise errors.InvalidRequest(f"unknown field {unknown[0]!r}: give disabled, role or both")
        changes = {name: self.field(body, name, kind, default=None) for name, kind in self.FIELDS.items()}
        user_id = self.path_id(raw_id)
        if user_id == me.user_id:
            raise errors.Conflict("a superadmin cannot disable or change the role of its own account")
        reply = self.ctx.engine.update_user(user_id, **changes, set_by=me.user_id,
                                            idempotency_key=self.idempotency_key())
        return await self.commit(reply, 200, "user_update")


class UsersHandler(ApiHandler):
    @api
    async def get(self) -> Result:
        await self.who(MAY["read_all"])
        # The contract fixes each entry's shape; ``include=disabled`` adds the flag (the dashboard's).
        include = self.get_query_argument("include", None) or None
        if include not in (None, "disabled"):
            raise errors.InvalidRequest("include must be disabled")
        users = functools.partial(self.ctx.engine.users, with_disabled=include == "disabled")
        return 200, {"users": await self.ctx.blocking(users)}

    @api
    async def post(self) -> Result:
        me = await self.who(MAY["create_user"])
        body = self.body()
        username, password = self.field(body, "username", str), self.field(body, "password", str)
        role = self.field(body, "role", str, default="user")
        if role in ADMIN_ROLES and me.role not in MAY["create_admin"]:
            raise errors.Forbidden("only a superadmin creates admins")
        reply = self.ctx.engine.create_user(username, password, role, created_by=me.user_id,
                                            idempotency_key=self.idempotency_key())
        return await self.commit(reply, 201, "user")


class BalanceHandler(ApiHandler):
    @api
    async def get(self, raw_id: str | None = None) -> Result:
        return 200, await self.ctx.blocking(self.ctx.engine.balance, await self.target(raw_id))


class TransactionsHandler(ApiHandler):
    @api
    async def get(self, raw_id: str | None = None) -> Result:
        user_id = await self.target(raw_id)
        after = self.query_int("after_version", 0, 0, 10**18)
        limit = self.query_int("limit", 100, 1, 1000)
        await self.ctx.blocking(self.ctx.engine.balance, user_id)  # unknown_user, not an empty list
        return 200, {"transactions": await self.ctx.blocking(self.ctx.engine.history, user_id, after, limit)}


class MoneyHandler(ApiHandler):
    """Deposits, withdrawals and adjustments; ``options["op"]`` says which."""

    @api
    async def post(self) -> Result:
        op = self.options["op"]
        me = await self.who(MAY[op])
        body = self.body()
        user_id = self.field(body, "user_id", int)
        amount = self.field(body, "amount", str, money=True)
        asset = self.field(body, "asset", str, default="USDT")
        description = self.field(body, "description", str, default=... if op == "adjust" else "")
        call = getattr(self.ctx.engine, op)
        reply = call(user_id, amount, asset, description, initiated_by=me.user_id,
                     idempotency_key=self.idempotency_key())
        return await self.commit(reply, 201, op)


class ControlHandler(ApiHandler):
    @api
    async def put(self, raw_id: str) -> Result:
        me = await self.who(MAY["control"])
        mode = self.field(self.body(), "mode", str)
        reply = self.ctx.engine.set_control_mode(self.path_id(raw_id), mode, me.user_id,
                                                 idempotency_key=self.idempotency_key())
        return await self.commit(reply, 200, "control")


class ForceHandler(ApiHandler):
    @api
    async def post(self, trade_id: str) -> Result:
        me = await self.who(MAY["force"])
        outcome = self.field(self.body(), "outcome", str)
        reply = self.ctx.engine.force_option(trade_id, outcome, me.user_id,
                                             idempotency_key=self.idempotency_key())
        return await self.commit(reply, 200, "force")


class OptionsHandler(ApiHandler):
    @api
    async def get(self) -> Result:
        me = await self.who()
        status = self.get_query_argument("status", None)
        if status not in (None, "open", "settled"):
            raise errors.InvalidRequest("status must be open or settled")
        return 200, {"trades": await self.ctx.blocking(self.ctx.engine.trades, me.user_id, status)}

    @api
    async def post(self) -> Result:
        me = await self.who(MAY["option"])
        body = self.body()
        reply = self.ctx.engine.open_option(
            me.user_id, self.field(body, "symbol", str), self.field(body, "direction", str),
            self.field(body, "amount", str, money=True), self.field(body, "duration", int),
            idempotency_key=self.idempotency_key(),
        )
        return await self.commit(reply, 201, "option")


class AdminTradesHandler(ApiHandler):
    """Trades across accounts (or one), newest opened first, for the dashboard.

    An empty parameter counts as absent; an unknown ``user_id`` is ``404 unknown_user``,
    as on every other route that names an account.
    """

    @api
    async def get(self) -> Result:
        await self.who(MAY["read_all"])
        status = self.get_query_argument("status", None) or None
        if status not in (None, "open", "settled"):
            raise errors.InvalidRequest("status must be open or settled")
        limit = self.query_int("limit", 100, 1, 1000)
        raw_id = self.get_query_argument("user_id", None) or None
        user_id = None
        if raw_id is not None:
            if not raw_id.isdigit() or len(raw_id) > MAX_ID_DIGITS:
                raise errors.InvalidRequest("user_id must be an account id")
            user_id = int(raw_id)
            await self.ctx.blocking(self.ctx.engine.balance, user_id)  # unknown_user, not an empty list
        read = functools.partial(self.ctx.engine.trades, user_id, status, newest_first=True, limit=limit)
        return 200, {"trades": await self.ctx.blocking(read)}


class SpotHandler(ApiHandler):
    @api
    async def post(self) -> Result:
        me = await self.who(MAY["spot"])
        body = self.body()
        reply = self.ctx.engine.spot_order(
            me.user_id, self.field(body, "symbol", str), self.field(body, "side", str),
            self.field(body, "quantity", str, money=True), idempotency_key=self.idempotency_key(),
        )
        return await self.commit(reply, 201, "spot")


class MarketHandler(ApiHandler):
    @api
    async def get(self) -> Result:
        await self.who()
        return 200, self.ctx.engine.market()


class HealthHandler(ApiHandler):
    @api
    async def get(self) -> Result:
        return 200, {"status": "ok"}


class ReadyHandler(ApiHandler):
    """For load balancers: 200 only while the engine takes commands (``/healthz``: the process is up)."""

    @api
    async def get(self) -> Result:
        engine = self.ctx.engine
        if not engine.ready():
            # A cluster's engine says which shard is down; the embedded one has one reason.
            why = engine.unready_reason() if hasattr(engine, "unready_reason") else "the engine is not running"
            raise errors.Unavailable(why)
        return 200, {"status": "ready"}


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.ctx.metrics.render())


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            raise HTTPError(404, reason=f"no such route: {self.request.method} {self.request.path}")


class RootHandler(ApiHandler):
    def get(self) -> None:
        self.redirect("/test-balance-sync.html")


class StaticHandler(JsonErrors, StaticFileHandler):
    """The pages, with JSON errors like every other route."""


class AdminPageHandler(StaticHandler):
    """``/admin`` is the dashboard page."""

    def get(self, path: str = "", include_body: bool = True) -> Awaitable[None]:
        return super().get("admin.html", include_body)
