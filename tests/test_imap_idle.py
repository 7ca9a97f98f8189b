"""
IDLE through the relay, in memory: passthrough with the proxy's periodic
upstream refresh, emulation for upstreams without IDLE, and timeouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import ProxyConnection, UpstreamScript, loggedIn

WITH_IDLE = [b"IMAP4rev1", b"IDLE", b"LITERAL+"]
WITHOUT_IDLE = [b"IMAP4rev1", b"LITERAL+"]
POLL = 15.0
REFRESH = 25 * 60.0
TIMEOUT = 30 * 60.0


def session(tmp_path: Path, capabilities: list[bytes], filters: list[Any] | None = None) -> ProxyConnection:
    return loggedIn(tmp_path, upstream=UpstreamScript(capabilities=capabilities), filters=filters)


@pytest.fixture(params=["unfiltered", "filtered"])
def filters(request: pytest.FixtureRequest) -> list[Any]:
    """Both relay paths: the fast one and the one with a (passing) filter chain."""
    from tests.test_imap_relay import Scripted

    return [] if request.param == "unfiltered" else [Scripted()]


def test_upstream_idle_is_relayed_and_updates_pass_at_once(tmp_path: Path, filters: list[Any]) -> None:
    """IDLE, '+', untagged updates and DONE are relayed as they come."""
    connection = session(tmp_path, WITH_IDLE, filters)
    connection.send(b"i IDLE\r\n")
    assert connection.upstream.sent == b"i IDLE\r\n"
    connection.fromUpstream(b"+ idling\r\n")
    assert connection.received() == b"+ idling\r\n"
    connection.fromUpstream(b"* 2 EXISTS\r\n")
    assert connection.received() == b"* 2 EXISTS\r\n"
    connection.fromUpstream(b"* 1 FETCH (FLAGS (\\Seen))\r\n* 1 EXPUNGE\r\n")
    assert connection.received() == b"* 1 FETCH (FLAGS (\\Seen))\r\n* 1 EXPUNGE\r\n"
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"i OK Idle completed\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\n"
    assert connection.received() == b"i OK Idle completed\r\n"


def test_long_idle_is_refreshed_upstream_without_the_client_noticing(tmp_path: Path, filters: list[Any]) -> None:
    """Every refresh interval the proxy sends DONE and IDLE upstream and hides the replies."""
    connection = session(tmp_path, WITH_IDLE, filters)
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    for _ in range(2):
        sent = len(connection.upstream.sent)
        connection.clock.advance(REFRESH)
        assert connection.upstream.sent[sent:] == b"DONE\r\n"
        connection.fromUpstream(b"* 7 EXISTS\r\ni OK Idle completed\r\n")
        assert connection.upstream.sent[sent:] == b"DONE\r\ni IDLE\r\n"
        connection.fromUpstream(b"+ idling\r\n")
        assert connection.received() == b"* 7 EXISTS\r\n"
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"i OK Idle completed\r\n")
    assert connection.received() == b"i OK Idle completed\r\n"


def test_an_idle_the_upstream_refuses_on_its_refresh_ends_with_nothing_owed(tmp_path: Path, filters: list[Any]) -> None:
    """
    The upstream answers the proxy's re-sent IDLE with NO: the client gets it (its IDLE is over), and the session
    relays on with nothing owed: no "not responding" BYE once the response timeout has passed.
    """
    connection = session(tmp_path, WITH_IDLE, filters)
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    connection.clock.advance(REFRESH)
    connection.fromUpstream(b"i OK Idle completed\r\n")
    assert connection.upstream.sent.endswith(b"DONE\r\ni IDLE\r\n")
    connection.fromUpstream(b"i NO [LIMIT] Too many idlers\r\n")
    assert connection.received() == b"i NO [LIMIT] Too many idlers\r\n"
    relay = connection.protocol.relay
    assert relay is not None and relay.idle.quiet
    connection.send(b"n NOOP\r\n")
    connection.fromUpstream(b"n OK NOOP completed\r\n")
    assert connection.received() == b"n OK NOOP completed\r\n"
    connection.clock.advance(121)
    assert connection.received() == b""
    assert not connection.transport.disconnecting


def test_client_done_during_a_refresh_gets_the_refresh_reply(tmp_path: Path) -> None:
    """DONE arriving after the proxy's own DONE is not sent twice; the tagged reply goes to the client."""
    connection = session(tmp_path, WITH_IDLE)
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    connection.clock.advance(REFRESH)
    connection.send(b"DONE\r\n")
    assert connection.upstream.sent.count(b"DONE") == 1
    connection.fromUpstream(b"i OK Idle completed\r\n")
    assert connection.received() == b"i OK Idle completed\r\n"
    assert connection.upstream.sent.endswith(b"DONE\r\n")


