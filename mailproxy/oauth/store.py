# -*- test-case-name: tests.test_oauth_store -*-
"""
Refresh tokens at rest: one file per local user in C{oauth2.token_store},
encrypted with Fernet (AES-128-CBC and HMAC-SHA256, from C{cryptography})
under the key in C{oauth2.key_file}, mode 0600, replaced atomically.

Why a key from the configuration and not one derived from each user's
local password: logins served from the credentials cache never derive a
key from the password (that would cost every login a slow hash again),
C{mailproxy-oauth authorize} can run before the user has a local password
and without it, a password change does not orphan the grant, and the key
can be rotated (the key file may hold several keys, one per line: the
first encrypts, every one decrypts).  The price: whoever can read both the
key file and the store can use the refresh tokens, as whoever can read the
configuration can use its upstream passwords.  Keep the key file readable
by the proxy's user only, and apart from backups of the store.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import asdict, dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class TokenStoreError(Exception):
    """
    The key file or a user's token file cannot be used: the message says
    what the operator should do.
    """


@dataclass(frozen=True)
class StoredGrant:
    """
    What a user's file holds: the provider's name, the refresh token, and
    when it was obtained (seconds since the epoch).
    """

    provider: str
    refreshToken: str
    obtained: float
    scope: str = ""

    def __repr__(self) -> str:
        return f"StoredGrant(provider={self.provider!r}, obtained={self.obtained!r})"


def newKey() -> bytes:
    """
    A new random Fernet key (url-safe base64 of 32 octets).
    """
    return Fernet.generate_key()


def loadKeys(path: str) -> MultiFernet:
    """
    The keys in C{path}, one per line (the first encrypts).

    @raise TokenStoreError: if the file cannot be read or holds no valid key.
    """
    try:
        with open(path, "rb") as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError as error:
        raise TokenStoreError(f"oauth2.key_file {path}: cannot read: {error.strerror}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        try:
            keys.append(Fernet(line))
        except ValueError:
            raise TokenStoreError(
                f"oauth2.key_file {path}: line {number} is not a Fernet key "
                "(make one with: mailproxy-oauth new-key FILE)"
            ) from None
    if not keys:
        raise TokenStoreError(f"oauth2.key_file {path}: no key (make one with: mailproxy-oauth new-key FILE)")
    return MultiFernet(keys)


class TokenStore:
    """
    The grants of local users, by user name.
    """

    def __init__(self, directory: str, keys: MultiFernet) -> None:
        self.directory = directory
        self.keys = keys

    def path(self, user: str) -> str:
        # Any user name, even one with "/" or "..", is one file name.
        name = base64.urlsafe_b64encode(user.encode("utf-8", "surrogateescape")).decode("ascii").rstrip("=")
        return os.path.join(self.directory, name + ".token")

    def load(self, user: str) -> StoredGrant | None:
        """
        C{user}'s grant, or C{None} if there is none.

        @raise TokenStoreError: if the file cannot be read, decrypted or
            understood.
        """
        path = self.path(user)
        try:
            with open(path, "rb") as handle:
                sealed = handle.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise TokenStoreError(f"token file {path} of {user!r}: cannot read: {error.strerror}") from None
        try:
            document = json.loads(self.keys.decrypt(sealed))
            return StoredGrant(
                provider=str(document["provider"]),
                refreshToken=str(document["refreshToken"]),
                obtained=float(document["obtained"]),
                scope=str(document.get("scope", "")),
            )
        except InvalidToken:
            raise TokenStoreError(
                f"token file {path} of {user!r} cannot be decrypted with oauth2.key_file "
                "(another key, or the file is damaged): restore the key, or authorize the user again"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise TokenStoreError(f"token file {path} of {user!r} holds no grant: authorize the user again") from None

    def save(self, user: str, grant: StoredGrant) -> None:
        """
        Write C{user}'s grant: a new file (mode 0600) replaces the old one
        at once, so a crash leaves the old grant or the new, never half.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        sealed = self.keys.encrypt(json.dumps(asdict(grant)).encode("utf-8"))
        path = self.path(user)
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=".new-", suffix=".token")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(sealed)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
