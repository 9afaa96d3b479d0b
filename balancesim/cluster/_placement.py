"""Placement: which shard an account lives on, as pure functions of its name or id.

Accounts are spread over ``PARTITIONS`` logical partitions, and a ``Placement``
maps each partition to a shard by a table recorded in every shard's file. A
username's partition is a stable hash of its UTF-8 bytes. A user id is allocated
from its partition's residue class (``user_id ≡ partition (mod partitions)``), so
the id names the same partition, and so the same shard, as the name: login and
routing need no lookup service. Resharding later rewrites the table and moves
whole partitions; no account is rehashed and no id changes.

Why 256 partitions (2^8): round robin then gives no shard more than ``ceil(256/S)``
partitions, within 3 % of a fair share for every S up to 16 shards (a handful of
machines, what cluster mode aims at); the table is about a kilobyte of JSON in each
shard file; and 2^53 / 256 leaves 2^45 user ids per partition. A power of two,
so that a later split into 2P partitions refines the current ones instead of
rehashing: ``h mod 2P`` determines ``h mod P``, for hashes and ids alike.

Every id stays below 2^53, the largest range of integers a JavaScript number (the
pages' ``JSON.parse``) holds exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

from balancesim.actors import iso

__all__ = [
    "PARTITIONS", "MAX_SHARDS", "MAX_ID", "HASH_SCHEME", "Placement", "PlacementError",
    "ShardRecord", "partition_of_username", "shard_of_username", "shard_of_user_id",
    "user_id_for", "split_user_id", "transaction_id_for", "split_transaction_id",
    "record", "recorded", "check", "shard_file", "placement_of_data_dir",
]

PARTITIONS = 256
#: The shard index is the low part of a transaction id, so this is a ceiling that
#: outlives any one placement. A shard owns at least one partition, so there is no
#: use for more shards than partitions. It leaves 2^45 transactions per shard:
#: 111 years at 10,000 a second.
MAX_SHARDS = 256
#: Ids are below this: JavaScript numbers hold every integer below 2^53 exactly.
MAX_ID = 2**53
#: The name of the username hash, recorded with the placement: a release that
#: hashes otherwise must refuse a data directory made with this one, not misroute.
HASH_SCHEME = "sha256-first8-big-endian"

_SHARD_FILE = re.compile(r"shard-(0|[1-9][0-9]*)\.db")


class PlacementError(Exception):
    """The placement cannot be used as asked: a number that disagrees with the
    files, a missing or inconsistent shard file, or an id space used up."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """``table[p]`` is the index of the shard that owns partition ``p``."""

    shards: int
    partitions: int
    table: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise PlacementError(f"a cluster has 1 to {MAX_SHARDS} shards, not {self.shards}")
        if self.partitions < 1 or self.partitions & (self.partitions - 1):
            raise PlacementError(f"the number of partitions is a power of two, not {self.partitions}")
        if len(self.table) != self.partitions:
            raise PlacementError(f"the table has {len(self.table)} entries for {self.partitions} partitions")
        if any(not (type(shard) is int and 0 <= shard < self.shards) for shard in self.table):
            raise PlacementError(f"the table names a shard outside 0..{self.shards - 1}")

    @classmethod
    def for_new(cls, shards: int, partitions: int = PARTITIONS) -> Placement:
        """A new cluster's placement: partitions dealt round robin (``p mod shards``)."""
        if type(shards) is not int or not 1 <= shards <= min(MAX_SHARDS, partitions):
            raise PlacementError(f"a cluster has 1 to {min(MAX_SHARDS, partitions)} shards, not {shards}")
        return cls(shards, partitions, tuple(p % shards for p in range(partitions)))

    def partitions_of(self, shard_index: int) -> tuple[int, ...]:
        """The partitions that shard ``shard_index`` owns, in order."""
        return tuple(p for p, shard in enumerate(self.table) if shard == shard_index)


class ShardRecord(NamedTuple):
    """What a shard file records: the cluster's placement and which shard the file is."""

    placement: Placement
    index: int


