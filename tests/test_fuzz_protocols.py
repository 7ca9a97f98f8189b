"""
Property-based fuzzing of the client-facing protocols, driven in memory:
the IMAP dialogue before login, the IMAP relay after it (passthrough and
filtered) and the POP3 server (bridge and relay modes).

Every example checks that no exception escapes a protocol callback, that
nothing is logged as an unhandled failure, that what the proxy writes is
well-formed, that nothing is written after the connection is closed and
that no timer is left behind.  Before login the clients speak SASL PLAIN
and LOGIN too (challenges, responses that are not commands, cancels,
initial responses): no SASL challenge is sent in the clear where
credentials may not be, and while an exchange is open only its next
challenge or its end follows.

Bugs these properties found are reproduced, minimally, in
test_fuzz_findings.py.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mailproxy.config import TLSMode
from mailproxy.filters import DROP, PASS, Reject
from mailproxy.imap.framer import Event, IMAPFramer, Line
from mailproxy.imap.server import State
from mailproxy.imap.syntax import tagAndCommand
from mailproxy.limits import LimitsConfig
from mailproxy.pop3.relay import RELAYED
from mailproxy.pop3.server import MAX_LINE
from tests.support import UpstreamScript, connect, loggedIn
from tests.test_imap_relay import Scripted
from tests.test_pop3_server import FakeBackends
from tests.test_pop3_server import connect as connectPOP3

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

AUTH_FAILURE_DELAY = 2.1  # a little over the configured 2 s


@pytest.fixture(scope="module")
def usersDir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    One directory for the users files of every example in this module.
    """
    return tmp_path_factory.mktemp("fuzz")


# -- shared helpers ---------------------------------------------------------------


@contextmanager
def loggedFailures() -> Iterator[list[dict[str, Any]]]:
    """
    Collect the log events that carry a failure (unhandled errors) while
    the block runs.
    """
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observe)


def statistic(text: str) -> None:
    """
    Count C{text} in hypothesis' statistics; nothing when the checks run
    outside hypothesis (the atheris target).
    """
    try:
        event(text)
    except InvalidArgument:
        pass


def assertNoFailures(failures: list[dict[str, Any]]) -> None:
    assert not failures, "\n".join(f"{formatEvent(event)}\n{event['log_failure'].getTraceback()}" for event in failures)


def writes(pieces: list[bytes], sizes: list[int]) -> list[bytes]:
    """
    The generated C{pieces} as one stream cut into C{sizes}, or each piece
    as it is if C{sizes} is empty.
    """
    if not sizes:
        return [piece for piece in pieces if piece]
    return chunked(b"".join(pieces), sizes)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """
    C{data} cut into pieces of the given sizes, used in turn.
    """
    if not sizes:
        return [data] if data else []
    pieces = []
    position = index = 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        pieces.append(data[position : position + size])
        position += size
        index += 1
    return pieces


# Chunk sizes, used in turn; an empty list (a third of the time) sends each
# generated piece as one write, as a client writing command by command would.
_sizes = st.lists(st.integers(min_value=1, max_value=48), min_size=1, max_size=12)
splits = st.one_of(st.just([]), _sizes, _sizes)
pauses = st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.5, AUTH_FAILURE_DELAY]), min_size=1, max_size=6)


