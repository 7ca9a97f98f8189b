# -*- test-case-name: tests.test_pop3_upstream -*-
"""
The upstream side of a relayed POP3 session: connect, optionally STLS, learn
the capabilities, log in with the mapped credentials, then hand the raw
response stream to the relay.
"""

from __future__ import annotations

import base64
import functools
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.upstream import HandshakeReads, UpstreamError, connectAndLogIn, upstreamConnected
from mailproxy.oauth.sasl import BadToken, Bearer, challengeStatus
from mailproxy.pop3.wire import unstuff
from mailproxy.stepdeadline import StepDeadline
from mailproxy.tls import upstreamOptions
from mailproxy.writenow import writeNow

# A server has no business sending more than this before login.
_HANDSHAKE_LIMIT = 64 * 1024

# RFC 3206 codes that say the server, not the credentials, is the problem.
_NOT_CREDENTIALS = (b"[SYS/TEMP]", b"[SYS/PERM]", b"[IN-USE]", b"[LOGIN-DELAY]")


class POP3UpstreamProtocol(HandshakeReads, Protocol):
    """
    The connection to the upstream POP3 server.

    Until L{startRelay} it splits what arrives into lines for the login
    handshake; afterwards every read goes to the relay as it is.
    """

    log = Logger()
    transport: ITransport

    def __init__(self) -> None:
        HandshakeReads.__init__(self)
        self.connected = False
        self._buffer = bytearray()
        self._lines: deque[bytes] = deque()
        self._received = 0
        self._onData: Callable[[bytes], None] | None = None
        self._onLost: Callable[[Failure], None] | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected = True
        upstreamConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._onData is not None:
            self._onData(data)
            return
        self._received += len(data)
        if self._received > _HANDSHAKE_LIMIT:
            self.log.warn("upstream sent over {limit} octets before login", limit=_HANDSHAKE_LIMIT)
            self.transport.loseConnection()
            return
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            self._lines.append(bytes(self._buffer[: end + 1]))
            del self._buffer[: end + 1]
        # Deliver only once the whole read is split, so the handshake sees
        # what else came with a response (STLS injection check).
        if self._lines:
            self._deliver(self._lines.popleft)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.connected = False
        self._lostWith(reason)
        if self._onLost is not None:
            self._onLost(reason)
        self.closed.callback(None)

    def readLine(self) -> Deferred[bytes]:
        """
        The next line, with its line end, during the handshake.
        """
        return self._read(self._lines.popleft() if self._lines else None)

    def hasBufferedInput(self) -> bool:
        """
        C{True} if the upstream sent anything not yet consumed.
        """
        return bool(self._lines or self._buffer)

    def startRelay(self, onData: Callable[[bytes], None], onLost: Callable[[Failure], None]) -> None:
        """
        From now on, pass every read to C{onData}, starting with whatever
        arrived after the login reply.
        """
        self._onData = onData
        self._onLost = onLost
        pending = b"".join(self._lines) + bytes(self._buffer)
        self._lines.clear()
        self._buffer.clear()
        if pending:
            onData(pending)
        if self._lostReason is not None:
            onLost(self._lostReason)


class POP3UpstreamSession:
    """
    A logged-in upstream POP3 connection and its CAPA lines.
    """

    def __init__(self, protocol: POP3UpstreamProtocol, capabilities: list[bytes]) -> None:
        self.protocol = protocol
        self.capabilities = capabilities


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", "replace")[:200]


def _isOK(line: bytes) -> bool:
    return line[:3].upper() == b"+OK"


async def connectPOP3Upstream(
    reactor: Any, upstream: UpstreamConfig, username: str, password: str | Bearer, *, clientAddress: str = ""
) -> POP3UpstreamSession:
    """
    Connect to the POP3 server C{upstream}, secure the connection as
    configured and log in.

    @raise UpstreamError: if any step fails; the connection is closed.
    """
    return await connectAndLogIn(
        reactor,
        upstream,
        POP3UpstreamProtocol,
        lambda protocol, deadline: loginHandshake(protocol, upstream, username, password, deadline),
    )


class _Handshake:
    def __init__(self, protocol: POP3UpstreamProtocol, upstream: UpstreamConfig, deadline: StepDeadline) -> None:
        self.protocol = protocol
        self.upstream = upstream
        self.deadline = deadline
        self._timedOut = functools.partial(protocol.silent, upstream)

    async def greeting(self) -> bytes:
        """
        The greeting, within C{connect_timeout} (a step).
        """
        self.deadline.step(self._timedOut)
        return await self.protocol.readLine()

    async def command(self, line: bytes) -> bytes:
        """
        Send C{line}; its reply's first line.  The command and all of its
        reply (the lines L{multiLine} reads too) are one step: a server
        that trickles a long reply a line at a time cannot stretch it.
        """
        self.deadline.step(self._timedOut)
        writeNow(self.protocol.transport, line + b"\r\n")
        return await self.protocol.readLine()

    async def multiLine(self) -> list[bytes]:
        """
        The rest of a multi-line reply, within the step of its command.
        """
        lines: list[bytes] = []
        while True:
            line = (await self.protocol.readLine()).rstrip(b"\r\n")
            if line == b".":
                return unstuff(lines)
            lines.append(line)


