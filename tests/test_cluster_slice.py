"""The same protocol over a cluster: two shards, one gateway, Redis between them."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time

import pykka
import pytest
import redis.asyncio
from tornado.testing import gen_test

from balancesim import errors
from balancesim.actors import as_asyncio
from balancesim.cluster import shard_of_user_id, shard_of_username
from balancesim.gateway import make_app
from balancesim.money import format_amount
from balancesim.cluster._remote import wire_gateway
from balancesim.cluster._rpc import FIELD, Call, commands_stream, pack, replies_stream
from tests.cluster_harness import SECRET, LocalCluster
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
        wire_gateway(self.remote, tokens, self.ctx.hub)
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


class Deadlines(ClusterCase):
    """A slow shard, a lost answer, a call delivered twice: the outcome is never a guess.

    The superadmin lives on the other shard than alice, so only alice's is slow.
    """

    def get_app(self):
        app = super().get_app()
        self.remote.timeout_s = 1.0
        return app

    async def account(self, username: str, role: str = "user", usdt: str | None = None):
        if username == "boss":
            alice_shard = shard_of_username(self.cluster.placement, "alice")
            username = next(f"boss{n}" for n in range(100)
                            if shard_of_username(self.cluster.placement, f"boss{n}") != alice_shard)
        return await super().account(username, role, usdt)

    def stall(self, username: str, seconds: float) -> None:
        """Block the shard of ``username`` as SIGSTOP would: its loop reads nothing meanwhile."""
        shard = self.cluster.shards[shard_of_username(self.cluster.placement, username)]
        assert shard.stall(seconds).wait(timeout=10)

    @gen_test(timeout=30)
    async def test_a_stalled_shard_gives_504_with_the_key_and_the_late_call_never_applies(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        self.stall("alice", 3.5)
        request = ("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"}, boss["token"])
        status, body = await self.call(*request, headers={"Idempotency-Key": "late-1"})
        assert (status, body["error"]["code"], body["idempotency_key"]) == (504, "timeout", "late-1")
        await asyncio.sleep(3.5)  # the shard wakes and reads the call, past its deadline
        status, balance = await self.call("GET", "/api/balance", token=alice["token"])
        assert (balance["balances"]["USDT"], balance["version"]) == ("10", 1)
        status, again = await self.call(*request, headers={"Idempotency-Key": "late-1"})
        assert (status, again["error"]["code"]) == (503, "unavailable") and "expired" in again["error"]["message"]
        status, fresh = await self.call(*request, headers={"Idempotency-Key": "late-2"})
        assert status == 201 and fresh["transaction"]["balance_after"] == "15"

    @gen_test(timeout=30)
    async def test_a_call_pending_when_the_gateway_stops_is_504_with_its_key_not_503(self):
        # It was handed over: its outcome is open, and only a 504 says so (a 503 would claim
        # that nothing changed).
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        self.stall("alice", 2.0)
        reply = self.remote.deposit(alice["user_id"], "5", initiated_by=boss["user_id"], idempotency_key="stopping-1")
        await asyncio.sleep(0.2)
        await self.remote.aclose()
        with pytest.raises(errors.Timeout) as raised:
            await as_asyncio(reply)
        assert raised.value.idempotency_key == "stopping-1"

    @gen_test(timeout=30)
    async def test_without_a_key_the_504_names_the_key_the_gateway_assigned(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        self.stall("alice", 3.5)
        status, body = await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"},
                                       boss["token"])
        assert status == 504 and body["idempotency_key"].startswith("gw-")

    @gen_test(timeout=30)
    async def test_a_call_that_applied_but_whose_answer_was_lost_gets_its_real_outcome(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        service = self.cluster.shards[shard_of_username(self.cluster.placement, "alice")].service
        send = service._send_answer
        lost = []

        def lose_the_first(call, answer):
            if call.op == "deposit" and not lost:
                lost.append(call.cid)
                return  # committed, and the answer never sent
            send(call, answer)

        service._send_answer = lose_the_first
        status, body = await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"},
                                       boss["token"], headers={"Idempotency-Key": "lost-answer"})
        assert lost and status == 201 and body["transaction"]["balance_after"] == "15"
        status, history = await self.call("GET", "/api/transactions", token=alice["token"])
        assert [t["amount"] for t in history["transactions"]] == ["10", "5"]

    @gen_test(timeout=30)
    async def test_a_call_delivered_twice_applies_once(self):
        boss = await self.account("boss", "superadmin")
        alice = await self.account("alice", usdt="10")
        shard = shard_of_username(self.cluster.placement, "alice")
        args = {"user_id": alice["user_id"], "amount": "5", "asset": "USDT", "description": "",
                "initiated_by": boss["user_id"], "idempotency_key": "twice"}
        client = redis.asyncio.Redis.from_url(self.cluster.redis.url)
        for n in range(2):  # the same call twice, as a redelivery after a crash between COMMIT and XACK
            call = Call(f"test-{n}", "deposit", args, replies_stream("test"), None)
            await client.xadd(commands_stream(shard), {FIELD: pack(SECRET, call)})
        await client.aclose()
        for _ in range(100):
            status, history = await self.call("GET", "/api/transactions", token=alice["token"])
            if len(history["transactions"]) > 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        status, history = await self.call("GET", "/api/transactions", token=alice["token"])
        assert [t["amount"] for t in history["transactions"]] == ["10", "5"]

    @gen_test(timeout=30)
    async def test_a_forged_call_is_refused(self):
        alice = await self.account("alice", usdt="10")
        shard = shard_of_username(self.cluster.placement, "alice")
        service = self.cluster.shards[shard].service
        call = Call("evil", "deposit", {"user_id": alice["user_id"], "amount": "1000", "idempotency_key": "x"},
                    replies_stream("evil"), None)
        client = redis.asyncio.Redis.from_url(self.cluster.redis.url)
        await client.xadd(commands_stream(shard), {FIELD: pack(b"not the cluster's secret, but 32+ bytes", call)})
        await client.aclose()
        for _ in range(100):
            if service.forged:
                break
            await asyncio.sleep(0.05)
        assert service.forged == 1
        status, balance = await self.call("GET", "/api/balance", token=alice["token"])
        assert balance["balances"]["USDT"] == "10"



class _TwoGatewaysCase(ClusterCase):
    """A second gateway on the same cluster, on a port of its own."""

    async def second_gateway(self) -> str:
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        remote, tokens = await self.cluster.gateway()
        app = make_app(remote, tokens=tokens)
        wire_gateway(remote, tokens, app.settings["ctx"].hub)
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets(sockets)
        self.others = getattr(self, "others", []) + [(server, app, remote)]
        return f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    def tearDown(self):
        for server, app, remote in getattr(self, "others", []):
            server.stop()
            app.close()
            self.io_loop.run_sync(remote.aclose)
        super().tearDown()

    async def call_at(self, base: str, method: str, path: str, token: str | None = None):
        from tornado.httpclient import AsyncHTTPClient

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await AsyncHTTPClient().fetch(base + path, method=method, headers=headers, raise_error=False,
                                                 body=b"" if method == "POST" else None)
        return response.code


class TwoGateways(_TwoGatewaysCase):
    """What one gateway learns, the other knows: logouts, and lost events."""

    @gen_test(timeout=30)
    async def test_a_login_from_one_gateway_works_on_the_other_and_a_logout_is_refused_by_both(self):
        other = await self.second_gateway()
        alice = await self.account("alice", usdt="1")
        assert await self.call_at(other, "GET", "/api/balance", alice["token"]) == 200  # cached there now
        assert (await self.call("POST", "/api/logout", token=alice["token"]))[0] == 204
        for _ in range(100):  # the revocation crosses Redis: bounded far above normal
            if await self.call_at(other, "GET", "/api/balance", alice["token"]) == 401:
                break
            await asyncio.sleep(0.05)
        assert await self.call_at(other, "GET", "/api/balance", alice["token"]) == 401
        assert (await self.call("GET", "/api/balance", token=alice["token"]))[0] == 401

    @gen_test(timeout=30)
    async def test_a_lost_event_batch_closes_the_sessions_that_may_have_missed_it_with_1012(self):
        alice_name, bob_name = usernames_on_both_shards(self.cluster, 1)
        alice, bob = await self.account(alice_name), await self.account(bob_name)
        admin = await self.account("watcher", "admin")
        alice_ws, bob_ws, admin_ws = await self.session(alice), await self.session(bob), await self.session(admin)
        shard = shard_of_username(self.cluster.placement, alice_name)
        service = self.cluster.shards[shard].service
        # A batch Redis lost: the next one the gateways see skips a number.
        service._loop.call_soon_threadsafe(lambda: setattr(service, "seq", service.seq + 1))
        await asyncio.sleep(0.2)
        self.cluster.engine_of(alice_name).deposit(alice["user_id"], "1").get(timeout=WAIT_S)
        for ws in (alice_ws, admin_ws):
            while await self.wait(ws.read_message()) is not None:
                pass
            assert ws.close_code == 1012
        # A revocation may have been in what was lost: the shard's tokens are asked again.
        cached = {p.user_id for p in self.ctx.tokens._cache.values()}
        assert alice["user_id"] not in cached and bob["user_id"] in cached
        assert [m["type"] for m in await self.until_pong(bob_ws)] == []  # the other shard's owner: untouched


class OneFeed(ClusterCase):
    """One price feed per cluster, in shard 0; the other shard follows its ticks."""

    def follower_user(self) -> str:
        return next(f"f{n}" for n in range(200) if shard_of_username(self.cluster.placement, f"f{n}") == 1)

    @gen_test(timeout=30)
    async def test_a_trade_on_the_follower_settles_at_a_price_shard_0_published_at_or_after_its_expiry(self):
        ticks, opened_events = [], []
        self.remote.subscribe(lambda events: ticks.extend(e for e in events if type(e).__name__ == "PriceTicked"))
        self.remote.subscribe(lambda events: opened_events.extend(
            e for e in events if type(e).__name__ == "OptionOpened"))
        name = self.follower_user()
        user = await self.account(name, usdt="100")
        status, opened = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up",
                                                                 "amount": "5", "duration": 30}, user["token"])
        assert status == 201, opened
        trade_id = opened["trade"]["trade_id"]
        for _ in range(200):  # 30 s at --time-scale 0.01 is 0.3 s; bounded far above that
            status, trades = await self.call("GET", "/api/options?status=settled", token=user["token"])
            if trades["trades"]:
                break
            await asyncio.sleep(0.05)
        settled = trades["trades"][0]
        assert settled["trade_id"] == trade_id
        expires = next(e.trade.expires_at for e in opened_events if e.trade.trade_id == trade_id)  # exact
        published = [format_amount(t.prices["BTCUSDT"]) for t in ticks if t.ts >= expires]
        assert settled["exit_price"] == published[0]
        assert settled["entry_price"] in {format_amount(t.prices["BTCUSDT"]) for t in ticks} | {
            format_amount(p) for p in [self.cluster.shards[1].engine.board.prices["BTCUSDT"]]}

    @gen_test(timeout=30)
    async def test_a_feed_late_by_less_than_a_second_is_not_stale_at_a_small_time_scale(self):
        # At --time-scale 0.01, 5 simulated seconds are 50 ms: a busy machine delays a tick
        # that long through Redis. Staleness has a floor in real time, so such a lag is not
        # an outage (it made options on shard 1 fail now and then under a browser test).
        user = await self.account(self.follower_user(), usdt="100")
        self.cluster.shards[0].loop.call_soon_threadsafe(time.sleep, 0.6)  # 12 × the scaled threshold
        await asyncio.sleep(0.4)
        status, body = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up",
                                                               "amount": "5", "duration": 30}, user["token"])
        assert status == 201, body

    @gen_test(timeout=30)
    async def test_while_the_feed_is_stale_the_follower_refuses_new_options_and_spot_orders(self):
        name = self.follower_user()
        user = await self.account(name, usdt="100")
        # Shard 0 publishes nothing for 3 s: past the 1 s (real time) a feed may lag at any scale.
        assert self.cluster.shards[0].stall(3.0).wait(timeout=10)
        await asyncio.sleep(1.5)
        status, body = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up",
                                                               "amount": "5", "duration": 30}, user["token"])
        assert (status, body["error"]["code"]) == (503, "unavailable") and "stale" in body["error"]["message"]
        status, body = await self.call("POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "buy",
                                                                   "quantity": "0.0001"}, user["token"])
        assert (status, body["error"]["code"]) == (503, "unavailable")
        await asyncio.sleep(2.5)
        status, body = await self.call("POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "buy",
                                                                   "quantity": "0.0001"}, user["token"])
        assert status == 201, body

    @gen_test(timeout=30)
    async def test_due_trades_wait_while_shard_0_is_down_and_settle_at_its_first_tick_after(self):
        # What happens to due trades while shard 0 is down: the follower holds each expiry
        # until it sees a tick at or after it, then settles it at that tick's price.
        ticks, opened_events = [], []
        self.remote.subscribe(lambda events: ticks.extend(e for e in events if type(e).__name__ == "PriceTicked"))
        self.remote.subscribe(lambda events: opened_events.extend(
            e for e in events if type(e).__name__ == "OptionOpened"))
        user = await self.account(self.follower_user(), usdt="100")
        began = self.cluster.shards[0].stall(2.5)  # down from now, well past the 0.3 s expiry
        assert began.wait(timeout=10)
        status, opened = await self.call("POST", "/api/options", {"symbol": "ETHUSDT", "direction": "down",
                                                                 "amount": "5", "duration": 30}, user["token"])
        assert status == 201, opened
        await asyncio.sleep(1.0)
        status, still = await self.call("GET", "/api/options?status=open", token=user["token"])
        assert [t["trade_id"] for t in still["trades"]] == [opened["trade"]["trade_id"]]
        for _ in range(200):
            status, done = await self.call("GET", "/api/options?status=settled", token=user["token"])
            if done["trades"]:
                break
            await asyncio.sleep(0.05)
        settled = done["trades"][0]
        expires = next(e.trade.expires_at for e in opened_events if e.trade.trade_id == settled["trade_id"])
        assert settled["exit_price"] == next(format_amount(t.prices["ETHUSDT"]) for t in ticks if t.ts >= expires)


class Seam(_TwoGatewaysCase):
    """Sessions move to another gateway with since while deposits keep coming."""

    @gen_test(timeout=60)
    async def test_sessions_resume_on_another_gateway_without_gap_or_duplicate(self):
        from balancesim.client import Client, configure_http

        configure_http(32)
        other = await self.second_gateway()
        here = self.get_url("")
        boss = await self.account("boss", "superadmin")
        names = usernames_on_both_shards(self.cluster, 2)
        users = [await self.account(name) for name in names]
        clients = [Client(here, u["token"], u["user_id"], "user") for u in users]
        sessions = [await c.session() for c in clients]
        admin = Client(here, boss["token"], boss["user_id"], "superadmin")
        stop = asyncio.Event()

        async def deposits() -> int:
            count = 0
            while not stop.is_set():
                await asyncio.gather(*(admin.deposit(u["user_id"], "1") for u in users))
                count += 1
            return count

        pump = asyncio.ensure_future(deposits())
        await asyncio.sleep(0.5)
        moved = []
        for client, session in zip(clients, sessions):
            since = session.version
            await session.close()
            client.base_url = other
            moved.append((session, await client.session(since=since)))
        await asyncio.sleep(0.5)
        stop.set()
        rounds = await pump
        for (before, after), user in zip(moved, users):
            await after.barrier(timeout_s=10)
            for _ in range(100):
                if after.version == rounds:
                    break
                await after.barrier(timeout_s=10)
            versions = [m["version"] for s in (before, after) for m in s.messages if m.get("type") == "balance_update"]
            seen = sorted(set(versions))
            assert seen == list(range(1, rounds + 1)), (user["username"], seen[:5], rounds)
            assert before.problems == [] and after.problems == []
            await after.close()


class ClusterMetrics(ClusterCase):
    @gen_test(timeout=30)
    async def test_metrics_show_calls_in_flight_timeouts_gaps_and_redis_reconnects(self):
        from tornado.httpclient import AsyncHTTPClient

        body = (await AsyncHTTPClient().fetch(self.get_url("/metrics"))).body.decode()
        for name in ("balancesim_cluster_calls_in_flight", "balancesim_cluster_timeouts",
                     "balancesim_cluster_event_gaps", "balancesim_cluster_redis_reconnects"):
            assert f"\n{name} " in body, name
