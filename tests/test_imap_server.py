"""
The client-facing IMAP protocol, driven in memory with a scripted upstream.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailproxy.config import TLSMode, UserRoute
from mailproxy.imap.server import State
from mailproxy.imap.upstream import UpstreamError, setNoDelay
from mailproxy.limits import LimitsConfig
from tests.support import UpstreamScript, connect, loggedIn


def test_greeting_advertises_starttls_and_logindisabled_before_tls(tmp_path: Path) -> None:
    """A STARTTLS listener greets with STARTTLS and LOGINDISABLED and no AUTH=."""
    greeting = connect(str(tmp_path)).received()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting
    assert b"AUTH=" not in greeting


def test_login_before_starttls_is_refused(tmp_path: Path) -> None:
    """LOGIN on an unencrypted connection gets NO [PRIVACYREQUIRED] and no upstream."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.received() == b"a NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
    assert connection.upstream.requests == []


def test_starttls_switches_and_then_offers_auth(tmp_path: Path) -> None:
    """After STARTTLS, capabilities drop STARTTLS/LOGINDISABLED and offer AUTH=PLAIN and AUTH=LOGIN."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a STARTTLS\r\n")
    assert connection.received() == b"a OK Begin TLS negotiation now\r\n"
    assert connection.transport.tlsStarted == "TLS-OPTIONS"
    connection.send(b"b CAPABILITY\r\n")
    capabilities = connection.received()
    assert b" AUTH=PLAIN AUTH=LOGIN" in capabilities
    assert b"STARTTLS" not in capabilities and b"LOGINDISABLED" not in capabilities
    connection.send(b"c STARTTLS\r\n")
    assert connection.received().startswith(b"c BAD ")


def test_commands_pipelined_after_starttls_are_discarded_and_connection_dropped(tmp_path: Path) -> None:
    """Plaintext bytes sent with STARTTLS never run: the connection is closed."""
    connection = connect(str(tmp_path), allowPlaintextAuth=True)
    connection.received()
    connection.send(b"a STARTTLS\r\nb LOGIN alice alicepw\r\n")
    assert connection.received() == b"a OK Begin TLS negotiation now\r\n"
    assert connection.transport.tlsStarted is None
    assert connection.transport.disconnecting
    assert connection.upstream.requests == []


def test_partial_line_after_starttls_counts_as_injection(tmp_path: Path) -> None:
    """Even an incomplete line buffered with STARTTLS closes the connection."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a STARTTLS\r\nb CAPA")
    assert connection.transport.tlsStarted is None
    assert connection.transport.disconnecting


def test_login_relays_with_filtered_upstream_capabilities(tmp_path: Path) -> None:
    """A good LOGIN connects upstream with passthrough credentials and filters capabilities."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b'a LOGIN alice "alicepw"\r\n')
    assert connection.upstream.requests == [("main", "alice", "alicepw")]
    assert connection.received() == b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"


def test_login_with_literals_sends_continuations(tmp_path: Path) -> None:
    """Synchronising literals in LOGIN get '+' continuations from the proxy."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, users={"alice": 'p w\\"x"'})
    connection.received()
    connection.send(b"a LOGIN {5}\r\n")
    assert connection.received() == b"+ Ready for literal data\r\n"
    connection.send(b'alice {7+}\r\np w\\"x"\r\n')
    assert connection.upstream.requests == [("main", "alice", 'p w\\"x"')]


def test_stored_upstream_credentials_replace_the_clients(tmp_path: Path) -> None:
    """A route with a stored password logs in upstream with it, not the client's."""
    routes = {"alice": UserRoute("main", "alice@upstream", "s3cret")}
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, routes=routes)
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.upstream.requests == [("main", "alice@upstream", "s3cret")]


