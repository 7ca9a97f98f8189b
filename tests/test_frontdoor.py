"""
The connection lifecycle both front ends share (L{mailproxy.frontdoor}):
the login deadline, aborting what would wait for a peer, bounded closes,
login turns through the server, and the start-up pieces (hash threads,
listen backlog, TLS settings in the configuration).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from mailproxy import tap
from mailproxy.config import ConfigError, TLSMode, parseConfig
from mailproxy.frontdoor import CLOSE_GRACE, EXPIRY_GRACE
from mailproxy.imap.server import State
from mailproxy.limits import MAX_WAITING_PER_KEY, LimitsConfig
from tests.support import connect
from tests.test_pop3_server import connect as pop3Connect


def test_a_stalled_tls_handshake_is_aborted_at_the_deadline_and_its_slot_freed_at_once(tmp_path: Path) -> None:
    """No ClientHello by the deadline: aborted (a TLS close would wait for the handshake), the place free."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, loginDeadline=10)
    limits = connection.protocol.context.limits
    assert limits is not None and limits.connections == 1
    connection.clock.advance(10)
    assert connection.transport.disconnected  # StringTransport's mark of abortConnection
    assert limits.connections == 0


def test_after_the_handshake_an_expired_client_gets_a_goodbye_then_an_abort(tmp_path: Path) -> None:
    """A client past its handshake is told why, closed, and aborted if it has not gone a second later."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, loginDeadline=10)
    connection.protocol.handshakeCompleted()
    connection.received()
    connection.clock.advance(10)
    assert connection.received() == b"* BYE Autologout; login took too long\r\n"
    assert connection.transport.disconnecting and not connection.transport.disconnected
    assert connection.protocol.context.limits is not None
    assert connection.protocol.context.limits.connections == 0
    connection.clock.advance(EXPIRY_GRACE)
    assert connection.transport.disconnected


def test_starttls_makes_the_handshake_pending_again(tmp_path: Path) -> None:
    """After STARTTLS the deadline aborts until the new handshake completes."""
    connection = connect(str(tmp_path), tls=TLSMode.STARTTLS, loginDeadline=10)
    connection.send(b"a STARTTLS\r\n")
    assert connection.protocol.tlsHandshaking
    connection.clock.advance(10)
    assert connection.transport.disconnected


def test_a_client_that_never_answers_the_close_is_aborted(tmp_path: Path) -> None:
    """After LOGOUT the connection is closed; one still open after the grace period is aborted."""
    connection = connect(str(tmp_path))
    connection.send(b"a LOGOUT\r\n")
    assert connection.transport.disconnecting and not connection.transport.disconnected
    connection.clock.advance(CLOSE_GRACE)
    assert connection.transport.disconnected


def test_a_closed_connection_leaves_no_abort_behind(tmp_path: Path) -> None:
    """Once the connection is lost, no timer of its own is left."""
    connection = connect(str(tmp_path))
    connection.send(b"a LOGOUT\r\n")
    connection.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert connection.clock.getDelayedCalls() == []


def test_the_deadline_ends_at_login(tmp_path: Path) -> None:
    """A logged-in session outlives the login deadline."""
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, loginDeadline=10)
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.protocol.state is State.RELAYING
    connection.clock.advance(11)
    assert not connection.transport.disconnecting


def test_pop3_has_the_same_deadline(tmp_path: Path) -> None:
    """POP3 connections are aborted in the TLS handshake and told otherwise, like IMAP ones."""
    connection = pop3Connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.clock.advance(60)
    assert connection.transport.disconnected


def test_a_second_login_queues_behind_the_first_on_the_same_connection_address(tmp_path: Path) -> None:
    """Two connections guessing from one address: the second is checked only after the first one's delay."""
    first = connect(str(tmp_path), tls=TLSMode.IMPLICIT)
    from tests.support import another

    second = another(first.protocol.context, first.upstream)
    first.received()
    second.received()
    first.send(b"a LOGIN alice wrong\r\n")
    second.send(b"b LOGIN alice alicepw\r\n")
    assert second.protocol.state is State.LOGGING_IN
    first.clock.advance(2.0)
    assert first.received() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert second.protocol.state is State.RELAYING


def test_login_refused_when_too_many_wait_for_their_turn(tmp_path: Path) -> None:
    """Past the queue's bound a login is answered at once (after the base delay) with NO [UNAVAILABLE]."""
    from tests.support import another

    first = connect(str(tmp_path), tls=TLSMode.IMPLICIT, limits=LimitsConfig(maxConnectionsPerIP=1000))
    first.send(b"a LOGIN alice wrong\r\n")
    others = [another(first.protocol.context, first.upstream) for _ in range(MAX_WAITING_PER_KEY + 1)]
    for other in others:
        other.received()
        other.send(b"b LOGIN alice wrong\r\n")
    first.clock.advance(0)
    assert others[-1].received() == b""
    first.clock.advance(2.0)
    assert others[-1].received().startswith(b"b NO [UNAVAILABLE] Too many logins in progress")