def test_idle_is_emulated_with_noop_polls_when_the_upstream_lacks_it(tmp_path: Path, filters: list[Any]) -> None:
    """The client sees IDLE offered; the proxy polls with NOOP and relays only the untagged updates."""
    connection = session(tmp_path, WITHOUT_IDLE, filters)
    connection.send(b"c CAPABILITY\r\n")
    connection.fromUpstream(b"* CAPABILITY IMAP4rev1 LITERAL+\r\nc OK done\r\n")
    assert connection.received() == b"* CAPABILITY IMAP4rev1 LITERAL+ IDLE\r\nc OK done\r\n"
    connection.send(b"i IDLE\r\n")
    assert connection.received() == b"+ idling\r\n"
    assert connection.upstream.sent == b"c CAPABILITY\r\n"
    connection.clock.advance(POLL)
    assert connection.upstream.sent.endswith(b"mpi1 NOOP\r\n")
    connection.fromUpstream(b"* 3 EXISTS\r\nmpi1 OK NOOP completed\r\n")
    assert connection.received() == b"* 3 EXISTS\r\n"
    connection.clock.advance(POLL)
    assert connection.upstream.sent.endswith(b"mpi2 NOOP\r\n")
    connection.send(b"DONE\r\n")
    assert connection.received() == b""  # waits for the NOOP in flight
    connection.fromUpstream(b"* 1 EXPUNGE\r\nmpi2 OK NOOP completed\r\n")
    assert connection.received() == b"* 1 EXPUNGE\r\ni OK IDLE terminated\r\n"
    connection.clock.advance(POLL * 3)
    assert connection.upstream.sent.count(b"NOOP") == 2
    assert b"DONE" not in connection.upstream.sent


def test_login_reply_offers_emulated_idle(tmp_path: Path) -> None:
    """Without upstream IDLE the login reply's capabilities still list IDLE."""
    from tests.support import connect

    connection = connect(str(tmp_path), allowPlaintextAuth=True, upstream=UpstreamScript(capabilities=WITHOUT_IDLE))
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.received() == b"a OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] Logged in\r\n"


class ProxysOwnAnswers:
    """
    A live upstream's answers to what the proxy itself sends while a client
    idles: its refresh (DONE, then IDLE again) and its NOOP polls.
    """

    def __init__(self, connection: Any, tag: bytes = b"i") -> None:
        self.connection = connection
        self.tag = tag
        self.seen = len(connection.upstream.sent)

    def answer(self) -> None:
        for _ in range(10):  # an answer may make the proxy send more (IDLE again)
            sent = self.connection.upstream.sent
            new, self.seen = sent[self.seen :], len(sent)
            if not new:
                return
            for line in new.split(b"\r\n")[:-1]:
                if line == b"DONE":
                    self.connection.fromUpstream(self.tag + b" OK Idle completed\r\n")
                elif line == self.tag + b" IDLE":
                    self.connection.fromUpstream(b"+ idling\r\n")
                elif line.endswith(b" NOOP") and line.startswith(b"mpi"):
                    self.connection.fromUpstream(line.split(b" ")[0] + b" OK NOOP completed\r\n")


@pytest.mark.parametrize("capabilities", [WITH_IDLE, WITHOUT_IDLE], ids=["passthrough", "emulated"])
def test_an_idling_client_is_not_timed_out(tmp_path: Path, capabilities: list[bytes]) -> None:
    """While idling (the upstream answering the proxy's refreshes and polls) the inactivity timeout is off."""
    connection = session(tmp_path, capabilities)
    connection.send(b"i IDLE\r\n")
    if capabilities is WITH_IDLE:
        connection.fromUpstream(b"+ idling\r\n")
    upstream = ProxysOwnAnswers(connection)
    for _ in range(6):  # 75 minutes
        connection.clock.advance(REFRESH / 2)
        upstream.answer()
    assert not connection.transport.disconnecting
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"i OK Idle completed\r\n")
    connection.clock.advance(TIMEOUT + 1)
    assert connection.transport.disconnecting


