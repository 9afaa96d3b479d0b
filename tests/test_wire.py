"""Trust on the wire: what crosses Redis opens only under the cluster's secret and as
the kind it was sealed as, every record survives the trip, and the secret never shows."""

from __future__ import annotations

import base64
import os
import stat
import threading

import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from balancesim.actors import COMMAND_TYPES, EVENT_TYPES, Confirmed, Deposit, Rejected, Trade, decode, encode
from balancesim.cluster import (
    MIN_SECRET_CHARS,
    SECRET_ENV,
    SECRET_FILE,
    Forged,
    Secret,
    SecretError,
    load_secret,
    open_sealed,
    seal,
)
from tests.test_codec import records

SECRET = Secret(b"0123456789abcdef" * 4)
OTHER = Secret(b"fedcba9876543210" * 4)
kinds = st.sampled_from(["command", "event", "reply", "reply:gateway-3", "command/shard-0"])


@pytest.fixture(autouse=True)
def no_secret_in_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


@settings(max_examples=400, deadline=None)
@given(records, kinds)
def test_any_record_round_trips_through_encode_seal_open_decode(record, kind):
    sealed = seal(SECRET, encode(record), kind=kind)
    again = decode(open_sealed(SECRET, sealed, kind=kind))
    assert again == record and type(again) is type(record)
    assert decode(open_sealed(SECRET, sealed.decode("utf-8"), kind=kind)) == record  # read as text


@pytest.mark.parametrize("record_type", [*COMMAND_TYPES, *EVENT_TYPES, Confirmed, Rejected, Trade],
                         ids=lambda cls: cls.__name__)
def test_every_record_type_round_trips(record_type):
    # One example of each type, found rather than hoped for among random ones (not
    # shrunk: any example will do, and shrinking took seconds per type).
    record = find(records, lambda r: type(r) is record_type,
                  settings=settings(max_examples=5000, database=None, deadline=None, phases=[Phase.generate]))
    for kind in ("command", "event", "reply"):
        assert decode(open_sealed(SECRET, seal(SECRET, encode(record), kind=kind), kind=kind)) == record


@settings(max_examples=400, deadline=None)
@given(records, kinds, st.data())
def test_any_altered_byte_is_forged(record, kind, data):
    sealed = seal(SECRET, encode(record), kind=kind)
    where = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="where")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    altered = bytearray(sealed)
    altered[where] ^= flip
    with pytest.raises(Forged):
        open_sealed(SECRET, bytes(altered), kind=kind)


@given(records, st.data())
def test_a_cut_or_lengthened_message_is_forged(record, data):
    sealed = seal(SECRET, encode(record), kind="event")
    cut = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="cut")
    with pytest.raises(Forged):
        open_sealed(SECRET, sealed[:cut], kind="event")
    with pytest.raises(Forged):
        open_sealed(SECRET, sealed + data.draw(st.binary(min_size=1, max_size=8)), kind="event")


def test_a_tag_with_its_base64_slack_bits_changed_is_forged():
    # 32 bytes in 43 base64 characters leave 2 bits of the last one unused; a tag
    # decoded before comparing would accept all four spellings.
    sealed = seal(SECRET, encode(Deposit(1, 100)), kind="command")
    version, kind, tag, payload = sealed.split(b".", 3)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    value = alphabet.index(tag[-1:])
    for slack in (1, 2, 3):
        twin = tag[:-1] + alphabet[value ^ slack: (value ^ slack) + 1]
        assert base64.urlsafe_b64decode(twin + b"=") == base64.urlsafe_b64decode(tag + b"=")
        with pytest.raises(Forged):
            open_sealed(SECRET, b".".join((version, kind, twin, payload)), kind="command")


@given(records, kinds)
def test_another_secret_is_forged(record, kind):
    with pytest.raises(Forged, match="does not verify"):
        open_sealed(OTHER, seal(SECRET, encode(record), kind=kind), kind=kind)


def test_another_kind_is_forged_so_a_reply_is_never_a_command():
    reply = seal(SECRET, encode(Confirmed(())), kind="reply")
    with pytest.raises(Forged, match="^a 'reply' where a 'command' was expected$"):
        open_sealed(SECRET, reply, kind="command")
    # Relabelled in the clear, the tag no longer verifies.
    with pytest.raises(Forged, match="does not verify"):
        open_sealed(SECRET, reply.replace(b"s1.reply.", b"s1.command.", 1), kind="command")
    with pytest.raises(Forged):
        open_sealed(SECRET, seal(SECRET, b"{}", kind="reply:gateway-1"), kind="reply:gateway-2")


@pytest.mark.parametrize("junk", [b"", b"{}", b"s1", b"s1.command", b"s1.command.tag", b"s2.command.x.{}",
                                  b"s1..x.{}", b"s1.com\x00mand.x.{}", "s1.command.\ud800.{}"])
def test_a_malformed_envelope_is_forged(junk):
    with pytest.raises(Forged):
        open_sealed(SECRET, junk, kind="command")


