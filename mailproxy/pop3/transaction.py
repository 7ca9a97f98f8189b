# -*- test-case-name: tests.test_pop3_server,tests.test_pop3_bridge -*-
"""
BRIDGE mode: the TRANSACTION and UPDATE states (RFC 1939) answered from an
L{IPOP3Maildrop}, typically the POP3-to-IMAP bridge.

Commands run strictly one after the other; the server pauses client input
while one is pending.  Messages are streamed to the client as the maildrop
delivers them, byte-stuffed on the fly, never held whole.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mailproxy.imap.upstream import UpstreamError
from mailproxy.pop3 import MessageExpunged, NoSuchMessage
from mailproxy.pop3.wire import ByteStuffer


class _Refusal(Exception):
    """
    A command's arguments are wrong; the message is the reply text.
    """


class _Broken(Exception):
    """
    A message failed mid-stream; the client connection must close.
    """


def _messageNumber(argument: bytes) -> int:
    if not argument.isdigit() or int(argument) < 1:
        raise _Refusal(b"-ERR Invalid message number")
    return int(argument)


@implementer(IPushProducer)
class _RetrievalProducer:
    """
    Registered with the client transport while a message streams, so that a
    full client buffer reaches the maildrop if it can pause (optional
    C{pauseProducing}/C{resumeProducing} methods on the maildrop).
    """

    def __init__(self, maildrop: Any) -> None:
        self.maildrop = maildrop

    def pauseProducing(self) -> None:
        pause = getattr(self.maildrop, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeProducing(self) -> None:
        resume = getattr(self.maildrop, "resumeProducing", None)
        if resume is not None:
            resume()

    def stopProducing(self) -> None:
        pass


class MaildropSession:
    """
    A logged-in client's TRANSACTION state over one maildrop.
    """

    log = Logger()

    def __init__(
        self,
        maildrop: Any,
        transport: Any,
        send: Callable[[bytes], None],
        close: Callable[[], None],
        activity: Callable[[], None],
        upstreamFailed: Callable[[UpstreamError], None] = lambda error: None,
    ) -> None:
        """
        @param maildrop: an L{IPOP3Maildrop}.
        @param transport: the client transport (for producer registration).
        @param send: writes to the client.
        @param close: closes the client connection.
        @param activity: called as message data flows (idle timeout).
        @param upstreamFailed: told once about the first upstream failure
            (for metrics).
        """
        self.maildrop = maildrop
        self.transport = transport
        self._send = send
        self._close = close
        self._activity = activity
        self._upstreamFailed: Callable[[UpstreamError], None] | None = upstreamFailed
        self._pending: Deferred[None] | None = None
        self._ended = False
        self._quitting = False
        self._abandoned = False

    @property
    def atBoundary(self) -> bool:
        """
        C{True} unless a reply is in progress.
        """
        return self._pending is None

    def _write(self, data: bytes) -> None:
        if not self._ended:
            self._send(data)

    def local(self, reply: bytes) -> None:
        """
        Send a reply the server made itself.
        """
        self._write(reply)

    def command(self, keyword: bytes, arguments: list[bytes]) -> Deferred[None] | None:
        """
        Run one command (C{keyword} upper case).

        @return: C{None} if it is done, or a Deferred (never failing) that
            fires when it is.
        """
        handler = _HANDLERS.get(keyword)
        if handler is None:
            self._write(b"-ERR Unknown command\r\n")
            return None
        running = Deferred.fromCoroutine(self._run(keyword, handler(self, arguments)))
        if running.called:
            return None
        self._pending = running

        def done(result: None) -> None:
            self._pending = None

        running.addBoth(done)
        return running

    async def _run(self, keyword: bytes, work: Awaitable[bytes | None]) -> None:
        try:
            reply = await work
        except _Refusal as refusal:
            reply = refusal.args[0] + b"\r\n"
        except MessageExpunged as expunged:
            reply = b"-ERR Message %d expunged.\r\n" % (expunged.number,)
        except NoSuchMessage:
            reply = b"-ERR No such message\r\n"
        except (_Broken, CancelledError) as error:
            if not self._ended:
                # Mid-message there is no way to tell the client; the
                # dropped connection abandons the maildrop.
                self.log.error("message stream failed: {error}", error=str(error))
                self._close()
            return
        except UpstreamError as error:
            if self._ended:
                return
            # Expected trouble (a hung or vanished upstream): a line, no traceback.
            if self._upstreamFailed is not None:
                failed, self._upstreamFailed = self._upstreamFailed, None
                failed(error)
            self.log.warn(
                "maildrop failed on {command}: {error}", command=keyword.decode("ascii", "replace"), error=str(error)
            )
            reply = _failureReply(keyword)
        except Exception:
            if self._ended:
                return
            self.log.failure("maildrop failed on {command}", None, command=keyword.decode("ascii", "replace"))
            reply = _failureReply(keyword)
        if reply is not None:
            self._write(reply)
        if keyword == b"QUIT" or not getattr(self.maildrop, "connected", True):
            # Nothing more can be served once the upstream is gone.
            self._ended = True
            self._close()

    def connectionLost(self) -> None:
        """
        The client went away: abandon the maildrop unless QUIT is committing
        it (or has), and stop a pending command.
        """
        self._ended = True
        if self._quitting:
            return
        if not self._abandoned:
            self._abandoned = True
            try:
                self.maildrop.abandon()
            except Exception:
                self.log.failure("maildrop abandon failed")
        if self._pending is not None:
            self._pending.cancel()

    # -- the commands -------------------------------------------------------

    async def do_STAT(self, arguments: list[bytes]) -> bytes:
        _expect(arguments, 0, 0)
        count, octets = await maybeDeferred(self.maildrop.stat)
        return b"+OK %d %d\r\n" % (count, octets)

    async def do_LIST(self, arguments: list[bytes]) -> bytes:
        return await self._scan(arguments, self.maildrop.listing, b"%d")

    async def do_UIDL(self, arguments: list[bytes]) -> bytes:
        return await self._scan(arguments, self.maildrop.uniqueIds, b"%s")

    async def _scan(self, arguments: list[bytes], method: Callable[[], Any], format: bytes) -> bytes:
        _expect(arguments, 0, 1)
        number = _messageNumber(arguments[0]) if arguments else None
        entries = await maybeDeferred(method)
        lines = [b"%d " % (entry[0],) + format % (_value(entry[1]),) + b"\r\n" for entry in entries]
        if number is None:
            return b"+OK\r\n" + b"".join(lines) + b".\r\n"
        for entry, line in zip(entries, lines, strict=True):
            if entry[0] == number:
                return b"+OK " + line
        raise NoSuchMessage(number)

    async def do_RETR(self, arguments: list[bytes]) -> bytes | None:
        _expect(arguments, 1, 1)
        return await self._retrieve(_messageNumber(arguments[0]), None)

    async def do_TOP(self, arguments: list[bytes]) -> bytes | None:
        _expect(arguments, 2, 2)
        number = _messageNumber(arguments[0])
        if not arguments[1].isdigit():
            raise _Refusal(b"-ERR Invalid line count")
        return await self._retrieve(number, int(arguments[1]))

    async def _retrieve(self, number: int, bodyLines: int | None) -> bytes | None:
        stuffer = ByteStuffer()
        started = finished = False

        def write(data: bytes) -> None:
            nonlocal started
            if finished or self._ended or not data:
                return
            if not started:
                started = True
                self._write(b"+OK Message follows\r\n")
            self._activity()
            self._write(stuffer.feed(data))

        producer = _RetrievalProducer(self.maildrop)
        self.transport.registerProducer(producer, True)
        try:
            await maybeDeferred(self.maildrop.retrieve, number, write, bodyLines)
        except Exception as error:
            if started:
                raise _Broken(f"message {number} failed after its first octets: {error}") from error
            raise
        finally:
            finished = True
            self.transport.unregisterProducer()
            # The client's buffer may have paused the upstream as the last
            # octets arrived; once unregistered nobody else would resume it.
            producer.resumeProducing()
        if not started:
            self._write(b"+OK Message follows\r\n")
        return stuffer.end()

    async def do_DELE(self, arguments: list[bytes]) -> bytes:
        _expect(arguments, 1, 1)
        number = _messageNumber(arguments[0])
        await maybeDeferred(self.maildrop.delete, number)
        return b"+OK Message %d deleted\r\n" % (number,)

    async def do_RSET(self, arguments: list[bytes]) -> bytes:
        _expect(arguments, 0, 0)
        await maybeDeferred(self.maildrop.reset)
        return b"+OK\r\n"

    async def do_NOOP(self, arguments: list[bytes]) -> bytes:
        _expect(arguments, 0, 0)
        return b"+OK\r\n"

    async def do_QUIT(self, arguments: list[bytes]) -> bytes:
        self._quitting = True
        await maybeDeferred(self.maildrop.commit)
        return b"+OK Bye\r\n"


def _failureReply(keyword: bytes) -> bytes:
    reason = b"Some deleted messages not removed" if keyword == b"QUIT" else b"Mailbox unavailable"
    return b"-ERR [SYS/TEMP] " + reason + b"\r\n"


def _expect(arguments: list[bytes], least: int, most: int) -> None:
    if not least <= len(arguments) <= most:
        raise _Refusal(b"-ERR Syntax error")


def _value(value: Any) -> Any:
    return value.encode("ascii", "replace") if isinstance(value, str) else value


_Handler = Callable[[MaildropSession, list[bytes]], Awaitable[bytes | None]]
_HANDLERS: dict[bytes, _Handler] = {
    b"STAT": MaildropSession.do_STAT,
    b"LIST": MaildropSession.do_LIST,
    b"UIDL": MaildropSession.do_UIDL,
    b"RETR": MaildropSession.do_RETR,
    b"TOP": MaildropSession.do_TOP,
    b"DELE": MaildropSession.do_DELE,
    b"RSET": MaildropSession.do_RSET,
    b"NOOP": MaildropSession.do_NOOP,
    b"QUIT": MaildropSession.do_QUIT,
}