def test_authenticate_plain_with_initial_response(tmp_path: Path) -> None:
    """AUTHENTICATE PLAIN with SASL-IR logs in."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    response = base64.b64encode(b"\0alice\0alicepw")
    connection.send(b"a AUTHENTICATE PLAIN " + response + b"\r\n")
    assert connection.received().startswith(b"a OK [CAPABILITY ")


def test_authenticate_plain_with_continuation(tmp_path: Path) -> None:
    """AUTHENTICATE PLAIN without SASL-IR asks for the response with '+ '."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE plain\r\n")
    assert connection.received() == b"+ \r\n"
    connection.send(base64.b64encode(b"alice\0alice\0alicepw") + b"\r\n")
    assert connection.received().startswith(b"a OK [CAPABILITY ")


def test_authenticate_cancelled_and_bad_base64(tmp_path: Path) -> None:
    """'*' cancels AUTHENTICATE; invalid base64 is a BAD, and the session goes on."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE PLAIN\r\n*\r\nb AUTHENTICATE PLAIN !!!\r\nc NOOP\r\n")
    assert connection.received() == (
        b"+ \r\na BAD Authentication cancelled\r\nb BAD Invalid base64 in SASL response\r\nc OK NOOP completed\r\n"
    )


def test_unsupported_mechanism_and_other_users_authzid_are_refused(tmp_path: Path) -> None:
    """Only PLAIN and LOGIN are offered, and PLAIN cannot be used to act as another user."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert connection.received().startswith(b"a NO [CANNOT]")
    connection.send(b"b AUTHENTICATE PLAIN " + base64.b64encode(b"bob\0alice\0alicepw") + b"\r\n")
    assert connection.received().startswith(b"b NO [AUTHORIZATIONFAILED]")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_greeting_offers_plain_and_login_where_authentication_is_allowed(tmp_path: Path) -> None:
    """The greeting's [CAPABILITY ...] and CAPABILITY list AUTH=PLAIN AUTH=LOGIN on an implicit TLS listener."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    assert connection.received() == b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN AUTH=LOGIN] mailproxy ready.\r\n"
    connection.send(b"a CAPABILITY\r\n")
    assert connection.received() == (
        b"* CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n"
    )


def test_authenticate_login_asks_for_user_name_and_password(tmp_path: Path) -> None:
    """AUTHENTICATE LOGIN (any case) asks 'Username:' then 'Password:' in base64 and logs in."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE login\r\n")
    assert connection.received() == b"+ VXNlcm5hbWU6\r\n"
    connection.send(b64(b"alice") + b"\r\n")
    assert connection.received() == b"+ UGFzc3dvcmQ6\r\n"
    connection.send(b64(b"alicepw") + b"\r\n")
    assert connection.upstream.requests == [("main", "alice", "alicepw")]
    assert connection.received().startswith(b"a OK [CAPABILITY ")
    assert connection.protocol.state is State.RELAYING


