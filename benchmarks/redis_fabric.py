"""The Redis fabric's raw rates: XADD one at a time vs coalesced, and XREADGROUP entries/s.

Usage: ``python benchmarks/redis_fabric.py [--seconds 3] [--entries 200000] [--payload 200]``

A private ``redis-server`` (``RedisServer``, Unix socket) runs on the same machine, so the
client and Redis share its cores, as a gateway and Redis will in ``serve --workers``.
Every entry carries one field of ``--payload`` bytes (about a signed command's size).

- sequential: ``await producer.add(...)`` one after the other, so each XADD is its own
  pipeline and pays a whole round trip (what a gateway with one request at a time gets);
- coalesced: 1,000 adds per loop turn, awaited together (one pipeline per turn);
- XREADGROUP: a ``Consumer`` with batches of 1,000 and a handler that does nothing, over a
  stream filled beforehand; its XACKs (one per batch, pipelined with the next read) are in.

The last line is JSON: ``{"xadd_sequential_per_s", "xadd_coalesced_per_s",
"xreadgroup_entries_per_s"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redis.asyncio.connection import HIREDIS_AVAILABLE  # noqa: E402

from balancesim.cluster import Consumer, Producer, RedisServer  # noqa: E402
from benchmarks._common import emit  # noqa: E402

TURN_ADDS = 1000


async def xadd_sequential(url: str, seconds: float, fields: dict) -> float:
    producer = Producer(url, maxlen=100_000)
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            await producer.add("sequential", fields)
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        await producer.aclose()


async def xadd_coalesced(url: str, seconds: float, fields: dict) -> tuple[float, float, float]:
    """(adds/s, adds per pipeline, client CPU µs per add)."""
    producer = Producer(url, maxlen=100_000)
    try:
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            await asyncio.gather(*[producer.add("coalesced", fields) for _ in range(TURN_ADDS)])
            done += TURN_ADDS
        elapsed = time.perf_counter() - start
        cpu_us = (time.process_time() - cpu) / done * 1e6
        return done / elapsed, done / producer.pipelines, cpu_us
    finally:
        await producer.aclose()


async def xreadgroup(url: str, entries: int, fields: dict) -> float:
    producer = Producer(url, maxlen=None)
    for _ in range(entries // TURN_ADDS):
        await asyncio.gather(*[producer.add("read", fields) for _ in range(TURN_ADDS)])
    await producer.aclose()
    total = entries // TURN_ADDS * TURN_ADDS
    received = 0
    finished = asyncio.Event()

    async def handler(batch) -> None:
        nonlocal received
        received += len(batch)
        if received >= total:
            finished.set()

    start = time.perf_counter()
    consumer = Consumer(url, "read", "bench", "bench-0", handler, count=1000).start()
    try:
        await asyncio.wait_for(finished.wait(), 300)
        return received / (time.perf_counter() - start)
    finally:
        await consumer.stop()


async def measure(args: argparse.Namespace) -> dict[str, float]:
    fields = {"c": b"x" * args.payload}
    with tempfile.TemporaryDirectory(prefix="rf") as data_dir:
        with RedisServer(data_dir) as server:
            print(f"redis-server pid {server.pid}, hiredis parser: {HIREDIS_AVAILABLE}")
            sequential = await xadd_sequential(server.url, args.seconds, fields)
            print(f"XADD one at a time:     {sequential:10,.0f} /s "
                  f"({1e6 / sequential:.0f} µs per round trip)")
            coalesced, per_pipeline, cpu_us = await xadd_coalesced(
                server.url, args.seconds, fields
            )
            print(f"XADD coalesced:         {coalesced:10,.0f} /s "
                  f"({per_pipeline:,.0f} per pipeline; {cpu_us:.1f} µs of client CPU each; "
                  f"{coalesced / sequential:.1f}x)")
            read = await xreadgroup(server.url, args.entries, fields)
            print(f"XREADGROUP (1,000/batch, acked): {read:10,.0f} entries/s")
    return {
        "xadd_sequential_per_s": round(sequential),
        "xadd_coalesced_per_s": round(coalesced),
        "xreadgroup_entries_per_s": round(read),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per XADD measurement")
    parser.add_argument("--entries", type=int, default=200_000, help="for XREADGROUP")
    parser.add_argument("--payload", type=int, default=200, help="bytes per entry")
    emit(asyncio.run(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