class Closing:
    """
    Play the transport's part in closing: once the protocol asks for the
    connection to be lost, deliver connectionLost (as the reactor would) and
    remember how much had been written by then.
    """

    def __init__(self, protocol: Any, transport: Any) -> None:
        self.protocol = protocol
        self.transport = transport
        self.lost = False
        self.writtenAtClose: int | None = None

    def check(self) -> None:
        if self.transport.disconnecting and not self.lost:
            self.writtenAtClose = len(self.transport.value())
            self.finish()

    def finish(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def assertQuietAfterClose(self) -> None:
        if self.writtenAtClose is not None:
            assert len(self.transport.value()) == self.writtenAtClose, "written after the connection was closed"


def isIdleTimeout(call: Any) -> bool:
    """
    C{True} for the inactivity timer (L{mailproxy.inactivity.Inactivity}).
    """
    return "timedOut" in getattr(call.func, "__name__", "")


def settle(clock: Any, closing: Closing, rounds: int = 40) -> None:
    """
    Let pending timers other than the idle timeout fire (delayed login
    failures, whatever their delay), as a client waiting for its answer
    would see them; the idle timeout may fire on the way.
    """
    for _ in range(rounds):
        if closing.lost:
            return
        due = [call.getTime() for call in clock.getDelayedCalls() if not isIdleTimeout(call)]
        if not due:
            return
        clock.advance(max(0.0, min(due) - clock.seconds()))
        closing.check()


class TLSWatch:
    """
    Check, each time it is asked, whether the protocol has just started TLS,
    and if so that the plaintext it read ends with the command asking for it
    (anything after it could be injected by a man in the middle).
    """

    def __init__(self, transport: Any, endsWithUpgrade: Any) -> None:
        self.transport = transport
        self.endsWithUpgrade = endsWithUpgrade
        self.seen = False
        self.writtenInPlaintext: int | None = None

    def check(self, fed: bytes | bytearray) -> None:
        if self.transport.tlsStarted is not None and not self.seen:
            self.seen = True
            # Nothing is written between reading STARTTLS and this check.
            self.writtenInPlaintext = len(self.transport.value())
            assert self.endsWithUpgrade(bytes(fed)), f"TLS started with more plaintext read: {bytes(fed)[-120:]!r}"

    def plaintextOutput(self) -> bytes:
        """
        What was written before TLS started (everything if it never did).
        """
        return self.transport.value()[: self.writtenInPlaintext]


def loginReached(output: bytes) -> str:
    """
    How far SASL LOGIN exchanges got in C{output}, for the statistics.
    """
    lines = output.split(CRLF)
    if PASSWORD_CHALLENGE in lines:
        return "the password"
    return "the user name" if USERNAME_CHALLENGE in lines else "nowhere"


def assertNoChallengeInTheClear(tlsWatch: TLSWatch, tls: TLSMode, allowPlaintextAuth: bool) -> None:
    """
    Where credentials may not be sent in the clear, no SASL challenge
    invites them before TLS.
    """
    if tls is TLSMode.IMPLICIT or allowPlaintextAuth:
        return
    invitations = [line for line in tlsWatch.plaintextOutput().split(CRLF) if line in SASL_CHALLENGES]
    assert not invitations, f"SASL challenges before TLS: {invitations!r}"


def lastIMAPCommandIsSTARTTLS(fed: bytes) -> bool:
    """
    C{True} if C{fed} ends exactly with a whole STARTTLS command.
    """
    framer = IMAPFramer(1024 * 1024)
    events: list[Event] = []
    for piece in re.findall(rb"[^\n]*\n|[^\n]+", fed):
        new = framer.feed(piece)
        events.extend(new)
        last = new[-1] if new else None
        if isinstance(last, Line) and last.literal and not last.nonSynchronizing:
            if last.literal > LimitsConfig.maxPreauthLiteral:
                # The proxy refuses it: what follows is a new command.
                framer.cancelLiteral()
    starts = [event for event in events if isinstance(event, Line) and not event.continuation]
    parsed = tagAndCommand(starts[-1].raw) if starts else None
    return framer.atBoundary and parsed is not None and parsed[1] == b"STARTTLS"


def lastPOP3CommandIsSTLS(fed: bytes) -> bool:
    """
    C{True} if C{fed} ends exactly with a whole STLS command.
    """
    lines = fed.split(b"\n")
    return len(lines) > 1 and lines[-1] == b"" and lines[-2].partition(b" ")[0].upper() in (b"STLS", b"STLS\r")


# -- IMAP vocabulary -------------------------------------------------------------

CRLF = b"\r\n"
lineEnds = st.sampled_from([CRLF] * 6 + [b"\n", b"", b"\r", b" \r\n"])
anyTags = st.one_of(
    st.sampled_from([b"a", b"A1", b"x.y", b"t-9", b"*", b"+", b"", b"tag]", b"\xff\xfe", b"a{1}", b"(", b"%"]),
    st.binary(min_size=1, max_size=4).map(
        lambda tag: tag.replace(b" ", b"_").replace(b"\r", b"_").replace(b"\n", b"_")
    ),
)


def imapQuoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imapLiteral(value: bytes, sync: bool) -> bytes:
    return b"{%d%s}\r\n" % (len(value), b"" if sync else b"+") + value


anyAtoms = st.one_of(
    st.sampled_from([b"alice", b"alicepw", b"bob", b"wrong", b"INBOX", b"NIL", b"PLAIN", b"()", b"\xc3\xa9"]),
    st.binary(min_size=1, max_size=8),
)
anyAstrings = st.one_of(
    anyAtoms,
    st.binary(max_size=10).map(imapQuoted),
    st.binary(max_size=10).map(lambda value: b'"' + value),  # unterminated
    st.builds(imapLiteral, st.binary(max_size=12), st.booleans()),
    st.builds(lambda size, data: b"{%d}\r\n" % size + data, st.integers(0, 20), st.binary(max_size=10)),
    st.builds(lambda size, data: b"~{%d}\r\n" % size + data, st.integers(0, 20), st.binary(max_size=10)),
)


def plainResponse(fields: tuple[bytes, ...]) -> bytes:
    return base64.b64encode(b"\0".join(fields))


saslResponses = st.one_of(
    st.sampled_from(
        [
            plainResponse((b"", b"alice", b"alicepw")),
            plainResponse((b"alice", b"alice", b"alicepw")),
            plainResponse((b"bob", b"alice", b"alicepw")),
            plainResponse((b"", b"alice", b"wrong")),
            plainResponse((b"alice", b"alicepw")),
            b"=",
            b"*",
            b"!!!",
            b"",
        ]
    ),
    st.tuples(st.binary(max_size=6), st.binary(max_size=6), st.binary(max_size=6)).map(plainResponse),
    st.binary(max_size=16).map(base64.b64encode),
    st.binary(max_size=12),
)


def b64(value: bytes) -> bytes:
    return base64.b64encode(value)


USERNAME_CHALLENGE = b"+ " + b64(b"Username:")
PASSWORD_CHALLENGE = b"+ " + b64(b"Password:")
# The SASL challenges the proxy sends (PLAIN's is empty).
SASL_CHALLENGES = (b"+ ", USERNAME_CHALLENGE, PASSWORD_CHALLENGE)

# What a client says to LOGIN's challenges, or as its initial response: the
# right or a wrong user name or password, names LOGIN refuses (empty, NUL,
# not UTF-8), an empty initial response, a cancel, broken base64.
loginResponses = st.one_of(
    st.sampled_from(
        [
            b64(b"alice"),
            b64(b"alice"),
            b64(b"alicepw"),
            b64(b"alicepw"),
            b64(b"wrong"),
            b64(b"al\0ice"),
            b64(b"\xff\xfe"),
            b64(b"alice\r\n ip=198.51.100.7"),
            b"=",
            b"*",
            b"",
            b"YWxpY2U",  # unpadded
            b"!!!",
        ]
    ),
    st.binary(max_size=12).map(b64),
)


# Mostly the answers that carry an exchange on to its next step.
loginUsers = st.one_of(st.just(b64(b"alice")), loginResponses)
loginPasswords = st.one_of(st.sampled_from([b64(b"alicepw"), b64(b"wrong")]), loginResponses)


def joinCommand(tag: bytes, words: list[bytes], end: bytes) -> bytes:
    return b" ".join([tag, *words]) + end


@st.composite
def preauthPieces(draw: st.DrawFn) -> bytes:
    """
    One plausible (or deliberately broken) chunk of client input before login.
    """
    tag = draw(anyTags)
    end = draw(lineEnds)
    kind = draw(
        st.sampled_from(
            ["simple", "simple", "starttls", "starttls", "login", "goodlogin", "goodlogin", "authenticate"]
            + ["authcontinued", "authlogin", "authlogin", "authlogin", "id", "other", "literal", "bytes"]
        )
    )
    if kind == "starttls":
        return joinCommand(tag, [draw(st.sampled_from([b"STARTTLS", b"starttls", b"STARTTLS x"]))], end)
    if kind == "simple":
        name = draw(
            st.sampled_from([b"CAPABILITY", b"noop", b"NOOP", b"STARTTLS", b"LOGOUT", b"SELECT INBOX", b"ENABLE X"])
        )
        return joinCommand(tag, [name], end)
    if kind == "login":
        return joinCommand(tag, [b"LOGIN", *draw(st.lists(anyAstrings, max_size=3))], end)
    if kind == "goodlogin":
        user = draw(st.sampled_from([b"alice", b'"alice"', b"{5}\r\nalice", b"{5+}\r\nalice"]))
        password = draw(st.sampled_from([b"alicepw", b'"alicepw"', b"{7}\r\nalicepw", b"{7+}\r\nalicepw", b"x"]))
        return joinCommand(tag, [b"LOGIN", user, password], end)
    if kind == "authenticate":
        mechanism = draw(st.sampled_from([b"PLAIN", b"plain", b"LOGIN", b"login", b"CRAM-MD5", b"{5}\r\nPLAIN"]))
        extra = draw(st.lists(st.one_of(saslResponses, anyAstrings), max_size=2))
        return joinCommand(tag, [b"AUTHENTICATE", mechanism, *extra], end)
    if kind == "authcontinued":
        response = draw(st.one_of(saslResponses, anyAstrings))
        return joinCommand(tag, [b"AUTHENTICATE", b"PLAIN"], CRLF) + response + end
    if kind == "authlogin":
        # AUTHENTICATE LOGIN, maybe with an initial response, then up to
        # two answers to its challenges (the user name, the password).
        initial = draw(st.lists(st.one_of(loginUsers, anyAstrings), max_size=1))
        responses = [draw(loginUsers)] if not initial else []
        responses = draw(st.sampled_from([[], responses, responses + [draw(loginPasswords)]]))
        command = joinCommand(tag, [b"AUTHENTICATE", draw(st.sampled_from([b"LOGIN", b"login"])), *initial], CRLF)
        return command + b"".join(response + CRLF for response in responses[:-1]) + b"".join(responses[-1:]) + end
    if kind == "id":
        parameters = draw(
            st.one_of(
                st.just(b"NIL"),
                st.lists(anyAstrings, max_size=4).map(lambda items: b"(" + b" ".join(items) + b")"),
            )
        )
        return joinCommand(tag, [b"ID", parameters], end)
    if kind == "other":
        name = draw(st.binary(min_size=1, max_size=8))
        return joinCommand(tag, [name, *draw(st.lists(anyAstrings, max_size=2))], end)
    if kind == "literal":
        size = draw(st.sampled_from([0, 1, 3, 10, 128 * 1024, 128 * 1024 + 1, 10**6, 10**30]))
        plus = draw(st.sampled_from([b"", b"+"]))
        prefix = draw(st.sampled_from([b"", tag + b" APPEND INBOX ", tag + b" LOGIN "]))
        return prefix + b"{%d%s}\r\n" % (size, plus) + draw(st.binary(max_size=12))
    return draw(st.binary(max_size=40))


IMAP_OUTPUT_LINE = re.compile(rb"\A(\* |\+ |[^ \r\n]+ (OK|NO|BAD) )")
# Every continuation the proxy sends before login.
IMAP_CONTINUATIONS = (*SASL_CHALLENGES, b"+ Ready for literal data")

imapListeners = st.sampled_from(
    [
        (TLSMode.STARTTLS, False),
        (TLSMode.STARTTLS, True),
        (TLSMode.PLAIN, True),
        (TLSMode.PLAIN, False),
        (TLSMode.IMPLICIT, False),
    ]
)


# What may follow a SASL challenge: the lines after it are responses, not
# commands, so only the next challenge, the exchange's end (its tagged
# reply: a refusal, or the login's OK) or a goodbye.
AFTER_CHALLENGE = re.compile(rb"\A(\+ |\* BYE |[^ ]+ (NO|BAD) |[^ ]+ OK \[CAPABILITY )")


def assertIMAPServerLines(output: bytes) -> None:
    lines = output.split(CRLF)
    assert lines[-1] == b"", f"output does not end with CRLF: {output[-80:]!r}"
    previous = b""
    for line in lines[:-1]:
        assert b"\n" not in line and b"\r" not in line, f"bare CR or LF in {line!r}"
        assert IMAP_OUTPUT_LINE.match(line), f"not an IMAP response line: {line!r}"
        assert not line.startswith(b"+ ") or line in IMAP_CONTINUATIONS, f"unexpected continuation {line!r}"
        if previous in SASL_CHALLENGES:
            assert AFTER_CHALLENGE.match(line), f"{line!r} while a SASL exchange was open"
        previous = line


# -- 1. IMAP before login ----------------------------------------------------------


@FUZZ
@given(
    listener=imapListeners,
    pieces=st.lists(preauthPieces(), min_size=1, max_size=10),
    sizes=splits,
    waits=pauses,
    timeOut=st.integers(0, 4).map(lambda draw: draw == 0),
)
def test_imap_preauth_survives_arbitrary_input_and_answers_only_well_formed_lines(
    usersDir: Path,
    listener: tuple[TLSMode, bool],
    pieces: list[bytes],
    sizes: list[int],
    waits: list[float],
    timeOut: bool,
) -> None:
    """Before login any byte stream, however split, gets only well-formed IMAP lines and a clean state."""
    ended, startedTLS = preauthSurvives(usersDir, listener, pieces, sizes, waits, timeOut)
    event(f"IMAP pre-login fuzz ended {ended}")
    event(f"IMAP pre-login fuzz started TLS: {startedTLS}")


def preauthSurvives(
    usersDir: Path,
    listener: tuple[TLSMode, bool],
    pieces: list[bytes],
    sizes: list[int],
    waits: list[float],
    timeOut: bool,
) -> None:
    """
    Play C{pieces} (split by C{sizes}, with C{waits} between them) into a
    connection before login and check everything it wrote and left behind.
    """
    tls, allowPlaintextAuth = listener
    fed = bytearray()
    with loggedFailures() as failures:
        connection = connect(str(usersDir), tls=tls, allowPlaintextAuth=allowPlaintextAuth)
        closing = Closing(connection.protocol, connection.transport)
        tlsWatch = TLSWatch(connection.transport, lastIMAPCommandIsSTARTTLS)
        for index, chunk in enumerate(writes(pieces, sizes)):
            fed.extend(chunk)
            connection.send(chunk)
            tlsWatch.check(fed)
            closing.check()
            if closing.lost:
                break
            connection.clock.advance(waits[index % len(waits)])
            tlsWatch.check(fed)
            closing.check()
            if closing.lost:
                break
        settle(connection.clock, closing)
        tlsWatch.check(fed)
        if timeOut and not closing.lost:
            connection.clock.advance(connection.protocol.context.config.preAuthTimeout + 1)
            closing.check()
        ended = f"{connection.protocol.state.name}, transport closed: {closing.lost}"
        statistic(f"IMAP AUTHENTICATE LOGIN reached {loginReached(connection.transport.value())}")
        assert connection.protocol.state is not State.LOGGING_IN, "a login was never answered"
        if connection.protocol.state is State.CLOSED and not closing.lost:
            raise AssertionError("state is CLOSED but the transport was not asked to disconnect")
        closing.finish()
        connection.clock.advance(3600)
    assertNoFailures(failures)
    closing.assertQuietAfterClose()
    assertIMAPServerLines(connection.transport.value())
    assertNoChallengeInTheClear(tlsWatch, tls, allowPlaintextAuth)
    assert connection.clock.getDelayedCalls() == []
    if connection.upstream.requests:
        assert tls is TLSMode.IMPLICIT or allowPlaintextAuth or tlsWatch.seen, "logged in over plaintext"
        assert connection.upstreamProtocol.transport.disconnecting, "upstream left open after the client left"
    return ended, tlsWatch.seen


# -- IMAP relay vocabulary -------------------------------------------------------

# Text that can neither announce a literal (no braces) nor name CAPABILITY
# (no Y), so that relayed lines pass unchanged.
_TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxzABCDEFGHIJKLMNOPQRSTUVWXZ0123456789 .,:;!?-_=/()[]<>*%#$&'+@^`|~"
safeText = st.text(alphabet=_TEXT_ALPHABET, max_size=12).map(str.encode)
safeAtoms = st.text(
    alphabet="abcdefghijklmnopqrstuvwxzABCDEFGHIJKLMNOPQRSTUVWXZ0123456789:*.-<>", min_size=1, max_size=8
).map(str.encode)
quotable = st.binary(max_size=10).map(lambda value: value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))


