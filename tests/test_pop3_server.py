"""
The client-facing POP3 protocol, driven in memory with a scripted maildrop
(BRIDGE mode) and a scripted upstream POP3 connection (RELAY mode).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.auth import inlineRunner, makePortal
from mailproxy.config import ListenerConfig, TLSMode, UpstreamConfig, UserRoute
from mailproxy.filters.chain import FilterChain
from mailproxy.imap.server import ServerContext
from mailproxy.imap.upstream import UpstreamError
from mailproxy.interfaces import IPOP3Maildrop, ISessionObserver
from mailproxy.pop3 import NoSuchMessage
from mailproxy.pop3.server import POP3Backends, POP3ServerFactory, POP3ServerProtocol, State
from mailproxy.pop3.upstream import POP3UpstreamProtocol, POP3UpstreamSession
from mailproxy.pop3.wire import ByteStuffer, LineSplitter, TerminatorScanner
from tests.support import FakeTLSTransport, makeConfig, writeUsersFile

MESSAGES = [
    b"Subject: one\r\n\r\nbody one\r\n",
    b"Subject: two\r\n\r\n.starts with a dot\r\nmiddle\r\n..two dots\r\n.\r\nlast\r\n",
    b"Subject: three\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
]


@implementer(IPOP3Maildrop)
class FakeMaildrop:
    """
    An in-memory maildrop; C{chunk} splits messages into writes of that
    size; C{hold} makes methods return unfired Deferreds.
    """

    def __init__(self, messages: list[bytes], chunk: int = 5) -> None:
        self.messages = messages
        self.chunk = chunk
        self.deleted: set[int] = set()
        self.calls: list[str] = []
        self.hold = False
        self.held: list[Deferred[Any]] = []
        self.commitError: Exception | None = None

    def _answer(self, value: Any) -> Any:
        if self.hold:
            deferred: Deferred[Any] = Deferred()
            self.held.append(deferred)
            deferred.addCallback(lambda _: value)
            return deferred
        return value

    def _check(self, number: int) -> bytes:
        if not 1 <= number <= len(self.messages) or number in self.deleted:
            raise NoSuchMessage(number)
        return self.messages[number - 1]

    def _live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def stat(self) -> Any:
        self.calls.append("stat")
        live = self._live()
        return self._answer((len(live), sum(len(self.messages[n - 1]) for n in live)))

    def listing(self) -> Any:
        self.calls.append("listing")
        return self._answer([(n, len(self.messages[n - 1])) for n in self._live()])

    def uniqueIds(self) -> Any:
        self.calls.append("uniqueIds")
        return self._answer([(n, f"uid-{n}") for n in self._live()])

    def retrieve(self, number: int, write: Callable[[bytes], None], bodyLines: int | None) -> Any:
        self.calls.append(f"retrieve {number} {bodyLines}")
        message = self._check(number)
        if bodyLines is not None:
            head, _, body = message.partition(b"\r\n\r\n")
            message = head + b"\r\n\r\n" + b"".join(body.splitlines(keepends=True)[:bodyLines])
        for start in range(0, len(message), self.chunk):
            write(message[start : start + self.chunk])
        return self._answer(None)

    def delete(self, number: int) -> Any:
        self.calls.append(f"delete {number}")
        self._check(number)
        self.deleted.add(number)

    def reset(self) -> Any:
        self.calls.append("reset")
        self.deleted.clear()

    def commit(self) -> Any:
        self.calls.append("commit")
        if self.commitError is not None:
            return fail(self.commitError)
        return self._answer(None)

    def abandon(self) -> None:
        self.calls.append("abandon")


@dataclass
class FakeBackends:
    """
    Records what the server asks for; answers with a maildrop or a relay
    upstream on a StringTransport.
    """

    maildrop: FakeMaildrop = field(default_factory=lambda: FakeMaildrop(list(MESSAGES)))
    error: Exception | None = None
    hold: bool = False
    requests: list[tuple[str, str, str, str]] = field(default_factory=list)
    upstream: POP3UpstreamProtocol | None = None
    pending: Deferred[Any] | None = None

    def _result(self, value: Any) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            self.pending = Deferred()
            self.pending.addCallback(lambda _: value)
            return self.pending
        return succeed(value)

    def connectRelay(self, upstream: UpstreamConfig, username: str, password: str, client: str) -> Deferred[Any]:
        self.requests.append(("relay", upstream.name, username, password))
        protocol = self.upstream = POP3UpstreamProtocol()
        protocol.makeConnection(StringTransport())
        return self._result(POP3UpstreamSession(protocol, [b"TOP", b"UIDL"]))

    def openMaildrop(self, upstream: UpstreamConfig, username: str, password: str, client: str) -> Deferred[Any]:
        self.requests.append(("bridge", upstream.name, username, password))
        return self._result(self.maildrop)

    @property
    def sent(self) -> bytes:
        assert self.upstream is not None
        value: bytes = self.upstream.transport.value()  # type: ignore[attr-defined]
        self.upstream.transport.clear()  # type: ignore[attr-defined]
        return value


@implementer(ISessionObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def sessionEvent(self, session: Any, event: str, details: dict[str, Any]) -> None:
        self.events.append((event, details))


@dataclass
class Connection:
    protocol: POP3ServerProtocol
    transport: FakeTLSTransport
    clock: Clock
    backends: FakeBackends
    recorder: Recorder

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def connect(
    directory: Path,
    *,
    tls: TLSMode = TLSMode.STARTTLS,
    allowPlaintextAuth: bool = False,
    protocol: str = "imap",
    backends: FakeBackends | None = None,
    routes: dict[str, UserRoute] | None = None,
    filters: list[Any] | None = None,
) -> Connection:
    usersFile = writeUsersFile(str(directory), {"alice": "alicepw"})
    upstream = UpstreamConfig("main", "127.0.0.1", 1, TLSMode.PLAIN, protocol=protocol)
    config = makeConfig(usersFile, routes=routes, upstream=upstream)
    listener = ListenerConfig(
        "pop3", "tcp:0", tls, protocol="pop3", certificate="x", privateKey="x", allowPlaintextAuth=allowPlaintextAuth
    )
    clock = Clock()
    recorder = Recorder()
    chain = FilterChain([recorder, *(filters or [])])
    fakes = backends or FakeBackends()
    context = ServerContext(
        config,
        listener,
        makePortal(config, inlineRunner),
        clock,
        lambda *args: fail(AssertionError("IMAP upstream asked for")),
        "TLS-OPTIONS",
        lambda user, own=None: chain,
    )
    factory = POP3ServerFactory(context, POP3Backends(fakes.connectRelay, fakes.openMaildrop))
    server = factory.buildProtocol(None)
    transport = FakeTLSTransport()
    server.makeConnection(transport)
    return Connection(server, transport, clock, fakes, recorder)


def loggedIn(directory: Path, **kwargs: Any) -> Connection:
    """
    Logged in as alice on a plaintext listener allowing auth, output read.
    """
    connection = connect(directory, tls=TLSMode.PLAIN, allowPlaintextAuth=True, **kwargs)
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    assert connection.protocol.state is State.TRANSACTION
    connection.received()
    return connection


def capaLines(reply: bytes) -> list[bytes]:
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""]
    return lines[1:-2]


# -- wire helpers ---------------------------------------------------------------


def test_byte_stuffing_across_chunk_boundaries() -> None:
    """Dots at line starts are doubled wherever the chunks split the lines."""
    message = b".a\r\nb\r\n.\r\n..c\r\nd"
    expected = b"..a\r\nb\r\n..\r\n...c\r\nd\r\n.\r\n"
    for size in range(1, len(message) + 1):
        stuffer = ByteStuffer()
        out = b"".join(stuffer.feed(message[i : i + size]) for i in range(0, len(message), size))
        assert out + stuffer.end() == expected, size


def test_byte_stuffer_end_completes_the_last_line() -> None:
    """The terminator always follows a CRLF, and an empty message is just the dot line."""
    assert ByteStuffer().end() == b".\r\n"
    stuffer = ByteStuffer()
    stuffer.feed(b"x\r")
    assert stuffer.end() == b"\n.\r\n"
    stuffer = ByteStuffer()
    stuffer.feed(b"x\r\n")
    assert stuffer.end() == b".\r\n"


def test_terminator_scanner_in_every_split() -> None:
    """The end of a multi-line body is found however the reads split it."""
    body = b"a\r\n..\r\nb\r\n.\r\n"
    for cut in range(len(body) + 1):
        scanner = TerminatorScanner()
        first = scanner.feed(body[:cut])
        if first != -1:
            assert first == len(body) and cut == len(body)
        else:
            assert scanner.feed(body[cut:]) == len(body) - cut
    assert TerminatorScanner().feed(b".\r\nnext") == 3


def test_line_splitter_limits() -> None:
    """Long lines come out as None; a huge partial line raises."""
    splitter = LineSplitter(10, 20)
    assert list(splitter.feed(b"short\r\n" + b"x" * 15 + b"\r\nab")) == [b"short", None]
    assert splitter.pending()
    try:
        list(splitter.feed(b"y" * 30))
    except Exception as error:
        assert type(error).__name__ == "LineTooLong"
    else:
        raise AssertionError("no LineTooLong")


# -- AUTHORIZATION ----------------------------------------------------------------


def test_greeting_and_capa_before_and_after_stls(tmp_path: Path) -> None:
    """Before STLS: STLS and no USER/SASL; after: USER and SASL PLAIN LOGIN, no STLS."""
    connection = connect(tmp_path)
    assert connection.received() == b"+OK mailproxy ready.\r\n"
    connection.send(b"capa\r\n")
    before = capaLines(connection.received())
    assert b"STLS" in before and b"USER" not in before and not [name for name in before if name.startswith(b"SASL")]
    for name in (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION mailproxy"):
        assert name in before
    connection.send(b"STLS\r\n")
    assert connection.received() == b"+OK Begin TLS negotiation\r\n"
    assert connection.transport.tlsStarted == "TLS-OPTIONS"
    connection.send(b"CAPA\r\n")
    after = capaLines(connection.received())
    assert b"STLS" not in after and b"USER" in after and b"SASL PLAIN LOGIN" in after
    connection.send(b"STLS\r\n")
    assert connection.received().startswith(b"-ERR ")


def test_stls_refused_on_plain_and_implicit_listeners(tmp_path: Path) -> None:
    """STLS is only offered and accepted on starttls listeners."""
    for tls in (TLSMode.PLAIN, TLSMode.IMPLICIT):
        connection = connect(tmp_path, tls=tls)
        connection.received()
        connection.send(b"STLS\r\n")
        assert connection.received().startswith(b"-ERR ")
        assert connection.transport.tlsStarted is None


def test_pipelined_command_after_stls_drops_the_connection(tmp_path: Path) -> None:
    """A command sent with STLS in plaintext never runs: the connection closes."""
    connection = connect(tmp_path, allowPlaintextAuth=True)
    connection.received()
    connection.send(b"STLS\r\nUSER alice\r\n")
    assert connection.received() == b"+OK Begin TLS negotiation\r\n"
    assert connection.transport.tlsStarted is None
    assert connection.transport.disconnecting


def test_partial_line_after_stls_counts_as_injection(tmp_path: Path) -> None:
    """Even an unfinished line buffered with STLS closes the connection."""
    connection = connect(tmp_path)
    connection.received()
    connection.send(b"STLS\r\nUS")
    assert connection.transport.tlsStarted is None
    assert connection.transport.disconnecting


def test_plaintext_auth_refused_without_tls(tmp_path: Path) -> None:
    """USER, PASS and AUTH get -ERR [AUTH] on an unencrypted connection."""
    connection = connect(tmp_path)
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0alicepw") + b"\r\n")
    refusal = b"-ERR [AUTH] Plaintext authentication disallowed on unencrypted connections\r\n"
    assert connection.received() == refusal * 3
    assert connection.backends.requests == []


def test_plaintext_auth_allowed_by_the_listener(tmp_path: Path) -> None:
    """allowPlaintextAuth offers USER and SASL PLAIN LOGIN without TLS, and they work."""
    connection = connect(tmp_path, tls=TLSMode.PLAIN, allowPlaintextAuth=True)
    connection.received()
    connection.send(b"CAPA\r\n")
    assert b"USER" in capaLines(connection.received())
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    assert connection.received() == b"+OK Send PASS\r\n+OK Logged in.\r\n"
    assert connection.backends.requests == [("bridge", "main", "alice", "alicepw")]


def test_user_pass_after_stls(tmp_path: Path) -> None:
    """USER/PASS after STLS logs in; passwords may contain spaces."""
    backends = FakeBackends()
    connection = connect(tmp_path, backends=backends, routes={"alice": UserRoute("main", "al@up", None)})
    connection.send(b"STLS\r\n")
    connection.received()
    connection.send(b"PASS x\r\nUSER alice\r\nPASS alicepw\r\n")
    assert connection.received() == b"-ERR USER first\r\n+OK Send PASS\r\n+OK Logged in.\r\n"
    assert backends.requests == [("bridge", "main", "al@up", "alicepw")]
    assert connection.protocol.state is State.TRANSACTION


def test_auth_plain_with_initial_response(tmp_path: Path) -> None:
    """AUTH PLAIN with an initial response logs in."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alicepw") + b"\r\n")
    assert connection.received() == b"+OK Logged in.\r\n"


