# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd mailproxy} plugin: options and service construction.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.components import Componentized

from mailproxy.accounts.checker import AccountChecker
from mailproxy.accounts.registry import BackendContext, buildBackend
from mailproxy.auth import HashPoolService, ProxyRealm, UsersFileChecker, threadRunner
from mailproxy.certificates import CertificateReloader
from mailproxy.config import (
    USERS_FILE_BACKEND,
    Config,
    ConfigError,
    TLSMode,
    UpstreamConfig,
    configFromText,
    readConfigText,
)
from mailproxy.credentialscache import CredentialsCache
from mailproxy.epolldispatch import dispatchWithoutLogContext
from mailproxy.filters.registry import buildFilters, chainFactory
from mailproxy.frontdoor import liveConnections
from mailproxy.imap.server import IMAPServerFactory, ServerContext
from mailproxy.imap.upstream import connectUpstream
from mailproxy.limits import Limits
from mailproxy.logs import jsonLinesObserver, syslogObserver, textLinesObserver, twistdLogFile
from mailproxy.oauth.login import TokenSource, loginWith
from mailproxy.oauth.sasl import Bearer
from mailproxy.oauth.settings import OAuthLogin
from mailproxy.oauth.store import TokenStoreError
from mailproxy.oauth.tokens import AccessTokens, RemoteAccessTokens
from mailproxy.options import Options
from mailproxy.passwords import UsersFileError
from mailproxy.pop3.bridge import openMaildrop
from mailproxy.pop3.server import POP3Backends, POP3ServerFactory
from mailproxy.pop3.upstream import connectPOP3Upstream
from mailproxy.proxyprotocol import ProxyProtocolFactory
from mailproxy.reload import ConfigReloader, Reloader, SupervisorReloader
from mailproxy.sharedlimits import SharedLimits
from mailproxy.tls import ServerTLS, listenerTLS, upstreamOptions
from mailproxy.worker import WorkerLink
from mailproxy.workers import InheritedListener, WorkerPool

log = Logger()
PRUNE_INTERVAL = 300.0
# How long a client may take to read its goodbye when the proxy stops.
SHUTDOWN_GRACE = 1.0


# What checks a login's password: the users file, or an account backend.
Checker = UsersFileChecker | AccountChecker


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build one service per listener.

    A broken configuration ends start-up with one line naming the problem.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    dispatchWithoutLogContext(reactor)
    try:
        # Read once: with workers, they load this same text.
        configText = readConfigText(options["config"])
        config = configFromText(configText, options["config"])
        raiseFileLimit()
        if config.workers > 1:
            service = buildSupervisor(config, reactor, options["config"], configText)
        else:
            service = buildService(config, reactor, configPath=options["config"])
    except (ConfigError, UsersFileError) as error:
        raise SystemExit(f"mailproxy: configuration error: {error}") from None
    # twistd's own options (--logfile, -n) say where the log goes.
    twistdOptions = getattr(options, "parent", None)
    destination = twistdLogFile(twistdOptions)
    toSyslog = syslogObserver(twistdOptions)
    if toSyslog is not None:
        service.logObserver = toSyslog
    if destination is not None:
        observer = jsonLinesObserver if config.logFormat == "json" else textLinesObserver
        service.logObserver = observer(destination)
        if service.workerPool is not None:
            # Workers write lines in the same format, passed on as they are.
            service.workerPool.logDestination = destination
    return service


