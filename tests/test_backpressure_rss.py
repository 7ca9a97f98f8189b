"""
Backpressure measured on a real C{twistd} proxy: a real Dovecot holds a
50 MB message; a client asks for it through the proxy and then stops
reading for a few seconds while the test samples the proxy's RSS.  Holding
the message would cost 50 MB; the proxy must stay far below that, and the
client must then receive the whole message intact.  IMAP passthrough,
IMAP through a filter chain, POP3 bridged to IMAP and POP3 relayed.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, residentKiB
from tests.support import FAST_HASH

SIZE = 50 * 1024 * 1024
STALL = 3.0  # seconds the client reads nothing
GROWTH_LIMIT_KIB = 20 * 1024
DEADLINE = 60.0


def bigMessage() -> bytes:
    # base64 lines never start with a dot, so POP3 stuffing leaves them alone.
    body = base64.encodebytes(os.urandom(SIZE * 3 // 4)).replace(b"\n", b"\r\n")
    return b"From: big@example.test\r\nSubject: 50 MB\r\n\r\n" + body


@dataclass
class BigSetup:
    ports: dict[str, int]
    process: ProxyProcess
    digest: str
    size: int


@pytest.fixture(scope="module")
def bigProxy(dovecot: DovecotUpstream) -> Iterator[BigSetup]:
    dovecot.addUser("big", "bigpw")
    message = bigMessage()
    client = imaplib.IMAP4(HOST, dovecot.ports["imap"])
    client.login("big", "bigpw")
    client.append("INBOX", None, None, message)
    client.logout()
    directory = tempfile.mkdtemp(prefix="mp-bigmessage-")
    ports = {name: freePort() for name in ("imap", "filtered", "pop3")}
    with open(os.path.join(directory, "users"), "w") as handle:
        for name in ("big", "bigpop"):
            handle.write(f"{name}:{hashPassword('bigpw', **FAST_HASH)}\n")
    configPath = os.path.join(directory, "mailproxy.toml")
    with open(configPath, "w") as handle:
        handle.write(
            f"""
[auth]
users_file = "users"

[filters.caps]
type = "capabilities"
add = ["X-FILTERED"]

[[listener]]
name = "imap"
endpoint = "tcp:{ports["imap"]}:interface=127.0.0.1"
allow_plaintext_auth = true

[[listener]]
name = "filtered"
endpoint = "tcp:{ports["filtered"]}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["caps"]

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{ports["pop3"]}:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.imap]
host = "{HOST}"
port = {dovecot.ports["imap"]}

[upstream.pop3]
protocol = "pop3"
host = "{HOST}"
port = {dovecot.ports["pop3"]}

[routing]
default_upstream = "imap"

[routing.users.bigpop]
upstream = "pop3"
username = "big"
password = "bigpw"
"""
        )
    process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
    try:
        process.waitForPorts(list(ports.values()))
        yield BigSetup(ports, process, hashlib.sha256(message).hexdigest(), len(message))
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)
        dovecot.wipe("big")


class SlowReader:
    """
    A client with a small receive buffer that can stop reading.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        self.sock.settimeout(DEADLINE)
        self.sock.connect((HOST, port))
        self.data = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readUntil(self, marker: bytes, atLeast: int = 0) -> None:
        deadline = time.monotonic() + DEADLINE
        while marker not in self.data[-len(marker) - 65536 :] or len(self.data) < atLeast:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} within {DEADLINE} s; got {bytes(self.data[-200:])!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed early; got {bytes(self.data[-200:])!r}")
            self.data += chunk

    def close(self) -> None:
        self.sock.close()


def measure(setup: BigSetup, reader: SlowReader, request: bytes, end: bytes) -> tuple[int, bytes]:
    """
    Send C{request}, read a megabyte, stall, then read to C{end}; return
    the RSS growth (KiB) while stalled and everything received after the
    request.
    """
    pid = setup.process.process.pid
    start = len(reader.data)
    before = residentKiB(pid)
    reader.send(request)
    reader.readUntil(b"", atLeast=start + 1024 * 1024)
    peak = before
    stallEnds = time.monotonic() + STALL
    while time.monotonic() < stallEnds:
        peak = max(peak, residentKiB(pid))
        time.sleep(0.1)
    reader.readUntil(end)
    return peak - before, bytes(reader.data[start:])


def report(label: str, growth: int) -> None:
    print(
        f"\n{label}: proxy RSS growth while the client stalled: {growth / 1024:.1f} MiB (limit {GROWTH_LIMIT_KIB / 1024:.0f})"
    )


@pytest.mark.parametrize("listener", ["imap", "filtered"])
def test_stalled_imap_fetch_of_50_mb_stays_out_of_the_proxys_memory(bigProxy: BigSetup, listener: str) -> None:
    """A client that stops reading mid-FETCH pauses the upstream; the message then arrives intact."""
    reader = SlowReader(bigProxy.ports[listener])
    try:
        reader.readUntil(b"\r\n")
        reader.send(b"a LOGIN big bigpw\r\nb EXAMINE INBOX\r\n")
        reader.readUntil(b"b OK")
        reader.readUntil(b"\r\n")
        growth, received = measure(bigProxy, reader, b"c FETCH 1 BODY.PEEK[]\r\n", b"\r\nc OK")
    finally:
        reader.close()
    report(listener, growth)
    head, _, rest = received.partition(b"}\r\n")
    assert head.startswith(b"* 1 FETCH (BODY[] {")
    size = int(head.rsplit(b"{", 1)[1])
    assert size == bigProxy.size
    assert hashlib.sha256(rest[:size]).hexdigest() == bigProxy.digest
    assert growth < GROWTH_LIMIT_KIB


@pytest.mark.parametrize("user", ["big", "bigpop"], ids=["bridge", "relay"])
def test_stalled_pop3_retr_of_50_mb_stays_out_of_the_proxys_memory(bigProxy: BigSetup, user: str) -> None:
    """The same for POP3 RETR, bridged to IMAP and relayed to POP3."""
    reader = SlowReader(bigProxy.ports["pop3"])
    try:
        reader.readUntil(b"\r\n")
        reader.send(b"USER %s\r\nPASS bigpw\r\n" % user.encode())
        reader.readUntil(b"+OK Logged in.\r\n")
        growth, received = measure(bigProxy, reader, b"RETR 1\r\n", b"\r\n.\r\n")
        reader.send(b"QUIT\r\n")
    finally:
        reader.close()
    report(user, growth)
    status, _, body = received.partition(b"\r\n")
    assert status.startswith(b"+OK")
    assert body.endswith(b"\r\n.\r\n")
    message = body[: -len(b".\r\n")]
    assert hashlib.sha256(message).hexdigest() == bigProxy.digest
    assert growth < GROWTH_LIMIT_KIB
