"""
SASL LOGIN (C{AUTHENTICATE LOGIN}, C{AUTH LOGIN}) through a real C{twistd -n
mailproxy} in front of the private Dovecot, with the clients that use it:
curl with C{--login-options AUTH=LOGIN} (what Outlook and many devices do),
Python's imaplib and poplib, and raw sockets for the corners.

The users here are the module's own (added to the session's Dovecot), so
that fetching and flagging their mail touches no other test's.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy
from tests.rawclient import connectFrom, readLine, readTagged
from tests.tomlconfig import authTable, namedListeners, routingTable, table, upstreamTable

CURL_TIMEOUT = "30"
LOCKOUT_AFTER = 3

# Dovecot users (and the same passwords in the proxy: passthrough).
USER, PASSWORD = "sasl", "sasl pw ü"  # IMAP upstream: relayed (IMAP), bridged (POP3)
POP_USER, POP_PASSWORD = "saslpop", "saslpop-pw"  # POP3 upstream: relayed
# Only in the proxy, for the lockout.
LOCKED_USER, LOCKED_PASSWORD = "sasllock", "sasllock-pw"

MESSAGE = (
    b"From: SASL <sasl@example.test>\r\n"
    b"To: sasl@example.test\r\n"
    b"Subject: fetched through AUTH=LOGIN\r\n"
    b"\r\n"
    b"Hello over LOGIN.\r\n"
)


@dataclass
class LoginProxy:
    ports: dict[str, int]
    dovecot: DovecotUpstream
    process: ProxyProcess

    def url(self, scheme: str, listener: str, path: str) -> str:
        return f"{scheme}://{HOST}:{self.ports[listener]}/{path}"

    def upstreamLogins(self, protocol: str, user: str) -> int:
        """
        How many times Dovecot's log shows C{user} logged in over C{protocol}.
        """
        with open(self.dovecot.logFile, errors="replace") as handle:
            return len(re.findall(rf"{protocol}-login: (?:Info: )?Login: user=<{re.escape(user)}>", handle.read()))

    def waitForUpstreamLogins(self, protocol: str, user: str, count: int) -> int:
        """
        Wait (at most 10 s) until Dovecot's log shows C{count} logins; how many it shows then.
        """
        deadline = time.monotonic() + 10
        while self.upstreamLogins(protocol, user) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.upstreamLogins(protocol, user)

    def waitForLog(self, pattern: str) -> bool:
        """
        Wait (at most 10 s) until the proxy's log matches C{pattern}.
        """
        deadline = time.monotonic() + 10
        while not re.search(pattern, self.process.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return re.search(pattern, self.process.log()) is not None


def proxyConfig(ports: dict[str, int], dovecot: DovecotUpstream) -> str:
    """
    The proxy's configuration: the listeners of C{ports}, Dovecot's IMAP
    as the default upstream and its POP3 for L{POP_USER}.
    """
    return "".join(
        [
            authTable(failureDelay=0.05),
            table("limits", failuresBeforeLockout=LOCKOUT_AFTER),
            namedListeners(ports, dovecot.certFile, dovecot.keyFile),
            upstreamTable("imap", dovecot.ports["imap"]),
            upstreamTable("pop3", dovecot.ports["pop3"], protocol="pop3"),
            routingTable("imap", {POP_USER: {"upstream": "pop3"}}),
        ]
    )


@pytest.fixture(scope="module")
def loginProxy(dovecot: DovecotUpstream) -> Iterator[LoginProxy]:
    dovecot.addUsers({USER: PASSWORD, POP_USER: POP_PASSWORD})
    for name, password in ((USER, PASSWORD), (POP_USER, POP_PASSWORD)):
        client = imaplib.IMAP4(HOST, dovecot.ports["imap"])
        # PLAIN, not LOGIN: imaplib quotes LOGIN arguments in ASCII only.
        plain = b"\0" + name.encode() + b"\0" + password.encode()
        client.authenticate("PLAIN", lambda challenge, plain=plain: plain)
        # Each run of the module starts with exactly the one message.
        _, exists = client.select("INBOX")
        if exists[0] != b"0":
            client.store("1:*", "+FLAGS", "\\Deleted")
            client.expunge()
        client.append("INBOX", None, None, MESSAGE)
        client.logout()
    ports = {name: freePort() for name in ("plain", "cleartext", "starttls", "pop3", "pop3clear")}
    config = proxyConfig(ports, dovecot)
    users = {USER: PASSWORD, POP_USER: POP_PASSWORD, LOCKED_USER: LOCKED_PASSWORD}
    with runningProxy(config, users, list(ports.values()), prefix="mp-sasl-") as (_, process):
        yield LoginProxy(ports, dovecot, process)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def curl(*arguments: str, user: str = USER, password: str = PASSWORD) -> subprocess.CompletedProcess[bytes]:
    """
    curl with SASL LOGIN, verbose (the dialogue is on stderr).
    """
    command = ["curl", "-s", "-v", "--max-time", CURL_TIMEOUT, "--login-options", "AUTH=LOGIN"]
    return subprocess.run([*command, "-u", f"{user}:{password}", *arguments], capture_output=True, timeout=60)


def sentByCurl(result: subprocess.CompletedProcess[bytes]) -> list[bytes]:
    """
    The lines curl's verbose output shows it sent ("> ...").
    """
    return [line[2:] for line in result.stderr.splitlines() if line.startswith(b"> ")]


# -- real clients: curl ----------------------------------------------------------------


def test_curl_imap_auth_login_fetches_the_message_dovecot_has(loginProxy: LoginProxy) -> None:
    """curl --login-options AUTH=LOGIN over imap:// fetches through the proxy what it fetches from Dovecot."""
    direct = curl(f"imap://{HOST}:{loginProxy.dovecot.ports['imap']}/INBOX;MAILINDEX=1")
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == MESSAGE
    before = loginProxy.upstreamLogins("imap", USER)
    proxied = curl(loginProxy.url("imap", "plain", "INBOX;MAILINDEX=1"))
    assert proxied.returncode == 0, proxied.stderr
    assert proxied.stdout == direct.stdout
    sent = sentByCurl(proxied)
    # The proxy offers SASL-IR, so curl sends the user name with the command
    # (imaplib below and the raw clients use the continuation form).
    assert [line.split(b" ", 1)[1] for line in sent if b"AUTHENTICATE" in line] == [b"AUTHENTICATE LOGIN " + b64(USER)]
    assert b64(PASSWORD) in sent
    assert loginProxy.waitForUpstreamLogins("imap", USER, before + 1) == before + 1
    assert loginProxy.waitForLog(rf"logged in as {USER}, relaying to imap \(mechanism=LOGIN\)")


