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
import contextlib
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

__all__ = ["TrialResult", "run_trial", "run_trials", "ClusterTrial", "FAULT_KINDS", "run_cluster_trials",
           "cluster_children", "raw_call", "barrier", "session_in_sync"]

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
# itself and then checks PROTOCOL.md's promises over everything done so far. With
# ``--hosts`` (``_HostsRun``) the cluster runs on three namespace hosts instead, this run
# restarts what it kills (no supervisor spans hosts), and the partition kind runs too.

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
        elif argv[0].split() and os.path.basename(argv[0].split()[0]).startswith("redis-server"):
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


CLUSTER_TIMEOUT_S = 2.0
CLUSTER_SERVER_ARGS = ("--workers", "2", "--shards", "2", "--demo", "--time-scale", "0.02", "--password-cost", "1024",
                       "--timeout-s", repr(CLUSTER_TIMEOUT_S))
#: The fault kinds, taken in turn: trial ``i`` injects ``FAULT_KINDS[(i - 1) % 5]``.
FAULT_KINDS = ("gateway", "shard", "redis", "stall", "partition")
# Every wait for the cluster to recover, or for an answer to settle: far above normal.
_RECOVER_S = 60.0
_OPEN = (0, 503, 504)
# With --hosts this run restarts what it killed, after the supervisor's first backoff.
_RESTART_AFTER_S = 1.0  # answers that leave a request to repeat (0: no answer at all)


@dataclass
class _Request:
    """One mutation, always with its own Idempotency-Key; ``status`` is its final answer's."""

    key: str
    method: str
    path: str
    body: dict[str, Any]
    token: str
    account: int
    status: int = 0
    answer: Any = None
    repeats: int = 0
    #: Settled as expired (a 503 its key on disk records as refused): a final answer.
    expired: bool = False

    @property
    def acked(self) -> bool:
        return 200 <= self.status < 300

    def transactions(self) -> list[dict]:
        return transactions_of(self.answer) if self.acked and self.answer else []

    def trade(self) -> dict | None:
        return self.answer.get("trade") if self.acked and self.answer else None


@dataclass
class ClusterTrial:
    """What one cluster trial did and found."""

    trial: int
    kind: str
    ran: bool = True
    fault: str = ""
    acknowledged: int = 0
    refused: int = 0
    unavailable: int = 0
    timeouts: int = 0
    timeouts_resolved: int = 0
    expired: int = 0
    cut_off: int = 0
    cut_off_resolved: int = 0
    reconnects: int = 0
    read_your_writes: int = 0
    read_your_writes_skipped: int = 0
    entries_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        if not self.ran:
            return (f"trial {self.trial} ({self.kind}): NOT RUN — cutting a shard's host off the network needs "
                    "the namespace layout (--hosts); this run has every process on one host")
        head = (f"trial {self.trial} ({self.kind}): {'OK' if self.ok else 'FAILED'} — {self.fault}; "
                f"{self.acknowledged} mutations acknowledged, {self.refused} refused, {self.unavailable} × 503, "
                f"{self.timeouts_resolved}/{self.timeouts} timeouts resolved ({self.expired} as expired), "
                f"{self.cut_off_resolved}/{self.cut_off} cut-off requests resolved, {self.reconnects} session "
                f"reconnects, {self.read_your_writes} reads on the other gateway "
                f"({self.read_your_writes_skipped} skipped while unready), {self.entries_checked} entries checked")
        return "\n".join([head, *(f"  - {p}" for p in self.problems[:20])])


