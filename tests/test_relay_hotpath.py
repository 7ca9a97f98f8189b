"""
The passthrough relay's fast paths give the same bytes as the slow ones:
a whole upstream read is written on uncopied only when nothing in it
changes, however the stream is cut into reads; the framer's quick test for
lines that cannot announce a literal agrees with its full reading; the lean
paths (the framer's scan of responses, command lines relayed unframed) do
what the framed events do, octet for octet and in the relay's state; and
commands are read once (tag, name, UID) for every check.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection

from mailproxy.imap.framer import FramingError, IMAPFramer, Line, LiteralChunk
from mailproxy.imap.relay import _NOTABLE_LINE
from mailproxy.imap.syntax import rewriteCapabilities
from mailproxy.imap.upstream import RELAY_READ_SIZE, setReadSize
from mailproxy.limits import LimitsConfig
from tests.support import ProxyConnection, UpstreamScript, loggedIn
from tests.test_imap_idle import REFRESH

CAPABILITIES = [b"IMAP4rev1", b"LITERAL+", b"IDLE", b"MOVE"]


def session(tmp_path: Path, maxLineLength: int | None = None) -> tuple[ProxyConnection, list[bytes]]:
    """
    A logged-in passthrough session whose client writes are recorded as
    the very objects written (command lines up to C{maxLineLength} if given).
    """
    limits = LimitsConfig(maxLineLength=maxLineLength) if maxLineLength is not None else None
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=CAPABILITIES), limits=limits)
    written: list[bytes] = []
    write = connection.transport.write

    def record(data: bytes) -> None:
        written.append(data)
        write(data)

    connection.transport.write = record  # type: ignore[method-assign]
    return connection, written


def fetchResponse(uid: int, body: bytes) -> bytes:
    return b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (uid, uid, len(body), body)


def bulkStream(count: int = 4, size: int = 3000) -> bytes:
    body = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    # a body line that looks like a literal announcement or a tagged reply
    body = body[:100] + b"\r\nf OK [CAPABILITY IMAP4rev1 STARTTLS] {12}\r\n" + body[100:]
    return b"".join(fetchResponse(uid, body) for uid in range(1, count + 1)) + b"f OK Fetch completed.\r\n"


def relayed(tmp_path: Path, stream: bytes, cuts: list[int]) -> bytes:
    connection, _ = session(tmp_path)
    connection.send(b"f UID FETCH 1:* (BODY.PEEK[])\r\n")
    bounds = [0, *cuts, len(stream)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            connection.fromUpstream(stream[start:end])
    assert not connection.protocol.relay.midResponse  # type: ignore[union-attr]
    return connection.received()  # type: ignore[no-any-return]


def test_a_whole_read_that_nothing_changes_is_written_as_it_came(tmp_path: Path) -> None:
    """FETCH bodies and replies in one read: one write, of the very object read (no copy)."""
    connection, written = session(tmp_path)
    connection.send(b"f UID FETCH 1:* (BODY.PEEK[])\r\n")
    read = bulkStream()
    connection.fromUpstream(read)
    assert len(written) == 1
    assert written[0] is read


def test_a_read_with_a_capability_list_is_rewritten(tmp_path: Path) -> None:
    """A whole read holding a CAPABILITY response is relayed with the hidden names removed, the rest intact."""
    connection, written = session(tmp_path)
    connection.send(b"c CAPABILITY\r\n")
    connection.fromUpstream(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN IDLE\r\nc OK done\r\n")
    assert connection.received() == b"* CAPABILITY IMAP4rev1 IDLE\r\nc OK done\r\n"
    assert len(written) == 1


def test_capability_codes_after_a_status_word_are_rewritten_and_fetched_text_is_not(tmp_path: Path) -> None:
    """'[CAPABILITY' right after OK is a code; inside FETCH data it is message text."""
    connection, _ = session(tmp_path)
    connection.send(b"n NOOP\r\n")
    connection.fromUpstream(
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"
        b'* 1 FETCH (ENVELOPE ("x" "[CAPABILITY STARTTLS]"))\r\n'
        b"n OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] done\r\n"
    )
    assert connection.received() == (
        b"* OK [CAPABILITY IMAP4rev1] hi\r\n"
        b'* 1 FETCH (ENVELOPE ("x" "[CAPABILITY STARTTLS]"))\r\n'
        b"n OK [CAPABILITY IMAP4rev1] done\r\n"
    )


def test_a_literal_split_at_every_position_relays_the_same_bytes(tmp_path: Path) -> None:
    """Every single cut of a bulk FETCH (inside announcements, literals, CRLFs) gives the input back."""
    stream = bulkStream(count=2, size=300)
    for cut in range(len(stream) + 1):
        assert relayed(tmp_path, stream, [cut]) == stream, cut


def test_a_stream_fed_byte_by_byte_relays_the_same_bytes(tmp_path: Path) -> None:
    """The slowest cutting there is: every read one octet."""
    stream = bulkStream(count=2, size=200)
    assert relayed(tmp_path, stream, list(range(1, len(stream)))) == stream


_bodies = st.binary(max_size=400).map(lambda body: body.replace(b"\r\n", b"\n"))
# Untagged responses and what the client gets of each.
_RELAYED_AS = {
    b"* 3 EXISTS\r\n": b"* 3 EXISTS\r\n",
    b"* CAPABILITY IMAP4rev1 STARTTLS IDLE\r\n": b"* CAPABILITY IMAP4rev1 IDLE\r\n",
    b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] still here\r\n": b"* OK [CAPABILITY IMAP4rev1] still here\r\n",
    b"* OK text that ends like {5}\r\n": b"* OK text that ends like {5}\r\n",
    b"* ok [capability IMAP4rev1 STARTTLS] lower case\r\n": b"* ok [CAPABILITY IMAP4rev1] lower case\r\n",
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n": b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n",
    b"* BYE [UNAVAILABLE] going down\r\n": b"* BYE [UNAVAILABLE] going down\r\n",
    b"* 1 FETCH (FLAGS (\\Seen))\r\n": b"* 1 FETCH (FLAGS (\\Seen))\r\n",
}
_untagged = st.sampled_from(sorted(_RELAYED_AS))


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.one_of(_bodies.map(lambda body: fetchResponse(1, body)), _untagged), max_size=8),
    data=st.data(),
)
def test_any_cutting_relays_what_the_slow_path_relays(tmp_path_factory: Any, items: list[bytes], data: Any) -> None:
    """Differential: random responses cut at random points relay exactly as one octet per read does."""
    stream = b"".join(items) + b"f OK Fetch completed.\r\n"
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12), label="cuts"))
    directory = tmp_path_factory.mktemp("cut")
    slow = relayed(directory, stream, list(range(1, len(stream))))
    assert relayed(directory, stream, cuts) == slow
    assert relayed(directory, stream, []) == slow
    assert slow == b"".join(_RELAYED_AS.get(item, item) for item in items) + b"f OK Fetch completed.\r\n"


def test_the_proxys_own_idle_lines_in_a_whole_read_are_not_relayed(tmp_path: Path) -> None:
    """An IDLE refresh's tagged reply arriving with a client's update: only the update reaches the client."""
    connection, _ = session(tmp_path)
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    connection.clock.advance(REFRESH)
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\n"
    connection.fromUpstream(b"* 7 EXISTS\r\ni OK Idle completed\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\ni IDLE\r\n"
    assert connection.received() == b"* 7 EXISTS\r\n"
    connection.fromUpstream(b"+ idling\r\n* 8 EXISTS\r\n")
    assert connection.received() == b"* 8 EXISTS\r\n"


def test_a_literal_plus_continuation_inside_a_whole_read_is_hidden(tmp_path: Path) -> None:
    """The upstream's '+' for a LITERAL+ literal is the proxy's; a read holding it is not passed on whole."""
    connection, written = session(tmp_path)
    connection.send(b"a APPEND INBOX {5+}\r\nhello\r\n")
    connection.fromUpstream(b"+ go ahead\r\n* 4 EXISTS\r\n")
    assert connection.upstream.sent == b"a APPEND INBOX {5}\r\nhello\r\n"
    assert connection.received() == b"* 4 EXISTS\r\n"


# framer


def _events(framer: IMAPFramer, pieces: list[bytes]) -> list[Line | LiteralChunk]:
    events: list[Line | LiteralChunk] = []
    for piece in pieces:
        events.extend(framer.feed(piece))
    return events


def _merged(events: list[Line | LiteralChunk]) -> list[tuple[str, bytes, Any]]:
    """
    Events with consecutive literal chunks joined: what any cutting must agree on.
    """
    merged: list[tuple[str, bytes, Any]] = []
    for event in events:
        if isinstance(event, LiteralChunk):
            if merged and merged[-1][0] == "literal" and event.data:
                merged[-1] = ("literal", merged[-1][1] + event.data, event.remaining)
            else:
                merged.append(("literal", event.data, event.remaining))
        else:
            merged.append(("line", event.raw, (event.continuation, event.literal, event.nonSynchronizing)))
    return merged


_lines = st.lists(
    st.sampled_from(
        [
            b"a1 NOOP\r\n",
            b"a2 APPEND INBOX {3}\r\nabc\r\n",
            b"a3 APPEND INBOX {0}\r\n\r\n",
            b"a4 LOGIN {2+}\r\nab {1}\r\nc\r\n",
            b'a5 SELECT "x{3}"\r\n',
            b"a6 X {3}\r\n",
            b"}\r\n",
            b"\r\n",
            b"\n",
            b"a7 NOOP\n",
            b"a8 APPEND INBOX ~{2}\r\n\x00\x01\r\n",
        ]
    ),
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(lines=_lines, data=st.data())
def test_framing_does_not_depend_on_where_reads_end(lines: list[bytes], data: Any) -> None:
    """Differential: commands cut anywhere frame like the same stream one octet at a time."""
    stream = b"".join(lines)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    pieces = [stream[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    slow = _merged(_events(IMAPFramer(), [stream[index : index + 1] for index in range(len(stream))]))
    assert _merged(_events(IMAPFramer(), pieces)) == slow


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.one_of(_bodies.map(lambda body: fetchResponse(2, body)), _untagged), max_size=6), data=st.data()
)
def test_a_read_reported_whole_is_exactly_its_events(items: list[bytes], data: Any) -> None:
    """feedWhole says 'whole' only when the events are the read, octet for octet."""
    stream = b"".join(items)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    framer = IMAPFramer(responses=True)
    for start, end in zip(bounds, bounds[1:], strict=False):
        read = stream[start:end]
        events, whole = framer.feedWhole(read)
        joined = b"".join(event.raw if isinstance(event, Line) else event.data for event in events)
        if whole:
            assert joined == read


def test_a_chunk_holding_many_responses_frames_each() -> None:
    """One read with many short responses gives one line each, in order."""
    responses = [b"* %d FETCH (FLAGS ())\r\n" % number for number in range(1, 200)] + [b"f OK done\r\n"]
    events, whole = IMAPFramer(responses=True).feedWhole(b"".join(responses))
    assert whole
    assert [event.raw for event in events if isinstance(event, Line)] == responses


# the lean paths

# Responses that test the scan's edges: a status response or continuation
# ending like a literal (which announces none), an empty literal, a binary
# literal, two literals in one response, bare LF, an empty line, lines the
# relay acts on.
_ODD_RESPONSES = [
    b"* OK [ALERT] ends like {3}\r\n",
    b"a1 NO text {2}\r\n",
    b"+ send it {4}\r\n",
    b"* 2 FETCH (BODY[] {0}\r\n)\r\n",
    b"* 3 FETCH (BINARY[] ~{2}\r\n\x00\n)\r\n",
    b"* 4 FETCH (BODY[1] {1}\r\nx BODY[2] {2}\r\n}\n)\r\n",
    b"* 5 EXISTS\n",
    b"\r\n",
    # lines whose first octets are the newline ending them: the next line is
    # still a line start (the scan's search must not consume a newline)
    b"\n",
    b"*\n",
    b"*\r\n",
    b"a {2}x}\r\n",
    b"* BAD [PARSE] what\r\n",
    b"* BYE going\r\n",
    b"*x [CAPABILITY IMAP4rev1]\r\n",
    b"t2 OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n",
]
_responses = st.lists(
    st.one_of(_bodies.map(lambda body: fetchResponse(1, body)), _untagged, st.sampled_from(_ODD_RESPONSES)),
    max_size=8,
)


def _cut(stream: bytes, data: Any) -> list[bytes]:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    return [stream[start:end] for start, end in zip(bounds, bounds[1:], strict=False) if end > start]


def _framerState(framer: IMAPFramer) -> tuple[bytes, bool, bool, bool]:
    return framer.pending(), framer.inLiteral, framer.midCommand, framer.atBoundary


@settings(max_examples=300, deadline=None)
@given(items=_responses, data=st.data())
def test_scanning_responses_frames_them_as_feeding_does(items: list[bytes], data: Any) -> None:
    """Differential: scan passes on exactly the octets feed frames, finds the notable response starts, ends in the same state."""
    scanner = IMAPFramer(responses=True)
    feeder = IMAPFramer(responses=True)
    for piece in _cut(b"".join(items), data):
        events = feeder.feed(piece)
        read, starts, framed = scanner.scan(piece, _NOTABLE_LINE)
        assert read[:framed] == b"".join(event.raw if isinstance(event, Line) else event.data for event in events)
        notable = [
            event.raw
            for event in events
            if isinstance(event, Line) and not event.continuation and _NOTABLE_LINE.match(event.raw)
        ]
        assert [read[start : read.index(b"\n", start) + 1] for start in starts] == notable
        assert _framerState(scanner) == _framerState(feeder)


def test_scanning_refuses_an_expression_not_anchored_at_line_starts() -> None:
    """scan finds lines after their newline: an expression without ^ and re.MULTILINE would mean something else."""
    for pattern in (re.compile(rb"[^*]", re.MULTILINE), re.compile(rb"^[^*]")):
        with pytest.raises(ValueError):
            IMAPFramer(responses=True).scan(b"* 1 EXISTS\r\na OK\r\n", pattern)


def test_scanning_finds_a_notable_line_right_after_a_line_that_is_only_its_newline() -> None:
    """An empty line, "*" alone: each is notable, and so is the line after it, all in one read."""
    lines = [b"* 1 EXISTS\r\n", b"\n", b"* BYE x\r\n", b"*\n", b"* BAD y\r\n", b"\r\n", b"a1 OK z\r\n"]
    read, starts, framed = IMAPFramer(responses=True).scan(b"".join(lines), _NOTABLE_LINE)
    assert framed == len(read)
    assert [read[start : read.index(b"\n", start) + 1] for start in starts] == lines[1:]


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.sampled_from([b"* 1 EXISTS\r\n", b"x" * 40 + b"\r\n", b"y" * 70 + b"\r\n"]), max_size=6),
    data=st.data(),
)
def test_scanning_refuses_an_overlong_line_where_feeding_does(items: list[bytes], data: Any) -> None:
    """A line over the limit is a FramingError for scan at the very read where it is one for feed."""
    scanner = IMAPFramer(64, responses=True)
    feeder = IMAPFramer(64, responses=True)
    for piece in _cut(b"".join(items), data):
        try:
            feeder.feed(piece)
        except FramingError:
            with pytest.raises(FramingError):
                scanner.scan(piece, _NOTABLE_LINE)
            return
        scanner.scan(piece, _NOTABLE_LINE)
        assert _framerState(scanner) == _framerState(feeder)


# What a client may send and an upstream answer, for the relay differential:
# plain commands, a tag reused, a reserved tag, commands the proxy answers or
# handles itself, IDLE and DONE, a literal, lines without a tag.
_CLIENT_LINES = [
    b"a NOOP\r\n",
    b"b UID FETCH 1 (BODY.PEEK[])\r\n",
    b"c SELECT INBOX\r\n",
    b"mpi3 NOOP\r\n",
    b"d LOGIN x y\r\n",
    b"e IDLE\r\n",
    b"DONE\r\n",
    b"f UID IDLE\r\n",
    b"g APPEND INBOX {3}\r\n",
    b"abc\r\n",
    b"h APPEND INBOX {2+}\r\nhi\r\n",
    b"no-command\r\n",
    b"i NOOP\n",
    b"\r\n",
]
_UPSTREAM_LINES = [
    b"a OK done\r\n",
    b"b OK done\r\n",
    b"c OK [READ-WRITE] done\r\n",
    b"e OK idle done\r\n",
    b"f BAD no\r\n",
    b"g OK appended\r\n",
    b"h NO refused\r\n",
    b"i OK done\r\n",
    b"+ go ahead\r\n",
    b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc)\r\n",
    b"* 2 EXISTS\r\n",
    b"* OK [CAPABILITY IMAP4rev1 STARTTLS] x\r\n",
    b"* BAD [PARSE] what\r\n",
    b"* bye [ALERT] going down\r\n",
]
_steps = st.lists(
    st.tuples(st.booleans(), st.lists(st.integers(0, 12), min_size=1, max_size=4)),
    max_size=10,
)


def _relayState(connection: ProxyConnection) -> tuple[Any, ...]:
    relay: Any = connection.protocol.relay
    return (
        dict(relay._tagsInUse),
        dict(relay._unanswered),
        list(relay._continuations),
        relay._awaitingContinuation,
        relay.midResponse,
        relay.upstreamSaidBye,
        relay._clientTag,
        relay.idle.tag,
        _framerState(connection.protocol.framer),
        _framerState(connection.upstreamProtocol.framer),
        relay.watchdog._owed if relay.watchdog is not None else None,
    )


# Command lines over a 48-octet limit whose rest, cut almost anywhere,
# reads like a command ("a b" is tag a, command b).
_LONG_LINES = [b"j SEARCH OR FROM a@example.org OR FROM b@example.org ALL\r\n", b"k NOOP" + b" a b" * 15 + b"\r\n"]


@settings(max_examples=150, deadline=None)
@given(steps=_steps, data=st.data())
def test_the_lean_paths_relay_what_the_framed_events_relay(tmp_path_factory: Any, steps: list[Any], data: Any) -> None:
    """Differential: the same conversation, cut the same way, through the lean paths and with them off."""
    _converse(tmp_path_factory, steps, data, _CLIENT_LINES)


@settings(max_examples=150, deadline=None)
@given(steps=_steps, data=st.data())
def test_the_lean_paths_relay_overlong_lines_as_the_framed_events_do(
    tmp_path_factory: Any, steps: list[Any], data: Any
) -> None:
    """Differential with a 48-octet line limit and lines over it, cut anywhere (an overlong line discarded across reads)."""
    _converse(tmp_path_factory, steps, data, _CLIENT_LINES + _LONG_LINES, maxLineLength=48)


def test_an_overlong_line_cut_anywhere_relays_as_the_framed_events_do(tmp_path_factory: Any) -> None:
    """Every cut of a line over the limit, its rest read on its own, then a command: lean and framed agree."""
    line = _LONG_LINES[1]
    for cut in range(1, len(line)):
        pieces = [line[:cut], line[cut:], b"A2 NOOP\r\n"]
        connections = [session(tmp_path_factory.mktemp("cut"), 48)[0] for _ in range(2)]
        framed = connections[1]
        framed.protocol.relay.fromClientLines = lambda data: 0  # type: ignore[union-attr, method-assign]
        for connection in connections:
            for piece in pieces:
                connection.send(piece)
        lean = connections[0]
        assert (lean.upstream.sent, lean.received()) == (framed.upstream.sent, framed.received()), cut


def _converse(
    tmp_path_factory: Any, steps: list[Any], data: Any, clientLines: list[bytes], maxLineLength: int | None = None
) -> None:
    lean, _ = session(tmp_path_factory.mktemp("lean"), maxLineLength)
    framed, _ = session(tmp_path_factory.mktemp("framed"), maxLineLength)
    framed.protocol.relay.fromClientLines = lambda data: 0  # type: ignore[union-attr, method-assign]
    framed.upstreamProtocol._onRead = None
    for fromClient, picks in steps:
        lines = clientLines if fromClient else _UPSTREAM_LINES
        for piece in _cut(b"".join(lines[pick % len(lines)] for pick in picks), data):
            for connection in (lean, framed):
                if fromClient:
                    connection.send(piece)
                else:
                    connection.fromUpstream(piece)
        assert lean.received() == framed.received()
        assert lean.upstream.sent == framed.upstream.sent
        assert _relayState(lean) == _relayState(framed)


def test_pipelined_commands_stop_the_lean_path_at_the_first_it_cannot_relay(tmp_path: Path) -> None:
    """One read: relayed, a reused tag (refused), relayed again; in order, and the refusal never reaches the upstream."""
    connection, _ = session(tmp_path)
    connection.send(b"a NOOP\r\na NOOP\r\nb NOOP\r\nmpi1 NOOP\r\nc NOOP\r\n")
    assert connection.upstream.sent == b"a NOOP\r\nb NOOP\r\nc NOOP\r\n"
    assert connection.received() == (
        b"a BAD Tag already in use by a command in progress\r\nmpi1 BAD Tags mpi<N> are reserved by the proxy\r\n"
    )


def test_the_tail_of_an_overlong_command_line_is_never_relayed(tmp_path: Path) -> None:
    """
    A line over the limit arriving in reads, the last one starting like a command: refused whole with its tag,
    nothing of it upstream, and the next command relayed and answerable.
    """
    connection, _ = session(tmp_path, maxLineLength=1024)
    connection.send(b"A1 SEARCH " + b"OR FROM a@example.org " * 60)
    connection.send(b"OR FROM b@example.org ALL\r\n")
    connection.send(b"A2 NOOP\r\n")
    assert connection.upstream.sent == b"A2 NOOP\r\n"
    assert connection.received() == b"A1 BAD [TOOBIG] Command line too long (limit 1024 octets)\r\n"


def test_an_unsolicited_continuation_in_a_scanned_read_is_dropped(tmp_path: Path) -> None:
    """A '+' nothing asked for, in the middle of a read: the lines around it pass, it does not."""
    connection, _ = session(tmp_path)
    connection.send(b"a NOOP\r\n")
    connection.fromUpstream(b"* 1 EXISTS\r\n+ send your commands\r\na OK done\r\n")
    assert connection.received() == b"* 1 EXISTS\r\na OK done\r\n"


# commands


def test_an_unknown_command_with_a_tag_in_use_is_refused(tmp_path: Path) -> None:
    """A name the proxy reads as a command (underscore and all) gets the same checks as any other."""
    connection, _ = session(tmp_path)
    connection.send(b"t NOOP\r\n")
    connection.send(b"t X_CUSTOM\r\n")
    assert connection.upstream.sent == b"t NOOP\r\n"
    assert connection.received() == b"t BAD Tag already in use by a command in progress\r\n"


def test_uid_commands_are_not_mistaken_for_their_names(tmp_path: Path) -> None:
    """'UID IDLE' is no IDLE and 'UID LOGIN' no LOGIN: both go upstream, which refuses them."""
    connection, _ = session(tmp_path)
    connection.send(b"u UID IDLE\r\nv UID LOGIN a b\r\n")
    assert connection.upstream.sent == b"u UID IDLE\r\nv UID LOGIN a b\r\n"
    assert connection.received() == b""


# reading


def test_relaying_reads_larger_pieces_from_a_plain_tcp_upstream() -> None:
    """A plain TCP upstream is read RELAY_READ_SIZE octets at a time; a TLS one is left alone."""
    ours, theirs = socket.socketpair()
    try:
        plain = Connection(ours, Protocol(), None)
        setReadSize(plain, RELAY_READ_SIZE)
        assert plain.bufferSize == RELAY_READ_SIZE
        tls = Connection(theirs, Protocol(), None)
        tls.TLS = True
        setReadSize(tls, RELAY_READ_SIZE)
        assert tls.bufferSize == Connection.bufferSize
    finally:
        ours.close()
        theirs.close()


_words = st.sampled_from(
    [b"OK", b"ok", b"NO", b"BAD", b"BYE", b"bye", b"PREAUTH", b"CAPABILITY", b"capability", b"FETCH"]
)
_codes = st.sampled_from(
    [b"", b"[CAPABILITY IMAP4rev1 STARTTLS IDLE] ", b"[capability STARTTLS] ", b"[READ-WRITE] ", b"[CAPABILITY] ", b"["]
)


@settings(max_examples=400, deadline=None)
@given(
    tag=st.sampled_from([b"*", b"a1", b"+", b"CAPABILITY", b"*BYE"]),
    word=_words,
    code=_codes,
    text=st.sampled_from([b"", b"IMAP4rev1 STARTTLS AUTH=PLAIN", b"done", b"[CAPABILITY STARTTLS]"]),
    separator=st.sampled_from([b" ", b"  ", b""]),
)
def test_the_base_rewrite_changes_a_line_exactly_as_rewriting_its_capabilities_does(
    tmp_path_factory: Any, tag: bytes, word: bytes, code: bytes, text: bytes, separator: bytes
) -> None:
    """Its quick looks for a capability list skip no line that the full rewrite would change, and a BYE is noted."""
    line = tag + separator + word + b" " + code + text + b"\r\n"
    connection, _ = session(tmp_path_factory.mktemp("rewrite"))
    relay = connection.protocol.relay
    assert relay is not None and not relay.upstreamSaidBye
    assert relay._baseRewrite(line) == rewriteCapabilities(line, relay._capabilities)
    assert relay.upstreamSaidBye == (tag == b"*" and separator == b" " and word.upper() == b"BYE")
