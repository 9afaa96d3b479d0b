"""The one vocabulary of balancesim: assets, symbols, durations, modes, roles, permissions.

Everything that names a closed set of values lives here, once. ``decide`` judges
commands against these sets, the gateway checks permissions with ``MAY``, the hub
and the scenario worlds route by ``ADMIN_ROLES``, and the CLI offers ``ROLES``.
"""

from __future__ import annotations

import enum

__all__ = [
    "ASSETS", "ACCOUNT_ASSET", "SYMBOLS", "DURATIONS", "DIRECTIONS", "SIDES", "OUTCOMES",
    "CONTROL_MODES", "Role", "ROLES", "ADMIN_ROLES", "SUPERADMIN_ROLES", "MAY", "is_admin",
]

ACCOUNT_ASSET = "USDT"
#: Every asset an account holds, the account currency first.
ASSETS: tuple[str, ...] = (ACCOUNT_ASSET, "BTC", "ETH")
#: Tradable symbol → the asset it buys or sells (priced in ``ACCOUNT_ASSET``).
SYMBOLS: dict[str, str] = {"BTCUSDT": "BTC", "ETHUSDT": "ETH"}
#: Option durations in (simulated) seconds.
DURATIONS: tuple[int, ...] = (30, 60)
DIRECTIONS: tuple[str, ...] = ("up", "down")
SIDES: tuple[str, ...] = ("buy", "sell")
#: What an admin may force an open trade to.
OUTCOMES: tuple[str, ...] = ("win", "lose")
CONTROL_MODES: tuple[str, ...] = ("normal", "win", "lose")


class Role(str, enum.Enum):
    """Who a principal is; the value is the wire name."""

    USER = "user"
    ADMIN = "admin"
    SUPERADMIN = "superadmin"

    def __str__(self) -> str:
        return self.value


ROLES: tuple[str, ...] = tuple(role.value for role in Role)
ADMIN_ROLES: tuple[str, ...] = (Role.ADMIN.value, Role.SUPERADMIN.value)
SUPERADMIN_ROLES: tuple[str, ...] = (Role.SUPERADMIN.value,)

# PROTOCOL.md's "who" column: the roles that may do each operation. The gateway
# and the in-process scenario world both enforce it from here.
MAY: dict[str, tuple[str, ...]] = {
    "read_all": ADMIN_ROLES,
    "create_user": ADMIN_ROLES,
    "create_admin": SUPERADMIN_ROLES,
    "manage_users": SUPERADMIN_ROLES,
    "deposit": SUPERADMIN_ROLES,
    "withdraw": SUPERADMIN_ROLES,
    "adjust": SUPERADMIN_ROLES,
    "control": SUPERADMIN_ROLES,
    "force": ADMIN_ROLES,
    "option": ROLES,
    "spot": ROLES,
}


def is_admin(role: str) -> bool:
    """Whether ``role`` sees every account (admin and superadmin)."""
    return role in ADMIN_ROLES
