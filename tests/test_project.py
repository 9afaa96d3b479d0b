"""The project installs and tests itself as the README says, on a fresh Debian 12 machine."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    section = ROOT.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip()


def test_the_readme_test_command_is_the_one_script_ci_runs_too():
    assert readme_block("Test it") == "bash scripts/test"
    assert "root" in ROOT.joinpath("README.md").read_text().split("## Test it", 1)[1].split("\n## ", 1)[0]
    ci = ROOT.joinpath(".ci/run").read_text()
    assert "scripts/test" in ci and "CI=true" in ci and "rm -rf .venv" in ci


def test_scripts_test_installs_what_a_fresh_machine_lacks_then_runs_pytest():
    script = ROOT / "scripts/test"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needed in ("/usr/bin/chromium", "redis-server", "apt-get update", "DEBIAN_FRONTEND=noninteractive",
                   "apt-get install", ".venv", "pip install --quiet -e '.[test]'", 'python -m pytest -q "$@"'):
        assert needed in text, needed
    # apt-get update runs before the install it serves.
    assert text.index("apt-get update") < text.index("apt-get install")


def test_cluster_mode_dependencies_are_installed_with_the_project():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = config["options"]["install_requires"].split()
    assert "redis>=5" in requires and "hiredis" in requires


def test_the_readme_links_only_to_files_inside_the_repository():
    readme = ROOT.joinpath("README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert "docs/protocol.md" in local
    for target in local:
        assert not target.startswith(("/", "..")), target
        assert (ROOT / target).exists(), target


def test_the_protocol_document_covers_every_route_message_close_code_and_command():
    doc = ROOT.joinpath("docs/protocol.md").read_text()
    routes = [
        "POST /api/login", "POST /api/logout", "POST /api/users", "GET /api/users", "PATCH /api/users/{user_id}",
        "GET /api/balance", "GET /api/users/{user_id}/balance", "GET /api/transactions",
        "GET /api/users/{user_id}/transactions", "POST /api/admin/deposits", "POST /api/admin/withdrawals",
        "POST /api/admin/adjustments", "PUT /api/admin/controls/{user_id}", "POST /api/admin/trades/{trade_id}/force",
        "POST /api/options", "GET /api/options", "GET /api/admin/trades", "POST /api/spot/orders", "GET /api/market",
        "GET /healthz", "GET /openapi.json", "GET /readyz", "GET /ws?token=",
    ]
    for route in routes:
        assert f"`{route}" in doc, route
    # Served now, so not marked as the contract's alone.
    for route in ("POST /api/logout", "PATCH /api/users/{user_id}", "GET /api/admin/trades", "GET /openapi.json",
                  "GET /readyz"):
        entry = doc.split(f"**`{route}", 1)[1].split("\n- ", 1)[0]
        assert "not yet served" not in entry, route
    messages = ["user_balance_init", "balance_update", "admin_balance_monitor", "user_update",
                "trading_control_update", "trade_update", "price_tick", "error", "pong", "ping"]
    for name in messages:
        assert f"`{name}`" in doc or f'"{name}"' in doc, name
    for code in ("1001", "4001", "4008", "1012"):
        assert f"| `{code}` |" in doc, code
    for field in ("transaction_id", "balance_after", "initiated_by", "payout_rate", "decided_by", "forced_outcome"):
        assert f"`{field}`" in doc, field
    from balancesim.cli import cli

    for name, command in cli.commands.items():
        assert f"balancesim {name}" in doc, name
    for choice in ("T<user_id>-<version", "Idempotency-Key", "settled_after_restart", "405 invalid_request",
                   "lone surrogate", "scrypt", "10,000 USDT"):
        assert choice in doc, choice
