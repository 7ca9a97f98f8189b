"""
The upstream login handshake, driven in memory.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.framer import Line
from mailproxy.imap.upstream import (
    UpstreamError,
    UpstreamIMAPProtocol,
    UpstreamSession,
    _loginHandshake,
    connectUpstream,
    openConnection,
)
from mailproxy.stepdeadline import StepDeadline
from tests.support import FakeTLSTransport


class HandshakeTests(SynchronousTestCase):
    def begin(
        self, tls: TLSMode = TLSMode.PLAIN, username: str = "alice", password: str = "pw"
    ) -> tuple[Deferred[UpstreamSession], UpstreamIMAPProtocol, FakeTLSTransport, Clock]:
        clock = Clock()
        protocol = UpstreamIMAPProtocol()
        transport = FakeTLSTransport()
        protocol.makeConnection(transport)
        upstream = UpstreamConfig("main", "imap.example", 143, tls, connectTimeout=5)
        handshake = Deferred.fromCoroutine(
            _loginHandshake(protocol, upstream, username, password, "", StepDeadline(clock, 5))
        )
        return handshake, protocol, transport, clock

    def sent(self, transport: FakeTLSTransport) -> bytes:
        value: bytes = transport.value()
        transport.clear()
        return value

    def error(self, handshake: Deferred[Any]) -> UpstreamError:
        error = self.failureResultOf(handshake, UpstreamError).value
        assert isinstance(error, UpstreamError)
        return error

    def test_plain_with_initial_response_when_offered(self) -> None:
        """With AUTH=PLAIN and SASL-IR the login is one AUTHENTICATE line."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        expected = base64.b64encode(b"\0alice\0pw")
        self.assertEqual(self.sent(transport), b"mp1 AUTHENTICATE PLAIN " + expected + b"\r\n")
        protocol.dataReceived(b"mp1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
        session = self.successResultOf(handshake)
        self.assertEqual(session.capabilities, [b"IMAP4rev1", b"IDLE", b"MOVE"])

    def test_plain_without_initial_response_waits_for_continuation(self) -> None:
        """Without SASL-IR the PLAIN response follows the server's '+'."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        self.assertEqual(self.sent(transport), b"mp1 AUTHENTICATE PLAIN\r\n")
        protocol.dataReceived(b"+ \r\n")
        self.assertEqual(self.sent(transport), base64.b64encode(b"\0alice\0pw") + b"\r\n")
        protocol.dataReceived(b"mp1 OK Logged in\r\n")
        self.assertEqual(self.sent(transport), b"mp2 CAPABILITY\r\n")
        protocol.dataReceived(b"* CAPABILITY IMAP4rev1 IDLE\r\nmp2 OK done\r\n")
        self.assertEqual(self.successResultOf(handshake).capabilities, [b"IMAP4rev1", b"IDLE"])

    def test_capability_is_asked_when_the_greeting_has_none(self) -> None:
        """A bare greeting makes the proxy ask for CAPABILITY, then LOGIN with atoms."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK ready\r\n")
        self.assertEqual(self.sent(transport), b"mp1 CAPABILITY\r\n")
        protocol.dataReceived(b"* CAPABILITY IMAP4rev1\r\nmp1 OK done\r\n")
        self.assertEqual(self.sent(transport), b"mp2 LOGIN alice pw\r\n")

    def test_login_quotes_and_uses_literals_for_8bit(self) -> None:
        """LOGIN quotes specials and sends 8-bit passwords as synchronising literals."""
        handshake, protocol, transport, _ = self.begin(username='a "b"', password="pässword")
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.assertEqual(self.sent(transport), b'mp1 LOGIN "a \\"b\\"" {9}\r\n')
        protocol.dataReceived(b"+ go ahead\r\n")
        self.assertEqual(self.sent(transport), "pässword".encode() + b"\r\n")
        protocol.dataReceived(b"mp1 OK [CAPABILITY IMAP4rev1] in\r\n")
        self.successResultOf(handshake)

    def test_login_uses_nonsynchronising_literals_with_literal_plus(self) -> None:
        """With LITERAL+ the literal goes without waiting for a continuation."""
        handshake, protocol, transport, _ = self.begin(password="pä")
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
        self.assertEqual(self.sent(transport), b"mp1 LOGIN alice {3+}\r\n" + "pä".encode() + b"\r\n")

    def test_rejected_credentials_are_an_authentication_failure(self) -> None:
        """A tagged NO to the login is reported as authenticationFailed."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        protocol.dataReceived(b"mp1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertTrue(self.error(handshake).authenticationFailed)

    def test_starttls_upgrades_before_anything_else(self) -> None:
        """In STARTTLS mode the proxy negotiates TLS, then re-reads capabilities."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
        self.assertEqual(self.sent(transport), b"mp1 STARTTLS\r\n")
        protocol.dataReceived(b"mp1 OK Begin TLS\r\n")
        self.assertIsNotNone(transport.tlsStarted)
        self.assertEqual(self.sent(transport), b"mp2 CAPABILITY\r\n")

    def test_data_after_starttls_ok_is_refused_as_injection(self) -> None:
        """Bytes that arrive with the STARTTLS OK mean a man in the middle: no TLS, no login."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"* OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(b"mp1 OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
        self.assertIn("after STARTTLS", str(self.error(handshake)))
        self.assertIsNone(transport.tlsStarted)

    def test_starttls_refused_fails_closed(self) -> None:
        """An upstream that refuses STARTTLS is never logged in to in plaintext."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"* OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(b"mp1 BAD no TLS here\r\n")
        self.assertIn("refused STARTTLS", str(self.error(handshake)))
        self.assertEqual(self.sent(transport), b"")

    def test_logindisabled_without_plain_is_an_error(self) -> None:
        """LOGINDISABLED without AUTH=PLAIN means the route needs TLS."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready\r\n")
        self.assertIn("disables LOGIN", str(self.error(handshake)))

    def test_bye_greeting_and_silence_are_errors(self) -> None:
        """A BYE greeting fails at once; a silent upstream fails after the timeout."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"* BYE too many connections\r\n")
        self.assertIn("greeting", str(self.error(handshake)))
        handshake, protocol, _, clock = self.begin()
        clock.advance(4.9)
        self.assertNoResult(handshake)
        clock.advance(0.2)
        self.assertIn("did not answer", str(self.error(handshake)))

    def test_after_giving_up_nothing_more_is_read(self) -> None:
        """Once the handshake gave up on a step, what arrives later is not read as the next response."""
        protocol = UpstreamIMAPProtocol()
        protocol.makeConnection(FakeTLSTransport())
        protocol.giveUp(UpstreamError("did not answer in time", kind="timeout"))
        protocol.dataReceived(b"* OK late\r\n")
        self.assertEqual(self.error(protocol.readResponse()).kind, "timeout")

    def test_responses_before_a_loss_are_read_before_it(self) -> None:
        protocol = UpstreamIMAPProtocol()
        protocol.makeConnection(FakeTLSTransport())
        protocol.dataReceived(b"* OK ready\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(protocol.readResponse()), b"* OK ready\r\n")
        self.assertEqual(self.error(protocol.readResponse()).kind, "closed")

    def test_each_step_has_the_whole_connect_timeout(self) -> None:
        """A slow greeting leaves the login its own connect_timeout; a silent step then fails."""
        handshake, protocol, transport, clock = self.begin()
        clock.advance(4.9)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.assertEqual(self.sent(transport), b"mp1 LOGIN alice pw\r\n")
        clock.advance(4.9)
        self.assertNoResult(handshake)
        clock.advance(0.2)
        error = self.error(handshake)
        self.assertEqual((str(error), error.kind), ("upstream imap.example:143 did not answer in time", "timeout"))

    def test_untagged_ok_before_plain_continuation_is_not_a_login(self) -> None:
        """An untagged response while waiting for '+' is skipped, not taken as the login result."""
        d, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        self.assertEqual(transport.value(), b"mp1 AUTHENTICATE PLAIN\r\n")
        transport.clear()
        protocol.dataReceived(b"* OK [ALERT] Maintenance tonight\r\n")
        # Nothing has authenticated yet: the proxy must still be waiting for '+'
        # and must not send anything else (the server reads the next line as
        # the SASL response).
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"* CAPABILITY IMAP4rev1\r\nmp2 OK done\r\n")
        self.assertNoResult(d)

    def test_untagged_ok_before_literal_continuation_is_not_a_login(self) -> None:
        """The password literal waits for '+' even if untagged data comes first."""
        d, protocol, transport, _ = self.begin(TLSMode.PLAIN, password="p\u00e4ss")
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.assertEqual(transport.value(), b"mp1 LOGIN alice {5}\r\n")
        transport.clear()
        protocol.dataReceived(b"* OK [ALERT] hello\r\n")
        # observed: "mp2 CAPABILITY\r\n" is written where the server expects
        # the 5-byte password literal, and the login is considered successful.
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"* CAPABILITY IMAP4rev1\r\nmp2 OK done\r\n")
        self.assertNoResult(d)

    def test_untagged_bye_during_login_is_not_an_auth_failure(self) -> None:
        """A BYE during login means unavailable, not wrong credentials."""
        d, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        protocol.dataReceived(b"* BYE shutting down\r\n")
        error = self.failureResultOf(d, UpstreamError).value
        self.assertFalse(error.authenticationFailed)

    def test_non_utf8_passthrough_password(self) -> None:
        """A passthrough password that is not UTF-8 goes upstream as the client's own octets."""
        password = b"p\xe4ss".decode("utf-8", "surrogateescape")
        d, protocol, transport, _ = self.begin(TLSMode.PLAIN, password=password)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
        self.assertEqual(transport.value(), b"mp1 LOGIN alice {4+}\r\np\xe4ss\r\n")

    def test_handshake_buffers_are_bounded(self) -> None:
        """A flood of small untagged responses before login closes the upstream connection."""
        d, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK ready\r\n")  # -> mp1 CAPABILITY
        flood = b"* OK x\r\n" * 200_000  # 1.6 MB, 25x _HANDSHAKE_LIMIT
        protocol.dataReceived(flood)
        self.assertTrue(transport.disconnecting)

    def test_partial_response_with_literal_survives_start_relay(self) -> None:
        """Bytes of a response already framed before startRelay must reach the relay."""
        d, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        protocol.dataReceived(b"mp1 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n* 1 FETCH (BODY[] {10}\r\nabc")
        session = self.successResultOf(d)
        got: list[bytes] = []
        session.protocol.startRelay(
            lambda events: got.extend(event.raw if isinstance(event, Line) else event.data for event in events),
            lambda reason: None,
        )
        protocol.dataReceived(b"defghij)\r\n")
        self.assertEqual(b"".join(got), b"* 1 FETCH (BODY[] {10}\r\nabcdefghij)\r\n")


