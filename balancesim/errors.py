"""Typed errors carrying PROTOCOL.md's error codes and HTTP statuses."""

from __future__ import annotations

__all__ = [
    "BalancesimError",
    "InvalidJson",
    "InvalidRequest",
    "InvalidAmount",
    "UnknownUser",
    "UnknownTrade",
    "InsufficientFunds",
    "Unauthorized",
    "Forbidden",
    "Conflict",
    "NotFound",
    "RateLimited",
    "PayloadTooLarge",
    "StorageUnavailable",
]


class BalancesimError(Exception):
    """A rejection a client can act on: a snake_case code, a sentence, a status."""

    code = "invalid_request"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The PROTOCOL.md error body."""
        return {"error": {"code": self.code, "message": self.message}}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BalancesimError)
            and (self.code, self.message) == (other.code, other.message)
        )

    def __hash__(self) -> int:
        return hash((self.code, self.message))


def _error(name: str, code: str, status: int) -> type[BalancesimError]:
    return type(name, (BalancesimError,), {"code": code, "status": status, "__doc__": f"`{code}` ({status})."})


InvalidJson = _error("InvalidJson", "invalid_json", 400)
InvalidRequest = _error("InvalidRequest", "invalid_request", 400)
InvalidAmount = _error("InvalidAmount", "invalid_amount", 400)
UnknownUser = _error("UnknownUser", "unknown_user", 404)
UnknownTrade = _error("UnknownTrade", "unknown_trade", 404)
InsufficientFunds = _error("InsufficientFunds", "insufficient_funds", 409)
Unauthorized = _error("Unauthorized", "unauthorized", 401)
Forbidden = _error("Forbidden", "forbidden", 403)
Conflict = _error("Conflict", "conflict", 409)
NotFound = _error("NotFound", "not_found", 404)
RateLimited = _error("RateLimited", "rate_limited", 429)
PayloadTooLarge = _error("PayloadTooLarge", "payload_too_large", 413)
StorageUnavailable = _error("StorageUnavailable", "storage_unavailable", 503)