def partition_of_username(username: str, partitions: int = PARTITIONS) -> int:
    """The partition of ``username``: the first 8 bytes of the SHA-256 of its UTF-8,
    big-endian, mod ``partitions``.

    Never Python's ``hash()``, which differs per process. The bytes hashed are the
    bytes the ledger's ``UNIQUE`` compares (binary collation), so two names that
    collide there always land on the same shard, where the constraint sees both.
    ``surrogatepass``: a login with a name no account can have must not crash here.
    """
    digest = hashlib.sha256(username.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def shard_of_username(placement: Placement, username: str) -> int:
    """The index of the shard where ``username``'s account lives (or would be created)."""
    return placement.table[partition_of_username(username, placement.partitions)]


def shard_of_user_id(placement: Placement, user_id: int) -> int:
    """The index of the shard where account ``user_id`` lives."""
    return placement.table[user_id % placement.partitions]


def user_id_for(partition: int, sequence: int, partitions: int = PARTITIONS) -> int:
    """The ``sequence``-th user id of ``partition`` (from 1): ``sequence * partitions + partition``.

    Sequences count from 1, as SQLite's ``AUTOINCREMENT`` does, so no id is 0.
    ``PlacementError`` once the id would reach 2^53.
    """
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
    if sequence < 1:
        raise ValueError(f"user sequences count from 1, not {sequence}")
    user_id = sequence * partitions + partition
    if user_id >= MAX_ID:
        raise PlacementError(
            f"partition {partition} has no user ids left: its account number {sequence} "
            f"would have id {user_id}, past 2**53 (the integers JavaScript numbers hold exactly)"
        )
    return user_id


def split_user_id(user_id: int, partitions: int = PARTITIONS) -> tuple[int, int]:
    """The inverse of ``user_id_for``: ``(partition, sequence)``."""
    if not 0 < user_id < MAX_ID:
        raise ValueError(f"user id {user_id} is outside 1..2**53-1")
    sequence, partition = divmod(user_id, partitions)
    return partition, sequence


def transaction_id_for(shard_index: int, sequence: int) -> int:
    """The ``sequence``-th transaction id of shard ``shard_index`` (from 1), unique
    across the cluster: ``sequence * MAX_SHARDS + shard_index``.

    From 1, because a ``Posted`` whose ``transaction_id`` is 0 is not numbered yet.
    Each shard's ids grow with its own sequence; ids of different shards interleave
    and say nothing about order between shards. ``PlacementError`` at 2^53.
    """
    if not 0 <= shard_index < MAX_SHARDS:
        raise ValueError(f"shard index {shard_index} is outside 0..{MAX_SHARDS - 1}")
    if sequence < 1:
        raise ValueError(f"transaction sequences count from 1, not {sequence}")
    transaction_id = sequence * MAX_SHARDS + shard_index
    if transaction_id >= MAX_ID:
        raise PlacementError(f"shard {shard_index} has no transaction ids left: "
                             f"number {sequence} would pass 2**53")
    return transaction_id


def split_transaction_id(transaction_id: int) -> tuple[int, int]:
    """The inverse of ``transaction_id_for``: ``(shard_index, sequence)``."""
    if not 0 < transaction_id < MAX_ID:
        raise ValueError(f"transaction id {transaction_id} is outside 1..2**53-1")
    sequence, shard_index = divmod(transaction_id, MAX_SHARDS)
    return shard_index, sequence


# Recording the placement in a shard file.

_TABLE_SQL = "CREATE TABLE IF NOT EXISTS cluster (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _connection(db: str | os.PathLike | sqlite3.Connection | object) -> tuple[sqlite3.Connection, bool]:
    """A sqlite3 connection for a path, a connection or a ``sqlite_utils.Database``,
    and whether we opened it (and so must close it)."""
    if isinstance(db, (str, os.PathLike)):
        return sqlite3.connect(os.fspath(db), timeout=30.0), True
    conn = getattr(db, "conn", db)  # sqlite_utils.Database wraps one
    if not isinstance(conn, sqlite3.Connection):
        raise TypeError(f"expected a path or a SQLite connection, not {type(db).__name__}")
    return conn, False


def _rows(placement: Placement, shard_index: int, created_at: str) -> dict[str, str]:
    return {
        "shards": str(placement.shards),
        "partitions": str(placement.partitions),
        "table": json.dumps(placement.table, separators=(",", ":")),
        "index": str(shard_index),
        "hash": HASH_SCHEME,
        "created_at": created_at,
    }


def record(db: str | os.PathLike | sqlite3.Connection | object, placement: Placement, shard_index: int) -> None:
    """Record in ``db`` (a path, a ``sqlite3.Connection`` or a ``sqlite_utils.Database``)
    that it is shard ``shard_index`` of ``placement``.

    Idempotent for the same placement and index; a file that records another one
    is a ``PlacementError``, never overwritten. On a connection already inside a
    transaction the rows join it and the caller commits, so a new shard file can
    get its schema and its placement at once.
    """
    if not 0 <= shard_index < placement.shards:
        raise PlacementError(f"shard index {shard_index} is outside 0..{placement.shards - 1}")
    conn, owned = _connection(db)
    joined = conn.in_transaction
    try:
        if not joined:
            # IMMEDIATE: two processes recording at once serialize here, and the
            # second sees what the first wrote.
            conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_TABLE_SQL)
            existing = _read(conn)
            if existing is None:
                conn.executemany("INSERT INTO cluster (key, value) VALUES (?, ?)",
                                 _rows(placement, shard_index, iso(time.time())).items())
            elif existing != ShardRecord(placement, shard_index):
                raise PlacementError(
                    f"this file is already shard {existing.index} of {existing.placement.shards}; "
                    f"it cannot become shard {shard_index} of {placement.shards}"
                )
        except BaseException:
            if not joined:
                conn.execute("ROLLBACK")
            raise
        if not joined:
            conn.execute("COMMIT")
    finally:
        if owned:
            conn.close()


