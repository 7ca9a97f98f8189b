# -*- test-case-name: tests.test_pop3_server -*-
"""
RELAY mode: a logged-in client's TRANSACTION commands go to an upstream
POP3 server and its responses come back unchanged.

The relay keeps a FIFO of the commands in flight (clients may pipeline,
RFC 2449) so it knows which responses are multi-line; those stream through
as they arrive, byte-stuffed as the upstream sent them, up to the
terminating C{.} line.  Replies the proxy makes itself take their turn in
the same FIFO, so they never land inside or ahead of an upstream response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.pop3.upstream import POP3UpstreamProtocol
from mailproxy.pop3.wire import TerminatorScanner
from mailproxy.watchdog import ResponseWatchdog, WatchedProducer
from mailproxy.writenow import writeNow

# The commands relayed; anything else is refused locally, since an unknown
# extension could be multi-line and desynchronise the relay.
RELAYED = frozenset({b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"QUIT", b"TOP", b"UIDL", b"LAST"})

# Status lines are short; a server sending more without a line end is broken.
MAX_STATUS_LINE = 64 * 1024


@dataclass
class _Pending:
    multiLine: bool = False
    reply: bytes | None = None
    quit: bool = False
    onDone: Callable[[bytes, int], None] | None = None
    status: bytes = b""
    bytesOutAtStart: int = 0


class POP3Relay:
    """
    Relay one client's commands to its upstream session.

    @ivar bytesIn: octets of commands sent upstream.
    @ivar bytesOut: octets sent to the client after login.
    @ivar upstreamProducer: the upstream transport as a producer for the
        client transport, pausing the response watchdog along with it.
    """

    log = Logger()

    def __init__(
        self,
        upstream: POP3UpstreamProtocol,
        send: Callable[[bytes], None],
        close: Callable[[], None],
        activity: Callable[[], None],
        *,
        clock: IReactorTime | None = None,
        responseTimeout: float | None = None,
        clientAddress: str = "?",
    ) -> None:
        """
        @param upstream: the logged-in upstream connection.
        @param send: writes to the client.
        @param close: closes the client connection.
        @param activity: called on upstream traffic (resets the idle timeout).
        @param responseTimeout: with C{clock}, how long the upstream may
            leave a command unanswered before the session ends.
        """
        self.upstream = upstream
        self._send = send
        self._close = close
        self._activity = activity
        self._pending: deque[_Pending] = deque()
        self._status = bytearray()
        self._scanner: TerminatorScanner | None = None
        self._quitAnswered = False
        self.closed = False
        self.timedOut = False
        self.bytesIn = 0
        self.bytesOut = 0
        self.clientAddress = clientAddress
        self._relayedPending = 0
        self.watchdog = (
            ResponseWatchdog(clock, responseTimeout, self._upstreamSilent)
            if clock is not None and responseTimeout is not None
            else None
        )
        self.upstreamProducer = WatchedProducer(upstream.transport, self.watchdog)

    @property
    def atBoundary(self) -> bool:
        """
        C{True} unless an upstream response is partly sent to the client.
        """
        return self._scanner is None and not self._status

    @property
    def idle(self) -> bool:
        """
        C{True} if no command is waiting for its response.
        """
        return not self._pending

    def command(
        self, keyword: bytes, arguments: list[bytes], onDone: Callable[[bytes, int], None] | None = None
    ) -> None:
        """
        Relay a TRANSACTION command (C{keyword} upper case).

        @param onDone: called with the response's status line and the
            octets sent to the client for it, when it is complete.
        """
        if keyword not in RELAYED:
            self.local(b"-ERR Unknown command\r\n")
            return
        multiLine = keyword in (b"RETR", b"TOP") or (keyword in (b"LIST", b"UIDL") and not arguments)
        self._pending.append(
            _Pending(multiLine=multiLine, quit=keyword == b"QUIT", onDone=onDone, bytesOutAtStart=self.bytesOut)
        )
        # Rebuilt from the parsed words, so "LIST " cannot turn into a
        # multi-line reply the relay does not expect.
        line = b" ".join([keyword, *arguments]) + b"\r\n"
        self.bytesIn += len(line)
        writeNow(self.upstream.transport, line)
        self._relayedPending += 1
        self._updateWatchdog()

    def local(self, reply: bytes) -> None:
        """
        Answer a command locally, in its turn among the relayed ones.
        """
        self._pending.append(_Pending(reply=reply))
        self._flushLocal()

    def _flushLocal(self) -> None:
        while self._pending and self._pending[0].reply is not None and self.atBoundary:
            reply = self._pending.popleft().reply
            assert reply is not None
            self._write(reply)

    def _write(self, data: bytes) -> None:
        if data and not self.closed:
            self.bytesOut += len(data)
            self._send(data)

    def fromUpstream(self, data: bytes) -> None:
        """
        Pass on what the upstream sent, response by response.
        """
        self._activity()
        if self.watchdog is not None:
            self.watchdog.heard()
        try:
            self._fromUpstream(data)
        finally:
            self._updateWatchdog()

    def _fromUpstream(self, data: bytes) -> None:
        while data and not self.closed:
            if self._scanner is not None:
                end = self._scanner.feed(data)
                if end == -1:
                    self._write(data)
                    return
                self._write(data[:end])
                data = data[end:]
                self._scanner = None
                self._responseDone()
                continue
            self._status += data
            end = self._status.find(b"\n")
            if end == -1:
                if len(self._status) > MAX_STATUS_LINE:
                    self.log.warn("upstream sent an over-long status line; closing")
                    self._status.clear()
                    self._abort()
                return
            line, data = bytes(self._status[: end + 1]), bytes(self._status[end + 1 :])
            self._status.clear()
            # Local replies queued while this line was arriving go first:
            # they answer earlier commands, and upstream lines never do.
            while self._pending and self._pending[0].reply is not None:
                reply = self._pending.popleft().reply
                assert reply is not None
                self._write(reply)
            if not self._pending:
                # Unsolicited (say, an autologout notice): the client did not
                # ask, and passing it on would shift every later response.
                self.log.info("upstream sent an unsolicited line: {line!r}", line=line[:200])
                continue
            self._write(line)
            self._pending[0].status = line
            if self._pending[0].multiLine and line[:3].upper() == b"+OK":
                self._scanner = TerminatorScanner()
            else:
                self._responseDone()

    def _responseDone(self) -> None:
        done = self._pending.popleft()
        self._relayedPending -= 1
        if done.onDone is not None:
            done.onDone(done.status, self.bytesOut - done.bytesOutAtStart)
        if done.quit:
            self._quitAnswered = True
            self.closed = True
            self._close()
            return
        self._flushLocal()

    def _updateWatchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.owed(self._relayedPending > 0 and not self.closed)

    def stop(self) -> None:
        """
        The client connection ended: relay nothing more.
        """
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.stop()

    def _upstreamSilent(self) -> None:
        if self.closed:
            return
        assert self.watchdog is not None
        self.log.warn(
            "{client} upstream did not answer for {timeout} s; disconnecting",
            client=self.clientAddress,
            timeout=self.watchdog.timeout,
        )
        if self.atBoundary:
            self._write(b"-ERR [SYS/TEMP] Upstream server not responding\r\n")
        self.timedOut = True
        self.closed = True
        # A hung server may never read what is still queued for it.
        self.upstream.transport.abortConnection()  # type: ignore[attr-defined]
        self._close()

    def _abort(self) -> None:
        self.closed = True
        self.upstream.transport.loseConnection()
        self._close()

    def upstreamLost(self, reason: Failure) -> None:
        """
        The upstream connection ended: end the client's too.
        """
        if self.closed:
            return
        self.log.info("upstream closed the session: {reason}", reason=reason.getErrorMessage())
        if self._pending and self.atBoundary:
            self._write(b"-ERR [SYS/TEMP] Upstream server closed the connection\r\n")
        self.closed = True
        self._close()
