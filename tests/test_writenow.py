"""
Writing to a plain TCP transport at once (L{mailproxy.writenow}): on real
sockets, what is sent immediately never overtakes what the transport holds,
and what the socket does not take is left to the transport.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport

from mailproxy.writenow import writeNow


class FakeReactor:
    """
    Records what a connection asks to be watched for, and nothing else.
    """

    def __init__(self) -> None:
        self.writers: set[Any] = set()
        self.watchRequests = 0

    def addWriter(self, writer: Any) -> None:
        self.watchRequests += 1
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket, FakeReactor]]:
    """
    A connected Twisted TCP transport and the plain socket at its other end.
    """
    ours, theirs = socket.socketpair()
    reactor = FakeReactor()
    connection = Connection(ours, Protocol(), reactor)  # type: ignore[arg-type]
    connection.connected = 1
    theirs.settimeout(5)
    try:
        yield connection, theirs, reactor
    finally:
        ours.close()
        theirs.close()


def receive(peer: socket.socket, size: int) -> bytes:
    received = b""
    for _ in range(10000):
        if len(received) >= size:
            break
        received += peer.recv(size - len(received))
    return received


def flush(connection: Connection, reactor: FakeReactor, peer: socket.socket, expected: int) -> bytes:
    """
    Let the transport write what it holds (as the reactor would) while the
    peer reads; return all the peer got.
    """
    received = b""
    for _ in range(10000):
        if connection in reactor.writers:
            connection.doWrite()
        received += peer.recv(65536)
        if len(received) >= expected:
            break
    return received


def test_an_idle_plain_connection_sends_at_once_without_watching_for_writability(
    pair: tuple[Connection, socket.socket, FakeReactor],
) -> None:
    """Nothing buffered: the octets are on the socket when writeNow returns; no writer was registered."""
    connection, peer, reactor = pair
    writeNow(connection, b"a1 OK done\r\n")
    assert receive(peer, 12) == b"a1 OK done\r\n"
    assert reactor.watchRequests == 0
    assert not connection.dataBuffer and not connection._tempDataLen


def test_octets_behind_buffered_ones_are_queued_behind_them(
    pair: tuple[Connection, socket.socket, FakeReactor],
) -> None:
    """What the transport still holds goes out first; writeNow never overtakes it."""
    connection, peer, reactor = pair
    connection.write(b"first ")
    writeNow(connection, b"second")
    assert connection in reactor.writers
    assert flush(connection, reactor, peer, 12) == b"first second"


def test_what_a_full_socket_does_not_take_is_left_to_the_transport_in_order(
    pair: tuple[Connection, socket.socket, FakeReactor],
) -> None:
    """A write larger than the socket buffer: the rest is buffered, then later writes queue behind it."""
    connection, peer, reactor = pair
    connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096  # 1 MiB, far more than the socket takes
    writeNow(connection, big)
    assert connection in reactor.writers
    writeNow(connection, b"tail")
    assert flush(connection, reactor, peer, len(big) + 4) == big + b"tail"


def test_a_tls_connection_writes_through_the_transport(pair: tuple[Connection, socket.socket, FakeReactor]) -> None:
    """Under TLS the octets must be encrypted: the socket is never written directly."""
    connection, _, _ = pair
    written: list[bytes] = []
    connection.TLS = True
    connection.write = written.append  # type: ignore[method-assign]
    writeNow(connection, b"secret")
    assert written == [b"secret"]


def test_a_closing_connection_writes_through_the_transport(
    pair: tuple[Connection, socket.socket, FakeReactor],
) -> None:
    """After loseConnection the transport decides what still goes out."""
    connection, _, _ = pair
    written: list[bytes] = []
    connection.disconnecting = True
    connection.write = written.append  # type: ignore[method-assign]
    writeNow(connection, b"late")
    assert written == [b"late"]


def test_a_broken_connection_leaves_the_error_to_the_transport(
    pair: tuple[Connection, socket.socket, FakeReactor],
) -> None:
    """A send that fails (the peer is gone) buffers instead; the reactor's write then reports the loss."""
    connection, peer, reactor = pair
    peer.close()
    for _ in range(3):
        writeNow(connection, b"x" * 65536)
    assert connection in reactor.writers or connection.dataBuffer or connection._tempDataLen
    assert connection.doWrite() is not None


def test_other_transports_are_written_as_usual() -> None:
    """A transport that is no TCP connection (a wrapper, a test transport) gets a plain write."""
    transport = StringTransport()
    writeNow(transport, b"a1 OK\r\n")
    assert transport.value() == b"a1 OK\r\n"
