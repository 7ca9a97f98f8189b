"""
Behaviour of the sans-IO IMAP framer: lines, streamed literals and limits.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailproxy.imap.framer import OVERLONG_HEAD, FramingError, IMAPFramer, Line, LiteralChunk, OverlongLine


def lines(events: list[Line | LiteralChunk]) -> list[Line]:
    return [event for event in events if isinstance(event, Line)]


def literalBytes(events: list[Line | LiteralChunk]) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, LiteralChunk))


# Lines and feed boundaries


def test_line_split_byte_by_byte_is_emitted_once_when_complete() -> None:
    """A line fed one byte at a time yields nothing until its LF, then exactly one Line."""
    framer = IMAPFramer()
    data = b"a1 NOOP\r\n"
    for index in range(len(data) - 1):
        assert framer.feed(data[index : index + 1]) == []
    assert framer.feed(b"\n") == [Line(b"a1 NOOP\r\n", continuation=False)]


def test_several_lines_in_one_feed_come_out_in_order() -> None:
    """One feed holding two lines and a partial third yields the two lines and buffers the rest."""
    framer = IMAPFramer()
    events = framer.feed(b"a1 NOOP\r\na2 CAPABILITY\r\na3 LOG")
    assert events == [Line(b"a1 NOOP\r\n", False), Line(b"a2 CAPABILITY\r\n", False)]
    assert framer.pending() == b"a3 LOG"
    assert framer.feed(b"OUT\r\n") == [Line(b"a3 LOGOUT\r\n", False)]


def test_crlf_split_between_feeds_still_ends_the_line() -> None:
    """A CR at the end of one feed and LF at the start of the next end one line."""
    framer = IMAPFramer()
    assert framer.feed(b"a1 NOOP\r") == []
    assert framer.feed(b"\na2 NOOP\r\n") == [Line(b"a1 NOOP\r\n", False), Line(b"a2 NOOP\r\n", False)]


def test_bare_lf_ends_a_line_but_never_announces_a_literal() -> None:
    """A line ending in a bare LF is emitted as is and its trailing {3} is not a literal."""
    framer = IMAPFramer()
    events = framer.feed(b"a1 APPEND INBOX {3}\nb2 NOOP\r\n")
    assert events == [Line(b"a1 APPEND INBOX {3}\n", False), Line(b"b2 NOOP\r\n", False)]
    assert framer.atBoundary


# Literal announcements


def test_synchronising_literal_is_announced_with_its_size() -> None:
    """A line ending in {n} announces a synchronising literal of n octets."""
    framer = IMAPFramer()
    [line] = framer.feed(b"a1 APPEND INBOX {12}\r\n")
    assert line.literal == 12
    assert line.nonSynchronizing is False
    assert line.complete is False
    assert framer.inLiteral


def test_non_synchronising_literal_is_flagged() -> None:
    """A line ending in {n+} announces a LITERAL+ literal flagged nonSynchronizing."""
    framer = IMAPFramer()
    [line] = framer.feed(b"a1 APPEND INBOX {7+}\r\n")
    assert (line.literal, line.nonSynchronizing) == (7, True)


@pytest.mark.parametrize(
    ("announcement", "size", "nonSync"),
    [(b"~{5}", 5, False), (b"~{5+}", 5, True), (b"{0005}", 5, False)],
)
def test_binary_and_zero_padded_literals_are_announced(announcement: bytes, size: int, nonSync: bool) -> None:
    """~{n}, ~{n+} and zero-padded sizes announce literals with the right size and flag."""
    framer = IMAPFramer()
    [line] = framer.feed(b"a1 APPEND INBOX " + announcement + b"\r\n")
    assert (line.literal, line.nonSynchronizing) == (size, nonSync)


@pytest.mark.parametrize(
    "raw",
    [b"a1 NOOP {5}x\r\n", b"a1 NOOP {}\r\n", b"a1 NOOP {5\r\n", b"a1 NOOP {-5}\r\n", b"a1 NOOP {5++}\r\n"],
)
def test_brace_text_that_is_not_at_the_very_end_is_not_a_literal(raw: bytes) -> None:
    """Malformed or non-final braces do not announce a literal, and the line is complete."""
    framer = IMAPFramer()
    [line] = framer.feed(raw)
    assert line.literal is None
    assert line.complete
    assert framer.atBoundary


def test_literal_bytes_are_streamed_not_buffered() -> None:
    """A 1 MB literal fed in 4 KB pieces comes out as one chunk per piece with decreasing remaining."""
    size = 1024 * 1024
    piece = 4096
    payload = bytes((index * 31 + 7) % 256 for index in range(size))
    framer = IMAPFramer()
    [announce] = framer.feed(b"a1 APPEND INBOX {%d}\r\n" % size)
    assert announce.literal == size
    received = 0
    chunks = 0
    for offset in range(0, size, piece):
        data = payload[offset : offset + piece]
        events = framer.feed(data)
        assert len(events) == 1
        [chunk] = events
        assert isinstance(chunk, LiteralChunk)
        assert len(chunk.data) <= piece
        assert chunk.data == data
        received += len(chunk.data)
        assert chunk.remaining == size - received
        assert framer.pending() == b""
        chunks += 1
    assert chunks == size // piece
    assert not framer.inLiteral
    assert framer.feed(b")\r\n") == [Line(b")\r\n", continuation=True)]
    assert framer.atBoundary


def test_literal_sharing_a_feed_with_its_announcement_is_chunked_within_that_feed() -> None:
    """Literal bytes arriving in the same feed as the announcement are emitted at once, with remaining."""
    framer = IMAPFramer()
    events = framer.feed(b"a1 APPEND INBOX {10}\r\nabcd")
    assert events == [Line(b"a1 APPEND INBOX {10}\r\n", False, 10), LiteralChunk(b"abcd", 6)]
    assert framer.feed(b"efghij\r\n") == [LiteralChunk(b"efghij", 0), Line(b"\r\n", True)]


def test_literal_content_is_passed_byte_exact() -> None:
    """CRLF, NUL, 8-bit bytes and an embedded "{5}\\r\\n" inside a literal are relayed verbatim."""
    literal = b"line1\r\nhas\x00nul \xff\xfe\x80 and {5}\r\nfake announce\r\n\r\n"
    framer = IMAPFramer()
    stream = b"a1 APPEND INBOX {%d}\r\n" % len(literal) + literal + b"\r\n"
    events = []
    for index in range(0, len(stream), 3):
        events.extend(framer.feed(stream[index : index + 3]))
    assert literalBytes(events) == literal
    assert lines(events) == [
        Line(b"a1 APPEND INBOX {%d}\r\n" % len(literal), False, len(literal)),
        Line(b"\r\n", True),
    ]
    assert framer.atBoundary


def test_zero_length_literal_produces_one_empty_chunk_and_continues_the_command() -> None:
    """{0} announces an empty literal: one empty chunk, and the next line is a continuation."""
    framer = IMAPFramer()
    events = framer.feed(b"a1 LOGIN {0}\r\n")
    assert events == [Line(b"a1 LOGIN {0}\r\n", False, 0), LiteralChunk(b"", 0)]
    assert not framer.inLiteral
    assert not framer.atBoundary
    assert framer.feed(b" pw\r\n") == [Line(b" pw\r\n", continuation=True)]
    assert framer.atBoundary


def test_continuation_flag_marks_lines_after_literals_only() -> None:
    """Lines following a literal are continuations; the line after a complete command is not."""
    framer = IMAPFramer()
    events = framer.feed(b"a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\na2 NOOP\r\n")
    assert lines(events) == [
        Line(b"a1 LOGIN {5}\r\n", False, 5, False),
        Line(b" {3+}\r\n", True, 3, True),
        Line(b"\r\n", True),
        Line(b"a2 NOOP\r\n", False),
    ]
    assert literalBytes(events) == b"alicepw!"


def test_complete_is_true_only_for_lines_that_end_their_command() -> None:
    """Line.complete is False for a literal announcement (even {0}) and True otherwise."""
    assert Line(b"a1 NOOP\r\n", False).complete
    assert Line(b")\r\n", True).complete
    assert not Line(b"a1 X {0}\r\n", False, 0).complete
    assert not Line(b"a1 X {9}\r\n", False, 9).complete


# Server-to-client streams


@pytest.mark.parametrize(
    "raw",
    [
        b"a1 OK done {5}\r\n",
        b"a1 no failed {5}\r\n",
        b"a1 BAD what {1}\r\n",
        b"* OK [ALERT] x {3}\r\n",
        b"* BYE {2}\r\n",
        b"* PREAUTH hello {2}\r\n",
        b"+ {4}\r\n",
        b"+{4}\r\n",
    ],
)
def test_status_responses_and_continuation_requests_never_announce_literals(raw: bytes) -> None:
    """In responses mode, status responses and "+" requests ending in {n} are complete lines."""
    framer = IMAPFramer(responses=True)
    [line] = framer.feed(raw + b"* 2 EXISTS\r\n")[:1]
    assert line == Line(raw, False)
    assert line.complete
    assert framer.atBoundary


def test_status_response_text_would_announce_in_a_command_stream() -> None:
    """In a client stream "a1 OK done {5}" is an unknown command (servers read no literal in it); SEARCH's is one."""
    framer = IMAPFramer()
    [line] = framer.feed(b"a1 OK done {5}\r\n")
    assert line.literal is None
    [line] = framer.feed(b"a1 SEARCH done {5}\r\n")
    assert line.literal == 5


