"""Logout, user management (PATCH /api/users/{id}), Retry-After and the trusted proxy, over real HTTP."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError
from tornado.testing import gen_test

from tests.gateway_harness import GatewayCase


class Logout(GatewayCase):
    @gen_test
    async def test_logout_revokes_the_token_at_once_and_closes_its_sessions_only(self):
        alice = await self.account("alice", usdt="10")
        other = await self.login("alice")  # a second login: another token, another tab
        doomed, kept = await self.session(alice), await self.session(other)
        status, body = await self.call("POST", "/api/logout", token=alice["token"])
        assert (status, body) == (204, None)
        assert (await self.call("GET", "/api/balance", token=alice["token"]))[0] == 401
        assert await self.wait(doomed.read_message()) is None and doomed.close_code == 4001
        assert (await self.call("GET", "/api/balance", token=other["token"]))[0] == 200
        assert await self.until_pong(kept) == []
        # The refusal is final, not a cache's memory: a fresh store reads the file.
        assert self.ctx.tokens.check_blocking(alice["token"]) is None
        assert (await self.call("POST", "/api/logout", token=alice["token"]))[0] == 401

    @gen_test
    async def test_a_revoked_token_cannot_open_a_session(self):
        alice = await self.account("alice")
        await self.call("POST", "/api/logout", token=alice["token"])
        with pytest.raises(HTTPClientError) as refused:  # PROTOCOL.md: the handshake is refused with 401
            await self.connect(alice["token"])
        assert refused.value.code == 401


class UserManagement(GatewayCase):
    async def people(self):
        self.boss = await self.account("boss", "superadmin")
        self.admin = await self.account("admin", "admin")
        self.alice = await self.account("alice", usdt="100")

    async def patch(self, user_id, body, token=None):
        return await self.call("PATCH", f"/api/users/{user_id}", body, token or self.boss["token"])

    @gen_test
    async def test_disabling_revokes_tokens_closes_sessions_refuses_login_and_keeps_the_money(self):
        await self.people()
        a = self.alice["user_id"]
        watcher = await self.session(self.admin)
        alice_ws = await self.session(self.alice)
        status, body = await self.patch(a, {"disabled": True})
        assert (status, body) == (200, {"user_id": a, "username": "alice", "role": "user", "disabled": True})
        assert (await self.call("GET", "/api/balance", token=self.alice["token"]))[0] == 401
        assert await self.wait(alice_ws.read_message()) is None and alice_ws.close_code == 4001
        status, body = await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"})
        assert (status, body["error"]["code"]) == (401, "unauthorized") and "disabled" in body["error"]["message"]
        pushed = [m for m in await self.until_pong(watcher) if m["type"] == "user_update"]
        assert len(pushed) == 1
        update = pushed[0]
        assert {k: update[k] for k in ("user_id", "username", "role", "disabled", "set_by")} == {
            "user_id": a, "username": "alice", "role": "user", "disabled": True, "set_by": self.boss["user_id"]}
        assert update["ts"].endswith("Z")
        status, balance = await self.call("GET", f"/api/users/{a}/balance", token=self.boss["token"])
        assert balance["balances"]["USDT"] == "100" and balance["version"] == 1
        assert (await self.patch(a, {"disabled": False}))[1]["disabled"] is False
        assert (await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"}))[0] == 200
        with self.engine.ledger.reading() as db:
            changes = db.execute("SELECT user_id, disabled, set_by, ts FROM user_changes ORDER BY id").fetchall()
        assert [(c[0], c[1], c[2]) for c in changes] == [(a, 1, self.boss["user_id"]), (a, 0, self.boss["user_id"])]
        assert all(c[3] for c in changes)

    @gen_test
    async def test_users_keep_their_contracted_shape_and_include_disabled_adds_the_flag(self):
        await self.people()
        await self.patch(self.alice["user_id"], {"disabled": True})
        plain = (await self.call("GET", "/api/users", token=self.admin["token"]))[1]["users"]
        assert all("disabled" not in user for user in plain)
        status, body = await self.call("GET", "/api/users?include=disabled", token=self.admin["token"])
        flags = {user["username"]: user["disabled"] for user in body["users"]}
        assert status == 200 and flags == {"boss": False, "admin": False, "alice": True}
        status, body = await self.call("GET", "/api/users?include=passwords", token=self.admin["token"])
        assert (status, body["error"]["code"]) == (400, "invalid_request")

    @gen_test
    async def test_a_demoted_admin_loses_admin_rights_at_once(self):
        await self.people()
        assert (await self.call("GET", "/api/users", token=self.admin["token"]))[0] == 200
        status, body = await self.patch(self.admin["user_id"], {"role": "user"})
        assert (status, body["role"], body["disabled"]) == (200, "user", False)
        assert (await self.call("GET", "/api/users", token=self.admin["token"]))[0] == 401
        again = await self.login("admin")
        assert again["role"] == "user"
        assert (await self.call("GET", "/api/users", token=again["token"]))[0] == 403
        promoted = await self.patch(self.alice["user_id"], {"role": "admin"})
        assert promoted[1]["role"] == "admin"
        assert (await self.call("GET", "/api/users", token=(await self.login("alice"))["token"]))[0] == 200

    @gen_test
    async def test_only_a_superadmin_manages_users_and_bad_input_changes_nothing(self):
        await self.people()
        a = self.alice["user_id"]
        for token in (self.alice["token"], self.admin["token"]):
            status, body = await self.patch(a, {"disabled": True}, token)
            assert (status, body["error"]["code"]) == (403, "forbidden")
        assert (await self.call("PATCH", f"/api/users/{a}", {"disabled": True}))[0] == 401
        for bad, code in [
            ({}, "invalid_request"), ({"disabled": "yes"}, "invalid_request"), ({"role": "king"}, "invalid_request"),
            ({"disabled": True, "colour": "red"}, "invalid_request"), ([], "invalid_request"),
        ]:
            status, body = await self.patch(a, bad)
            assert (status, body["error"]["code"]) == (400, code), bad
        assert (await self.patch(999999, {"disabled": True}))[1]["error"]["code"] == "unknown_user"
        status, body = await self.patch(self.boss["user_id"], {"role": "user"})
        assert (status, body["error"]["code"]) == (409, "conflict")
        assert (await self.call("GET", "/api/balance", token=self.alice["token"]))[0] == 200
        with self.engine.ledger.reading() as db:
            assert db.execute("SELECT COUNT(*) FROM user_changes").fetchone()[0] == 0


class LoginLimits(GatewayCase):
    app_options = {"login_limit": 3}

    @gen_test
    async def test_429_carries_retry_after(self):
        await self.account("alice")
        for _ in range(3):
            await self.call("POST", "/api/login", {"username": "alice", "password": "wrong"})
        response = await self.http_client.fetch(
            self.get_url("/api/login"), method="POST", raise_error=False,
            body=json.dumps({"username": "alice", "password": "alice-pw"}))
        assert response.code == 429 and json.loads(response.body)["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 61

    @gen_test
    async def test_without_a_trusted_proxy_forwarded_for_is_ignored(self):
        await self.account("alice")
        for n in range(3):
            await self.call("POST", "/api/login", {"username": "alice", "password": "wrong"},
                            headers={"X-Forwarded-For": f"10.0.0.{n}"})
        status, _ = await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"},
                                    headers={"X-Forwarded-For": "10.0.0.99"})
        assert status == 429


class TrustedProxy(GatewayCase):
    app_options = {"login_limit": 3, "trust_proxy": True}

    @gen_test
    async def test_behind_a_trusted_proxy_the_limiter_counts_the_forwarded_client(self):
        await self.account("alice")
        for _ in range(3):
            await self.call("POST", "/api/login", {"username": "alice", "password": "wrong"},
                            headers={"X-Forwarded-For": "203.0.113.7"})
        blocked = await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"},
                                  headers={"X-Forwarded-For": "203.0.113.7"})
        assert blocked[0] == 429
        # Another client behind the same proxy, even one that forges a first hop.
        other = await self.call("POST", "/api/login", {"username": "alice", "password": "alice-pw"},
                                headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2"})
        assert other[0] == 200


class Ready(GatewayCase):
    @gen_test
    async def test_readyz_says_ready_while_the_engine_runs(self):
        assert await self.call("GET", "/readyz") == (200, {"status": "ready"})
        self.engine.stop()
        status, body = await self.call("GET", "/readyz")
        assert (status, body["error"]["code"]) == (503, "unavailable")
        self.engine = type("Stopped", (), {"stop": lambda self: None})()
