"""
Filters on POP3 sessions: the same chain and built-in filters as IMAP, in
bridge and relay mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailproxy.filters import PASS, Rewrite
from mailproxy.filters.audit import AuditFilter
from mailproxy.filters.policy import PolicyFilter
from mailproxy.imap.model import Atom
from mailproxy.interfaces import ICommandFilter
from tests.test_pop3_server import FakeBackends, FakeMaildrop, loggedIn

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n.dot\r\n"]


@implementer(ICommandFilter)
class Scripted:
    def __init__(self, decide: Any) -> None:
        self.decide = decide
        self.seen: list[Any] = []

    def filterCommand(self, session: Any, command: Any) -> Any:
        self.seen.append(command)
        return self.decide(command)


def test_read_only_policy_refuses_dele_and_allows_reading(tmp_path: Path) -> None:
    """Under read_only, DELE gets -ERR [NOPERM] and never reaches the maildrop; RETR works."""
    maildrop = FakeMaildrop(MESSAGES)
    connection = loggedIn(
        tmp_path, filters=[PolicyFilter.fromOptions({"read_only": True})], backends=FakeBackends(maildrop=maildrop)
    )
    connection.send(b"DELE 1\r\nRETR 2\r\nQUIT\r\n")
    reply = connection.received()
    assert reply.startswith(b"-ERR [NOPERM] Mailbox access is read-only\r\n+OK")
    assert b"\r\n..dot\r\n.\r\n" in reply
    assert maildrop.deleted == set()


def test_filters_see_pop3_commands_and_may_rewrite_them(tmp_path: Path) -> None:
    """Filters get name and arguments; a Rewrite is what runs."""
    seen = Scripted(lambda command: Rewrite(command.withArguments([Atom(b"2")])) if command.name == b"LIST" else PASS)
    connection = loggedIn(tmp_path, filters=[seen], backends=FakeBackends(maildrop=FakeMaildrop(MESSAGES)))
    connection.send(b"LIST 1\r\n")
    assert connection.received() == b"+OK 2 %d\r\n" % len(MESSAGES[1])
    assert (seen.seen[0].name, seen.seen[0].words()) == (b"LIST", [b"1"])


def test_deferred_verdicts_keep_pop3_commands_in_order(tmp_path: Path) -> None:
    """A pending verdict holds later pipelined commands."""
    pending: Deferred[Any] = Deferred()
    connection = loggedIn(
        tmp_path,
        filters=[Scripted(lambda command: pending if command.name == b"STAT" else PASS)],
        backends=FakeBackends(maildrop=FakeMaildrop(MESSAGES)),
    )
    connection.send(b"STAT\r\nNOOP\r\n")
    assert connection.received() == b""
    pending.callback(PASS)
    assert connection.received() == b"+OK 2 %d\r\n+OK\r\n" % sum(map(len, MESSAGES))


def test_a_raising_filter_answers_an_error_and_the_session_goes_on(tmp_path: Path) -> None:
    """An exception in a filter gives -ERR [SERVERBUG]; the next command works."""

    def explode(command: Any) -> Any:
        if command.name == b"UIDL":
            raise RuntimeError("bug")
        return PASS

    connection = loggedIn(tmp_path, filters=[Scripted(explode)], backends=FakeBackends(maildrop=FakeMaildrop(MESSAGES)))
    connection.send(b"UIDL\r\nNOOP\r\n")
    assert connection.received() == b"-ERR [SERVERBUG] Internal error in a proxy filter\r\n+OK\r\n"


def test_audit_logs_pop3_commands_without_credentials(tmp_path: Path) -> None:
    """One JSON line per POP3 command with result and bytes; the password never appears."""
    path = tmp_path / "audit.jsonl"
    auditor = AuditFilter.fromOptions({"file": str(path), "log": False})
    connection = loggedIn(tmp_path, filters=[auditor], backends=FakeBackends(maildrop=FakeMaildrop(MESSAGES)))
    connection.send(b"STAT\r\nRETR 1\r\nDELE 9\r\nQUIT\r\n")
    auditor.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    commands = [(record["command"], record["result"]) for record in records if record["event"] == "command"]
    assert commands == [("STAT", "+OK"), ("RETR", "+OK"), ("DELE", "-ERR"), ("QUIT", "+OK")]
    retr = next(record for record in records if record.get("command") == "RETR")
    assert retr["bytes_out"] > len(MESSAGES[0]) and retr["user"] == "alice"
    assert "alicepw" not in path.read_text()


def test_relay_mode_commands_pass_through_the_chain(tmp_path: Path) -> None:
    """In relay mode a refused DELE never reaches the POP3 upstream; allowed commands do."""
    connection = loggedIn(tmp_path, protocol="pop3", filters=[PolicyFilter.fromOptions({"read_only": True})])
    connection.send(b"DELE 1\r\nSTAT\r\n")
    assert connection.backends.sent == b"STAT\r\n"
    assert connection.received() == b"-ERR [NOPERM] Mailbox access is read-only\r\n"
