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
@click.option("--redis", "redis_url", default=None,
              help="Through a running cluster: its Redis, redis://user:pass@host:port (the secret from "
                   "$BALANCESIM_CLUSTER_SECRET, or --data-dir's cluster.secret).")
@click.pass_context
@domain_errors
def users_create(ctx: click.Context, db_path: str, data_dir: str | None, shards: int | None,
                 username: str, password: str, role: str, redis_url: str | None) -> None:
    """Create an account and print its user_id (a server may be running on the file).

    The engine's rules judge the name, password and role, as for ``POST /api/users``.
    With --data-dir, the account goes to its username's shard file (a cluster may
    be running on the directory); a new directory is made with --shards files.
    With --redis, it goes through the running cluster to its username's shard, as a
    gateway sends it (for a machine without the data directory).
    """
    import sqlite3

    db_given = ctx.get_parameter_source("db_path") is not click.core.ParameterSource.DEFAULT
    if redis_url is not None:
        if db_given or shards is not None:
            raise InputError("--redis creates the account through a running cluster: --db and --shards "
                             "do not go with it (--data-dir may, for its cluster.secret)")
        click.echo(_create_through_cluster(redis_url, data_dir, username, password, role))
        return
    one_ledger_source(db_given, data_dir, shards)
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


# The Redis URL carries Redis's password: ``serve`` hands it to its children in this
# variable (``cluster._supervisor.REDIS_URL_ENV``), never on their command line.
REDIS_URL_ENV = "BALANCESIM_REDIS_URL"


def log_level_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--log-level``: what goes to stderr."""
    return click.option(
        "--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
        help="On stderr. info: one line per mutation, warning: per refusal, debug: per request too.",
    )(func)


def password_cost_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--password-cost``: scrypt N for new passwords."""
    return click.option(
        "--password-cost", type=click.IntRange(2, 2**20), default=2**14, show_default=True,
        help="scrypt N for new passwords (a power of two); lower only for throwaway load users.",
    )(func)


def engine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--time-scale`` and ``--seed``: what an engine (embedded or a shard) is started with."""
    func = click.option("--seed", type=int, help="The market's seed (default: the current time).")(func)
    return click.option(
        "--time-scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
        help="Multiplies every trade duration (0.01: 100× sooner).",
    )(func)


def trust_proxy_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust-proxy``: count the client address a proxy appends."""
    return click.option(
        "--trust-proxy", is_flag=True,
        help="Behind a proxy you run: the login limiter counts the client address it appends "
             "to X-Forwarded-For, not the proxy's.",
    )(func)


def _create_through_cluster(redis_url: str, data_dir: str | None, username: str, password: str, role: str) -> int:
    """``users create --redis``: the new account's user_id, or a one-line error (exit 1 for
    a refusal such as a taken name, exit 2 when the cluster cannot be reached)."""
    import asyncio
    import os

    from balancesim.cluster import SECRET_ENV, SECRET_FILE, SecretError, load_secret
    from balancesim.cluster._processes import RedisUnreachable, create_user_through

    if os.environ.get(SECRET_ENV) is None and data_dir is not None \
            and not os.path.exists(os.path.join(data_dir, SECRET_FILE)):
        # load_secret would make a new one, which no shard knows.
        raise InputError(f"{data_dir} has no {SECRET_FILE}: give the data directory of the running cluster, "
                         f"or set ${SECRET_ENV}")
    try:
        secret = bytes(load_secret(data_dir))
    except SecretError as error:
        raise InputError(str(error)) from None
    try:
        created = asyncio.run(create_user_through(redis_url, secret, username, password, role))
    except (RedisUnreachable, TimeoutError) as error:
        raise InputError(str(error)) from None
    except (errors.Unavailable, errors.Timeout) as error:
        raise InputError(f"the cluster did not create the account: {error.message}") from None
    return created["user_id"]


def check_password_cost(password_cost: int) -> None:
    if password_cost & (password_cost - 1):
        raise click.BadParameter("must be a power of two", param_hint="--password-cost")


