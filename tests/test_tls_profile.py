"""
The listeners' TLS profile, seen by real clients of a real C{twistd}
proxy: by default TLS 1.2 and 1.3 only, and in TLS 1.2 only ECDHE key
exchange with AEAD ciphers (Mozilla "intermediate" without DHE), on implicit
TLS and STARTTLS/STLS listeners alike; C{tls_min_version} and
C{tls_ciphers} narrow it per listener; a bad value stops start-up with one
line naming the key.

Handshakes are made with C{openssl s_client}.  Every refused offer is first
shown to be accepted by a permissive control server (TLS 1.0 and up, every
suite, SECLEVEL 0), so the client really offers what the test says; the
proxy must then answer it with a TLS alert and negotiate nothing.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from mailproxy.config import INTERMEDIATE_CIPHERS, ConfigError, TLSMode, UpstreamConfig
from mailproxy.tls import ServerTLS, listenerTLS, upstreamOptions
from tests.proxyprocess import HOST, freePort, runningProxy
from tests.tlssupport import (
    STARTUP_TIMEOUT,
    TLS_LISTENERS,
    Exit,
    Startup,
    TLSListener,
    assertStoppedWithOneLine,
    implicitListener,
    listenerId,
    proxyConfig,
)

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")

CLIENT_TIMEOUT = 10.0

# TLS 1.2 suites of the default profile an RSA certificate can use.
PROFILE_RSA_SUITES = ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305")
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256")
CUSTOM_SUITE = "ECDHE-RSA-AES256-GCM-SHA384"

# What the server answers a refused offer with (s_client prints the alert).
PROTOCOL_VERSION_ALERT = "alert protocol version"
HANDSHAKE_FAILURE_ALERT = "alert handshake failure"

# RFC 7919 ffdhe2048, so the control server can do DHE suites.
FFDHE2048 = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


LISTENERS = (
    *TLS_LISTENERS,
    TLSListener("imaps-tls13", "imap", "implicit", {"tlsMinVersion": "1.3"}),
    TLSListener("imap-tls13", "imap", "starttls", {"tlsMinVersion": "1.3"}),
    TLSListener("imaps-custom", "imap", "implicit", {"tlsCiphers": CUSTOM_SUITE}),
    TLSListener("imap-custom", "imap", "starttls", {"tlsCiphers": CUSTOM_SUITE}),
)
DEFAULT_LISTENERS = [listener for listener in LISTENERS if not listener.settings]
TLS13_LISTENERS = [listener for listener in LISTENERS if "tlsMinVersion" in listener.settings]
CUSTOM_LISTENERS = [listener for listener in LISTENERS if "tlsCiphers" in listener.settings]


@dataclass(frozen=True)
class Certificate:
    caFile: str
    certFile: str
    keyFile: str


@dataclass(frozen=True)
class Handshake:
    """
    What one C{s_client} run negotiated (C{None}s when nothing was).
    """

    protocol: str | None
    cipher: str | None
    verified: bool
    output: str

    @property
    def refused(self) -> bool:
        return self.protocol is None and self.cipher is None


def sClient(certificate: Certificate, port: int, options: tuple[str, ...], starttls: str | None = None) -> Handshake:
    """
    Run C{openssl s_client} against C{port} (its stdin empty, so it hangs
    up right after the handshake) and read what it negotiated.
    """
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost"]
    command += ["-CAfile", certificate.caFile, *options]
    if starttls is not None:
        command += ["-starttls", starttls]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    output = f"$ {' '.join(command)}\n{result.stdout}{result.stderr}"
    summary = re.search(r"^New, (\S+), Cipher is (\S+)$", result.stdout, re.MULTILINE)
    assert summary is not None, f"s_client did not get to a handshake:\n{output}"
    protocol, cipher = summary.groups()
    # The session block has the version in use ("New, ..." gives the
    # suite's: TLSv1.0 for a TLS 1.1 session); a TLS 1.3 client hanging up
    # at once prints no session block.
    session = re.search(r"^\s+Protocol\s+: (\S+)$", result.stdout, re.MULTILINE)
    if session is not None and cipher != "(NONE)":
        protocol = session.group(1)
    return Handshake(
        None if protocol == "(NONE)" else protocol,
        None if cipher == "(NONE)" else cipher,
        "Verify return code: 0 (ok)" in result.stdout,
        output,
    )


class ControlServer:
    """
    A TLS server on 127.0.0.1 accepting TLS 1.0 to 1.3 and every suite
    (SECLEVEL 0, DHE included), so a test can show that the client really
    makes the offer the proxy refuses.
    """

    def __init__(self, certificate: Certificate, directory: Path) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._context.minimum_version = ssl.TLSVersion.TLSv1
        self._context.set_ciphers("ALL:@SECLEVEL=0")
        self._context.load_cert_chain(certificate.certFile, certificate.keyFile)
        dhFile = directory / "ffdhe2048.pem"
        dhFile.write_text(FFDHE2048)
        self._context.load_dh_params(str(dhFile))
        self._listening = socket.create_server((HOST, 0))
        self._listening.settimeout(0.1)
        self.port = int(self._listening.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listening.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(CLIENT_TIMEOUT)
            try:
                with self._context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"* OK control\r\n")
            except OSError:
                pass
            finally:
                connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listening.close()


@dataclass
class Proxy:
    ports: dict[str, int]
    certificate: Certificate
    control: ControlServer
    controlled: dict[tuple[str, ...], Handshake] = field(default_factory=dict)

    def handshake(self, listener: TLSListener, *options: str) -> Handshake:
        return sClient(self.certificate, self.ports[listener.name], options, listener.starttls)

    def controlHandshake(self, *options: str) -> Handshake:
        """
        The control server's handshake for C{options} (once per offer).
        """
        if options not in self.controlled:
            self.controlled[options] = sClient(self.certificate, self.control.port, options)
        return self.controlled[options]

    def assertRefused(self, listener: TLSListener, options: tuple[str, ...], alert: str, control: str) -> None:
        """
        The control server negotiates C{options} as C{control} (the
        protocol, then the suite if it is given after a space); the
        C{listener} answers it with C{alert} and negotiates nothing.
        """
        offered = self.controlHandshake(*options)
        protocol, _, suite = control.partition(" ")
        assert offered.protocol == protocol, offered.output
        assert offered.cipher is not None and suite in ("", offered.cipher), offered.output
        answer = self.handshake(listener, *options)
        assert answer.refused, answer.output
        assert alert in answer.output, answer.output


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """
    An RSA certificate for localhost (the ECDHE-RSA suites need one) and its
    throw-away CA.
    """
    directory = tmp_path_factory.mktemp("tls-profile-certificate")
    authority = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = authority.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    files = Certificate(str(directory / "ca.pem"), str(directory / "cert.pem"), str(directory / "key.pem"))
    authority.cert_pem.write_to_path(files.caFile)
    leaf.cert_chain_pems[0].write_to_path(files.certFile)
    leaf.private_key_pem.write_to_path(files.keyFile)
    return files


@pytest.fixture(scope="module")
def proxy(certificate: Certificate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """
    One real twistd proxy with every listener of L{LISTENERS}, and the
    control server.
    """
    ports = {listener.name: freePort() for listener in LISTENERS}
    tables = "".join(
        listener.table(ports[listener.name], certificate.certFile, certificate.keyFile) for listener in LISTENERS
    )
    control = ControlServer(certificate, tmp_path_factory.mktemp("tls-profile-control"))
    try:
        with runningProxy(proxyConfig(tables), {"alice": "alicepw"}, list(ports.values()), "mp-tls-profile-"):
            yield Proxy(ports, certificate, control)
    finally:
        control.stop()


# Client offers every default listener refuses, with what the control
# server negotiates for them.
LEGACY = ("-cipher", "DEFAULT@SECLEVEL=0")
REFUSED_VERSIONS = {
    "tls1.1": (("-tls1_1", *LEGACY), "TLSv1.1"),
    "tls1.0": (("-tls1", *LEGACY), "TLSv1"),
}
REFUSED_SUITES = {
    # RSA key exchange (no forward secrecy).
    "rsa-kx-aes128-gcm": "AES128-GCM-SHA256",
    "rsa-kx-aes256-gcm": "AES256-GCM-SHA384",
    # CBC (LUCKY13 and friends), with and without ECDHE.
    "ecdhe-cbc-sha1": "ECDHE-RSA-AES128-SHA",
    "ecdhe-cbc-sha384": "ECDHE-RSA-AES256-SHA384",
    "rsa-kx-cbc-sha256": "AES128-SHA256",
    # Finite-field DHE, left out of Mozilla's intermediate profile here.
    "dhe-aes128-gcm": "DHE-RSA-AES128-GCM-SHA256",
    "dhe-chacha20": "DHE-RSA-CHACHA20-POLY1305",
}
ACCEPTED = {
    "ecdhe-aes128-gcm": (
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"),
        "TLSv1.2",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ),
    "ecdhe-aes256-gcm": (
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"),
        "TLSv1.2",
        "ECDHE-RSA-AES256-GCM-SHA384",
    ),
    "ecdhe-chacha20": (("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"), "TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305"),
    "tls1.3": (("-tls1_3",), "TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    "tls1.3-chacha20": (
        ("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),
        "TLSv1.3",
        "TLS_CHACHA20_POLY1305_SHA256",
    ),
    "tls1.3-aes128-gcm": (("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"), "TLSv1.3", "TLS_AES_128_GCM_SHA256"),
}
# Every TLS 1.2 suite OpenSSL has, SECLEVEL 0, except the profile's.
OUTSIDE_PROFILE = ("-tls1_2", "-cipher", "ALL:COMPLEMENTOFALL:!ECDHE+AESGCM:!ECDHE+CHACHA20:@SECLEVEL=0")


@pytest.mark.parametrize("listener", DEFAULT_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("case", REFUSED_VERSIONS, ids=str)
def test_default_listeners_refuse_tls_before_1_2(proxy: Proxy, listener: TLSListener, case: str) -> None:
    """A client offering only TLS 1.1 or 1.0 gets a protocol version alert and no session."""
    options, version = REFUSED_VERSIONS[case]
    proxy.assertRefused(listener, options, PROTOCOL_VERSION_ALERT, version)


@pytest.mark.parametrize("listener", DEFAULT_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("case", REFUSED_SUITES, ids=str)
def test_default_listeners_refuse_rsa_key_exchange_cbc_and_dhe_suites(
    proxy: Proxy, listener: TLSListener, case: str
) -> None:
    """A TLS 1.2 client offering only a non-ECDHE or non-AEAD suite gets a handshake failure."""
    suite = REFUSED_SUITES[case]
    proxy.assertRefused(listener, ("-tls1_2", "-cipher", suite), HANDSHAKE_FAILURE_ALERT, f"TLSv1.2 {suite}")


@pytest.mark.parametrize("listener", DEFAULT_LISTENERS, ids=listenerId)
def test_default_listeners_refuse_every_tls_1_2_suite_outside_the_profile(proxy: Proxy, listener: TLSListener) -> None:
    """Offered every other TLS 1.2 suite OpenSSL has at once, the proxy still finds none it takes."""
    proxy.assertRefused(listener, OUTSIDE_PROFILE, HANDSHAKE_FAILURE_ALERT, "TLSv1.2")


@pytest.mark.parametrize("listener", DEFAULT_LISTENERS, ids=listenerId)
@pytest.mark.parametrize("case", ACCEPTED, ids=str)
def test_default_listeners_accept_ecdhe_aead_suites_and_tls_1_3(proxy: Proxy, listener: TLSListener, case: str) -> None:
    """Each ECDHE-RSA AEAD suite of the profile, and TLS 1.3, is negotiated as offered, with the configured certificate."""
    options, protocol, cipher = ACCEPTED[case]
    answer = proxy.handshake(listener, *options)
    assert (answer.protocol, answer.cipher) == (protocol, cipher), answer.output
    assert answer.verified, answer.output


@pytest.mark.parametrize("listener", DEFAULT_LISTENERS, ids=listenerId)
def test_default_listeners_pick_a_profile_suite_from_a_legacy_tls_1_2_offer(
    proxy: Proxy, listener: TLSListener
) -> None:
    """A TLS 1.2 client offering everything (RSA key exchange and CBC first) gets an ECDHE AEAD suite."""
    legacyFirst = "AES128-SHA:AES128-SHA256:AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA:ALL:@SECLEVEL=0"
    answer = proxy.handshake(listener, "-tls1_2", "-cipher", legacyFirst)
    assert answer.protocol == "TLSv1.2" and answer.cipher in PROFILE_RSA_SUITES, answer.output


@pytest.mark.parametrize("listener", TLS13_LISTENERS, ids=listenerId)
def test_tls_min_version_1_3_refuses_tls_1_2(proxy: Proxy, listener: TLSListener) -> None:
    """With tls_min_version = "1.3" even a profile suite over TLS 1.2 gets a protocol version alert."""
    options = ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    proxy.assertRefused(listener, options, PROTOCOL_VERSION_ALERT, "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256")


@pytest.mark.parametrize("listener", TLS13_LISTENERS, ids=listenerId)
def test_tls_min_version_1_3_accepts_tls_1_3(proxy: Proxy, listener: TLSListener) -> None:
    """With tls_min_version = "1.3" a client offering TLS 1.2 and 1.3 gets TLS 1.3."""
    answer = proxy.handshake(listener)
    assert (answer.protocol, answer.cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384"), answer.output


@pytest.mark.parametrize("listener", CUSTOM_LISTENERS, ids=listenerId)
def test_custom_tls_ciphers_accept_only_that_suite_in_tls_1_2(proxy: Proxy, listener: TLSListener) -> None:
    """tls_ciphers = "ECDHE-RSA-AES256-GCM-SHA384" is the one TLS 1.2 suite negotiated, whatever else is offered."""
    answer = proxy.handshake(listener, "-tls1_2", "-cipher", "ALL:@SECLEVEL=0")
    assert (answer.protocol, answer.cipher) == ("TLSv1.2", CUSTOM_SUITE), answer.output
    for other in PROFILE_RSA_SUITES:
        if other != CUSTOM_SUITE:
            options = ("-tls1_2", "-cipher", other)
            proxy.assertRefused(listener, options, HANDSHAKE_FAILURE_ALERT, f"TLSv1.2 {other}")


@pytest.mark.parametrize("listener", CUSTOM_LISTENERS, ids=listenerId)
def test_custom_tls_ciphers_leave_tls_1_3_alone(proxy: Proxy, listener: TLSListener) -> None:
    """tls_ciphers is for TLS 1.2: a TLS 1.3 client still gets its suite."""
    answer = proxy.handshake(listener, "-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256")
    assert (answer.protocol, answer.cipher) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256"), answer.output


def pythonClient(certificate: Certificate, maximum: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificate.caFile)
    context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


@pytest.mark.parametrize(
    ("name", "greeting"),
    [("imaps", b"* OK "), ("pop3s", b"+OK "), ("imaps-tls13", b"* OK "), ("imaps-custom", b"* OK ")],
)
def test_a_negotiated_session_carries_the_greeting(proxy: Proxy, name: str, greeting: bytes) -> None:
    """Python's ssl client gets the greeting over the negotiated TLS session (TLS 1.2 where the listener allows it)."""
    maximum = ssl.TLSVersion.TLSv1_3 if name == "imaps-tls13" else ssl.TLSVersion.TLSv1_2
    context = pythonClient(proxy.certificate, maximum)
    with socket.create_connection((HOST, proxy.ports[name]), timeout=CLIENT_TIMEOUT) as plain:
        with context.wrap_socket(plain, server_hostname="localhost") as tls:
            received = tls.recv(1024)
            version, negotiated = tls.version(), tls.cipher()
    assert negotiated is not None
    cipher = negotiated[0]
    assert received.startswith(greeting), received
    expected = {"imaps-tls13": ("TLS_AES_256_GCM_SHA384",), "imaps-custom": (CUSTOM_SUITE,)}
    assert cipher in expected.get(name, PROFILE_RSA_SUITES), (version, cipher)
    assert version == ("TLSv1.3" if name == "imaps-tls13" else "TLSv1.2")


