"""
Logins per second by account backend, with a warm and a cold cache,
against direct Dovecot measured in the same run.

    .venv/bin/python -m bench.backends [--seconds 4] [--rounds 3]

Each backend runs in its own proxy (one worker, so the figures are the
backend's and not the machine's spread): the users file (the default
scrypt, ln=15), the HTTP backend (nginx's auth_http protocol) asking a
service in this process, and the SQL backend on an SQLite file and on a
private PostgreSQL cluster (tests/postgres.py, left out with a note where
PostgreSQL or psycopg is missing), each row holding the same scrypt hash;
and the LDAP backend on a private OpenLDAP directory (tests/slapd.py, left
out with a note where slapd or ldaptor is missing) over StartTLS, the
password checked by a bind as the user's entry ({SSHA}, slapd's default).
'warm' logs the same user in again and again, the credentials cache
answering; 'cold' runs with C{[auth] cache_ttl = 0} (and C{negative_ttl =
0}), so every login pays the full check: a scrypt, a round trip to the
service, a query and a scrypt, or a search and a bind.  A login is connect, greeting, LOGIN,
LOGOUT, one at a time and 8 in parallel; the targets are interleaved round
by round and the medians reported, with their ratio to direct Dovecot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import PASSWORD, USER, freePort, privateDovecot, startProxy, workDirectory, writeUsersFile
from bench.logins import loginRate
from mailproxy.passwords import DEFAULT_LOG2_N, hashPassword
from tests.authhttpserver import SECRET, SECRET_HEADER, AuthService

PARALLEL = (1, 8)
MAX_LOGINS = 2000

CONFIG = """
[server]
workers = 1
[auth]
{auth}
[[listener]]
name = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1:backlog=1024"
allow_plaintext_auth = true
[upstream.imap]
host = "127.0.0.1"
port = {upstreamPort}
[routing]
default_upstream = "imap"
[limits]
max_connections_per_ip = 1000
max_sessions_per_user = 1000
"""


@dataclass
class Column:
    name: str
    port: int
    rates: dict[int, list[float]] = field(default_factory=dict)


BACKENDS = ("users_file", "http", "sql", "postgresql", "ldap")


@dataclass(frozen=True)
class Servers:
    """
    What the backends ask: the HTTP service's URL, and the PostgreSQL
    connection string and LDAP directory (C{None} where they cannot run).
    """

    serviceUrl: str
    postgres: str | None = None
    ldap: Any = None

    def missing(self, backend: str) -> bool:
        return (backend == "postgresql" and self.postgres is None) or (backend == "ldap" and self.ldap is None)


def backendAuth(backend: str, cache: bool, servers: Servers, directory: str) -> str:
    ttl = "" if cache else "cache_ttl = 0\nnegative_ttl = 0\n"
    if backend == "users_file":
        return 'users_file = "users"\n' + ttl
    if backend == "sql":
        database = os.path.join(directory, "accounts.db")
        with contextlib.closing(sqlite3.connect(database)) as connection, connection:
            connection.execute("CREATE TABLE users (username TEXT PRIMARY KEY, password TEXT)")
            connection.execute("INSERT INTO users VALUES (?, ?)", (USER, hashPassword(PASSWORD)))
        return f'backend = "sql"\n{ttl}[auth.sql]\ndatabase = "{database}"\n'
    if backend == "postgresql":
        assert servers.postgres is not None
        # a TOML literal string: the connection string's quotes stay as they are
        literal = "'''" + servers.postgres + "'''"
        return f'backend = "sql"\n{ttl}[auth.sql]\ndriver = "postgresql"\ndatabase = {literal}\n'
    if backend == "ldap":
        from tests.slapd import PEOPLE, SERVICE_DN, SERVICE_PASSWORD

        ldap = servers.ldap
        return (
            f'backend = "ldap"\n{ttl}[auth.ldap]\nurl = "{ldap.url("ldap")}"\nstarttls = true\n'
            f'ca_file = "{ldap.caFile}"\nbind_dn = "{SERVICE_DN}"\nbind_password = "{SERVICE_PASSWORD}"\n'
            f'base = "{PEOPLE}"\n'
        )
    return (
        f'backend = "http"\n{ttl}[auth.http]\nurl = "{servers.serviceUrl}"\n'
        f'[auth.http.headers]\n"{SECRET_HEADER}" = "{SECRET}"\n'
    )


@contextlib.contextmanager
def postgresAccounts() -> Iterator[str | None]:
    """
    A private PostgreSQL cluster holding the bench user's row: its
    connection string, or C{None} (and a note) where it cannot run.
    """
    try:
        import psycopg  # noqa: F401

        from tests.postgres import PROXY_ROLE, PostgresCluster
    except ImportError as error:
        print(f"postgresql column left out: {error}")
        yield None
        return
    try:
        cluster = PostgresCluster()
    except RuntimeError as error:
        print(f"postgresql column left out: {error}")
        yield None
        return
    with cluster:
        hashed = hashPassword(PASSWORD).replace("'", "''")
        cluster.sql(
            f"CREATE TABLE users (username text PRIMARY KEY, password text); GRANT SELECT ON users TO {PROXY_ROLE};"
            f"INSERT INTO users VALUES ('{USER}', '{hashed}')"
        )
        yield cluster.conninfo()


@contextlib.contextmanager
def ldapAccounts() -> Iterator[Any]:
    """
    A private OpenLDAP directory holding the bench user's entry, or
    C{None} (and a note) where it cannot run.
    """
    try:
        import ldaptor  # noqa: F401

        from tests.slapd import SlapdServer, binary
    except ImportError as error:
        print(f"ldap column left out: {error}")
        yield None
        return
    if binary() is None:
        print("ldap column left out: slapd is not installed (apt-get install slapd ldap-utils)")
        yield None
        return
    with SlapdServer() as directory:
        directory.addUser(USER, PASSWORD)
        yield directory


@contextlib.contextmanager
def proxies(directory: str, upstreamPort: int, servers: Servers) -> Iterator[list[Column]]:
    columns = []
    with contextlib.ExitStack() as stack:
        for backend in BACKENDS:
            if servers.missing(backend):
                continue
            for cache in (True, False):
                name = f"{backend}, {'warm' if cache else 'cold'}"
                where = os.path.join(directory, name.replace(", ", "-"))
                os.mkdir(where)
                writeUsersFile(where, {USER: (PASSWORD, DEFAULT_LOG2_N)})
                port = freePort()
                config = CONFIG.format(
                    auth=backendAuth(backend, cache, servers, where), port=port, upstreamPort=upstreamPort
                )
                stack.enter_context(startProxy(where, config, [port]))
                columns.append(Column(name, port))
        yield columns


def measure(seconds: float, rounds: int) -> list[Column]:
    with (
        workDirectory("mp-backends-") as directory,
        privateDovecot({USER: PASSWORD}) as upstream,
        postgresAccounts() as postgres,
        ldapAccounts() as ldap,
    ):
        service = AuthService().start()
        try:
            service.add(USER, PASSWORD)
            with proxies(directory, upstream.ports["imap"], Servers(service.url, postgres, ldap)) as columns:
                targets = [Column("direct Dovecot", upstream.ports["imap"]), *columns]
                for target in targets:
                    # a first login fills a warm cache
                    asyncio.run(loginRate(target.port, USER, PASSWORD, 1, 1, seconds))
                for _ in range(rounds):
                    for parallel in PARALLEL:
                        for target in targets:
                            rate = asyncio.run(loginRate(target.port, USER, PASSWORD, parallel, MAX_LOGINS, seconds))
                            target.rates.setdefault(parallel, []).append(rate)
                return targets
        finally:
            service.stop()


def report(targets: Sequence[Column]) -> str:
    direct = targets[0]
    lines = [f"{'target':<20}" + "".join(f"{f'{n} at a time':>24}" for n in PARALLEL)]
    for target in targets:
        cells = []
        for parallel in PARALLEL:
            rate = statistics.median(target.rates[parallel])
            ratio = rate / statistics.median(direct.rates[parallel])
            cells.append(f"{rate:>10.1f} logins/s" + (f" ({ratio:.2f}x)" if target is not direct else " " * 8))
        lines.append(f"{target.name:<20}" + "".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement (default: %(default)g)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)d)")
    arguments = parser.parse_args(argv)
    print(report(measure(arguments.seconds, arguments.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
