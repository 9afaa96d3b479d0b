"""The test page and the admin dashboard in a real headless Chromium (Debian's, via Playwright).

No browser download: Playwright drives /usr/bin/chromium, which .ci/run installs.
Every test runs twice, against the embedded server and against ``serve --workers 2
--shards 2`` (the ``start_server`` fixture). Screenshots of every open page are saved under tests/artifacts/ when a test fails.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from balancesim.serveproc import ServerProcess

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """The demo server, embedded and as a cluster (``start_server`` runs each test in both modes)."""
    return start_server("--demo", "--time-scale", "0.01", "--password-cost", "1024", name="browser")


@pytest.fixture
def pages(browser, server, request) -> Iterator:
    opened: list[Page] = []

    def open_as(username: str, password: str, path: str = "/") -> Page:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + path)
        page.get_by_test_id("username").fill(username)
        page.get_by_test_id("password").fill(password)
        page.get_by_test_id("login").click()
        expect(page.get_by_test_id("ws-status")).to_have_attribute("data-state", "live", timeout=10_000)
        opened.append(page)
        return page

    yield open_as
    close_pages(opened, request)


def close_pages(opened: list[Page], request: pytest.FixtureRequest) -> None:
    """Close every page a test opened; if its body failed, screenshot them first (the evidence)."""
    if getattr(request.node, "failed", False):
        ARTIFACTS.mkdir(exist_ok=True)
        for index, page in enumerate(opened):
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{index}.png"), full_page=True)
    for page in opened:
        page.context.close()


def api(server: ServerProcess, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    request = urllib.request.Request(server.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def token(server: ServerProcess, username: str, password: str) -> dict:
    return api(server, "POST", "/api/login", {"username": username, "password": password})


def test_a_deposit_from_the_superadmin_page_reaches_the_right_user_within_a_second(pages, server):
    alice, bob = pages("alice", "alice123"), pages("bob", "bob123")
    boss = pages("superadmin", "superadmin123")
    expect(alice.get_by_test_id("balance-USDT")).to_have_text("10000")
    alice_id = token(server, "alice", "alice123")["user_id"]
    boss.get_by_test_id("target-user").select_option(str(alice_id))
    boss.get_by_test_id("admin-amount").fill("123.45")
    boss.get_by_test_id("deposit").click()
    expect(alice.get_by_test_id("balance-USDT")).to_have_text("10123.45", timeout=1_000)
    expect(alice.get_by_test_id("log")).to_contain_text('"change":"123.45"')
    expect(bob.get_by_test_id("balance-USDT")).to_have_text("10000")
    expect(bob.get_by_test_id("log")).not_to_contain_text("123.45")


def test_an_options_trade_placed_on_the_page_settles_and_the_balance_shows_it(pages, server):
    alice = pages("alice", "alice123")
    alice.get_by_test_id("option-amount").fill("100")
    alice.get_by_test_id("option-30-up").click()
    expect(alice.get_by_test_id("log")).to_contain_text('"change_type":"option_stake"')
    expect(alice.get_by_test_id("log")).to_contain_text(re.compile(r'"status":"(won|lost|draw)"'), timeout=5_000)
    expect(alice.get_by_test_id("open-trades")).to_be_empty()
    session = token(server, "alice", "alice123")
    stored = api(server, "GET", "/api/balance", token=session["token"])
    assert stored["version"] >= 2
    expect(alice.get_by_test_id("balance-USDT")).to_have_text(stored["balances"]["USDT"])
    expect(alice.get_by_test_id("version")).to_have_text(str(stored["version"]))


def test_pages_come_back_live_after_a_server_restart_with_the_updates_made_meanwhile(pages, server):
    alice, bob = pages("alice", "alice123"), pages("bob", "bob123")
    server.stop()
    expect(alice.get_by_test_id("ws-status")).not_to_have_attribute("data-state", "live", timeout=5_000)
    server.start(port=server.port)
    boss = token(server, "superadmin", "superadmin123")
    alice_id = token(server, "alice", "alice123")["user_id"]
    api(server, "POST", "/api/admin/deposits", {"user_id": alice_id, "amount": "7"}, boss["token"])
    for page in (alice, bob):
        expect(page.get_by_test_id("ws-status")).to_have_attribute("data-state", "live", timeout=15_000)
    expect(alice.get_by_test_id("balance-USDT")).to_have_text("10007", timeout=5_000)
    expect(bob.get_by_test_id("balance-USDT")).to_have_text("10000")
    assert alice.get_by_test_id("log").inner_text().count('"change":"7"') == 1


def test_the_admin_dashboard_follows_every_account_live(pages, server):
    dashboard = pages("admin", "admin123", "/admin")
    alice_id = token(server, "alice", "alice123")["user_id"]
    expect(dashboard.get_by_test_id(f"cell-{alice_id}-USDT")).to_have_text("10000")
    boss = token(server, "superadmin", "superadmin123")
    api(server, "POST", "/api/admin/deposits", {"user_id": alice_id, "amount": "50"}, boss["token"])
    api(server, "PUT", f"/api/admin/controls/{alice_id}", {"mode": "win"}, boss["token"])
    expect(dashboard.get_by_test_id(f"cell-{alice_id}-USDT")).to_have_text("10050", timeout=2_000)
    expect(dashboard.get_by_test_id(f"cell-{alice_id}-mode")).to_have_text("win", timeout=2_000)
    expect(dashboard.get_by_test_id("feed")).to_contain_text("control mode → win")


@pytest.mark.parametrize(("username", "password"), [("alice", "alice123"), ("admin", "admin123"), ("superadmin", "superadmin123")])
def test_the_comprehensive_test_passes_every_step_for_each_role(pages, username, password):
    page = pages(username, password)
    page.get_by_test_id("run-test").click()
    expect(page.get_by_test_id("test-summary")).to_have_attribute("data-done", re.compile("pass|fail"), timeout=30_000)
    failed = page.locator('[data-testid="test-results"] li[data-result="fail"]').all_inner_texts()
    assert failed == []
    expect(page.get_by_test_id("test-summary")).to_have_attribute("data-done", "pass")
