# -*- test-case-name: tests.test_pop3_server -*-
"""
The client-facing POP3 protocol (RFC 1939, CAPA from RFC 2449, STLS from
RFC 2595, AUTH from RFC 5034 with PLAIN and LOGIN, response codes from
RFC 3206).

The proxy runs the AUTHORIZATION state itself and logs the user in through
the portal; the TRANSACTION state then goes either to an upstream POP3
server (RELAY mode, L{mailproxy.pop3.relay}) or to an L{IPOP3Maildrop}
(BRIDGE mode, L{mailproxy.pop3.transaction}), by the protocol of the user's
upstream.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.python.failure import Failure

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.filters import Reject, Rewrite, Verdict
from mailproxy.frontdoor import FrontDoor, LoginReplies
from mailproxy.imap.server import ServerContext
from mailproxy.imap.upstream import UpstreamError, closeUpstream, droppedKind
from mailproxy.pop3.model import POP3Command
from mailproxy.pop3.relay import POP3Relay
from mailproxy.pop3.transaction import MaildropSession
from mailproxy.pop3.upstream import POP3UpstreamSession
from mailproxy.pop3.wire import LineSplitter, LineTooLong
from mailproxy.sasl import MECHANISMS, Challenge, Credentials, SASLError, SASLExchange, Step, exchangeFor
from mailproxy.splice import Splice

# RFC 2449 allows 255 octets per command; be generous, and drop a client
# whose unfinished line grows past the hard limit.
MAX_LINE = 1024
HARD_LINE_LIMIT = 8 * 1024

ConnectRelay = Callable[[UpstreamConfig, str, str, str], "Deferred[POP3UpstreamSession]"]
OpenMaildrop = Callable[[UpstreamConfig, str, str, str], "Deferred[Any]"]

_REFUSED_AFTER_LOGIN = frozenset({b"STLS", b"AUTH", b"USER", b"PASS", b"APOP"})
_PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on unencrypted connections\r\n"


@dataclass
class POP3Backends:
    """
    Where logged-in POP3 sessions go.

    Both take C{(upstream, username, password, clientAddress)}: the user's
    L{UpstreamConfig}, the upstream credentials and the client's
    C{"host:port"}; failures should be L{UpstreamError}s.

    @ivar connectRelay: log in to a POP3 upstream; a Deferred
        L{POP3UpstreamSession} (RELAY mode).
    @ivar openMaildrop: open the user's maildrop on an IMAP upstream; a
        Deferred L{mailproxy.interfaces.IPOP3Maildrop} (BRIDGE mode).
    """

    connectRelay: ConnectRelay
    openMaildrop: OpenMaildrop


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    SASL_RESPONSE = "awaiting SASL response"
    LOGGING_IN = "logging in"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


_REPLIES = LoginReplies(
    authenticationFailed=b"-ERR [AUTH] Authentication failed.",
    busy=b"-ERR [SYS/TEMP] Too many logins in progress from your address or for this user, try again later.",
    tooManySessions=b"-ERR [IN-USE] Too many sessions for this user.",
    unavailable=b"-ERR [SYS/TEMP] Upstream server unavailable, try again later.",
    authUnavailable=b"-ERR [SYS/TEMP] Authentication service unavailable, try again later.",
)


class POP3ServerProtocol(FrontDoor):
    """
    One client connection.
    """

    protocolName = "pop3"
    replies = _REPLIES
    closedState = State.CLOSED

    def __init__(self, context: ServerContext, backends: POP3Backends) -> None:
        super().__init__(context)
        self.backends = backends
        self.state = State.AUTHORIZATION
        self.lines = LineSplitter(MAX_LINE, HARD_LINE_LIMIT)
        self.relay: POP3Relay | None = None
        self.bridge: MaildropSession | None = None
        self.bytesIn = 0
        self.bytesOut = 0
        self._queue: deque[bytes | None] = deque()
        self._processing = False
        self._busy = False
        self._bridgeRunning = False
        self._upstreamCapabilities: list[bytes] = []
        self._firstLine: bytes | None = b""
        self._paused = False
        self._userName: bytes | None = None
        self._exchange: SASLExchange | None = None

    # -- the front door's hooks ---------------------------------------------

    def greet(self) -> None:
        self._send(b"+OK " + self.context.config.greeting.encode("utf-8") + b"\r\n", now=True)

    def refuseConnection(self, reason: bytes) -> None:
        self._send(b"-ERR [SYS/TEMP] " + reason + b", try again later\r\n")

    def sayGoodbye(self, text: bytes) -> None:
        # While a login is in flight any -ERR would read as PASS's answer:
        # close silently then (the pending upstream login is cancelled).
        if self._atBoundary() and self.state is not State.LOGGING_IN:
            self._send(b"-ERR " + text + b"\r\n")

    def endSession(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            closeUpstream(self.relay.upstream, self.context.clock, self.user.upstream.connectTimeout)
        if self.bridge is not None:
            self.bridge.connectionLost()

    def octetsExchanged(self) -> tuple[int, int]:
        return self.bytesIn, self.bytesOut

    def _send(self, data: bytes, *, now: bool = False) -> None:
        if self._firstLine is None and data:
            # The status line of the command in progress, for observers.
            self._firstLine = data.split(b"\r\n", 1)[0]
        self.bytesOut += len(data)
        self.writeReply(data, now=now)
        if self.metrics is not None and self.loggedIn:
            self.metrics.bytesToClient.inc(len(data))

    def _closeConnection(self) -> None:
        self._paused = False
        self.hangUp()

    def _atBoundary(self) -> bool:
        if self.relay is not None:
            # Between responses and with nothing in flight: a notice now
            # cannot be taken for the answer to a pipelined command.
            return self.relay.atBoundary and self.relay.idle
        return not self._busy

    def _pauseInput(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resumeInput(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- what the client may do -----------------------------------------------

    @property
    def authenticationAllowed(self) -> bool:
        return self.tlsActive or self.context.listener.allowPlaintextAuth

    @property
    def loggedIn(self) -> bool:
        return self.relay is not None or self.bridge is not None

    def capabilities(self) -> bytes:
        """
        The CAPA response for the current state.
        """
        names = [b"TOP", b"UIDL"]
        if self.loggedIn and self.relay is not None:
            # What the relayed upstream offers (TOP, UIDL, per-user EXPIRE
            # or LOGIN-DELAY), never its login or TLS mechanisms.
            names = [
                line
                for line in self._upstreamCapabilities
                if line.split(b" ", 1)[0].upper() in (b"TOP", b"UIDL", b"EXPIRE", b"LOGIN-DELAY")
            ]
        if not self.loggedIn and self.authenticationAllowed:
            names += [b"USER", b"SASL " + b" ".join(MECHANISMS)]
        names += [b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if not self.loggedIn and self.context.listener.tls is TLSMode.STARTTLS and not self.tlsActive:
            names.append(b"STLS")
        names.append(b"IMPLEMENTATION mailproxy")
        return b"+OK Capability list follows\r\n" + b"".join(name + b"\r\n" for name in names) + b".\r\n"

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.bytesIn += len(data)
        if self.metrics is not None and self.loggedIn:
            self.metrics.bytesFromClient.inc(len(data))
        if self.state in (State.UPDATE, State.CLOSED):
            return
        try:
            self._queue.extend(self.lines.feed(data))
        except LineTooLong:
            self.log.warn("{client} sent an over-long line; disconnecting", client=self.clientAddress)
            self.sayGoodbye(b"Line too long")
            self._closeConnection()
            return
        self._processQueue()

    def _processQueue(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while (
                self._queue
                and not self._busy
                and self.state in (State.AUTHORIZATION, State.SASL_RESPONSE, State.TRANSACTION)
            ):
                self._dispatch(self._queue.popleft())
        finally:
            self._processing = False

    def _dispatch(self, line: bytes | None) -> None:
        if self.state is not State.TRANSACTION and not self.countPreLoginCommand():
            return
        if self.state is State.SASL_RESPONSE:
            self._saslResponse(line)
            return
        if line is None:
            self._reply(b"-ERR Line too long\r\n")
            return
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        if self.state is State.TRANSACTION:
            self._transaction(keyword, rest.split())
        else:
            handler = _AUTHORIZATION.get(keyword)
            if handler is None:
                self._send(b"-ERR Unknown command or not valid before login\r\n")
            else:
                handler(self, rest)

    def _reply(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.local(data)
        elif self.bridge is not None:
            self.bridge.local(data)
        else:
            self._send(data)

    # -- AUTHORIZATION ---------------------------------------------------------

    def auth_CAPA(self, rest: bytes) -> None:
        self._send(self.capabilities())

    def auth_QUIT(self, rest: bytes) -> None:
        self._send(b"+OK Bye\r\n")
        self._closeConnection()

    def auth_APOP(self, rest: bytes) -> None:
        self._send(b"-ERR APOP is not supported\r\n")

    def auth_STLS(self, rest: bytes) -> None:
        if self.context.listener.tls is not TLSMode.STARTTLS or self.tlsActive:
            self._send(b"-ERR STLS is not available on this connection\r\n")
            return
        self._send(b"+OK Begin TLS negotiation\r\n")
        if self.upgradeToTLS(pipelined=bool(self._queue or self.lines.pending())):
            self._userName = None

    def auth_USER(self, rest: bytes) -> None:
        if not self._authenticationPermitted():
            return
        if not rest:
            self._send(b"-ERR USER expects a user name\r\n")
            return
        self._userName = rest
        self._send(b"+OK Send PASS\r\n")

    def auth_PASS(self, rest: bytes) -> None:
        if not self._authenticationPermitted():
            return
        if self._userName is None:
            self._send(b"-ERR USER first\r\n")
            return
        username, self._userName = self._userName, None
        self._login(username, rest, "USER")

    def auth_AUTH(self, rest: bytes) -> None:
        if not self._authenticationPermitted():
            return
        arguments = rest.split()
        if not arguments:
            # The pre-RFC 5034 way of listing the mechanisms.
            self._send(b"+OK\r\n" + b"".join(mechanism + b"\r\n" for mechanism in MECHANISMS) + b".\r\n")
            return
        if len(arguments) > 2:
            self._send(b"-ERR AUTH expects a mechanism and an optional initial response\r\n")
            return
        exchange = exchangeFor(arguments[0])
        if exchange is None:
            self._send(b"-ERR Unsupported authentication mechanism\r\n")
            return
        self._exchange = exchange
        self._saslStep(exchange.start(arguments[1] if len(arguments) == 2 else None))

    def _saslResponse(self, line: bytes | None) -> None:
        assert self._exchange is not None
        if line is None:
            self._exchange = None
            self.state = State.AUTHORIZATION
            self.log.info("{client} sent an over-long SASL response", client=self.clientAddress)
            self._send(b"-ERR Line too long\r\n")
            return
        self._saslStep(self._exchange.respond(line))

    def _saslStep(self, step: Step) -> None:
        """
        Act on what the SASL exchange in progress says next.
        """
        assert self._exchange is not None
        if isinstance(step, Challenge):
            self.state = State.SASL_RESPONSE
            self._send(b"+ " + step.wire + b"\r\n")
            return
        mechanism, self._exchange = self._exchange.mechanism, None
        self.state = State.AUTHORIZATION
        if isinstance(step, Credentials):
            self._login(step.username, step.password, mechanism)
            return
        self.log.info(
            "{client} AUTH {mechanism} refused: {error}",
            client=self.clientAddress,
            mechanism=mechanism,
            error=step.text,
        )
        code = b"[AUTH] " if step.error is SASLError.OTHER_AUTHORIZATION else b""
        self._send(b"-ERR " + code + step.text.encode("ascii") + b"\r\n")

    def _authenticationPermitted(self) -> bool:
        if self.authenticationAllowed:
            return True
        self.log.info("{client} tried plaintext authentication without TLS", client=self.clientAddress)
        self._send(_PLAINTEXT_REFUSED)
        return False

    # -- login ------------------------------------------------------------------

    def _login(self, username: bytes, password: bytes, mechanism: str) -> None:
        self.state = State.LOGGING_IN
        self._pauseInput()
        self.beginLogin(username, password, mechanism)

    def connectUpstream(self, user: Any, password: bytes, mechanism: str) -> None:
        upstream = user.upstream
        arguments = (upstream, user.upstreamUsername, user.upstreamCredential(password), self.clientAddress)
        if upstream.protocol == "pop3":
            connecting = maybeDeferred(self.backends.connectRelay, *arguments)
            self.awaitUpstream(connecting, lambda session: self._startRelay(mechanism, session), mechanism)
        elif upstream.protocol == "imap":
            connecting = maybeDeferred(self.backends.openMaildrop, *arguments)
            self.awaitUpstream(connecting, lambda maildrop: self._startBridge(mechanism, maildrop), mechanism)
        else:
            self.refuseService("POP3 sessions cannot use it", b"-ERR [SYS/PERM] No POP3 service for this account.")

    def loginRefused(self, reply: bytes) -> None:
        self._send(reply + b"\r\n")
        self.state = State.AUTHORIZATION
        self._resumeInput()
        self._processQueue()

    # -- TRANSACTION -----------------------------------------------------------

    def _startRelay(self, mechanism: str, upstreamSession: POP3UpstreamSession) -> None:
        upstream = upstreamSession.protocol
        if self.state is State.CLOSED:
            closeUpstream(upstream, self.context.clock, self.user.upstream.connectTimeout)
            return
        self._upstreamCapabilities = [line.rstrip(b"\r\n") for line in upstreamSession.capabilities]
        relay = self.relay = POP3Relay(
            upstream,
            self._send,
            self._closeConnection,
            self.resetTimeout,
            clock=self.context.clock,
            responseTimeout=self.user.upstream.responseTimeout,
            clientAddress=self.clientAddress,
        )
        self._enterTransaction(mechanism)
        self.splice = Splice(self.transport, upstream.transport, relay.upstreamProducer)
        upstream.startRelay(relay.fromUpstream, self._relayUpstreamLost)
        self._beginTransaction()

    def _relayUpstreamLost(self, reason: Failure) -> None:
        assert self.relay is not None
        if self.metrics is not None and (self.relay.timedOut or not self.relay.closed):
            kind = "timeout" if self.relay.timedOut else droppedKind(reason)
            self.metrics.upstreamError(self.user.upstream.name, kind)
        self.relay.upstreamLost(reason)

    def _startBridge(self, mechanism: str, maildrop: Any) -> None:
        if self.state is State.CLOSED:
            maildrop.abandon()
            return
        self.bridge = MaildropSession(
            maildrop, self.transport, self._send, self._closeConnection, self.resetTimeout, self._bridgeFailed
        )
        self._enterTransaction(mechanism)
        self._beginTransaction()

    def _bridgeFailed(self, error: UpstreamError) -> None:
        if self.metrics is not None:
            self.metrics.upstreamError(self.user.upstream.name, error.kind)

    def _enterTransaction(self, mechanism: str) -> None:
        self.state = State.TRANSACTION
        self.enterSession("relaying to" if self.relay is not None else "bridging to", mechanism)
        self._send(b"+OK Logged in.\r\n")

    def _beginTransaction(self) -> None:
        if self.state is State.TRANSACTION:
            self._resumeInput()
            self._processQueue()

    def _transaction(self, keyword: bytes, arguments: list[bytes]) -> None:
        if keyword == b"CAPA":
            self._reply(self.capabilities())
            return
        if keyword in _REFUSED_AFTER_LOGIN:
            self._reply(b"-ERR Command not valid in the TRANSACTION state\r\n")
            return
        command = POP3Command.fromWords(keyword, arguments)
        chain = self.session.chain
        if keyword == b"QUIT" or not chain.commandFilters:
            self._run(command)
            return
        verdict = chain.filterCommand(self.session, command)
        if isinstance(verdict, Deferred):
            # Keep commands in order: read no more until the filters decide.
            self._busy = True
            self._pauseInput()
            verdict.addCallback(self._filtered, command, True)
            verdict.addErrback(self._filterBug)
            return
        self._filtered(verdict, command, False)

    def _filtered(self, verdict: Verdict, command: POP3Command, later: bool) -> None:
        if self.state is State.CLOSED:
            return
        if isinstance(verdict, Reject):
            code = f"[{verdict.code}] " if verdict.code else ""
            self._reply(f"-ERR {code}{verdict.text}\r\n".encode("utf-8", "replace"))
            self.session.notify(
                "command", command=command, result="-ERR", relayed=False, bytesIn=0, bytesOut=0, duration=0.0
            )
        else:
            self._run(verdict.message if isinstance(verdict, Rewrite) else command)
        if later and not self._bridgeRunning:
            self._commandDone(None)

    def _filterBug(self, failure: Failure) -> None:
        self.log.failure("POP3 filter chain failed; closing the session", failure)
        self._closeConnection()

    def _run(self, command: POP3Command) -> None:
        """
        Carry out a command in the session's mode, telling observers how it
        ended.
        """
        if self.state is State.CLOSED:
            return
        keyword, arguments = command.name, command.words()
        if keyword == b"QUIT":
            self.state = State.UPDATE
        started = time.monotonic()
        bytesIn = len(keyword) + sum(len(word) + 1 for word in arguments) + 2
        observed = bool(self.session.chain.observers)
        metrics = self.metrics

        def report(status: bytes, bytesOut: int) -> None:
            duration = time.monotonic() - started
            if metrics is not None:
                metrics.commandDone(keyword, duration)
            if not observed:
                return
            result = status.split(b" ", 1)[0].decode("ascii", "replace").upper()
            self.session.notify(
                "command",
                command=command,
                result=result,
                bytesIn=bytesIn,
                bytesOut=bytesOut,
                duration=duration,
            )

        tracked = observed or metrics is not None
        if self.relay is not None:
            self.relay.command(keyword, arguments, report if tracked else None)
            return
        assert self.bridge is not None
        startedAt = self.bytesOut
        self._firstLine = None
        running = self.bridge.command(keyword, arguments)

        def finished(result: object) -> object:
            self._bridgeRunning = False
            if tracked:
                report(self._firstLine or b"", self.bytesOut - startedAt)
            return result

        if running is None:
            finished(None)
            return
        self._busy = True
        self._bridgeRunning = True
        running.addBoth(finished)
        running.addBoth(self._commandDone)
        if self._busy:
            # Strictly one command at a time: read no more until it is done.
            self._pauseInput()

    def _commandDone(self, result: None) -> None:
        self._busy = False
        if self.state is State.TRANSACTION:
            self._resumeInput()
            self._processQueue()


_AUTHORIZATION: dict[bytes, Callable[[POP3ServerProtocol, bytes], None]] = {
    b"CAPA": POP3ServerProtocol.auth_CAPA,
    b"QUIT": POP3ServerProtocol.auth_QUIT,
    b"APOP": POP3ServerProtocol.auth_APOP,
    b"STLS": POP3ServerProtocol.auth_STLS,
    b"USER": POP3ServerProtocol.auth_USER,
    b"PASS": POP3ServerProtocol.auth_PASS,
    b"AUTH": POP3ServerProtocol.auth_AUTH,
}


class POP3ServerFactory(ServerFactory):
    """
    Build L{POP3ServerProtocol}s for one listener.
    """

    def __init__(self, context: ServerContext, backends: POP3Backends) -> None:
        self.context = context
        self.backends = backends

    def buildProtocol(self, addr: Any) -> POP3ServerProtocol:
        protocol = POP3ServerProtocol(self.context, self.backends)
        protocol.factory = self
        return protocol