@dataclass(frozen=True, repr=False)
class Wire:
    """
    Bytes a client sends, what the upstream should get for them through the
    passthrough and the filtered relay (every literal goes upstream
    synchronising; a filtered relay answers synchronising literals itself
    and writes commands afresh, 8-bit quoted strings as literals), how many
    "+ Ready" lines the filtered relay sends for them and how many commands
    among them the proxy refuses itself.
    """

    sent: bytes
    passthrough: bytes
    filtered: bytes
    readyLines: int = 0
    refusals: int = 0

    @classmethod
    def plain(cls, data: bytes) -> Wire:
        return cls(data, data, data)

    @classmethod
    def join(cls, items: list[Wire], separator: bytes = b" ") -> Wire:
        return cls(
            separator.join(item.sent for item in items),
            separator.join(item.passthrough for item in items),
            separator.join(item.filtered for item in items),
            sum(item.readyLines for item in items),
            sum(item.refusals for item in items),
        )

    def __repr__(self) -> str:
        return f"Wire({self.sent!r})"

    def __add__(self, other: Wire) -> Wire:
        return Wire.join([self, other], b"")

    def refused(self) -> Wire:
        """
        This command, answered by the proxy and never relayed.
        """
        return Wire(self.sent, b"", b"", 0, 1)


