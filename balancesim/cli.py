"""The ``balancesim`` command line: each command parses, makes one library call,
and turns domain errors into ``click.ClickException``."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from balancesim import errors, reports
from balancesim.vocabulary import ROLES
from balancesim.cliutil import InputError, data_dir_errors, ledger_file_errors

__all__ = ["cli"]


def db_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--db F``: the ledger file."""
    return click.option(
        "--db", "db_path", default="balancesim.db", show_default=True,
        type=click.Path(dir_okay=False), help="The SQLite ledger file.",
    )(func)


def data_dir_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--data-dir DIR [--shards S]``: a cluster's shard files (``DIR/shard-K.db``) instead of ``--db``."""
    func = click.option(
        "--shards", type=click.IntRange(1), default=None,
        help="The cluster's number of shards: needed for a new directory, checked against an existing one.",
    )(func)
    return click.option(
        "--data-dir", type=click.Path(file_okay=False), default=None,
        help="A cluster's data directory: every shard file DIR/shard-K.db instead of one --db file.",
    )(func)


def one_ledger_source(db_given: bool, data_dir: str | None, shards: int | None) -> None:
    """``--db`` and ``--data-dir`` name different things: refuse both at once, and ``--shards`` alone."""
    if db_given and data_dir is not None:
        raise InputError("--db and --data-dir cannot be used together: --db is one ledger file, "
                         "--data-dir a cluster's shard files")
    if shards is not None and data_dir is None:
        raise InputError("--shards goes with --data-dir")


def ledger_source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--db F`` or ``--data-dir DIR [--shards S]``: one ledger file that must exist,
    or every shard file of a cluster; either's problems are one line, exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        db_path, data_dir = kwargs["db_path"], kwargs["data_dir"]
        one_ledger_source(db_path is not None, data_dir, kwargs["shards"])
        if db_path is None and data_dir is None:
            raise InputError("give --db FILE (a ledger file) or --data-dir DIR (a cluster's shard files)")
        checked = ledger_file_errors(func) if data_dir is None else data_dir_errors(func)
        return checked(*args, **kwargs)

    wrapper = data_dir_options(wrapper)
    return click.option("--db", "db_path", default=None, help="The SQLite ledger file.")(wrapper)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def domain_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map domain errors (a taken name, an unknown user) to a one-line ``Error: …`` and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.BalancesimError as error:
            raise click.ClickException(str(error)) from error

    return wrapper


LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str) -> None:
    """Log lines on stderr at ``level``; the access log (a line per request) only at debug."""
    import logging

    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


@click.group()
@click.version_option(package_name="balancesim")
def cli() -> None:
    """balancesim: actor-model balance synchronization on a simulated trading platform."""


@cli.group()
def users() -> None:
    """Manage accounts."""


@users.command("create")
@db_option
@data_dir_options
@click.option("--username", required=True, help="Unique login name.")
@click.option("--password", required=True, help="Login password (stored as a scrypt hash).")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@click.pass_context
@domain_errors
def users_create(ctx: click.Context, db_path: str, data_dir: str | None, shards: int | None,
                 username: str, password: str, role: str) -> None:
    """Create an account and print its user_id (a server may be running on the file).

    The engine's rules judge the name, password and role, as for ``POST /api/users``.
    With --data-dir, the account goes to its username's shard file (a cluster may
    be running on the directory); a new directory is made with --shards files.
    """
    import sqlite3

    one_ledger_source(ctx.get_parameter_source("db_path") is not click.core.ParameterSource.DEFAULT,
                      data_dir, shards)
    if data_dir is not None:
        from balancesim.cluster import create_user_in_data_dir

        user_id, _ = data_dir_errors(create_user_in_data_dir)(data_dir, shards, username, password, role)
        click.echo(user_id)
        return

    from balancesim.engine import create_user_in

    try:
        user_id = create_user_in(db_path, username, password, role)
    except sqlite3.Error as error:
        raise InputError(f"cannot use {db_path} as a ledger: {error}") from None
    click.echo(user_id)


@cli.group()
def ledger() -> None:
    """Inspect and check a ledger file."""


@ledger.command("verify")
@ledger_source_options
@domain_errors
def ledger_verify(db_path: str | None, data_dir: str | None, shards: int | None) -> None:
    """Recompute every balance from the entries; exit 1 if any invariant fails.

    With --data-dir: every shard file, a line each (and that every id there names
    its shard); exit 0 only when every shard holds.
    """
    if data_dir is None:
        report = reports.verify(db_path)
        click.echo(report.text())
        sys.exit(0 if report.ok else 1)
    from balancesim.cluster import verify_data_dir

    verified = verify_data_dir(data_dir, shards)
    for shard in verified:
        click.echo(shard.text())
    sys.exit(0 if all(shard.report.ok for shard in verified) else 1)


