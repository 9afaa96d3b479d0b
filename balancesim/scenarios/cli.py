"""``balancesim scenario list|run`` and ``balancesim load``: each parses, makes one library call,
and maps errors to exit codes (1: the verdict failed, 2: bad input or an unreachable server,
130: interrupted)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Callable, Coroutine, TypeVar

import click

from balancesim.client import ApiError, LoginRefused, Unreachable
from balancesim.cliutil import InputError, check_url
from balancesim.scenarios._model import FILES, ScenarioError, load as load_scenario
from balancesim.scenarios._run import run_scenario
from balancesim.scenarios._worlds import InProcessWorld, RemoteWorld

__all__ = ["scenario", "load"]

T = TypeVar("T")


def remote_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--admin-user``, ``--admin-password`` and ``--db`` or ``--data-dir``, for runs against a
    server at ``--url``."""
    for option in reversed([
        click.option("--admin-user", default="superadmin", show_default=True,
                     help="With --url: a superadmin, to create the participants and act for them."),
        click.option("--admin-password", default="superadmin123", show_default=True, help="With --url: its password."),
        click.option("--db", "db_path", type=click.Path(exists=True, dir_okay=False),
                     help="With --url: the server's ledger file, to run ledger verify on."),
        click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
                     help="With --url: a cluster's data directory, to run ledger verify on every shard file."),
    ]):
        func = option(func)
    return func


def reaching(url: str | None, work: Coroutine[Any, Any, T], admin_user: str = "superadmin") -> T:
    """Run ``work``; a server that cannot be reached, or that refuses the run's own setup
    (a wrong ``--admin-password``, an admin that is not a superadmin), is an ``InputError``
    (exit 2), not a traceback and not exit 1, which means a failed verdict."""
    where = url or "the embedded server"
    try:
        return asyncio.run(work)
    except Unreachable as error:
        raise InputError(str(error)) from None
    except OSError as error:
        raise InputError(f"cannot reach {where}: {error}") from None
    except LoginRefused as error:
        hint = " (see --admin-user and --admin-password)" if error.username == admin_user else ""
        raise InputError(f"{where} refused the login of {error.username!r}: {error.message}{hint}") from None
    except ApiError as error:
        raise InputError(f"{where} refused the run's setup: {error}") from None


def one_ledger(db_path: str | None, data_dir: str | None) -> None:
    """``--db`` (an embedded server's file) and ``--data-dir`` (a cluster's) name different servers."""
    if db_path is not None and data_dir is not None:
        raise InputError("--db and --data-dir cannot be used together: --db is an embedded server's ledger "
                         "file, --data-dir a cluster's shard files")


@click.group()
def scenario() -> None:
    """Scripted multi-user scenarios that prove balances stay in sync."""


@scenario.command("list")
def scenario_list() -> None:
    """The shipped scenarios and what each proves."""
    for path in sorted(FILES.glob("*.toml")):
        click.echo(f"{path.stem:<20} {load_scenario(str(path)).description}")


@scenario.command("run")
@click.argument("name_or_path")
@click.option("--seed", type=int, help="Overrides the scenario's seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option("--url", callback=check_url,
              help="Run against a running server (real time) instead of in-process, e.g. http://127.0.0.1:3000.")
@remote_options
def scenario_run(name_or_path: str, seed: int | None, as_json: bool, url: str | None,
                 admin_user: str, admin_password: str, db_path: str | None, data_dir: str | None) -> None:
    """Run a scenario by NAME (see list) or PATH; exit 1 if an expectation fails."""
    one_ledger(db_path, data_dir)
    try:
        spec = load_scenario(name_or_path)
    except ScenarioError as error:
        raise InputError(str(error)) from None
    world = (RemoteWorld(url, admin_user, admin_password, db_path, data_dir) if url
             else InProcessWorld(spec.seed if seed is None else seed))
    work = run_scenario(spec, world, seed)
    outcome = reaching(url, work, admin_user) if url else asyncio.run(work)
    click.echo(json.dumps(outcome.__dict__, indent=2) if as_json else outcome.text())
    sys.exit(0 if outcome.ok else 1)


@click.command()
@click.option("--users", type=click.IntRange(1, 100_000), required=True, help="How many users, each with its own session.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), required=True, help="Seconds of load after setup.")
@click.option("--url", callback=check_url,
              help="A running server (http://HOST:PORT); without it an embedded one is started on a free loopback port.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the JSON report here and the chart beside it (.html).")
@click.option("--mix", default="option=5,spot=3,deposit=2,control=1", show_default=True, help="Operation weights.")
@click.option("--think", "think_s", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Mean seconds between one user's operations.")
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON report (as --report writes it) instead of the summary.")
@remote_options
def load(users: int, duration: float, url: str | None, report_path: str | None, mix: str, think_s: float,
         as_json: bool, admin_user: str, admin_password: str, db_path: str | None, data_dir: str | None) -> None:
    """Multi-user load over real HTTP and WebSocket connections; prints a summary: operations
    with their ok, refused and error counts, throughput, latency percentiles and the verdict.

    Exit 0 when every session stayed in sync, 1 when not, 130 on Ctrl-C (after the report).
    """
    from balancesim.load import LoadOptions, parse_mix, render_text, run_load, write_report

    one_ledger(db_path, data_dir)
    try:
        weights = parse_mix(mix)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--mix") from None

    def progress(elapsed: float, totals: dict[str, int]) -> None:
        done = min(1.0, elapsed / duration)
        click.echo(f"\r[{'#' * int(done * 30):<30}] {elapsed:5.0f}/{duration:.0f} s  {totals['ok']} ok  "
                   f"{totals['refused']} refused  {totals['errors']} errors", nl=False, err=True)

    options = LoadOptions(users, duration, url, admin_user, admin_password, weights, think_s, db_path, progress,
                          data_dir=data_dir)
    report = reaching(url, run_load(options), admin_user)
    click.echo("", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))
    if report_path:
        chart = write_report(report, report_path)
        click.echo(f"report: {report_path}, chart: {chart}", err=True)
    sys.exit(130 if report["interrupted"] else 0 if report["verdict"]["ok"] else 1)