def test_auth_plain_with_continuation(tmp_path: Path) -> None:
    """AUTH PLAIN without a response asks for it with '+ '."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"auth plain\r\n")
    assert connection.received() == b"+ \r\n"
    connection.send(base64.b64encode(b"alice\0alice\0alicepw") + b"\r\n")
    assert connection.received() == b"+OK Logged in.\r\n"


def test_auth_cancel_bad_base64_and_other_mechanisms(tmp_path: Path) -> None:
    """'*' cancels, bad base64 and unknown mechanisms are -ERR; the session goes on."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"AUTH PLAIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH\r\n")
    connection.send(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0alicepw") + b"\r\n")
    assert connection.received() == (
        b"+ \r\n-ERR Authentication cancelled\r\n-ERR Invalid base64 in SASL response\r\n"
        b"-ERR Unsupported authentication mechanism\r\n+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        b"-ERR [AUTH] Cannot act as another user\r\n"
    )
    assert connection.backends.requests == []


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_login_asks_for_user_name_and_password(tmp_path: Path) -> None:
    """AUTH LOGIN (any case) asks 'Username:' then 'Password:' in base64 and logs in with the answers."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"auth login\r\n")
    assert connection.received() == b"+ VXNlcm5hbWU6\r\n"
    connection.send(b64(b"alice") + b"\r\n")
    assert connection.received() == b"+ UGFzc3dvcmQ6\r\n"
    connection.send(b64(b"alicepw") + b"\r\n")
    assert connection.received() == b"+OK Logged in.\r\n"
    assert connection.backends.requests == [("bridge", "main", "alice", "alicepw")]
    assert ("login", {"ok": True, "mechanism": "LOGIN"}) in connection.recorder.events


def test_auth_login_initial_response_is_the_user_name(tmp_path: Path) -> None:
    """AUTH LOGIN with an initial response asks only for the password; '=' asks for the user name."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"AUTH LOGIN =\r\n*\r\nAUTH LOGIN " + b64(b"alice") + b"\r\n")
    assert connection.received() == b"+ VXNlcm5hbWU6\r\n-ERR Authentication cancelled\r\n+ UGFzc3dvcmQ6\r\n"
    connection.send(b64(b"alicepw") + b"\r\n")
    assert connection.received() == b"+OK Logged in.\r\n"


def test_auth_login_refusals_end_the_exchange(tmp_path: Path) -> None:
    """Cancel at the password, bad base64, NUL, empty and over-long answers are -ERR; the session goes on."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n*\r\n")
    connection.send(b"AUTH LOGIN\r\n!!!\r\n")
    connection.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"alice\0pw") + b"\r\n")
    connection.send(b"AUTH LOGIN\r\n\r\n")
    connection.send(b"AUTH LOGIN\r\n" + b"A" * 2000 + b"\r\n")
    connection.send(b"AUTH LOGIN a b\r\nNOOP\r\n")
    assert connection.received() == (
        b"+ UGFzc3dvcmQ6\r\n-ERR Authentication cancelled\r\n"
        b"+ VXNlcm5hbWU6\r\n-ERR Invalid base64 in SASL response\r\n"
        b"+ UGFzc3dvcmQ6\r\n-ERR NUL in LOGIN user name or password\r\n"
        b"+ VXNlcm5hbWU6\r\n-ERR Empty user name\r\n"
        b"+ VXNlcm5hbWU6\r\n-ERR Line too long\r\n"
        b"-ERR AUTH expects a mechanism and an optional initial response\r\n"
        b"-ERR Unknown command or not valid before login\r\n"
    )
    assert connection.backends.requests == []
    assert connection.protocol.state is State.AUTHORIZATION


def test_auth_login_refused_before_any_challenge_without_tls(tmp_path: Path) -> None:
    """On a plain listener without allowPlaintextAuth AUTH LOGIN is refused at once, and no SASL is offered."""
    connection = connect(tmp_path, tls=TLSMode.PLAIN)
    connection.received()
    connection.send(b"CAPA\r\n")
    assert not [name for name in capaLines(connection.received()) if name.startswith(b"SASL")]
    connection.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n")
    assert connection.received() == (
        b"-ERR [AUTH] Plaintext authentication disallowed on unencrypted connections\r\n"
        b"-ERR Unknown command or not valid before login\r\n"
    )


def test_auth_login_responses_count_as_commands_before_login(tmp_path: Path) -> None:
    """Every SASL response line counts toward the pre-login command cap."""
    from mailproxy.frontdoor import MAX_PRELOGIN_COMMANDS

    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send((b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n") * MAX_PRELOGIN_COMMANDS)
    reply = connection.received()
    # Three lines an exchange: the cap ends the connection in the 34th.
    assert reply.count(b"-ERR Authentication cancelled") == MAX_PRELOGIN_COMMANDS // 3
    assert reply.endswith(b"+ VXNlcm5hbWU6\r\n-ERR Too many commands before login\r\n")
    assert connection.transport.disconnecting
    assert connection.backends.requests == []


def test_auth_login_wrong_password_answers_after_the_delay(tmp_path: Path) -> None:
    """A wrong password through AUTH LOGIN gets -ERR [AUTH] after the failure delay, like USER/PASS."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"wrong") + b"\r\n")
    assert connection.received() == b"+ UGFzc3dvcmQ6\r\n"
    connection.clock.advance(1.9)
    assert connection.received() == b""
    connection.clock.advance(0.2)
    assert connection.received() == b"-ERR [AUTH] Authentication failed.\r\n"
    assert ("login", {"ok": False, "user": "alice", "mechanism": "LOGIN"}) in connection.recorder.events


def test_failed_login_answers_after_the_delay(tmp_path: Path) -> None:
    """A wrong password gets -ERR [AUTH] only after the delay; queued commands follow."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.received()
    connection.send(b"USER alice\r\nPASS wrong\r\nCAPA\r\n")
    assert connection.received() == b"+OK Send PASS\r\n"
    assert connection.transport.producerState == "paused"
    connection.clock.advance(1.9)
    assert connection.received() == b""
    connection.clock.advance(0.2)
    reply = connection.received()
    assert reply.startswith(b"-ERR [AUTH] Authentication failed.\r\n+OK Capability list follows\r\n")
    assert connection.transport.producerState == "producing"
    assert ("login", {"ok": False, "user": "alice", "mechanism": "USER"}) in connection.recorder.events


def test_commands_before_login_are_refused(tmp_path: Path) -> None:
    """TRANSACTION commands and unknown ones are -ERR before login; QUIT closes."""
    connection = connect(tmp_path)
    connection.received()
    connection.send(b"STAT\r\nAPOP a b\r\nQUIT\r\nNOOP\r\n")
    reply = connection.received()
    assert reply.count(b"-ERR") == 2 and reply.endswith(b"+OK Bye\r\n")
    assert connection.transport.disconnecting


def test_upstream_unavailable(tmp_path: Path) -> None:
    """An unreachable upstream answers -ERR [SYS/TEMP] and the client may retry."""
    backends = FakeBackends(error=UpstreamError("cannot connect"))
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, backends=backends)
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(0)
    assert (
        connection.received() == b"+OK Send PASS\r\n-ERR [SYS/TEMP] Upstream server unavailable, try again later.\r\n"
    )
    assert connection.protocol.state is State.AUTHORIZATION


def test_upstream_rejecting_passthrough_password_is_an_auth_failure(tmp_path: Path) -> None:
    """The upstream refusing the client's own password is -ERR [AUTH], after the delay."""
    backends = FakeBackends(error=UpstreamError("no", authenticationFailed=True))
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, backends=backends)
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received() == b"+OK Send PASS\r\n"
    connection.clock.advance(2.1)
    assert connection.received() == b"-ERR [AUTH] Authentication failed.\r\n"