def test_curl_imap_auth_login_after_starttls(loginProxy: LoginProxy) -> None:
    """On a STARTTLS listener curl --ssl-reqd finds AUTH=LOGIN once TLS is up, and logs in with it."""
    result = curl(
        "--ssl-reqd", "--cacert", loginProxy.dovecot.caFile, loginProxy.url("imap", "starttls", "INBOX;MAILINDEX=1")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == MESSAGE
    assert [line.split(b" ", 1)[1] for line in sentByCurl(result) if b"AUTHENTICATE" in line] == [
        b"AUTHENTICATE LOGIN " + b64(USER)
    ]


def test_curl_pop3_auth_login_fetches_the_message_dovecot_has(loginProxy: LoginProxy) -> None:
    """curl --login-options AUTH=LOGIN over pop3:// gets the message Dovecot's POP3 gives, relayed and bridged."""
    direct = curl(f"pop3://{HOST}:{loginProxy.dovecot.ports['pop3']}/1", user=POP_USER, password=POP_PASSWORD)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == MESSAGE
    before = loginProxy.upstreamLogins("pop3", POP_USER)
    relayed = curl(loginProxy.url("pop3", "pop3", "1"), user=POP_USER, password=POP_PASSWORD)
    assert relayed.returncode == 0, relayed.stderr
    assert relayed.stdout == direct.stdout
    assert [line for line in sentByCurl(relayed) if line.startswith(b"AUTH")] == [b"AUTH LOGIN"]
    assert loginProxy.waitForUpstreamLogins("pop3", POP_USER, before + 1) == before + 1
    assert loginProxy.waitForLog(rf"logged in as {POP_USER}, relaying to pop3 \(mechanism=LOGIN\)")
    # The same message of an IMAP-upstream user, bridged, with the initial response.
    bridged = curl("--sasl-ir", loginProxy.url("pop3", "pop3", "1"))
    assert bridged.returncode == 0, bridged.stderr
    assert bridged.stdout == MESSAGE
    assert [line for line in sentByCurl(bridged) if line.startswith(b"AUTH")] == [b"AUTH LOGIN " + b64(USER)]
    assert loginProxy.waitForLog(rf"logged in as {USER}, bridging to imap \(mechanism=LOGIN\)")


# -- real clients: imaplib and poplib -----------------------------------------------------


def test_imaplib_authenticate_login(loginProxy: LoginProxy) -> None:
    """imaplib's authenticate("LOGIN") answers each challenge by its text and reaches the mailbox."""
    challenges: list[bytes] = []

    def answer(challenge: bytes) -> bytes:
        challenges.append(challenge)
        return {b"Username:": USER, b"Password:": PASSWORD}[challenge].encode()

    before = loginProxy.upstreamLogins("imap", USER)
    client = imaplib.IMAP4(HOST, loginProxy.ports["plain"], timeout=15)
    try:
        assert "AUTH=LOGIN" in client.capabilities and "AUTH=PLAIN" in client.capabilities
        status, _ = client.authenticate("LOGIN", answer)
        assert status == "OK"
        assert challenges == [b"Username:", b"Password:"]
        client.select("INBOX", readonly=True)
        status, data = client.fetch("1", "(BODY.PEEK[])")
        assert status == "OK" and data[0] is not None and data[0][1] == MESSAGE
    finally:
        client.logout()
    assert loginProxy.waitForUpstreamLogins("imap", USER, before + 1) == before + 1


def test_poplib_auth_login(loginProxy: LoginProxy) -> None:
    """AUTH LOGIN driven through poplib's _shortcmd, then RETR, as a POP3 client library does it."""
    client = poplib.POP3(HOST, loginProxy.ports["pop3"], timeout=15)
    try:
        assert client.capa()["SASL"] == ["PLAIN", "LOGIN"]
        assert client._shortcmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
        assert client._shortcmd(b64(POP_USER).decode()) == b"+ UGFzc3dvcmQ6"
        assert client._shortcmd(b64(POP_PASSWORD).decode()).startswith(b"+OK")
        _, lines, _ = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    finally:
        client.quit()


# -- refusals -------------------------------------------------------------------------------


def test_wrong_password_through_login_fails_and_counts_toward_the_lockout(loginProxy: LoginProxy) -> None:
    """
    Wrong passwords through AUTHENTICATE LOGIN and AUTH LOGIN fail like PLAIN's and count toward one lockout:
    then even the right password is refused, and Dovecot never sees the user.
    """
    source = "127.0.0.91"
    imap = connectFrom(loginProxy.ports["plain"], source)
    pop3 = connectFrom(loginProxy.ports["pop3"], source)
    try:
        assert readLine(imap).startswith(b"* OK") and readLine(pop3).startswith(b"+OK")
        for index in range(LOCKOUT_AFTER - 1):
            imap.sendall(b"a AUTHENTICATE LOGIN\r\n")
            assert readLine(imap) == b"+ VXNlcm5hbWU6\r\n"
            imap.sendall(b64(LOCKED_USER) + b"\r\n")
            assert readLine(imap) == b"+ UGFzc3dvcmQ6\r\n"
            imap.sendall(b64(f"wrong{index}") + b"\r\n")
            assert readTagged(imap) == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        pop3.sendall(b"AUTH LOGIN " + b64(LOCKED_USER) + b"\r\n")
        assert readLine(pop3) == b"+ UGFzc3dvcmQ6\r\n"
        pop3.sendall(b64("wrong-pop3") + b"\r\n")
        assert readLine(pop3) == b"-ERR [AUTH] Authentication failed.\r\n"
        failures = loginProxy.process.log().count(f"authentication failure: ip={source} ")
        assert failures == LOCKOUT_AFTER
        # Locked out now: the right password is not even checked.
        imap.sendall(b"b AUTHENTICATE LOGIN " + b64(LOCKED_USER) + b"\r\n")
        assert readLine(imap) == b"+ UGFzc3dvcmQ6\r\n"
        imap.sendall(b64(LOCKED_PASSWORD) + b"\r\n")
        assert readTagged(imap, b"b") == b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    finally:
        imap.close()
        pop3.close()
    assert loginProxy.waitForLog(rf"authentication refused: ip={re.escape(source)} protocol=imap user={LOCKED_USER} ")
    assert f"logged in as {LOCKED_USER}" not in loginProxy.process.log()
    assert loginProxy.process.log().count(f"authentication failed for {LOCKED_USER} (mechanism=LOGIN)") == LOCKOUT_AFTER
    assert loginProxy.upstreamLogins("imap", LOCKED_USER) == 0


def test_cancel_at_each_step_then_log_in_on_the_same_connection(loginProxy: LoginProxy) -> None:
    """'*' at the user name and at the password is BAD / -ERR; the connection goes on and can log in."""
    source = "127.0.0.92"
    with connectFrom(loginProxy.ports["plain"], source) as imap:
        readLine(imap)
        imap.sendall(b"a AUTHENTICATE LOGIN\r\n")
        assert readLine(imap) == b"+ VXNlcm5hbWU6\r\n"
        imap.sendall(b"*\r\n")
        assert readLine(imap) == b"a BAD Authentication cancelled\r\n"
        imap.sendall(b"b AUTHENTICATE LOGIN " + b64(USER) + b"\r\n")
        assert readLine(imap) == b"+ UGFzc3dvcmQ6\r\n"
        imap.sendall(b"*\r\n")
        assert readLine(imap) == b"b BAD Authentication cancelled\r\n"
        imap.sendall(b"c AUTHENTICATE LOGIN " + b64(USER) + b"\r\n")
        assert readLine(imap) == b"+ UGFzc3dvcmQ6\r\n"
        imap.sendall(b64(PASSWORD) + b"\r\n")
        assert readTagged(imap, b"c").startswith(b"c OK [CAPABILITY ")
    with connectFrom(loginProxy.ports["pop3"], source) as pop3:
        readLine(pop3)
        pop3.sendall(b"AUTH LOGIN\r\n*\r\nAUTH LOGIN\r\n" + b64(POP_USER) + b"\r\n*\r\n")
        assert [readLine(pop3) for _ in range(5)] == [
            b"+ VXNlcm5hbWU6\r\n",
            b"-ERR Authentication cancelled\r\n",
            b"+ VXNlcm5hbWU6\r\n",
            b"+ UGFzc3dvcmQ6\r\n",
            b"-ERR Authentication cancelled\r\n",
        ]
        pop3.sendall(b"AUTH LOGIN " + b64(POP_USER) + b"\r\n" + b64(POP_PASSWORD) + b"\r\n")
        assert readLine(pop3) == b"+ UGFzc3dvcmQ6\r\n"
        assert readLine(pop3) == b"+OK Logged in.\r\n"
    # Cancelled exchanges are no failed logins.
    assert f"authentication failure: ip={source} " not in loginProxy.process.log()


def test_plaintext_listener_refuses_login_before_any_challenge(loginProxy: LoginProxy) -> None:
    """Without TLS or allow_plaintext_auth: no AUTH=LOGIN, NO [PRIVACYREQUIRED] / -ERR [AUTH] and never a '+'."""
    with connectFrom(loginProxy.ports["cleartext"], "127.0.0.93") as imap:
        greeting = readLine(imap)
        assert b"LOGINDISABLED" in greeting and b"AUTH=" not in greeting
        imap.sendall(b"a AUTHENTICATE LOGIN\r\n" + b64(USER) + b"\r\nb AUTHENTICATE LOGIN " + b64(USER) + b"\r\n")
        assert readLine(imap) == b"a NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
        # The user name that followed is read as a command, not as a response.
        assert readLine(imap) == b"* BAD Invalid tag or command\r\n"
        assert readLine(imap) == b"b NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
    with connectFrom(loginProxy.ports["pop3clear"], "127.0.0.93") as pop3:
        readLine(pop3)
        pop3.sendall(b"AUTH LOGIN\r\nAUTH\r\n")
        refused = b"-ERR [AUTH] Plaintext authentication disallowed on unencrypted connections\r\n"
        assert [readLine(pop3), readLine(pop3)] == [refused, refused]
    # curl finds no AUTH=LOGIN to use and gives up without sending a password.
    result = curl(loginProxy.url("imap", "cleartext", "INBOX;MAILINDEX=1"))
    assert result.returncode != 0 and result.stdout == b""
    assert not [line for line in sentByCurl(result) if b64(PASSWORD) in line]


def test_no_password_in_the_log(loginProxy: LoginProxy) -> None:
    """After LOGIN exchanges, neither a password nor its base64 form is anywhere in the proxy's log."""
    with connectFrom(loginProxy.ports["plain"], "127.0.0.94") as imap:
        readLine(imap)
        imap.sendall(b"a AUTHENTICATE LOGIN " + b64(USER) + b"\r\n" + b64(PASSWORD) + b"\r\n")
        assert readLine(imap) == b"+ UGFzc3dvcmQ6\r\n"
        assert readTagged(imap).startswith(b"a OK ")
    assert loginProxy.waitForLog(r"127\.0\.0\.94:\d+ logged in as sasl, relaying to imap \(mechanism=LOGIN\)")
    log = loginProxy.process.log()
    for password in (PASSWORD, POP_PASSWORD, LOCKED_PASSWORD):
        assert password not in log
        assert b64(password).decode() not in log
