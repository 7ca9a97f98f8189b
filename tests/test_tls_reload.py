"""
Renewed listener certificates are picked up without a restart, and broken
ones are refused: files replaced in place or by a symlink switch (as certbot
does) are served to new connections after SIGHUP or, without a signal, once
the watcher notices them, while sessions already open go on.  A pair that
cannot be used is logged once, naming its key, and the one in use is kept.
At start-up, a certificate or key that cannot be used stops C{twistd} with
one line naming the key.

End to end with a real C{twistd} proxy in front of the real Dovecot, and in
memory with a fake clock for the watcher and the ticket key rotation.
"""

from __future__ import annotations

import imaplib
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from mailproxy.certificates import CertificateReloader, loadCertificate, parseCertificates
from mailproxy.config import ConfigError, ListenerCertificate, ListenerConfig, TLSMode
from mailproxy.tls import ServerTLS, listenerTLS
from tests.conftest import UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy
from tests.tlssupport import (
    OPENSSL,
    Exit,
    Issuer,
    Pair,
    SClient,
    Startup,
    answeredGoodbye,
    assertStoppedWithOneLine,
    clientContext,
    goodbye,
    logCount,
    replaceFile,
    sClient,
    serialOf,
    served,
    servedInMemory,
    waitFor,
    waitForLogCount,
)

RELOADED = "certificate reloaded"
NOT_RELOADED = "certificate not reloaded, keeping the one in use"
STARTUP_TIMEOUT = 30.0


@dataclass
class Proxy:
    """
    A running proxy with an implicit TLS and a STARTTLS IMAP listener, each
    serving C{default} (localhost) and C{mail} (mail.example.test).
    """

    ports: dict[str, int]
    issuer: Issuer
    pairs: dict[str, Pair]
    process: ProxyProcess

    def servedSerial(self, listener: str, serverName: str | None = None) -> int:
        starttls = "imap" if listener == "imap" else None
        certificate, line = served(self.ports[listener], self.issuer.caFile, serverName, starttls)
        assert line.startswith(b"* "), line
        return certificate.serial_number

    def renew(self, name: str, *names: str) -> Pair:
        # The SNI pair is one file: the watcher never sees half a renewal.
        self.pairs[name] = self.issuer.issue(name, *names, combined=name == "mail")
        return self.pairs[name]

    def hangUp(self) -> None:
        self.process.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.process.log()


def proxyConfig(ports: dict[str, int], pairs: dict[str, Pair], upstreamPort: int, server: str) -> str:
    listeners = "".join(
        f"""
[[listener]]
name = "{name}"
endpoint = "tcp:{port}:interface={HOST}"
tls = "{"implicit" if name == "imaps" else "starttls"}"
certificate = "{pairs["default"].certFile}"
private_key = "{pairs["default"].keyFile}"
certificates = [{{ certificate = "{pairs["mail"].certFile}", private_key = "{pairs["mail"].keyFile}" }}]
"""
        for name, port in ports.items()
    )
    # One process: the certificate machinery is per process, and its log
    # lines are counted here (tests/test_workers.py reloads every worker).
    return f"""
[server]
workers = 1
{server}

[auth]
users_file = "users"
failure_delay = 0.1
{listeners}
[upstream.plain]
host = "{HOST}"
port = {upstreamPort}

[routing]
default_upstream = "plain"
"""


@contextmanager
def reloadingProxy(
    issuer: Issuer, upstreamPort: int, server: str, default: tuple[str, str] | None = None
) -> Iterator[Proxy]:
    """
    A proxy whose certificates C{issuer} writes; C{default} names the files
    of the default pair if they are not the issuer's own (symlinks).
    """
    pairs = {
        "default": issuer.issue("default", "localhost"),
        "mail": issuer.issue("mail", "mail.example.test", combined=True),
    }
    if default is not None:
        pairs["default"] = Pair(*default, pairs["default"].serial)
    ports = {"imaps": freePort(), "imap": freePort()}
    users = {"carol": UPSTREAM_USERS["carol"]}
    with runningProxy(
        proxyConfig(ports, pairs, upstreamPort, server), users, list(ports.values()), "mp-tls-reload-"
    ) as (
        _,
        process,
    ):
        yield Proxy(ports, issuer, pairs, process)


