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
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

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


# -- cluster mode: ``chaos --cluster`` ------------------------------------------------------
#
# One ``serve --workers 2 --shards 2`` for the whole run; each trial injects one fault of
# the kinds below, in turn, at a random moment under load, lets the cluster recover by
# itself and then checks PROTOCOL.md's promises over everything done so far.

def cluster_children(serve_pid: int) -> dict[str, Any]:
    """The live children of a ``serve --workers`` parent, from ``/proc``:
    ``{"gateways": [pid, …], "shards": {index: pid}, "redis": pid | None}``."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(name)] = int(fields[1])
            except (OSError, ValueError, IndexError):
                pass
    found: dict[str, Any] = {"gateways": [], "shards": {}, "redis": None}
    for pid, parent in parents.items():
        if parent != serve_pid:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = [part.decode(errors="replace") for part in cmdline.read().split(b"\0")]
        except OSError:
            continue
        if "gateway" in argv:
            found["gateways"].append(pid)
        elif "shard" in argv and "--index" in argv:
            found["shards"][int(argv[argv.index("--index") + 1])] = pid
        elif argv and os.path.basename(argv[0].split()[0]).startswith("redis-server"):
            # (redis-server rewrites its argv: "/usr/bin/redis-server unixsocket:…")
            found["redis"] = pid
    found["gateways"].sort()
    return found


async def raw_call(base_url: str, method: str, path: str, body: Any = None, *, token: str | None = None,
                   key: str | None = None, timeout_s: float = 60) -> tuple[int, Any]:
    """One HTTP call whose every answer is data: ``(status, parsed body)``; status 0 when
    no answer came at all (refused, reset: the outcome is as open as a 504's)."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key:
        headers["Idempotency-Key"] = key
    try:
        response = await AsyncHTTPClient().fetch(
            base_url + path, method=method, headers=headers, allow_nonstandard_methods=True,
            body=None if body is None else json.dumps(body), request_timeout=timeout_s)
    except HTTPClientError as error:
        if error.response is None:
            return 0, {"error": {"code": "no_answer", "message": str(error)}}
        try:
            return error.code, json.loads(error.response.body)
        except ValueError:
            return error.code, {"error": {"code": "http_error", "message": str(error)}}
    except OSError as error:
        return 0, {"error": {"code": "no_answer", "message": str(error)}}
    return response.code, json.loads(response.body) if response.body else None


async def barrier(session: Session, timeout_s: float = 30) -> None:
    """``session.barrier()``, waiting out a reconnect in progress (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await session.barrier(5)
            return
        except Exception:  # noqa: BLE001 - closed mid-reconnect, or no pong yet: try again
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def session_in_sync(session: Session, read_balance: Callable[[], Awaitable[dict]],
                          timeout_s: float = 60) -> str | None:
    """``out_of_sync`` for a cluster under repair: reads that meet a 503 or a reconnect are
    retried (bounded), and a session that is behind is given until ``timeout_s`` to catch up."""
    deadline = time.monotonic() + timeout_s

    async def stored() -> dict:
        while True:
            try:
                return await read_balance()
            except (ApiError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    while True:
        problem = await out_of_sync(session, stored, lambda: barrier(session, timeout_s), attempts=50)
        if problem is None or time.monotonic() > deadline:
            return problem
        await asyncio.sleep(0.2)
