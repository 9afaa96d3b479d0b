"""How far behind a shard is on its commands, read from Redis alone.

A shard reads ``bs:cmd:<k>`` with one consumer group. What it has not read yet is the
group's *lag*; what it has read and not acknowledged is the group's *pending* list (the
shard acks a batch as soon as it has handed it to its engine, so this stays near zero
while it works). Entry ids are Redis's own clock in milliseconds, so the oldest id among
those is how long the oldest unhandled command has waited.

This is read from Redis, not asked of the shard: a stopped or overloaded shard cannot
say that it is behind, but its stream can. ``cluster status`` and the shard's own
``/metrics`` both read it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions

from balancesim.cluster._rpc import COMMANDS_GROUP, commands_stream

__all__ = ["Backlog", "command_backlog"]


@dataclass(frozen=True)
class Backlog:
    """A shard's unhandled commands.

    Attributes:
        waiting: commands not yet read by the shard (the group's lag); ``None`` when
            Redis cannot count them (it says so after trimming or deletions).
        pending: commands read and not yet acknowledged.
        oldest_age_s: how long the oldest unhandled command (pending or waiting) has
            waited, on Redis's clock; ``None`` when there is none.
    """

    waiting: int | None
    pending: int
    oldest_age_s: float | None


NOTHING = Backlog(0, 0, None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).partition("-")[0])


async def command_backlog(client: redis.asyncio.Redis, index: int) -> Backlog:
    """Shard ``index``'s backlog now (``XINFO GROUPS``, ``XPENDING``, ``XRANGE``, ``TIME``).

    Raises:
        redis.exceptions.RedisError, OSError: Redis does not answer.
    """
    stream = commands_stream(index)
    try:
        groups = await client.xinfo_groups(stream)
    except redis.exceptions.ResponseError as error:
        if "no such key" in str(error).lower():
            return NOTHING  # no command was ever sent to it (or Redis restarted since)
        raise
    group = next((g for g in groups if _text(g["name"]) == COMMANDS_GROUP), None)
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros / 1000
    if group is None:
        # The shard never read this stream (Redis restarted since): all of it waits.
        waiting = await client.xlen(stream)
        first = await client.xrange(stream, count=1) if waiting else []
        return Backlog(waiting, 0, (now_ms - _id_ms(first[0][0])) / 1000 if first else None)
    pending = int(group["pending"])
    lag = group.get("lag")
    waiting = None if lag is None else int(lag)
    oldest_id = None
    if pending:
        # Pending entries were delivered before any waiting one: the oldest is among them.
        oldest_id = (await client.xpending(stream, COMMANDS_GROUP))["min"]
    elif waiting is None or waiting > 0:
        after = await client.xrange(stream, min="(" + _text(group["last-delivered-id"]), count=1)
        oldest_id = after[0][0] if after else None
        if waiting is None and not after:
            waiting = 0
    age_s = None if oldest_id is None else max(now_ms - _id_ms(oldest_id), 0.0) / 1000
    return Backlog(waiting, pending, age_s)
