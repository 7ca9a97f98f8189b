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
from mailproxy.limits import MAX_DELAY, MAX_WAITING_PER_KEY, Limits, LimitsConfig, LoginAttempt, Turn, networkOf
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


def attempt(counters: Limits, network: str, user: str) -> tuple[LoginAttempt, list[Turn]]:
    """
    Begin a login; the list gets its turn when it comes.
    """
    turns: list[Turn] = []
    started = counters.beginLogin(network, user, "imap")
    started.turn.addCallback(turns.append)
    return started, turns


def fail(counters: Limits, network: str, user: str) -> float:
    """
    One whole failed login whose turn comes at once; the delay it answers after.
    """
    started, turns = attempt(counters, network, user)
    assert turns == [Turn.CHECK]
    return started.failed()


def test_failure_delay_doubles_and_is_capped() -> None:
    """Each failure in the window doubles the delay, up to the cap; the window forgets old ones."""
    counters, clock = limits(failuresBeforeLockout=100, failureWindow=600)
    delays = []
    for _ in range(6):
        delays.append(fail(counters, "192.0.2.1", "alice"))
        clock.advance(delays[-1])
    assert delays == [2.0, 4.0, 8.0, 16.0, MAX_DELAY, MAX_DELAY]
    clock.advance(601)
    assert fail(counters, "192.0.2.1", "alice") == 2.0


def test_parallel_attempts_take_turns_and_lock_out_before_checking() -> None:
    """48 guesses at once from one address: one check at a time, each after the last one's delay; none after 10."""
    counters, clock = limits(failuresBeforeLockout=10, lockoutSeconds=900)
    attempts = [attempt(counters, "192.0.2.1", f"user{index}") for index in range(48)]
    checked = 0
    for _ in range(300):  # the ten delays add up to 210 s
        running = [started for started, turns in attempts if turns == [Turn.CHECK] and started.checking]
        assert len(running) <= 1
        for started in running:
            started.failed()
            checked += 1
        clock.advance(1.0)
    assert checked == 10
    turns = [turns for _, turns in attempts]
    assert turns.count([Turn.CHECK]) == 10
    # Past the queue's bound some were refused at once, the rest once locked out.
    waited = min(47, MAX_WAITING_PER_KEY)
    assert turns.count([Turn.BUSY]) == 47 - waited
    assert turns.count([Turn.LOCKED_OUT]) == waited + 1 - 10
    assert counters.checks == 10


def test_a_failed_turn_is_held_for_its_delay_even_if_the_client_leaves() -> None:
    """The next guess waits out the previous one's delay: parallel guesses cost sequential delays."""
    counters, clock = limits()
    first, _ = attempt(counters, "192.0.2.1", "alice")
    second, turns = attempt(counters, "192.0.2.1", "bob")
    assert turns == []
    assert first.failed() == 2.0
    first.abandon()
    clock.advance(1.9)
    assert turns == []
    clock.advance(0.2)
    assert turns == [Turn.CHECK]
    second.succeeded()


def test_one_check_at_a_time_per_user_from_different_addresses() -> None:
    """Guesses at one user from many addresses also take turns."""
    counters, _ = limits()
    first, _ = attempt(counters, "192.0.2.1", "alice")
    _, waiting = attempt(counters, "192.0.2.2", "alice")
    _, other = attempt(counters, "192.0.2.3", "bob")
    assert waiting == [] and other == [Turn.CHECK]
    first.succeeded()
    assert waiting == [Turn.CHECK]


def test_a_client_leaving_before_its_turn_gives_up_its_place() -> None:
    """An abandoned attempt never gets a turn; one leaving as its turn comes frees it uncounted."""
    counters, clock = limits()
    first, _ = attempt(counters, "192.0.2.1", "alice")
    second, secondTurns = attempt(counters, "192.0.2.1", "alice")
    third, thirdTurns = attempt(counters, "192.0.2.1", "alice")
    second.abandon()
    first.succeeded()
    assert secondTurns == [] and thirdTurns == [Turn.CHECK]
    third.withdraw()
    assert fail(counters, "192.0.2.1", "alice") == 2.0  # the withdrawn one was not counted


