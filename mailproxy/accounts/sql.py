# -*- test-case-name: tests.test_accounts_sql -*-
"""
An account backend that looks users up in an SQL database, as Dovecot's
SQL passdb does: one configured query per login, its row giving the
stored password hash and, optionally, the route.

The query names what it is given with Dovecot's variables: C{%u} the user
name, C{%s} the protocol (C{imap}, C{pop3}), C{%r} the client's address,
C{%%} a percent sign.  They are passed as query parameters, never written
into the SQL.  The row's columns, by name:

  - C{password} (required): the stored hash (see
    L{mailproxy.accounts.hashes}); C{NULL} refuses the login;
  - C{upstream}, C{server}, C{port}, C{username}, C{upstream_password},
    C{filters} (names separated by commas): the route, as the HTTP
    backend's answer gives it; C{NULL} or a missing column leaves it to
    the configuration's routing.

No row, or a wrong password, refuses the login (an unknown user costs a
decoy check, L{mailproxy.accounts.hashes.DecoyHash}, as a wrong password
does); more than one row, a query that
fails, or a hash of an unknown scheme makes the backend unavailable.

Drivers: C{sqlite} (the standard library's; C{database} is the file, which
must exist) and C{postgresql} (psycopg 3, the C{postgresql} extra;
C{database} is a libpq connection string or URI).  Lookups run in the
backend's own threads (L{LOOKUP_THREADS}), one connection per thread, opened read-only (a
query that writes fails) and kept until it fails; a PostgreSQL query is
also cut off by the server after the backend's lookup time.  Password
hashes are checked in the proxy's hashing threads.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailproxy.accounts.hashes import DecoyHash, UnsupportedHash, verifyStored
from mailproxy.accounts.model import (
    ROUTE_FIELDS,
    Account,
    AccountRefused,
    BackendUnavailable,
    LoginRequest,
    routedAccount,
)
from mailproxy.accounts.registry import refuseUnknownKeys
from mailproxy.config import resolvePath
from mailproxy.interfaces import IAccountBackend

DRIVERS = ("sqlite", "postgresql")
DEFAULT_QUERY = "SELECT password FROM users WHERE username = %u"
_SETTINGS = {"driver", "database", "query"}
_VARIABLES = {"u": "user", "s": "protocol", "r": "ip"}
_VARIABLE = re.compile(r"%(.)")
# Threads a backend looks users up in: its own, so that a database that
# hangs (a stopped server keeps its connections open and answers nothing)
# holds these and not the reactor's pool, which resolves host names.
LOOKUP_THREADS = 4


def placeholders(query: str, style: str = "named") -> str:
    """
    C{query} with Dovecot's variables as named parameters: C{:name}
    (sqlite3's C{named} style) or C{%(name)s} (psycopg's C{pyformat}, where
    a literal C{%} is written C{%%}).

    @raise ValueError: for a variable there is none of, or no C{%u}.
    """
    pyformat = style == "pyformat"

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "%":
            return "%%" if pyformat else "%"
        if name not in _VARIABLES:
            raise ValueError(f"query: %{name} is no variable (%u user, %s protocol, %r client address, %% a %)")
        return f"%({_VARIABLES[name]})s" if pyformat else ":" + _VARIABLES[name]

    if "%u" not in query:
        raise ValueError("query: must look the user up by %u")
    return _VARIABLE.sub(replace, query)


def shownConninfo(conninfo: str) -> str:
    """
    A PostgreSQL connection string as logs may show it: without its
    password (nor anything unreadable).
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        parameters = conninfo_to_dict(conninfo)
    except Exception:
        return "(an unreadable connection string)"
    return " ".join(f"{key}={value}" for key, value in parameters.items() if "pass" not in key)


class SQLiteDatabase:
    """
    A read-only SQLite database file.
    """

    style = "named"
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.shownAs = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SQLiteDatabase) and (other.path, other.timeout) == (self.path, self.timeout)

    def __hash__(self) -> int:
        return hash((self.path, self.timeout))

    def connect(self) -> Any:
        quoted = self.path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
        connection = sqlite3.connect("file:" + quoted + "?mode=ro", uri=True, timeout=self.timeout)
        connection.row_factory = sqlite3.Row
        return connection

    def rows(self, connection: Any, query: str, parameters: dict[str, str]) -> list[dict[str, Any]]:
        return [dict(row) for row in connection.execute(query, parameters).fetchmany(2)]


class PostgreSQLDatabase:
    """
    A PostgreSQL database, through psycopg 3: each session read-only, and
    each statement cut off after C{timeout} seconds by the server itself.
    """

    style = "pyformat"

    def __init__(self, conninfo: str, timeout: float) -> None:
        """
        @raise ValueError: without psycopg, or for a string libpq cannot read.
        """
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict, make_conninfo
        except ImportError:
            raise ValueError("driver: postgresql needs psycopg 3 (pip install 'mailproxy[postgresql]')") from None

        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.Error:
            # (libpq's message repeats what it could not read: a password, maybe.)
            raise ValueError("database: not a PostgreSQL connection string (libpq cannot read it)") from None
        milliseconds = max(1, round(timeout * 1000))
        seconds = str(max(1, round(timeout)))
        options = (
            f"{given.get('options') or ''} -c default_transaction_read_only=on -c statement_timeout={milliseconds}"
        )
        # A dead network path (no answer at all) ends within the lookup time
        # too, unless the connection string says otherwise.
        defaults = {
            "connect_timeout": seconds,
            "keepalives": "1",
            "keepalives_idle": seconds,
            "keepalives_interval": "1",
            "keepalives_count": "3",
            "tcp_user_timeout": str(milliseconds),
        }
        missing = {key: value for key, value in defaults.items() if given.get(key) is None}
        self.conninfo = make_conninfo(conninfo, options=options.strip(), **missing)
        self.shownAs = shownConninfo(conninfo)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostgreSQLDatabase) and other.conninfo == self.conninfo

    def __hash__(self) -> int:
        return hash(self.conninfo)

    def connect(self) -> Any:
        from psycopg.rows import dict_row

        return self._psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row)

    def rows(self, connection: Any, query: str, parameters: dict[str, str]) -> list[dict[str, Any]]:
        with connection.cursor() as cursor:
            cursor.execute(query, parameters)
            return list(cursor.fetchmany(2))


