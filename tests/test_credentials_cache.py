"""
The verified-credentials cache: a returning user logs in without the slow
hash; wrong passwords, changed and removed users and expired entries always
go through the full check.
"""

from __future__ import annotations

import imaplib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import credentialscache
from mailproxy.auth import UsersFileChecker, makePortal
from mailproxy.config import ConfigError, loadConfig, parseConfig
from mailproxy.credentialscache import CredentialsCache
from mailproxy.interfaces import IProxyUser
from mailproxy.passwords import hashPassword, writeUser
from mailproxy.tap import buildService
from tests.conftest import HOST, UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import freePort, runningProxy
from tests.tomlconfig import authTable, listenerTable, routingTable, upstreamTable

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf

TTL = 60.0


class CountingRunner:
    """
    Run hashing inline, counting how often the hash pool is asked.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, work: Callable[[], bool]) -> Deferred[bool]:
        self.calls += 1
        return succeed(work())


def writeUsers(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{name}:{hashPassword(password, log2N=10)}\n" for name, password in users.items()))


def makeConfigFile(tmp_path: Path, authKeys: str = "") -> Path:
    path = tmp_path / "mailproxy.toml"
    path.write_text(
        f"""
[auth]
users_file = "users"
{authKeys}

[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.main]
host = "127.0.0.1"
port = 143