def test_python_client_limited_to_tls_1_2_is_refused_by_a_tls_1_3_listener(proxy: Proxy) -> None:
    """Python's ssl client capped at TLS 1.2 gets a protocol version alert from tls_min_version = "1.3"."""
    context = pythonClient(proxy.certificate, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection((HOST, proxy.ports["imaps-tls13"]), timeout=CLIENT_TIMEOUT) as plain:
        with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_PROTOCOL_VERSION"):
            context.wrap_socket(plain, server_hostname="localhost")


# A listener's TLS server side itself.


def serverTLS(
    certificate: Certificate, key: str, minimumVersion: str = "1.2", ciphers: str = INTERMEDIATE_CIPHERS
) -> ServerTLS:
    """
    What C{twistd} makes of a listener with C{certificate} and these TLS
    settings.
    """
    listener = implicitListener(
        certificate.certFile, certificate.keyFile, minimumVersion=minimumVersion, ciphers=ciphers
    )
    return listenerTLS(listener, key)


def tls12Suites(tls: ServerTLS) -> set[str]:
    """
    The TLS 1.2 suites a connection of C{tls} offers.
    """
    return {name for name in tls.serverConnectionForTLS(None).get_cipher_list() if not name.startswith("TLS_")}


def test_listener_tls_defaults_to_the_intermediate_suites(certificate: Certificate) -> None:
    """Without tls_ciphers a listener's connections offer exactly the six ECDHE AEAD suites in TLS 1.2."""
    tls = serverTLS(certificate, "listener[0]")
    assert tls12Suites(tls) == set(INTERMEDIATE_CIPHERS.split(":"))
    assert all(suite.startswith("ECDHE-") for suite in tls12Suites(tls))


def test_listener_tls_takes_a_custom_cipher_list(certificate: Certificate) -> None:
    """A custom list is what a connection offers in TLS 1.2; TLS 1.3's suites stay."""
    tls = serverTLS(certificate, "listener[0]", "1.3", CUSTOM_SUITE)
    assert tls12Suites(tls) == {CUSTOM_SUITE}
    assert set(TLS13_SUITES) <= set(tls.serverConnectionForTLS(None).get_cipher_list())


@pytest.mark.parametrize("ciphers", ["NOSUCHCIPHER", "!ALL", "TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256:ü"])
def test_listener_tls_refuses_a_cipher_list_selecting_no_tls_1_2_suite(certificate: Certificate, ciphers: str) -> None:
    """A list OpenSSL cannot read, or one selecting no TLS 1.2 suite, is a ConfigError naming tls_ciphers."""
    with pytest.raises(ConfigError, match=r"^listener\[3\]\.tls_ciphers: "):
        serverTLS(certificate, "listener[3]", "1.2", ciphers)


@pytest.mark.parametrize("ciphers", ["eNULL", "NULL-SHA256"])
def test_listener_tls_refuses_a_cipher_list_of_null_ciphers(certificate: Certificate, ciphers: str) -> None:
    """A list of NULL ciphers only is a ConfigError naming tls_ciphers, not an OpenSSL error at the first client."""
    with pytest.raises(ConfigError, match=r"^listener\[0\]\.tls_ciphers: "):
        serverTLS(certificate, "listener[0]", "1.2", ciphers)


# Start-up with a bad TLS setting (Startup, in tests.tlssupport).


# A listener's bad setting, with the key and the detail the line must name.
BAD_SETTINGS = {
    "unknown-cipher": ("starttls", {"tlsCiphers": "NOSUCHCIPHER"}, "listener[1].tls_ciphers", "'NOSUCHCIPHER'"),
    "tls-1.1": ("implicit", {"tlsMinVersion": "1.1"}, "listener[1].tls_min_version", "'1.1' is not one of 1.2, 1.3"),
    "null-ciphers": ("implicit", {"tlsCiphers": "eNULL"}, "listener[1].tls_ciphers", "'eNULL'"),
}


@pytest.fixture(scope="module")
def startups(certificate: Certificate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Exit | str]]:
    """
    Each of L{BAD_SETTINGS} on the second of two listeners, the twistd
    processes run side by side.
    """
    runs = {}
    try:
        for case, (tls, setting, _, _) in BAD_SETTINGS.items():
            goodPort, badPort = freePort(), freePort()
            good = TLSListener("good", "imap", "implicit").table(goodPort, certificate.certFile, certificate.keyFile)
            bad = TLSListener("bad", "imap", tls, setting).table(badPort, certificate.certFile, certificate.keyFile)
            runs[case] = Startup(tmp_path_factory.mktemp(f"tls-profile-{case}"), {goodPort: good, badPort: bad})
        deadline = time.monotonic() + STARTUP_TIMEOUT
        yield {case: run.exit(deadline) for case, run in runs.items()}
    finally:
        for run in runs.values():
            run.stop()


