"""
The upstream response timeout, in memory with a fake clock: a command left
unanswered ends the session cleanly (IMAP relay, POP3 relay, POP3 bridge),
never during IDLE or while a slow client holds the upstream paused; and the
limits' counters return to zero after sessions that ended in faults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailproxy.config import ConfigError, parseConfig
from mailproxy.imap.server import State
from mailproxy.imap.upstream import UpstreamError, UpstreamIMAPProtocol
from mailproxy.limits import Limits
from mailproxy.metrics import ProxyMetrics
from mailproxy.pop3.imapclient import IMAPCommandClient
from mailproxy.watchdog import ResponseWatchdog
from tests import test_pop3_server as pop3
from tests.support import ProxyConnection, UpstreamScript, another, connect, loggedIn
from tests.test_imap_idle import ProxysOwnAnswers

TIMEOUT = 120.0
BYE = b"* BYE [UNAVAILABLE] Upstream server not responding\r\n"


@pytest.fixture(params=["unfiltered", "filtered"])
def filters(request: pytest.FixtureRequest) -> list[Any]:
    """Both relay paths: the fast one and the one with a (passing) filter chain."""
    from tests.test_imap_relay import Scripted

    return [] if request.param == "unfiltered" else [Scripted()]


def session(tmp_path: Path, filters: list[Any], capabilities: list[bytes] | None = None) -> ProxyConnection:
    script = UpstreamScript(capabilities=capabilities or [b"IMAP4rev1", b"IDLE", b"LITERAL+"])
    connection = loggedIn(tmp_path, upstream=script, filters=filters)
    connection.received()
    return connection


def test_response_timeout_is_an_upstream_key(tmp_path: Path) -> None:
    """response_timeout defaults to 120 s, takes a number of seconds, and refuses 0."""
    base = {
        "auth": {"users_file": "users"},
        "listener": [{"endpoint": "tcp:1143"}],
        "routing": {"default_upstream": "main"},
    }
    config = parseConfig({**base, "upstream": {"main": {"host": "h", "port": 143}}}, str(tmp_path))
    assert config.upstreams["main"].responseTimeout == 120.0
    config = parseConfig(
        {**base, "upstream": {"main": {"host": "h", "port": 143, "response_timeout": 7.5}}}, str(tmp_path)
    )
    assert config.upstreams["main"].responseTimeout == 7.5
    with pytest.raises(ConfigError, match=r"upstream\.main\.response_timeout: must be greater than 0"):
        parseConfig({**base, "upstream": {"main": {"host": "h", "port": 143, "response_timeout": 0}}}, str(tmp_path))


def test_watchdog_counts_only_unpaused_silence_while_owed() -> None:
    """Silence counts from the last data, only while owed and not paused; it fires once."""
    clock = Clock()
    fired: list[float] = []
    watchdog = ResponseWatchdog(clock, 10, lambda: fired.append(clock.seconds()))
    clock.advance(100)  # nothing owed
    watchdog.owed(True)
    clock.advance(6)
    watchdog.heard()
    clock.advance(6)
    watchdog.pause()
    clock.advance(100)
    watchdog.resume()
    clock.advance(9)
    assert fired == []
    clock.advance(1)
    assert fired == [222.0]
    clock.advance(100)
    assert fired == [222.0] and clock.getDelayedCalls() == []


def test_imap_command_left_unanswered_gets_bye_unavailable(tmp_path: Path, filters: list[Any]) -> None:
    """After response_timeout of upstream silence the client gets BYE [UNAVAILABLE]; both sides close."""
    connection = session(tmp_path, filters)
    connection.send(b"a NOOP\r\n")
    connection.clock.advance(TIMEOUT - 1)
    assert connection.received() == b""
    connection.clock.advance(1)
    assert connection.received() == BYE
    assert connection.transport.disconnecting
    assert connection.upstreamProtocol.transport.disconnected  # type: ignore[attr-defined]
    assert connection.protocol.state is State.CLOSED


def test_imap_answered_commands_and_a_quiet_session_never_time_out(tmp_path: Path, filters: list[Any]) -> None:
    """Upstream data restarts the count; with nothing owed, silence is the client's business."""
    connection = session(tmp_path, filters)
    connection.send(b"a SEARCH ALL\r\n")
    for _ in range(5):
        connection.clock.advance(TIMEOUT - 1)
        connection.fromUpstream(b"* SEARCH 1\r\n")
    connection.fromUpstream(b"a OK done\r\n")
    connection.clock.advance(20 * 60)
    assert not connection.transport.disconnecting
    assert connection.received().endswith(b"a OK done\r\n")


