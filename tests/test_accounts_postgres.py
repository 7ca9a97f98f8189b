"""
The SQL account backend on PostgreSQL end to end: a private cluster (see
tests/postgres.py), a real twistd with two workers asking it over TCP as a
password-authenticated role, a real Dovecot behind; Dovecot's own log and
the database's state show what happened, not only the replies.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from mailproxy.accounts.sql import PostgreSQLDatabase, placeholders, shownConninfo
from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.postgres import PROXY_PASSWORD, PROXY_ROLE, PostgresCluster
from tests.proxyprocess import ProxyInFront, freePort, runningProxy
from tests.rawclient import connectFrom, readLine, readTagged
from tests.test_accounts_sql import (
    SAM,
    SAM_PW,
    SAM_UP,
    SID,
    SID_PW,
    SID_UP,
    SUE,
    SUE_PW,
    SUE_UP,
    UPSTREAM_USERS,
    accountsDovecot,
    assertOutageEndsByItself,
    assertRefusalsReachNoUpstream,
    assertRowsGiveHashAndRoute,
    bcrypt,
    sha512crypt,
)
from tests.tomlconfig import listenerTable, table, upstreamTable

WAIT = 20.0
LOCKOUT_AFTER = 3
QUERY = (
    "SELECT password, upstream, username_up AS username, upstream_password, filters "
    "FROM users WHERE username = %u AND active"
)


def test_the_query_takes_dovecots_variables_as_psycopg_parameters() -> None:
    """Variables become named parameters; a literal % is doubled, as psycopg reads the query."""
    assert placeholders("SELECT password FROM u WHERE n = %u AND s = %s AND i = %r AND x LIKE '5%%'", "pyformat") == (
        "SELECT password FROM u WHERE n = %(user)s AND s = %(protocol)s AND i = %(ip)s AND x LIKE '5%%'"
    )


def test_a_connection_string_is_shown_without_its_password() -> None:
    shown = shownConninfo("host=db.example port=5433 dbname=mail user=proxy password='s3cret pw' sslmode=verify-full")
    assert "s3cret" not in shown
    assert sorted(shown.split()) == ["dbname=mail", "host=db.example", "port=5433", "sslmode=verify-full", "user=proxy"]
    assert "hunter2" not in shownConninfo("postgresql://proxy:hunter2@db.example/mail")


def test_no_password_of_a_connection_string_reaches_a_message() -> None:
    """Neither the password nor a client key's passphrase is shown; a string libpq cannot read is not repeated."""
    shown = shownConninfo("host=127.0.0.1 port=1 password=pw1 sslpassword=KEYPASS")
    assert "pw1" not in shown and "KEYPASS" not in shown
    unreadable = [
        "postgresql://alice:S3%ZZCRET@db/mail",
        "postgresql://alice:S3CRET@[::1/db",
        "host=x password S3CRET",
    ]
    for conninfo in unreadable:
        with pytest.raises(ValueError) as raised:
            PostgreSQLDatabase(conninfo, 5.0)
        assert "S3" not in str(raised.value) and "CRET" not in str(raised.value), raised.value


