# -*- test-case-name: tests.test_tls -*-
"""
TLS settings for both sides of the proxy.

Upstream connections verify the certificate chain and the host name (with
service_identity) unless a route explicitly says C{verify = false}; there is
no silent fallback to an unverified connection.
"""

from __future__ import annotations

import re

from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_PEM
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailproxy.config import INTERMEDIATE_CIPHERS, ConfigError, UpstreamConfig

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.DOTALL)


def _readPEM(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path!r}: {error.strerror}") from None


def _certificates(pem: bytes, key: str) -> list[ssl.Certificate]:
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ConfigError(f"{key}: no PEM certificate found")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except SSL.Error as error:
        raise ConfigError(f"{key}: invalid certificate: {error}") from None


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def serverOptions(
    certificateFile: str,
    privateKeyFile: str,
    key: str,
    minimumVersion: str = "1.2",
    ciphers: str = INTERMEDIATE_CIPHERS,
) -> ssl.CertificateOptions:
    """
    Server TLS options from PEM files: the leaf certificate first, then its
    chain; the key may be in either file.

    @param key: the configuration key, for error messages.
    @param minimumVersion: the oldest TLS version accepted, C{"1.2"} or
        C{"1.3"}.
    @param ciphers: the OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are
        OpenSSL's, all AEAD with ephemeral keys).
    """
    certificatePEM = _readPEM(certificateFile, f"{key}.certificate")
    keyPEM = _readPEM(privateKeyFile, f"{key}.private_key")
    chain = _certificates(certificatePEM, f"{key}.certificate")
    try:
        privateKey = ssl.KeyPair.load(keyPEM, FILETYPE_PEM)
        leaf = ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], privateKey)
    except (SSL.Error, ValueError) as error:
        raise ConfigError(f"{key}.private_key: invalid private key: {error}") from None
    if not leaf.getPublicKey().matches(privateKey):
        raise ConfigError(f"{key}.private_key: does not match the certificate")
    _checkCiphers(ciphers, f"{key}.tls_ciphers")
    options = ssl.CertificateOptions(
        privateKey=privateKey.original,
        certificate=leaf.original,
        extraCertChain=[certificate.original for certificate in chain[1:]],
        raiseMinimumTo=_VERSIONS[minimumVersion],
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
    )
    try:
        # Twisted builds the context on first use; a cipher list it cannot
        # apply (NULL ciphers only, say) must stop start-up, not every
        # handshake.
        options.getContext()
    except SSL.Error as error:
        raise ConfigError(f"{key}.tls_ciphers: cannot be used ({error}): {ciphers!r}") from None
    return options


def _checkCiphers(ciphers: str, key: str) -> None:
    """
    Refuse a TLS 1.2 cipher list OpenSSL cannot read or that selects
    nothing (Twisted would silently fall back to no ciphers at all).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ConfigError(f"{key}: no cipher this OpenSSL offers matches {ciphers!r}") from None


def upstreamOptions(upstream: UpstreamConfig) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options for C{upstream}: verified unless it says otherwise.
    """
    key = f"upstream.{upstream.name}"
    if not upstream.verify:
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if upstream.caFile is not None:
        certificates = _certificates(_readPEM(upstream.caFile, f"{key}.ca_file"), f"{key}.ca_file")
        trustRoot = ssl.trustRootFromCertificates(certificates)
    else:
        trustRoot = ssl.platformTrust()
    return ssl.optionsForClientTLS(upstream.verifyName, trustRoot=trustRoot)
