"""
The SQL account backend (SQLite) end to end: a real twistd with two
workers looks each login up in a database the test writes, checks the
stored hash (the proxy's scrypt, Dovecot's crypt(3) schemes) and relays to
a real Dovecot where the row says; Dovecot's own log shows who logged in.
And the stored-hash schemes in memory.
"""

from __future__ import annotations

import imaplib
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from mailproxy.accounts.hashes import UnsupportedHash, crypt3, verifyStored
from mailproxy.accounts.sql import placeholders
from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyInFront, freePort, runningProxy
from tests.tomlconfig import listenerTable, table, upstreamTable

WAIT = 20.0
SAM, SAM_PW = "sam", "sam's local pw"
SUE, SUE_PW = "sue", "sue local pw"
SID, SID_PW = "sid", "sid local pw"
SAM_UP, SUE_UP, SID_UP = "sam@mail.test", "sue@mail.test", "sid@mail.test"
UPSTREAM_USERS = {SAM_UP: "sam upstream pw", SUE_UP: "sue upstream pw", SID_UP: "sid upstream pw"}


def sha512crypt(password: str) -> str:
    hashed = crypt3(password.encode(), b"$6$rounds=5000$saltsaltsalt$")
    assert hashed is not None
    return "{SHA512-CRYPT}" + hashed.decode()


def bcrypt(password: str) -> str:
    hashed = crypt3(password.encode(), b"$2b$05$abcdefghijklmnopqrstuu")
    assert hashed is not None
    return hashed.decode()


def test_stored_hashes_of_each_scheme_verify_and_refuse() -> None:
    stored = {
        "scrypt": hashPassword("right", log2N=4),
        "sha512": sha512crypt("right"),
        "sha256": "{SHA256-CRYPT}" + (crypt3(b"right", b"$5$saltsalt$") or b"").decode(),
        "bcrypt": "{BLF-CRYPT}" + bcrypt("right"),
        "bare bcrypt": bcrypt("right"),
        "yescrypt": (crypt3(b"right", b"$y$j9T$abcdefghijklmnop$") or b"").decode(),
        "plain": "{PLAIN}right",
    }
    for scheme, encoded in stored.items():
        assert verifyStored(b"right", encoded), scheme
        assert not verifyStored(b"wrong", encoded), scheme
        assert not verifyStored(b"right\0more", encoded), scheme
    for unknown in ("{SSHA512}abc", "{MD5}x", "$1$salt$hash", "plaintext"):
        with pytest.raises(UnsupportedHash):
            verifyStored(b"right", unknown)


def test_the_query_takes_dovecots_variables_as_parameters() -> None:
    assert placeholders("SELECT password FROM u WHERE name = %u AND svc = %s AND ip = %r AND x LIKE '5%%'") == (
        "SELECT password FROM u WHERE name = :user AND svc = :protocol AND ip = :ip AND x LIKE '5%'"
    )
    with pytest.raises(ValueError, match="%d is no variable"):
        placeholders("SELECT password FROM u WHERE name = %u AND d = %d")
    with pytest.raises(ValueError, match="must look the user up by %u"):
        placeholders("SELECT password FROM u")


@pytest.fixture(scope="module")
def sqlDovecot() -> Iterator[DovecotUpstream]:
    yield from accountsDovecot()


def accountsDovecot() -> Iterator[DovecotUpstream]:
    """
    A Dovecot with the accounts the SQL backends' rows route to.
    """
    upstream = DovecotUpstream()
    upstream.addUsers(UPSTREAM_USERS)
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


def writeDatabase(path: Path, rows: list[tuple[object, ...]]) -> None:
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as database:
        database.execute(
            "CREATE TABLE users (username TEXT PRIMARY KEY, password TEXT, upstream TEXT, username_up TEXT, "
            "upstream_password TEXT, filters TEXT, active INTEGER DEFAULT 1)"
        )
        database.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    database.close()


QUERY = (
    "SELECT password, upstream, username_up AS username, upstream_password, filters "
    "FROM users WHERE username = %u AND active = 1"
)


@pytest.fixture
def startProxy(sqlDovecot: DovecotUpstream, tmp_path: Path) -> Iterator[Callable[..., ProxyInFront]]:
    database = tmp_path / "accounts.db"
    writeDatabase(
        database,
        [
            (SAM, hashPassword(SAM_PW, log2N=10), None, SAM_UP, UPSTREAM_USERS[SAM_UP], None, 1),
            (SUE, sha512crypt(SUE_PW), "mail", SUE_UP, UPSTREAM_USERS[SUE_UP], "readonly", 1),
            (SID, bcrypt(SID_PW), None, SID_UP, UPSTREAM_USERS[SID_UP], None, 0),
        ],
    )
    with ExitStack() as running:

        def start(query: str = QUERY) -> ProxyInFront:
            ports = {"imap": freePort()}
            config = (
                table("server", workers=2)
                + table("auth", backend="sql", failureDelay=0.05, lookupTimeout=2)
                + table("auth.sql", database=str(database), query=query)
                + listenerTable("imap", ports["imap"], allowPlaintextAuth=True)
                + upstreamTable("mail", sqlDovecot.ports["imap"])
                + table("filters.readonly", type="policy", readOnly=True)
                + table("routing", defaultUpstream="mail")
            )
            directory, process = running.enter_context(runningProxy(config, {}, list(ports.values()), "mp-sql-"))
            return ProxyInFront(directory, process, ports, sqlDovecot)

        yield start


