"""What every command shares for refusing bad input politely: one ``Error: …`` line
on stderr and exit 2, never a traceback.

Exit codes across the command line: 0 all held, 1 a verdict failed (a broken ledger,
a failed expectation, sessions out of sync), 2 the command could not run as asked
(bad input, a file that is not a ledger, a busy port, an unreachable or refusing
server), 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import urllib.parse
from typing import Any, Callable

import click

__all__ = ["InputError", "check_url", "data_dir_errors", "ledger_file_errors"]


class InputError(click.ClickException):
    """Bad input or an unreachable server: ``Error: …`` on stderr, exit 2."""

    exit_code = 2


def check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: ``--url`` must be ``http(s)://host[:port]``."""
    if value is None:
        return None
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise InputError(f"--url {value!r}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--url {value!r} needs a scheme and a host, like http://127.0.0.1:3000")
    return value.rstrip("/")


def ledger_file_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """For commands reading ``db_path``: a missing file, a directory, or a file that is not
    a balancesim ledger is an ``InputError`` naming the file, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        path = kwargs["db_path"]
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file")
        if os.path.isdir(path):
            raise InputError(f"{path} is a directory, not a ledger file")
        try:
            return func(*args, **kwargs)
        except sqlite3.OperationalError as error:  # unreadable, locked for too long
            raise InputError(f"cannot read {path}: {error}") from None
        except sqlite3.DatabaseError as error:
            raise InputError(f"{path} is not a balancesim ledger: {error}") from None
        except FileNotFoundError as error:  # reports: a SQLite file without the ledger's tables
            raise InputError(str(error)) from None

    return wrapper


def data_dir_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """For work on a cluster's data directory: a placement that disagrees (``--shards``,
    missing or foreign shard files), a file that is not a ledger, or a directory that
    cannot be made is an ``InputError``, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from balancesim.cluster import PlacementError  # only here: the cluster package loads Redis's client

        try:
            return func(*args, **kwargs)
        except PlacementError as error:
            raise InputError(str(error)) from None
        except sqlite3.DatabaseError as error:  # the message names no file: say it is a shard's
            raise InputError(f"a shard file cannot be used: {error}") from None
        except FileNotFoundError as error:  # reports: a SQLite file without the ledger's tables
            raise InputError(str(error)) from None
        except OSError as error:  # the directory cannot be made or read
            raise InputError(f"{error.filename}: {error.strerror}") from None

    return wrapper