async def loginHandshake(
    protocol: POP3UpstreamProtocol,
    upstream: UpstreamConfig,
    username: str,
    password: str | Bearer,
    deadline: StepDeadline,
) -> POP3UpstreamSession:
    """
    Greeting, STLS if configured, CAPA and login on a connected C{protocol}.

    @raise UpstreamError: if any step fails.
    """
    handshake = _Handshake(protocol, upstream, deadline)
    greeting = await handshake.greeting()
    if not _isOK(greeting):
        raise UpstreamError(f"upstream greeting was not +OK: {_text(greeting)}")

    if upstream.tls is TLSMode.STARTTLS:
        reply = await handshake.command(b"STLS")
        if not _isOK(reply):
            raise UpstreamError(f"upstream refused STLS: {_text(reply)}")
        if protocol.hasBufferedInput():
            # Response injection: anything sent before the TLS handshake
            # could have come from a man in the middle.
            raise UpstreamError("upstream sent data after STLS before the TLS handshake")
        protocol.transport.startTLS(upstreamOptions(upstream))  # type: ignore[attr-defined]

    # A bad certificate only shows once data flows: as a closed connection
    # while waiting for the CAPA reply.
    reply = await handshake.command(b"CAPA")
    capabilities = await handshake.multiLine() if _isOK(reply) else []
    mechanisms = _saslMechanisms(capabilities)

    if isinstance(password, Bearer):
        reply = await _bearer(handshake, mechanisms, username, password, upstream)
    else:
        # surrogateescape: a passthrough password that was not UTF-8 goes
        # back out as the very octets the client sent.
        user = username.encode("utf-8", "surrogateescape")
        secret = password.encode("utf-8", "surrogateescape")
        if b"PLAIN" in mechanisms:
            reply = await _plain(handshake, user, secret)
        else:
            reply = await _userPass(handshake, user, secret)
    if not _isOK(reply):
        code = reply[4:].lstrip().upper()
        failed = not code.startswith(_NOT_CREDENTIALS)
        raise UpstreamError(
            f"upstream rejected the login: {_text(reply)}", authenticationFailed=failed, kind="login_refused"
        )
    return POP3UpstreamSession(protocol, capabilities)


def _saslMechanisms(capabilities: list[bytes]) -> set[bytes]:
    for line in capabilities:
        fields = line.upper().split()
        if fields and fields[0] == b"SASL":
            return set(fields[1:])
    return set()


async def _bearer(
    handshake: _Handshake, mechanisms: set[bytes], username: str, bearer: Bearer, upstream: UpstreamConfig
) -> bytes:
    """
    AUTH with an OAuth 2.0 access token (the initial response on the AUTH
    line, RFC 5034); a refused token gets an error challenge, acknowledged
    so that the upstream answers -ERR.
    """
    mechanism = bearer.mechanism.upper().encode("ascii")
    if mechanism not in mechanisms:
        raise UpstreamError(f"upstream does not offer AUTH {mechanism.decode()}", kind="protocol")
    try:
        response = bearer.initialResponse(username, upstream.host, upstream.port)
    except BadToken as error:
        raise UpstreamError(f"cannot log in upstream with a token: {error}") from None
    line = b"AUTH " + mechanism + b" " + response
    if len(line) + 2 <= MAX_POP3_COMMAND:
        reply = await handshake.command(line)
    else:
        # Too long for one POP3 command line (RFC 2449: 255 octets; real
        # tokens are longer): the response answers the server's empty "+".
        reply = await handshake.command(b"AUTH " + mechanism)
        if _isChallenge(reply):
            reply = await handshake.command(response)
    if _isChallenge(reply):
        status = challengeStatus(reply[1:])
        reply = await handshake.command(bearer.errorAcknowledgement)
        if _isChallenge(reply):
            await handshake.command(b"*")
            raise UpstreamError("upstream sent a second challenge to an OAuth 2.0 login")
        reply = reply.rstrip(b"\r\n") + b" (" + status.encode("ascii", "replace") + b")\r\n"
    return reply


# RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_POP3_COMMAND = 255


def _isChallenge(reply: bytes) -> bool:
    """
    A SASL challenge (C{+ data}, or a bare C{+}), not C{+OK}.
    """
    return reply.startswith(b"+ ") or reply.rstrip(b"\r\n") == b"+"


async def _plain(handshake: _Handshake, username: bytes, password: bytes) -> bytes:
    if b"\0" in username or b"\0" in password:
        raise UpstreamError("credentials contain a NUL octet", authenticationFailed=True)
    response = base64.b64encode(b"\0" + username + b"\0" + password)
    # RFC 5034 servers must take the initial response on the AUTH line.
    reply = await handshake.command(b"AUTH PLAIN " + response)
    if _isChallenge(reply):
        # A challenge despite the initial response: cancel rather than guess.
        await handshake.command(b"*")
        raise UpstreamError("upstream sent a challenge to AUTH PLAIN with an initial response")
    return reply


async def _userPass(handshake: _Handshake, username: bytes, password: bytes) -> bytes:
    for value in (username, password):
        if any(octet in value for octet in b"\r\n\0"):
            # A line end in a passthrough password would inject commands.
            raise UpstreamError("credentials contain CR, LF or NUL", authenticationFailed=True)
    reply = await handshake.command(b"USER " + username)
    if not _isOK(reply):
        return reply
    return await handshake.command(b"PASS " + password)
