"""
Local authentication through twisted.cred: the users-file checker and the
realm that routes users to their upstream.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.auth import NoRoute, ProxyRealm, UsersFileChecker, inlineRunner, makePortal
from mailproxy.config import Config, parseConfig
from mailproxy.credentialscache import CredentialsCache
from mailproxy.interfaces import IProxyUser
from mailproxy.passwords import UsersFileError, hashPassword, writeUser

_case = SynchronousTestCase()
successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf


def writeUsers(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{name}:{hashPassword(password, log2N=10)}\n" for name, password in users.items()))


def makeConfig(tmp_path: Path, *, defaultUpstream: str | None = "main") -> Config:
    routing: dict[str, Any] = {
        "users": {
            "bob": {"upstream": "archive"},
            "svc": {"upstream": "archive", "username": "service", "password": "stored-secret"},
        }
    }
    if defaultUpstream is not None:
        routing["default_upstream"] = defaultUpstream
    document = {
        "auth": {"users_file": "users"},
        "listener": [{"endpoint": "tcp:143"}],
        "upstream": {
            "main": {"host": "imap.example.test", "port": 993, "tls": "implicit"},
            "archive": {"host": "archive.example.test", "port": 143},
        },
        "routing": routing,
    }
    return parseConfig(document, str(tmp_path))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    writeUsers(tmp_path / "users", {"alice": "alicepw", "bob": "bobpw", "svc": "svcpw"})
    return makeConfig(tmp_path)


def login(portal: Portal, name: bytes, password: bytes) -> Deferred[Any]:
    return portal.login(UsernamePassword(name, password), None, IProxyUser)


def avatarOf(portal: Portal, name: bytes, password: bytes) -> Any:
    interface, avatar, logout = successResultOf(login(portal, name, password))
    assert interface is IProxyUser
    logout()
    return avatar


def test_good_password_yields_proxy_user_for_default_upstream(config: Config) -> None:
    """A correct password gives an IProxyUser routed to the default upstream with passthrough."""
    portal = makePortal(config, inlineRunner)
    avatar = avatarOf(portal, b"alice", b"alicepw")
    assert verifyObject(IProxyUser, avatar)
    assert avatar.username == "alice"
    assert avatar.upstream is config.upstreams["main"]
    assert avatar.upstream.host == "imap.example.test"
    assert avatar.upstreamUsername == "alice"
    assert avatar.upstreamPassword is None


def test_routed_user_gets_their_upstream_and_local_name_upstream(config: Config) -> None:
    """A user routed elsewhere without username/password uses their local name and passthrough."""
    avatar = avatarOf(makePortal(config, inlineRunner), b"bob", b"bobpw")
    assert avatar.upstream.name == "archive"
    assert (avatar.username, avatar.upstreamUsername, avatar.upstreamPassword) == ("bob", "bob", None)


def test_stored_upstream_credentials_are_on_the_avatar(config: Config) -> None:
    """A route with a stored username and password hands them to the avatar."""
    avatar = avatarOf(makePortal(config, inlineRunner), b"svc", b"svcpw")
    assert (avatar.username, avatar.upstreamUsername, avatar.upstreamPassword) == ("svc", "service", "stored-secret")


def test_string_credentials_are_accepted(config: Config) -> None:
    """Credentials given as str rather than bytes log in the same way."""
    portal = makePortal(config, inlineRunner)
    _, avatar, _ = successResultOf(portal.login(UsernamePassword("alice", "alicepw"), None, IProxyUser))
    assert avatar.username == "alice"


@pytest.mark.parametrize(("name", "password"), [(b"alice", b"bobpw"), (b"alice", b""), (b"alice", b"ALICEPW")])
def test_wrong_password_fails_with_unauthorized_login(config: Config, name: bytes, password: bytes) -> None:
    """A wrong password fails with UnauthorizedLogin."""
    failureResultOf(login(makePortal(config, inlineRunner), name, password), UnauthorizedLogin)


def test_unknown_user_fails_with_unauthorized_login(config: Config) -> None:
    """A name absent from the users file fails with UnauthorizedLogin, even with a real user's password."""
    failureResultOf(login(makePortal(config, inlineRunner), b"mallory", b"alicepw"), UnauthorizedLogin)


def test_unknown_user_with_the_decoy_password_fails(config: Config) -> None:
    """The password of the timing decoy hash does not log in a name absent from the users file."""
    failureResultOf(login(makePortal(config, inlineRunner), b"mallory", b"mailproxy decoy"), UnauthorizedLogin)


def test_users_file_is_reread_when_a_user_is_added(tmp_path: Path, config: Config) -> None:
    """A user added to the file after start-up can log in without rebuilding the checker."""
    portal = makePortal(config, inlineRunner)
    failureResultOf(login(portal, b"dave", b"davepw"), UnauthorizedLogin)
    writeUser(config.usersFile, "dave", hashPassword("davepw", log2N=10))
    assert avatarOf(portal, b"dave", b"davepw").username == "dave"