@pytest.fixture
def signalled(dovecot: DovecotUpstream, tmp_path: Path) -> Iterator[Proxy]:
    """
    A proxy that does not watch its certificate files: only SIGHUP reloads.
    """
    with reloadingProxy(Issuer(tmp_path), dovecot.ports["imap"], "certificate_check_interval = 0") as proxy:
        yield proxy


@pytest.fixture
def watching(dovecot: DovecotUpstream, tmp_path: Path) -> Iterator[Proxy]:
    """
    A proxy checking its certificate files every second (the shortest
    interval allowed).
    """
    with reloadingProxy(Issuer(tmp_path), dovecot.ports["imap"], "certificate_check_interval = 1") as proxy:
        yield proxy


def openSessions(proxy: Proxy) -> list[imaplib.IMAP4]:
    """
    A logged-in session with INBOX selected on each listener (implicit TLS,
    then STARTTLS).
    """
    context = clientContext(proxy.issuer.caFile)
    implicit = imaplib.IMAP4_SSL(HOST, proxy.ports["imaps"], ssl_context=context, timeout=30)
    starttls = imaplib.IMAP4(HOST, proxy.ports["imap"], timeout=30)
    assert starttls.starttls(ssl_context=context)[0] == "OK"
    for session in (implicit, starttls):
        assert session.login("carol", UPSTREAM_USERS["carol"])[0] == "OK"
        assert session.select("INBOX")[0] == "OK"
    return [implicit, starttls]


def peerSerial(session: imaplib.IMAP4) -> int:
    der = session.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_serves_renewed_certificates_to_new_connections_while_open_sessions_go_on(signalled: Proxy) -> None:
    """Both pairs renewed in place: after SIGHUP new connections get them, open sessions keep theirs and work; one info line per pair."""
    proxy = signalled
    old = {name: pair.serial for name, pair in proxy.pairs.items()}
    sessions = openSessions(proxy)
    new = {
        "default": proxy.renew("default", "localhost").serial,
        "mail": proxy.renew("mail", "mail.example.test").serial,
    }
    # Nothing watches the files here: the signal does it.
    assert proxy.servedSerial("imaps") == old["default"]

    proxy.hangUp()
    waitForLogCount(proxy.process, RELOADED, 4)
    for listener in ("imaps", "imap"):
        assert proxy.servedSerial(listener) == new["default"]
        assert proxy.servedSerial(listener, "mail.example.test") == new["mail"]
        assert proxy.servedSerial(listener, "unknown.example.test") == new["default"]
    log = proxy.log()
    for index, listener in enumerate(("imaps", "imap")):
        for key, serial in (
            (f"listener[{index}]", new["default"]),
            (f"listener[{index}].certificates[0]", new["mail"]),
        ):
            assert log.count(f"listener {listener}: {RELOADED} ({key}): ") == 1, log
            assert f"serial {serial:x}, expires " in log
    assert "configuration reloaded" in log
    assert NOT_RELOADED not in log

    for session in sessions:
        assert peerSerial(session) == old["default"]
        assert session.noop()[0] == "OK"
        assert session.select("INBOX")[0] == "OK"
        assert session.logout()[0] == "BYE"


def test_sighup_with_unchanged_files_reloads_nothing(signalled: Proxy) -> None:
    """SIGHUP re-reads the files; the same contents log no reload and change nothing served."""
    proxy = signalled
    before = proxy.servedSerial("imaps")
    Path(proxy.pairs["default"].certFile).touch()
    proxy.hangUp()
    waitForLogCount(proxy.process, "configuration reloaded", 1)
    assert proxy.servedSerial("imaps") == before
    assert RELOADED not in proxy.log() and NOT_RELOADED not in proxy.log()


def test_the_watcher_serves_a_renewed_certificate_without_a_signal(watching: Proxy) -> None:
    """With certificate_check_interval set, a renewed SNI certificate is served on both listeners; no SIGHUP, no other reload."""
    proxy = watching
    sessions = openSessions(proxy)
    new = proxy.renew("mail", "mail.example.test").serial
    waitFor(lambda: proxy.servedSerial("imaps", "mail.example.test") == new, "the renewed certificate served")
    waitFor(lambda: proxy.servedSerial("imap", "mail.example.test") == new, "the renewed certificate served")
    log = proxy.log()
    assert (
        log.count(RELOADED) == 2 and "(listener[0].certificates[0])" in log and "(listener[1].certificates[0])" in log
    )
    assert "SIGHUP" not in log
    assert proxy.servedSerial("imaps") == proxy.pairs["default"].serial
    for session in sessions:
        assert session.noop()[0] == "OK"
        assert session.logout()[0] == "BYE"


