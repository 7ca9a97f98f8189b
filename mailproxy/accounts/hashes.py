# -*- test-case-name: tests.test_accounts_sql -*-
"""
Password hashes as account databases store them: the proxy's own scrypt
(what C{mailproxy-passwd} writes), and the crypt(3) family as Dovecot's
SQL and LDAP passdbs keep them, with or without Dovecot's C{{SCHEME}}
prefix: C{{SHA512-CRYPT}} (C{$6$}), C{{SHA256-CRYPT}} (C{$5$}),
C{{BLF-CRYPT}} (bcrypt, C{$2b$}, C{$2y$}), yescrypt (C{$y$}), and
C{{PLAIN}} for a test database; and the salted SHA digests OpenLDAP
keeps in C{userPassword} by default: C{{SSHA}}, C{{SSHA256}},
C{{SSHA512}} (and the unsalted C{{SHA}} family, for old directories).

crypt(3) is the system's C{libcrypt} (libxcrypt on Debian), called through
ctypes: the standard library's C{crypt} module is deprecated and gone in
Python 3.13.  Slow by design: verify off the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import hmac
import threading

from mailproxy.passwords import hashPassword, verifyPassword

# Dovecot's scheme prefixes whose rest is a crypt(3) string.
_CRYPT_SCHEMES = {"CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT"}
_PLAIN_SCHEMES = {"PLAIN", "CLEARTEXT"}
# RFC 2307's (and OpenLDAP's) digests: base64 of the digest, then the salt.
_DIGEST_SCHEMES = {
    "SHA": ("sha1", False),
    "SSHA": ("sha1", True),
    "SHA256": ("sha256", False),
    "SSHA256": ("sha256", True),
    "SHA512": ("sha512", False),
    "SSHA512": ("sha512", True),
}
# crypt(3) method prefixes this verifies: SHA-512, SHA-256, bcrypt, yescrypt.
_CRYPT_PREFIXES = ("$6$", "$5$", "$2a$", "$2b$", "$2y$", "$y$")


class UnsupportedHash(ValueError):
    """
    A stored hash of a scheme this cannot verify.
    """


def verifyStored(password: bytes, stored: str) -> bool:
    """
    Whether C{password} matches C{stored}, compared in constant time.

    @raise UnsupportedHash: if C{stored} is of no scheme known here.
    """
    scheme = None
    rest = stored
    if stored.startswith("{") and "}" in stored:
        scheme, rest = stored[1:].split("}", 1)
        scheme = scheme.upper()
    if stored.startswith("$scrypt$"):
        return verifyPassword(password, stored)
    if scheme in _PLAIN_SCHEMES:
        return hmac.compare_digest(password, rest.encode("utf-8"))
    if scheme in _DIGEST_SCHEMES:
        return _verifyDigest(password, rest, *_DIGEST_SCHEMES[scheme])
    if (scheme is None or scheme in _CRYPT_SCHEMES) and rest.startswith(_CRYPT_PREFIXES):
        if b"\0" in password:
            # crypt(3) would stop at it: nothing with one matches.
            return False
        hashed = crypt3(password, rest.encode("ascii", "replace"))
        return hashed is not None and hmac.compare_digest(hashed, rest.encode("ascii", "replace"))
    # (Never a part of the value itself: it may be a password kept in clear.)
    shown = f"{{{scheme}}}" if scheme is not None else "no {SCHEME} prefix"
    raise UnsupportedHash(f"a stored password hash of an unsupported scheme ({shown})")


class DecoyHash:
    """
    What an unknown user's password is checked against, so that a missing
    name takes as long as a wrong password: the last stored hash a backend
    checked (the scheme and cost its own accounts have: a directory's
    {SSHA} costs microseconds, scrypt a tenth of a second), the proxy's
    scrypt until there is one.  Used in the hashing threads.
    """

    def __init__(self) -> None:
        self._encoded: str | None = None

    def seen(self, encoded: str) -> None:
        """
        C{encoded} was checked (its scheme is one this verifies).
        """
        self._encoded = encoded

    def check(self, password: bytes) -> None:
        """
        Spend the time checking C{password} would take; the answer is no.
        """
        encoded = self._encoded
        if encoded is None:
            # mailproxy-passwd's cost
            encoded = self._encoded = hashPassword("mailproxy decoy")
        verifyStored(password, encoded)


def _verifyDigest(password: bytes, encoded: str, algorithm: str, salted: bool) -> bool:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UnsupportedHash("a stored password digest that is not base64") from None
    size = hashlib.new(algorithm).digest_size
    if len(decoded) < size or (not salted and len(decoded) != size):
        raise UnsupportedHash(f"a stored {algorithm} password digest of the wrong length")
    digest, salt = decoded[:size], decoded[size:]
    return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)


_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def crypt3(password: bytes, setting: bytes) -> bytes | None:
    """
    crypt(3) of C{password} with C{setting} (a stored hash or a salt
    string); C{None} if the method is unknown or the setting invalid.
    """
    global _library
    with _lock:
        if _library is None:
            name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
            library = ctypes.CDLL(name)
            library.crypt.restype = ctypes.c_char_p
            library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            _library = library
        # crypt(3) returns a static buffer: read it under the lock.
        result: bytes | None = _library.crypt(password, setting)
    # libxcrypt answers a failure with "*0" or "*1", never a match.
    if result is None or result.startswith(b"*"):
        return None
    return result
