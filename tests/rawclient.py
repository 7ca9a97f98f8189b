"""
Raw-socket clients for attack tests and benchmarks: connect from any
loopback source address (all of 127/8, or ::1), read what the proxy says
line by line or from many sockets at once, send a bare ClientHello, hang up
with a reset, find the proxy's auth lines.
"""

from __future__ import annotations

import re
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable

import pytest

from tests.proxyprocess import HOST


def connectFrom(port: int, source: str = HOST, timeout: float = 10.0) -> socket.socket:
    """
    A TCP connection to C{port} on loopback from C{source} (IPv6 to ::1).
    """
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("::1" if family == socket.AF_INET6 else HOST, port))
    return sock


def readLine(sock: socket.socket) -> bytes:
    """
    The next line the proxy sends; what came of it (maybe C{b""}) if the
    connection ends or the read times out first.
    """
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def readTagged(sock: socket.socket, tag: bytes = b"a") -> bytes:
    """
    The tagged reply to C{tag}, untagged lines skipped.
    """
    while True:
        line = readLine(sock)
        if not line or line.startswith(tag + b" "):
            return line


def quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imapLogin(port: int, user: str, password: str, source: str, timeout: float = 15.0) -> bytes:
    """
    One IMAP LOGIN from C{source}; its tagged reply.
    """
    with connectFrom(port, source, timeout) as sock:
        readLine(sock)
        sock.sendall(b"a LOGIN " + quoted(user) + b" " + quoted(password) + b"\r\n")
        return readTagged(sock)


def closeAbruptly(sock: socket.socket) -> None:
    """
    Close with a RST (SO_LINGER 0).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def clientHello() -> bytes:
    """
    The first flight of a TLS client: a ClientHello, nothing after it.
    """
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def authLines(log: str, source: str, kind: str) -> list[str]:
    """
    The proxy's "authentication <kind>:" lines about C{source} in C{log}.
    """
    pattern = re.compile(rf"authentication {kind}: ip={re.escape(source)} ")
    return [line for line in log.splitlines() if pattern.search(line)]


def readEach(
    sockets: list[socket.socket], seconds: float, finished: Callable[[bytes, bool], bool]
) -> list[tuple[float, bytes] | None]:
    """
    Read all C{sockets} at once, without blocking, until each is finished
    (C{finished(everything received, whether the peer closed or reset)})
    or C{seconds} have passed; for each, when it finished
    (C{time.monotonic()}) and what it had received, or C{None}.
    """
    received = [b""] * len(sockets)
    results: list[tuple[float, bytes] | None] = [None] * len(sockets)
    selector = selectors.DefaultSelector()
    try:
        for index, sock in enumerate(sockets):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + seconds
        for _ in range(1000 * len(sockets) + 1000):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.get_map():
                break
            for key, _ in selector.select(left):
                index = key.data
                try:
                    data = sockets[index].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset, or a TLS error
                    data = b""
                received[index] += data
                if finished(received[index], not data):
                    results[index] = (time.monotonic(), received[index])
                    selector.unregister(sockets[index])
    finally:
        selector.close()
    return results


def taggedLine(received: bytes, tag: bytes = b"a") -> bytes | None:
    """
    The first complete line in C{received} tagged C{tag}, if any.
    """
    return next((line for line in received.split(b"\r\n")[:-1] if line.startswith(tag + b" ")), None)
