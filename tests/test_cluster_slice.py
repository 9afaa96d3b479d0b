"""The same protocol over a cluster: two shards, one gateway, Redis between them."""

from __future__ import annotations

import json
import tempfile

import pykka
from tornado.testing import gen_test

from balancesim.cluster import shard_of_user_id, shard_of_username
from balancesim.gateway import make_app
from tests.cluster_harness import LocalCluster
from tests.gateway_harness import GatewayCase, WAIT_S


def usernames_on_both_shards(cluster: LocalCluster, count: int = 2) -> list[str]:
    """``count`` names per shard, so a test's accounts surely live on different shards."""
    names: dict[int, list[str]] = {0: [], 1: []}
    n = 0
    while min(len(v) for v in names.values()) < count:
        name = f"user{n}"
        names[shard_of_username(cluster.placement, name)].append(name)
        n += 1
    return [name for group in zip(*(v[:count] for v in names.values())) for name in group]


class ClusterCase(GatewayCase):
    """``GatewayCase`` whose gateway talks to two shards over Redis."""

    def get_app(self):
        self.tmp = tempfile.mkdtemp()
        self.cluster = LocalCluster(self.tmp, shards=2).start()
        self.remote, tokens = self.io_loop.run_sync(self.cluster.gateway)
        self.engine = self.remote
        self.sockets = []
        self.app = make_app(self.remote, tokens=tokens)
        self.ctx = self.app.settings["ctx"]
        return self.app

    def tearDown(self):
        for ws in self.sockets:
            ws.close()
        self.app.close()
        self.io_loop.run_sync(self.remote.aclose)
        super(GatewayCase, self).tearDown()
        self.cluster.stop()
        pykka.ActorRegistry.stop_all()

    async def account(self, username: str, role: str = "user", usdt: str | None = None):
        engine = self.cluster.engine_of(username)
        user_id = engine.create_user(username, f"{username}-pw", role).get(timeout=WAIT_S)["user_id"]
        if usdt:
            engine.deposit(user_id, usdt).get(timeout=WAIT_S)
        return {**await self.login(username), "username": username}


class ClusterSlice(ClusterCase):
    @gen_test(timeout=30)
    async def test_accounts_live_on_their_shards_and_every_route_answers_as_embedded(self):
        alice_name, bob_name = usernames_on_both_shards(self.cluster, 1)
        boss = await self.account("boss", "superadmin")
        alice = await self.account(alice_name, usdt="100")
        bob = await self.account(bob_name, usdt="50")
        placement = self.cluster.placement
        assert {shard_of_user_id(placement, alice["user_id"]), shard_of_user_id(placement, bob["user_id"])} == {0, 1}
        status, body = await self.call("POST", "/api/admin/deposits",
                                       {"user_id": bob["user_id"], "amount": "2.5"}, boss["token"])
        assert status == 201 and body["transaction"]["balance_after"] == "52.5"
        assert body["transaction"]["version"] == 2
        status, balance = await self.call("GET", "/api/balance", token=bob["token"])
        assert balance == {"user_id": bob["user_id"], "balances": {"USDT": "52.5", "BTC": "0", "ETH": "0"},
                           "version": 2, "control_mode": "normal"}
        status, listed = await self.call("GET", "/api/users", token=boss["token"])
        assert status == 200 and {u["username"] for u in listed["users"]} == {"boss", alice_name, bob_name}
        status, made = await self.call("POST", "/api/users", {"username": "carol", "password": "pw"}, boss["token"])
        assert status == 201 and shard_of_user_id(placement, made["user_id"]) == shard_of_username(placement, "carol")
        status, trade = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up",
                                                                "amount": "5", "duration": 30}, alice["token"])
        assert status == 201 and trade["trade"]["trade_id"].startswith(f"T{alice['user_id']}-")
        status, order = await self.call("POST", "/api/spot/orders", {"symbol": "ETHUSDT", "side": "buy",
                                                                    "quantity": "0.001"}, bob["token"])
        assert status == 201 and len(order["order"]["transactions"]) == 2
        status, refused = await self.call("POST", "/api/admin/withdrawals",
                                          {"user_id": alice["user_id"], "amount": "1000"}, boss["token"])
        assert (status, refused["error"]["code"]) == (409, "insufficient_funds")
        status, trades = await self.call("GET", "/api/admin/trades", token=boss["token"])
        assert status == 200 and [t["trade_id"] for t in trades["trades"]] == [trade["trade"]["trade_id"]]

    @gen_test(timeout=30)
    async def test_sessions_on_one_gateway_see_exactly_what_the_table_says_across_shards(self):
        alice_name, bob_name = usernames_on_both_shards(self.cluster, 1)
        boss = await self.account("boss", "superadmin")
        alice, bob = await self.account(alice_name), await self.account(bob_name)
        admin = await self.account("watcher", "admin")
        sessions = {who: await self.session(user) for who, user in
                    (("alice", alice), ("bob", bob), ("admin", admin))}
        for user in (alice, bob):
            assert (await self.call("POST", "/api/admin/deposits", {"user_id": user["user_id"], "amount": "7"},
                                    boss["token"]))[0] == 201
        # Events cross Redis: wait for what each session must get, then a ping shows nothing else came.
        seen = {who: await self.messages(ws, 2 if who == "admin" else 1) for who, ws in sessions.items()}
        for who, ws in sessions.items():
            assert [m for m in await self.until_pong(ws) if m["type"] != "price_tick"] == [], who
        for who, user in (("alice", alice), ("bob", bob)):
            assert [(m["type"], m["user_id"], m["change"]) for m in seen[who]] == [
                ("balance_update", user["user_id"], "7")], who
        monitors = sorted((m["user_id"], m["username"]) for m in seen["admin"] if m["type"] == "admin_balance_monitor")
        assert monitors == sorted([(alice["user_id"], alice_name), (bob["user_id"], bob_name)])

    @gen_test(timeout=30)
    async def test_a_keyed_repeat_is_answered_by_the_shard_byte_for_byte(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice")
        request = ("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "3"}, boss["token"])
        first = await self.call(*request, headers={"Idempotency-Key": "k1"})
        second = await self.call(*request, headers={"Idempotency-Key": "k1"})
        assert first[0] == second[0] == 201 and json.dumps(first[1]) == json.dumps(second[1])
        status, history = await self.call("GET", "/api/transactions", token=alice["token"])
        assert [t["amount"] for t in history["transactions"]] == ["3"]

    async def messages(self, ws, count):
        """The next ``count`` messages other than price ticks."""
        out = []
        while len(out) < count:
            message = await self.receive(ws)
            if message["type"] != "price_tick":
                out.append(message)
        return out
