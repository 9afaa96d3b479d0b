"""Shipped scenarios pass on both runners; broken ones fail readably."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from balancesim.cli import cli
from balancesim.scenarios import FILES

QUICK = sorted(p.stem for p in FILES.glob("*.toml") if p.stem != "virtual-day")


def run(*args: str):
    return CliRunner().invoke(cli, ["scenario", "run", *args])


def test_scenario_list_names_every_shipped_scenario():
    result = CliRunner().invoke(cli, ["scenario", "list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == sorted(
        ["comprehensive", "options-trade", "spot-trading", "superadmin-deposit", "trading-control", "virtual-day"]
    )


@pytest.mark.parametrize("name", QUICK)
def test_every_shipped_scenario_passes_in_process(name):
    result = run(name, "--json")
    outcome = json.loads(result.output)
    assert result.exit_code == 0, outcome
    assert outcome["ok"] and outcome["problems"] == [] and outcome["steps_run"] > 5
    assert outcome["ledger"].startswith("ledger OK")


@pytest.mark.slow
def test_the_virtual_day_passes_in_process():
    result = run("virtual-day", "--json")
    outcome = json.loads(result.output)
    assert result.exit_code == 0, outcome["failure"]
    assert "1002 accounts" in outcome["ledger"] and "20000 trades" in outcome["ledger"]


def test_the_same_seed_gives_the_same_digest_and_another_seed_another():
    digests = [json.loads(run("options-trade", "--json", "--seed", seed).output)["digest"] for seed in ("5", "5", "6")]
    assert digests[0] == digests[1] != digests[2]


def test_a_broken_expectation_fails_with_a_readable_report(tmp_path):
    broken = (FILES / "superadmin-deposit.toml").read_text().replace('balance = "250.5", change_type', 'balance = "999", change_type')
    path = tmp_path / "broken.toml"
    path.write_text(broken)
    result = run(str(path))
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("scenario superadmin-deposit (in-process): FAIL")
    assert lines[1].startswith(f"  first broken expectation: step 2 ({path}:")
    assert "alice's session did not receive a balance_update with {'change': '250.5', 'balance': '999'" in lines[1]
    assert "it received ['type=balance_update" in lines[1]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("name = 'x'\n[participants\n", 2, "not valid TOML"),
        ("[participants]\nann = { role = 'king' }\n", 2, "participant 'ann' needs role"),
        ("[participants]\nann = { role = 'user' }\n\n[[steps]]\nadvance = 1\n\n[[steps]]\ndo = 'fly'\nas = 'ann'\n", 7, "step 2: do = 'fly' is not one of"),
        ("[participants]\nann = { role = 'user' }\n\n[[steps]]\ndo = 'option'\nas = 'bob'\nsymbol='BTCUSDT'\ndirection='up'\namount='1'\nduration=30\n", 4, "as = 'bob' is not a participant"),
        ("[participants]\nann = { role = 'user' }\n\n[[steps]]\nexpect = 'balance'\nwho = 'ann'\n", 4, "needs equals"),
        ("[participants]\nann = { role = 'user' }\n\n[[steps]]\nadvance = 1\ncolor = 'red'\n", 4, "advance takes a positive number"),
        ("[participants]\nann = { role = 'user' }\n\n[[steps]]\nexpect = 'message'\nwho = 'ann'\ntype = 'x'\nfields = 3\n", 4, "step 1: fields must be a table"),
        ("seed = 1\n\n[crowd]\ncount = 0\n", 3, "crowd needs count = 1 to"),
        ("participants = 'ann'\n", 1, "participants must be a table"),
        ("[participants]\nann = { role = 'user' }\nboss = { role = 'superadmin' }\n\n[[steps]]\ndo = 'deposit'\n"
         "as = 'boss'\nto = 'ann'\namount = 'abc'\n", 9, 'step 1: amount = "abc" is not a decimal string like "100.5"'),
        ("[participants]\nann = { role = 'user', deposit = '10' }\n\n[[steps]]\nadvance = 1\n\n[[steps]]\ndo = 'spot'\n"
         "as = 'ann'\nsymbol = 'BTCUSDT'\nquantity = 1\nside = 'buy'\n", 11, "step 2: quantity = 1 is not a decimal string"),
        ("[participants]\nann = { role = 'user', deposit = '1e3' }\n", 2, "participant 'ann': deposit must be a decimal string"),
    ],
)
def test_a_malformed_file_names_the_file_the_line_and_the_problem(tmp_path, text, line, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run(str(path))
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {path}:{line}: ")
    assert problem in result.output


def test_a_step_expecting_invalid_amount_may_send_a_malformed_amount(tmp_path):
    path = tmp_path / "refused.toml"
    path.write_text("[participants]\nann = { role = 'user' }\nboss = { role = 'superadmin' }\n\n[[steps]]\n"
                    "do = 'deposit'\nas = 'boss'\nto = 'ann'\namount = 'abc'\nerror = 'invalid_amount'\n")
    result = run(str(path))
    assert result.exit_code == 0, result.output


def test_an_unknown_scenario_name_lists_the_names_and_exits_2():
    result = run("nosuch")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "Error: no scenario named 'nosuch'; the shipped ones are comprehensive, options-trade, spot-trading, "
        "superadmin-deposit, trading-control, virtual-day (or give the path of a .toml file)\n"
    )


def test_the_readme_documents_every_step_field():
    from pathlib import Path

    from balancesim.scenarios._model import COMMON, EXPECTS, OPS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Scenarios", 1)[1].split("\n## ", 1)[0]
    for kind, table in (("do", OPS), ("expect", EXPECTS)):
        for name, (required, optional) in table.items():
            row = next((line for line in section.splitlines() if line.startswith(f"| `{kind} = \"{name}\"`")), None)
            assert row, f"no row for {kind} = {name!r}"
            for key in required | optional:
                assert f"`{key}`" in row, (name, key)
    for key in ("advance", "save", *COMMON):
        assert f"`{key}`" in section, key


def test_an_unreachable_url_is_a_clean_error_with_exit_2():
    result = run("options-trade", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot reach http://127.0.0.1:9")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["trading-control", "options-trade"])
def test_a_scenario_passes_against_a_real_server(start_server, name):
    # Embedded and as a cluster (start_server), the ledger verified either way: the file
    # (--db) or every shard file of the data directory (--data-dir).
    server = start_server("--demo", "--time-scale", "0.01", "--password-cost", "1024")
    result = run(name, "--url", server.url, *server.ledger_args(), "--json")
    outcome = json.loads(result.output)
    assert result.exit_code == 0, outcome
    assert outcome["world"] == "remote" and outcome["ok"] and outcome["problems"] == []
    assert outcome["ledger"].startswith("ledger OK")


def test_db_and_data_dir_together_are_refused(tmp_path):
    result = run("options-trade", "--url", "http://127.0.0.1:9", "--db", __file__, "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and "--db and --data-dir cannot be used together" in result.output