def test_checks_in_flight_are_bounded_in_all() -> None:
    """Past maxChecks running checks, attempts from other addresses wait too."""
    counters = Limits(LimitsConfig(), Clock(), 2.0, maxChecks=2)
    first, _ = attempt(counters, "192.0.2.1", "a")
    attempt(counters, "192.0.2.2", "b")
    _, third = attempt(counters, "192.0.2.3", "c")
    assert third == []
    first.succeeded()
    assert third == [Turn.CHECK]


def test_lockout_per_network_and_per_user_expires() -> None:
    """After N failures the network and the user are locked out for a while, then free again."""
    counters, clock = limits(failuresBeforeLockout=3, lockoutSeconds=100)
    for user in ("alice", "bob", "carol"):
        clock.advance(fail(counters, "192.0.2.1", user))
    assert counters.lockedOut("192.0.2.1", "dave")  # the address
    assert not counters.lockedOut("192.0.2.9", "alice")  # alice failed only once
    for _ in range(3):
        clock.advance(fail(counters, "192.0.2.7", "erin"))
    assert counters.lockedOut("198.51.100.1", "erin")  # the user, from anywhere unknown
    clock.advance(101)
    assert not counters.lockedOut("192.0.2.1", "dave") and not counters.lockedOut("198.51.100.1", "erin")
    counters.prune()


def test_respelling_a_name_gives_no_more_guesses() -> None:
    """A directory finds uid=erin for ERIN and " erin " too: failures under every spelling count for erin."""
    counters, clock = limits(failuresBeforeLockout=3, lockoutSeconds=100)
    for number, spelling in enumerate(("ERIN", " erin", "Erin  ")):
        clock.advance(fail(counters, f"192.0.2.{number + 1}", spelling))
    assert counters.lockedOut("198.51.100.1", "erin") and counters.lockedOut("198.51.100.1", "eRiN")


def test_strangers_cannot_lock_the_owner_out() -> None:
    """Failures from elsewhere lock the user out for unknown networks, not where the owner logged in from."""
    counters, clock = limits(failuresBeforeLockout=3, lockoutSeconds=900)
    owner, _ = attempt(counters, "192.0.2.1", "alice")
    owner.succeeded()
    for network in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        clock.advance(fail(counters, network, "alice"))
    _, stranger = attempt(counters, "203.0.113.9", "alice")
    assert stranger == [Turn.LOCKED_OUT]
    again, turns = attempt(counters, "192.0.2.1", "alice")
    assert turns == [Turn.CHECK]
    # The owner's own mistakes are counted against their address only.
    assert again.failed() == 2.0


def test_the_owner_does_not_queue_behind_a_neighbour_failing_on_the_same_network() -> None:
    """Behind one NAT, a device failing over and over does not hold up users who logged in from there before."""
    counters, _ = limits()
    owner, _ = attempt(counters, "192.0.2.1", "alice")
    owner.succeeded()
    neighbour, _ = attempt(counters, "192.0.2.1", "bob")
    neighbour.failed()
    _, stranger = attempt(counters, "192.0.2.1", "carol")
    _, again = attempt(counters, "192.0.2.1", "alice")
    assert stranger == [] and again == [Turn.CHECK]


def test_too_many_waiting_from_one_network_are_refused_at_once() -> None:
    """Past MAX_WAITING_PER_KEY attempts queued for one network, the next is BUSY."""
    counters, _ = limits()
    attempts = [attempt(counters, "192.0.2.1", f"user{index}") for index in range(MAX_WAITING_PER_KEY + 2)]
    assert attempts[-2][1] == [] and attempts[-1][1] == [Turn.BUSY]


def test_known_users_go_first_when_checks_are_scarce() -> None:
    """With every check slot taken by a flood, a user on a known network is next, ahead of the queue."""
    counters = Limits(LimitsConfig(), Clock(), 2.0, maxChecks=1)
    owner, _ = attempt(counters, "192.0.2.1", "alice")
    owner.succeeded()
    running, _ = attempt(counters, "198.51.100.1", "x0")
    flood = [attempt(counters, f"198.51.100.{index}", f"x{index}") for index in range(2, 50)]
    _, again = attempt(counters, "192.0.2.1", "alice")
    running.failed()
    assert again == [Turn.CHECK]
    assert all(turns == [] for _, turns in flood)


def test_known_networks_are_forgotten_after_their_time() -> None:
    """A network is known for a user for known_network_seconds after a login."""
    counters, clock = limits(knownNetworkSeconds=100)
    started, _ = attempt(counters, "192.0.2.1", "alice")
    started.succeeded()
    assert counters.isKnown("192.0.2.1", "alice") and not counters.isKnown("192.0.2.1", "bob")
    clock.advance(101)
    assert not counters.isKnown("192.0.2.1", "alice")
    counters.prune()