def test_fetch_response_announces_its_literal() -> None:
    """In responses mode, "* 1 FETCH (BODY[] {5}" announces a literal that is streamed."""
    framer = IMAPFramer(responses=True)
    events = framer.feed(b"* 1 FETCH (BODY[] {5}\r\nhello)\r\na1 OK done\r\n")
    assert events == [
        Line(b"* 1 FETCH (BODY[] {5}\r\n", False, 5),
        LiteralChunk(b"hello", 0),
        Line(b")\r\n", True),
        Line(b"a1 OK done\r\n", False),
    ]


def test_response_continuation_line_ending_like_a_status_still_announces() -> None:
    """A continuation line of a FETCH with a second literal announces it even in responses mode."""
    framer = IMAPFramer(responses=True)
    events = framer.feed(b"* 1 FETCH (BODY[1] {2}\r\nab BODY[2] {3}\r\nxyz)\r\n")
    assert [line.literal for line in lines(events)] == [2, 3, None]
    assert literalBytes(events) == b"abxyz"


# Limits


def test_complete_line_longer_than_max_raises_framing_error() -> None:
    """A complete line one octet over maxLineLength raises FramingError."""
    framer = IMAPFramer(maxLineLength=20)
    with pytest.raises(FramingError):
        framer.feed(b"a1 " + b"x" * 16 + b"\r\n")


