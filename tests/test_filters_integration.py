"""
The built-in filters against a real Dovecot, through the real twistd proxy:
audit log, policy (read-only, limits, mailbox patterns), folder mapping and
hiding, capability rewriting; literals, pipelining and IDLE still work.
"""

from __future__ import annotations

import imaplib
import re
import socket
import time

from tests.conftest import HOST, UPSTREAM_USERS, FilteredProxy
from tests.dovecot import DovecotUpstream


def login(proxy: FilteredProxy, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, proxy.port, timeout=30)
    client.login(user, UPSTREAM_USERS[user])
    return client


def direct(dovecot: DovecotUpstream, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, dovecot.ports["imap"], timeout=30)
    client.login(user, UPSTREAM_USERS[user])
    return client


def listed(client: imaplib.IMAP4) -> set[str]:
    typ, lines = client.list()
    assert typ == "OK"
    names = set()
    for line in lines:
        assert isinstance(line, bytes)
        match = re.match(rb'\([^)]*\) "/" (.+)', line)
        assert match is not None, line
        names.add(match.group(1).strip(b'"').decode())
    return names


def test_folder_map_and_hide_apply_both_ways(filteredProxy: FilteredProxy, dovecot: DovecotUpstream) -> None:
    """LIST shows mapped names and hides Junk; SELECT/APPEND/STATUS/CREATE/RENAME/DELETE go to the mapped upstream folders."""
    client = login(filteredProxy, "fred")
    names = listed(client)
    assert {"INBOX", "Gesendet", "Entw&APw-rfe", "Trash", "Archive"} <= names
    assert "Sent" not in names and "Drafts" not in names and "Junk" not in names
    message = b"Subject: to Gesendet\r\n\r\nhello\r\n"
    assert client.append("Gesendet", None, None, message)[0] == "OK"
    assert client.append("Entw&APw-rfe", None, None, message)[0] == "OK"
    status = client.status("Gesendet", "(MESSAGES)")
    assert status[0] == "OK" and re.search(rb"Gesendet \(MESSAGES 1\)", status[1][0])  # type: ignore[arg-type]
    assert client.select("Gesendet")[0] == "OK"
    assert client.create("Gesendet/2024")[0] == "OK"
    assert client.rename("Gesendet/2024", "Gesendet/2025")[0] == "OK"
    upstream = direct(dovecot, "fred")
    assert upstream.select("Sent", readonly=True)[1] == [b"1"]
    assert upstream.select("Drafts", readonly=True)[1] == [b"1"]
    upstreamNames = listed(upstream)
    assert "Sent/2025" in upstreamNames and "Sent/2024" not in upstreamNames
    assert client.delete("Gesendet/2025")[0] == "OK"
    assert "Sent/2025" not in listed(upstream)
    assert client.select("INBOX")[0] == "OK"
    assert client.copy("1", "Gesendet")[0] == "OK"
    assert client._simple_command("MOVE", "1", "Entw&APw-rfe")[0] == "OK"  # type: ignore[attr-defined]
    assert client.select("Gesendet", readonly=True)[1] == [b"2"]
    assert client.create("Gesendet/Abo")[0] == "OK"
    assert client.subscribe("Gesendet/Abo")[0] == "OK"
    assert [line for line in client.lsub()[1] if isinstance(line, bytes) and line.endswith(b" Gesendet/Abo")]
    assert client.unsubscribe("Gesendet/Abo")[0] == "OK"
    assert not [line for line in client.lsub()[1] if isinstance(line, bytes) and line.endswith(b" Gesendet/Abo")]
    assert client.delete("Gesendet/Abo")[0] == "OK"
    assert upstream.select("Sent", readonly=True)[1] == [b"2"]
    assert upstream.select("Drafts", readonly=True)[1] == [b"2"]
    upstream.logout()
    typ, data = client._simple_command("SELECT", "Junk")  # type: ignore[attr-defined]
    assert typ == "NO" and b"NONEXISTENT" in data[0]
    client.logout()