def workers_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A click callback: ``--workers N|auto`` (``auto``: one per core this process may use)."""
    import os

    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is not a positive number or 'auto'")
    return int(value)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="The SQLite ledger file of the embedded server  [default: balancesim.db].")
@engine_options
@click.option("--demo", is_flag=True, help="On an empty database, create demo accounts and say so.")
@password_cost_option
@log_level_option
@trust_proxy_option
@click.option("--workers", default="1", show_default=True, callback=workers_option,
              help="Cluster mode: this many gateway processes sharing the port ('auto': one per core).")
@click.option("--shards", type=click.IntRange(1), default=None,
              help="Cluster mode: the number of shards (default: --workers for a new data directory, "
                   "else what its files record).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Cluster mode: the shards' ledgers DIR/shard-K.db, the secret and Redis's socket  "
                   "[default: balancesim-data].")
@click.option("--redis", "redis_url", default=None,
              help="Cluster mode: use this Redis (redis://user:pass@host:port) instead of starting one.")
@click.option("--timeout-s", type=click.FloatRange(0.1, 600), default=None,
              help="Cluster mode: how long a gateway waits for a shard's answer before it asks for the "
                   "outcome (and as long again before it says 504)  [default: 5].")
def serve(host: str, port: int, db_path: str | None, time_scale: float, seed: int | None, demo: bool,
          password_cost: int, log_level: str, trust_proxy: bool, workers: int, shards: int | None,
          data_dir: str | None, redis_url: str | None, timeout_s: float | None) -> None:
    """Run the engine and the gateway until SIGINT/SIGTERM, then drain and exit 0.

    Exit 2, having changed nothing, when the port is busy or the ledger cannot be opened.
    With --workers N (N > 1), --shards, --data-dir or --redis: cluster mode on this
    machine (gateways, shards and, without --redis, a private redis-server as child
    processes); a data directory in use by another serve is also exit 2.
    """
    from balancesim.gateway import CannotStart

    check_password_cost(password_cost)
    configure_logging(log_level)
    cluster_mode = workers != 1 or shards is not None or data_dir is not None or redis_url is not None
    if timeout_s is not None and not cluster_mode:
        raise InputError("--timeout-s is the cluster gateways' deadline for a shard's answer: give --workers N")
    if not cluster_mode:
        from balancesim.gateway import ServeOptions
        from balancesim.gateway import serve as run

        try:
            run(ServeOptions(host, port, db_path or "balancesim.db", time_scale, seed, demo,
                             password_cost=password_cost, trust_proxy=trust_proxy), echo=click.echo)
        except CannotStart as error:
            raise InputError(str(error)) from None
        return
    if db_path is not None:
        raise InputError("--db is the embedded server's ledger file; in cluster mode the ledgers are "
                         "--data-dir's shard files")
    from balancesim.cluster._supervisor import SuperviseOptions, supervise

    try:
        supervise(SuperviseOptions(workers, shards, data_dir or "balancesim-data", redis_url, host, port,
                                   time_scale, seed, demo, password_cost, log_level, trust_proxy,
                                   timeout_s=timeout_s), echo=click.echo)
    except CannotStart as error:
        raise InputError(str(error)) from None


@cli.command()
@click.option("--redis", "redis_url", required=True, envvar=REDIS_URL_ENV,
              help=f"The cluster's Redis, redis://user:pass@host:port (or ${REDIS_URL_ENV}).")
@click.option("--index", type=click.IntRange(0), required=True, help="This shard's index K (0 … S-1).")
@click.option("--shards", type=click.IntRange(1), required=True, help="The cluster's number of shards S.")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
              help="This shard's ledger file (DIR/shard-K.db in a data directory).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address for this shard's /metrics (Prometheus text).")
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Port for this shard's /metrics (0: any free one; cluster status lists it).")
@engine_options
@password_cost_option
@log_level_option
def shard(redis_url: str, index: int, shards: int, db_path: str, metrics_host: str, metrics_port: int,
          time_scale: float, seed: int | None, password_cost: int, log_level: str) -> None:
    """Run one shard of a cluster until SIGINT/SIGTERM (for a deployment across machines).

    The secret comes from $BALANCESIM_CLUSTER_SECRET. The file records its placement
    and index when new, and must agree with --shards and --index after that. Prints
    "shard K of S on FILE" once it serves. Its Prometheus metrics are on
    http://METRICS_HOST:PORT/metrics, an address its heartbeat publishes.
    """
    import asyncio

    import redis

    from balancesim.cluster import Placement, PlacementError, SecretError, ShardFileInUse, load_secret
    from balancesim.cluster._processes import ShardOptions, run_shard
    from balancesim.cluster._watchdog import watch_parent

    check_password_cost(password_cost)
    configure_logging(log_level)
    watch_parent()
    if index >= shards:
        raise InputError(f"--index {index} is not a shard of {shards} (0 … {shards - 1})")
    try:
        secret = load_secret(None)
    except SecretError as error:
        raise InputError(str(error)) from None

    from balancesim.gateway._server import CannotStart, check_ledger, listen

    try:
        check_ledger(db_path)  # a sentence, not a traceback, for a path it cannot open
    except CannotStart as error:
        raise InputError(str(error)) from None
    try:
        metrics_sockets = listen(metrics_host, metrics_port)  # a busy port: before anything starts
    except CannotStart as error:
        raise InputError(f"--metrics-port: {error}") from None

    def ready() -> None:
        click.echo(f"shard {index} of {shards} on {db_path}")
        sys.stdout.flush()

    try:
        asyncio.run(run_shard(ShardOptions(redis_url, index, Placement.for_new(shards), db_path, secret,
                                           time_scale, seed, password_cost, metrics_host), on_ready=ready,
                              metrics_sockets=metrics_sockets))
    except (PlacementError, ShardFileInUse) as error:
        raise InputError(str(error)) from None
    except (OSError, redis.exceptions.RedisError) as error:  # a Redis it cannot reach at start
        # redis-py's text names the host and port, never the URL with its password.
        raise InputError(f"cannot reach the cluster's Redis: {type(error).__name__}: {error}") from None


@cli.command()
@click.option("--redis", "redis_url", required=True, envvar=REDIS_URL_ENV,
              help=f"The cluster's Redis, redis://user:pass@host:port (or ${REDIS_URL_ENV}).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@log_level_option
@trust_proxy_option
@click.option("--timeout-s", type=click.FloatRange(0.1, 600), default=5.0, show_default=True,
              help="How long to wait for a shard's answer before asking for the outcome (and as long "
                   "again before answering 504).")
@click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
              help="Also serve /metrics on this port of --host (0: any free one), for gateways that share "
                   "one port; cluster status lists it. Without it, /metrics is on the gateway's own port.")
def gateway(redis_url: str, host: str, port: int, log_level: str, trust_proxy: bool, timeout_s: float,
            metrics_port: int | None) -> None:
    """Run one gateway of a cluster until SIGINT/SIGTERM (for a deployment across machines).

    The secret comes from $BALANCESIM_CLUSTER_SECRET. Prints "listening on
    http://HOST:PORT" once /healthz answers; a busy port is exit 2.
    """
    import asyncio
    import os
    import socket

    from balancesim.cluster import SecretError, load_secret
    from balancesim.cluster._processes import GatewayOptions, run_gateway
    from balancesim.cluster._watchdog import LISTEN_FDS_ENV, watch_parent
    from balancesim.gateway import CannotStart
    from balancesim.gateway._server import listen

    configure_logging(log_level)
    watch_parent()
    try:
        secret = load_secret(None)
    except SecretError as error:
        raise InputError(str(error)) from None
    inherited = os.environ.pop(LISTEN_FDS_ENV, None)
    if inherited:  # serve bound the port and passed it down
        sockets = [socket.socket(fileno=int(fd)) for fd in inherited.split(",")]
        for sock in sockets:
            sock.setblocking(False)
    else:
        try:
            sockets = listen(host, port)
        except CannotStart as error:
            raise InputError(str(error)) from None
    try:
        metrics_sockets = listen(host, metrics_port) if metrics_port is not None else None
    except CannotStart as error:
        raise InputError(f"--metrics-port: {error}") from None

    def ready(url: str) -> None:
        click.echo(f"listening on {url}")
        sys.stdout.flush()

    try:
        asyncio.run(run_gateway(GatewayOptions(redis_url, secret, host, port, timeout_s=timeout_s,
                                                trust_proxy=trust_proxy), sockets,
                                on_ready=ready, metrics_sockets=metrics_sockets))
    except TimeoutError as error:  # no shard ever published the placement
        raise InputError(str(error)) from None


@cli.group()
def cluster() -> None:
    """Look at a running cluster."""


@cluster.command("status")
@click.option("--redis", "redis_url", default=None, envvar=REDIS_URL_ENV,
              help="The cluster's Redis, redis://user:pass@host:port.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="The data directory of a cluster started by serve (its Redis URL is there).")
@click.option("--lagging-after-s", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="A shard whose oldest unhandled command has waited longer than this is lagging.")
@json_option
def cluster_status(redis_url: str | None, data_dir: str | None, lagging_after_s: float, as_json: bool) -> None:
    """The live shards and gateways, with their heartbeats and command backlogs; exit 1 when
    a shard is missing or silent (a lagging shard is a problem line, exit 0)."""
    import asyncio

    import redis

    from balancesim.cluster import PlacementError, placement_of_data_dir
    from balancesim.cluster._processes import cluster_status as status_of
    from balancesim.cluster._processes import status_lags, status_problems
    from balancesim.cluster._supervisor import REDIS_URL_FILE, read_redis_url

    if (redis_url is None) == (data_dir is None):
        raise InputError("give --redis URL or --data-dir DIR (one of them)")
    expected = None
    if data_dir is not None:
        try:
            redis_url = read_redis_url(data_dir)
        except FileNotFoundError:
            raise InputError(f"{data_dir} has no {REDIS_URL_FILE}: no serve is running on it") from None
        except OSError as error:
            raise InputError(f"cannot read {data_dir}/{REDIS_URL_FILE}: {error.strerror}") from None
        try:
            expected = placement_of_data_dir(data_dir, None).shards
        except PlacementError:
            expected = None  # the shards' published placement says it
    assert redis_url is not None
    try:
        status = asyncio.run(status_of(redis_url, expected, lagging_after_s=lagging_after_s))
    except (OSError, redis.exceptions.RedisError) as error:  # never the URL: it carries the password
        raise InputError(f"cannot reach the cluster's Redis: {error}") from None
    problems = status_problems(status, expected)
    lags = status_lags(status)
    if as_json:
        click.echo(json.dumps({"shards": status["shards"], "gateways": status["gateways"],
                               "missing_shards": status["missing_shards"], "problems": problems + lags}, indent=2))
    else:
        click.echo(status_table(status, expected))
    for problem in problems + lags:
        click.echo(f"problem: {problem}", err=True)
    # The contract: exit 1 when a shard is missing (or silent: every gateway treats it as
    # down). A lagging shard still serves, so it is said, not failed on.
    sys.exit(1 if problems else 0)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def status_table(status: dict[str, Any], expected: int | None) -> str:
    """``cluster status``'s human form: a table of shards (the missing ones too), then one of gateways."""
    shards, gateways = status["shards"], status["gateways"]
    expected = expected if expected is not None else status.get("expected_shards")
    rows = sorted([*shards, *({**m, "state": "missing"} for m in status.get("missing_shards", []))],
                  key=lambda s: s["index"])
    lines = [f"shards: {len(shards)} of {expected if expected is not None else '?'}",
             f"  {'index':<6} {'host':<20} {'pid':>8} {'heartbeat':>10} {'commits/s':>10} {'state':<8} "
             f"{'waiting':>8} {'oldest':>8}  metrics"]
    for s in rows:
        waiting = "?" if s.get("commands_waiting") is None else s["commands_waiting"] + s["commands_pending"]
        lines.append(f"  {s['index']:<6} {s.get('host', '-')[:20]:<20} {s.get('pid', '-'):>8} "
                     f"{_age(s.get('heartbeat_age_s')):>10} {s.get('commits_per_s', '-'):>10} {s['state']:<8} "
                     f"{waiting:>8} {_age(s.get('oldest_command_age_s')):>8}  {s.get('metrics_address') or '-'}")
    lines += [f"gateways: {len(gateways)}",
              f"  {'address':<28} {'host':<20} {'pid':>8} {'sessions':>9} {'heartbeat':>10}  metrics"]
    lines += [f"  {g['address']:<28} {g['host'][:20]:<20} {g['pid']:>8} {g['sessions']:>9} "
              f"{_age(g['heartbeat_age_s']):>10}  {g.get('metrics_address') or '-'}" for g in gateways]
    return "\n".join(lines)