def test_an_authenticated_session_times_out_after_thirty_minutes_of_silence(tmp_path: Path) -> None:
    """Not before 30 minutes; then BYE and close."""
    connection = session(tmp_path, WITH_IDLE)
    connection.clock.advance(TIMEOUT - 1)
    assert not connection.transport.disconnecting
    connection.clock.advance(2)
    assert connection.received() == b"* BYE Autologout; idle for too long\r\n"
    assert connection.transport.disconnecting


def test_several_tags_in_flight_with_interleaved_responses(tmp_path: Path, filters: list[Any]) -> None:
    """Pipelined commands go up in order; replies for other tags, interleaved, come back in the upstream's order."""
    connection = session(tmp_path, WITH_IDLE, filters)
    connection.send(b"a SELECT INBOX\r\nb FETCH 1:2 (FLAGS)\r\nc STATUS Sent (MESSAGES)\r\nd NOOP\r\n")
    assert (
        connection.upstream.sent == b"a SELECT INBOX\r\nb FETCH 1:2 (FLAGS)\r\nc STATUS Sent (MESSAGES)\r\nd NOOP\r\n"
    )
    replies = (
        b"* 2 EXISTS\r\na OK [READ-WRITE] done\r\n* 1 FETCH (FLAGS ())\r\n* STATUS Sent (MESSAGES 4)\r\n"
        b"c OK status\r\n* 2 FETCH (FLAGS (\\Seen))\r\nd OK noop\r\nb OK fetch\r\n"
    )
    for offset in range(0, len(replies), 11):
        connection.fromUpstream(replies[offset : offset + 11])
    assert connection.received() == replies


@pytest.mark.parametrize("capabilities", [WITH_IDLE, WITHOUT_IDLE], ids=["relayed", "emulated"])
@pytest.mark.parametrize("plus", [b"", b"+"])
def test_a_command_sent_while_idling_is_refused_and_the_idle_goes_on(
    tmp_path: Path, filters: list[Any], capabilities: list[bytes], plus: bytes
) -> None:
    """Before DONE only DONE may come: a command is answered BAD, nothing of it (literal included) goes upstream."""
    connection = session(tmp_path, capabilities, filters)
    connection.send(b"i IDLE\r\n")
    if capabilities is WITH_IDLE:
        connection.fromUpstream(b"+ idling\r\n")
    connection.received()
    connection.send(b"u APPEND INBOX {5%s}\r\n" % plus + (b"hello\r\n" if plus else b""))
    assert connection.received() == b"u BAD Expected DONE to end the IDLE first\r\n"
    assert connection.upstream.sent == (b"i IDLE\r\n" if capabilities is WITH_IDLE else b"")
    connection.clock.advance(POLL if capabilities is WITHOUT_IDLE else REFRESH)
    assert connection.upstream.sent.endswith(b"mpi1 NOOP\r\n" if capabilities is WITHOUT_IDLE else b"DONE\r\n")


def test_the_proxys_own_idle_commands_wait_for_a_command_boundary() -> None:
    """A poll or refresh due while a client command is partly relayed is put off, never sent into it."""
    from twisted.internet.task import Clock

    from mailproxy.imap.idle import BUSY_RETRY, IdleController

    class Relay:
        midCommand = True
        sent: list[bytes] = []

        def upstreamMidCommand(self) -> bool:
            return self.midCommand

        def toUpstream(self, data: bytes) -> None:
            self.sent.append(data)

        def sendLocal(self, data: bytes) -> None:
            pass

        def updateWatchdog(self) -> None:
            pass

        client = type("Client", (), {"setTimeout": lambda self, timeout: None})()

    clock, relay = Clock(), Relay()
    for emulate, interval in ((True, POLL), (False, REFRESH)):
        relay.sent.clear()
        relay.midCommand = True
        controller = IdleController(
            relay, clock, emulate=emulate, pollInterval=POLL, refreshInterval=REFRESH, timeout=TIMEOUT
        )
        controller.start(b"i")
        clock.advance(interval)
        assert relay.sent == []
        relay.midCommand = False
        clock.advance(BUSY_RETRY)
        assert relay.sent == [b"mpi1 NOOP\r\n" if emulate else b"DONE\r\n"]
        controller.stop()