def assertStoppedNaming(startups: dict[str, Exit | str], case: str) -> None:
    _, _, key, detail = BAD_SETTINGS[case]
    result = startups[case]
    assertStoppedWithOneLine(result, f"{key}: ")
    assert isinstance(result, Exit) and detail in result.stderr, result.output


@pytest.mark.parametrize("case", ["unknown-cipher", "tls-1.1"])
def test_twistd_stops_on_a_bad_tls_setting_with_one_line(startups: dict[str, Exit | str], case: str) -> None:
    """tls_ciphers = "NOSUCHCIPHER" or tls_min_version = "1.1" ends start-up with one line naming the key, no traceback."""
    assertStoppedNaming(startups, case)


def test_twistd_stops_on_a_null_cipher_list_with_one_line(startups: dict[str, Exit | str]) -> None:
    """tls_ciphers = "eNULL" (no suite Twisted will use) ends start-up with one line naming the key."""
    assertStoppedNaming(startups, "null-ciphers")


def test_a_corrupt_upstream_ca_file_is_a_config_error(certificate: Certificate, tmp_path: Path) -> None:
    """A CA file whose PEM block does not decode (OpenSSL.crypto.Error, not SSL.Error) is one ConfigError naming ca_file."""
    corrupt = tmp_path / "ca.pem"
    corrupt.write_bytes(Path(certificate.caFile).read_bytes().replace(b"\n", b"\n!", 3))
    upstream = UpstreamConfig("main", "localhost", 993, TLSMode.IMPLICIT, caFile=str(corrupt))
    with pytest.raises(ConfigError, match=r"^upstream\.main\.ca_file: PEM certificate 1 is invalid: "):
        upstreamOptions(upstream)
