"""
Sessions over TLS end when they should: the proxy closes a STARTTLS/STLS
client connection after LOGOUT or QUIT and lets go of its socket, and closes
a STARTTLS upstream when its client drops.  Found by the soak test: the two
transports are each other's producers and a TLS transport closes only once
none is registered; and a TLS transport whose input is paused (the POP3
server pauses it while a command runs) never reads the peer's close_notify,
so its socket stayed in CLOSE-WAIT.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from tests.conftest import HOST, LOCAL_USERS, UPSTREAM_USERS, POP3Proxy, RunningProxy, tlsContext
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import processTree
from tests.test_pop3_integration import appendDirect, countDirect

CLOSE_TIMEOUT = 10.0


def readUntilClosed(connection: socket.socket) -> bytes:
    """
    Everything the server sends until it closes; a socket timeout (the
    server never closing) fails the test.
    """
    connection.settimeout(CLOSE_TIMEOUT)
    received = b""
    for _ in range(1000):
        chunk = connection.recv(65536)
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"no end of the stream: {received[-200:]!r}")


def readLine(connection: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = connection.recv(1)
        assert byte, f"closed after {line!r}"
        line += byte
    return line


def startTLS(port: int, caFile: str, greeting: bytes, command: bytes) -> ssl.SSLSocket:
    plain = socket.create_connection((HOST, port), timeout=CLOSE_TIMEOUT)
    assert readLine(plain).startswith(greeting)
    plain.sendall(command)
    assert readLine(plain).split(b" ", 2)[:2] in ([b"a", b"OK"], [b"+OK", b"Begin"])
    return tlsContext(caFile).wrap_socket(plain, server_hostname="localhost")


@pytest.mark.parametrize("user", ["bob", "carol"])
def test_imap_logout_on_a_starttls_listener_ends_the_connection(proxy: RunningProxy, user: str) -> None:
    """
    After LOGOUT's tagged OK the proxy closes the TLS connection, whatever
    the upstream's TLS mode (bob: STARTTLS, carol: plaintext).
    """
    connection = startTLS(proxy.ports["starttls"], proxy.caFile, b"* OK", b"a STARTTLS\r\n")
    clientPort = connection.getsockname()[1]
    with connection:
        connection.sendall(b'b LOGIN %s "%s"\r\nc LOGOUT\r\n' % (user.encode(), LOCAL_USERS[user].encode()))
        received = readUntilClosed(connection)
    assert received.startswith(b"b OK ")
    assert b"* BYE" in received and received.endswith(b"\r\n") and b"\r\nc OK " in received
    pid = proxy.process.process.pid
    assert waitFor(lambda: not socketsTo(pid, clientPort)), socketsTo(pid, clientPort)


@pytest.mark.parametrize("user", ["paul", "phil", "pete"])
def test_pop3_quit_on_an_stls_listener_ends_the_connection(
    pop3Proxy: POP3Proxy, dovecot: DovecotUpstream, user: str
) -> None:
    """
    After QUIT's +OK (committing a DELE) the proxy closes the TLS connection
    and lets go of its socket, relayed to Dovecot's POP3 with STLS (paul,
    phil) or bridged (pete, whose commit runs while input is paused).
    """
    appendDirect(dovecot, user, 1)
    stored = countDirect(dovecot, user)
    connection = startTLS(pop3Proxy.ports["stls"], pop3Proxy.caFile, b"+OK", b"STLS\r\n")
    clientPort = connection.getsockname()[1]
    with connection:
        connection.sendall(b"USER %s\r\nPASS %s\r\nSTAT\r\n" % (user.encode(), UPSTREAM_USERS[user].encode()))
        replies = [readLine(connection) for _ in range(3)]
        count = int(replies[2].split()[1])
        connection.sendall(b"DELE %d\r\nQUIT\r\n" % (count,))
        received = b"".join(replies) + readUntilClosed(connection)
    lines = received.splitlines()
    assert len(lines) == 5 and all(line.startswith(b"+OK") for line in lines), received
    pid = pop3Proxy.process.process.pid
    assert waitFor(lambda: not socketsTo(pid, clientPort)), socketsTo(pid, clientPort)
    assert countDirect(dovecot, user) == stored - 1


def socketsTo(pid: int, port: int, established: bool = False) -> list[str]:
    """
    The TCP states (hex, as in /proc/net/tcp) of the sockets process
    C{pid} (or one of its workers) holds to C{port} on 127.0.0.1, only the established ones if
    C{established}.
    """
    inodes = set()
    # With workers, the sockets are the worker processes'.
    for member in processTree(pid):
        try:
            names = os.listdir(f"/proc/{member}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{member}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    states = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            remotePort = int(fields[2].split(":")[1], 16)
            if remotePort == port and fields[9] in inodes and (fields[3] == "01" or not established):
                states.append(fields[3])
    return states


def establishedTo(pid: int, port: int) -> int:
    return len(socketsTo(pid, port, established=True))


def waitFor(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + CLOSE_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_dropped_imap_client_closes_its_starttls_upstream(proxy: RunningProxy, dovecot: DovecotUpstream) -> None:
    """
    bob's upstream connection uses STARTTLS; when bob vanishes without
    LOGOUT the proxy closes it.
    """
    pid = proxy.process.process.pid
    upstreamPort = dovecot.ports["imap"]
    before = establishedTo(pid, upstreamPort)
    client = socket.create_connection((HOST, proxy.ports["plain"]), timeout=CLOSE_TIMEOUT)
    with client:
        readLine(client)
        client.sendall(b"a LOGIN bob bobpw\r\nb SELECT INBOX\r\n")
        while not readLine(client).startswith(b"b OK"):
            pass
        assert establishedTo(pid, upstreamPort) == before + 1
    assert waitFor(lambda: establishedTo(pid, upstreamPort) == before), establishedTo(pid, upstreamPort)


def test_a_dropped_pop3_client_closes_its_stls_upstream(pop3Proxy: POP3Proxy, dovecot: DovecotUpstream) -> None:
    """
    paul's relayed POP3 upstream uses STLS; when paul vanishes without QUIT
    the proxy closes it.
    """
    pid = pop3Proxy.process.process.pid
    upstreamPort = dovecot.ports["pop3"]
    before = establishedTo(pid, upstreamPort)
    client = socket.create_connection((HOST, pop3Proxy.ports["plain"]), timeout=CLOSE_TIMEOUT)
    with client:
        readLine(client)
        client.sendall(b"USER paul\r\nPASS %s\r\nSTAT\r\n" % (UPSTREAM_USERS["paul"].encode(),))
        for _ in range(3):
            assert readLine(client).startswith(b"+OK")
        assert establishedTo(pid, upstreamPort) == before + 1
    assert waitFor(lambda: establishedTo(pid, upstreamPort) == before), establishedTo(pid, upstreamPort)
