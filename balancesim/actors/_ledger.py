"""The ledger: SQLite (WAL, ``synchronous=FULL``) through sqlite-utils.

One writer thread owns the only write connection and commits *group-wise*: it
takes every submission waiting in its queue (up to ``batch_max``) and commits
them in one transaction, so the durable rate is not one fsync per mutation.
Only after the commit does it publish the events and complete the replies: a
reply means the entries are on disk. Replies carry ``Confirmed`` records of the
committed events; the ledger knows nothing of HTTP.

Opt-in, for benchmarks: with ``$BALANCESIM_COMMIT_LOG`` set to a file, the writer appends
one line per commit that took at least ``$BALANCESIM_COMMIT_LOG_MS`` (default 10) ms, so
that slow deliveries can be matched to fsync stalls across processes (see ``CommitLog``).

A failed commit fails every submission in the batch and *poisons* the accounts
involved: their later submissions (decided on top of the failed state) fail too,
until the account actor has reloaded its state from the ledger and sent a
``reset``. Because the writer's queue is FIFO, the reset marks exactly where the
account's fresh decisions begin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterator

import sqlite_utils

from balancesim import errors
from balancesim.actors._clock import iso
from balancesim.actors._codec import decode, encode
from balancesim.actors._messages import (
    ASSETS,
    Command,
    Confirmed,
    ControlModeSet,
    CreateUser,
    Event,
    OptionForced,
    OptionOpened,
    OptionSettled,
    Posted,
    Rejected,
    Trade,
    UpdateUser,
    UserCreated,
    UserUpdated,
)
from balancesim.actors._reply import Reply
from balancesim.actors._state import AccountState

if TYPE_CHECKING:  # the cluster package imports the actors: at run time, ids are duck-typed
    from balancesim.cluster import ShardIds

__all__ = ["Ledger", "Submission", "connect", "create_schema", "insert_user", "parse_ts", "snapshot"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    control_mode TEXT NOT NULL DEFAULT 'normal',
    version INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    user_id INTEGER NOT NULL REFERENCES users(user_id),
    asset TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (user_id, asset)
);
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(user_id),
    asset TEXT NOT NULL,
    amount INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    type TEXT NOT NULL,
    description TEXT NOT NULL,
    metadata TEXT NOT NULL,
    version INTEGER NOT NULL,
    ts TEXT NOT NULL,
    initiated_by INTEGER,
    UNIQUE (user_id, version)
);
CREATE TABLE IF NOT EXISTS trades (
    trade_id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(user_id),
    symbol TEXT NOT NULL,
    direction TEXT NOT NULL,
    amount INTEGER NOT NULL,
    duration INTEGER NOT NULL,
    payout_rate INTEGER NOT NULL,
    entry_price INTEGER NOT NULL,
    exit_price INTEGER,
    status TEXT NOT NULL,
    decided_by TEXT,
    opened_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    settled_at TEXT,
    payout INTEGER,
    forced_outcome TEXT,
    forced_by INTEGER
);
CREATE INDEX IF NOT EXISTS trades_open ON trades (status) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS trades_user ON trades (user_id, status);
CREATE TABLE IF NOT EXISTS control_changes (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(user_id),
    mode TEXT NOT NULL,
    set_by INTEGER NOT NULL,
    ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS user_changes (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(user_id),
    role TEXT NOT NULL,
    disabled INTEGER NOT NULL,
    set_by INTEGER NOT NULL,
    ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    caller_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (caller_id, key)
);
"""

_TRADE_COLUMNS = (
    "trade_id, user_id, symbol, direction, amount, duration, payout_rate, entry_price, "
    "exit_price, status, decided_by, opened_at, expires_at, settled_at, payout, "
    "forced_outcome, forced_by"
)
_TX_COLUMNS = (
    "transaction_id, user_id, asset, amount, balance_after, type, description, metadata, "
    "version, ts, initiated_by"
)