def test_a_kind_outside_the_alphabet_is_a_programming_error():
    for kind in ("", "com.mand", "x" * 65, "réponse"):
        with pytest.raises(ValueError, match="a kind is"):
            seal(SECRET, b"{}", kind=kind)


def test_a_short_key_is_refused_rather_than_sealing_with_it():
    with pytest.raises(ValueError, match="at least 32 bytes, not 0"):
        seal(b"", b"{}", kind="command")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        open_sealed(b"short", seal(SECRET, b"{}", kind="command"), kind="command")


def test_the_envelope_is_text_around_the_untouched_payload():
    payload = encode(Deposit(7, 100))
    sealed = seal(SECRET, payload, kind="command")
    assert sealed.startswith(b"s1.command.") and sealed.endswith(b"." + payload)
    assert len(sealed) - len(payload) == len(b"s1.command..") + 43
    sealed.decode("utf-8")


# The secret.


def test_the_environment_variable_is_the_secret(monkeypatch, tmp_path):
    monkeypatch.setenv(SECRET_ENV, "  " + "s" * MIN_SECRET_CHARS + "\n")
    assert load_secret(None) == b"s" * MIN_SECRET_CHARS
    assert load_secret(tmp_path) == b"s" * MIN_SECRET_CHARS  # before the file, which it never creates
    assert not (tmp_path / SECRET_FILE).exists()


@pytest.mark.parametrize("value", ["", "short", "x" * (MIN_SECRET_CHARS - 1)])
def test_a_short_environment_variable_is_refused_without_showing_it(monkeypatch, value):
    monkeypatch.setenv(SECRET_ENV, value)
    expected = f"\\${SECRET_ENV} holds {len(value)} characters; .* at least 32"
    with pytest.raises(SecretError, match=expected) as caught:
        load_secret(None)
    assert not value or value not in str(caught.value)


def test_no_environment_and_no_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SecretError, match=f"set \\${SECRET_ENV}, or give the data directory"):
        load_secret(None)
    with pytest.raises(SecretError, match="does not exist"):
        load_secret(tmp_path / "missing")


def test_a_missing_file_is_created_private_and_read_back_the_same(tmp_path):
    first = load_secret(tmp_path)
    path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert len(text.strip()) == 64 and int(text, 16) >= 0  # 32 random bytes, hex
    assert load_secret(str(tmp_path)) == first
    assert os.listdir(tmp_path) == [SECRET_FILE]  # no temporary file left behind


def test_the_files_content_in_the_environment_gives_the_same_key(monkeypatch, tmp_path):
    from_file = load_secret(tmp_path)
    monkeypatch.setenv(SECRET_ENV, (tmp_path / SECRET_FILE).read_text().strip())  # $(cat …)
    assert load_secret(None) == from_file
    sealed = seal(from_file, b"{}", kind="command")
    assert open_sealed(load_secret(None), sealed, kind="command") == b"{}"


def test_processes_racing_to_create_the_file_agree_on_one_secret(tmp_path):
    found, barrier = [], threading.Barrier(8)

    def load():
        barrier.wait()
        found.append(load_secret(tmp_path))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 8 and len(set(found)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_file_others_may_read_or_write_is_refused(tmp_path, mode):
    path = tmp_path / SECRET_FILE
    path.write_text("k" * 64 + "\n")
    path.chmod(mode)
    expected = f"may be read or written by others \\(mode {mode:04o}\\); run: chmod 600 "
    with pytest.raises(SecretError, match=expected):
        load_secret(tmp_path)
    path.chmod(0o600)
    assert load_secret(tmp_path) == b"k" * 64


def test_a_short_file_or_a_symlink_is_refused(tmp_path):
    path = tmp_path / SECRET_FILE
    path.write_text("too short\n")
    path.chmod(0o600)
    with pytest.raises(SecretError, match="holds 9 characters"):
        load_secret(tmp_path)
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    target = tmp_path / "real.secret"
    target.write_text("k" * 64)
    target.chmod(0o600)
    (elsewhere / SECRET_FILE).symlink_to(target)
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(elsewhere)


def test_the_secret_never_shows_in_what_is_returned_or_raised(tmp_path, monkeypatch, caplog):
    secret = load_secret(tmp_path)
    text = secret.decode()
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r}", "%s" % secret, str([secret]),
             str({"secret": secret})]
    sealed = seal(secret, encode(Deposit(1, 100)), kind="command")
    shown.append(sealed.decode())
    for wrong in (OTHER, secret):
        try:
            open_sealed(wrong, sealed, kind="reply")
        except Forged as error:
            shown += [str(error), repr(error)]
    monkeypatch.setenv(SECRET_ENV, text[:20])  # a mistake: the secret cut short
    with pytest.raises(SecretError) as caught:
        load_secret(None)
    shown += [str(caught.value), repr(caught.value)]
    assert shown and all(text not in item and text[:20] not in item for item in shown)
    assert repr(secret) == "Secret(<64 bytes, redacted>)"