def test_a_connection_gives_up_on_a_dead_network_within_the_lookup_time() -> None:
    """Unless the connection string says otherwise: TCP keepalives, and unacknowledged data abandoned after the lookup time."""
    parameters = conninfo_to_dict(PostgreSQLDatabase("host=db.example dbname=mail", 3.0).conninfo)
    assert parameters["tcp_user_timeout"] == "3000"
    assert (parameters["keepalives"], parameters["keepalives_idle"], parameters["keepalives_count"]) == ("1", "3", "3")
    assert parameters["connect_timeout"] == "3"
    assert "default_transaction_read_only=on" in parameters["options"]
    own = conninfo_to_dict(PostgreSQLDatabase("host=db.example keepalives_idle=30 options='-c x=y'", 3.0).conninfo)
    assert own["keepalives_idle"] == "30"
    assert own["options"].startswith("-c x=y ")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster() as running:
        running.sql(
            "CREATE TABLE users (username text PRIMARY KEY, password text, upstream text, username_up text, "
            "upstream_password text, filters text, active boolean DEFAULT true);"
            "CREATE TABLE audit (who text);"
            f"GRANT SELECT ON users, audit TO {PROXY_ROLE};"
            f"GRANT INSERT ON audit TO {PROXY_ROLE};"
        )
        rows = [
            (SAM, hashPassword(SAM_PW, log2N=10), None, SAM_UP, UPSTREAM_USERS[SAM_UP], None, True),
            (SUE, sha512crypt(SUE_PW), "mail", SUE_UP, UPSTREAM_USERS[SUE_UP], "readonly", True),
            (SID, bcrypt(SID_PW), None, SID_UP, UPSTREAM_USERS[SID_UP], None, False),
        ]
        for row in rows:
            values = ", ".join("NULL" if value is None else _literal(value) for value in row)
            running.sql(f"INSERT INTO users VALUES ({values})")
        yield running


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "'" + str(value).replace("'", "''") + "'"


@pytest.fixture(scope="module")
def pgDovecot() -> Iterator[DovecotUpstream]:
    yield from accountsDovecot()


@pytest.fixture
def startProxy(
    cluster: PostgresCluster, pgDovecot: DovecotUpstream, tmp_path: Path
) -> Iterator[Callable[..., ProxyInFront]]:
    with ExitStack() as running:

        def start(query: str = QUERY, conninfo: str | None = None, **more: Any) -> ProxyInFront:
            ports = {"imap": freePort()}
            config = proxyConfig(ports["imap"], pgDovecot, conninfo or cluster.conninfo(), query, **more)
            directory, process = running.enter_context(runningProxy(config, {}, list(ports.values()), "mp-pg-"))
            return ProxyInFront(directory, process, ports, pgDovecot)

        yield start


def proxyConfig(
    port: int,
    dovecot: DovecotUpstream,
    conninfo: str,
    query: str = QUERY,
    workers: int = 2,
    lookupTimeout: float = 2,
    upstreamHost: str = "127.0.0.1",
    hashThreads: int | None = None,
    lockoutAfter: int = LOCKOUT_AFTER,
) -> str:
    return (
        table("server", workers=workers)
        + table(
            "auth",
            backend="sql",
            failureDelay=0.05,
            lookupTimeout=lookupTimeout,
            negativeTtl=0,
            hashThreads=hashThreads,
        )
        + table("auth.sql", driver="postgresql", database=conninfo, query=query)
        + table("limits", failuresBeforeLockout=lockoutAfter, lockoutSeconds=600)
        + listenerTable("imap", port, allowPlaintextAuth=True)
        + upstreamTable("mail", dovecot.ports["imap"], host=upstreamHost)
        + table("filters.readonly", type="policy", readOnly=True)
        + table("routing", defaultUpstream="mail")
    )


def test_users_log_in_with_the_hash_and_route_their_row_holds(startProxy: Callable[..., ProxyInFront]) -> None:
    proxy = startProxy()
    assertRowsGiveHashAndRoute(proxy)
    assert PROXY_PASSWORD not in proxy.log()


def test_wrong_passwords_unknown_inactive_users_and_injections_are_refused(
    startProxy: Callable[..., ProxyInFront],
) -> None:
    assertRefusalsReachNoUpstream(startProxy())


def test_the_database_session_is_read_only(cluster: PostgresCluster, startProxy: Callable[..., ProxyInFront]) -> None:
    """A query that writes (its role may) fails in the read-only session: unavailable, and nothing is written."""
    writing = (
        "WITH noted AS (INSERT INTO audit VALUES (%u) RETURNING who) "
        "SELECT password FROM users, noted WHERE username = noted.who"
    )
    proxy = startProxy(query=writing)
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    proxy.waitForLog(r"account backend sql unavailable for sam: .*read-only transaction")
    assert cluster.sql("SELECT count(*) FROM audit").strip() == "0"


def test_an_outage_is_unavailable_without_lockout_and_ends_by_itself(
    cluster: PostgresCluster, startProxy: Callable[..., ProxyInFront]
) -> None:
    assertOutageEndsByItself(startProxy(), "sql", cluster.pause, cluster.resume, LOCKOUT_AFTER)


