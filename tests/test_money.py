from hypothesis import given
from hypothesis import strategies as st
import pytest

from balancesim.errors import InvalidAmount
from balancesim.money import MAX_AMOUNT_UNITS, format_amount, mul_units, parse_amount


@pytest.mark.parametrize(
    ("text", "units"),
    [("1", 10**8), ("100.5", 10_050_000_000), ("0.00000001", 1), ("1000000000", MAX_AMOUNT_UNITS)],
)
def test_plain_decimal_strings_parse_to_exact_units(text, units):
    assert parse_amount(text) == units


@pytest.mark.parametrize(
    "bad",
    ["0", "-1", "+1", "1e3", "1.000000001", "1000000000.00000001", " 1", "1 ", "", ".5", "5.",
     "NaN", "inf", "Infinity", "0x10", "1,5", "١", 10, 1.5, None, True, [], {}],
)
def test_everything_else_is_invalid_amount(bad):
    with pytest.raises(InvalidAmount):
        parse_amount(bad)


def test_signed_fields_take_a_minus_but_not_zero():
    assert parse_amount("-2.5", signed=True) == -250_000_000
    with pytest.raises(InvalidAmount):
        parse_amount("-0", signed=True)


@given(st.integers(min_value=-MAX_AMOUNT_UNITS, max_value=MAX_AMOUNT_UNITS).filter(bool))
def test_format_and_parse_round_trip(units):
    assert parse_amount(format_amount(units), signed=True) == units


def test_rounding_goes_the_way_asked_and_never_creates_money():
    assert mul_units(1, 1) == 0
    assert mul_units(1, 1, round_up=True) == 1
    assert format_amount(mul_units(parse_amount("0.001"), parse_amount("65000"))) == "65"
