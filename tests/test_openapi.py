"""GET /openapi.json is true: valid OpenAPI 3.1, every route documented, every answer conforming.

Four layers, cheapest first:

- the document is valid OpenAPI 3.1 and its closed sets are the project's (vocabulary, error codes);
- the app's route table and the document's paths are the same set (a new route fails here
  until it is documented);
- real WebSocket messages validate against ``WsServerMessage``;
- schemathesis against a live ``balancesim serve``: every operation, for every role, with
  generated requests; no 5xx, and every status, content type, body and header as documented.
"""

from __future__ import annotations

import collections
import configparser
import copy
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import referencing
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from referencing.jsonschema import DRAFT202012
from tornado.testing import gen_test
from tornado.web import RequestHandler

from balancesim import errors
from balancesim.gateway._openapi import OPENAPI_PATH, openapi_document
from balancesim.vocabulary import ASSETS, CONTROL_MODES, DURATIONS, ROLES, SYMBOLS
from tests.gateway_harness import GatewayCase
from tests.serve_process import serve  # noqa: F401 - fixture

SPEC = openapi_document()
SCHEMAS = SPEC["components"]["schemas"]
METHODS = ("get", "post", "put", "patch", "delete")

# Routes of the app that are not HTTP API operations, so not in the document's `paths`:
# the pages (HTML/JS/CSS, and the redirect at /), Prometheus text at /metrics, and the
# WebSocket (described under `x-websocket` and `components.schemas.Ws*` instead).
UNDOCUMENTED_ROUTES = {
    "/",
    "/admin/?",
    r"/([A-Za-z0-9_.-]+\.(?:html|js|css|svg|ico))",
    "/metrics",
    "/ws",
}


def spec_schema(name: str) -> jsonschema.Validator:
    """A validator for ``components.schemas[name]``, resolving refs inside the document."""
    uri = "urn:balancesim:openapi"
    registry = referencing.Registry().with_resource(uri, DRAFT202012.create_resource(SPEC))
    return jsonschema.Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/{name}"}, registry=registry,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


# -- the document itself ------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1():
    # schemathesis ships the official OpenAPI 3.1 meta-schema (it validates every schema it loads).
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    assert SPEC["openapi"].startswith("3.1.")
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft202012Validator(OPENAPI_31).iter_errors(SPEC)]
    assert problems == []
    # The meta-schema leaves Schema Objects open: check each against JSON Schema 2020-12 too.
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
    # Every $ref points somewhere.
    refs = set(re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(SPEC)))
    for target in refs:
        node: Any = SPEC
        for part in target.split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]


def test_the_closed_sets_are_the_projects():
    assert set(SCHEMAS["ErrorCode"]["enum"]) == {cls.code for cls in errors.BalancesimError.__subclasses__()}
    assert SCHEMAS["Asset"]["enum"] == list(ASSETS)
    assert SCHEMAS["Symbol"]["enum"] == list(SYMBOLS)
    assert SCHEMAS["Role"]["enum"] == list(ROLES)
    assert SCHEMAS["ControlMode"]["enum"] == list(CONTROL_MODES)
    assert SCHEMAS["Trade"]["properties"]["duration"]["enum"] == list(DURATIONS)
    assert set(SCHEMAS["Balances"]["required"]) == set(ASSETS)
    assert set(SCHEMAS["Prices"]["required"]) == set(SYMBOLS)


def test_the_document_ships_in_the_package():
    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    shipped = [item.strip() for item in config["options.package_data"]["balancesim"].split(",")]
    assert "gateway/openapi.json" in shipped
    assert Path(OPENAPI_PATH).parent.name == "gateway"


def test_money_patterns_are_protocol_md_s():
    amount = re.compile(SCHEMAS["Amount"]["pattern"])
    signed = re.compile(SCHEMAS["SignedAmount"]["pattern"])
    for good in ("100.5", "0.00000001", "1000000000"):
        assert amount.match(good) and signed.match(good) and signed.match("-" + good)
    for bad in ("1e5", " 1", "1.", ".5", "1.123456789", "+1", "-1"):
        assert not amount.match(bad), bad
    assert not signed.match("--1")


