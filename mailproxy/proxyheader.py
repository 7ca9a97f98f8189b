# -*- test-case-name: tests.test_proxyprotocol -*-
"""
A sans-IO parser for the PROXY protocol header (HAProxy's
proxy-protocol.txt, versions 1 and 2) that a load balancer sends before
the client's own bytes.

Twisted has parsers in C{twisted.protocols.haproxy}, but they are private
and cannot be fed a version 2 header in pieces (under 16 octets raises),
let a non-numeric version 1 port escape as C{ValueError}, and accept any
text as an address; this one checks every field and never needs more than
L{V1_MAX_LENGTH} or L{V2_MAX_LENGTH} octets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# "PROXY TCP6 <39> <39> 65535 65535\r\n" is the longest version 1 header.
V1_MAX_LENGTH = 107
# The fixed part, addresses (216 octets for AF_UNIX) and TLVs such as the
# ones cloud load balancers add; anything longer is not a real header.
V2_MAX_LENGTH = 16 + 2048

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# family << 4 | transport: (address length, address class) for TCP.
_V2_TCP_FAMILIES: dict[int, tuple[int, type[IPv4Address] | type[IPv6Address]]] = {
    0x11: (4, IPv4Address),
    0x21: (16, IPv6Address),
}
# UNSPEC, and AF_UNIX stream: no usable client address; use the real peer.
_V2_ADDRESSLESS = frozenset({0x00, 0x31})

ProxiedAddress = IPv4Address | IPv6Address


class ProxyHeaderError(Exception):
    """
    The connection did not start with a valid PROXY protocol header; the
    message says what was wrong.
    """


@dataclass(frozen=True)
class ProxyHeader:
    """
    A parsed header.

    @ivar version: 1 or 2.
    @ivar local: C{True} for a version 2 LOCAL command (the load balancer's
        own connection, e.g. a health check).
    @ivar source: the client's address, or C{None} (LOCAL, C{UNKNOWN},
        AF_UNSPEC, AF_UNIX) when the real peer address is to be used.
    @ivar destination: the address the client connected to, or C{None}.
    """

    version: int
    local: bool = False
    source: ProxiedAddress | None = None
    destination: ProxiedAddress | None = None


class ProxyHeaderParser:
    """
    Feed the first octets of a connection until L{feed} returns the header
    and whatever followed it.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add C{data}.

        @return: C{None} while the header is incomplete, then the header
            and the octets after it (the client's own data).
        @raise ProxyHeaderError: if the data cannot start a valid header.
        """
        self._buffer += data
        buffer = self._buffer
        if not buffer:
            return None
        if buffer[:1] == V2_SIGNATURE[:1]:
            return self._feedV2(buffer)
        if buffer[:1] == V1_PREFIX[:1]:
            return self._feedV1(buffer)
        raise _missing(buffer)

    def _feedV1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V1_PREFIX[: len(buffer)]):
            raise _missing(buffer)
        end = buffer.find(b"\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"version 1 header without CRLF in its first {V1_MAX_LENGTH} octets")
            return None
        if end == 0 or buffer[end - 1 : end] != b"\r":
            raise ProxyHeaderError("version 1 header does not end with CRLF")
        return _parseV1(buffer[: end - 1]), buffer[end + 1 :]

    def _feedV2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V2_SIGNATURE[: len(buffer)]):
            raise _missing(buffer)
        if len(buffer) < 16:
            return None
        versionCommand = buffer[12]
        if versionCommand >> 4 != 2:
            raise ProxyHeaderError(f"version 2 signature with version {versionCommand >> 4}")
        command = versionCommand & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"version 2 header with unknown command {command}")
        length = 16 + int.from_bytes(buffer[14:16], "big")
        if length > V2_MAX_LENGTH:
            raise ProxyHeaderError(f"version 2 header of {length} octets (at most {V2_MAX_LENGTH})")
        if len(buffer) < length:
            return None
        rest = buffer[length:]
        if command == _V2_LOCAL:
            return ProxyHeader(2, local=True), rest
        return _parseV2Addresses(buffer[13], buffer[16:length]), rest


def _missing(buffer: bytes) -> ProxyHeaderError:
    # Only a few octets: enough to tell a TLS handshake or a command from a
    # header, never a password (POP3 "PASS " is five).
    return ProxyHeaderError(f"no PROXY protocol header (the connection began with {buffer[:5]!r})")


def _parseV1(line: bytes) -> ProxyHeader:
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # The balancer could not tell (e.g. a non-TCP client); the rest of
        # the line carries nothing to rely on.
        return ProxyHeader(1)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"version 1 header with protocol {protocol[:16]!r} (expected TCP4, TCP6 or UNKNOWN)")
    if len(fields) != 6:
        raise ProxyHeaderError(f"version 1 {protocol.decode()} header with {len(fields)} fields instead of 6")
    _, _, source, destination, sourcePort, destinationPort = fields
    version = 4 if protocol == b"TCP4" else 6
    return ProxyHeader(
        1,
        source=_v1Address(version, source, sourcePort),
        destination=_v1Address(version, destination, destinationPort),
    )


def _v1Address(version: int, host: bytes, port: bytes) -> ProxiedAddress:
    try:
        text = host.decode("ascii")
        parsed = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"version 1 header with invalid IPv{version} address {host[:40]!r}") from None
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ProxyHeaderError(f"version 1 header with invalid port {port[:8]!r}")
    addressClass = IPv4Address if version == 4 else IPv6Address
    return addressClass("TCP", str(parsed), int(port))


def _parseV2Addresses(familyTransport: int, block: bytes) -> ProxyHeader:
    if familyTransport in _V2_ADDRESSLESS:
        return ProxyHeader(2)
    if familyTransport not in _V2_TCP_FAMILIES:
        raise ProxyHeaderError(f"version 2 header with unsupported address family/transport 0x{familyTransport:02x}")
    size, addressClass = _V2_TCP_FAMILIES[familyTransport]
    if len(block) < 2 * size + 4:
        raise ProxyHeaderError(f"version 2 address block of {len(block)} octets (needs {2 * size + 4})")
    source = ipaddress.ip_address(block[:size])
    destination = ipaddress.ip_address(block[size : 2 * size])
    sourcePort = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    destinationPort = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    # TLVs after the addresses (SSL details, unique ids) are not needed.
    return ProxyHeader(
        2,
        source=addressClass("TCP", str(source), sourcePort),
        destination=addressClass("TCP", str(destination), destinationPort),
    )
