# -*- test-case-name: tests.test_imap_upstream -*-
"""
The upstream side of an IMAP session: connect, optionally STARTTLS, log in
with the mapped credentials, then hand every framed response to the relay.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet import error as error_
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.framer import Event, FramingError, IMAPFramer, Line
from mailproxy.imap.syntax import capabilitiesIn, isAtom, quoted
from mailproxy.oauth.sasl import BadToken, Bearer, challengeStatus
from mailproxy.stepdeadline import StepDeadline
from mailproxy.tls import upstreamOptions
from mailproxy.writenow import writeNow

log = Logger()

# Untagged handshake responses are small; a server that sends more before
# login is misbehaving.
_HANDSHAKE_LIMIT = 256 * 1024
# SEARCH, SORT, THREAD or VANISHED replies on a big mailbox are long lines.
RELAY_MAX_RESPONSE_LINE = 16 * 1024 * 1024
# Octets read from the upstream at once while relaying (Twisted reads 64 KiB
# by default): a bulk FETCH then costs a quarter of the reads, each with its
# framing and write.  The same figure bounds what is buffered for the
# upstream before the client is paused.
RELAY_READ_SIZE = 256 * 1024


class UpstreamError(Exception):
    """
    The upstream could not be reached or refused the session.

    @ivar authenticationFailed: the upstream rejected the credentials
        (as opposed to being unreachable or broken).
    @ivar kind: what went wrong, for metrics: C{"connect_failed"},
        C{"timeout"}, C{"tls"}, C{"login_refused"}, C{"closed"} or
        C{"protocol"}.
    """

    def __init__(self, message: str, *, authenticationFailed: bool = False, kind: str | None = None) -> None:
        super().__init__(message)
        self.authenticationFailed = authenticationFailed
        self.kind = kind or ("login_refused" if authenticationFailed else "protocol")


class OAuthRefused(UpstreamError):
    """
    The user has no OAuth 2.0 grant, or the provider refused it: the client
    is refused as for a wrong password (but nothing counts towards a
    lockout: the local password was right).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, authenticationFailed=True, kind="oauth_refused")


