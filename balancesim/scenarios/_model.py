"""Scenario files: TOML with participants, a seed and steps, checked before anything runs.

A step is one table of ``[[steps]]`` and has exactly one of ``do`` (an operation),
``advance`` (simulated seconds) or ``expect`` (a check). ``$name`` in a value
stands for a participant's user id or a saved trade/order id. ``[crowd]`` adds
``count`` generated participants (``prefix`` + a zero-padded number: ``u0001`` …)
for scenarios too big to list. A file that breaks these rules is refused with its
path, the line and what is wrong.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from balancesim.vocabulary import ROLES

__all__ = [
    "Scenario", "Step", "Participant", "ScenarioError", "UnknownScenario", "load", "names", "OPS", "EXPECTS", "FILES",
]

FILES = Path(__file__).parent / "files"
MAX_CROWD = 100_000
TOP_LEVEL = ("name", "description", "seed", "participants", "crowd", "steps")
STEP_HEADER = re.compile(r"^\s*\[\[\s*steps\s*\]\]\s*(#.*)?$")
# The shape of an amount or a quantity: a decimal string, signed for adjustments. Its range
# and precision are the engine's to refuse (a scenario may expect that refusal).
DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
DECIMAL_KEYS = ("amount", "quantity")

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
# Keys whose shape the interpreter relies on; operation arguments are left to the engine to refuse.
SHAPES: dict[str, tuple[tuple[type, ...], str]] = {
    "fields": ((dict,), "a table"),
    "contains": ((dict,), "a table"),
    "types": ((list,), "a list of message types"),
    "status": ((str, list), "a status or a list of them"),
    "rounds": ((int,), "a positive integer"),
    "every_s": ((int, float), "a positive number of seconds"),
}


class ScenarioError(Exception):
    """A malformed scenario: ``path:line: what``."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(f"{path}:{line or 1}: {message}")


class UnknownScenario(ScenarioError):
    """A name that is neither a shipped scenario nor a file: says which names there are."""

    def __init__(self, name: str) -> None:
        Exception.__init__(self, f"no scenario named {name!r}; the shipped ones are {', '.join(names())} "
                                 "(or give the path of a .toml file)")


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


def names() -> list[str]:
    """The shipped scenarios' names."""
    return sorted(path.stem for path in FILES.glob("*.toml"))


def resolve(name_or_path: str) -> Path:
    """A shipped scenario's file by name, or the path given."""
    shipped = FILES / f"{name_or_path}.toml"
    return shipped if shipped.exists() else Path(name_or_path)


def _is_a_name(text: str) -> bool:
    """``virtual-day`` rather than ``./my.toml``: no directory and no suffix."""
    return "/" not in text and "\\" not in text and not text.endswith(".toml")


