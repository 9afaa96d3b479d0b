"""``balancesim scenario list|run``: each parses, makes one library call, maps errors to exit codes."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from balancesim.scenarios._model import FILES, ScenarioError, load
from balancesim.scenarios._run import run_scenario
from balancesim.scenarios._worlds import InProcessWorld, RemoteWorld

__all__ = ["scenario"]


@click.group()
def scenario() -> None:
    """Scripted multi-user scenarios that prove balances stay in sync."""


@scenario.command("list")
def scenario_list() -> None:
    """The shipped scenarios and what each proves."""
    for path in sorted(FILES.glob("*.toml")):
        click.echo(f"{path.stem:<20} {load(str(path)).description}")


@scenario.command("run")
@click.argument("name_or_path")
@click.option("--seed", type=int, help="Overrides the scenario's seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option("--url", help="Run against a running server (real time) instead of in-process.")
@click.option("--admin-user", default="superadmin", show_default=True, help="With --url: a superadmin to create participants.")
@click.option("--admin-password", default="superadmin123", show_default=True, help="With --url: its password.")
@click.option("--db", "db_path", type=click.Path(exists=True, dir_okay=False), help="With --url: the server's ledger, to verify.")
def scenario_run(name_or_path: str, seed: int | None, as_json: bool, url: str | None,
                 admin_user: str, admin_password: str, db_path: str | None) -> None:
    """Run a scenario by NAME (see list) or PATH; exit 1 if an expectation fails."""
    try:
        spec = load(name_or_path)
    except ScenarioError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    world = RemoteWorld(url, admin_user, admin_password, db_path) if url else InProcessWorld(spec.seed if seed is None else seed)
    try:
        outcome = asyncio.run(run_scenario(spec, world, seed))
    except (ConnectionError, OSError) as error:
        click.echo(f"Error: cannot reach {url}: {error}", err=True)
        sys.exit(2)
    click.echo(json.dumps(outcome.__dict__, indent=2) if as_json else outcome.text())
    sys.exit(0 if outcome.ok else 1)