def test_authenticate_login_with_initial_response(tmp_path: Path) -> None:
    """With SASL-IR the initial response is the user name; '=' (empty) asks for it instead."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE LOGIN =\r\n*\r\nb AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")
    assert connection.received() == b"+ VXNlcm5hbWU6\r\na BAD Authentication cancelled\r\n+ UGFzc3dvcmQ6\r\n"
    connection.send(b64(b"alicepw") + b"\r\n")
    assert connection.upstream.requests == [("main", "alice", "alicepw")]
    assert connection.received().startswith(b"b OK [CAPABILITY ")


def test_authenticate_login_refusals_end_the_exchange(tmp_path: Path) -> None:
    """Cancel at the password, bad base64, NUL and an empty user name are BAD; the session goes on."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n*\r\n")
    connection.send(b"b AUTHENTICATE LOGIN\r\n=\r\n")
    connection.send(b"c AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"pw\0") + b"\r\n")
    connection.send(b"d AUTHENTICATE LOGIN\r\n\r\n")
    connection.send(b"e AUTHENTICATE LOGIN " + b64(b"\xff") + b"\r\nf NOOP\r\n")
    assert connection.received() == (
        b"+ UGFzc3dvcmQ6\r\na BAD Authentication cancelled\r\n"
        b"+ VXNlcm5hbWU6\r\nb BAD Invalid base64 in SASL response\r\n"
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\nc BAD NUL in LOGIN user name or password\r\n"
        b"+ VXNlcm5hbWU6\r\nd BAD Empty user name\r\n"
        b"e BAD User name is not UTF-8\r\nf OK NOOP completed\r\n"
    )
    assert connection.upstream.requests == []
    assert connection.protocol.state is State.NOT_AUTHENTICATED


def test_authenticate_login_literal_response_closes_the_connection(tmp_path: Path) -> None:
    """A SASL response line that announces a literal (a command, not a response): BYE and close."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE LOGIN\r\nb LOGIN {5}\r\n")
    assert connection.received() == b"+ VXNlcm5hbWU6\r\n* BYE Invalid SASL response\r\n"
    assert connection.transport.disconnecting


def test_authenticate_login_refused_before_any_continuation_without_tls(tmp_path: Path) -> None:
    """Before STARTTLS AUTHENTICATE LOGIN gets NO [PRIVACYREQUIRED], never a '+'; the next line is a command."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n")
    assert connection.received() == (
        b"a NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n* BAD Invalid tag or command\r\n"
    )


def test_authenticate_login_responses_count_as_commands_before_login(tmp_path: Path) -> None:
    """Every SASL response line counts toward the pre-login command cap."""
    from mailproxy.frontdoor import MAX_PRELOGIN_COMMANDS

    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    exchange = b"a AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n"
    connection.send(exchange * MAX_PRELOGIN_COMMANDS)
    reply = connection.received()
    # Three lines an exchange: the cap ends the connection in the 34th.
    assert reply.count(b"a BAD Authentication cancelled") == MAX_PRELOGIN_COMMANDS // 3
    assert reply.endswith(b"* BYE Too many commands before login\r\n")
    assert connection.transport.disconnecting


def test_authenticate_login_wrong_password_answers_after_the_delay(tmp_path: Path) -> None:
    """A wrong password through AUTHENTICATE LOGIN is NO [AUTHENTICATIONFAILED] after the failure delay."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n" + b64(b"wrong") + b"\r\nb NOOP\r\n")
    assert connection.received() == b"+ UGFzc3dvcmQ6\r\n"
    connection.clock.advance(1.9)
    assert connection.received() == b""
    connection.clock.advance(0.2)
    assert connection.received() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK NOOP completed\r\n"
    assert connection.upstream.requests == []


def test_failed_login_answers_after_the_delay(tmp_path: Path) -> None:
    """A wrong password gets NO [AUTHENTICATIONFAILED] only after the configured delay."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a LOGIN alice wrong\r\nb NOOP\r\n")
    assert connection.received() == b""
    connection.clock.advance(1.9)
    assert connection.received() == b""
    connection.clock.advance(0.2)
    assert connection.received() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK NOOP completed\r\n"
    assert connection.upstream.requests == []


def test_unknown_user_fails_like_a_wrong_password(tmp_path: Path) -> None:
    """An unknown user name gets the same answer as a wrong password."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"a LOGIN mallory x\r\n")
    connection.clock.advance(2.1)
    assert connection.received() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def test_upstream_unavailable_gives_no_unavailable(tmp_path: Path) -> None:
    """An unreachable upstream answers NO [UNAVAILABLE] and the client may retry."""
    script = UpstreamScript(error=UpstreamError("cannot connect"))
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received() == b"a NO [UNAVAILABLE] Upstream server unavailable, try again later.\r\n"
    assert connection.protocol.state is State.NOT_AUTHENTICATED


def test_upstream_rejecting_passthrough_credentials_is_an_auth_failure(tmp_path: Path) -> None:
    """If the upstream rejects the client's own password, the client sees AUTHENTICATIONFAILED."""
    script = UpstreamScript(error=UpstreamError("no", authenticationFailed=True))
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(2.1)
    assert connection.received().startswith(b"a NO [AUTHENTICATIONFAILED]")