def converse(port: int, commands: list[bytes]) -> dict[bytes, bytes]:
    """
    Send tagged commands one by one on a raw connection; return each tag's
    tagged reply, with the untagged lines before it.
    """
    replies: dict[bytes, bytes] = {}
    with socket.create_connection((HOST, port), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        for command in commands:
            tag = command.split(b" ", 1)[0]
            raw.sendall(command + b"\r\n")
            collected = b""
            while True:
                line = reader.readline()
                assert line, f"connection closed during {command!r}"
                collected += line
                if line.startswith(tag + b" "):
                    break
            replies[tag] = collected
    return replies


def test_read_only_policy(filteredProxy: FilteredProxy, dovecot: DovecotUpstream) -> None:
    """Writes are refused with NO [NOPERM]; SELECT becomes EXAMINE so reading does not set \\Seen."""
    upstream = direct(dovecot, "rita")
    upstream.select("INBOX")
    upstream.store("1:*", "-FLAGS", "(\\Seen)")
    upstream.logout()
    writes = [
        b"c1 STORE 1 +FLAGS (\\Deleted)",
        b"c2 EXPUNGE",
        b"c3 COPY 1 Trash",
        b"c4 UID MOVE 1 Trash",
        b"c5 CREATE NewBox",
        b"c6 DELETE Trash",
        b"c7 RENAME Trash Bin",
        b"c8 APPEND INBOX {5+}\r\nhello",
    ]
    replies = converse(
        filteredProxy.port,
        [b"a LOGIN rita ritapw", b"s SELECT INBOX", *writes, b"f FETCH 1 BODY[]", b"z LOGOUT"],
    )
    assert b"[READ-ONLY]" in replies[b"s"]
    for command in writes:
        tag = command.split(b" ", 1)[0]
        assert replies[tag] == tag + b" NO [NOPERM] Mailbox access is read-only\r\n", command
    assert b"f OK" in replies[b"f"]
    upstream = direct(dovecot, "rita")
    upstream.select("INBOX", readonly=True)
    assert b"\\Seen" not in upstream.fetch("1", "(FLAGS)")[1][0]  # type: ignore[operator]
    assert upstream.select("INBOX", readonly=True)[1] == [b"4"]
    upstream.logout()


def test_append_size_limit_and_denied_mailboxes(filteredProxy: FilteredProxy) -> None:
    """APPEND over max_append_size gets NO [TOOBIG] (also when streamed); Archive is off limits."""
    client = login(filteredProxy, "fred")
    buffered = client.append("INBOX", None, None, b"Subject: big\r\n\r\n" + b"x" * 150_000 + b"\r\n")
    streamed = client.append("INBOX", None, None, b"Subject: huge\r\n\r\n" + b"y" * 400_000 + b"\r\n")
    assert buffered == streamed == ("NO", [b"[TOOBIG] Message too large"])
    assert client.append("INBOX", None, None, b"Subject: small\r\n\r\nok\r\n")[0] == "OK"
    typ, _ = client._simple_command("SELECT", "Archive")  # type: ignore[attr-defined]
    assert typ == "NO"
    assert client.noop()[0] == "OK"
    client.logout()


def test_capabilities_hidden_and_added(filteredProxy: FilteredProxy) -> None:
    """The capability filter applies to the login reply and to CAPABILITY."""
    with socket.create_connection((HOST, filteredProxy.port), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"a LOGIN fred fredpw\r\nb CAPABILITY\r\nc LOGOUT\r\n")
        lines = reader.read().split(b"\r\n")
    loginReply = next(line for line in lines if line.startswith(b"a OK"))
    capability = next(line for line in lines if line.startswith(b"* CAPABILITY"))
    for line in (loginReply, capability):
        names = line.upper().replace(b"[", b" ").replace(b"]", b" ").split()
        assert b"MOVE" not in names and b"X-MAILPROXY" in names and b"IDLE" in names


def test_audit_log_has_one_line_per_command_and_no_secrets(filteredProxy: FilteredProxy) -> None:
    """Each command is one JSON line with user, client, mailbox, result, bytes and duration; no password."""
    client = login(filteredProxy, "fred")
    client.select("INBOX", readonly=True)
    client.fetch("1", "(BODY.PEEK[])")
    client.logout()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = filteredProxy.audit()
        if any(record.get("command") == "LOGOUT" for record in records):
            break
        time.sleep(0.05)
    commands = [record for record in records if record.get("event") == "command" and record.get("user") == "fred"]
    # The last ones: earlier tests ran as fred too. Mailboxes are logged as
    # sent upstream (after the folder filter's mapping).
    examine = [record for record in commands if record["command"] == "EXAMINE"][-1]
    assert examine["mailbox"] == "INBOX" and examine["result"] == "OK" and examine["client"] == "127.0.0.1"
    fetch = [record for record in commands if record["command"] == "FETCH"][-1]
    assert fetch["bytes_out"] > 100 and fetch["duration_ms"] >= 0 and fetch["mailbox"] == "INBOX"
    text = open(f"{filteredProxy.directory}/audit.jsonl").read() + filteredProxy.process.log()
    for password in UPSTREAM_USERS.values():
        assert password not in text


def test_literals_pipelining_and_idle_survive_the_filters(
    filteredProxy: FilteredProxy, dovecot: DovecotUpstream
) -> None:
    """Pipelined APPENDs with literals, then IDLE seeing a message appended directly."""
    with socket.create_connection((HOST, filteredProxy.port), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        body = b"Subject: piped\r\n\r\n\x00\xff binary-ish\r\n"
        raw.sendall(
            b"a LOGIN fred fredpw\r\n"
            + b"b APPEND Gesendet {%d+}\r\n%s\r\n" % (len(body), body)
            + b"c APPEND Gesendet {%d+}\r\n%s\r\n" % (len(body), body)
            + b"d SELECT INBOX\r\n"
        )
        seen = b""
        while not re.search(rb"\r\nd OK", seen):
            seen += raw.recv(65536)
        assert re.search(rb"\r\nb OK", seen) and re.search(rb"\r\nc OK", seen)
        raw.sendall(b"e IDLE\r\n")
        assert reader.readline().startswith(b"+")
        other = direct(dovecot, "fred")
        other.append("INBOX", None, None, b"Subject: while idling\r\n\r\nhi\r\n")
        other.logout()
        update = reader.readline()
        while b"EXISTS" not in update:
            update = reader.readline()
        raw.sendall(b"DONE\r\n")
        line = reader.readline()
        while line.startswith(b"* "):
            line = reader.readline()
        assert line.startswith(b"e OK")