class ConnectUpstreamTests(SynchronousTestCase):
    """
    L{connectUpstream} over an in-memory reactor: one timer bounds the
    connection and every step of the login, and none is left once it ends.
    """

    def connect(self) -> tuple[Deferred[UpstreamSession], Any, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        upstream = UpstreamConfig("main", "127.0.0.1", 143, TLSMode.PLAIN, connectTimeout=5)
        session = Deferred.fromCoroutine(connectUpstream(reactor, upstream, "alice", "pw"))
        [(_, _, factory, _, _)] = reactor.tcpClients
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(FakeTLSTransport())
        return session, protocol, reactor

    def test_one_timer_for_the_whole_handshake_and_none_after(self) -> None:
        """The connector gets no timer of its own, and the deadline's one serves the connect and every step."""
        session, protocol, reactor = self.connect()
        [(_, _, _, connectorTimeout, _)] = reactor.tcpClients
        [timer] = reactor.getDelayedCalls()
        self.assertIsNone(connectorTimeout)
        reactor.advance(1)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.assertEqual(reactor.getDelayedCalls(), [timer])
        protocol.dataReceived(b"mp1 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n")
        self.assertEqual(self.successResultOf(session).capabilities, [b"IMAP4rev1", b"IDLE"])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_a_silent_upstream_is_closed_after_the_timeout(self) -> None:
        session, protocol, reactor = self.connect()
        reactor.advance(5.1)
        error = self.failureResultOf(session, UpstreamError).value
        self.assertEqual(error.kind, "timeout")
        self.assertTrue(protocol.transport.disconnecting)


class UpstreamAddressTests(SynchronousTestCase):
    """
    An upstream given as an address is connected to at once; only a name
    goes through the resolver (whose lookups run in a thread each).
    """

    def connectionAttempts(self, host: str) -> tuple[list[tuple[Any, ...]], list[str]]:
        """
        The connections attempted to C{host} and the names looked up, with
        a resolver that never answers.
        """
        reactor = MemoryReactorClock()
        resolver = DeferredResolver()
        reactor.installNameResolver(resolver)
        upstream = UpstreamConfig("main", host, 143, TLSMode.PLAIN, connectTimeout=5)
        Deferred.fromCoroutine(openConnection(reactor, upstream, UpstreamIMAPProtocol, StepDeadline(reactor, 5)))
        return reactor.tcpClients, resolver.asked

    def test_an_ipv4_address_is_connected_to_without_resolving(self) -> None:
        [(host, port, *_)], asked = self.connectionAttempts("127.0.0.1")
        self.assertEqual(((host, port), asked), (("127.0.0.1", 143), []))

    def test_an_ipv6_address_is_connected_to_without_resolving(self) -> None:
        [(host, port, *_)], asked = self.connectionAttempts("::1")
        self.assertEqual(((host, port), asked), (("::1", 143), []))

    def test_a_connection_that_never_completes_times_out_and_is_abandoned(self) -> None:
        """The handshake's deadline bounds the connection too: the attempt is stopped, and reported as a timeout."""
        reactor = MemoryReactorClock()
        upstream = UpstreamConfig("main", "127.0.0.1", 143, TLSMode.PLAIN, connectTimeout=5)
        connecting = Deferred.fromCoroutine(
            openConnection(reactor, upstream, UpstreamIMAPProtocol, StepDeadline(reactor, 5))
        )
        reactor.advance(4.9)
        self.assertNoResult(connecting)
        reactor.advance(0.2)
        error = self.failureResultOf(connecting, UpstreamError).value
        self.assertEqual(
            (str(error), error.kind, reactor.connectors[0].stoppedConnecting),
            ("cannot connect to 127.0.0.1:143: no connection within 5 s", "timeout", True),
        )

    def test_a_name_that_never_resolves_times_out_as_a_timeout(self) -> None:
        """The deadline cancels a lookup that never answers: reported as the timeout it is, not as a failed lookup."""
        reactor = MemoryReactorClock()
        reactor.installNameResolver(DeferredResolver())
        upstream = UpstreamConfig("main", "imap.example", 143, TLSMode.PLAIN, connectTimeout=5)
        connecting = Deferred.fromCoroutine(
            openConnection(reactor, upstream, UpstreamIMAPProtocol, StepDeadline(reactor, 5))
        )
        reactor.advance(5.1)
        error = self.failureResultOf(connecting, UpstreamError).value
        self.assertEqual(
            (str(error), error.kind), ("cannot connect to imap.example:143: no connection within 5 s", "timeout")
        )

    def test_a_name_waits_for_the_resolver(self) -> None:
        self.assertEqual(self.connectionAttempts("imap.example"), ([], ["imap.example"]))


class DeferredResolver:
    """
    A name resolver that never answers, noting what it was asked.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        return receiver


class _GreetAndClose(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"* OK ready\r\n")
        self.transport.loseConnection()


class PlainTCPUpstreamTests(TestCase):
    """
    Over a real loopback connection: the upstream protocol reads straight
    from its TCP transport, and still gets every read and its close.
    """

    @defer.inlineCallbacks
    def test_reads_and_the_close_reach_the_protocol_without_the_endpoints_wrapper(self) -> Any:
        from twisted.internet import reactor

        port = reactor.listenTCP(0, Factory.forProtocol(_GreetAndClose), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        upstream = UpstreamConfig("main", "127.0.0.1", port.getHost().port, TLSMode.PLAIN, connectTimeout=5)
        deadline = StepDeadline(reactor, 5)  # type: ignore[arg-type]
        self.addCleanup(deadline.stop)
        protocol = yield Deferred.fromCoroutine(openConnection(reactor, upstream, UpstreamIMAPProtocol, deadline))
        self.assertIs(protocol.transport.protocol, protocol)
        greeting = yield protocol.readResponse()
        yield protocol.closed
        self.assertEqual((greeting, protocol.connected), (b"* OK ready\r\n", False))
