"""
Findings of the protocol fuzz tests (test_fuzz_protocols.py), each with a
minimal reproduction, then the property that found it where one applies.
All are fixed; the properties in test_fuzz_protocols.py now run without
steering around them.

A. Zero-length literals.  IMAPFramer emitted no LiteralChunk for a {0}
   literal, and the consumers (relay._Assembly, server._PendingCommand)
   only record a literal when its last chunk arrives, so an empty literal
   vanished: the text/literal parts of the command or response shifted.

B. Literal data sent together with a synchronising literal that the relay
   refuses (LOGIN/AUTHENTICATE/STARTTLS/COMPRESS after login, or a filter's
   Reject of a streamed command): the framer has already framed the literal
   when the relay cancels it.  The leftover LiteralChunk hit an assertion in
   the filtered relay, so did (B2) the rest of that line framed as a
   continuation in the same read, and (B3) the passthrough relay sent those
   octets upstream unexamined, so a command the proxy refuses (COMPRESS,
   STARTTLS...) reached the upstream as the literal of a refused LOGIN.

C. Filtered relay: Relay._flushOutbound looked for a synchronising literal
   announcement at the end of every part it sent, literal data included, so
   literal data ending in "{n}" CRLF stalled the command and every later
   one.  Also (C2), with an upstream without LITERAL+, a line without a tag
   (DONE) was sent at once, ahead of a command still waiting for the
   upstream's "+".

D. POP3: while a login was in progress (the upstream or maildrop slow to
   open), the pre-login idle timeout's "-ERR Autologout" went out as if it
   answered PASS.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mailproxy.config import TLSMode
from mailproxy.filters.policy import PolicyFilter
from mailproxy.imap.model import parseResponse
from tests.support import ProxyConnection, UpstreamScript, connect, loggedIn
from tests.test_fuzz_protocols import (
    FUZZ,
    LITERAL_PLUS,
    NO_LITERAL_PLUS,
    Wire,
    clientCommands,
    literalData,
    relayByteForByte,
    relayWaitingForContinuations,
    splits,
    upstreamDataResponses,
    upstreamResponses,
    usersDir,  # noqa: F401 (the fixture)
)
from tests.test_imap_relay import Scripted
from tests.test_pop3_server import FakeBackends
from tests.test_pop3_server import connect as connectPOP3


def filteredSession(directory: Path, *filters: object, capabilities: list[bytes] = LITERAL_PLUS) -> ProxyConnection:
    """
    A logged-in session through C{filters} (a passing one by default).
    """
    return loggedIn(
        directory, upstream=UpstreamScript(capabilities=capabilities), filters=list(filters) or [Scripted()]
    )


# -- A. zero-length literals ----------------------------------------------------------


def test_filtered_relay_forwards_a_command_with_an_empty_literal_unchanged(tmp_path: Path) -> None:
    """(C since A's fix): a command whose literal data ends in "{1}" CRLF stops before its last line."""
    connection = filteredSession(tmp_path)
    connection.send(b"c1 APPEND INBOX {0+}\r\n {5+}\r\n{1}\r\n\r\n")
    # Upstream every literal is synchronising: each waits for the upstream's "+".
    assert connection.upstream.sent == b"c1 APPEND INBOX {0}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent == b"c1 APPEND INBOX {0}\r\n {5}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent == b"c1 APPEND INBOX {0}\r\n {5}\r\n{1}\r\n\r\n"
    assert connection.received() == b""


def test_append_size_limit_holds_for_a_multiappend_starting_with_an_empty_message(tmp_path: Path) -> None:
    """(A): max_append_size is bypassed by an empty first message and a message ending in "{1+}" CRLF."""
    connection = filteredSession(tmp_path, PolicyFilter(maxAppendSize=100))
    message = b"x" * 144 + b"{1+}\r\n"
    connection.send(b"c1 APPEND INBOX {0+}\r\n {150+}\r\n" + message + b"\r\n")
    # Today the filter sees two small "literals" (" {150+}\r\n" and "\r\n"),
    # passes the command and the 150-octet message reaches the upstream.
    assert connection.received().startswith(b"c1 NO [TOOBIG]")
    assert connection.upstream.sent == b""


def test_filtered_relay_survives_an_empty_literal_before_a_large_one(tmp_path: Path) -> None:
    """(A): AssertionError in model._textSegments escapes dataReceived."""
    connection = filteredSession(tmp_path)
    connection.send(b"c1 SEARCH {0}\r\n {300000}\r\n")
    # Only APPEND's message literals may stream past the filters.
    assert (
        connection.received()
        == b"+ Ready for literal data\r\nc1 BAD [TOOBIG] Literal too large for a filtered command\r\n"
    )
    assert connection.upstream.sent == b""


def test_response_filters_see_an_empty_literal_in_a_response(tmp_path: Path) -> None:
    """(A): a response filter gets a FETCH with no arguments instead of (BODY[] "" FLAGS (x))."""
    seen = Scripted()
    connection = filteredSession(tmp_path, seen)
    first, rest = b"* 1 FETCH (BODY[] {0}\r\n", b" FLAGS (x))\r\n"
    connection.fromUpstream(first + rest)
    assert connection.received() == first + rest
    assert seen.responses[-1].arguments == parseResponse([first, b"", rest]).arguments


def test_login_with_an_empty_literal_password_fails_like_a_wrong_password(tmp_path: Path) -> None:
    """(A): before login, LOGIN with a {0} literal gets "BAD invalid character in atom"."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a LOGIN alice {0}\r\n\r\n")
    connection.clock.advance(30)
    assert (
        connection.received() == b"+ Ready for literal data\r\na NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )


@FUZZ
@given(
    commands=st.lists(clientCommands(literalData), max_size=8),
    responses=st.lists(upstreamResponses, max_size=10),
    clientSizes=splits,
    upstreamSizes=splits,
    order=st.lists(st.booleans(), max_size=40),
)
def test_filtered_relay_forwards_traffic_with_empty_literals_byte_for_byte(
    usersDir: Path,  # noqa: F811
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
) -> None:
    """(A): the byte-for-byte relay property, filtered, with empty literals allowed."""
    relayByteForByte(usersDir, True, commands, responses, clientSizes, upstreamSizes, order, True)


# -- B. literal data behind a refused synchronising literal --------------------------------


def test_filtered_relay_survives_a_refused_login_sent_with_its_literal(tmp_path: Path) -> None:
    """(B): AssertionError in Relay._filteredFromClient escapes dataReceived."""
    connection = filteredSession(tmp_path)
    connection.send(b"c1 LOGIN {5}\r\nalice")
    assert connection.received().startswith(b"c1 BAD ")


def test_filtered_relay_survives_a_rejected_large_append_sent_with_its_data(tmp_path: Path) -> None:
    """(B): the same AssertionError after a filter rejects a streamed APPEND."""
    connection = filteredSession(tmp_path, PolicyFilter(maxAppendSize=100))
    connection.send(b"c1 APPEND INBOX {300000}\r\nFrom: x\r\n")
    assert connection.received().startswith(b"c1 NO [TOOBIG]")
    assert connection.upstream.sent == b""


def test_filtered_relay_survives_the_rest_of_a_refused_commands_line_sent_with_its_literal(tmp_path: Path) -> None:
    """(B2): AssertionError ("assert command is not None") in Relay._filteredFromClient escapes dataReceived."""
    connection = filteredSession(tmp_path)
    connection.send(b"c1 LOGIN {5}\r\nalice pw\r\n")
    assert connection.received().startswith(b"c1 BAD ")


def test_passthrough_relay_never_sends_upstream_a_command_it_refuses(tmp_path: Path) -> None:
    """(B3): sent as the literal of a refused LOGIN, COMPRESS reaches the upstream unexamined."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS))
    connection.send(b"c1 LOGIN {22}\r\nc2 COMPRESS DEFLATE\r\n\r\n")
    assert connection.received().startswith(b"c1 BAD ")
    # Today the upstream gets b"c2 COMPRESS DEFLATE\r\n\r\n" and would start compressing.
    assert b"COMPRESS" not in connection.upstream.sent


def test_literal_data_ending_like_an_announcement_does_not_stall_a_literal_plus_upstream(tmp_path: Path) -> None:
    """(C): with LITERAL+ too, literal data ending in "{1}" CRLF is followed by the rest after one "+"."""
    connection = filteredSession(tmp_path)
    connection.send(b"c1 APPEND INBOX {5+}\r\n{1}\r\n\r\nc2 NOOP\r\n")
    # Before C's fix the upstream got b"c1 APPEND INBOX {5+}\r\n{1}\r\n" and nothing more.
    assert connection.upstream.sent == b"c1 APPEND INBOX {5}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent == b"c1 APPEND INBOX {5}\r\n{1}\r\n\r\nc2 NOOP\r\n"


@FUZZ
@given(
    commands=st.lists(clientCommands(literalData.map(lambda data: data + b"{1}\r\n")), min_size=1, max_size=8),
    responses=st.lists(upstreamResponses, max_size=10),
    clientSizes=splits,
    upstreamSizes=splits,
    order=st.lists(st.booleans(), max_size=40),
)
def test_filtered_relay_forwards_literal_data_ending_like_an_announcement_byte_for_byte(
    usersDir: Path,  # noqa: F811
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
) -> None:
    """(C): the byte-for-byte relay property, filtered to a LITERAL+ upstream, any literal data."""
    relayByteForByte(usersDir, True, commands, responses, clientSizes, upstreamSizes, order, True)


def test_literal_data_ending_like_an_announcement_does_not_stall_the_command(tmp_path: Path) -> None:
    """(C): after sending literal data ending in "{1}" CRLF the relay waits for another "+" forever."""
    connection = filteredSession(tmp_path, capabilities=NO_LITERAL_PLUS)
    connection.send(b"c1 APPEND INBOX {5}\r\n")
    connection.send(b"{1}\r\n\r\nc2 NOOP\r\n")
    connection.fromUpstream(b"+ go ahead\r\n")
    # Today the upstream (waiting for the end of c1) gets only b"c1 APPEND INBOX {5}\r\n{1}\r\n".
    assert connection.upstream.sent == b"c1 APPEND INBOX {5}\r\n{1}\r\n\r\nc2 NOOP\r\n"


def test_untagged_lines_wait_behind_a_command_awaiting_its_continuation(tmp_path: Path) -> None:
    """(C): DONE (or any line without a tag) never overtakes a command held for the upstream's "+"; outside an IDLE it is refused."""
    connection = filteredSession(tmp_path, capabilities=NO_LITERAL_PLUS)
    connection.send(b"c1 NOOP {1}\r\nx\r\nDONE\r\n")
    # Before C's fix b"c1 NOOP {1}\r\nDONE\r\n": the upstream read "D" as the literal.
    assert connection.upstream.sent == b"c1 NOOP {1}\r\n"
    connection.fromUpstream(b"+ go ahead\r\n")
    assert connection.upstream.sent == b"c1 NOOP {1}\r\nx\r\n"
    assert connection.received().endswith(
        b"* BAD Command syntax not accepted by the proxy: invalid tag or command name\r\n"
    )


@FUZZ
@given(
    commands=st.lists(clientCommands(literalData.map(lambda data: data + b"{1}\r\n")), max_size=8),
    responses=st.lists(upstreamDataResponses, max_size=10),
    clientSizes=splits,
    upstreamSizes=splits,
    order=st.lists(st.booleans(), max_size=40),
)
def test_filtered_relay_without_literal_plus_handles_done_and_any_literal_data(
    usersDir: Path,  # noqa: F811
    commands: list[Wire],
    responses: list[bytes],
    clientSizes: list[int],
    upstreamSizes: list[int],
    order: list[bool],
) -> None:
    """(C): the continuation-dance property with DONE and literal data ending like an announcement."""
    relayWaitingForContinuations(usersDir, commands, responses, clientSizes, upstreamSizes, order)


# -- D. POP3 notices while a login is pending ------------------------------------------------


def test_pop3_autologout_is_not_sent_as_the_answer_to_a_pending_pass(tmp_path: Path) -> None:
    """(D): a maildrop slower to open than the pre-login timeout gets "-ERR Autologout" as PASS's answer."""
    connection = connectPOP3(tmp_path, tls=TLSMode.IMPLICIT, backends=FakeBackends(hold=True))
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(61)
    # Today: b"+OK Send PASS\r\n-ERR Autologout; idle for too long\r\n".
    assert connection.received() == b"+OK Send PASS\r\n"
    assert connection.transport.disconnecting
