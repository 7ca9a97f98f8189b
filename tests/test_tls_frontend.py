"""
The listeners' TLS front end, seen by real clients of a real C{twistd}
proxy: the certificate chosen by the name a client asks for (SNI), ALPN
(C{imap} on IMAP listeners, C{pop3} on POP3 ones; any other offer is
refused, the ALPACA defence) and session resumption with tickets for TLS
1.2 and 1.3, on implicit TLS and STARTTLS/STLS listeners alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface.verify import verifyObject

from mailproxy.config import ConfigError, ListenerCertificate
from mailproxy.tls import listenerTLS, matchingContext
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy
from tests.tlssupport import (
    OPENSSL,
    TLS_LISTENERS,
    Issuer,
    Pair,
    SClient,
    TLSListener,
    answeredGoodbye,
    goodbye,
    implicitListener,
    listenerId,
    proxyConfig,
    sClient,
    served,
    servedInMemory,
    startTLS,
)
from tests.tomlconfig import arrayTable

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


@dataclass
class Proxy:
    ports: dict[str, int]
    issuer: Issuer
    pairs: dict[str, Pair]
    process: ProxyProcess

    def served(self, listener: TLSListener, serverName: str | None) -> tuple[x509.Certificate, bytes]:
        return served(self.ports[listener.name], self.issuer.caFile, serverName, listener.starttls)

    def sClient(self, listener: TLSListener, *options: str) -> SClient:
        return sClient(
            self.ports[listener.name],
            self.issuer.caFile,
            "-ign_eof",
            *options,
            starttls=listener.starttls,
            say=goodbye(listener.protocol),
        )


def listenerTable(listener: TLSListener, port: int, pairs: dict[str, Pair]) -> str:
    """
    C{listener}'s table: the default certificate, one for the names it lists
    itself and one for the names given.
    """
    return "".join(
        [
            listener.table(port, pairs["default"].certFile, pairs["default"].keyFile),
            arrayTable("listener.certificates", certificate=pairs["mail"].certFile, privateKey=pairs["mail"].keyFile),
            arrayTable(
                "listener.certificates",
                names=["pop.example.net", "*.Example.NET"],
                certificate=pairs["net"].certFile,
                privateKey=pairs["net"].keyFile,
            ),
        ]
    )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """
    One proxy with every listener of L{TLS_LISTENERS}, each with a default
    certificate (localhost), one for mail.example.test (by its own names)
    and one for pop.example.net and *.example.net.
    """
    issuer = Issuer(tmp_path_factory.mktemp("tls-frontend"))
    pairs = {
        "default": issuer.issue("default", "localhost"),
        "mail": issuer.issue("mail", "mail.example.test", "imap.example.test"),
        "net": issuer.issue("net", "pop.example.net", "*.example.net"),
    }
    ports = {listener.name: freePort() for listener in TLS_LISTENERS}
    tables = "".join(listenerTable(listener, ports[listener.name], pairs) for listener in TLS_LISTENERS)
    config = proxyConfig(tables)
    with runningProxy(config, {"alice": "alicepw"}, list(ports.values()), "mp-tls-frontend-") as (_, process):
        yield Proxy(ports, issuer, pairs, process)


# SNI.

SERVED_FOR = {
    None: "default",
    "localhost": "default",
    "mail.example.test": "mail",
    "imap.example.test": "mail",
    "MAIL.Example.TEST": "mail",
    "pop.example.net": "net",
    "webmail.example.net": "net",
    "WebMail.EXAMPLE.net": "net",
    # A wildcard stands for one label only.
    "a.b.example.net": "default",
    "example.net": "default",
    "other.example.test": "default",
    "unknown.invalid": "default",
}


@pytest.mark.parametrize("listener", TLS_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("serverName", list(SERVED_FOR), ids=str)
def test_the_certificate_is_chosen_by_the_name_the_client_asks_for(
    proxy: Proxy, listener: TLSListener, serverName: str | None
) -> None:
    """Exact names and one-label wildcards, case-insensitive, pick their certificate; no or an unknown name gets the default one."""
    certificate, line = proxy.served(listener, serverName)
    assert certificate.serial_number == proxy.pairs[SERVED_FOR[serverName]].serial, serverName
    assert line.startswith((b"* ", b"+OK")), line


@pytest.mark.parametrize(
    ("serverName", "expected"),
    [
        ("mail.example.test", "exact"),
        ("Mail.Example.Test.", "exact"),
        ("a.example.net", "exact"),
        ("x.example.net", "wildcard"),
        ("X.EXAMPLE.NET", "wildcard"),
        ("example.net", None),
        ("a.x.example.net", None),
        ("example", None),
        ("", None),
        # A wildcard's label is a DNS label: nothing else stands for one.
        ("a-1.example.net", "wildcard"),
        ("\ufffd\ufffd.example.net", None),
        ("\r\n.example.net", None),
        (".example.net", None),
        ("*.example.net", None),
        ("a b.example.net", None),
        ("under_score.example.net", None),
        (f"{'a' * 63}.example.net", "wildcard"),
        (f"{'a' * 64}.example.net", None),
    ],
)
def test_matching_context_takes_exact_names_then_one_label_wildcards(serverName: str, expected: str | None) -> None:
    """matchingContext: an exact name before a wildcard, a wildcard for the first label only, case and a final dot ignored."""
    exact, wildcard = SSL.Context(SSL.TLS_SERVER_METHOD), SSL.Context(SSL.TLS_SERVER_METHOD)
    found = matchingContext(serverName, {"mail.example.test": exact, "a.example.net": exact}, {"example.net": wildcard})
    assert found is {"exact": exact, "wildcard": wildcard, None: None}[expected]


@pytest.mark.parametrize(
    "serverName",
    [b"\xff\xfe.example.net", b"\r\n.example.net", b".example.net", b"*.example.net", b"a b.example.net"],
    ids=repr,
)
def test_a_wildcard_is_not_served_for_a_first_label_that_is_not_a_dns_label(tmp_path: Path, serverName: bytes) -> None:
    """A client naming bytes, control characters, an empty label, a * or a space before a wildcard's domain gets the default certificate."""
    issuer = Issuer(tmp_path)
    default, wildcard = issuer.issue("default", "localhost"), issuer.issue("net", "*.example.net")
    listener = implicitListener(
        default.certFile, default.keyFile, ListenerCertificate(wildcard.certFile, wildcard.keyFile)
    )
    tls = listenerTLS(listener, "listener[0]")
    assert servedInMemory(tls, b"webmail.example.net").serial_number == wildcard.serial
    assert servedInMemory(tls, serverName).serial_number == default.serial


