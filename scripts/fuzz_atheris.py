"""
Coverage-guided fuzzing of the framers and both client-facing protocols
with atheris (libFuzzer), beside the hypothesis properties in the test
suite, whose checks it reuses.

    make fuzz                                   (60 s)
    .venv/bin/python -m scripts.fuzz_atheris -max_total_time=600 [CORPUS_DIR]

Any libFuzzer option works.  One input drives one target, chosen by its
first byte: the IMAP framer (commands or responses), the POP3 line
splitter, an IMAP connection before login, a logged-in IMAP relay
(passthrough or filtered), or a POP3 connection to the IMAP bridge.  A crash is an exception other than the
protocol's own error, or a failed check: a malformed reply, a failure
logged, a timer or connection left behind.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mailproxy.config import TLSMode
from mailproxy.imap.framer import FramingError, IMAPFramer, Line, LiteralChunk, OverlongLine
from mailproxy.pop3.wire import LineSplitter, LineTooLong

TARGETS = ("imap-commands", "imap-responses", "pop3-lines", "imap-preauth", "imap-relay", "pop3-bridge")
_USERS_DIR = Path(tempfile.mkdtemp(prefix="mp-atheris-"))
# Separates one connection's writes; a piece's first byte picks the
# direction in the relay target.
SEPARATOR = b"\xfe"
LISTENERS = [(TLSMode.STARTTLS, False), (TLSMode.PLAIN, True), (TLSMode.IMPLICIT, False)]
CAPABILITIES = [[b"IMAP4rev1", b"LITERAL+", b"IDLE"], [b"IMAP4rev1"]]


def fuzzOne(data: bytes) -> None:
    """
    Run the target the first byte of C{data} names on the rest.
    """
    if not data:
        return
    target, rest = TARGETS[data[0] % len(TARGETS)], data[1:]
    pieces = rest.split(SEPARATOR)
    if target == "imap-commands":
        _frame(IMAPFramer(64, discardUpTo=1024), pieces, client=True)
    elif target == "imap-responses":
        _frame(IMAPFramer(256, responses=True), pieces, client=False)
    elif target == "pop3-lines":
        _split(pieces)
    elif target == "imap-preauth":
        _preauth(data[0], pieces)
    elif target == "imap-relay":
        _relay(data[0], pieces)
    else:
        _pop3Bridge(data[0], pieces)


def _frame(framer: IMAPFramer, pieces: list[bytes], client: bool) -> None:
    consumed = 0
    framed = 0
    try:
        for piece in pieces:
            consumed += len(piece)
            for event in framer.feedClient(piece) if client else framer.feed(piece):
                if isinstance(event, Line):
                    assert event.raw.endswith(b"\n") and b"\n" not in event.raw[:-1]
                    framed += len(event.raw)
                elif isinstance(event, LiteralChunk):
                    assert event.remaining >= 0
                    framed += len(event.data)
                else:
                    assert isinstance(event, OverlongLine) and event.size > framer.maxLineLength
                    framed += event.size
    except FramingError:
        return
    # Every octet is framed exactly once, or is the partial line still held.
    assert framed + len(framer.pending()) <= consumed


def _split(pieces: list[bytes]) -> None:
    splitter = LineSplitter(64, 512)
    try:
        for piece in pieces:
            for line in splitter.feed(piece):
                assert line is None or (len(line) <= 64 and b"\n" not in line)
    except LineTooLong:
        return


def _preauth(selector: int, pieces: list[bytes]) -> None:
    from tests.test_fuzz_protocols import preauthSurvives

    listener = LISTENERS[selector // len(TARGETS) % len(LISTENERS)]
    preauthSurvives(_USERS_DIR, listener, [piece for piece in pieces if piece], [], [0.0, 1.0], selector % 2 == 0)


def _relay(selector: int, pieces: list[bytes]) -> None:
    from tests.test_fuzz_protocols import relaySurvives

    filters = ("none", "pass", "mixed")[selector // len(TARGETS) % 3]
    capabilities = CAPABILITIES[selector // (3 * len(TARGETS)) % 2]
    # A piece's first byte: which side sends it, or a timer tick between.
    steps = [("client", "upstream", "tick")[piece[0] % 3] for piece in pieces if piece]
    client = [piece[1:] for piece in pieces if piece and piece[0] % 3 == 0]
    upstream = [piece[1:] for piece in pieces if piece and piece[0] % 3 == 1]
    relaySurvives(_USERS_DIR, filters, capabilities, client, upstream, [], [], steps, [1.0, 25 * 60.0 + 1], None)


def _pop3Bridge(selector: int, pieces: list[bytes]) -> None:
    """
    A POP3 client of the IMAP bridge (its maildrop in memory), logged in
    first or not: one well-formed response per command, nothing left over.
    """
    from tests.test_fuzz_protocols import (
        Closing,
        assertNoFailures,
        assertPOP3Responses,
        loggedFailures,
        pop3Commands,
        settle,
    )
    from tests.test_pop3_server import FakeBackends
    from tests.test_pop3_server import connect as connectPOP3

    tls, allowPlaintextAuth = LISTENERS[selector // len(TARGETS) % len(LISTENERS)]
    login = b"USER alice\r\nPASS alicepw\r\n" if selector % 2 == 0 else b""
    fed = bytearray()
    with loggedFailures() as failures:
        connection = connectPOP3(
            _USERS_DIR, tls=tls, allowPlaintextAuth=allowPlaintextAuth, protocol="imap", backends=FakeBackends()
        )
        closing = Closing(connection.protocol, connection.transport)
        for piece in [login, *pieces]:
            if closing.lost:
                break
            fed.extend(piece)
            connection.send(piece)
            closing.check()
        settle(connection.clock, closing)
        closed = closing.lost
        closing.finish()
        connection.clock.advance(3600)
    assertNoFailures(failures)
    closing.assertQuietAfterClose()
    assertPOP3Responses(connection.transport.value(), pop3Commands(bytes(fed)), closed)
    assert connection.clock.getDelayedCalls() == []


def main() -> None:
    import atheris

    import tests.test_fuzz_protocols  # noqa: F401  (loaded before instrumenting)

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzzOne)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
