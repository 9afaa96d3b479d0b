"""Trust on the wire: every command, event and reply that crosses Redis is sealed
with an HMAC-SHA256 under the cluster's secret, and opened only if it verifies.

Anyone who can reach Redis can write to a stream, so a shard must not act on what
it cannot verify. A sealed message is ASCII text followed by the payload::

    s1.<kind>.<tag>.<payload>

``s1`` is the envelope's version, ``kind`` says what the message is ("command",
"event", "reply", or a kind that also names its destination, like
"reply:gateway-3"), ``tag`` is the HMAC-SHA256, base64url without padding (43
characters), and ``payload`` is the codec's bytes, untouched. The MAC covers a
domain label, the kind and the payload, so a reply cannot be replayed as a
command, nor one kind's stream be fed into another's.

Why this encoding: it adds 50 bytes or so to a payload of a few hundred; the
payload is neither escaped (as inside JSON) nor re-encoded (as in base64), so
sealing costs one HMAC and one concatenation; and the whole stays valid UTF-8, so
it is readable in ``redis-cli MONITOR`` and survives a client that decodes
responses to text.

What a seal does not do: a verbatim replay of a sealed command verifies. The
command's id, stored under a unique constraint with its entries, makes that apply
once; an event batch's sequence number and epoch reveal a repeated batch.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
import re
import secrets
import stat
import tempfile

__all__ = ["SECRET_ENV", "SECRET_FILE", "MIN_SECRET_CHARS", "Secret", "SecretError", "Forged",
           "load_secret", "seal", "open_sealed"]

SECRET_ENV = "BALANCESIM_CLUSTER_SECRET"
SECRET_FILE = "cluster.secret"
#: A secret typed by hand must be at least this long; the one ``serve`` makes is 64
#: hex characters (32 random bytes).
MIN_SECRET_CHARS = 32

_VERSION = b"s1"
# Domain separation: should the cluster secret ever key another MAC (tokens, say),
# no message of one could pass for the other.
_LABEL = b"balancesim-wire-1\x00"
_TAG_CHARS = 43  # 32 bytes in base64url without padding
_KIND = re.compile(r"[A-Za-z0-9_:/-]{1,64}")
_KIND_BYTES = re.compile(rb"[A-Za-z0-9_:/-]{1,64}")


class SecretError(Exception):
    """The cluster secret is missing, too short, or kept where others may read it."""


class Forged(Exception):
    """A message that does not verify: a wrong tag (another secret, altered bytes),
    another kind than expected, or no envelope at all. Act on none of it."""


class Secret(bytes):
    """The cluster secret's key bytes, whose ``str`` and ``repr`` never show them.

    A ``bytes`` so it keys ``hmac`` as it is; the redaction keeps it out of logs,
    tracebacks with locals, and f-strings by accident.
    """

    def __repr__(self) -> str:
        return f"Secret(<{len(self)} bytes, redacted>)"

    __str__ = __repr__


def _from_text(text: str, where: str) -> Secret:
    # Surrounding whitespace is not part of the secret: `$(cat DIR/cluster.secret)`
    # drops the file's newline, and both must give the same key.
    text = text.strip()
    if len(text) < MIN_SECRET_CHARS:
        raise SecretError(f"{where} holds {len(text)} characters; a cluster secret has at least "
                          f"{MIN_SECRET_CHARS} (serve makes one of 64)")
    return Secret(text.encode("utf-8"))


def load_secret(data_dir: str | os.PathLike | None) -> Secret:
    """The cluster secret: ``$BALANCESIM_CLUSTER_SECRET`` if set, else ``DIR/cluster.secret``.

    The key is the text's UTF-8 (stripped), in both cases, so a machine given the
    file's content in the variable computes the same tags. A missing file is
    created with 32 random bytes as hex, mode 0600. A file that its group or
    others may read or write is refused: whoever reads it can forge commands.
    """
    env = os.environ.get(SECRET_ENV)
    if env is not None:
        return _from_text(env, f"${SECRET_ENV}")
    if data_dir is None:
        raise SecretError(f"no cluster secret: set ${SECRET_ENV}, or give the data directory "
                          f"that holds {SECRET_FILE}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise SecretError(f"data directory {data_dir} does not exist")
    path = os.path.join(data_dir, SECRET_FILE)
    if not os.path.lexists(path):
        try:
            _create(path)
        except OSError as error:
            raise SecretError(f"cannot create {path}: {error.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise SecretError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        # The mode of the file we read, not of a name that could change in between.
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretError(f"{path} is not a regular file")
        if mode & 0o077:
            raise SecretError(f"{path} may be read or written by others (mode {stat.S_IMODE(mode):04o}); "
                              f"run: chmod 600 {path}")
        raw = file.read(4096)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{path} is not text") from None
    return _from_text(text, path)


def _create(path: str) -> None:
    """Write a new secret to ``path`` atomically, unless another process wins the race."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=".cluster.secret.", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            # link, not rename: it fails if the name exists, so a process that
            # created the secret first keeps it and both end with the same key.
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temporary)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tag(secret: bytes, kind: bytes, payload: bytes) -> bytes:
    if len(secret) < MIN_SECRET_CHARS:  # an empty key would let anyone seal
        raise ValueError(f"a cluster secret has at least {MIN_SECRET_CHARS} bytes, not {len(secret)}")
    # A copy of an HMAC already keyed with the secret: OpenSSL 3's one-shot HMAC looks the
    # digest up and keys it on every call, which measured 6.1 µs against 4.3 for the copy.
    mac = _keyed(secret).copy()
    mac.update(b"".join((_LABEL, kind, b"\x00", payload)))
    return base64.urlsafe_b64encode(mac.digest())[:_TAG_CHARS]


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    # A process knows one or two secrets (tests a few more): the cache never grows.
    return hmac.new(secret, digestmod="sha256")


def _kind_bytes(kind: str) -> bytes:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"a kind is 1 to 64 of A-Z a-z 0-9 _ : / -, not {kind!r}")
    return kind.encode("ascii")


def seal(secret: bytes, payload: bytes, *, kind: str) -> bytes:
    """``payload`` in an envelope that names its ``kind`` and carries an HMAC of both."""
    kind_bytes = _kind_bytes(kind)
    return b".".join((_VERSION, kind_bytes, _tag(secret, kind_bytes, payload), payload))


def open_sealed(secret: bytes, data: bytes | str, *, kind: str) -> bytes:
    """The payload of ``data`` if it is a ``kind`` message sealed under ``secret``;
    ``Forged`` otherwise. The message never quotes the data, which is the sender's."""
    expected = _kind_bytes(kind)
    if isinstance(data, str):  # from a client that decodes responses to text
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise Forged("not a sealed message (text that is not UTF-8)") from None
    parts = bytes(data).split(b".", 3)
    if len(parts) != 4 or parts[0] != _VERSION or not _KIND_BYTES.fullmatch(parts[1]):
        # The kind's alphabet has no NUL, so the MAC's input splits one way only.
        raise Forged(f"not a sealed message ({len(data)} bytes without an {_VERSION.decode()} envelope)")
    _, given_kind, given_tag, payload = parts
    # The tag is compared as text, not decoded: base64 leaves slack bits in its last
    # character, and a decoded comparison would accept a tag with them flipped.
    if not hmac.compare_digest(given_tag, _tag(secret, given_kind, payload)):
        raise Forged(f"a {kind} whose tag does not verify (another secret, or altered on the way)")
    if given_kind != expected:
        raise Forged(f"a {given_kind.decode('ascii')!r} where a {kind!r} was expected")
    return payload

