"""
Regressions found by review: POP3 edge cases around disconnects, relay
ordering and message endings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from mailproxy.auth import makePortal
from mailproxy.config import TLSMode
from mailproxy.filters import PASS
from mailproxy.pop3.wire import TerminatorScanner
from tests.test_pop3_filters import Scripted
from tests.test_pop3_server import MESSAGES, FakeBackends, FakeMaildrop, connect, loggedIn


def test_bridge_command_not_run_after_abandon(tmp_path: Path) -> None:
    """A filter verdict arriving after the client left does not touch the abandoned maildrop."""
    pending: Deferred[Any] = Deferred()
    maildrop = FakeMaildrop(list(MESSAGES))
    connection = loggedIn(
        tmp_path,
        filters=[Scripted(lambda command: pending if command.name == b"DELE" else PASS)],
        backends=FakeBackends(maildrop=maildrop),
    )
    connection.send(b"DELE 1\r\n")
    connection.lose()
    assert maildrop.calls[-1] == "abandon"
    pending.callback(PASS)
    # Before the fix: ['abandon', 'delete 1'] -- the maildrop is used after abandon().
    assert maildrop.calls[-1] == "abandon", maildrop.calls


def test_relay_command_not_sent_after_disconnect(tmp_path: Path) -> None:
    """A filter verdict arriving after the client left sends nothing upstream."""
    pending: Deferred[Any] = Deferred()
    connection = loggedIn(
        tmp_path,
        protocol="pop3",
        filters=[Scripted(lambda command: pending if command.name == b"DELE" else PASS)],
    )
    assert b"DELE" not in connection.backends.sent  # login traffic, now read
    connection.send(b"DELE 1\r\n")
    connection.lose()
    pending.callback(PASS)
    # Before the fix: b"DELE 1\r\n" is written to the (closing) upstream connection.
    assert connection.backends.sent == b""


def test_local_reply_survives_split_unsolicited_line(tmp_path: Path) -> None:
    """A local reply is not swallowed by an unsolicited upstream line that arrives in two pieces."""
    connection = loggedIn(tmp_path, protocol="pop3")
    upstream = connection.backends.upstream
    assert upstream is not None
    upstream.dataReceived(b"-ERR autologout ")  # unsolicited, first half
    connection.send(b"XTND\r\n")  # answered locally: -ERR Unknown command
    upstream.dataReceived(b"in 10s\r\n")  # rest of the unsolicited line
    # Before the fix: b"-ERR autologout in 10s\r\n" -- the upstream's unsolicited line is
    # passed on as the answer to XTND and the local reply is dropped.
    assert connection.received() == b"-ERR Unknown command\r\n"


def test_retr_terminator_follows_crlf(tmp_path: Path) -> None:
    """A message ending in a bare LF still gets its terminator after a CRLF."""
    maildrop = FakeMaildrop([b"Subject: x\r\n\r\nbody\n"])
    connection = loggedIn(tmp_path, backends=FakeBackends(maildrop=maildrop))
    connection.send(b"RETR 1\r\n")
    reply = connection.received()
    body = reply.split(b"\r\n", 1)[1]
    # Before the fix: b"Subject: x\r\n\r\nbody\n.\r\n" -- no CRLF.CRLF anywhere, so a
    # client (or the proxy's own TerminatorScanner) never sees the end.
    assert TerminatorScanner().feed(body) == len(body), reply


def test_failed_login_finishing_after_disconnect_leaves_no_timer(tmp_path: Path) -> None:
    """A password check that finishes after the client left schedules nothing."""
    connection = connect(tmp_path, tls=TLSMode.IMPLICIT)
    pending: list[tuple[Deferred[bool], Any]] = []

    def heldRunner(work: Any) -> Deferred[bool]:
        # Like threadRunner: the hash check finishes later.
        d: Deferred[bool] = Deferred()
        pending.append((d, work))
        return d

    connection.protocol.context.portal = makePortal(connection.protocol.context.config, heldRunner)
    connection.send(b"USER alice\r\nPASS wrong\r\n")
    assert pending
    connection.lose()
    d, work = pending.pop()
    d.callback(work())  # the check completes: wrong password
    # Before the fix: a refusal timer of authFailureDelay seconds is scheduled on a
    # closed connection.  The login turn alone stays held for the delay.
    limits = connection.protocol.context.limits
    assert limits is not None
    assert [call.func for call in connection.clock.getDelayedCalls()] == [limits._releaseTurn]


def test_autologout_not_sent_as_answer_to_pending_command(tmp_path: Path) -> None:
    """The autologout notice waits while a relayed command is in flight."""
    connection = loggedIn(tmp_path, protocol="pop3")
    connection.send(b"STAT\r\n")  # relayed; upstream never answers
    relay = connection.protocol.relay
    assert relay is not None and relay.watchdog is not None
    relay.watchdog.stop()  # else the response timeout (tests/test_faults.py) answers STAT first
    connection.clock.advance(60 * 60)  # idle timeout fires
    # Before the fix: b"-ERR Autologout; idle for too long\r\n", which the client reads as
    # the (failed) answer to STAT.  relay.atBoundary is True between responses
    # even with commands in flight; the bridge path (not _busy) would not send it.
    assert connection.received() == b""
    assert connection.transport.disconnecting


def test_relay_capa_after_login_reflects_the_upstream(tmp_path: Path) -> None:
    """In relay mode CAPA lists the upstream's TOP/UIDL and none of the login mechanisms."""
    connection = loggedIn(tmp_path, protocol="pop3")
    connection.send(b"CAPA\r\n")
    lines = connection.received().split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""]
    assert lines[1:3] == [b"TOP", b"UIDL"]
    assert not [line for line in lines if line.startswith((b"USER", b"SASL", b"STLS"))]
