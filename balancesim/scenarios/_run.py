"""The step interpreter and the verdict, the same for both worlds."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from balancesim.client import out_of_sync
from balancesim.scenarios._model import Scenario, Step
from balancesim.scenarios._worlds import OpFailed
from balancesim.vocabulary import SYMBOLS

__all__ = ["Outcome", "run_scenario", "NOTICED"]

# What "receives nothing" is about: an account's own events and the admin monitor.
NOTICED = ("balance_update", "trade_update", "trading_control_update", "admin_balance_monitor")
WAIT_S = 10.0


class Broken(Exception):
    """An expectation did not hold."""


@dataclass
class Outcome:
    """The verdict of one run."""

    scenario: str
    world: str
    ok: bool = True
    failure: str | None = None
    steps_run: int = 0
    messages_checked: int = 0
    problems: list[str] = field(default_factory=list)
    ledger: str = ""
    trades: int | None = None  # in the ledger at the end, when it was checked
    digest: str | None = None
    seconds: float = 0.0

    def text(self) -> str:
        head = f"scenario {self.scenario} ({self.world}): {'PASS' if self.ok else 'FAIL'}"
        lines = [f"{head} — {self.steps_run} steps, {self.messages_checked} messages checked, {self.seconds:.2f} s"]
        if self.failure:
            lines.append(f"  first broken expectation: {self.failure}")
        lines += [f"  - {p}" for p in self.problems[:20]]
        lines.append(f"  {self.ledger}")
        if self.digest:
            lines.append(f"  ledger digest {self.digest}")
        return "\n".join(lines)


class Interpreter:
    def __init__(self, scenario: Scenario, world: Any, seed: int) -> None:
        self.scenario, self.world = scenario, world
        self.rng = random.Random(seed)
        self.saved: dict[str, str] = {}
        self.cursor: dict[str, int] = {}

    def value(self, raw: Any) -> Any:
        """``$name`` → a participant's id or a saved id; inside strings too."""
        if isinstance(raw, str) and "$" in raw:
            refs = {**{k: str(v) for k, v in self.world.ids.items()}, **self.saved}
            whole = raw[1:] if raw.startswith("$") else None
            if whole in self.world.ids:
                return self.world.ids[whole]
            for name in sorted(refs, key=len, reverse=True):
                raw = raw.replace(f"${name}", refs[name])
        return raw

    async def run(self, step: Step) -> None:
        kind = step.kind
        if kind == "advance":
            await self.world.advance(step.data["advance"])
        elif kind == "do":
            await self.do(step)
        else:
            await getattr(self, f"expect_{step.data['expect']}")(step.data)

    async def do(self, step: Step) -> None:
        data = step.data
        if data["do"] == "trade_randomly":
            await self.trade_randomly(data)
            return
        args = {k: self.value(v) for k, v in data.items() if k not in ("do", "as", "error", "note", "save")}
        if "to" in args and isinstance(data.get("to"), str):
            args["to"] = self.world.ids[data["to"]]
        if "trade" in args:
            args["trade"] = self.saved.get(data["trade"], args["trade"])
        result = await self.world.op(data["as"], data["do"], args)
        expected_error = data.get("error")
        if isinstance(result, OpFailed):
            if expected_error != result.code:
                raise Broken(f"{data['as']}'s {data['do']} was refused with {result.code}"
                             + (f", expected {expected_error}" if expected_error else ""))
            return
        if expected_error:
            raise Broken(f"{data['as']}'s {data['do']} succeeded, expected the error {expected_error}")
        if "save" in data:
            record = result.get("trade") or result.get("order")
            self.saved[data["save"]] = record["trade_id"] if "trade_id" in record else record["order_id"]

    async def trade_randomly(self, data: dict[str, Any]) -> None:
        """Every ``every_s``, each user opens a random option; ``rounds`` times (a virtual day)."""
        users = [name for name, stream in self.world.streams.items() if stream.role == "user"]
        for _ in range(data["rounds"]):
            calls = [("option", {"symbol": self.rng.choice(list(SYMBOLS)),
                                 "direction": self.rng.choice(["up", "down"]),
                                 "amount": data.get("amount", "10"), "duration": self.rng.choice([30, 60])})
                     for _ in users]
            for result in await self.world.op_many(None, calls, actors=users):
                if isinstance(result, OpFailed) and result.code != "insufficient_funds":
                    raise Broken(f"a random option was refused with {result.code}")
            await self.world.advance(data["every_s"])

    # -- expectations --------------------------------------------------------------

    async def expect_message(self, data: dict[str, Any]) -> None:
        who, kind = data["who"], data["type"]
        wanted = {k: self.value(v) for k, v in data.get("fields", {}).items()}
        if wanted.get("username") in self.world.usernames:
            wanted["username"] = self.world.usernames[wanted["username"]]

        def matches(message: dict[str, Any]) -> bool:
            return all(_field(message, k) == v for k, v in wanted.items())

        stream = self.world.streams[who]
        start = self.cursor.get(who, 0)
        index = stream.find(kind, matches, start)
        if index is None and self.world.remote:
            try:
                await stream.wait_for(kind, matches, start=start, timeout_s=WAIT_S)
            except TimeoutError:
                pass
            index = stream.find(kind, matches, start)
        if index is None:
            seen = [_brief(m) for m in stream.messages[start:] if m["type"] in NOTICED][:5]
            raise Broken(f"{who}'s session did not receive a {kind} with {wanted}; it received {seen or 'nothing'}")
        self.cursor[who] = index + 1

    async def expect_nothing(self, data: dict[str, Any]) -> None:
        await self.world.barrier()
        who = data["who"]
        types = data.get("types", NOTICED)
        stream = self.world.streams[who]
        unexpected = [m for m in stream.messages[self.cursor.get(who, 0):] if m["type"] in types]
        if unexpected:
            raise Broken(f"{who}'s session should have received nothing, but got {[_brief(m) for m in unexpected][:5]}")

    async def expect_balance(self, data: dict[str, Any]) -> None:
        await self.world.barrier()
        who, asset, want = data["who"], data.get("asset", "USDT"), data["equals"]
        stored = (await self.world.balance(who))["balances"][asset]
        shown = self.world.streams[who].balances.get(asset)
        if stored != want or shown != want:
            raise Broken(f"{who}'s {asset} balance: expected {want}, stored {stored}, shown in the session {shown}")

    async def expect_trade(self, data: dict[str, Any]) -> None:
        trade_id = self.saved.get(data["trade"], data["trade"])
        trade = await self.world.trade(None, trade_id)
        statuses = data["status"] if isinstance(data["status"], list) else [data["status"]]
        if trade is None or trade["status"] not in statuses:
            raise Broken(f"trade {data['trade']} ({trade_id}): expected status {statuses}, found {trade and trade['status']}")
        if "decided_by" in data and trade["decided_by"] != self.value(data["decided_by"]):
            raise Broken(f"trade {data['trade']}: expected decided_by {self.value(data['decided_by'])}, found {trade['decided_by']}")

    async def expect_history(self, data: dict[str, Any]) -> None:
        wanted = {k: self.value(v) for k, v in data["contains"].items()}
        entries = await self.world.history(data["who"])
        if not any(all(_field(e, k) == v for k, v in wanted.items()) for e in entries):
            raise Broken(f"{data['who']}'s history has no entry with {wanted}; it has {[_brief(e) for e in entries][-5:]}")