def load(name_or_path: str) -> Scenario:
    """Read and check a scenario; ``ScenarioError`` names the file and line of the first problem."""
    path = resolve(name_or_path)
    where = str(path)
    if not path.exists() and _is_a_name(name_or_path):
        raise UnknownScenario(name_or_path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ScenarioError(where, None, f"cannot read the file: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None) or _line_of_decode_error(str(error))
        raise ScenarioError(where, line, f"not valid TOML: {error}") from None
    source = _Source(where, text.splitlines())
    for key in data:
        if key not in TOP_LEVEL:
            source.fail(rf"^\s*\[?{re.escape(key)}\b", f"unknown key {key!r}")
    participants = _participants(source, data.get("participants", {}))
    participants.update(_crowd(source, data.get("crowd"), participants))
    if not participants:
        source.fail(r"participants", "a scenario needs [participants] or [crowd]")
    seed = data.get("seed", 0)
    if type(seed) is not int:
        source.fail(r"^\s*seed\s*=", "seed must be an integer")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            source.fail(rf"^\s*{key}\s*=", f"{key} must be a string")
    scenario = Scenario(data.get("name", path.stem), where, data.get("description", ""), seed, participants)
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        source.fail(r"^\s*steps\s*=", "steps must be [[steps]] tables")
    step_lines = [i + 1 for i, line in enumerate(source.lines) if STEP_HEADER.match(line)]
    for number, raw in enumerate(raw_steps, start=1):
        line = step_lines[number - 1] if number <= len(step_lines) else None
        _check_step(where, line, number, raw, participants, source)
        scenario.steps.append(Step(number, line or 0, raw))
    return scenario


@dataclass(frozen=True)
class _Source:
    """A file's lines, to name the line of a problem found after parsing."""

    where: str
    lines: list[str]

    def line_of(self, pattern: str) -> int | None:
        regex = re.compile(pattern)
        return next((i + 1 for i, line in enumerate(self.lines) if regex.search(line)), None)

    def fail(self, pattern: str, message: str) -> NoReturn:
        raise ScenarioError(self.where, self.line_of(pattern), message)


def _participants(source: _Source, table: Any) -> dict[str, Participant]:
    if not isinstance(table, dict):
        source.fail(r"^\s*participants\s*=", "participants must be a table: name = { role = ... }")
    participants = {}
    for name, spec in table.items():
        at = rf"^\s*{re.escape(name)}\s*="
        if not isinstance(spec, dict) or spec.get("role") not in ROLES:
            source.fail(at, f"participant {name!r} needs role = user, admin or superadmin")
        extra = set(spec) - {"role", "deposit"}
        if extra:
            source.fail(at, f"participant {name!r} has unknown keys {sorted(extra)}")
        if not isinstance(spec.get("deposit", "0"), str) or not DECIMAL.fullmatch(spec.get("deposit", "0")):
            source.fail(at, f"participant {name!r}: deposit must be a decimal string like \"100\"")
        participants[name] = Participant(name, spec["role"], spec.get("deposit"))
    return participants


def _crowd(source: _Source, spec: Any, named: dict[str, Participant]) -> dict[str, Participant]:
    """``[crowd]`` → ``count`` generated participants named ``prefix`` + a zero-padded number."""
    if spec is None:
        return {}
    at = r"^\s*\[crowd\]|^\s*crowd\s*="
    if not isinstance(spec, dict) or set(spec) - {"count", "prefix", "role", "deposit"}:
        source.fail(at, "crowd takes count, prefix, role and deposit")
    count, prefix = spec.get("count"), spec.get("prefix", "u")
    if type(count) is not int or not 1 <= count <= MAX_CROWD:
        source.fail(at, f"crowd needs count = 1 to {MAX_CROWD}")
    if not isinstance(prefix, str) or not prefix:
        source.fail(at, "crowd's prefix must be a non-empty string")
    role, deposit = spec.get("role", "user"), spec.get("deposit")
    if role not in ROLES:
        source.fail(at, "crowd's role must be user, admin or superadmin")
    if not (deposit is None or isinstance(deposit, str) and DECIMAL.fullmatch(deposit)):
        source.fail(at, "crowd's deposit must be a decimal string like \"100\"")
    width = len(str(count))
    crowd = {f"{prefix}{i:0{width}d}": Participant(f"{prefix}{i:0{width}d}", role, deposit) for i in range(1, count + 1)}
    clash = sorted(set(crowd) & set(named))
    if clash:
        source.fail(at, f"crowd names clash with participants {clash[:3]}")
    return crowd


def _line_of_decode_error(message: str) -> int | None:
    found = re.search(r"line (\d+)", message)
    return int(found.group(1)) if found else None



def _check_step(where: str, line: int | None, number: int, raw: Any, participants: dict,
                source: _Source | None = None) -> None:
    def fail(message: str, key: str | None = None) -> NoReturn:
        raise ScenarioError(where, _key_line(source, line, key) if key else line, f"step {number}: {message}")

    if not isinstance(raw, dict):
        fail("a step is a [[steps]] table")
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
    for key, (shapes, shape) in SHAPES.items():
        if key in raw and (type(raw[key]) not in shapes or (type(raw[key]) in (int, float) and raw[key] <= 0)):
            fail(f"{key} must be {shape}")
    for key in ("as", "to", "who"):
        if key in raw and raw[key] not in participants:
            fail(f"{key} = {raw[key]!r} is not a participant")
    # A step that expects invalid_amount may send a malformed amount on purpose.
    if raw.get("error") != "invalid_amount":
        for key in DECIMAL_KEYS:
            if key in raw and not (isinstance(raw[key], str) and DECIMAL.fullmatch(raw[key])):
                fail(f"{key} = {_toml(raw[key])} is not a decimal string like \"100.5\"", key)


def _key_line(source: _Source | None, step_line: int | None, key: str) -> int | None:
    """The line of ``key = …`` inside the step that starts at ``step_line``, else that line."""
    if source is None or step_line is None:
        return step_line
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number in range(step_line + 1, len(source.lines) + 1):
        text = source.lines[number - 1]
        if STEP_HEADER.match(text) or re.match(r"^\s*\[", text):
            break
        if pattern.match(text):
            return number
    return step_line


def _toml(value: Any) -> str:
    """A value as the file wrote it, near enough: strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)