# -- the route table and the document ----------------------------------------------------------


def _documented() -> set[tuple[str, str]]:
    return {(method, re.sub(r"\{[^}]+\}", "%s", path)) for path, item in SPEC["paths"].items()
            for method in METHODS if method in item}


class RouteTable(GatewayCase):
    def routed(self) -> set[tuple[str, str]]:
        """``(method, path with %s for each group)`` of every rule of the app, pages and /ws left out."""
        found = set()
        for rule in self.app.wildcard_router.rules:
            pattern = rule.matcher.regex.pattern.removesuffix("$")
            if pattern in UNDOCUMENTED_ROUTES:
                continue
            path = rule.matcher._path
            assert path is not None, f"{pattern}: a route must be a plain path with groups"
            handler = rule.target
            for method in METHODS:
                if getattr(handler, method) is not getattr(RequestHandler, method):
                    found.add((method, path))
        return found

    def test_every_route_is_documented_and_every_documented_path_is_a_route(self):
        routed, documented = self.routed(), _documented()
        undocumented, unrouted = sorted(routed - documented), sorted(documented - routed)
        assert not undocumented, f"routes missing from balancesim/gateway/openapi.json: {undocumented}"
        assert not unrouted, f"documented operations the app does not route: {unrouted}"

    def test_the_websocket_is_described(self):
        assert SPEC["x-websocket"]["path"] == "/ws"
        assert {"1001", "4001", "4008"} <= set(SPEC["x-websocket"]["closeCodes"])

    @gen_test
    async def test_the_served_document_is_the_file_and_needs_no_token(self):
        response = await self.http_client.fetch(self.get_url("/openapi.json"))
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.body) == json.loads(Path(OPENAPI_PATH).read_bytes())

    @gen_test
    async def test_a_rate_limited_login_says_when_to_retry(self):
        for _ in range(11):
            status, body = await self.call("POST", "/api/login", {"username": "nobody", "password": "wrong"})
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        response = await self.http_client.fetch(self.get_url("/api/login"), method="POST", raise_error=False,
                                                body=json.dumps({"username": "nobody", "password": "x"}))
        assert response.code == 429 and int(response.headers["Retry-After"]) > 0


# -- WebSocket messages --------------------------------------------------------------------------


