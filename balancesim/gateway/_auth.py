"""Bearer tokens that survive a restart, and a limit on login failures.

Tokens are ``secrets.token_urlsafe(32)`` (256 bits). Only their SHA-256 is
stored, in the ledger file's ``sessions`` table, so a page keeps its login across
a server restart and a stolen database does not hand out live tokens.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from balancesim.actors import connect

__all__ = ["Principal", "TokenStore", "LoginLimiter"]

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
        return self.role in ("admin", "superadmin")


class TokenStore:
    """Issues and checks login tokens with an expiry.

    Args:
        db_path: the ledger file, which also holds the sessions table.
        ttl_s: how long a token lives.
    """

    def __init__(self, db_path: str, *, ttl_s: float = 24 * 3600) -> None:
        self.ttl_s = ttl_s
        self._db = connect(db_path)
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Principal, float]] = {}

    def issue(self, principal: Principal) -> str:
        """A new token for ``principal``."""
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        expires_at = time.time() + self.ttl_s
        with self._lock:
            with self._db.atomic():
                self._db.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
                self._db.execute(
                    "INSERT INTO sessions (token_hash, user_id, username, role, expires_at) VALUES (?, ?, ?, ?, ?)",
                    (digest, principal.user_id, principal.username, principal.role, expires_at),
                )
            self._cache[digest] = (principal, expires_at)
        return token

    def check(self, token: str | None) -> Principal | None:
        """The principal of a live token, else ``None``."""
        if not token or len(token) > 256:
            return None
        digest = _digest(token)
        with self._lock:
            hit = self._cache.get(digest)
            if hit is None:
                row = self._db.execute(
                    "SELECT user_id, username, role, expires_at FROM sessions WHERE token_hash = ?", (digest,)
                ).fetchone()
                if row is None:
                    return None
                hit = (Principal(row[0], row[1], row[2]), row[3])
                self._cache[digest] = hit
        principal, expires_at = hit
        return principal if expires_at > time.time() else None

    def close(self) -> None:
        self._db.close()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginLimiter:
    """At most ``limit`` failed logins per address per ``window_s``."""

    def __init__(self, *, limit: int = 10, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

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

    def failed(self, address: str) -> None:
        """Count one failure."""
        self._failures[address].append(time.monotonic())
