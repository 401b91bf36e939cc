"""Service keys: constant-time checks, and salted scrypt hashes for config files.

A hash looks like ``scrypt$16384$8$1$<salt hex>$<hash hex>`` and is made by
:func:`hash_key` (or ``taskhub-sync hash-key``). Keys are never logged or shown in
a repr; compare them with :func:`verify_key` only.
"""

from __future__ import annotations

import hashlib
import hmac
import os

_N, _R, _P = 2**14, 8, 1  # scrypt cost: ~50 ms and 16 MiB per check
_DKLEN = 32


def hash_key(key: str, *, salt: bytes | None = None) -> str:
    """Return a salted scrypt hash of ``key`` for a config file's ``key_hash``."""
    if not key:
        raise ValueError("a key must not be empty")
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(key.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def check_hash_format(key_hash: str) -> None:
    """Raise ValueError unless ``key_hash`` looks like a hash_key() result."""
    _parse(key_hash)


def _parse(key_hash: str) -> tuple[int, int, int, bytes, bytes]:
    parts = key_hash.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("key_hash must look like 'scrypt$N$r$p$salt$hash' (see hash-key)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    except ValueError:
        raise ValueError("key_hash has a malformed number or hex field") from None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**20:
        raise ValueError("key_hash has impossible scrypt parameters")
    if not salt or len(digest) < 16:
        raise ValueError("key_hash has an empty salt or a short hash")
    return n, r, p, salt, digest


def _utf8(key: str) -> bytes:
    # A key decoded from JSON may hold a lone surrogate; it must fail the check, not crash.
    return key.encode("utf-8", "surrogatepass")


class StoredKey:
    """A service's key as the hub keeps it: plain or hashed. Its repr hides it."""

    __slots__ = ("_plain", "_hash")

    def __init__(self, *, key: str | None = None, key_hash: str | None = None) -> None:
        if (key is None) == (key_hash is None):
            raise ValueError("give exactly one of key and key_hash")
        if key is not None and not key:
            raise ValueError("a key must not be empty")
        if key_hash is not None:
            _parse(key_hash)
        self._plain = None if key is None else key.encode()
        self._hash = key_hash

    @property
    def hashed(self) -> bool:
        """True for a key kept as a scrypt hash (slow to check, on purpose)."""
        return self._hash is not None

    def verify(self, key: str) -> bool:
        """True if ``key`` is this key. Takes the same time for any wrong key."""
        if self._plain is not None:
            return hmac.compare_digest(self._plain, _utf8(key))
        assert self._hash is not None
        n, r, p, salt, digest = _parse(self._hash)
        maxmem = 128 * r * (n + p + 2) + 1024 * 1024
        got = hashlib.scrypt(_utf8(key), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=maxmem)
        return hmac.compare_digest(got, digest)

    def __repr__(self) -> str:
        return "StoredKey(<hidden>)"


#: Checked against when the name is unknown, so a miss costs what a wrong key
#: costs: the plain one while the hub keeps only plain keys, the hashed one (same
#: scrypt cost as hash_key(); no key matches it) once it keeps any hashed key.
DUMMY_KEY = StoredKey(key="taskhub-sync-no-such-service")
DUMMY_HASHED_KEY = StoredKey(key_hash=f"scrypt${_N}${_R}${_P}${'00' * 16}${'00' * _DKLEN}")