def test_stored_password_rejected_upstream_is_unavailable(tmp_path: Path) -> None:
    """With stored upstream credentials an upstream refusal is the proxy's problem: SYS/TEMP."""
    backends = FakeBackends(error=UpstreamError("no", authenticationFailed=True))
    routes = {"alice": UserRoute("main", "a", "stored")}
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, backends=backends, routes=routes)
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received().endswith(b"-ERR [SYS/TEMP] Upstream server unavailable, try again later.\r\n")
    assert backends.requests == [("bridge", "main", "a", "stored")]


def test_pipelined_commands_wait_for_login_and_run_in_order(tmp_path: Path) -> None:
    """Commands sent with PASS run after the maildrop opens, in order."""
    backends = FakeBackends(hold=True)
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, backends=backends)
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\nSTAT\r\nDELE 1\r\n")
    connection.send(b"STAT\r\n")
    assert connection.received() == b"+OK Send PASS\r\n"
    assert backends.pending is not None
    backends.pending.callback(None)
    assert connection.received() == (
        b"+OK Logged in.\r\n+OK 3 %d\r\n+OK Message 1 deleted\r\n+OK 2 %d\r\n"
        % (sum(map(len, MESSAGES)), len(MESSAGES[1]) + len(MESSAGES[2]))
    )