def test_imap_timeout_mid_response_closes_without_a_word(tmp_path: Path, filters: list[Any]) -> None:
    """Half a message relayed: nothing that could complete it follows, the connection just closes."""
    connection = session(tmp_path, filters)
    connection.send(b"a FETCH 1 BODY[]\r\n")
    connection.fromUpstream(b"* 1 FETCH (BODY[] {400000}\r\n" + b"x" * 300000)
    relayed = connection.received()
    connection.clock.advance(TIMEOUT)
    assert connection.received() == b""
    assert connection.transport.disconnecting
    assert relayed.endswith(b"x" * 1000) and len(relayed) < 400000


def test_imap_slow_reader_does_not_trip_the_timeout(tmp_path: Path, filters: list[Any]) -> None:
    """While the client's buffer holds the upstream paused, silence does not count."""
    connection = session(tmp_path, filters)
    connection.send(b"a FETCH 1 BODY[]\r\n")
    connection.fromUpstream(b"* 1 FETCH (BODY[] {400000}\r\n" + b"x" * 300000)
    producer = connection.transport.producer
    producer.pauseProducing()
    connection.clock.advance(10 * TIMEOUT)
    assert not connection.transport.disconnecting
    producer.resumeProducing()
    connection.fromUpstream(b"x" * 100000 + b")\r\na OK done\r\n")
    connection.clock.advance(10 * TIMEOUT)
    assert not connection.transport.disconnecting
    assert connection.received().endswith(b")\r\na OK done\r\n")


@pytest.mark.parametrize("upstreamIdle", [True, False], ids=["relayed", "emulated"])
def test_imap_idle_is_exempt_until_the_client_ends_it(tmp_path: Path, filters: list[Any], upstreamIdle: bool) -> None:
    """A long IDLE never times out; after DONE the upstream owes the tagged reply again."""
    capabilities = [b"IMAP4rev1", b"IDLE"] if upstreamIdle else [b"IMAP4rev1"]
    connection = session(tmp_path, filters, capabilities)
    connection.send(b"i IDLE\r\n")
    if upstreamIdle:
        connection.fromUpstream(b"+ idling\r\n")
    upstream = ProxysOwnAnswers(connection)
    for _ in range(6):
        connection.clock.advance(5 * 60)
        upstream.answer()
    assert not connection.transport.disconnecting
    connection.clock.advance(15)  # emulation: a poll goes out, and stays unanswered
    connection.send(b"DONE\r\n")
    connection.clock.advance(TIMEOUT)
    assert connection.transport.disconnecting
    assert connection.received().endswith(BYE)


def test_imap_literal_upload_keeps_the_command_alive(tmp_path: Path) -> None:
    """A slow APPEND upload is the client's pace, not upstream silence."""
    connection = session(tmp_path, [])
    connection.send(b"a APPEND INBOX {300}\r\n")
    connection.fromUpstream(b"+ go ahead\r\n")
    for _ in range(3):
        connection.clock.advance(TIMEOUT - 1)
        connection.send(b"y" * 100)
    assert not connection.transport.disconnecting
    connection.send(b"\r\n")
    connection.clock.advance(TIMEOUT)
    assert connection.transport.disconnecting


def test_pop3_relay_command_left_unanswered_gets_err_sys_temp(tmp_path: Path) -> None:
    """POP3 relay: -ERR [SYS/TEMP] answers the command in flight, then both sides close."""
    connection = pop3.loggedIn(tmp_path, protocol="pop3")
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.send(b"STAT\r\n")
    connection.clock.advance(TIMEOUT - 1)
    assert connection.received() == b""
    connection.clock.advance(1)
    assert connection.received() == b"-ERR [SYS/TEMP] Upstream server not responding\r\n"
    assert connection.transport.disconnecting
    assert upstream.transport.disconnected  # type: ignore[attr-defined]


def test_pop3_relay_timeout_mid_retr_closes_without_a_word(tmp_path: Path) -> None:
    """Half a message relayed: no -ERR and no terminator, just the close."""
    connection = pop3.loggedIn(tmp_path, protocol="pop3")
    upstream = connection.backends.upstream
    assert upstream is not None
    connection.send(b"RETR 1\r\n")
    upstream.dataReceived(b"+OK\r\nSubject: x\r\n\r\nhalf a bo")
    connection.received()
    producer = connection.transport.producer
    producer.pauseProducing()
    connection.clock.advance(10 * TIMEOUT)  # a slow reader: no timeout
    assert not connection.transport.disconnecting
    producer.resumeProducing()
    connection.clock.advance(TIMEOUT)
    assert connection.received() == b""
    assert connection.transport.disconnecting


