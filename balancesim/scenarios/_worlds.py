"""Where a scenario runs: an embedded engine on a virtual clock, or a server at a URL.

Both worlds offer the same operations, so one interpreter runs every scenario
on either. Operations raise ``OpFailed(code)`` for a PROTOCOL.md refusal.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import secrets
import sqlite3
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from balancesim import errors
from balancesim.actors import VirtualClock
from balancesim.client import ApiError, Client, Session, Stream, configure_http
from balancesim.engine import Engine
from balancesim.operations import OPERATIONS, EngineClient, perform
from balancesim.reports import verify
from balancesim.routing import Audiences, route
from balancesim.scenarios._model import Participant
from balancesim.vocabulary import MAY, is_admin

__all__ = ["OpFailed", "InProcessWorld", "RemoteWorld", "ledger_digest"]

# How long after a trade's expiry the remote runner waits for its settlement.
SETTLE_GRACE_S = 30.0
# Participants joining at once: the server hashes each one's password.
SETUP_CONCURRENCY = 32
# Concurrent HTTP requests: a crowd's operations of one step all go out together.
HTTP_CONNECTIONS = 64


class OpFailed(Exception):
    """An operation was refused with a PROTOCOL.md ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def ledger_digest(path: str) -> str:
    """SHA-256 of every entry and trade, leaving out ids that count commits, not meaning."""
    with sqlite3.connect(path) as conn:
        entries = conn.execute(
            "SELECT user_id, version, asset, amount, balance_after, type, description, metadata, ts "
            "FROM transactions ORDER BY user_id, version"
        ).fetchall()
        trades = conn.execute("SELECT * FROM trades ORDER BY trade_id").fetchall()
    return "sha256:" + hashlib.sha256(json.dumps([entries, trades]).encode()).hexdigest()