def test_disconnect_during_login_cancels_and_abandons(tmp_path: Path) -> None:
    """A client leaving while the maildrop opens cancels the open; no delayed calls remain."""
    backends = FakeBackends(hold=True)
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, backends=backends)
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    assert backends.pending is not None and not backends.pending.called
    connection.lose()
    assert backends.pending.called
    assert connection.clock.getDelayedCalls() == []


def test_failed_login_leaves_no_delayed_call_after_disconnect(tmp_path: Path) -> None:
    """The delayed failure reply is cancelled when the client leaves; only the login turn stays held for the delay."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.send(b"USER alice\r\nPASS wrong\r\n")
    connection.lose()
    limits = connection.protocol.context.limits
    assert limits is not None
    assert [call.func for call in connection.clock.getDelayedCalls()] == [limits._releaseTurn]
    connection.clock.advance(limits.failureDelay)
    assert connection.clock.getDelayedCalls() == []


def test_over_long_lines(tmp_path: Path) -> None:
    """A line over 1024 octets is -ERR; a partial line over 8 KiB closes the connection."""
    connection = connect(tmp_path)
    connection.received()
    connection.send(b"X" * 2000 + b"\r\nCAPA\r\n")
    reply = connection.received()
    assert reply.startswith(b"-ERR Line too long\r\n+OK Capability")
    connection.send(b"Y" * 9000)
    assert connection.received() == b"-ERR Line too long\r\n"
    assert connection.transport.disconnecting


def test_preauth_timeout(tmp_path: Path) -> None:
    """A connection that never logs in is closed after the pre-auth timeout."""
    connection = connect(tmp_path)
    connection.received()
    connection.clock.advance(59)
    assert not connection.transport.disconnecting
    connection.clock.advance(2)
    # The login deadline (also 60 s from accept) comes first.
    assert connection.received() == b"-ERR Autologout; login took too long\r\n"
    assert connection.transport.disconnecting


def test_authenticated_timeout(tmp_path: Path) -> None:
    """After login the (longer) authenticated timeout applies."""
    connection = loggedIn(tmp_path)
    connection.clock.advance(29 * 60)
    assert not connection.transport.disconnecting
    connection.send(b"NOOP\r\n")
    connection.clock.advance(29 * 60)
    assert not connection.transport.disconnecting
    connection.clock.advance(61)
    assert connection.transport.disconnecting
    connection.lose()
    assert connection.backends.maildrop.calls[-1] == "abandon"


def test_session_events(tmp_path: Path) -> None:
    """Observers hear connected, login and closed, with protocol pop3 and never a password."""
    connection = loggedIn(tmp_path)
    connection.lose()
    events = connection.recorder.events
    assert [name for name, _ in events] == ["connected", "login", "closed"]
    assert events[1][1] == {"ok": True, "mechanism": "USER"}
    assert connection.protocol.session.protocol == "pop3"
    assert "alicepw" not in repr(events)


# -- BRIDGE mode ------------------------------------------------------------------


def test_stat_list_uidl(tmp_path: Path) -> None:
    """STAT, LIST and UIDL with and without a message number."""
    connection = loggedIn(tmp_path)
    sizes = [len(message) for message in MESSAGES]
    connection.send(b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nuidl 3\r\nLIST 9\r\nLIST x\r\nLIST 1 2\r\n")
    assert connection.received() == (
        b"+OK 3 %d\r\n" % sum(sizes)
        + b"+OK\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % tuple(sizes)
        + b"+OK 2 %d\r\n" % sizes[1]
        + b"+OK\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
        + b"+OK 3 uid-3\r\n"
        + b"-ERR No such message\r\n-ERR Invalid message number\r\n-ERR Syntax error\r\n"
    )


def test_retr_byte_stuffs_lines_split_across_writes(tmp_path: Path) -> None:
    """RETR streams the message stuffed, whatever the write boundaries."""
    for chunk in (1, 2, 3, 7, 1000):
        connection = loggedIn(tmp_path)
        connection.backends.maildrop.chunk = chunk
        connection.send(b"RETR 2\r\n")
        assert connection.received() == (
            b"+OK Message follows\r\nSubject: two\r\n\r\n..starts with a dot\r\nmiddle\r\n"
            b"...two dots\r\n..\r\nlast\r\n.\r\n"
        )


def test_retr_adds_missing_final_line_end(tmp_path: Path) -> None:
    """A message without a final CRLF still ends with CRLF '.' CRLF."""
    backends = FakeBackends(maildrop=FakeMaildrop([b"Subject: x\r\n\r\nno end"]))
    connection = loggedIn(tmp_path, backends=backends)
    connection.send(b"RETR 1\r\n")
    assert connection.received() == b"+OK Message follows\r\nSubject: x\r\n\r\nno end\r\n.\r\n"


def test_top(tmp_path: Path) -> None:
    """TOP n k sends the headers, the blank line and k body lines."""
    connection = loggedIn(tmp_path)
    connection.send(b"TOP 3 2\r\nTOP 3 0\r\nTOP 3\r\nTOP 3 x\r\n")
    assert connection.received() == (
        b"+OK Message follows\r\nSubject: three\r\n\r\nline 1\r\nline 2\r\n.\r\n"
        b"+OK Message follows\r\nSubject: three\r\n\r\n.\r\n"
        b"-ERR Syntax error\r\n-ERR Invalid line count\r\n"
    )
    assert "retrieve 3 2" in connection.backends.maildrop.calls


def test_dele_then_rset(tmp_path: Path) -> None:
    """DELE hides a message until RSET; a deleted message cannot be deleted or read again."""
    connection = loggedIn(tmp_path)
    connection.send(b"DELE 1\r\nDELE 1\r\nRETR 1\r\nSTAT\r\nRSET\r\nSTAT\r\n")
    total = sum(map(len, MESSAGES))
    assert connection.received() == (
        b"+OK Message 1 deleted\r\n-ERR No such message\r\n-ERR No such message\r\n"
        + b"+OK 2 %d\r\n+OK\r\n+OK 3 %d\r\n" % (total - len(MESSAGES[0]), total)
    )


def test_noop_unknown_and_refused_after_login(tmp_path: Path) -> None:
    """NOOP works; unknown commands and AUTH/USER/PASS/STLS/APOP are -ERR; CAPA is the proxy's."""
    connection = loggedIn(tmp_path)
    connection.send(b"NOOP\r\nXYZZY\r\nUSER bob\r\nPASS x\r\nSTLS\r\nAUTH PLAIN\r\nAPOP a b\r\nCAPA\r\n")
    lines = connection.received().split(b"\r\n")
    assert lines[0] == b"+OK"
    assert all(line.startswith(b"-ERR ") for line in lines[1:7])
    capabilities = capaLines(b"\r\n".join(lines[7:]))
    assert b"USER" not in capabilities and b"STLS" not in capabilities and b"TOP" in capabilities


