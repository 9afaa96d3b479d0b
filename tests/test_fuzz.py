"""Hypothesis-generated requests and frames against a running server.

No input may produce a 5xx or crash the server; a rejected request changes
nothing (the whole ledger state, read through the API, is compared around it);
a WebSocket connection survives every bad frame.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.parse
import json
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from balancesim.serveproc import ServerProcess

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Target:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.requests = 0
        self.boss = self.login("superadmin", "superadmin123")
        self.alice = self.login("alice", "alice123")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
            self.requests += 1

    def login(self, username: str, password: str) -> str:
        status, body = self.request("POST", "/api/login", json.dumps({"username": username, "password": password}).encode())
        assert status == 200
        return json.loads(body)["token"]

    def state(self) -> str:
        status, body = self.request("GET", "/api/users", headers={"Authorization": f"Bearer {self.boss}"})
        assert status == 200
        return hashlib.sha256(body).hexdigest()


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    server = ServerProcess(str(tmp_path_factory.mktemp("fuzz") / "fuzz.db"), "--demo", "--password-cost", "1024").start()
    try:
        yield Target(server)
    finally:
        assert server.stop() == 0


PATHS = ["/api/login", "/api/users", "/api/balance", "/api/users/{id}/balance", "/api/transactions",
         "/api/users/{id}/transactions", "/api/admin/deposits", "/api/admin/withdrawals", "/api/admin/adjustments",
         "/api/admin/controls/{id}", "/api/admin/trades/{id}/force", "/api/options", "/api/spot/orders",
         "/api/market", "/healthz", "/ws", "/api/{id}", "/{id}"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
fields = st.fixed_dictionaries({}, optional={
    "user_id": json_values | st.integers(1, 5), "amount": json_values | st.sampled_from(["1", "0.5", "-1", "1e3", "NaN"]),
    "asset": json_values | st.sampled_from(["USDT", "BTC", "DOGE"]), "description": json_values,
    "symbol": json_values | st.sampled_from(["BTCUSDT", "ETHUSDT"]), "direction": json_values | st.just("up"),
    "duration": json_values | st.sampled_from([30, 60, 45]), "side": json_values | st.just("sell"),
    "quantity": json_values | st.just("100"), "mode": json_values | st.just("lose"), "outcome": json_values,
    "username": json_values, "password": json_values, "role": json_values,
})
bodies = st.one_of(st.none(), st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                   fields.map(lambda v: json.dumps(v).encode()))
ids = st.one_of(st.integers(-5, 10**20).map(str), st.text(alphabet="abcT-_0123456789%.", max_size=12))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=st.sampled_from(PATHS), id_=ids,
       query=st.text(alphabet="abcdefghilmnorstuv_=&%0123456789-", max_size=40), body=bodies,
       who=st.sampled_from(["boss", "alice", "none", "junk"]), key=st.none() | st.text(min_size=1, max_size=200),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]))
def test_no_request_gets_a_5xx_and_a_rejected_one_changes_nothing(target, method, path, id_, query, body, who, key, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    token = {"boss": target.boss, "alice": target.alice, "none": None, "junk": "x" * 40}[who]
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None and key.isprintable() and key.isascii():
        headers["Idempotency-Key"] = key
    url = path.replace("{id}", urllib.parse.quote(id_, safe="")) + (f"?{query}" if query else "")
    before = target.state()
    status, answer = target.request(method, url, body, headers)
    assert status < 500, (method, url, body, answer)
    if status >= 400 and path != "/ws":
        error = json.loads(answer)["error"]
        assert error["code"] and error["message"]
        assert target.state() == before, (method, url, body, answer)


frames = st.one_of(st.text(max_size=200), st.binary(max_size=200), json_values.map(json.dumps),
                   st.integers(65 * 1024, 200 * 1024).map(lambda n: "a" * n))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_a_session_answers_every_bad_frame_with_an_error_and_stays_open(target, frame):
    with connect(f"ws://127.0.0.1:{target.server.port}/ws?token={target.alice}", max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "user_balance_init"
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=10))
        while reply["type"] == "price_tick":
            reply = json.loads(ws.recv(timeout=10))
        is_ping = isinstance(frame, str) and _is_ping(frame)
        assert reply["type"] == ("pong" if is_ping else "error")
        ws.send(json.dumps({"type": "ping"}))
        while (message := json.loads(ws.recv(timeout=10)))["type"] != "pong":
            pass


def _is_ping(frame: str) -> bool:
    try:
        value = json.loads(frame)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == "ping"