BASE = {
    "auth": {"users_file": "users"},
    "listener": [{"endpoint": "tcp:1143"}],
    "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
    "routing": {"default_upstream": "main"},
}


def test_new_settings_are_read_and_checked(tmp_path: Path) -> None:
    """login_deadline, listen_backlog, hash_threads and known_network_seconds; nonsense is one clear error."""
    config = parseConfig(
        {
            **BASE,
            "server": {"login_deadline": 30, "listen_backlog": 4096},
            "auth": {"users_file": "users", "hash_threads": 3},
            "limits": {"known_network_seconds": 3600},
        },
        str(tmp_path),
    )
    assert (config.loginDeadline, config.listenBacklog, config.hashThreads) == (30.0, 4096, 3)
    assert config.limits.knownNetworkSeconds == 3600.0
    for document, message in (
        ({"server": {"login_deadline": 0}}, "server.login_deadline: must be greater than 0"),
        ({"server": {"listen_backlog": 0}}, "server.listen_backlog: must be an integer from 1 to 65535"),
        ({"auth": {"users_file": "users", "hash_threads": 0}}, "auth.hash_threads: must be an integer from 1"),
        (
            {"listener": [{"endpoint": "tcp:1143", "tls_ciphers": "ECDHE-RSA-AES128-GCM-SHA256"}]},
            "listener[0].tls_ciphers: only for listeners with tls = starttls or implicit",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parseConfig({**BASE, **document}, str(tmp_path))


def test_listeners_get_the_configured_backlog_unless_they_name_one() -> None:
    """tcp, tcp6 and unix endpoints get backlog=N; an explicit one, or another kind, is left alone."""
    assert tap.withBacklog("tcp:143:interface=\\:\\:", 1024) == "tcp:143:interface=\\:\\::backlog=1024"
    assert tap.withBacklog("unix:/run/imap.sock", 64) == "unix:/run/imap.sock:backlog=64"
    assert tap.withBacklog("tcp:143:backlog=10", 1024) == "tcp:143:backlog=10"
    assert tap.withBacklog("systemd:domain=INET:index=0", 1024) == "systemd:domain=INET:index=0"


def test_passwords_are_hashed_in_a_pool_of_hash_threads(tmp_path: Path) -> None:
    """The service owns a pool of auth.hash_threads threads, started and stopped with it; the portal uses it."""
    (tmp_path / "users").write_text("")
    config = parseConfig({**BASE, "auth": {"users_file": "users", "hash_threads": 3}}, str(tmp_path))
    service = tap.buildService(config, MemoryReactorClock())
    [hashing] = [child for child in service if isinstance(child, tap.HashPoolService)]
    assert hashing.pool.max == 3
    service.startService()
    assert hashing.pool.started
    service.stopService()
    assert not hashing.pool.started


def test_a_login_stalled_upstream_is_cut_at_the_deadline(tmp_path: Path) -> None:
    """The deadline holds while the upstream login hangs: the client is closed, the upstream attempt cancelled."""
    from tests.support import UpstreamScript

    script = UpstreamScript(hold=True)
    connection = connect(str(tmp_path), tls=TLSMode.IMPLICIT, upstream=script, loginDeadline=10)
    connection.protocol.handshakeCompleted()
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.protocol.state is State.LOGGING_IN
    connection.clock.advance(10)
    assert connection.received() == b"* BYE Autologout; login took too long\r\n"
    assert connection.protocol.context.limits is not None
    assert connection.protocol.context.limits.connections == 0
    connection.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert script.pending is not None and script.pending.called
    script.pending.addErrback(lambda failure: None)


def test_more_than_a_hundred_commands_before_login_end_the_connection(tmp_path: Path) -> None:
    """A hundred commands are answered; the next one gets BYE and the connection closes (IMAP and POP3)."""
    from mailproxy.frontdoor import MAX_PRELOGIN_COMMANDS

    connection = connect(str(tmp_path))
    connection.received()
    connection.send(b"a NOOP\r\n" * (MAX_PRELOGIN_COMMANDS + 5))
    reply = connection.received()
    assert reply.count(b"a OK NOOP completed") == MAX_PRELOGIN_COMMANDS
    assert reply.endswith(b"* BYE Too many commands before login\r\n")
    assert connection.transport.disconnecting
    pop3 = pop3Connect(tmp_path)
    pop3.received()
    pop3.send(b"NOOP\r\n" * (MAX_PRELOGIN_COMMANDS + 5))
    assert pop3.received().endswith(b"-ERR Too many commands before login\r\n")
    assert pop3.transport.disconnecting
