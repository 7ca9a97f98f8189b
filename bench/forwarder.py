"""
Byte forwarders written in Python, as the benchmark's floor for a proxy in
this language: what relaying costs before any IMAP is read.

    python -m bench.forwarder --engine twisted --route 10143:143 [--route 10110:110]

Two engines, neither parsing nor authenticating anything:

  - C{twisted}: a pair of Twisted protocols relaying octets as they come,
    sent at once when nothing is queued (as mailproxy sends) and each
    transport the other's producer.  A proxy built on Twisted's reactor
    pays at least this much per read and per connection.
  - C{epoll}: one loop over C{select.epoll} with C{recv} and C{send}, no
    framework: what the interpreter and the kernel cost alone.

The bench (C{bench.summary}) runs each as a column beside mailproxy and the
C peers, so one run shows how much of mailproxy's overhead is its own.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import HOST, PeerProcess, freePort, waitForGreeting
from tests.proxyprocess import tail

ENGINES = ("twisted", "epoll")
READ_SIZE = 1 << 16
CONNECT_TIMEOUT = 5.0


def twistedForwarder(routes: Sequence[tuple[int, int]]) -> None:
    from twisted.internet import protocol, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from mailproxy.writenow import writeNow

    class Upstream(protocol.Protocol):
        client: Client

        def connectionMade(self) -> None:
            transport: Any = self.transport
            transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            writeNow(self.client.transport, data)

        def connectionLost(self, reason: Any = None) -> None:
            self.client.transport.loseConnection()  # type: ignore[union-attr]

    class Client(protocol.Protocol):
        upstream: Upstream | None = None

        def __init__(self, upstreamPort: int) -> None:
            self.upstreamPort = upstreamPort

        def connectionMade(self) -> None:
            transport: Any = self.transport
            transport.setTcpNoDelay(True)
            transport.pauseProducing()
            factory = protocol.Factory.forProtocol(Upstream)
            factory.noisy = False
            endpoint = TCP4ClientEndpoint(reactor, HOST, self.upstreamPort, timeout=CONNECT_TIMEOUT)
            endpoint.connect(factory).addCallbacks(self._connected, lambda _: transport.loseConnection())

        def _connected(self, upstream: Upstream) -> None:
            transport: Any = self.transport
            if not transport.connected:
                upstream.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.upstream = upstream
            upstream.client = self
            # each side pauses the other when its own buffer fills
            transport.registerProducer(upstream.transport, True)
            upstream.transport.registerProducer(transport, True)  # type: ignore[union-attr]
            transport.resumeProducing()

        def dataReceived(self, data: bytes) -> None:
            if self.upstream is not None:
                writeNow(self.upstream.transport, data)

        def connectionLost(self, reason: Any = None) -> None:
            if self.upstream is not None:
                self.upstream.transport.loseConnection()  # type: ignore[union-attr]

    class ClientFactory(protocol.ServerFactory):
        noisy = False

        def __init__(self, upstreamPort: int) -> None:
            self.upstreamPort = upstreamPort

        def buildProtocol(self, addr: Any) -> Client:
            return Client(self.upstreamPort)

    theReactor: Any = reactor
    for listenPort, upstreamPort in routes:
        theReactor.listenTCP(listenPort, ClientFactory(upstreamPort), backlog=1024, interface=HOST)
    theReactor.run()


class _Side:
    """
    One socket of a relayed pair, with what it could not yet be sent.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: _Side
        self.pending = b""
        self.reading = True
        self.closeWhenSent = False