class _ClusterRun:
    """One ``serve --workers 2 --shards 2``, an extra gateway on another port, the users."""

    def __init__(self, tmp: str, users: int, rng: random.Random) -> None:
        self.data_dir = os.path.join(tmp, "data")
        self.server = ServerProcess(None, *CLUSTER_SERVER_ARGS, data_dir=self.data_dir)
        self.users = users
        self.rng = rng
        self.extra: Any = None
        self.extra_url = ""
        self.requests: list[_Request] = []
        self.clients: list[Client] = []
        self.sessions: list[Session] = []
        self.boss: Client | None = None
        self.counts: dict[str, int] = {}
        self.keys = 0
        self.url = ""  # the gateways that take the writes and the sessions
        self.admin = ("superadmin", "superadmin123")  # serve --demo's

    # -- the processes -------------------------------------------------------------------

    def start(self) -> None:
        import subprocess
        import sys

        from balancesim.cluster import SECRET_ENV, read_redis_url
        from balancesim.cluster._supervisor import REDIS_URL_ENV

        self.server.start()
        self.url = self.server.url
        # A gateway of its own on another port (as on another machine), to read from a
        # gateway other than the one that acknowledged a write.
        env = {**os.environ, REDIS_URL_ENV: read_redis_url(self.data_dir)}
        with open(os.path.join(self.data_dir, "cluster.secret")) as secret:
            env[SECRET_ENV] = secret.read().strip()
        self.extra = subprocess.Popen(
            [sys.executable, "-m", "balancesim.cli", "gateway", "--port", "0", "--timeout-s", repr(CLUSTER_TIMEOUT_S)],
            env=env, stdout=subprocess.PIPE, stderr=open(os.path.join(self.data_dir, "extra-gateway.log"), "a"),
            text=True, start_new_session=True)
        line = self.extra.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the extra gateway did not start: {line!r}")
        self.extra_url = line.split()[-1]

    def stop(self) -> None:
        import signal
        import subprocess

        if self.extra is not None and self.extra.poll() is None:
            self.extra.send_signal(signal.SIGTERM)
            try:
                self.extra.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.extra.kill()
                self.extra.wait()
        if self.server.running():
            self.server.stop()

    async def ready(self) -> bool:
        """Both the shared port and the extra gateway answer ``/readyz`` with 200."""
        return all([(await raw_call(url, "GET", "/readyz", timeout_s=10))[0] == 200
                    for url in (self.url, self.extra_url)])

    async def wait_ready(self, what: str) -> str | None:
        deadline = time.monotonic() + _RECOVER_S
        while not await self.ready():
            if time.monotonic() > deadline:
                return f"the cluster was not ready again within {_RECOVER_S:g} s after {what}"
            await asyncio.sleep(0.2)
        return None

    # -- the load ------------------------------------------------------------------------

    async def setup(self) -> None:
        self.boss = await Client.login(self.url, *self.admin)
        for i in range(self.users):
            made = await self.boss.create_user(f"chaos{i}", "pw", key=f"chaos-user-{i}")
            start = self._request("deposit", made["user_id"], self.boss.token, {"amount": "10000"})
            await self._send(start)
            if not start.acked:
                raise RuntimeError(f"the first deposit failed: {start.status} {start.answer}")
            client = await Client.login(self.url, f"chaos{i}", "pw")
            self.clients.append(client)
            self.sessions.append(await client.session())

    def _request(self, name: str, account: int, token: str, body: dict[str, Any]) -> _Request:
        self.keys += 1
        path = {"deposit": "/api/admin/deposits", "withdraw": "/api/admin/withdrawals", "spot": "/api/spot/orders",
                "option": "/api/options"}[name]
        if name in ("deposit", "withdraw"):
            body = {"user_id": account, **body}
        request = _Request(f"chaos-{self.keys}-{name}", "POST", path, body, token, account)
        self.requests.append(request)
        return request

    async def _send(self, request: _Request) -> int:
        request.status, request.answer = await raw_call(self.url, request.method, request.path, request.body,
                                                        token=request.token, key=request.key)
        return request.status

    async def drive(self, client: Client, stop: asyncio.Event, trial: ClusterTrial) -> None:
        """One user's mutations until ``stop``: every answer classified, every 2xx read back
        at once on the other gateway."""
        rng, boss = self.rng, self.boss
        assert boss is not None
        while not stop.is_set():
            name = rng.choice(["deposit", "withdraw", "spot", "spot", "option", "option"])
            if name == "deposit":
                amount = f"{rng.randint(1, 99)}.{rng.randint(0, 99)}"
                request = self._request(name, client.user_id, boss.token, {"amount": amount})
            elif name == "withdraw":
                request = self._request(name, client.user_id, boss.token, {"amount": str(rng.randint(1, 20))})
            elif name == "spot":
                request = self._request(name, client.user_id, client.token,
                                        {"symbol": rng.choice(list(SYMBOLS)), "side": rng.choice(["buy", "sell"]),
                                         "quantity": "0.001"})
            else:
                request = self._request(name, client.user_id, client.token,
                                        {"symbol": rng.choice(list(SYMBOLS)), "direction": rng.choice(["up", "down"]),
                                         "amount": "5", "duration": rng.choice([30, 60])})
            status = await self._send(request)
            self._classify(request, trial)
            if request.acked:
                await self._read_back(request, trial)
            elif status >= 500 and status not in _OPEN:
                trial.problems.append(f"{request.key}: {status} {request.answer}")
            # No answer at all: the gateway is down until it is restarted; trying again at
            # once would only spin (thousands of refused connections on 2 shared cores).
            await asyncio.sleep(0.2 if status == 0 else 0.01)

    def _classify(self, request: _Request, trial: ClusterTrial) -> None:
        status, answer = request.status, request.answer
        if 200 <= status < 300:
            trial.acknowledged += 1
        elif status == 504:
            trial.timeouts += 1
            told = (answer or {}).get("idempotency_key", ((answer or {}).get("error") or {}).get("idempotency_key"))
            if told != request.key:
                trial.problems.append(f"{request.key}: a 504 that names the key {told!r}, not the caller's")
        elif status == 0:
            trial.cut_off += 1
        elif status == 503:
            trial.unavailable += 1
        else:
            trial.refused += 1

    async def _read_back(self, request: _Request, trial: ClusterTrial) -> None:
        """Read-your-writes across gateways: the account's version on the extra gateway is at
        least the version the 2xx (from a gateway on the shared port) acknowledged."""
        assert self.boss is not None
        versions = [tx["version"] for tx in request.transactions() if tx["user_id"] == request.account]
        trade = request.trade()
        if trade is not None:
            versions.append(int(trade["trade_id"].rsplit("-", 1)[1]))
        if not versions:
            return
        status, body = await raw_call(self.extra_url, "GET", f"/api/users/{request.account}/balance",
                                      token=self.boss.token)
        if status in _OPEN:
            trial.read_your_writes_skipped += 1  # that gateway is not ready (Redis away): no answer to check
            return
        trial.read_your_writes += 1
        if status != 200 or body["version"] < max(versions):
            trial.problems.append(f"read-your-writes: {request.key} acknowledged version {max(versions)} of account "
                                  f"{request.account}, the other gateway then answered {status} {body}")

    async def resolve(self, trial: ClusterTrial) -> None:
        """Repeat every request left open (504, or cut off) with its key until it has an answer."""
        for request in self.requests:
            if request.status not in _OPEN or request.status == 503 and (request.repeats == 0 or request.expired):
                continue  # answered (a first 503 is an answer: nothing was handed over), or settled before
            was = request.status
            deadline = time.monotonic() + _RECOVER_S
            while request.status in _OPEN:
                if request.status == 503 and request.repeats and _remembered(self.data_dir, request.key) is False:
                    # The original expired in a shard's queue (a stall past its deadline): the
                    # shard remembered that refusal under the key, and every repeat gets it.
                    # On the wire it is a 503 like "not handed over"; the key on disk tells.
                    trial.expired += 1
                    request.expired = True
                    break
                if time.monotonic() > deadline:
                    trial.problems.append(f"{request.key}: still {request.status} {request.answer} after "
                                          f"{_RECOVER_S:g} s of repeats with its key")
                    break
                await asyncio.sleep(0.2 if request.repeats else 0)
                request.repeats += 1
                await self._send(request)
            if request.status not in _OPEN or request.status == 503 and request.repeats:
                if was == 504:
                    trial.timeouts_resolved += 1
                elif was == 0:
                    trial.cut_off_resolved += 1
                if request.acked:
                    await self._read_back(request, trial)

    # -- the faults ----------------------------------------------------------------------

    async def inject(self, kind: str) -> tuple[str, str | None]:
        """Inject one fault and wait (bounded) until the cluster has healed by itself:
        ``(what was done, problem or None)``."""
        import signal

        children = cluster_children(self.server.pid)
        if kind == "gateway":
            victim = self.rng.choice(children["gateways"])
            os.kill(victim, signal.SIGKILL)
            what = f"SIGKILL gateway pid {victim}"
            problem = await self._until(lambda: len(g := cluster_children(self.server.pid)["gateways"]) == 2
                                        and victim not in g, f"a new gateway after {what}")
        elif kind == "shard":
            index = self.rng.choice(sorted(children["shards"]))
            victim = children["shards"][index]
            os.kill(victim, signal.SIGKILL)
            what = f"SIGKILL shard {index} pid {victim}"
            problem = await self._until(lambda: cluster_children(self.server.pid)["shards"].get(index) not in
                                        (None, victim), f"shard {index} restarted after {what}")
        elif kind == "redis":
            victim = children["redis"]
            if victim is None:
                return "no redis-server child found", "serve has no redis-server child to kill"
            os.kill(victim, signal.SIGKILL)
            what = f"SIGKILL redis-server pid {victim}"
            problem = await self._until(lambda: cluster_children(self.server.pid)["redis"] not in (None, victim),
                                        f"redis-server restarted after {what}")
        elif kind == "stall":
            what, problem = await self._stall(children["shards"]), None
        else:
            raise ValueError(f"no fault kind {kind!r}")
        return what, problem or await self.wait_ready(what)

    async def _stall(self, shards: dict[int, int]) -> str:
        """SIGSTOP one of ``shards`` (index → pid) past the deadline, then SIGCONT: what was done."""
        import signal

        index = self.rng.choice(sorted(shards))
        victim = shards[index]
        # Past the gateways' deadline and their outcome query (each CLUSTER_TIMEOUT_S).
        stopped_s = 2 * CLUSTER_TIMEOUT_S + 2
        os.kill(victim, signal.SIGSTOP)
        try:
            await asyncio.sleep(stopped_s)
        finally:
            os.kill(victim, signal.SIGCONT)
        return f"SIGSTOP shard {index} pid {victim} for {stopped_s:g} s, then SIGCONT"

    def kept_logs(self) -> str:
        """Copy the failed run's log out of the temporary directory, which is about to go;
        where it went."""
        kept = os.path.join(tempfile.gettempdir(), f"balancesim-chaos-cluster-{os.getpid()}.log")
        with open(kept, "w") as out:
            out.write(self.server.log())
        return kept

    async def _until(self, check: Callable[[], bool], what: str) -> str | None:
        deadline = time.monotonic() + _RECOVER_S
        while not check():
            if time.monotonic() > deadline:
                return f"not within {_RECOVER_S:g} s: {what}"
            await asyncio.sleep(0.1)
        return None

    # -- the checks ----------------------------------------------------------------------

    async def check(self, trial: ClusterTrial) -> None:
        """Every promise, over everything done so far (each check adds to ``problems``)."""
        trial.problems += await self._settled()
        trial.problems += self._against_ledgers(trial)
        trial.problems += _ledger_verify(self.data_dir)
        boss = self.boss
        assert boss is not None
        for client, session in zip(self.clients, self.sessions):
            problem = await session_in_sync(session, lambda c=client: boss.balance(c.user_id))
            trial.problems += [f"user {client.user_id}'s session: {p}" for p in session.problems]
            if problem:
                trial.problems.append(f"user {client.user_id}'s session: {problem}")
        trial.reconnects = sum(s.reconnects for s in self.sessions) - self.counts.get("reconnects", 0)
        self.counts["reconnects"] = sum(s.reconnects for s in self.sessions)

    async def _settled(self) -> list[str]:
        deadline = time.monotonic() + _RECOVER_S
        while True:
            still = []
            for client in self.clients:
                status, body = await raw_call(self.url, "GET", "/api/options?status=open", token=client.token)
                # With its expiry, as evidence: a trade waits for a tick at or after it.
                still += ([f"{t['trade_id']} (expires {t.get('expires_at')})" for t in body["trades"]]
                          if status == 200 else [f"(user {client.user_id}: {status})"])
            if not still:
                return []
            if time.monotonic() > deadline:
                # Beside them, the feed as the gateway sees it (its latest tick's time).
                _, market = await raw_call(self.url, "GET", "/api/market", token=self.clients[0].token)
                return [f"{len(still)} trades still open {_RECOVER_S:g} s after the fault: {still[:5]}; "
                        f"the market then: {json.dumps(market)[:300]}"]
            await asyncio.sleep(0.2)

    def _against_ledgers(self, trial: ClusterTrial) -> list[str]:
        """Every 2xx field for field against the shard files; every stored entry traced back
        to exactly one acknowledged request; no refused request applied."""
        from balancesim.cluster import placement_of_data_dir, shard_file, shard_of_user_id
        from balancesim.reports import history

        placement = placement_of_data_dir(self.data_dir, None)
        problems: list[str] = []
        stored: dict[int, dict] = {}
        for client in self.clients:
            path = shard_file(self.data_dir, shard_of_user_id(placement, client.user_id))
            stored.update((tx["transaction_id"], tx) for tx in history(path, str(client.user_id)))
        by_tx: dict[int, list[str]] = {}
        trades: dict[str, list[str]] = {}
        for request in self.requests:
            for tx in request.transactions():
                by_tx.setdefault(tx["transaction_id"], []).append(request.key)
                if stored.get(tx["transaction_id"]) != tx:
                    problems.append(f"{request.key} acknowledged {tx}; "
                                    f"the ledger has {stored.get(tx['transaction_id'])}")
            if (trade := request.trade()) is not None:
                trades.setdefault(trade["trade_id"], []).append(request.key)
        for tx_id, keys in by_tx.items():
            if len(keys) > 1:
                problems.append(f"transaction {tx_id} acknowledged by {len(keys)} requests: {keys}")
        settlements: dict[str, int] = {}
        for tx_id, tx in stored.items():
            if tx["type"].startswith("option_"):
                trade_id = tx["metadata"].get("trade_id")
                if len(trades.get(trade_id, [])) != 1:
                    problems.append(f"entry {tx_id} ({tx['type']} of trade {trade_id}) traces back to "
                                    f"{len(trades.get(trade_id, []))} acknowledged requests, not one")
                if tx["type"] != "option_stake":
                    settlements[trade_id] = settlements.get(trade_id, 0) + 1
            elif len(by_tx.get(tx_id, [])) != 1:
                problems.append(f"entry {tx_id} ({tx['type']} {tx['amount']} {tx['asset']} of account "
                                f"{tx['user_id']}) traces back to {len(by_tx.get(tx_id, []))} acknowledged "
                                "requests, not one: an error applied, or a request applied twice")
        problems += [f"trade {t} settled {n} times" for t, n in settlements.items() if n > 1]
        trial.entries_checked = len(stored)
        # The keys on disk: an acknowledged request's is there and confirmed; a refused one's,
        # if there at all, records the refusal.
        remembered = _remembered_keys(self.data_dir)
        for request in self.requests:
            applied = remembered.get(request.key)
            if request.acked and not applied:
                problems.append(f"{request.key} was acknowledged ({request.status}) but its key is "
                                f"{'missing' if applied is None else 'recorded as refused'} on disk")
            elif not request.acked and request.status not in (0, 504) and applied:
                problems.append(f"{request.key} was refused ({request.status} {request.answer}) but applied on disk")
        return problems


