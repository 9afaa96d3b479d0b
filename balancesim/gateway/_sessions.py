"""``GET /ws``: one WebSocket session of one logged-in principal.

On connect the session joins the hub *first*, buffering live messages, then
reads the committed snapshot (``user_balance_init``) and, with ``since``, replays
the account's entries above it. Only then does it flush the buffer, skipping any
``balance_update`` of its own account at or below the last version it sent, so
the seam between replay and live has no gap and no duplicate.

Unsent bytes are bounded without a callback per message: frames flush in order,
so knowing that one write has flushed says every earlier one has too. A session
watches one write at a time and, once it flushes, the latest one.
"""

from __future__ import annotations

import functools
import json
import socket
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from balancesim import errors
from balancesim.actors import iso
from balancesim.views import balance_update
from balancesim.gateway._auth import digest_of
from balancesim.gateway._context import Context

__all__ = ["SessionHandler", "MAX_FRAME_BYTES"]

MAX_FRAME_BYTES = 64 * 1024
REPLAY_PAGE = 1000
# Messages a session writes itself; the hub counts the ones it routes.
_SESSION_OWN = frozenset({"user_balance_init", "pong", "error"})


class SessionHandler(WebSocketHandler):
    """A WebSocket session; its outgoing bytes in flight are bounded."""

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self.principal: Any = None
        self.since: int | None = None
        self._buffer: list[tuple[dict[str, Any], bytes]] | None = []
        self._last_version = 0
        self._written_bytes = 0
        self._flushed_bytes = 0
        self._latest: tuple[Any, int] | None = None
        self._watching = False
        self._gone = False

    @property
    def user_id(self) -> int:
        return self.principal.user_id

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin

    def check_origin(self, origin: str) -> bool:
        # The token, not the origin, authorizes a session; it is never in a cookie.
        return True

    async def get(self, *args: Any, **kwargs: Any) -> None:
        token = self.get_query_argument("token", None)
        self.principal = await self.ctx.tokens.check(token)
        self.token_digest = digest_of(token) if token else None
        if self.principal is None:
            return self._refuse(errors.Unauthorized("a valid token is required"))
        since = self.get_query_argument("since", None)
        if since is not None:
            if not since.isdigit() or len(since) > 18:
                return self._refuse(errors.InvalidRequest("since must be a non-negative integer"))
            self.since = int(since)
        await super().get(*args, **kwargs)

    def _refuse(self, error: errors.BalancesimError) -> None:
        self.set_status(error.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.to_dict()))

    async def open(self, *args: Any, **kwargs: Any) -> None:
        if self.ctx.send_buffer_bytes is not None and self.ws_connection is not None:
            sock = self.ws_connection.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.ctx.send_buffer_bytes)
        self.ctx.hub.add(self)
        self.ctx.hub.remember(self.user_id, self.principal.username)
        self.ctx.metrics.sessions.labels(self.principal.role).inc()
        try:
            snapshot = await self.ctx.blocking(self.ctx.engine.balance, self.user_id)
        except errors.UnknownUser:
            self.close(4001, "unknown account")
            return
        self._write_message({
            "type": "user_balance_init", "user_id": self.user_id, "balances": snapshot["balances"],
            "version": snapshot["version"], "control_mode": snapshot["control_mode"],
            "ts": iso(self.ctx.engine.clock.now()),
        })
        self._last_version = snapshot["version"]
        if self.since is not None and self.since < snapshot["version"]:
            await self._replay(self.since)
        buffered, self._buffer = self._buffer or [], None
        for message, data in buffered:
            self.deliver(message, data)

    async def _replay(self, after: int) -> None:
        while not self._gone:
            page = await self.ctx.blocking(self.ctx.engine.entries, self.user_id, after, REPLAY_PAGE)
            for entry in page:
                self._write_message(balance_update(entry))
                after = entry.version
            self.ctx.metrics.messages.labels("balance_update").inc(len(page))
            self._last_version = max(self._last_version, after)
            if len(page) < REPLAY_PAGE:
                return

    def deliver(self, message: dict[str, Any], data: bytes) -> None:
        """Send a routed message (encoded once by the hub), or buffer it while joining."""
        if self._buffer is not None:
            self._buffer.append((message, data))
            return
        if message["type"] == "balance_update" and message["user_id"] == self.user_id:
            if message["version"] <= self._last_version:
                return
            self._last_version = message["version"]
        self._write(data, message["type"])

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            return self._error("invalid_request", "binary frames are not supported")
        if len(message) > MAX_FRAME_BYTES:
            return self._error("invalid_request", "frames are limited to 64 KiB")
        try:
            frame = json.loads(message)
        except ValueError:
            return self._error("invalid_json", "the frame is not valid JSON")
        if isinstance(frame, dict) and frame.get("type") == "ping":
            return self._write_message({"type": "pong", "ts": iso(self.ctx.engine.clock.now())})
        return self._error("invalid_request", 'the only client frame is {"type": "ping"}')

    def on_close(self) -> None:
        self._gone = True
        self.ctx.hub.remove(self)
        self.ctx.metrics.sessions.labels(self.principal.role).dec()

    def _error(self, code: str, message: str) -> None:
        self._write_message({"type": "error", "code": code, "message": message})

    def _write_message(self, message: dict[str, Any]) -> None:
        self._write(json.dumps(message).encode(), message["type"])

    def _write(self, data: bytes, kind: str) -> None:
        if self._gone:
            return
        if self._written_bytes - self._flushed_bytes > self.ctx.max_pending_bytes:
            # A reader this far behind would delay nobody else, but its buffer
            # would grow without bound: close it; it reconnects with since.
            self._gone = True
            self.ctx.hub.remove(self)
            self.ctx.metrics.slow_closed.inc()
            self.close(4008, "too slow: reconnect with since")
            return
        try:
            sent = self._send_frame(data)
        except (WebSocketClosedError, StreamClosedError):
            self._gone = True
            return
        self._written_bytes += len(data)
        self._latest = (sent, self._written_bytes)
        if not self._watching:
            self._watch()
        if kind in _SESSION_OWN:
            self.ctx.metrics.messages.labels(kind).inc()

    def _send_frame(self, data: bytes) -> Any:
        """Write one text frame; the future of its flush.

        ``write_message`` wraps every write in a coroutine and a task, only to turn a
        ``StreamClosedError`` into a ``WebSocketClosedError``: with a thousand sessions that
        is a task and an extra loop callback per frame, a third of a gateway's fan-out
        (benchmarks/fanout_cluster.py: 32-43 µs of gateway CPU per frame before, 24-26
        after). The flush future of the frame itself is all ``_watch`` needs. Without
        compression, write the frame as ``write_message`` does; otherwise (or should
        Tornado's internals change) go through it.
        """
        conn = self.ws_connection
        if conn is None or conn.is_closing():
            raise WebSocketClosedError()
        write_frame = getattr(conn, "_write_frame", None)
        if write_frame is None or getattr(conn, "_compressor", True) is not None:
            return self.write_message(data)
        conn._message_bytes_out = getattr(conn, "_message_bytes_out", 0) + len(data)
        return write_frame(True, 0x1, data)

    def _watch(self) -> None:
        assert self._latest is not None
        sent, mark = self._latest
        self._watching = True
        sent.add_done_callback(functools.partial(self._flushed, mark))

    def _flushed(self, mark: int, done: Any) -> None:
        self._watching = False
        try:
            done.result()
        except (StreamClosedError, WebSocketClosedError):
            self._gone = True
            return
        self._flushed_bytes = mark
        if self._written_bytes > mark:
            self._watch()
