"""
Telling an IMAP upstream the client's address (ID x-originating-ip) before
login, driven in memory; and the configuration keys of PROXY protocol
listeners and address forwarding.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailproxy.addresses import ClientAddress, clientAddressOf
from mailproxy.config import ConfigError, TLSMode, UpstreamConfig, parseConfig
from mailproxy.imap.upstream import UpstreamIMAPProtocol, UpstreamSession, _loginHandshake, clientIdCommand
from mailproxy.stepdeadline import StepDeadline
from tests.support import FakeTLSTransport

# The client's address, and the one it connected to (the listener's, or a
# load balancer's destination).
CLIENT = ClientAddress("203.0.113.7:40000", "10.0.0.5:993")
EXPECTED_ID = (
    b'mp1 ID ("x-originating-ip" "203.0.113.7" "x-originating-port" "40000" '
    b'"x-connected-ip" "10.0.0.5" "x-connected-port" "993")\r\n'
)
GREETING = b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN] ready\r\n"


class Handshake:
    def __init__(self, clientAddress: str = CLIENT, *, forward: bool = True, tls: TLSMode = TLSMode.PLAIN):
        self.protocol = UpstreamIMAPProtocol()
        self.transport = FakeTLSTransport(hostAddress=IPv4Address("TCP", "10.0.0.9", 51000))
        self.protocol.makeConnection(self.transport)
        upstream = UpstreamConfig("main", "imap.example", 143, tls, connectTimeout=5, forwardClientAddress=forward)
        self.result: Deferred[UpstreamSession] = Deferred.fromCoroutine(
            _loginHandshake(self.protocol, upstream, "alice", "pw", clientAddress, StepDeadline(Clock(), 5))
        )

    def receive(self, data: bytes) -> bytes:
        """
        Feed the upstream's C{data}; return what the proxy sent in reply.
        """
        self.protocol.dataReceived(data)
        sent: bytes = self.transport.value()
        self.transport.clear()
        return sent


def test_id_with_the_client_address_goes_before_the_login() -> None:
    handshake = Handshake()
    assert handshake.receive(GREETING) == EXPECTED_ID
    sent = handshake.receive(b'* ID ("name" "Dovecot")\r\nmp1 OK ID completed\r\n')
    assert sent.startswith(b"mp2 AUTHENTICATE PLAIN ")


def test_without_the_option_no_id_is_sent() -> None:
    handshake = Handshake(forward=False)
    assert handshake.receive(GREETING).startswith(b"mp1 AUTHENTICATE PLAIN ")


def test_with_starttls_the_id_goes_only_over_tls() -> None:
    handshake = Handshake(tls=TLSMode.STARTTLS)
    assert handshake.receive(b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED] ready\r\n") == b"mp1 STARTTLS\r\n"
    assert handshake.receive(b"mp1 OK Begin TLS\r\n") == b"mp2 CAPABILITY\r\n"
    assert handshake.transport.tlsStarted is not None
    sent = handshake.receive(b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\nmp2 OK done\r\n")
    assert sent.startswith(b'mp3 ID ("x-originating-ip" "203.0.113.7" ')


def test_a_refused_id_is_logged_and_the_login_goes_ahead() -> None:
    handshake = Handshake()
    handshake.receive(GREETING)
    with capturedLogs() as events:
        sent = handshake.receive(b"mp1 BAD unknown command\r\n")
    assert sent.startswith(b"mp2 AUTHENTICATE PLAIN ")
    assert [formatEvent(event) for event in events] == [
        "upstream main refused the client address: mp1 BAD unknown command"
    ]


def test_an_upstream_without_id_gets_no_id_and_a_warning() -> None:
    handshake = Handshake()
    with capturedLogs() as events:
        sent = handshake.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
    assert sent.startswith(b"mp1 AUTHENTICATE PLAIN")
    assert [formatEvent(event) for event in events] == [
        "upstream main does not offer ID; the client address is not forwarded"
    ]


@pytest.mark.parametrize(
    ("client", "originating"),
    [
        ("2001:db8::7:40000", b'"x-originating-ip" "2001:db8::7" "x-originating-port" "40000"'),
        ("::ffff:198.51.100.4:40000", b'"x-originating-ip" "198.51.100.4" "x-originating-port" "40000"'),
        ("198.51.100.4:1", b'"x-originating-ip" "198.51.100.4" "x-originating-port" "1"'),
    ],
)
def test_client_addresses_are_split_at_the_last_colon(client: str, originating: bytes) -> None:
    command = clientIdCommand(ClientAddress(client, "::1:143"))
    assert command == b"ID (" + originating + b' "x-connected-ip" "::1" "x-connected-port" "143")'


def test_without_a_known_connected_address_only_the_client_is_sent() -> None:
    assert clientIdCommand("203.0.113.7:40000") == b'ID ("x-originating-ip" "203.0.113.7" "x-originating-port" "40000")'


def test_the_connected_address_is_the_one_the_client_used() -> None:
    """Not the proxy's own address towards the upstream: the listener's (or the balancer's destination)."""
    transport = FakeTLSTransport(
        peerAddress=IPv4Address("TCP", "203.0.113.7", 40000), hostAddress=IPv4Address("TCP", "192.0.2.10", 993)
    )
    assert clientAddressOf(transport).connected == "192.0.2.10:993"


@pytest.mark.parametrize("client", ["?", "/run/mailproxy.sock:", "example.test:143", "203.0.113.7:", ""])
def test_addresses_that_are_not_ip_and_port_are_not_forwarded(client: str) -> None:
    assert clientIdCommand(ClientAddress(client, "10.0.0.5:993")) is None


def test_a_non_ip_client_is_logged_and_logged_in_without_id() -> None:
    handshake = Handshake("?:")
    with capturedLogs() as events:
        sent = handshake.receive(GREETING)
    assert sent.startswith(b"mp1 AUTHENTICATE PLAIN")
    assert [formatEvent(event) for event in events] == [
        "upstream main: client address '?:' is not forwarded (not an IP address)"
    ]


# -- configuration -------------------------------------------------------------


def document(listener: dict[str, Any], upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "auth": {"users_file": "users"},
        "listener": [{"name": "edge", "endpoint": "tcp:143", **listener}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143, **(upstream or {})}},
    }


