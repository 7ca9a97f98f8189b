# -*- test-case-name: tests.test_clienthello -*-
"""
The server name a TLS ClientHello asks for (SNI, RFC 6066 section 3), read
from the client's first bytes before OpenSSL sees them (sans-IO).

OpenSSL decides whether to resume a session before it tells the server
which name the client asked for, so a listener choosing its certificate by
that name must know it earlier to keep each certificate's sessions apart:
see L{mailproxy.tls}.
"""

from __future__ import annotations

import enum

# RFC 8446 section 5.1: a record carries at most 2^14 bytes; the record
# header is five bytes.
_RECORD_HEADER = 5
_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_SERVER_NAME_EXTENSION = 0
_HOST_NAME = 0
# Ordinary ClientHellos are well under 2 KiB (4 KiB with post-quantum key
# shares); beyond this much the name is not looked for.
MAX_SNIFFED = 16384


class Sniffed(enum.Enum):
    """
    What the first bytes tell so far.

    @cvar INCOMPLETE: the ClientHello is not all there yet.
    @cvar NO_NAME: the ClientHello names no server, or the bytes are not a
        ClientHello this reader understands (OpenSSL will say what they are).
    """

    INCOMPLETE = "incomplete"
    NO_NAME = "no name"


class ClientHelloReader:
    """
    Collects a client's first bytes until its ClientHello is complete.

    @ivar received: every byte fed so far, to be handed on unchanged.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        # The handshake bytes of the records read so far, and where the next
        # record starts in C{received}.
        self._handshake = bytearray()
        self._nextRecord = 0

    def feed(self, data: bytes) -> bytes | Sniffed:
        """
        Add C{data}; the server name asked for (the bytes sent), or what is
        known so far.
        """
        self.received += data
        if len(self.received) > MAX_SNIFFED:
            return Sniffed.NO_NAME
        while len(self.received) - self._nextRecord >= _RECORD_HEADER:
            start = self._nextRecord
            if self.received[start] != _HANDSHAKE_RECORD:
                return Sniffed.NO_NAME
            length = int.from_bytes(self.received[start + 3 : start + 5], "big")
            end = start + _RECORD_HEADER + length
            if len(self.received) < end:
                return Sniffed.INCOMPLETE
            self._handshake += self.received[start + _RECORD_HEADER : end]
            self._nextRecord = end
            if len(self._handshake) >= 4:
                if self._handshake[0] != _CLIENT_HELLO:
                    return Sniffed.NO_NAME
                size = int.from_bytes(self._handshake[1:4], "big")
                if len(self._handshake) >= 4 + size:
                    return serverName(bytes(self._handshake[4 : 4 + size]))
        return Sniffed.INCOMPLETE


def serverName(body: bytes) -> bytes | Sniffed:
    """
    The host name in the server_name extension of a ClientHello's C{body}.
    """
    reader = _Reader(body)
    reader.skip(2 + 32)  # legacy_version, random
    reader.skip(reader.integer(1))  # legacy_session_id
    reader.skip(reader.integer(2))  # cipher_suites
    reader.skip(reader.integer(1))  # legacy_compression_methods
    if reader.remaining() == 0 or reader.broken:
        return Sniffed.NO_NAME
    extensions = _Reader(reader.take(reader.integer(2)))
    while extensions.remaining() and not extensions.broken:
        kind = extensions.integer(2)
        data = extensions.take(extensions.integer(2))
        if kind != _SERVER_NAME_EXTENSION or extensions.broken:
            continue
        names = _Reader(data)
        names = _Reader(names.take(names.integer(2)))
        while names.remaining() and not names.broken:
            nameType = names.integer(1)
            name = names.take(names.integer(2))
            if nameType == _HOST_NAME and not names.broken and name:
                return name
        return Sniffed.NO_NAME
    return Sniffed.NO_NAME


class _Reader:
    """
    Reads length-prefixed fields; past the end it gives zeros and empty
    bytes and is C{broken}.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0
        self.broken = False

    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, count: int) -> bytes:
        if count > self.remaining():
            self.broken = True
            self._offset = len(self._data)
            return b""
        value = self._data[self._offset : self._offset + count]
        self._offset += count
        return value

    def skip(self, count: int) -> None:
        self.take(count)

    def integer(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")
