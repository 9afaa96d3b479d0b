"""``balancesim chaos``: kill the server at a random moment and prove nothing acknowledged was lost.

Each trial starts ``balancesim serve`` on a fresh ledger, drives concurrent
deposits, withdrawals, spot orders and options trades through real clients while
recording every 2xx answer, SIGKILLs the server at a random moment, restarts it
on the same file and port, and checks that:

- every acknowledged transaction is stored with exactly the fields acknowledged;
- nothing is half-applied (``ledger verify``: both legs of every spot order, one
  stake and at most one settlement per trade, versions without gaps);
- the open trades settle after the restart;
- each session, reconnecting with ``since``, receives exactly what it missed:
  no gap, no duplicate, and ends showing the stored balances.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from balancesim.client import ApiError, Client, Session, configure_http, out_of_sync
from balancesim.operations import OPERATIONS, perform, transactions_of
from balancesim.reports import verify
from balancesim.serveproc import ServerProcess
from balancesim.vocabulary import SYMBOLS

__all__ = ["TrialResult", "run_trial", "run_trials"]

SERVER_ARGS = ("--demo", "--time-scale", "0.02", "--password-cost", "1024")


@dataclass
class TrialResult:
    trial: int
    acknowledged: int = 0
    unacknowledged: int = 0
    checked_entries: int = 0
    killed_after_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = (f"trial {self.trial}: {'OK' if self.ok else 'FAILED'} — killed after {self.killed_after_s:.2f} s; "
                f"{self.acknowledged} acknowledged mutations checked ({self.checked_entries} entries), "
                f"{self.unacknowledged} cut off")
        return "\n".join([head, *(f"  - {p}" for p in self.problems[:20])])


async def _drive(rng: random.Random, boss: Client, user: Client, acked: list[dict], counts: dict) -> None:
    """One user's mutations until the server dies; every 2xx answer goes into ``acked``."""
    while True:
        name = rng.choice(["deposit", "withdraw", "spot", "spot", "option", "option"])
        args = {
            "to": user.user_id,
            "amount": f"{rng.randint(1, 99)}.{rng.randint(0, 99)}" if name == "deposit"
            else f"{rng.randint(1, 20)}" if name == "withdraw" else "5",
            "symbol": rng.choice(list(SYMBOLS)), "side": rng.choice(["buy", "sell"]),
            "quantity": "0.001", "direction": rng.choice(["up", "down"]), "duration": rng.choice([30, 60]),
        }
        try:
            body = await perform(boss if OPERATIONS[name].admin else user, name, args)
            acked.extend(transactions_of(body))
            counts["acked"] += 1
        except ApiError as error:
            if error.status >= 500 and error.code != "storage_unavailable":
                counts["5xx"] += 1
        except Exception:  # noqa: BLE001 - the server was killed: this request is cut off
            counts["cut"] += 1
            return


async def _settled(clients: list[Client], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        still = [t["trade_id"] for c in clients for t in await c.options("open")]
        if not still:
            return []
        if time.monotonic() > deadline:
            return [f"{len(still)} trades still open {timeout_s} s after the restart: {still[:5]}"]
        await asyncio.sleep(0.1)


async def run_trial(trial: int, *, users: int = 6, seed: int | None = None) -> TrialResult:
    """One kill-and-restart trial on a fresh ledger."""
    rng = random.Random(seed if seed is not None else trial)
    result = TrialResult(trial)
    with tempfile.TemporaryDirectory(prefix="balancesim-chaos-") as tmp:
        server = ServerProcess(os.path.join(tmp, "chaos.db"), *SERVER_ARGS).start()
        try:
            boss = await Client.login(server.url, "superadmin", "superadmin123")
            clients, sessions = [], []
            for i in range(users):
                made = await boss.create_user(f"chaos{i}", "pw")
                await boss.deposit(made["user_id"], "10000")
                client = await Client.login(server.url, f"chaos{i}", "pw")
                clients.append(client)
                sessions.append(await client.session())
            acked: list[dict] = []
            counts = {"acked": 0, "cut": 0, "5xx": 0}
            drivers = [asyncio.ensure_future(_drive(rng, boss, c, acked, counts)) for c in clients]
            result.killed_after_s = rng.uniform(0.2, 1.5)
            await asyncio.sleep(result.killed_after_s)
            server.kill()
            await asyncio.gather(*drivers)
            result.acknowledged, result.unacknowledged = counts["acked"], counts["cut"]
            if counts["5xx"]:
                result.problems.append(f"{counts['5xx']} answers were 5xx")
            server.start(port=server.port)
            await _check(server, boss, clients, sessions, acked, result)
        finally:
            if server.running():
                server.stop()
    return result


async def _check(server: ServerProcess, boss: Client, clients: list[Client], sessions: list[Session],
                 acked: list[dict], result: TrialResult) -> None:
    stored: dict[int, dict[str, Any]] = {}
    for client in clients:
        after = 0
        while page := await boss.transactions(client.user_id, after, 1000):
            stored.update((tx["transaction_id"], tx) for tx in page)
            after = page[-1]["version"]
    for tx in acked:
        if stored.get(tx["transaction_id"]) != tx:
            result.problems.append(f"acknowledged {tx} is stored as {stored.get(tx['transaction_id'])}")
    result.checked_entries = len(acked)
    result.problems += await _settled(clients, 30)
    report = verify(server.db)
    if not report.ok:
        result.problems.append(report.text())
    for client, session in zip(clients, sessions):
        problem = await out_of_sync(session, client.balance, lambda s=session: s.barrier(30), attempts=50)
        result.problems += [f"user {client.user_id}: {p}" for p in session.problems]
        if problem:
            result.problems.append(f"user {client.user_id}: {problem}")
        if session.reconnects < 1:
            result.problems.append(f"user {client.user_id}: the session never noticed the crash")
        await session.close()


async def run_trials(trials: int, *, users: int = 6, seed: int = 0) -> list[TrialResult]:
    """Run trials one after another (each kills its own server)."""
    configure_http(64)
    return [await run_trial(i + 1, users=users, seed=seed * 1000 + i) for i in range(trials)]
