"""The pages as a trader and an operator use them (issue 14), in Debian's Chromium.

Phone layout, a stale login, the trader's view, the dashboard's trades and P&L, and
error lines printed once. Every test runs against the embedded server and against a
cluster (``serve --workers 2 --shards 2``). The server runs at a time scale that leaves an open trade
on screen for a few seconds.
"""

from __future__ import annotations

import re
import time
import urllib.error
from typing import Iterator

import pytest
from playwright.sync_api import Page, expect

from balancesim.charts import render_chart
from balancesim.serveproc import ServerProcess
from tests.test_browser import api, browser, close_pages, token  # noqa: F401  (browser is a fixture)

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}
EXPIRED = "Your session has expired; please log in again."
LOGGED_OUT = "You have logged out."
ACCOUNT_DISABLED = "An administrator disabled this account."
TIME_SCALE = 0.1  # a 30 s trade lasts 3 s, a 60 s one 6 s


@pytest.fixture
def server(start_server) -> ServerProcess:
    """The demo server, embedded and as a cluster (``start_server`` runs each test in both modes)."""
    return start_server("--demo", "--time-scale", str(TIME_SCALE), "--password-cost", "1024", name="pages")


@pytest.fixture
def open_page(browser, server, request) -> Iterator:  # noqa: F811
    opened: list[Page] = []

    def open_as(username: str | None, password: str = "", path: str = "/", **context_options) -> Page:
        page = browser.new_context(**context_options).new_page()
        opened.append(page)
        page.goto(server.url + path)
        if username is not None:
            log_in(page, username, password)
        return page

    yield open_as
    close_pages(opened, request)


def log_in(page: Page, username: str, password: str) -> None:
    page.get_by_test_id("username").fill(username)
    page.get_by_test_id("password").fill(password)
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("ws-status")).to_have_attribute("data-state", "live", timeout=10_000)


def stored_token(page: Page) -> str | None:
    return page.evaluate("JSON.parse(sessionStorage.getItem('balancesim.login'))?.token ?? null")


def status_of(server: ServerProcess, path: str, token: str) -> int:
    try:
        api(server, "GET", path, token=token)
    except urllib.error.HTTPError as refused:
        return refused.code
    return 200


def ids(server: ServerProcess) -> dict[str, int]:
    return {name: token(server, name, f"{name}123")["user_id"] for name in ("alice", "bob")}


def boss(server: ServerProcess) -> str:
    return token(server, "superadmin", "superadmin123")["token"]


def assert_fits_a_phone(page: Page) -> None:
    """Issue 14's rule: a phone viewport, nothing wider than the screen, buttons a thumb can hit."""
    viewport = page.evaluate("document.querySelector('meta[name=\"viewport\"]')?.content ?? null")
    assert viewport == "width=device-width, initial-scale=1"
    width, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert inner == 390 and width <= inner, (width, inner)
    short = [(text, box["height"]) for button in page.locator("button").all() if button.is_visible()
             # A button may vanish between the two calls (a trade settles): no box, nothing to measure.
             for box in [button.bounding_box()] for text in [button.inner_text()]
             if box is not None and box["height"] < 40]
    assert short == []


# -- 1. phone ----------------------------------------------------------------------------


def test_the_test_page_the_dashboard_and_the_load_report_fit_a_phone(open_page, server, tmp_path):
    page = open_page(None, **PHONE)
    expect(page.get_by_test_id("login-form")).to_be_visible()
    assert_fits_a_phone(page)
    log_in(page, "superadmin", "superadmin123")
    page.get_by_test_id("option-60-up").click()  # an open trade brings its force buttons
    expect(page.get_by_test_id("open-trades").locator("li")).to_have_count(1)
    page.get_by_test_id("option-amount").fill("not money")
    page.get_by_test_id("option-30-down").click()
    expect(page.get_by_test_id("action-error")).not_to_be_empty()
    expect(page.get_by_test_id("transactions").locator("tr")).to_have_count(2)
    assert_fits_a_phone(page)

    dashboard = open_page("admin", "admin123", "/admin", **PHONE)
    expect(dashboard.get_by_test_id("accounts").locator("tr[data-user]")).to_have_count(4)
    expect(dashboard.locator(".open-trade")).to_have_count(1)
    assert_fits_a_phone(dashboard)

    boss = open_page("superadmin", "superadmin123", "/admin", **PHONE)  # with the account actions
    bob = ids(server)["bob"]
    boss.on("dialog", lambda dialog: dialog.accept())
    boss.get_by_test_id(f"disable-{bob}").click()
    expect(boss.get_by_test_id(f"disabled-{bob}")).to_be_visible()
    expect(boss.get_by_test_id(f"enable-{bob}")).to_be_visible()
    expect(boss.get_by_test_id(f"make-superadmin-{bob}")).to_be_visible()
    assert_fits_a_phone(boss)

    report = tmp_path / "load.html"
    report.write_text(render_chart(synthetic_report()))
    chart = open_page(None, **PHONE)
    chart.goto(report.as_uri())
    expect(chart.locator("svg")).to_have_count(3)
    assert_fits_a_phone(chart)