def _clientLiteral(data: bytes, kind: str) -> Wire:
    binary = b"~" if kind.startswith("binary") else b""
    synchronising = binary + b"{%d}\r\n" % len(data) + data
    if kind in ("sync", "binary sync"):
        return Wire(synchronising, synchronising, synchronising, readyLines=1)
    return Wire(binary + b"{%d+}\r\n" % len(data) + data, synchronising, synchronising)


def _clientQuoted(value: bytes) -> Wire:
    sent = imapQuoted(value)
    if any(byte > 0x7E for byte in value):
        return Wire(sent, sent, b"{%d}\r\n" % len(value) + value)
    return Wire.plain(sent)


literalData = st.binary(max_size=24)
_ANNOUNCEMENT_AT_END = re.compile(rb"\{[0-9]+\}\r\n\Z")


def clientArguments(data: st.SearchStrategy[bytes], synchronising: bool = True) -> st.SearchStrategy[Wire]:
    """
    Atoms, quoted strings, literals of every kind holding C{data}, and lists
    of them.
    """
    kinds = ["sync", "nonsync", "binary sync", "binary nonsync"] if synchronising else ["nonsync", "binary nonsync"]
    literals = st.builds(_clientLiteral, data, st.sampled_from(kinds))
    simple = st.one_of(safeAtoms.map(Wire.plain), quotable.map(_clientQuoted), literals)
    return st.one_of(
        simple,
        st.lists(simple, max_size=3).map(lambda items: Wire.plain(b"(") + Wire.join(items) + Wire.plain(b")")),
    )


relayedNames = st.sampled_from(
    [
        b"NOOP",
        b"SELECT",
        b"EXAMINE",
        b"FETCH",
        b"UID FETCH",
        b"UID STORE",
        b"APPEND",
        b"SEARCH",
        b"LIST",
        b"STATUS",
        b"IDLE",
        b"CLOSE",
        b"EXPUNGE",
        b"CAPABILITY",
        b"ENABLE",
        b"NAMESPACE",
    ]
)
# What the proxy answers itself after login.
refusedNames = st.sampled_from([b"LOGIN", b"login", b"AUTHENTICATE", b"STARTTLS", b"COMPRESS", b"Compress"])
# Client tags never start with "s": the upstream's tagged replies below use
# tags no client command has, so none refuses a client's literal.
CLIENT_TAGS = [b"c1", b"c2", b"C3", b"c.4", b"c-5", b"a0001"]
clientTags = st.sampled_from(CLIENT_TAGS)
LOCAL_REPLY = re.compile(
    rb"\+ (?:Ready for literal data|go ahead)\r\n|(?:%s|u[0-9]+) BAD Command not available after login through this proxy\r\n"
    % b"|".join(re.escape(tag) for tag in CLIENT_TAGS)
)


def uniqueTags(commands: list[Wire]) -> list[Wire]:
    """
    Give every command a tag of its own, send IDLE without arguments and DONE
    only to end an IDLE, every IDLE ended by one, as clients do: the proxy
    refuses a tag still in use (its reply, or "+", would look like the
    other's), IDLE with arguments, a command during an IDLE, and a DONE
    outside one.
    """
    tagged: list[Wire] = []
    idling = False
    for index, command in enumerate(commands):
        if command.sent.startswith(b"DONE\r\n"):
            if idling:
                tagged.append(command)
                idling = False
            continue
        if command.sent.split(b" ")[1:2] == [b"IDLE"] and command.sent.split(b" ")[1:] != [b"IDLE\r\n"]:
            continue  # IDLE takes no arguments (the proxy refuses them)
        if idling:
            tagged.append(Wire.plain(b"DONE\r\n"))
        idling = command.sent.split(b" ")[1:] == [b"IDLE\r\n"]
        tag = command.sent.split(b" ", 1)[0]
        if command.sent.startswith(b"DONE\r\n") or not tag:
            tagged.append(command)
            continue
        new = b"u%d" % index

        def retag(data: bytes, tag: bytes = tag, new: bytes = new) -> bytes:
            return new + data[len(tag) :] if data.startswith(tag + b" ") else data

        tagged.append(
            Wire(
                retag(command.sent),
                retag(command.passthrough),
                retag(command.filtered),
                command.readyLines,
                command.refusals,
            )
        )
    return tagged


@st.composite
def clientCommands(draw: st.DrawFn, data: st.SearchStrategy[bytes] = literalData) -> Wire:
    """
    A well-formed command (any literals correctly sized), DONE, or a
    command the proxy refuses after login (its literals non-synchronising,
    since a client would not send the literal of a refused synchronising one).
    """
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return Wire.plain(b"DONE\r\n")
    if kind in (1, 2):
        arguments = draw(st.lists(clientArguments(data, synchronising=False), max_size=3))
        command = Wire.join([Wire.plain(draw(clientTags)), Wire.plain(draw(refusedNames)), *arguments])
        return (command + Wire.plain(CRLF)).refused()
    arguments = draw(st.lists(clientArguments(data), max_size=4))
    return Wire.join([Wire.plain(draw(clientTags)), Wire.plain(draw(relayedNames)), *arguments]) + Wire.plain(CRLF)


def assertResponsesWithLocalRepliesBetween(output: bytes, responses: list[bytes]) -> tuple[int, int]:
    """
    C{output} is the upstream's C{responses}, in order and each whole, with
    the proxy's own replies only between them; return how many "+ Ready"
    lines and refusals it holds.
    """
    position = 0
    remaining = list(responses)
    ready = refusals = 0
    while position < len(output):
        if remaining and output.startswith(remaining[0], position):
            position += len(remaining.pop(0))
            continue
        local = LOCAL_REPLY.match(output, position)
        assert local is not None, (
            f"at {position}, neither the next upstream response {remaining[:1]!r} "
            f"nor a reply of the proxy's own: {output[position : position + 120]!r}"
        )
        if local.group().startswith(b"+"):
            ready += 1
        else:
            refusals += 1
        position = local.end()
    assert not remaining, f"upstream responses never relayed: {remaining!r}"
    return ready, refusals