def test_commands_before_login_are_refused(tmp_path: Path) -> None:
    """SELECT before authentication is a BAD; garbage is a BAD without a tag."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a SELECT INBOX\r\n\r\n")
    assert connection.received() == (
        b"a BAD Command SELECT is not valid before authentication\r\n* BAD Invalid tag or command\r\n"
    )


def test_oversized_synchronising_preauth_literal_is_refused_without_continuation(tmp_path: Path) -> None:
    """A pre-auth literal over max_preauth_literal gets BAD [TOOBIG] instead of "+"; the session goes on."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a LOGIN {99999999}\r\n")
    assert connection.received() == b"a BAD [TOOBIG] Literal too large before login\r\n"
    connection.send(b"b NOOP\r\n")
    assert connection.received() == b"b OK NOOP completed\r\n"
    assert not connection.transport.disconnecting


def test_oversized_non_synchronising_preauth_literal_ends_the_connection(tmp_path: Path) -> None:
    """A {n+} literal over the limit is already on its way: BAD, then BYE."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxPreauthLiteral=100))
    connection.received()
    connection.send(b"a LOGIN {101+}\r\n" + b"x" * 101 + b" pw\r\n")
    assert connection.received() == b"a BAD [TOOBIG] Literal too large before login\r\n* BYE Literal refused\r\n"
    assert connection.transport.disconnecting


def test_preauth_literal_at_the_limit_is_accepted(tmp_path: Path) -> None:
    """A literal of exactly max_preauth_literal octets is asked for as usual."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxPreauthLiteral=100))
    connection.received()
    connection.send(b"a ID {100}\r\n")
    assert connection.received() == b"+ Ready for literal data\r\n"


def test_overlong_command_line_is_refused_with_bad_and_the_session_goes_on(tmp_path: Path) -> None:
    """A line over max_line_length is discarded and answered with a tagged BAD [TOOBIG]."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxLineLength=1024))
    connection.received()
    connection.send(b"a7 ID (" + b'"x" ' * 400 + b")\r\nb NOOP\r\n")
    assert connection.received() == (
        b"a7 BAD [TOOBIG] Command line too long (limit 1024 octets)\r\nb OK NOOP completed\r\n"
    )
    assert not connection.transport.disconnecting


def test_repeated_overlong_command_lines_end_the_connection(tmp_path: Path) -> None:
    """The third overlong line in one connection is answered, then the connection closes."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxLineLength=1024))
    connection.received()
    for _ in range(2):
        connection.send(b"a NOOP " + b"x" * 2000 + b"\r\n")
        assert connection.received().startswith(b"a BAD [TOOBIG]")
    connection.send(b"a NOOP " + b"x" * 2000 + b"\r\n")
    assert connection.received().endswith(b"* BYE Too many oversized commands\r\n")
    assert connection.transport.disconnecting