def test_bridge_command_left_unanswered_fails_and_drops_the_upstream() -> None:
    """The bridge's IMAP commands fail with a clear UpstreamError once the upstream is silent too long."""
    clock = Clock()
    protocol = UpstreamIMAPProtocol()
    protocol.makeConnection(StringTransport())
    client = IMAPCommandClient(protocol, clock, TIMEOUT)
    first = client.command(b"UID FETCH 1 (BODY.PEEK[])")
    second = client.command(b"NOOP")
    failures: list[Failure] = []
    first.addErrback(failures.append)
    second.addErrback(failures.append)
    protocol.dataReceived(b"* 1 FETCH (UID 1 BODY[] {10}\r\nabc")
    client.pauseProducing()  # the POP3 client reads slowly
    clock.advance(10 * TIMEOUT)
    assert failures == []
    client.resumeProducing()
    clock.advance(TIMEOUT)
    assert protocol.transport.disconnected  # type: ignore[attr-defined]
    protocol.connectionLost(Failure(ConnectionLost()))
    assert [str(failure.value) for failure in failures] == ["upstream did not answer for 120 s"] * 2
    assert [failure.check(UpstreamError) for failure in failures] == [UpstreamError] * 2
    assert [failure.value.kind for failure in failures] == ["timeout"] * 2


def test_bridge_session_ends_when_its_upstream_is_gone(tmp_path: Path) -> None:
    """A maildrop that lost its upstream answers -ERR [SYS/TEMP] and the POP3 session closes."""
    backends = pop3.FakeBackends()
    maildrop = backends.maildrop
    maildrop.connected = True  # type: ignore[attr-defined]

    def retrieve(number: int, write: Any, bodyLines: int | None) -> Any:
        maildrop.connected = False  # type: ignore[attr-defined]
        raise UpstreamError("upstream did not answer for 120 s", kind="timeout")

    maildrop.retrieve = retrieve  # type: ignore[method-assign]
    connection = pop3.loggedIn(tmp_path, backends=backends)
    metrics = ProxyMetrics(processCollector=False)
    connection.protocol.metrics = metrics.forListener("pop3", "pop3", "plain")
    connection.send(b"RETR 1\r\nSTAT\r\n")
    assert connection.received() == b"-ERR [SYS/TEMP] Mailbox unavailable\r\n"
    assert connection.transport.disconnecting
    counted = metrics.registry.get_sample_value(
        "mailproxy_upstream_errors_total", {"upstream": "main", "kind": "timeout"}
    )
    assert counted == 1


def assertNothingCounted(limits: Limits) -> None:
    assert limits.connections == 0
    assert not limits._perIP and not limits._perUser


def test_limits_return_to_zero_after_faulted_imap_sessions(tmp_path: Path) -> None:
    """Refused upstream logins, upstream resets and response timeouts all release their places."""
    script = UpstreamScript(capabilities=[b"IMAP4rev1"])
    first = connect(str(tmp_path), allowPlaintextAuth=True, upstream=script)
    context = first.protocol.context
    assert context.limits is not None
    connections = [first] + [another(context, script, host=f"192.0.2.{n}") for n in range(2, 5)]
    for connection in connections:
        connection.send(b"a LOGIN alice alicepw\r\n")
    # 1: the upstream resets mid-FETCH; 2: the upstream stalls; 3: the client leaves mid-FETCH.
    connections[1].send(b"b FETCH 1 BODY[]\r\n")
    connections[1].fromUpstream(b"* 1 FETCH (BODY[] {100}\r\nabc")
    connections[1].upstreamProtocol.connectionLost(Failure(ConnectionLost()))
    connections[2].send(b"b NOOP\r\n")
    connections[3].send(b"b FETCH 1 BODY[]\r\n")
    connections[3].fromUpstream(b"* 1 FETCH (BODY[] {100}\r\nabc")
    connections[3].protocol.connectionLost(Failure(ConnectionLost()))
    first.clock.advance(TIMEOUT)
    assert [c.transport.disconnecting for c in connections[:3]] == [False, True, True]
    # 4: an unreachable upstream.
    script.error = UpstreamError("cannot connect")
    refused = another(context, script, host="192.0.2.9")
    refused.send(b"a LOGIN alice alicepw\r\n")
    first.clock.advance(0)
    assert refused.received().endswith(b"a NO [UNAVAILABLE] Upstream server unavailable, try again later.\r\n")
    for connection in [*connections[:3], refused]:
        connection.protocol.connectionLost(Failure(ConnectionLost()))
    assertNothingCounted(context.limits)