@implementer(IAccountBackend)
class SQLBackend:
    """
    Look users up with one query (see the module's description).
    """

    def __init__(self, reactor: Any, database: Any, query: str, runInThread: Any, config: Any) -> None:
        """
        @param database: a L{SQLiteDatabase} or L{PostgreSQLDatabase} (each
            with the lookup time it was made with).
        """
        self.reactor = reactor
        self.database = database
        self.query = placeholders(query, database.style)
        self.runInThread = runInThread
        self.config = config
        self._connections = ThreadConnections(database.connect)
        self._decoy = DecoyHash()
        self._pool = LookupThreads(0, LOOKUP_THREADS, "mailproxy-sql")
        self._pool.start()

    @classmethod
    def fromSettings(cls, settings: dict[str, Any], context: Any) -> SQLBackend:
        refuseUnknownKeys(settings, _SETTINGS)
        driver = settings.get("driver", "sqlite")
        if driver not in DRIVERS:
            raise ValueError(f"driver: one of {', '.join(DRIVERS)}")
        database = settings.get("database")
        if not isinstance(database, str) or not database:
            raise ValueError("database: required, the database file (sqlite) or connection string (postgresql)")
        opened: SQLiteDatabase | PostgreSQLDatabase
        if driver == "postgresql":
            opened = PostgreSQLDatabase(database, context.timeout)
        else:
            path = resolvePath(context.config.directory, database)
            if not os.path.isfile(path):
                raise ValueError(f"database: no such file {path!r}")
            opened = SQLiteDatabase(path, context.timeout)
        query = settings.get("query", DEFAULT_QUERY)
        if not isinstance(query, str):
            raise ValueError("query: an SQL query")
        return cls(context.reactor, opened, query, context.runInThread, context.config)

    def __repr__(self) -> str:
        return f"<SQLBackend {self.database.shownAs}>"

    def authenticate(self, request: LoginRequest) -> Deferred[Account]:
        looking = deferToThreadPool(self.reactor, self._pool, self._lookup, request)
        return looking.addCallback(self._verify, request)

    def _lookup(self, request: LoginRequest) -> dict[str, Any] | None:
        """
        The user's row (in a thread of the pool).
        """
        parameters = {"user": request.username, "protocol": request.protocol, "ip": request.clientIP}
        shownAs = self.database.shownAs
        connection = None
        try:
            connection = self._connections.get()
            rows = self.database.rows(connection, self.query, parameters)
        except self.database.errors as error:
            if connection is not None:
                # A connection that failed once is not trusted again.
                self._connections.forget(connection)
            reason = " ".join(str(error).split())
            raise BackendUnavailable(f"{shownAs}: {reason}") from None
        if len(rows) > 1:
            raise BackendUnavailable(f"{shownAs}: the query found more than one row for one user")
        if not rows:
            return None
        row = rows[0]
        if "password" not in row:
            raise BackendUnavailable(f"{shownAs}: the query gives no password column")
        return row

    def _verify(self, row: dict[str, Any] | None, request: LoginRequest) -> Deferred[Account]:
        stored = row.get("password") if row is not None else None
        known = stored if isinstance(stored, str) and stored else None
        decoy = self._decoy

        def check() -> bool:
            if known is None:
                decoy.check(request.password)
                return False
            try:
                right = verifyStored(request.password, known)
            except UnsupportedHash as error:
                raise BackendUnavailable(f"{self.database.shownAs}: {request.username!r}: {error}") from None
            decoy.seen(known)
            return right

        def decide(right: bool) -> Account:
            if not right or row is None:
                raise AccountRefused("unknown user" if row is None else "wrong password")
            return self._account(request, row)

        checking: Deferred[bool] = self.runInThread(check)
        return checking.addCallback(decide)

    def _account(self, request: LoginRequest, row: dict[str, Any]) -> Account:
        route = {field: row.get(field) for field in ROUTE_FIELDS}
        return routedAccount(request.username, route, self.database.shownAs, request.username)

    def close(self) -> None:
        self._connections.closeAll()
        # Stopping the pool waits for its threads: never on the reactor's
        # (one may wait for a hung database).
        threading.Thread(target=self._pool.stop, name="mailproxy-sql-stop", daemon=True).start()


class LookupThreads(ThreadPool):
    """
    A thread pool whose threads never hold up the process's exit (one may
    be waiting for a database that does not answer).
    """

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


class ThreadConnections:
    """
    One database connection per thread (of the pool the lookups run in),
    opened when the thread first needs one.  Only the thread that uses a
    connection closes it: closing one another thread may be using would
    free it under that thread (libpq).
    """

    def __init__(self, connect: Any) -> None:
        self._connect = connect
        self._local = threading.local()

    def get(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def forget(self, connection: Any) -> None:
        """
        Close the calling thread's C{connection}; the next L{get} opens another.
        """
        self._local.connection = None
        try:
            connection.close()
        except Exception:
            # (A connection that just failed may fail to close as well.)
            pass

    def closeAll(self) -> None:
        """
        Let go of every connection: each closes once no lookup uses it any
        more (when the last reference to it goes), in whichever thread that is.
        """
        self._local = threading.local()