def test_line_of_exactly_max_length_is_accepted() -> None:
    """A line of exactly maxLineLength octets, CRLF included, is accepted."""
    framer = IMAPFramer(maxLineLength=20)
    raw = b"a1 " + b"x" * 15 + b"\r\n"
    assert len(raw) == 20
    assert framer.feed(raw) == [Line(raw, False)]


def test_long_partial_line_without_lf_raises_framing_error() -> None:
    """A partial line reaching maxLineLength with no LF yet raises instead of buffering forever."""
    framer = IMAPFramer(maxLineLength=20)
    assert framer.feed(b"a1 " + b"x" * 10) == []
    with pytest.raises(FramingError):
        framer.feed(b"y" * 10)


def test_literal_bytes_do_not_count_towards_line_length() -> None:
    """A literal far larger than maxLineLength passes; only the lines are limited."""
    framer = IMAPFramer(maxLineLength=32)
    events = framer.feed(b"a1 APPEND INBOX {100}\r\n" + b"z" * 100 + b"\r\n")
    assert literalBytes(events) == b"z" * 100
    assert framer.atBoundary


def test_literal_over_max_literal_size_raises_framing_error() -> None:
    """Announcing a literal larger than maxLiteralSize raises FramingError."""
    framer = IMAPFramer()
    framer.maxLiteralSize = 100
    with pytest.raises(FramingError):
        framer.feed(b"a1 APPEND INBOX {101}\r\n")


def test_literal_at_max_literal_size_is_accepted() -> None:
    """A literal of exactly maxLiteralSize octets is accepted."""
    framer = IMAPFramer()
    framer.maxLiteralSize = 100
    [line] = framer.feed(b"a1 APPEND INBOX {100+}\r\n")
    assert line.literal == 100