class ListenersService(MultiService):
    """
    The proxy's listeners; a port that cannot be bound stops start-up with
    one line naming the listener.  SIGHUP reloads the configuration (see
    L{mailproxy.reload}) and the listeners' certificates (see
    L{mailproxy.certificates}), each whether or not the other loads.
    Filters with a C{close} method (files, connections) are closed when the
    service stops.

    @ivar metricsService: the service of the metrics endpoint, if any.
    @ivar certificates: what keeps the TLS listeners' certificates current,
        if any.
    @ivar logObserver: the log observer to give the application (twistd's
        only hook for a plugin's own log format), if any.
    @ivar workerPool: the workers, if this is their supervisor.
    """

    metricsService: Service | None = None
    listenerNames: frozenset[str] = frozenset()
    certificates: CertificateReloader | None = None
    logObserver: ILogObserver | None = None
    workerPool: WorkerPool | None = None
    # Workers take their reloads from the supervisor, not from SIGHUP.
    handlesHangup = True

    def __init__(self, reloader: Reloader, limits: Limits | None = None, clock: Any = None) -> None:
        super().__init__()
        self.reloader = reloader
        self._clock = clock
        self._previousHandler: Any = None
        self._pruning = LoopingCall(limits.prune) if limits is not None else None
        if self._pruning is not None and clock is not None:
            self._pruning.clock = clock

    def startService(self) -> None:
        super().startService()
        if self._pruning is not None:
            # Expired authentication failures and lockouts are forgotten.
            self._pruning.start(PRUNE_INTERVAL, now=False)
        if self.certificates is not None:
            self.certificates.start()

    def _hangup(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: reload from
        # the reactor loop instead.
        self._clock.callFromThread(self._reload)

    def _reload(self) -> None:
        self.reloader.log.info("SIGHUP received: reloading {path}", path=self.reloader.path)
        self.reloadNow()

    def reloadNow(self, loaded: Config | None = None) -> bool:
        """
        Reload the configuration (as C{loaded}, if given) and the
        certificates; C{True} if the configuration loaded.
        """
        reloaded = self.reloader.reload(loaded)
        if self.certificates is not None:
            self.certificates.reload()
        return reloaded

    def stopListening(self) -> Deferred[Any]:
        """
        Stop accepting connections (the first step of draining).
        """
        return gatherResults(
            [maybeDeferred(service.stopService) for service in self if service.name in self.listenerNames],
            consumeErrors=True,
        )

    def stopService(self) -> Any:
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        if self._pruning is not None and self._pruning.running:
            self._pruning.stop()
        if self.certificates is not None:
            self.certificates.stop()
        # Draining: no new connections, a goodbye to every open one, and the
        # rest of the services stop once they are closed.
        draining = self.stopListening().addBoth(lambda _: self._closeConnections())
        draining.addBoth(lambda _: super(ListenersService, self).stopService())
        draining.addBoth(lambda result: self._filtersClosed(result))
        return draining

    def _filtersClosed(self, result: Any) -> Any:
        self.reloader.closeFilters()
        return result

    def _closeConnections(self) -> Deferred[None]:
        """
        Say goodbye to every client of these listeners (at a response
        boundary) and close; fires when all are closed, or
        L{SHUTDOWN_GRACE} seconds later.
        """
        contexts = set(map(id, getattr(self.reloader, "contexts", ())))
        mine = [connection for connection in liveConnections if id(connection.context) in contexts]
        if mine:
            self.reloader.log.info("closing {count} client connections", count=len(mine))
        for connection in mine:
            connection.hangUp(b"Server shutting down", grace=SHUTDOWN_GRACE)
        closed: Deferred[None] = Deferred()
        clock = self._clock

        def check(rounds: int) -> None:
            if not any(connection in liveConnections for connection in mine) or rounds >= SHUTDOWN_GRACE * 10 + 5:
                closed.callback(None)
            else:
                clock.callLater(0.1, check, rounds + 1)

        if clock is None:
            closed.callback(None)
        else:
            check(0)
        return closed

    def setServiceParent(self, parent: Any) -> None:
        if self.logObserver is not None and isinstance(parent, Componentized):
            # twistd then logs through this observer instead of its own.
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Before the ports listen: once a client (or a test) can connect, a
        # SIGHUP reloads instead of ending the process.
        if self.handlesHangup and self.reloader.path is not None and hasattr(signal, "SIGHUP"):
            self._previousHandler = signal.signal(signal.SIGHUP, self._hangup)
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as error:
                what = "metrics.listen" if service is self.metricsService else f"listener {service.name}"
                raise SystemExit(f"mailproxy: {what}: {error}") from None


def buildService(
    config: Config, reactor: Any, configPath: str | None = None, worker: WorkerLink | None = None
) -> ListenersService:
    """
    Build the listeners of C{config} on C{reactor}; SIGHUP reloads
    C{configPath} if given.  A C{worker} accepts on the sockets its
    supervisor passed it and asks the supervisor for limits and password
    checks.

    @raise ConfigError: if a certificate, key or TLS setting cannot be used.
    """
    checkUpstreams(config, warn=worker is None)
    hashing: HashPoolService | None = None
    limits: Limits | SharedLimits
    # Workers check no passwords: the supervisor does, with the login turn.
    makeChecker: Callable[[Config], Checker] | None = None
    checkers: list[Checker] = []
    if worker is None:
        hashing, makeChecker, limits = passwordChecking(config, reactor)
        checkers = [firstChecker(config, makeChecker)]
    else:
        limits = SharedLimits(worker.channel, config.authFailureDelay)
    portal = Portal(ProxyRealm(config), checkers)

    # Workers ask the supervisor: one cache and one refresh for all.
    tokens: TokenSource | None = (
        accessTokens(config, reactor, configPath) if worker is None else RemoteAccessTokens(worker.channel)
    )

    def loggedIn(credential: Credential, login: Callable[[str | Bearer], Awaitable[Any]]) -> Deferred[Any]:
        return Deferred.fromCoroutine(loginWith(tokens, credential, login))

    def connect(upstream: UpstreamConfig, username: str, credential: Credential, client: str) -> Deferred[Any]:
        return loggedIn(
            credential, lambda secret: connectUpstream(reactor, upstream, username, secret, clientAddress=client)
        )

    def connectRelay(upstream: UpstreamConfig, username: str, credential: Credential, client: str) -> Deferred[Any]:
        return loggedIn(
            credential, lambda secret: connectPOP3Upstream(reactor, upstream, username, secret, clientAddress=client)
        )

    def openBridge(upstream: UpstreamConfig, username: str, credential: Credential, client: str) -> Deferred[Any]:
        return loggedIn(credential, lambda secret: openMaildrop(reactor, upstream, username, secret, client))

    pop3 = POP3Backends(connectRelay, openBridge)
    filters = buildFilters(config.filters)
    contexts: list[ServerContext] = []
    reloader = ConfigReloader(configPath, config, portal, contexts, filters, makeChecker)
    # The supervisor keeps the counters of workers and forgets what expired.
    root = ListenersService(reloader, limits if isinstance(limits, Limits) else None, reactor)
    if hashing is not None:
        hashing.setServiceParent(root)
    metrics = None
    if config.metricsListen is not None:
        from mailproxy.metrics import ProxyMetrics, metricsSite

        metrics = ProxyMetrics()
        if worker is None:
            root.metricsService = strports.service(config.metricsListen, metricsSite(metrics.registry), reactor=reactor)
            root.metricsService.setServiceParent(root)
        else:
            # Served, merged with the other workers', by the supervisor.
            worker.metricsRegistry = metrics.registry
    if worker is not None:
        root.handlesHangup = False
    tlsListeners: list[ServerTLS] = []
    for index, listener in enumerate(config.listeners):
        tlsOptions = None
        if listener.tls is not TLSMode.PLAIN:
            tlsOptions = listenerTLS(listener, f"listener[{index}]", config.tlsSessionLifetime)
            tlsListeners.append(tlsOptions)
        context = ServerContext(
            config,
            listener,
            portal,
            reactor,
            connect,
            tlsOptions,
            chainFactory(config, listener, filters),
            limits,  # type: ignore[arg-type]
            metrics.forListener(listener.protocol, listener.name, listener.tls.value) if metrics else None,
        )
        contexts.append(context)
        factory: Any = POP3ServerFactory(context, pop3) if listener.protocol == "pop3" else IMAPServerFactory(context)
        if tlsOptions is not None and listener.tls is TLSMode.IMPLICIT:
            factory = TLSMemoryBIOFactory(tlsOptions, False, factory)
        if listener.proxyProtocol:
            # Outside TLS: load balancers send the header before the handshake.
            factory = ProxyProtocolFactory(factory, reactor, listener.name, listener.proxyProtocolTrusted)
        service: Service
        if worker is None:
            service = strports.service(withBacklog(listener.endpoint, config.listenBacklog), factory, reactor=reactor)
        else:
            fd, family = worker.listeners[listener.name]
            service = AdoptedListener(fd, family, factory, reactor)
        service.setName(listener.name)
        service.setServiceParent(root)
    root.listenerNames = frozenset(listener.name for listener in config.listeners)
    if tlsListeners:
        root.certificates = CertificateReloader(
            tlsListeners, config.certificateCheckInterval, config.tlsSessionLifetime, reactor
        )
    return root


def checkUpstreams(config: Config, warn: bool = True) -> None:
    """
    Fail at start-up on an upstream CA file that cannot be read, and warn
    of upstreams whose certificates are not verified.
    """
    for upstream in config.upstreams.values():
        upstreamOptions(upstream)
        if warn and not upstream.verify:
            log.warn("upstream {name}: certificate verification is OFF (verify = false)", name=upstream.name)


class AdoptedListener(Service):
    """
    A worker's listener: the supervisor's listening socket, inherited.
    """

    def __init__(self, fd: int, family: int, factory: Any, reactor: Any) -> None:
        self.fd = fd
        self.family = family
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        # adoptStreamPort duplicated it.
        os.close(self.fd)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def passwordChecking(config: Config, reactor: Any) -> tuple[HashPoolService, Callable[[Config], Checker], Limits]:
    """
    What checks passwords in this process (alone, or as the workers'
    supervisor): the hashing threads, a maker of the checker a
    configuration names (the users file, or an account backend) that all
    share one credentials cache (a reload builds a new checker, the cache
    stays), and the limits deciding whose check runs when.
    """
    hashing = HashPoolService(config.hashThreads)
    runInThread = threadRunner(reactor, hashing.pool)
    credentialsCache = CredentialsCache(config.authCacheTTL, config.authCacheSize, reactor)

    def makeChecker(config: Config) -> Checker:
        if config.authBackend == USERS_FILE_BACKEND:
            return UsersFileChecker(config.usersFile, runInThread, credentialsCache)
        backend = buildBackend(config, BackendContext(reactor, config, config.lookupTimeout, runInThread))
        return AccountChecker(
            backend, config.authBackend, reactor, config.lookupTimeout, credentialsCache, config.negativeTTL
        )

    # A few checks queue per hashing thread; other attempts wait their turn.
    limits = Limits(config.limits, reactor, config.authFailureDelay, maxChecks=4 * config.hashThreads)
    return hashing, makeChecker, limits


def firstChecker(config: Config, makeChecker: Callable[[Config], Checker]) -> Checker:
    """
    The checker C{config} names at start-up.

    @raise ConfigError: if the users file cannot be read, or the backend
        not built.
    """
    try:
        return makeChecker(config)
    except OSError as error:
        raise ConfigError(f"auth.users_file: cannot read {config.usersFile!r}: {error.strerror}") from None


def buildSupervisor(config: Config, reactor: Any, configPath: str, configText: bytes) -> ListenersService:
    """
    The supervisor of C{config.workers} worker processes (see
    L{mailproxy.workers}), C{config} read from C{configText}: it binds the
    listeners, keeps the shared limits and the credentials cache, and
    serves the merged metrics.

    @raise ConfigError: if a certificate, key or TLS setting cannot be used
        (checked here, so start-up fails with one line, not in each worker).
    """
    checkUpstreams(config)
    for index, listener in enumerate(config.listeners):
        if listener.tls is not TLSMode.PLAIN:
            listenerTLS(listener, f"listener[{index}]", config.tlsSessionLifetime)
    hashing, makeChecker, limits = passwordChecking(config, reactor)
    checker = firstChecker(config, makeChecker)
    listeners = [
        InheritedListener(listener.name, withBacklog(listener.endpoint, config.listenBacklog), config.workers, reactor)
        for listener in config.listeners
    ]
    pool = WorkerPool(config.workers, configPath, listeners, limits, checker, reactor)
    pool.logFormat = config.logFormat
    pool.tokens = accessTokens(config, reactor, configPath)
    # What the workers load: the very text this configuration came from.
    pool.configText = configText
    root = ListenersService(SupervisorReloader(configPath, config, pool, makeChecker), limits, reactor)
    root.workerPool = pool
    hashing.setServiceParent(root)
    for inherited in listeners:
        inherited.setServiceParent(root)
    # After the listeners: it starts the workers on their sockets.
    pool.setServiceParent(root)
    if config.metricsListen is not None:
        from mailproxy.metrics import workersMetricsSite

        root.metricsService = strports.service(config.metricsListen, workersMetricsSite(pool), reactor=reactor)
        root.metricsService.setServiceParent(root)
    return root


Credential = str | OAuthLogin


def accessTokens(config: Config, reactor: Any, configPath: str | None) -> AccessTokens | None:
    """
    The access tokens of OAuth 2.0 upstream logins, if any are configured.

    @raise ConfigError: if the token store's key cannot be used.
    """
    if config.oauth2 is None:
        return None
    try:
        return AccessTokens.fromConfig(config.oauth2, reactor, configPath or "")
    except TokenStoreError as error:
        raise ConfigError(str(error)) from None


def raiseFileLimit() -> None:
    """
    Raise the soft limit on open files to the hard one: two descriptors
    per session (client and upstream), and 10,000 sessions are normal.
    The hard limit is the service manager's (systemd's C{LimitNOFILE}).
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files limit raised from {soft} to {hard}", soft=soft, hard=hard)
    except (OSError, ValueError) as error:
        log.warn("open files limit not raised: {error}", error=str(error))


def withBacklog(endpoint: str, backlog: int) -> str:
    """
    C{endpoint} with C{backlog} as its listen queue, unless it names one
    (Twisted's default of 50 makes a burst of connections wait for SYN
    retries).
    """
    kind = endpoint.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix") or "backlog=" in endpoint:
        return endpoint
    return f"{endpoint}:backlog={backlog}"
