"""The protocol client: every operation, typed refusals, idempotency, and sessions that
check order, reject foreign events and reconnect with ``since`` without losing anything."""

from __future__ import annotations

import asyncio

import pytest
from tornado.testing import gen_test

from balancesim.client import ApiError, Client, Stream, Unreachable
from tests.gateway_harness import WAIT_S, GatewayCase


class Operations(GatewayCase):
    async def logins(self) -> None:
        for name, role, usdt in (("boss", "superadmin", None), ("admin", "admin", None), ("alice", "user", "1000")):
            await self.account(name, role, usdt)
        url = self.get_url("")
        self.boss, self.admin, self.alice = [
            await Client.login(url, name, f"{name}-pw") for name in ("boss", "admin", "alice")
        ]

    @gen_test(timeout=20)
    async def test_every_operation_answers_with_parsed_json_and_reaches_the_session(self):
        await self.logins()
        assert (self.alice.role, self.boss.role) == ("user", "superadmin")
        session = await self.alice.session()
        a = self.alice.user_id

        deposit = await self.boss.deposit(a, "25.5", description="gift")
        assert (deposit["type"], deposit["amount"], deposit["balance_after"], deposit["version"]) == ("deposit", "25.5", "1025.5", 2)
        assert (await self.boss.withdraw(a, "0.5"))["version"] == 3
        assert (await self.boss.adjust(a, "-5", description="fee"))["balance_after"] == "1020"
        assert await self.boss.set_control(a, "win") == {"user_id": a, "mode": "win"}
        trade = await self.alice.open_option("BTCUSDT", "up", "20", 30)
        assert trade["status"] == "open" and [t["trade_id"] for t in await self.alice.options("open")] == [trade["trade_id"]]
        assert (await self.admin.force(trade["trade_id"], "lose"))["forced_outcome"] == "lose"
        order = await self.alice.spot("ETHUSDT", "buy", "0.01")
        assert len(order["transactions"]) == 2
        assert set((await self.alice.market())["prices"]) == {"BTCUSDT", "ETHUSDT"}
        carol = await self.admin.create_user("carol", "carol-pw")
        assert carol["role"] == "user" and carol["username"] == "carol"
        assert {u["username"] for u in await self.admin.users()} >= {"alice", "carol"}

        self.engine.advance(30)
        settled = await session.wait_for("trade_update", lambda m: m["trade"]["status"] != "open", timeout_s=WAIT_S)
        assert settled["trade"]["decided_by"] == f"admin_force:{self.admin.user_id}"
        await session.barrier()
        own = await self.alice.balance()
        assert own == await self.admin.balance(a)
        assert session.balances == own["balances"] and session.version == own["version"] == 7
        history = await self.alice.transactions()
        assert [t["version"] for t in history] == list(range(1, 8))
        assert await self.admin.transactions(a, after_version=5, limit=1) == history[5:6]
        assert [m["version"] for m in session.messages if m["type"] == "balance_update"] == list(range(2, 8))
        assert session.problems == [] and session.reconnects == 0
        await session.close()

    @gen_test
    async def test_refusals_are_api_errors_with_the_status_and_the_protocol_code(self):
        await self.logins()
        cases = [
            (Client.login(self.get_url(""), "alice", "wrong"), 401, "unauthorized"),
            (self.alice.deposit(self.alice.user_id, "1"), 403, "forbidden"),
            (self.boss.withdraw(self.alice.user_id, "5000"), 409, "insufficient_funds"),
            (self.boss.deposit(self.alice.user_id, "1e3"), 400, "invalid_amount"),
            (self.admin.create_user("alice", "x"), 409, "conflict"),
            (self.admin.force("T0-0", "win"), 404, "unknown_trade"),
        ]
        forged = Client(self.get_url(""), token="forged", user_id=self.alice.user_id, role="user")
        cases += [(forged.balance(), 401, "unauthorized"), (forged.session(), 401, "unauthorized")]
        for call, status, code in cases:
            with pytest.raises(ApiError) as refused:
                await call
            assert (refused.value.status, refused.value.code) == (status, code)
            assert refused.value.message

    @gen_test
    async def test_an_idempotency_key_replays_the_first_answer_and_mutates_once(self):
        await self.logins()
        first = await self.boss.deposit(self.alice.user_id, "10", key="gift-1")
        again = await self.boss.deposit(self.alice.user_id, "10", key="gift-1")
        assert again == first
        assert (await self.alice.balance())["balances"]["USDT"] == "1010"
        with pytest.raises(ApiError) as reused:
            await self.boss.deposit(self.alice.user_id, "11", key="gift-1")
        assert (reused.value.status, reused.value.code) == (409, "conflict")

    @gen_test(timeout=30)
    async def test_one_ioloop_drives_two_hundred_sessions(self):
        await self.logins()
        users = [await self.account(f"u{i}") for i in range(200)]
        clients = await asyncio.gather(*(Client.login(self.get_url(""), u["username"], f"{u['username']}-pw") for u in users))
        sessions = await asyncio.gather(*(c.session() for c in clients))
        await asyncio.gather(*(self.boss.deposit(c.user_id, "3") for c in clients))
        updates = await asyncio.gather(*(s.wait_for("balance_update", timeout_s=WAIT_S) for s in sessions))
        assert [u["user_id"] for u in updates] == [c.user_id for c in clients]
        assert all(s.problems == [] and s.balances["USDT"] == "3" for s in sessions)
        await asyncio.gather(*(s.close() for s in sessions))