# ALPN.


@pytest.mark.parametrize("listener", TLS_LISTENERS, ids=listenerId)
def test_alpn_with_the_listeners_protocol_is_negotiated(proxy: Proxy, listener: TLSListener) -> None:
    """Offering imap (IMAP listeners) or pop3 (POP3 listeners), alone or among others, negotiates it."""
    for offer in (listener.protocol, f"h2,{listener.protocol},http/1.1"):
        answer = proxy.sClient(listener, "-servername", "localhost", "-alpn", offer)
        assert answer.handshakeDone and answer.alpn == listener.protocol, answer.output


@pytest.mark.parametrize("listener", TLS_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("serverName", ["localhost", "mail.example.test"])
def test_alpn_without_the_listeners_protocol_is_refused_and_logged(
    proxy: Proxy, listener: TLSListener, serverName: str
) -> None:
    """A client offering only other protocols (h2, or the other mail protocol) gets a no_application_protocol alert, and it is logged (default and SNI certificates)."""
    other = "pop3" if listener.protocol == "imap" else "imap"
    for offer in ("h2", f"http/1.1,{other}"):
        before = proxy.process.log().count(f"refused on listener {listener.name}: its TLS handshake asks for")
        answer = proxy.sClient(listener, "-servername", serverName, "-alpn", offer)
        assert not answer.handshakeDone, answer.output
        assert "alert no application protocol" in answer.output, answer.output
        log = proxy.process.log()
        assert log.count(f"refused on listener {listener.name}: its TLS handshake asks for") == before + 1, log
        assert f"asks for {offer.replace(',', ', ')} (ALPN), not {listener.protocol}" in log
    assert "Traceback" not in proxy.process.log()
    # The refusals leave nothing behind: the next client is served.
    answer = proxy.sClient(listener, "-servername", serverName)
    assert answer.handshakeDone and answer.alpn is None, answer.output


def test_a_refused_alpn_offer_cannot_forge_a_log_line(proxy: Proxy) -> None:
    """The offered names are the client's: CR LF, spaces and = are logged encoded, never as a new line or field."""
    forged = "x ip=198.51.100.7\r\nauthentication failure: ip=198.51.100.7 protocol=imap user=a failures=9"
    answer = proxy.sClient(TLS_LISTENERS[0], "-servername", "localhost", "-alpn", forged)
    assert not answer.handshakeDone, answer.output
    log = proxy.process.log()
    assert "asks for x%20ip%3D198.51.100.7%0D%0Aauthentication%20failure:%20ip%3D198.51.100.7" in log
    assert "198.51.100.7 protocol=imap" not in log and "\nauthentication failure: ip=198.51.100.7" not in log


@pytest.mark.parametrize("listener", TLS_LISTENERS, ids=listenerId)
def test_a_client_offering_no_alpn_is_served(proxy: Proxy, listener: TLSListener) -> None:
    """No ALPN extension at all: the session goes ahead as before, nothing negotiated."""
    certificate, line = proxy.served(listener, "mail.example.test")
    assert line.startswith((b"* ", b"+OK"))
    answer = proxy.sClient(listener, "-servername", "mail.example.test")
    assert answer.handshakeDone and answer.alpn is None, answer.output


# Session resumption.

VERSIONS = {"tls1.2": "-tls1_2", "tls1.3": "-tls1_3"}


@pytest.mark.parametrize("listener", TLS_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("serverName", ["localhost", "webmail.example.net"])
def test_a_session_is_resumed_with_its_ticket(
    proxy: Proxy, listener: TLSListener, version: str, serverName: str, tmp_path: Path
) -> None:
    """A second connection presenting the first one's session is resumed (TLS 1.2 and 1.3, default and SNI certificates)."""
    session = str(tmp_path / "session.pem")
    options = ("-servername", serverName, VERSIONS[version])
    first = proxy.sClient(listener, *options, "-sess_out", session)
    assert first.summary is not None and first.summary.startswith(f"New, TLSv1.{version[-1]}"), first.output
    second = proxy.sClient(listener, *options, "-sess_in", session)
    assert second.reused, second.output
    assert f"TLSv1.{version[-1]}" in (second.summary or ""), second.output
    # The session goes on after the abbreviated handshake: the goodbye is answered.
    assert answeredGoodbye(listener.protocol) in second.output, second.output


# Each certificate's sessions apart: RFC 6066 section 3, a server must not
# resume a session made for another name.
SWITCHES = [
    ("mail.example.test", "localhost"),
    ("localhost", "mail.example.test"),
    ("webmail.example.net", "mail.example.test"),
    ("mail.example.test", None),
]


@pytest.mark.parametrize("listener", [TLS_LISTENERS[0], TLS_LISTENERS[3]], ids=listenerId)
@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize(("first", "second"), SWITCHES, ids=str)
def test_a_session_is_not_resumed_under_a_name_of_another_certificate(
    proxy: Proxy, listener: TLSListener, version: str, first: str, second: str | None, tmp_path: Path
) -> None:
    """A session made under one name, presented under a name another certificate is for (or none), gets a full handshake with that certificate; under its own name it is resumed."""
    session = str(tmp_path / "session.pem")
    made = proxy.sClient(listener, "-servername", first, VERSIONS[version], "-sess_out", session)
    assert made.summary is not None and made.summary.startswith("New, "), made.output
    naming = ("-servername", second) if second is not None else ("-noservername",)
    other = proxy.sClient(listener, *naming, VERSIONS[version], "-sess_in", session)
    assert other.summary is not None and other.summary.startswith(f"New, TLSv1.{version[-1]}"), other.output
    assert answeredGoodbye(listener.protocol) in other.output, other.output
    assert other.serial == proxy.pairs[SERVED_FOR[second]].serial, other.output
    same = proxy.sClient(listener, "-servername", first, VERSIONS[version], "-sess_in", session)
    assert same.reused, same.output


@pytest.mark.parametrize("listener", [TLS_LISTENERS[0], TLS_LISTENERS[1]], ids=listenerId)
@pytest.mark.parametrize("sent", ["half a client hello", "plain text"])
def test_a_client_leaving_before_its_client_hello_is_whole_leaves_nothing_behind(
    proxy: Proxy, listener: TLSListener, sent: str
) -> None:
    """Half a ClientHello then a hang-up, or plain text where the ClientHello belongs: no traceback, and the next client is served its certificate."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"mail.example.test")
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    hello = client.bio_read(65536)
    data = hello[: len(hello) // 2] if sent == "half a client hello" else b"a LOGIN alice alicepw\r\n"
    plain = startTLS(proxy.ports[listener.name], listener.protocol) if listener.starttls else None
    with plain or socket.create_connection((HOST, proxy.ports[listener.name]), timeout=10) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        # The proxy hangs up (plain text) or waits for the rest (half a hello) until the client goes.
        connection.settimeout(0.5)
        try:
            connection.recv(1024)
        except TimeoutError:
            pass
    certificate, line = proxy.served(listener, "mail.example.test")
    assert certificate.serial_number == proxy.pairs["mail"].serial and line.startswith(b"* ")
    assert "Traceback" not in proxy.process.log()


def test_an_sni_certificate_without_names_or_dns_names_is_refused(tmp_path: Path) -> None:
    """An entry with no names whose certificate lists no DNS name cannot be chosen by anyone: a ConfigError naming it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-san.example.test")])
    start, end = datetime.datetime(2025, 1, 1), datetime.datetime(3000, 1, 1)
    builder = x509.CertificateBuilder(subject, subject, key.public_key(), x509.random_serial_number(), start, end)
    certificate = builder.sign(key, hashes.SHA256())
    noNames = tmp_path / "no-san.pem"
    noNames.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    default = Issuer(tmp_path).issue("default", "localhost")
    listener = implicitListener(default.certFile, default.keyFile, ListenerCertificate(str(noNames), str(noNames)))
    with pytest.raises(ConfigError) as raised:
        listenerTLS(listener, "listener[2]")
    assert (
        str(raised.value) == "listener[2].certificates[0].names: required (the certificate has no DNS subjectAltName)"
    )
    named = dataclasses.replace(listener, certificates=(ListenerCertificate(str(noNames), str(noNames), ("x.test",)),))
    assert listenerTLS(named, "listener[2]").certificates[1].current.names == ("x.test",)


def test_server_tls_is_a_server_connection_creator(tmp_path: Path) -> None:
    """What implicit TLS (TLSMemoryBIOFactory) and STARTTLS (startTLS) are given provides IOpenSSLServerConnectionCreator."""
    pair = Issuer(tmp_path).issue("default", "localhost")
    listener = implicitListener(pair.certFile, pair.keyFile)
    tls = listenerTLS(listener, "listener[0]", 3600)
    assert verifyObject(IOpenSSLServerConnectionCreator, tls)
    connection = tls.serverConnectionForTLS(None)
    assert connection.get_context() is tls.getContext()
    assert tls.getContext().get_timeout() == 3600
