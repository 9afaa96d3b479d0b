"""Redis Streams for the cluster: a coalescing ``Producer``, a group ``Consumer``, a ``Tail``.

Redis may lose anything (the shards' ledgers are the source of truth), so this module
never hides a failure and never assumes that what Redis held survives:

- ``Producer.add`` gives a future per ``XADD``. The adds of one event-loop turn go out in
  one pipeline, because a pipelined ``XADD`` costs ~33 µs of client CPU against ~1 ms for a
  round trip each. When the connection fails before anything was written, the futures fail
  with ``NotSent`` (nothing changed); when it fails with the pipeline in flight, they fail
  with ``Unknown`` (the entries may or may not be in the stream), and the caller must find
  the outcome out some other way. redis-py's own retries are off for the same reason: a
  silent re-send would turn "unknown" into a duplicate without telling anyone.
- ``Consumer`` reads with a consumer group (at-least-once: a batch is acked only after its
  handler returns) and ``Tail`` reads every entry after an id (fan-out to every gateway).
  Both reconnect by themselves with jittered exponential backoff, forever, and count their
  reconnects. A group is always (re)created from id ``0``, never ``$``: after a Redis restart
  the stream is new and empty, and whatever was added to it before the reader came back
  must still be read.

Every reader has its own connection: a blocking read holds one for up to ``block_ms``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Self, Sequence

import hiredis
import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from balancesim.cluster._backoff import Backoff

__all__ = ["Entry", "Producer", "Consumer", "Tail", "Unknown", "NotSent", "Handler"]

log = logging.getLogger(__name__)

FieldValue = bytes | str | int | float
Fields = Mapping[bytes | str, FieldValue]

# What a lost or unreachable Redis raises: redis-py wraps most socket errors, not all.
_CONNECTION_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    asyncio.TimeoutError,
)


class Unknown(Exception):
    """The connection failed with the ``XADD`` in flight: it may or may not have happened."""


class NotSent(Exception):
    """No connection could be made, so nothing was handed to Redis: nothing changed."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read: its stream, its id (``"ms-seq"``) and its fields."""

    stream: str
    id: str
    fields: Mapping[bytes, bytes]


Handler = Callable[[Sequence[Entry]], Awaitable[None]]


def _client(url: str, *, connect_timeout_s: float) -> redis.asyncio.Redis:
    """A client with redis-py's retries off (the caller decides what a failure means),
    commands packed by hiredis, and no ``socket_timeout``.

    With a ``socket_timeout`` redis-py wraps every write in ``asyncio.wait_for``, which on
    Python 3.11 swallows a cancellation that arrives as the write completes (CPython
    gh-86296, fixed in 3.12): measured here, a reader's ``stop()`` then hung for a whole
    blocking read, one time in three. Every operation here is bounded with
    ``asyncio.timeout`` instead, which keeps cancellations.
    """
    pool = redis.asyncio.ConnectionPool.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=connect_timeout_s,
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return redis.asyncio.Redis(connection_pool=pool)


