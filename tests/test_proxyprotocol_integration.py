"""
PROXY protocol listeners end to end: a load balancer played by hand-written
v1/v2 headers from Python sockets, the proxy as a real C{twistd} process, and
a private Dovecot trusting the proxy's network, so that the client address
travels load balancer -> proxy -> Dovecot (IMAP ID x-originating-ip).
"""

from __future__ import annotations

import imaplib
import ipaddress
import os
import poplib
import re
import shutil
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mailproxy.passwords import hashPassword
from mailproxy.proxyheader import V2_SIGNATURE
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort

USERS = {"carol": "carolpw", "nina": "ninapw", "pat": "patpw"}
LISTENERS = ("imap-plain", "imap-starttls", "imap-implicit", "pop3-stls", "untrusted")
TIMEOUT = 10.0

CONFIG = """
[auth]
users_file = "users"
failure_delay = 0.3

[limits]
max_connections_per_ip = 2

[[listener]]
name = "imap-plain"
endpoint = "tcp:{imap-plain}:interface=127.0.0.1"
allow_plaintext_auth = true
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.0/8"]

[[listener]]
name = "imap-starttls"
endpoint = "tcp:{imap-starttls}:interface=127.0.0.1"
tls = "starttls"
certificate = "{cert}"
private_key = "{key}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.0/8"]

[[listener]]
name = "imap-implicit"
endpoint = "tcp:{imap-implicit}:interface=127.0.0.1"
tls = "implicit"
certificate = "{cert}"
private_key = "{key}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.0/8"]

[[listener]]
name = "pop3-stls"
protocol = "pop3"
endpoint = "tcp:{pop3-stls}:interface=127.0.0.1"
tls = "starttls"
certificate = "{cert}"
private_key = "{key}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.0/8"]

[[listener]]
name = "untrusted"
endpoint = "tcp:{untrusted}:interface=127.0.0.1"
allow_plaintext_auth = true
proxy_protocol = true
proxy_protocol_trusted = ["192.0.2.0/24"]

[upstream.forwarding]
host = "127.0.0.1"
port = {imap}
forward_client_address = true

[upstream.silent]
host = "127.0.0.1"
port = {imap}

[routing]
default_upstream = "forwarding"

[routing.users.nina]
upstream = "silent"
"""


@dataclass
class Chain:
    ports: dict[str, int]
    dovecot: DovecotUpstream
    process: ProxyProcess

    def proxyLog(self) -> str:
        return self.process.log()

    def dovecotLog(self) -> str:
        with open(self.dovecot.logFile, errors="replace") as handle:
            return handle.read()

    def tlsContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.dovecot.caFile)


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    dovecot = DovecotUpstream(loginTrustedNetworks="127.0.0.0/8")
    dovecot.addUsers(USERS)
    dovecot.start()
    directory = tempfile.mkdtemp(prefix="mp-proxyproto-")
    process = None
    try:
        with open(os.path.join(directory, "users"), "w") as handle:
            for name, password in USERS.items():
                handle.write(f"{name}:{hashPassword(password, log2N=10)}\n")
        ports = {name: freePort() for name in LISTENERS}
        configPath = os.path.join(directory, "mailproxy.toml")
        with open(configPath, "w") as handle:
            config = CONFIG
            for name, value in {
                **ports,
                "cert": dovecot.certFile,
                "key": dovecot.keyFile,
                "imap": dovecot.ports["imap"],
            }.items():
                config = config.replace("{" + name + "}", str(value))
            handle.write(config)
        process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
        process.waitForPorts(list(ports.values()))
        yield Chain(ports, dovecot, process)
    finally:
        if process is not None:
            process.stop()
        dovecot.stop()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(dovecot.baseDir, ignore_errors=True)


# -- the load balancer's part ------------------------------------------------------


def v1(source: str, sourcePort: int, destinationPort: int = 143) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "2001:db8::1" if family == "TCP6" else "192.0.2.1"
    return f"PROXY {family} {source} {destination} {sourcePort} {destinationPort}\r\n".encode()


def v2(source: str, sourcePort: int, destinationPort: int = 143) -> bytes:
    address = ipaddress.ip_address(source)
    destination = ipaddress.ip_address("2001:db8::1" if address.version == 6 else "192.0.2.1")
    block = address.packed + destination.packed + struct.pack("!HH", sourcePort, destinationPort)
    familyTransport = 0x21 if address.version == 6 else 0x11
    return V2_SIGNATURE + bytes([0x21, familyTransport]) + struct.pack("!H", len(block)) + block


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