def epollForwarder(routes: Sequence[tuple[int, int]]) -> None:
    poller = select.epoll()
    listeners: dict[int, tuple[socket.socket, int]] = {}
    sides: dict[int, _Side] = {}
    for listenPort, upstreamPort in routes:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, listenPort))
        listener.listen(1024)
        listener.setblocking(False)
        listeners[listener.fileno()] = (listener, upstreamPort)
        poller.register(listener.fileno(), select.EPOLLIN)

    def watch(side: _Side) -> None:
        mask = (select.EPOLLIN if side.reading else 0) | (select.EPOLLOUT if side.pending else 0)
        poller.modify(side.fd, mask)

    def close(side: _Side) -> None:
        for each in (side, side.peer):
            if sides.pop(each.fd, None) is not None:
                poller.unregister(each.fd)
                each.sock.close()

    def accept(listener: socket.socket, upstreamPort: int) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            # loopback: the connection is made (or refused) at once
            upstream = socket.create_connection((HOST, upstreamPort), timeout=CONNECT_TIMEOUT)
        except OSError:
            client.close()
            return
        pair = _Side(client), _Side(upstream)
        pair[0].peer, pair[1].peer = pair[1], pair[0]
        for side in pair:
            side.sock.setblocking(False)
            side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sides[side.fd] = side
            poller.register(side.fd, select.EPOLLIN)

    def relay(side: _Side) -> None:
        try:
            data = side.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        peer = side.peer
        if not data:
            # what the peer still owes goes out first
            if peer.pending:
                peer.closeWhenSent = True
                side.reading = False
                watch(side)
            else:
                close(side)
            return
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            close(side)
            return
        if sent < len(data):
            # the peer's buffer is full: stop reading until it drains
            peer.pending = data[sent:]
            side.reading = False
            watch(side)
            watch(peer)

    def flush(side: _Side) -> None:
        try:
            sent = side.sock.send(side.pending)
        except BlockingIOError:
            return
        except OSError:
            close(side)
            return
        side.pending = side.pending[sent:]
        if side.pending:
            return
        if side.closeWhenSent:
            close(side)
            return
        watch(side)
        side.peer.reading = True
        watch(side.peer)

    while True:
        # A timeout, so that SIGINT ends the forwarder: under valgrind a
        # signal did not interrupt an epoll_wait without one, and the
        # forwarder, killed instead, left an empty callgrind profile.
        for fd, events in poller.poll(1.0):
            if fd in listeners:
                accept(*listeners[fd])
                continue
            side = sides.get(fd)
            if side is not None and events & select.EPOLLOUT and side.pending:
                flush(side)
            side = sides.get(fd)
            if side is not None and events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and side.reading:
                relay(side)


class PythonForwarder(PeerProcess):
    """
    A forwarder of this module run as a peer: 127.0.0.1 C{ports["imap"]}
    and C{ports["pop3"]} relayed to C{imapPort} and C{pop3Port}.
    """

    def __init__(self, engine: str, directory: str, imapPort: int, pop3Port: int) -> None:
        assert engine in ENGINES
        self.engine = engine
        self.directory = directory
        self.ports = {"imap": freePort(), "pop3": freePort()}
        self.routes = [(self.ports["imap"], imapPort), (self.ports["pop3"], pop3Port)]
        self.outputPath = os.path.join(directory, "forwarder.log")

    def start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        command = [sys.executable, "-m", "bench.forwarder", "--engine", self.engine]
        for listenPort, upstreamPort in self.routes:
            command += ["--route", f"{listenPort}:{upstreamPort}"]
        with open(self.outputPath, "wb") as output:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=root
            )
        waitForGreeting(
            self.process, self.ports["imap"], f"{self.engine} forwarder", lambda: tail(self.outputPath), self.stop
        )

    def stop(self) -> None:
        self.stopProcess()


def _route(text: str) -> tuple[int, int]:
    listenPort, _, upstreamPort = text.partition(":")
    return int(listenPort), int(upstreamPort)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument(
        "--route", type=_route, action="append", required=True, help="LISTEN_PORT:UPSTREAM_PORT on 127.0.0.1"
    )
    arguments = parser.parse_args(argv)
    try:
        (twistedForwarder if arguments.engine == "twisted" else epollForwarder)(arguments.route)
    except KeyboardInterrupt:
        pass
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            parser.exit(1, f"forwarder: {error}\n")
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
