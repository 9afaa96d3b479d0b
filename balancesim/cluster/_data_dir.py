"""The offline commands over a cluster's data directory (``DIR/shard-K.db``, one per shard).

``users create --data-dir`` writes the account into its username's shard file, as
``--db`` writes into one ledger file: a shard may be running on it (SQLite serializes
the writers, and the id is allocated in the file, in the write transaction). The
``ledger`` reports read every shard file and never write.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
from typing import Any

from balancesim import reports
from balancesim.actors import connect, create_schema
from balancesim.cluster._placement import (
    Placement,
    PlacementError,
    placement_of_data_dir,
    shard_file,
    shard_of_user_id,
    shard_of_username,
)
from balancesim.cluster._shard import ShardIds

__all__ = [
    "DataDir", "ShardVerified", "open_data_dir", "make_data_dir", "create_user_in_data_dir",
    "verify_data_dir", "verify_data_dir_as_one", "history_in_data_dir", "audit_data_dir",
]

_SHARD_FILE = re.compile(r"shard-(0|[1-9][0-9]*)\.db")


@dataclasses.dataclass(frozen=True)
class DataDir:
    """A data directory whose shard files all record ``placement``."""

    path: str
    placement: Placement

    def shard_path(self, index: int) -> str:
        """``DIR/shard-K.db``."""
        return shard_file(self.path, index)

    def ids(self, index: int) -> ShardIds:
        """Shard ``index``'s id scheme."""
        return ShardIds(self.placement, index)

    def shard_of(self, user: str) -> int:
        """The shard of ``user``: a user id (all digits, as ``ledger history`` reads it) or a username."""
        if user.isdigit():
            return shard_of_user_id(self.placement, int(user))
        return shard_of_username(self.placement, user)


def open_data_dir(data_dir: str, shards_given: int | None = None) -> DataDir:
    """An existing data directory (``PlacementError`` when it has no shard files, or
    they disagree with each other or with ``shards_given``). Never writes."""
    if not os.path.isdir(data_dir):
        raise PlacementError(f"{data_dir}: no such directory")
    if not any(_SHARD_FILE.fullmatch(name) for name in os.listdir(data_dir)):
        raise PlacementError(f"{data_dir} has no shard files (shard-K.db): it is not a cluster's data directory")
    return DataDir(data_dir, placement_of_data_dir(data_dir, shards_given))


def make_data_dir(data_dir: str, shards_given: int | None) -> DataDir:
    """The data directory, made with ``shards_given`` shard files when it has none.

    Every file of a new directory is made at once, each with its tables and its
    placement in one transaction: a directory with some files missing reads as one
    that lost a shard. Under an ``flock`` on ``DIR/.placement.lock``, so that two
    commands making the same new directory with different ``--shards`` do not each
    make half of it.
    """
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise PlacementError(f"{data_dir} is not a directory")
    placement_of_data_dir(data_dir, shards_given)  # a refused number makes no directory
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".placement.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        placement = placement_of_data_dir(data_dir, shards_given)
        made = DataDir(data_dir, placement)
        for index in range(placement.shards):
            path = made.shard_path(index)
            if os.path.exists(path):
                continue  # all or none exist: placement_of_data_dir has checked
            db = connect(path)
            try:
                with db.atomic():
                    create_schema(db)
                    made.ids(index).claim(db.conn, path)
            finally:
                db.close()
    return made


def create_user_in_data_dir(data_dir: str, shards_given: int | None, username: str, password: str,
                            role: str = "user", **options: Any) -> tuple[int, int]:
    """Create an account on its username's shard: ``(user_id, shard index)``.

    ``options`` go to ``create_user_in`` (``cost``, ``now``). The name and password
    are judged first, so a bad one makes no new directory.

    Raises:
        BalancesimError: as ``create_user_in`` (a bad field, a taken name).
        PlacementError: ``shards_given`` disagrees with the files, or a new directory without it.
    """
    from balancesim.actors import CreateUser, check_password, validate
    from balancesim.engine import create_user_in

    rejected = validate(CreateUser(username, role, ""))
    if rejected is not None:
        raise rejected.error
    check_password(password)
    cluster = make_data_dir(data_dir, shards_given)
    index = shard_of_username(cluster.placement, username)
    user_id = create_user_in(cluster.shard_path(index), username, password, role,
                             shard=cluster.ids(index), **options)
    return user_id, index


@dataclasses.dataclass(frozen=True)
class ShardVerified:
    """``ledger verify``'s report on one shard file."""

    index: int
    path: str
    report: reports.VerifyReport

    def text(self) -> str:
        """The report, its first line naming the file."""
        return f"{os.path.basename(self.path)}: {self.report.text()}"


def verify_data_dir(data_dir: str, shards_given: int | None = None) -> list[ShardVerified]:
    """``reports.verify`` on every shard file, with the placement's checks (every id names its shard)."""
    cluster = open_data_dir(data_dir, shards_given)
    return [ShardVerified(index, cluster.shard_path(index),
                          reports.verify(cluster.shard_path(index), shard=cluster.ids(index)))
            for index in range(cluster.placement.shards)]


def verify_data_dir_as_one(data_dir: str, shards_given: int | None = None) -> reports.VerifyReport:
    """``verify_data_dir`` summed into one report, as ``reports.verify`` gives for one file
    (each problem names its shard file): what a run against a cluster reports."""
    merged = reports.VerifyReport()
    for shard in verify_data_dir(data_dir, shards_given):
        merged.accounts += shard.report.accounts
        merged.entries += shard.report.entries
        merged.trades += shard.report.trades
        merged.problems += [f"{os.path.basename(shard.path)}: {problem}" for problem in shard.report.problems]
    return merged


def history_in_data_dir(data_dir: str, user: str, shards_given: int | None = None) -> list[dict[str, Any]]:
    """``reports.history`` from the shard file where ``user`` (an id or a username) lives."""
    cluster = open_data_dir(data_dir, shards_given)
    return reports.history(cluster.shard_path(cluster.shard_of(user)), user)


def audit_data_dir(data_dir: str, shards_given: int | None = None) -> dict[str, Any]:
    """``reports.audit`` merged over every shard file."""
    cluster = open_data_dir(data_dir, shards_given)
    return reports.audit([cluster.shard_path(index) for index in range(cluster.placement.shards)])
