# -*- test-case-name: tests.test_pop3_server -*-
"""
POP3 wire helpers shared by the server, the relay and the upstream side:
client line framing, incremental byte-stuffing, and finding the end of a
multi-line response in a stream.
"""

from __future__ import annotations

from collections.abc import Iterator

TERMINATOR = b".\r\n"


class LineTooLong(Exception):
    """
    A partial line grew past the hard limit; the connection must close.
    """


class LineSplitter:
    """
    Split a byte stream into lines without their line ends.

    Lines longer than C{maxLine} octets come out as C{None} (to be answered
    with an error in their turn); a partial line longer than C{hardLimit}
    raises L{LineTooLong}.
    """

    def __init__(self, maxLine: int, hardLimit: int) -> None:
        self.maxLine = maxLine
        self.hardLimit = hardLimit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes | None]:
        """
        Add C{data}; yield the complete lines it finishes.

        @raise LineTooLong: if the unfinished line exceeds C{hardLimit}.
        """
        self._buffer += data
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end == -1:
                break
            line = bytes(self._buffer[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            yield line if len(line) <= self.maxLine else None
        del self._buffer[:start]
        if len(self._buffer) > self.hardLimit:
            self._buffer.clear()
            raise LineTooLong()

    def pending(self) -> bool:
        """
        C{True} if part of a line is buffered.
        """
        return bool(self._buffer)


class ByteStuffer:
    """
    Byte-stuff a message for a multi-line response (RFC 1939 section 3),
    one chunk at a time: chunks may split lines anywhere.
    """

    def __init__(self) -> None:
        self._atLineStart = True
        self._last = b""

    def feed(self, data: bytes) -> bytes:
        """
        The stuffed form of C{data}: every line starting with C{.} gets one
        more.
        """
        if not data:
            return b""
        stuffed = data.replace(b"\n.", b"\n..")
        if self._atLineStart and data.startswith(b"."):
            stuffed = b"." + stuffed
        self._atLineStart = data.endswith(b"\n")
        self._last = (self._last + data)[-2:]
        return stuffed

    def end(self) -> bytes:
        """
        What closes the response: a line end if the data lacked its last
        one, then the terminating C{.} line.
        """
        if self._last.endswith(b"\r"):
            return b"\n" + TERMINATOR
        if self._last and self._last != b"\r\n":
            # No line end, or a bare LF: the terminator must follow a CRLF.
            return b"\r\n" + TERMINATOR
        return TERMINATOR


class TerminatorScanner:
    """
    Find the terminating C{CRLF.CRLF} of a multi-line response body that is
    being passed through unchanged, without holding any of it back.
    """

    def __init__(self) -> None:
        # The body starts at a line start: as if a CRLF had just been seen.
        self._tail = b"\r\n"

    def feed(self, data: bytes) -> int:
        """
        @return: how many octets of C{data} belong to the body, including
            the terminator, or C{-1} if the body goes on past C{data}.
        """
        joined = self._tail + data
        index = joined.find(b"\r\n.\r\n")
        if index == -1:
            self._tail = joined[-4:]
            return -1
        return index + 5 - len(self._tail)


def unstuff(lines: list[bytes]) -> list[bytes]:
    """
    Undo byte-stuffing on the lines of a multi-line response.
    """
    return [line[1:] if line.startswith(b"..") else line for line in lines]


def protocolText(text: str) -> bytes:
    """
    C{text} made safe for one response line.
    """
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