def synthetic_report() -> dict:
    stats = {"count": 40, "p50_ms": 3.1, "p90_ms": 7.5, "p99_ms": 12.0, "p99.9_ms": 20.5, "max_ms": 21.0}
    series = [{"t": t, "count": 10, "p50_ms": 2.0 + t, "p99_ms": 9.0 + t} for t in range(4)]
    return {
        "users": 3, "duration_s": 4, "ok_ops": 40, "throughput_ops_per_s": 10.0, "errors": 0, "setup_s": 0.4,
        "verdict": {"ok": True, "problems": [], "messages": 120, "sessions": 3, "reconnects": 0,
                    "ledger": "ledger OK: 3 accounts, 40 entries, a very long line of findings " * 3},
        "http_latency": stats, "delivery_latency": stats,
        "series": {"bucket_s": 1, "http": series, "delivery": series},
        "distribution": {"http": [[0, 1.0], [90, 7.5], [99, 12.0], [100, 21.0]],
                         "delivery": [[0, 1.5], [90, 8.0], [99, 13.0], [100, 22.0]]},
        "operations": {"option": {"ok": 40, "refused": {}}, "note": "x" * 300},
    }


# -- 2. a stale or expired login -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/admin"])
def test_a_refused_stored_token_returns_to_the_login_form_with_a_message(open_page, path):
    page = open_page("admin", "admin123", path)
    if path == "/":
        # The test page fetches its transactions 150 ms after going live, with the token stored
        # then: a bogus one would make the page reload itself while this test reloads it too.
        expect(page.get_by_test_id("tx-range")).not_to_be_empty()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.evaluate("""() => {
        const login = JSON.parse(sessionStorage.getItem("balancesim.login"));
        sessionStorage.setItem("balancesim.login", JSON.stringify({ ...login, token: "bogus-" + login.token }));
    }""")
    page.reload()
    expect(page.get_by_test_id("login-form")).to_be_visible(timeout=5_000)
    expect(page.get_by_test_id("login-notice")).to_have_text(EXPIRED)
    assert errors == []
    log_in(page, "admin", "admin123")  # and the form works: live again, the notice gone
    expect(page.get_by_test_id("login-notice")).to_have_count(0)


def test_pages_whose_server_forgot_their_login_return_to_the_login_form(open_page, server, tmp_path):
    trader, dashboard = open_page("alice", "alice123"), open_page("admin", "admin123", "/admin")
    server.stop()
    # A server with another ledger (or data directory) knows no token of the old one.
    if server.mode == "embedded":
        server.db = str(tmp_path / "another.db")
    else:
        server.data_dir = str(tmp_path / "another-data")
    server.start(port=server.port)
    for page in (trader, dashboard):
        expect(page.get_by_test_id("login-form")).to_be_visible(timeout=15_000)
        expect(page.get_by_test_id("login-notice")).to_have_text(EXPIRED)


# -- 3. the trader's view ----------------------------------------------------------------------


