"""
Connection limits and authentication-failure throttling: the counters
themselves, and how the IMAP and POP3 servers apply them.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailproxy.config import TLSMode, parseConfig
from mailproxy.imap.server import State
from mailproxy.limits import MAX_DELAY, Limits, LimitsConfig
from tests.support import another, connect
from tests.test_pop3_server import connect as pop3Connect

AUTH_FAILED = b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def limits(**options: float) -> tuple[Limits, Clock]:
    clock = Clock()
    return Limits(LimitsConfig(**options), clock, 2.0), clock  # type: ignore[arg-type]


def test_connections_are_limited_in_total_and_per_ip() -> None:
    """Over either limit a connection is refused; a release frees its place."""
    counters, _ = limits(maxConnections=3, maxConnectionsPerIP=2)
    assert counters.admit("192.0.2.1") is None
    assert counters.admit("192.0.2.1") is None
    assert counters.admit("192.0.2.1") == "too many connections from your address"
    assert counters.admit("192.0.2.2") is None
    assert counters.admit("192.0.2.3") == "too many connections"
    counters.release("192.0.2.1")
    assert counters.admit("192.0.2.3") is None


def test_sessions_per_user_are_limited() -> None:
    """A user over the session limit is refused until one ends."""
    counters, _ = limits(maxSessionsPerUser=2)
    assert counters.startSession("alice") and counters.startSession("alice")
    assert not counters.startSession("alice")
    assert counters.startSession("bob")
    counters.endSession("alice")
    assert counters.startSession("alice")


def test_failure_delay_doubles_and_is_capped() -> None:
    """Each failure in the window doubles the delay, up to the cap; the window forgets old ones."""
    counters, clock = limits(failuresBeforeLockout=100, failureWindow=60)
    delays = [counters.failed("192.0.2.1", "alice", "imap") for _ in range(6)]
    assert delays == [2.0, 4.0, 8.0, 16.0, MAX_DELAY, MAX_DELAY]
    clock.advance(61)
    assert counters.failed("192.0.2.1", "alice", "imap") == 2.0


def test_lockout_per_ip_and_per_user_expires() -> None:
    """After N failures the IP and the user are locked out for a while, then free again."""
    counters, clock = limits(failuresBeforeLockout=3, lockoutSeconds=100)
    for user in ("alice", "bob", "carol"):
        counters.failed("192.0.2.1", user, "pop3")
    assert counters.lockedOut("192.0.2.1", "dave")  # the IP
    assert not counters.lockedOut("192.0.2.9", "alice")  # alice failed only once
    for _ in range(3):
        counters.failed("192.0.2.7", "erin", "imap")
    assert counters.lockedOut("198.51.100.1", "erin")  # the user, from anywhere
    clock.advance(101)
    assert not counters.lockedOut("192.0.2.1", "dave") and not counters.lockedOut("198.51.100.1", "erin")
    counters.prune()


def test_success_clears_the_users_failures_but_not_the_ips() -> None:
    """A good login resets the user's count; an address guessing at many accounts stays counted."""
    counters, _ = limits(failuresBeforeLockout=100)
    counters.failed("192.0.2.1", "alice", "imap")
    counters.failed("192.0.2.1", "alice", "imap")
    counters.succeeded("192.0.2.1", "alice")
    assert counters.failed("192.0.2.2", "alice", "imap") == 2.0
    assert counters.failed("192.0.2.1", "bob", "imap") == 8.0  # the third failure from that address


def test_failures_are_logged_in_one_fail2ban_friendly_line() -> None:
    """Each failure is one line with user, ip, protocol and count; lockouts are logged too."""
    counters, _ = limits(failuresBeforeLockout=2)
    with capturedLogs() as events:
        counters.failed("203.0.113.7", "alice", "imap")
        counters.failed("203.0.113.7", "alice", "imap")
    from twisted.logger import formatEvent

    lines = [formatEvent(event) for event in events]
    assert "authentication failure: user=alice ip=203.0.113.7 protocol=imap failures=1" in lines
    assert any(line.startswith("authentication lockout: ip=203.0.113.7 for 900 s") for line in lines)


def test_imap_connections_over_the_limit_get_bye(tmp_path: Path) -> None:
    """A connection beyond the per-IP limit gets BYE [UNAVAILABLE] and is closed."""
    first = connect(str(tmp_path), limits=LimitsConfig(maxConnectionsPerIP=1))
    second = another(first.protocol.context, first.upstream)
    assert second.received() == b"* BYE [UNAVAILABLE] too many connections from your address, try again later\r\n"
    assert second.transport.disconnecting
    first.protocol.connectionLost(None)  # type: ignore[arg-type]
    third = another(first.protocol.context, first.upstream)
    assert third.received().startswith(b"* OK")


