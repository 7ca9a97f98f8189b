"""
IDLE against a real Dovecot through the real proxy: updates made by another
session reach an idling client as they happen (passthrough), and also when
the upstream has no IDLE (emulation by polling).

Reads are bounded by a socket timeout as a hang guard; how fast updates
arrive is measured by bench/idle_sessions.py, not asserted here.
"""

from __future__ import annotations

import imaplib
import socket
import time

from tests.conftest import HOST, UPSTREAM_USERS, EmulatingProxy, RunningProxy
from tests.dovecot import DovecotUpstream

GUARD = 10.0


class IdleClient:
    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=GUARD)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()
        self.command(b"a LOGIN " + user.encode() + b" " + UPSTREAM_USERS[user].encode())
        self.command(b"s SELECT INBOX")

    def command(self, line: bytes) -> list[bytes]:
        tag = line.split(b" ", 1)[0]
        self.sock.sendall(line + b"\r\n")
        lines = []
        while True:
            response = self.reader.readline()
            assert response, f"connection closed during {line!r}"
            lines.append(response)
            if response.startswith(tag + b" "):
                assert b" OK" in response, response
                return lines

    def idle(self) -> None:
        self.sock.sendall(b"i IDLE\r\n")
        assert self.reader.readline().startswith(b"+")

    def waitFor(self, word: bytes) -> bytes:
        while True:
            line = self.reader.readline()
            assert line, "connection closed while idling"
            if word in line:
                return line

    def done(self) -> None:
        self.sock.sendall(b"DONE\r\n")
        while True:
            line = self.reader.readline()
            assert line, "connection closed after DONE"
            if line.startswith(b"i "):
                assert b" OK" in line
                return

    def close(self) -> None:
        self.command(b"z LOGOUT")
        self.sock.close()


def direct(upstream: DovecotUpstream, user: str = "ida") -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"], timeout=GUARD)
    client.login(user, UPSTREAM_USERS[user])
    client.select("INBOX")
    return client


def exerciseIdle(port: int, upstream: DovecotUpstream) -> None:
    client = IdleClient(port, "ida")
    client.idle()
    other = direct(upstream)
    other.append("INBOX", None, None, b"Subject: while idling\r\n\r\nhello\r\n")
    assert client.waitFor(b"EXISTS").endswith(b"EXISTS\r\n")
    count = int(other.select("INBOX")[1][0])  # type: ignore[arg-type]
    other.store(str(count), "+FLAGS", "(\\Flagged)")
    assert b"\\Flagged" in client.waitFor(b"FETCH")
    other.store(str(count), "+FLAGS", "(\\Deleted)")
    other.expunge()
    assert client.waitFor(b"EXPUNGE") == b"* %d EXPUNGE\r\n" % count
    other.logout()
    client.done()
    client.command(b"n NOOP")
    client.close()


def test_idle_updates_from_another_session_reach_the_client(proxy: RunningProxy, dovecot: DovecotUpstream) -> None:
    """EXISTS, FETCH FLAGS and EXPUNGE from a direct session arrive while idling through the proxy; DONE ends it."""
    exerciseIdle(proxy.ports["plain"], dovecot)


def test_idle_is_emulated_for_an_upstream_without_idle(emulatingProxy: EmulatingProxy) -> None:
    """The proxy offers IDLE over a Dovecot that does not, and delivers the same updates by polling."""
    client = IdleClient(emulatingProxy.port, "ida")
    capabilities = client.command(b"c CAPABILITY")[0]
    assert b" IDLE" in capabilities
    client.close()
    probe = direct(emulatingProxy.upstream)
    assert "IDLE" not in probe.capabilities
    probe.logout()
    exerciseIdle(emulatingProxy.port, emulatingProxy.upstream)


def test_a_command_sent_while_idling_cannot_cut_a_literal_into_a_smuggled_command(
    emulatingProxy: EmulatingProxy,
) -> None:
    """A client "idling" while it streams an APPEND gets BAD; the proxy's polls never meet a literal.

    Had the APPEND been relayed and the proxy's NOOP gone upstream inside its
    literal, Dovecot would have taken the literal's last octets ("zz SELECT")
    plus the line after it (" Archive") as a command the policy never saw.
    """
    setup = direct(emulatingProxy.upstream, "ivy")
    setup.create("Archive")
    before = int(setup.select("INBOX")[1][0] or 0)
    body = b"Subject: smuggle\r\n\r\n" + b"y" * 300000 + b"\r\nzz SELECT"
    client = IdleClient(emulatingProxy.port, "ivy")
    lines = []
    try:
        client.idle()
        client.sock.sendall(b"u APPEND INBOX {%d+}\r\n" % len(body) + body[:1000])
        time.sleep(1.0)  # over three poll intervals
        client.sock.sendall(body[1000:] + b" Archive\r\n")
        while not lines or not lines[-1].startswith(b"u "):
            lines.append(client.reader.readline())
            assert lines[-1], "connection closed"
        client.done()
        # After DONE the same APPEND goes through whole.
        appended = client.command(b"w APPEND INBOX {%d+}\r\n" % len(body) + body)
    finally:
        client.close()
    assert lines[-1].startswith(b"u BAD Expected DONE"), lines
    assert not any(line.startswith(b"zz ") for line in lines), lines
    assert appended[-1].startswith(b"w OK"), appended
    assert int(setup.select("INBOX")[1][0] or 0) == before + 1
    typ, data = setup.fetch(str(before + 1), "(BODY.PEEK[])")
    assert typ == "OK" and isinstance(data[0], tuple) and data[0][1] == body
    setup.logout()