class ProxiedIMAP4(imaplib.IMAP4):
    """
    imaplib sending a PROXY header first, as a load balancer would.
    """

    def __init__(self, port: int, header: bytes) -> None:
        self.header = header
        super().__init__(HOST, port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = super()._create_socket(timeout)
        sock.sendall(self.header)
        return sock


class ProxiedIMAP4_SSL(imaplib.IMAP4_SSL):
    """
    The header in cleartext, then the TLS handshake (HAProxy's order).
    """

    def __init__(self, port: int, header: bytes, context: ssl.SSLContext) -> None:
        self.header = header
        super().__init__(HOST, port, ssl_context=context, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = imaplib.IMAP4._create_socket(self, timeout)
        sock.sendall(self.header)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class ProxiedPOP3(poplib.POP3):
    def __init__(self, port: int, header: bytes) -> None:
        self.header = header
        super().__init__(HOST, port, timeout=TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = super()._create_socket(timeout)  # type: ignore[misc]
        sock.sendall(self.header)
        return sock


def rawConnection(port: int, header: bytes) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((HOST, 0))
    try:
        sock.connect((HOST, port))
        sock.sendall(header)
    except (ConnectionResetError, BrokenPipeError):
        pass  # refused at once: the proxy does not wait for a peer it will not serve
    return sock


def readLine(sock: socket.socket) -> bytes:
    """
    The first line the server sends, or C{b""} if it closes (or aborts:
    a peer that is refused is not waited for) first.
    """
    data = b""
    while b"\n" not in data:
        try:
            chunk = sock.recv(4096)
        except OSError:  # reset, or never connected (reset during the handshake)
            break
        if not chunk:
            break
        data += chunk
    return data


def waitFor(read: Callable[[], str], pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
    """
    Wait (bounded) until C{pattern} matches a log; the logs are written
    asynchronously by other processes.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        found = re.search(pattern, text, re.MULTILINE)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not found within {timeout} s in:\n{text[-3000:]}")
        time.sleep(0.05)


def dovecotLogin(user: str) -> str:
    return rf"Login: user=<{user}>, method=\S+, rip=([0-9a-f.:]+), lip=([0-9a-f.:]+)"


def loginIMAP(client: imaplib.IMAP4, user: str) -> None:
    client.login(user, USERS[user])
    assert client.select("INBOX")[0] == "OK"
    client.logout()


# -- tests --------------------------------------------------------------------------


def test_v1_on_plain_imap_reaches_dovecot_as_the_client(chain: Chain) -> None:
    loginIMAP(ProxiedIMAP4(chain.ports["imap-plain"], v1("203.0.113.7", 40001)), "carol")
    waitFor(chain.proxyLog, r"203\.0\.113\.7:40001 connected to IMAP listener imap-plain \(tls=False\)")
    waitFor(chain.proxyLog, r"203\.0\.113\.7:40001 logged in as carol")
    login = waitFor(chain.dovecotLog, dovecotLogin("carol").replace(r"([0-9a-f.:]+), lip", r"203\.0\.113\.7, lip"))
    # x-connected-ip: where the client connected, the balancer's destination.
    assert login.group(1) == "192.0.2.1"


def test_v2_ipv6_client_with_starttls(chain: Chain) -> None:
    client = ProxiedIMAP4(chain.ports["imap-starttls"], v2("2001:db8::77", 40002))
    client.starttls(chain.tlsContext())
    loginIMAP(client, "carol")
    waitFor(chain.proxyLog, r"2001:db8::77:40002 connected to IMAP listener imap-starttls \(tls=False\)")
    waitFor(chain.dovecotLog, dovecotLogin("carol").replace(r"([0-9a-f.:]+), lip", r"2001:db8::77, lip"))


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_implicit_tls_after_a_cleartext_header(chain: Chain, header: Callable[[str, int], bytes]) -> None:
    host = "198.51.100.3" if header is v1 else "198.51.100.4"
    loginIMAP(ProxiedIMAP4_SSL(chain.ports["imap-implicit"], header(host, 40003), chain.tlsContext()), "carol")
    waitFor(chain.proxyLog, rf"{re.escape(host)}:40003 connected to IMAP listener imap-implicit \(tls=True\)")
    waitFor(chain.dovecotLog, dovecotLogin("carol").replace(r"([0-9a-f.:]+), lip", re.escape(host) + ", lip"))


def test_pop3_stls_bridge_forwards_the_client_too(chain: Chain) -> None:
    client = ProxiedPOP3(chain.ports["pop3-stls"], v2("192.0.2.44", 40005))
    client.stls(chain.tlsContext())
    client.user("pat")
    client.pass_(USERS["pat"])
    assert client.stat() == (0, 0)
    client.quit()
    waitFor(chain.proxyLog, r"192\.0\.2\.44:40005 connected to POP3 listener pop3-stls \(tls=False\)")
    waitFor(chain.dovecotLog, dovecotLogin("pat").replace(r"([0-9a-f.:]+), lip", r"192\.0\.2\.44, lip"))


def test_upstream_without_forwarding_sees_the_proxy(chain: Chain) -> None:
    loginIMAP(ProxiedIMAP4(chain.ports["imap-plain"], v1("203.0.113.99", 40006)), "nina")
    waitFor(chain.proxyLog, r"203\.0\.113\.99:40006 logged in as nina")
    assert waitFor(chain.dovecotLog, dovecotLogin("nina")).group(1) == "127.0.0.1"


def test_local_command_is_served_as_the_balancer_itself_and_logged_quietly(chain: Chain) -> None:
    """A LOCAL header (a health check) is greeted; its connecting and closing are no info lines, what it says is."""
    with rawConnection(chain.ports["imap-plain"], V2_LOCAL) as sock:
        assert readLine(sock).startswith(b"* OK [CAPABILITY ")
        localPort = sock.getsockname()[1]
    with rawConnection(chain.ports["imap-plain"], V2_LOCAL + b"a LOGIN nobody wrong\r\n") as sock:
        assert readLine(sock).startswith(b"* OK [CAPABILITY ")
        assert readLine(sock).startswith(b"a NO ")
        talkingPort = sock.getsockname()[1]
    waitFor(chain.proxyLog, r"authentication failure: ip=127\.0\.0\.1 .*user=nobody")
    # A client after them: once its line is in the log, theirs would be too.
    with rawConnection(chain.ports["imap-plain"], v1("203.0.113.98", 40098)) as sock:
        assert readLine(sock).startswith(b"* OK [CAPABILITY ")
    waitFor(chain.proxyLog, r"203\.0\.113\.98:40098 disconnected")
    for port in (localPort, talkingPort):
        assert not re.search(rf"127\.0\.0\.1:{port} (connected|disconnected)", chain.proxyLog())


def test_a_client_without_header_is_closed_without_greeting(chain: Chain) -> None:
    with rawConnection(chain.ports["imap-plain"], b"a1 CAPABILITY\r\n") as sock:
        assert readLine(sock) == b""
        localPort = sock.getsockname()[1]
    waitFor(
        chain.proxyLog,
        rf"127\.0\.0\.1:{localPort} sent an invalid PROXY protocol header to listener imap-plain: "
        r"no PROXY protocol header",
    )


def test_untrusted_balancer_is_refused(chain: Chain) -> None:
    with rawConnection(chain.ports["untrusted"], v1("203.0.113.7", 40007)) as sock:
        assert readLine(sock) == b""
        localPort = sock.getsockname()[1]
    waitFor(chain.proxyLog, rf"127\.0\.0\.1:{localPort} is not a trusted PROXY protocol source for listener untrusted")


def test_per_ip_limit_applies_to_the_client_behind_the_balancer(chain: Chain) -> None:
    """max_connections_per_ip = 2; every connection comes from 127.0.0.1."""
    sockets: list[socket.socket] = []
    try:
        greetings: list[Any] = []
        for source in ("198.51.100.50", "198.51.100.50", "198.51.100.50", "198.51.100.51"):
            sockets.append(rawConnection(chain.ports["imap-plain"], v2(source, 1000 + len(sockets))))
            greetings.append(readLine(sockets[-1]).split(b" ", 2)[:3])
        assert greetings == [
            [b"*", b"OK", greetings[0][2]],
            [b"*", b"OK", greetings[1][2]],
            [b"*", b"BYE", b"[UNAVAILABLE] too many connections from your address, try again later\r\n"],
            [b"*", b"OK", greetings[3][2]],
        ]
    finally:
        for sock in sockets:
            sock.close()