def test_the_watcher_follows_a_symlink_switch(dovecot: DovecotUpstream, tmp_path: Path) -> None:
    """certbot's layout: live/ symlinks into archive/; pointing the symlinks at a new archive pair serves it."""
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    issuer = Issuer(tmp_path)
    first = issuer.issue("archive/default1", "localhost")
    for link, target in ((live / "cert.pem", first.certFile), (live / "key.pem", first.keyFile)):
        link.symlink_to(target)
    files = (str(live / "cert.pem"), str(live / "key.pem"))
    server = "certificate_check_interval = 1"
    with reloadingProxy(issuer, dovecot.ports["imap"], server, default=files) as proxy:
        assert proxy.servedSerial("imaps") == first.serial
        second = proxy.issuer.issue("archive/default2", "localhost")
        for link, target in ((live / "key.pem", second.keyFile), (live / "cert.pem", second.certFile)):
            aside = link.with_name(link.name + ".new")
            aside.symlink_to(target)
            os.replace(aside, link)
        waitFor(lambda: proxy.servedSerial("imaps") == second.serial, "the new archive pair served")
        assert "(listener[0]): " in proxy.log()


def breakFiles(proxy: Proxy, how: str, other: trustme.LeafCert) -> None:
    """
    Break the default pair's files C{how}, in one file operation: no check
    sees a state in between.
    """
    pair = proxy.pairs["default"]
    certFile, keyFile = Path(pair.certFile), Path(pair.keyFile)
    renewed = proxy.issuer.authority.issue_cert("localhost")
    if how == "mismatched key":
        replaceFile(keyFile, other.private_key_pem.bytes())
    elif how == "key file holds a certificate":
        replaceFile(keyFile, other.cert_chain_pems[0].bytes())
    elif how == "garbage key":
        replaceFile(keyFile, b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    elif how == "half-written certificate":
        pem = renewed.cert_chain_pems[0].bytes()
        replaceFile(certFile, pem[: len(pem) // 2])
    elif how == "certificate is not one":
        replaceFile(certFile, b"not a certificate\n")
    elif how == "unreadable":
        certFile.unlink()
    else:
        raise AssertionError(how)


BREAKAGES = {
    "mismatched key": "listener[0].private_key: does not match the certificate",
    "key file holds a certificate": "listener[0].private_key: no PEM private key found",
    "garbage key": "listener[0].private_key: invalid PEM private key",
    "half-written certificate": "listener[0].certificate: PEM certificate 1 is incomplete",
    "certificate is not one": "listener[0].certificate: no PEM certificate found",
    "unreadable": "listener[0].certificate: cannot read ",
}


def test_a_broken_pair_is_logged_once_and_the_one_in_use_kept_until_a_good_one_comes(watching: Proxy) -> None:
    """Each broken state of the files: one error line naming the key, however many checks see it; the old certificate stays served; then a good pair is picked up."""
    proxy = watching
    old = proxy.pairs["default"].serial
    other = proxy.issuer.authority.issue_cert("localhost")
    session = openSessions(proxy)[0]
    for how, error in BREAKAGES.items():
        errors = logCount(proxy.process, NOT_RELOADED)
        breakFiles(proxy, how, other)
        line = f"listener imaps: {NOT_RELOADED}: {error}"
        waitForLogCount(proxy.process, line, 1)
        # Another pair renewed and picked up: the watcher has since looked
        # at the broken files again, and said nothing more.
        reloads = logCount(proxy.process, RELOADED)
        proxy.renew("mail", "mail.example.test")
        waitForLogCount(proxy.process, RELOADED, reloads + 2)
        assert logCount(proxy.process, NOT_RELOADED) == errors + 2, f"{how}:\n{proxy.log()}"
        assert proxy.servedSerial("imaps") == old, how
        assert proxy.servedSerial("imap") == old, how
    assert "Traceback" not in proxy.log()
    assert session.noop()[0] == "OK"

    new = proxy.renew("default", "localhost").serial
    waitFor(lambda: proxy.servedSerial("imaps") == new, "the good pair served")
    assert proxy.servedSerial("imap") == new
    assert session.noop()[0] == "OK"
    session.logout()


# Session tickets across a reload.

VERSIONS = {"tls1.2": "-tls1_2", "tls1.3": "-tls1_3"}


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
@pytest.mark.parametrize("version", list(VERSIONS))
def test_a_ticket_from_before_a_reload_gets_a_full_handshake(signalled: Proxy, version: str, tmp_path: Path) -> None:
    """A session resumes until the certificates are reloaded; then its ticket is not accepted, and the full handshake works."""
    proxy = signalled
    sessions = {listener: str(tmp_path / f"{listener}.pem") for listener in ("imaps", "imap")}
    for listener, session in sessions.items():
        first = connectWith(proxy, listener, version, "-sess_out", session)
        assert first.summary is not None and first.summary.startswith("New, "), first.output
        assert connectWith(proxy, listener, version, "-sess_in", session).reused
    proxy.renew("default", "localhost")
    proxy.hangUp()
    waitForLogCount(proxy.process, RELOADED, 2)
    for listener, session in sessions.items():
        answer = connectWith(proxy, listener, version, "-sess_in", session)
        assert answer.summary is not None and answer.summary.startswith(f"New, TLSv1.{version[-1]}"), answer.output
        assert answeredGoodbye("imap") in answer.output, answer.output


def connectWith(proxy: Proxy, listener: str, version: str, *options: str) -> SClient:
    """
    An s_client session to C{listener} with TLS C{version}, asking for
    localhost, that logs out.
    """
    return sClient(
        proxy.ports[listener],
        proxy.issuer.caFile,
        "-ign_eof",
        "-servername",
        "localhost",
        VERSIONS[version],
        *options,
        starttls="imap" if listener == "imap" else None,
        say=goodbye("imap"),
    )


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
def test_tls_session_lifetime_0_turns_resumption_off(dovecot: DovecotUpstream, tmp_path: Path) -> None:
    """With tls_session_lifetime = 0 no session is resumed, in TLS 1.2 or 1.3."""
    with reloadingProxy(Issuer(tmp_path), dovecot.ports["imap"], "tls_session_lifetime = 0") as proxy:
        for flag in VERSIONS.values():
            session = str(tmp_path / f"session{flag}.pem")
            options = ("-ign_eof", "-servername", "localhost", flag)
            port, caFile = proxy.ports["imaps"], proxy.issuer.caFile
            first = sClient(port, caFile, *options, "-sess_out", session, say=goodbye("imap"))
            assert first.handshakeDone and answeredGoodbye("imap") in first.output, first.output
            if flag == "-tls1_2":
                # No ticket and no session ID: s_client has no session to keep.
                assert not os.path.exists(session), first.output
                continue
            # TLS 1.3: OpenSSL still sends a ticket naming a session it does
            # not keep (pyOpenSSL cannot set the number of tickets to 0).
            second = sClient(port, caFile, *options, "-sess_in", session, say=goodbye("imap"))
            assert second.handshakeDone and not second.reused, second.output
            assert answeredGoodbye("imap") in second.output, second.output


# In memory: the watcher and the ticket key rotation on a fake clock.


class Watched:
    """
    A listener's TLS built from files in C{directory}, and a reloader on a
    fake clock logging into C{events}.
    """

    def __init__(
        self, directory: Path, checkInterval: float = 10.0, lifetime: int = 3600, default: Pair | None = None
    ) -> None:
        self.issuer = Issuer(directory)
        self.default = default or self.issuer.issue("default", "localhost")
        self.mail = self.issuer.issue("mail", "mail.example.test")
        listener = ListenerConfig(
            "imaps",
            "tcp:0",
            TLSMode.IMPLICIT,
            certificate=self.default.certFile,
            privateKey=self.default.keyFile,
            certificates=(ListenerCertificate(self.mail.certFile, self.mail.keyFile),),
        )
        self.tls: ServerTLS = listenerTLS(listener, "listener[0]", lifetime)
        self.clock = Clock()
        self.reloader = CertificateReloader([self.tls], checkInterval, lifetime, self.clock)
        self.events: list[dict[str, Any]] = []
        self.reloader.log = Logger(observer=self.events.append)
        self.reloader.start()

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def serials(self) -> list[int]:
        return [watched.current.chain[0].get_serial_number() for watched in self.tls.certificates]

    def servedSerial(self, serverName: bytes | None = None) -> int:
        """
        The serial number of the certificate a new connection is served.
        """
        return servedInMemory(self.tls, serverName).serial_number


def test_the_watcher_reloads_changed_files_at_its_interval(tmp_path: Path) -> None:
    """Nothing is read before the interval; at it, the renewed pair is in use in new contexts and logged once."""
    watched = Watched(tmp_path)
    context = watched.tls.getContext()
    renewed = watched.issuer.issue("mail", "mail.example.test")
    watched.clock.advance(9.9)
    assert watched.serials()[1] == watched.mail.serial and watched.tls.getContext() is context
    watched.clock.advance(0.1)
    assert watched.serials() == [watched.default.serial, renewed.serial]
    assert watched.tls.getContext() is not context
    [message] = watched.messages()
    assert message.startswith("listener imaps: certificate reloaded (listener[0].certificates[0]): "), message
    assert f"serial {renewed.serial:x}, expires 3000-01-01 00:00:00 UTC" in message
    watched.clock.advance(10)
    assert len(watched.messages()) == 1


def test_a_touched_file_with_the_same_contents_changes_nothing(tmp_path: Path) -> None:
    """A new modification time alone: the files are read again, nothing is replaced or logged."""
    watched = Watched(tmp_path)
    context = watched.tls.getContext()
    later = time.time() + 5
    os.utime(watched.default.certFile, (later, later))
    watched.clock.advance(10)
    assert watched.tls.getContext() is context and watched.messages() == []


def test_a_broken_pair_is_logged_once_per_change_of_its_files(tmp_path: Path) -> None:
    """The same broken files seen at every check: one error line; broken differently: one more; fixed: reloaded."""
    watched = Watched(tmp_path)
    context = watched.tls.getContext()
    replaceFile(Path(watched.mail.keyFile), watched.issuer.authority.issue_cert("x.test").private_key_pem.bytes())
    for _ in range(5):
        watched.clock.advance(10)
    expected = (
        "listener imaps: certificate not reloaded, keeping the one in use: "
        "listener[0].certificates[0].private_key: does not match the certificate"
    )
    assert watched.messages() == [expected]
    Path(watched.mail.keyFile).write_bytes(b"junk")
    watched.clock.advance(10)
    watched.clock.advance(10)
    assert watched.messages()[1:] == [
        "listener imaps: certificate not reloaded, keeping the one in use: "
        "listener[0].certificates[0].private_key: no PEM private key found"
    ]
    assert watched.tls.getContext() is context and watched.serials()[1] == watched.mail.serial
    # SIGHUP reads them again and says so again.
    watched.reloader.reload()
    assert len(watched.messages()) == 3
    renewed = watched.issuer.issue("mail", "mail.example.test")
    watched.clock.advance(10)
    assert watched.serials()[1] == renewed.serial and "certificate reloaded" in watched.messages()[-1]


def test_the_session_ticket_key_is_replaced_every_session_lifetime(tmp_path: Path) -> None:
    """Every tls_session_lifetime seconds the contexts are rebuilt as they are (a new ticket key); the session timeout is that lifetime."""
    watched = Watched(tmp_path, checkInterval=0, lifetime=600)
    context = watched.tls.getContext()
    assert context.get_timeout() == 600
    watched.clock.advance(599)
    assert watched.tls.getContext() is context
    watched.clock.advance(1)
    assert watched.tls.getContext() is not context
    assert watched.serials() == [watched.default.serial, watched.mail.serial]
    assert watched.messages() == ["TLS session ticket keys replaced on 1 listener (every 600 s)"]
    watched.reloader.stop()
    watched.clock.advance(600)
    assert len(watched.messages()) == 1


# Start-up: a certificate or key that cannot be used is one line.


def startupCases(issuer: Issuer, directory: Path) -> dict[str, tuple[str, str, str]]:
    """
    Each case's certificate file, key file and the line's key and detail.
    """
    good = issuer.issue("good", "localhost")
    other = issuer.issue("other", "localhost")

    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.write_bytes(data)
        return str(path)

    certPEM = Path(good.certFile).read_bytes()
    encrypted = issuer.authority.issue_cert("localhost").private_key_pem.bytes()
    key = serialization.load_pem_private_key(encrypted, None)
    encryptedPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    return {
        "mismatched-key": (good.certFile, other.keyFile, "listener[0].private_key: does not match the certificate"),
        "key-is-a-certificate": (good.certFile, good.certFile, "listener[0].private_key: no PEM private key found"),
        "key-is-garbage": (
            good.certFile,
            write("garbage.key", b"hello\n"),
            "listener[0].private_key: no PEM private key found",
        ),
        "key-is-corrupt": (
            good.certFile,
            write("corrupt.key", b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"),
            "listener[0].private_key: invalid PEM private key",
        ),
        "key-is-encrypted": (
            good.certFile,
            write("encrypted.key", encryptedPEM),
            "listener[0].private_key: the private key is encrypted",
        ),
        "certificate-is-a-key": (good.keyFile, good.keyFile, "listener[0].certificate: no PEM certificate found"),
        "certificate-is-corrupt": (
            write("corrupt.pem", certPEM.replace(b"\n", b"\n!", 3)),
            good.keyFile,
            "listener[0].certificate: PEM certificate 1 is invalid",
        ),
        "chain-cut-short": (
            write("cut.pem", certPEM + issuer.authority.cert_pem.bytes()[:200]),
            good.keyFile,
            "listener[0].certificate: PEM certificate 2 is incomplete",
        ),
    }


@pytest.fixture(scope="module")
def startups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Exit | str], dict[str, str]]]:
    """
    twistd run on each broken pair of L{startupCases} (and one with a broken
    SNI entry), side by side.
    """
    directory = tmp_path_factory.mktemp("tls-reload-startup")
    issuer = Issuer(directory)
    cases = startupCases(issuer, directory)
    good, other = issuer.issue("good2", "mail.example.test"), issuer.issue("other2", "mail.example.test")
    expected = {case: line for case, (_, _, line) in cases.items()}
    tables: dict[str, str] = {}
    for case, (certFile, keyFile, _) in cases.items():
        tables[case] = f'certificate = "{certFile}"\nprivate_key = "{keyFile}"\n'
    base = Path(directory / "good.pem"), Path(directory / "good.key")
    tables["sni-mismatched-key"] = (
        f'certificate = "{base[0]}"\nprivate_key = "{base[1]}"\n'
        f'certificates = [{{ certificate = "{good.certFile}", private_key = "{good.keyFile}" }}, '
        f'{{ names = ["x.test"], certificate = "{good.certFile}", private_key = "{other.keyFile}" }}]\n'
    )
    expected["sni-mismatched-key"] = "listener[0].certificates[1].private_key: does not match the certificate"
    runs = {}
    try:
        for case, table in tables.items():
            port = freePort()
            listener = (
                f'\n[[listener]]\nname = "imaps"\nendpoint = "tcp:{port}:interface={HOST}"\ntls = "implicit"\n{table}'
            )
            # With workers (the default): the supervisor checks every pair before starting any.
            runs[case] = Startup(tmp_path_factory.mktemp(f"tls-reload-{case}"), {port: listener}, workers=2)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        yield {case: run.exit(deadline) for case, run in runs.items()}, expected
    finally:
        for run in runs.values():
            run.stop()


STARTUP_CASES = [
    "mismatched-key",
    "key-is-a-certificate",
    "key-is-garbage",
    "key-is-corrupt",
    "key-is-encrypted",
    "certificate-is-a-key",
    "certificate-is-corrupt",
    "chain-cut-short",
    "sni-mismatched-key",
]


@pytest.mark.parametrize("case", STARTUP_CASES)
def test_twistd_stops_on_an_unusable_certificate_or_key_with_one_line(
    startups: tuple[dict[str, Exit | str], dict[str, str]], case: str
) -> None:
    """A key not matching, not a key, encrypted, or a certificate file without a valid certificate: exit non-zero, one line naming the key, no traceback."""
    results, expected = startups
    assertStoppedWithOneLine(results[case], expected[case])


# A certificate chain written in part.


def chainPEM(issuer: Issuer) -> tuple[bytes, bytes]:
    """
    A leaf certificate for localhost issued by an intermediate CA, and the
    PEM of its chain (leaf, intermediate) and of its key.
    """
    intermediate = issuer.authority.create_child_ca()
    leaf = intermediate.issue_cert("localhost")
    return b"".join(pem.bytes() for pem in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


@pytest.mark.parametrize(
    ("cut", "error"),
    [
        # The intermediate's END line missing.
        (lambda chain: chain[: chain.rindex(b"-----END")], "PEM certificate 2 is incomplete"),
        # Its BEGIN line and some base64 only.
        (lambda chain: chain[: chain.rindex(b"-----BEGIN") + 40], "PEM certificate 2 is incomplete"),
        # The leaf cut, then a complete certificate: the leaf has no END line of its own.
        (lambda chain: chain[:300] + chain[chain.rindex(b"-----BEGIN") :], "PEM certificate 1 is incomplete"),
    ],
)
def test_a_chain_with_a_certificate_cut_short_is_refused(tmp_path: Path, cut: Any, error: str) -> None:
    """A BEGIN CERTIFICATE line without its END line is a ConfigError naming which certificate, not a shorter chain."""
    chain, _ = chainPEM(Issuer(tmp_path))
    assert len(parseCertificates(chain, "listener[0].certificate")) == 2
    with pytest.raises(ConfigError) as raised:
        parseCertificates(cut(chain), "listener[0].certificate")
    assert str(raised.value) == f"listener[0].certificate: {error}"


def test_a_reload_catching_a_chain_half_written_keeps_the_whole_one(tmp_path: Path) -> None:
    """A check seeing the chain file written up to the intermediate's last line: one error line, the whole chain still in use."""
    issuer = Issuer(tmp_path)
    chain, key = chainPEM(issuer)
    certFile, keyFile = tmp_path / "chain.pem", tmp_path / "chain.key"
    certFile.write_bytes(chain)
    keyFile.write_bytes(key)
    watched = Watched(tmp_path, default=Pair(str(certFile), str(keyFile), serialOf(chain)))
    context = watched.tls.getContext()
    # Written in place (cp, install), as with certbot --reuse-key: the
    # leaf is whole and matches the key, the intermediate is not there yet.
    certFile.write_bytes(chain[: chain.rindex(b"-----END")])
    watched.clock.advance(10)
    assert watched.messages() == [
        "listener imaps: certificate not reloaded, keeping the one in use: "
        "listener[0].certificate: PEM certificate 2 is incomplete"
    ]
    assert len(watched.tls.certificates[0].current.chain) == 2 and watched.tls.getContext() is context
    assert watched.servedSerial() == serialOf(chain)


# How long a check may hold the reactor on a malformed file: long enough for
# any linear scan of the largest file read, far less than a quadratic one.
SCAN_GUARD = 30


@contextmanager
def alarmAfter(seconds: int) -> Iterator[None]:
    """
    Fail the test with an exception after C{seconds} instead of hanging.
    """

    def expired(signum: int, frame: Any) -> None:
        raise AssertionError(f"still scanning after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_large_file_of_begin_lines_without_end_is_refused_in_one_pass(tmp_path: Path) -> None:
    """2 MB of BEGIN CERTIFICATE lines and no END line: refused at the first one, in one pass, not after a quadratic search."""
    lines = b"-----BEGIN CERTIFICATE-----\n" * (2 * 1024 * 1024 // 28)
    path = tmp_path / "begins.pem"
    path.write_bytes(lines)
    with alarmAfter(SCAN_GUARD):
        with pytest.raises(ConfigError) as raised:
            parseCertificates(lines, "listener[0].certificate")
        assert str(raised.value) == "listener[0].certificate: PEM certificate 1 is incomplete"
        # And the same with a complete certificate in front of them.
        good = Issuer(tmp_path).issue("good", "localhost")
        path.write_bytes(Path(good.certFile).read_bytes() + lines)
        with pytest.raises(ConfigError) as raised:
            loadCertificate(ListenerCertificate(str(path), good.keyFile), "listener[0]")
        assert str(raised.value) == "listener[0].certificate: PEM certificate 2 is incomplete"


# A certbot renewal: live/ symlinks switched to the new archive/ files one
# after the other.


def certbotLayout(directory: Path) -> tuple[Issuer, Pair, Any]:
    """
    An archive/ pair and live/ symlinks to it; and a function renewing
    into archive/ (key, then certificate) that switches C{links} of
    C{"key"} and C{"cert"} when told.
    """
    issuer = Issuer(directory)
    (directory / "archive").mkdir()
    (directory / "live").mkdir()
    live = {"cert": directory / "live" / "cert.pem", "key": directory / "live" / "key.pem"}
    first = issuer.issue("archive/first", "localhost")
    live["cert"].symlink_to(first.certFile)
    live["key"].symlink_to(first.keyFile)

    def renew(stem: str) -> Any:
        pair = issuer.issue(f"archive/{stem}", "localhost")

        def switch(which: str) -> None:
            aside = live[which].with_name(live[which].name + ".new")
            aside.symlink_to(pair.certFile if which == "cert" else pair.keyFile)
            os.replace(aside, live[which])

        return pair, switch

    return issuer, Pair(str(live["cert"]), str(live["key"]), first.serial), renew


def test_a_check_between_certbots_two_symlink_switches_logs_nothing(tmp_path: Path) -> None:
    """The key switched, a check, then the certificate: no error line, the old pair served until the new one is whole, then the new one, logged once."""
    _, live, renew = certbotLayout(tmp_path)
    watched = Watched(tmp_path, default=live)
    new, switch = renew("second")
    switch("key")
    watched.clock.advance(10)
    assert watched.messages() == [] and watched.servedSerial() == live.serial
    switch("cert")
    watched.clock.advance(10)
    [message] = watched.messages()
    assert message.startswith("listener imaps: certificate reloaded (listener[0]): "), message
    assert watched.servedSerial() == new.serial


def test_a_mismatch_after_one_switch_is_logged_if_the_next_check_still_sees_it(tmp_path: Path) -> None:
    """Only the key switched and nothing else happens: the next check logs the mismatch, once; the old pair stays served."""
    _, live, renew = certbotLayout(tmp_path)
    watched = Watched(tmp_path, default=live)
    _, switch = renew("second")
    switch("key")
    watched.clock.advance(10)
    assert watched.messages() == []
    for _ in range(3):
        watched.clock.advance(10)
    assert watched.messages() == [
        "listener imaps: certificate not reloaded, keeping the one in use: "
        "listener[0].private_key: does not match the certificate"
    ]
    assert watched.servedSerial() == live.serial


def test_sighup_logs_a_mismatch_at_once(tmp_path: Path) -> None:
    """SIGHUP is the operator asking: a key not matching is logged by that reload, without waiting for a check."""
    _, live, renew = certbotLayout(tmp_path)
    watched = Watched(tmp_path, checkInterval=0, default=live)
    _, switch = renew("second")
    switch("key")
    watched.reloader.reload()
    assert watched.messages() == [
        "listener imaps: certificate not reloaded, keeping the one in use: "
        "listener[0].private_key: does not match the certificate"
    ]


# Contexts that cannot be rebuilt for a renewed certificate.


def test_a_renewal_whose_contexts_cannot_be_built_is_not_taken_up_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewed pair loads but its contexts fail: the old pair stays in use, so the next ticket key rotation still serves it; SIGHUP tries the files again."""
    watched = Watched(tmp_path, lifetime=600)
    build = ServerTLS._build
    failures = [SSL.Error([("SSL routines", "", "simulated failure")])]

    def failOnce(self: ServerTLS, pairs: Any) -> Any:
        if failures:
            raise failures.pop()
        return build(self, pairs)

    monkeypatch.setattr(ServerTLS, "_build", failOnce)
    watched.tls.log = watched.reloader.log
    renewed = watched.issuer.issue("mail", "mail.example.test")
    watched.clock.advance(10)
    assert watched.messages() == [
        "listener imaps: TLS contexts not rebuilt, keeping the ones in use: [('SSL routines', '', 'simulated failure')]"
    ]
    assert watched.serials()[1] == watched.mail.serial
    assert watched.servedSerial(b"mail.example.test") == watched.mail.serial
    # The rotation rebuilds from the pair in use, not the one never taken up.
    watched.clock.advance(590)
    assert watched.messages()[-1] == "TLS session ticket keys replaced on 1 listener (every 600 s)"
    assert watched.servedSerial(b"mail.example.test") == watched.mail.serial
    assert len(watched.messages()) == 2
    watched.reloader.reload()
    assert watched.serials()[1] == renewed.serial
    assert watched.servedSerial(b"mail.example.test") == renewed.serial
    assert "certificate reloaded (listener[0].certificates[0])" in watched.messages()[-1]
