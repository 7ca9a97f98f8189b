"""
The audit filter: one log event and one JSON line per command, login and
closed session, and never a credential.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mailproxy.filters.audit import AuditFilter, clientHost
from mailproxy.filters.chain import FilterChain
from mailproxy.imap.model import IMAPCommand, StreamedLiteral, parseCommand
from mailproxy.session import ProxySession
from tests.support import UpstreamScript, loggedIn

PASSWORD = "s3cretpw"
START = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def makeSession(selected: bytes | None = b"INBOX", address: str = "192.0.2.7:40000") -> ProxySession:
    session = ProxySession("imap", "imap", address, True, FilterChain())
    session.user = "alice"
    session.upstream = "mailhost"
    session.selected = selected
    return session


def command(*parts: bytes | StreamedLiteral) -> IMAPCommand:
    parsed = parseCommand(list(parts))
    assert parsed is not None
    return parsed


def audit(tmp_path: Path, **options: Any) -> tuple[AuditFilter, Path]:
    path = tmp_path / "audit.jsonl"
    auditor = AuditFilter.fromOptions({"file": str(path), **options})
    auditor.clock = lambda: START
    return auditor, path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def sendCommand(auditor: AuditFilter, session: ProxySession, parsed: IMAPCommand | None, result: str = "OK") -> None:
    details = {"command": parsed, "result": result, "bytesIn": 20, "bytesOut": 300, "duration": 0.0123456}
    auditor.sessionEvent(session, "command", details)


def test_a_command_gives_one_log_event_and_one_json_line_with_every_field(tmp_path: Path) -> None:
    """A command event is logged once in each output, with the documented fields."""
    auditor, path = audit(tmp_path)
    with capturedLogs() as events:
        sendCommand(auditor, makeSession(), command(b"t7 UID FETCH 1:* (FLAGS)\r\n"))
    auditor.close()
    assert lines(path) == [
        {
            "time": "2023-11-14T22:13:20.250Z",
            "event": "command",
            "user": "alice",
            "client": "192.0.2.7",
            "listener": "imap",
            "upstream": "mailhost",
            "tls": True,
            "command": "UID FETCH",
            "tag": "t7",
            "mailbox": "INBOX",
            "result": "OK",
            "relayed": True,
            "bytes_in": 20,
            "bytes_out": 300,
            "duration_ms": 12.346,
        }
    ]
    [event] = events
    assert event["log_namespace"] == "mailproxy.audit"
    assert event["log_level"] is LogLevel.info
    assert (event["command"], event["mailbox"], event["result"], event["duration_ms"]) == (
        "UID FETCH",
        "INBOX",
        "OK",
        12.346,
    )
    assert formatEvent(event) == "alice@192.0.2.7 t7 UID FETCH INBOX: OK (20 bytes in, 300 bytes out, 12.346 ms)"


def test_login_passwords_appear_in_neither_output(tmp_path: Path) -> None:
    """A LOGIN command's password is nowhere in the log events or the file."""
    auditor, path = audit(tmp_path)
    with capturedLogs() as events:
        sendCommand(auditor, makeSession(selected=None), command(f"a LOGIN alice {PASSWORD}\r\n".encode()), "BAD")
        sendCommand(auditor, makeSession(selected=None), command(b"b AUTHENTICATE PLAIN AGFsaWNlAHMzY3JldHB3\r\n"))
    auditor.close()
    written = path.read_text("utf-8")
    assert [record["command"] for record in lines(path)] == ["LOGIN", "AUTHENTICATE"]
    assert PASSWORD not in written and "AGFsaWNlAHMzY3JldHB3" not in written
    for event in events:
        assert PASSWORD not in formatEvent(event)
        assert PASSWORD not in repr(event) and "AGFsaWNlAHMzY3JldHB3" not in repr(event)


