"""The application factory: PROTOCOL.md's route table, one port for HTTP and WebSocket."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tornado.web import Application, RequestHandler

from balancesim.engine import Engine
from balancesim.gateway import _handlers as h
from balancesim.gateway._auth import LoginLimiter, TokenStore
from balancesim.gateway._context import Context
from balancesim.gateway._fanout import Hub
from balancesim.gateway._metrics import Metrics
from balancesim.gateway._openapi import OpenApiHandler
from balancesim.gateway._sessions import SessionHandler

__all__ = ["make_app", "GatewayApp", "STATIC_PATH"]

STATIC_PATH = os.path.join(os.path.dirname(__file__), "static")
access_log = logging.getLogger("tornado.access")


def _log_request(handler: RequestHandler) -> None:
    # The WebSocket URL carries the token in its query string: log the path only.
    # A refused request is the client's business; only a 5xx is ours to shout about.
    status = handler.get_status()
    log = access_log.info if status < 500 else access_log.error
    log("%d %s %s %.1fms", status, handler.request.method, handler.request.path,
        1000 * handler.request.request_time())


class GatewayApp(Application):
    """The Tornado application, and what it started: ``close()`` undoes ``make_app``.

    ``close()`` closes every session (1001), stops the hub, waits for the
    executor's blocking reads and closes the token store. The engine is the
    caller's: it is neither started nor stopped here.
    """

    @property
    def ctx(self) -> Context:
        """The shared context every handler gets."""
        return self.settings["ctx"]

    def close(self, code: int = 1001) -> None:
        """Close the sessions with ``code`` and release the gateway's threads and files."""
        ctx = self.ctx
        ctx.hub.stop(code)
        ctx.executor.shutdown(wait=True)
        ctx.tokens.close()


def make_app(
    engine: Engine,
    *,
    token_ttl_s: float = 24 * 3600,
    max_pending_bytes: int = 1 << 20,
    max_body_bytes: int = 64 * 1024,
    login_limit: int = 10,
    tick_interval_s: float = 0.5,
    executor_threads: int = 4,
    send_buffer_bytes: int | None = 256 * 1024,
    trust_proxy: bool = False,
    tokens: Any = None,
) -> GatewayApp:
    """Build the gateway for a started ``engine``; call on the IOLoop that will serve it.

    Args:
        engine: the started engine.
        token_ttl_s: how long a login token lives.
        max_pending_bytes: unsent bytes after which a session is closed with 4008.
        max_body_bytes: larger request bodies get 413.
        login_limit: failed logins per address per minute before 429.
        tick_interval_s: the least time between two price ticks to the sessions.
        executor_threads: threads for blocking reads (SQLite, password hashing).
        send_buffer_bytes: caps each session socket's kernel send buffer (which
            otherwise autotunes to megabytes per session); ``None`` leaves it.
        tokens: where login tokens live (default: a ``TokenStore`` in the engine's
            ledger file; a cluster gateway passes its shards' ``RemoteTokens``).
        trust_proxy: the server sits behind a proxy the operator trusts: the
            login limiter counts the client address that proxy appended to
            ``X-Forwarded-For`` instead of the peer address.

    Returns:
        The application (``app.ctx`` is its shared ``Context``); ``app.close()``
        releases what it started.
    """
    metrics = Metrics()
    metrics.watch(engine)
    executor = ThreadPoolExecutor(executor_threads, thread_name_prefix="gateway")
    if tokens is None:
        tokens = TokenStore(engine.ledger.path, ttl_s=token_ttl_s, executor=executor)
    hub = Hub(engine, metrics, executor=executor, tokens=tokens, tick_interval_s=tick_interval_s)
    hub.start()
    ctx = Context(
        engine=engine,
        tokens=tokens,
        hub=hub,
        metrics=metrics,
        limiter=LoginLimiter(limit=login_limit),
        trust_proxy=trust_proxy,
        executor=executor,
        max_pending_bytes=max_pending_bytes,
        max_body_bytes=max_body_bytes,
        send_buffer_bytes=send_buffer_bytes,
    )
    api: dict[str, Any] = {"ctx": ctx}
    routes = [
        (r"/api/login", h.LoginHandler, api),
        (r"/api/logout", h.LogoutHandler, api),
        (r"/api/users", h.UsersHandler, api),
        (r"/api/users/([0-9]+)", h.UserHandler, api),
        (r"/api/balance", h.BalanceHandler, api),
        (r"/api/users/([0-9]+)/balance", h.BalanceHandler, api),
        (r"/api/transactions", h.TransactionsHandler, api),
        (r"/api/users/([0-9]+)/transactions", h.TransactionsHandler, api),
        (r"/api/admin/deposits", h.MoneyHandler, {**api, "op": "deposit"}),
        (r"/api/admin/withdrawals", h.MoneyHandler, {**api, "op": "withdraw"}),
        (r"/api/admin/adjustments", h.MoneyHandler, {**api, "op": "adjust"}),
        (r"/api/admin/controls/([0-9]+)", h.ControlHandler, api),
        (r"/api/admin/trades/([^/]+)/force", h.ForceHandler, api),
        (r"/api/admin/trades", h.AdminTradesHandler, api),
        (r"/api/options", h.OptionsHandler, api),
        (r"/api/spot/orders", h.SpotHandler, api),
        (r"/api/market", h.MarketHandler, api),
        (r"/healthz", h.HealthHandler, api),
        (r"/readyz", h.ReadyHandler, api),
        (r"/metrics", h.MetricsHandler, api),
        (r"/ws", SessionHandler, api),
        (r"/openapi.json", OpenApiHandler, api),  # documents every route above but /metrics and /ws
        (r"/", h.RootHandler, api),
        (r"/admin/?", h.AdminPageHandler, {"path": STATIC_PATH}),
        (r"/([A-Za-z0-9_.-]+\.(?:html|js|css|svg|ico))", h.StaticHandler, {"path": STATIC_PATH}),
    ]
    return GatewayApp(
        routes,
        ctx=ctx,
        default_handler_class=h.NotFoundHandler,
        default_handler_args=api,
        log_function=_log_request,
        websocket_max_message_size=4 * 1024 * 1024,
        websocket_ping_interval=20,
        websocket_ping_timeout=20,
    )
