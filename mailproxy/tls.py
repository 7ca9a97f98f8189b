# -*- test-case-name: tests.test_tls_frontend,tests.test_tls_profile -*-
"""
TLS settings for both sides of the proxy.

Listeners serve a default certificate, and others chosen by the name a
client asks for (SNI: exact names, or C{*.} wildcards for one DNS label,
case insensitive).  A listener's contexts can be swapped while it runs (a
renewed certificate, see L{mailproxy.certificates}): new connections get the
new ones, open ones keep theirs.

Session resumption: session tickets are on, encrypted with the random key
OpenSSL makes for each new context.  pyOpenSSL cannot set or rotate that key
itself, so the contexts are rebuilt every C{server.tls_session_lifetime}
seconds (12 hours by default) and on every certificate reload; a ticket is
good until then and at most that long (the session timeout).  A ticket
older than the current contexts gets a full handshake.  The server keeps no
session cache of its own.

Each certificate has contexts of its own, so its own ticket key: a session
is resumed only under the certificate it was made with (RFC 6066 section 3:
not for another name; names one certificate is for share its sessions).
OpenSSL decides on resumption before its server name callback runs, and
tickets are decrypted with the key of the context a connection was made
from, so a listener with SNI certificates reads the name from the
ClientHello itself (L{mailproxy.clienthello}) and only then makes the
connection, from that certificate's context.

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

import re
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
from mailproxy.certificates import LoadedCertificate, Renewal, WatchedCertificate, parseCertificates, readPEM
from mailproxy.clienthello import ClientHelloReader, Sniffed
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
    sessionLifetime: int = 0


@dataclass(frozen=True)
class _Contexts:
    """
    One generation of a listener's contexts: the default certificate's, and
    those of the certificates chosen by exact names and by wildcards (the
    wildcards' domains).
    """

    default: SSL.Context
    exact: dict[str, SSL.Context]
    wildcards: dict[str, SSL.Context]

    def forName(self, serverName: bytes | None) -> SSL.Context:
        """
        The context of the certificate for C{serverName}, the default one
        if none is for it.
        """
        if not serverName:
            return self.default
        chosen = matchingContext(serverName.decode("ascii", "replace"), self.exact, self.wildcards)
        return self.default if chosen is None else chosen


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
            self._contexts = self._build([watched.current for watched in self.certificates])
        except SSL.Error as error:
            raise ConfigError(f"{key}.tls_ciphers: cannot be used ({error}): {profile.ciphers!r}") from None

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A connection of the current contexts: of the default one when the
        listener has no other certificate, else of the one the client's
        ClientHello asks for (see L{ConnectionByServerName}).
        """
        contexts = self._contexts
        if not contexts.exact and not contexts.wildcards:
            return SSL.Connection(contexts.default, None)
        # It stands in for one: Twisted uses only SSL.Connection's methods.
        return ConnectionByServerName(contexts)  # type: ignore[return-value]

    def getContext(self) -> SSL.Context:
        """
        The current default context.
        """
        return self._contexts.default

    def rebuild(self, renewals: Sequence[Renewal] = ()) -> bool:
        """
        New contexts, with new session ticket keys, from the certificates in
        use and C{renewals}, which are then in use; C{False} (and the error
        logged) if they cannot be built, the old ones and the old
        certificates staying.
        """
        renewed = {id(renewal.watched): renewal.loaded for renewal in renewals}
        try:
            self._contexts = self._build([renewed.get(id(watched), watched.current) for watched in self.certificates])
        except SSL.Error as error:
            self.log.error(
                "listener {listener}: TLS contexts not rebuilt, keeping the ones in use: {error}",
                listener=self.name,
                error=str(error),
            )
            return False
        for renewal in renewals:
            renewal.watched.accept(renewal)
        return True

    def _build(self, pairs: Sequence[LoadedCertificate]) -> _Contexts:
        """
        Contexts for C{pairs}: the default certificate's first, then those
        of L{certificates}' others, in order.
        """
        default, *named = (self._context(pair) for pair in pairs)
        exact: dict[str, SSL.Context] = {}
        wildcards: dict[str, SSL.Context] = {}
        for pair, context in zip(pairs[1:], named, strict=True):
            for name in pair.names:
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], context)
                else:
                    exact.setdefault(name, context)
        contexts = _Contexts(default, exact, wildcards)
        if exact or wildcards:
            # A name the ClientHello reader did not find (OpenSSL reads more
            # forms) still picks its certificate, if not its sessions.
            for context in (default, *named):
                context.set_tlsext_servername_callback(lambda connection: _selectContext(connection, contexts))
        return contexts

    def _context(self, certificate: LoadedCertificate) -> SSL.Context:
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
        # New in every generation, though each context's own ticket key
        # already keeps sessions apart.
        context.set_session_id(secrets.token_hex(16).encode("ascii"))
        if profile.sessionLifetime > 0:
            context.set_timeout(profile.sessionLifetime)
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


