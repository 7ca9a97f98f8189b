# -*- test-case-name: tests.test_tls_frontend,tests.test_tls_profile -*-
"""
TLS settings for both sides of the proxy.

Listeners serve a default certificate, and others chosen by the name a
client asks for (SNI: exact names, or C{*.} wildcards for one label, case
insensitive).  A listener's contexts can be swapped while it runs (a
renewed certificate, see L{mailproxy.certificates}): new connections get the
new ones, open ones keep theirs.

Session resumption: session tickets are on, encrypted with the random key
OpenSSL makes for each new context.  pyOpenSSL cannot set or rotate that key
itself, so the contexts are rebuilt every C{server.tls_session_lifetime}
seconds (12 hours by default) and on every certificate reload; a ticket is
good until then and at most that long (the session timeout).  A ticket
older than the current contexts gets a full handshake.  The server keeps no
session cache of its own.

ALPN (RFC 7301): a listener takes C{imap} or C{pop3} as its protocol name;
a client offering only other protocols (C{h2}, C{http/1.1}, another mail
protocol) is refused with a C{no_application_protocol} alert, so a TLS
session meant for another server cannot be redirected here (ALPACA).  A
client offering no ALPN at all is served.

Upstream connections verify the certificate chain and the host name (with
service_identity) unless a route explicitly says C{verify = false}; there is
no silent fallback to an unverified connection.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailproxy.addresses import clientAddressOf
from mailproxy.certificates import LoadedCertificate, WatchedCertificate, parseCertificates, readPEM
from mailproxy.config import INTERMEDIATE_CIPHERS, ConfigError, ListenerCertificate, ListenerConfig, UpstreamConfig
from mailproxy.logs import loggedName


def _certificates(pem: bytes, key: str) -> list[ssl.Certificate]:
    return [ssl.Certificate(crypto.X509.from_cryptography(item)) for item in parseCertificates(pem, key)]


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# The RFC 7301 registry's names of the listeners' protocols.
APPLICATION_PROTOCOLS = {"imap": b"imap", "pop3": b"pop3"}
# How much of a refused ALPN offer is logged.
_LOGGED_PROTOCOLS = 8


@dataclass(frozen=True)
class TLSProfile:
    """
    What a listener's TLS contexts share, whatever the certificate.

    @ivar minimumVersion: the oldest TLS version accepted, C{"1.2"} or
        C{"1.3"}.
    @ivar ciphers: the OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are
        OpenSSL's, all AEAD with ephemeral keys).
    @ivar applicationProtocol: the ALPN protocol name a client offering
        ALPN must offer, or C{None} to ignore ALPN.
    @ivar sessionLifetime: seconds a session may be resumed; 0 turns
        resumption off.
    """

    minimumVersion: str = "1.2"
    ciphers: str = INTERMEDIATE_CIPHERS
    applicationProtocol: bytes | None = None
    sessionLifetime: float = 0.0


class NoSharedApplicationProtocol(SSL.Error):
    """
    The client's ALPN offer does not include the listener's protocol.
    """


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    A listener's TLS server side, for implicit TLS (L{TLSMemoryBIOFactory})
    and STARTTLS (C{transport.startTLS}) alike: it makes each connection
    from the current contexts, which L{rebuild} replaces.

    @ivar name: the listener's name, for logs.
    @ivar certificates: the default certificate first, then those chosen by
        server name, in their configured order.
    """

    log = Logger()

    def __init__(self, name: str, key: str, profile: TLSProfile, certificates: Sequence[WatchedCertificate]) -> None:
        """
        @param key: the listener's configuration key, for error messages.
        @raise ConfigError: if the profile cannot be used.
        """
        self.name = name
        self.key = key
        self.profile = profile
        self.certificates = list(certificates)
        _checkCiphers(profile.ciphers, f"{key}.tls_ciphers")
        self._ciphers = ssl.AcceptableCiphers.fromOpenSSLCipherString(profile.ciphers)
        try:
            # Twisted builds the context on first use; a cipher list it
            # cannot apply (NULL ciphers only, say) must stop start-up, not
            # every handshake.
            self._default = self._build()
        except SSL.Error as error:
            raise ConfigError(f"{key}.tls_ciphers: cannot be used ({error}): {profile.ciphers!r}") from None

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A connection of the current default context (which switches to
        another by SNI).
        """
        return SSL.Connection(self._default, None)

    def getContext(self) -> SSL.Context:
        """
        The current default context.
        """
        return self._default

    def rebuild(self) -> bool:
        """
        New contexts from the current certificates, with a new session ticket
        key; C{False} (and the error logged) if they cannot be built, the
        old ones staying.
        """
        try:
            self._default = self._build()
        except SSL.Error as error:
            self.log.error(
                "listener {listener}: TLS contexts not rebuilt, keeping the ones in use: {error}",
                listener=self.name,
                error=str(error),
            )
            return False
        return True

    def _build(self) -> SSL.Context:
        # One session ID context for every context of a generation, so a
        # session made after an SNI switch is found again.
        sessionIDContext = secrets.token_hex(16).encode("ascii")
        default, *named = (self._context(watched.current, sessionIDContext) for watched in self.certificates)
        exact: dict[str, SSL.Context] = {}
        wildcards: dict[str, SSL.Context] = {}
        for watched, context in zip(self.certificates[1:], named, strict=True):
            for name in watched.current.names:
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], context)
                else:
                    exact.setdefault(name, context)
        if exact or wildcards:
            default.set_tlsext_servername_callback(lambda connection: _selectContext(connection, exact, wildcards))
        return default

    def _context(self, certificate: LoadedCertificate, sessionIDContext: bytes) -> SSL.Context:
        profile = self.profile
        options = ssl.CertificateOptions(
            privateKey=certificate.privateKey,
            certificate=certificate.chain[0],
            extraCertChain=list(certificate.chain[1:]),
            raiseMinimumTo=_VERSIONS[profile.minimumVersion],
            acceptableCiphers=self._ciphers,
            enableSessionTickets=profile.sessionLifetime > 0,
        )
        context = options.getContext()
        context.set_session_id(sessionIDContext)
        if profile.sessionLifetime > 0:
            context.set_timeout(int(profile.sessionLifetime))
        if profile.applicationProtocol is not None:
            context.set_alpn_select_callback(self._selectProtocol)
        return context

    def _selectProtocol(self, connection: SSL.Connection, offered: list[bytes]) -> bytes:
        """
        The listener's protocol if the client offers it; otherwise the
        handshake is refused (pyOpenSSL answers a callback's exception with
        a C{no_application_protocol} alert, and raises it from the
        handshake).
        """
        wanted = self.profile.applicationProtocol
        assert wanted is not None
        if wanted in offered:
            return wanted
        # The names are the client's: encoded so they cannot forge a field or a line.
        shown = ", ".join(loggedName(protocol) for protocol in offered[:_LOGGED_PROTOCOLS])
        self.log.warn(
            "{client} refused on listener {listener}: its TLS handshake asks for {offered} (ALPN), not {wanted}",
            client=_clientOf(connection),
            listener=self.name,
            offered=shown + (", ..." if len(offered) > _LOGGED_PROTOCOLS else ""),
            wanted=wanted.decode("ascii"),
        )
        # In OpenSSL's error queue form, which Twisted's TLS reads.
        raise NoSharedApplicationProtocol([("SSL routines", "", "no application protocol")])


def matchingContext(
    serverName: str, exact: dict[str, SSL.Context], wildcards: dict[str, SSL.Context]
) -> SSL.Context | None:
    """
    The context for C{serverName}: an exact name first, then a wildcard for
    its first label; C{None} if none is for it.
    """
    name = serverName.lower().rstrip(".")
    if name in exact:
        return exact[name]
    _, dot, parent = name.partition(".")
    return wildcards.get(parent) if dot else None


def _selectContext(
    connection: SSL.Connection, exact: dict[str, SSL.Context], wildcards: dict[str, SSL.Context]
) -> None:
    serverName = connection.get_servername()
    if not serverName:
        return
    context = matchingContext(serverName.decode("ascii", "replace"), exact, wildcards)
    if context is not None:
        connection.set_context(context)


def _clientOf(connection: SSL.Connection) -> str:
    """
    The client address a TLS connection's protocol logs under.
    """
    tlsProtocol = connection.get_app_data()
    protocol = getattr(tlsProtocol, "wrappedProtocol", None)
    # Below TLS: the front end, maybe behind the PROXY protocol wrapper.
    for _ in range(3):
        address = getattr(protocol, "clientAddress", None)
        if isinstance(address, str) and address != "?":
            return address
        protocol = getattr(protocol, "wrappedProtocol", None)
    try:
        return str(clientAddressOf(tlsProtocol))
    except AttributeError:
        return "?"


def listenerTLS(listener: ListenerConfig, key: str, sessionLifetime: float = 0.0) -> ServerTLS:
    """
    The TLS server side of C{listener}: its default certificate and those
    chosen by server name.

    @param key: the listener's configuration key (C{listener[0]}), for
        error messages.
    @param sessionLifetime: C{server.tls_session_lifetime}.
    @raise ConfigError: if a certificate, key or TLS setting cannot be used.
    """
    assert listener.certificate is not None and listener.privateKey is not None
    default = WatchedCertificate(ListenerCertificate(listener.certificate, listener.privateKey), key)
    named = [
        WatchedCertificate(entry, f"{key}.certificates[{index}]") for index, entry in enumerate(listener.certificates)
    ]
    for watched in named:
        if not watched.current.names:
            raise ConfigError(f"{watched.key}.names: required (the certificate has no DNS subjectAltName)")
    profile = TLSProfile(
        listener.tlsMinimumVersion,
        listener.tlsCiphers,
        APPLICATION_PROTOCOLS[listener.protocol],
        sessionLifetime,
    )
    return ServerTLS(listener.name, key, profile, [default, *named])


def serverOptions(
    certificateFile: str,
    privateKeyFile: str,
    key: str,
    minimumVersion: str = "1.2",
    ciphers: str = INTERMEDIATE_CIPHERS,
) -> ServerTLS:
    """
    Server TLS from PEM files: the leaf certificate first, then its chain;
    the key may be in either file.  No ALPN check, no resumption.

    @param key: the configuration key, for error messages.
    """
    watched = WatchedCertificate(ListenerCertificate(certificateFile, privateKeyFile), key)
    return ServerTLS(key, key, TLSProfile(minimumVersion, ciphers), [watched])


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
        certificates = _certificates(readPEM(upstream.caFile, f"{key}.ca_file"), f"{key}.ca_file")
        trustRoot = ssl.trustRootFromCertificates(certificates)
    else:
        trustRoot = ssl.platformTrust()
    return ssl.optionsForClientTLS(upstream.verifyName, trustRoot=trustRoot)