@functools.cache
def _hiredis_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` with commands packed in C by hiredis.

    redis-py's asyncio connections pack in pure Python (its sync ones already use hiredis):
    measured here, 24 µs of client CPU per pipelined XADD against 15 µs with hiredis, and
    packing is the largest part of what a gateway spends per command on Redis.
    """

    class HiredisPacking(base):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            # As redis-py's own encoder: a command name may carry its subcommand
            # ("XINFO STREAM"), floats are sent as repr(), bools and None are refused.
            name = args[0]
            head = tuple(name.encode().split() if isinstance(name, str) else name.split())
            rest = []
            for arg in args[1:]:
                if isinstance(arg, (bytes, str)) or type(arg) is int:
                    rest.append(arg)
                elif type(arg) is float:
                    rest.append(repr(arg))
                elif isinstance(arg, (bytearray, memoryview)):
                    rest.append(bytes(arg))
                else:
                    raise redis.exceptions.DataError(
                        f"Invalid input of type: '{type(arg).__name__}'. "
                        "Convert to a bytes, string, int or float first."
                    )
            return [hiredis.pack_command((*head, *rest))]

    HiredisPacking.__name__ = f"HiredisPacking{base.__name__}"
    return HiredisPacking


def _is_field_value(value: object) -> bool:
    return isinstance(value, (bytes, str, float)) or type(value) is int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(stream: str, response: Any) -> tuple[list[Entry], list[str]]:
    """(entries with fields, ids whose entry was trimmed away) from an XREAD(GROUP) reply.

    Takes RESP2's ``[[stream, [(id, fields)…]]]`` and RESP3's ``{stream: [[…]]}``; a
    pending entry that trimming deleted comes back without fields.
    """
    if not response:
        return [], []
    if isinstance(response, dict):
        rows = next(iter(response.values()))
        rows = rows[0] if rows and isinstance(rows[0], list) else rows
    else:
        rows = response[0][1]
    entries: list[Entry] = []
    trimmed: list[str] = []
    for entry_id, fields in rows:
        if entry_id is None:
            continue
        if fields:
            entries.append(Entry(stream, _text(entry_id), fields))
        else:
            trimmed.append(_text(entry_id))
    return entries, trimmed


@dataclass(slots=True)
class _Add:
    stream: str
    fields: Fields
    maxlen: int | None
    future: asyncio.Future[str]


class Producer:
    """``XADD``s coalesced per event-loop turn, one pipeline at a time, in call order.

    Streams are trimmed approximately (``MAXLEN ~ maxlen``: Redis trims whole radix-tree
    nodes, which costs far less than an exact trim). Only one pipeline is in flight at a
    time, so entries reach each stream in the order ``add`` was called; whatever is added
    while a pipeline is in flight goes out in the next one (group commit, in effect).
    """

    def __init__(
        self,
        url: str,
        *,
        maxlen: int | None = 100_000,
        max_batch: int = 10_000,
        timeout_s: float = 5.0,
    ) -> None:
        """``timeout_s`` bounds connecting and each pipeline's reply; past it, ``Unknown``."""
        self.maxlen = maxlen
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._client = _client(url, connect_timeout_s=timeout_s)
        self._pending: list[_Add] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self.pipelines = 0
        """Pipelines sent (for metrics: adds per pipeline is the coalescing achieved)."""
        self.unknown = 0
        """Adds failed with ``Unknown``."""
        self.not_sent = 0
        """Adds failed with ``NotSent``."""

    def add(self, stream: str, fields: Fields, *, maxlen: int | None = -1) -> asyncio.Future[str]:
        """Queue ``XADD stream MAXLEN ~ maxlen * fields``; the future gets the entry id.

        ``maxlen`` defaults to the producer's; ``None`` means no trimming. Call it on the
        loop's thread. The future fails with ``NotSent``, ``Unknown``, or Redis's own
        ``ResponseError`` (a refusal: nothing was added).
        """
        if self._closed:
            raise RuntimeError("the producer is closed")
        # Refused here, to its own caller: found while packing the pipeline, a bad field
        # would fail every add of the turn.
        if not fields:
            raise redis.exceptions.DataError("an entry needs at least one field")
        for key, value in fields.items():
            if not (isinstance(key, (bytes, str)) and _is_field_value(value)):
                raise redis.exceptions.DataError(
                    f"field {key!r}: {type(value).__name__} is not bytes, str, int or float"
                )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append(_Add(stream, fields, self.maxlen if maxlen == -1 else maxlen, future))
        if self._sender is None:
            # The flush of this turn. A task's first step is scheduled with call_soon, so it
            # runs after every callback already ready in this turn: all adds made in this
            # turn are in its first pipeline. A second add in the turn finds the sender set.
            self._sender = loop.create_task(self._send_pending())
        return future

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Add]) -> None:
        # The XADDs packed by hiredis into one buffer, written and their replies read on one
        # pooled connection: redis-py's Pipeline (a command stack, options parsed and a
        # response callback per command) cost more per XADD than the rest of its sending.
        packed = b"".join(hiredis.pack_command(_xadd_args(add)) for add in batch)
        self.pipelines += 1
        pool = self._client.connection_pool
        try:
            # Connect first, apart from sending: a failure here provably sent nothing.
            connection = await pool.get_connection()
        except asyncio.CancelledError:
            self._fail(batch, NotSent("cancelled before sending"))
            raise
        except (*_CONNECTION_ERRORS, redis.exceptions.RedisError) as error:
            self.not_sent += len(batch)
            self._fail(batch, NotSent(f"cannot connect to Redis: {error}"))
            return
        results: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                await connection.send_packed_command(packed, check_health=False)
                for _ in batch:
                    try:
                        results.append(await connection.read_response())
                    except redis.exceptions.ResponseError as refused:  # that XADD alone: nothing added
                        results.append(refused)
        except asyncio.CancelledError:
            await _drop(connection)
            self._fail(batch, Unknown("cancelled with the pipeline in flight"))
            raise
        except BaseException as error:  # noqa: BLE001 - any failure here leaves the outcome open
            await _drop(connection)
            self.unknown += len(batch)
            reason = f"{type(error).__name__}: {error}"
            self._fail(batch, Unknown(f"connection failed with the XADD in flight: {reason}"))
            if not isinstance(error, Exception):
                raise
            return
        finally:
            await pool.release(connection)
        for add, result in zip(batch, results):
            if add.future.done():  # the caller gave up waiting
                continue
            if isinstance(result, Exception):
                add.future.set_exception(result)
            else:
                add.future.set_result(_text(result))

    @staticmethod
    def _fail(batch: list[_Add], error: Exception) -> None:
        for add in batch:
            if not add.future.done():
                add.future.set_exception(error)

    async def aclose(self) -> None:
        """Send what is queued (its futures complete or fail), then close the connection."""
        self._closed = True
        if self._sender is not None:
            await asyncio.shield(self._sender)
        await self._client.aclose()


def _xadd_args(add: _Add) -> tuple[Any, ...]:
    """``XADD stream [MAXLEN ~ n] * field value …``, as redis-py's ``xadd`` sends it."""
    head: tuple[Any, ...] = ("XADD", add.stream)
    if add.maxlen is not None:
        head += ("MAXLEN", "~", add.maxlen)
    body: list[Any] = ["*"]
    for key, value in add.fields.items():
        body += (key, repr(value) if type(value) is float else value)
    return (*head, *body)


async def _drop(connection: AbstractConnection) -> None:
    """Close a connection whose replies are out of step with its commands."""
    try:
        await connection.disconnect(nowait=True)
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


class _HandlerFailed(Exception):
    pass


class _Reader:
    """The reconnect loop both readers share; subclasses say how to set up and to read."""

    def __init__(
        self,
        url: str,
        stream: str,
        handler: Handler,
        *,
        count: int,
        block_ms: int,
        backoff: Backoff,
        timeout_s: float,
    ) -> None:
        self.stream = stream
        self.count = count
        self.block_ms = block_ms
        self.backoff = backoff
        self.timeout_s = timeout_s
        self._handler = handler
        self._client = _client(url, connect_timeout_s=timeout_s)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.reconnects = 0
        """Times the reader got going again after losing Redis or its group (for metrics)."""
        self.delivered = 0
        """Entries handed to the handler."""
        self.connected = False
        """Whether the reader is set up on a live connection right now."""
        self.last_error: str | None = None
        """The last failure, for ``/readyz`` and logs (never contains the password)."""

    def start(self) -> Self:
        """Start reading in a task of the running loop; returns ``self``."""
        if self._task is not None:
            raise RuntimeError("already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"{type(self).__name__}({self.stream})"
        )
        return self

    async def stop(self) -> None:
        """Stop reading (a handler in progress is cancelled, its batch not acked); close."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._on_stop()
        await self._client.aclose()
        self.connected = False

    async def _on_stop(self) -> None:
        pass

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _step(self) -> None:
        raise NotImplementedError

    def _read_deadline(self) -> asyncio.Timeout:
        """Bounds one blocking read: it legitimately waits ``block_ms``, no longer."""
        return asyncio.timeout(self.block_ms / 1000 + self.timeout_s)

    async def _deliver(self, entries: list[Entry], handler: Handler | None = None) -> None:
        try:
            await (handler or self._handler)(entries)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise _HandlerFailed() from error
        self.delivered += len(entries)

    async def _run(self) -> None:
        attempt = 0
        lost = False
        # _stopping as well as the cancellation: should a library swallow the cancellation,
        # the loop still ends after the read in progress.
        while not self._stopping:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._setup()
                if lost:
                    self.reconnects += 1
                    log.info("%s: back on Redis after %d attempts", self._task.get_name(), attempt)
                    lost = False
                self.connected = True
                while not self._stopping:
                    await self._step()
                    attempt = 0
            except asyncio.CancelledError:
                raise
            except _HandlerFailed as error:
                # Not a Redis failure: the batch stays unacked and is read again, after a
                # pause so that a handler that always fails does not spin.
                log.exception("%s: handler failed", self._task.get_name(), exc_info=error.__cause__)
                self.last_error = f"handler: {error.__cause__!r}"
            except _CONNECTION_ERRORS as error:
                lost = True
                self.last_error = f"connection: {error}"
                if self.connected:
                    log.warning("%s: lost Redis (%s); reconnecting", self._task.get_name(), error)
            except redis.exceptions.ResponseError as error:
                # NOGROUP: Redis lost the stream (a restart) while the connection lived on.
                lost = lost or str(error).startswith("NOGROUP")
                self.last_error = f"redis: {error}"
                log.warning("%s: %s", self._task.get_name(), error)
            self.connected = False
            if self._stopping:
                return
            await asyncio.sleep(self.backoff.delay_s(attempt))
            attempt += 1


class Consumer(_Reader):
    """Reads ``stream`` as ``consumer`` of ``group`` in batches; acks each after its handler.

    On every (re)start it first reads its own pending entries (id ``0``: delivered to this
    consumer name, never acked), then new ones (``>``). The ack of a batch travels in one
    pipeline with the next read, so a busy consumer pays one round trip per batch. Delivery
    is at least once: a batch whose ack was lost with the connection comes again.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        count: int = 1000,
        block_ms: int = 1000,
        backoff: Backoff = Backoff(),
        timeout_s: float = 5.0,
    ) -> None:
        """``handler(entries)`` is awaited per batch of at most ``count`` entries."""
        super().__init__(
            url, stream, handler, count=count, block_ms=block_ms, backoff=backoff,
            timeout_s=timeout_s,
        )
        self.group = group
        self.consumer = consumer
        self._cursor = "0"
        self._to_ack: list[str] = []
        self.trimmed = 0
        """Pending entries that trimming deleted before they were handled (acked, skipped)."""

    async def _setup(self) -> None:
        try:
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise
        self._cursor = "0"

    async def _step(self) -> None:
        pending = self._cursor != ">"
        block = None if pending else self.block_ms
        streams = {self.stream: self._cursor}
        async with self._read_deadline():
            if self._to_ack:
                pipe = self._client.pipeline(transaction=False)
                pipe.xack(self.stream, self.group, *self._to_ack)
                pipe.xreadgroup(self.group, self.consumer, streams, count=self.count, block=block)
                _, response = await pipe.execute()
                self._to_ack = []
            else:
                response = await self._client.xreadgroup(
                    self.group, self.consumer, streams, count=self.count, block=block
                )
        entries, trimmed = _entries(self.stream, response)
        if pending:
            if not entries and not trimmed:
                self._cursor = ">"
                return
            self._cursor = max([*(e.id for e in entries), *trimmed], key=_id_key)
        if trimmed:
            self.trimmed += len(trimmed)
            log.warning("%s: %d pending entries were trimmed away", self.stream, len(trimmed))
        if entries:
            await self._deliver(entries)
        self._to_ack = [*trimmed, *(e.id for e in entries)]

    async def _on_stop(self) -> None:
        # The last batch's ack would otherwise wait for a next read that never comes.
        if self._to_ack:
            try:
                async with asyncio.timeout(1.0):
                    await self._client.xack(self.stream, self.group, *self._to_ack)
                self._to_ack = []
            except (*_CONNECTION_ERRORS, redis.exceptions.RedisError):
                pass  # redelivered to this consumer name next time: at least once


class Tail(_Reader):
    """Reads every entry of ``stream`` after ``start_id`` (``XREAD``), for fan-out.

    ``last_id`` is the id of the last entry handed to the handler; resuming from it after a
    reconnect loses nothing Redis still has. If the stream is missing on (re)connect, or its
    last id is below ``last_id`` (Redis restarted and the clock that makes ids went back),
    the stream is a new one and every entry in it is new to this reader: it reads from
    ``0-0`` and counts a reset. ``start_id="$"`` means "from the stream's current end".

    ``follow`` adds more streams, each with its own handler and place, before ``start``:
    one ``XREAD`` then waits on all of them, so a reader of several streams (a gateway:
    its answers and every shard's events) pays one round trip per wake-up, not one per
    stream.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        handler: Handler,
        *,
        start_id: str = "0-0",
        count: int = 1000,
        block_ms: int = 1000,
        backoff: Backoff = Backoff(),
        timeout_s: float = 5.0,
    ) -> None:
        """``handler(entries)`` is awaited per batch of at most ``count`` entries."""
        super().__init__(
            url, stream, handler, count=count, block_ms=block_ms, backoff=backoff,
            timeout_s=timeout_s,
        )
        # Per stream, in the order followed: its handler and the id of its last entry
        # delivered (its start id until the first).
        self._places: dict[str, list[Any]] = {stream: [handler, start_id]}
        self.resets = 0
        """Times a stream was found to be a new one (Redis lost it) on reconnect."""

    def follow(self, stream: str, handler: Handler, *, start_id: str = "0-0") -> Self:
        """Read ``stream`` too, into ``handler``, from ``start_id``; before ``start``."""
        if self._task is not None:
            raise RuntimeError("follow a stream before start")
        if stream in self._places:
            raise ValueError(f"{stream!r} is followed already")
        self._places[stream] = [handler, start_id]
        return self

    @property
    def last_id(self) -> str:
        """The id of the last entry of the first stream delivered (``start_id`` until then)."""
        return self._places[self.stream][1]

    def last_id_of(self, stream: str) -> str:
        """The id of the last entry of ``stream`` delivered (its ``start_id`` until then)."""
        return self._places[stream][1]

    async def _setup(self) -> None:
        for stream, place in self._places.items():
            place[1] = await self._place_after_connect(stream, place[1])

    async def _place_after_connect(self, stream: str, last_id: str) -> str:
        try:
            info = await self._client.xinfo_stream(stream)
        except redis.exceptions.ResponseError as error:
            if "no such key" not in str(error):
                raise
            info = None
        if last_id == "$":
            return _text(info["last-generated-id"]) if info else "0-0"
        if info is None or _id_key(_text(info["last-generated-id"])) < _id_key(last_id):
            if last_id != "0-0":
                self.resets += 1
            return "0-0"
        return last_id

    async def _step(self) -> None:
        async with self._read_deadline():
            response = await self._client.xread(
                {stream: place[1] for stream, place in self._places.items()}, count=self.count, block=self.block_ms
            )
        for stream, rows in _by_stream(response):
            entries, _ = _entries(stream, [[stream, rows]])
            if entries:
                place = self._places[stream]
                await self._deliver(entries, place[0])
                place[1] = entries[-1].id


def _by_stream(response: Any) -> list[tuple[str, Any]]:
    """``[(stream, rows)]`` of an XREAD reply, RESP2's list or RESP3's map."""
    if not response:
        return []
    if isinstance(response, dict):
        return [(_text(stream), rows[0] if rows and isinstance(rows[0], list) else rows)
                for stream, rows in response.items()]
    return [(_text(stream), rows) for stream, rows in response]
