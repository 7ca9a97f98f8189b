# -*- test-case-name: tests.test_config -*-
"""
The TOML configuration, read into frozen dataclasses.

Every problem is reported as one L{ConfigError} naming the key, so a broken
configuration stops start-up with one clear line.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import serverFromString

from mailproxy.limits import LimitsConfig
from mailproxy.oauth.settings import MECHANISMS, PRESETS, OAuthConfig, OAuthProvider

LOG_FORMATS = ("text", "json")
TLS_VERSIONS = ("1.2", "1.3")
# Mozilla's "intermediate" server profile (v5.7) for TLS 1.2, without its
# finite-field DHE suites: ECDHE key exchange (forward secrecy) and AEAD
# ciphers only, so no RSA key exchange and no CBC (LUCKY13).  TLS 1.3
# suites are all AEAD with ephemeral keys and are not affected.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


# Password hashing (scrypt, 32 MiB and about 0.1 s of CPU each) runs in its
# own threads; by default on half the cores, so a login flood leaves the
# rest to relayed sessions.
MAX_HASH_THREADS = 64
# OpenSSL's cap on a TLS 1.3 session ticket's lifetime (RFC 8446 4.6.1).
MAX_TLS_SESSION_LIFETIME = 7 * 24 * 3600
# Every rotation rebuilds every listener's contexts: not more often than this.
MIN_TLS_SESSION_LIFETIME = 60
# Each check stats every certificate file, on the reactor thread.
MIN_CERTIFICATE_CHECK_INTERVAL = 1


def defaultHashThreads() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


def defaultWorkers() -> int:
    """
    One worker process per CPU.
    """
    return os.cpu_count() or 1


MAX_WORKERS = 256


def resolvePath(baseDir: str, value: str) -> str:
    """
    A file name from the configuration: C{~} expanded, and a relative name
    taken relative to the configuration file's directory C{baseDir}.
    """
    return os.path.join(baseDir, os.path.expanduser(value))


class ConfigError(Exception):
    """
    The configuration is invalid; the message names the key.
    """


class TLSMode(enum.Enum):
    PLAIN = "plain"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


# A DNS name a listener certificate is chosen for by SNI: letters, digits
# and hyphens in dot-separated labels, or C{*.} and such a name (a wildcard
# for one label).
_SERVER_NAME = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class ListenerCertificate:
    """
    A certificate a listener serves to clients asking for one of C{names}
    (SNI); with no names, for the DNS names the certificate itself lists.
    """

    certificate: str
    privateKey: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerConfig:
    """
    @ivar certificate: the certificate for clients naming no server, or one
        none of C{certificates} is for.
    """

    name: str
    endpoint: str
    tls: TLSMode
    protocol: str = "imap"
    certificate: str | None = None
    privateKey: str | None = None
    certificates: tuple[ListenerCertificate, ...] = ()
    allowPlaintextAuth: bool = False
    filters: tuple[str, ...] = ()
    proxyProtocol: bool = False
    proxyProtocolTrusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tlsMinimumVersion: str = "1.2"
    tlsCiphers: str = INTERMEDIATE_CIPHERS


@dataclass(frozen=True)
class FilterConfig:
    """
    One configured filter: a plugin C{type} and its options.
    """

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    host: str
    port: int
    tls: TLSMode
    caFile: str | None = None
    verify: bool = True
    serverName: str | None = None
    connectTimeout: float = 10.0
    responseTimeout: float = 120.0
    protocol: str = "imap"
    bridgeMailbox: str = "INBOX"
    bridgeUidlFormat: str = "{uid:08x}{uidvalidity:08x}"
    bridgeMarkSeen: bool = False
    bridgeFallbackFolder: str | None = None
    forwardClientAddress: bool = False
    # The OAuth 2.0 provider ([oauth2.NAME]) its users log in upstream with.
    oauth2: str | None = None

    @property
    def verifyName(self) -> str:
        """
        The name the upstream certificate must match.
        """
        return self.serverName or self.host


# [auth] backend: the users file, the embedded default (any other name is
# an account backend plugin's).
USERS_FILE_BACKEND = "users_file"


@dataclass(frozen=True)
class UserRoute:
    """
    Where a user's session goes and with which credentials.

    @ivar username: upstream user name; C{None} reuses the local name.
    @ivar password: upstream password; C{None} reuses the client's
        (passthrough).
    @ivar oauth2: the OAuth 2.0 provider the upstream login takes an access
        token from, instead of a password.
    """

    upstream: str
    username: str | None = None
    password: str | None = None
    filters: tuple[str, ...] | None = None
    oauth2: str | None = None


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    usersFile: str
    defaultRoute: UserRoute | None
    routes: Mapping[str, UserRoute] = field(default_factory=dict)
    authFailureDelay: float = 2.0
    greeting: str = "mailproxy ready."
    preAuthTimeout: float = 60.0
    loginDeadline: float = 60.0
    listenBacklog: int = 1024
    hashThreads: int = field(default_factory=defaultHashThreads)
    authCacheTTL: float = 3600.0
    authCacheSize: int = 10000
    authBackend: str = "users_file"
    authBackendSettings: Mapping[str, Any] = field(default_factory=dict)
    # The configuration file's directory: a backend's relative file names
    # are taken relative to it, as the file's own are.
    directory: str = ""
    lookupTimeout: float = 5.0
    negativeTTL: float = 60.0
    authenticatedTimeout: float = 30 * 60.0
    idlePollInterval: float = 15.0
    idleRefresh: float = 25 * 60.0
    filters: Mapping[str, FilterConfig] = field(default_factory=dict)
    defaultFilters: tuple[str, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logFormat: str = "text"
    metricsListen: str | None = None
    certificateCheckInterval: float = 60.0
    tlsSessionLifetime: int = 12 * 3600
    workers: int = field(default_factory=defaultWorkers)
    oauth2: OAuthConfig | None = None

    def filterNamesFor(
        self, listener: ListenerConfig, username: str | None, own: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        """
        The filter chain of a session: the listener's filters, then (after
        login) the user's own (C{own}, as an account backend gave them, or
        the route's) or the default ones.
        """
        if username is None:
            return listener.filters
        route = self.routes.get(username)
        if own is None:
            own = route.filters if route is not None else None
        return listener.filters + (self.defaultFilters if own is None else own)

    def routeFor(self, username: str) -> UserRoute | None:
        """
        The route of C{username}, or C{None} if it has none.
        """
        return self.routes.get(username, self.defaultRoute)


def loadConfig(path: str) -> Config:
    """
    Read and validate the TOML file at C{path}.

    Relative file names in it are taken relative to the file's directory.

    @raise ConfigError: naming the key and the problem.
    """
    return configFromText(readConfigText(path), path)


def readConfigText(path: str) -> bytes:
    """
    The bytes of the configuration file at C{path}.

    @raise ConfigError: if it cannot be read.
    """
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None


def configFromText(text: bytes, path: str) -> Config:
    """
    Validate C{text}, the configuration file at C{path} as read at some
    time (workers get the one their supervisor last loaded).

    @raise ConfigError: naming the key and the problem.
    """
    try:
        document = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({error.reason} at byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    return parseConfig(document, os.path.dirname(os.path.abspath(path)))


def parseConfig(document: Mapping[str, Any], baseDir: str) -> Config:
    """
    Validate an already-decoded configuration document.
    """
    reader = _Reader(document, "", baseDir)
    _rejectUnknown(
        reader, {"server", "auth", "listener", "upstream", "routing", "filters", "limits", "metrics", "oauth2"}
    )
    server = reader.table("server")
    auth = reader.table("auth")
    _rejectUnknown(
        server,
        {
            "greeting",
            "preauth_timeout",
            "login_deadline",
            "listen_backlog",
            "authenticated_timeout",
            "idle_poll_interval",
            "idle_refresh",
            "log_format",
            "certificate_check_interval",
            "tls_session_lifetime",
            "workers",
        },
    )
    logFormat = server.string("log_format", "text")
    if logFormat not in LOG_FORMATS:
        raise ConfigError(f"server.log_format: {logFormat!r} is not one of {', '.join(LOG_FORMATS)}")
    metrics = reader.table("metrics")
    _rejectUnknown(metrics, {"listen"})
    metricsListen = metrics.string("listen", None)
    if metricsListen is not None:
        _checkEndpoint(metrics, "listen", metricsListen)
    authBackend = auth.string("backend", USERS_FILE_BACKEND) or USERS_FILE_BACKEND
    _rejectUnknown(
        auth,
        {"users_file", "failure_delay", "hash_threads", "cache_ttl", "cache_size", "backend", "lookup_timeout"}
        | {"negative_ttl"}
        | ({authBackend} if authBackend != USERS_FILE_BACKEND else set()),
    )
    lookupTimeout = _positive(auth, "lookup_timeout", Config.lookupTimeout)
    negativeTTL = float(auth.number("negative_ttl", Config.negativeTTL))
    if negativeTTL < 0:
        raise ConfigError(f"{auth.where('negative_ttl')}: must be 0 (off) or more")
    backendSettings = auth.rawTable(authBackend) if authBackend != USERS_FILE_BACKEND else {}
    hashThreads = auth.integer("hash_threads", defaultHashThreads(), 1, MAX_HASH_THREADS)
    authCacheTTL = float(auth.number("cache_ttl", Config.authCacheTTL))
    authCacheSize = auth.integer("cache_size", Config.authCacheSize, 1)
    listenBacklog = server.integer("listen_backlog", Config.listenBacklog, 1, 65535)
    workers = server.integer("workers", defaultWorkers(), 1, MAX_WORKERS)
    certificateCheckInterval = float(server.number("certificate_check_interval", Config.certificateCheckInterval))
    if 0 < certificateCheckInterval < MIN_CERTIFICATE_CHECK_INTERVAL:
        raise ConfigError(
            f"{server.where('certificate_check_interval')}: must be 0 (never) or at least {MIN_CERTIFICATE_CHECK_INTERVAL}"
        )
    tlsSessionLifetime = server.number("tls_session_lifetime", Config.tlsSessionLifetime)
    if tlsSessionLifetime != int(tlsSessionLifetime) or (
        tlsSessionLifetime != 0 and not MIN_TLS_SESSION_LIFETIME <= tlsSessionLifetime <= MAX_TLS_SESSION_LIFETIME
    ):
        raise ConfigError(
            f"{server.where('tls_session_lifetime')}: must be 0 (off) or an integer "
            f"from {MIN_TLS_SESSION_LIFETIME} to {MAX_TLS_SESSION_LIFETIME}"
        )

    upstreams = {}
    upstreamTables = reader.table("upstream")
    for name in upstreamTables.keys():
        upstreams[name] = _upstream(name, upstreamTables.table(name))
    if not upstreams:
        raise ConfigError("upstream: at least one [upstream.NAME] table is required")
    oauth2 = _oauth2(reader.table("oauth2")) if "oauth2" in reader.keys() else None
    for name, upstreamConfig in upstreams.items():
        _checkProvider(upstreamTables.table(name), upstreamConfig.oauth2, oauth2)

    filters = {}
    filterTables = reader.table("filters")
    for name in filterTables.keys():
        filters[name] = _filter(name, filterTables.table(name))
    listeners = tuple(_listener(item, filters) for item in reader.tableArray("listener"))
    if not listeners:
        raise ConfigError("listener: at least one [[listener]] is required")
    names = [listener.name for listener in listeners]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"listener: name {name!r} is used twice")

    routing = reader.table("routing")
    _rejectUnknown(routing, {"default_upstream", "default_password", "default_filters", "users"})
    defaultRoute = None
    defaultUpstream = routing.string("default_upstream", None)
    if defaultUpstream is not None:
        _checkUpstream(routing, "default_upstream", defaultUpstream, upstreams)
        defaultRoute = UserRoute(
            defaultUpstream,
            None,
            _password(routing, "default_password"),
            oauth2=upstreams[defaultUpstream].oauth2,
        )
    routes = {}
    userTables = routing.table("users")
    for user in userTables.keys():
        table = userTables.table(user)
        _rejectUnknown(table, {"upstream", "username", "password", "filters", "oauth2"})
        upstream = table.string("upstream", defaultUpstream)
        if upstream is None:
            raise ConfigError(f"{table.where('upstream')}: required (no routing.default_upstream)")
        _checkUpstream(table, "upstream", upstream, upstreams)
        provider = table.string("oauth2", upstreams[upstream].oauth2)
        _checkProvider(table, provider, oauth2)
        password = _password(table, "password")
        if provider is not None and password is not None:
            raise ConfigError(f"{table.where('password')}: not with oauth2 (the upstream login takes a token)")
        routes[user] = UserRoute(
            upstream,
            table.string("username", None),
            password,
            _filterNames(table, filters) if "filters" in table.keys() else None,
            provider,
        )

    greeting = server.string("greeting", "mailproxy ready.") or "mailproxy ready."
    if not greeting.isascii() or not greeting.isprintable():
        raise ConfigError("server.greeting: must be printable ASCII on one line")
    return Config(
        listeners=listeners,
        upstreams=upstreams,
        usersFile=auth.path("users_file", required=authBackend == USERS_FILE_BACKEND) or "",
        authBackend=authBackend,
        authBackendSettings=backendSettings,
        directory=baseDir,
        lookupTimeout=lookupTimeout,
        negativeTTL=negativeTTL,
        defaultRoute=defaultRoute,
        routes=routes,
        authFailureDelay=auth.number("failure_delay", 2.0),
        greeting=greeting,
        preAuthTimeout=_positive(server, "preauth_timeout", 60.0),
        loginDeadline=_positive(server, "login_deadline", 60.0),
        listenBacklog=listenBacklog,
        hashThreads=hashThreads,
        workers=workers,
        authCacheTTL=authCacheTTL,
        authCacheSize=authCacheSize,
        authenticatedTimeout=_positive(server, "authenticated_timeout", 30 * 60.0),
        idlePollInterval=_positive(server, "idle_poll_interval", 15.0),
        idleRefresh=_positive(server, "idle_refresh", 25 * 60.0),
        filters=filters,
        defaultFilters=_filterNames(routing, filters, "default_filters"),
        limits=_limits(reader.table("limits")),
        logFormat=logFormat,
        metricsListen=metricsListen,
        certificateCheckInterval=certificateCheckInterval,
        tlsSessionLifetime=int(tlsSessionLifetime),
        oauth2=oauth2,
    )


# Shorter lines would refuse ordinary clients' UID sets.
MIN_LINE_LENGTH = 1024
# A login's literals are short; the proxy holds a whole pre-login command
# (128 KiB at most), two such literals included.
MAX_PREAUTH_LITERAL = 65536


def _limits(table: _Reader) -> LimitsConfig:
    keys = {
        "max_connections": "maxConnections",
        "max_connections_per_ip": "maxConnectionsPerIP",
        "max_sessions_per_user": "maxSessionsPerUser",
        "failure_window": "failureWindow",
        "failures_before_lockout": "failuresBeforeLockout",
        "lockout_seconds": "lockoutSeconds",
        "max_line_length": "maxLineLength",
        "max_preauth_literal": "maxPreauthLiteral",
        "known_network_seconds": "knownNetworkSeconds",
    }
    _rejectUnknown(table, set(keys))
    values: dict[str, Any] = {}
    for key, attribute in keys.items():
        default = getattr(LimitsConfig, attribute)
        value = table.number(key, default)
        if not value:
            raise ConfigError(f"{table.where(key)}: must be greater than 0")
        if isinstance(default, int) and value != int(value):
            raise ConfigError(f"{table.where(key)}: must be a whole number")
        values[attribute] = type(default)(value)
    if values["maxLineLength"] < MIN_LINE_LENGTH:
        raise ConfigError(f"{table.where('max_line_length')}: must be at least {MIN_LINE_LENGTH}")
    if values["maxPreauthLiteral"] > MAX_PREAUTH_LITERAL:
        raise ConfigError(f"{table.where('max_preauth_literal')}: must be at most {MAX_PREAUTH_LITERAL}")
    return LimitsConfig(**values)


def _filter(name: str, table: _Reader) -> FilterConfig:
    kind = table.string("type", None)
    if not kind:
        raise ConfigError(f'{table.where("type")}: required (the filter plugin\'s name, e.g. "audit")')
    options = {}
    for key in table.keys():
        if key == "type":
            continue
        value = table.raw(key)
        # Files named in filter options live next to the configuration too.
        if key == "file" or key.endswith("_file"):
            value = table.path(key)
        options[key] = value
    return FilterConfig(name, kind, options)


def _filterNames(table: _Reader, filters: Mapping[str, FilterConfig], key: str = "filters") -> tuple[str, ...]:
    names = table.stringList(key)
    for name in names:
        if name not in filters:
            raise ConfigError(f"{table.where(key)}: no filter named {name!r} (define it in [filters.{name}])")
    return names


def _positive(table: _Reader, key: str, default: float) -> float:
    value = table.number(key, default)
    if not value:
        raise ConfigError(f"{table.where(key)}: must be greater than 0")
    return float(value)


def _password(table: _Reader, key: str) -> str | None:
    value = table.string(key, "passthrough")
    return None if value == "passthrough" else value


def _checkUpstream(table: _Reader, key: str, name: str, upstreams: Mapping[str, UpstreamConfig]) -> None:
    if name not in upstreams:
        raise ConfigError(f"{table.where(key)}: no upstream named {name!r}")


def _listener(table: _Reader, filters: Mapping[str, FilterConfig]) -> ListenerConfig:
    _rejectUnknown(
        table,
        {
            "name",
            "protocol",
            "endpoint",
            "tls",
            "certificate",
            "private_key",
            "allow_plaintext_auth",
            "filters",
            "proxy_protocol",
            "proxy_protocol_trusted",
            "tls_min_version",
            "tls_ciphers",
            "certificates",
        },
    )
    endpoint = table.string("endpoint", None)
    if endpoint is None:
        raise ConfigError(f"{table.where('endpoint')}: required (a Twisted endpoint string, e.g. tcp:143)")
    _checkEndpoint(table, "endpoint", endpoint)
    protocol = table.string("protocol", "imap")
    if protocol not in ("imap", "pop3"):
        raise ConfigError(f"{table.where('protocol')}: {protocol!r} is not one of imap, pop3")
    tls = _tlsMode(table)
    certificate = table.path("certificate")
    privateKey = table.path("private_key") or certificate
    if tls is not TLSMode.PLAIN:
        if certificate is None:
            raise ConfigError(f"{table.where('certificate')}: required when tls = {tls.value!r}")
        for key, value in (("certificate", certificate), ("private_key", privateKey)):
            if value is not None and not os.path.isfile(value):
                raise ConfigError(f"{table.where(key)}: no such file {value!r}")
    proxyProtocol = table.boolean("proxy_protocol", False)
    trusted = _networks(table, "proxy_protocol_trusted")
    if trusted and not proxyProtocol:
        raise ConfigError(f"{table.where('proxy_protocol_trusted')}: needs proxy_protocol = true")
    if proxyProtocol and not trusted:
        # Believed from anyone, a header lets any client pick its address
        # (per-IP limits, lockouts, what is forwarded upstream).
        raise ConfigError(
            f"{table.where('proxy_protocol_trusted')}: required with proxy_protocol = true: the load "
            'balancers\' addresses (["0.0.0.0/0", "::/0"] believes anyone)'
        )
    if tls is TLSMode.PLAIN:
        for key in ("tls_min_version", "tls_ciphers", "certificates"):
            if key in table.keys():
                raise ConfigError(f"{table.where(key)}: only for listeners with tls = starttls or implicit")
    certificates = tuple(_listenerCertificate(entry) for entry in table.tableArray("certificates"))
    _checkServerNames(table, certificates)
    minimumVersion = table.string("tls_min_version", "1.2") or ""
    if minimumVersion not in TLS_VERSIONS:
        raise ConfigError(
            f"{table.where('tls_min_version')}: {minimumVersion!r} is not one of {', '.join(TLS_VERSIONS)}"
        )
    ciphers = table.string("tls_ciphers", INTERMEDIATE_CIPHERS) or ""
    if not ciphers.isascii() or not ciphers.strip():
        raise ConfigError(f"{table.where('tls_ciphers')}: must be an OpenSSL cipher list")
    return ListenerConfig(
        name=table.string("name", None) or endpoint,
        endpoint=endpoint,
        tls=tls,
        protocol=protocol,
        certificate=certificate,
        privateKey=privateKey,
        certificates=certificates,
        allowPlaintextAuth=table.boolean("allow_plaintext_auth", False),
        filters=_filterNames(table, filters),
        proxyProtocol=proxyProtocol,
        proxyProtocolTrusted=trusted,
        tlsMinimumVersion=minimumVersion,
        tlsCiphers=ciphers,
    )


def _listenerCertificate(table: _Reader) -> ListenerCertificate:
    """
    One entry of a listener's C{certificates}: C{certificate},
    C{private_key} (the certificate file if not given) and C{names}.
    """
    _rejectUnknown(table, {"names", "certificate", "private_key"})
    certificate = table.path("certificate", required=True) or ""
    privateKey = table.path("private_key") or certificate
    for key, value in (("certificate", certificate), ("private_key", privateKey)):
        if not os.path.isfile(value):
            raise ConfigError(f"{table.where(key)}: no such file {value!r}")
    names = tuple(name.lower().rstrip(".") for name in table.stringList("names"))
    for name in names:
        if len(name) > 253 or not _SERVER_NAME.fullmatch(name):
            raise ConfigError(
                f"{table.where('names')}: {name!r} is not a DNS name (or *. and one, for any one label in its place)"
            )
    return ListenerCertificate(certificate, privateKey, names)


def _checkServerNames(table: _Reader, certificates: tuple[ListenerCertificate, ...]) -> None:
    """
    Refuse a name given to two certificates: which one a client gets would
    depend on their order.
    """
    owners: dict[str, int] = {}
    for index, entry in enumerate(certificates):
        for name in entry.names:
            if owners.setdefault(name, index) != index:
                raise ConfigError(
                    f"{table.where('certificates')}[{index}].names: {name!r} is already "
                    f"given to certificates[{owners[name]}]"
                )


def _networks(table: _Reader, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for text in table.stringList(key):
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as error:
            raise ConfigError(f"{table.where(key)}: {error}") from None
    return tuple(networks)


def _checkEndpoint(table: _Reader, key: str, endpoint: str) -> None:
    try:
        # Parsing builds the endpoint object without touching a reactor.
        serverFromString(None, endpoint)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ConfigError(f"{table.where(key)}: invalid endpoint {endpoint!r}: {error}") from None


def _upstream(name: str, table: _Reader) -> UpstreamConfig:
    _rejectUnknown(
        table,
        {
            "host",
            "port",
            "tls",
            "ca_file",
            "verify",
            "server_name",
            "connect_timeout",
            "response_timeout",
            "protocol",
            "bridge_mailbox",
            "bridge_uidl_format",
            "bridge_mark_seen",
            "bridge_fallback_folder",
            "forward_client_address",
            "oauth2",
        },
    )
    host = table.string("host", None)
    if not host:
        raise ConfigError(f"{table.where('host')}: required")
    port = table.number("port", None)
    if port is None or port != int(port) or not 0 < port < 65536:
        raise ConfigError(f"{table.where('port')}: required, an integer from 1 to 65535")
    caFile = table.path("ca_file")
    if caFile is not None and not os.path.isfile(caFile):
        raise ConfigError(f"{table.where('ca_file')}: no such file {caFile!r}")
    protocol = table.string("protocol", "imap")
    if protocol not in ("imap", "pop3"):
        raise ConfigError(f"{table.where('protocol')}: {protocol!r} is not one of imap, pop3")
    forwardClientAddress = table.boolean("forward_client_address", False)
    if forwardClientAddress and protocol != "imap":
        raise ConfigError(f"{table.where('forward_client_address')}: only for IMAP upstreams (sent with IMAP ID)")
    uidlFormat = table.string("bridge_uidl_format", UpstreamConfig.bridgeUidlFormat) or ""
    try:
        sample = uidlFormat.format(uid=4294967295, uidvalidity=4294967295)
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"{table.where('bridge_uidl_format')}: invalid format: {error}") from None
    if not 0 < len(sample) <= 70 or not all(0x21 <= ord(char) <= 0x7E for char in sample):
        raise ConfigError(
            f"{table.where('bridge_uidl_format')}: must give 1 to 70 printable characters "
            "from {uid} and {uidvalidity} (RFC 1939 UIDL)"
        )
    return UpstreamConfig(
        name=name,
        host=host,
        port=int(port),
        tls=_tlsMode(table),
        caFile=caFile,
        verify=table.boolean("verify", True),
        serverName=table.string("server_name", None),
        connectTimeout=table.number("connect_timeout", 10.0),
        responseTimeout=_positive(table, "response_timeout", 120.0),
        protocol=protocol,
        bridgeMailbox=table.string("bridge_mailbox", "INBOX") or "INBOX",
        bridgeUidlFormat=uidlFormat,
        bridgeMarkSeen=table.boolean("bridge_mark_seen", False),
        bridgeFallbackFolder=table.string("bridge_fallback_folder", None),
        forwardClientAddress=forwardClientAddress,
        oauth2=table.string("oauth2", None),
    )


# Keys of [oauth2] itself; every other key names a provider's table.
_OAUTH2_KEYS = {"token_store", "key_file", "timeout", "refresh_margin"}
_PROVIDER_KEYS = {
    "preset",
    "tenant",
    "token_endpoint",
    "device_authorization_endpoint",
    "authorization_endpoint",
    "client_id",
    "client_secret",
    "scopes",
    "mechanism",
}


def _oauth2(table: _Reader) -> OAuthConfig:
    providers = {}
    for key in table.keys():
        if key in _OAUTH2_KEYS:
            continue
        if not isinstance(table.raw(key), dict):
            raise ConfigError(
                f"{table.where(key)}: unknown key, and not a provider's table [oauth2.NAME] "
                f"(expected one of {', '.join(sorted(_OAUTH2_KEYS))})"
            )
        providers[key] = _provider(key, table.table(key))
    return OAuthConfig(
        tokenStore=table.path("token_store", required=True) or "",
        keyFile=table.path("key_file", required=True) or "",
        providers=providers,
        timeout=_positive(table, "timeout", OAuthConfig.timeout),
        refreshMargin=float(table.number("refresh_margin", OAuthConfig.refreshMargin)),
    )


def _provider(name: str, table: _Reader) -> OAuthProvider:
    _rejectUnknown(table, _PROVIDER_KEYS)
    presetName = table.string("preset", "generic") or "generic"
    if presetName not in PRESETS:
        raise ConfigError(f"{table.where('preset')}: {presetName!r} is not one of {', '.join(PRESETS)}")
    preset = PRESETS[presetName]
    tenant = table.string("tenant", "common") or "common"

    def endpoint(key: str, required: bool = False) -> str | None:
        value = table.string(key, preset.get(key))
        if value is None:
            if required:
                raise ConfigError(f"{table.where(key)}: required (no preset gives it)")
            return None
        value = value.replace("{tenant}", tenant)
        parsed = urllib.parse.urlsplit(value)
        loopback = parsed.hostname in ("127.0.0.1", "::1", "localhost")
        if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
            raise ConfigError(f"{table.where(key)}: must be an https URL (http only on loopback)")
        return value

    clientId = table.string("client_id", None)
    if not clientId:
        raise ConfigError(f"{table.where('client_id')}: required (from the provider's app registration)")
    mechanism = (table.string("mechanism", preset.get("mechanism", "xoauth2")) or "").lower()
    if mechanism not in MECHANISMS:
        raise ConfigError(f"{table.where('mechanism')}: {mechanism!r} is not one of {', '.join(MECHANISMS)}")
    scopes = table.stringList("scopes") if "scopes" in table.keys() else tuple(preset.get("scopes", ()))
    return OAuthProvider(
        name=name,
        tokenEndpoint=endpoint("token_endpoint", required=True) or "",
        clientId=clientId,
        clientSecret=table.string("client_secret", None),
        scopes=scopes,
        deviceAuthorizationEndpoint=endpoint("device_authorization_endpoint"),
        authorizationEndpoint=endpoint("authorization_endpoint"),
        mechanism=mechanism,
        deviceFlowAllowed=preset.get("deviceFlowAllowed", True),
    )


def _checkProvider(table: _Reader, provider: str | None, oauth2: OAuthConfig | None) -> None:
    if provider is None:
        return
    if oauth2 is None:
        raise ConfigError(f"{table.where('oauth2')}: no [oauth2] table (token_store, key_file, providers)")
    if provider not in oauth2.providers:
        raise ConfigError(f"{table.where('oauth2')}: no provider [oauth2.{provider}]")


def _tlsMode(table: _Reader) -> TLSMode:
    value = table.string("tls", "plain")
    try:
        return TLSMode(value)
    except ValueError:
        raise ConfigError(f"{table.where('tls')}: {value!r} is not one of plain, starttls, implicit") from None


def _rejectUnknown(table: _Reader, known: set[str]) -> None:
    for key in table.keys():
        if key not in known:
            raise ConfigError(f"{table.where(key)}: unknown key (expected one of {', '.join(sorted(known))})")


class _Reader:
    """
    Typed access to one TOML table, with its dotted location for messages.
    """

    def __init__(self, data: Mapping[str, Any], location: str, baseDir: str) -> None:
        self._data = data
        self._location = location
        self._baseDir = baseDir

    def where(self, key: str) -> str:
        return f"{self._location}.{key}" if self._location else key

    def keys(self) -> list[str]:
        return list(self._data)

    def table(self, key: str) -> _Reader:
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: must be a table")
        return _Reader(value, self.where(key), self._baseDir)

    def rawTable(self, key: str) -> dict[str, Any]:
        """
        The table C{key} as it is (a plugin's settings, checked by the
        plugin).
        """
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: must be a table")
        return dict(value)

    def tableArray(self, key: str) -> list[_Reader]:
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f"{self.where(key)}: must be an array of tables ([[{key}]])")
        return [_Reader(item, f"{self.where(key)}[{index}]", self._baseDir) for index, item in enumerate(value)]

    def string(self, key: str, default: str | None) -> str | None:
        value = self._data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: must be a string")
        return value

    def raw(self, key: str) -> Any:
        return self._data[key]

    def stringList(self, key: str) -> tuple[str, ...]:
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{self.where(key)}: must be a list of strings")
        return tuple(value)

    def number(self, key: str, default: Any) -> Any:
        value = self._data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{self.where(key)}: must be a non-negative number")
        # TOML has nan and inf; no setting means either.
        if not math.isfinite(value):
            raise ConfigError(f"{self.where(key)}: must be a finite number")
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        """
        A whole number from C{minimum} to C{maximum} (or more, without one).
        """
        value = self.number(key, default)
        if value != int(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise ConfigError(f"{self.where(key)}: must be an integer {bound}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where(key)}: must be true or false")
        return value

    def path(self, key: str, required: bool = False) -> str | None:
        value = self.string(key, None)
        if value is None:
            if required:
                raise ConfigError(f"{self.where(key)}: required")
            return None
        return resolvePath(self._baseDir, value)