def test_a_wrong_database_password_is_unavailable_and_a_reload_mends_it(
    cluster: PostgresCluster, startProxy: Callable[..., ProxyInFront]
) -> None:
    proxy = startProxy(conninfo=cluster.conninfo(password="not the role's"))
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    proxy.waitForLog(r"account backend sql unavailable for sam: .*password authentication failed")
    assert "not the role's" not in proxy.log()
    Path(proxy.configPath).write_text(proxyConfig(proxy.ports["imap"], proxy.dovecot, cluster.conninfo()))
    os.kill(proxy.process.pid, signal.SIGHUP)
    proxy.waitForLog(r"reloading 2 workers")
    proxy.awaitLogin(SAM, SAM_PW, "the reloaded settings", WAIT)


def test_a_slow_query_is_cut_off_in_the_database_too(
    cluster: PostgresCluster, startProxy: Callable[..., ProxyInFront]
) -> None:
    """Past lookup_timeout the login is UNAVAILABLE, and PostgreSQL itself stops the query (no thread held for it)."""
    proxy = startProxy(query="SELECT password FROM users, pg_sleep(30) AS pause WHERE username = %u")
    started = time.monotonic()
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    assert time.monotonic() - started < 10
    running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + 8
    while cluster.sql(running).strip() != "0":
        assert time.monotonic() < deadline, "the query still runs in PostgreSQL"
        time.sleep(0.2)
    proxy.waitForLog(r"account backend sql unavailable for sam")


def test_a_hung_database_holds_only_the_backends_own_threads(
    cluster: PostgresCluster, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    PostgreSQL stopped dead (SIGSTOP: its connections stay open and nothing answers): lookups end UNAVAILABLE and
    leave their threads waiting, more of them than the reactor's pool has; a user the cache knows still logs in
    to an upstream named by host name, which the reactor's pool resolves (one process, no workers to spread it).
    """
    # "warm" users (sam's mailbox upstream) are looked up slowly, so that their logins (all at once) hold many
    # lookup threads at a time, each of which then keeps a connection.
    hashed = hashPassword("warm pw", log2N=4)
    for number in range(16):
        cluster.sql(
            f"INSERT INTO users VALUES ('warm{number}', '{hashed}', NULL, '{SAM_UP}', "
            f"{_literal(UPSTREAM_USERS[SAM_UP])}, NULL, true) ON CONFLICT DO NOTHING"
        )
    slowForSome = QUERY.replace("FROM users", "FROM users, pg_sleep(CASE WHEN %u LIKE 'warm%%' THEN 0.5 ELSE 0 END)")
    proxy = startProxy(query=slowForSome, workers=1, lookupTimeout=3, upstreamHost="localhost", hashThreads=4)
    proxy.login(SAM, SAM_PW).logout()
    # From as many addresses: each address has one login checked at a time.
    with ThreadPoolExecutor(16) as clients:
        replies = list(clients.map(lambda number: loginFrom(proxy, number, f"warm{number}", "warm pw"), range(16)))
    assert all(reply.startswith(b"l OK") for reply in replies), replies
    cluster.freeze()
    try:
        with ThreadPoolExecutor(16) as clients:
            replies = list(clients.map(lambda number: loginFrom(proxy, number, f"nobody{number}", "pw"), range(16)))
        assert all(reply.startswith(b"l NO [UNAVAILABLE]") for reply in replies), replies
        proxy.login(SAM, SAM_PW).logout()
    finally:
        cluster.thaw()


def loginFrom(proxy: ProxyInFront, number: int, user: str, password: str) -> bytes:
    """
    A LOGIN from 127.0.60.(number + 1): its tagged reply.
    """
    with connectFrom(proxy.ports["imap"], f"127.0.60.{number + 1}", timeout=WAIT) as sock:
        readLine(sock)
        sock.sendall(f'l LOGIN {user} "{password}"\r\n'.encode())
        return readTagged(sock, b"l")
