"""The protocol client: every operation, typed refusals, idempotency, and sessions that
check order, reject foreign events and reconnect with ``since`` without losing anything."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from tornado.testing import gen_test

from balancesim.client import ApiError, Client, Session, Stream, Unreachable
from balancesim.cluster import Placement, shard_of_user_id, shard_of_username
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


# -- against a real server, embedded and as a cluster ----------------------------------------


@pytest.fixture
def server(start_server):
    """The demo server, embedded and as ``serve --workers 2 --shards 2`` (each test runs in both)."""
    return start_server("--demo", "--time-scale", "0.01", "--password-cost", "1024")


def names_on_each_shard(prefix: str, shards: int = 2) -> list[str]:
    """A username for each shard of a new cluster's placement, by shard index."""
    placement, found = Placement.for_new(shards), {}
    for n in itertools.count():
        found.setdefault(shard_of_username(placement, f"{prefix}{n}"), f"{prefix}{n}")
        if len(found) == shards:
            return [found[index] for index in range(shards)]
    raise AssertionError("unreachable")


def routed(session: Session) -> list[dict]:
    """What the table routed to ``session``: every message but price ticks and pongs."""
    return [m for m in session.messages if m["type"] not in ("price_tick", "pong")]


def owner(message: dict) -> int:
    return message["trade"]["user_id"] if message["type"] == "trade_update" else message["user_id"]


async def until(check, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


def test_two_users_on_different_shards_and_an_admin_receive_exactly_what_the_table_says(server):
    asyncio.run(_two_shards_and_an_admin(server.url, server.mode))


async def _two_shards_and_an_admin(url: str, mode: str) -> None:
    boss = await Client.login(url, "superadmin", "superadmin123")
    admin = await Client.login(url, "admin", "admin123")
    # Ann lives on shard 1 (which follows shard 0's price feed) and Ben on shard 0.
    ben_name, ann_name = names_on_each_shard("table-")
    ann_id = (await boss.create_user(ann_name, "ann-password"))["user_id"]
    ben_id = (await boss.create_user(ben_name, "ben-password"))["user_id"]
    if mode == "cluster":
        assert [shard_of_user_id(Placement.for_new(2), i) for i in (ann_id, ben_id)] == [1, 0]
    ann = await Client.login(url, ann_name, "ann-password")
    ben = await Client.login(url, ben_name, "ben-password")
    # Three WebSocket connections over the shared port (either gateway may take each).
    ann_s, ben_s, watch = await ann.session(), await ben.session(), await admin.session()

    await boss.deposit(ann_id, "100", description="for ann")
    await boss.deposit(ben_id, "200", description="for ben")
    await boss.set_control(ann_id, "win")
    await boss.set_control(ben_id, "lose")
    trade = await ann.open_option("BTCUSDT", "up", "10", 30)  # 0.3 s at --time-scale 0.01

    await ann_s.wait_for("trade_update", lambda m: m["trade"]["status"] == "won", timeout_s=20)
    await ann_s.wait_for("balance_update", lambda m: m["version"] == 3, timeout_s=20)
    await ben_s.wait_for("trading_control_update", timeout_s=20)
    await until(lambda: len([m for m in routed(watch) if m["type"] != "user_balance_init"]) >= 8,
                "the admin received 4 monitors, 2 trade updates and 2 control updates")
    for session in (ann_s, ben_s, watch):
        await session.barrier()
    await asyncio.sleep(0.5)  # anything more, which the table does not route here, would arrive now

    kinds = lambda session: [(m["type"], owner(m)) for m in routed(session)[1:]]  # noqa: E731
    assert sorted(kinds(ann_s)) == sorted([("balance_update", ann_id)] * 3 + [("trade_update", ann_id)] * 2
                                          + [("trading_control_update", ann_id)])
    assert kinds(ben_s) == [("balance_update", ben_id), ("trading_control_update", ben_id)]
    assert sorted(kinds(watch)) == sorted(
        [("admin_balance_monitor", ann_id)] * 3 + [("admin_balance_monitor", ben_id)]
        + [("trade_update", ann_id)] * 2 + [("trading_control_update", ann_id), ("trading_control_update", ben_id)])

    # Own versions gap-free, in order; the admin sees each account's in order too, with its name.
    updates = lambda session, kind, user: [m for m in routed(session) if m["type"] == kind and owner(m) == user]  # noqa: E731
    assert [m["version"] for m in updates(ann_s, "balance_update", ann_id)] == [1, 2, 3]
    assert [m["change_type"] for m in updates(ann_s, "balance_update", ann_id)] == [
        "deposit", "option_stake", "option_payout"]
    assert [m["version"] for m in updates(ben_s, "balance_update", ben_id)] == [1]
    for user, name, own in ((ann_id, ann_name, ann_s), (ben_id, ben_name, ben_s)):
        monitors = updates(watch, "admin_balance_monitor", user)
        assert [m["username"] for m in monitors] == [name] * len(monitors)
        assert [{k: v for k, v in m.items() if k not in ("type", "username")} for m in monitors] == [
            {k: v for k, v in m.items() if k != "type"} for m in updates(own, "balance_update", user)]
    assert [m["trade"]["status"] for m in updates(watch, "trade_update", ann_id)] == ["open", "won"]
    assert {m["trade"]["trade_id"] for m in updates(watch, "trade_update", ann_id)} == {trade["trade_id"]}
    assert [(m["mode"], m["set_by"]) for m in updates(ann_s, "trading_control_update", ann_id)] == [("win", boss.user_id)]
    assert (ann_s.balances["USDT"], ben_s.balances["USDT"]) == ((await ann.balance())["balances"]["USDT"], "200")
    assert ann_s.problems == ben_s.problems == watch.problems == []
    assert ann_s.reconnects == ben_s.reconnects == watch.reconnects == 0
    for session in (ann_s, ben_s, watch):
        await session.close()
