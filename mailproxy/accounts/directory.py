# -*- test-case-name: tests.test_accounts_ldap -*-
"""
Connections to an LDAP directory, with ldaptor's message codec: plain,
StartTLS or LDAPS, the certificate and host name verified, and kept open
for the next lookups.

One connection, bound as the search account, carries every search (LDAP
answers many operations on one connection by message ID).  Users' binds
go over a few other connections, one bind at a time on each: a bind
changes who the connection is, and nothing may be sent on it before the
bind is answered (RFC 4511 4.2.1).

A connection that fails, or whose answer was given up waiting for, is
closed, and the next lookup opens another; the configured URLs are tried
in order, each connection within its share of the lookup time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.python.failure import Failure

from mailproxy.accounts.model import BackendUnavailable

LDAP_PORT, LDAPS_PORT = 389, 636
# Larger than this, one message from the directory is no answer to a login
# lookup (and ldaptor's decoding time grows with the square of a message's
# elements: at this size, a few hundredths of a second at worst).
MAX_MESSAGE = 32 * 1024
SUCCESS = ldaperrors.Success.resultCode
_CLOSED = Failure(ConnectionLost())


class UnknownTag(ValueError):
    """
    A BER element of a kind LDAP has not.
    """


def _refuseUnknownTag(text: str) -> None:
    raise UnknownTag(text[:100])


# ldaptor prints each element it cannot decode (to the log, under twistd) and
# skips it; a hostile directory could send thousands.  Such a message is
# refused instead, and its connection closed (DirectoryClient.dataReceived).
pureber.print = _refuseUnknownTag


@dataclass(frozen=True)
class DirectoryAddress:
    """
    Where a directory is and how it is reached.

    @ivar url: as configured (C{ldap://host:port} or C{ldaps://...}).
    @ivar startTLS: whether a plain connection switches to TLS first.
    @ivar trust: what the certificate is checked against (for equality:
        TLS options have none).
    @ivar tlsOptions: client TLS options (verification included) for
        LDAPS and StartTLS, or C{None} for plain LDAP.
    """

    url: str
    host: str
    port: int
    implicitTLS: bool
    startTLS: bool
    trust: str = ""
    tlsOptions: IOpenSSLClientConnectionCreator | None = field(default=None, compare=False)

    @classmethod
    def fromURL(cls, url: str, startTLS: bool, tlsOptions: Any, trust: str = "") -> DirectoryAddress:
        """
        @param tlsOptions: a function of the host name giving client TLS
            options.
        @param trust: what they check the certificate against, in words.
        @raise ValueError: for a URL that is no C{ldap://} or C{ldaps://}
            address of a host.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"url: {url!r} is no ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"url: {url!r}: only a host and a port (base, filter and accounts have keys of their own)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"url: {url!r}: not a port") from None
        implicit = parts.scheme == "ldaps"
        if implicit and startTLS:
            raise ValueError("starttls: not with ldaps:// (TLS from the start already)")
        host = unquote(parts.hostname)
        options = tlsOptions(host) if implicit or startTLS else None
        port = port or (LDAPS_PORT if implicit else LDAP_PORT)
        return cls(url, host, port, implicit, startTLS, trust if options is not None else "", options)


class DirectoryClient(LDAPClient):
    """
    ldaptor's client, made strict: a message that does not decode, is too
    large or answers nothing asked closes the connection (the pending
    operations fail), and nothing the directory sent in plain text after
    agreeing to StartTLS is read.
    """

    buffer: bytes
    onwire: dict[int, Any]

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.closed: Deferred[None] = Deferred()
        self.why = ""
        # When the directory last said anything on this connection.
        self.lastHeard = clock.seconds()

    def dataReceived(self, data: bytes) -> None:
        self.lastHeard = self.clock.seconds()
        self.buffer += data
        while self.buffer and self.connected:
            try:
                message, used = pureber.berDecodeObject(self.berdecoder, self.buffer)
            except pureber.BERExceptionInsufficientData:
                message, used = None, 0
            except Exception as error:
                self.fail(f"a message that does not decode ({type(error).__name__})")
                return
            if message is None:
                if len(self.buffer) > MAX_MESSAGE:
                    self.fail(f"a message of more than {MAX_MESSAGE} octets")
                return
            self.buffer = self.buffer[used:]
            if not isinstance(message.value, pureldap.LDAPProtocolResponse) or (
                message.id != 0 and message.id not in self.onwire
            ):
                self.fail(f"an answer to nothing asked (message {message.id})")
                return
            if message.id == 0:
                # A notice of disconnection (RFC 4511 4.4.1): the directory is going.
                self.fail("the directory gave notice of disconnection")
                return
            self.handle(message)

    def fail(self, why: str) -> None:
        """
        Close the connection because of C{why} (kept for the errors of the
        operations it fails).
        """
        if not self.why:
            self.why = why
        self.buffer = b""
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        why = self.why or _errorText(reason.value)
        self.why = why
        self.connected = 0
        pending = self.onwire
        self.onwire = {}
        for deferred, *_ in pending.values():
            deferred.errback(BackendUnavailable(f"connection lost: {why}"))
        self.closed.callback(None)

    def request(self, operation: Any) -> Deferred[Any]:
        """
        Send C{operation}; the Deferred fires with its one answer.
        """
        if not self.connected:
            raise BackendUnavailable(f"connection lost: {self.why or 'closed'}")
        return self.send(operation)

    def search(self, operation: Any) -> Deferred[tuple[list[Any], Any]]:
        """
        Send the search C{operation}; the Deferred fires with its entries
        and its final result.  Giving up on it (cancelling) abandons it.
        """
        if not self.connected:
            raise BackendUnavailable(f"connection lost: {self.why or 'closed'}")
        entries: list[Any] = []
        sent: Deferred[Any]

        def abandon(done: Deferred[Any]) -> None:
            for messageID, (pending, *_) in list(self.onwire.items()):
                if pending is sent:
                    del self.onwire[messageID]
                    if self.connected:
                        self.send_noResponse(pureldap.LDAPAbandonRequest(id=messageID))

        done: Deferred[tuple[list[Any], Any]] = Deferred(abandon)

        def each(message: Any) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                entries.append(message)
                if operation.sizeLimit and len(entries) > operation.sizeLimit:
                    self.fail(f"more entries than the {operation.sizeLimit} asked for")
                return False
            if isinstance(message, pureldap.LDAPSearchResultReference):
                return False
            done.callback((entries, message))
            return True

        def lost(failure: Failure) -> None:
            # (Only the connection's loss fails what send_multiResponse gives.)
            if not done.called:
                done.errback(failure)

        sent = self.send_multiResponse(operation, each)
        sent.addErrback(lost)
        return done

    def _cbStartTLS(self, message: Any, options: Any) -> Any:
        if self.buffer:
            # Sent after the StartTLS answer, in plain text: an injection.
            self.fail("plain text after the StartTLS answer")
            raise BackendUnavailable("the directory sent plain text after the StartTLS answer")
        return super()._cbStartTLS(message, options)

    def startTLSNow(self, options: Any) -> Deferred[Any]:
        """
        Switch to TLS (nothing else may be under way).
        """
        if self.onwire:
            raise BackendUnavailable("StartTLS with operations under way")
        return self._startTLS(options)


def _errorText(error: BaseException, limit: int = 300) -> str:
    """
    An error as a log line shows it: one line, at most C{limit} characters.
    """
    return (" ".join(str(error).split()) or type(error).__name__)[:limit]


async def connect(
    reactor: Any, address: DirectoryAddress, timeout: float, bindDN: str | None, bindPassword: str | None
) -> DirectoryClient:
    """
    A connection to C{address}, TLS set up as it says, and bound as
    C{bindDN} if given.

    @raise BackendUnavailable: if any of it fails.
    """
    endpoint: Any = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.implicitTLS:
        assert address.tlsOptions is not None
        endpoint = wrapClientTLS(address.tlsOptions, endpoint)
    try:
        client = await connectProtocol(endpoint, DirectoryClient(reactor))
    except (defer.CancelledError, ConnectingCancelledError):
        # Given up by the caller: no reason to try another directory.
        raise defer.CancelledError() from None
    except Exception as error:
        raise BackendUnavailable(f"{address.url}: cannot connect: {_errorText(error)}") from None
    try:
        if address.startTLS:
            try:
                await client.startTLSNow(address.tlsOptions)
            except ldaperrors.LDAPException as error:
                raise BackendUnavailable(f"{address.url}: StartTLS refused: {_errorText(error, 200)}") from None
        if bindDN is not None:
            answer = await client.request(pureldap.LDAPBindRequest(dn=bindDN, auth=(bindPassword or "").encode()))
            if answer.resultCode != SUCCESS:
                raise BackendUnavailable(f"{address.url}: the search account cannot bind: {resultText(answer)}")
    except BackendUnavailable as error:
        client.fail(str(error))
        if not str(error).startswith(address.url):
            raise BackendUnavailable(f"{address.url}: {error}") from None
        raise
    except BaseException:
        client.fail("given up")
        raise
    return client


def resultText(answer: Any) -> str:
    """
    An LDAP result as a log line shows it: its code's name and the
    directory's message.
    """
    name = ldaperrors.get(answer.resultCode, "").__class__.__name__.removeprefix("LDAP")
    message = answerMessage(answer)
    text = f"{name} ({answer.resultCode})"
    return f"{text}: {message}" if message else text


def answerMessage(answer: Any) -> str:
    """
    The directory's own words in an LDAP result (at most 200 characters).
    """
    message = answer.errorMessage
    return message.decode("utf-8", "replace")[:200] if isinstance(message, bytes) else ""


class DirectoryConnections:
    """
    The connections a backend keeps to its directory (see the module's
    description).  Each connection is opened within the lookup time, or
    given up.
    """

    def __init__(
        self,
        reactor: Any,
        addresses: list[DirectoryAddress],
        timeout: float,
        bindDN: str | None,
        bindPassword: str | None,
        binders: int,
    ) -> None:
        self.reactor = reactor
        self.addresses = addresses
        self.timeout = timeout
        self.bindDN = bindDN
        self.bindPassword = bindPassword
        self.maxBinders = binders
        self._searcher: DirectoryClient | None = None
        self._openingSearcher = False
        self._searchWaiters: deque[Deferred[DirectoryClient]] = deque()
        self._idleBinders: deque[DirectoryClient] = deque()
        # Bind connections open or being opened, and of those being opened.
        self._binders = 0
        self._openingBinders = 0
        self._bindWaiters: deque[Deferred[DirectoryClient]] = deque()
        self._connections: set[DirectoryClient] = set()
        self._preferred = 0
        self._closed = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DirectoryConnections) and self._settings() == other._settings()

    def __hash__(self) -> int:
        return hash(self._settings())

    def _settings(self) -> tuple[Any, ...]:
        return (tuple(self.addresses), self.timeout, self.bindDN, self.bindPassword, self.maxBinders)

    def _open(self, bindDN: str | None, bindPassword: str | None) -> Deferred[DirectoryClient]:
        opening = Deferred.fromCoroutine(self._connect(bindDN, bindPassword))
        opening.addTimeout(self.timeout, self.reactor)
        return opening.addErrback(self._notOpened)

    def _notOpened(self, failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            return Failure(BackendUnavailable(f"{self.addresses[0].url}: not connected in {self.timeout:g} s"))
        return failure

    async def _connect(self, bindDN: str | None, bindPassword: str | None) -> DirectoryClient:
        if self._closed:
            raise BackendUnavailable(REPLACED)
        errors = []
        # Each directory gets its share of the lookup time (connection, TLS,
        # bind), so that one that never answers leaves time for the next;
        # the next connection starts with the directory that answered last.
        count = len(self.addresses)
        share = self.timeout / count
        start = self._preferred
        for step in range(count):
            index = (start + step) % count
            address = self.addresses[index]
            attempt = Deferred.fromCoroutine(connect(self.reactor, address, share, bindDN, bindPassword))
            attempt.addTimeout(share, self.reactor)
            try:
                client = await attempt
            except (BackendUnavailable, defer.TimeoutError) as error:
                errors.append(
                    f"{address.url}: no answer in {share:g} s" if isinstance(error, defer.TimeoutError) else str(error)
                )
                self._preferred = (index + 1) % count
                continue
            self._preferred = index
            if self._closed:
                client.fail(REPLACED)
                raise BackendUnavailable(REPLACED)
            self._remember(client)
            return client
        raise BackendUnavailable("; ".join(errors))

    def _remember(self, client: DirectoryClient) -> None:
        self._connections.add(client)
        client.closed.addCallback(lambda _: self._connections.discard(client))

    def searcher(self) -> Deferred[DirectoryClient]:
        """
        The search connection, opened (and bound) if there is none.
        """
        if self._searcher is not None and self._searcher.connected:
            return defer.succeed(self._searcher)
        waiter: Deferred[DirectoryClient] = Deferred(self._searchWaiters.remove)
        self._searchWaiters.append(waiter)
        if not self._openingSearcher:
            self._openingSearcher = True
            self._open(self.bindDN, self.bindPassword).addBoth(self._searcherOpened)
        return waiter

    def _searcherOpened(self, result: DirectoryClient | Failure) -> None:
        self._openingSearcher = False
        if isinstance(result, DirectoryClient):
            self._searcher = result
        waiters, self._searchWaiters = self._searchWaiters, deque()
        for waiter in waiters:
            _fire(waiter, result)

    def searchGivenUp(self, client: DirectoryClient) -> None:
        """
        A search on C{client} was given up (and abandoned): if the directory
        has said nothing on it for the whole lookup time, it hangs, and the
        next search opens another connection; else the others go on.
        """
        if self.reactor.seconds() - client.lastHeard < self.timeout:
            return
        if self._searcher is client:
            self._searcher = None
        client.fail(f"no answer in {self.timeout:g} s")

    def binder(self) -> Deferred[DirectoryClient]:
        """
        A connection for one bind, all the caller's until L{giveBack} or
        L{drop}; waits while every one is in use.
        """
        waiter: Deferred[DirectoryClient] = Deferred(self._bindWaiters.remove)
        self._bindWaiters.append(waiter)
        self._serveBinds()
        return waiter

    def _serveBinds(self) -> None:
        while self._bindWaiters and self._idleBinders:
            client = self._idleBinders.popleft()
            if client.connected:
                self._bindWaiters.popleft().callback(client)
            else:
                self._binders -= 1
        while len(self._bindWaiters) > self._openingBinders and self._binders < self.maxBinders:
            self._binders += 1
            self._openingBinders += 1
            self._open(None, None).addBoth(self._binderOpened)

    def _binderOpened(self, result: DirectoryClient | Failure) -> None:
        self._openingBinders -= 1
        if isinstance(result, DirectoryClient):
            self._idleBinders.append(result)
        else:
            self._binders -= 1
            if self._bindWaiters:
                self._bindWaiters.popleft().errback(result)
        self._serveBinds()

    def giveBack(self, client: DirectoryClient) -> None:
        """
        C{client}'s bind was answered: it may carry another.
        """
        if not client.connected or self._closed:
            self.drop(client, REPLACED if self._closed else "closed")
            return
        self._idleBinders.append(client)
        self._serveBinds()

    def drop(self, client: DirectoryClient, why: str) -> None:
        """
        C{client} is no use any more: its bind was given up, or it failed.
        """
        client.fail(why)
        self._binders -= 1
        self._serveBinds()

    def close(self) -> None:
        """
        Close every connection: at once if idle, else once the lookups
        under way have had their time.  Lookups still waiting for a
        connection fail.
        """
        self._closed = True
        for client in list(self._connections):
            if client.onwire:
                # Answers on their way still reach the lookups waiting for them.
                self.reactor.callLater(self.timeout, client.fail, REPLACED)
            else:
                client.fail(REPLACED)
        for waiters in (self._searchWaiters, self._bindWaiters):
            while waiters:
                waiters.popleft().errback(BackendUnavailable(REPLACED))


REPLACED = "the backend was replaced (reload)"


def _fire(waiter: Deferred[Any], result: Any) -> None:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