def test_ipv6_clients_are_counted_by_their_64() -> None:
    """Addresses in one IPv6 /64 share their counters; IPv4-mapped ones count as IPv4."""
    assert networkOf("2001:db8:1:2::1") == networkOf("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert networkOf("2001:db8:1:3::1") != networkOf("2001:db8:1:2::1")
    assert networkOf("::ffff:192.0.2.1") == "192.0.2.1" == networkOf("192.0.2.1")


def test_a_success_is_no_failure_but_does_not_wipe_earlier_ones() -> None:
    """A good login is not counted; the failures before it still count (an owner logging in does not reset a guesser)."""
    counters, clock = limits(failuresBeforeLockout=100)
    clock.advance(fail(counters, "198.51.100.1", "alice"))
    clock.advance(fail(counters, "198.51.100.1", "alice"))
    good, _ = attempt(counters, "192.0.2.1", "alice")
    good.succeeded()
    assert fail(counters, "198.51.100.2", "alice") == 8.0


def test_failures_are_logged_in_one_fail2ban_friendly_line() -> None:
    """Each failure is one line: address first, then protocol, the encoded user name and the count."""
    counters, clock = limits(failuresBeforeLockout=2)
    with capturedLogs() as events:
        clock.advance(fail(counters, "203.0.113.7", "alice"))
        clock.advance(fail(counters, "203.0.113.7", "x ip=198.51.100.77\r\nforged"))
        attempt(counters, "203.0.113.7", "alice")
    from twisted.logger import formatEvent

    lines = [formatEvent(event) for event in events]
    assert "authentication failure: ip=203.0.113.7 protocol=imap user=alice failures=1" in lines
    assert (
        "authentication failure: ip=203.0.113.7 protocol=imap user=x%20ip%3D198.51.100.77%0D%0Aforged failures=2"
        in lines
    )
    assert any(line.startswith("authentication lockout: ip=203.0.113.7 for 900 s") for line in lines)
    assert "authentication refused: ip=203.0.113.7 protocol=imap user=alice reason=address-locked-out" in lines


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


def test_names_sharing_their_first_64_characters_are_counted_apart() -> None:
    """Guesses at a made-up long name do not lock out a real one that only shares its first 64 characters."""
    counters, clock = limits(failuresBeforeLockout=2)
    prefix = "a" * 64
    for _ in range(2):
        clock.advance(fail(counters, "198.51.100.1", prefix + "-mallory"))
    assert counters.lockedOut("203.0.113.1", prefix + "-mallory")
    assert not counters.lockedOut("203.0.113.1", prefix + "-alice")


def test_a_user_remembers_only_their_most_recent_networks() -> None:
    """One account logging in from ever new networks pushes out only its own oldest ones."""
    from mailproxy.limits import MAX_KNOWN_NETWORKS_PER_USER

    counters, _ = limits()
    for owner in ("alice", "bob"):
        started, _ = attempt(counters, "192.0.2.1", owner)
        started.succeeded()
    for index in range(MAX_KNOWN_NETWORKS_PER_USER):
        started, _ = attempt(counters, f"198.51.100.{index}", "alice")
        started.succeeded()
    assert not counters.isKnown("192.0.2.1", "alice")
    assert counters.isKnown("192.0.2.1", "bob")
    assert counters.isKnown("198.51.100.0", "alice")


def test_an_unchecked_login_holds_its_turn_for_the_first_delay_and_counts_nothing() -> None:
    """The account backend could not say: nothing counted, but the next attempt still waits 2 s."""
    counters, clock = limits(failuresBeforeLockout=3)
    for _ in range(10):
        started, turns = attempt(counters, "192.0.2.1", "alice")
        assert turns == [Turn.CHECK]
        assert started.unavailable() == 2.0
        queued, waiting = attempt(counters, "192.0.2.1", "alice")
        assert waiting == []
        clock.advance(2.0)
        assert waiting == [Turn.CHECK]
        queued.unavailable()
        clock.advance(2.0)
    # Twenty unchecked attempts: no lockout, and a failure is the first.
    assert fail(counters, "192.0.2.1", "alice") == 2.0