def _remembered_keys(data_dir: str, like: str = "chaos-%") -> dict[str, bool]:
    """The idempotency keys on the shards' disks: ``True`` applied, ``False`` refused."""
    import sqlite3

    from balancesim.actors import Rejected
    from balancesim.actors._codec import decode
    from balancesim.cluster import placement_of_data_dir, shard_file

    remembered: dict[str, bool] = {}
    for index in range(placement_of_data_dir(data_dir, None).shards):
        with contextlib.closing(sqlite3.connect(f"file:{shard_file(data_dir, index)}?mode=ro", uri=True)) as db:
            for key, result in db.execute("SELECT key, result FROM idempotency WHERE key LIKE ?", (like,)):
                remembered[key] = not isinstance(decode(result), Rejected)
    return remembered


def _remembered(data_dir: str, key: str) -> bool | None:
    return _remembered_keys(data_dir, key).get(key)


def _ledger_verify(data_dir: str) -> list[str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "balancesim.cli", "ledger", "verify", "--data-dir", data_dir],
                          capture_output=True, text=True, timeout=300)
    return [] if done.returncode == 0 else [f"ledger verify --data-dir: {done.stdout}{done.stderr}"]


class _HostsRun(_ClusterRun):
    """``chaos --cluster --hosts``: the same trials on the three-host namespace layout
    (``balancesim.cluster._hosts``): Redis and shard 0 on host A, shard 1 on host B, a
    gateway on host C and one on host A. The clients run on host C (this process's main
    thread enters its namespace): the writes and the sessions go to C's gateway, the
    read-your-writes check reads on A's. There is no ``serve`` across hosts, so this
    run restarts what it killed, as the supervisor would (after a second's backoff); the
    fifth kind cuts host B off the network past the deadline, then heals it."""

    def __init__(self, tmp: str, users: int, rng: random.Random) -> None:
        from pathlib import Path

        from balancesim.cluster import HostsCluster

        super().__init__(tmp, users, rng)
        self.hosts = HostsCluster(Path(tmp) / "hosts", gateway_hosts=("c", "a"), admin=self.admin,
                                  shard_args=("--time-scale", "0.02", "--password-cost", "1024"),
                                  gateway_args=("--timeout-s", repr(CLUSTER_TIMEOUT_S)))
        self.data_dir = str(self.hosts.ledgers)  # an auditor's view of every host's shard file
        self._inside: contextlib.ExitStack | None = None

    def start(self) -> None:
        self.hosts.start()
        self.url, self.extra_url = self.hosts.urls["c"], self.hosts.urls["a"]
        self._inside = contextlib.ExitStack()
        self._inside.enter_context(self.hosts.inside("c"))

    def stop(self) -> None:
        try:
            if self._inside is not None:
                self._inside.close()
        finally:
            self.hosts.close()

    async def inject(self, kind: str) -> tuple[str, str | None]:
        import signal

        hosts = self.hosts
        loop = asyncio.get_running_loop()
        if kind == "gateway":
            host = self.rng.choice(sorted(hosts.gateways))
            victim = hosts.gateways[host].pid
            os.kill(victim, signal.SIGKILL)
            hosts.gateways[host].wait()
            await asyncio.sleep(_RESTART_AFTER_S)
            await loop.run_in_executor(None, hosts.start_gateway, host)
            what = f"SIGKILL the gateway on host {host} (pid {victim}), restarted as pid {hosts.gateways[host].pid}"
        elif kind == "shard":
            index = self.rng.choice(sorted(hosts.shards))
            victim = hosts.shards[index].pid
            os.kill(victim, signal.SIGKILL)
            hosts.shards[index].wait()
            await self._forget_shard(index)
            await asyncio.sleep(_RESTART_AFTER_S)
            await loop.run_in_executor(None, hosts.start_shard, index)
            what = f"SIGKILL shard {index} (pid {victim}), restarted as pid {hosts.shards[index].pid}"
        elif kind == "redis":
            assert hosts.redis is not None
            victim = hosts.redis.pid
            os.kill(victim, signal.SIGKILL)
            hosts.redis.wait()
            await asyncio.sleep(_RESTART_AFTER_S)
            # On this (the main) thread: the new server dies with this process (see Lan.start).
            hosts.start_redis()
            what = f"SIGKILL redis-server on host A (pid {victim}), restarted as pid {hosts.redis.pid}"
        elif kind == "stall":
            what = await self._stall({k: p.pid for k, p in hosts.shards.items()})
        elif kind == "partition":
            # Past the deadline and the outcome query, and past the stale-heartbeat limit, so
            # that both the 504 and the prompt 503 are met.
            cut_s = 2 * CLUSTER_TIMEOUT_S + 4
            hosts.cut("b")
            try:
                await asyncio.sleep(cut_s)
            finally:
                hosts.heal("b")
            what = f"cut host B (shard 1) off the network for {cut_s:g} s, then healed it"
        else:
            raise ValueError(f"no fault kind {kind!r}")
        return what, await self.wait_ready(what)

    async def _forget_shard(self, index: int) -> None:
        # As the supervisor does: the dead shard's heartbeat would live on for its expiry;
        # deleted, the gateways answer its accounts 503 at once.
        import redis.asyncio

        from balancesim.cluster._health import shard_heartbeat_key

        client = redis.asyncio.Redis.from_url(self.hosts.redis_url, socket_timeout=2.0)
        try:
            await client.delete(shard_heartbeat_key(index))
        except (OSError, redis.RedisError):
            pass  # then the heartbeat goes stale by itself, as a partitioned shard's does
        finally:
            await client.aclose()

    def kept_logs(self) -> str:
        import shutil

        kept = os.path.join(tempfile.gettempdir(), f"balancesim-chaos-hosts-{os.getpid()}")
        shutil.copytree(self.hosts.lan.logs, kept, dirs_exist_ok=True)
        return kept