@cli.command()
@click.option("--trials", type=click.IntRange(1), default=5, show_default=True, help="Kill-and-restart trials.")
@click.option("--users", type=click.IntRange(1, 200), default=6, show_default=True, help="Concurrent users per trial.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the moments of the kills and the operations.")
@click.option("--cluster", is_flag=True,
              help="Run serve --workers 2 --shards 2 instead, and take the fault kinds in turn: SIGKILL a "
                   "gateway, SIGKILL a shard, SIGKILL Redis, SIGSTOP a shard past the deadline, cut a host off "
                   "(that one needs the namespace layout, --hosts, and is reported as not run without it).")
@click.option("--hosts", is_flag=True,
              help="With --cluster: run the cluster on three hosts made of network namespaces (Redis and "
                   "shard 0 on A, shard 1 on B, gateways on C and A; needs root, ip and redis-server), "
                   "restart what a trial killed, and cut host B off the network in the partition trials.")
def chaos(trials: int, users: int, seed: int, cluster: bool, hosts: bool) -> None:
    """Kill the server (SIGKILL) under load and prove nothing acknowledged was lost; exit 1 if anything was."""
    import asyncio

    if hosts and not cluster:
        raise InputError("--hosts runs the cluster across namespace hosts: give --cluster too")
    if hosts:
        from balancesim.cluster import hosts_unavailable

        if (missing := hosts_unavailable()) is not None:
            raise InputError(f"--hosts: {missing}")
    if cluster:
        from balancesim.chaos import run_cluster_trials
        from balancesim.cluster import HostsUnavailable

        try:
            done = _run_cleaning_up(run_cluster_trials(trials, users=users, seed=seed, hosts=hosts,
                                                       echo=click.echo))
        except HostsUnavailable as error:  # root, yet no namespaces here (a container without the capability)
            raise InputError(f"--hosts: {error}") from None
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, once the cluster (and any namespace) is gone
            click.echo("chaos: interrupted; the cluster was stopped", err=True)
            sys.exit(130)
        ran = [r for r in done if r.ran]
        failed = [r for r in done if not r.ok]
        not_run = f" ({len(done) - len(ran)} not run: need --hosts)" if len(ran) < len(done) else ""
        click.echo(f"{len(ran)} of {len(done)} trials run{not_run}, "
                   f"{sum(r.acknowledged for r in ran)} mutations acknowledged, "
                   f"{sum(r.timeouts_resolved for r in ran)} of {sum(r.timeouts for r in ran)} timeouts resolved, "
                   f"{sum(r.cut_off_resolved for r in ran)} of {sum(r.cut_off for r in ran)} cut-off requests "
                   f"resolved, {sum(r.unavailable for r in ran)} × 503, {sum(r.reconnects for r in ran)} session "
                   f"reconnects, {sum(r.read_your_writes for r in ran)} reads on the other gateway, "
                   f"{len(failed)} failed")
        sys.exit(1 if failed else 0)

    from balancesim.chaos import run_trials

    results = asyncio.run(run_trials(trials, users=users, seed=seed))
    for result in results:
        click.echo(result.text())
    failed = [r for r in results if not r.ok]
    click.echo(f"{len(results)} trials, {sum(r.acknowledged for r in results)} acknowledged mutations checked, "
               f"{len(failed)} failed")
    sys.exit(1 if failed else 0)


def _run_cleaning_up(work: Any) -> Any:
    """``asyncio.run(work)``, where SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt, which
    unwinds ``work``'s clean-up (children stopped, namespaces deleted) and then leaves.

    Not asyncio's own SIGINT handling: it only cancels the main task, and a cancellation
    that lands in a library wait (a ``wait_for`` racing its result) can be lost, which left
    a run going on after Ctrl-C."""
    import asyncio
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return asyncio.run(work)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
