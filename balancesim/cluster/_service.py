"""A shard's service: its engine's command door and reads, served over Redis Streams.

The shard reads ``Call``s from its commands stream with a consumer group, in stream
order, and hands each to its engine at once: the engine never blocks its caller, so
the calls of one account reach its actor in the order the gateways sent them. Reads
that block (the ledger, password checks) run on the service's executor. Each answer
goes to the caller's replies stream, coalesced per loop turn by the ``Producer``.

After every commit the shard publishes the committed events on its events stream as
an ``EventBatch`` numbered within this process's epoch. Redis may lose a batch: the
gateways see the gap and repair from the ledger, the source of truth.

Exactly once: every mutation carries an idempotency key (the client's or one its
gateway assigned), which the engine commits with the entries; a call redelivered
after a crash between COMMIT and XACK is answered from the ledger, not applied again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from balancesim import errors
from balancesim.actors import Rejected, Reply, as_asyncio
from balancesim.actors._codec import from_plain, to_plain
from balancesim.cluster._rpc import (
    FIELD, Answer, Call, EventBatch, commands_stream, events_stream, pack, unpack,
)
from balancesim.cluster._streams import Consumer, Entry, Producer, Tail
from balancesim.cluster._wire import Forged
from balancesim.engine import Engine, deadline
from balancesim.gateway._auth import Principal, TokenStore, digest_of

__all__ = ["ShardService", "SHARD_OPERATIONS", "CALLER_ARG", "FEED_SHARD", "caller_of", "redis_clock_offset_s"]

#: The shard whose market walks the prices; every other shard follows its ticks.
FEED_SHARD = 0

log = logging.getLogger(__name__)

Op = Callable[..., Any]


def _mutation(name: str) -> Op:
    """An engine mutation by name; its answer is the committed ``Confirmed`` record."""

    def call(service: ShardService, **args: Any) -> Reply:
        return getattr(service.engine, name)(**args)

    return call


def _read(read: Callable[..., Any]) -> Op:
    """A blocking read, run off the loop."""

    def call(service: ShardService, **args: Any) -> Any:
        return service.blocking(functools.partial(read, service, **args))

    return call


def _entries(service: ShardService, user_id: int, after_version: int, limit: int) -> list[Any]:
    return to_plain(service.engine.entries(user_id, after_version, limit))


def _token_issue(service: ShardService, token: str, principal: dict[str, Any]) -> str:
    return service.tokens.issue(Principal(**principal), token)


def _token_check(service: ShardService, token: str) -> dict[str, Any] | None:
    principal = service.tokens.check_blocking(token)
    return None if principal is None else {"user_id": principal.user_id, "username": principal.username,
                                           "role": principal.role}


async def _token_revoke(service: ShardService, token: str) -> None:
    await service.tokens.revoke(token)
    owner = token.partition(".")[0]
    service.announce_revoked(int(owner) if owner.isdigit() else 0, digest_of(token))


async def _token_revoke_user(service: ShardService, user_id: int) -> None:
    await service.tokens.revoke_user(user_id)


def _login(service: ShardService, username: str, password: str) -> Reply:
    return service.engine.login(username, password)


async def _outcome(service: ShardService, caller: int, key: str) -> Any:
    """What became of the keyed call ``(caller, key)``: a gateway asks when its answer
    did not come in time. The call was read before this (one stream, read in order), so
    it is either still in flight here, or its outcome is in the ledger."""
    pending = service.in_flight.get((caller, key))
    if pending is not None:
        await as_asyncio(pending)
        return pending.raw()
    stored = await service.blocking(lambda: service.engine.ledger.remembered(caller, key))
    if stored is None:
        raise errors.Timeout("no outcome is recorded for this key: it was refused, or never arrived",
                             idempotency_key=key)
    value = stored[1]
    if isinstance(value, Rejected):
        raise value.error
    return value


#: The operations a shard serves, by the name a ``Call`` gives. One table, so the
#: gateway's remote engine and the shard agree on exactly one list.
SHARD_OPERATIONS: dict[str, Op] = {
    **{name: _mutation(name) for name in (
        "create_user", "update_user", "deposit", "withdraw", "adjust", "open_option",
        "spot_order", "set_control_mode", "force_option",
    )},
    "login": _login,
    "balance": _read(lambda s, user_id: s.engine.balance(user_id)),
    "history": _read(lambda s, user_id, after_version, limit: s.engine.history(user_id, after_version, limit)),
    "entries": _read(_entries),
    "trades": _read(lambda s, **kw: s.engine.trades(**kw)),
    "users": _read(lambda s, with_disabled: s.engine.users(with_disabled=with_disabled)),
    "user": _read(lambda s, user_id: s.engine.user(user_id)),
    "token_issue": _read(_token_issue),
    "token_check": _read(_token_check),
    "token_revoke": _token_revoke,
    "token_revoke_user": _token_revoke_user,
    "outcome": _outcome,
    "ping": lambda service: {"shard": service.index, "epoch": service.epoch},
}


class ShardService:
    """Serves one shard's engine over Redis.

    Args:
        engine: the shard's started engine (its ids follow the placement).
        tokens: the login tokens of this shard's accounts (kept in its own file).
        redis_url: the fabric.
        index: this shard's index.
        secret: the cluster secret; calls whose seal does not verify are dropped.
    """

    def __init__(self, engine: Engine, tokens: TokenStore, *, redis_url: str, index: int, secret: bytes) -> None:
        self.engine = engine
        self.tokens = tokens
        self.redis_url = redis_url
        self.index = index
        self.secret = secret
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        self.forged = 0
        # For metrics: calls read and not yet answered, answers by (op, "ok" or error code),
        # and events published.
        self.calls_in_flight = 0
        self.answered: collections.Counter[tuple[str, str]] = collections.Counter()
        self.events_published = 0
        # Keyed calls not yet answered, by (caller, key): what an outcome query follows.
        self.in_flight: dict[tuple[int, str], Reply] = {}
        # Redis's clock minus this machine's: deadlines are on Redis's clock.
        self.clock_offset_s = 0.0
        self._executor = ThreadPoolExecutor(4, thread_name_prefix=f"shard{index}-io")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._feed: Tail | None = None
        self._unsubscribe: Callable[[], None] = lambda: None

    async def start(self) -> ShardService:
        """Publish committed events and serve calls, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self.tokens.executor = self._executor
        self.clock_offset_s = await redis_clock_offset_s(self.redis_url)
        self._producer = Producer(self.redis_url)
        # An empty first batch: every gateway learns this process's epoch at once, and so
        # that the shard restarted (what its predecessor committed last may be unpublished),
        # rather than at its next commit.
        self._publish([])
        self._unsubscribe = self.engine.subscribe(self._committed)
        self._consumer = Consumer(self.redis_url, commands_stream(self.index), "shard",
                                  f"shard-{self.index}", self._handle).start()
        if self.engine.follow_feed:
            # One price feed per cluster, in shard 0: the others take its ticks.
            self._feed = Tail(self.redis_url, events_stream(FEED_SHARD), self._ticks, start_id="$").start()
        return self

    async def _ticks(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            try:
                batch = unpack(self.secret, entry.fields[FIELD], EventBatch)
            except (Forged, KeyError, TypeError, ValueError):
                continue
            for plain in batch.events:
                if plain.get("$t") == "PriceTicked":
                    tick = from_plain(plain)
                    self.engine.feed(tick.prices, tick.ts)

    async def stop(self) -> None:
        """Stop reading calls; what was answered is answered. The engine is the caller's."""
        self._unsubscribe()
        if self._feed is not None:
            await self._feed.stop()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.aclose()
        self._executor.shutdown(wait=True)

    @property
    def redis_reconnects(self) -> int:
        """How often this shard's Redis readers reconnected (or found a stream Redis lost)."""
        readers = [r for r in (self._consumer, self._feed) if r is not None]
        return sum(r.reconnects + getattr(r, "resets", 0) for r in readers)

    @property
    def messages_lost(self) -> int:
        """Answers and event batches Redis may not have taken (``NotSent`` or ``Unknown``)."""
        return 0 if self._producer is None else self._producer.unknown + self._producer.not_sent

    def blocking(self, func: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``func`` on the service's executor."""
        assert self._loop is not None
        return self._loop.run_in_executor(self._executor, func)

    # -- events ------------------------------------------------------------------------

    def _committed(self, events: list[Any]) -> None:
        # The engine's bus calls this on the ledger writer's thread, in commit order;
        # call_soon_threadsafe keeps that order on the loop.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, list(events))

    def announce_revoked(self, user_id: int, digest: str) -> None:
        """Tell every gateway that a token is dead (it may be cached anywhere)."""
        self._publish([], revoked=[{"user_id": user_id, "digest": digest}])

    def _publish(self, events: list[Any], revoked: list[dict[str, Any]] | None = None) -> None:
        self.seq += 1
        self.events_published += len(events)
        batch = EventBatch(self.epoch, self.seq, to_plain(events), revoked or [])
        assert self._producer is not None
        sent = self._producer.add(events_stream(self.index), {FIELD: pack(self.secret, batch)})
        sent.add_done_callback(_log_lost)

    # -- calls -------------------------------------------------------------------------

    async def _handle(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            try:
                call = unpack(self.secret, entry.fields[FIELD], Call)
            except (Forged, KeyError, TypeError, ValueError):
                self.forged += 1
                log.warning("dropped a call on %s whose seal does not verify", entry.stream)
                continue
            # Issued now, in stream order; answered whenever each completes.
            self.calls_in_flight += 1
            started = self._dispatch(call)
            if isinstance(started, Reply):
                # A mutation: answered from a callback when its commit completes it (the
                # bridge hands a whole group commit's replies to the loop in one wake-up),
                # with no task per call.
                as_asyncio(started, raw=True).add_done_callback(functools.partial(self._replied, call, started))
            else:
                asyncio.ensure_future(self._answer(call, started))

    def _dispatch(self, call: Call) -> Any:
        op = SHARD_OPERATIONS.get(call.op)
        if op is None:
            return errors.InvalidRequest(f"no shard operation {call.op!r}")
        until = None if call.deadline_ms is None else call.deadline_ms / 1000 - self.clock_offset_s
        try:
            with deadline(until):
                started = op(self, **call.args)
            ident = _ident(call)
            if ident is not None and isinstance(started, Reply):
                self.in_flight[ident] = started  # until _replied, on this loop, forgets it
            return started
        except errors.BalancesimError as error:
            return error
        except TypeError as error:  # arguments that do not fit: a gateway of another release
            return errors.InvalidRequest(f"{call.op}: {error}")

    def _replied(self, call: Call, reply: Reply, done: asyncio.Future[Any]) -> None:
        ident = _ident(call)
        if ident is not None and self.in_flight.get(ident) is reply:
            del self.in_flight[ident]
        try:
            answer = Answer(call.cid, True, to_plain(done.result()))
        except BaseException as error:  # noqa: BLE001 - every failure is answered
            answer = self._refusal(call, error)
        self._send_answer(call, answer)

    async def _answer(self, call: Call, started: Any) -> None:
        try:
            if isinstance(started, BaseException):
                raise started
            if asyncio.isfuture(started) or asyncio.iscoroutine(started):
                value = await started
            else:
                value = started
            answer = Answer(call.cid, True, to_plain(value))
        except Exception as error:  # noqa: BLE001 - every failure is answered
            answer = self._refusal(call, error)
        self._send_answer(call, answer)

    def _refusal(self, call: Call, error: BaseException) -> Answer:
        if isinstance(error, errors.BalancesimError):
            return Answer(call.cid, False, code=error.code, message=error.message)
        if isinstance(error, asyncio.CancelledError):
            raise error
        log.error("shard %s failed on %s", self.index, call.op, exc_info=error)
        return Answer(call.cid, False, code="unavailable", message=f"shard {self.index} failed on {call.op}")

    def _send_answer(self, call: Call, answer: Answer) -> None:
        self.calls_in_flight -= 1
        self.answered[call.op, answer.code or "ok"] += 1
        assert self._producer is not None
        sent = self._producer.add(call.reply_to, {FIELD: pack(self.secret, answer)}, maxlen=10_000)
        sent.add_done_callback(_log_lost)


def _log_lost(sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        # Redis may lose anything: a lost answer ends in the gateway's 504 (and an
        # outcome look-up by key); a lost event batch in a gap the gateways repair.
        log.warning("a message to Redis was lost: %s", sent.exception())


# Who is the caller of a keyed mutation, by operation: the idempotency key's scope.
CALLER_ARG = {
    "deposit": "initiated_by", "withdraw": "initiated_by", "adjust": "initiated_by",
    "open_option": "user_id", "spot_order": "user_id", "set_control_mode": "set_by",
    "force_option": "admin_id", "create_user": "created_by", "update_user": "set_by",
}


def caller_of(op: str, args: dict[str, Any]) -> int | None:
    """The caller a mutation's idempotency key is scoped to, as the engine scopes it
    (``None``: not a mutation)."""
    name = CALLER_ARG.get(op)
    if name is None:
        return None
    caller = args.get(name)
    return caller if caller is not None else (args.get("user_id") or 0)


def _ident(call: Call) -> tuple[int, str] | None:
    """``(caller, key)`` of a keyed mutation."""
    key = call.args.get("idempotency_key")
    caller = caller_of(call.op, call.args)
    return None if key is None or caller is None else (caller, key)


async def redis_clock_offset_s(redis_url: str) -> float:
    """Redis's clock minus this machine's, in seconds (deadlines are on Redis's clock)."""
    import time

    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        before = time.time()
        seconds, micros = await client.time()
        after = time.time()
    finally:
        await client.aclose()
    return seconds + micros / 1e6 - (before + after) / 2
