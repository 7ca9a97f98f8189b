# -*- test-case-name: tests.test_tls_reload -*-
"""
Listener certificates: loading a certificate and its private key from PEM
files, and picking up renewed files without a restart.

Renewal tools (certbot and other ACME clients) replace the files in place
or switch a symlink.  The files' identity (symlink target, inode, size and
modification time) is checked every C{server.certificate_check_interval}
seconds, and SIGHUP re-reads them all; a listener whose certificate changed
gets new TLS contexts, which new connections use while open ones keep
theirs.  A pair that cannot be used (unreadable, half-written, a key that is
not one or does not match) is logged as one error line naming its
configuration key and the pair in use is kept; the same broken files are not
read again until they change.

Every C{server.tls_session_lifetime} seconds the listeners' contexts are
rebuilt as they are, which replaces their session ticket key (see
L{mailproxy.tls}).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailproxy.config import ConfigError, ListenerCertificate

if TYPE_CHECKING:
    from mailproxy.tls import ServerTLS

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.DOTALL)
# The key types a TLS server certificate can have.
_ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
# Certificates and keys are a few KiB, CA bundles a few hundred: a bigger
# file is not what the configuration means.
MAX_PEM_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class LoadedCertificate:
    """
    A certificate chain and its private key, checked to belong together.

    @ivar key: the configuration key it was loaded for (C{listener[0]},
        C{listener[0].certificates[1]}).
    @ivar chain: the leaf certificate first, then its chain.
    @ivar names: the DNS names it is served for when a client names one
        (configured, or the certificate's own subjectAltNames).
    @ivar digest: of the files' contents, to tell a renewal from a touch.
    """

    key: str
    chain: tuple[crypto.X509, ...]
    privateKey: crypto.PKey
    names: tuple[str, ...]
    digest: bytes

    def describe(self) -> str:
        """
        The leaf's subject, serial number, expiry and fingerprint, for logs.
        """
        leaf = self.chain[0].to_cryptography()
        fingerprint = leaf.fingerprint(hashes.SHA256()).hex()[:16]
        return (
            f"{leaf.subject.rfc4514_string()}, serial {leaf.serial_number:x}, "
            f"expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, fingerprint {fingerprint}"
        )


def readPEM(path: str, key: str) -> bytes:
    """
    The contents of the PEM file at C{path}.

    @param key: the configuration key naming it, for error messages.
    @raise ConfigError: if it cannot be read or is too large for one.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_SIZE + 1)
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path!r}: {error.strerror}") from None
    if len(data) > MAX_PEM_SIZE:
        raise ConfigError(f"{key}: {path!r} is larger than {MAX_PEM_SIZE} bytes, not a PEM file")
    return data


def _firstSentence(error: Exception) -> str:
    # cryptography's messages go on with a link to its FAQ.
    return str(error).split(". See ", 1)[0].rstrip(".")


def parseCertificates(pem: bytes, key: str) -> list[x509.Certificate]:
    """
    Every PEM certificate in C{pem}, in order (other blocks, such as a
    private key, are skipped).

    @raise ConfigError: naming C{key}, if there is none or one is invalid.
    """
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ConfigError(f"{key}: no PEM certificate found")
    chain = []
    for index, block in enumerate(blocks):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError as error:
            raise ConfigError(f"{key}: PEM certificate {index + 1} is invalid: {_firstSentence(error)}") from None
    return chain


def _parsePrivateKey(pem: bytes, key: str) -> _ServerKey:
    try:
        privateKey = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"{key}: the private key is encrypted (a key without a passphrase is needed)") from None
    except UnsupportedAlgorithm:
        raise ConfigError(f"{key}: unsupported private key type") from None
    except ValueError as error:
        if b"PRIVATE KEY-----" not in pem:
            raise ConfigError(f"{key}: no PEM private key found") from None
        raise ConfigError(f"{key}: invalid PEM private key: {_firstSentence(error)}") from None
    if not isinstance(
        privateKey, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
    ):
        raise ConfigError(f"{key}: unsupported private key type (RSA, ECDSA, Ed25519 or Ed448 is needed)")
    return privateKey