def test_listener_proxy_protocol_keys(tmp_path: Path) -> None:
    config = parseConfig(
        document({"proxy_protocol": True, "proxy_protocol_trusted": ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]}),
        str(tmp_path),
    )
    listener = config.listeners[0]
    assert listener.proxyProtocol is True
    assert listener.proxyProtocolTrusted == tuple(
        ipaddress.ip_network(text) for text in ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")
    )


def test_proxy_protocol_is_off_by_default(tmp_path: Path) -> None:
    config = parseConfig(document({}), str(tmp_path))
    assert config.listeners[0].proxyProtocol is False
    assert config.upstreams["main"].forwardClientAddress is False


@pytest.mark.parametrize(
    ("listener", "upstream", "message"),
    [
        ({"proxy_protocol": "yes"}, {}, "listener[0].proxy_protocol: must be true or false"),
        (
            {"proxy_protocol": True, "proxy_protocol_trusted": ["10.0.0.1/8"]},
            {},
            "listener[0].proxy_protocol_trusted: 10.0.0.1/8 has host bits set",
        ),
        (
            {"proxy_protocol": True, "proxy_protocol_trusted": ["lb.example"]},
            {},
            "listener[0].proxy_protocol_trusted: 'lb.example' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            {"proxy_protocol_trusted": ["10.0.0.0/8"]},
            {},
            "listener[0].proxy_protocol_trusted: needs proxy_protocol = true",
        ),
        ({}, {"forward_client_address": 1}, "upstream.main.forward_client_address: must be true or false"),
        (
            {},
            {"forward_client_address": True, "protocol": "pop3"},
            "upstream.main.forward_client_address: only for IMAP upstreams (sent with IMAP ID)",
        ),
    ],
)
def test_invalid_keys_are_config_errors_naming_them(
    tmp_path: Path, listener: dict[str, Any], upstream: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parseConfig(document(listener, upstream), str(tmp_path))
    assert str(raised.value) == message