def test_the_trader_sees_prices_open_and_settled_trades_and_pages_of_transactions(open_page, server):
    alice = open_page("alice", "alice123")
    people, superadmin = ids(server), boss(server)
    admin = token(server, "admin", "admin123")

    expect(alice.get_by_test_id("price-BTCUSDT")).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
    chart = alice.get_by_test_id("chart-ETHUSDT").locator("polyline")
    expect(chart).to_have_attribute("points", re.compile(r"^(\S+,\S+ ){2,}\S+,\S+$"), timeout=5_000)

    alice.get_by_test_id("option-amount").fill("10")
    alice.get_by_test_id("option-30-up").click()
    alice.get_by_test_id("option-30-down").click()
    opened = alice.get_by_test_id("open-trades").locator("li")
    expect(opened).to_have_count(2)
    market_id, forced_id = opened.nth(0).get_attribute("data-trade"), opened.nth(1).get_attribute("data-trade")
    expect(opened.nth(0)).to_contain_text(re.compile(r"entry \d"))
    expect(alice.get_by_test_id(f"countdown-{market_id}")).to_have_text(re.compile(r"^[0-3]\.\d s left$"))
    api(server, "POST", f"/api/admin/trades/{forced_id}/force", {"outcome": "win"}, admin["token"])

    settled_market = alice.get_by_test_id(f"settled-{market_id}")
    expect(settled_market).to_have_attribute("data-status", re.compile("won|lost|draw"), timeout=10_000)
    expect(settled_market).to_contain_text(re.compile(r"exit \d"))
    expect(settled_market).to_contain_text("payout ")
    expect(alice.get_by_test_id(f"decided-{market_id}")).to_have_text("decided by the market")
    expect(alice.get_by_test_id(f"settled-{forced_id}")).to_have_attribute("data-status", "won", timeout=10_000)
    expect(alice.get_by_test_id(f"decided-{forced_id}")).to_have_text(f"decided by admin force (admin #{admin['user_id']})")
    expect(alice.get_by_test_id("open-trades").locator("li")).to_have_count(0)

    api(server, "PUT", f"/api/admin/controls/{people['alice']}", {"mode": "lose"}, superadmin)
    alice.get_by_test_id("option-30-up").click()
    lost = alice.get_by_test_id("settled-trades").locator('li[data-status="lost"]')
    expect(alice.get_by_test_id("settled-trades").get_by_text("decided by control mode: lose")).to_have_count(1, timeout=10_000)
    time.sleep(1)  # settled trades stay listed while more messages arrive
    expect(alice.get_by_test_id("settled-trades").locator("li")).to_have_count(3)
    expect(lost.first).to_contain_text("payout 0 USDT (-10)")

    # A deposit, three stakes and a payout at least (the market's trade may add one): 8 deposits
    # more make two pages of ten, the newest shown first and followed live.
    for n in range(8):
        api(server, "POST", "/api/admin/deposits", {"user_id": people["alice"], "amount": str(n + 1)}, superadmin)
    last = api(server, "GET", "/api/balance", token=token(server, "alice", "alice123")["token"])["version"]
    assert 13 <= last <= 20
    rows = alice.get_by_test_id("transactions").locator("tr")
    expect(alice.get_by_test_id("tx-range")).to_have_text(f"versions 11–{last} of {last}", timeout=5_000)
    expect(rows).to_have_count(last - 10)
    expect(rows.last).to_contain_text("deposit")
    expect(alice.get_by_test_id("tx-next")).to_be_disabled()
    alice.get_by_test_id("tx-previous").click()
    expect(alice.get_by_test_id("tx-range")).to_have_text(f"versions 1–10 of {last}")
    expect(rows).to_have_count(10)
    expect(rows.first).to_contain_text("demo starting balance")
    expect(alice.get_by_test_id("tx-previous")).to_be_disabled()
    alice.get_by_test_id("tx-next").click()
    expect(alice.get_by_test_id("tx-range")).to_have_text(f"versions 11–{last} of {last}")


# -- 4. the dashboard's trades, control modes and P&L -------------------------------------------


