"""
Helpers for the listener TLS tests: certificates issued by a throw-away
CA and renewed the way ACME clients do it, what a real client is served,
C{openssl s_client} runs, the proxy configuration around the listeners, and
C{twistd} runs that must stop during start-up.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from OpenSSL import SSL

from mailproxy.config import INTERMEDIATE_CIPHERS, Config, ListenerCertificate, ListenerConfig, TLSMode, parseConfig
from mailproxy.passwords import hashPassword
from mailproxy.tls import ServerTLS
from tests.proxyprocess import HOST, TWISTD, ProxyProcess, freePort
from tests.tomlconfig import authTable, listenerTable, routingTable, upstreamTable

OPENSSL = shutil.which("openssl")
CLIENT_TIMEOUT = 10.0
WAIT_TIMEOUT = 20.0
STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Pair:
    """
    A certificate file and its key file, and the serial number of the
    certificate written there last.
    """

    certFile: str
    keyFile: str
    serial: int


class Issuer:
    """
    A trustme CA writing certificates and keys into C{directory}.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.authority = trustme.CA()
        self.caFile = str(directory / "ca.pem")
        self.authority.cert_pem.write_to_path(self.caFile)

    def issue(self, stem: str, *names: str, combined: bool = False) -> Pair:
        """
        A new certificate for C{names} (and its own new key) as
        C{stem.pem} and C{stem.key}, or both in C{stem.pem} if C{combined},
        each file replaced at once (written aside, then renamed over the old
        one, as certbot does).  Two files are replaced one after the other:
        in between, the new key does not match the old certificate.
        """
        leaf = self.authority.issue_cert(*names)
        certificate = leaf.cert_chain_pems[0].bytes()
        certFile, keyFile = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        if combined:
            replaceFile(certFile, certificate + leaf.private_key_pem.bytes())
            return Pair(str(certFile), str(certFile), serialOf(certificate))
        replaceFile(keyFile, leaf.private_key_pem.bytes())
        replaceFile(certFile, certificate)
        return Pair(str(certFile), str(keyFile), serialOf(certificate))


def replaceFile(path: Path, data: bytes) -> None:
    aside = path.with_name(path.name + ".new")
    aside.write_bytes(data)
    os.replace(aside, path)