@pytest.mark.parametrize(
    ("parts", "mailbox"),
    [
        ([b"a SELECT &AMQ-rger\r\n"], "Ärger"),
        ([b'a EXAMINE "Sent Items"\r\n'], "Sent Items"),
        ([b"a STATUS Archive (MESSAGES)\r\n"], "Archive"),
        ([b"a APPEND Drafts (\\Seen) {5}\r\n", b"hello", b"\r\n"], "Drafts"),
        ([b"a APPEND Big {900000}\r\n", StreamedLiteral(900000)], "Big"),
        ([b"a CREATE Projects/New\r\n"], "Projects/New"),
        ([b"a DELETE Old\r\n"], "Old"),
        ([b"a RENAME Source Target\r\n"], "Source"),
        ([b"a SUBSCRIBE News\r\n"], "News"),
        ([b"a UNSUBSCRIBE News\r\n"], "News"),
        ([b'a LIST "" "Work/%"\r\n'], "Work/%"),
        ([b"a UID COPY 1:3 Trash\r\n"], "Trash"),
        ([b"a MOVE 4 Spam\r\n"], "Spam"),
        ([b"a FETCH 1 BODY[]\r\n"], "INBOX"),
        ([b"a NOOP\r\n"], "INBOX"),
    ],
)
def test_the_mailbox_is_the_named_one_or_the_selected_one(
    tmp_path: Path, parts: list[bytes | StreamedLiteral], mailbox: str
) -> None:
    """Mailbox commands log their (decoded) mailbox, COPY/MOVE the target, others the selected one."""
    auditor, path = audit(tmp_path, log=False)
    sendCommand(auditor, makeSession(), command(*parts))
    auditor.close()
    assert lines(path)[0]["mailbox"] == mailbox


def test_mailbox_names_that_are_not_modified_utf7_are_read_as_utf8(tmp_path: Path) -> None:
    """A UTF8=ACCEPT name is decoded as UTF-8; invalid bytes are replaced, not fatal."""
    auditor, path = audit(tmp_path, log=False)
    sendCommand(auditor, makeSession(), command('a SELECT "Entwürfe"\r\n'.encode()))
    sendCommand(auditor, makeSession(), command(b'a SELECT "R&D \xff"\r\n'))
    auditor.close()
    assert [record["mailbox"] for record in lines(path)] == ["Entwürfe", "R&D \ufffd"]


def test_unparsed_commands_are_logged_as_a_question_mark(tmp_path: Path) -> None:
    """A command event without a parsed command still gives one record, command '?'."""
    auditor, path = audit(tmp_path)
    with capturedLogs() as events:
        sendCommand(auditor, makeSession(selected=None), None, "BAD")
    auditor.close()
    [record] = lines(path)
    assert (record["command"], record["tag"], record["mailbox"], record["result"]) == ("?", None, None, "BAD")
    assert len(events) == 1


def test_long_client_chosen_tags_and_command_names_are_cut(tmp_path: Path) -> None:
    """A 10 KB tag or command name costs a bounded record."""
    auditor, path = audit(tmp_path)
    sendCommand(auditor, makeSession(), command(b"T" * 10000 + b" X" + b"Y" * 10000 + b"\r\n"), "BAD")
    auditor.close()
    [record] = lines(path)
    assert record["tag"] == "T" * 64 + "..." and record["command"] == "X" + "Y" * 63 + "..."


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("192.0.2.7:40000", "192.0.2.7"),
        ("2001:db8::1:993", "2001:db8::1"),
        ("[2001:db8::2]:143", "2001:db8::2"),
        ("unix-socket", "unix-socket"),
    ],
)
def test_the_client_is_logged_without_its_port(address: str, host: str) -> None:
    """Only the last ':port' is stripped, so IPv6 addresses stay whole."""
    assert clientHost(address) == host


def test_login_events_record_success_failure_and_user(tmp_path: Path) -> None:
    """Logins are recorded with ok and the user; failures are warnings."""
    auditor, path = audit(tmp_path)
    anonymous = makeSession(selected=None)
    anonymous.user = None
    with capturedLogs() as events:
        auditor.sessionEvent(anonymous, "login", {"ok": False, "user": "mallory"})
        auditor.sessionEvent(makeSession(selected=None), "login", {"ok": True})
    auditor.close()
    records = lines(path)
    assert [(record["event"], record["ok"], record["user"]) for record in records] == [
        ("login", False, "mallory"),
        ("login", True, "alice"),
    ]
    assert [event["log_level"] for event in events] == [LogLevel.warn, LogLevel.info]
    assert formatEvent(events[0]) == "login of mallory from 192.0.2.7 failed"