def test_the_dashboard_shows_open_trades_control_mode_and_profit_and_loss_per_account(open_page, server):
    people, superadmin = ids(server), boss(server)
    alice_token = token(server, "alice", "alice123")["token"]
    api(server, "PUT", f"/api/admin/controls/{people['alice']}", {"mode": "win"}, superadmin)
    first = api(server, "POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "10", "duration": 30}, alice_token)
    dashboard = open_page("admin", "admin123", "/admin")
    a = people["alice"]
    expect(dashboard.get_by_test_id(f"cell-{a}-mode")).to_have_text("win")
    expect(dashboard.get_by_test_id(f"cell-{a}-open")).to_contain_text("BTCUSDT up 10 @ ")
    expect(dashboard.get_by_test_id(f"cell-{a}-open").locator(f'[data-trade="{first["trade"]["trade_id"]}"]')).to_be_visible()
    # A win pays stake × payout_rate on top of the stake: +10 × rate once settled.
    expect(dashboard.get_by_test_id(f"cell-{a}-pnl")).to_have_text("+1", timeout=10_000)
    expect(dashboard.get_by_test_id(f"cell-{a}-open")).to_have_text("–")

    api(server, "PUT", f"/api/admin/controls/{people['bob']}", {"mode": "lose"}, superadmin)
    bob_token = token(server, "bob", "bob123")["token"]
    api(server, "POST", "/api/options", {"symbol": "ETHUSDT", "direction": "down", "amount": "5", "duration": 60}, bob_token)
    b = people["bob"]
    expect(dashboard.get_by_test_id(f"cell-{b}-mode")).to_have_text("lose")
    expect(dashboard.get_by_test_id(f"cell-{b}-open")).to_contain_text("ETHUSDT down 5 @ ")
    expect(dashboard.get_by_test_id(f"cell-{b}-pnl")).to_have_text("-5", timeout=15_000)
    settled = api(server, "GET", f"/api/admin/trades?status=settled&user_id={b}", token=superadmin)["trades"]
    assert [t["decided_by"] for t in settled] == ["control_mode:lose"]

    again = open_page("superadmin", "superadmin123", "/admin")  # P&L from the ledger, not only from live messages
    expect(again.get_by_test_id(f"cell-{a}-pnl")).to_have_text("+1")
    expect(again.get_by_test_id(f"cell-{b}-pnl")).to_have_text("-5")
    expect(again.get_by_test_id(f"cell-{people['alice']}-open")).to_have_text("–")


# -- 5. errors once, long lines wrapped ------------------------------------------------------


def test_an_error_names_its_code_once_and_long_log_lines_wrap(open_page):
    alice = open_page("alice", "alice123")
    alice.get_by_test_id("option-amount").fill("12.3.4")
    alice.get_by_test_id("option-30-up").click()
    error = alice.get_by_test_id("action-error")
    expect(error).to_have_text(re.compile(r"^400 invalid_amount: \S"))
    assert error.inner_text().count("invalid_amount") == 1
    alice.get_by_test_id("option-amount").fill("1")
    alice.get_by_test_id("option-60-up").click()
    log = alice.get_by_test_id("log")
    expect(log).to_contain_text('"change_type":"option_stake"')
    width, visible = log.evaluate("node => [node.scrollWidth, node.clientWidth]")
    assert width <= visible, "a long line runs off the log's right edge"


# -- 6. logging out ------------------------------------------------------------------------------


def test_log_out_revokes_the_token_on_the_server_and_forgets_it_even_offline(open_page, server):
    page = open_page("alice", "alice123")
    old = stored_token(page)
    assert status_of(server, "/api/balance", old) == 200
    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-form")).to_be_visible()
    expect(page.get_by_test_id("login-notice")).to_have_text(LOGGED_OUT)
    expect(page.get_by_test_id("username")).to_have_value("alice")
    assert stored_token(page) is None
    assert status_of(server, "/api/balance", old) == 401  # a copy of the token died with the click

    log_in(page, "alice", "alice123")
    kept = stored_token(page)
    page.route("**/api/logout", lambda route: route.abort("internetdisconnected"))
    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-notice")).to_have_text(LOGGED_OUT)
    assert stored_token(page) is None  # the call failed: the tab forgets the token all the same
    assert status_of(server, "/api/balance", kept) == 200


# -- 7. a superadmin manages accounts from the dashboard ------------------------------------------


def test_a_superadmin_disables_re_enables_and_changes_the_role_of_an_account_from_the_dashboard(open_page, server):
    people = ids(server)
    boss_id = token(server, "superadmin", "superadmin123")["user_id"]
    admin = open_page("admin", "admin123", "/admin")
    expect(admin.get_by_test_id("accounts").locator("tr[data-user]")).to_have_count(4)
    expect(admin.locator("td.actions")).to_have_count(0)  # an admin may not manage accounts: no column at all
    expect(admin.locator("[data-testid^=disable-], [data-testid^=make-]")).to_have_count(0)

    dashboard = open_page("superadmin", "superadmin123", "/admin")
    b = people["bob"]
    expect(dashboard.get_by_test_id(f"disable-{b}")).to_be_visible()
    expect(dashboard.locator(f'tr[data-user="{boss_id}"] td.actions button')).to_have_count(0)  # never its own row
    answers: list[bool] = [False, True]  # the first confirm is cancelled, the second accepted
    questions: list[str] = []

    def answer(dialog) -> None:
        questions.append(dialog.message)
        dialog.accept() if answers.pop(0) else dialog.dismiss()

    dashboard.on("dialog", answer)
    dashboard.get_by_test_id(f"disable-{b}").click()
    expect(dashboard.get_by_test_id(f"disable-{b}")).to_be_visible()
    assert questions[0].startswith("Disable bob?")
    assert status_of(server, "/api/balance", token(server, "bob", "bob123")["token"]) == 200  # cancelled: nothing changed

    dashboard.get_by_test_id(f"disable-{b}").click()
    expect(dashboard.get_by_test_id(f"disabled-{b}")).to_have_text("disabled")
    expect(dashboard.get_by_test_id(f"enable-{b}")).to_be_visible()
    expect(dashboard.get_by_test_id(f"disable-{b}")).to_have_count(0)
    expect(admin.get_by_test_id(f"disabled-{b}")).to_be_visible()  # pushed to every admin as user_update
    expect(admin.get_by_test_id("feed")).to_contain_text("bob: disabled, role user")
    with pytest.raises(urllib.error.HTTPError):
        token(server, "bob", "bob123")

    dashboard.get_by_test_id(f"enable-{b}").click()  # re-enabling asks nothing
    expect(dashboard.get_by_test_id(f"disabled-{b}")).to_have_count(0)
    expect(admin.get_by_test_id(f"disabled-{b}")).to_have_count(0)
    assert token(server, "bob", "bob123")["role"] == "user"

    answers.append(True)
    dashboard.get_by_test_id(f"make-admin-{b}").click()
    assert questions[-1] == "Make bob an admin? Its sessions close and it must log in again."
    expect(dashboard.get_by_test_id(f"cell-{b}-role")).to_have_text("admin")
    expect(admin.get_by_test_id(f"cell-{b}-role")).to_have_text("admin")
    expect(dashboard.get_by_test_id(f"make-admin-{b}")).to_have_count(0)
    expect(dashboard.get_by_test_id(f"make-user-{b}")).to_be_visible()
    assert token(server, "bob", "bob123")["role"] == "admin"


# -- 8. an account disabled while its page is open -------------------------------------------------


def test_a_disabled_account_returns_to_the_login_form_and_may_log_in_again_once_re_enabled(open_page, server):
    a = ids(server)["alice"]
    alice = open_page("alice", "alice123")
    watcher = open_page("admin", "admin123", "/admin")
    boss = open_page("superadmin", "superadmin123", "/admin")
    boss.on("dialog", lambda dialog: dialog.accept())
    boss.get_by_test_id(f"disable-{a}").click()

    expect(alice.get_by_test_id("login-form")).to_be_visible(timeout=5_000)
    expect(alice.get_by_test_id("login-notice")).to_have_text(ACCOUNT_DISABLED)
    expect(alice.get_by_test_id("username")).to_have_value("alice")
    alice.get_by_test_id("password").fill("alice123")
    alice.get_by_test_id("login").click()
    expect(alice.get_by_test_id("login-error")).to_have_text("This account is disabled.")
    expect(watcher.get_by_test_id(f"disabled-{a}")).to_have_text("disabled")
    # A dashboard opened now knows it too (GET /api/users?include=disabled), before any push.
    late = open_page("admin", "admin123", "/admin")
    expect(late.get_by_test_id(f"disabled-{a}")).to_have_text("disabled")

    boss.get_by_test_id(f"enable-{a}").click()
    expect(watcher.get_by_test_id(f"disabled-{a}")).to_have_count(0)
    log_in(alice, "alice", "alice123")
    expect(alice.get_by_test_id("balance-USDT")).to_have_text("10000")
