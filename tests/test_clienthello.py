"""
Reading the server name from a client's first TLS bytes, before OpenSSL
sees them: real ClientHellos from OpenSSL, however the bytes arrive, and
bytes that are not one.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from mailproxy.clienthello import MAX_SNIFFED, ClientHelloReader, Sniffed, serverName


def clientHello(name: bytes | None, maximum: int = SSL.TLS1_3_VERSION) -> bytes:
    """
    The records of the ClientHello OpenSSL sends naming C{name}.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(maximum)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if name is not None:
        client.set_tlsext_host_name(name)
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    return client.bio_read(65536)


def refragmented(records: bytes, size: int) -> bytes:
    """
    The same handshake bytes in records of at most C{size} bytes.
    """
    handshake = b""
    while records:
        length = int.from_bytes(records[3:5], "big")
        handshake += records[5 : 5 + length]
        records = records[5 + length :]
    chunks = [handshake[index : index + size] for index in range(0, len(handshake), size)]
    return b"".join(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk for chunk in chunks)


@pytest.mark.parametrize("maximum", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("name", [b"mail.example.test", b"\xff\xfe.example.net", b"x"])
def test_the_name_a_client_hello_asks_for_is_read(name: bytes, maximum: int) -> None:
    """Fed at once, the ClientHello of a TLS 1.2 or 1.3 client gives the name as sent, whatever its bytes."""
    assert ClientHelloReader().feed(clientHello(name, maximum)) == name


def test_a_client_hello_fed_byte_by_byte_is_incomplete_until_its_last_byte() -> None:
    """Every prefix is incomplete; the last byte gives the name."""
    hello = clientHello(b"mail.example.test")
    reader = ClientHelloReader()
    for index in range(len(hello) - 1):
        assert reader.feed(hello[index : index + 1]) is Sniffed.INCOMPLETE, index
    assert reader.feed(hello[-1:]) == b"mail.example.test"
    assert bytes(reader.received) == hello


@pytest.mark.parametrize("size", [1, 3, 100])
def test_a_client_hello_split_over_several_records_is_read(size: int) -> None:
    """The handshake message in records of 1, 3 or 100 bytes: the name is read once the last one is in."""
    records = refragmented(clientHello(b"imap.example.net"), size)
    reader = ClientHelloReader()
    assert reader.feed(records[:-1]) is Sniffed.INCOMPLETE
    assert reader.feed(records[-1:]) == b"imap.example.net"


def test_a_client_hello_without_a_name_gives_none() -> None:
    """No server_name extension: no name."""
    assert ClientHelloReader().feed(clientHello(None)) is Sniffed.NO_NAME


@pytest.mark.parametrize(
    "data",
    [
        b"a LOGIN alice secret\r\n",
        # An alert record, a ServerHello, an SSLv2-style hello.
        b"\x15\x03\x03\x00\x02\x02\x28",
        b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",
        b"\x80\x2e\x01\x03\x01",
    ],
    ids=["plain text", "alert", "server hello", "sslv2"],
)
def test_bytes_that_are_not_a_client_hello_give_no_name_at_once(data: bytes) -> None:
    """Whatever is not a ClientHello is left to OpenSSL as soon as that is known."""
    assert ClientHelloReader().feed(data) is Sniffed.NO_NAME


def test_a_client_hello_with_lengths_past_its_end_gives_no_name() -> None:
    """Lengths that do not fit the message (a forged or garbled hello) give no name and raise nothing."""
    hello = clientHello(b"mail.example.test", SSL.TLS1_2_VERSION)
    body = hello[9:]
    for cut in range(0, len(body), 7):
        # The message cut short at every point: its lengths overrun.
        assert serverName(body[:cut]) in (Sniffed.NO_NAME, b"mail.example.test"), cut
    assert serverName(b"\xff" * 200) is Sniffed.NO_NAME


def test_an_endless_handshake_is_not_collected_past_the_limit() -> None:
    """A handshake message announced as 16 MiB: no name once more than MAX_SNIFFED bytes have come."""
    reader = ClientHelloReader()
    assert reader.feed(b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff") is Sniffed.INCOMPLETE
    chunk = b"\x00" * 1000
    results = [reader.feed(chunk) for _ in range(MAX_SNIFFED // len(chunk) + 1)]
    assert results[-1] is Sniffed.NO_NAME
    assert results.index(Sniffed.NO_NAME) == MAX_SNIFFED // len(chunk)
