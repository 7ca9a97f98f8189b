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
read again until they change.  A pair is taken up only once the listener's
new contexts are built with it.

certbot switches the C{live/} symlinks of the certificate and of the key one
after the other: a check between the two finds a key not matching its
certificate, with only one of the files changed.  That is not logged until
the next check still finds it (a SIGHUP reload logs it at once).

Every C{server.tls_session_lifetime} seconds the listeners' contexts are
rebuilt as they are, which replaces their session ticket key (see
L{mailproxy.tls}).
"""

from __future__ import annotations

import hashlib
import os
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

_BEGIN_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_END_CERTIFICATE = b"-----END CERTIFICATE-----"
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


class KeyMismatch(ConfigError):
    """
    The private key is not the certificate's.
    """


def _certificateBlocks(pem: bytes, key: str) -> list[bytes]:
    """
    Each PEM certificate block of C{pem}, BEGIN to END line, in one pass.

    @raise ConfigError: if a BEGIN line has no END line before the next
        BEGIN line or the end of the file (a file written in part).
    """
    blocks: list[bytes] = []
    start = pem.find(_BEGIN_CERTIFICATE)
    while start != -1:
        following = pem.find(_BEGIN_CERTIFICATE, start + len(_BEGIN_CERTIFICATE))
        end = pem.find(_END_CERTIFICATE, start, len(pem) if following == -1 else following)
        if end == -1:
            raise ConfigError(f"{key}: PEM certificate {len(blocks) + 1} is incomplete")
        blocks.append(pem[start : end + len(_END_CERTIFICATE)])
        start = following
    return blocks


def parseCertificates(pem: bytes, key: str) -> list[x509.Certificate]:
    """
    Every PEM certificate in C{pem}, in order (other blocks, such as a
    private key, are skipped).

    @raise ConfigError: naming C{key}, if there is none or one is
        incomplete or invalid.
    """
    blocks = _certificateBlocks(pem, key)
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
        raise KeyMismatch(f"{key}.private_key: does not match the certificate")
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


@dataclass(frozen=True)
class Renewal:
    """
    A pair read from renewed files, not yet in use.

    @ivar watched: whose files they are.
    @ivar stamp: the files' identity when they were read.
    @ivar loaded: the pair.
    """

    watched: WatchedCertificate
    stamp: _Stamp
    loaded: LoadedCertificate


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
        # The files as they were when they last failed to load, and as they
        # were when a key not matching was first let pass.
        self._refused: _Stamp | None = None
        self._halfSwitched: _Stamp | None = None

    def changed(self) -> bool:
        """
        Whether the files look different from the pair in use and from the
        last pair refused.
        """
        stamp = _stamp(self.files)
        return stamp != self._stamp and stamp != self._refused

    def read(self, patient: bool) -> Renewal | None:
        """
        Read the files again.

        @param patient: whether a key not matching its certificate, when
            only one of the two files changed, is let pass once: the other
            may be about to follow (certbot's symlinks).
        @return: the new pair, to be taken up with L{accept}; C{None} if the
            contents are the pair in use, or if a mismatch is let pass.
        @raise ConfigError: if the new pair cannot be used; the one in use
            stays.
        """
        # Stamped before reading: a change while reading is seen next time.
        stamp = _stamp(self.files)
        try:
            loaded = loadCertificate(self.files, self.key)
        except KeyMismatch:
            if patient and stamp != self._halfSwitched and self._oneFileChanged(stamp):
                self._halfSwitched = stamp
                return None
            self.refuse(stamp)
            raise
        except ConfigError:
            self.refuse(stamp)
            raise
        self._halfSwitched = None
        if loaded.digest == self.current.digest:
            self._stamp, self._refused = stamp, None
            return None
        return Renewal(self, stamp, loaded)

    def accept(self, renewal: Renewal) -> None:
        """
        Use C{renewal}'s pair from now on.
        """
        self.current, self._stamp, self._refused = renewal.loaded, renewal.stamp, None

    def refuse(self, stamp: _Stamp) -> None:
        """
        Do not read the files again until they look different from
        C{stamp}.
        """
        self._refused, self._halfSwitched = stamp, None

    def _oneFileChanged(self, stamp: _Stamp) -> bool:
        certificate, key = stamp
        inUse = self._stamp
        return (certificate != inUse[0]) != (key != inUse[1])


class CertificateReloader:
    """
    Keeps the TLS listeners' certificates current: files are checked every
    C{checkInterval} seconds (0: never) and all re-read by L{reload}
    (SIGHUP); every C{sessionLifetime} seconds (0: never) the contexts are
    rebuilt, replacing their session ticket keys.
    """

    log = Logger()

    def __init__(
        self, listeners: Sequence[ServerTLS], checkInterval: float, sessionLifetime: int, clock: IReactorTime
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
        rebuilt = sum(1 for listener in self.listeners if listener.rebuild())
        self.log.info(
            "TLS session ticket keys replaced on {count} listener{plural} (every {lifetime} s)",
            count=rebuilt,
            plural="" if rebuilt == 1 else "s",
            lifetime=self.sessionLifetime,
        )

    def _refresh(self, force: bool) -> None:
        for listener in self.listeners:
            renewals = []
            for watched in listener.certificates:
                if not force and not watched.changed():
                    continue
                try:
                    renewal = watched.read(patient=not force)
                except ConfigError as error:
                    self.log.error(
                        "listener {listener}: certificate not reloaded, keeping the one in use: {error}",
                        listener=listener.name,
                        error=str(error),
                    )
                    continue
                if renewal is not None:
                    renewals.append(renewal)
            if not renewals:
                continue
            if not listener.rebuild(renewals):
                # Logged by rebuild; tried again when the files change.
                for renewal in renewals:
                    renewal.watched.refuse(renewal.stamp)
                continue
            for renewal in renewals:
                self.log.info(
                    "listener {listener}: certificate reloaded ({key}): {certificate}",
                    listener=listener.name,
                    key=renewal.loaded.key,
                    certificate=renewal.loaded.describe(),
                )