def _read(conn: sqlite3.Connection) -> ShardRecord | None:
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cluster'").fetchone()
    if not has_table:
        return None
    rows = dict(conn.execute("SELECT key, value FROM cluster").fetchall())
    if not rows:
        return None
    try:
        if rows["hash"] != HASH_SCHEME:
            raise PlacementError(f"the file places usernames by {rows['hash']!r}; "
                                 f"this release knows only {HASH_SCHEME!r}")
        placement = Placement(int(rows["shards"]), int(rows["partitions"]), tuple(json.loads(rows["table"])))
        index = int(rows["index"])
    except (KeyError, ValueError, TypeError) as error:
        raise PlacementError(f"the file's cluster table is malformed: {error!r}") from None
    if not 0 <= index < placement.shards:
        raise PlacementError(f"the file says it is shard {index} of {placement.shards}")
    return ShardRecord(placement, index)


def recorded(db: str | os.PathLike | sqlite3.Connection | object) -> ShardRecord | None:
    """What ``db`` records (``(placement, index)``), or ``None`` for a file that records none.

    A path is opened read-only: reading never creates a file nor waits for a writer.
    """
    if isinstance(db, (str, os.PathLike)):
        path = os.fspath(db)
        if not os.path.isfile(path):
            raise PlacementError(f"{path}: no such file")
        try:
            conn = sqlite3.connect(f"{_file_uri(path)}?mode=ro", uri=True, timeout=30.0)
        except sqlite3.Error as error:
            raise PlacementError(f"cannot open {path}: {error}") from None
        try:
            return _read(conn)
        except sqlite3.DatabaseError as error:
            raise PlacementError(f"{path} is not a balancesim shard file: {error}") from None
        except PlacementError as error:
            raise PlacementError(f"{path}: {error}") from None
        finally:
            conn.close()
    conn, _ = _connection(db)
    return _read(conn)


def _file_uri(path: str) -> str:
    # As a URI, so that a path with '?' or '#' in it still names the file.
    return Path(path).resolve().as_uri()


def check(recorded: ShardRecord, shards_given: int | None, *, index_given: int | None = None,
          source: str = "this data directory") -> Placement:
    """``recorded``'s placement, if the numbers given on the command line (``None``:
    not given) agree with it; a ``PlacementError`` that names both otherwise.

    ``source`` names what recorded it in the message: a data directory or a file.
    """
    placement, index = recorded
    if shards_given is not None and shards_given != placement.shards:
        raise PlacementError(f"{source} has {placement.shards} shards; --shards {shards_given} disagrees")
    if index_given is not None and index_given != index:
        raise PlacementError(f"{source} is shard {index} of {placement.shards}; --index {index_given} disagrees")
    return placement


def shard_file(data_dir: str | os.PathLike, shard_index: int) -> str:
    """The path of shard ``shard_index``'s ledger in ``data_dir``: ``DIR/shard-K.db``."""
    return os.path.join(os.fspath(data_dir), f"shard-{shard_index}.db")


def placement_of_data_dir(data_dir: str | os.PathLike, shards_given: int | None) -> Placement:
    """The placement that ``data_dir``'s shard files (``shard-K.db``) record.

    Every file must record the same placement, shard K must be ``shard-K.db``, and
    all of ``0..S-1`` must be there. A number given that disagrees is an error. A
    directory without shard files is new: its placement is ``Placement.for_new``
    (the caller records it in each file it creates), and then ``shards_given`` is
    required. A missing file is never recreated empty here: its accounts' ids live
    on in tokens and other shards' history, and a fresh file would hand them out again.
    """
    data_dir = os.fspath(data_dir)
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        names = []
    found = sorted(int(m.group(1)) for name in names if (m := _SHARD_FILE.fullmatch(name)))
    if not found:
        if shards_given is None:
            raise PlacementError(f"{data_dir} has no shard files yet; give --shards for a new cluster")
        return Placement.for_new(shards_given)
    records = {}
    for index in found:
        path = shard_file(data_dir, index)
        rec = recorded(path)
        if rec is None:
            raise PlacementError(f"{path} records no cluster placement; is it a shard of this cluster?")
        if rec.index != index:
            raise PlacementError(f"{path} records that it is shard {rec.index}, not {index}")
        records[index] = rec
    first = records[found[0]].placement
    for index, rec in records.items():
        if rec.placement.shards != first.shards:
            raise PlacementError(
                f"the shard files disagree: {shard_file(data_dir, found[0])} records {first.shards} "
                f"shards, {shard_file(data_dir, index)} records {rec.placement.shards}"
            )
        if rec.placement != first:
            raise PlacementError(
                f"the shard files disagree: {shard_file(data_dir, found[0])} and "
                f"{shard_file(data_dir, index)} record different partition tables"
            )
    missing = sorted(set(range(first.shards)) - set(found))
    if missing:
        names = ", ".join(os.path.basename(shard_file(data_dir, k)) for k in missing)
        raise PlacementError(f"{data_dir} has {first.shards} shards but {names} is missing; "
                             "restore it from a backup")
    # No file past S-1: each file's index is below its own count, and the counts agree.
    return check(ShardRecord(first, 0), shards_given)
