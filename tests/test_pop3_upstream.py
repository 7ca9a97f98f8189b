"""
The upstream POP3 login handshake (RELAY mode), driven in memory.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.auth import inlineRunner, makePortal
from mailproxy.config import ListenerConfig, TLSMode, UpstreamConfig
from mailproxy.imap.server import ServerContext
from mailproxy.imap.upstream import UpstreamError
from mailproxy.pop3.server import POP3Backends, POP3ServerFactory
from mailproxy.pop3.upstream import POP3UpstreamProtocol, POP3UpstreamSession, connectPOP3Upstream, loginHandshake
from mailproxy.stepdeadline import StepDeadline
from tests.support import FakeTLSTransport, makeConfig, writeUsersFile

CAPA_PLAIN = b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\nTOP\r\n.\r\n"
CAPA_USER = b"+OK Capability list follows\r\nUSER\r\nUIDL\r\n.\r\n"


class HandshakeTests(SynchronousTestCase):
    def begin(
        self, tls: TLSMode = TLSMode.PLAIN, username: str = "alice", password: str = "pw"
    ) -> tuple[Deferred[POP3UpstreamSession], POP3UpstreamProtocol, FakeTLSTransport, Clock]:
        clock = Clock()
        protocol = POP3UpstreamProtocol()
        transport = FakeTLSTransport()
        protocol.makeConnection(transport)
        upstream = UpstreamConfig("main", "pop.example", 110, tls, connectTimeout=5, protocol="pop3")
        handshake = Deferred.fromCoroutine(
            loginHandshake(protocol, upstream, username, password, StepDeadline(clock, 5))
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

    def test_auth_plain_when_offered(self) -> None:
        """With SASL PLAIN in CAPA the login is AUTH PLAIN with an initial response."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"+OK POP3 ready\r\n")
        self.assertEqual(self.sent(transport), b"CAPA\r\n")
        protocol.dataReceived(CAPA_PLAIN[:10])
        protocol.dataReceived(CAPA_PLAIN[10:])
        self.assertEqual(self.sent(transport), b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n")
        protocol.dataReceived(b"+OK Logged in.\r\n")
        session = self.successResultOf(handshake)
        self.assertEqual(session.capabilities, [b"USER", b"SASL PLAIN LOGIN", b"TOP"])
        self.assertIs(session.protocol, protocol)

    def test_user_pass_without_sasl_plain(self) -> None:
        """Without SASL PLAIN the proxy uses USER and PASS."""
        handshake, protocol, transport, _ = self.begin(password="p w")
        protocol.dataReceived(b"+OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(CAPA_USER)
        self.assertEqual(self.sent(transport), b"USER alice\r\n")
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.sent(transport), b"PASS p w\r\n")
        protocol.dataReceived(b"+OK maildrop locked\r\n")
        self.successResultOf(handshake)

    def test_capa_refused_falls_back_to_user_pass(self) -> None:
        """A server without CAPA (-ERR) still gets USER/PASS."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(b"-ERR unknown command\r\n")
        self.assertEqual(self.sent(transport), b"USER alice\r\n")

    def test_stls(self) -> None:
        """tls = starttls sends STLS first, starts TLS, then CAPA."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"+OK ready\r\n")
        self.assertEqual(self.sent(transport), b"STLS\r\n")
        protocol.dataReceived(b"+OK Begin TLS\r\n")
        self.assertIsNotNone(transport.tlsStarted)
        self.assertEqual(self.sent(transport), b"CAPA\r\n")

    def test_stls_response_injection_is_an_error(self) -> None:
        """Data after the +OK to STLS, before the TLS handshake, aborts the session."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"+OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(b"+OK Begin TLS\r\n+OK\r\nSASL PLAIN\r\n.\r\n")
        self.assertIn("after STLS", str(self.error(handshake)))
        self.assertIsNone(transport.tlsStarted)

    def test_stls_refused(self) -> None:
        """-ERR to STLS is an UpstreamError, not an authentication failure."""
        handshake, protocol, transport, _ = self.begin(TLSMode.STARTTLS)
        protocol.dataReceived(b"+OK ready\r\n-ERR no TLS\r\n")
        error = self.error(handshake)
        self.assertFalse(error.authenticationFailed)

    def test_bad_greeting(self) -> None:
        """A greeting that is not +OK is an UpstreamError."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"-ERR go away\r\n")
        self.assertIn("greeting", str(self.error(handshake)))

    def test_rejected_login_is_an_authentication_failure(self) -> None:
        """-ERR to AUTH PLAIN (or [AUTH]) marks authenticationFailed."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n" + CAPA_PLAIN + b"-ERR [AUTH] Invalid login\r\n")
        self.assertTrue(self.error(handshake).authenticationFailed)

    def test_rejected_password_with_user_pass(self) -> None:
        """-ERR to PASS is an authentication failure."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n" + CAPA_USER + b"+OK\r\n-ERR invalid\r\n")
        self.assertTrue(self.error(handshake).authenticationFailed)

    def test_temporary_refusal_is_not_an_authentication_failure(self) -> None:
        """[SYS/TEMP] and [IN-USE] say the server, not the password, is the problem."""
        for code in (b"[SYS/TEMP]", b"[IN-USE]", b"[LOGIN-DELAY]"):
            handshake, protocol, _, _ = self.begin()
            protocol.dataReceived(b"+OK ready\r\n" + CAPA_PLAIN + b"-ERR " + code + b" try later\r\n")
            self.assertFalse(self.error(handshake).authenticationFailed)

    def test_line_ends_in_credentials_are_never_sent(self) -> None:
        """A passthrough password with CRLF cannot inject commands via PASS."""
        handshake, protocol, transport, _ = self.begin(password="x\r\nDELE 1")
        protocol.dataReceived(b"+OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(CAPA_USER)
        self.assertTrue(self.error(handshake).authenticationFailed)
        self.assertEqual(self.sent(transport), b"")

    def test_auth_plain_carries_any_octets(self) -> None:
        """With SASL PLAIN, a password with CRLF is fine (base64)."""
        handshake, protocol, transport, _ = self.begin(password="x\r\ny")
        protocol.dataReceived(b"+OK ready\r\n")
        self.sent(transport)
        protocol.dataReceived(CAPA_PLAIN)
        self.assertEqual(self.sent(transport), b"AUTH PLAIN " + base64.b64encode(b"\0alice\0x\r\ny") + b"\r\n")

    def test_challenge_despite_initial_response_is_cancelled(self) -> None:
        """An unexpected '+ ' challenge is answered with '*' and fails."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n" + CAPA_PLAIN)
        self.sent(transport)
        protocol.dataReceived(b"+ \r\n")
        self.assertEqual(self.sent(transport), b"*\r\n")
        protocol.dataReceived(b"-ERR cancelled\r\n")
        self.assertFalse(self.error(handshake).authenticationFailed)

    def test_each_command_has_the_whole_connect_timeout(self) -> None:
        """A slow greeting leaves CAPA its own connect_timeout."""
        handshake, protocol, transport, clock = self.begin()
        clock.advance(4.9)
        protocol.dataReceived(b"+OK POP3 ready\r\n")
        self.assertEqual(self.sent(transport), b"CAPA\r\n")
        clock.advance(4.9)
        protocol.dataReceived(CAPA_USER)
        self.assertEqual(self.sent(transport), b"USER alice\r\n")
        self.assertNoResult(handshake)

    def test_a_reply_trickled_a_line_at_a_time_cannot_stretch_its_step(self) -> None:
        """CAPA and all of its reply are one step: lines 2 s apart still run out of time at 5 s."""
        handshake, protocol, transport, clock = self.begin()
        protocol.dataReceived(b"+OK POP3 ready\r\n")
        self.sent(transport)
        protocol.dataReceived(b"+OK Capability list follows\r\n")
        for name in (b"USER", b"UIDL"):
            clock.advance(2)
            protocol.dataReceived(name + b"\r\n")
        self.assertNoResult(handshake)
        clock.advance(1.1)
        error = self.error(handshake)
        self.assertEqual((str(error), error.kind), ("upstream pop.example:110 did not answer in time", "timeout"))

    def test_timeout(self) -> None:
        """An upstream that never answers fails after connectTimeout."""
        handshake, protocol, _, clock = self.begin()
        clock.advance(6)
        self.assertIn("did not answer", str(self.error(handshake)))

    def test_connection_lost(self) -> None:
        """A closed connection (a failed TLS handshake, say) is an UpstreamError."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("closed", str(self.error(handshake)))

    def test_relay_gets_what_came_after_the_login_reply(self) -> None:
        """startRelay hands over data that arrived with the login reply."""
        handshake, protocol, _, _ = self.begin()
        protocol.dataReceived(b"+OK ready\r\n" + CAPA_PLAIN + b"+OK in\r\n-ERR early")
        self.successResultOf(handshake)
        received: list[bytes] = []
        protocol.startRelay(received.append, lambda reason: None)
        protocol.dataReceived(b"\r\n")
        self.assertEqual(received, [b"-ERR early", b"\r\n"])

    def test_oversized_handshake_closes(self) -> None:
        """A server flooding the handshake is disconnected."""
        handshake, protocol, transport, _ = self.begin()
        protocol.dataReceived(b"x" * 70000)
        self.assertTrue(transport.disconnecting)


class TinyPOP3(LineReceiver):
    """
    A scripted upstream POP3 server on a real socket.
    """

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.sendLine(b"+OK tiny ready")

    def lineReceived(self, line: bytes) -> None:
        keyword = line.split(b" ")[0].upper()
        if keyword == b"CAPA":
            self.transport.write(b"+OK\r\nUSER\r\nTOP\r\n.\r\n")
        elif keyword == b"USER":
            self.sendLine(b"+OK")
        elif keyword == b"PASS":
            self.sendLine(b"+OK in" if line == b"PASS alicepw" else b"-ERR [AUTH] no")
        elif keyword == b"RETR":
            self.transport.write(b"+OK 12 octets\r\n..dot\r\nbody\r\n.\r\n")
        elif keyword == b"QUIT":
            self.sendLine(b"+OK bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"-ERR what")


class Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


class LoopbackTests(TestCase):
    timeout = 20

    def listen(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @defer.inlineCallbacks
    def test_relay_session_over_real_sockets(self) -> Any:
        """connectPOP3Upstream logs in with USER/PASS; a pipelined client session relays end to end."""
        upstreamPort = self.listen(Factory.forProtocol(TinyPOP3))
        upstream = UpstreamConfig("main", "127.0.0.1", upstreamPort, TLSMode.PLAIN, protocol="pop3")
        directory = tempfile.mkdtemp(prefix="mp-pop3-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = makeConfig(writeUsersFile(directory, {"alice": "alicepw"}), delay=0, upstream=upstream)

        def connectRelay(upstream: UpstreamConfig, user: str, password: str, client: str) -> Deferred[Any]:
            return Deferred.fromCoroutine(connectPOP3Upstream(reactor, upstream, user, password, clientAddress=client))

        def openMaildrop(*args: Any) -> Deferred[Any]:
            raise AssertionError("no bridge here")

        listener = ListenerConfig("pop3", "tcp:0", TLSMode.PLAIN, protocol="pop3", allowPlaintextAuth=True)
        context = ServerContext(config, listener, makePortal(config, inlineRunner), reactor, connectRelay)
        proxyPort = self.listen(POP3ServerFactory(context, POP3Backends(connectRelay, openMaildrop)))

        client = Collector()
        reactor.connectTCP("127.0.0.1", proxyPort, ClientFactory.forProtocol(lambda: client))  # type: ignore[attr-defined]
        yield deferLater(reactor, 0.1, lambda: None)
        assert client.transport is not None
        client.transport.write(b"USER alice\r\nPASS alicepw\r\nRETR 1\r\nQUIT\r\n")
        data = yield client.done
        self.assertEqual(
            data,
            b"+OK mailproxy ready.\r\n+OK Send PASS\r\n+OK Logged in.\r\n"
            b"+OK 12 octets\r\n..dot\r\nbody\r\n.\r\n+OK bye\r\n",
        )

    @defer.inlineCallbacks
    def test_connection_refused_is_an_upstream_error(self) -> Any:
        """Nothing listening: UpstreamError, not authenticationFailed."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        number = port.getHost().port
        yield port.stopListening()
        upstream = UpstreamConfig("main", "127.0.0.1", number, TLSMode.PLAIN, connectTimeout=5, protocol="pop3")
        try:
            yield Deferred.fromCoroutine(connectPOP3Upstream(reactor, upstream, "alice", "pw"))
        except UpstreamError as error:
            self.assertFalse(error.authenticationFailed)
        else:
            self.fail("connected to nothing")