class Reconnects(GatewayCase):
    async def drop_and_resume(self, cut) -> None:
        await self.account("boss", "superadmin")
        await self.account("alice", usdt="1")
        boss = await Client.login(self.get_url(""), "boss", "boss-pw")
        alice = await Client.login(self.get_url(""), "alice", "alice-pw")
        session = await alice.session()
        await boss.deposit(alice.user_id, "1")
        await session.wait_for("balance_update", lambda m: m["version"] == 2)
        cut(session)
        # Committed while the loop is blocked, so before the client can reconnect: only the
        # replay from ``since`` can bring these.
        for _ in range(3):
            self.engine.deposit(alice.user_id, "1").get(timeout=WAIT_S)
        await session.wait_for("balance_update", lambda m: m["version"] == 5, timeout_s=WAIT_S)
        await boss.deposit(alice.user_id, "1")
        await session.wait_for("balance_update", lambda m: m["version"] == 6, timeout_s=WAIT_S)
        versions = [m["version"] for m in session.messages if m["type"] == "balance_update"]
        assert versions == [2, 3, 4, 5, 6]
        assert session.reconnects == 1 and session.problems == []
        assert session.balances["USDT"] == "6"
        await session.close()

    @gen_test(timeout=20)
    async def test_a_session_closed_with_4008_reconnects_with_since_and_misses_nothing(self):
        def too_slow(session) -> None:
            # The server side of the session, closed as the slow-consumer path closes it.
            for handler in list(self.ctx.hub.audiences.owners[session.user_id]):
                handler.close(4008, "too slow: reconnect with since")

        await self.drop_and_resume(too_slow)

    @gen_test(timeout=20)
    async def test_a_session_whose_connection_breaks_reconnects_with_since_and_misses_nothing(self):
        await self.drop_and_resume(lambda session: session._conn.stream.close())


def stream(role: str = "user") -> Stream:
    s = Stream(user_id=7, role=role)
    s.record({"type": "user_balance_init", "user_id": 7, "balances": {"USDT": "0"}, "version": 1})
    return s


def update(version: int, user_id: int = 7, balance: str = "1") -> dict:
    return {"type": "balance_update", "user_id": user_id, "asset": "USDT", "balance": balance, "version": version}


def test_a_stream_flags_a_gap_and_a_duplicate():
    s = stream()
    for version in (2, 4, 4, 3):
        s.record(update(version))
    assert s.problems == [
        "gap: version 4 arrived, expected 3",
        "duplicate: version 4 arrived again after 4",
        "duplicate: version 3 arrived again after 4",
    ]
    assert s.version == 4


def test_a_user_stream_flags_another_accounts_events_and_an_admin_stream_does_not():
    foreign = [update(2, user_id=8), {"type": "trade_update", "trade": {"user_id": 8}},
               {"type": "trading_control_update", "user_id": 8, "mode": "win"}]
    user, admin = stream(), stream("admin")
    for message in foreign:
        user.record(message)
        admin.record(message)
    assert user.problems == [f"{kind} of account 8 reached account 7"
                             for kind in ("balance_update", "trade_update", "trading_control_update")]
    assert admin.problems == [] and admin.balances == {"USDT": "0"}


def test_an_unreachable_server_is_a_connection_error():
    with pytest.raises(Unreachable, match="^cannot reach http://127.0.0.1:9: "):
        asyncio.run(Client.login("http://127.0.0.1:9", "x", "y"))