async def run_cluster_trial(run: _ClusterRun, trial_number: int) -> ClusterTrial:
    """One fault of the next kind, at a random moment under load; then every check."""
    kind = FAULT_KINDS[(trial_number - 1) % len(FAULT_KINDS)]
    trial = ClusterTrial(trial_number, kind)
    if kind == "partition" and not isinstance(run, _HostsRun):
        trial.ran = False  # needs --hosts: processes on other (namespace) hosts
        return trial
    stop = asyncio.Event()
    drivers = [asyncio.ensure_future(run.drive(client, stop, trial)) for client in run.clients]
    try:
        await asyncio.sleep(run.rng.uniform(0.3, 1.5))
        trial.fault, problem = await run.inject(kind)
        if problem:
            trial.problems.append(problem)
        await asyncio.sleep(1.0)  # load on the healed cluster too
    finally:
        stop.set()
        await asyncio.gather(*drivers, return_exceptions=True)
    for driver in drivers:
        if driver.exception() is not None:
            trial.problems.append(f"a load driver failed: {driver.exception()!r}")
    await run.resolve(trial)
    await run.check(trial)
    return trial


async def run_cluster_trials(trials: int, *, users: int = 6, seed: int = 0, hosts: bool = False,
                             echo: Callable[[str], None] = print) -> list[ClusterTrial]:
    """``chaos --cluster``: one cluster, ``trials`` faults in turn; stops at the first
    trial that breaks a promise. ``hosts``: on the three-host namespace layout, where
    the partition kind runs too (needs root: ``hosts_unavailable()`` says why not)."""
    configure_http(64)
    results: list[ClusterTrial] = []
    with tempfile.TemporaryDirectory(prefix="bs-chaos-") as tmp:
        run = (_HostsRun if hosts else _ClusterRun)(tmp, users, random.Random(seed))
        try:
            run.start()
            await run.setup()
            for number in range(1, trials + 1):
                result = await run_cluster_trial(run, number)
                results.append(result)
                echo(result.text())
                if not result.ok:
                    echo(f"the cluster's logs are kept in {run.kept_logs()}")
                    break
        finally:
            for session in run.sessions:
                await session.close()
            run.stop()
    return results
