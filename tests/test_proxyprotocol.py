"""
The PROXY protocol header parser and the listener wrapper, in memory.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailproxy.auth import inlineRunner, makePortal
from mailproxy.config import ConfigError, ListenerConfig, TLSMode, parseConfig
from mailproxy.imap.server import IMAPServerFactory, ServerContext
from mailproxy.limits import LimitsConfig
from mailproxy.pop3.server import POP3Backends, POP3ServerFactory
from mailproxy.proxyheader import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
)
from mailproxy.proxyprotocol import HEADER_TIMEOUT, ProxyProtocolFactory, ProxyProtocolWrapper
from mailproxy.tap import buildService
from tests.support import FakeTLSTransport, UpstreamScript, makeConfig, writeUsersFile

BALANCER = IPv4Address("TCP", "10.1.2.3", 55555)
V1_TCP4 = b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 143\r\n"


def v2(command: int, familyTransport: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    block = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, familyTransport]) + struct.pack("!H", len(block)) + block


def v2TCP4(source: str, sourcePort: int, destination: str = "192.0.2.10", destinationPort: int = 993) -> bytes:
    packed = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    return v2(1, 0x11, packed + struct.pack("!HH", sourcePort, destinationPort))


def v2TCP6(source: str, sourcePort: int, destination: str = "2001:db8::10", destinationPort: int = 143) -> bytes:
    packed = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(destination).packed
    return v2(1, 0x21, packed + struct.pack("!HH", sourcePort, destinationPort))


def parse(data: bytes) -> tuple[ProxyHeader, bytes]:
    result = ProxyHeaderParser().feed(data)
    assert result is not None
    return result


def parseError(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as raised:
        ProxyHeaderParser().feed(data)
    return str(raised.value)


# -- the parser ----------------------------------------------------------------


def test_v1_tcp4_gives_source_destination_and_the_bytes_after_it() -> None:
    header, rest = parse(V1_TCP4 + b"a1 CAPABILITY\r\n")
    assert header == ProxyHeader(
        1, source=IPv4Address("TCP", "203.0.113.7", 40000), destination=IPv4Address("TCP", "192.0.2.10", 143)
    )
    assert rest == b"a1 CAPABILITY\r\n"


def test_v1_tcp6_addresses_are_normalised() -> None:
    header, rest = parse(b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::10 40000 993\r\n")
    assert header.source == IPv6Address("TCP", "2001:db8::7", 40000)
    assert header.destination == IPv6Address("TCP", "2001:db8::10", 993)
    assert rest == b""


def test_v1_unknown_has_no_addresses() -> None:
    header, rest = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nUSER x\r\n")
    assert header == ProxyHeader(1) and header.source is None
    assert rest == b"USER x\r\n"


def test_v2_proxy_tcp4_skips_tlvs() -> None:
    tlv = b"\x01\x00\x04imap"  # PP2_TYPE_ALPN
    addresses = ipaddress.IPv4Address("198.51.100.9").packed + ipaddress.IPv4Address("192.0.2.10").packed
    header, rest = parse(v2(1, 0x11, addresses + struct.pack("!HH", 1234, 993), tlv) + b"\x16\x03\x01")
    assert header == ProxyHeader(
        2, source=IPv4Address("TCP", "198.51.100.9", 1234), destination=IPv4Address("TCP", "192.0.2.10", 993)
    )
    assert rest == b"\x16\x03\x01"


def test_v2_proxy_tcp6() -> None:
    header, _ = parse(v2TCP6("2001:db8::7", 40000))
    assert header.source == IPv6Address("TCP", "2001:db8::7", 40000)
    assert header.destination == IPv6Address("TCP", "2001:db8::10", 143)


def test_v2_local_is_the_balancers_own_connection() -> None:
    header, rest = parse(v2(0, 0x00, b"") + b"a1 NOOP\r\n")
    assert header == ProxyHeader(2, local=True)
    assert rest == b"a1 NOOP\r\n"


@pytest.mark.parametrize("familyTransport", [0x00, 0x31])
def test_v2_proxy_without_ip_addresses_uses_the_real_peer(familyTransport: int) -> None:
    header, _ = parse(v2(1, familyTransport, b"\0" * (216 if familyTransport else 0)))
    assert header == ProxyHeader(2)


@pytest.mark.parametrize(
    "data", [V1_TCP4 + b"a1 NOOP\r\n", v2TCP4("203.0.113.7", 40000) + b"a1 NOOP\r\n"], ids=["v1", "v2"]
)
def test_a_header_split_into_single_octets_parses_the_same(data: bytes) -> None:
    parser = ProxyHeaderParser()
    results = [parser.feed(data[index : index + 1]) for index in range(len(data) - len(b"a1 NOOP\r\n"))]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == (parse(data)[0], b"")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a1 CAPABILITY\r\n", "no PROXY protocol header"),
        (b"PROXX TCP4", "no PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY protocol header"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b'UDP4'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields instead of 6"),
        (b"PROXY TCP4 nonsense 5.6.7.8 1 2\r\n", "invalid IPv4 address b'nonsense'"),
        (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "invalid IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "invalid IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 2\r\n", "invalid port b'abc'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "invalid port b'70000'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "does not end with CRLF"),
        (b"PROXY \xff\xfe 1.2.3.4\r\n", "protocol"),
        (V2_SIGNATURE + b"\x10\x11\x00\x0c", "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
        (v2(1, 0x12, b"\0" * 12), "unsupported address family/transport 0x12"),
        (v2(1, 0x11, b"\0" * 8), "address block of 8 octets (needs 12)"),
        (v2(1, 0x21, b"\0" * 12), "address block of 12 octets (needs 36)"),
    ],
)
def test_malformed_headers_are_errors_naming_the_problem(data: bytes, expected: str) -> None:
    assert expected in parseError(data)


def test_v1_header_without_crlf_is_refused_at_its_maximum_length() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 " + b"1" * (V1_MAX_LENGTH - 12)) is None
    with pytest.raises(ProxyHeaderError, match="without CRLF in its first 107 octets"):
        parser.feed(b"1")


def test_v2_header_announcing_too_much_is_refused_before_it_arrives() -> None:
    announced = V2_MAX_LENGTH - 16 + 1
    message = parseError(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", announced))
    assert f"at most {V2_MAX_LENGTH}" in message


def test_v2_header_of_the_maximum_length_is_accepted() -> None:
    addresses = ipaddress.IPv4Address("198.51.100.9").packed * 2 + struct.pack("!HH", 1, 2)
    padding = b"\x04" + struct.pack("!H", V2_MAX_LENGTH - 16 - len(addresses) - 3)  # PP2_TYPE_NOOP
    data = v2(1, 0x11, addresses, padding + b"\0" * (V2_MAX_LENGTH - 16 - len(addresses) - 3))
    assert len(data) == V2_MAX_LENGTH
    assert parse(data)[0].source == IPv4Address("TCP", "198.51.100.9", 1)


# -- the wrapper -----------------------------------------------------------------


class Recorder(Protocol):
    """
    Records what the wrapped protocol is told, including the peer it sees
    when connected.
    """

    def __init__(self) -> None:
        self.peerAtConnect: Any = None
        self.hostAtConnect: Any = None
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peerAtConnect = self.transport.getPeer()
        self.hostAtConnect = self.transport.getHost()
        self.transport.write(b"* OK greeting\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def wrap(
    wrapped: Factory, trusted: tuple[str, ...] = (), peer: Any = BALANCER, clock: Clock | None = None
) -> tuple[ProxyProtocolWrapper, FakeTLSTransport, Clock]:
    clock = clock or Clock()
    factory = ProxyProtocolFactory(wrapped, clock, "edge", [ipaddress.ip_network(text) for text in trusted])
    protocol = factory.buildProtocol(peer)
    assert isinstance(protocol, ProxyProtocolWrapper)
    transport = FakeTLSTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.1.2.4", 143))
    protocol.makeConnection(transport)
    return protocol, transport, clock


def recording(**kwargs: Any) -> tuple[ProxyProtocolWrapper, FakeTLSTransport, Clock, Recorder]:
    recorder = Recorder()
    protocol, transport, clock = wrap(Factory.forProtocol(lambda: recorder), **kwargs)
    return protocol, transport, clock, recorder


def messages(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


def test_wrapped_protocol_connects_after_the_header_and_sees_the_client() -> None:
    protocol, transport, _, recorder = recording()
    protocol.dataReceived(V1_TCP4[:10])
    assert recorder.peerAtConnect is None and transport.value() == b""
    protocol.dataReceived(V1_TCP4[10:] + b"a1 NOOP\r\n")
    assert recorder.peerAtConnect == IPv4Address("TCP", "203.0.113.7", 40000)
    assert recorder.hostAtConnect == IPv4Address("TCP", "192.0.2.10", 143)
    assert recorder.received == b"a1 NOOP\r\n"
    assert transport.value() == b"* OK greeting\r\n"
    protocol.dataReceived(b"a2 LOGOUT\r\n")
    assert recorder.received == b"a1 NOOP\r\na2 LOGOUT\r\n"


def test_local_command_keeps_the_real_peer() -> None:
    protocol, _, _, recorder = recording()
    protocol.dataReceived(v2(0, 0x00, b""))
    assert recorder.peerAtConnect == BALANCER
    assert recorder.hostAtConnect == IPv4Address("TCP", "10.1.2.4", 143)


def test_garbage_closes_without_greeting_and_logs_why_without_the_data() -> None:
    protocol, transport, _, recorder = recording()
    with capturedLogs() as events:
        protocol.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert transport.disconnecting and transport.value() == b""
    assert recorder.peerAtConnect is None
    assert messages(events) == [
        "10.1.2.3:55555 sent an invalid PROXY protocol header to listener edge: no PROXY protocol header "
        "(the connection began with b'a1 LO'); closing"
    ]
    protocol.connectionLost(Failure(Exception("closed")))
    assert recorder.lost is None  # never connected, never told


def test_missing_header_times_out_without_greeting() -> None:
    protocol, transport, clock, recorder = recording()
    protocol.dataReceived(b"PROXY TCP4 ")
    clock.advance(HEADER_TIMEOUT - 0.5)
    assert not transport.disconnecting
    with capturedLogs() as events:
        clock.advance(0.5)
    assert transport.disconnecting and transport.value() == b""
    assert messages(events) == ["10.1.2.3:55555 sent no PROXY protocol header to listener edge within 5.0 s; closing"]
    assert recorder.peerAtConnect is None


def test_complete_header_cancels_the_timeout() -> None:
    protocol, transport, clock, _ = recording()
    protocol.dataReceived(V1_TCP4)
    assert clock.getDelayedCalls() == []
    clock.advance(HEADER_TIMEOUT * 2)
    assert not transport.disconnecting


def test_connection_lost_before_the_header_cancels_the_timeout() -> None:
    protocol, _, clock, recorder = recording()
    protocol.connectionLost(Failure(Exception("gone")))
    assert clock.getDelayedCalls() == []
    assert recorder.lost is None


def test_connection_lost_after_the_header_reaches_the_wrapped_protocol() -> None:
    protocol, _, _, recorder = recording()
    protocol.dataReceived(V1_TCP4)
    reason = Failure(Exception("gone"))
    protocol.connectionLost(reason)
    assert recorder.lost is reason


def test_untrusted_source_is_refused_at_once() -> None:
    with capturedLogs() as events:
        _, transport, clock, recorder = recording(trusted=("192.0.2.0/24", "2001:db8::/32"))
    assert transport.disconnecting and transport.value() == b""
    assert clock.getDelayedCalls() == []
    assert messages(events) == ["10.1.2.3:55555 is not a trusted PROXY protocol source for listener edge; closing"]
    assert recorder.peerAtConnect is None


@pytest.mark.parametrize(
    "peer",
    [IPv4Address("TCP", "10.1.2.3", 1), IPv6Address("TCP", "::ffff:10.1.2.3", 1), IPv6Address("TCP", "fd00::5", 1)],
    ids=["ipv4", "ipv4-mapped", "ipv6"],
)
def test_trusted_sources_may_send_headers(peer: Any) -> None:
    protocol, transport, _, recorder = recording(trusted=("10.0.0.0/8", "fd00::/8"), peer=peer)
    assert not transport.disconnecting
    protocol.dataReceived(V1_TCP4)
    assert recorder.peerAtConnect == IPv4Address("TCP", "203.0.113.7", 40000)


# -- behind the wrapper: the real IMAP and POP3 servers -------------------------


def serverContext(tmp_path: Path, tls: TLSMode, limits: LimitsConfig | None = None) -> ServerContext:
    config = makeConfig(writeUsersFile(str(tmp_path), {"alice": "alicepw"}), limits=limits)
    listener = ListenerConfig("edge", "tcp:0", tls, certificate="x", privateKey="x", proxyProtocol=True)
    return ServerContext(config, listener, makePortal(config, inlineRunner), Clock(), UpstreamScript(), "TLS-OPTIONS")


def test_imap_greets_only_after_the_header_and_logs_the_client(tmp_path: Path) -> None:
    context = serverContext(tmp_path, TLSMode.PLAIN)
    protocol, transport, _ = wrap(IMAPServerFactory(context))
    assert transport.value() == b""
    with capturedLogs() as events:
        protocol.dataReceived(v2TCP6("2001:db8::7", 40000))
    assert transport.value().startswith(b"* OK [CAPABILITY ")
    assert "2001:db8::7:40000 connected to IMAP listener edge (tls=False)" in messages(events)
    server = protocol.wrappedProtocol
    assert server.clientAddress == "2001:db8::7:40000"  # type: ignore[attr-defined]


def test_imap_starttls_behind_the_wrapper_reaches_the_real_transport(tmp_path: Path) -> None:
    protocol, transport, _ = wrap(IMAPServerFactory(serverContext(tmp_path, TLSMode.STARTTLS)))
    protocol.dataReceived(V1_TCP4 + b"a STARTTLS\r\n")
    assert transport.value().endswith(b"a OK Begin TLS negotiation now\r\n")
    assert transport.tlsStarted == "TLS-OPTIONS"
    transport.clear()
    protocol.dataReceived(b"b CAPABILITY\r\n")
    assert b"AUTH=PLAIN" in transport.value() and b"STARTTLS" not in transport.value()


def test_pop3_stls_behind_the_wrapper_reaches_the_real_transport(tmp_path: Path) -> None:
    context = serverContext(tmp_path, TLSMode.STARTTLS)
    protocol, transport, _ = wrap(POP3ServerFactory(context, POP3Backends(UpstreamScript(), UpstreamScript())))
    protocol.dataReceived(V1_TCP4)
    assert transport.value().startswith(b"+OK ")
    transport.clear()
    protocol.dataReceived(b"STLS\r\n")
    assert transport.value().startswith(b"+OK")
    assert transport.tlsStarted == "TLS-OPTIONS"


def test_per_ip_connection_limit_counts_the_proxied_client(tmp_path: Path) -> None:
    """All connections come from one balancer; the limit applies per client behind it."""
    factory = IMAPServerFactory(serverContext(tmp_path, TLSMode.PLAIN, LimitsConfig(maxConnectionsPerIP=1)))
    greetings = []
    for header in (v2TCP4("198.51.100.1", 1000), v2TCP4("198.51.100.2", 1000), v2TCP4("198.51.100.1", 1001)):
        protocol, transport, _ = wrap(factory)
        protocol.dataReceived(header)
        greetings.append(transport.value().split(b" ", 2)[:2])
    assert greetings == [[b"*", b"OK"], [b"*", b"OK"], [b"*", b"BYE"]]


# -- wiring ------------------------------------------------------------------------


def test_service_wraps_proxy_protocol_listeners(tmp_path: Path) -> None:
    trusted = ["10.0.0.0/8"]
    document = {
        "auth": {"users_file": writeUsersFile(str(tmp_path), {"alice": "pw"})},
        "listener": [
            {"name": "lb", "endpoint": "tcp:0", "proxy_protocol": True, "proxy_protocol_trusted": trusted},
            {"name": "direct", "endpoint": "tcp:0"},
        ],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
    }
    reactor = MemoryReactorClock()
    service = buildService(parseConfig(document, str(tmp_path)), reactor)
    service.privilegedStartService()
    factories = [port[1] for port in reactor.tcpServers]
    assert isinstance(factories[0], ProxyProtocolFactory)
    assert isinstance(factories[0].wrappedFactory, IMAPServerFactory)
    assert factories[0].trusted == tuple(ipaddress.ip_network(text) for text in trusted)
    assert isinstance(factories[1], IMAPServerFactory)


def test_proxy_protocol_needs_a_trust_list(tmp_path: Path) -> None:
    """Believed from anyone, a header would let any client choose its address: the list is required."""
    document = {
        "auth": {"users_file": writeUsersFile(str(tmp_path), {"alice": "pw"})},
        "listener": [{"name": "lb", "endpoint": "tcp:0", "proxy_protocol": True}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
    }
    with pytest.raises(ConfigError, match=r"listener\[0\]\.proxy_protocol_trusted: required with proxy_protocol"):
        parseConfig(document, str(tmp_path))