def test_overlong_line_is_discarded_and_reported_when_discarding_is_allowed() -> None:
    """With discardUpTo, an overlong line becomes one OverlongLine and framing goes on after it."""
    framer = IMAPFramer(maxLineLength=20, discardUpTo=1000)
    raw = b"a1 " + b"x" * 200 + b"\r\n"
    events = framer.feedClient(raw + b"a2 NOOP\r\n")
    assert events == [OverlongLine(raw[:OVERLONG_HEAD], len(raw), False), Line(b"a2 NOOP\r\n", False)]
    assert framer.atBoundary


def test_overlong_line_arriving_in_pieces_is_reported_once_at_its_end() -> None:
    """The pieces of an overlong line are counted, not kept; it is reported when its LF arrives."""
    framer = IMAPFramer(maxLineLength=20, discardUpTo=1000)
    assert framer.feedClient(b"a1 " + b"x" * 10) == []
    assert framer.feedClient(b"y" * 10) == []
    assert framer.feedClient(b"z" * 300) == []
    [overlong, line] = framer.feedClient(b"zz\r\na2 NOOP\r\n")
    assert overlong == OverlongLine(b"a1 " + b"x" * 10 + b"y" * 10, 3 + 10 + 10 + 300 + 4, False)
    assert line == Line(b"a2 NOOP\r\n", False)


def test_overlong_continuation_line_is_flagged_and_ends_the_command() -> None:
    """An overlong line after a literal says so; what follows starts a new command."""
    framer = IMAPFramer(maxLineLength=30, discardUpTo=1000)
    events = framer.feedClient(b"a1 APPEND INBOX {2+}\r\nhi" + b" x" * 50 + b"\r\na2 NOOP\r\n")
    assert isinstance(events[-2], OverlongLine) and events[-2].continuation
    assert events[-1] == Line(b"a2 NOOP\r\n", False)


def test_overlong_line_past_the_discard_limit_raises_framing_error() -> None:
    """Discarding is bounded too: an endless line is a framing error."""
    framer = IMAPFramer(maxLineLength=20, discardUpTo=100)
    framer.feedClient(b"a1 " + b"x" * 50)
    with pytest.raises(FramingError):
        framer.feedClient(b"x" * 100)


# Cancellation and state


def test_cancel_literal_makes_following_bytes_a_new_command() -> None:
    """After cancelLiteral, the next bytes are framed as a fresh, non-continuation line."""
    framer = IMAPFramer()
    framer.feed(b"a1 APPEND INBOX {5}\r\n")
    assert framer.inLiteral
    framer.cancelLiteral()
    assert not framer.inLiteral
    assert framer.atBoundary
    assert framer.feed(b"a2 NOOP\r\n") == [Line(b"a2 NOOP\r\n", continuation=False)]


def test_at_boundary_and_pending_track_partial_state() -> None:
    """atBoundary is True only between commands; pending() returns the unframed partial line."""
    framer = IMAPFramer()
    assert framer.atBoundary and framer.pending() == b""
    framer.feed(b"a1 APP")
    assert not framer.atBoundary and framer.pending() == b"a1 APP"
    framer.feed(b"END INBOX {3}\r\nab")
    assert not framer.atBoundary and framer.pending() == b""
    assert framer.inLiteral
    framer.feed(b"c")
    assert not framer.inLiteral
    assert not framer.atBoundary  # the command still needs its final line
    framer.feed(b"\r")
    assert not framer.atBoundary and framer.pending() == b"\r"
    framer.feed(b"\n")
    assert framer.atBoundary and framer.pending() == b""


# Property-based round trips