class WebSocketMessages(GatewayCase):
    @gen_test
    async def test_real_messages_validate_against_the_schema(self):
        validator = spec_schema("WsServerMessage")
        boss = await self.account("boss", "superadmin")
        admin = await self.account("admin", "admin")
        alice = await self.account("alice", usdt="100")
        alice_ws = await self.connect(alice["token"], since=0)
        admin_ws = await self.connect(admin["token"])
        seen: dict[str, list[dict[str, Any]]] = {"alice": [], "admin": []}

        async def drain():
            for name, ws in (("alice", alice_ws), ("admin", admin_ws)):
                seen[name].extend(await self.until_pong(ws, ticks=True))

        await drain()  # user_balance_init and alice's replayed deposit
        status, _ = await self.call("POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "5"}, boss["token"])
        assert status == 201
        await self.call("PUT", f"/api/admin/controls/{alice['user_id']}", {"mode": "win"}, boss["token"])
        status, _ = await self.call("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "10", "duration": 30}, alice["token"])
        assert status == 201
        status, _ = await self.call("POST", "/api/spot/orders", {"symbol": "ETHUSDT", "side": "buy", "quantity": "0.001"}, alice["token"])
        assert status == 201
        self.engine.advance(30)
        await drain()
        for frame in ("not json", json.dumps({"type": "nope"}), json.dumps([1]), "x" * 70_000):
            alice_ws.write_message(frame)
        await alice_ws.write_message(b"\x00binary", binary=True)
        seen["alice"].extend(await self.until_pong(alice_ws, ticks=True))

        for name, ws in (("alice", alice_ws), ("admin", admin_ws)):
            ws.write_message(json.dumps({"type": "ping"}))
            while (message := await self.receive(ws))["type"] != "pong":
                seen[name].append(message)
            seen[name].append(message)
        problems = [f"{name}: {error.message} in {message}" for name, messages in seen.items()
                    for message in messages for error in validator.iter_errors(message)]
        assert problems == []
        types = {message["type"] for messages in seen.values() for message in messages}
        # user_update needs PATCH /api/users/{user_id}; price_tick depends on the clock.
        assert types >= {"user_balance_init", "balance_update", "admin_balance_monitor", "trading_control_update",
                         "trade_update", "error", "pong"}, types
        assert [m["code"] for m in seen["alice"] if m["type"] == "error"] == ["invalid_json"] + ["invalid_request"] * 4

    def test_every_server_message_type_has_a_schema_and_its_example_shape(self):
        listed = SCHEMAS["WsServerMessage"]["oneOf"]
        types = {SCHEMAS[ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"] for ref in listed}
        assert types == {"user_balance_init", "balance_update", "admin_balance_monitor", "user_update",
                         "trading_control_update", "trade_update", "price_tick", "error", "pong"}
        update = {"type": "user_update", "user_id": 3, "username": "alice", "role": "user", "disabled": True,
                  "set_by": 1, "ts": "2026-01-01T00:00:00.000Z"}
        spec_schema("WsServerMessage").validate(update)
        with pytest.raises(jsonschema.ValidationError):
            spec_schema("WsServerMessage").validate({**update, "extra": 1})
        spec_schema("WsClientMessage").validate({"type": "ping"})


# -- schemathesis against a live server ------------------------------------------------------------

EXAMPLES = int(os.environ.get("BALANCESIM_OPENAPI_EXAMPLES", "50"))
ANONYMOUS_EXAMPLES = 5
DEMO = {"superadmin": ("superadmin", "superadmin123"), "admin": ("admin", "admin123"),
        "user": ("alice", "alice123"), "bob": ("bob", "bob123")}
EVERYONE, ANY_ROLE = ("anonymous", *ROLES), ROLES
ADMINS, SUPER = ("admin", "superadmin"), ("superadmin",)
# PROTOCOL.md's "who" column: the callers that get a 2xx; everyone else must never get one.
WHO = {
    "POST /api/login": EVERYONE,
    "POST /api/logout": ANY_ROLE,
    "GET /api/users": ADMINS,
    "POST /api/users": ADMINS,
    "PATCH /api/users/{user_id}": SUPER,
    "GET /api/balance": ANY_ROLE,
    "GET /api/users/{user_id}/balance": ADMINS,
    "GET /api/transactions": ANY_ROLE,
    "GET /api/users/{user_id}/transactions": ADMINS,
    "POST /api/admin/deposits": SUPER,
    "POST /api/admin/withdrawals": SUPER,
    "POST /api/admin/adjustments": SUPER,
    "PUT /api/admin/controls/{user_id}": SUPER,
    "POST /api/admin/trades/{trade_id}/force": ADMINS,
    "GET /api/admin/trades": ADMINS,
    "POST /api/options": ANY_ROLE,
    "GET /api/options": ANY_ROLE,
    "POST /api/spot/orders": ANY_ROLE,
    "GET /api/market": ANY_ROLE,
    "GET /healthz": EVERYONE,
    "GET /readyz": EVERYONE,
    "GET /openapi.json": EVERYONE,
}
NO_SUCH_USER = 2**53 - 1


def test_the_who_table_covers_the_document():
    assert set(WHO) == {f"{method.upper()} {path}" for path, item in SPEC["paths"].items()
                        for method in METHODS if method in item}


class Fuzz:
    """Drives schemathesis cases at one live server and tallies what came back.

    Generated ids rarely name an account or a trade, so each case may have its ids
    replaced by real ones (alice's account, a trade opened just before), chosen by
    hypothesis like any other input. Two operations would spoil the shared tokens:
    ``POST /api/logout`` always gets a fresh token of the role (a new login of its demo
    user, revoked by the call, so the role's shared token stays live), and
    ``PATCH /api/users/{user_id}`` always targets a throwaway account made for that
    case (or an id no account has), never a demo account, so no run disables or
    demotes its own caller.
    """

    def __init__(self, url: str) -> None:
        import schemathesis
        from schemathesis.checks import not_a_server_error
        from schemathesis.specs.openapi.checks import (
            content_type_conformance, response_headers_conformance, response_schema_conformance,
            status_code_conformance,
        )

        self.url = url
        self.http = requests.Session()
        self.schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        self.checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                       response_schema_conformance, response_headers_conformance]
        logins = {role: self.login(*DEMO[role]) for role in DEMO}
        self.tokens = {role: body["token"] for role, body in logins.items()}
        self.ids = {role: body["user_id"] for role, body in logins.items()}
        self.statuses: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: dict[tuple[str, str, str], str] = {}
        self.serial = itertools.count()

    # -- plain requests for the setup of a case ----------------------------------------------

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.http.request(method, self.url + path, json=body, headers=headers, timeout=30)
        return response.status_code, response.json() if response.content else None

    def login(self, username: str, password: str) -> dict[str, Any]:
        status, body = self.request("POST", "/api/login", {"username": username, "password": password})
        assert status == 200, body
        return body

    def deposit(self, user_id: int, amount: str = "100000") -> None:
        status, body = self.request("POST", "/api/admin/deposits", {"user_id": user_id, "amount": amount},
                                    self.tokens["superadmin"])
        assert status == 201, body

    def fresh_trade(self) -> str:
        """An open trade of bob's (60 s × 0.01: open for 0.6 s, time enough to force it)."""
        self.deposit(self.ids["bob"], "10")
        status, body = self.request("POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "10",
                                                             "duration": 60}, self.tokens["bob"])
        assert status == 201, body
        return body["trade"]["trade_id"]

    def throwaway(self) -> int:
        status, body = self.request("POST", "/api/users", {"username": f"throwaway-{next(self.serial)}",
                                                           "password": "throwaway"}, self.tokens["superadmin"])
        assert status == 201, body
        return body["user_id"]

    # -- one case -------------------------------------------------------------------------------

    def exercise(self, role: str, case: Any, choose: Callable[[list[Any]], Any]) -> None:
        """Point ``case`` at real things (as ``choose`` picks), send it as ``role``, check, count."""
        from schemathesis.errors import FailureGroup

        label = f"{case.method.upper()} {case.operation.path}"
        token = self.tokens.get(role)
        if label == "POST /api/logout" and role != "anonymous":
            token = self.login(*DEMO[role])["token"]  # fresh: the shared one stays live
        if label == "PATCH /api/users/{user_id}":
            case.path_parameters["user_id"] = choose([self.throwaway, lambda: NO_SUCH_USER])()
        elif "user_id" in (case.path_parameters or {}):
            case.path_parameters["user_id"] = choose([self.ids["user"], case.path_parameters["user_id"]])
        if "trade_id" in (case.path_parameters or {}):
            case.path_parameters["trade_id"] = choose([self.fresh_trade, lambda: case.path_parameters["trade_id"]])()
        if isinstance(case.body, dict) and "user_id" in case.body:
            case.body["user_id"] = choose([self.ids["user"], case.body["user_id"]])
        if case.query and "user_id" in case.query:
            case.query["user_id"] = choose([self.ids["user"], case.query["user_id"]])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # A connection of its own per case: the server drops a connection whose request it
        # refused before reading the body (413, or 404 for an unrouted path), and a pooled
        # connection reused after that would fail the next request, not this one.
        response = case.call(base_url=self.url, headers=headers)
        self.statuses[(role, label)][response.status_code] += 1
        try:
            case.validate_response(response, checks=self.checks, headers=headers)
        except (AssertionError, FailureGroup) as group:
            for failure in getattr(group, "exceptions", [group]):
                title = getattr(failure, "title", type(failure).__name__)
                self.failures.setdefault((role, label, title), f"{role} {label} → {response.status_code}: "
                                         f"{str(group)[:1200]}")

    def example_case(self, operation: Any) -> Any:
        """The operation's documented example request, with a unique username where one is made."""
        raw = SPEC["paths"][operation.path][operation.method.lower()]
        path_parameters = {}
        for parameter in raw.get("parameters", []):
            if "$ref" in parameter:
                parameter = SPEC["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
            if parameter["in"] == "path":
                path_parameters[parameter["name"]] = parameter["example"]
        kwargs: dict[str, Any] = {"path_parameters": path_parameters}
        if "requestBody" in raw:
            body = copy.deepcopy(raw["requestBody"]["content"]["application/json"]["example"])
            if "username" in body and raw["operationId"] == "createUser":
                body["username"] += f"-{next(self.serial)}"
            kwargs["body"] = body
        return operation.Case(**kwargs)

    # -- runs -------------------------------------------------------------------------------------

    def operations(self) -> list[Any]:
        ops = [result.ok() for result in self.schema.get_all_operations()]
        # The login last: its generated failures trip the per-address limit (429) for a minute.
        return sorted(ops, key=lambda op: op.path == "/api/login")

    def run(self, role: str, examples: int) -> None:
        operations = self.operations()
        if role != "anonymous":
            operations = [op for op in operations if op.definition.raw.get("security") != []]
            for account in {self.ids[role], self.ids["user"]}:
                self.deposit(account)  # funds for the examples, whatever earlier runs spent
        # Every documented example first (with real ids), then generated requests.
        for operation in operations:
            self.exercise(role, self.example_case(operation), lambda options: options[0])
        for operation in operations:
            self.generated(role, operation, examples)

    def generated(self, role: str, operation: Any, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), data=st.data())
        def send(case: Any, data: st.DataObject) -> None:
            self.exercise(role, case, lambda options: data.draw(st.sampled_from(options)))

        send()

    def report(self) -> tuple[list[str], list[str]]:
        """Operations a role may do that never succeeded, and ones it may not do that did."""
        never, wrongly = [], []
        for label, who in WHO.items():
            for role in EVERYONE:
                counts = self.statuses.get((role, label))
                if counts is None:
                    continue
                ok = sum(n for status, n in counts.items() if 200 <= status < 300)
                if role in who and not ok:
                    never.append(f"{role} {label}: {dict(counts)}")
                if role not in who and ok:
                    wrongly.append(f"{role} {label}: {dict(counts)}")
        return never, wrongly


@pytest.mark.slow
def test_schemathesis_every_operation_for_every_role_conforms(serve):  # noqa: F811 - fixture
    server = serve("--demo", "--time-scale", "0.01", "--password-cost", "1024")
    fuzz = Fuzz(server.url)
    for role in ("user", "admin", "superadmin"):
        fuzz.run(role, EXAMPLES)
    # Without a token: the public routes answer, every other one is 401 (and the login's
    # generated failures end in 429 with Retry-After).
    fuzz.run("anonymous", ANONYMOUS_EXAMPLES)
    fuzz.generated("anonymous", fuzz.schema["/api/login"]["POST"], EXAMPLES)
    never, wrongly = fuzz.report()
    assert server.running()
    summary = "\n".join(f"{role:10} {label:42} {dict(sorted(counts.items()))}"
                        for (role, label), counts in sorted(fuzz.statuses.items()))
    print(summary)
    # One report of everything wrong, so a run shows all of it at once.
    problems = list(fuzz.failures.values())
    problems += [f"the role may do this but never got a 2xx: {line}" for line in never]
    problems += [f"a 2xx to a role that may not do this: {line}" for line in wrongly]
    assert problems == [], f"{len(problems)} problems:\n\n" + "\n\n".join(problems)