def test_users_log_in_with_the_hash_and_route_their_row_holds(startProxy: Callable[..., ProxyInFront]) -> None:
    assertRowsGiveHashAndRoute(startProxy())


def assertRowsGiveHashAndRoute(proxy: ProxyInFront) -> None:
    """
    sam's row (scrypt) routes by the configuration, sue's (SHA512-CRYPT) names
    an upstream and the read-only policy; Dovecot sees one login of each.
    """
    before = {user: proxy.dovecotLogins(user) for user in (SAM_UP, SUE_UP)}
    client = proxy.login(SAM, SAM_PW)
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()
    client = proxy.login(SUE, SUE_PW)
    # sue's row names the read-only policy.
    with pytest.raises(imaplib.IMAP4.readonly):
        client.select("INBOX")
    client.shutdown()
    assert {user: proxy.dovecotLogins(user) for user in (SAM_UP, SUE_UP)} == {
        user: count + 1 for user, count in before.items()
    }
    assert SAM_PW not in proxy.log() and UPSTREAM_USERS[SAM_UP] not in proxy.log()


def test_wrong_passwords_unknown_and_inactive_users_are_refused(startProxy: Callable[..., ProxyInFront]) -> None:
    assertRefusalsReachNoUpstream(startProxy())


def assertRefusalsReachNoUpstream(proxy: ProxyInFront, backend: str = "sql", injections: tuple[str, ...] = ()) -> None:
    """
    A wrong password, an unknown user, an inactive account and injection
    attempts in the name (SQL's, and C{injections}): each a counted
    failure, none logged in upstream.
    """
    before = proxy.dovecotLogins(SAM_UP) + proxy.dovecotLogins(SID_UP)
    proxy.loginRefused("AUTHENTICATIONFAILED", SAM, "a guess")
    proxy.loginRefused("AUTHENTICATIONFAILED", "nobody", SAM_PW)
    # sid's row is not active: the query finds none.
    proxy.loginRefused("AUTHENTICATIONFAILED", SID, SID_PW)
    # An injection attempt in the name is a name like any other.
    for injection in ("sam'--", "sam'OR'1'='1", *injections):
        proxy.loginRefused("AUTHENTICATIONFAILED", injection, SAM_PW)
    for user in ("sam", "nobody", "sid"):
        proxy.waitForLog(rf"authentication failure: ip=127\.0\.0\.1 protocol=imap user={user}")
    proxy.waitForLog(rf"account backend {backend} refused nobody: unknown user")
    assert proxy.dovecotLogins(SAM_UP) + proxy.dovecotLogins(SID_UP) == before


def test_a_broken_query_is_unavailable_and_a_reload_mends_it(startProxy: Callable[..., ProxyInFront]) -> None:
    proxy = startProxy(query=QUERY.replace("FROM users", "FROM no_such_table"))
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    proxy.waitForLog(r"account backend sql unavailable for sam: .*no such table: no_such_table")
    assert "authentication failure" not in proxy.log()
    config = Path(proxy.configPath).read_text().replace("FROM no_such_table", "FROM users")
    Path(proxy.configPath).write_text(config)
    os.kill(proxy.process.pid, signal.SIGHUP)
    proxy.waitForLog(r"reloading 2 workers")
    proxy.awaitLogin(SAM, SAM_PW, "the reloaded query", WAIT)


def assertOutageEndsByItself(
    proxy: ProxyInFront, backend: str, stop: Callable[[], None], start: Callable[[], None], lockoutAfter: int
) -> None:
    """
    The backend's server stopped: a user the cache knows still logs in; another gets UNAVAILABLE, more times
    than a lockout takes, none counted; the server back: that user logs in too (the proxy connects again by
    itself).
    """
    proxy.login(SAM, SAM_PW).logout()
    stop()
    try:
        proxy.login(SAM, SAM_PW).logout()
        for _ in range(lockoutAfter + 2):
            proxy.loginRefused("UNAVAILABLE", SUE, SUE_PW)
        proxy.waitForLog(rf"account backend {backend} unavailable for sue")
    finally:
        start()
    assert "authentication failure" not in proxy.log()
    proxy.awaitLogin(SUE, SUE_PW, "the backend's server back", WAIT)