def test_limits_return_to_zero_after_faulted_pop3_sessions(tmp_path: Path) -> None:
    """POP3: a stalled relay, a reset mid-RETR and a refused upstream release their places."""
    stalled = pop3.loggedIn(tmp_path, protocol="pop3")
    limits = stalled.protocol.context.limits
    assert limits is not None
    stalled.send(b"STAT\r\n")
    stalled.clock.advance(TIMEOUT)
    assert stalled.transport.disconnecting
    stalled.lose()
    assertNothingCounted(limits)
    reset = pop3.loggedIn(tmp_path, protocol="pop3")
    reset.send(b"RETR 1\r\n")
    upstream = reset.backends.upstream
    assert upstream is not None
    upstream.dataReceived(b"+OK\r\nhalf")
    upstream.connectionLost(Failure(ConnectionLost()))
    assert reset.transport.disconnecting
    reset.lose()
    assertNothingCounted(reset.protocol.context.limits)  # type: ignore[arg-type]
    refused = pop3.connect(tmp_path, tls=pop3.TLSMode.PLAIN, allowPlaintextAuth=True)
    refused.backends.error = UpstreamError("cannot connect")
    refused.send(b"USER alice\r\nPASS alicepw\r\n")
    refused.clock.advance(0)
    assert refused.received().endswith(b"-ERR [SYS/TEMP] Upstream server unavailable, try again later.\r\n")
    refused.lose()
    assertNothingCounted(refused.protocol.context.limits)  # type: ignore[arg-type]


def test_imap_client_pausing_mid_literal_is_not_upstream_silence(tmp_path: Path) -> None:
    """After the upstream's "+", a client quiet for longer than the timeout owes the octets; no BYE."""
    connection = session(tmp_path, [])
    connection.send(b"a APPEND INBOX {300}\r\n")
    connection.fromUpstream(b"+ go ahead\r\n")
    connection.send(b"y" * 100)
    connection.clock.advance(TIMEOUT * 3)
    assert not connection.transport.disconnecting
    connection.send(b"y" * 200 + b"\r\n")
    connection.clock.advance(TIMEOUT)
    assert connection.transport.disconnecting


def test_response_timeouts_count_as_upstream_timeouts_in_the_metrics(tmp_path: Path) -> None:
    """IMAP and the POP3 relay alike: kind="timeout", not closed or reset."""
    metrics = ProxyMetrics(processCollector=False)
    (tmp_path / "imap").mkdir()
    imap = session(tmp_path / "imap", [])
    imap.protocol.metrics = metrics.forListener("imap", "imap", "plain")
    pop = pop3.loggedIn(tmp_path, protocol="pop3")
    pop.protocol.metrics = metrics.forListener("pop3", "pop3", "plain")
    imap.send(b"a NOOP\r\n")
    pop.send(b"STAT\r\n")
    imap.clock.advance(TIMEOUT)
    pop.clock.advance(TIMEOUT)
    imap.upstreamProtocol.connectionLost(Failure(ConnectionLost()))
    upstream = pop.backends.upstream
    assert upstream is not None
    upstream.connectionLost(Failure(ConnectionLost()))
    sample = metrics.registry.get_sample_value
    assert sample("mailproxy_upstream_errors_total", {"upstream": "main", "kind": "timeout"}) == 2
    assert sample("mailproxy_upstream_errors_total", {"upstream": "main", "kind": "reset"}) is None


@pytest.mark.parametrize("upstreamIdle", [True, False], ids=["relayed", "emulated"])
def test_imap_upstream_hanging_during_idle_is_noticed(tmp_path: Path, upstreamIdle: bool) -> None:
    """The proxy's own refresh (DONE) or poll (NOOP) left unanswered ends an idling session too."""
    capabilities = [b"IMAP4rev1", b"IDLE"] if upstreamIdle else [b"IMAP4rev1"]
    connection = session(tmp_path, [], capabilities)
    connection.send(b"i IDLE\r\n")
    if upstreamIdle:
        connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    config = connection.protocol.context.config
    connection.clock.advance((config.idleRefresh if upstreamIdle else config.idlePollInterval) + 1)
    assert not connection.transport.disconnecting
    connection.clock.advance(TIMEOUT)
    assert connection.transport.disconnecting
    assert connection.received().endswith(b"* BYE [UNAVAILABLE] Upstream server not responding\r\n")


def test_imap_command_relayed_after_a_late_filter_verdict_is_watched(tmp_path: Path) -> None:
    """A command a filter let through later is owed a reply like any other."""
    from twisted.internet.defer import Deferred

    from mailproxy.filters import PASS
    from tests.test_imap_relay import Scripted

    pending: Deferred[Any] = Deferred()
    connection = session(tmp_path, [Scripted(onCommand=lambda command: pending)])
    connection.send(b"s SEARCH ALL\r\n")
    pending.callback(PASS)
    assert connection.upstream.sent.endswith(b"s SEARCH ALL\r\n")
    connection.clock.advance(TIMEOUT)
    assert connection.transport.disconnecting
