"""Scenario files: TOML with participants, a seed and steps, checked before anything runs.

A step is one table of ``[[steps]]`` and has exactly one of ``do`` (an operation),
``advance`` (simulated seconds) or ``expect`` (a check). ``$name`` in a value
stands for a participant's user id or a saved trade/order id. A file that breaks
these rules is refused with its path, the line and what is wrong.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Scenario", "Step", "Participant", "ScenarioError", "load", "OPS", "EXPECTS", "FILES"]

FILES = Path(__file__).parent / "files"
ROLES = ("user", "admin", "superadmin")

# op → (required keys, optional keys); ``as`` names who performs it.
OPS: dict[str, tuple[set[str], set[str]]] = {
    "deposit": ({"as", "to", "amount"}, {"asset", "description"}),
    "withdraw": ({"as", "to", "amount"}, {"asset", "description"}),
    "adjust": ({"as", "to", "amount", "description"}, {"asset"}),
    "control": ({"as", "to", "mode"}, set()),
    "force": ({"as", "trade", "outcome"}, set()),
    "option": ({"as", "symbol", "direction", "amount", "duration"}, {"save"}),
    "spot": ({"as", "symbol", "side", "quantity"}, {"save"}),
    "trade_randomly": ({"every_s", "rounds"}, {"amount"}),
}
COMMON = {"error", "note"}
EXPECTS: dict[str, tuple[set[str], set[str]]] = {
    "message": ({"who", "type"}, {"fields"}),
    "nothing": ({"who"}, {"types"}),
    "balance": ({"who", "equals"}, {"asset"}),
    "trade": ({"trade", "status"}, {"decided_by"}),
    "history": ({"who", "contains"}, set()),
}


class ScenarioError(Exception):
    """A malformed scenario: ``path:line: what``."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(f"{path}:{line or 1}: {message}")


@dataclass(frozen=True)
class Participant:
    name: str
    role: str
    deposit: str | None = None


@dataclass(frozen=True)
class Step:
    number: int
    line: int
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return next(k for k in ("do", "advance", "expect") if k in self.data)


@dataclass
class Scenario:
    name: str
    path: str
    description: str
    seed: int
    participants: dict[str, Participant]
    steps: list[Step] = field(default_factory=list)


def resolve(name_or_path: str) -> Path:
    """A shipped scenario's file by name, or the path given."""
    shipped = FILES / f"{name_or_path}.toml"
    return shipped if shipped.exists() else Path(name_or_path)


def load(name_or_path: str) -> Scenario:
    """Read and check a scenario; ``ScenarioError`` names the file and line of the first problem."""
    path = resolve(name_or_path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ScenarioError(where, None, f"cannot read the file: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None) or _line_of_decode_error(str(error))
        raise ScenarioError(where, line, f"not valid TOML: {error}") from None
    lines = text.splitlines()
    step_lines = [i + 1 for i, line in enumerate(lines) if line.strip() == "[[steps]]"]

    def line_of(pattern: str) -> int | None:
        regex = re.compile(pattern)
        return next((i + 1 for i, line in enumerate(lines) if regex.search(line)), None)

    for key in data:
        if key not in ("name", "description", "seed", "participants", "steps"):
            raise ScenarioError(where, line_of(rf"^\s*\[?{re.escape(key)}\b"), f"unknown key {key!r}")
    participants = {}
    for name, spec in data.get("participants", {}).items():
        line = line_of(rf"^\s*{re.escape(name)}\s*=")
        if not isinstance(spec, dict) or spec.get("role") not in ROLES:
            raise ScenarioError(where, line, f"participant {name!r} needs role = user, admin or superadmin")
        extra = set(spec) - {"role", "deposit"}
        if extra:
            raise ScenarioError(where, line, f"participant {name!r} has unknown keys {sorted(extra)}")
        participants[name] = Participant(name, spec["role"], spec.get("deposit"))
    if not participants:
        raise ScenarioError(where, line_of(r"participants"), "a scenario needs [participants]")
    seed = data.get("seed", 0)
    if type(seed) is not int:
        raise ScenarioError(where, line_of(r"^\s*seed\s*="), "seed must be an integer")
    scenario = Scenario(data.get("name", path.stem), where, data.get("description", ""), seed, participants)
    raw_steps = data.get("steps", [])
    for number, raw in enumerate(raw_steps, start=1):
        line = step_lines[number - 1] if number <= len(step_lines) else None
        _check_step(where, line, number, raw, participants)
        scenario.steps.append(Step(number, line or 0, raw))
    return scenario


def _line_of_decode_error(message: str) -> int | None:
    found = re.search(r"line (\d+)", message)
    return int(found.group(1)) if found else None


def _check_step(where: str, line: int | None, number: int, raw: dict, participants: dict) -> None:
    def fail(message: str) -> None:
        raise ScenarioError(where, line, f"step {number}: {message}")

    kinds = [k for k in ("do", "advance", "expect") if k in raw]
    if len(kinds) != 1:
        fail("needs exactly one of do, advance or expect")
    kind = kinds[0]
    if kind == "advance":
        if type(raw["advance"]) not in (int, float) or raw["advance"] <= 0 or set(raw) - {"advance", "note"}:
            fail("advance takes a positive number of seconds and nothing else")
        return
    table = OPS if kind == "do" else EXPECTS
    if raw[kind] not in table:
        fail(f"{kind} = {raw[kind]!r} is not one of {', '.join(table)}")
    required, optional = table[raw[kind]]
    missing = required - set(raw)
    if missing:
        fail(f"{kind} = {raw[kind]!r} needs {', '.join(sorted(missing))}")
    unknown = set(raw) - required - optional - COMMON - {kind}
    if unknown:
        fail(f"unknown keys {sorted(unknown)}")
    for key in ("as", "to", "who"):
        if key in raw and raw[key] not in participants:
            fail(f"{key} = {raw[key]!r} is not a participant")