def test_endless_line_is_cut_off_without_being_buffered(tmp_path: Path) -> None:
    """A line that never ends is counted, not kept, and ends the connection past its bound."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxLineLength=1024))
    connection.received()
    for _ in range(20):
        if connection.transport.disconnecting:
            break
        connection.send(b"y" * 1024)
        assert len(connection.protocol.framer.pending()) < 1024
    assert connection.received().startswith(b"* BYE ")
    assert connection.transport.disconnecting


def test_preauth_command_with_endless_literals_is_cut_off(tmp_path: Path) -> None:
    """Many small literals in one pre-auth command cannot grow memory without bound."""
    connection = connect(str(tmp_path))
    connection.received()
    chunk = b"x" * 16000
    connection.send(b"a ID {16000+}\r\n" + (chunk + b" {16000+}\r\n") * 9)
    assert connection.received().endswith(b"* BYE Command too long\r\n")
    assert connection.transport.disconnecting


def test_commands_pipelined_after_login_reach_the_upstream_in_order(tmp_path: Path) -> None:
    """Commands sent with LOGIN wait for the upstream and are relayed after it."""
    script = UpstreamScript(hold=True)
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\nb SELECT INBOX\r\n")
    connection.send(b"c NOOP\r\n")
    assert script.sent == b""
    script.release()
    assert script.sent == b"b SELECT INBOX\r\nc NOOP\r\n"


def test_relay_forwards_literals_byte_exact(tmp_path: Path) -> None:
    """APPEND literals with CRLF and 8-bit bytes reach the upstream unchanged."""
    connection = loggedIn(tmp_path)
    body = b"Subject: \xe4\r\n\r\n{5}\r\n\x00\xff"
    command = b"x APPEND INBOX {%d}\r\n" % len(body)
    connection.send(command)
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.received() == b"+ OK\r\n"
    connection.send(body[:7])
    connection.send(body[7:] + b"\r\ny NOOP\r\n")
    assert connection.upstream.sent == command + body + b"\r\ny NOOP\r\n"


def test_literal_refused_by_the_upstream_is_not_expected_from_the_client(tmp_path: Path) -> None:
    """A tagged NO instead of '+' cancels the literal: the next line is a new command again."""
    connection = loggedIn(tmp_path)
    connection.send(b"x APPEND INBOX {99999}\r\n")
    connection.fromUpstream(b"x NO [TOOBIG] too big\r\n")
    connection.send(b"y COMPRESS DEFLATE\r\nz NOOP\r\n")
    assert connection.upstream.sent == b"x APPEND INBOX {99999}\r\nz NOOP\r\n"
    assert (
        connection.received()
        == b"x NO [TOOBIG] too big\r\ny BAD Command not available after login through this proxy\r\n"
    )


def test_relay_streams_response_literals_and_filters_capabilities(tmp_path: Path) -> None:
    """Upstream FETCH literals pass through; CAPABILITY responses lose COMPRESS."""
    connection = loggedIn(tmp_path)
    connection.fromUpstream(b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE\r\n* 1 FETCH (BODY[] {8}\r\nA\r\n{3}\r\n")
    connection.fromUpstream(b")\r\nb OK done\r\n")
    assert (
        connection.received()
        == b"* CAPABILITY IMAP4rev1 IDLE\r\n* 1 FETCH (BODY[] {8}\r\nA\r\n{3}\r\n)\r\nb OK done\r\n"
    )


def test_compress_and_starttls_after_login_are_answered_locally(tmp_path: Path) -> None:
    """COMPRESS, STARTTLS and a second LOGIN never reach the upstream."""
    connection = loggedIn(tmp_path)
    connection.send(b"a COMPRESS DEFLATE\r\nb STARTTLS\r\nc LOGIN {3}\r\n")
    replies = connection.received()
    for tag in (b"a", b"b", b"c"):
        assert tag + b" BAD " in replies
    connection.send(b"d NOOP\r\n")
    assert connection.upstream.sent == b"d NOOP\r\n"


def test_octets_sent_with_a_refused_synchronising_literal_never_reach_the_upstream(tmp_path: Path) -> None:
    """Sent without waiting for "+", the refused LOGIN's literal (here a whole command) is dropped."""
    connection = loggedIn(tmp_path)
    connection.send(b"c LOGIN {3}\r\nd NOOP\r\ne NOOP\r\n")
    assert connection.received().startswith(b"c BAD ")
    assert connection.upstream.sent == b"e NOOP\r\n"


def test_local_reply_waits_for_the_upstream_response_boundary(tmp_path: Path) -> None:
    """A proxy reply never lands inside a relayed literal."""
    connection = loggedIn(tmp_path)
    connection.fromUpstream(b"* 1 FETCH (BODY[] {4}\r\nab")
    connection.send(b"z COMPRESS DEFLATE\r\n")
    connection.fromUpstream(b"cd)\r\n")
    assert (
        connection.received()
        == b"* 1 FETCH (BODY[] {4}\r\nabcd)\r\nz BAD Command not available after login through this proxy\r\n"
    )


