"""Soak: does a long-running ``serve`` keep its memory?

Runs ``balancesim serve --time-scale 0.01`` as a subprocess, with 200 users trading
options, spot orders and deposits (by a superadmin) for ``--minutes``. Users log out
and in again as they go (a fresh token, a fresh session), so logins churn. The
server's RSS is sampled every 10 s; after the first minute (warm-up: caches,
actors, the allocator's arenas) a least-squares line through the samples gives the
growth per hour of load.

Target (issue 12): ``rss_growth_mb_per_hour`` ≤ 50.

Last line: ``{"minutes", "trades", "logins", "rss_first_mb", "rss_last_mb",
"rss_growth_mb_per_hour"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import emit  # noqa: E402

from balancesim.client import ApiError, Client, configure_http  # noqa: E402
from balancesim.serveproc import ServerProcess  # noqa: E402

SAMPLE_S = 10.0
WARMUP_S = 60.0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), scaled to MiB per hour."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return 3600 * cov / var if var else 0.0


class Counters:
    def __init__(self) -> None:
        self.trades = self.logins = self.ops = self.refused = self.errors = 0


async def trader(url: str, name: str, password: str, boss: Client, user_id: int, deadline: float,
                 rng: random.Random, counts: Counters) -> None:
    client = await Client.login(url, name, password)
    counts.logins += 1
    session = await client.session()
    ops_until_relogin = rng.randint(10, 40)
    while time.monotonic() < deadline:
        choice = rng.random()
        try:
            if choice < 0.45:
                await client.open_option(rng.choice(["BTCUSDT", "ETHUSDT"]), rng.choice(["up", "down"]),
                                         "1", rng.choice([30, 60]))
                counts.trades += 1
            elif choice < 0.8:
                await client.spot("BTCUSDT", rng.choice(["buy", "sell"]), "0.0001")
            else:
                await boss.deposit(user_id, "10", description="soak")
            counts.ops += 1
        except ApiError:
            counts.refused += 1
        except Exception:  # noqa: BLE001 - a soak goes on; the count says how often
            counts.errors += 1
        ops_until_relogin -= 1
        if ops_until_relogin <= 0:
            # Log out (the token is dropped; with POST /api/logout it is revoked too) and in again.
            try:
                await client.request("POST", "/api/logout")
            except ApiError:
                pass  # a server without logout: the token just expires
            await session.close()
            client = await Client.login(url, name, password)
            counts.logins += 1
            session = await client.session()
            ops_until_relogin = rng.randint(10, 40)
        await asyncio.sleep(rng.uniform(0.2, 0.6))
    await session.close()


async def soak(minutes: float, users: int, seed: int) -> dict:
    configure_http(max_clients=users + 10)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(os.path.join(tmp, "soak.db"), "--demo", "--time-scale", "0.01",
                               "--password-cost", "1024").start()
        assert server.process is not None
        pid = server.process.pid
        try:
            url = server.url
            boss = await Client.login(url, "superadmin", "superadmin123")
            ids = []
            for index in range(users):
                created = await boss.create_user(f"soak{index:04d}", "soak-pw")
                await boss.deposit(created["user_id"], "100000")
                ids.append(created["user_id"])
            counts = Counters()
            started = time.monotonic()
            deadline = started + minutes * 60
            rng = random.Random(seed)
            tasks = [
                asyncio.ensure_future(trader(url, f"soak{i:04d}", "soak-pw", boss, ids[i], deadline,
                                             random.Random(rng.random()), counts))
                for i in range(users)
            ]
            samples: list[tuple[float, float]] = []
            while time.monotonic() < deadline:
                elapsed = time.monotonic() - started
                samples.append((elapsed, rss_mb(pid)))
                print(f"  t={elapsed:6.0f}s rss={samples[-1][1]:7.1f} MiB ops={counts.ops} "
                      f"trades={counts.trades} logins={counts.logins} refused={counts.refused} "
                      f"errors={counts.errors}", flush=True)
                await asyncio.sleep(min(SAMPLE_S, max(0.0, deadline - time.monotonic())))
            await asyncio.gather(*tasks, return_exceptions=True)
            samples.append((time.monotonic() - started, rss_mb(pid)))
        finally:
            server.stop()
    steady = [s for s in samples if s[0] >= min(WARMUP_S, minutes * 60 / 4)]
    return {
        "minutes": minutes,
        "trades": counts.trades,
        "logins": counts.logins,
        "rss_first_mb": round(steady[0][1], 1),
        "rss_last_mb": round(steady[-1][1], 1),
        "rss_growth_mb_per_hour": round(slope_per_hour(steady), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = asyncio.run(soak(args.minutes, args.users, args.seed))
    print(f"{result['minutes']} min, {result['trades']} trades, {result['logins']} logins: RSS "
          f"{result['rss_first_mb']} → {result['rss_last_mb']} MiB after warm-up, "
          f"{result['rss_growth_mb_per_hour']} MiB/h (target ≤ 50)")
    emit(result)


if __name__ == "__main__":
    main()
