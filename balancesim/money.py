"""Exact money: decimal strings at the edges, integer units of 1e-8 inside.

PROTOCOL.md fixes the edge format: plain decimal notation, at most 8 fractional
digits, no exponent, no sign unless the field is signed, strictly positive (or
non-zero when signed), at most 1,000,000,000 in absolute value. Anything else,
JSON numbers included, is ``invalid_amount``.
"""

from __future__ import annotations

import re

from balancesim.errors import InvalidAmount

__all__ = ["UNIT", "MAX_AMOUNT_UNITS", "parse_amount", "format_amount", "mul_units"]

UNIT = 10**8
MAX_AMOUNT_UNITS = 1_000_000_000 * UNIT

_PLAIN = re.compile(r"(-?)([0-9]+)(?:\.([0-9]{1,8}))?\Z")


def parse_amount(value: object, *, signed: bool = False, field: str = "amount") -> int:
    """Parse a PROTOCOL.md money string into integer units of 1e-8.

    Args:
        value: what the client sent; only ``str`` is accepted.
        signed: whether a leading ``-`` is allowed (then non-zero, not positive).
        field: the field name, for the error message.

    Raises:
        InvalidAmount: for anything that breaks the money rules.
    """
    if not isinstance(value, str):
        raise InvalidAmount(f"{field} must be a decimal string such as \"100.5\"")
    match = _PLAIN.match(value)
    if match is None:
        raise InvalidAmount(
            f"{field} must be plain decimal digits with at most 8 fractional digits"
        )
    sign, whole, frac = match.groups()
    if sign and not signed:
        raise InvalidAmount(f"{field} must not carry a sign")
    units = int(whole) * UNIT + int((frac or "").ljust(8, "0"))
    if units == 0:
        raise InvalidAmount(f"{field} must be {'non-zero' if signed else 'greater than zero'}")
    if units > MAX_AMOUNT_UNITS:
        raise InvalidAmount(f"{field} must be at most 1000000000")
    return -units if sign else units


def format_amount(units: int) -> str:
    """Format integer units as a plain decimal string without trailing zeros."""
    if units < 0:
        return "-" + format_amount(-units)
    whole, frac = divmod(units, UNIT)
    if not frac:
        return str(whole)
    # frac + UNIT is "1" followed by the eight zero-padded digits.
    return f"{whole}.{str(frac + UNIT)[1:].rstrip('0')}"


def mul_units(a_units: int, b_units: int, *, round_up: bool = False) -> int:
    """Multiply two unit amounts (e.g. quantity × price), rounding to a unit."""
    product, rest = divmod(a_units * b_units, UNIT)
    return product + (1 if round_up and rest else 0)