def test_quit_commits_and_closes(tmp_path: Path) -> None:
    """QUIT commits the deletions, says +OK and closes; later input is ignored."""
    connection = loggedIn(tmp_path)
    maildrop = connection.backends.maildrop
    connection.send(b"DELE 2\r\nQUIT\r\nSTAT\r\n")
    assert connection.received() == b"+OK Message 2 deleted\r\n+OK Bye\r\n"
    assert connection.transport.disconnecting
    connection.lose()
    assert maildrop.calls == ["delete 2", "commit"]


def test_quit_commit_failure(tmp_path: Path) -> None:
    """A failed commit answers -ERR [SYS/TEMP] and still closes."""
    connection = loggedIn(tmp_path)
    connection.backends.maildrop.commitError = UpstreamError("gone")
    connection.send(b"QUIT\r\n")
    assert connection.received() == b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n"
    assert connection.transport.disconnecting


def test_disconnect_abandons(tmp_path: Path) -> None:
    """A connection lost without QUIT abandons the maildrop (nothing deleted)."""
    connection = loggedIn(tmp_path)
    connection.send(b"DELE 1\r\n")
    connection.lose()
    assert connection.backends.maildrop.calls == ["delete 1", "abandon"]


def test_asynchronous_commands_are_sequential_and_pause_input(tmp_path: Path) -> None:
    """While a command waits for the maildrop, input is paused and later commands wait."""
    connection = loggedIn(tmp_path)
    maildrop = connection.backends.maildrop
    maildrop.hold = True
    connection.send(b"STAT\r\nUIDL 1\r\nNOOP\r\n")
    assert connection.received() == b""
    assert connection.transport.producerState == "paused"
    assert maildrop.calls == ["stat"]
    maildrop.held.pop(0).callback(None)
    assert connection.received().startswith(b"+OK 3 ")
    assert maildrop.calls == ["stat", "uniqueIds"]
    maildrop.held.pop(0).callback(None)
    assert connection.received() == b"+OK 1 uid-1\r\n+OK\r\n"
    assert connection.transport.producerState == "producing"


