"""Unit tests of stored keys: plain and scrypt-hashed, never shown."""

from __future__ import annotations

import hashlib
import re

import pytest

from taskhub_sync import auth
from taskhub_sync.auth import DUMMY_KEY, StoredKey, check_hash_format, hash_key

SECRET = "---super-secret-key---"
# A cheap hash (n=16) keeps the tests fast; verify() reads the cost from the hash.
SALT = bytes(range(16))


def _cheap_hash(key: str, salt: bytes = SALT) -> str:
    digest = hashlib.scrypt(key.encode(), salt=salt, n=16, r=8, p=1, dklen=32)
    return f"scrypt$16$8$1${salt.hex()}${digest.hex()}"


@pytest.fixture(scope="module")
def real_hash() -> str:
    """One hash at the production cost, shared by the tests that need it."""
    return hash_key(SECRET)


def test_hash_key_format(real_hash: str) -> None:
    """hash_key() returns scrypt$N$r$p$<32 hex salt>$<64 hex digest> at the default cost."""
    match = re.fullmatch(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([0-9a-f]{32})\$([0-9a-f]{64})", real_hash)
    assert match is not None
    assert (int(match[1]), int(match[2]), int(match[3])) == (auth._N, auth._R, auth._P)
    check_hash_format(real_hash)


def test_hash_key_is_salted() -> None:
    """Two hashes of one key differ (random salt); a given salt is deterministic."""
    assert hash_key("k") != hash_key("k")
    assert hash_key("k", salt=SALT) == hash_key("k", salt=SALT)
    assert hash_key("k", salt=SALT).split("$")[4] == SALT.hex()


def test_hash_key_rejects_empty_key() -> None:
    """An empty key cannot be hashed."""
    with pytest.raises(ValueError):
        hash_key("")


def test_hashed_key_verifies(real_hash: str) -> None:
    """A hash_key() hash verifies its key and rejects others."""
    stored = StoredKey(key_hash=real_hash)
    assert stored.verify(SECRET) is True
    assert stored.verify(SECRET + "x") is False
    assert stored.verify("") is False


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [(SECRET, True), (SECRET[:-1], False), (SECRET + " ", False), ("", False), ("ключ", False)],
)
def test_plain_key_verifies(candidate: str, expected: bool) -> None:
    """A plain key verifies only the exact same string."""
    assert StoredKey(key=SECRET).verify(candidate) is expected


@pytest.mark.parametrize(
    ("candidate", "expected"), [("ключ-🔑", True), ("ключ", False), (SECRET, False)]
)
def test_cheap_hash_verifies(candidate: str, expected: bool) -> None:
    """verify() uses the cost parameters stored in the hash, non-ASCII keys included."""
    assert StoredKey(key_hash=_cheap_hash("ключ-🔑")).verify(candidate) is expected


def test_repr_hides_key(real_hash: str) -> None:
    """Neither repr nor str of a StoredKey shows the key or the hash."""
    for stored in (StoredKey(key=SECRET), StoredKey(key_hash=real_hash)):
        for text in (repr(stored), str(stored)):
            assert SECRET not in text
            assert real_hash.split("$")[-1] not in text
            assert "hidden" in text


def test_stored_key_has_no_instance_dict() -> None:
    """StoredKey uses __slots__, so vars() cannot dump the key by accident."""
    with pytest.raises(TypeError):
        vars(StoredKey(key=SECRET))


@pytest.mark.parametrize(
    "kwargs", [{}, {"key": "a", "key_hash": _cheap_hash("a")}, {"key": ""}], ids=repr
)
def test_stored_key_needs_exactly_one_nonempty_key(kwargs: dict) -> None:
    """StoredKey wants exactly one of key and key_hash, and no empty key."""
    with pytest.raises(ValueError):
        StoredKey(**kwargs)


BAD_HASHES = [
    "",
    "plain-text-key",
    "bcrypt$16384$8$1$00$00",
    "scrypt$16384$8$1$00",
    "scrypt$16384$8$1$00$00$00",
    "scrypt$x$8$1$00$00",
    "scrypt$16384$8.5$1$00$00",
    "scrypt$16384$8$1$zz$00",
    "scrypt$16384$8$1$00$0",
    "SCRYPT$16384$8$1$00$00",
]


@pytest.mark.parametrize("key_hash", BAD_HASHES)
def test_bad_hashes_rejected(key_hash: str) -> None:
    """Malformed hashes raise ValueError from check_hash_format() and StoredKey()."""
    with pytest.raises(ValueError):
        check_hash_format(key_hash)
    with pytest.raises(ValueError):
        StoredKey(key_hash=key_hash)


@pytest.mark.parametrize(
    "key_hash",
    ["scrypt$3$8$1$00$" + "00" * 32, "scrypt$16$8$1$00$", "scrypt$16$0$1$00$" + "00" * 32],
)
def test_hash_with_impossible_parameters_rejected(key_hash: str) -> None:
    """A hash whose scrypt parameters cannot work is rejected when loaded."""
    with pytest.raises(ValueError):
        check_hash_format(key_hash)
    with pytest.raises(ValueError):
        StoredKey(key_hash=key_hash)


@pytest.mark.parametrize("stored", [StoredKey(key=SECRET), DUMMY_KEY], ids=["plain", "dummy"])
def test_verify_lone_surrogate_is_false(stored: StoredKey) -> None:
    """A key holding a lone surrogate (possible via JSON escapes) is just wrong."""
    assert stored.verify("\ud800") is False


def test_dummy_key_rejects_ordinary_keys() -> None:
    """DUMMY_KEY (checked for unknown names) rejects any ordinary key."""
    assert DUMMY_KEY.verify(SECRET) is False
    assert DUMMY_KEY.verify("") is False