def _publicKeyBytes(privateOrCertificate: _ServerKey | x509.Certificate) -> bytes:
    return privateOrCertificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def dnsNames(certificate: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names of C{certificate}'s subjectAltName extension, lower case.
    """
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower() for name in extension.value.get_values_for_type(x509.DNSName))


def loadCertificate(files: ListenerCertificate, key: str) -> LoadedCertificate:
    """
    Read and check the certificate chain and private key C{files} name.

    @param key: the configuration key of the pair, for error messages.
    @raise ConfigError: naming C{key.certificate}, C{key.private_key} or
        C{key.names} and the problem.
    """
    certificatePEM = readPEM(files.certificate, f"{key}.certificate")
    keyPEM = (
        certificatePEM if files.privateKey == files.certificate else readPEM(files.privateKey, f"{key}.private_key")
    )
    chain = parseCertificates(certificatePEM, f"{key}.certificate")
    privateKey = _parsePrivateKey(keyPEM, f"{key}.private_key")
    if _publicKeyBytes(privateKey) != _publicKeyBytes(chain[0]):
        raise ConfigError(f"{key}.private_key: does not match the certificate")
    loaded = LoadedCertificate(
        key,
        tuple(crypto.X509.from_cryptography(certificate) for certificate in chain),
        crypto.PKey.from_cryptography_key(privateKey),
        files.names or dnsNames(chain[0]),
        hashlib.sha256(certificatePEM + b"\0" + keyPEM).digest(),
    )
    try:
        # What OpenSSL itself makes of the pair (a key type it cannot use).
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(loaded.chain[0])
        context.use_privatekey(loaded.privateKey)
        context.check_privatekey()
    except SSL.Error as error:
        raise ConfigError(f"{key}.private_key: cannot be used with the certificate: {error}") from None
    return loaded


# What identifies a file's contents without reading it: (symlink target,
# device, inode, size, mtime) for each file, or the error stat gave.
_Stamp = tuple[tuple[str, int, int, int, int] | str, ...]


def _stamp(files: ListenerCertificate) -> _Stamp:
    stamps: list[tuple[str, int, int, int, int] | str] = []
    for path in (files.certificate, files.privateKey):
        try:
            status = os.stat(path)
            stamps.append((os.path.realpath(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))
        except OSError as error:
            stamps.append(error.strerror or str(error))
    return tuple(stamps)


class WatchedCertificate:
    """
    A configured certificate and key, loaded, and whether their files
    changed since.

    @ivar current: the pair in use.
    """

    def __init__(self, files: ListenerCertificate, key: str) -> None:
        """
        @raise ConfigError: if the pair cannot be used.
        """
        self.files = files
        self.key = key
        self._stamp = _stamp(files)
        self.current = loadCertificate(files, key)
        # The files as they were when they last failed to load.
        self._refused: _Stamp | None = None

    def changed(self) -> bool:
        """
        Whether the files look different from the pair in use and from the
        last pair refused.
        """
        stamp = _stamp(self.files)
        return stamp != self._stamp and stamp != self._refused

    def reload(self) -> LoadedCertificate | None:
        """
        Read the files again.

        @return: the new pair if their contents changed, C{None} if not.
        @raise ConfigError: if the new pair cannot be used; the one in use
            stays.
        """
        # Stamped before reading: a change while reading is seen next time.
        stamp = _stamp(self.files)
        try:
            loaded = loadCertificate(self.files, self.key)
        except ConfigError:
            self._refused = stamp
            raise
        self._stamp, self._refused = stamp, None
        if loaded.digest == self.current.digest:
            return None
        self.current = loaded
        return loaded


class CertificateReloader:
    """
    Keeps the TLS listeners' certificates current: files are checked every
    C{checkInterval} seconds (0: never) and all re-read by L{reload}
    (SIGHUP); every C{sessionLifetime} seconds (0: never) the contexts are
    rebuilt, replacing their session ticket keys.
    """

    log = Logger()

    def __init__(
        self, listeners: Sequence[ServerTLS], checkInterval: float, sessionLifetime: float, clock: IReactorTime
    ) -> None:
        self.listeners = list(listeners)
        self.checkInterval = checkInterval
        self.sessionLifetime = sessionLifetime
        self._checking = LoopingCall(self.check)
        self._checking.clock = clock
        self._rotating = LoopingCall(self.rotate)
        self._rotating.clock = clock

    def start(self) -> None:
        if not self.listeners:
            return
        if self.checkInterval > 0:
            self._checking.start(self.checkInterval, now=False)
        if self.sessionLifetime > 0:
            self._rotating.start(self.sessionLifetime, now=False)

    def stop(self) -> None:
        for call in (self._checking, self._rotating):
            if call.running:
                call.stop()

    def check(self) -> None:
        """
        Reload the certificates whose files changed.
        """
        self._refresh(force=False)

    def reload(self) -> None:
        """
        Re-read every certificate (SIGHUP).
        """
        self._refresh(force=True)

    def rotate(self) -> None:
        """
        New contexts, and so new session ticket keys, for every listener.
        """
        for listener in self.listeners:
            listener.rebuild()
        self.log.info(
            "TLS session ticket keys replaced on {count} listeners (every {lifetime:g} s)",
            count=len(self.listeners),
            lifetime=self.sessionLifetime,
        )

    def _refresh(self, force: bool) -> None:
        for listener in self.listeners:
            renewed = []
            for watched in listener.certificates:
                if not force and not watched.changed():
                    continue
                try:
                    loaded = watched.reload()
                except ConfigError as error:
                    self.log.error(
                        "listener {listener}: certificate not reloaded, keeping the one in use: {error}",
                        listener=listener.name,
                        error=str(error),
                    )
                    continue
                if loaded is not None:
                    renewed.append(loaded)
            if not renewed or not listener.rebuild():
                continue
            for loaded in renewed:
                self.log.info(
                    "listener {listener}: certificate reloaded ({key}): {certificate}",
                    listener=listener.name,
                    key=loaded.key,
                    certificate=loaded.describe(),
                )