def test_retrieval_registers_a_producer_and_disconnect_cancels(tmp_path: Path) -> None:
    """A message being streamed has a producer on the client transport; leaving abandons it."""
    connection = loggedIn(tmp_path)
    maildrop = connection.backends.maildrop
    maildrop.hold = True
    connection.send(b"RETR 1\r\n")
    assert connection.received().startswith(b"+OK Message follows\r\nSubject: one")
    assert connection.transport.producer is not None and connection.transport.streaming
    held = maildrop.held[0]
    connection.lose()
    assert maildrop.calls[-1] == "abandon"
    assert held.called


def test_maildrop_failure_mid_message_closes(tmp_path: Path) -> None:
    """If a message fails after its first octets, the client is disconnected (no terminator)."""
    connection = loggedIn(tmp_path)
    maildrop = connection.backends.maildrop
    maildrop.hold = True
    connection.send(b"RETR 1\r\n")
    connection.received()
    maildrop.held[0].errback(UpstreamError("gone"))
    assert connection.transport.disconnecting
    assert not connection.received().endswith(b".\r\n")
    assert connection.transport.producer is None


# -- RELAY mode -------------------------------------------------------------------


def relayed(tmp_path: Path) -> Connection:
    connection = loggedIn(tmp_path, protocol="pop3")
    assert connection.backends.requests == [("relay", "main", "alice", "alicepw")]
    return connection


