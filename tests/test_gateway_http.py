"""Every route and role, bad input, idempotency, over real HTTP."""

from __future__ import annotations

from tornado.testing import gen_test

from tests.gateway_harness import GatewayCase


class RoutesAndRoles(GatewayCase):
    async def people(self):
        self.boss = await self.account("boss", "superadmin")
        self.admin = await self.account("admin", "admin")
        self.alice = await self.account("alice", usdt="100")
        self.bob = await self.account("bob", usdt="100")

    @gen_test
    async def test_login_gives_a_token_and_a_wrong_password_is_401(self):
        await self.people()
        assert set(self.alice) >= {"token", "user_id", "role"} and self.alice["role"] == "user"
        assert len(self.alice["token"]) >= 32
        status, body = await self.call("POST", "/api/login", {"username": "alice", "password": "nope"})
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        assert "nope" not in str(body)

    @gen_test
    async def test_every_route_answers_each_role_as_protocol_md_says(self):
        await self.people()
        a = self.alice["user_id"]
        table = [
            ("GET", "/api/users", None, {"user": 403, "admin": 200, "superadmin": 200}),
            ("GET", "/api/balance", None, {"user": 200, "admin": 200, "superadmin": 200}),
            ("GET", f"/api/users/{a}/balance", None, {"user": 403, "admin": 200, "superadmin": 200}),
            ("GET", "/api/transactions", None, {"user": 200, "admin": 200, "superadmin": 200}),
            ("GET", f"/api/users/{a}/transactions", None, {"user": 403, "admin": 200, "superadmin": 200}),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "1"}, {"user": 403, "admin": 403, "superadmin": 201}),
            ("POST", "/api/admin/withdrawals", {"user_id": a, "amount": "1"}, {"user": 403, "admin": 403, "superadmin": 201}),
            ("POST", "/api/admin/adjustments", {"user_id": a, "amount": "-1", "description": "fix"}, {"user": 403, "admin": 403, "superadmin": 201}),
            ("PUT", f"/api/admin/controls/{a}", {"mode": "normal"}, {"user": 403, "admin": 403, "superadmin": 200}),
            ("GET", "/api/options", None, {"user": 200, "admin": 200, "superadmin": 200}),
            ("GET", "/api/market", None, {"user": 200, "admin": 200, "superadmin": 200}),
            ("GET", "/api/admin/trades", None, {"user": 403, "admin": 200, "superadmin": 200}),
        ]
        tokens = {"user": self.alice["token"], "admin": self.admin["token"], "superadmin": self.boss["token"]}
        for method, path, body, expected in table:
            for role, status in expected.items():
                got, answer = await self.call(method, path, body, tokens[role])
                assert got == status, (method, path, role, answer)
                if status == 403:
                    assert answer["error"]["code"] == "forbidden"
            got, answer = await self.call(method, path, body)
            assert (got, answer["error"]["code"]) == (401, "unauthorized"), (method, path)
        assert (await self.call("GET", "/healthz"))[1] == {"status": "ok"}

    @gen_test
    async def test_reads_have_protocol_shapes(self):
        await self.people()
        status, balance = await self.call("GET", "/api/balance", token=self.alice["token"])
        assert balance == {"user_id": self.alice["user_id"], "balances": {"USDT": "100", "BTC": "0", "ETH": "0"},
                           "version": 1, "control_mode": "normal"}
        _, users = await self.call("GET", "/api/users", token=self.admin["token"])
        assert {u["username"] for u in users["users"]} == {"boss", "admin", "alice", "bob"}
        assert set(users["users"][0]) == {"user_id", "username", "role", "balances", "version", "control_mode"}
        _, market = await self.call("GET", "/api/market", token=self.bob["token"])
        assert set(market["prices"]) == {"BTCUSDT", "ETHUSDT"} and market["ts"].endswith("Z")
        _, txs = await self.call("GET", "/api/transactions?after_version=0&limit=1", token=self.alice["token"])
        assert [t["version"] for t in txs["transactions"]] == [1]

    @gen_test
    async def test_trading_and_admin_operations_through_http(self):
        await self.people()
        status, trade = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "10", "duration": 60}, self.alice["token"])
        assert status == 201 and trade["trade"]["status"] == "open" and trade["trade"]["payout_rate"] == "0.15"
        trade_id = trade["trade"]["trade_id"]
        status, forced = await self.call("POST", f"/api/admin/trades/{trade_id}/force", {"outcome": "win"}, self.admin["token"])
        assert status == 200 and forced["trade"]["forced_outcome"] == "win"
        self.engine.advance(60)
        status, settled = await self.call("GET", "/api/options?status=settled", token=self.alice["token"])
        assert settled["trades"][0]["decided_by"] == f"admin_force:{self.admin['user_id']}"
        status, again = await self.call("POST", f"/api/admin/trades/{trade_id}/force", {"outcome": "lose"}, self.admin["token"])
        assert (status, again["error"]["code"]) == (409, "conflict")
        status, order = await self.call("POST", "/api/spot/orders", {"symbol": "ETHUSDT", "side": "buy", "quantity": "0.01"}, self.alice["token"])
        assert status == 201 and len(order["order"]["transactions"]) == 2
        status, control = await self.call("PUT", f"/api/admin/controls/{self.bob['user_id']}", {"mode": "lose"}, self.boss["token"])
        assert (status, control) == (200, {"user_id": self.bob["user_id"], "mode": "lose"})

    @gen_test
    async def test_admin_trades_lists_every_account_newest_first_for_admins_only(self):
        await self.people()
        opened = []
        for who, duration in ((self.alice, 30), (self.bob, 60), (self.alice, 60)):
            self.engine.advance(1)  # distinct opening times: "newest first" is then one order
            _, body = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "1",
                                                               "duration": duration}, who["token"])
            opened.append(body["trade"]["trade_id"])
        self.engine.advance(30)  # the first of alice's settles
        for token in (self.admin["token"], self.boss["token"]):
            status, every = await self.call("GET", "/api/admin/trades", token=token)
            assert status == 200 and [t["trade_id"] for t in every["trades"]] == opened[::-1]
        _, open_ = await self.call("GET", "/api/admin/trades?status=open", token=self.admin["token"])
        assert [t["trade_id"] for t in open_["trades"]] == [opened[2], opened[1]]
        _, settled = await self.call("GET", "/api/admin/trades?status=settled", token=self.admin["token"])
        assert [t["trade_id"] for t in settled["trades"]] == [opened[0]]
        assert settled["trades"][0]["status"] in ("won", "lost", "draw") and settled["trades"][0]["decided_by"] == "market"
        _, alices = await self.call("GET", f"/api/admin/trades?user_id={self.alice['user_id']}&limit=1", token=self.admin["token"])
        assert [t["trade_id"] for t in alices["trades"]] == [opened[2]]
        assert set(alices["trades"][0]) >= {"trade_id", "user_id", "symbol", "direction", "amount", "duration", "payout_rate",
                                            "entry_price", "exit_price", "status", "decided_by", "opened_at", "expires_at",
                                            "settled_at", "payout"}
        _, bobs = await self.call("GET", f"/api/admin/trades?status=open&user_id={self.bob['user_id']}&limit=", token=self.admin["token"])
        assert [t["trade_id"] for t in bobs["trades"]] == [opened[1]]
        _, none = await self.call("GET", f"/api/admin/trades?user_id={self.boss['user_id']}", token=self.admin["token"])
        assert none == {"trades": []}

    @gen_test
    async def test_admin_trades_refuses_users_bad_parameters_and_unknown_accounts(self):
        await self.people()
        admin = self.admin["token"]
        cases = [
            ("/api/admin/trades", self.alice["token"], 403, "forbidden"),
            ("/api/admin/trades", None, 401, "unauthorized"),
            ("/api/admin/trades?status=maybe", admin, 400, "invalid_request"),
            ("/api/admin/trades?limit=0", admin, 400, "invalid_request"),
            ("/api/admin/trades?limit=1001", admin, 400, "invalid_request"),
            ("/api/admin/trades?limit=ten", admin, 400, "invalid_request"),
            ("/api/admin/trades?user_id=-1", admin, 400, "invalid_request"),
            ("/api/admin/trades?user_id=999", admin, 404, "unknown_user"),
        ]
        for path, token, status, code in cases:
            got, answer = await self.call("GET", path, token=token)
            assert (got, answer["error"]["code"]) == (status, code), (path, answer)
            assert answer["error"]["message"]
        assert (await self.call("GET", "/api/admin/trades?limit=1000", token=admin))[0] == 200

    @gen_test
    async def test_admins_create_users_but_only_a_superadmin_creates_admins(self):
        await self.people()
        status, made = await self.call("POST", "/api/users", {"username": "carol", "password": "pw"}, self.admin["token"])
        assert (status, made["role"], made["username"]) == (201, "user", "carol")
        status, refused = await self.call("POST", "/api/users", {"username": "eve", "password": "pw", "role": "admin"}, self.admin["token"])
        assert (status, refused["error"]["code"]) == (403, "forbidden")
        status, _ = await self.call("POST", "/api/users", {"username": "eve", "password": "pw", "role": "admin"}, self.boss["token"])
        assert status == 201
        status, taken = await self.call("POST", "/api/users", {"username": "carol", "password": "x"}, self.boss["token"])
        assert (status, taken["error"]["code"]) == (409, "conflict")
        assert (await self.call("POST", "/api/users", {"username": "dan", "password": "x"}, self.alice["token"]))[0] == 403


