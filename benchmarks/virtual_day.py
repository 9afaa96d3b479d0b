"""The ``virtual-day`` scenario in-process: 1,000 users trading options for 10 simulated minutes.

Usage: ``python benchmarks/virtual_day.py [--seed N]``

Runs the shipped scenario exactly as ``balancesim scenario run virtual-day`` does
(embedded engine, temporary ledger, virtual clock, every session's messages
checked, ``ledger verify``) and prints its wall time, the trades settled, the
messages checked and the verdict. The last line is one JSON object
``{"virtual_day_s", "users", "trades", "messages", "ok", "digest"}``; the target is
``virtual_day_s`` ≤ 20 on this 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balancesim.scenarios import InProcessWorld, load, run_scenario  # noqa: E402
from benchmarks._common import emit, peak_rss_mb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, help="Overrides the scenario's seed.")
    args = parser.parse_args()
    scenario = load("virtual-day")
    seed = scenario.seed if args.seed is None else args.seed
    outcome = asyncio.run(run_scenario(scenario, InProcessWorld(seed), seed))
    users = sum(p.role == "user" for p in scenario.participants.values())
    print(outcome.text())
    print(f"{users:,} users, {outcome.trades:,} trades, {outcome.messages_checked:,} messages checked in "
          f"{outcome.seconds:.2f} s wall; peak RSS {peak_rss_mb()} MiB")
    emit({
        "virtual_day_s": round(outcome.seconds, 2),
        "users": users,
        "trades": outcome.trades,
        "messages": outcome.messages_checked,
        "ok": outcome.ok,
        "digest": outcome.digest,
    })


if __name__ == "__main__":
    main()