def _upstreamLiteral(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


upstreamTags = st.sampled_from([b"s1", b"s2", b"S.3"])
numbers = st.integers(0, 99999)
upstreamStatusResponses = st.one_of(
    st.builds(lambda n: b"* %d EXISTS\r\n" % n, numbers),
    st.builds(lambda n, text: b"* OK [UIDNEXT %d] %s\r\n" % (n, text), numbers, safeText),
    st.builds(lambda text: b"* OK %s {5}\r\n" % text, safeText),  # resp-text never announces a literal
    st.builds(lambda status, text: b"* %s %s\r\n" % (status, text), st.sampled_from([b"NO", b"BAD", b"BYE"]), safeText),
    st.just(b"* SEARCH 1 2 3\r\n"),
    st.just(b"* FLAGS (\\Seen \\Answered $Junk)\r\n"),
    st.builds(
        lambda tag, status, code, text: b"%s %s %s%s\r\n" % (tag, status, code, text),
        upstreamTags,
        st.sampled_from([b"OK", b"NO", b"BAD"]),
        st.sampled_from([b"", b"[READ-WRITE] ", b"[ALERT] ", b"[TRYCREATE] "]),
        safeText,
    ),
    st.builds(lambda tag: b"%s OK done {7}\r\n" % tag, upstreamTags),
)
# Responses carrying literals: the only ones a relay can be in the middle of
# when a reply of its own is due.
upstreamLiteralResponses = st.one_of(
    st.builds(
        lambda n, data: b"* %d FETCH (UID %d BODY[] %s)\r\n" % (n, n, _upstreamLiteral(data)),
        numbers,
        st.binary(max_size=40),
    ),
    st.builds(
        lambda n, head, body: (
            b"* %d FETCH (BODY[HEADER] %s BODY[TEXT] %s FLAGS (\\Seen))\r\n"
            % (n, _upstreamLiteral(head), _upstreamLiteral(body))
        ),
        numbers,
        st.binary(max_size=20),
        st.binary(max_size=20),
    ),
    st.builds(lambda data: b'* LIST (\\HasNoChildren) "/" %s\r\n' % _upstreamLiteral(data), st.binary(max_size=12)),
)
upstreamDataResponses = st.one_of(upstreamStatusResponses, upstreamLiteralResponses)
upstreamContinuations = st.one_of(
    st.builds(lambda text: b"+ go %s\r\n" % text, safeText), st.just(b"+\r\n"), st.just(b"+ {3}\r\n")
)
upstreamResponses = st.one_of(upstreamDataResponses, upstreamContinuations)


def interleave(
    clientChunks: list[bytes], upstreamChunks: list[bytes], order: list[bool]
) -> Iterator[tuple[str, bytes]]:
    """
    Both chunk sequences, each in its own order, merged as C{order} says
    (C{True}: client first), then alternately.
    """
    client, upstream = list(clientChunks), list(upstreamChunks)
    preferences = iter(order)
    preferClient = False
    while client or upstream:
        preferClient = next(preferences, not preferClient)
        if client and (preferClient or not upstream):
            yield "client", client.pop(0)
        else:
            yield "upstream", upstream.pop(0)


LITERAL_PLUS = [b"IMAP4rev1", b"LITERAL+", b"IDLE", b"MOVE"]
NO_LITERAL_PLUS = [b"IMAP4rev1", b"IDLE", b"MOVE"]


# -- 2. IMAP relay after login -----------------------------------------------------


@FUZZ
@pytest.mark.parametrize("filtered", [False, True], ids=["passthrough", "filtered"])
@given(
    data=st.data(),
    responses=st.lists(upstreamResponses, min_size=1, max_size=10),
    clientSizes=splits,
    upstreamSizes=splits,
    order=st.lists(st.booleans(), max_size=40),
    literalPlus=st.booleans(),
)
def test_imap_relay_forwards_well_framed_traffic_byte_for_byte_in_both_directions(
    usersDir: Path,
    filtered: bool,
    data: st.DataObject,
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
    literalPlus: bool,
) -> None:
    """Well-framed commands and responses, interleaved and split anyhow, cross the relay unchanged and whole."""
    commands = data.draw(st.lists(clientCommands(literalData), min_size=1, max_size=8), label="commands")
    relayByteForByte(usersDir, filtered, commands, responses, clientSizes, upstreamSizes, order, literalPlus)


def relayByteForByte(
    usersDir: Path,
    filtered: bool,
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
    literalPlus: bool,
) -> None:
    """
    Relay C{commands} and C{responses} and check that each side gets what
    the other sent, with the proxy's own replies only between responses.
    """
    capabilities = LITERAL_PLUS if literalPlus else NO_LITERAL_PLUS
    # Every literal goes upstream synchronising and the relay takes the next
    # "+" as the answer to it: a server sends none unasked.
    responses = [response for response in responses if not response.startswith(b"+")] or [b"* 0 EXISTS\r\n"]
    commands = uniqueTags(commands)
    clientStream = Wire.join(commands, b"")
    seen = Scripted()
    with loggedFailures() as failures:
        connection = loggedIn(
            usersDir, upstream=UpstreamScript(capabilities=capabilities), filters=[seen] if filtered else []
        )
        # Relayed as they are, synchronising literals wait for the upstream's "+".
        upstream = ContinuingUpstream(connection, responseBoundaries(responses))
        clientChunks = writes([command.sent for command in commands], clientSizes)
        upstreamChunks = writes(responses, upstreamSizes)
        for side, chunk in interleave(clientChunks, upstreamChunks, order):
            if side == "client":
                connection.send(chunk)
            else:
                upstream.deliver(chunk)
            upstream.continueLiterals()
            assert not connection.transport.disconnecting
        toClient = connection.transport.value()
        toUpstream = upstream.transport.value()
        connection.protocol.connectionLost(Failure(ConnectionDone()))
    assertNoFailures(failures)
    assert toUpstream == (clientStream.filtered if filtered else clientStream.passthrough)
    ready, refusals = assertResponsesWithLocalRepliesBetween(toClient, responses)
    if filtered:
        # The proxy answers every synchronising literal itself; the
        # upstream's "+" for an IDLE is relayed.
        assert ready == clientStream.readyLines + upstream.idlesAnswered
    assert refusals == clientStream.refusals


@FUZZ
@given(
    commands=st.lists(clientCommands(literalData), min_size=1, max_size=8),
    responses=st.lists(upstreamDataResponses, min_size=1, max_size=10),
    clientSizes=splits,
    upstreamSizes=splits,
    order=st.lists(st.booleans(), max_size=40),
)
def test_filtered_relay_without_literal_plus_upstream_waits_for_its_continuations_and_hides_them(
    usersDir: Path,
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
) -> None:
    """A filtered relay sends synchronising literals upstream one continuation at a time and never shows those."""
    relayWaitingForContinuations(usersDir, commands, responses, clientSizes, upstreamSizes, order)


class ContinuingUpstream:
    """
    The upstream side of an in-memory session that, like a server, answers
    each synchronising literal and each IDLE sent to it with "+", in order,
    but only between two of its own responses (at C{boundaries} of what it
    delivered).
    """

    def __init__(self, connection: Any, boundaries: set[int]) -> None:
        self.connection = connection
        self.transport = connection.upstreamProtocol.transport
        self.transport.clear()
        self.boundaries = boundaries
        self.delivered = 0
        self._framer = IMAPFramer(1024 * 1024)
        self._framed = 0
        self._owedAt: deque[tuple[int, bool]] = deque()
        self.idlesAnswered = 0

    def deliver(self, chunk: bytes) -> None:
        self.connection.fromUpstream(chunk)
        self.delivered += len(chunk)

    def continueLiterals(self) -> None:
        while self.delivered in self.boundaries:
            received = self.transport.value()
            for framed in self._framer.feed(received[self._framed :]):
                self._framed += len(framed.raw) if isinstance(framed, Line) else len(framed.data)
                if not isinstance(framed, Line):
                    continue
                parsed = None if framed.continuation else tagAndCommand(framed.raw)
                # A server answers IDLE with "+", IDLE with arguments with BAD.
                idle = parsed is not None and parsed[1] == b"IDLE" and framed.complete and len(framed.raw.split()) == 2
                if idle or framed.literal is not None and not framed.nonSynchronizing:
                    self._owedAt.append((self._framed, idle))
            if not self._owedAt or self._owedAt[0][0] > len(received):
                return
            _, idle = self._owedAt.popleft()
            self.idlesAnswered += idle
            self.connection.fromUpstream(b"+ go ahead\r\n")


def relayWaitingForContinuations(
    usersDir: Path,
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
) -> None:
    """
    Relay C{commands} and C{responses} through a filter to an upstream
    without LITERAL+ that answers each synchronising literal with "+", and
    check that each side gets what the other sent.
    """
    commands = uniqueTags(commands)
    clientStream = Wire.join(commands, b"")
    with loggedFailures() as failures:
        connection = loggedIn(usersDir, upstream=UpstreamScript(capabilities=NO_LITERAL_PLUS), filters=[Scripted()])
        upstream = ContinuingUpstream(connection, responseBoundaries(responses))
        clientChunks = writes([command.sent for command in commands], clientSizes)
        upstreamChunks = writes(responses, upstreamSizes)
        for side, chunk in interleave(clientChunks, upstreamChunks, order):
            if side == "client":
                connection.send(chunk)
            else:
                upstream.deliver(chunk)
            upstream.continueLiterals()
            assert not connection.transport.disconnecting
        toClient = connection.transport.value()
        toUpstream = upstream.transport.value()
        connection.protocol.connectionLost(Failure(ConnectionDone()))
    assertNoFailures(failures)
    assert toUpstream == clientStream.filtered
    ready, refusals = assertResponsesWithLocalRepliesBetween(toClient, responses)
    assert (ready, refusals) == (clientStream.readyLines + upstream.idlesAnswered, clientStream.refusals)


def responseBoundaries(responses: list[bytes]) -> set[int]:
    return {sum(len(response) for response in responses[:index]) for index in range(len(responses) + 1)}


def _bigLiteral(prefix: bytes, plus: bytes, data: bytes) -> bytes:
    return prefix + b"{300000%s}\r\n" % plus + data


clientNoise = st.one_of(
    clientCommands().map(lambda command: command.sent),
    # What the proxy answers itself after login, literals and all.
    st.builds(
        lambda tag, words, end: joinCommand(tag, words, end),
        clientTags,
        st.one_of(
            st.lists(anyAstrings, max_size=3).map(lambda arguments: [b"LOGIN", *arguments]),
            st.lists(anyAstrings, max_size=2).map(lambda arguments: [b"AUTHENTICATE", b"PLAIN", *arguments]),
            st.sampled_from([[b"STARTTLS"], [b"COMPRESS", b"DEFLATE"], [b"IDLE"], [b"DELETE", b"x"], [b"NOOP"]]),
        ),
        lineEnds,
    ),
    st.just(b"DONE\r\n"),
    st.builds(
        _bigLiteral,
        st.sampled_from([b"c1 APPEND INBOX ", b"c2 LOGIN ", b"c3 SELECT ", b"", b"c4 X {0}\r\n ", b"c5 NOOP {0}\r\n "]),
        st.sampled_from([b"", b"+"]),
        st.binary(max_size=30),
    ),
    preauthPieces(),
    st.binary(max_size=30),
)
upstreamNoise = st.one_of(
    upstreamResponses,
    st.builds(
        lambda tag, status: b"%s %s done\r\n" % (tag, status),
        st.sampled_from([b"c1", b"c2", b"C3", b"c4", b"mpi1", b"mpi2"]),
        st.sampled_from([b"OK", b"NO", b"BAD"]),
    ),
    st.sampled_from(
        [
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS COMPRESS=DEFLATE\r\n",
            b"s1 OK [CAPABILITY IMAP4rev1 SASL-IR] done\r\n",
            b"* BYE shutting down\r\n",
            b"+ idling\r\n",
            b"* 1 FETCH (BODY[] {0}\r\n)\r\n",
        ]
    ),
    st.builds(lambda data: _bigLiteral(b"* 1 FETCH (BODY[] ", b"", data), st.binary(max_size=30)),
    st.builds(
        lambda size, data: b"* 2 FETCH (BODY[] {%d}\r\n" % size + data, st.integers(0, 40), st.binary(max_size=30)
    ),
    st.binary(max_size=30),
)


def mixedVerdicts() -> Scripted:
    """
    A filter that passes most things but also rejects, rewrites, drops and
    decides through (already fired) Deferreds.
    """

    def onCommand(command: Any) -> Any:
        if command.name == b"DELETE":
            return Reject("Not here", "NO", "NOPERM")
        if command.name == b"NOOP":
            return succeed(PASS)
        return PASS

    def onResponse(response: Any) -> Any:
        if response.name == b"EXISTS":
            return DROP
        if response.name == b"FETCH":
            return succeed(PASS)
        return PASS

    return Scripted(onCommand=onCommand, onResponse=onResponse)


relayFilters = st.sampled_from(["none", "pass", "mixed"])
relayCapabilities = st.sampled_from(
    [LITERAL_PLUS, NO_LITERAL_PLUS, [b"IMAP4rev1"], [b"IMAP4rev1", b"LITERAL+"], [b"IMAP4rev1", b"LITERAL+", b"MOVE"]]
)
relayActions = st.lists(st.sampled_from(["client"] * 4 + ["upstream"] * 4 + ["tick"]), max_size=40)
ticks = st.lists(st.sampled_from([1.0, 16.0, 25 * 60.0 + 1]), min_size=1, max_size=4)


def closeBothSides(connection: Any, closing: Closing) -> None:
    """
    Deliver connectionLost to whichever side the proxy asked to close, as
    the reactor would, until neither is waiting for it.
    """
    upstream = connection.upstreamProtocol
    for _ in range(3):
        closing.check()
        if upstream.connected and upstream.transport.disconnecting:
            upstream.connectionLost(Failure(ConnectionDone()))
            continue
        return


# -- 2b. IMAP relay robustness -------------------------------------------------------


@FUZZ
@given(
    filters=relayFilters,
    capabilities=relayCapabilities,
    clientPieces=st.lists(clientNoise, max_size=8),
    upstreamPieces=st.lists(upstreamNoise, max_size=8),
    clientSizes=splits,
    upstreamSizes=splits,
    actions=relayActions,
    tickLengths=ticks,
    upstreamLostAt=st.one_of(st.none(), st.integers(0, 40)),
)
def test_imap_relay_survives_arbitrary_traffic_both_ways(
    usersDir: Path,
    filters: str,
    capabilities: list[bytes],
    clientPieces: list[bytes],
    upstreamPieces: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    actions: list[str],
    tickLengths: list[float],
    upstreamLostAt: int | None,
) -> None:
    """Whatever client and upstream send after login, in any order and with timers firing, nothing raises or leaks."""
    relaySurvives(
        usersDir,
        filters,
        capabilities,
        clientPieces,
        upstreamPieces,
        clientSizes,
        upstreamSizes,
        actions,
        tickLengths,
        upstreamLostAt,
    )


def relaySurvives(
    usersDir: Path,
    filters: str,
    capabilities: list[bytes],
    clientPieces: list[bytes],
    upstreamPieces: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    actions: list[str],
    tickLengths: list[float],
    upstreamLostAt: int | None,
) -> None:
    """
    Play the given traffic and timers through a logged-in session and check
    that nothing raises, logs a failure, writes after closing or leaks.
    """
    chain = {"none": [], "pass": [Scripted()], "mixed": [mixedVerdicts()]}[filters]
    with loggedFailures() as failures:
        connection = loggedIn(usersDir, upstream=UpstreamScript(capabilities=capabilities), filters=chain)
        closing = Closing(connection.protocol, connection.transport)
        clientChunks = writes(clientPieces, clientSizes)
        upstreamChunks = writes(upstreamPieces, upstreamSizes)
        steps = [*actions, *["client"] * len(clientChunks), *["upstream"] * len(upstreamChunks)]
        tickIndex = 0
        for index, step in enumerate(steps):
            if closing.lost:
                break
            if index == upstreamLostAt and connection.upstreamProtocol.connected:
                connection.upstreamProtocol.connectionLost(Failure(ConnectionDone()))
            elif step == "client" and clientChunks:
                connection.send(clientChunks.pop(0))
            elif step == "upstream" and upstreamChunks and connection.upstreamProtocol.connected:
                connection.fromUpstream(upstreamChunks.pop(0))
            elif step == "tick":
                connection.clock.advance(tickLengths[tickIndex % len(tickLengths)])
                tickIndex += 1
            closeBothSides(connection, closing)
        statistic(f"IMAP relay fuzz: filters {filters}, client side closed by the proxy: {closing.lost}")
        closing.finish()
        closeBothSides(connection, closing)
        connection.clock.advance(3600)
    assertNoFailures(failures)
    closing.assertQuietAfterClose()
    assert connection.clock.getDelayedCalls() == []
    assert not connection.upstreamProtocol.connected, "upstream left open after the client left"


# -- POP3 vocabulary ------------------------------------------------------------------

pop3Keywords = st.sampled_from(
    [
        b"USER",
        b"PASS",
        b"AUTH",
        b"STLS",
        b"CAPA",
        b"STAT",
        b"LIST",
        b"UIDL",
        b"RETR",
        b"TOP",
        b"DELE",
        b"RSET",
        b"NOOP",
        b"QUIT",
        b"APOP",
        b"LAST",
        b"XTND",
        b"capa",
        b"list",
        b"Retr",
        b"",
    ]
)
messageNumbers = st.sampled_from([b"1", b"2", b"3", b"2", b"0", b"4", b"01"])
pop3Arguments = st.one_of(
    messageNumbers,
    st.sampled_from(
        [
            b"99999999999999999999",
            b"-1",
            b"x",
            b"alice",
            b"alicepw",
            b"PLAIN",
            b"plain",
            b"LOGIN",
            b"login",
            b"*",
            b"=",
            plainResponse((b"", b"alice", b"alicepw")),
            plainResponse((b"bob", b"alice", b"alicepw")),
            b64(b"alice"),
            b64(b"alicepw"),
        ]
    ),
    st.binary(min_size=1, max_size=8).map(lambda value: value.replace(b"\n", b"n")),
)
pop3Ends = st.sampled_from([CRLF] * 8 + [b"\n", b"", b" \r\n"])
pop3Lines = st.one_of(
    st.builds(
        lambda keyword, arguments, separator, end: separator.join([keyword, *arguments]) + end,
        pop3Keywords,
        st.lists(pop3Arguments, max_size=3),
        st.sampled_from([b" ", b" ", b" ", b"  ", b"\t"]),
        pop3Ends,
    ),
    # Well-formed TRANSACTION commands on existing messages.
    st.builds(
        lambda command, end: command + end,
        st.sampled_from(
            [
                b"STAT",
                b"LIST",
                b"LIST 2",
                b"UIDL",
                b"UIDL 3",
                b"RETR 1",
                b"RETR 2",
                b"retr 2",
                b"RETR 3",
                b"TOP 2 1",
                b"TOP 2 0",
                b"TOP 3 99",
                b"DELE 2",
                b"DELE 1",
                b"RSET",
                b"NOOP",
                b"CAPA",
                b"LAST",
            ]
        ),
        pop3Ends,
    ),
)
pop3Pieces = st.one_of(
    pop3Lines,
    loginResponses.map(lambda response: response + CRLF),
    st.sampled_from(
        [
            b"USER alice\r\nPASS alicepw\r\n",
            b"USER alice\r\nPASS wrong\r\n",
            b"AUTH PLAIN " + plainResponse((b"", b"alice", b"alicepw")) + CRLF,
            b"AUTH PLAIN\r\n" + plainResponse((b"alice", b"alice", b"alicepw")) + CRLF,
            b"AUTH LOGIN\r\n" + b64(b"alice") + CRLF + b64(b"alicepw") + CRLF,
            b"AUTH LOGIN " + b64(b"alice") + CRLF + b64(b"wrong") + CRLF,
            b"AUTH LOGIN\r\n",
            b"AUTH login =\r\n",
            b"*\r\n",
            b"STLS\r\n",
            b"X" * (MAX_LINE + 10) + CRLF,
            b"Y" * 9000,
        ]
    ),
    st.binary(max_size=30),
)
pop3Listeners = st.sampled_from(
    [
        (TLSMode.PLAIN, True),
        (TLSMode.PLAIN, True),
        (TLSMode.STARTTLS, True),
        (TLSMode.IMPLICIT, False),
        (TLSMode.PLAIN, False),
    ]
)
POP3_STATUS = re.compile(rb"\A(\+OK|-ERR)( |\Z)")


def pop3Commands(stream: bytes) -> list[tuple[bytes, list[bytes]] | None]:
    """
    The commands a POP3 server reads from C{stream}, as (upper-case
    keyword, arguments); C{None} for a line too long.
    """
    commands: list[tuple[bytes, list[bytes]] | None] = []
    for line in stream.split(b"\n")[:-1]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE:
            commands.append(None)
            continue
        keyword, _, rest = line.partition(b" ")
        commands.append((keyword.upper(), rest.split()))
    return commands


def multiLineWhenOK(command: tuple[bytes, list[bytes]] | None) -> bool:
    """
    C{True} if a +OK to C{command} is followed by lines up to a "." line.
    """
    if command is None:
        return False
    keyword, arguments = command
    if keyword in (b"RETR", b"TOP", b"CAPA"):
        return True
    return keyword in (b"LIST", b"UIDL", b"AUTH") and not arguments


def assertPOP3Responses(output: bytes, commands: list[tuple[bytes, list[bytes]] | None], closed: bool) -> None:
    """
    C{output} is a greeting, then one status line per command, in order, multi-line +OK
    replies running up to their "." line with their lines byte-stuffed.
    """
    lines = output.split(CRLF)
    # A connection the proxy closed may end in the middle of a response.
    assert lines.pop() == b"" or closed, f"output does not end with CRLF: {output[-80:]!r}"
    for line in lines:
        assert b"\n" not in line and b"\r" not in line, f"bare CR or LF in {line!r}"
    assert lines and lines[0].startswith(b"+OK "), "no greeting"
    position = 1
    index = 0
    saslResponse = False
    while position < len(lines):
        status = lines[position]
        position += 1
        command = None if saslResponse else (commands[index] if index < len(commands) else None)
        assert index < len(commands) or status.startswith(b"-ERR "), f"{status!r} answers no command"
        index += 1
        if status.startswith(b"+ "):
            assert status in SASL_CHALLENGES, f"not a SASL challenge: {status!r}"
            assert saslResponse or (command is not None and command[0] == b"AUTH"), f"{status!r} answers {command!r}"
            saslResponse = True
            continue
        # A SASL exchange ends refused or logged in; the responses are no commands.
        assert not saslResponse or status.startswith(b"-ERR") or status == b"+OK Logged in.", status
        saslResponse = False
        assert POP3_STATUS.match(status), f"not a POP3 status line: {status!r}"
        if not (status.startswith(b"+OK") and multiLineWhenOK(command)):
            continue
        while position < len(lines) and lines[position] != b".":
            assert not lines[position].startswith(b".") or lines[position].startswith(b".."), "not byte-stuffed"
            position += 1
        if position == len(lines):
            assert closed, f"multi-line reply to {command!r} never ended"
        position += 1


def pop3UpstreamReply(keyword: bytes, arguments: list[bytes], draw: Any) -> bytes:
    """
    What a POP3 server might answer to a relayed command.
    """
    if not draw(st.sampled_from([True, True, True, False])):
        return b"-ERR no\r\n"
    if keyword in (b"RETR", b"TOP") or (keyword in (b"LIST", b"UIDL") and not arguments):
        body = draw(st.lists(st.sampled_from([b"line", b".dot", b"..", b".", b"", b"Subject: x"]), max_size=4))
        stuffed = [b"." + line if line.startswith(b".") else line for line in body]
        return b"+OK\r\n" + b"".join(line + CRLF for line in stuffed) + b".\r\n"
    return b"+OK done\r\n"


# -- 3. POP3 before and after login -----------------------------------------------------


@FUZZ
@pytest.mark.parametrize("mode", ["bridge", "relay"])
@given(
    listener=pop3Listeners,
    login=st.sampled_from(
        [
            b"",
            b"USER alice\r\nPASS alicepw\r\n",
            b"AUTH PLAIN AGFsaWNlAGFsaWNlcHc=\r\n",
            b"AUTH LOGIN YWxpY2U=\r\nYWxpY2Vwdw==\r\n",
            b"AUTH LOGIN\r\nYWxpY2U=\r\nYWxpY2Vwdw==\r\n",
        ]
    ),
    pieces=st.lists(pop3Pieces, min_size=1, max_size=12),
    sizes=splits,
    holdMaildrop=st.booleans(),
    data=st.data(),
)
def test_pop3_survives_arbitrary_commands_and_answers_each_with_one_well_formed_response(
    usersDir: Path,
    mode: str,
    listener: tuple[TLSMode, bool],
    login: bytes,
    pieces: list[bytes],
    sizes: list[int],
    holdMaildrop: bool,
    data: st.DataObject,
) -> None:
    """Any POP3 input, however split, gets one +OK/-ERR response per command and stuffed multi-line replies."""
    tls, allowPlaintextAuth = listener
    backends = FakeBackends()
    maildrop = backends.maildrop
    maildrop.hold = holdMaildrop
    fed = bytearray()
    toUpstream: list[bytes] = []
    upstreamOutput = bytearray()

    with loggedFailures() as failures:
        connection = connectPOP3(
            usersDir,
            tls=tls,
            allowPlaintextAuth=allowPlaintextAuth,
            protocol="imap" if mode == "bridge" else "pop3",
            backends=backends,
        )
        closing = Closing(connection.protocol, connection.transport)

        def playUpstream(everything: bool) -> None:
            upstream = backends.upstream
            if upstream is None or not upstream.connected:
                return
            for line in backends.sent.split(CRLF)[:-1]:
                keyword, *arguments = line.split(b" ")
                toUpstream.append(line)
                upstreamOutput.extend(pop3UpstreamReply(keyword, arguments, data.draw))
            size = len(upstreamOutput) if everything else data.draw(st.integers(0, len(upstreamOutput)))
            if size:
                chunk = bytes(upstreamOutput[:size])
                del upstreamOutput[:size]
                upstream.dataReceived(chunk)

        def release(everything: bool) -> None:
            while maildrop.held and (everything or data.draw(st.booleans())):
                maildrop.held.pop(0).callback(None)
                closing.check()

        def step(everything: bool = False) -> None:
            release(everything)
            playUpstream(everything)
            closing.check()
            if not closing.lost and data.draw(st.integers(0, 9)) == 0:
                settle(connection.clock, closing)

        tlsWatch = TLSWatch(connection.transport, lastPOP3CommandIsSTLS)
        for chunk in writes([login, *pieces], sizes):
            if closing.lost:
                break
            fed.extend(chunk)
            connection.send(chunk)
            tlsWatch.check(fed)
            closing.check()
            step()
            tlsWatch.check(fed)
        for _ in range(30):
            # Answer everything still pending, until nothing is.
            if closing.lost:
                break
            step(everything=True)
            settle(connection.clock, closing)
            tlsWatch.check(fed)
            upstream = backends.upstream
            unanswered = upstream is not None and upstream.connected and upstream.transport.value()
            if not maildrop.held and not upstreamOutput and not unanswered:
                break
        closed = closing.lost
        event(f"POP3 {mode} fuzz ended {connection.protocol.state.name}, closed by the proxy: {closed}")
        event(f"POP3 AUTH LOGIN reached {loginReached(connection.transport.value())}")
        closing.finish()
        connection.clock.advance(3600)
    assertNoFailures(failures)
    closing.assertQuietAfterClose()
    assertPOP3Responses(connection.transport.value(), pop3Commands(bytes(fed)), closed)
    assertNoChallengeInTheClear(tlsWatch, tls, allowPlaintextAuth)
    assert connection.clock.getDelayedCalls() == []
    if backends.requests:
        assert tls is TLSMode.IMPLICIT or allowPlaintextAuth or tlsWatch.seen, "logged in over plaintext"
    assert all(line.split(b" ")[0] in RELAYED for line in toUpstream), f"relayed upstream: {toUpstream!r}"
    if backends.upstream is not None and connection.protocol.relay is not None:
        assert backends.upstream.transport.disconnecting, "upstream left open after the client left"
    if connection.protocol.bridge is not None:
        assert {"abandon", "commit"} & set(maildrop.calls), "maildrop neither committed nor abandoned"
