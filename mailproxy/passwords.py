# -*- test-case-name: tests.test_passwords -*-
"""
Password hashing (scrypt, from the standard library) and the users file.

The users file has one C{name:hash} line per user; blank lines and lines
starting with C{#} are ignored.  Hashes look like
C{$scrypt$ln=15,r=8,p=1$<salt>$<key>} with unpadded base64 salt and key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile

# 2**15 x 8 x 1: 32 MiB and tens of milliseconds per check (OWASP's scrypt
# floor is 2**17 x 8 x 1 with 128 MiB; this keeps a burst of logins cheap
# on a 2-core box while staying far beyond GPU-friendly hashes).
DEFAULT_LOG2_N = 15
DEFAULT_R = 8
DEFAULT_P = 1
_KEY_LENGTH = 32
_HASH_FORMAT = re.compile(r"\A\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z")
# Parameters beyond these would need more than 1 GiB or hours per check:
# such a line is a typo or an attack on the proxy, not a hash.
_MAX_MEMORY = 1 << 30
_USER_NAME = re.compile(r"\A[^\s:#][^\s:]*\Z")


class UsersFileError(Exception):
    """
    The users file cannot be read or has a malformed line.
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hashPassword(password: str, *, log2N: int = DEFAULT_LOG2_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """
    Hash C{password} with a fresh random salt.
    """
    salt = os.urandom(16)
    key = _scrypt(password.encode("utf-8"), salt, log2N, r, p)
    return f"$scrypt$ln={log2N},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _scrypt(password: bytes, salt: bytes, log2N: int, r: int, p: int) -> bytes:
    n = 1 << log2N
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEMORY + (1 << 24), dklen=_KEY_LENGTH)


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    match = _HASH_FORMAT.match(encoded)
    if match is None:
        return None
    log2N, r, p = (int(match.group(index)) for index in (1, 2, 3))
    if not (1 <= log2N <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or 128 * (1 << log2N) * r * p > _MAX_MEMORY:
        return None
    try:
        salt, key = _unb64(match.group(4)), _unb64(match.group(5))
    except ValueError:  # binascii.Error: a length no base64 text can have
        return None
    if len(key) != _KEY_LENGTH:
        return None
    return log2N, r, p, salt, key


def isValidHash(encoded: str) -> bool:
    """
    C{True} if C{encoded} is a hash this module can verify.
    """
    return _parse(encoded) is not None


def verifyPassword(password: bytes, encoded: str) -> bool:
    """
    Check C{password} against C{encoded} in constant time.

    Slow by design: call it off the reactor thread.
    """
    parsed = _parse(encoded)
    if parsed is None:
        return False
    log2N, r, p, salt, expected = parsed
    return hmac.compare_digest(_scrypt(password, salt, log2N, r, p), expected)


def isValidUserName(name: str) -> bool:
    """
    C{True} if C{name} can be stored in a users file.
    """
    return _USER_NAME.match(name) is not None


def readUsers(path: str) -> dict[str, str]:
    """
    Read the users file at C{path} into a name-to-hash mapping.

    @raise UsersFileError: naming the file and line of a problem.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsersFileError(f"{path}: cannot read: {error}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, separator, encoded = stripped.partition(":")
        if not separator or not isValidUserName(name) or not isValidHash(encoded):
            raise UsersFileError(f"{path}:{number}: expected 'name:$scrypt$...' (see python -m mailproxy.passwd)")
        users[name] = encoded
    return users


def writeUser(path: str, name: str, encoded: str, owner: tuple[int, int] | None = None) -> None:
    """
    Add or replace C{name} in the users file at C{path}, atomically.

    @param owner: the file's user and group ids; given before the new file
        takes the old one's place, so a running proxy never finds it
        unreadable.
    """
    if not isValidUserName(name):
        raise UsersFileError(f"invalid user name {name!r}: no spaces or ':'")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        lines = ["# mailproxy users: name:scrypt-hash, written by python -m mailproxy.passwd"]
    entry = f"{name}:{encoded}"
    replaced = False
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0] == name:
            lines[index] = entry
            replaced = True
    if not replaced:
        lines.append(entry)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".users-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        os.chmod(temporary, 0o600)
        if owner is not None:
            os.chown(temporary, *owner)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
