"""
End to end: real IMAP clients (imaplib, curl) through the proxy, running as
C{twistd}, to a real Dovecot, over every client and upstream TLS mode.
"""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import HOST, LOCAL_USERS, UPSTREAM_USERS, RunningProxy, tlsContext
from tests.dovecot import DovecotUpstream

CLIENT_MODES = ("plain", "starttls", "implicit")
# user -> upstream TLS mode of their route
UPSTREAM_MODES = {"carol": "plain", "bob": "starttls", "alice": "implicit"}


def proxyClient(proxy: RunningProxy, mode: str) -> imaplib.IMAP4:
    port = proxy.ports[mode]
    if mode == "implicit":
        return imaplib.IMAP4_SSL(HOST, port, ssl_context=tlsContext(proxy.caFile), timeout=30)
    client = imaplib.IMAP4(HOST, port, timeout=30)
    if mode == "starttls":
        client.starttls(tlsContext(proxy.caFile))
    return client


def directClient(dovecot: DovecotUpstream, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, dovecot.ports["imap"], timeout=30)
    client.login(user, UPSTREAM_USERS[user])
    return client


def fetchAll(client: imaplib.IMAP4, mailbox: str = "INBOX") -> list[bytes]:
    typ, _ = client.select(mailbox, readonly=True)
    assert typ == "OK"
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    assert typ == "OK"
    return [item[1] for item in data if isinstance(item, tuple)]


@pytest.mark.parametrize("clientMode", CLIENT_MODES)
@pytest.mark.parametrize("user", sorted(UPSTREAM_MODES))
def test_fetched_bodies_are_byte_identical_to_direct(
    proxy: RunningProxy, dovecot: DovecotUpstream, clientMode: str, user: str
) -> None:
    """Every message, including a >1 MB attachment and 8-bit headers, arrives unchanged in every TLS mode."""
    direct = directClient(dovecot, user)
    expected = fetchAll(direct)
    direct.logout()
    client = proxyClient(proxy, clientMode)
    typ, _ = client.login(user, LOCAL_USERS[user])
    assert typ == "OK"
    assert fetchAll(client) == expected
    assert len(expected) >= 4 and max(map(len, expected)) > 1_000_000
    assert any(b"\xc3\xbc" in message[:400] for message in expected)  # raw 8-bit header
    client.logout()


def test_post_login_capabilities_are_the_upstreams_minus_what_cannot_be_relayed(proxy: RunningProxy) -> None:
    """After login CAPABILITY shows IDLE and MOVE but no COMPRESS, STARTTLS or AUTH=."""
    client = proxyClient(proxy, "starttls")
    before = client.capabilities
    assert "AUTH=PLAIN" in before and "STARTTLS" not in before
    client.login("alice", "alicepw")
    typ, data = client.capability()
    assert typ == "OK"
    names = data[0].decode().upper().split()
    assert "IDLE" in names and "MOVE" in names and "LITERAL+" in names
    assert not [name for name in names if name.startswith(("AUTH=", "COMPRESS")) or name == "STARTTLS"]
    client.logout()


def test_plaintext_listener_without_tls_refuses_login(proxy: RunningProxy) -> None:
    """The STARTTLS listener advertises LOGINDISABLED and refuses LOGIN before TLS."""
    client = imaplib.IMAP4(HOST, proxy.ports["starttls"], timeout=30)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    typ, data = client._simple_command("LOGIN", "alice", "alicepw")  # type: ignore[attr-defined]
    assert typ == "NO" and b"PRIVACYREQUIRED" in client.untagged_responses.get("NO", [b""])[0] + data[0]
    client.shutdown()


def test_authenticate_plain_and_quoted_password(proxy: RunningProxy) -> None:
    """AUTHENTICATE PLAIN works, also with a password of spaces, quotes and 8-bit characters."""
    client = proxyClient(proxy, "implicit")
    typ, _ = client.authenticate("PLAIN", lambda _: b"\0dora\0" + LOCAL_USERS["dora"].encode())
    assert typ == "OK"
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()


def test_wrong_password_gets_authenticationfailed_and_may_retry(proxy: RunningProxy) -> None:
    """A failed login answers NO [AUTHENTICATIONFAILED] after the delay; a retry works."""
    client = proxyClient(proxy, "implicit")
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("alice", "wrong")
    assert time.monotonic() - started >= 0.25
    assert client.login("alice", "alicepw")[0] == "OK"
    client.logout()