@contextlib.contextmanager
def snapshot(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """Every read inside sees one committed state, whatever the writer commits meanwhile."""
    db.conn.execute("BEGIN")
    try:
        yield db
    finally:
        db.conn.execute("COMMIT")


def parse_ts(text: str | None) -> float | None:
    """The inverse of ``iso``."""
    return None if text is None else datetime.fromisoformat(text).timestamp()


def connect(path: str, *, busy_timeout_s: float = 30.0) -> sqlite_utils.Database:
    """A connection in WAL mode with ``synchronous=FULL``, usable from any thread."""
    conn = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables if they are missing."""
    with db.atomic():
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        # Added after the first release: a ledger made before has no such column.
        columns = {row[1] for row in db.execute("PRAGMA table_info(users)").fetchall()}
        if "disabled" not in columns:
            db.execute("ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")


def insert_user(db: sqlite_utils.Database, username: str, role: str, password_hash: str, now: float,
                *, ids: ShardIds | None = None) -> int:
    """Insert a user with zero balances; ``Conflict`` if the name is taken.

    Runs inside the caller's transaction when there is one (a savepoint), so a
    taken name never aborts the writer's whole batch. With ``ids`` (a shard's), the
    id is the username's partition's next one (``WrongShard`` if another shard owns
    the name); without, SQLite's ``AUTOINCREMENT`` picks it.
    """
    try:
        with db.atomic():
            if ids is None:
                cursor = db.execute(
                    "INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                    (username, role, password_hash, iso(now)),
                )
                user_id = cursor.lastrowid
            else:
                # Inside the savepoint: a taken name rolls its sequence back with it.
                user_id = ids.new_user_id(db.conn, username)
                db.execute(
                    "INSERT INTO users (user_id, username, role, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                    (user_id, username, role, password_hash, iso(now)),
                )
            db.conn.executemany(
                "INSERT INTO balances (user_id, asset, amount) VALUES (?, ?, 0)",
                [(user_id, asset) for asset in ASSETS],
            )
    except sqlite3.IntegrityError as error:
        raise errors.Conflict(f"username {username!r} is taken") from error
    return int(user_id)


def _trade_row(trade: Trade) -> tuple:
    return (
        trade.trade_id, trade.user_id, trade.symbol, trade.direction, trade.amount,
        trade.duration, trade.payout_rate, trade.entry_price, trade.exit_price, trade.status,
        trade.decided_by, iso(trade.opened_at), iso(trade.expires_at),
        None if trade.settled_at is None else iso(trade.settled_at), trade.payout,
        trade.forced_outcome, trade.forced_by,
    )


def trade_from_row(row: tuple) -> Trade:
    """A ``Trade`` from a row of ``_TRADE_COLUMNS``."""
    values = list(row)
    for index in (11, 12, 13):
        values[index] = parse_ts(values[index])
    names = [name.strip() for name in _TRADE_COLUMNS.split(",")]
    return Trade(**dict(zip(names, values)))


def posted_from_row(row: tuple) -> Posted:
    """A ``Posted`` from a row of ``_TX_COLUMNS``."""
    (tx_id, user_id, asset, amount, after, type_, description, metadata, version, ts,
     initiated_by) = row
    return Posted(
        user_id=user_id, version=version, asset=asset, amount=amount, balance_after=after,
        type=type_, description=description, metadata=json.loads(metadata),
        ts=parse_ts(ts), initiated_by=initiated_by, transaction_id=tx_id,
    )


def _metadata_json(metadata: Any) -> str:
    # Most entries (deposits, withdrawals) carry none: skip the encoder for them.
    return json.dumps(dict(metadata), sort_keys=True) if metadata else "{}"


@dataclass(slots=True)
class Submission:
    """One decision, to be committed atomically with its batch.

    Args:
        user_id: the account (``None`` for a ``CreateUser``, whose id the writer assigns).
        command: what was decided.
        events: what ``decide`` confirmed, in order; the writer numbers them
            (transaction ids, a new user's id) at commit.
        reply: completed with ``Confirmed(numbered events)`` after the commit, or
            with the error that kept it out.
        on_failure: the one way the writer calls back into an account: its
            commit failed, so its in-memory state is ahead of the ledger and it
            must reload (and then ``reset``).
        idempotency: ``(caller_id, key, fingerprint)``; the committed events are
            stored under it in the same transaction.
        deadline: seconds since the epoch; a submission still queued then is not
            committed (its caller has been told the outcome is unknown): the writer
            refuses it and remembers the refusal under its key, so a repeat says so.
    """

    user_id: int | None
    command: Command
    events: tuple[Event, ...]
    reply: Reply
    on_failure: Callable[[], None] | None = None
    idempotency: tuple[int, str, str] | None = None
    deadline: float | None = None


@dataclass
class _Reset:
    user_id: int


@dataclass
class _Barrier:
    reply: Reply = field(default_factory=Reply)


_STOP = object()

log = logging.getLogger(__name__)

COMMIT_LOG_ENV = "BALANCESIM_COMMIT_LOG"
COMMIT_LOG_MS_ENV = "BALANCESIM_COMMIT_LOG_MS"


class CommitLog:
    """Slow group commits, one line each: ``wall_start_s duration_ms rows ledger pid cpu_ms runq_ms``.

    ``wall_start_s`` is ``time.time()`` (wall clock, so lines from several processes and
    a client's timestamps can be laid side by side), ``duration_ms`` the whole
    transaction (its inserts and the COMMIT with its fsyncs), ``rows`` the submissions
    committed, ``ledger`` the file's base name (``shard-1.db``). Of the duration, the
    writer thread spent ``cpu_ms`` on a CPU and ``runq_ms`` runnable but waiting for one
    (its ``/proc/thread-self/schedstat``); the rest it was blocked, which for a commit is
    mostly the disk. ``-1`` for both where schedstat is missing. The file is opened for
    appending and each line is one ``write``, so several shards may share it.
    """

    def __init__(self, path: str, ledger: str, min_ms: float) -> None:
        self._file = open(path, "a", buffering=1)  # line-buffered: one write(2) per line
        self._tail = f" {os.path.basename(ledger)} {os.getpid()}"
        self.min_s = min_ms / 1000
        self._schedstat: int | None = None  # opened on the writer thread: thread-self is whoever opens it

    @classmethod
    def from_env(cls, ledger: str) -> CommitLog | None:
        """The log ``$BALANCESIM_COMMIT_LOG`` asks for, or ``None`` (the default: no cost)."""
        path = os.environ.get(COMMIT_LOG_ENV)
        if not path:
            return None
        return cls(path, ledger, float(os.environ.get(COMMIT_LOG_MS_ENV, "10")))

    def _thread_times_ns(self) -> tuple[int, int]:
        """The calling thread's (ns on a CPU, ns waiting for one) so far; (-1, -1) where unknown.

        CPU from the thread's clock, which is exact; schedstat's own CPU field lags for a
        running thread. Its wait field is whole: a running thread is not waiting.
        """
        try:
            if self._schedstat is None:
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            waiting = os.pread(self._schedstat, 128, 0).split()[1]
            return time.thread_time_ns(), int(waiting)
        except (OSError, ValueError, IndexError):
            return -1, -1

    def begin(self) -> tuple[float, float, int, int]:
        """Call on the writer thread before a commit; hand the result to ``end``."""
        return (time.time(), time.perf_counter(), *self._thread_times_ns())

    def end(self, began: tuple[float, float, int, int], rows: int) -> None:
        """After the commit: one line if it took ``min_s`` or more."""
        wall_start_s, started_s, cpu_ns, runq_ns = began
        if (spent_s := time.perf_counter() - started_s) < self.min_s:
            return
        cpu_now_ns, runq_now_ns = self._thread_times_ns()
        cpu_ms, runq_ms = ((cpu_now_ns - cpu_ns) / 1e6, (runq_now_ns - runq_ns) / 1e6) if cpu_ns >= 0 else (-1, -1)
        self._file.write(f"{wall_start_s:.6f} {spent_s * 1000:.3f} {rows}{self._tail} {cpu_ms:.3f} {runq_ms:.3f}\n")

    def close(self) -> None:
        self._file.close()
        if self._schedstat is not None:
            os.close(self._schedstat)


class Ledger:
    """The durable ledger with its group-commit writer and a pool of readers.

    The ledger stores events and entries; it knows nothing of HTTP. What it
    completes a reply with is a ``Confirmed`` record of the committed events.

    Args:
        path: the SQLite file.
        batch_max: the most submissions committed in one transaction.
        readers: how many read connections to keep.
        ids: a shard's id scheme (``balancesim.cluster.ShardIds``): its placement is
            recorded in a new file and checked in an existing one (``PlacementError``),
            and new users and transactions get ids that name the shard. ``None``: the
            embedded mode's 1, 2, 3 …
    """

    def __init__(self, path: str, *, batch_max: int = 1000, readers: int = 4,
                 ids: ShardIds | None = None) -> None:
        self.path = path
        self.batch_max = batch_max
        self.ids = ids
        self._db = connect(path)
        if ids is None:
            create_schema(self._db)
        else:
            try:
                # One transaction: a new shard file gets its tables and its placement at once.
                with self._db.atomic():
                    create_schema(self._db)
                    ids.claim(self._db.conn, path)
            except BaseException:
                self._db.close()
                raise
        self._readers: queue.Queue[sqlite_utils.Database] = queue.Queue()
        for _ in range(readers):
            self._readers.put(connect(path))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._poisoned: set[int] = set()
        self._listeners: list[Callable[[list[Event]], None]] = []
        self._fault: Exception | None = None
        self._fault_times: int | None = None
        self.commits = 0
        self.committed_submissions = 0
        self._commit_log = CommitLog.from_env(path)
        self.failed_commits = 0
        """Transactions that could not be written (a full disk …): their submissions failed."""
        self.expired = 0
        """Submissions refused because their deadline passed while they waited."""
        self.on_batch: Callable[[int, float], None] | None = None
        """Called on the writer thread after each commit with its submissions and its
        seconds (write and fsync), for metrics; it must be quick."""
        row = self._db.execute("SELECT COALESCE(MAX(transaction_id), 0) FROM transactions").fetchone()
        # Transactions are numbered by a sequence: the id itself in the embedded mode,
        # the shard's own sequence (named into an id by ``ids``) in a shard.
        if ids is None:
            self._next_tx_seq = row[0] + 1
            self._transaction_id: Callable[[int], int] = int  # the sequence is the id
        else:
            self._next_tx_seq = ids.next_transaction_sequence(row[0], path)
            self._transaction_id = ids.transaction_id
        self._thread = threading.Thread(target=self._run, name="LedgerWriter", daemon=True)
        self._thread.start()

    # -- writing -----------------------------------------------------------------

    def on_commit(self, listener: Callable[[list[Event]], None]) -> None:
        """Call ``listener(events)`` on the writer thread after every commit.

        The events of one batch come in commit order, so each account's entries
        arrive in version order. Listeners run before the batch's replies are
        completed, so whatever they start (a trade's expiry on the clock) is in
        place before a caller learns of the commit. They must be quick.
        """
        self._listeners.append(listener)

    def append(self, submission: Submission) -> None:
        """Queue a decision for the next group commit."""
        self._queue.put(submission)

    def reset(self, user_id: int) -> None:
        """Mark where an account's decisions start again after a reload."""
        self._queue.put(_Reset(user_id))

    def flush(self) -> Reply:
        """A reply completed once everything queued before it is committed (or failed)."""
        barrier = _Barrier()
        self._queue.put(barrier)
        return barrier.reply

    def alive(self) -> bool:
        """Whether the writer thread runs (it stops only on ``close``)."""
        return self._thread.is_alive()

    def inject_fault(self, error: Exception | None, *, times: int | None = None) -> None:
        """Make commits fail with ``error``: the next ``times`` ones, or all until cleared."""
        self._fault = error
        self._fault_times = times

    def close(self) -> None:
        """Commit what is queued, stop the writer and close every connection."""
        self._queue.put(_STOP)
        self._thread.join()
        self._db.close()
        if self._commit_log is not None:
            self._commit_log.close()
        while not self._readers.empty():
            self._readers.get().close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            self._commit([item for item in batch if item is not _STOP])
            if stop:
                return

    def _commit(self, batch: list[Any]) -> None:
        accepted: list[Submission] = []
        barriers: list[_Barrier] = []
        now = time.time()
        for item in batch:
            if type(item) is Submission:
                if item.deadline is not None and item.deadline < now:
                    self._expire(item)
                elif item.user_id in self._poisoned:
                    item.reply.set_exception(
                        errors.StorageUnavailable("the ledger could not store an earlier change")
                    )
                else:
                    accepted.append(item)
            elif isinstance(item, _Reset):
                self._poisoned.discard(item.user_id)
            else:
                barriers.append(item)
        first_tx_seq = self._next_tx_seq
        started = time.perf_counter()
        commit_log = self._commit_log
        began = commit_log.begin() if commit_log is not None else None
        try:
            outcomes = self._write(accepted)
        except Exception as error:  # noqa: BLE001 - any storage failure fails the batch
            self._next_tx_seq = first_tx_seq
            self.failed_commits += 1
            self._fail(accepted, error)
        else:
            if commit_log is not None and began is not None:
                commit_log.end(began, len(accepted))
            self.commits += 1
            self.committed_submissions += len(accepted)
            if self.on_batch is not None and accepted:  # a barrier alone commits nothing
                try:
                    self.on_batch(len(accepted), time.perf_counter() - started)
                except Exception:  # noqa: BLE001 - a metric must never keep a commit's replies back
                    log.exception("commit observer %r failed", self.on_batch)
            events = [event for outcome in outcomes if type(outcome) is tuple for event in outcome]
            if events:
                for listener in self._listeners:
                    try:
                        listener(events)
                    except Exception:  # noqa: BLE001 - committed is committed: reply regardless
                        log.exception("commit listener %r failed", listener)
            for sub, outcome in zip(accepted, outcomes):
                if type(outcome) is tuple:
                    sub.reply.set(Confirmed(outcome))
                else:
                    sub.reply.set_exception(outcome)
        for barrier in barriers:
            barrier.reply.set(None)

    def _number(self, events: tuple[Event, ...]) -> tuple[Event, ...]:
        if len(events) == 1 and type(events[0]) is Posted:  # a deposit, a withdrawal: the common case
            self._next_tx_seq += 1
            return (events[0].numbered(self._transaction_id(self._next_tx_seq - 1)),)
        out = []
        for event in events:
            if isinstance(event, Posted):
                event = event.numbered(self._transaction_id(self._next_tx_seq))
                self._next_tx_seq += 1
            out.append(event)
        return tuple(out)

    def _write(self, accepted: list[Submission]) -> list[tuple[Event, ...] | errors.BalancesimError]:
        """Commit ``accepted`` in one transaction; per submission its numbered events, or
        the error (a taken username) that kept it out without failing the rest."""
        if self._fault is not None:
            error = self._fault
            if self._fault_times is not None:
                self._fault_times -= 1
                if self._fault_times <= 0:
                    self._fault = None
            raise error
        db = self._db
        tx_rows, balances, versions, trades, controls, keys = [], {}, {}, [], [], []
        outcomes: list[tuple[Event, ...] | errors.BalancesimError] = []
        with db.atomic():
            for sub in accepted:
                write_user = self._USER_WRITES.get(type(sub.command))
                if write_user is None:
                    events = self._number(sub.events)
                else:
                    try:
                        events = (write_user(self, sub.command, sub.events[0]),)
                    except (errors.Conflict, errors.UnknownUser, errors.WrongShard) as error:
                        # Refused by the file (a taken name, a missing account, another
                        # shard's name): this one
                        # stays out, the rest of the batch commits.
                        outcomes.append(error)
                        continue
                for event in events:
                    if type(event) is Posted:
                        tx_rows.append((
                            event.transaction_id, event.user_id, event.asset, event.amount,
                            event.balance_after, event.type, event.description,
                            _metadata_json(event.metadata), event.version,
                            iso(event.ts), event.initiated_by,
                        ))
                        balances[(event.user_id, event.asset)] = event.balance_after
                        versions[event.user_id] = event.version
                    elif isinstance(event, (OptionOpened, OptionForced, OptionSettled)):
                        trades.append(_trade_row(event.trade))
                    elif isinstance(event, ControlModeSet):
                        controls.append((event.user_id, event.mode, event.set_by, iso(event.ts)))
                outcomes.append(events)
                if sub.idempotency is not None:
                    keys.append((*sub.idempotency, encode(Confirmed(events)).decode()))
            conn = db.conn
            # An empty executemany still prepares its statement: with small batches
            # (a few requests per commit) that was a fixed cost worth skipping.
            for sql, rows in (
                (f"INSERT INTO transactions ({_TX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", tx_rows),
                ("UPDATE balances SET amount = ? WHERE user_id = ? AND asset = ?",
                 [(amount, user_id, asset) for (user_id, asset), amount in balances.items()]),
                ("UPDATE users SET version = ? WHERE user_id = ?",
                 [(version, user_id) for user_id, version in versions.items()]),
                (f"INSERT OR REPLACE INTO trades ({_TRADE_COLUMNS}) VALUES ({','.join('?' * 17)})", trades),
                ("INSERT INTO control_changes (user_id, mode, set_by, ts) VALUES (?, ?, ?, ?)", controls),
                ("UPDATE users SET control_mode = ? WHERE user_id = ?",
                 [(mode, user_id) for user_id, mode, _, _ in controls]),
                ("INSERT OR REPLACE INTO idempotency (caller_id, key, fingerprint, result) VALUES (?, ?, ?, ?)",
                 keys),
            ):
                if rows:
                    conn.executemany(sql, rows)
        return outcomes

    def _insert_user(self, command: CreateUser, decided: UserCreated) -> UserCreated:
        user_id = insert_user(self._db, command.username, command.role, command.password_hash, decided.ts,
                              ids=self.ids)
        return UserCreated(user_id, decided.username, decided.role, decided.ts)

    def _update_user(self, command: UpdateUser, decided: UserUpdated) -> UserUpdated:
        row = self._db.execute(
            "SELECT username, role, disabled FROM users WHERE user_id = ?", (command.user_id,)
        ).fetchone()
        if row is None:
            raise errors.UnknownUser(f"no user {command.user_id}")
        username, role, disabled = row
        role = command.role if command.role is not None else role
        disabled = command.disabled if command.disabled is not None else bool(disabled)
        self._db.execute("UPDATE users SET role = ?, disabled = ? WHERE user_id = ?",
                         (role, int(disabled), command.user_id))
        self._db.execute(
            "INSERT INTO user_changes (user_id, role, disabled, set_by, ts) VALUES (?, ?, ?, ?, ?)",
            (command.user_id, role, int(disabled), command.set_by, iso(decided.ts)),
        )
        return UserUpdated(command.user_id, username, role, disabled, command.set_by, decided.ts)

    # Commands about an account itself, not its balances: the writer applies them to
    # the users table and makes their event with what the file says.
    _USER_WRITES: dict[type, Callable[..., Event]] = {
        CreateUser: _insert_user,
        UpdateUser: _update_user,
    }

    def _expire(self, sub: Submission) -> None:
        """Refuse a submission whose deadline passed while it waited: like a failed commit
        for its account (the actor reloads; what it decided after it fails too), and a
        refusal remembered under its key, in a transaction of its own."""
        expired = errors.Unavailable("the request expired before it was committed; nothing changed: "
                                     "send it again with a new Idempotency-Key")
        self.expired += 1
        if sub.user_id is not None:
            self._poisoned.add(sub.user_id)
        if sub.idempotency is not None:
            try:
                with self._db.atomic():
                    self._db.execute(
                        "INSERT OR IGNORE INTO idempotency (caller_id, key, fingerprint, result) VALUES (?, ?, ?, ?)",
                        (*sub.idempotency, encode(Rejected(expired)).decode()))
            except Exception:  # noqa: BLE001 - the refusal stands; only its memory is lost
                log.exception("could not remember an expired request's key")
        if sub.on_failure is not None:
            sub.on_failure()
        sub.reply.set_exception(expired)

    def _fail(self, accepted: list[Submission], error: Exception) -> None:
        failure = errors.StorageUnavailable(f"the ledger could not be written: {error}")
        for sub in accepted:
            if sub.user_id is not None:
                self._poisoned.add(sub.user_id)
        for sub in accepted:
            if sub.on_failure is not None:
                sub.on_failure()
            sub.reply.set_exception(failure)

    # -- reading -------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite_utils.Database]:
        """A read connection from the pool, inside one read transaction (one snapshot)."""
        db = self._readers.get()
        try:
            with snapshot(db):
                yield db
        finally:
            self._readers.put(db)

    def load_account(self, user_id: int) -> AccountState | None:
        """The committed state of an account, or ``None`` if there is no such user."""
        with self.reading() as db:
            row = db.execute(
                "SELECT version, control_mode FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
            if row is None:
                return None
            balances = dict.fromkeys(ASSETS, 0)
            balances.update(
                db.execute("SELECT asset, amount FROM balances WHERE user_id = ?", (user_id,)).fetchall()
            )
            trades = {
                trade.trade_id: trade
                for trade in map(trade_from_row, db.execute(
                    f"SELECT {_TRADE_COLUMNS} FROM trades WHERE user_id = ? AND status = 'open'",
                    (user_id,),
                ).fetchall())
            }
        return AccountState(user_id, balances, row[0], row[1], trades)

    def history(self, user_id: int, after_version: int = 0, limit: int = 100) -> list[Posted]:
        """An account's entries with a version above ``after_version``, oldest first."""
        with self.reading() as db:
            rows = db.execute(
                f"SELECT {_TX_COLUMNS} FROM transactions WHERE user_id = ? AND version > ? "
                "ORDER BY version LIMIT ?",
                (user_id, after_version, limit),
            ).fetchall()
        return [posted_from_row(row) for row in rows]

    def trades(self, user_id: int | None = None, status: str | None = None, *,
               newest_first: bool = False, limit: int | None = None) -> list[Trade]:
        """Trades, by owner and by ``open`` / ``settled`` (settled: won, lost, draw).

        Oldest opened first, or ``newest_first``; at most ``limit`` of them.
        """
        clauses, params = [], []
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if status == "open":
            clauses.append("status = 'open'")
        elif status == "settled":
            clauses.append("status != 'open'")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.reading() as db:
            order = "opened_at DESC, trade_id DESC" if newest_first else "opened_at, trade_id"
            if limit is not None:
                order += " LIMIT ?"
                params.append(limit)
            rows = db.execute(f"SELECT {_TRADE_COLUMNS} FROM trades {where} ORDER BY {order}", params).fetchall()
        return [trade_from_row(row) for row in rows]

    def trade(self, trade_id: str) -> Trade | None:
        """One trade by id."""
        with self.reading() as db:
            row = db.execute(f"SELECT {_TRADE_COLUMNS} FROM trades WHERE trade_id = ?", (trade_id,)).fetchone()
        return None if row is None else trade_from_row(row)

    def user(self, *, user_id: int | None = None, username: str | None = None) -> dict | None:
        """A user row (with ``password_hash``) by id or by name."""
        column, value = ("user_id", user_id) if user_id is not None else ("username", username)
        with self.reading() as db:
            rows = list(db.query(f"SELECT * FROM users WHERE {column} = ?", [value]))
        return rows[0] if rows else None

    def snapshots(self, user_id: int | None = None) -> list[dict]:
        """Committed ``{user_id, username, role, balances, version, control_mode}``, one snapshot."""
        where, params = ("WHERE u.user_id = ?", [user_id]) if user_id is not None else ("", [])
        with self.reading() as db:
            rows = db.execute(
                "SELECT u.user_id, u.username, u.role, u.version, u.control_mode, u.disabled, b.asset, b.amount "
                f"FROM users u JOIN balances b ON b.user_id = u.user_id {where} ORDER BY u.user_id",
                params,
            ).fetchall()
        out: dict[int, dict] = {}
        for user_id_, username, role, version, mode, disabled, asset, amount in rows:
            snap = out.setdefault(user_id_, {
                "user_id": user_id_, "username": username, "role": role,
                "balances": dict.fromkeys(ASSETS, 0), "version": version, "control_mode": mode,
                "disabled": bool(disabled),
            })
            snap["balances"][asset] = amount
        return list(out.values())

    def remembered(self, caller_id: int, key: str) -> tuple[str, Any] | None:
        """``(fingerprint, Confirmed)`` stored under an idempotency key, if any.

        A ledger written by an older release stored the response body itself:
        that comes back as the body (a ``dict``), to be answered as it is.
        """
        # One statement sees one committed state by itself: no BEGIN/COMMIT around it
        # (a shard makes this look-up for every mutation it is sent).
        db = self._readers.get()
        try:
            row = db.conn.execute(
                "SELECT fingerprint, result FROM idempotency WHERE caller_id = ? AND key = ?",
                (caller_id, key),
            ).fetchone()
        finally:
            self._readers.put(db)
        if row is None:
            return None
        try:
            return row[0], decode(row[1])
        except ValueError:
            return row[0], json.loads(row[1])
