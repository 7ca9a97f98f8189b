"""
Tests for tests/dovecot.py: they start real Dovecot instances on 127.0.0.1.

Dovecot is required (Debian: dovecot-core dovecot-imapd dovecot-pop3d); without
it these tests fail, they do not skip.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.dovecot import DovecotUpstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <harness-1@example.test>\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"From the start of a line,\r\n"
    b".\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x9c\x93\r\n"
)


def processGone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # zombie until reaped
    except FileNotFoundError:
        return True


def startOrFail(upstream: DovecotUpstream) -> None:
    """
    Start Dovecot; a missing or broken Dovecot fails the test (never skips).
    """
    try:
        upstream.start()
    except RuntimeError as e:
        pytest.fail(f"could not start Dovecot: {e}", pytrace=False)


def dispose(upstream: DovecotUpstream) -> None:
    pid = upstream.pid
    upstream.stop()
    upstream.stop()  # idempotent
    assert upstream.pid is None
    if pid is not None:
        assert processGone(pid)
    shutil.rmtree(upstream.baseDir, ignore_errors=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[DovecotUpstream]:
    server = DovecotUpstream()
    # before start: no waiting
    server.addUser("alice", "alicepw")
    server.addUsers({"idler": "idlerpw", "popper": "popperpw"})
    startOrFail(server)
    try:
        yield server
    finally:
        dispose(server)


@pytest.fixture(scope="module")
def noIdleUpstream() -> Iterator[DovecotUpstream]:
    server = DovecotUpstream(idle=False)
    startOrFail(server)
    server.addUser("carol", "carolpw")  # after start
    try:
        yield server
    finally:
        dispose(server)


class IMAP4TLS(imaplib.IMAP4_SSL):
    """
    IMAP4_SSL that connects to one address but checks the certificate for
    another name (imaplib uses the connect host for both).
    """

    def __init__(self, address: str, port: int, serverName: str, context: ssl.SSLContext) -> None:
        self.address = address
        self.context = context
        super().__init__(serverName, port, ssl_context=context, timeout=5)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), timeout)
        return self.context.wrap_socket(sock, server_hostname=self.host)


def tlsContext(upstream: DovecotUpstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=upstream.caFile)


def capabilityAfterLogin(client: imaplib.IMAP4) -> set[str]:
    typ, data = client.capability()
    assert typ == "OK"
    line = data[-1]
    assert isinstance(line, bytes)
    return set(line.decode().upper().split())


def appendAndFetch(client: imaplib.IMAP4, mailbox: str = "INBOX") -> bytes:
    typ, data = client.append(mailbox, "", imaplib.Time2Internaldate(time.time()), MESSAGE)
    assert typ == "OK", data
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0] or b"")
    assert match, data
    typ, _ = client.select(mailbox)
    assert typ == "OK"
    typ, data = client.uid("FETCH", match.group(1).decode(), "(BODY.PEEK[])")
    assert typ == "OK", data
    item = data[0]
    assert isinstance(item, tuple), data
    return item[1]


def test_layout(upstream: DovecotUpstream) -> None:
    assert upstream.host == "127.0.0.1"
    assert set(upstream.ports) == {"imap", "imaps", "pop3", "pop3s"}
    assert len(set(upstream.ports.values())) == 4
    for path in (upstream.caFile, upstream.certFile, upstream.keyFile):
        assert os.path.getsize(path) > 0
    assert os.stat(upstream.baseDir).st_mode & 0o777 == 0o755
    with open(upstream.confFile) as f:
        conf = f.read()
    assert "listen = 127.0.0.1\n" in conf
    assert "/etc/dovecot" not in conf


def test_imap_plain_append_fetch(upstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        assert b"IDLE" in client.welcome
        client.login("alice", "alicepw")
        assert appendAndFetch(client) == MESSAGE
        # the special-use folders exist and are subscribed
        typ, data = client.lsub()
        assert typ == "OK"
        listed = b" ".join(d for d in data if isinstance(d, bytes))
        for name in (b"Drafts", b"Sent", b"Trash", b"Junk", b"Archive"):
            assert name in listed
    finally:
        client.logout()


def test_imap_bad_password(upstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login("alice", "wrong")
    finally:
        client.shutdown()


@pytest.mark.parametrize("serverName", ["localhost", "127.0.0.1"])
def test_imaps(upstream: DovecotUpstream, serverName: str) -> None:
    client = IMAP4TLS(upstream.host, upstream.ports["imaps"], serverName, tlsContext(upstream))
    try:
        client.login("alice", "alicepw")
        assert appendAndFetch(client) == MESSAGE
    finally:
        client.logout()


def test_imaps_checks_hostname(upstream: DovecotUpstream) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAP4TLS(upstream.host, upstream.ports["imaps"], "mail.example.test", tlsContext(upstream))


def test_imap_starttls(upstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        client.starttls(tlsContext(upstream))
        client.login("alice", "alicepw")
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_capability_default_has_idle(upstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        client.login("alice", "alicepw")
        capabilities = capabilityAfterLogin(client)
    finally:
        client.logout()
    assert "IDLE" in capabilities
    assert "IMAP4REV1" in capabilities
    if os.path.exists("/usr/lib/dovecot/modules/lib30_imap_zlib_plugin.so"):
        assert "COMPRESS=DEFLATE" in capabilities


def test_capability_without_idle(upstream: DovecotUpstream, noIdleUpstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        client.login("alice", "alicepw")
        default = capabilityAfterLogin(client)
    finally:
        client.logout()

    client = imaplib.IMAP4(noIdleUpstream.host, noIdleUpstream.ports["imap"], timeout=5)
    try:
        assert b"[CAPABILITY " in client.welcome
        assert b"IDLE" not in client.welcome
        assert "IDLE" not in client.capabilities
        client.login("carol", "carolpw")
        capabilities = capabilityAfterLogin(client)
    finally:
        client.logout()
    assert "IDLE" not in capabilities
    # everything else is what this Dovecot advertises by default
    assert capabilities == default - {"IDLE"}


def test_idle_reports_new_mail(upstream: DovecotUpstream) -> None:
    watcher = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    writer = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        watcher.login("idler", "idlerpw")
        writer.login("idler", "idlerpw")
        watcher.select("INBOX")
        watcher.send(b"i1 IDLE\r\n")
        assert watcher.readline().startswith(b"+ ")
        writer.append("INBOX", "", imaplib.Time2Internaldate(time.time()), MESSAGE)
        line = watcher.readline()
        while not line.endswith(b" EXISTS\r\n"):
            line = watcher.readline()
        watcher.send(b"DONE\r\n")
        line = watcher.readline()
        while line.startswith(b"* "):
            line = watcher.readline()
        assert line.startswith(b"i1 OK"), line
    finally:
        writer.logout()
        watcher.logout()


def test_pop3(upstream: DovecotUpstream) -> None:
    imap = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        imap.login("popper", "popperpw")
        appendAndFetch(imap)
        appendAndFetch(imap)
    finally:
        imap.logout()

    pop = poplib.POP3(upstream.host, upstream.ports["pop3"], timeout=5)
    try:
        pop.user("popper")
        pop.pass_("popperpw")
        count, size = pop.stat()
        assert count == 2
        assert size == 2 * len(MESSAGE)
        _, lines, octets = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    finally:
        pop.quit()

    pops = poplib.POP3_SSL(upstream.host, upstream.ports["pop3s"], context=tlsContext(upstream), timeout=5)
    try:
        pops.user("popper")
        pops.pass_("popperpw")
        assert pops.stat()[0] == 2
    finally:
        pops.quit()

    stls = poplib.POP3(upstream.host, upstream.ports["pop3"], timeout=5)
    try:
        stls.stls(tlsContext(upstream))
        stls.user("popper")
        stls.pass_("popperpw")
        assert stls.stat()[0] == 2
    finally:
        stls.quit()


def test_users_and_wipe(upstream: DovecotUpstream) -> None:
    upstream.addUser("dave", "pw-1")
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        client.login("dave", "pw-1")
        appendAndFetch(client)
    finally:
        client.logout()

    # same size, same second: the passwd-file must still be reread
    upstream.addUser("dave", "pw-2")
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            client.login("dave", "pw-1")
        client.login("dave", "pw-2")
        assert client.select("INBOX") == ("OK", [b"1"])
    finally:
        client.logout()

    upstream.wipe("dave")
    assert not os.path.exists(os.path.join(upstream.mailDir, "dave"))
    client = imaplib.IMAP4(upstream.host, upstream.ports["imap"], timeout=5)
    try:
        client.login("dave", "pw-2")
        assert client.select("INBOX") == ("OK", [b"0"])
    finally:
        client.logout()


def test_cli_start_stop() -> None:
    baseDir = DovecotUpstream().baseDir  # a fresh directory, not started
    try:
        command = [sys.executable, "-m", "tests.dovecot"]
        result = subprocess.run(
            [*command, "start", baseDir, "--user", "erin:erin pw"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert set(info) >= {"pid", "host", "ports", "caFile"}
        assert info["host"] == "127.0.0.1"
        pid = info["pid"]
        assert os.path.exists(f"/proc/{pid}")

        client = imaplib.IMAP4(info["host"], info["ports"]["imap"], timeout=5)
        try:
            client.login("erin", "erin pw")
        finally:
            client.logout()

        result = subprocess.run(
            [*command, "stop", baseDir], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"stopped": pid}
        with pytest.raises(OSError):
            socket.create_connection((info["host"], info["ports"]["imap"]), timeout=1).close()
        assert processGone(pid)
    finally:
        DovecotUpstream(baseDir).stop()  # no-op by now
        shutil.rmtree(baseDir, ignore_errors=True)
