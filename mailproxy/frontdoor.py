# -*- test-case-name: tests.test_frontdoor -*-
"""
The life of a client connection that both front ends share: admission,
deadlines and timeouts, the switch to TLS, login turns and their answers,
closing, and what is undone when the connection is lost.

Before login a connection has a hard deadline from accept
(C{server.login_deadline}) that no traffic resets, besides the inactivity
timeout (C{server.preauth_timeout}): a client trickling a byte a second, or
one that never finishes a TLS handshake, is gone by then.  When either
expires the connection's place is freed at once; one still in its TLS
handshake is aborted (a TLS close would wait for the handshake), any other
gets a goodbye and is aborted if it has not closed within a second.  Every
other close is bounded too (L{CLOSE_GRACE}).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.accounts.model import AccountRefused, BackendUnavailable, LoginCredentials
from mailproxy.addresses import balancerCheck, clientAddressOf
from mailproxy.config import TLSMode
from mailproxy.imap.upstream import UpstreamError, setNoDelay
from mailproxy.inactivity import Inactivity
from mailproxy.interfaces import IProxyUser
from mailproxy.limits import Gate, LoginAttempt, Turn
from mailproxy.logs import loggedName
from mailproxy.session import ProxySession
from mailproxy.sharedlimits import RemoteAttempt
from mailproxy.splice import Splice, closeClient
from mailproxy.writenow import writeNow

if TYPE_CHECKING:
    from mailproxy.imap.server import ServerContext

# How long a closing client may take to read what is left and answer the
# TLS close before the connection is aborted; shorter after a timeout.
CLOSE_GRACE = 10.0
EXPIRY_GRACE = 1.0
# A client needs a handful of commands to log in; this many ends the
# connection, which bounds what a client that never reads its answers piles
# up in memory, and what one connection writes to the log.
MAX_PRELOGIN_COMMANDS = 100

_Decided = TypeVar("_Decided")

# This process's client connections, for draining (mailproxy.worker).
liveConnections: set[FrontDoor] = set()


def whenDecided(value: _Decided | Deferred[_Decided], then: Callable[[_Decided], None]) -> None:
    """
    Call C{then} with C{value}: at once, or when the supervisor's answer
    comes (workers).
    """
    if isinstance(value, Deferred):
        value.addCallback(then).addErrback(
            lambda failure: FrontDoor.log.failure("answer from the supervisor failed", failure)
        )
    else:
        then(value)


@dataclass(frozen=True)
class LoginReplies:
    """
    A front end's answers to a login it refuses (its own status line
    syntax, without the tag or line end).
    """

    authenticationFailed: bytes
    busy: bytes
    tooManySessions: bytes
    unavailable: bytes
    authUnavailable: bytes


@implementer(IHandshakeListener)
class FrontDoor(Protocol, Inactivity):
    """
    A client connection before and around its relayed session; the IMAP and
    POP3 servers fill in the protocol.

    @cvar protocolName: C{"imap"} or C{"pop3"}, for logs and limits.
    @cvar replies: how the protocol refuses logins.
    @cvar closedState: the protocol's closed L{state}.
    """

    log = Logger()
    transport: ITransport
    protocolName = "?"
    replies: LoginReplies
    closedState: ClassVar[enum.Enum]
    state: enum.Enum
    # Client input not acted on yet (lines, literal chunks).
    _queue: deque[Any]
    # How the connection's coming and going is logged.
    _connectionLogLevel = LogLevel.info

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.tlsActive = context.listener.tls is TLSMode.IMPLICIT
        self.tlsHandshaking = self.tlsActive
        self.clientAddress = "?"
        self.user: Any = None
        self.gate: Gate | None = None
        self._loginAttempts = 0
        self.splice: Splice | None = None
        self.metrics = context.metrics
        self.session = ProxySession(
            self.protocolName, context.listener.name, "?", self.tlsActive, context.filtersFor(None)
        )
        self.clock = context.clock
        self._logout: Callable[[], None] | None = None
        self._connecting: Deferred[Any] | None = None
        self._refusal: IDelayedCall | None = None
        self._attempt: LoginAttempt | RemoteAttempt | None = None
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        self._lost = False
        self._preLoginCommands = 0

    # -- what each protocol provides --------------------------------------------

    @property
    def isClosed(self) -> bool:
        return self.state is self.closedState

    def enterClosed(self) -> None:
        """
        Take the closed state: nothing more is read or answered.
        """
        self.state = self.closedState
        self._queue.clear()

    def greet(self) -> None:
        raise NotImplementedError

    def refuseConnection(self, reason: bytes) -> None:
        """
        Tell a client over the connection limits why it is turned away.
        """
        raise NotImplementedError

    def sayGoodbye(self, text: bytes) -> None:
        """
        Tell the client the connection ends, where that cannot be mistaken
        for the answer to a command.
        """
        raise NotImplementedError

    def loginRefused(self, reply: bytes) -> None:
        """
        Answer the login in progress with C{reply} (one of L{replies}) and
        take commands again.
        """
        raise NotImplementedError

    def connectUpstream(self, user: Any, password: bytes, mechanism: str) -> None:
        """
        Begin the session of a user who logged in (see L{awaitUpstream}).
        """
        raise NotImplementedError

    def endSession(self) -> None:
        """
        Stop the relayed session, if any, when the client is gone.
        """

    def octetsExchanged(self) -> tuple[int, int]:
        return 0, 0

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        liveConnections.add(self)
        if self.metrics is not None:
            self.metrics.opened()
        self.clientAddress = clientAddressOf(self.transport)
        if balancerCheck(self.transport):
            # A health check every few seconds per balancer: its coming and
            # going is no news (anything it does beyond that still is).
            self._connectionLogLevel = LogLevel.debug
        setNoDelay(self.transport)
        assert self.context.limits is not None
        self.gate = Gate(self.context.limits, self.clientAddress, self.protocolName)
        admission = self.gate.admit()
        if isinstance(admission, Deferred):
            # The supervisor decides (workers): nothing is read or said
            # until it has.
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            admission.addCallback(self._admitted, paused=True)
        else:
            self._admitted(admission)

    def _admitted(self, refusal: str | None, paused: bool = False) -> None:
        if self._lost:
            return
        if paused:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if refusal is not None:
            self.refuseConnection(refusal.encode("ascii"))
            self.hangUp(grace=EXPIRY_GRACE)
            return
        config = self.context.config
        self._deadline = self.context.clock.callLater(config.loginDeadline, self._deadlineExpired)
        self.setTimeout(config.preAuthTimeout)
        self.session.clientAddress = self.clientAddress
        self.session.notify("connected")
        self.log.emit(
            self._connectionLogLevel,
            "{client} connected to {protocol} listener {listener} (tls={tls})",
            client=self.clientAddress,
            protocol=self.protocolName.upper(),
            listener=self.context.listener.name,
            tls=self.tlsActive,
        )
        self.greet()

    def handshakeCompleted(self) -> None:
        self.tlsHandshaking = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        liveConnections.discard(self)
        self._lost = True
        self._stopTimers()
        for timer in (self._abort, self._refusal):
            if timer is not None and timer.active():
                timer.cancel()
        self.enterClosed()
        if self.metrics is not None:
            self.metrics.closed()
        if self.gate is not None:
            self.gate.release()
        if self._attempt is not None:
            self._attempt.abandon()
        if self._connecting is not None:
            # Stop logging a departed client in upstream.
            self._connecting.cancel()
        if self.splice is not None:
            self.splice.undo()
        self.endSession()
        self._dropLogout()
        octetsIn, octetsOut = self.octetsExchanged()
        self.session.notify(
            "closed", bytesIn=octetsIn, bytesOut=octetsOut, duration=time.monotonic() - self.session.started
        )
        self.log.emit(self._connectionLogLevel, "{client} disconnected", client=self.clientAddress)

    def writeReply(self, data: bytes, *, now: bool = False) -> None:
        """
        Write a reply of the proxy's own to the client: buffered, or sent
        at once if C{now} (the greeting: nothing can be queued before it).
        """
        if now:
            writeNow(self.transport, data)
        else:
            # Buffered, not writeNow: sent one by one, the replies to a flood
            # of pipelined commands were partly lost to the reset that
            # closing with the flood unread sends (test_prelogin_attacks,
            # bounded_log).
            self.transport.write(data)

    def hangUp(self, goodbye: bytes | None = None, grace: float = CLOSE_GRACE) -> None:
        """
        Say C{goodbye} (where the protocol may), read and answer nothing
        more, and close the client connection after what is buffered for
        it; abort it if it is still open C{grace} seconds later (a TLS close
        waits for the peer's answer, or for a handshake that may never
        come).
        """
        if goodbye is not None:
            self.sayGoodbye(goodbye)
        self.enterClosed()
        # Nothing more is said once closing: no goodbye after a LOGOUT.
        self._stopTimers()
        closeClient(self.transport, self.splice)
        if self._abort is None and not self._lost:
            self._abort = self.context.clock.callLater(grace, self._abortNow)

    def _abortNow(self) -> None:
        self._abort = None
        if not self._lost:
            self.log.info("{client} did not close in time; aborting the connection", client=self.clientAddress)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- deadlines and timeouts ---------------------------------------------

    def timeoutConnection(self) -> None:
        if self._deadline is not None:
            self._expire("idle too long before login", b"Autologout; idle for too long")
            return
        self.log.info("{client} idle too long; disconnecting", client=self.clientAddress)
        self.hangUp(b"Autologout; idle for too long")

    def _stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _stopTimers(self) -> None:
        """
        No login deadline or inactivity timeout any more.
        """
        self._stopDeadline()
        self.setTimeout(None)

    def _deadlineExpired(self) -> None:
        self._deadline = None
        self._expire(
            f"not logged in within {self.context.config.loginDeadline:g} s", b"Autologout; login took too long"
        )

    def _expire(self, why: str, goodbye: bytes) -> None:
        """
        End a connection that did not log in in time: its place is free at
        once, and nothing waits for the peer.
        """
        self.log.info("{client} {why}; disconnecting", client=self.clientAddress, why=why)
        if self.metrics is not None:
            self.metrics.login("expired")
        if self.gate is not None:
            self.gate.release()
        if self.tlsHandshaking:
            self._stopTimers()
            self.enterClosed()
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.hangUp(goodbye, EXPIRY_GRACE)

    def countPreLoginCommand(self) -> bool:
        """
        Count a command before login; C{False} (and the connection closing)
        past L{MAX_PRELOGIN_COMMANDS}.
        """
        self._preLoginCommands += 1
        if self._preLoginCommands <= MAX_PRELOGIN_COMMANDS:
            return True
        self.log.warn(
            "{client} sent more than {limit} commands without logging in; disconnecting",
            client=self.clientAddress,
            limit=MAX_PRELOGIN_COMMANDS,
        )
        self.hangUp(b"Too many commands before login")
        return False

    # -- TLS ------------------------------------------------------------------

    def upgradeToTLS(self, pipelined: bool) -> bool:
        """
        Switch to TLS after STARTTLS/STLS was answered; C{False} (and the
        connection closed) if the client sent anything after the command.
        """
        if pipelined:
            # STARTTLS command injection (CVE-2011-0411 class): whatever
            # came with the command in plaintext must never run as if it
            # had been sent over TLS.
            self.log.warn("{client} pipelined data after STARTTLS; disconnecting", client=self.clientAddress)
            self.hangUp()
            return False
        self.transport.startTLS(self.context.tlsOptions)  # type: ignore[attr-defined]
        self.tlsActive = self.tlsHandshaking = True
        self.session.tls = True
        if self.metrics is not None:
            self.metrics.upgraded()
        return True

    # -- login ----------------------------------------------------------------

    def beginLogin(self, username: bytes, password: bytes, mechanism: str) -> None:
        """
        Log a user in when the login's turn comes (the caller has paused
        input and taken its logging-in state).
        """
        assert self.gate is not None
        name = username.decode("utf-8", "replace")
        self._loginAttempts += 1
        attempt = self._attempt = self.gate.beginLogin(name, password, self.tlsActive, self._loginAttempts)
        attempt.turn.addCallback(self._loginTurn, attempt, username, name, password, mechanism)

    def _loginTurn(
        self,
        turn: Turn,
        attempt: LoginAttempt | RemoteAttempt,
        username: bytes,
        name: str,
        password: bytes,
        mechanism: str,
    ) -> None:
        if self.isClosed:
            attempt.withdraw()
            return
        if turn is Turn.BUSY:
            self._countLogin("busy")
            self._refuseLater(self.replies.busy, attempt.delay)
            return
        if turn is Turn.LOCKED_OUT:
            # Not even checked: a locked-out guesser learns nothing.
            self._countLogin("locked_out")
            self._refuseLater(self.replies.authenticationFailed, attempt.delay)
            return
        loggingIn: Deferred[Any]
        if isinstance(attempt, RemoteAttempt):
            # The supervisor checked the password with the turn.
            realm: Any = self.context.portal.realm
            loggingIn = attempt.verdict().addCallback(realm.requestAvatar, None, IProxyUser)
        else:
            assert self.gate is not None
            credentials = LoginCredentials(
                username, password, self.protocolName, self.gate.ip, self.tlsActive, self._loginAttempts
            )
            loggingIn = self.context.portal.login(credentials, None, IProxyUser)
        loggingIn.addCallbacks(
            lambda result: self._authenticated(attempt, name, password, mechanism, result),
            lambda failure: self._loginFailed(attempt, name, mechanism, failure),
        )

    def _authenticated(
        self,
        attempt: LoginAttempt | RemoteAttempt,
        name: str,
        password: bytes,
        mechanism: str,
        result: tuple[Any, Any, Any],
    ) -> None:
        _, user, logout = result
        attempt.succeeded()
        self.user = user
        if self.isClosed:
            logout()
            return
        self._logout = logout
        assert self.gate is not None
        # Counted by the account's name, which a backend may spell otherwise than the client typed it.
        whenDecided(
            self.gate.startSession(user.username), lambda started: self._sessionDecided(started, password, mechanism)
        )

    def _sessionDecided(self, started: bool, password: bytes, mechanism: str) -> None:
        if self.isClosed:
            self._giveBackSession()
            return
        if not started:
            self._countLogin("too_many_sessions")
            self._giveBackSession()
            self._refuseLater(self.replies.tooManySessions, 0)
            return
        self.connectUpstream(self.user, password, mechanism)

    def _loginFailed(self, attempt: LoginAttempt | RemoteAttempt, name: str, mechanism: str, failure: Failure) -> None:
        if failure.check(BackendUnavailable):
            # No verdict on the password: nothing counted, try again later
            # (a session the supervisor counted with the check given back).
            if isinstance(attempt, RemoteAttempt):
                attempt.giveBackSession()
            self._countLogin("backend_unavailable")
            if not self.isClosed:
                self.log.warn(
                    "{client} login of {user} not checked: {error}",
                    client=self.clientAddress,
                    user=loggedName(name),
                    error=str(failure.value),
                )
            whenDecided(attempt.unavailable(), lambda delay: self._refuseLater(self.replies.authUnavailable, delay))
            return
        wait = failure.value.wait if failure.check(AccountRefused) else 0.0
        whenDecided(attempt.failed(), lambda delay: self._refuseFailedLogin(name, mechanism, failure, max(delay, wait)))

    def _refuseFailedLogin(self, name: str, mechanism: str, failure: Failure, delay: float) -> None:
        self._countLogin("failed")
        if self.isClosed:
            return
        shown = loggedName(name)
        self.session.notify("login", ok=False, user=shown, mechanism=mechanism)
        if failure.check(UnauthorizedLogin) is None:
            self.log.failure("login of {user} failed unexpectedly", failure, user=shown)
        self.log.info(
            "{client} authentication failed for {user} (mechanism={mechanism})",
            client=self.clientAddress,
            user=shown,
            mechanism=mechanism,
        )
        self._refuseLater(self.replies.authenticationFailed, delay)

    def refuseService(self, why: str, reply: bytes) -> None:
        """
        Refuse a user the configuration sends nowhere this protocol can go.
        """
        self.log.error(
            "{client} user {user}: upstream {upstream} speaks {protocol}; {why}",
            client=self.clientAddress,
            user=self.user.username,
            upstream=self.user.upstream.name,
            protocol=self.user.upstream.protocol,
            why=why,
        )
        self._countLogin("upstream_error")
        self._giveBackSession()
        self._refuseLater(reply, 0)

    def awaitUpstream(self, connecting: Deferred[Any], start: Callable[[Any], None], mechanism: str) -> None:
        """
        Call C{start} with the upstream session C{connecting} gives, or
        refuse the login if it fails.
        """
        self._connecting = connecting
        connecting.addBoth(self._connected)
        connecting.addCallbacks(start, lambda failure: self._upstreamFailed(mechanism, failure))

    def _connected(self, result: Any) -> Any:
        self._connecting = None
        return result

    def _upstreamFailed(self, mechanism: str, failure: Failure) -> None:
        self._giveBackSession()
        if self.isClosed or failure.check(CancelledError):
            return
        user = self.user
        error = failure.value
        if not isinstance(error, UpstreamError):
            self.log.failure("upstream session for {user} failed unexpectedly", failure, user=user.username)
            error = UpstreamError(str(error))
        # With a passthrough password the upstream refusing it is a wrong
        # password too.  An OAuth 2.0 grant refused is not the client's
        # wrong password (that was checked here): refused, but not counted
        # towards a lockout.
        refused = error.authenticationFailed and user.upstreamPassword is None and user.oauth2 is None
        grantRefused = error.authenticationFailed and user.oauth2 is not None
        if self.metrics is not None:
            self.metrics.login("upstream_refused" if refused or grantRefused else "upstream_error")
            self.metrics.upstreamError(user.upstream.name, error.kind)
        self.log.warn(
            "{client} user {user}: upstream {upstream} unavailable: {error}",
            client=self.clientAddress,
            user=user.username,
            upstream=user.upstream.name,
            error=str(error),
        )
        self.session.notify("login", ok=False, user=user.username, mechanism=mechanism)
        if refused:
            assert self._attempt is not None
            whenDecided(
                self._attempt.failed(), lambda delay: self._refuseLater(self.replies.authenticationFailed, delay)
            )
        elif grantRefused:
            self._refuseLater(self.replies.authenticationFailed, 0)
        else:
            self._refuseLater(self.replies.unavailable, 0)

    def enterSession(self, mode: str, mechanism: str) -> None:
        """
        The user is logged in and the upstream session ready: no deadline
        now, the authenticated timeout instead.
        """
        self._stopDeadline()
        self._countLogin("ok")
        self.log.info(
            "{client} logged in as {user}, {mode} {upstream} (mechanism={mechanism})",
            client=self.clientAddress,
            user=self.user.username,
            mode=mode,
            upstream=self.user.upstream.name,
            mechanism=mechanism,
        )
        self.setTimeout(self.context.config.authenticatedTimeout)
        self.session.user = self.user.username
        self.session.upstream = self.user.upstream.name
        self.session.chain = self.context.filtersFor(self.user.username, getattr(self.user, "filters", None))
        self.session.notify("login", ok=True, mechanism=mechanism)

    def _refuseLater(self, reply: bytes, delay: float) -> None:
        def refuse() -> None:
            self._refusal = None
            if not self.isClosed:
                self.loginRefused(reply)

        if not self.isClosed:
            self._refusal = self.context.clock.callLater(delay, refuse)

    def _giveBackSession(self) -> None:
        """
        A login that will not become a session: log the avatar out and
        give back the session it counted (if any).
        """
        self._dropLogout()
        assert self.gate is not None
        self.gate.endSession()

    def _dropLogout(self) -> None:
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()

    def _countLogin(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.login(result)
