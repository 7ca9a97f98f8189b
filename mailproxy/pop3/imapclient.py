# -*- test-case-name: tests.test_pop3_bridge -*-
"""
A small IMAP command client over a logged-in upstream connection, for the
POP3-to-IMAP bridge.

Commands go out one at a time.  Untagged responses are collected whole,
except literals the caller asks to have streamed (a 50 MB C{BODY[]}), which
are handed over chunk by chunk as they arrive and never buffered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.imap.framer import Event, Line
from mailproxy.imap.upstream import UpstreamError, UpstreamIMAPProtocol, closeUpstream, droppedKind
from mailproxy.watchdog import ResponseWatchdog
from mailproxy.writenow import writeNow

# onLiteral(head, chunk, remaining): head is the response so far (its lines,
# without streamed literal data) up to and including the line announcing
# the literal; remaining is how much of the literal is still to come.
LiteralReceiver = Callable[[bytes, bytes, int], None]
# onUntagged(response): one whole untagged response.
UntaggedReceiver = Callable[[bytes], None]


@dataclass
class IMAPReply:
    """
    The outcome of one command.

    @ivar status: C{b"OK"}, C{b"NO"} or C{b"BAD"} (upper case).
    @ivar text: the rest of the tagged line, CRLF stripped (with any
        response code, e.g. C{b"[TRYCREATE] No such mailbox"}).
    @ivar untagged: the untagged responses received while the command ran,
        each whole (lines and buffered literals, CRLFs included); streamed
        literal data and responses given to C{onUntagged} are left out.
    """

    status: bytes
    text: bytes
    untagged: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """
        C{True} if the status is OK.
        """
        return self.status == b"OK"


@dataclass
class _Command:
    line: bytes
    onLiteral: LiteralReceiver | None
    onUntagged: UntaggedReceiver | None
    done: Deferred[IMAPReply]
    tag: bytes = b""
    untagged: list[bytes] = field(default_factory=list)


class IMAPCommandClient:
    """
    Send commands over C{protocol} (an upstream already logged in) and
    collect their replies.

    With a C{clock}, a command the upstream leaves unanswered for
    C{responseTimeout} seconds (while its data is read) drops the
    connection, failing it and everything queued; closing waits at most
    C{closeGrace} seconds for a polite TLS close.

    @ivar protocol: the upstream connection.
    """

    log = Logger()

    def __init__(
        self,
        protocol: UpstreamIMAPProtocol,
        clock: IReactorTime | None = None,
        responseTimeout: float = 120.0,
        closeGrace: float = 10.0,
        clientAddress: str = "?",
    ) -> None:
        self.protocol = protocol
        self.clientAddress = clientAddress
        self.clock = clock
        self.closeGrace = closeGrace
        self.watchdog = ResponseWatchdog(clock, responseTimeout, self._timedOut) if clock is not None else None
        self._silent = False
        self._counter = 0
        self._queue: deque[_Command] = deque()
        self._current: _Command | None = None
        self._parts: list[bytes] = []
        self._head: list[bytes] = []
        self._streaming = False
        self._lost: Failure | None = None if protocol.connected else Failure(UpstreamError("upstream not connected"))
        protocol.startRelay(self._events, self._connectionLost)

    @property
    def connected(self) -> bool:
        """
        C{True} until the upstream connection is lost.
        """
        return self._lost is None

    def command(
        self,
        text: bytes,
        onLiteral: LiteralReceiver | None = None,
        onUntagged: UntaggedReceiver | None = None,
    ) -> Deferred[IMAPReply]:
        """
        Queue the command C{text} (without tag and CRLF).

        @param onLiteral: if given, literals in untagged responses are
            streamed to it as C{(head, chunk, remaining)} instead of being
            buffered; an empty literal gives one call with C{b""}.
        @param onUntagged: if given, untagged responses go to it as they
            complete instead of into L{IMAPReply.untagged}.
        @return: a Deferred firing with the L{IMAPReply} when the tagged
            reply arrives (whatever its status), or failing with
            L{UpstreamError} if the connection is lost first.
        """
        if b"\r" in text or b"\n" in text:
            raise ValueError("an IMAP command line cannot contain CR or LF")
        done: Deferred[IMAPReply] = Deferred()
        if self._lost is not None:
            done.errback(self._lostError())
            return done
        self._queue.append(_Command(text, onLiteral, onUntagged, done))
        if self._current is None:
            self._sendNext()
        return done

    def close(self) -> None:
        """
        Drop the connection now: queued commands are never sent and fail.
        """
        if self.clock is None:
            self.protocol.transport.loseConnection()
        else:
            closeUpstream(self.protocol, self.clock, self.closeGrace)

    def pauseProducing(self) -> None:
        """
        Stop reading from the upstream (the reader is slow); silence does
        not count meanwhile.
        """
        if self.watchdog is not None:
            self.watchdog.pause()
        self.protocol.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.watchdog is not None:
            self.watchdog.resume()
        self.protocol.transport.resumeProducing()  # type: ignore[attr-defined]

    def _timedOut(self) -> None:
        assert self.watchdog is not None
        self.log.warn(
            "{client} IMAP upstream did not answer for {timeout} s; disconnecting",
            client=self.clientAddress,
            timeout=self.watchdog.timeout,
        )
        self._silent = True
        # A hung server may never read what is still queued for it.
        self.protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def _updateWatchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.owed(self._current is not None and self._lost is None)

    def _sendNext(self) -> None:
        if not self._queue or self._lost is not None:
            return
        command = self._queue.popleft()
        self._counter += 1
        command.tag = b"pb%d" % (self._counter,)
        self._current = command
        writeNow(self.protocol.transport, command.tag + b" " + command.line + b"\r\n")
        self._updateWatchdog()

    def _events(self, events: list[Event]) -> None:
        if self.watchdog is not None:
            self.watchdog.heard()
        try:
            self._handleEvents(events)
        finally:
            self._updateWatchdog()

    def _handleEvents(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Line):
                self._line(event)
            elif self._streaming:
                current = self._current
                if current is not None and current.onLiteral is not None:
                    current.onLiteral(b"".join(self._head), event.data, event.remaining)
            else:
                self._parts.append(event.data)

    def _line(self, line: Line) -> None:
        if not line.continuation:
            self._parts = []
            self._head = []
        self._streaming = False
        self._parts.append(line.raw)
        self._head.append(line.raw)
        current = self._current
        if line.literal is not None:
            if current is not None and current.onLiteral is not None and self._head[0].startswith(b"* "):
                self._streaming = True
                if line.literal == 0:
                    current.onLiteral(b"".join(self._head), b"", 0)
            return
        response = b"".join(self._parts)
        self._parts = []
        self._head = []
        if current is None:
            return  # unsolicited, between commands: nothing waits for it
        if response.startswith(b"* "):
            if current.onUntagged is not None:
                current.onUntagged(response)
            else:
                current.untagged.append(response)
        elif response.startswith(current.tag + b" "):
            self._current = None
            fields = response.rstrip(b"\r\n").split(b" ", 2)
            status = fields[1].upper() if len(fields) > 1 else b""
            text = fields[2] if len(fields) > 2 else b""
            self._sendNext()
            current.done.callback(IMAPReply(status, text, current.untagged))
        # Continuation requests ("+") and stray tags are ignored: this
        # client never sends synchronising literals.

    def _lostError(self) -> UpstreamError:
        assert self._lost is not None
        if self._silent:
            assert self.watchdog is not None
            return UpstreamError(f"upstream did not answer for {self.watchdog.timeout:g} s", kind="timeout")
        message = f"upstream closed the connection: {self._lost.getErrorMessage()}"
        return UpstreamError(message, kind=droppedKind(self._lost))

    def _connectionLost(self, reason: Failure) -> None:
        self._lost = reason
        if self.watchdog is not None:
            self.watchdog.stop()
        pending = ([self._current] if self._current is not None else []) + list(self._queue)
        self._current = None
        self._queue.clear()
        for command in pending:
            command.done.errback(self._lostError())