def test_closed_events_record_bytes_and_duration(tmp_path: Path) -> None:
    """A closed session is one record with its byte counts and duration."""
    auditor, path = audit(tmp_path)
    with capturedLogs() as events:
        auditor.sessionEvent(makeSession(), "closed", {"bytesIn": 10, "bytesOut": 99, "duration": 2.5})
        auditor.sessionEvent(makeSession(), "connected", {})
    auditor.close()
    [record] = lines(path)
    assert (record["event"], record["bytes_in"], record["bytes_out"], record["duration_ms"]) == (
        "closed",
        10,
        99,
        2500.0,
    )
    assert len(events) == 1


def test_without_log_only_the_file_is_written(tmp_path: Path) -> None:
    """log = false emits no twisted.logger events but still writes the file."""
    auditor, path = audit(tmp_path, log=False)
    with capturedLogs() as events:
        sendCommand(auditor, makeSession(), command(b"a NOOP\r\n"))
    auditor.close()
    assert events == []
    assert len(lines(path)) == 1


def test_json_lines_are_appended_one_object_per_line_without_separators(tmp_path: Path) -> None:
    """The file is appended to; odd characters in names are escaped, never raw line breaks or RS."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier":true}\n', "utf-8")
    auditor = AuditFilter.fromOptions({"file": str(path), "log": False})
    sendCommand(auditor, makeSession(), command('a SELECT "x\x1ey\u2028z\u0085"\r\n'.encode()))
    auditor.close()
    raw = path.read_bytes()
    assert b"\x1e" not in raw and "\u2028".encode() not in raw and "\u0085".encode() not in raw
    assert raw.count(b"\n") == 2 and raw.endswith(b"\n")
    assert lines(path)[1]["mailbox"] == "x\x1ey\u2028z\u0085"


def test_close_closes_the_file(tmp_path: Path) -> None:
    """After close() the file is closed; closing twice is harmless."""
    auditor, _ = audit(tmp_path)
    file = auditor.file
    assert file is not None
    auditor.close()
    auditor.close()
    assert file.closed and auditor.file is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"flie": "x"}, "flie"),
        ({"file": 3}, "file"),
        ({"file": ""}, "file"),
        ({"log": "yes"}, "log"),
        ({"file": "/nonexistent-dir/audit.jsonl"}, "file"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict[str, Any], named: str) -> None:
    """Each wrong option is reported by name."""
    with pytest.raises(ValueError, match=re.escape(named)):
        AuditFilter.fromOptions(options)


def test_through_the_relay_each_command_is_audited_without_the_login_password(tmp_path: Path) -> None:
    """In a real session, commands are recorded with their result and the LOGIN password is absent."""
    auditor, path = audit(tmp_path)
    with capturedLogs() as events:
        connection = loggedIn(tmp_path, filters=[auditor], upstream=UpstreamScript())
        connection.send(b"s SELECT Archive\r\n")
        connection.fromUpstream(b"* 3 EXISTS\r\ns OK [READ-WRITE] done\r\n")
        connection.send(b"f FETCH 1 FLAGS\r\n")
        connection.fromUpstream(b"* 1 FETCH (FLAGS ())\r\nf NO nope\r\n")
    auditor.close()
    commands = [record for record in lines(path) if record["event"] == "command"]
    assert [(r["tag"], r["command"], r["mailbox"], r["result"]) for r in commands] == [
        ("a", "LOGIN", None, "LOGIN"),  # before login: no arguments, the outcome is the login event
        ("s", "SELECT", "Archive", "OK"),
        ("f", "FETCH", "Archive", "NO"),
    ]
    assert "alicepw" not in path.read_text("utf-8")
    assert not any("alicepw" in repr(event) for event in events)
