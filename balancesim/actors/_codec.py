"""Records ↔ bytes: the engine's commands, events and replies as versioned JSON.

Every record crosses a process boundary (a Redis stream, the ledger's
idempotency table) as ``{"v": SCHEMA_VERSION, "r": <record>}``, where a record
is ``{"$t": "<type name>", <field>: <value>, …}`` and fields hold JSON values,
other records, lists (tuples) or objects (mappings). Two processes of
different releases will meet: a reader refuses a schema version it does not
know rather than guess, and a newer minor field it does not know is an error
too, never silently dropped.

JSON was chosen over msgpack: the standard library has it, and a deposit's
record encodes in a few microseconds, which is not where a mutation's time goes.
Floats (times) round-trip exactly, as Python writes the shortest repr.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from balancesim import errors
from balancesim.actors._messages import (
    COMMAND_TYPES,
    EVENT_TYPES,
    Confirmed,
    Posted,
    Rejected,
    Trade,
)

__all__ = ["SCHEMA_VERSION", "encode", "decode", "to_plain", "from_plain"]

SCHEMA_VERSION = 1

_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (*COMMAND_TYPES, *EVENT_TYPES, Trade, Confirmed, Rejected)
}


_SCALARS = frozenset({type(None), bool, int, float, str})
# Each record type's field names, found once: a shard encodes every answer and event.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(spec.name for spec in dataclasses.fields(cls))
    for cls in _TYPES.values() if dataclasses.is_dataclass(cls)
}


def to_plain(value: Any) -> Any:
    """A record (or a value holding records) as JSON-ready plain values."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is Posted:
        # The hot path (every entry of every answer and event batch): its fields are
        # scalars but for the metadata, whose values are scalars too.
        plain = dict(zip(Posted._fields, value))
        plain["metadata"] = dict(value.metadata)
        plain["$t"] = "Posted"
        return plain
    names = _FIELD_NAMES.get(kind)
    if names is not None and kind is not Rejected:
        out: dict[str, Any] = {"$t": kind.__name__}
        for name in names:
            out[name] = to_plain(getattr(value, name))
        return out
    if isinstance(value, Rejected):
        error = value.error
        code = error.code if isinstance(error, errors.BalancesimError) else "invalid_request"
        return {"$t": "Rejected", "code": code, "message": str(error)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"$t": type(value).__name__}
        for spec in dataclasses.fields(value):
            out[spec.name] = to_plain(getattr(value, spec.name))
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(key): to_plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def from_plain(value: Any) -> Any:
    """The inverse of ``to_plain``."""
    if isinstance(value, list):
        return tuple(from_plain(item) for item in value)
    if not isinstance(value, dict):
        return value
    name = value.get("$t")
    if name is None:
        return {key: from_plain(item) for key, item in value.items()}
    cls = _TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown record type {name!r}")
    fields = {key: from_plain(item) for key, item in value.items() if key != "$t"}
    if cls is Rejected:
        return Rejected(errors.by_code(fields["code"], fields["message"]))
    if cls is Confirmed:
        return Confirmed(tuple(fields["events"]))
    return cls(**fields)


def encode(record: Any) -> bytes:
    """``record`` as versioned JSON bytes."""
    return json.dumps({"v": SCHEMA_VERSION, "r": to_plain(record)}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def decode(data: bytes | str) -> Any:
    """The record in ``data``; ``ValueError`` for another schema version or a malformed record."""
    try:
        envelope = json.loads(data)
        version, plain = envelope["v"], envelope["r"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not an encoded record: {error}") from None
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema version {version} is not supported (this release reads {SCHEMA_VERSION})")
    try:
        return from_plain(plain)
    except TypeError as error:  # a field this release does not know, or one missing
        raise ValueError(f"malformed record: {error}") from None
