"""
Abuse before login, as an attacker does it, against a real C{twistd -n
mailproxy} in front of the private Dovecot: silent and trickling
connections holding slots, parallel password guessing, locking the owner
out, and a password literal invited in the clear.

Each test uses its own loopback source address (all of 127/8 reaches the
proxy), so one test's lockouts do not touch another's.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy
from tests.rawclient import authLines, clientHello, connectFrom, imapLogin, readEach, readLine
from tests.tomlconfig import authTable, namedListeners, routingTable, table, upstreamTable

DEADLINE = 4.0
SLOTS = 250
LOCKOUT_AFTER = 5
HASH_THREADS = 2

USERS = {"carol": "carolpw", "victim": "victim-right-pw"}


@dataclass
class AbuseProxy:
    ports: dict[str, int]
    dovecot: DovecotUpstream
    process: ProxyProcess

    def connect(self, listener: str, source: str = HOST) -> socket.socket:
        return connectFrom(self.ports[listener], source)

    def authLines(self, source: str, kind: str) -> list[str]:
        return authLines(self.process.log(), source, kind)

    def upstreamLogins(self, user: str) -> int:
        """
        How many times Dovecot logged C{user} in (over IMAP, so through the proxy).
        """
        with open(self.dovecot.logFile, errors="replace") as handle:
            return len(re.findall(rf"imap-login: (?:Info: )?Login: user=<{re.escape(user)}>", handle.read()))

    def upstreamLoginsReach(self, user: str, count: int) -> int:
        """
        Wait (at most 10 s) for Dovecot's log to show C{count} logins of
        C{user}; how many it shows then.
        """
        deadline = time.monotonic() + 10
        while self.upstreamLogins(user) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.upstreamLogins(user)


def proxyConfig(ports: dict[str, int], dovecot: DovecotUpstream) -> str:
    """
    The proxy's configuration: the listeners of C{ports} in front of
    Dovecot's IMAP, and C{victim} logging in there as C{carol}.
    """
    return "".join(
        [
            table("server", loginDeadline=DEADLINE, preauthTimeout=60),
            authTable(failureDelay=0.02, hashThreads=HASH_THREADS),
            table("limits", maxConnections=SLOTS, maxConnectionsPerIp=SLOTS, failuresBeforeLockout=LOCKOUT_AFTER),
            namedListeners(ports, dovecot.certFile, dovecot.keyFile),
            upstreamTable("plain", dovecot.ports["imap"]),
            routingTable("plain", {"victim": {"username": "carol", "password": "carolpw"}}),
        ]
    )


@pytest.fixture(scope="module")
def abuseProxy(dovecot: DovecotUpstream) -> Iterator[AbuseProxy]:
    ports = {name: freePort() for name in ("plain", "cleartext", "starttls", "implicit", "pop3")}
    config = proxyConfig(ports, dovecot)
    with runningProxy(config, USERS, list(ports.values()), prefix="mp-abuse-") as (_, process):
        yield AbuseProxy(ports, dovecot, process)


def closedWithin(sockets: list[socket.socket], seconds: float) -> tuple[int, float]:
    """
    Wait (at most C{seconds}) until the proxy closed every socket; how many
    it closed and when the last one went.
    """
    started = time.monotonic()
    closed = [result[0] - started for result in readEach(sockets, seconds, lambda data, ended: ended) if result]
    return len(closed), max(closed, default=0.0)


def test_silent_connections_are_aborted_at_the_deadline_and_free_every_slot(abuseProxy: AbuseProxy) -> None:
    """Silent TLS sockets, a ClientHello then silence, STARTTLS then silence: all gone at the deadline; slots free."""
    hello = clientHello()
    accepted = abuseProxy.process.log().count("connected to IMAP listener")
    started = time.monotonic()
    silent: list[socket.socket] = []
    try:
        for index in range(SLOTS):
            sock = abuseProxy.connect("starttls" if index % 5 == 0 else "implicit")
            silent.append(sock)
            if index % 5 == 0:
                sock.sendall(b"s STARTTLS\r\n")
            elif index % 5 == 1:
                sock.sendall(hello)
        for sock in silent[::5]:
            assert readLine(sock).startswith(b"* OK")
            assert readLine(sock).startswith(b"s OK")
        # Connected is not yet accepted: wait until the proxy has them all.
        while (
            abuseProxy.process.log().count("connected to IMAP listener") < accepted + SLOTS
            and time.monotonic() - started < 5
        ):
            time.sleep(0.05)
        opened = time.monotonic() - started
        assert opened < DEADLINE / 2, "too slow to fill the slots before the first deadline"
        legitimate = abuseProxy.connect("plain")
        assert readLine(legitimate).startswith(b"* BYE [UNAVAILABLE] too many connections")
        legitimate.close()
        closed, last = closedWithin(silent, DEADLINE + 10)
    finally:
        for sock in silent:
            sock.close()
    assert closed == SLOTS
    # Every one of them by its own deadline (measured from accept), not by any later timeout.
    assert last < opened + DEADLINE + 1.5
    assert imapLogin(abuseProxy.ports["plain"], "carol", "carolpw", HOST).startswith(b"a OK")


def test_trickling_a_byte_at_a_time_does_not_outlive_the_deadline(abuseProxy: AbuseProxy) -> None:
    """Slowloris: a byte every 0.2 s, and complete NOOPs too, keep nothing open past the deadline, IMAP or POP3."""
    trickle = abuseProxy.connect("plain", "127.0.0.2")
    busy = abuseProxy.connect("plain", "127.0.0.2")
    pop3 = abuseProxy.connect("pop3", "127.0.0.2")
    assert [readLine(sock)[:3] for sock in (trickle, busy, pop3)] == [b"* O", b"* O", b"+OK"]
    started = time.monotonic()
    ended: dict[str, float] = {}
    received = {"trickle": b"", "busy": b"", "pop3": b""}
    sockets = {"trickle": trickle, "busy": busy, "pop3": pop3}
    for sock in sockets.values():
        sock.setblocking(False)
    while len(ended) < 3 and time.monotonic() - started < DEADLINE + 5:
        for name, sock in sockets.items():
            if name in ended:
                continue
            try:
                sock.sendall({"trickle": b"x", "busy": b"n NOOP\r\n", "pop3": b"N"}[name])
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                data = b""
            received[name] += data
            if not data:
                ended[name] = time.monotonic() - started
        time.sleep(0.2)
    for sock in sockets.values():
        sock.close()
    assert set(ended) == {"trickle", "busy", "pop3"}
    assert all(DEADLINE - 0.5 < moment < DEADLINE + 1.5 for moment in ended.values()), ended
    assert received["trickle"].endswith(b"* BYE Autologout; login took too long\r\n")
    assert received["busy"].count(b"n OK NOOP completed") >= 5
    assert received["pop3"].endswith(b"-ERR Autologout; login took too long\r\n")


def test_parallel_guesses_are_checked_one_at_a_time_and_stop_at_the_lockout(abuseProxy: AbuseProxy) -> None:
    """48 LOGINs at once from one address, the right password last: only the first few are checked; it never gets in."""
    source = "127.0.0.3"
    upstreamLogins = abuseProxy.upstreamLogins("carol")  # victim's upstream account
    sockets = []
    for _ in range(48):
        sock = abuseProxy.connect("plain", source)
        readLine(sock)
        sockets.append(sock)
    for index, sock in enumerate(sockets[:47]):
        sock.sendall(f'a LOGIN victim "guess-{index}"\r\n'.encode())
    # The right one once the guesses are in (the proxy reads the 48 sockets in no set order).
    time.sleep(0.2)
    sockets[47].sendall(b'a LOGIN victim "victim-right-pw"\r\n')
    replies = []
    for sock in sockets:
        sock.settimeout(30)
        replies.append(readLine(sock))
        sock.close()
    assert all(reply.startswith(b"a NO ") for reply in replies), sorted(set(replies))
    checked = abuseProxy.authLines(source, "failure")
    refused = abuseProxy.authLines(source, "refused")
    assert len(checked) == LOCKOUT_AFTER, checked
    assert len(checked) + len(refused) == 48
    assert "logged in as victim" not in abuseProxy.process.log()
    # Dovecot's own record: one login after the burst (from elsewhere) is the only one since.
    assert imapLogin(abuseProxy.ports["plain"], "carol", "carolpw", "127.0.0.9").startswith(b"a OK")
    assert abuseProxy.upstreamLoginsReach("carol", upstreamLogins + 1) == upstreamLogins + 1


def test_failures_from_strangers_do_not_lock_the_owner_out(abuseProxy: AbuseProxy) -> None:
    """The owner's address keeps logging in while a stranger's guesses lock the account for everyone else."""
    owner, stranger, newcomer = "127.0.0.4", "127.0.0.5", "127.0.0.6"
    assert imapLogin(abuseProxy.ports["plain"], "carol", "carolpw", owner).startswith(b"a OK")
    upstreamLogins = abuseProxy.upstreamLoginsReach("carol", abuseProxy.upstreamLogins("carol"))
    for index in range(LOCKOUT_AFTER):
        assert imapLogin(abuseProxy.ports["plain"], "carol", f"wrong-{index}", stranger).startswith(
            b"a NO [AUTHENTICATIONFAILED]"
        )
    assert imapLogin(abuseProxy.ports["plain"], "carol", "carolpw", newcomer).startswith(b"a NO [AUTHENTICATIONFAILED]")
    assert abuseProxy.authLines(newcomer, "refused")[-1].endswith("user=carol reason=user-locked-out")
    assert imapLogin(abuseProxy.ports["plain"], "carol", "carolpw", owner).startswith(b"a OK")
    # In Dovecot: the owner's second session, and nothing for the stranger's or the newcomer's tries.
    assert abuseProxy.upstreamLoginsReach("carol", upstreamLogins + 1) == upstreamLogins + 1
    # The stranger's own address is locked out too, whoever it asks for.
    assert imapLogin(abuseProxy.ports["plain"], "victim", "victim-right-pw", stranger).startswith(
        b"a NO [AUTHENTICATIONFAILED]"
    )


def test_no_continuation_invites_a_password_literal_where_login_is_refused(abuseProxy: AbuseProxy) -> None:
    """Without TLS, LOGIN {5} and AUTHENTICATE get NO [PRIVACYREQUIRED] at once, never a '+'."""
    with abuseProxy.connect("cleartext", "127.0.0.7") as sock:
        assert b"LOGINDISABLED" in readLine(sock)
        sock.sendall(b"a LOGIN {5}\r\n")
        assert readLine(sock) == b"a NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
        sock.sendall(b"b LOGIN carol {7}\r\n")
        assert readLine(sock) == b"b NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
        sock.sendall(b"c AUTHENTICATE PLAIN\r\n")
        assert readLine(sock) == b"c NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
        # A non-synchronising literal is on its way anyway: read, then refused.
        sock.sendall(b"d LOGIN {5+}\r\ncarol {7+}\r\ncarolpw\r\ne NOOP\r\n")
        assert readLine(sock) == b"d NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
        assert readLine(sock) == b"e OK NOOP completed\r\n"
    assert "logged in" not in "\n".join(line for line in abuseProxy.process.log().splitlines() if "127.0.0.7" in line)


def test_listeners_have_a_deep_accept_queue(abuseProxy: AbuseProxy) -> None:
    """The listening sockets' backlog is 1024 by default, not Twisted's 50 (ss shows it as Send-Q)."""
    output = subprocess.run(
        ["ss", "-ltnH", f"sport = :{abuseProxy.ports['implicit']}"], capture_output=True, text=True, timeout=10
    ).stdout
    # With workers, one socket per worker (SO_REUSEPORT), each with the backlog.
    lines = output.splitlines()
    assert lines and all(line.split()[2] == "1024" for line in lines), output


def threadsOf(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_login_flood_hashes_in_a_bounded_number_of_threads(abuseProxy: AbuseProxy) -> None:
    """16 logins at once from 16 addresses (full-cost scrypt each): never more than hash_threads extra threads."""
    pid = abuseProxy.process.process.pid
    before = threadsOf(pid)
    sockets = []
    try:
        # Few enough to be answered well within the login deadline.
        for index in range(16):
            sock = abuseProxy.connect("plain", f"127.0.2.{index + 1}")
            readLine(sock)
            sockets.append(sock)
        for index, sock in enumerate(sockets):
            # Unknown names are checked against a full-cost decoy hash.
            sock.sendall(f"a LOGIN nobody{index} wrong\r\n".encode())
        most = before
        replies = {sock: b"" for sock in sockets}
        deadline = time.monotonic() + 60
        for sock in sockets:
            sock.setblocking(False)
        while not all(b"\r\n" in reply for reply in replies.values()) and time.monotonic() < deadline:
            most = max(most, threadsOf(pid))
            for sock in sockets:
                try:
                    replies[sock] += sock.recv(4096)
                except BlockingIOError:
                    pass
            time.sleep(0.005)
        answered = sum(reply.startswith(b"a NO [AUTHENTICATIONFAILED]") for reply in replies.values())
    finally:
        for sock in sockets:
            sock.close()
    assert answered == len(sockets)
    assert before < most <= before + HASH_THREADS
