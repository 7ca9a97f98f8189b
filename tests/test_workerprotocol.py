"""
The supervisor's and workers' channel (L{mailproxy.workerprotocol.Channel})
on a real socket: questions and answers go out at once, commands that want
no answer wait for the end of the reactor's turn and go out together.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet.address import UNIXAddress
from twisted.internet.tcp import Connection
from twisted.protocols import amp

from mailproxy.ampcodec import BoxDecoder
from mailproxy.workerprotocol import Admit, Channel, EndSession, Release, StartSession
from tests.test_writenow import FakeReactor


class SocketPairConnection(Connection):
    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    getHost = getPeer


@pytest.fixture
def channel() -> Iterator[tuple[Channel, Connection, socket.socket, FakeReactor]]:
    ours, theirs = socket.socketpair()
    reactor = FakeReactor()
    protocol = Channel()
    connection = SocketPairConnection(ours, protocol, reactor)  # type: ignore[arg-type]
    connection.connected = 1
    protocol.makeConnection(connection)
    theirs.setblocking(False)
    try:
        yield protocol, connection, theirs, reactor
    finally:
        ours.close()
        theirs.close()


def boxesIn(peer: socket.socket) -> list[dict[bytes, bytes]]:
    try:
        octets = peer.recv(65536)
    except BlockingIOError:
        return []
    decoder = BoxDecoder()
    decoder.feed(octets)
    return [dict(box) for box in iter(decoder.next, None)]


def test_a_question_is_sent_at_once(channel: tuple[Channel, Connection, socket.socket, FakeReactor]) -> None:
    protocol, connection, peer, reactor = channel
    protocol.callRemote(Admit, network="192.0.2.1")
    assert boxesIn(peer) == [{b"_command": b"Admit", b"_ask": b"1", b"network": b"192.0.2.1"}]
    assert connection not in reactor.writers


def test_what_a_closing_connection_gives_back_goes_in_one_write(
    channel: tuple[Channel, Connection, socket.socket, FakeReactor],
) -> None:
    """Release and EndSession wait for the turn's end, then leave in one write."""
    protocol, connection, peer, reactor = channel
    protocol.callRemote(EndSession, user="alice")
    protocol.callRemote(Release, network="192.0.2.1")
    assert boxesIn(peer) == []
    assert connection in reactor.writers
    connection.doWrite()
    assert boxesIn(peer) == [
        {b"_command": b"EndSession", b"user": b"alice"},
        {b"_command": b"Release", b"network": b"192.0.2.1"},
    ]


def test_a_question_after_a_waiting_command_keeps_the_order(
    channel: tuple[Channel, Connection, socket.socket, FakeReactor],
) -> None:
    protocol, connection, peer, reactor = channel
    protocol.callRemote(Release, network="192.0.2.1")
    protocol.callRemote(Admit, network="192.0.2.2")
    connection.doWrite()
    assert [box[b"_command"] for box in boxesIn(peer)] == [b"Release", b"Admit"]


def test_an_answer_is_sent_at_once(channel: tuple[Channel, Connection, socket.socket, FakeReactor]) -> None:
    """The supervisor's side: a worker waiting for an answer gets it without a turn's delay."""
    protocol, connection, peer, reactor = channel

    class Sessions(amp.CommandLocator):
        @StartSession.responder
        def startSession(self, user: str) -> dict[str, bool]:
            return {"started": True}

    protocol.locator = Sessions()
    protocol.dataReceived(amp.AmpBox({b"_command": b"StartSession", b"_ask": b"7", b"user": b"alice"}).serialize())
    assert boxesIn(peer) == [{b"_answer": b"7", b"started": b"True"}]
    assert connection not in reactor.writers