# One DNS label (RFC 1123 section 2.1, lower case): what a wildcard stands for.
_DNS_LABEL = re.compile(r"[a-z0-9-]{1,63}")


def matchingContext(
    serverName: str, exact: dict[str, SSL.Context], wildcards: dict[str, SSL.Context]
) -> SSL.Context | None:
    """
    The context for C{serverName}: an exact name first, then a wildcard for
    its first label if that is a DNS label; C{None} if none is for it.
    """
    name = serverName.lower().rstrip(".")
    if name in exact:
        return exact[name]
    label, dot, parent = name.partition(".")
    return wildcards.get(parent) if dot and _DNS_LABEL.fullmatch(label) else None


def _selectContext(connection: SSL.Connection, contexts: _Contexts) -> None:
    context = contexts.forName(connection.get_servername())
    if context is not connection.get_context():
        connection.set_context(context)


class ConnectionByServerName:
    """
    A server's TLS connection made once the client's ClientHello is read,
    from the context of the certificate it asks for, so that certificate's
    ticket key decides on resumption; until then it holds the bytes
    received.  It stands in for an L{SSL.Connection}: any other use before
    the ClientHello is complete makes the connection from the default
    context.
    """

    def __init__(self, contexts: _Contexts) -> None:
        self._contexts = contexts
        self._hello: ClientHelloReader | None = ClientHelloReader()
        self._connection: SSL.Connection | None = None
        self._appData: Any = None

    def set_accept_state(self) -> None:
        """
        Nothing to do: the connection is always a server's.
        """

    def set_app_data(self, data: Any) -> None:
        self._appData = data
        if self._connection is not None:
            self._connection.set_app_data(data)

    def get_app_data(self) -> Any:
        return self._appData

    # Before the ClientHello, what OpenSSL answers too: it needs more bytes.

    def do_handshake(self) -> None:
        self._established().do_handshake()

    def bio_read(self, bufsiz: int) -> bytes:
        return self._established().bio_read(bufsiz)

    def send(self, buf: bytes, flags: int = 0) -> int:
        return self._established().send(buf, flags)

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        return self._established().recv(bufsiz, flags)

    def _established(self) -> SSL.Connection:
        if self._connection is None:
            raise SSL.WantReadError()
        return self._connection

    def bio_write(self, buf: bytes) -> int:
        if self._connection is not None:
            return self._connection.bio_write(buf)
        assert self._hello is not None
        sniffed = self._hello.feed(bytes(buf))
        if sniffed is Sniffed.INCOMPLETE:
            return len(buf)
        self._connect(self._contexts.forName(None if sniffed is Sniffed.NO_NAME else sniffed))
        return len(buf)

    def _connect(self, context: SSL.Context) -> SSL.Connection:
        connection = SSL.Connection(context, None)
        connection.set_accept_state()
        connection.set_app_data(self._appData)
        assert self._hello is not None
        if self._hello.received:
            connection.bio_write(bytes(self._hello.received))
        self._hello, self._connection = None, connection
        return connection

    def __getattr__(self, name: str) -> Any:
        connection = self._connection if self._connection is not None else self._connect(self._contexts.default)
        return getattr(connection, name)


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


def listenerTLS(listener: ListenerConfig, key: str, sessionLifetime: int = 0) -> ServerTLS:
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
    return clientOptions(upstream.verifyName, upstream.caFile, upstream.verify, f"upstream.{upstream.name}")


def clientOptions(name: str, caFile: str | None, verify: bool, key: str) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options for a server called C{name}: its certificate
    verified (chain and name) against C{caFile}, or the system's trust
    store without one, unless C{verify} is false.

    @param key: the configuration's name for these settings, for errors.
    @raise ConfigError: if C{caFile} holds no certificate.
    """
    if not verify:
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if caFile is not None:
        certificates = _certificates(readPEM(caFile, f"{key}.ca_file"), f"{key}.ca_file")
        trustRoot = ssl.trustRootFromCertificates(certificates)
    else:
        trustRoot = ssl.platformTrust()
    return ssl.optionsForClientTLS(name, trustRoot=trustRoot)
