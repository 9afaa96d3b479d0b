"""A gateway's engine in cluster mode: the ``Engine`` facade, served by shards over Redis.

The gateway's handlers, hub, sessions and routing are the embedded server's, unchanged:
they talk to this facade, which has the same methods and gives the same replies and
events. Each call goes to its account's shard (``_placement``: a username's stable
hash, or the residue class of a user id); ``users`` and ``trades`` across accounts
gather from every shard and answer ``503 unavailable`` when one is missing, never a
silently partial list.

Outcomes. A call that is never handed to Redis (no connection, or its shard known down
from the heartbeats) is ``503 unavailable``: nothing changed. A mutation whose answer
does not come in ``timeout_s`` is ``504 timeout`` carrying its idempotency key (the
client's, or the one this gateway assigned), so a repeat with it learns the real
outcome: the shard committed the key with the entries, and answers a repeat from them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
import time
from concurrent.futures import Future as ThreadFuture
from typing import Any, Callable

from balancesim import errors
from balancesim.actors import START_PRICES, PriceTicked, Reply, iso
from balancesim.actors._codec import from_plain
from balancesim.actors._reply import settle
from balancesim.cluster._health import ShardHealth
from balancesim.cluster._placement import Placement, shard_of_user_id, shard_of_username
from balancesim.cluster._rpc import (
    FIELD, Answer, Call, EventBatch, commands_stream, events_stream, pack, replies_stream, unpack,
)
from balancesim.cluster._service import caller_of, redis_clock_offset_s
from balancesim.cluster._streams import Entry, NotSent, Producer, Tail, Unknown
from balancesim.cluster._wire import Forged
from balancesim.gateway._auth import Principal, digest_of
from balancesim.money import format_amount
from balancesim.views import result_of

__all__ = ["RemoteEngine", "RemoteTokens", "wire_gateway"]

log = logging.getLogger(__name__)


class _WallClock:
    """What the gateway needs of a clock: the time, for the ``ts`` of its own messages."""

    @staticmethod
    def now() -> float:
        return time.time()


class RemoteEngine:
    """The ``Engine`` facade over a cluster's shards.

    Args:
        redis_url: the fabric.
        placement: the cluster's placement (how many shards, which partition where).
        secret: the cluster secret.
        timeout_s: how long a call may take before the gateway asks for its outcome
            (and as long again for that answer, before it says 504).
        gateway_id: names this gateway's replies stream (random by default).
        max_in_flight: calls to one shard awaiting their answers; beyond it, new ones
            are refused before they are sent (503 with Retry-After), so that at
            saturation deadlines do not all expire together.
    """

    def __init__(self, redis_url: str, placement: Placement, secret: bytes, *, timeout_s: float = 5.0,
                 gateway_id: str | None = None, max_in_flight: int = 1024) -> None:
        self.redis_url = redis_url
        self.placement = placement
        self.secret = secret
        self.timeout_s = timeout_s
        self.gateway_id = gateway_id or secrets.token_hex(6)
        self.clock = _WallClock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._cids = itertools.count(1)
        # Calls sent and not yet settled, by call id: what settles each (``_attempt``).
        self._pending: dict[str, _Done] = {}
        self._subscribers: list[Callable[[list[Any]], None]] = []
        self._producer: Producer | None = None
        self._tails: list[Tail] = []
        self._last_seq: dict[int, tuple[str, int]] = {}
        self._prices: PriceTicked = PriceTicked(dict(START_PRICES), time.time())
        self.max_in_flight = max_in_flight
        self._in_flight = [0] * placement.shards
        self.clock_offset_s = 0.0
        self.gaps = 0
        self.timeouts = 0
        # For metrics: calls handed towards a shard, and calls refused before sending (503).
        self.calls = 0
        self.refused = 0
        # Set by the gateway that uses this engine (``wire_gateway``).
        self.on_gap: Callable[[int], None] = lambda shard: None
        self.on_revoked: Callable[[int, str], None] = lambda user_id, digest: None
        # Set by whoever runs the gateway (``run_gateway``): the shards' heartbeats,
        # for ``/readyz`` and to refuse a gather at once when a shard is known down.
        self.health: ShardHealth | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> RemoteEngine:
        """Read the answers to this gateway and every shard's events, on the running loop."""
        self.loop = asyncio.get_running_loop()
        self.clock_offset_s = await redis_clock_offset_s(self.redis_url)
        self._producer = Producer(self.redis_url)
        # One reader for the answers and every shard's events: one XREAD per wake-up.
        tail = Tail(self.redis_url, replies_stream(self.gateway_id), self._answers, start_id="$")
        for shard in range(self.placement.shards):
            tail.follow(events_stream(shard), functools.partial(self._events, shard), start_id="$")
        self._tails = [tail.start()]
        return self

    async def aclose(self) -> None:
        """Stop reading; calls still pending end as ``504 timeout`` with their key: they
        were handed over, so their outcome is open (a repeat on another gateway learns it)."""
        for tail in self._tails:
            await tail.stop()
        if self._producer is not None:
            await self._producer.aclose()
        for settle in list(self._pending.values()):
            settle(None, _STOPPING)

    def stop(self) -> None:
        """Nothing to stop in this process: the shards own the engines."""

    @property
    def calls_in_flight(self) -> int:
        """Calls sent to any shard and not yet answered."""
        return sum(self._in_flight)

    @property
    def calls_in_flight_by_shard(self) -> tuple[int, ...]:
        """Calls in flight, per shard (which shard a pile-up waits on)."""
        return tuple(self._in_flight)

    @property
    def messages_lost(self) -> int:
        """Calls Redis may not have taken (``NotSent`` or ``Unknown``)."""
        return 0 if self._producer is None else self._producer.unknown + self._producer.not_sent

    @property
    def redis_reconnects(self) -> int:
        """How often this gateway's Redis readers reconnected (or found a stream Redis lost)."""
        return sum(tail.reconnects + tail.resets for tail in self._tails)

    def ready(self) -> bool:
        """Whether calls can be sent and, when ``health`` is set, Redis answers and every
        shard beats (from its cache: never blocks the loop)."""
        if self._producer is None:
            return False
        return self.health is None or self.health.ready()

    def unready_reason(self) -> str:
        """Why ``ready()`` is false, for ``/readyz``'s 503."""
        if self._producer is None:
            return "the gateway is not connected"
        if self.health is not None and not self.health.redis_ok:
            return "Redis does not answer"
        down = self.health.down() if self.health is not None else []
        return f"shard {down[0]} is down" if down else "ready"

    # -- calls -------------------------------------------------------------------------

    async def call(self, shard: int, op: str, args: dict[str, Any], *, key: str | None = None) -> Any:
        """Send ``op`` to ``shard`` and await its answer's value (raises its refusal).

        A keyed call whose answer does not come in time is followed by an outcome
        query for its key, through the same stream; only when that goes unanswered
        too is the answer ``504 timeout`` with the key.
        """
        assert self.loop is not None
        future: asyncio.Future[Any] = self.loop.create_future()
        self._begin(shard, op, args, key, functools.partial(settle, future))
        return await future

    def _begin(self, shard: int, op: str, args: dict[str, Any], key: str | None, done: _Done) -> None:
        """``call`` without a coroutine: ``done(value, error)`` once, on the loop.

        Every call goes through here. It is callbacks rather than a task per call, with
        ``wait_for`` and ``shield``: on a gateway at saturation those cost ≈ 27 µs of the
        loop's time per call, more than the call's own packing and sending.
        """
        if self.health is not None and not self.health.alive(shard):
            # Known down from its heartbeats: say so at once, rather than hand the call to a
            # stream that no one reads and answer 504 a deadline later. Nothing was sent.
            self.refused += 1
            done(None, errors.Unavailable(f"shard {shard} is down (no recent heartbeat); nothing was sent"))
            return
        if self._in_flight[shard] >= self.max_in_flight:
            busy = errors.Unavailable(f"shard {shard} has {self.max_in_flight} requests in flight; try again")
            busy.retry_after_s = 1  # type: ignore[attr-defined]
            self.refused += 1
            done(None, busy)
            return
        self._in_flight[shard] += 1
        self.calls += 1

        def finish(value: Any, error: BaseException | None) -> None:
            self._in_flight[shard] -= 1
            done(value, error)

        def first(value: Any, error: BaseException | None) -> None:
            if error is not _LATE and error is not _STOPPING:
                finish(value, error)
                return
            caller = caller_of(op, args)
            if key is None or caller is None or error is _STOPPING:
                self.timeouts += 1
                finish(None, _timeout(shard, key))
                return
            self._attempt(shard, "outcome", {"caller": caller, "key": key}, outcome)

        def outcome(value: Any, error: BaseException | None) -> None:
            if error is _LATE or error is _STOPPING or isinstance(error, (errors.Timeout, _Unsent)):
                # No answer, no outcome recorded yet, or the query itself not sent: the
                # command may still have been handed over, so its outcome stays open.
                # (Any other refusal is the command's own outcome: an expiry says 503.)
                self.timeouts += 1
                finish(None, _timeout(shard, key))
            else:
                finish(value, error)

        self._attempt(shard, op, args, first)

    def _attempt(self, shard: int, op: str, args: dict[str, Any], then: _Done) -> None:
        """One send of ``op``; ``then(value, error)`` once: the answer's value or refusal,
        ``Unavailable`` when the call was provably not handed to Redis, or ``_LATE`` when
        no answer came in ``timeout_s`` (a later one is ignored)."""
        assert self._producer is not None and self.loop is not None
        cid = f"{self.gateway_id}-{next(self._cids)}"
        timer: asyncio.TimerHandle | None = None

        def settle(value: Any, error: BaseException | None) -> None:
            if self._pending.pop(cid, None) is None:
                return  # settled already: the answer raced the timer, or came too late
            if timer is not None:
                timer.cancel()
            then(value, error)

        def sent(added: asyncio.Future[str]) -> None:
            # NotSent: provably not handed over. Unknown: it may have been, so the
            # answer is awaited as for any other.
            if not added.cancelled() and isinstance(added.exception(), NotSent):
                self.refused += 1
                settle(None, _Unsent(f"shard {shard} cannot be reached: {added.exception()}"))

        deadline_ms = int((time.time() + self.clock_offset_s + self.timeout_s) * 1000)
        message = pack(self.secret, Call(cid, op, args, replies_stream(self.gateway_id), deadline_ms))
        self._pending[cid] = settle
        timer = self.loop.call_later(self.timeout_s, settle, None, _LATE)
        self._producer.add(commands_stream(shard), {FIELD: message}).add_done_callback(sent)

    def _reply(self, shard: int, op: str, args: dict[str, Any], *, key: str | None = None,
               view: Callable[[Any], Any] | None = None, decode: bool = False) -> Reply:
        """``call`` as the engine's ``Reply``, from any thread."""
        reply = Reply(view)

        def done(value: Any, error: BaseException | None) -> None:
            if error is not None:
                reply.set_exception(error)
                return
            try:
                reply.set(from_plain(value) if decode else value)
            except Exception as raised:  # noqa: BLE001 - an answer this release cannot read
                reply.set_exception(raised)

        if _running_loop() is self.loop:
            self._begin(shard, op, args, key, done)
        else:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._begin, shard, op, args, key, done)
        return reply

    def _blocking(self, shard: int, op: str, args: dict[str, Any]) -> Any:
        """``call`` for a caller off the loop (the gateway's executor runs its reads here)."""
        assert self.loop is not None
        if _running_loop() is self.loop:
            raise RuntimeError(f"{op} blocks: call it from an executor, not on the IOLoop")
        future: ThreadFuture[Any] = asyncio.run_coroutine_threadsafe(self.call(shard, op, args), self.loop)
        return future.result(timeout=self.timeout_s + 5)

    async def _answers(self, entries: list[Entry]) -> None:
        for entry in entries:
            try:
                answer = unpack(self.secret, entry.fields[FIELD], Answer)
            except (Forged, KeyError, TypeError, ValueError):
                log.warning("dropped an answer whose seal does not verify")
                continue
            settle = self._pending.get(answer.cid)
            if settle is not None:
                settle(answer.value, None) if answer.ok else settle(None, answer.error())

    # -- events ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[list[Any]], None]) -> Callable[[], None]:
        """Receive every shard's committed event batches (and price ticks); returns unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    async def _events(self, shard: int, entries: list[Entry]) -> None:
        for entry in entries:
            try:
                batch = unpack(self.secret, entry.fields[FIELD], EventBatch)
            except (Forged, KeyError, TypeError, ValueError):
                log.warning("dropped an event batch whose seal does not verify")
                continue
            epoch, seq = self._last_seq.get(shard, (batch.epoch, batch.seq - 1))
            if batch.epoch != epoch:
                # A new shard process. Its predecessor may have committed entries whose batch
                # never reached Redis (killed between COMMIT and XADD): nothing here can
                # tell, so the sessions that may have missed something resume with since.
                self.gaps += 1
                log.warning("shard %s: a new epoch %s (was %s): it restarted", shard, batch.epoch, epoch)
                self.on_gap(shard)
            elif batch.seq != seq + 1:
                # A lost or repeated batch (Redis lost entries, or restarted): the sessions
                # that may have missed something resume from the ledger with since.
                self.gaps += 1
                log.warning("shard %s: event batch %s of epoch %s where %s was due", shard, batch.seq,
                            batch.epoch, seq + 1)
                self.on_gap(shard)
            self._last_seq[shard] = (batch.epoch, batch.seq)
            for revoked in batch.revoked:
                self.on_revoked(revoked["user_id"], revoked["digest"])
            events = list(from_plain(batch.events))
            for event in events:
                if type(event) is PriceTicked:
                    self._prices = event
            for subscriber in list(self._subscribers):
                try:
                    subscriber(events)
                except Exception:  # noqa: BLE001 - one bad subscriber must not starve the rest
                    log.exception("event subscriber %r failed", subscriber)

    # -- the Engine facade ---------------------------------------------------------------

    def create_user(self, username: str, password: str, role: str = "user", *,
                    created_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        shard = shard_of_username(self.placement, username) if isinstance(username, str) else 0
        return self._mutate(shard, "create_user", {"username": username, "password": password, "role": role,
                                                   "created_by": created_by}, idempotency_key)

    def update_user(self, user_id: int, *, disabled: bool | None = None, role: str | None = None,
                    set_by: int, idempotency_key: str | None = None) -> Reply:
        return self._mutate(self._shard_of(user_id), "update_user",
                            {"user_id": user_id, "disabled": disabled, "role": role, "set_by": set_by},
                            idempotency_key)

    def login(self, username: str, password: str) -> Reply:
        shard = shard_of_username(self.placement, username) if isinstance(username, str) else 0
        return self._reply(shard, "login", {"username": username, "password": password})

    def deposit(self, user_id: int, amount: str, asset: str = "USDT", description: str = "", *,
                initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        return self._money("deposit", user_id, amount, asset, description, initiated_by, idempotency_key)

    def withdraw(self, user_id: int, amount: str, asset: str = "USDT", description: str = "", *,
                 initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        return self._money("withdraw", user_id, amount, asset, description, initiated_by, idempotency_key)

    def adjust(self, user_id: int, amount: str, asset: str = "USDT", description: str = "", *,
               initiated_by: int | None = None, idempotency_key: str | None = None) -> Reply:
        return self._money("adjust", user_id, amount, asset, description, initiated_by, idempotency_key)

    def open_option(self, user_id: int, symbol: str, direction: str, amount: str, duration: int, *,
                    idempotency_key: str | None = None) -> Reply:
        return self._mutate(self._shard_of(user_id), "open_option",
                            {"user_id": user_id, "symbol": symbol, "direction": direction, "amount": amount,
                             "duration": duration}, idempotency_key)

    def spot_order(self, user_id: int, symbol: str, side: str, quantity: str, *,
                   idempotency_key: str | None = None) -> Reply:
        return self._mutate(self._shard_of(user_id), "spot_order",
                            {"user_id": user_id, "symbol": symbol, "side": side, "quantity": quantity},
                            idempotency_key)

    def set_control_mode(self, user_id: int, mode: str, set_by: int, *,
                         idempotency_key: str | None = None) -> Reply:
        return self._mutate(self._shard_of(user_id), "set_control_mode",
                            {"user_id": user_id, "mode": mode, "set_by": set_by}, idempotency_key)

    def force_option(self, trade_id: str, outcome: str, admin_id: int, *,
                     idempotency_key: str | None = None) -> Reply:
        owner = _owner_of_trade(trade_id)
        if owner is None:
            reply = Reply()
            reply.set_exception(errors.UnknownTrade(f"no trade {trade_id!r}"))
            return reply
        return self._mutate(self._shard_of(owner), "force_option",
                            {"trade_id": trade_id, "outcome": outcome, "admin_id": admin_id}, idempotency_key)

    # Reads: blocking, for the gateway's executor.

    def balance(self, user_id: int) -> dict[str, Any]:
        return self._blocking(self._shard_of(user_id), "balance", {"user_id": user_id})

    def history(self, user_id: int, after_version: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return self._blocking(self._shard_of(user_id), "history",
                              {"user_id": user_id, "after_version": after_version, "limit": limit})

    def entries(self, user_id: int, after_version: int = 0, limit: int = 100) -> list[Any]:
        plain = self._blocking(self._shard_of(user_id), "entries",
                               {"user_id": user_id, "after_version": after_version, "limit": limit})
        return list(from_plain(plain))

    def user(self, user_id: int) -> dict[str, Any] | None:
        if type(user_id) is not int or user_id <= 0:
            return None
        return self._blocking(self._shard_of(user_id), "user", {"user_id": user_id})

    def users(self, *, with_disabled: bool = False) -> list[dict[str, Any]]:
        gathered = self._gather("users", {"with_disabled": with_disabled})
        return sorted((user for part in gathered for user in part), key=lambda user: user["user_id"])

    def trades(self, user_id: int | None = None, status: str | None = None, *, newest_first: bool = False,
               limit: int | None = None) -> list[dict[str, Any]]:
        args = {"user_id": user_id, "status": status, "newest_first": newest_first, "limit": limit}
        if user_id is not None:
            return self._blocking(self._shard_of(user_id), "trades", args)
        merged = [trade for part in self._gather("trades", args) for trade in part]
        merged.sort(key=lambda trade: (trade["opened_at"], trade["trade_id"]), reverse=newest_first)
        return merged[:limit] if limit is not None else merged

    def market(self) -> dict[str, Any]:
        """The prices of the last tick any shard published (in memory: does not block)."""
        tick = self._prices
        return {"prices": {symbol: format_amount(p) for symbol, p in tick.prices.items()}, "ts": iso(tick.ts)}

    # -- internals -----------------------------------------------------------------------

    def _money(self, op: str, user_id: int, amount: str, asset: str, description: str,
               initiated_by: int | None, key: str | None) -> Reply:
        return self._mutate(self._shard_of(user_id), op,
                            {"user_id": user_id, "amount": amount, "asset": asset, "description": description,
                             "initiated_by": initiated_by}, key)

    def _mutate(self, shard: int, op: str, args: dict[str, Any], key: str | None) -> Reply:
        # Every mutation carries a key, so the shard applies it once however often it is
        # delivered, and a 504 can name the key that learns its outcome.
        key = key if key is not None else f"gw-{self.gateway_id}-{next(self._cids)}"
        return self._reply(shard, op, {**args, "idempotency_key": key}, key=key, view=result_of, decode=True)

    def _shard_of(self, user_id: int) -> int:
        """The shard of ``user_id``; the embedded engine's refusals for what names nobody."""
        if type(user_id) is not int:
            raise errors.InvalidRequest("user_id must be an integer")
        if user_id <= 0:
            raise errors.UnknownUser(f"no user {user_id}")
        return shard_of_user_id(self.placement, user_id)

    def _gather(self, op: str, args: dict[str, Any]) -> list[Any]:
        """Every shard's answer, or ``503 unavailable`` when one is missing."""
        assert self.loop is not None
        down = self.health.down() if self.health is not None else []
        if down:
            # Known down: nothing is sent, rather than waiting out a timeout per request.
            raise errors.Unavailable(f"not every shard answered: shard {down[0]} is down")

        async def everyone() -> list[Any]:
            return await asyncio.gather(*(self.call(shard, op, args) for shard in range(self.placement.shards)))

        try:
            return asyncio.run_coroutine_threadsafe(everyone(), self.loop).result(timeout=self.timeout_s + 5)
        except (errors.Timeout, errors.Unavailable) as error:
            raise errors.Unavailable(f"not every shard answered: {error.message}") from None