def _field(record: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def _brief(message: dict[str, Any]) -> str:
    keys = ("type", "user_id", "change", "change_type", "version", "mode", "amount", "status")
    inner = message.get("trade", {})
    return " ".join(f"{k}={message.get(k, inner.get(k))}" for k in keys if k in message or k in inner)


async def run_scenario(scenario: Scenario, world: Any, seed: int | None = None) -> Outcome:
    """Run every step, stop at the first broken expectation, then judge what every session saw."""
    outcome = Outcome(scenario.name, "remote" if world.remote else "in-process")
    started = time.perf_counter()
    interpreter = Interpreter(scenario, world, scenario.seed if seed is None else seed)
    await world.setup(scenario.participants)
    try:
        for step in scenario.steps:
            try:
                await interpreter.run(step)
            except (Broken, TimeoutError) as broken:
                outcome.ok = False
                outcome.failure = f"step {step.number} ({scenario.path}:{step.line}): {broken}"
                break
            outcome.steps_run += 1
        await world.barrier()
        await judge(world, outcome)
    finally:
        finished = await world.finish()
    outcome.ledger, outcome.digest, outcome.trades = finished["ledger"], finished.get("digest"), finished.get("trades")
    outcome.ok = outcome.ok and finished["ledger_ok"] and not outcome.problems
    outcome.seconds = time.perf_counter() - started
    return outcome


async def judge(world: Any, outcome: Outcome) -> None:
    """Order and gaps, isolation, and shown balances equal to stored ones, for every session."""

    async def check(name: str, stream: Any) -> list[str]:
        problem = await out_of_sync(stream, lambda: world.balance(name), getattr(stream, "barrier", world.barrier))
        return [f"{name}: {p}" for p in [*stream.problems, *([problem] if problem else [])]]

    found = await asyncio.gather(*(check(name, stream) for name, stream in world.streams.items()))
    outcome.messages_checked += sum(len(stream.messages) for stream in world.streams.values())
    outcome.problems += [problem for problems in found for problem in problems]