_lineText = st.binary(max_size=40).map(lambda text: text.replace(b"\r", b"").replace(b"\n", b""))
_literal = st.binary(max_size=60) | st.lists(st.sampled_from([b"\r\n", b"{3}\r\n", b"\x00", b"\xff", b"x"])).map(
    b"".join
)
# Arguments that read cleanly, so that a literal announced after them counts.
_arguments = st.lists(st.sampled_from([b"x", b"INBOX", b'"q s"', b'"\\"{1}"', b"(a (b))", b"1:*", b"\\Seen"])).map(
    lambda arguments: b"".join(b" " + argument for argument in arguments)
)
_part = st.tuples(_arguments, st.none() | st.tuples(_literal, st.sampled_from(["{%d}", "{%d+}", "~{%d}", "~{%d+}"])))
_message = st.tuples(st.lists(_part.filter(lambda part: part[1] is not None), max_size=3), _lineText)


def _serialise(messages: list[tuple[list, bytes]]) -> tuple[bytes, list[Line], list[bytes]]:
    """
    Serialise messages; return the stream, the expected lines and literals.
    """
    stream = b""
    expected: list[Line] = []
    literals: list[bytes] = []
    for parts, finalText in messages:
        continuation = False
        for text, (literal, form) in parts:
            head = b"" if continuation else b"t APPEND"
            raw = head + text + b" " + (form % len(literal)).encode() + b"\r\n"
            expected.append(Line(raw, continuation, len(literal), form.endswith("+}")))
            literals.append(literal)
            stream += raw + literal
            continuation = True
        if finalText.endswith(b"}"):
            finalText += b"."  # would otherwise risk looking like an announcement
        raw = finalText + b"\r\n"
        expected.append(Line(raw, continuation))
        stream += raw
    return stream, expected, literals


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=5), data=st.data())
def test_arbitrary_feed_boundaries_reproduce_stream_lines_and_literals(
    messages: list[tuple[list, bytes]], data: st.DataObject
) -> None:
    """For any split into feeds, events reproduce the input byte-exact, the lines and each literal."""
    stream, expectedLines, expectedLiterals = _serialise(messages)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=20), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    framer = IMAPFramer()
    events: list[Line | LiteralChunk] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        fed = stream[start:end]
        produced = framer.feed(fed)
        for event in produced:
            if isinstance(event, LiteralChunk):
                # Only an empty literal gives an empty chunk (exactly one).
                assert 0 < len(event.data) <= len(fed) or event.remaining == 0
        events.extend(produced)

    assert b"".join(event.raw if isinstance(event, Line) else event.data for event in events) == stream
    assert lines(events) == expectedLines

    literals: list[bytes] = []
    current: bytes | None = None
    announced = 0
    for event in events:
        if isinstance(event, Line):
            if current is not None:
                literals.append(current)
            current = b"" if event.literal is not None else None
            announced = event.literal or 0
        else:
            assert current is not None
            current += event.data
            assert event.remaining == announced - len(current)
    assert current is None
    assert literals == expectedLiterals
    assert framer.atBoundary
    assert framer.pending() == b""


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=5), data=st.data())
def test_fetch_responses_round_trip_in_responses_mode(messages: list[tuple[list, bytes]], data: st.DataObject) -> None:
    """In responses mode, untagged FETCH data with literals split anywhere reproduces lines and literals."""
    prefixed = [
        ([(b"* 1 FETCH " + parts[0][0], parts[0][1]), *parts[1:]] if parts else parts, b"* 1 FETCH " + final)
        for parts, final in messages
    ]
    stream, expectedLines, expectedLiterals = _serialise(prefixed)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=20), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    framer = IMAPFramer(responses=True)
    events: list[Line | LiteralChunk] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        events.extend(framer.feed(stream[start:end]))
    assert lines(events) == expectedLines
    assert literalBytes(events) == b"".join(expectedLiterals)
    assert framer.atBoundary


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.data())
def test_arbitrary_bytes_never_crash_the_framer(garbage: bytes, data: st.DataObject) -> None:
    """Random input only ever yields events or FramingError, and what is framed is never altered."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(garbage)), max_size=8)))
    pieces = [garbage[start:end] for start, end in zip([0, *cuts], [*cuts, len(garbage)], strict=True)]
    framer = IMAPFramer(maxLineLength=512)
    framer.maxLiteralSize = 4096
    events: list[Line | LiteralChunk] = []
    try:
        for piece in pieces:
            events.extend(framer.feed(piece))
    except FramingError:
        return
    framed = b"".join(event.raw if isinstance(event, Line) else event.data for event in events)
    assert framed + framer.pending() == garbage
