"""The Redis fabric of cluster mode, against a real redis-server (a missing one fails).

Recoveries are awaited with bounds far above normal (10 s), never asserted as speed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest
import redis
import redis.asyncio
import redis.asyncio.client

from balancesim.cluster import (
    Backoff,
    Consumer,
    Entry,
    NotSent,
    Producer,
    RedisNotFound,
    RedisServer,
    Tail,
    Unknown,
)

RECOVERY_S = 10.0
FAST = Backoff(initial_s=0.05, max_s=0.5)


@pytest.fixture
def server(tmp_path_factory) -> Iterator[RedisServer]:
    """A fresh redis-server per test (short path: a Unix socket path is at most 107 bytes)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as started:
        yield started


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in its own event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return wrapper


async def until(predicate: Callable[[], bool], timeout_s: float = RECOVERY_S) -> None:
    """Wait until ``predicate()`` holds, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)


class Collector:
    """A handler that records each batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Entry]] = []

    async def __call__(self, entries) -> None:
        self.batches.append(list(entries))

    @property
    def entries(self) -> list[Entry]:
        return [entry for batch in self.batches for entry in batch]

    def values(self, field: bytes = b"n") -> list[bytes]:
        return [entry.fields[field] for entry in self.entries]


def count_pipeline_executes(monkeypatch) -> list[int]:
    """Record, per write to Redis, how many XADDs it carried."""
    calls: list[int] = []
    original = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def send_packed_command(self, command, *args, **kwargs):
        packed = command if isinstance(command, bytes) else b"".join(command)
        if b"\r\nXADD\r\n" in packed:
            calls.append(packed.count(b"\r\nXADD\r\n"))
        return await original(self, command, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "send_packed_command", send_packed_command)
    return calls


