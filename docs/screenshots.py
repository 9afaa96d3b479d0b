"""Regenerate the README's screenshots: a demo server, some activity, Debian's Chromium.

    PYTHONPATH=. python docs/screenshots.py

Writes docs/{test-page,dashboard}-{desktop,phone}.png; the dashboard is the superadmin's,
with its account actions and one account (bob) disabled. The server runs on a temporary
database at time scale 0.2 (a 30 s trade lasts 6 s) and is stopped at the end.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from balancesim.serveproc import ServerProcess

DOCS = Path(__file__).parent
SIZES = {"desktop": {"viewport": {"width": 1280, "height": 800}},
         "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def call(server: ServerProcess, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    request = urllib.request.Request(server.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(f"{tmp}/demo.db", "--demo", "--time-scale", "0.2", "--password-cost", "1024").start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                pages = {}
                for size, options in SIZES.items():
                    for name, user, path in (("test-page", "alice", "/"), ("dashboard", "superadmin", "/admin")):
                        page = browser.new_context(**options).new_page()
                        page.goto(server.url + path)
                        page.get_by_test_id("username").fill(user)
                        page.get_by_test_id("password").fill(f"{user}123")
                        page.get_by_test_id("login").click()
                        expect(page.get_by_test_id("ws-status")).to_have_attribute("data-state", "live", timeout=10_000)
                        pages[name, size] = page
                boss = call(server, "POST", "/api/login", {"username": "superadmin", "password": "superadmin123"})
                alice = call(server, "POST", "/api/login", {"username": "alice", "password": "alice123"})
                bob = call(server, "POST", "/api/login", {"username": "bob", "password": "bob123"})
                call(server, "POST", "/api/admin/deposits", {"user_id": alice["user_id"], "amount": "250", "description": "welcome bonus"}, boss["token"])
                call(server, "PUT", f"/api/admin/controls/{bob['user_id']}", {"mode": "lose"}, boss["token"])
                trader = pages["test-page", "desktop"]
                trader.get_by_test_id("option-amount").fill("100")
                trader.get_by_test_id("option-30-up").click()
                call(server, "POST", "/api/options", {"symbol": "ETHUSDT", "direction": "down", "amount": "40", "duration": 30}, bob["token"])
                call(server, "POST", "/api/spot/orders", {"symbol": "BTCUSDT", "side": "buy", "quantity": "0.01"}, alice["token"])
                time.sleep(7)  # both 30 s trades settle
                trader.get_by_test_id("option-amount").fill("25")
                trader.get_by_test_id("option-60-down").click()
                call(server, "POST", "/api/options", {"symbol": "BTCUSDT", "direction": "up", "amount": "15", "duration": 60}, bob["token"])
                # A superadmin's account actions: bob disabled (after a confirm) shows its badge.
                dashboard = pages["dashboard", "desktop"]
                dashboard.on("dialog", lambda dialog: dialog.accept())
                dashboard.get_by_test_id(f"disable-{bob['user_id']}").click()
                for size in SIZES:
                    expect(pages["dashboard", size].get_by_test_id(f"disabled-{bob['user_id']}")).to_be_visible()
                time.sleep(2)
                for (name, size), page in pages.items():
                    page.screenshot(path=str(DOCS / f"{name}-{size}.png"), full_page=True)
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
