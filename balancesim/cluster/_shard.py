"""A shard's own file: the ids it allocates, and the lock that makes it its only writer.

``ShardIds`` is what the ledger and the engine are given to number things as shard
``index`` of a placement: a new user's id is ``user_id_for(partition, n)`` with ``n``
the partition's next sequence in this file, and a transaction's id is
``transaction_id_for(index, n)``. Without one, the ledger numbers as the embedded
mode always has (``AUTOINCREMENT`` and 1, 2, 3 …).

``lock_shard_file`` takes an ``flock`` on a sidecar ``FILE.lock``: the transaction
sequence lives in the writer's memory, so a second engine on the same file would
hand out the same ids. The kernel drops the lock when the process dies, however it
dies, so a crashed shard never leaves a stale lock behind.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import sqlite3
import threading

from balancesim import errors
from balancesim.cluster._placement import (
    Placement,
    PlacementError,
    check,
    partition_of_username,
    record,
    recorded,
    split_transaction_id,
    transaction_id_for,
    user_id_for,
)

__all__ = ["ShardIds", "ShardLock", "ShardFileInUse", "lock_shard_file", "USER_SEQUENCES_TABLE"]

#: Per partition, the last user sequence this file handed out (as ``sqlite_sequence``
#: does for ``AUTOINCREMENT``): a sequence is never reused, even after a failed insert.
USER_SEQUENCES_TABLE = "user_sequences"
_SEQUENCES_SQL = (f"CREATE TABLE IF NOT EXISTS {USER_SEQUENCES_TABLE} "
                  "(partition INTEGER PRIMARY KEY, last INTEGER NOT NULL)")


@dataclasses.dataclass(frozen=True)
class ShardIds:
    """How shard ``index`` of ``placement`` numbers the accounts and entries it creates."""

    placement: Placement
    index: int

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 0 <= self.index < self.placement.shards:
            raise PlacementError(f"shard index {self.index} is outside 0..{self.placement.shards - 1}")

    def partition_of(self, username: str) -> int:
        """``username``'s partition; ``WrongShard`` when another shard owns it."""
        partition = partition_of_username(username, self.placement.partitions)
        owner = self.placement.table[partition]
        if owner != self.index:
            raise errors.WrongShard(
                f"username {username!r} belongs on shard {owner}, not on shard {self.index}: "
                "accounts are created on their username's shard"
            )
        return partition

    def claim(self, conn: sqlite3.Connection, path: str) -> None:
        """Make the file at ``path`` (open on ``conn``, inside the caller's transaction)
        this shard's: record the placement in a new file, check it in an existing one.

        ``PlacementError`` for a file that records another placement or index, and for a
        ledger that holds data but records no placement: its ids were not allocated by
        the placement, so adopting it would place accounts where nobody looks for them.
        """
        existing = recorded(conn)
        if existing is None:
            used = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM transactions)").fetchone()[0]
            if used:
                raise PlacementError(f"{path} holds accounts but records no cluster placement: "
                                     "it is an embedded ledger, not a shard file")
            record(conn, self.placement, self.index)
        else:
            check(existing, self.placement.shards, index_given=self.index, source=path)
            if existing.placement != self.placement:
                raise PlacementError(f"{path} records another partition table than this cluster's")
        conn.execute(_SEQUENCES_SQL)

    def new_user_id(self, conn: sqlite3.Connection, username: str) -> int:
        """The id of ``username``'s new account: its partition's next sequence in this file.

        Run it inside the transaction (or savepoint) that inserts the account, so that
        a refused insert gives its sequence back. ``WrongShard`` for another shard's name.
        """
        partition = self.partition_of(username)
        # fetchall: the statement must be finished before the caller's savepoint ends.
        ((sequence,),) = conn.execute(
            f"INSERT INTO {USER_SEQUENCES_TABLE} (partition, last) VALUES (?, 1) "
            "ON CONFLICT (partition) DO UPDATE SET last = last + 1 RETURNING last",
            (partition,),
        ).fetchall()
        return user_id_for(partition, sequence, self.placement.partitions)

    def transaction_id(self, sequence: int) -> int:
        """The id of this shard's ``sequence``-th transaction."""
        return transaction_id_for(self.index, sequence)

    def next_transaction_sequence(self, highest_id: int, path: str) -> int:
        """The sequence that follows ``highest_id``, the file's highest transaction id (0: none)."""
        if highest_id == 0:
            return 1
        index, sequence = split_transaction_id(highest_id)
        if index != self.index:
            raise PlacementError(f"{path} holds transaction {highest_id}, which is shard {index}'s, "
                                 f"not shard {self.index}'s")
        return sequence + 1


class ShardFileInUse(Exception):
    """Another process (or another engine of this one) writes this shard file."""


@dataclasses.dataclass(frozen=True)
class ShardLock:
    """An ``flock`` held on ``path + ".lock"`` until ``release`` or the process ends."""

    path: str
    fd: int

    def release(self) -> None:
        """Give the lock up (idempotent). The lock file stays: removing it would let a
        third process lock a new file while a second still holds the unlinked one."""
        with _held_lock:
            if _held.get(self.path) is not self:
                return
            del _held[self.path]
        os.close(self.fd)


# The locks held, by path: a lock must not go with its handle's last reference (its
# fd would close), since a shard keeps its file for the life of the process.
_held: dict[str, ShardLock] = {}
_held_lock = threading.Lock()


def lock_shard_file(path: str | os.PathLike) -> ShardLock:
    """Lock the shard file at ``path`` for this process, or raise ``ShardFileInUse``
    naming the holder's pid (``"DIR/shard-0.db is in use by another process (pid N)"``).

    The lock is on a sidecar ``path + ".lock"``, never on the SQLite file itself, whose
    locks SQLite owns (and a POSIX lock on it would be dropped by any close of it). The
    lock file holds the holder's pid, for the message. A child forked without exec
    inherits the lock along with the descriptor: fork the children before locking.
    """
    path = os.fspath(path)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _pid_in(fd)
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ShardFileInUse(f"cannot lock {path}: {error.strerror}") from None
        who = "this process" if holder == os.getpid() else "another process"
        raise ShardFileInUse(f"{path} is in use by {who} (pid {holder or '?'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = ShardLock(path, fd)
    with _held_lock:
        _held[path] = lock
    return lock


def _pid_in(fd: int) -> int | None:
    # The holder writes its pid just after it locks: a reader in between sees none.
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