class InProcessWorld:
    """An embedded engine on a temporary ledger and a virtual clock: deterministic."""

    remote = False

    def __init__(self, seed: int) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="balancesim-scenario-")
        self.path = str(Path(self.tmp.name) / "ledger.db")
        self.engine = Engine(self.path, clock=VirtualClock(), seed=seed, password_cost=2).start()
        self.ids: dict[str, int] = {}
        self.roles: dict[str, str] = {}
        self.clients: dict[str, EngineClient] = {}
        self.streams: dict[str, Stream] = {}
        self._pending: collections.deque[list[Any]] = collections.deque()
        self._usernames: dict[int, str] = {}
        # Audiences indexed once, by the gateway's own rules: a virtual day routes ~100k deliveries.
        self._audiences: Audiences[Stream] = Audiences()
        self.engine.subscribe(self._pending.append)

    async def setup(self, participants: dict[str, Participant]) -> None:
        self.roles = {p.name: p.role for p in participants.values()}
        self.usernames = {p.name: p.name for p in participants.values()}
        creates = {p.name: self.engine.create_user(p.name, "pw", p.role) for p in participants.values()}
        for name, reply in creates.items():
            self.ids[name] = reply.get(timeout=60)["user_id"]
            self._usernames[self.ids[name]] = name
            self.clients[name] = EngineClient(self.engine, self.ids[name])
        funds = [self.engine.deposit(self.ids[p.name], p.deposit, description="starting balance")
                 for p in participants.values() if p.deposit]
        for reply in funds:
            reply.get(timeout=60)
        self._pending.clear()
        for p in participants.values():
            stream = self.streams[p.name] = Stream(self.ids[p.name], p.role)
            self._audiences.add(stream, stream.user_id, is_admin(p.role))
            balance = self.engine.balance(self.ids[p.name])
            stream.record({"type": "user_balance_init", **balance, "ts": ""})

    async def op(self, actor: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return (await self.op_many(actor, [(op, args)]))[0]

    async def op_many(self, actor: str | None, calls: list[tuple[str, dict[str, Any]]],
                      actors: list[str] | None = None) -> list[Any]:
        """Every call at once, like real clients (each is submitted in order before any
        is awaited). Failures come back as ``OpFailed``."""

        async def one(who: str, op: str, args: dict[str, Any]) -> Any:
            allowed = MAY[OPERATIONS[op].permission]
            if self.roles[who] not in allowed:
                return OpFailed("forbidden", f"{op} needs the role {' or '.join(allowed)}")
            try:
                return await perform(self.clients[who], op, args)
            except errors.BalancesimError as error:
                return OpFailed(error.code, error.message)

        results = await asyncio.gather(*(one(actors[i] if actors else actor, op, a)
                                         for i, (op, a) in enumerate(calls)))
        self._pump()
        return list(results)

    def _pump(self) -> None:
        while self._pending:
            for event in self._pending.popleft():
                for delivery in route(event, self._usernames.get):
                    for stream in self._audiences.of(delivery):
                        stream.record(delivery.message)

    async def advance(self, seconds: float) -> None:
        self.engine.advance(seconds)
        self._pump()

    async def barrier(self) -> None:
        self.engine.ledger.flush().get(timeout=60)
        self._pump()

    async def balance(self, name: str) -> dict[str, Any]:
        return self.engine.balance(self.ids[name])

    async def trade(self, owner: str | None, trade_id: str) -> dict[str, Any] | None:
        return next((t for t in self.engine.trades() if t["trade_id"] == trade_id), None)

    async def history(self, name: str) -> list[dict[str, Any]]:
        return self.engine.history(self.ids[name], limit=10**9)

    async def finish(self) -> dict[str, Any]:
        self.engine.stop()
        report = verify(self.path)
        result = {"ledger": report.text(), "ledger_ok": report.ok, "trades": report.trades,
                  "digest": ledger_digest(self.path)}
        self.tmp.cleanup()
        return result


class RemoteWorld:
    """Real HTTP and WebSocket clients against a running ``balancesim serve``, in real time.

    Participants are created by the given superadmin with a unique suffix, so runs
    never collide. ``advance(s)`` waits until every trade due by then has settled.
    """

    remote = True

    def __init__(self, url: str, admin_user: str, admin_password: str, db: str | None = None,
                 data_dir: str | None = None) -> None:
        self.url, self.admin_user, self.admin_password, self.db = url.rstrip("/"), admin_user, admin_password, db
        self.data_dir = data_dir  # a cluster's: every shard file is verified
        self.ids: dict[str, int] = {}
        self.clients: dict[str, Client] = {}
        self.streams: dict[str, Session] = {}
        self.virtual_s = 0.0
        # trade_id → (owner, simulated due time, the server's expires_at as epoch seconds)
        self.open: dict[str, tuple[str, float, float]] = {}

    async def setup(self, participants: dict[str, Participant]) -> None:
        configure_http(HTTP_CONNECTIONS)
        self.admin = await Client.login(self.url, self.admin_user, self.admin_password)
        suffix = secrets.token_hex(3)
        self.usernames = {p.name: f"{p.name}-{suffix}" for p in participants.values()}
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def join(p: Participant) -> Client:
            async with gate:
                password = secrets.token_urlsafe(12)
                created = await self.admin.create_user(self.usernames[p.name], password, p.role)
                if p.deposit:
                    await self.admin.deposit(created["user_id"], p.deposit, description="starting balance")
                return await Client.login(self.url, self.usernames[p.name], password)

        # In the file's order, whatever order the server answered in.
        self.clients = dict(zip(participants, await asyncio.gather(*(join(p) for p in participants.values()))))
        self.ids = {name: client.user_id for name, client in self.clients.items()}
        sessions = await asyncio.gather(*(client.session() for client in self.clients.values()))
        self.streams = dict(zip(self.clients, sessions))

    async def op(self, actor: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return (await self.op_many(actor, [(op, args)]))[0]

    async def op_many(self, actor: str | None, calls: list[tuple[str, dict[str, Any]]],
                      actors: list[str] | None = None) -> list[Any]:
        async def one(who: str, op: str, a: dict[str, Any]) -> Any:
            try:
                body = await perform(self.clients[who], op, a)
            except ApiError as error:
                return OpFailed(error.code, error.message)
            if op == "option":
                trade = body["trade"]
                expires_at = datetime.fromisoformat(trade["expires_at"]).timestamp()
                self.open[trade["trade_id"]] = (who, self.virtual_s + a["duration"], expires_at)
            return body

        return await asyncio.gather(*(one(actors[i] if actors else actor, op, a) for i, (op, a) in enumerate(calls)))

    async def advance(self, seconds: float) -> None:
        """Wait until every trade due by the new simulated time has settled.

        Each wait is for the owner's session to receive the settled ``trade_update``
        and ends at the trade's ``expires_at`` plus a grace period, so a settlement
        that never comes fails the step instead of hanging the run.
        """
        self.virtual_s += seconds
        due = {t: (who, expires) for t, (who, at, expires) in self.open.items() if at <= self.virtual_s}
        await asyncio.gather(*(self._settled(t, who, expires) for t, (who, expires) in due.items()))
        for trade_id in due:
            del self.open[trade_id]
        await self.barrier()

    async def _settled(self, trade_id: str, owner: str, expires_at: float) -> None:
        def settled(message: dict[str, Any]) -> bool:
            return message["trade"]["trade_id"] == trade_id and message["trade"]["status"] != "open"

        try:
            await self.streams[owner].wait_for(
                "trade_update", settled, timeout_s=max(0.0, expires_at - time.time()) + SETTLE_GRACE_S
            )
        except TimeoutError:
            raise TimeoutError(f"trade {trade_id} had not settled {SETTLE_GRACE_S:g} s after it expired") from None

    async def barrier(self) -> None:
        await asyncio.gather(*(s.barrier() for s in self.streams.values()))

    async def balance(self, name: str) -> dict[str, Any]:
        return await self.admin.balance(self.ids[name])

    async def trade(self, owner: str | None, trade_id: str) -> dict[str, Any] | None:
        owners = [owner] if owner else list(self.clients)
        for who in owners:
            for trade in await self.clients[who].options():
                if trade["trade_id"] == trade_id:
                    return trade
        return None

    async def history(self, name: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        while page := await self.admin.transactions(self.ids[name], len(entries), 1000):
            entries += page
        return entries

    async def finish(self) -> dict[str, Any]:
        for session in self.streams.values():
            await session.close()
        if self.data_dir is not None:
            from balancesim.cluster import verify_data_dir_as_one

            report = verify_data_dir_as_one(self.data_dir)
        elif self.db is None:
            return {"ledger": "ledger not checked (give --db or --data-dir to verify the server's ledger)",
                    "ledger_ok": True}
        else:
            report = verify(self.db)
        return {"ledger": report.text(), "ledger_ok": report.ok, "trades": report.trades}