def test_relay_passes_multiline_responses_through_with_pipelining(tmp_path: Path) -> None:
    """Pipelined commands go upstream at once; multi-line replies pass through stuffed."""
    connection = relayed(tmp_path)
    backends = connection.backends
    connection.send(b"STAT\r\nLIST\r\nRETR 1\r\nLIST 1\r\nUIDL\r\nTOP 1 0\r\nDELE 1\r\n")
    assert backends.sent == b"STAT\r\nLIST\r\nRETR 1\r\nLIST 1\r\nUIDL\r\nTOP 1 0\r\nDELE 1\r\n"
    assert backends.upstream is not None
    responses = (
        b"+OK 1 20\r\n"
        b"+OK\r\n1 20\r\n.\r\n"
        b"+OK 20 octets\r\n..dot\r\n\r\n.\r\n"
        b"+OK 1 20\r\n"
        b"-ERR no UIDL here\r\n"
        b"+OK\r\nSubject: x\r\n\r\n.\r\n"
        b"+OK deleted\r\n"
    )
    for index in range(0, len(responses), 3):
        backends.upstream.dataReceived(responses[index : index + 3])
    assert connection.received() == responses


def test_relay_local_replies_wait_their_turn(tmp_path: Path) -> None:
    """CAPA and refused commands are answered locally, after earlier relayed responses."""
    connection = relayed(tmp_path)
    backends = connection.backends
    assert backends.upstream is not None
    connection.send(b"RETR 1\r\nCAPA\r\nUSER x\r\nXTND X\r\nNOOP\r\n")
    assert backends.sent == b"RETR 1\r\nNOOP\r\n"
    assert connection.received() == b""
    backends.upstream.dataReceived(b"+OK\r\nbody\r\n")
    assert connection.received() == b"+OK\r\nbody\r\n"
    backends.upstream.dataReceived(b".\r\n+OK\r\n")
    reply = connection.received()
    assert reply.startswith(b".\r\n+OK Capability list follows\r\n")
    assert reply.endswith(b".\r\n-ERR Command not valid in the TRANSACTION state\r\n-ERR Unknown command\r\n+OK\r\n")