class OAuthUnavailable(UpstreamError):
    """
    No access token now: the provider did not answer, or the token store
    cannot be used.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="oauth_unavailable")


def lostKind(reason: Failure) -> str:
    """
    The L{UpstreamError.kind} of a connection that closed: a failed TLS
    handshake (an untrusted chain, or a certificate for another name) or a
    plain close.
    """
    return "tls" if reason.check(SSL.Error, VerificationError) else "closed"


def droppedKind(reason: Failure) -> str:
    """
    The L{UpstreamError.kind} of a connection lost after login: closed
    cleanly (without a BYE) or reset.
    """
    return "closed" if reason.check(ConnectionDone) else "reset"


# A server's response lines can be long (a SEARCH over a mailbox of a
# million messages is some 8 MB); the upstream is trusted this far.
UPSTREAM_MAX_LINE = 32 * 1024 * 1024


class HandshakeReads:
    """
    The reads an upstream protocol offers its login handshake: each waits
    for the next response (or line); once the connection is lost, or the
    handshake gave up on the upstream, each fails.
    """

    def __init__(self) -> None:
        self._waiting: Deferred[bytes] | None = None
        self._failure: UpstreamError | None = None
        self._lostReason: Failure | None = None

    def _read(self, ready: bytes | None) -> Deferred[bytes]:
        """
        C{ready} if something is, else what comes next; the failure once the
        handshake gave up (even if more arrived), or after what came before
        the connection was lost.
        """
        if self._failure is None:
            if ready is not None:
                return defer.succeed(ready)
            if self._lostReason is not None:
                self._failure = _closedError(self._lostReason)
        if self._failure is not None:
            return defer.fail(self._failure)
        self._waiting = Deferred()
        return self._waiting

    def _deliver(self, take: Callable[[], bytes]) -> None:
        """
        Hand what C{take} returns to a read that waits, if one does.
        """
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(take())

    def _fail(self, error: UpstreamError) -> None:
        """
        Fail the waiting read and every later one (after what was read
        already) with C{error}, unless they fail with an earlier error.
        """
        if self._failure is None:
            self._failure = error
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(self._failure)

    def _lostWith(self, reason: Failure) -> None:
        # (The error is made only if a read wants it: most connections are
        # lost long after their handshake.)
        self._lostReason = reason
        if self._waiting is not None:
            self._fail(_closedError(reason))

    def giveUp(self, error: UpstreamError) -> None:
        """
        The handshake gave up on the upstream (it did not answer in time):
        the waiting read and every later one fail with C{error}.
        """
        self._fail(error)

    def silent(self, upstream: UpstreamConfig) -> None:
        """
        A step of the handshake ran out of time: L{giveUp} with the timeout
        C{upstream} did not answer within.
        """
        self.giveUp(UpstreamError(f"upstream {upstream.host}:{upstream.port} did not answer in time", kind="timeout"))


def _closedError(reason: Failure) -> UpstreamError:
    return UpstreamError(f"upstream closed the connection: {reason.getErrorMessage()}", kind=lostKind(reason))


class UpstreamIMAPProtocol(HandshakeReads, Protocol):
    """
    The connection to the upstream server.

    Until L{startRelay} it keeps the framed events of the login handshake,
    grouped into whole responses; afterwards every framed event goes to the
    relay as it arrives.
    """

    log = Logger()
    transport: ITransport

    def __init__(self) -> None:
        HandshakeReads.__init__(self)
        self.framer = IMAPFramer(UPSTREAM_MAX_LINE, responses=True)
        self.framer.maxLiteralSize = _HANDSHAKE_LIMIT
        self.connected = False
        self._responses: deque[list[Event]] = deque()
        self._partial: list[Event] = []
        self._handshakeBytes = 0
        self._onEvents: Callable[[list[Event]], None] | None = None
        self._onWholeRead: Callable[[list[Event], bytes], None] | None = None
        self._onRead: Callable[[bytes], bool] | None = None
        self._onLost: Callable[[Failure], None] | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected = True
        upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            onRead = self._onRead
            if onRead is not None and onRead(data):
                return
            events, whole = self.framer.feedWhole(data)
        except FramingError as error:
            self.log.warn("upstream broke IMAP framing: {error}", error=str(error))
            # Aborted: a polite (TLS) close would wait for the relay's
            # producers, and such a server is owed nothing more.
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        onEvents = self._onEvents
        if onEvents is not None:
            if whole and self._onWholeRead is not None:
                self._onWholeRead(events, data)
            elif events:
                onEvents(events)
            return
        self._handshakeBytes += len(data)
        if self._handshakeBytes > _HANDSHAKE_LIMIT:
            # Before login a server has no business sending this much.
            self.log.warn("upstream sent over {limit} octets before login", limit=_HANDSHAKE_LIMIT)
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        for event in events:
            self._partial.append(event)
            if isinstance(event, Line) and event.complete:
                self._responses.append(self._partial)
                self._partial = []
        # Deliver only after the whole read is framed, so the handshake can
        # see what else arrived with a response (STARTTLS injection check).
        if self._responses:
            self._deliver(self._nextResponse)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.connected = False
        self._lostWith(reason)
        if self._onLost is not None:
            self._onLost(reason)
        self.closed.callback(None)

    def readResponse(self) -> Deferred[bytes]:
        """
        The next whole response (line plus any literals), during the handshake.
        """
        return self._read(self._nextResponse() if self._responses else None)

    def _nextResponse(self) -> bytes:
        return _joined(self._responses.popleft())

    def hasBufferedInput(self) -> bool:
        """
        C{True} if the upstream sent anything not yet consumed.
        """
        return bool(self._responses or self._partial or self.framer.pending())

    def startRelay(
        self,
        onEvents: Callable[[list[Event]], None],
        onLost: Callable[[Failure], None],
        onWholeRead: Callable[[list[Event], bytes], None] | None = None,
        onRead: Callable[[bytes], bool] | None = None,
    ) -> None:
        """
        From now on, deliver framed events to C{onEvents} as they arrive, a
        read's worth at a time, starting with whatever arrived with the
        login reply.

        @param onWholeRead: if given, gets the events of a read that they
            are all of (see L{IMAPFramer.feedWhole}) instead, with the read
            itself.
        @param onRead: if given, gets each read first, unframed; if it
            returns C{False}, the read is framed into events as usual (it
            may raise L{FramingError}).
        """
        self.framer.maxLiteralSize = None
        self.framer.maxLineLength = RELAY_MAX_RESPONSE_LINE
        setReadSize(self.transport, RELAY_READ_SIZE)
        self._onEvents = onEvents
        self._onWholeRead = onWholeRead
        self._onRead = onRead
        self._onLost = onLost
        pending = [event for response in self._responses for event in response] + self._partial
        self._responses.clear()
        self._partial = []
        if pending:
            onEvents(pending)


def closeUpstream(protocol: Any, clock: IReactorTime, grace: float) -> None:
    """
    Close an upstream connection politely, and for good after C{grace}
    seconds: a TLS close waits for the peer's close_notify, and a hung
    server would otherwise keep the socket open forever.

    @param protocol: an upstream protocol with C{connected} and a C{closed}
        Deferred that fires when the connection is lost.
    """
    transport = protocol.transport
    if protocol.connected and not transport.disconnecting:
        # Paused by backpressure or not, a TLS upstream must read its
        # close_notify to finish closing (resuming later does nothing).
        transport.resumeProducing()
    transport.loseConnection()
    if not protocol.connected:
        return
    abort = clock.callLater(grace, transport.abortConnection)
    protocol.closed.addBoth(lambda _: abort.cancel() if abort.active() else None)


def _joined(events: list[Event]) -> bytes:
    return b"".join(event.raw if isinstance(event, Line) else event.data for event in events)


def setReadSize(transport: Any, size: int) -> None:
    """
    Read up to C{size} octets at once from a plain TCP transport (under TLS,
    Twisted hands decrypted data over in its own pieces: left alone).
    """
    if isinstance(transport, Connection) and not transport.TLS:
        transport.bufferSize = size


def upstreamConnected(protocol: Protocol) -> None:
    """
    Set up a new upstream connection: no Nagle, keepalive (L{setNoDelay}),
    and a plain TCP transport's reads handed to C{protocol} itself, not
    through the endpoint's wrapper, which forwards each read (one more call
    per relayed response) and nothing else an upstream protocol uses.
    """
    transport: Any = protocol.transport
    setNoDelay(transport)
    if (
        isinstance(transport, Connection)
        and not transport.TLS
        and getattr(transport.protocol, "_wrappedProtocol", None) is protocol
    ):
        transport.protocol = protocol


def setNoDelay(transport: Any) -> None:
    """
    Disable Nagle's algorithm (IMAP is a request-response protocol) and
    enable TCP keepalive (a long IDLE must survive NATs), on the TCP
    transport itself or the one under TLS.
    """
    candidates: list[Any] = [transport, getattr(transport, "transport", None)]
    for candidate in candidates:
        if hasattr(candidate, "setTcpNoDelay"):
            try:
                candidate.setTcpNoDelay(True)
                candidate.setTcpKeepAlive(True)
            except (OSError, AttributeError):
                pass
            return


class UpstreamSession:
    """
    A logged-in upstream connection and what it announced.
    """

    def __init__(self, protocol: UpstreamIMAPProtocol, capabilities: list[bytes]) -> None:
        self.protocol = protocol
        self.capabilities = capabilities


class _Handshake:
    def __init__(self, protocol: UpstreamIMAPProtocol) -> None:
        self.protocol = protocol
        self._counter = 0

    def nextTag(self) -> bytes:
        self._counter += 1
        return b"mp%d" % (self._counter,)

    async def command(self, line: bytes) -> tuple[list[bytes], bytes]:
        """
        Send one command line; return its untagged responses and the tagged one.
        """
        tag = self.nextTag()
        writeNow(self.protocol.transport, tag + b" " + line + b"\r\n")
        return await self.awaitTagged(tag)

    async def awaitContinuation(self, tag: bytes) -> bytes | None:
        """
        Wait for a C{+} (return C{None}) or the tagged reply that refuses
        to continue (return it); untagged data in between is skipped.
        """
        while True:
            response = await self.protocol.readResponse()
            if response.startswith(b"+"):
                return None
            if response.startswith(tag + b" "):
                return response
            if response.upper().startswith(b"* BYE"):
                raise UpstreamError(f"upstream said {_text(response)}")

    async def awaitTagged(self, tag: bytes) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            response = await self.protocol.readResponse()
            if response.startswith(tag + b" "):
                return untagged, response
            if response.upper().startswith(b"* BYE"):
                raise UpstreamError(f"upstream said {_text(response)}")
            untagged.append(response)


def _text(response: bytes) -> str:
    return response.rstrip(b"\r\n").decode("utf-8", "replace")[:200]


def _isOK(tagged: bytes) -> bool:
    fields = tagged.split(None, 2)
    return len(fields) >= 2 and fields[1].upper() == b"OK"


_Connected = TypeVar("_Connected", bound=Protocol)
_Session = TypeVar("_Session")


async def connectUpstream(
    reactor: Any, upstream: UpstreamConfig, username: str, password: str | Bearer, *, clientAddress: str = ""
) -> UpstreamSession:
    """
    Connect to C{upstream}, secure the connection as configured and log in,
    each step within C{upstream.connectTimeout}.

    @raise UpstreamError: if any step fails; the connection is closed.
    """
    return await connectAndLogIn(
        reactor,
        upstream,
        UpstreamIMAPProtocol,
        lambda protocol, deadline: _loginHandshake(protocol, upstream, username, password, clientAddress, deadline),
    )


async def connectAndLogIn(
    reactor: Any,
    upstream: UpstreamConfig,
    protocolClass: type[_Connected],
    logIn: Callable[[_Connected, StepDeadline], Awaitable[_Session]],
) -> _Session:
    """
    Connect to C{upstream} with C{protocolClass} and run C{logIn} on the
    connection, the connection and each step of the login under one
    L{StepDeadline}; IMAP and POP3 upstreams alike.

    @raise UpstreamError: if any step fails; the connection is closed.
    """
    deadline = StepDeadline(reactor, upstream.connectTimeout)
    try:
        protocol = await openConnection(reactor, upstream, protocolClass, deadline)
        try:
            return await logIn(protocol, deadline)
        except BaseException:
            closeUpstream(protocol, reactor, upstream.connectTimeout)
            raise
    finally:
        deadline.stop()


def upstreamEndpoint(reactor: IReactorTCP, upstream: UpstreamConfig) -> Any:
    """
    The endpoint reaching C{upstream}: an address is connected to as it is,
    a name resolved (every address tried, as L{HostnameEndpoint} does).
    Resolving an address would cost each session a trip through the
    resolver's thread.

    An address gets no timer of its own: the caller's L{StepDeadline}
    bounds the connection (cancelling it stops the attempt).  A name's
    endpoint keeps its timeout, which bounds each of its attempts; they
    start after the step does, so the deadline comes first.
    """
    version = _addressVersion(upstream.host)
    if version is None:
        return HostnameEndpoint(reactor, upstream.host.encode("idna"), upstream.port, timeout=upstream.connectTimeout)
    connect = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
    return connect(reactor, upstream.host, upstream.port, timeout=None)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _addressVersion(host: str) -> int | None:
    """
    4 or 6 if C{host} is an IP address, C{None} if it is a name (worked out
    once per upstream host, not on every connection).
    """
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


# One factory per upstream protocol, for every connection (a factory keeps
# no state of its own here).
_factories: dict[type[Protocol], Factory] = {}


def _quietFactory(protocolClass: type[Protocol]) -> Any:
    factory = _factories.get(protocolClass)
    if factory is None:
        factory = _factories[protocolClass] = Factory.forProtocol(protocolClass)
        # "Starting factory" twice per session says nothing to an operator.
        factory.noisy = False
    return factory


async def openConnection(
    reactor: IReactorTCP, upstream: UpstreamConfig, protocolClass: type[Protocol], deadline: StepDeadline
) -> Any:
    """
    Connect to C{upstream} (implicit TLS verified as configured), as the
    first step of C{deadline}; IMAP and POP3 upstreams alike.

    @raise UpstreamError: if the connection cannot be made.
    """
    endpoint = upstreamEndpoint(reactor, upstream)
    if upstream.tls is TLSMode.IMPLICIT:
        endpoint = wrapClientTLS(upstreamOptions(upstream), endpoint)
    connecting = endpoint.connect(_quietFactory(protocolClass))
    deadline.step(connecting.cancel)
    try:
        return await connecting
    except (defer.CancelledError, ConnectingCancelledError, ConnectError, OSError) as error:
        # Cancelled by the deadline, the endpoint reports its own error: a
        # connector's cancellation, or (a name's) a failed lookup.
        if deadline.expired or isinstance(error, defer.CancelledError | ConnectingCancelledError):
            raise UpstreamError(
                f"cannot connect to {upstream.host}:{upstream.port}: no connection within {upstream.connectTimeout:g} s",
                kind="timeout",
            ) from None
        timedOut = isinstance(error, TimeoutError | error_.TimeoutError)
        raise UpstreamError(
            f"cannot connect to {upstream.host}:{upstream.port}: {error}",
            kind="timeout" if timedOut else "connect_failed",
        ) from None


async def _loginHandshake(
    protocol: UpstreamIMAPProtocol,
    upstream: UpstreamConfig,
    username: str,
    password: str | Bearer,
    clientAddress: str,
    deadline: StepDeadline,
) -> UpstreamSession:
    handshake = _Handshake(protocol)

    timedOut = functools.partial(protocol.silent, upstream)

    deadline.step(timedOut)
    greeting = await protocol.readResponse()
    if not greeting.upper().startswith(b"* OK"):
        raise UpstreamError(f"upstream greeting was not OK: {_text(greeting)}")
    capabilities = capabilitiesIn(greeting)

    if upstream.tls is TLSMode.STARTTLS:
        deadline.step(timedOut)
        _, tagged = await handshake.command(b"STARTTLS")
        if not _isOK(tagged):
            raise UpstreamError(f"upstream refused STARTTLS: {_text(tagged)}")
        if protocol.hasBufferedInput():
            # Response injection: anything sent before the TLS handshake
            # could have come from a man in the middle.
            raise UpstreamError("upstream sent data after STARTTLS before the TLS handshake")
        protocol.transport.startTLS(upstreamOptions(upstream))  # type: ignore[attr-defined]
        capabilities = None

    if capabilities is None:
        deadline.step(timedOut)
        untagged, _ = await handshake.command(b"CAPABILITY")
        capabilities = _capabilitiesFrom(untagged)
    upper = {name.upper() for name in capabilities}
    if upstream.forwardClientAddress:
        deadline.step(timedOut)
        await _forwardClientAddress(handshake, upstream, upper, clientAddress)

    # The TLS handshake result only shows once data flows, so a bad
    # certificate surfaces as a closed connection in the command above.
    deadline.step(timedOut)
    if isinstance(password, Bearer):
        tagged = await _bearerLogin(handshake, upper, username, password, upstream)
    else:
        # surrogateescape: a passthrough password that was not UTF-8 goes
        # back out as the very octets the client sent.
        credentials = (username.encode("utf-8", "surrogateescape"), password.encode("utf-8", "surrogateescape"))
        tagged = await _login(handshake, upper, *credentials)
    if not _isOK(tagged):
        raise UpstreamError(f"upstream rejected the login: {_text(tagged)}", authenticationFailed=True)
    loggedIn = capabilitiesIn(tagged)
    if loggedIn is None:
        deadline.step(timedOut)
        untagged, _ = await handshake.command(b"CAPABILITY")
        loggedIn = _capabilitiesFrom(untagged)
    return UpstreamSession(protocol, loggedIn)


def clientIdCommand(clientAddress: str) -> bytes | None:
    """
    The C{ID} command telling the upstream who the client is: Dovecot's
    (and others') C{x-originating-ip}/C{-port} for the client, and
    C{x-connected-ip}/C{-port} for the address it connected to, when known
    (a L{ClientAddress}).

    @param clientAddress: C{host:port}; an IPv6 host has colons of its own.
    @return: C{None} if C{clientAddress} is not an IP address and port.
    """
    fields = _addressFields("originating", clientAddress)
    if fields is None:
        return None
    connected = _addressFields("connected", getattr(clientAddress, "connected", ""))
    if connected is not None:
        fields += connected
    return b"ID (" + b" ".join(quoted(key.encode()) + b" " + quoted(value.encode()) for key, value in fields) + b")"


def _addressFields(kind: str, hostPort: str) -> list[tuple[str, str]] | None:
    host, _, port = hostPort.rpartition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port.isdigit():
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # An IPv4 client on a dual-stack listener: upstreams match trusted
        # networks and log it as IPv4.
        address = address.ipv4_mapped
    return [(f"x-{kind}-ip", str(address)), (f"x-{kind}-port", port)]


async def _forwardClientAddress(
    handshake: _Handshake, upstream: UpstreamConfig, capabilities: set[bytes], clientAddress: str
) -> None:
    """
    Send the client's address before login (best effort: a refusal is
    logged, the login goes ahead).
    """
    command = clientIdCommand(clientAddress)
    if command is None:
        log.warn(
            "upstream {upstream}: client address {client!r} is not forwarded (not an IP address)",
            upstream=upstream.name,
            client=clientAddress,
        )
        return
    if b"ID" not in capabilities:
        log.warn("upstream {upstream} does not offer ID; the client address is not forwarded", upstream=upstream.name)
        return
    _, tagged = await handshake.command(command)
    if not _isOK(tagged):
        log.warn("upstream {upstream} refused the client address: {reply}", upstream=upstream.name, reply=_text(tagged))


def _capabilitiesFrom(untagged: list[bytes]) -> list[bytes]:
    for response in untagged:
        found = capabilitiesIn(response)
        if found is not None:
            return found
    raise UpstreamError("upstream sent no CAPABILITY response")


async def _bearerLogin(
    handshake: _Handshake, capabilities: set[bytes], username: str, bearer: Bearer, upstream: UpstreamConfig
) -> bytes:
    """
    AUTHENTICATE with an OAuth 2.0 access token; the tagged reply.  A token
    the upstream refuses gets an error challenge (base64 JSON) first, which
    is acknowledged so that the upstream ends the exchange with NO.
    """
    mechanism = bearer.mechanism.upper().encode("ascii")
    if b"AUTH=" + mechanism not in capabilities:
        raise UpstreamError(f"upstream does not offer AUTHENTICATE {mechanism.decode()}", kind="protocol")
    try:
        response = bearer.initialResponse(username, upstream.host, upstream.port)
    except BadToken as error:
        raise UpstreamError(f"cannot log in upstream with a token: {error}") from None
    tag = handshake.nextTag()
    transport = handshake.protocol.transport
    sent = b"SASL-IR" in capabilities
    if sent:
        writeNow(transport, tag + b" AUTHENTICATE " + mechanism + b" " + response + b"\r\n")
    else:
        writeNow(transport, tag + b" AUTHENTICATE " + mechanism + b"\r\n")
    # What the upstream's error challenge said, for the log.
    challenge: str | None = None
    while True:
        reply = await handshake.protocol.readResponse()
        if reply.startswith(tag + b" "):
            if challenge is not None and not _isOK(reply):
                reply = reply.rstrip(b"\r\n") + b" (" + challenge.encode("ascii", "replace") + b")\r\n"
            return reply
        if reply.upper().startswith(b"* BYE"):
            raise UpstreamError(f"upstream said {_text(reply)}")
        if not reply.startswith(b"+"):
            # "* OK Waiting for authentication process to respond.." and the like
            continue
        if not sent:
            writeNow(transport, response + b"\r\n")
            sent = True
        elif challenge is None:
            challenge = challengeStatus(reply[1:])
            writeNow(transport, bearer.errorAcknowledgement + b"\r\n")
        else:
            # A second challenge: cancel rather than loop.
            writeNow(transport, b"*\r\n")


async def _login(handshake: _Handshake, capabilities: set[bytes], username: bytes, password: bytes) -> bytes:
    if b"LOGINDISABLED" in capabilities and b"AUTH=PLAIN" not in capabilities:
        raise UpstreamError("upstream disables LOGIN on this connection (configure tls = starttls or implicit)")
    if b"AUTH=PLAIN" in capabilities:
        # PLAIN carries any octets (base64), so names and passwords with
        # quotes or 8-bit characters need no literal round trips.
        response = base64.b64encode(b"\0" + username + b"\0" + password)
        tag = handshake.nextTag()
        if b"SASL-IR" in capabilities:
            writeNow(handshake.protocol.transport, tag + b" AUTHENTICATE PLAIN " + response + b"\r\n")
        else:
            writeNow(handshake.protocol.transport, tag + b" AUTHENTICATE PLAIN\r\n")
            refused = await handshake.awaitContinuation(tag)
            if refused is not None:
                return refused
            writeNow(handshake.protocol.transport, response + b"\r\n")
        _, tagged = await handshake.awaitTagged(tag)
        return tagged
    tag = handshake.nextTag()
    transport = handshake.protocol.transport
    line = tag + b" LOGIN"
    for value in (username, password):
        if isAtom(value):
            line += b" " + value
        elif value.isascii() and not any(byte in b"\r\n\0" for byte in value):
            line += b" " + quoted(value)
        else:
            literalPlus = b"LITERAL+" in capabilities
            writeNow(transport, line + b" {%d%s}\r\n" % (len(value), b"+" if literalPlus else b""))
            if not literalPlus:
                refused = await handshake.awaitContinuation(tag)
                if refused is not None:
                    return refused
            line = value
    writeNow(transport, line + b"\r\n")
    _, tagged = await handshake.awaitTagged(tag)
    return tagged
