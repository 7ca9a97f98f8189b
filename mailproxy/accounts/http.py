# -*- test-case-name: tests.test_accounts_http -*-
"""
An account backend that asks an HTTP service, in the protocol of nginx's
C{auth_http} (C{ngx_mail_auth_http_module}), so that an nginx mail
deployment's authentication service serves the proxy unchanged.

The request is a C{GET} of the configured URL with the login in headers:
C{Auth-Method: plain}, C{Auth-User} and C{Auth-Pass} (percent-encoded as
nginx does: space, C{%} and control characters),
C{Auth-Protocol} (C{imap} or C{pop3}), C{Auth-Login-Attempt},
C{Client-IP}, C{Auth-SSL: on} over TLS, and the configured C{headers}
(nginx's C{auth_http_header}, a shared secret say).

The answer is read from its headers as nginx reads them (the status line
and the body are ignored; of a repeated header the last counts, and any
refusing C{Auth-Status} wins), and never redirected:

  - C{Auth-Status: OK}: accepted.  C{Auth-Server} (an address) and
    C{Auth-Port} say where the session goes, reached with the settings of
    the backend's C{upstream} (TLS, timeouts); C{Auth-User} and
    C{Auth-Pass} replace the upstream login name and password.  Two
    headers of the proxy's own: C{Auth-Upstream} names a configured
    C{[upstream.NAME]}, C{Auth-Filters} the user's filter chain (names of
    C{[filters.NAME]}, separated by commas).  What the answer leaves out
    comes from the configuration's routing, as for a users-file user.
  - C{Auth-Status: WAIT}: ask again after C{Auth-Wait} seconds (within the
    lookup timeout).
  - any other C{Auth-Status}: refused; the text is logged (the client gets
    the proxy's own reply), and C{Auth-Wait} is the least delay before
    the reply.

No C{Auth-Status} (an error page, a redirect), no answer within C{[auth]
lookup_timeout}, or an accepting answer that names an invalid address or
an unknown upstream or filter: the backend is unavailable, and the client
is told to try again later.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailproxy.accounts.model import Account, AccountRefused, BackendUnavailable, LoginRequest
from mailproxy.accounts.registry import refuseUnknownKeys
from mailproxy.httpclient import connectionPool, exchange
from mailproxy.interfaces import IAccountBackend

# The answer's body is ignored; more than this is no auth_http answer.
MAX_ANSWER = 64 * 1024
# How often an answer may say WAIT before the login is given up.
MAX_WAITS = 3
DEFAULT_MAX_WAIT = 30.0
# What nginx's NGX_ESCAPE_MAIL_AUTH (its "memcached" table) escapes: control
# characters, space and "%"; other octets (UTF-8 too) go as they are.
_ESCAPED = frozenset(range(0x00, 0x21)) | {0x25}
_PORT = re.compile(r"[0-9]{1,5}")
_SECONDS = re.compile(r"[0-9]{1,6}")
_SETTINGS = {"url", "headers", "upstream", "max_wait"}


def escape(value: bytes) -> bytes:
    """
    C{value} percent-encoded as nginx sends C{Auth-User} and C{Auth-Pass}.
    """
    return b"".join(b"%%%02X" % octet if octet in _ESCAPED else bytes((octet,)) for octet in value)


@implementer(IAccountBackend)
class HTTPBackend:
    """
    Ask an C{auth_http} service (see the module's description).

    @ivar url: what is asked.
    @ivar upstream: the configured upstream an C{Auth-Server} is reached
        with, when the answer names none.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        headers: Mapping[str, str],
        upstream: str | None,
        timeout: float,
        maxWait: float,
        config: Any,
    ) -> None:
        """
        @param config: the configuration the backend serves (a reload
            builds a new backend): the upstream and filter names an answer
            gives must be in it.
        """
        self.reactor = reactor
        self.url = url
        self.where = _withoutSecrets(url)
        self.extraHeaders = {name.encode("ascii"): [value.encode("utf-8")] for name, value in headers.items()}
        self.upstream = upstream
        self.timeout = timeout
        self.maxWait = maxWait
        self.config = config
        self._pool = connectionPool(reactor)

    @classmethod
    def fromSettings(cls, settings: dict[str, Any], context: Any) -> HTTPBackend:
        refuseUnknownKeys(settings, _SETTINGS)
        url = settings.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError("url: required, an http:// or https:// URL")
        headers = settings.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(name, str)
            and name.isascii()
            and name.replace("-", "").isalnum()
            and isinstance(value, str)
            and value.isprintable()
            for name, value in headers.items()
        ):
            raise ValueError("headers: a table of header names to printable values")
        config = context.config
        upstream = settings.get("upstream")
        if upstream is not None and (not isinstance(upstream, str) or upstream not in config.upstreams):
            raise ValueError(f"upstream: no [upstream.{upstream}]")
        maxWait = settings.get("max_wait", DEFAULT_MAX_WAIT)
        if isinstance(maxWait, bool) or not isinstance(maxWait, int | float) or not 0 <= maxWait <= 300:
            raise ValueError("max_wait: seconds, from 0 to 300")
        return cls(context.reactor, url, headers, upstream, context.timeout, float(maxWait), config)

    def __repr__(self) -> str:
        # Never the extra headers: they hold shared secrets.
        return f"<HTTPBackend {self.where}>"

    def requestHeaders(self, request: LoginRequest) -> dict[bytes, list[bytes]]:
        headers = {
            b"Auth-Method": [b"plain"],
            b"Auth-User": [escape(request.username.encode("utf-8", "surrogateescape"))],
            b"Auth-Pass": [escape(request.password)],
            b"Auth-Protocol": [request.protocol.encode("ascii")],
            b"Auth-Login-Attempt": [b"%d" % request.attempt],
            b"Client-IP": [request.clientIP.encode("ascii", "replace")],
        }
        if request.tls:
            headers[b"Auth-SSL"] = [b"on"]
        return {**headers, **self.extraHeaders}

    async def _authenticate(self, request: LoginRequest) -> Account:
        for _ in range(MAX_WAITS + 1):
            answer = await exchange(
                self.reactor,
                "GET",
                self.url,
                headers=self.requestHeaders(request),
                timeout=self.timeout,
                maxBody=MAX_ANSWER,
                pool=self._pool,
                unavailable=BackendUnavailable,
                shownAs=self.where,
            )
            verdict = self.verdict(request, answer.code, answer.headers)
            if isinstance(verdict, Account):
                return verdict
            await deferLater(self.reactor, verdict, lambda: None)
        raise BackendUnavailable(f"{self.where}: Auth-Status WAIT {MAX_WAITS + 1} times")

    def authenticate(self, request: LoginRequest) -> Deferred[Account]:
        return Deferred.fromCoroutine(self._authenticate(request))

    def verdict(self, request: LoginRequest, code: int, headers: Headers) -> Account | float:
        """
        What an answer says: the account, or the seconds to wait before
        asking again (C{WAIT}).

        @raise AccountRefused: if it refuses.
        @raise BackendUnavailable: if it says nothing usable.
        """
        statuses = headers.getRawHeaders(b"Auth-Status") or []
        if not statuses:
            raise BackendUnavailable(f"{self.where}: HTTP {code} without Auth-Status")
        # As nginx: any other status than OK and WAIT refuses (the last one
        # is the reason); else a WAIT asks again.
        texts = [_text(value) for value in statuses]
        refusals = [text for text in texts if text not in ("OK", "WAIT")]
        wait = self._wait(headers)
        if refusals:
            raise AccountRefused(refusals[-1][:200], wait)
        if "WAIT" in texts:
            return wait
        return self._account(request, headers)

    def _wait(self, headers: Headers) -> float:
        text = _header(headers, b"Auth-Wait")
        if text is None or not _SECONDS.fullmatch(text):
            return 0.0
        return min(float(int(text)), self.maxWait)

    def _account(self, request: LoginRequest, headers: Headers) -> Account:
        config = self.config
        server = _header(headers, b"Auth-Server")
        port = _header(headers, b"Auth-Port")
        if (server is None) != (port is None):
            raise BackendUnavailable(f"{self.where}: Auth-Server and Auth-Port come together")
        portNumber = None
        if server is not None and port is not None:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise BackendUnavailable(f"{self.where}: Auth-Server {server[:100]!r} is not an address") from None
            if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
                raise BackendUnavailable(f"{self.where}: Auth-Port {port[:100]!r} is not a port")
            portNumber = int(port)
        upstream = _header(headers, b"Auth-Upstream") or (self.upstream if server is not None else None)
        if upstream is not None and upstream not in config.upstreams:
            raise BackendUnavailable(f"{self.where}: Auth-Upstream names no [upstream.{upstream[:100]}]")
        filters = None
        named = _header(headers, b"Auth-Filters")
        if named is not None:
            filters = tuple(name.strip() for name in named.split(",") if name.strip())
            for name in filters:
                if name not in config.filters:
                    raise BackendUnavailable(f"{self.where}: Auth-Filters names no [filters.{name[:100]}]")
        return Account(
            name=request.username,
            upstream=upstream,
            server=server,
            port=portNumber,
            username=_header(headers, b"Auth-User"),
            password=_header(headers, b"Auth-Pass"),
            filters=filters,
        )

    def close(self) -> Any:
        return self._pool.closeCachedConnections()


def _header(headers: Headers, name: bytes) -> str | None:
    """
    The last value of header C{name} (nginx takes the last), as text.
    """
    values = headers.getRawHeaders(name)
    if not values:
        return None
    return _text(values[-1])


def _text(value: bytes) -> str:
    """
    A header value as text (its octets kept as they are: a password may be
    anything), stripped as nginx strips it.
    """
    return value.strip(b" \t").decode("utf-8", "surrogateescape")


def _withoutSecrets(url: str) -> str:
    """
    C{url} as log lines show it: no user information, query or fragment
    (a token there stays out of the log).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