def test_each_side_is_registered_as_the_others_producer(tmp_path: Path) -> None:
    """Backpressure: a full client buffer pauses reading from the upstream and vice versa."""
    connection = loggedIn(tmp_path)
    upstream = connection.upstreamProtocol
    assert connection.transport.producer.producer is upstream.transport
    assert upstream.transport.producer is connection.transport  # type: ignore[attr-defined]
    connection.transport.producer.pauseProducing()
    assert upstream.transport.producerState == "paused"  # type: ignore[attr-defined]


def test_upstream_closing_mid_session_sends_bye(tmp_path: Path) -> None:
    """If the upstream goes away the client gets * BYE and is disconnected, and the log says so."""
    connection = loggedIn(tmp_path)
    upstream = connection.upstreamProtocol
    with capturedLogs() as events:
        upstream.connectionLost(Failure(ConnectionDone()))
    assert connection.received() == b"* BYE Upstream server closed the connection\r\n"
    assert connection.transport.disconnecting
    assert any("upstream closed the session" in formatEvent(event) for event in events)


def test_upstream_bye_is_not_doubled(tmp_path: Path) -> None:
    """After LOGOUT the upstream's own BYE is relayed, no second BYE is added, and the close is no news in the log."""
    connection = loggedIn(tmp_path)
    upstream = connection.upstreamProtocol
    connection.send(b"z LOGOUT\r\n")
    connection.fromUpstream(b"* BYE Logging out\r\nz OK Logout completed.\r\n")
    with capturedLogs() as events:
        upstream.connectionLost(Failure(ConnectionDone()))
    assert connection.received() == b"* BYE Logging out\r\nz OK Logout completed.\r\n"
    assert not any("upstream closed" in formatEvent(event) for event in events)


def test_client_disconnect_closes_the_upstream(tmp_path: Path) -> None:
    """Closing the client connection closes the upstream connection."""
    connection = loggedIn(tmp_path)
    connection.protocol.connectionLost(Failure(ConnectionDone()))
    assert connection.upstreamProtocol.transport.disconnecting  # type: ignore[attr-defined]


def test_idle_preauth_connection_times_out(tmp_path: Path) -> None:
    """A connection that never logs in is closed after the pre-auth timeout."""
    connection = connect(str(tmp_path), loginDeadline=300)
    connection.received()
    connection.clock.advance(61)
    assert connection.received() == b"* BYE Autologout; idle for too long\r\n"
    assert connection.transport.disconnecting


def test_preauth_connection_is_closed_at_the_login_deadline_however_busy(tmp_path: Path) -> None:
    """Commands reset the inactivity timer but not the deadline from accept."""
    connection = connect(str(tmp_path), loginDeadline=20)
    connection.received()
    for _ in range(19):
        connection.clock.advance(1)
        connection.send(b"a NOOP\r\n")
    assert connection.received().count(b"a OK NOOP completed") == 19
    connection.clock.advance(1)
    assert connection.received() == b"* BYE Autologout; login took too long\r\n"
    assert connection.transport.disconnecting


def test_nagle_is_disabled_on_client_and_upstream_sockets() -> None:
    """TCP_NODELAY is set on the transport (or the TCP transport under TLS)."""

    class TCPTransport(StringTransport):
        noDelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.noDelay = enabled

    direct = TCPTransport()
    setNoDelay(direct)
    assert direct.noDelay

    class TLSWrapper:
        transport = TCPTransport()

    wrapped = TLSWrapper()
    setNoDelay(wrapped)
    assert wrapped.transport.noDelay


