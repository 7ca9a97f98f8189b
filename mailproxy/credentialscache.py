# -*- test-case-name: tests.test_credentials_cache -*-
"""
A cache of verified credentials, like Dovecot's auth cache: a returning
user does not pay a full scrypt (about 0.1 s of CPU and 32 MiB) on every
login.

What is remembered is a keyed digest, C{HMAC-SHA256} under a random key
made for this process (never logged or written anywhere), of the user name,
the password and the stored hash the password was verified against.  A
login matches only if its digest, computed with the hash stored I{now},
is there: a changed or removed users entry never matches an old digest, so
it is invalidated by construction.  Only successes are remembered; a wrong
password always pays the full check.

The trade-off: someone who can read the process's memory gets the key and
the digests, and can then guess the cached passwords at HMAC speed instead
of scrypt speed.  A time to live of 0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

DEFAULT_TTL = 3600.0
DEFAULT_SIZE = 10000


class CredentialsCache:
    """
    Remember, for C{ttl} seconds, that a password matched a stored hash;
    at most C{size} entries, the least recently used forgotten first.

    Sans-IO: the time comes from C{clock}.  Expired entries are dropped
    lazily, when looked up or when they reach the least recently used end.
    """

    def __init__(self, ttl: float, size: int, clock: IReactorTime) -> None:
        if ttl < 0 or size < 1:
            raise ValueError("ttl must be >= 0 and size >= 1")
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # Digest to the time it stops being valid and what was found,
        # least recently used first.
        self._entries: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()

    def __repr__(self) -> str:
        # Never the key or the digests.
        return f"<CredentialsCache ttl={self._ttl} size={self._size} entries={len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, *parts: str | bytes) -> bytes:
        # Each part length-prefixed, so that no two tuples give one message.
        message = b"".join(
            struct.pack(">I", len(part)) + part
            for part in (item.encode("utf-8") if isinstance(item, str) else item for item in parts)
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remember(self, username: str, password: bytes, encoded: str) -> None:
        """
        Record that C{password} was verified (by the slow hash) for
        C{username}, whose stored hash is C{encoded}.  Call it after a
        success only.
        """
        self.store((username, password, encoded), True, self._ttl)

    def knows(self, username: str, password: bytes, encoded: str) -> bool:
        """
        Whether C{password} was verified for C{username} against the stored
        hash C{encoded} within the time to live.
        """
        return self.recall((username, password, encoded)) is True

    def store(self, parts: tuple[str | bytes, ...], value: Any, ttl: float | None = None) -> None:
        """
        Remember C{value} for the credentials C{parts} (a user name, a
        password, and whatever else the answer depends on) for C{ttl}
        seconds (the cache's own by default; 0 remembers nothing).
        """
        ttl = self._ttl if ttl is None else ttl
        if not ttl:
            return
        now = self._clock.seconds()
        digest = self._digest(*parts)
        self._entries[digest] = (now + ttl, value)
        self._entries.move_to_end(digest)
        # Bounded: each pass removes one entry, and the new one is never expired.
        while self._entries:
            oldest, (expires, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self._size and expires > now:
                break
            del self._entries[oldest]

    def recall(self, parts: tuple[str | bytes, ...]) -> Any:
        """
        What was remembered for C{parts} within its time to live, or
        C{None}.
        """
        if not self._entries:
            return None
        # A dictionary lookup by digest: the key is secret, so the lookup's
        # timing tells an attacker nothing they can steer.
        digest = self._digest(*parts)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry[1]
