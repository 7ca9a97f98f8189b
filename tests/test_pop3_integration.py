"""
POP3 end to end: Python's poplib and fetchmail through the real twistd proxy
to a real Dovecot, in relay mode (POP3 upstream) and bridge mode (IMAP
upstream), over plain, STLS and POP3S listeners.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import HOST, UPSTREAM_USERS, POP3Proxy, tlsContext
from tests.dovecot import DovecotUpstream

MODES = ("plain", "stls", "implicit")
# one user per upstream kind
MODE_USERS = {"bridge": "pat", "relay-stls": "paul", "relay-pop3s": "pia"}


def popClient(proxy: POP3Proxy, mode: str) -> poplib.POP3:
    port = proxy.ports[mode]
    if mode == "implicit":
        return poplib.POP3_SSL(HOST, port, context=tlsContext(proxy.caFile), timeout=30)
    client = poplib.POP3(HOST, port, timeout=30)
    if mode == "stls":
        client.stls(tlsContext(proxy.caFile))
    return client


def login(proxy: POP3Proxy, mode: str, user: str) -> poplib.POP3:
    client = popClient(proxy, mode)
    client.user(user)
    client.pass_(UPSTREAM_USERS[user])
    return client


def storedMessages(dovecot: DovecotUpstream, user: str) -> list[bytes]:
    """
    What Dovecot returns for each INBOX message, in UID order (CRLF).
    """
    client = imaplib.IMAP4(HOST, dovecot.ports["imap"], timeout=30)
    client.login(user, UPSTREAM_USERS[user])
    typ, data = client.select("INBOX", readonly=True)
    messages: list[bytes] = []
    if data != [b"0"]:
        typ, fetched = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        messages = [item[1] for item in fetched if isinstance(item, tuple)]
    client.logout()
    return messages


def retrieved(client: poplib.POP3, number: int) -> bytes:
    _, lines, _ = client.retr(number)
    return b"\r\n".join(lines) + b"\r\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(MODE_USERS))
def test_messages_are_retrieved_byte_identical(
    pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, mode: str, kind: str
) -> None:
    """STAT/LIST sizes are exact and every RETR equals what Dovecot stores, in every TLS mode and upstream kind."""
    user = MODE_USERS[kind]
    expected = storedMessages(dovecot, user)
    client = login(pop3Proxy, mode, user)
    count, octets = client.stat()
    assert count == len(expected) and octets == sum(map(len, expected))
    _, listing, _ = client.list()
    assert [int(line.split()[1]) for line in listing] == [len(message) for message in expected]
    for number, message in enumerate(expected, 1):
        assert retrieved(client, number) == message
    _, top, _ = client.top(1, 2)
    headerEnd = expected[0].index(b"\r\n\r\n")
    bodyLines = expected[0][headerEnd + 4 :].split(b"\r\n")[:2]
    assert top == expected[0][:headerEnd].split(b"\r\n") + [b""] + bodyLines
    assert client.quit().startswith(b"+OK")


@pytest.mark.parametrize("kind", sorted(MODE_USERS))
def test_uidls_are_stable_across_sessions_and_match_dovecot(
    pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, kind: str
) -> None:
    """Two sessions list the same UIDLs, and they are Dovecot's own POP3 UIDLs (bridge included)."""
    user = MODE_USERS[kind]
    first = login(pop3Proxy, "plain", user)
    uidls = first.uidl()[1]
    first.quit()
    second = login(pop3Proxy, "implicit", user)
    assert second.uidl()[1] == uidls
    assert second.uidl(1).split()[2] == uidls[0].split()[1]
    second.quit()
    direct = poplib.POP3(HOST, dovecot.ports["pop3"], timeout=30)
    direct.user(user)
    direct.pass_(UPSTREAM_USERS[user])
    assert direct.uidl()[1] == uidls
    direct.quit()


def appendDirect(dovecot: DovecotUpstream, user: str, count: int) -> None:
    client = imaplib.IMAP4(HOST, dovecot.ports["imap"], timeout=30)
    client.login(user, UPSTREAM_USERS[user])
    for number in range(count):
        client.append("INBOX", None, None, b"Subject: pop %d\r\n\r\n.leading dot\r\nbody %d\r\n" % (number, number))
    client.logout()


def countDirect(dovecot: DovecotUpstream, user: str) -> int:
    return len(storedMessages(dovecot, user))


