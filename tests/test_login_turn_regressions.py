"""
Regressions found reviewing the front door and login turns: turns that
could stay held for good, counters that grew without bound or leaked, and
words said after the conversation was over.
"""

from __future__ import annotations

import configparser
import gc
import ipaddress
import sys
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mailproxy.config import TLSMode
from mailproxy.imap.server import ServerContext, State
from mailproxy.imap.upstream import UpstreamError
from mailproxy.limits import MAX_WAITING, MAX_WAITING_PER_KEY, Gate, Limits, LimitsConfig, Turn
from mailproxy.pop3.server import State as POP3State
from tests.support import ProxyConnection, UpstreamScript, another, connect
from tests.test_pop3_server import FakeBackends
from tests.test_pop3_server import connect as pop3Connect

ROOT = Path(__file__).resolve().parent.parent


def _stranger(context: ServerContext, script: UpstreamScript, index: int) -> ProxyConnection:
    return another(context, script, host=f"10.{index // 250}.{index % 250}.1")


def _expiredQueue(tmp_path: Path, waiting: int) -> tuple[ProxyConnection, list[ProxyConnection]]:
    """
    One failed login holding the turn of user "victim" (2 s), C{waiting}
    more logins for "victim" queued behind it from other networks, and all
    of them past their login deadline (closed, not yet lost: the peer has
    not gone, the abort comes a second later).
    """
    first = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, loginDeadline=1)
    context = first.protocol.context
    first.send(b"a LOGIN victim wrong\r\n")
    queued = []
    for index in range(waiting):
        connection = _stranger(context, first.upstream, index)
        connection.send(b"a LOGIN victim wrong\r\n")
        assert connection.protocol.state is State.LOGGING_IN
        queued.append(connection)
    first.clock.advance(1)
    assert all(connection.protocol.isClosed for connection in queued)
    return first, queued


def test_draining_expired_logins_does_not_nest_one_give_turns_per_waiting_attempt(tmp_path: Path) -> None:
    """A queue of departed clients drains in a loop: giving turns never nests once per waiting attempt."""
    first, queued = _expiredQueue(tmp_path, MAX_WAITING_PER_KEY - 1)
    limits = first.protocol.context.limits
    assert limits is not None
    original = Limits._giveTurns
    nesting = {"now": 0, "max": 0}

    def counting(self: Limits) -> None:
        nesting["now"] += 1
        nesting["max"] = max(nesting["max"], nesting["now"])
        try:
            original(self)
        finally:
            nesting["now"] -= 1

    Limits._giveTurns = counting  # type: ignore[method-assign]
    oldLimit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        first.clock.advance(1.5)  # the held turn is released: the queue drains
    finally:
        Limits._giveTurns = original  # type: ignore[method-assign]
        sys.setrecursionlimit(oldLimit)
    assert not limits._waiting
    assert nesting["max"] <= 3, f"_giveTurns nested {nesting['max']} deep for {len(queued)} waiting attempts"


def _currentDepth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        depth += 1
        frame = frame.f_back  # type: ignore[assignment]
    return depth


def test_a_deep_drain_never_leaves_a_turn_held_forever(tmp_path: Path) -> None:
    """However deep the stack when a queue drains, no turn or check stays held after every client is gone."""
    leaks = []
    base = _currentDepth()
    for extra in range(600, 900, 60):
        directory = tmp_path / str(extra)
        directory.mkdir()
        first, queued = _expiredQueue(directory, MAX_WAITING_PER_KEY - 1)
        limits = first.protocol.context.limits
        assert limits is not None
        oldLimit = sys.getrecursionlimit()
        # Collected at the normal limit (a Deferred's __del__ logs).
        gc.disable()
        sys.setrecursionlimit(base + extra)
        try:
            first.clock.advance(1.5)
        except RecursionError:
            leaks.append((extra, "RecursionError escaped"))
        finally:
            sys.setrecursionlimit(oldLimit)
            gc.enable()
        for connection in [first, *queued]:
            connection.protocol.connectionLost(None)  # type: ignore[arg-type]
        first.clock.advance(120)
        later = another(first.protocol.context, first.upstream, host="198.51.100.9")
        later.send(b"z LOGIN victim wrong\r\n")
        first.clock.advance(5)
        if limits._turnHeld or limits._checking or later.protocol.state is State.LOGGING_IN:
            leaks.append((extra, sorted(limits._turnHeld), limits._checking, later.protocol.state))
        later.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert leaks == []


def test_busy_refusals_from_new_networks_leave_no_counter_behind() -> None:
    """Busy refusals from ever new networks leave no queue counter behind (memory stays bounded)."""
    limits = Limits(LimitsConfig(), Clock(), 2.0)
    holder = limits.beginLogin("192.0.2.1", "victim", "imap")
    assert holder.turn.result is Turn.CHECK
    for index in range(MAX_WAITING_PER_KEY):
        limits.beginLogin(f"10.0.{index // 250}.{index % 250}", "victim", "imap")
    for index in range(1000):
        refused = limits.beginLogin(f"2001:db8:{index:x}::/64", "victim", "imap")
        assert refused.turn.result is Turn.BUSY
    assert len(limits._waitingPerKey) <= MAX_WAITING_PER_KEY + 1


