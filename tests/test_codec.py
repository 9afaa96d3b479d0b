"""Every record of the engine's interface survives a round trip to bytes, exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancesim import errors
from balancesim.actors import (
    COMMAND_TYPES,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Adjust,
    Confirmed,
    ControlModeSet,
    CreateUser,
    Deposit,
    ForceOption,
    OpenOption,
    OptionForced,
    OptionOpened,
    OptionSettled,
    PlaceSpotOrder,
    Posted,
    PriceTicked,
    Rejected,
    SetControlMode,
    SettleOption,
    Trade,
    UpdateUser,
    UserCreated,
    UserUpdated,
    Withdraw,
    decode,
    encode,
)

ids = st.integers(min_value=1, max_value=2**53)
units = st.integers(min_value=-(10**18), max_value=10**18)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
maybe_id = st.none() | ids
metadata = st.dictionaries(
    st.sampled_from(["trade_id", "order_id", "symbol", "side", "price", "total", "decided_by",
                     "settled_after_restart", "quantity"]),
    st.none() | st.booleans() | units | text, max_size=5,
)

trades = st.builds(
    Trade, trade_id=text, user_id=ids, symbol=text, direction=text, amount=units, duration=units,
    payout_rate=units, entry_price=units, opened_at=times, expires_at=times, status=text,
    exit_price=st.none() | units, decided_by=st.none() | text, settled_at=st.none() | times,
    payout=st.none() | units, forced_outcome=st.none() | text, forced_by=maybe_id,
)
posted = st.builds(
    Posted, user_id=ids, version=ids, asset=text, amount=units, balance_after=units, type=text,
    description=text, metadata=metadata, ts=times, initiated_by=maybe_id, transaction_id=ids,
)
money = st.sampled_from([Deposit, Withdraw, Adjust]).flatmap(
    lambda cls: st.builds(cls, user_id=ids, amount=units, asset=text, description=text, initiated_by=maybe_id)
)
commands = st.one_of(
    money,
    st.builds(OpenOption, user_id=ids, symbol=text, direction=text, amount=units, duration=units,
              payout_rate=st.none() | units, entry_price=st.none() | units, initiated_by=maybe_id,
              expires_in_s=st.none() | times),
    st.builds(ForceOption, user_id=ids, trade_id=text, outcome=text, admin_id=ids),
    st.builds(SettleOption, user_id=ids, trade_id=text, exit_price=units, at=times, note=metadata),
    st.builds(PlaceSpotOrder, user_id=ids, symbol=text, side=text, quantity=units,
              price=st.none() | units, initiated_by=maybe_id),
    st.builds(SetControlMode, user_id=ids, mode=text, set_by=ids),
    st.builds(CreateUser, username=text, role=text, password_hash=text, created_by=maybe_id),
    st.builds(UpdateUser, user_id=ids, disabled=st.none() | st.booleans(), role=st.none() | text, set_by=ids),
)
events = st.one_of(
    posted,
    st.builds(OptionOpened, trade=trades),
    st.builds(OptionForced, trade=trades),
    st.builds(OptionSettled, trade=trades),
    st.builds(ControlModeSet, user_id=ids, mode=text, set_by=ids, ts=times),
    st.builds(UserCreated, user_id=ids, username=text, role=text, ts=times),
    st.builds(UserUpdated, user_id=ids, username=text, role=text, disabled=st.booleans(), set_by=ids, ts=times),
    st.builds(PriceTicked, prices=st.dictionaries(text, units, max_size=3), ts=times),
)
rejections = st.builds(
    lambda cls, message: Rejected(cls(message)),
    st.sampled_from([c for c in errors.BalancesimError.__subclasses__()]), text,
)
replies = st.one_of(st.builds(Confirmed, events=st.lists(events, max_size=4).map(tuple)), rejections)
records = st.one_of(commands, events, replies, trades)


@settings(max_examples=400, deadline=None)
@given(records)
def test_every_record_round_trips_to_equal_bytes_and_back(record):
    data = encode(record)
    again = decode(data)
    assert again == record
    assert type(again) is type(record)
    assert encode(again) == data


@given(rejections)
def test_a_rejection_comes_back_as_the_same_error_class(rejected):
    again = decode(encode(rejected))
    assert type(again.error) is type(rejected.error)
    assert again.error.code == rejected.error.code and again.error.message == rejected.error.message


def test_every_command_and_event_type_is_covered_by_the_strategies():
    seen = set()

    @settings(max_examples=600, deadline=None)
    @given(st.one_of(commands, events))
    def collect(record):
        seen.add(type(record))

    collect()
    assert seen == set(COMMAND_TYPES) | set(EVENT_TYPES)


def test_each_record_carries_the_schema_version_and_another_is_refused():
    data = encode(Deposit(1, 100))
    envelope = json.loads(data)
    assert envelope["v"] == SCHEMA_VERSION and envelope["r"]["$t"] == "Deposit"
    with pytest.raises(ValueError, match="schema version 99"):
        decode(json.dumps({**envelope, "v": 99}))
    with pytest.raises(ValueError, match="unknown record type"):
        decode(json.dumps({"v": SCHEMA_VERSION, "r": {"$t": "Teleport"}}))
    with pytest.raises(ValueError, match="malformed"):
        decode(json.dumps({"v": SCHEMA_VERSION, "r": {"$t": "Deposit", "user_id": 1, "amount": 1, "colour": "red"}}))
    with pytest.raises(ValueError, match="not an encoded record"):
        decode(b"not json")
