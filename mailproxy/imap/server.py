# -*- test-case-name: tests.test_imap_server -*-
"""
The client-facing IMAP protocol: the proxy's own pre-authentication dialogue
(greeting, CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN and LOGIN), then a
literal-aware relay to the user's upstream.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.python.failure import Failure

from mailproxy.config import Config, ListenerConfig, TLSMode, UpstreamConfig
from mailproxy.filters.chain import FilterChain
from mailproxy.frontdoor import FrontDoor, LoginReplies
from mailproxy.imap.framer import ClientEvent, FramingError, IMAPFramer, Line, LiteralChunk, OverlongLine
from mailproxy.imap.model import IMAPCommand, ParseError, StreamedLiteral, parseCommand
from mailproxy.imap.relay import Relay
from mailproxy.imap.syntax import SyntaxError_, parseArguments, tagAndCommand, tagOf
from mailproxy.imap.upstream import (
    UpstreamIMAPProtocol,
    UpstreamSession,
    closeUpstream,
    droppedKind,
)
from mailproxy.limits import Limits
from mailproxy.oauth.settings import OAuthLogin
from mailproxy.sasl import MECHANISMS, Challenge, Credentials, SASLError, SASLExchange, Step, exchangeFor
from mailproxy.splice import Splice

if TYPE_CHECKING:
    from mailproxy.metrics import ListenerMetrics

# Before login the proxy holds whole commands (lines and literals) itself;
# checked per command, not in the framer, so that commands pipelined behind
# a LOGIN are framed like the relayed commands they are.
PREAUTH_MAX_COMMAND = 128 * 1024
# An overlong command line is refused with BAD; so many refusals, or one
# line this many times the limit, end the connection.
OVERLONG_STRIKES = 3
OVERLONG_DISCARD_FACTOR = 16

_TAKES_ASTRINGS = frozenset({b"LOGIN", b"AUTHENTICATE"})

# (upstream, upstream user name, password or OAuth 2.0 login, client address)
ConnectUpstream = Callable[[UpstreamConfig, str, "str | OAuthLogin", str], "Deferred[UpstreamSession]"]

# Commands the proxy answers itself after login instead of relaying.


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    SASL_RESPONSE = "awaiting SASL response"
    LOGGING_IN = "logging in"
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass
class ServerContext:
    """
    What every connection on one listener shares.
    """

    config: Config
    listener: ListenerConfig
    portal: Portal
    clock: IReactorTime
    connectUpstream: ConnectUpstream
    tlsOptions: Any = None
    filtersFor: Callable[..., FilterChain] = lambda user, own=None: FilterChain()
    limits: Limits | None = None
    metrics: ListenerMetrics | None = None

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = Limits(self.config.limits, self.clock, self.config.authFailureDelay)


class _PendingCommand:
    def __init__(self) -> None:
        self.segments: list[bytes] = []
        self.literals: list[bytes] = []
        self._literal = bytearray()
        self.size = 0

    def addLine(self, line: Line) -> None:
        self.segments.append(line.raw)
        self.size += len(line.raw)

    def addLiteral(self, chunk: LiteralChunk) -> None:
        self._literal += chunk.data
        self.size += len(chunk.data)
        if not chunk.remaining:
            self.literals.append(bytes(self._literal))
            self._literal = bytearray()


_REPLIES = LoginReplies(
    authenticationFailed=b"NO [AUTHENTICATIONFAILED] Authentication failed.",
    busy=b"NO [UNAVAILABLE] Too many logins in progress from your address or for this user, try again later.",
    tooManySessions=b"NO [LIMIT] Too many sessions for this user.",
    unavailable=b"NO [UNAVAILABLE] Upstream server unavailable, try again later.",
    authUnavailable=b"NO [UNAVAILABLE] Authentication service unavailable, try again later.",
)


class IMAPServerProtocol(FrontDoor):
    """
    One client connection.
    """

    protocolName = "imap"
    replies = _REPLIES
    closedState = State.CLOSED

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context)
        self.state = State.NOT_AUTHENTICATED
        self.framer = self._newFramer()
        self.upstream: UpstreamIMAPProtocol | None = None
        self._queue: deque[ClientEvent] = deque()
        self._overlongStrikes = 0
        self._command: _PendingCommand | None = None
        self._saslTag = b""
        self._exchange: SASLExchange | None = None
        self._loginTag = b""
        self.relay: Relay | None = None
        self._written = 0
        self._lastStatus: dict[bytes, str] = {}

    # -- the front door's hooks ---------------------------------------------

    def greet(self) -> None:
        self._send(
            b"* OK [CAPABILITY " + self.capabilities() + b"] " + self.context.config.greeting.encode() + b"\r\n",
            now=True,
        )

    def refuseConnection(self, reason: bytes) -> None:
        self._send(b"* BYE [UNAVAILABLE] " + reason + b", try again later\r\n")

    def sayGoodbye(self, text: bytes) -> None:
        self._sendAtBoundary(b"* BYE " + text + b"\r\n")

    def endSession(self) -> None:
        if self.relay is not None:
            self.relay.idle.stop()
            if self.relay.watchdog is not None:
                self.relay.watchdog.stop()
        if self.upstream is not None and self.upstream.connected:
            closeUpstream(self.upstream, self.context.clock, self.user.upstream.connectTimeout)

    def octetsExchanged(self) -> tuple[int, int]:
        return (self.relay.bytesIn, self.relay.bytesOut) if self.relay else (0, 0)

    def _send(self, data: bytes, *, now: bool = False) -> None:
        self._written += len(data)
        if self.relay is None:
            # Remember how the proxy answered each tag, for observers.
            for line in data.split(b"\r\n"):
                fields = line.split(b" ", 2)
                if len(fields) > 1 and line[:1] not in (b"*", b"+"):
                    self._lastStatus = {fields[0]: fields[1].decode("ascii", "replace")}
        self.writeReply(data, now=now)

    def disconnect(self) -> None:
        """
        Close the client connection (after what is buffered for it).
        """
        self.hangUp()

    # -- what the client may do ---------------------------------------------

    @property
    def authenticationAllowed(self) -> bool:
        return self.tlsActive or self.context.listener.allowPlaintextAuth

    def capabilities(self) -> bytes:
        names = [b"IMAP4rev1", b"ID", b"SASL-IR"]
        if self.context.listener.tls is TLSMode.STARTTLS and not self.tlsActive:
            names.append(b"STARTTLS")
        if self.authenticationAllowed:
            names += [b"AUTH=" + mechanism for mechanism in MECHANISMS]
        else:
            names.append(b"LOGINDISABLED")
        return b" ".join(names)

    # -- input ----------------------------------------------------------------

    def _newFramer(self) -> IMAPFramer:
        maxLine = self.context.config.limits.maxLineLength
        return IMAPFramer(maxLine, discardUpTo=maxLine * OVERLONG_DISCARD_FACTOR)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.resetTimeout()
        relay = self.relay
        framer = self.framer
        if relay is not None:
            if self.metrics is not None:
                self.metrics.bytesFromClient.inc(len(data))
            if (
                framer.atBoundary
                and data.endswith(b"\n")
                and len(data) <= framer.maxLineLength
                # (find, not "in": bytes.__contains__ first tries its
                # argument as an integer, raising and clearing a TypeError)
                and data.find(b"}\n") < 0
                and data.find(b"}\r\n") < 0
            ):
                # Whole lines that announce no literal: most need no framing.
                relayed = relay.fromClientLines(data)
                if relayed == len(data):
                    return
                data = data[relayed:]
        try:
            events = framer.feedClient(data)
        except FramingError as error:
            self.log.warn("{client} broke IMAP framing: {error}", client=self.clientAddress, error=str(error))
            self._sendAtBoundary(b"* BYE " + _protocolText(str(error)) + b"\r\n")
            self.state = State.CLOSED
            self.disconnect()
            return
        if relay is not None:
            for event in events:
                if self.state is State.CLOSED:
                    break
                relay.fromClient(event)
            return
        self._queue.extend(events)
        self._processQueue()

    def _processQueue(self) -> None:
        while self._queue and self.state in (State.NOT_AUTHENTICATED, State.SASL_RESPONSE):
            event = self._queue.popleft()
            if not isinstance(event, LiteralChunk) and not self.countPreLoginCommand():
                return
            if self.state is State.SASL_RESPONSE:
                self._saslResponse(event)
            else:
                self._preAuthEvent(event)

    def _preAuthEvent(self, event: ClientEvent) -> None:
        if isinstance(event, OverlongLine):
            command, self._command = self._command, None
            self.refuseOverlong(event, tagOf(command.segments[0] if command else event.head))
            return
        if self._command is None:
            if isinstance(event, LiteralChunk) or event.continuation:
                # The rest of a command whose literal was refused, framed
                # before the refusal: the client should not have sent it.
                return
            self._command = _PendingCommand()
        if isinstance(event, LiteralChunk):
            self._command.addLiteral(event)
            return
        self._command.addLine(event)
        if event.literal is not None and event.literal > self.context.config.limits.maxPreauthLiteral:
            self._refuseLiteral(event)
            return
        if self._command.size + (event.literal or 0) > PREAUTH_MAX_COMMAND:
            self.log.warn("{client} sent an oversized command before login", client=self.clientAddress)
            self._queue.clear()
            self.hangUp(b"Command too long")
            return
        if event.literal is not None:
            if not event.nonSynchronizing:
                if not self._mayLogIn(self._command):
                    # Never invite a password in the clear only to refuse it.
                    self._command = None
                    self.framer.cancelLiteral()
                    return
                self._send(b"+ Ready for literal data\r\n")
            return
        command, self._command = self._command, None
        self._dispatch(command)

    def _mayLogIn(self, command: _PendingCommand) -> bool:
        """
        C{False} (and the command refused) for a login the session would
        refuse anyway because it is not encrypted.
        """
        parsed = tagAndCommand(command.segments[0])
        if parsed is None or parsed[1] not in _TAKES_ASTRINGS:
            return True
        return self._authenticationPermitted(parsed[0])

    def refuseOverlong(self, event: OverlongLine, tag: bytes) -> None:
        """
        Answer a command line over the limit with BAD; repeated abuse, or
        an overlong line in the middle of a command already relayed, ends
        the connection.
        """
        limit = self.context.config.limits.maxLineLength
        self._overlongStrikes += 1
        self.log.warn(
            "{client} sent a command line of {size} octets (limit {limit})",
            client=self.clientAddress,
            size=event.size,
            limit=limit,
        )
        self._sendAtBoundary(tag + b" BAD [TOOBIG] Command line too long (limit %d octets)\r\n" % limit)
        if self._overlongStrikes >= OVERLONG_STRIKES or (event.continuation and self.relay is not None):
            self.closeAtBoundary(b"Too many oversized commands" if not event.continuation else b"Command broken off")

    def _refuseLiteral(self, line: Line) -> None:
        """
        Refuse a literal over the pre-login limit: a synchronising one is
        never asked for; a non-synchronising one is on its way, so the
        connection ends.
        """
        assert self._command is not None
        tag, self._command = tagOf(self._command.segments[0]), None
        self._overlongStrikes += 1
        self.log.warn(
            "{client} announced a literal of {size} octets before login (limit {limit})",
            client=self.clientAddress,
            size=line.literal,
            limit=self.context.config.limits.maxPreauthLiteral,
        )
        self._send(tag + b" BAD [TOOBIG] Literal too large before login\r\n")
        if line.nonSynchronizing or self._overlongStrikes >= OVERLONG_STRIKES:
            self._queue.clear()
            self.hangUp(b"Too many oversized commands" if not line.nonSynchronizing else b"Literal refused")
            return
        self.framer.cancelLiteral()

    def _dispatch(self, command: _PendingCommand) -> None:
        first = command.segments[0]
        parsed = tagAndCommand(first)
        if parsed is None:
            self._send(b"* BAD Invalid tag or command\r\n")
            return
        tag, name = parsed
        written = self._written
        self._handle(command, tag, name)
        if self.session.chain.observers:
            self._observePreAuth(command, tag, name, self._written - written)

    def _observePreAuth(self, command: _PendingCommand, tag: bytes, name: bytes, bytesOut: int) -> None:
        """
        Tell observers about a command before login; credentials are never
        part of it (LOGIN and AUTHENTICATE come without arguments).
        """
        redacted = name in _TAKES_ASTRINGS
        model = IMAPCommand(tag=tag, name=name)
        if not redacted:
            try:
                model = parseCommand(_wireParts(command))
            except ParseError:
                pass
        # A login's outcome is its own "login" event.
        result = "LOGIN" if redacted else self._lastStatus.get(tag, "")
        self.session.notify(
            "command",
            command=model,
            result=result,
            relayed=False,
            bytesIn=command.size,
            bytesOut=bytesOut,
            duration=0.0,
        )

    def _handle(self, command: _PendingCommand, tag: bytes, name: bytes) -> None:
        handler = getattr(self, "preauth_" + name.decode("ascii").replace("-", "_").replace(".", "_"), None)
        if handler is None:
            self._send(tag + b" BAD Command " + name + b" is not valid before authentication\r\n")
            return
        arguments: list[bytes] = []
        if name in _TAKES_ASTRINGS:
            # Only these need their arguments; ID's parameter list and the
            # like are accepted without being understood.
            segments = [command.segments[0][len(tag) + 1 + len(name) :]] + command.segments[1:]
            try:
                arguments = parseArguments(segments, command.literals)
            except SyntaxError_ as error:
                self._send(tag + b" BAD " + _protocolText(str(error)) + b"\r\n")
                return
        handler(tag, arguments)

    def preauth_CAPABILITY(self, tag: bytes, arguments: list[bytes]) -> None:
        self._send(b"* CAPABILITY " + self.capabilities() + b"\r\n" + tag + b" OK CAPABILITY completed\r\n")

    def preauth_NOOP(self, tag: bytes, arguments: list[bytes]) -> None:
        self._send(tag + b" OK NOOP completed\r\n")

    def preauth_ID(self, tag: bytes, arguments: list[bytes]) -> None:
        self._send(b'* ID ("name" "mailproxy")\r\n' + tag + b" OK ID completed\r\n")

    def preauth_LOGOUT(self, tag: bytes, arguments: list[bytes]) -> None:
        self._send(b"* BYE Logging out\r\n" + tag + b" OK LOGOUT completed\r\n")
        self.state = State.CLOSED
        self.disconnect()

    def preauth_STARTTLS(self, tag: bytes, arguments: list[bytes]) -> None:
        if self.context.listener.tls is not TLSMode.STARTTLS or self.tlsActive:
            self._send(tag + b" BAD STARTTLS is not available on this connection\r\n")
            return
        self._send(tag + b" OK Begin TLS negotiation now\r\n")
        if self.upgradeToTLS(pipelined=bool(self._queue or self.framer.pending())):
            self.framer = self._newFramer()

    def preauth_LOGIN(self, tag: bytes, arguments: list[bytes]) -> None:
        if not self._authenticationPermitted(tag):
            return
        if len(arguments) != 2:
            self._send(tag + b" BAD LOGIN expects a user name and a password\r\n")
            return
        self._login(tag, arguments[0], arguments[1], "LOGIN")

    def preauth_AUTHENTICATE(self, tag: bytes, arguments: list[bytes]) -> None:
        if not self._authenticationPermitted(tag):
            return
        if not arguments or len(arguments) > 2:
            self._send(tag + b" BAD AUTHENTICATE expects a mechanism\r\n")
            return
        exchange = exchangeFor(arguments[0])
        if exchange is None:
            self._send(tag + b" NO [CANNOT] Unsupported authentication mechanism\r\n")
            return
        self._saslTag = tag
        self._exchange = exchange
        self._saslStep(exchange.start(arguments[1] if len(arguments) == 2 else None))

    def _saslResponse(self, event: ClientEvent) -> None:
        if isinstance(event, LiteralChunk | OverlongLine) or event.literal is not None:
            self.log.warn(
                "{client} sent a literal or an over-long line as a SASL response; disconnecting",
                client=self.clientAddress,
            )
            self.hangUp(b"Invalid SASL response")
            return
        assert self._exchange is not None
        self._saslStep(self._exchange.respond(event.raw.rstrip(b"\r\n")))

    def _saslStep(self, step: Step) -> None:
        """
        Act on what the SASL exchange in progress says next.
        """
        assert self._exchange is not None
        tag = self._saslTag
        if isinstance(step, Challenge):
            self.state = State.SASL_RESPONSE
            self._send(b"+ " + step.wire + b"\r\n")
            return
        mechanism, self._exchange = self._exchange.mechanism, None
        self.state = State.NOT_AUTHENTICATED
        if isinstance(step, Credentials):
            self._login(tag, step.username, step.password, mechanism)
            return
        self.log.info(
            "{client} AUTHENTICATE {mechanism} refused: {error}",
            client=self.clientAddress,
            mechanism=mechanism,
            error=step.text,
        )
        if step.error is SASLError.OTHER_AUTHORIZATION:
            self._send(tag + b" NO [AUTHORIZATIONFAILED] " + step.text.encode("ascii") + b"\r\n")
        else:
            self._send(tag + b" BAD " + step.text.encode("ascii") + b"\r\n")

    def _authenticationPermitted(self, tag: bytes) -> bool:
        if self.authenticationAllowed:
            return True
        self.log.info("{client} tried plaintext authentication without TLS", client=self.clientAddress)
        self._send(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n")
        return False

    # -- login ------------------------------------------------------------------

    def _login(self, tag: bytes, username: bytes, password: bytes, mechanism: str) -> None:
        self.state = State.LOGGING_IN
        self._loginTag = tag
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.beginLogin(username, password, mechanism)

    def connectUpstream(self, user: Any, password: bytes, mechanism: str) -> None:
        if user.upstream.protocol != "imap":
            self.refuseService(
                "an IMAP session needs an IMAP upstream", b"NO [UNAVAILABLE] No IMAP service for this account."
            )
            return
        connecting = self.context.connectUpstream(
            user.upstream, user.upstreamUsername, user.upstreamCredential(password), self.clientAddress
        )
        tag = self._loginTag
        self.awaitUpstream(connecting, lambda session: self._startRelay(tag, mechanism, session), mechanism)

    def loginRefused(self, reply: bytes) -> None:
        self._send(self._loginTag + b" " + reply + b"\r\n")
        self.state = State.NOT_AUTHENTICATED
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._processQueue()

    # -- relay --------------------------------------------------------------

    def _startRelay(self, tag: bytes, mechanism: str, upstreamSession: UpstreamSession) -> None:
        upstream = upstreamSession.protocol
        if self.state is State.CLOSED:
            closeUpstream(upstream, self.context.clock, self.user.upstream.connectTimeout)
            return
        self.upstream = upstream
        self.state = State.RELAYING
        self.enterSession("relaying to", mechanism)
        relay = self.relay = Relay(
            self,
            upstream,
            self.session.chain,
            self.session,
            upstreamSession.capabilities,
            responseTimeout=self.user.upstream.responseTimeout,
        )
        self.splice = Splice(self.transport, upstream.transport, relay.upstreamProducer)
        # The login reply goes through the relay like an upstream response,
        # so capability filters see it too.
        capabilities = b" ".join(upstreamSession.capabilities)
        relay.fromUpstream(Line(tag + b" OK [CAPABILITY " + capabilities + b"] Logged in\r\n", False))
        upstream.startRelay(
            relay.fromUpstreamBatch, self._upstreamLost, relay.fromUpstreamBatch, relay.fromUpstreamRead
        )
        queued, self._queue = self._queue, deque()
        for event in queued:
            relay.fromClient(event)
        if self.state is State.RELAYING:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _sendAtBoundary(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.sendLocal(data)
        else:
            self._send(data)

    def closeAtBoundary(self, bye: bytes) -> None:
        self._queue.clear()
        self.state = State.CLOSED
        if self.relay is not None:
            self.relay.closeAtBoundary(b"* BYE " + bye + b"\r\n")
        else:
            self.hangUp(bye)

    def upstreamTimedOut(self) -> None:
        """
        The upstream left a command unanswered for its C{response_timeout}:
        BYE (unless a response is half relayed) and disconnect both sides.
        """
        assert self.relay is not None and self.upstream is not None
        # A hung server may never read what is still queued for it.
        self.upstream.transport.abortConnection()  # type: ignore[attr-defined]
        if self.state is State.CLOSED:
            # Closing was waiting for the end of a response that will not come.
            self.disconnect()
            return
        upstream = self.user.upstream
        self.log.warn(
            "{client} upstream {upstream} did not answer for {timeout} s; disconnecting",
            client=self.clientAddress,
            upstream=upstream.name,
            timeout=upstream.responseTimeout,
        )
        if self.metrics is not None:
            self.metrics.upstreamError(upstream.name, "timeout")
        if not self.relay.midResponse:
            self._send(b"* BYE [UNAVAILABLE] Upstream server not responding\r\n")
        self.disconnect()

    def _upstreamLost(self, reason: Failure) -> None:
        if self.state is State.CLOSED:
            # Closing may be waiting for the end of a response that will
            # not come now.
            self.disconnect()
            return
        assert self.relay is not None
        if not self.relay.upstreamSaidBye:
            # (After a BYE, a LOGOUT's say, the close is the session's
            # normal end: the "disconnected" line says enough.)
            self.log.info(
                "{client} upstream closed the session: {reason}",
                client=self.clientAddress,
                reason=reason.getErrorMessage(),
            )
        if self.metrics is not None and not self.relay.upstreamSaidBye:
            self.metrics.upstreamError(self.user.upstream.name, droppedKind(reason))
        if not self.relay.upstreamSaidBye and not self.relay.midResponse:
            self._send(b"* BYE Upstream server closed the connection\r\n")
        self.state = State.CLOSED
        self.disconnect()


def _wireParts(command: _PendingCommand) -> list[bytes | StreamedLiteral]:
    parts: list[bytes | StreamedLiteral] = []
    for index, segment in enumerate(command.segments):
        parts.append(segment)
        if index < len(command.literals):
            parts.append(command.literals[index])
    return parts


def _protocolText(text: str) -> bytes:
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")


class IMAPServerFactory(ServerFactory):
    """
    Build L{IMAPServerProtocol}s for one listener.
    """

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: Any) -> IMAPServerProtocol:
        protocol = IMAPServerProtocol(self.context)
        protocol.factory = self
        return protocol
