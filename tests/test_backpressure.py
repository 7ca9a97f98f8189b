"""
Backpressure on real loopback sockets: a client that stops reading in the
middle of a large FETCH pauses the upstream instead of filling the proxy's
memory, and nothing is lost when it reads again.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import FileSender
from twisted.trial.unittest import TestCase

from mailproxy.auth import inlineRunner, makePortal
from mailproxy.config import ListenerConfig, TLSMode, UpstreamConfig
from mailproxy.imap.server import IMAPServerFactory, IMAPServerProtocol, ServerContext
from mailproxy.imap.upstream import UpstreamSession, connectUpstream
from tests.support import makeConfig, writeUsersFile

PAYLOAD = 64 * 1024 * 1024


class Zeros:
    """
    A file-like object of C{size} generated octets, so the fake upstream
    holds nothing in memory either.
    """

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.produced = 0

    def read(self, count: int) -> bytes:
        count = min(count, self.remaining)
        self.remaining -= count
        self.produced += count
        return b"z" * count


class StreamingUpstream(Protocol):
    """
    Just enough IMAP: a greeting, AUTHENTICATE PLAIN, and a FETCH that
    streams a large literal as fast as TCP accepts it.
    """

    source: Zeros

    def connectionMade(self) -> None:
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] fake\r\n")

    def dataReceived(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if b" AUTHENTICATE " in line:
                self.transport.write(line.split()[0] + b" OK [CAPABILITY IMAP4rev1] in\r\n")
            elif b" FETCH " in line:
                tag = line.split()[0]
                self.transport.write(b"* 1 FETCH (BODY[] {%d}\r\n" % PAYLOAD)
                sending = FileSender().beginFileTransfer(self.source, self.transport)
                sending.addCallback(lambda _, tag=tag: self.transport.write(b")\r\n" + tag + b" OK done\r\n"))


class SlowClient(Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.tail = b""
        self.done: Deferred[None] = Deferred()
        self.started: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0alicepw") + b"\r\n")
        self.transport.write(b"b FETCH 1 BODY[]\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.tail = (self.tail + data)[-64:]
        if self.received > 1024 * 1024 and not self.started.called:
            self.started.callback(None)
        if self.tail.endswith(b"b OK done\r\n"):
            self.done.callback(None)


def pendingWrite(transport: Any) -> int:
    """
    Octets a Twisted TCP transport holds in user space, not yet sent.
    """
    return len(transport.dataBuffer) - transport.offset + sum(map(len, transport._tempDataBuffer))


class BackpressureTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_slow_reader_pauses_the_upstream_and_loses_nothing(self) -> Any:
        """A stalled client leaves the upstream paused and the proxy's buffers bounded; all octets arrive later."""
        source = Zeros(PAYLOAD)
        upstreamFactory = Factory.forProtocol(StreamingUpstream)
        upstreamFactory.protocol.source = source  # type: ignore[attr-defined]
        upstreamPort = reactor.listenTCP(0, upstreamFactory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(upstreamPort.stopListening)

        upstream = UpstreamConfig("main", "127.0.0.1", upstreamPort.getHost().port, TLSMode.PLAIN)
        directory = tempfile.mkdtemp(prefix="mp-backpressure-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = makeConfig(writeUsersFile(directory, {"alice": "alicepw"}), delay=0, upstream=upstream)
        servers: list[IMAPServerProtocol] = []

        def connect(upstream: UpstreamConfig, user: str, password: str, client: str) -> Deferred[UpstreamSession]:
            return Deferred.fromCoroutine(connectUpstream(reactor, upstream, user, password))

        listener = ListenerConfig("imap", "tcp:0", TLSMode.PLAIN, allowPlaintextAuth=True)
        factory = IMAPServerFactory(ServerContext(config, listener, makePortal(config, inlineRunner), reactor, connect))
        original = factory.buildProtocol

        def build(addr: Any) -> IMAPServerProtocol:
            protocol = original(addr)
            servers.append(protocol)
            return protocol

        factory.buildProtocol = build  # type: ignore[method-assign]
        proxyPort = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(proxyPort.stopListening)

        client = SlowClient()
        clientFactory = ClientFactory.forProtocol(lambda: client)
        reactor.connectTCP("127.0.0.1", proxyPort.getHost().port, clientFactory)  # type: ignore[attr-defined]
        yield client.started
        client.transport.pauseProducing()  # stop reading: the kernel buffers fill up
        yield deferLater(reactor, 1.5, lambda: None)

        [server] = servers
        self.assertLess(pendingWrite(server.transport), 1024 * 1024)
        self.assertLess(source.produced, PAYLOAD // 2)
        stalledAt = source.produced
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertLess(source.produced - stalledAt, 1024 * 1024)

        client.transport.resumeProducing()
        yield client.done
        self.assertEqual(source.produced, PAYLOAD)
        self.assertGreater(client.received, PAYLOAD)
        client.transport.loseConnection()
        yield deferLater(reactor, 0.1, lambda: None)