class RemoteTokens:
    """The gateway's ``TokenStore`` in cluster mode: each token names its user, and so its
    shard, which stores and checks it; this gateway caches the answers it got."""

    def __init__(self, engine: RemoteEngine, *, cache_max: int = 10_000) -> None:
        self.engine = engine
        self.cache_max = cache_max
        self._cache: dict[str, Principal] = {}

    def issue(self, principal: Principal) -> str:
        token = f"{principal.user_id}.{secrets.token_urlsafe(32)}"
        self.engine._blocking(self.engine._shard_of(principal.user_id), "token_issue",
                              {"token": token, "principal": {"user_id": principal.user_id,
                                                             "username": principal.username,
                                                             "role": principal.role}})
        self._remember(token, principal)
        return token

    async def check(self, token: str | None) -> Principal | None:
        owner = _owner_of_token(token)
        if owner is None:
            return None
        hit = self._cache.get(token)  # type: ignore[arg-type]
        if hit is not None:
            return hit
        shard = self.engine._shard_of(owner)
        try:
            found = await self.engine.call(shard, "token_check", {"token": token})
        except errors.Timeout:
            # The request it guards was not sent anywhere: nothing changed, so 503, not a
            # 504 (which would leave a mutation's outcome open, and name no key to learn it).
            raise errors.Unavailable(f"the login could not be checked: shard {shard} did not answer in time; "
                                     "nothing was done") from None
        if found is None:
            return None
        principal = Principal(**found)
        self._remember(token, principal)  # type: ignore[arg-type]
        return principal

    def _remember(self, token: str, principal: Principal) -> None:
        if len(self._cache) >= self.cache_max:
            self._cache.pop(next(iter(self._cache)))  # the oldest: it is still on its shard
        self._cache[token] = principal

    def check_blocking(self, token: str | None) -> Principal | None:
        owner = _owner_of_token(token)
        if owner is None:
            return None
        found = self.engine._blocking(self.engine._shard_of(owner), "token_check", {"token": token})
        return None if found is None else Principal(**found)

    async def revoke(self, token: str) -> None:
        self._cache.pop(token, None)
        owner = _owner_of_token(token)
        if owner is not None:
            await self.engine.call(self.engine._shard_of(owner), "token_revoke", {"token": token})

    async def revoke_user(self, user_id: int) -> None:
        for token in [t for t, p in self._cache.items() if p.user_id == user_id]:
            del self._cache[token]
        await self.engine.call(self.engine._shard_of(user_id), "token_revoke_user", {"user_id": user_id})

    def forget(self, digest: str) -> None:
        """Drop a token another gateway revoked (known here by its digest only)."""
        for token in [t for t in self._cache if digest_of(t) == digest]:
            del self._cache[token]

    def forget_shard(self, shard: int) -> None:
        """Drop every cached token of a shard's accounts: after a gap in its events, a
        revocation may have been lost, so each is asked of the shard again."""
        for token, principal in list(self._cache.items()):
            if shard_of_user_id(self.engine.placement, principal.user_id) == shard:
                del self._cache[token]

    def close(self) -> None:
        self._cache.clear()