def id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def test_backoff_grows_jittered_and_stays_bounded():
    import random

    backoff, rng = Backoff(initial_s=0.1, max_s=2.0), random.Random(7)
    delays = [backoff.delay_s(attempt, rng) for attempt in range(2000)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(1.0 <= delay <= 2.0 for delay in delays[5:])  # capped, never a hot loop
    assert len({round(delay, 6) for delay in delays[5:]}) > 100  # jittered
    with pytest.raises(ValueError):
        Backoff(initial_s=0)


# --- the server -------------------------------------------------------------------------


def test_a_missing_redis_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no redis-server on it
    with pytest.raises(RedisNotFound, match="redis-server is not on PATH; install Debian's"):
        RedisServer(tmp_path / "data").start()


def test_the_server_listens_on_a_private_unix_socket_only(server):
    assert oct(os.stat(server.socket_path).st_mode & 0o777) == "0o700"
    assert server.url.startswith(f"unix://{server.user}:") and server.url.endswith("/redis.sock")
    assert server.password not in repr(server)
    assert redis.Redis.from_url(server.url).ping()
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert server.password.encode() not in f.read()


def test_a_wrong_password_and_the_default_user_are_refused(server):
    wrong = server.url.replace(server.password, "not-the-password")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(wrong).ping()
    with pytest.raises(redis.AuthenticationError):  # no AUTH: the default user is off
        redis.Redis(unix_socket_path=str(server.socket_path)).ping()


def test_the_user_may_not_reconfigure_or_wipe_the_server(server):
    client = redis.Redis.from_url(server.url)
    for command in (("FLUSHALL",), ("CONFIG", "SET", "save", "60 1"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)


def test_nothing_comes_back_from_a_snapshot_after_a_stop_or_a_kill(server):
    client = redis.Redis.from_url(server.url)
    client.xadd("commands", {"n": 1})
    server.stop()  # SIGTERM: the moment a configured save would write a dump
    assert not (server.data_dir / "dump.rdb").exists()
    server.start()
    assert client.exists("commands") == 0
    client.xadd("commands", {"n": 2})
    server.kill()
    server.restart()
    assert client.exists("commands") == 0
    assert not list(server.data_dir.glob("*.rdb")) and not list(server.data_dir.glob("*.aof"))


def test_tcp_when_asked(tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with RedisServer(tmp_path_factory.mktemp("tcp"), host="127.0.0.1", port=port) as server:
        assert server.tcp_url == f"redis://{server.user}:{server.password}@127.0.0.1:{port}"
        assert redis.Redis.from_url(server.tcp_url).ping()
        assert redis.Redis.from_url(server.url).ping()


def test_hiredis_packing_sends_the_same_bytes_as_redis_py():
    from redis.asyncio.connection import Connection

    from balancesim.cluster._streams import _hiredis_packing

    plain, packed = Connection(), _hiredis_packing(Connection)()
    for command in [
        ("XADD", "commands", "MAXLEN", "~", 100_000, "*", "n", 1.5, "é", b"\x00\xff"),
        ("XINFO STREAM", "events"),
        ("XACK", b"commands", "shard", bytearray(b"1-0"), memoryview(b"2-0")),
        ("SET", "k", 2**70, "PX", -1),
    ]:
        assert b"".join(packed.pack_command(*command)) == b"".join(plain.pack_command(*command))
    for bad in (True, None, object()):
        with pytest.raises(redis.exceptions.DataError):
            packed.pack_command("SET", "k", bad)


# --- the producer -----------------------------------------------------------------------


@run_async
async def test_the_adds_of_one_loop_turn_go_out_in_one_pipeline(server, monkeypatch):
    executes = count_pipeline_executes(monkeypatch)
    producer = Producer(server.url)
    try:
        ids = await asyncio.gather(*[producer.add("commands", {"n": i}) for i in range(100)])
        assert executes == [100]
        assert producer.pipelines == 1
        assert ids == sorted(ids, key=id_key) and len(set(ids)) == 100
    finally:
        await producer.aclose()


@run_async
async def test_a_bad_field_fails_its_own_add_at_once_not_the_turn(server):
    producer = Producer(server.url)
    try:
        good = producer.add("commands", {"n": 1})
        for bad in ({}, {"n": None}, {"n": True}, {"n": [1]}):
            with pytest.raises(redis.exceptions.DataError):
                producer.add("commands", bad)
        assert await good
    finally:
        await producer.aclose()


@run_async
async def test_order_is_preserved_across_turns_and_pipelines(server):
    producer = Producer(server.url, max_batch=150)
    try:
        futures = []
        for turn in range(10):
            futures += [producer.add("commands", {"n": turn * 100 + i}) for i in range(100)]
            await asyncio.sleep(0)  # the next turn's adds find a pipeline in flight
        ids = await asyncio.gather(*futures)
        assert producer.pipelines > 1
        client = redis.asyncio.Redis.from_url(server.url)
        stored = await client.xrange("commands")
        assert [entry_id.decode() for entry_id, _ in stored] == ids
        assert [int(fields[b"n"]) for _, fields in stored] == list(range(1000))
        await client.aclose()
    finally:
        await producer.aclose()


@run_async
async def test_streams_are_trimmed_approximately(server):
    producer = Producer(server.url, maxlen=100)
    try:
        for _ in range(20):
            await asyncio.gather(*[producer.add("events", {"n": i}) for i in range(250)])
        await producer.add("untrimmed", {"n": 0}, maxlen=None)
        client = redis.asyncio.Redis.from_url(server.url)
        length = await client.xlen("events")
        # "~" trims whole radix-tree nodes (100 entries each by default): at least the
        # bound stays, at most about one node more.
        assert 100 <= length <= 300, length
        await client.aclose()
    finally:
        await producer.aclose()


@run_async
async def test_a_connection_lost_with_the_pipeline_in_flight_is_unknown(server):
    producer = Producer(server.url, timeout_s=0.5)
    try:
        await producer.add("commands", {"n": 0})  # a live connection in the pool
        os.kill(server.pid, signal.SIGSTOP)  # Redis reads the XADD later, replies never in time
        try:
            with pytest.raises(Unknown):
                await producer.add("commands", {"n": 1})
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert producer.unknown == 1
        # "Unknown" is the truth: the XADD did happen once Redis ran again.
        client = redis.asyncio.Redis.from_url(server.url)
        stored = [fields[b"n"] for _, fields in await client.xrange("commands")]
        assert stored in ([b"0", b"1"], [b"0"])
        await client.aclose()
        # and the producer works again on a fresh connection
        assert await producer.add("commands", {"n": 2})
    finally:
        await producer.aclose()


@run_async
async def test_no_redis_is_never_silent_and_no_connection_is_not_sent(server):
    producer = Producer(server.url, timeout_s=1.0)
    try:
        await producer.add("commands", {"n": 0})
        server.kill()
        # The pooled connection is dead, but whether Redis read what was written on it
        # before it died cannot be known from here: Unknown is the honest answer.
        results = await asyncio.gather(
            *[producer.add("commands", {"n": i}) for i in range(3)], return_exceptions=True
        )
        assert all(isinstance(result, (Unknown, NotSent)) for result in results), results
        # No connection can be made: provably nothing was handed over.
        with pytest.raises(NotSent):
            await producer.add("commands", {"n": 4})
        assert producer.not_sent >= 1
        server.start()
        assert await producer.add("commands", {"n": 5})  # reconnects on the next add
    finally:
        await producer.aclose()


@run_async
async def test_a_producer_that_never_connected_is_not_sent(tmp_path):
    producer = Producer(f"unix://u:p@{tmp_path}/absent.sock", timeout_s=1.0)
    try:
        with pytest.raises(NotSent):
            await producer.add("commands", {"n": 0})
    finally:
        await producer.aclose()


@run_async
async def test_a_wrong_password_fails_every_add(server):
    producer = Producer(server.url.replace(server.password, "wrong"))
    try:
        with pytest.raises(NotSent, match="(?i)invalid username-password"):
            await producer.add("commands", {"n": 0})
    finally:
        await producer.aclose()


# --- the consumer -----------------------------------------------------------------------


@run_async
async def test_a_consumer_gets_everything_from_0_in_batches_and_acks(server):
    producer = Producer(server.url)
    # Added before the group exists: a group created at "$" would never see them.
    await asyncio.gather(*[producer.add("commands", {"n": i}) for i in range(2500)])
    collector = Collector()
    consumer = Consumer(server.url, "commands", "shard", "shard-0", collector, count=1000).start()
    try:
        await until(lambda: len(collector.entries) == 2500)
        assert [len(batch) for batch in collector.batches] == [1000, 1000, 500]
        assert collector.values() == [str(i).encode() for i in range(2500)]
        client = redis.asyncio.Redis.from_url(server.url)
        await until_async(lambda: client.xpending("commands", "shard"), lambda p: p["pending"] == 0)
        await client.aclose()
    finally:
        await consumer.stop()

    # The same consumer again: nothing acked comes back, only what is new.
    again = Collector()
    consumer = Consumer(server.url, "commands", "shard", "shard-0", again).start()
    try:
        await producer.add("commands", {"n": "new"})
        await until(lambda: len(again.entries) >= 1)
        await asyncio.sleep(0.1)
        assert again.values() == [b"new"]
    finally:
        await consumer.stop()
        await producer.aclose()


async def until_async(read, predicate, timeout_s: float = RECOVERY_S) -> None:
    """Wait until ``predicate(await read())`` holds, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate(await read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)


@run_async
async def test_unacked_entries_come_back_first_to_the_same_consumer(server):
    producer = Producer(server.url)
    await asyncio.gather(*[producer.add("commands", {"n": i}) for i in range(5)])
    seen: list[Entry] = []
    never = asyncio.Event()

    async def crash_midway(entries) -> None:
        seen.extend(entries)
        await never.wait()  # the process dies here, before the ack

    consumer = Consumer(server.url, "commands", "shard", "shard-0", crash_midway).start()
    await until(lambda: len(seen) == 5)
    await consumer.stop()

    await producer.add("commands", {"n": 5})
    collector = Collector()
    consumer = Consumer(server.url, "commands", "shard", "shard-0", collector, count=3).start()
    try:
        await until(lambda: len(collector.entries) == 6)
        # Pending first (in batches of 3), then the new one.
        assert [[e.id for e in batch] for batch in collector.batches[:2]] == [
            [e.id for e in seen[:3]],
            [e.id for e in seen[3:]],
        ]
        assert collector.values() == [str(i).encode() for i in range(6)]
    finally:
        await consumer.stop()
        await producer.aclose()


@run_async
async def test_a_failing_handler_gets_its_batch_again(server):
    producer = Producer(server.url)
    calls: list[list[bytes]] = []

    async def fails_once(entries) -> None:
        calls.append([entry.fields[b"n"] for entry in entries])
        if len(calls) == 1:
            raise RuntimeError("boom")

    consumer = Consumer(server.url, "commands", "shard", "shard-0", fails_once, backoff=FAST)
    consumer.start()
    try:
        await producer.add("commands", {"n": 1})
        await until(lambda: len(calls) == 2)
        assert calls == [[b"1"], [b"1"]]
        assert consumer.reconnects == 0  # not a Redis failure
    finally:
        await consumer.stop()
        await producer.aclose()


@run_async
async def test_pending_entries_trimmed_away_are_counted_and_skipped(server):
    producer = Producer(server.url)
    await asyncio.gather(*[producer.add("commands", {"n": i}) for i in range(3)])
    never = asyncio.Event()
    seen: list[Entry] = []

    async def hang(entries) -> None:
        seen.extend(entries)
        await never.wait()

    consumer = Consumer(server.url, "commands", "shard", "shard-0", hang).start()
    await until(lambda: len(seen) == 3)
    await consumer.stop()
    client = redis.asyncio.Redis.from_url(server.url)
    await client.xtrim("commands", maxlen=0, approximate=False)
    collector = Collector()
    consumer = Consumer(server.url, "commands", "shard", "shard-0", collector).start()
    try:
        await producer.add("commands", {"n": "new"})
        await until(lambda: len(collector.entries) == 1)
        assert collector.values() == [b"new"] and consumer.trimmed == 3
        await until_async(lambda: client.xpending("commands", "shard"), lambda p: p["pending"] == 0)
    finally:
        await consumer.stop()
        await producer.aclose()
        await client.aclose()


# --- the tail ---------------------------------------------------------------------------


@run_async
async def test_a_tail_reads_after_an_id_and_reports_the_last_it_delivered(server):
    producer = Producer(server.url)
    ids = await asyncio.gather(*[producer.add("events", {"n": i}) for i in range(10)])
    everything, after_fifth, from_end = Collector(), Collector(), Collector()
    tails = [
        Tail(server.url, "events", everything).start(),
        Tail(server.url, "events", after_fifth, start_id=ids[4]).start(),
        Tail(server.url, "events", from_end, start_id="$").start(),
    ]
    try:
        await until(lambda: len(everything.entries) == 10 and len(after_fifth.entries) == 5)
        await until(lambda: all(tail.connected for tail in tails))
        last = await producer.add("events", {"n": 10})
        await until(lambda: all(tail.last_id == last for tail in tails))
        assert everything.values() == [str(i).encode() for i in range(11)]
        assert after_fifth.values() == [str(i).encode() for i in range(5, 11)]
        assert from_end.values() == [b"10"]
    finally:
        for tail in tails:
            await tail.stop()
        await producer.aclose()


@run_async
async def test_a_tail_starts_over_on_a_stream_whose_ids_went_back(server):
    # What a restarted Redis whose clock is behind the old one looks like: every entry
    # of the new stream is below the id the tail had reached, and all of them are new.
    producer = Producer(server.url)
    await asyncio.gather(*[producer.add("events", {"n": i}) for i in range(3)])
    collector = Collector()
    tail = Tail(server.url, "events", collector, start_id="99999999999999-0").start()
    try:
        await until(lambda: len(collector.entries) == 3)
        assert tail.resets == 1 and tail.last_id == collector.entries[-1].id
    finally:
        await tail.stop()
        await producer.aclose()


@run_async
async def test_stop_ends_a_reader_wherever_it_is(server):
    # A cancellation swallowed anywhere (asyncio.wait_for in 3.11 did, inside redis-py)
    # would leave stop() waiting for the whole 30 s blocking read.
    for yields in range(16):
        for reader in (
            Consumer(server.url, "commands", "shard", "shard-0", Collector(), block_ms=30_000),
            Tail(server.url, "events", Collector(), block_ms=30_000),
        ):
            reader.start()
            for _ in range(yields):
                await asyncio.sleep(0)
            await asyncio.wait_for(reader.stop(), 5)


# --- Redis dies -------------------------------------------------------------------------


@run_async
async def test_consumer_and_tail_come_back_by_themselves_after_a_redis_kill(server):
    producer = Producer(server.url)
    commands, events = Collector(), Collector()
    # A slow backoff, so that entries land in the new Redis before the readers return.
    slow = Backoff(initial_s=1.0, max_s=1.0)
    consumer = Consumer(server.url, "commands", "shard", "shard-0", commands, backoff=slow)
    tail = Tail(server.url, "events", events, backoff=slow)
    consumer.start(), tail.start()
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await producer.add("commands", {"n": "before"})
        await producer.add("events", {"n": "before"})
        await until(lambda: len(commands.entries) == 1 and len(events.entries) == 1)

        added_before_the_group = False
        for round_ in range(3):
            server.kill()
            await until(lambda: not consumer.connected and not tail.connected)
            server.start()
            await producer.add("commands", {"n": f"after-{round_}"})
            await producer.add("events", {"n": f"after-{round_}"})
            # The consumer must read what the new, empty Redis got before its group was
            # made again: that is why groups are created from 0, never "$".
            groups = await client.xinfo_groups("commands")
            added_before_the_group = added_before_the_group or not groups
            await until(lambda: len(commands.entries) == round_ + 2)
            await until(lambda: len(events.entries) == round_ + 2)
            if added_before_the_group:
                break
        assert added_before_the_group
        assert consumer.reconnects == tail.reconnects == round_ + 1
        assert commands.values()[-1] == events.values()[-1] == f"after-{round_}".encode()

        # and they keep working
        await producer.add("commands", {"n": "later"})
        await producer.add("events", {"n": "later"})
        await until(lambda: commands.values()[-1] == events.values()[-1] == b"later")
        await until_async(lambda: client.xpending("commands", "shard"), lambda p: p["pending"] == 0)
    finally:
        await consumer.stop()
        await tail.stop()
        await producer.aclose()
        await client.aclose()