@ledger.command("history")
@ledger_source_options
@click.option("--user", "user", required=True, help="A user_id or a username.")
@json_option
@domain_errors
def ledger_history(db_path: str | None, data_dir: str | None, shards: int | None, user: str, as_json: bool) -> None:
    """An account's entries, oldest first (with --data-dir, from the shard the account lives on)."""
    if data_dir is None:
        entries = reports.history(db_path, user)
    else:
        from balancesim.cluster import history_in_data_dir

        entries = history_in_data_dir(data_dir, user, shards)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        click.echo(
            f"v{e['version']:<5} {e['ts']}  {e['type']:<14} {e['amount']:>18} {e['asset']:<4} "
            f"→ {e['balance_after']:>18}  {e['description']}"
        )


@ledger.command("audit")
@ledger_source_options
@json_option
@domain_errors
def ledger_audit(db_path: str | None, data_dir: str | None, shards: int | None, as_json: bool) -> None:
    """Every settlement not decided by the market, per account, with counts and totals
    (with --data-dir, over every shard)."""
    if data_dir is None:
        result = reports.audit(db_path)
    else:
        from balancesim.cluster import audit_data_dir

        result = audit_data_dir(data_dir, shards)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{result['count']} settlement(s) not decided by the market; stakes {result['stakes']} USDT, "
        f"payouts {result['payouts']} USDT"
    )
    for acct in result["accounts"]:
        deciders = ", ".join(f"{name} × {n}" for name, n in sorted(acct["by_decider"].items()))
        click.echo(
            f"  user {acct['user_id']} ({acct['username']}): {acct['count']} forced, stakes "
            f"{acct['stakes']}, payouts {acct['payouts']} [{deciders}]"
        )
        for change in acct["control_changes"]:
            click.echo(f"    mode → {change['mode']} by user {change['set_by']} at {change['ts']}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@db_option
@click.option("--time-scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Multiplies every trade duration (0.01: 100× sooner).")
@click.option("--seed", type=int, help="The market's seed (default: the current time).")
@click.option("--demo", is_flag=True, help="On an empty database, create demo accounts and say so.")
@click.option("--password-cost", type=click.IntRange(2, 2**20), default=2**14, show_default=True,
              help="scrypt N for new passwords (a power of two); lower only for throwaway load users.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="On stderr. info: one line per mutation, warning: per refusal, debug: per request too.")
@click.option("--trust-proxy", is_flag=True,
              help="Behind a proxy you run: the login limiter counts the client address it appends "
                   "to X-Forwarded-For, not the proxy's.")
def serve(host: str, port: int, db_path: str, time_scale: float, seed: int | None, demo: bool,
          password_cost: int, log_level: str, trust_proxy: bool) -> None:
    """Run the engine and the gateway until SIGINT/SIGTERM, then drain and exit 0.

    Exit 2, having changed nothing, when the port is busy or the ledger cannot be opened.
    """
    from balancesim.gateway import CannotStart, ServeOptions
    from balancesim.gateway import serve as run

    if password_cost & (password_cost - 1):
        raise click.BadParameter("must be a power of two", param_hint="--password-cost")
    configure_logging(log_level)
    try:
        run(ServeOptions(host, port, db_path, time_scale, seed, demo, password_cost=password_cost,
                         trust_proxy=trust_proxy), echo=click.echo)
    except CannotStart as error:
        raise InputError(str(error)) from None


@cli.command()
@click.option("--trials", type=click.IntRange(1), default=5, show_default=True, help="Kill-and-restart trials.")
@click.option("--users", type=click.IntRange(1, 200), default=6, show_default=True, help="Concurrent users per trial.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the moments of the kills and the operations.")
def chaos(trials: int, users: int, seed: int) -> None:
    """Kill the server (SIGKILL) under load and prove nothing acknowledged was lost; exit 1 if anything was."""
    import asyncio

    from balancesim.chaos import run_trials

    results = asyncio.run(run_trials(trials, users=users, seed=seed))
    for result in results:
        click.echo(result.text())
    failed = [r for r in results if not r.ok]
    click.echo(f"{len(results)} trials, {sum(r.acknowledged for r in results)} acknowledged mutations checked, "
               f"{len(failed)} failed")
    sys.exit(1 if failed else 0)


def _register() -> None:
    from balancesim.scenarios.cli import load, scenario

    cli.add_command(scenario)
    cli.add_command(load)


_register()


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
