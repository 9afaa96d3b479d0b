"""Typed errors carrying PROTOCOL.md's error codes and HTTP statuses.

Each is a plain class, so readers, IDEs and type checkers see it. ``by_code``
turns a code back into its class: a rejection that crossed a process boundary as
``{code, message}`` is raised again as the same error.
"""

from __future__ import annotations

from typing import Any

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
    "Unavailable",
    "Timeout",
    "WrongShard",
    "by_code",
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


class InvalidJson(BalancesimError):
    """``invalid_json`` (400): the body or frame is not JSON."""

    code, status = "invalid_json", 400


class InvalidRequest(BalancesimError):
    """``invalid_request`` (400): a field is missing, of the wrong type or out of its set."""

    code, status = "invalid_request", 400


class InvalidAmount(BalancesimError):
    """``invalid_amount`` (400): not a decimal string in range."""

    code, status = "invalid_amount", 400


class UnknownUser(BalancesimError):
    """``unknown_user`` (404)."""

    code, status = "unknown_user", 404


class UnknownTrade(BalancesimError):
    """``unknown_trade`` (404)."""

    code, status = "unknown_trade", 404


class InsufficientFunds(BalancesimError):
    """``insufficient_funds`` (409): the balance would go below zero."""

    code, status = "insufficient_funds", 409


class Unauthorized(BalancesimError):
    """``unauthorized`` (401): no live token, or wrong credentials."""

    code, status = "unauthorized", 401


class Forbidden(BalancesimError):
    """``forbidden`` (403): the caller's role may not do this."""

    code, status = "forbidden", 403


class Conflict(BalancesimError):
    """``conflict`` (409): taken, settled already, or a key reused for another request."""

    code, status = "conflict", 409


class NotFound(BalancesimError):
    """``not_found`` (404): no such route."""

    code, status = "not_found", 404


class RateLimited(BalancesimError):
    """``rate_limited`` (429): too many failed logins; ``retry_after_s`` says when to try."""

    code, status = "rate_limited", 429

    def __init__(self, message: str, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PayloadTooLarge(BalancesimError):
    """``payload_too_large`` (413): refused unread."""

    code, status = "payload_too_large", 413


class StorageUnavailable(BalancesimError):
    """``storage_unavailable`` (503): the ledger could not be written; nothing changed."""

    code, status = "storage_unavailable", 503


class Unavailable(BalancesimError):
    """``unavailable`` (503): the request reached no engine; nothing changed."""

    code, status = "unavailable", 503


class Timeout(BalancesimError):
    """``timeout`` (504): the outcome is unknown; repeat with ``idempotency_key`` to learn it."""

    code, status = "timeout", 504

    def __init__(self, message: str, idempotency_key: str | None = None) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key

    def to_dict(self) -> dict[str, Any]:
        """The error body, with the key that learns the outcome (the caller's or the gateway's)."""
        body: dict[str, Any] = dict(super().to_dict())
        if self.idempotency_key is not None:
            body["idempotency_key"] = self.idempotency_key
        return body


class WrongShard(InvalidRequest):
    """``invalid_request`` (400) on the wire: a new account's username belongs on another
    shard. Only a misrouting gateway or a wrong ``--data-dir`` file sees it (routing is by
    username); a class of its own so that they can tell it from a client's bad field."""


# Direct subclasses only: ``WrongShard`` shares ``invalid_request`` and must not claim it.
_BY_CODE: dict[str, type[BalancesimError]] = {
    cls.code: cls for cls in BalancesimError.__subclasses__()
}


def by_code(code: str, message: str) -> BalancesimError:
    """The error of ``code`` with ``message`` (an unknown code becomes ``invalid_request``)."""
    return _BY_CODE.get(code, InvalidRequest)(message)
