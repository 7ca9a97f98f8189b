# -*- test-case-name: tests.test_accounts -*-
"""
What an account backend is asked and what it answers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin


@dataclass(frozen=True)
class LoginRequest:
    """
    One login a backend is asked about.

    @ivar protocol: C{"imap"} or C{"pop3"}: the protocol the client speaks.
    @ivar clientIP: the client's address (the PROXY protocol's source when
        the listener trusts one).
    @ivar tls: whether the client's connection is encrypted.
    @ivar attempt: the login attempt's number on its connection, from 1.
    """

    username: str
    password: bytes = field(repr=False)
    protocol: str = "imap"
    clientIP: str = ""
    tls: bool = False
    attempt: int = 1


class LoginCredentials(UsernamePassword):
    """
    A user name and password (twisted.cred's L{IUsernamePassword}) with
    what else a backend may decide by: the protocol, the client's address,
    whether it came over TLS, the attempt's number on its connection.
    """

    def __init__(
        self, username: bytes, password: bytes, protocol: str, clientIP: str, tls: bool, attempt: int = 1
    ) -> None:
        super().__init__(username, password)
        self.protocol = protocol
        self.clientIP = clientIP
        self.tls = tls
        self.attempt = attempt

    def request(self) -> LoginRequest:
        return requestFrom(self)


def requestFrom(credentials: Any) -> LoginRequest:
    """
    The L{LoginRequest} of any L{IUsernamePassword} (a plain one has no
    protocol, address or TLS to tell).
    """
    username = credentials.username
    password = credentials.password
    return LoginRequest(
        username.decode("utf-8", "replace") if isinstance(username, bytes) else username,
        password.encode("utf-8") if isinstance(password, str) else password,
        getattr(credentials, "protocol", "imap"),
        getattr(credentials, "clientIP", ""),
        getattr(credentials, "tls", False),
        getattr(credentials, "attempt", 1),
    )


@dataclass(frozen=True)
class Account:
    """
    A user a backend vouched for, and where the session goes.  Each field
    the backend leaves C{None} comes from the configuration's routing for
    the user, as for a users-file user.

    @ivar name: the local user name (limits, logs, the session's user).
    @ivar upstream: the C{[upstream.NAME]} to use.
    @ivar server: an address to connect to instead of that upstream's
        C{host} (nginx's C{Auth-Server}), with its other settings.
    @ivar port: the port to connect to instead of the upstream's.
    @ivar username: the upstream login name.
    @ivar password: the upstream password; C{None} passes the client's on.
    @ivar filters: the user's filter chain (names of C{[filters.NAME]}).
    """

    name: str
    upstream: str | None = None
    server: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    filters: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return self.name

    def toJSON(self) -> str:
        """
        The account as JSON (for a worker: the supervisor checks passwords).
        """
        return json.dumps(asdict(self))

    @classmethod
    def fromJSON(cls, text: str) -> Account:
        fields = json.loads(text)
        filters = fields.get("filters")
        fields["filters"] = tuple(filters) if filters is not None else None
        return cls(**fields)


# The route fields a backend's record may hold (a row's columns, an entry's attributes).
ROUTE_FIELDS = ("upstream", "server", "port", "username", "upstream_password", "filters")


def routedAccount(name: str, route: dict[str, Any], where: str, user: str) -> Account:
    """
    The account C{name} with the route a backend's record gives: text
    fields (C{None} where the record has none), the port as an integer or
    its digits, the filters as names separated by commas.

    @param where: the backend, for errors; C{user} the name as typed.
    @raise BackendUnavailable: for a port that is none, or a field that is
        not text.
    """
    port = route.get("port")
    if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
        port = int(port)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise BackendUnavailable(f"{where}: port {str(port)[:20]!r} of {user!r} is not a port")
    texts: dict[str, str | None] = {}
    for field_ in ROUTE_FIELDS:
        value = route.get(field_)
        if field_ != "port" and value is not None and not isinstance(value, str):
            raise BackendUnavailable(f"{where}: {field_} of {user!r} is not text")
        texts[field_] = value
    named = texts["filters"]
    filters = tuple(filter(None, (part.strip() for part in named.split(",")))) if named is not None else None
    return Account(
        name=name,
        upstream=texts["upstream"],
        server=texts["server"],
        port=port,
        username=texts["username"],
        password=texts["upstream_password"],
        filters=filters,
    )


class AccountRefused(UnauthorizedLogin):
    """
    The backend says no: an unknown user or a wrong password.

    @ivar reason: the backend's own words, for the log (never the client).
    @ivar wait: seconds the backend asks the refusal to wait, at least.
    """

    def __init__(self, reason: str = "", wait: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class BackendUnavailable(Exception):
    """
    The backend could not say: no answer in time, an outage, an answer
    that makes no sense.  The client is told to try again later; the
    attempt counts as no failure.
    """