def test_long_upstream_response_line_is_relayed(tmp_path: Path) -> None:
    """A SEARCH result of 20,000 UIDs (~110 KB on one line) is ordinary IMAP."""
    connection = loggedIn(tmp_path)
    line = b"* SEARCH " + b" ".join(b"%d" % i for i in range(100000, 120000)) + b"\r\n"
    assert len(line) > 65536
    connection.send(b"s UID SEARCH ALL\r\n")
    connection.fromUpstream(line + b"s OK done\r\n")
    assert not connection.upstreamProtocol.transport.disconnecting
    assert connection.received() == line + b"s OK done\r\n"


def test_preauth_id_with_parameter_list(tmp_path: Path) -> None:
    """ID is advertised; clients send ID ("name" "x") before login (RFC 2971)."""
    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b'a ID ("name" "Thunderbird" "version" "115")\r\n')
    assert connection.received() == b'* ID ("name" "mailproxy")\r\na OK ID completed\r\n'


def test_upstream_bye_mentioning_capability_is_not_doubled(tmp_path: Path) -> None:
    """A BYE whose text says CAPABILITY still counts as the upstream's BYE."""
    connection = loggedIn(tmp_path)
    connection.fromUpstream(b"* BYE Server restarting to apply new CAPABILITY settings\r\n")
    connection.upstreamProtocol.connectionLost(Failure(ConnectionDone()))
    assert connection.received() == b"* BYE Server restarting to apply new CAPABILITY settings\r\n"


def test_client_disconnect_during_upstream_connect_cancels_it(tmp_path: Path) -> None:
    """A client that leaves mid-login stops the upstream login."""
    script = UpstreamScript(hold=True)
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script)
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert script.pending is not None and not script.pending.called
    connection.protocol.connectionLost(Failure(ConnectionDone()))
    # The upstream handshake (TCP connect, TLS, LOGIN with the user's
    # credentials) keeps running for a client that is gone.
    assert script.pending.called


def test_failed_login_leaves_no_delayed_call_after_disconnect(tmp_path: Path) -> None:
    """The delayed failure reply is cancelled when the client leaves; only the login turn stays held for the delay."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    connection.send(b"a LOGIN alice wrong\r\n")
    connection.protocol.connectionLost(Failure(ConnectionDone()))
    limits = connection.protocol.context.limits
    assert limits is not None
    assert [call.func for call in connection.clock.getDelayedCalls()] == [limits._releaseTurn]
    connection.clock.advance(limits.failureDelay)
    assert connection.clock.getDelayedCalls() == []


def test_avatar_logout_called_when_upstream_fails(tmp_path: Path) -> None:
    """The realm's logout runs even when the upstream never came up."""
    script = UpstreamScript(error=UpstreamError("cannot connect"))
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script)
    calls: list[str] = []
    realm: Any = connection.protocol.context.portal.realm
    original = realm.requestAvatar

    def requestAvatar(*args: Any) -> Any:
        interface, user, _ = original(*args)
        return interface, user, lambda: calls.append("logout")

    realm.requestAvatar = requestAvatar
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(0)
    assert connection.protocol.state is State.NOT_AUTHENTICATED
    connection.protocol.connectionLost(Failure(ConnectionDone()))
    assert calls == ["logout"]


def test_octets_sent_with_a_refused_preauth_literal_are_dropped(tmp_path: Path) -> None:
    """Framed before the refusal, the rest of the refused command neither sticks to the next one nor crashes."""
    connection = connect(str(tmp_path), limits=LimitsConfig(maxLineLength=1024))
    connection.received()
    connection.send(b"a LOGIN {20000}\r\nXYZ b NOOP\r\n")
    assert connection.received() == b"a BAD [TOOBIG] Literal too large before login\r\n"
    connection.send(b"c NOOP " + b"x" * 2000 + b"\r\nd NOOP\r\n")
    assert connection.received() == (
        b"c BAD [TOOBIG] Command line too long (limit 1024 octets)\r\nd OK NOOP completed\r\n"
    )