[routing]
default_upstream = "main"
"""
    )
    return path


class Setup:
    """
    A portal over a users file, its checker remembering in a cache on a fake clock.
    """

    def __init__(self, tmp_path: Path, ttl: float = TTL, size: int = 100) -> None:
        self.usersFile = tmp_path / "users"
        writeUsers(self.usersFile, {"alice": "alicepw", "bob": "bobpw", "carol": "carolpw"})
        self.clock = Clock()
        self.cache = CredentialsCache(ttl, size, self.clock)
        self.runner = CountingRunner()
        config = loadConfig(str(makeConfigFile(tmp_path)))
        self.portal = makePortal(config, self.runner, self.cache)

    def login(self, name: bytes, password: bytes) -> Deferred[Any]:
        return self.portal.login(UsernamePassword(name, password), None, IProxyUser)

    def succeeds(self, name: bytes, password: bytes) -> int:
        """
        Log in successfully; how many times that used the hash pool.
        """
        before = self.runner.calls
        interface, avatar, logout = successResultOf(self.login(name, password))
        assert avatar.username == name.decode()
        logout()
        return self.runner.calls - before

    def fails(self, name: bytes, password: bytes) -> int:
        """
        Fail to log in; how many times that used the hash pool.
        """
        before = self.runner.calls
        failureResultOf(self.login(name, password), UnauthorizedLogin)
        return self.runner.calls - before


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_second_login_with_the_same_password_skips_the_hash_pool(setup: Setup) -> None:
    """The first login hashes; the same user and password again logs in from the cache."""
    assert setup.succeeds(b"alice", b"alicepw") == 1
    assert setup.succeeds(b"alice", b"alicepw") == 0
    assert setup.succeeds(b"alice", b"alicepw") == 0
    assert len(setup.cache) == 1


def test_string_and_bytes_credentials_share_an_entry(setup: Setup) -> None:
    """A password given as str is the same cached password as its UTF-8 bytes."""
    assert setup.succeeds(b"alice", b"alicepw") == 1
    successResultOf(setup.portal.login(UsernamePassword("alice", "alicepw"), None, IProxyUser))
    assert setup.runner.calls == 1


def test_wrong_password_after_a_cached_success_goes_to_the_pool_and_fails(setup: Setup) -> None:
    """A cached success for a user does not let another password of theirs through, nor skip the check."""
    setup.succeeds(b"alice", b"alicepw")
    for wrong in (b"alicepw ", b"ALICEPW", b"", b"bobpw"):
        assert setup.fails(b"alice", wrong) == 1
    # Failures are not remembered: a repeat pays the full check again.
    assert setup.fails(b"alice", b"ALICEPW") == 1
    assert len(setup.cache) == 1


def test_a_cached_password_is_another_users_wrong_password(setup: Setup) -> None:
    """An entry is bound to its user name: bob's password under alice's name is checked and refused."""
    setup.succeeds(b"bob", b"bobpw")
    assert setup.fails(b"alice", b"bobpw") == 1


def test_unknown_user_still_pays_the_decoy_hash(setup: Setup) -> None:
    """A name absent from the users file goes to the hash pool (the decoy) every time, and fails."""
    setup.succeeds(b"alice", b"alicepw")
    assert setup.fails(b"mallory", b"alicepw") == 1
    assert setup.fails(b"mallory", b"alicepw") == 1


def test_entry_expires_after_the_ttl(setup: Setup) -> None:
    """Within the ttl the login is cached; once it has passed, the full check runs again (and is cached anew)."""
    setup.succeeds(b"alice", b"alicepw")
    setup.clock.advance(TTL - 1)
    assert setup.succeeds(b"alice", b"alicepw") == 0
    # A hit does not extend the entry's life.
    setup.clock.advance(1)
    assert setup.succeeds(b"alice", b"alicepw") == 1
    assert setup.succeeds(b"alice", b"alicepw") == 0
    assert len(setup.cache) == 1


def test_expired_entries_are_dropped(tmp_path: Path) -> None:
    """An entry past its ttl is removed when looked up, and expired ones at the old end when another is added."""
    clock = Clock()
    cache = CredentialsCache(10, 100, clock)
    cache.remember("alice", b"a", "hash-a")
    cache.remember("bob", b"b", "hash-b")
    clock.advance(10)
    assert not cache.knows("alice", b"a", "hash-a")
    assert len(cache) == 1
    cache.remember("carol", b"c", "hash-c")
    assert len(cache) == 1
    assert cache.knows("carol", b"c", "hash-c")


def test_least_recently_used_entry_is_evicted_at_the_size_bound(tmp_path: Path) -> None:
    """With room for two, a third user's login evicts the least recently used one, who then hashes again."""
    setup = Setup(tmp_path, size=2)
    setup.succeeds(b"alice", b"alicepw")
    setup.succeeds(b"bob", b"bobpw")
    # alice is used again, so bob is now the least recently used.
    assert setup.succeeds(b"alice", b"alicepw") == 0
    setup.succeeds(b"carol", b"carolpw")
    assert len(setup.cache) == 2
    assert setup.succeeds(b"alice", b"alicepw") == 0
    assert setup.succeeds(b"carol", b"carolpw") == 0
    assert setup.succeeds(b"bob", b"bobpw") == 1


def test_ttl_zero_disables_the_cache(tmp_path: Path) -> None:
    """With a ttl of 0 every login goes to the hash pool and nothing is stored."""
    setup = Setup(tmp_path, ttl=0)
    for _ in range(3):
        assert setup.succeeds(b"alice", b"alicepw") == 1
    assert len(setup.cache) == 0


def test_changed_password_refuses_the_old_one_and_accepts_the_new(setup: Setup) -> None:
    """A rewritten users entry never matches the cached digest: the old password fails, the new one logs in."""
    setup.succeeds(b"alice", b"alicepw")
    writeUser(str(setup.usersFile), "alice", hashPassword("new alice pw", log2N=10))
    assert setup.fails(b"alice", b"alicepw") == 1
    assert setup.succeeds(b"alice", b"new alice pw") == 1
    assert setup.succeeds(b"alice", b"new alice pw") == 0


def test_rehashed_same_password_is_checked_again(setup: Setup) -> None:
    """The same password stored under a new hash (new salt) is verified once more, then cached."""
    setup.succeeds(b"alice", b"alicepw")
    writeUser(str(setup.usersFile), "alice", hashPassword("alicepw", log2N=10))
    assert setup.succeeds(b"alice", b"alicepw") == 1
    assert setup.succeeds(b"alice", b"alicepw") == 0


