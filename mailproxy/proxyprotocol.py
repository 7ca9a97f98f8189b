# -*- test-case-name: tests.test_proxyprotocol -*-
"""
Listeners behind a load balancer that speaks the PROXY protocol (v1 or v2).

L{ProxyProtocolFactory} wraps a listener's factory (outside TLS for
implicit-TLS listeners: the header comes in cleartext before the TLS
handshake, as HAProxy sends it).  Unlike Twisted's C{HAProxyProtocolWrapper}
it connects the wrapped protocol only once the header has arrived, so an
IMAP or POP3 server, which speaks first, already sees the real client in
C{connectionMade}: in its greeting decision, per-IP limits and logs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailproxy.proxyheader import ProxyHeader, ProxyHeaderError, ProxyHeaderParser

# Load balancers send the header at once; a peer that has not within this
# many seconds is not one.
HEADER_TIMEOUT = 5.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger()


def describe(address: IAddress) -> str:
    """
    C{host:port} of an IP address, for logs (as the servers write it).
    """
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """
    Read the PROXY header, then connect the wrapped protocol with
    C{getPeer}/C{getHost} giving the addresses the header announced.
    """

    factory: ProxyProtocolFactory
    transport: ITransport

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.header: ProxyHeader | None = None
        self._parser: ProxyHeaderParser | None = ProxyHeaderParser()
        self._timeout: IDelayedCall | None = None
        self._paused = False
        self._withheld = b""

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper's own version connects the wrapped protocol now;
        # that waits for the header here.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        peer = self.transport.getPeer()
        if not self.factory.trusts(peer):
            log.warn(
                "{peer} is not a trusted PROXY protocol source for listener {listener}; closing",
                peer=describe(peer),
                listener=self.factory.listenerName,
            )
            self._abandon()
            return
        self._timeout = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if not self.disconnecting:
                self.wrappedProtocol.dataReceived(data)
            return
        try:
            parsed = parser.feed(data)
        except ProxyHeaderError as error:
            log.warn(
                "{peer} sent an invalid PROXY protocol header to listener {listener}: {error}; closing",
                peer=describe(self.transport.getPeer()),
                listener=self.factory.listenerName,
                error=str(error),
            )
            self._abandon()
            return
        if parsed is None:
            return
        self._stopTimeout()
        self._parser = None
        self.header, rest = parsed
        log.debug(
            "{peer} PROXY v{version} header for listener {listener}: client {client}",
            peer=describe(self.transport.getPeer()),
            version=self.header.version,
            listener=self.factory.listenerName,
            client=describe(self.getPeer()),
        )
        # ProtocolWrapper provides the transport's interfaces (directlyProvides).
        self.wrappedProtocol.makeConnection(cast(ITransport, self))
        if self._paused:
            # The protocol waits for its admission (workers): what came
            # with the header waits too.
            self._withheld = rest
        elif rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        withheld, self._withheld = self._withheld, b""
        if withheld and not self.disconnecting:
            self.wrappedProtocol.dataReceived(withheld)
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimeout()
        if self._parser is None:
            super().connectionLost(reason)
            return
        # The wrapped protocol never saw this connection.
        self.factory.unregisterProtocol(self)
        self._parser = None

    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self.transport.getHost()

    def _timedOut(self) -> None:
        self._timeout = None
        log.warn(
            "{peer} sent no PROXY protocol header to listener {listener} within {timeout} s; closing",
            peer=describe(self.transport.getPeer()),
            listener=self.factory.listenerName,
            timeout=self.factory.timeout,
        )
        self._abandon()

    def _abandon(self) -> None:
        self._stopTimeout()
        self.disconnecting = True
        # Nothing was said yet and nothing is owed: do not wait for the peer.
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        # A STARTTLS switch on a PROXY listener wraps this wrapper in TLS.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _stopTimeout(self) -> None:
        if self._timeout is not None:
            timeout, self._timeout = self._timeout, None
            if timeout.active():
                timeout.cancel()


class ProxyProtocolFactory(WrappingFactory[ProxyProtocolWrapper]):
    """
    Accept connections that begin with a PROXY protocol header, only from
    C{trusted} networks when any are given.

    @ivar listenerName: for log lines.
    """

    protocol = ProxyProtocolWrapper

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        listenerName: str,
        trusted: Iterable[Network] = (),
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.listenerName = listenerName
        self.trusted = tuple(trusted)
        self.timeout = timeout

    def trusts(self, peer: IAddress) -> bool:
        """
        C{True} if C{peer} may send a PROXY header: any peer without a
        trust list, else one whose IP address is in it.
        """
        if not self.trusted:
            return True
        try:
            address = ipaddress.ip_address(getattr(peer, "host", ""))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # An IPv4 balancer on a dual-stack (tcp6) listener.
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def logPrefix(self) -> str:
        return "PROXY"
