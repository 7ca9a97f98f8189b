# -*- test-case-name: tests.test_imap_framer -*-
"""
Sans-IO, literal-aware framing of an IMAP byte stream.

The same framer serves both directions of the proxy: commands from clients
and responses from servers use the same literal syntax (C{{n}}, C{{n+}},
C{~{n}}).  It never buffers a literal: literal bytes come out as
L{LiteralChunk} events as soon as they arrive, so a relay can stream a
50 MB message without holding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailproxy.imap.commands import LITERAL_COMMANDS
from mailproxy.imap.lexer import ArgumentLexer, announcedLiteral, commandHead

CRLF = b"\r\n"

# A response line that announces a literal ends with {n}, {n+} (LITERAL+,
# RFC 7888) or ~{n} (BINARY, RFC 3516) right before CRLF.  Command lines are
# read with the lexer instead (mailproxy.imap.lexer).
_LITERAL_AT_END = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\r\n\Z")
# Status responses carry resp-text, which never announces a literal even if
# its human-readable text happens to end in "{5}".
_STATUS_RESPONSE = re.compile(rb"\A\S+ (?:OK|NO|BAD|BYE|PREAUTH)(?: |\r\n)", re.IGNORECASE)


def _afterNewline(notable: re.Pattern[bytes]) -> re.Pattern[bytes]:
    """
    The newlines after which C{notable} (C{^(?:...)} with C{re.MULTILINE},
    matching within one line) matches: the same line starts, found much
    faster.  An expression anchored with C{^} is tried at every octet of the
    text; one that starts with a newline is tried only where the engine
    finds one (and looks ahead, so that it consumes nothing of the line it
    finds).
    """
    if not notable.pattern.startswith(b"^") or not notable.flags & re.MULTILINE:
        raise ValueError("a notable-line expression starts with ^ and is re.MULTILINE")
    return re.compile(rb"\n(?=" + notable.pattern[1:] + rb")", notable.flags)


def _lineAfter(match: re.Match[bytes]) -> int:
    return match.start() + 1


class FramingError(Exception):
    """
    The peer broke IMAP framing (a line longer than allowed, or an
    impossible literal size); the connection cannot continue safely.
    """


# How much of a discarded overlong line is kept, to name its tag.
OVERLONG_HEAD = 64


# The events are not frozen: one is made per line and literal chunk, and a
# frozen dataclass pays a call per field to be built.  Nothing changes them.
@dataclass(slots=True)
class Line:
    """
    One CRLF-terminated line, CRLF included.

    @ivar continuation: C{True} if this line continues a command or
        response that a literal interrupted, C{False} if it starts one.
    @ivar literal: size of the literal this line announces, or C{None}.
    @ivar nonSynchronizing: the literal is C{{n+}}: no server continuation
        is awaited before it is sent.
    """

    raw: bytes
    continuation: bool
    literal: int | None = None
    nonSynchronizing: bool = False

    @property
    def complete(self) -> bool:
        """
        C{True} if this line ends its command or response.
        """
        return self.literal is None


@dataclass(slots=True)
class LiteralChunk:
    """
    Some bytes of a literal; C{remaining} of it are still to come.
    """

    data: bytes
    remaining: int


@dataclass(slots=True)
class OverlongLine:
    """
    A line longer than allowed, discarded up to its end; C{head} is its
    start (enough for a tag), C{size} its full length.
    """

    head: bytes
    size: int
    continuation: bool


Event = Line | LiteralChunk
# What a client-facing framer (one that discards overlong lines) emits.
ClientEvent = Line | LiteralChunk | OverlongLine


class IMAPFramer:
    """
    Split an IMAP stream into lines and streamed literals.

    @param maxLineLength: the longest line (CRLF included) accepted before
        L{FramingError} is raised; literals do not count.
    @param responses: C{True} for a server-to-client stream, where status
        responses (OK/NO/BAD/BYE/PREAUTH) and continuation requests never
        announce literals.
    @param discardUpTo: if set, a line longer than C{maxLineLength} is not
        an error: it is discarded up to its end and reported as one
        L{OverlongLine}, unless it grows past C{discardUpTo} octets.
    """

    def __init__(self, maxLineLength: int = 65536, *, responses: bool = False, discardUpTo: int | None = None) -> None:
        self.maxLineLength = maxLineLength
        self._responses = responses
        self._discardUpTo = discardUpTo
        self._discarding: tuple[bytes, bool] | None = None
        self._discarded = 0
        self._partial: list[bytes] = []
        self._partialSize = 0
        self._literalRemaining = 0
        self._continuation = False
        self.maxLiteralSize: int | None = None
        # The line that announced the literal being framed.
        self._announcedBy: Line | None = None
        # scan's notable-line expression and its search after newlines.
        self._following: tuple[re.Pattern[bytes], re.Pattern[bytes]] | None = None
        # The arguments of the command being framed, read so far.
        self._lexer = ArgumentLexer()

    @property
    def inLiteral(self) -> bool:
        """
        C{True} while literal bytes are expected.
        """
        return self._literalRemaining > 0

    @property
    def midCommand(self) -> bool:
        """
        C{True} between a literal's announcement and the end of its command:
        what was framed so far ends inside a command (a partial line does
        not count; nothing of it has been framed).
        """
        return self._literalRemaining > 0 or self._continuation

    @property
    def atBoundary(self) -> bool:
        """
        C{True} if the stream so far ends exactly between two commands or
        responses, with nothing partial buffered (nor an overlong line being
        discarded).
        """
        return not self._partial and not self._literalRemaining and not self._continuation and self._discarding is None

    def pending(self) -> bytes:
        """
        Bytes received but not yet framed (a partial line).
        """
        return b"".join(self._partial)

    def reset(self) -> None:
        """
        Forget everything not yet framed and any literal or command in
        progress: what follows starts a new command.
        """
        self._partial = []
        self._partialSize = 0
        self._literalRemaining = 0
        self._continuation = False
        self._discarding = None

    def cancelLiteral(self, line: Line | None = None) -> None:
        """
        Forget an announced synchronising literal that the peer will not send
        because it was refused (tagged NO/BAD instead of a continuation).

        @param line: the line that announced it: if the framer has framed
            past its announcement since (a client that sent octets without
            waiting for the continuation), they are that literal's, or later
            commands', and the framer's state is kept.
        """
        if line is not None and not (line is self._announcedBy and self._literalRemaining == line.literal):
            return
        self._literalRemaining = 0
        self._continuation = False

    def feed(self, data: bytes) -> list[Event]:
        """
        Frame C{data}; return the events it completes, in order.

        @raise FramingError: if the stream is not valid IMAP framing.
        """
        assert self._discardUpTo is None, "a discarding framer is fed with feedClient"
        return self._frame(data)  # type: ignore[return-value]

    def feedWhole(self, data: bytes) -> tuple[list[Event], bool]:
        """
        Like L{feed}; also say whether the events are all of C{data} and
        nothing else (no partial line was pending before it or is after
        it), so that a relay that changes none of them can pass C{data} on
        as it came, uncopied.
        """
        whole = not self._partial
        events = self.feed(data)
        return events, whole and not self._partial

    def feedClient(self, data: bytes) -> list[ClientEvent]:
        """
        Like L{feed}, for a framer that discards overlong lines: these come
        out as L{OverlongLine}s.
        """
        return self._frame(data)

    def _frame(self, data: bytes) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        if self._discarding is not None:
            data = self._discard(data, events)
        elif self._partial:
            # Collect a long line's pieces without rescanning or recopying
            # them on every read.
            if data.find(b"\n") < 0:
                self._partial.append(data)
                self._partialSize += len(data)
                if self._partialSize >= self.maxLineLength:
                    self._startDiscard(b"".join(self._partial), events)
                    self._partial = []
                    self._partialSize = 0
                return events
            data = b"".join(self._partial) + data
            self._partial = []
            self._partialSize = 0
        position = 0
        end = len(data)
        maxLine = self.maxLineLength
        emit = events.append
        while position < end:
            if self._literalRemaining:
                take = min(self._literalRemaining, end - position)
                self._literalRemaining -= take
                # A read inside a literal (most of a bulk FETCH) passes
                # uncopied: a slice of all of C{data} is C{data} itself.
                emit(LiteralChunk(data[position : position + take], self._literalRemaining))
                position += take
                continue
            newline = data.find(b"\n", position, position + maxLine)
            if newline < 0:
                if end - position >= maxLine:
                    data = self._startDiscard(data[position:], events)
                    position, end = 0, len(data)
                    continue
                self._partial = [data[position:]]
                self._partialSize = end - position
                break
            raw = data[position : newline + 1]
            # (raw is at least 3 octets long when newline - position >= 2.)
            plain = newline - position < 2 or data[newline - 2] != 0x7D or data[newline - 1] != 0x0D
            position = newline + 1
            if plain:
                # The common case: a line that cannot announce a literal
                # (it does not end with "}\r\n").
                emit(Line(raw, self._continuation))
                self._continuation = False
                continue
            line = self._line(raw)
            emit(line)
            if line.literal == 0:
                # An empty literal still is a literal: consumers count them.
                emit(LiteralChunk(b"", 0))
        return events

    def scan(self, data: bytes, notable: re.Pattern[bytes]) -> tuple[bytes, list[int], int]:
        """
        Frame a response stream's C{data} without making events, for a relay
        that passes what is framed on as it came and acts on a few lines.

        @param notable: matches, anchored at a line's start (with
            C{re.MULTILINE}: C{^}), the lines that start a response the
            caller wants to see.
        @return: the octets framed from (C{data}, after any partial line held
            from before), the offsets in them of the notable lines that start
            a response (not lines that continue one after a literal), and how
            many of the octets are framed: the rest, a partial line, is held
            as L{feed} holds it, and the framer's state is what L{feed} leaves.
        @raise FramingError: as L{feed} does.
        """
        assert self._responses and self._discardUpTo is None
        if self._partial:
            if data.find(b"\n") < 0:
                self._partial.append(data)
                self._partialSize += len(data)
                if self._partialSize >= self.maxLineLength:
                    raise FramingError(f"line longer than {self.maxLineLength} octets")
                return data, [], 0
            data = b"".join(self._partial) + data
            self._partial = []
            self._partialSize = 0
        following = self._following
        if following is None or following[0] is not notable:
            following = self._following = (notable, _afterNewline(notable))
        afterNewline = following[1]
        starts: list[int] = []
        position = 0
        end = len(data)
        maxLine = self.maxLineLength
        while position < end:
            remaining = self._literalRemaining
            if remaining:
                take = min(remaining, end - position)
                self._literalRemaining = remaining - take
                position += take
                continue
            if not self._continuation:
                # Every whole line before the next one that may announce a
                # literal starts a response: only the notable ones are
                # looked at, found in one pass.
                announcing = data.find(b"}\r\n", position)
                if announcing < 0:
                    segmentEnd = data.rfind(b"\n", position) + 1
                else:
                    segmentEnd = data.rfind(b"\n", position, announcing) + 1
                if position < segmentEnd <= position + maxLine:
                    # (position is a line's start: the first line is
                    # matched where it is, the others after their newline.)
                    if notable.match(data, position) is not None:
                        starts.append(position)
                    starts += map(_lineAfter, afterNewline.finditer(data, position, segmentEnd))
                    position = segmentEnd
                    continue
            # One line: the rest of a response after a literal, one that may
            # announce a literal, or a partial one.
            newline = data.find(b"\n", position, position + maxLine)
            if newline < 0:
                if end - position >= maxLine:
                    raise FramingError(f"line longer than {self.maxLineLength} octets")
                self._partial = [data[position:]]
                self._partialSize = end - position
                return data, starts, position
            if not self._continuation and notable.match(data, position) is not None:
                starts.append(position)
            if newline - position >= 2 and data[newline - 2] == 0x7D and data[newline - 1] == 0x0D:
                # No Line is made: nothing reads it (only a client's
                # literals are cancelled, and this frames responses).
                self._announce(data[position : newline + 1])
            else:
                self._continuation = False
            position = newline + 1
        return data, starts, end

    def _startDiscard(self, data: bytes, events: list[ClientEvent]) -> bytes:
        """
        Begin discarding an overlong line that starts C{data}; return what
        follows its end in C{data}, if it ends there.
        """
        if self._discardUpTo is None:
            raise FramingError(f"line longer than {self.maxLineLength} octets")
        self._discarding = (data[:OVERLONG_HEAD], self._continuation)
        self._discarded = 0
        return self._discard(data, events)

    def _discard(self, data: bytes, events: list[ClientEvent]) -> bytes:
        assert self._discarding is not None and self._discardUpTo is not None
        newline = data.find(b"\n")
        if newline < 0:
            self._discarded += len(data)
            if self._discarded > self._discardUpTo:
                raise FramingError(f"line longer than {self._discardUpTo} octets")
            return b""
        head, continuation = self._discarding
        self._discarding = None
        # The line ends the command it belonged to, literal or not.
        self._continuation = False
        events.append(OverlongLine(head, self._discarded + newline + 1, continuation))
        return data[newline + 1 :]

    def _line(self, raw: bytes) -> Line:
        continuation = self._continuation
        size, nonSync = self._announce(raw)
        if size is None:
            return Line(raw, continuation)
        self._announcedBy = Line(raw, continuation, size, nonSync)
        return self._announcedBy

    def _announce(self, raw: bytes) -> tuple[int | None, bool]:
        """
        Frame the line C{raw} (which may end with "}\r\n"): if it announces
        a literal, expect it, and return its size and whether it is
        non-synchronising; otherwise C{(None, False)}.
        """
        if not raw.endswith(CRLF):
            # A bare LF ends the line too; tolerate it rather than hang, but
            # it never announces a literal.
            self._continuation = False
            return None, False
        size, nonSync = self._announcedLiteral(raw, self._continuation)
        if size is None:
            self._continuation = False
            return None, False
        if self.maxLiteralSize is not None and size > self.maxLiteralSize:
            raise FramingError(f"literal of {size} octets exceeds {self.maxLiteralSize}")
        self._literalRemaining = size
        self._continuation = True
        return size, nonSync

    def _announcedLiteral(self, raw: bytes, continuation: bool) -> tuple[int | None, bool]:
        if raw[-3:-2] != b"}":
            return None, False
        if not self._responses:
            return self._commandLiteral(raw[:-2], continuation)
        if not continuation:
            if raw.startswith(b"+") or _STATUS_RESPONSE.match(raw):
                return None, False
        # The only "{" a match can hold is the last one (what follows it is
        # digits, "+", "}" and CRLF): matched from there (a "~" before it
        # changes neither size nor "+"), not searched for at every octet.
        brace = raw.rfind(b"{")
        if brace < 0:
            return None, False
        match = _LITERAL_AT_END.match(raw, brace)
        if match is None:
            return None, False
        return int(match.group(2)), bool(match.group(3))

    def _commandLiteral(self, line: bytes, continuation: bool) -> tuple[int | None, bool]:
        """
        A command line announces a literal only where an argument may start
        and after arguments that read cleanly (C{"x{5}} is an unterminated
        quoted string, which servers refuse, not a literal), in a command
        the proxy knows (servers reject an unknown one without reading its
        literal).
        """
        start = 0
        if not continuation:
            self._lexer = ArgumentLexer()
            head = commandHead(line)
            if head is None or head.name not in LITERAL_COMMANDS:
                return None, False
            start = head.arguments
        announcement = announcedLiteral(line[start:], self._lexer)
        if announcement is None:
            return None, False
        return announcement.size, announcement.nonSynchronizing
