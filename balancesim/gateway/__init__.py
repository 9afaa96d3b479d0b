"""The Tornado gateway: PROTOCOL.md's HTTP routes and WebSocket sessions on one port."""

from balancesim.gateway._app import STATIC_PATH, make_app
from balancesim.gateway._auth import LoginLimiter, Principal, TokenStore
from balancesim.gateway._context import Context
from balancesim.gateway._fanout import Hub
from balancesim.gateway._metrics import Metrics
from balancesim.gateway._server import DEMO_ACCOUNTS, CannotStart, ServeOptions, create_demo, serve, tune_gc

__all__ = [
    "DEMO_ACCOUNTS", "STATIC_PATH", "CannotStart", "Context", "Hub", "LoginLimiter", "Metrics", "Principal",
    "ServeOptions", "TokenStore", "create_demo", "make_app", "serve", "tune_gc",
]