def test_removed_user_is_refused_despite_a_cached_success(setup: Setup) -> None:
    """A user deleted from the users file cannot log in from the cache."""
    setup.succeeds(b"bob", b"bobpw")
    writeUsers(setup.usersFile, {"alice": "alicepw"})
    assert setup.fails(b"bob", b"bobpw") == 1


def test_cache_survives_a_configuration_reload(tmp_path: Path) -> None:
    """The checker a reload builds uses the same cache object, so cached logins stay cached."""
    writeUsers(tmp_path / "users", {"alice": "alicepw"})
    path = makeConfigFile(tmp_path)
    service = buildService(loadConfig(str(path)), MemoryReactorClock(), str(path))
    before = service.reloader.portal.checkers[IUsernamePassword]
    assert isinstance(before, UsersFileChecker) and isinstance(before.cache, CredentialsCache)
    before.cache.remember("alice", b"alicepw", "stored")
    assert service.reloader.reload()
    after = service.reloader.portal.checkers[IUsernamePassword]
    assert isinstance(after, UsersFileChecker)
    assert after is not before
    assert after.cache is before.cache
    assert after.cache.knows("alice", b"alicepw", "stored")


def test_cache_settings_are_restart_only(tmp_path: Path) -> None:
    """Changing cache_ttl or cache_size and reloading keeps the running values and the same cache."""
    writeUsers(tmp_path / "users", {"alice": "alicepw"})
    path = makeConfigFile(tmp_path, "cache_ttl = 60\ncache_size = 5")
    service = buildService(loadConfig(str(path)), MemoryReactorClock(), str(path))
    cache = service.reloader.portal.checkers[IUsernamePassword].cache  # type: ignore[attr-defined]
    makeConfigFile(tmp_path, "cache_ttl = 0\ncache_size = 7")
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert service.reloader.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (service.reloader.config.authCacheTTL, service.reloader.config.authCacheSize) == (60, 5)
    assert service.reloader.portal.checkers[IUsernamePassword].cache is cache  # type: ignore[attr-defined]
    warnings = [event.get("settings", "") for event in events]
    assert any("authCacheTTL" in text and "authCacheSize" in text for text in warnings)