def test_imap_failed_logins_wait_longer_and_lock_out(tmp_path: Path) -> None:
    """Each failure doubles the wait; once locked out, even the right password is refused."""
    connection = connect(
        str(tmp_path), tls=TLSMode.IMPLICIT, limits=LimitsConfig(failuresBeforeLockout=3, lockoutSeconds=600)
    )
    connection.received()
    for delay in (2.0, 4.0, 8.0):
        connection.send(b"a LOGIN alice wrong\r\n")
        connection.clock.advance(delay - 0.1)
        assert connection.received() == b""
        connection.clock.advance(0.2)
        assert connection.received() == AUTH_FAILED
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(MAX_DELAY)
    assert connection.received() == AUTH_FAILED
    assert connection.upstream.requests == []
    connection.clock.advance(600)  # the lockout ends (and this connection's pre-auth timeout with it)
    later = another(connection.protocol.context, connection.upstream)
    later.received()
    later.send(b"b LOGIN alice alicepw\r\n")
    assert later.protocol.state is State.RELAYING


def test_imap_sessions_per_user(tmp_path: Path) -> None:
    """A user over the session limit gets NO [LIMIT]; the place frees when a session ends."""
    first = connect(str(tmp_path), tls=TLSMode.IMPLICIT, limits=LimitsConfig(maxSessionsPerUser=1))
    first.send(b"a LOGIN alice alicepw\r\n")
    second = another(first.protocol.context, first.upstream)
    second.received()
    second.send(b"a LOGIN alice alicepw\r\n")
    second.clock.advance(0)
    assert second.received() == b"a NO [LIMIT] Too many sessions for this user.\r\n"
    first.protocol.connectionLost(None)  # type: ignore[arg-type]
    second.send(b"b LOGIN alice alicepw\r\n")
    assert second.protocol.state is State.RELAYING


def test_pop3_applies_the_same_limits(tmp_path: Path) -> None:
    """POP3 logins are throttled and locked out like IMAP ones."""
    connection = pop3Connect(tmp_path, tls=TLSMode.IMPLICIT)
    connection.protocol.context.limits = Limits(LimitsConfig(failuresBeforeLockout=2), connection.clock, 2.0)
    gate = connection.protocol.gate
    assert gate is not None
    gate.limits = connection.protocol.context.limits
    connection.received()
    for delay in (2.0, 4.0):
        connection.send(b"USER alice\r\nPASS wrong\r\n")
        connection.clock.advance(delay)
        assert connection.received().endswith(b"-ERR [AUTH] Authentication failed.\r\n")
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    connection.clock.advance(MAX_DELAY)
    assert connection.received().endswith(b"-ERR [AUTH] Authentication failed.\r\n")
    assert connection.backends.requests == []


def test_limits_are_configured_in_toml(tmp_path: Path) -> None:
    """[limits] keys map to the counters; zero is refused."""
    import pytest

    from mailproxy.config import ConfigError

    base = {
        "auth": {"users_file": "users"},
        "listener": [{"endpoint": "tcp:1143"}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
        "routing": {"default_upstream": "main"},
    }
    config = parseConfig({**base, "limits": {"max_connections_per_ip": 5, "lockout_seconds": 60}}, str(tmp_path))
    assert config.limits.maxConnectionsPerIP == 5 and config.limits.lockoutSeconds == 60.0
    with pytest.raises(ConfigError, match="limits.failures_before_lockout: must be greater than 0"):
        parseConfig({**base, "limits": {"failures_before_lockout": 0}}, str(tmp_path))
    config = parseConfig({**base, "limits": {"max_line_length": 8192, "max_preauth_literal": 4096}}, str(tmp_path))
    assert (config.limits.maxLineLength, config.limits.maxPreauthLiteral) == (8192, 4096)
    with pytest.raises(ConfigError, match="limits.max_line_length: must be at least 1024"):
        parseConfig({**base, "limits": {"max_line_length": 100}}, str(tmp_path))
    with pytest.raises(ConfigError, match="limits.max_preauth_literal: must be at most 65536"):
        parseConfig({**base, "limits": {"max_preauth_literal": 200000}}, str(tmp_path))
