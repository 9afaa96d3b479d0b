"""``balancesim load`` with real clients against an embedded server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from click.testing import CliRunner

from balancesim.cli import cli
from balancesim.load import REFUSALS, tally


def test_fifty_users_for_a_few_seconds_produce_a_report_whose_verdict_holds(tmp_path):
    report_path = tmp_path / "load.json"
    result = CliRunner().invoke(cli, ["load", "--users", "50", "--duration", "3", "--think", "0.3",
                                      "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    # Refusals the protocol promises (selling BTC not bought yet) are not errors.
    ops = report["operations"]
    assert report["errors"] == 0, ops
    assert report["refused"] == sum(n for counts in ops.values() for code, n in counts.items() if code in REFUSALS)
    # The readable summary on stdout: the table, the throughput, the percentiles, the verdict.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("load: 50 users for ") and "of setup, against http://127.0.0.1:" in lines[0]
    assert lines[2].split() == ["operation", "ok", "refused", "errors"]
    assert sorted(line.split()[0] for line in lines[3:7]) == ["control", "deposit", "option", "spot"]
    assert lines[7].split()[:4] == ["total", str(report["ok_ops"]), str(report["refused"]), "0"]
    assert f"throughput: {report['throughput_ops_per_s']:g} ok operations/s" in lines
    assert any(line.split()[:7] == ["latency", "(ms)", "p50", "p90", "p99", "p99.9", "max"] for line in lines)
    assert any(line.startswith("HTTP ") for line in lines) and "verdict: in sync" in lines
    assert lines[-1].startswith("ledger OK")
    assert report["verdict"]["ok"] and report["verdict"]["problems"] == []
    assert report["verdict"]["sessions"] == 50 and report["verdict"]["ledger"].startswith("ledger OK")
    assert report["ok_ops"] > 100 and set(report["operations"]) == {"option", "spot", "deposit", "control"}
    for key in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms"):
        assert report["http_latency"][key] > 0 and report["delivery_latency"][key] > 0
    # Every mutation's balance_update reached its owner: a deposit's, each spot leg's, each stake's.
    ops = report["operations"]
    assert report["undelivered"] == 0
    assert report["delivery_latency"]["count"] == ops["deposit"]["ok"] + 2 * ops["spot"]["ok"] + ops["option"]["ok"]
    assert report["distribution"]["http"][-1][0] == 100 and report["series"]["http"]
    chart = (tmp_path / "load.html").read_text()
    assert chart.startswith("<!doctype html>") and chart.count("<svg") == 3 and "in sync" in chart
    assert "<script" not in chart and "http" not in chart.split("<h2>Report")[0].replace("http://www.w3.org/2000/svg", "")


def test_a_bad_mix_is_a_usage_error():
    result = CliRunner().invoke(cli, ["load", "--users", "1", "--duration", "1", "--mix", "option=0"])
    assert result.exit_code == 2 and "--mix" in result.output


def test_ctrl_c_stops_the_clients_prints_the_report_so_far_and_exits_130(tmp_path):
    # Its own process group, which gets the SIGINT as a terminal's Ctrl-C would deliver it:
    # the embedded server must not die under the clients before the verdict.
    process = subprocess.Popen(
        [sys.executable, "-m", "balancesim.cli", "load", "--users", "5", "--duration", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    progress = ""
    while " ok " not in progress:
        char = process.stderr.read(1)
        assert char, "load ended before it started"
        progress += char
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    report = json.loads(out)
    assert report["interrupted"] and report["duration_s"] < 60
    assert {"refused", "errors", "series", "distribution"} <= set(report)  # --json: the full report
    assert report["verdict"]["ok"] and report["verdict"]["ledger"].startswith("ledger OK")


def test_an_unreachable_url_is_a_clean_error_with_exit_2():
    result = CliRunner().invoke(cli, ["load", "--users", "2", "--duration", "1", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot reach http://127.0.0.1:9: ")
    assert "Traceback" not in result.output


def test_business_refusals_are_counted_apart_from_errors():
    counts = [{"ok": 10, "insufficient_funds": 3}, {"ok": 2, "conflict": 1, "timeout": 4, "Unreachable": 1}]
    assert tally(counts) == {"ok": 12, "refused": 4, "errors": 5}
