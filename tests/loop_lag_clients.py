"""The clients of test_loop_lag, in a process of their own (so they do not share the server's GIL).

Usage: python loop_lag_clients.py URL SESSIONS USERS. Logs in as the superadmin,
opens SESSIONS WebSocket sessions, then creates USERS accounts and logs each in,
all at once, while every session keeps pinging. Prints one JSON line: the
slowest pong in ms, and how many users were created and logged in.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from balancesim.client import Client, configure_http


async def main(url: str, sessions: int, users: int) -> None:
    configure_http(64)
    boss = await Client.login(url, "superadmin", "superadmin-pw")
    opened = await asyncio.gather(*(boss.session() for _ in range(sessions)))
    slowest = 0.0
    busy = True

    async def ping(session) -> None:
        nonlocal slowest
        while busy:
            sent = time.perf_counter()
            await session.barrier(timeout_s=30)  # a ping, answered by a pong
            slowest = max(slowest, time.perf_counter() - sent)
            await asyncio.sleep(0.05)

    pingers = [asyncio.ensure_future(ping(s)) for s in opened[:20]]

    async def churn(i: int) -> None:
        await boss.create_user(f"lag{i}", "lag-password")
        await Client.login(url, f"lag{i}", "lag-password")

    await asyncio.gather(*(churn(i) for i in range(users)))
    busy = False
    await asyncio.gather(*pingers)
    for session in opened:
        await session.close()
    print(json.dumps({"slowest_pong_ms": round(slowest * 1000, 1), "users": users, "sessions": sessions}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
