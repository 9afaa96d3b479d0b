"""Place and settle 10,000 options trades on the virtual clock.

Usage: ``python benchmarks/trades.py [--trades N] [--accounts N]``

Prints the time to place them all, the time to settle them all, the peak thread
count (sampled while they run) and the peak RSS. The last line is one JSON object
``{"trades", "seconds", "peak_threads", "peak_rss_mb"}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balancesim.actors import VirtualClock  # noqa: E402
from balancesim.engine import Engine  # noqa: E402
from balancesim.reports import verify  # noqa: E402
from benchmarks._common import emit, peak_rss_mb  # noqa: E402


class ThreadPeak:
    """Samples ``threading.active_count()`` on its own thread until stopped."""

    def __init__(self) -> None:
        self.peak = threading.active_count()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, threading.active_count() - 1)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trades", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trades.db")
        engine = Engine(path, clock=VirtualClock(), password_cost=2).start()
        users = [r.get(timeout=60)["user_id"] for r in [engine.create_user(f"u{i}", "pw") for i in range(args.accounts)]]
        for reply in [engine.deposit(u, "1000000") for u in users]:
            reply.get(timeout=60)
        sampler = ThreadPeak()
        start = time.perf_counter()
        replies = [
            engine.open_option(users[i % args.accounts], ("BTCUSDT", "ETHUSDT")[i % 2],
                               ("up", "down")[(i // 2) % 2], "10", (30, 60)[(i // 4) % 2])
            for i in range(args.trades)
        ]
        for reply in replies:
            reply.get(timeout=120)
        placed = time.perf_counter()
        engine.advance(60, timeout_s=300)
        settled = time.perf_counter()
        peak_threads = sampler.stop()
        open_left = len(engine.trades(status="open"))
        engine.stop()
        report = verify(path)
    print(f"placed  {args.trades:,} trades on {args.accounts:,} accounts in {placed - start:.2f} s "
          f"({args.trades / (placed - start):,.0f}/s)")
    print(f"settled {args.trades:,} trades in {settled - placed:.2f} s ({args.trades / (settled - placed):,.0f}/s); "
          f"{open_left} left open")
    print(f"peak threads {peak_threads}, peak RSS {peak_rss_mb()} MiB; {report.text()}")
    emit({
        "trades": args.trades,
        "seconds": round(settled - start, 2),
        "peak_threads": peak_threads,
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