def wire_gateway(remote: RemoteEngine, tokens: RemoteTokens, hub: Any) -> None:
    """Connect a gateway's hub to what only a cluster has: revocations from other
    gateways, and gaps in a shard's event batches.

    A gap cannot be repaired message by message here (the hub has sent what it had),
    so the sessions that may have missed something are closed with 1012 and resume
    with ``since`` from the shard's ledger: the account's own sessions on that shard
    and every admin session (they watch every account).
    """

    def revoked(user_id: int, digest: str) -> None:
        tokens.forget(digest)
        hub.close_sessions(user_id, digest)

    def gap(shard: int) -> None:
        tokens.forget_shard(shard)
        doomed = [session for session in list(hub.audiences.everyone)
                  if session.is_admin or shard_of_user_id(remote.placement, session.user_id) == shard]
        for session in doomed:
            hub.remove(session)
            session.close(1012, "events were lost: reconnect with since")

    remote.on_revoked = revoked
    remote.on_gap = gap


#: How a call's outcome is handed on: ``(value, None)`` or ``(None, error)``.
_Done = Callable[[Any, "BaseException | None"], None]

class _Unsent(errors.Unavailable):
    """``503 unavailable``: the call was provably never handed to Redis."""


#: The error a send settles with when no answer came in time (never shown to anyone).
_LATE = errors.Timeout("no answer in time")

#: What the calls still pending settle with when the gateway stops (never shown either).
_STOPPING = errors.Timeout("the gateway is stopping")


def _timeout(shard: int, key: str | None) -> errors.Timeout:
    return errors.Timeout(f"shard {shard} did not answer in time: the outcome is unknown; "
                          "repeat the request with the same Idempotency-Key to learn it", idempotency_key=key)


def _owner_of_trade(trade_id: object) -> int | None:
    """``T<user_id>-<version>`` names its owner; anything else names nobody."""
    if not isinstance(trade_id, str) or not trade_id.startswith("T"):
        return None
    owner, _, version = trade_id[1:].partition("-")
    return int(owner) if owner.isdigit() and version.isdigit() and len(owner) <= 18 else None


def _owner_of_token(token: object) -> int | None:
    if not isinstance(token, str) or len(token) > 256:
        return None
    owner, dot, _ = token.partition(".")
    return int(owner) if dot and owner.isdigit() and len(owner) <= 18 and int(owner) > 0 else None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

