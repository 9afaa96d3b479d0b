"""Bearer tokens that survive a restart, and a limit on login failures.

Tokens are ``secrets.token_urlsafe(32)`` (256 bits). Only their SHA-256 is
stored, in the ledger file's ``sessions`` table, so a page keeps its login across
a server restart and a stolen database does not hand out live tokens.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from concurrent.futures import Executor

from balancesim.actors import connect
from balancesim.vocabulary import is_admin

__all__ = ["Principal", "TokenStore", "LoginLimiter", "digest_of"]

# Tokens remembered in memory; older ones are read again from the ledger file.
CACHE_MAX = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    user_id: int
    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return is_admin(self.role)


class TokenStore:
    """Issues and checks login tokens with an expiry.

    Checking a token is a dict look-up for the ``cache_max`` most recently used
    tokens; any other token is read from the ledger file on ``executor``, never on
    the IOLoop. The cache is bounded, so logins that churn do not grow it.

    Args:
        db_path: the ledger file, which also holds the sessions table.
        ttl_s: how long a token lives.
        executor: where the ledger file is read.
        cache_max: how many tokens to keep in memory.
    """

    def __init__(self, db_path: str, *, ttl_s: float = 24 * 3600, executor: Executor | None = None,
                 cache_max: int = CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.executor = executor
        self.cache_max = cache_max
        self._db = connect(db_path)
        self._db.execute(_SCHEMA)
        # Two locks: the connection's, held across file I/O (an fsync may stall for
        # 100+ ms), and the cache's, held only for dict operations: the IOLoop
        # takes the cache's on every request and must never wait behind a write.
        self._db_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: collections.OrderedDict[str, tuple[Principal, float]] = collections.OrderedDict()

    def issue(self, principal: Principal, token: str | None = None) -> str:
        """A new token for ``principal`` (``token``: one a cluster gateway made, which names
        its user and so its shard)."""
        token = token or secrets.token_urlsafe(32)
        digest = _digest(token)
        expires_at = time.time() + self.ttl_s
        with self._db_lock, self._db.atomic():
            self._db.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
            self._db.execute(
                "INSERT INTO sessions (token_hash, user_id, username, role, expires_at) VALUES (?, ?, ?, ?, ?)",
                (digest, principal.user_id, principal.username, principal.role, expires_at),
            )
        self._remember(digest, (principal, expires_at))
        return token

    async def check(self, token: str | None) -> Principal | None:
        """The principal of a live token, else ``None``; reads the file off the loop on a miss."""
        if not token or len(token) > 256:
            return None
        digest = _digest(token)
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
        if hit is None:
            loop = asyncio.get_running_loop()
            hit = await loop.run_in_executor(self.executor, self._load, digest)
            if hit is None:
                return None
        principal, expires_at = hit
        return principal if expires_at > time.time() else None

    def check_blocking(self, token: str | None) -> Principal | None:
        """``check`` for a caller that is not on an event loop."""
        if not token or len(token) > 256:
            return None
        hit = self._load(_digest(token))
        return hit[0] if hit is not None and hit[1] > time.time() else None

    def _load(self, digest: str) -> tuple[Principal, float] | None:
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is not None:
            return hit
        with self._db_lock:
            row = self._db.execute(
                "SELECT user_id, username, role, expires_at FROM sessions WHERE token_hash = ?", (digest,)
            ).fetchone()
        if row is None:
            return None
        hit = (Principal(row[0], row[1], row[2]), row[3])
        self._remember(digest, hit)
        return hit

    def _remember(self, digest: str, hit: tuple[Principal, float]) -> None:
        # The oldest entries go first; they are still in the file.
        with self._cache_lock:
            self._cache[digest] = hit
            while len(self._cache) > self.cache_max:
                self._cache.popitem(last=False)

    async def revoke(self, token: str) -> None:
        """Kill one token at once (logout): gone from memory now, from the file off the loop."""
        digest = _digest(token)
        with self._cache_lock:
            self._cache.pop(digest, None)
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self._delete, "DELETE FROM sessions WHERE token_hash = ?", digest)

    async def revoke_user(self, user_id: int) -> None:
        """Kill every token of an account at once (disabled, or its role changed)."""
        with self._cache_lock:
            for digest in [d for d, (p, _) in self._cache.items() if p.user_id == user_id]:
                del self._cache[digest]
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self._delete, "DELETE FROM sessions WHERE user_id = ?", user_id)

    def _delete(self, sql: str, value: object) -> None:
        with self._db_lock, self._db.atomic():
            self._db.execute(sql, (value,))
        # A check that read the row just before the delete may have cached it again.
        with self._cache_lock:
            for digest in [d for d, (p, _) in self._cache.items()
                           if (d == value if isinstance(value, str) else p.user_id == value)]:
                del self._cache[digest]

    def close(self) -> None:
        self._db.close()


def digest_of(token: str) -> str:
    """What the store keeps of a token (and what a session remembers of its own)."""
    return _digest(token)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginLimiter:
    """At most ``limit`` failed logins per address per ``window_s``."""

    def __init__(self, *, limit: int = 10, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._count = 0

    def blocked(self, address: str) -> bool:
        """Whether ``address`` has used up its failures for now."""
        failures = self._failures.get(address)
        if not failures:
            return False
        horizon = time.monotonic() - self.window_s
        while failures and failures[0] < horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return len(failures) >= self.limit

    def retry_after_s(self, address: str) -> int:
        """Whole seconds until ``address`` may try again (for ``Retry-After``)."""
        failures = self._failures.get(address)
        if not failures:
            return 0
        return max(1, int(failures[0] + self.window_s - time.monotonic()) + 1)

    def failed(self, address: str) -> None:
        """Count one failure."""
        self._failures[address].append(time.monotonic())
        self._count += 1
        if self._count % 1024 == 0:
            # Addresses that failed once and never came back would stay for ever.
            horizon = time.monotonic() - self.window_s
            for stale in [a for a, f in self._failures.items() if not f or f[-1] < horizon]:
                del self._failures[stale]