def test_relay_error_to_multiline_command_is_one_line(tmp_path: Path) -> None:
    """-ERR to RETR ends the response at its line."""
    connection = relayed(tmp_path)
    assert connection.backends.upstream is not None
    connection.send(b"RETR 9\r\nSTAT\r\n")
    connection.backends.upstream.dataReceived(b"-ERR no such message\r\n+OK 0 0\r\n")
    assert connection.received() == b"-ERR no such message\r\n+OK 0 0\r\n"


def test_relay_quit_closes_client(tmp_path: Path) -> None:
    """QUIT is relayed; its reply closes the client, and the upstream with it."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.send(b"QUIT\r\nSTAT\r\n")
    assert connection.backends.sent == b"QUIT\r\n"
    upstream.dataReceived(b"+OK bye\r\n")
    assert connection.received() == b"+OK bye\r\n"
    assert connection.transport.disconnecting
    connection.lose()
    assert upstream.transport.disconnecting  # type: ignore[attr-defined]


def test_relay_upstream_closing_closes_client(tmp_path: Path) -> None:
    """The upstream going away answers a pending command with -ERR and closes the client."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.send(b"STAT\r\n")
    upstream.connectionLost(Failure(ConnectionDone()))
    assert connection.received() == b"-ERR [SYS/TEMP] Upstream server closed the connection\r\n"
    assert connection.transport.disconnecting


def test_relay_unsolicited_upstream_lines_are_dropped(tmp_path: Path) -> None:
    """Data no command asked for would shift every later response; it is not passed on."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    upstream.dataReceived(b"-ERR surprise\r\n")
    connection.send(b"NOOP\r\n")
    upstream.dataReceived(b"+OK\r\n")
    assert connection.received() == b"+OK\r\n"


def test_relay_cross_registers_producers(tmp_path: Path) -> None:
    """Backpressure: each side is the other's producer."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    assert connection.transport.producer.producer is upstream.transport
    assert upstream.transport.producer is connection.transport  # type: ignore[attr-defined]


def test_relay_client_disconnect_closes_upstream(tmp_path: Path) -> None:
    """The client leaving closes the upstream connection."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.lose()
    assert upstream.transport.disconnecting  # type: ignore[attr-defined]


def test_relay_upstream_traffic_keeps_the_session_alive(tmp_path: Path) -> None:
    """A long download resets the idle timeout, though the client is silent."""
    connection = relayed(tmp_path)
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.send(b"RETR 1\r\n")
    upstream.dataReceived(b"+OK\r\n")
    for _ in range(40):  # 40 minutes, each within the upstream's response timeout
        connection.clock.advance(60)
        upstream.dataReceived(b"x" * 100 + b"\r\n")
    assert not connection.transport.disconnecting


def test_unknown_upstream_protocol_is_refused(tmp_path: Path) -> None:
    """A user routed to an upstream neither POP3 nor IMAP gets -ERR [SYS/PERM]."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT, protocol="smtp")
    connection.received()
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received().endswith(b"-ERR [SYS/PERM] No POP3 service for this account.\r\n")
    assert connection.backends.requests == []