def test_stored_upstream_credentials(proxy: RunningProxy, dovecot: DovecotUpstream) -> None:
    """A user whose route stores upstream credentials sees that upstream account."""
    direct = directClient(dovecot, "carol")
    expected = fetchAll(direct)
    direct.logout()
    client = proxyClient(proxy, "implicit")
    client.login("stored", "localpw")
    assert fetchAll(client) == expected
    client.logout()


@pytest.mark.parametrize("user", ["downuser", "badcert"])
def test_unreachable_or_unverified_upstream_gives_unavailable(proxy: RunningProxy, user: str) -> None:
    """A closed upstream port or a certificate for another name: NO [UNAVAILABLE], proxy stays up."""
    client = proxyClient(proxy, "implicit")
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        client.login(user, "pw")
    client.logout()
    other = proxyClient(proxy, "implicit")
    assert other.login("alice", "alicepw")[0] == "OK"
    other.logout()
    expected = {"downuser": "cannot connect", "badcert": "VerificationError"}[user]
    assert f"user {user}: upstream" in proxy.log() and expected in proxy.log()


@pytest.mark.parametrize(("clientMode", "user"), [("plain", "carol"), ("starttls", "bob"), ("implicit", "alice")])
def test_mailbox_operations_through_the_proxy(
    proxy: RunningProxy, dovecot: DovecotUpstream, clientMode: str, user: str
) -> None:
    """CREATE, APPEND, SEARCH, STORE, COPY, MOVE, RENAME, EXPUNGE, DELETE, LOGOUT all work as upstream."""
    client = proxyClient(proxy, clientMode)
    client.login(user, LOCAL_USERS[user])
    for name in ("ProxyTest", "ProxyTest2", "ProxyRenamed"):
        client.delete(name)
    assert client.create("ProxyTest")[0] == "OK"
    body = b"Subject: binary-ish \xe2\x9c\x93\r\n\r\nline1\r\n\x01\x02\xff\r\n{5}\r\n.\r\nend\r\n"
    assert client.append("ProxyTest", "(\\Flagged)", None, body)[0] == "OK"
    assert client.append("ProxyTest", None, None, b"Subject: second\r\n\r\nbye\r\n")[0] == "OK"
    assert client.select("ProxyTest")[0] == "OK"
    assert client.uid("FETCH", "1", "(BODY.PEEK[])")[1][0][1] == body  # type: ignore[index]
    assert client.search(None, "FLAGGED")[1] == [b"1"]
    assert client.search(None, "SUBJECT", "second")[1] == [b"2"]
    assert client.store("2", "+FLAGS", "(\\Seen \\Answered)")[0] == "OK"
    flags = client.fetch("2", "(FLAGS)")[1][0]
    assert b"\\Seen" in flags and b"\\Answered" in flags  # type: ignore[operator]
    assert client.create("ProxyTest2")[0] == "OK"
    assert client.copy("1", "ProxyTest2")[0] == "OK"
    assert client._simple_command("MOVE", "2", "ProxyTest2")[0] == "OK"  # type: ignore[attr-defined]
    assert client.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"
    assert client.select("ProxyTest")[1] == [b"0"]
    assert client.close()[0] == "OK"
    assert client.rename("ProxyTest2", "ProxyRenamed")[0] == "OK"
    direct = directClient(dovecot, user)
    assert direct.select("ProxyRenamed", readonly=True)[1] == [b"2"]
    direct.logout()
    assert client.delete("ProxyRenamed")[0] == "OK"
    assert client.delete("ProxyTest")[0] == "OK"
    typ, listing = client.list()
    assert typ == "OK" and not [line for line in listing if b"ProxyTest" in line or b"ProxyRenamed" in line]  # type: ignore[operator]
    assert client.logout()[0] == "BYE"