@pytest.mark.parametrize("user", ["pete", "phil"], ids=["bridge", "relay"])
def test_deletions_happen_only_at_quit_and_never_on_a_dropped_connection(
    pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, user: str
) -> None:
    """DELE marks, RSET unmarks, a killed connection deletes nothing, QUIT commits exactly the marked messages."""
    appendDirect(dovecot, user, 4)
    before = storedMessages(dovecot, user)
    client = login(pop3Proxy, "plain", user)
    client.dele(1)
    client.rset()
    client.dele(2)
    with pytest.raises(poplib.error_proto):
        client.retr(2)
    assert countDirect(dovecot, user) == len(before)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.sock.close()
    assert storedMessages(dovecot, user) == before
    client = login(pop3Proxy, "plain", user)
    appendDirect(dovecot, user, 1)  # arrives during the session: not shown, not deleted
    assert client.stat()[0] == len(before)
    client.dele(1)
    client.dele(3)
    assert countDirect(dovecot, user) == len(before) + 1
    assert client.quit().startswith(b"+OK")
    after = storedMessages(dovecot, user)
    assert after[: len(before) - 2] == [before[1], *before[3:]]
    assert len(after) == len(before) - 1


def test_stls_injection_is_not_executed(pop3Proxy: POP3Proxy) -> None:
    """Commands pipelined in plaintext after STLS are dropped with the connection."""
    with socket.create_connection((HOST, pop3Proxy.ports["stls"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STLS\r\nUSER pat\r\n")
        assert reader.readline().startswith(b"+OK")
        assert reader.read() == b""


def test_plaintext_auth_refused_before_stls(pop3Proxy: POP3Proxy) -> None:
    """On the STLS listener USER/PASS before STLS is refused and CAPA offers STLS, not USER."""
    client = poplib.POP3(HOST, pop3Proxy.ports["stls"], timeout=30)
    capabilities = client.capa()
    assert "STLS" in capabilities and "USER" not in capabilities
    with pytest.raises(poplib.error_proto):
        client.user("pat")
        client.pass_(UPSTREAM_USERS["pat"])
    client.quit()


def runFetchmail(proxy: POP3Proxy, user: str, keep: bool, tls: str) -> tuple[int, int, str]:
    """
    Run fetchmail against the proxy; return (exit code, messages delivered, log).
    """
    directory = Path(tempfile.mkdtemp(prefix="mp-fetchmail-"))
    try:
        messages = directory / "msgs"
        messages.mkdir()
        mda = directory / "mda.sh"
        mda.write_text('#!/bin/sh\nexec cat > "$1/$(date +%s%N).$$"\n')
        mda.chmod(0o755)
        port = proxy.ports[tls]
        options = {
            "plain": 'sslproto ""',
            "stls": f'sslproto "tls1.2+" sslcertck sslcertfile "{proxy.caFile}" sslcommonname "localhost"',
            "implicit": f'ssl sslcertck sslcertfile "{proxy.caFile}" sslcommonname "localhost"',
        }[tls]
        rc = directory / "rc"
        rc.write_text(
            "set no syslog\nset no bouncemail\n"
            f'poll "{HOST}" with proto pop3 service {port} timeout 30\n'
            f'  user "{user}" there with password "{UPSTREAM_USERS[user]}" is root here\n'
            f"  options {'keep' if keep else 'nokeep'} fetchall {options}\n"
            f'  mda "{mda} {messages}"\n'
        )
        rc.chmod(0o600)
        result = subprocess.run(
            [
                "fetchmail",
                "-N",
                "-v",
                "-f",
                str(rc),
                "--idfile",
                str(directory / "ids"),
                "--pidfile",
                str(directory / "pid"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(directory)},
            stdin=subprocess.DEVNULL,
        )
        return result.returncode, len(list(messages.iterdir())), result.stdout + result.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("tls", MODES)
@pytest.mark.parametrize("user", ["pat", "paul"], ids=["bridge", "relay"])
def test_fetchmail_keep(pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, user: str, tls: str) -> None:
    """fetchmail with keep fetches every message and leaves them all."""
    expected = countDirect(dovecot, user)
    code, delivered, log = runFetchmail(pop3Proxy, user, keep=True, tls=tls)
    assert code == 0 and delivered == expected, log[-2000:]
    assert countDirect(dovecot, user) == expected


@pytest.mark.parametrize("user", ["pete", "phil"], ids=["bridge", "relay"])
def test_fetchmail_nokeep_deletes_what_it_fetched(pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, user: str) -> None:
    """fetchmail without keep fetches and deletes every message, through the proxy."""
    appendDirect(dovecot, user, 3)
    expected = countDirect(dovecot, user)
    code, delivered, log = runFetchmail(pop3Proxy, user, keep=False, tls="plain")
    assert code == 0 and delivered == expected, log[-2000:]
    assert countDirect(dovecot, user) == 0


def test_no_password_in_the_pop3_log(pop3Proxy: POP3Proxy) -> None:
    """Logins through every mode are logged, and no password appears in the proxy's log."""
    for user in ("pat", "paul"):
        client = login(pop3Proxy, "plain", user)
        client.stat()
        client.quit()
    with socket.create_connection((HOST, pop3Proxy.ports["plain"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"USER pat\r\nPASS wrong-secret-123\r\nQUIT\r\n")
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"-ERR")
    log = pop3Proxy.process.log()
    assert "logged in as pat" in log and "logged in as paul" in log
    for password in [*UPSTREAM_USERS.values(), "wrong-secret-123"]:
        assert password not in log
