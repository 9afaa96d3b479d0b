"""``balancesim load`` with real clients against an embedded server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from click.testing import CliRunner

from balancesim.cli import cli


def test_fifty_users_for_a_few_seconds_produce_a_report_whose_verdict_holds(tmp_path):
    report_path = tmp_path / "load.json"
    result = CliRunner().invoke(cli, ["load", "--users", "50", "--duration", "3", "--think", "0.3",
                                      "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["verdict"]["ok"] and report["verdict"]["problems"] == []
    assert report["verdict"]["sessions"] == 50 and report["verdict"]["ledger"].startswith("ledger OK")
    assert report["ok_ops"] > 100 and set(report["operations"]) == {"option", "spot", "deposit", "control"}
    for key in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms"):
        assert report["http_latency"][key] > 0 and report["delivery_latency"][key] > 0
    chart = (tmp_path / "load.html").read_text()
    assert chart.startswith("<!doctype html>") and "<svg" in chart and "in sync" in chart


def test_a_bad_mix_is_a_usage_error():
    result = CliRunner().invoke(cli, ["load", "--users", "1", "--duration", "1", "--mix", "option=0"])
    assert result.exit_code == 2 and "--mix" in result.output


def test_ctrl_c_stops_the_clients_prints_the_report_so_far_and_exits_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "balancesim.cli", "load", "--users", "5", "--duration", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    progress = ""
    while " ok " not in progress:
        char = process.stderr.read(1)
        assert char, "load ended before it started"
        progress += char
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    report = json.loads(out)
    assert report["interrupted"] and report["duration_s"] < 60