def test_no_password_or_digest_in_any_log_event(setup: Setup) -> None:
    """Logins (cached, failed, with a broken users file) log neither the password nor the cache's digest or key."""
    checker = setup.portal.checkers[IUsernamePassword]
    assert isinstance(checker, UsersFileChecker)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        setup.succeeds(b"alice", b"alicepw")
        setup.succeeds(b"alice", b"alicepw")
        setup.fails(b"alice", b"wrong secret")
        # A users file that no longer parses is logged, and the cache keeps serving.
        os.replace(setup.usersFile, setup.usersFile.with_suffix(".bak"))
        setup.usersFile.write_text("not a users line\n")
        assert setup.succeeds(b"alice", b"alicepw") == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events, "the broken users file is logged"
    digest = setup.cache._digest("alice", b"alicepw", checker._users["alice"])
    secrets = [b"alicepw", b"wrong secret", digest, setup.cache._key]
    for event in events:
        text = repr(event).encode("utf-8", "replace")
        for secret in secrets:
            assert secret not in text
            assert secret.hex().encode() not in text
    assert b"alicepw" not in repr(setup.cache).encode() and setup.cache._key.hex() not in repr(setup.cache)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"cache_ttl": -1}, "auth.cache_ttl: must be a non-negative number"),
        ({"cache_ttl": float("inf")}, "auth.cache_ttl: must be a finite number"),
        ({"cache_ttl": "1h"}, "auth.cache_ttl"),
        ({"cache_size": 0}, "auth.cache_size: must be an integer of at least 1"),
        ({"cache_size": 1.5}, "auth.cache_size: must be an integer of at least 1"),
    ],
)
def test_bad_cache_settings_are_refused_naming_the_key(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    """A negative, infinite or non-numeric ttl and a size below 1 or with a fraction are configuration errors."""
    document = {
        "auth": {"users_file": "users", **keys},
        "listener": [{"endpoint": "tcp:143"}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
        "routing": {"default_upstream": "main"},
    }
    with pytest.raises(ConfigError, match=message):
        parseConfig(document, str(tmp_path))


def test_cache_settings_default_and_parse(tmp_path: Path) -> None:
    """Left out, the ttl is an hour and the size 10000; given, they are used as numbers."""
    base = {
        "listener": [{"endpoint": "tcp:143"}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
        "routing": {"default_upstream": "main"},
    }
    config = parseConfig({"auth": {"users_file": "users"}, **base}, str(tmp_path))
    assert (config.authCacheTTL, config.authCacheSize) == (credentialscache.DEFAULT_TTL, credentialscache.DEFAULT_SIZE)
    config = parseConfig({"auth": {"users_file": "users", "cache_ttl": 0, "cache_size": 3}, **base}, str(tmp_path))
    assert (config.authCacheTTL, config.authCacheSize) == (0.0, 3)


# Integration: a real twistd in front of the real Dovecot.  The proxy keeps
# its own password for the user and logs in upstream with a stored one, so
# the proxy password can change while Dovecot's stays.
USER = "kim"


@pytest.fixture
def cachedProxy(dovecot: DovecotUpstream) -> Iterator[tuple[str, int, DovecotUpstream]]:
    port = freePort()
    config = (
        authTable(failureDelay=0.1, cacheTtl=3600)
        + listenerTable("plain", port, allowPlaintextAuth=True)
        + upstreamTable("dovecot", dovecot.ports["imap"])
        + routingTable("dovecot", {USER: {"password": UPSTREAM_USERS[USER]}})
    )
    with runningProxy(config, {USER: "proxy pw one"}, [port], "mp-credcache-") as (directory, _process):
        yield directory, port, dovecot


def imapLogin(port: int, password: str) -> None:
    client = imaplib.IMAP4(HOST, port, timeout=30)
    try:
        client.login(USER, password)
        typ, _ = client.select("INBOX", readonly=True)
        assert typ == "OK"
    finally:
        try:
            client.logout()
        except imaplib.IMAP4.error:
            pass


def dovecotLogins(dovecot: DovecotUpstream) -> int:
    """How many times Dovecot has logged the user in, by its own log."""
    with open(dovecot.logFile, errors="replace") as handle:
        return len(re.findall(rf"imap-login: (?:Info: )?Login: user=<{USER}>", handle.read()))


def test_changed_password_invalidates_the_cached_login_through_a_real_proxy(
    cachedProxy: tuple[str, int, DovecotUpstream],
) -> None:
    """
    Attacked as a guesser would after the owner's cached login: wrong
    passwords, then the old password once the users file has a new one,
    are refused and never reach Dovecot; the owner's logins all do.
    """
    directory, port, dovecot = cachedProxy
    before = dovecotLogins(dovecot)
    imapLogin(port, "proxy pw one")
    imapLogin(port, "proxy pw one")
    for guess in ("proxy pw on", "proxy pw one ", "PROXY PW ONE"):
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
            imapLogin(port, guess)
    # Kept cheap, as runningProxy writes it.
    writeUser(os.path.join(directory, "users"), USER, hashPassword("proxy pw two", log2N=10))
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        imapLogin(port, "proxy pw one")
    imapLogin(port, "proxy pw two")
    imapLogin(port, "proxy pw two")
    # Dovecot writes its log as sessions start: the four owner's logins, nothing else.
    deadline = time.monotonic() + 10
    while dovecotLogins(dovecot) - before < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dovecotLogins(dovecot) - before == 4