def test_users_file_is_reread_when_a_password_changes_in_place(tmp_path: Path, config: Config) -> None:
    """A changed password takes effect even if the new file has the old size and modification time."""
    portal = makePortal(config, inlineRunner)
    avatarOf(portal, b"alice", b"alicepw")
    before = os.stat(config.usersFile)
    writeUser(config.usersFile, "alice", hashPassword("newpw00", log2N=10))
    # Same size (hashes have a fixed length) and, on a coarse clock, the same mtime.
    os.utime(config.usersFile, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(config.usersFile).st_size == before.st_size
    assert avatarOf(portal, b"alice", b"newpw00").username == "alice"
    failureResultOf(login(portal, b"alice", b"alicepw"), UnauthorizedLogin)


def test_removed_user_can_no_longer_log_in(tmp_path: Path, config: Config) -> None:
    """A user deleted from the file is refused on the next login."""
    portal = makePortal(config, inlineRunner)
    avatarOf(portal, b"bob", b"bobpw")
    writeUsers(tmp_path / "users", {"alice": "alicepw"})
    failureResultOf(login(portal, b"bob", b"bobpw"), UnauthorizedLogin)


def test_broken_users_file_keeps_the_previous_users(tmp_path: Path, config: Config) -> None:
    """If the users file becomes malformed, logins keep using the users read before."""
    portal = makePortal(config, inlineRunner)
    (tmp_path / "users").write_text("this line is not a user\n")
    assert avatarOf(portal, b"alice", b"alicepw").username == "alice"


def test_checker_refuses_to_start_without_a_readable_users_file(tmp_path: Path) -> None:
    """Building the checker on a missing or malformed users file raises at start-up."""
    with pytest.raises(OSError):
        UsersFileChecker(str(tmp_path / "absent"), inlineRunner)
    (tmp_path / "users").write_text("bad line\n")
    with pytest.raises(UsersFileError):
        UsersFileChecker(str(tmp_path / "users"), inlineRunner)


def test_user_without_route_fails(tmp_path: Path) -> None:
    """A correct password for a user with no route and no default upstream fails with NoRoute."""
    writeUsers(tmp_path / "users", {"alice": "alicepw", "bob": "bobpw"})
    portal = makePortal(makeConfig(tmp_path, defaultUpstream=None), inlineRunner)
    failure = failureResultOf(login(portal, b"alice", b"alicepw"), UnauthorizedLogin)
    assert failure.check(NoRoute)
    assert avatarOf(portal, b"bob", b"bobpw").upstream.name == "archive"


def test_users_file_with_an_unusable_hash_is_refused_at_load(tmp_path: Path) -> None:
    """A hash that fits the pattern but cannot be computed is a users-file error naming the line."""
    (tmp_path / "users").write_text("alice:$scrypt$ln=10,r=0,p=1$c2FsdHNhbHRzYWx0c2FsdA$a2V5a2V5a2V5\n")
    with pytest.raises(UsersFileError, match=r"users:1:"):
        makePortal(makeConfig(tmp_path), inlineRunner)


def test_realm_only_offers_proxy_user_avatars(config: Config) -> None:
    """Asking the realm for another interface raises NotImplementedError."""
    with pytest.raises(NotImplementedError):
        ProxyRealm(config).requestAvatar("alice", None, ICredentialsChecker)


def test_checker_and_avatar_provide_their_interfaces(config: Config) -> None:
    """The checker provides ICredentialsChecker and avatars provide IProxyUser."""
    checker = UsersFileChecker(config.usersFile, inlineRunner)
    assert verifyObject(ICredentialsChecker, checker)
    avatar = avatarOf(Portal(ProxyRealm(config), [checker]), b"alice", b"alicepw")
    assert verifyObject(IProxyUser, avatar)


def test_checker_without_a_cache_hashes_every_login(config: Config) -> None:
    """Without a credentials cache every login, repeated or not, goes to the hash pool."""
    calls: list[object] = []

    def counting(work: Any) -> Deferred[bool]:
        calls.append(work)
        return inlineRunner(work)

    portal = makePortal(config, counting)
    for _ in range(3):
        avatarOf(portal, b"alice", b"alicepw")
    assert len(calls) == 3


def test_portal_checker_remembers_in_the_given_cache(config: Config) -> None:
    """makePortal hands its cache to the checker, which remembers a success there and not a failure."""
    cache = CredentialsCache(60, 10, Clock())
    portal = makePortal(config, inlineRunner, cache)
    failureResultOf(login(portal, b"alice", b"wrong"), UnauthorizedLogin)
    assert len(cache) == 0
    avatarOf(portal, b"alice", b"alicepw")
    assert len(cache) == 1