class BadInput(GatewayCase):
    app_options = {"login_limit": 3, "max_body_bytes": 1024}

    async def assert_unchanged(self, check):
        before = self.engine.balance(self.alice["user_id"])
        ws = await self.session(self.alice)
        status, body = await check()
        assert await self.until_pong(ws) == []
        assert self.engine.balance(self.alice["user_id"]) == before
        return status, body

    @gen_test
    async def test_every_bad_input_is_a_4xx_with_its_code_and_changes_nothing(self):
        self.boss = await self.account("boss", "superadmin")
        self.alice = await self.account("alice", usdt="100")
        boss, alice, a = self.boss["token"], self.alice["token"], self.alice["user_id"]
        cases = [
            ("POST", "/api/admin/deposits", None, b"{not json", boss, 400, "invalid_json"),
            ("POST", "/api/admin/deposits", None, b'{"user_id": %d, "amount": "1", "description": "\\ud800"}' % a,
             boss, 400, "invalid_json"),
            ("POST", "/api/login", None, b'{"username": "alice", "password": "\\uDC00"}', None, 400, "invalid_json"),
            ("POST", "/api/admin/deposits", None, b"", boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", [1, 2], None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", {"amount": "1"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", {"user_id": "1", "amount": "1"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", {"user_id": True, "amount": "1"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": 1}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "1e3"}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "-1"}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "0"}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "0.000000001"}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "1000000001"}, None, boss, 400, "invalid_amount"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "1", "asset": "DOGE"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/deposits", {"user_id": 999, "amount": "1"}, None, boss, 404, "unknown_user"),
            ("POST", "/api/admin/deposits", {"user_id": 10**30, "amount": "1"}, None, boss, 404, "unknown_user"),
            ("POST", "/api/admin/withdrawals", {"user_id": a, "amount": "101"}, None, boss, 409, "insufficient_funds"),
            ("POST", "/api/admin/adjustments", {"user_id": a, "amount": "-1"}, None, boss, 400, "invalid_request"),
            ("PUT", f"/api/admin/controls/{a}", {"mode": "always"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/admin/trades/T1-1/force", {"outcome": "win"}, None, boss, 404, "unknown_trade"),
            ("POST", "/api/admin/trades/T1-1/force", {"outcome": "draw"}, None, boss, 400, "invalid_request"),
            ("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "1", "duration": "30"}, None, alice, 400, "invalid_request"),
            ("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "1", "duration": 45}, None, alice, 400, "invalid_request"),
            ("POST", "/api/options", {"symbol": "XRPUSDT", "direction": "up", "amount": "1", "duration": 30}, None, alice, 400, "invalid_request"),
            ("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "1000", "duration": 30}, None, alice, 409, "insufficient_funds"),
            ("POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "sell", "quantity": "1"}, None, alice, 409, "insufficient_funds"),
            ("POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "buy", "quantity": 0.5}, None, alice, 400, "invalid_amount"),
            ("GET", "/api/transactions?limit=1001", None, None, alice, 400, "invalid_request"),
            ("GET", "/api/transactions?after_version=-1", None, None, alice, 400, "invalid_request"),
            ("GET", "/api/options?status=maybe", None, None, alice, 400, "invalid_request"),
            ("GET", "/api/users/999/balance", None, None, boss, 404, "unknown_user"),
            ("GET", "/api/users/999999999999999999999/balance", None, None, boss, 404, "unknown_user"),
            ("GET", "/api/nowhere", None, None, alice, 404, "not_found"),
            ("GET", "/api/balance", None, None, "not-a-token", 401, "unauthorized"),
            ("POST", "/api/admin/deposits", {"user_id": a, "amount": "1", "description": "x" * 2000}, None, boss, 413, "payload_too_large"),
        ]
        for method, path, body, raw, token, status, code in cases:
            got, answer = await self.assert_unchanged(lambda: self.call(method, path, body, token, raw=raw))
            assert (got, answer["error"]["code"]) == (status, code), (path, body, raw, answer)
            assert answer["error"]["message"]

    @gen_test
    async def test_an_escaped_surrogate_pair_is_text_and_is_stored_as_such(self):
        boss = (await self.account("boss", "superadmin"))["token"]
        alice = await self.account("alice")
        raw = b'{"user_id": %d, "amount": "1", "description": "\\ud83d\\ude00"}' % alice["user_id"]
        status, body = await self.call("POST", "/api/admin/deposits", None, boss, raw=raw)
        assert (status, body["transaction"]["description"]) == (201, "\U0001F600")

    @gen_test
    async def test_a_lone_surrogate_escape_is_refused_as_not_unicode(self):
        boss = (await self.account("boss", "superadmin"))["token"]
        self.alice = await self.account("alice")
        raw = b'{"user_id": %d, "amount": "1", "description": "\\udc00"}' % self.alice["user_id"]
        status, body = await self.assert_unchanged(lambda: self.call("POST", "/api/admin/deposits", None, boss, raw=raw))
        assert (status, body["error"]["code"]) == (400, "invalid_json")
        assert "surrogate" in body["error"]["message"]

    @gen_test
    async def test_login_failures_beyond_the_limit_are_429(self):
        await self.account("alice")
        for _ in range(3):
            assert (await self.call("POST", "/api/login", {"username": "alice", "password": "bad"}))[0] == 401
        status, body = await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"})
        assert (status, body["error"]["code"]) == (429, "rate_limited")

    @gen_test
    async def test_the_same_idempotency_key_returns_the_first_response_and_mutates_once(self):
        self.boss = await self.account("boss", "superadmin")
        self.alice = await self.account("alice")
        request = ("POST", "/api/admin/deposits", {"user_id": self.alice["user_id"], "amount": "7"}, self.boss["token"])
        first = await self.call(*request, headers={"Idempotency-Key": "abc"})
        second = await self.call(*request, headers={"Idempotency-Key": "abc"})
        assert first == second and first[0] == 201
        assert self.engine.balance(self.alice["user_id"])["version"] == 1
        reused = await self.call("POST", "/api/admin/deposits", {"user_id": self.alice["user_id"], "amount": "8"},
                                 self.boss["token"], headers={"Idempotency-Key": "abc"})
        assert (reused[0], reused[1]["error"]["code"]) == (409, "conflict")
        made = [await self.call("POST", "/api/users", {"username": "zed", "password": "p"}, self.boss["token"],
                                headers={"Idempotency-Key": "u1"}) for _ in range(2)]
        assert made[0] == made[1] and made[0][0] == 201

    @gen_test
    async def test_metrics_are_prometheus_text(self):
        await self.account("alice")
        response = await self.http_client.fetch(self.get_url("/metrics"))
        text = response.body.decode()
        for name in ("balancesim_sessions", "balancesim_messages_sent", "balancesim_sessions_closed_slow",
                     "balancesim_mutations", "balancesim_http_request_seconds"):
            assert name in text