def serialOf(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def clientContext(caFile: str, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """
    A client verifying the chain against C{caFile}, not the name: the
    tests look at which certificate is served for a name.
    """
    context = ssl.create_default_context(cafile=caFile)
    context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def startTLS(port: int, protocol: str) -> socket.socket:
    """
    A connection to a STARTTLS/STLS listener, ready for the handshake.
    """
    plain = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
    reader = plain.makefile("rb")
    greeting = reader.readline()
    command = b"s STARTTLS\r\n" if protocol == "imap" else b"STLS\r\n"
    plain.sendall(command)
    answer = reader.readline()
    reader.close()
    assert answer.startswith((b"s OK", b"+OK")), (greeting, answer)
    return plain


def served(
    port: int, caFile: str, serverName: str | None, starttls: str | None = None
) -> tuple[x509.Certificate, bytes]:
    """
    The certificate a client naming C{serverName} (SNI; none if C{None}) is
    served, and the first line it reads over TLS (the greeting on implicit
    TLS, the answer to a CAPABILITY/CAPA after STARTTLS).
    """
    plain = (
        startTLS(port, starttls)
        if starttls is not None
        else socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
    )
    with clientContext(caFile).wrap_socket(plain, server_hostname=serverName) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        if starttls is not None:
            tls.sendall(b"c CAPABILITY\r\n" if starttls == "imap" else b"CAPA\r\n")
        line = tls.makefile("rb").readline()
    return x509.load_der_x509_certificate(der), line


def waitFor(predicate: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT) -> None:
    """
    Poll C{predicate} until it holds (at most C{timeout} seconds).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def logCount(process: ProxyProcess, text: str) -> int:
    return process.log().count(text)


def waitForLogCount(process: ProxyProcess, text: str, count: int) -> None:
    waitFor(lambda: logCount(process, text) >= count, f"{text!r} logged {count} times:\n{process.output()}")


@dataclass(frozen=True)
class SClient:
    """
    What one C{openssl s_client} run printed, and what it negotiated.
    """

    output: str

    @property
    def summary(self) -> str | None:
        """
        C{"New, TLSv1.3, Cipher is ..."} or C{"Reused, ..."}.
        """
        match = re.search(r"^(New|Reused), .*$", self.output, re.MULTILINE)
        return match.group(0) if match else None

    @property
    def reused(self) -> bool:
        return (self.summary or "").startswith("Reused, ")

    @property
    def alpn(self) -> str | None:
        match = re.search(r"^ALPN protocol: (\S+)$", self.output, re.MULTILINE)
        return match.group(1) if match else None

    @property
    def serial(self) -> int | None:
        """
        The serial number of the certificate the server sent.
        """
        match = re.search(r"^-----BEGIN CERTIFICATE-----$.*?^-----END CERTIFICATE-----$", self.output, re.M | re.S)
        return serialOf(match.group(0).encode("ascii")) if match else None

    @property
    def handshakeDone(self) -> bool:
        return self.summary is not None and "Cipher is (NONE)" not in self.summary


def sClient(port: int, caFile: str, *options: str, starttls: str | None = None, say: bytes = b"") -> SClient:
    """
    Run C{openssl s_client} against C{port} sending C{say} after the
    handshake; with C{-ign_eof} it then reads until the server closes (so
    C{say} should end the session: it also makes s_client read the TLS 1.3
    session tickets the server sends after the handshake).
    """
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"{HOST}:{port}", "-CAfile", caFile, *options]
    if starttls is not None:
        command += ["-starttls", starttls]
    result = subprocess.run(command, input=say, capture_output=True, timeout=CLIENT_TIMEOUT)
    text = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    return SClient(f"$ {' '.join(command)}\n{text}")


def goodbye(protocol: str) -> bytes:
    """
    The command ending a session before login.
    """
    return b"a LOGOUT\r\n" if protocol == "imap" else b"QUIT\r\n"


def answeredGoodbye(protocol: str) -> str:
    """
    What the server answers L{goodbye} with.
    """
    return "a OK LOGOUT completed" if protocol == "imap" else "+OK Bye"


@dataclass(frozen=True)
class TLSListener:
    """
    A listener with TLS of a proxy under test: its name, protocol and TLS
    mode, and further keys of its table (by their camelCase names).
    """

    name: str
    protocol: str
    tls: str
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def starttls(self) -> str | None:
        """
        The C{s_client -starttls} dialogue, or C{None} for implicit TLS.
        """
        return self.protocol if self.tls == "starttls" else None

    def table(self, port: int, certFile: str, keyFile: str) -> str:
        """
        Its C{[[listener]]} table, on C{port} and serving C{certFile}.
        """
        # Settings are further keys (none is a parameter of listenerTable), so any value type goes.
        settings: dict[str, Any] = dict(self.settings)
        return listenerTable(
            self.name,
            port,
            protocol=self.protocol,
            tls=self.tls,
            certificate=certFile,
            privateKey=keyFile,
            **settings,
        )


# One listener of each protocol and TLS mode.
TLS_LISTENERS = (
    TLSListener("imaps", "imap", "implicit"),
    TLSListener("imap", "imap", "starttls"),
    TLSListener("pop3s", "pop3", "implicit"),
    TLSListener("pop3", "pop3", "starttls"),
)


def listenerId(listener: TLSListener) -> str:
    """
    The test id of a test run for C{listener}: its name.
    """
    return listener.name


def implicitListener(
    certFile: str,
    keyFile: str,
    *certificates: ListenerCertificate,
    minimumVersion: str = "1.2",
    ciphers: str = INTERMEDIATE_CIPHERS,
) -> ListenerConfig:
    """
    The configuration of an implicit TLS IMAP listener (never started)
    serving C{certFile} by default and C{certificates} for their names.
    """
    return ListenerConfig(
        "imaps",
        "tcp:0",
        TLSMode.IMPLICIT,
        certificate=certFile,
        privateKey=keyFile,
        certificates=certificates,
        tlsMinimumVersion=minimumVersion,
        tlsCiphers=ciphers,
    )


def proxyConfig(listeners: str, server: str = "", workers: int = 1) -> str:
    """
    A configuration with C{listeners} (their tables) and C{server} (lines
    of the C{[server]} table) whose upstream is never reached: no session
    gets past login.
    """
    # One process: TLS sessions resume only on the process that made them
    # (pyOpenSSL cannot share ticket keys between workers; README), and the
    # log is read as soon as a client is answered.
    return "".join(
        [
            f"\n[server]\nworkers = {workers}\n{server}\n",
            authTable(),
            listeners,
            upstreamTable("main", freePort(), connectTimeout=3),
            routingTable("main"),
        ]
    )


def servedInMemory(tls: ServerTLS, serverName: bytes | None) -> x509.Certificate:
    """
    The certificate C{tls} serves a client naming C{serverName} (any bytes,
    even those no real client library sends), over memory BIOs.
    """
    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    if serverName is not None:
        client.set_tlsext_host_name(serverName)
    done: set[SSL.Connection] = set()
    # A handshake is two flights each way at most.
    for _ in range(8):
        for sending, receiving in ((client, server), (server, client)):
            try:
                sending.do_handshake()
                done.add(sending)
            except SSL.WantReadError:
                pass
            try:
                receiving.bio_write(sending.bio_read(65536))
            except SSL.WantReadError:
                pass
        certificate = client.get_peer_certificate()
        if len(done) == 2 and certificate is not None:
            return certificate.to_cryptography()
    raise AssertionError(f"no handshake for {serverName!r}: {client.get_state_string()!r}")


@dataclass(frozen=True)
class Exit:
    """
    How a C{twistd} run ended.
    """

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class Startup:
    """
    C{twistd -n mailproxy} on a configuration with C{listeners} (their
    tables by port) that must stop it during start-up.
    """

    def __init__(self, directory: Path, listeners: dict[int, str], server: str = "", workers: int = 1) -> None:
        self.ports = list(listeners)
        (directory / "users").write_text(f"alice:{hashPassword('alicepw', log2N=4)}\n")
        config = directory / "mailproxy.toml"
        config.write_text(proxyConfig("".join(listeners.values()), server, workers))
        self._stdout, self._stderr = directory / "stdout", directory / "stderr"
        command = [TWISTD, "-n", "--pidfile=", "mailproxy", "--config", str(config)]
        with open(self._stdout, "wb") as stdout, open(self._stderr, "wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=directory
            )

    def exit(self, deadline: float) -> Exit | str:
        """
        How it stopped, or why it did not: listening on one of its ports
        (stopped at once, by PID) or still running at C{deadline}.
        """
        try:
            while self.process.poll() is None:
                started = [port for port in self.ports if listening(port)]
                if started:
                    return f"twistd started, listening on {started}"
                if time.monotonic() > deadline:
                    return f"twistd neither stopped nor listened in {STARTUP_TIMEOUT} s"
                time.sleep(0.05)
        finally:
            self.stop()
        return Exit(self.process.returncode, self._stdout.read_text(), self._stderr.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def assertStoppedWithOneLine(result: Exit | str, line: str) -> None:
    """
    C{twistd} stopped during start-up with a non-zero code and one line on
    stderr, starting C{mailproxy: configuration error: } and C{line}, and no
    traceback.
    """
    assert isinstance(result, Exit), result
    assert result.code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"mailproxy: configuration error: {line}"), result.output


def parsedExample(name: str, directory: Path) -> Config:
    """
    The example configuration C{etc/NAME} parsed, its C{/etc/mailproxy/}
    files in C{directory} (a throw-away certificate for the listeners).
    """
    text = (Path(__file__).resolve().parent.parent / "etc" / name).read_text()
    (directory / "tls").mkdir()
    trustme.CA().issue_cert("mail.example.test").private_key_and_cert_chain_pem.write_to_path(
        str(directory / "tls" / "fullchain.pem")
    )
    shutil.copy(directory / "tls" / "fullchain.pem", directory / "tls" / "privkey.pem")
    return parseConfig(tomllib.loads(text.replace("/etc/mailproxy/", f"{directory}/")), str(directory))
