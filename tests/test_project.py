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