def test_an_owner_on_a_known_network_is_not_refused_busy_by_strangers_filling_the_queue() -> None:
    """Strangers filling the whole queue do not get the owner on a known network refused as busy."""
    clock = Clock()
    limits = Limits(LimitsConfig(), clock, 2.0, maxChecks=1)
    owner = limits.beginLogin("192.0.2.7", "alice", "imap")
    owner.succeeded()
    assert limits.isKnown("192.0.2.7", "alice")
    limits.beginLogin("203.0.113.1", "someone", "imap")  # takes the only check slot
    for index in range(MAX_WAITING):
        limits.beginLogin(f"10.{index // 250}.{index % 250}.1", f"user{index}", "imap")
    again = limits.beginLogin("192.0.2.7", "alice", "imap")
    assert not (again.turn.called and again.turn.result is Turn.BUSY)


def test_ipv6_loopback_failures_are_covered_by_the_jails_ignoreip() -> None:
    """Failures from ::1 are logged as ::1, which the shipped jail never bans, not as the ::/64."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits = Limits(LimitsConfig(), Clock(), 2.0)
        gate = Gate(limits, "::1:40000", "imap")
        attempt = gate.beginLogin("alice", b"alicepw")
        attempt.failed()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [failure] = [event for event in events if "authentication failure" in event.get("log_format", "")]
    logged = ipaddress.ip_network(failure["ip"])
    jail = configparser.ConfigParser(inline_comment_prefixes=("#",))
    jail.read(ROOT / "etc" / "fail2ban" / "jail.d" / "mailproxy.local")
    ignored = [ipaddress.ip_network(entry, strict=False) for entry in jail["mailproxy"]["ignoreip"].split()]
    assert any(
        logged.version == network.version and logged.subnet_of(network)  # type: ignore[arg-type]
        for network in ignored
    ), f"ip={failure['ip']} would be banned despite ignoreip {ignored}"


def test_imap_deadline_after_logout_says_nothing_more(tmp_path: Path) -> None:
    """After LOGOUT nothing more is said: no BYE when the login deadline would have come."""
    connection = connect(str(tmp_path), loginDeadline=10)
    connection.received()
    connection.clock.advance(5)
    connection.send(b"a LOGOUT\r\n")
    assert connection.received() == b"* BYE Logging out\r\na OK LOGOUT completed\r\n"
    connection.clock.advance(5)
    assert connection.received() == b""


def test_pop3_deadline_after_quit_says_nothing_more(tmp_path: Path) -> None:
    """After QUIT nothing more is said either: no -ERR when the login deadline would have come."""
    connection = pop3Connect(tmp_path, tls=TLSMode.PLAIN, allowPlaintextAuth=True)
    connection.received()
    connection.clock.advance(55)
    connection.send(b"QUIT\r\n")
    assert connection.received() == b"+OK Bye\r\n"
    connection.clock.advance(5)
    assert connection.received() == b""


def test_upstream_failures_retried_on_one_connection_do_not_use_up_the_users_sessions(tmp_path: Path) -> None:
    """A login whose upstream fails gives its session back: retries do not use up the user's sessions."""
    script = UpstreamScript(error=UpstreamError("upstream down"))
    limits = LimitsConfig(maxSessionsPerUser=1)
    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, upstream=script, limits=limits)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received() == b"a NO [UNAVAILABLE] Upstream server unavailable, try again later.\r\n"
    connection.send(b"b LOGIN alice alicepw\r\n")
    connection.clock.advance(0)
    assert connection.received().startswith(b"b NO [UNAVAILABLE]")
    connection.protocol.connectionLost(None)  # type: ignore[arg-type]
    script.error = None
    later = another(connection.protocol.context, script, host="192.0.2.2")
    later.received()
    later.send(b"c LOGIN alice alicepw\r\n")
    assert later.protocol.state is State.RELAYING, later.received()


def test_pop3_overlong_line_while_pass_is_pending_gets_no_err(tmp_path: Path) -> None:
    """An overlong line while PASS is pending gets no -ERR that would read as the answer to PASS."""
    backends = FakeBackends(hold=True)
    connection = pop3Connect(tmp_path, tls=TLSMode.PLAIN, allowPlaintextAuth=True, backends=backends)
    connection.send(b"USER alice\r\nPASS alicepw\r\n")
    assert connection.protocol.state is POP3State.LOGGING_IN
    connection.received()
    connection.send(b"x" * 9000)
    assert b"-ERR" not in connection.received()
    connection.lose()
