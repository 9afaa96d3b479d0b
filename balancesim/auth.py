"""Password hashing with ``hashlib.scrypt`` and a per-user salt.

The stored form carries its own cost parameters, so a cheap cost chosen for a
simulation with thousands of throwaway users still verifies against the same code.
Hashing takes tens of milliseconds at the default cost: call these off the IOLoop
(the engine runs them on its own threads).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from balancesim.vocabulary import ADMIN_ROLES, MAY, ROLES, SUPERADMIN_ROLES

__all__ = ["hash_password", "verify_password", "DEFAULT_COST", "ROLES", "ADMINS", "SUPERADMINS", "MAY"]

DEFAULT_COST = 2**14
# Kept for callers of the old names; the sets themselves live in ``balancesim.vocabulary``.
ADMINS = ADMIN_ROLES
SUPERADMINS = SUPERADMIN_ROLES


def hash_password(password: str, *, cost: int = DEFAULT_COST) -> str:
    """``scrypt$n$r$p$salt$hash`` for ``password``, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=cost, r=8, p=1, dklen=32)
    return f"scrypt${cost}$8$1${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``, in constant time."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest.hex(), expected)
