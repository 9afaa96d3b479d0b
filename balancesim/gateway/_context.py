"""What every handler of one gateway shares, passed through ``initialize(ctx=…)``."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from balancesim.engine import Engine
from balancesim.gateway._auth import LoginLimiter, TokenStore
from balancesim.gateway._fanout import Hub
from balancesim.gateway._metrics import Metrics

__all__ = ["Context"]

T = TypeVar("T")


@dataclass
class Context:
    """One gateway's engine, tokens, hub, metrics and limits.

    Attributes:
        max_pending_bytes: a session with more unsent bytes than this is closed (4008).
        max_body_bytes: larger request bodies are refused with 413 unread.
        send_buffer_bytes: if set, caps each session socket's kernel send buffer,
            which otherwise grows to megabytes and hides a stalled reader.
    """

    engine: Engine
    tokens: TokenStore
    hub: Hub
    metrics: Metrics
    limiter: LoginLimiter
    executor: ThreadPoolExecutor
    max_pending_bytes: int = 1 << 20
    max_body_bytes: int = 64 * 1024
    send_buffer_bytes: int | None = None
    trust_proxy: bool = False
    in_flight: int = 0

    async def blocking(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking engine read off the IOLoop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)
