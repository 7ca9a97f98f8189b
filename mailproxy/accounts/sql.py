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
decoy hash, as a wrong password does); more than one row, a query that
fails, or a hash of an unknown scheme makes the backend unavailable.

Drivers: C{sqlite} (the standard library's; the database file must
exist).  Lookups run in the reactor's thread pool, one connection per
thread; password hashes in the proxy's hashing threads.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailproxy.accounts.hashes import UnsupportedHash, verifyStored
from mailproxy.accounts.model import Account, AccountRefused, BackendUnavailable, LoginRequest
from mailproxy.interfaces import IAccountBackend
from mailproxy.passwords import hashPassword

DRIVERS = ("sqlite",)
DEFAULT_QUERY = "SELECT password FROM users WHERE username = %u"
_SETTINGS = {"driver", "database", "query"}
_VARIABLES = {"u": "user", "s": "protocol", "r": "ip"}
_VARIABLE = re.compile(r"%(.)")
_ROUTE_COLUMNS = ("upstream", "server", "port", "username", "upstream_password", "filters")
# Verified for unknown users so that a missing name costs the same time as a
# wrong password.
_DECOY_HASH = hashPassword("mailproxy sql decoy", log2N=15)


def placeholders(query: str) -> str:
    """
    C{query} with Dovecot's variables as sqlite3's named parameters.

    @raise ValueError: for a variable there is none of, or no C{%u}.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "%":
            return "%"
        if name not in _VARIABLES:
            raise ValueError(f"query: %{name} is no variable (%u user, %s protocol, %r client address, %% a %)")
        return ":" + _VARIABLES[name]

    if "%u" not in query:
        raise ValueError("query: must look the user up by %u")
    return _VARIABLE.sub(replace, query)


@implementer(IAccountBackend)
class SQLBackend:
    """
    Look users up with one query (see the module's description).
    """

    def __init__(self, reactor: Any, database: str, query: str, timeout: float, runInThread: Any, config: Any) -> None:
        self.reactor = reactor
        self.database = database
        self.query = placeholders(query)
        self.timeout = timeout
        self.runInThread = runInThread
        self.config = config
        self._connections = threading.local()

    @classmethod
    def fromSettings(cls, settings: dict[str, Any], context: Any) -> SQLBackend:
        unknown = set(settings) - _SETTINGS
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key (expected one of {', '.join(sorted(_SETTINGS))})")
        driver = settings.get("driver", "sqlite")
        if driver not in DRIVERS:
            raise ValueError(f"driver: one of {', '.join(DRIVERS)}")
        database = settings.get("database")
        if not isinstance(database, str) or not database:
            raise ValueError("database: required, the database file")
        path = os.path.join(context.config.directory, os.path.expanduser(database))
        if not os.path.isfile(path):
            raise ValueError(f"database: no such file {path!r}")
        query = settings.get("query", DEFAULT_QUERY)
        if not isinstance(query, str):
            raise ValueError("query: an SQL query")
        return cls(context.reactor, path, query, context.timeout, context.runInThread, context.config)

    def __repr__(self) -> str:
        return f"<SQLBackend sqlite {self.database}>"

    def authenticate(self, request: LoginRequest) -> Deferred[Account]:
        looking = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._lookup, request)
        return looking.addCallback(self._verify, request)

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._connections, "connection", None)
        if connection is None:
            # Read-only: the proxy never writes the accounts.
            quoted = self.database.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
            uri = "file:" + quoted + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, timeout=self.timeout)
            connection.row_factory = sqlite3.Row
            self._connections.connection = connection
        return connection

    def _lookup(self, request: LoginRequest) -> dict[str, Any] | None:
        """
        The user's row (in a thread of the pool).
        """
        parameters = {"user": request.username, "protocol": request.protocol, "ip": request.clientIP}
        try:
            rows = self._connection().execute(self.query, parameters).fetchmany(2)
        except sqlite3.Error as error:
            self._connections.connection = None
            raise BackendUnavailable(f"{self.database}: {error}") from None
        if len(rows) > 1:
            raise BackendUnavailable(f"{self.database}: the query found more than one row for one user")
        if not rows:
            return None
        row = dict(rows[0])
        if "password" not in row:
            raise BackendUnavailable(f"{self.database}: the query gives no password column")
        return row

    def _verify(self, row: dict[str, Any] | None, request: LoginRequest) -> Deferred[Account]:
        stored = row.get("password") if row is not None else None
        encoded = stored if isinstance(stored, str) and stored else _DECOY_HASH

        def check() -> bool:
            try:
                return verifyStored(request.password, encoded)
            except UnsupportedHash as error:
                raise BackendUnavailable(f"{self.database}: {request.username!r}: {error}") from None

        def decide(right: bool) -> Account:
            if not right or row is None or encoded is _DECOY_HASH:
                raise AccountRefused("unknown user" if row is None else "wrong password")
            return self._account(request, row)

        checking: Deferred[bool] = self.runInThread(check)
        return checking.addCallback(decide)

    def _account(self, request: LoginRequest, row: dict[str, Any]) -> Account:
        route = {column: row.get(column) for column in _ROUTE_COLUMNS}
        port = route["port"]
        if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
            port = int(port)
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise BackendUnavailable(f"{self.database}: port {port!r} of {request.username!r} is not a port")
        texts = {}
        for column in ("upstream", "server", "username", "upstream_password", "filters"):
            value = route[column]
            if value is not None and not isinstance(value, str):
                raise BackendUnavailable(f"{self.database}: column {column} of {request.username!r} is not text")
            texts[column] = value
        filters = None
        if texts["filters"] is not None:
            filters = tuple(name.strip() for name in texts["filters"].split(",") if name.strip())
        return Account(
            name=request.username,
            upstream=texts["upstream"],
            server=texts["server"],
            port=port,
            username=texts["username"],
            password=texts["upstream_password"],
            filters=filters,
        )

    def close(self) -> None:
        # Each pool thread's connection goes with this backend's thread-local.
        self._connections = threading.local()