def test_pipelined_commands_after_login(proxy: RunningProxy) -> None:
    """LOGIN, SELECT, FETCH and LOGOUT sent in one write are all answered in order."""
    with socket.create_connection((HOST, proxy.ports["plain"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        raw.sendall(b"a LOGIN carol carolpw\r\nb SELECT INBOX\r\nc UID FETCH 1 (RFC822.SIZE)\r\nd LOGOUT\r\n")
        lines = reader.read().splitlines()
    tagged = [line.split()[0] for line in lines if not line.startswith((b"*", b"+"))]
    assert tagged == [b"a", b"b", b"c", b"d"]
    assert all(b" OK " in line for line in lines if line[:2] in (b"a ", b"b ", b"c ", b"d "))


def test_overlong_command_lines_are_refused_before_and_after_login(proxy: RunningProxy) -> None:
    """A line over the default 64 KiB limit gets BAD [TOOBIG] on both sides of LOGIN; the session goes on."""
    overlong = b"x" * 70000
    with socket.create_connection((HOST, proxy.ports["plain"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        raw.sendall(b"a NOOP " + overlong + b"\r\nb LOGIN carol carolpw\r\n")
        assert reader.readline() == b"a BAD [TOOBIG] Command line too long (limit 65536 octets)\r\n"
        assert reader.readline().startswith(b"b OK ")
        raw.sendall(b"c SEARCH " + overlong + b"\r\nd NOOP\r\n")
        replies = [reader.readline(), reader.readline()]
        assert b"c BAD [TOOBIG] Command line too long (limit 65536 octets)\r\n" in replies
        assert replies[-1].startswith(b"d OK ")


def test_starttls_injection_is_not_executed(proxy: RunningProxy) -> None:
    """Commands pipelined in plaintext after STARTTLS are dropped with the connection."""
    with socket.create_connection((HOST, proxy.ports["starttls"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert reader.readline() == b"a OK Begin TLS negotiation now\r\n"
        assert reader.read() == b""  # closed, nothing answered for b


def test_curl_fetches_over_imaps_and_starttls(proxy: RunningProxy, dovecot: DovecotUpstream) -> None:
    """curl imaps:// and imap:// with --ssl-reqd fetch a message identical to Dovecot's."""
    direct = directClient(dovecot, "alice")
    expected = fetchAll(direct)[0]
    direct.logout()
    base = ["curl", "-s", "--max-time", "30", "--cacert", proxy.caFile, "-u", "alice:alicepw"]
    implicit = subprocess.run(
        [*base, f"imaps://localhost:{proxy.ports['implicit']}/INBOX;UID=1"], capture_output=True, check=True
    )
    assert implicit.stdout == expected
    starttls = subprocess.run(
        [*base, "--ssl-reqd", f"imap://localhost:{proxy.ports['starttls']}/INBOX;UID=1"],
        capture_output=True,
        check=True,
    )
    assert starttls.stdout == expected
    listing = subprocess.run([*base, f"imaps://localhost:{proxy.ports['implicit']}/"], capture_output=True, check=True)
    assert re.search(rb"LIST \(.*\) \"/\" (\"?)INBOX\1", listing.stdout)


def test_curl_plain_listener(proxy: RunningProxy) -> None:
    """curl over the plaintext listener (plaintext auth allowed there) lists mailboxes."""
    result = subprocess.run(
        ["curl", "-s", "--max-time", "30", "-u", "carol:carolpw", f"imap://127.0.0.1:{proxy.ports['plain']}/"],
        capture_output=True,
        check=True,
    )
    assert b"INBOX" in result.stdout


def test_no_password_in_the_log(proxy: RunningProxy) -> None:
    """Logins were logged, but no password appears anywhere in the proxy's log."""
    client = proxyClient(proxy, "implicit")
    client.login("alice", "alicepw")
    client.logout()
    log = proxy.log()
    assert "logged in as alice" in log
    for password in {*LOCAL_USERS.values(), *UPSTREAM_USERS.values()}:
        assert password not in log


def test_tls_listener_rejects_plaintext_clients_cleanly(proxy: RunningProxy) -> None:
    """A plaintext client on the implicit TLS port is disconnected, the proxy keeps serving."""
    with socket.create_connection((HOST, proxy.ports["implicit"]), timeout=10) as raw:
        raw.sendall(b"a LOGIN alice alicepw\r\n")
        assert b"OK" not in raw.recv(1024)
    with ssl.create_default_context(cafile=proxy.caFile).wrap_socket(
        socket.create_connection((HOST, proxy.ports["implicit"]), timeout=10), server_hostname="localhost"
    ) as secure:
        assert secure.recv(1024).startswith(b"* OK")


def test_upstream_ending_the_session_reaches_the_client_as_bye(proxy: RunningProxy, dovecot: DovecotUpstream) -> None:
    """When Dovecot drops the session (doveadm kick) the client gets * BYE and EOF; others go on."""
    with socket.create_connection((HOST, proxy.ports["plain"]), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"a LOGIN kim kimpw\r\nb SELECT INBOX\r\n")
        while not reader.readline().startswith(b"b OK"):
            pass
        subprocess.run(["doveadm", "-c", dovecot.confFile, "kick", "kim"], check=True, capture_output=True)
        rest = reader.read()
    assert rest.startswith(b"* BYE ") and rest.endswith(b"\r\n")
    other = proxyClient(proxy, "implicit")
    assert other.login("alice", "alicepw")[0] == "OK"
    other.logout()
