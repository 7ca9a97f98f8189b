# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd mailproxy} plugin: options and service construction.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.components import Componentized

from mailproxy.auth import HashPoolService, UsersFileChecker, makePortal, threadRunner
from mailproxy.certificates import CertificateReloader
from mailproxy.config import Config, ConfigError, TLSMode, UpstreamConfig, loadConfig
from mailproxy.credentialscache import CredentialsCache
from mailproxy.filters.registry import buildFilters, chainFactory
from mailproxy.imap.server import IMAPServerFactory, ServerContext
from mailproxy.imap.upstream import UpstreamSession, connectUpstream
from mailproxy.limits import Limits
from mailproxy.logs import jsonLinesObserver, textLinesObserver, twistdLogFile
from mailproxy.options import Options
from mailproxy.passwords import UsersFileError
from mailproxy.pop3.bridge import openMaildrop
from mailproxy.pop3.server import POP3Backends, POP3ServerFactory
from mailproxy.pop3.upstream import connectPOP3Upstream
from mailproxy.proxyprotocol import ProxyProtocolFactory
from mailproxy.reload import ConfigReloader
from mailproxy.tls import ServerTLS, listenerTLS, upstreamOptions

log = Logger()
PRUNE_INTERVAL = 300.0


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build one service per listener.

    A broken configuration ends start-up with one line naming the problem.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    try:
        config = loadConfig(options["config"])
        service = buildService(config, reactor, configPath=options["config"])
    except (ConfigError, UsersFileError) as error:
        raise SystemExit(f"mailproxy: configuration error: {error}") from None
    # twistd's own options (--logfile, -n) say where the log goes.
    destination = twistdLogFile(getattr(options, "parent", None))
    if destination is not None:
        observer = jsonLinesObserver if config.logFormat == "json" else textLinesObserver
        service.logObserver = observer(destination)
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
    """

    metricsService: Service | None = None
    certificates: CertificateReloader | None = None
    logObserver: ILogObserver | None = None

    def __init__(self, reloader: ConfigReloader, limits: Limits | None = None, clock: Any = None) -> None:
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
        self.reloader.reload()
        if self.certificates is not None:
            self.certificates.reload()

    def stopService(self) -> Any:
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        if self._pruning is not None and self._pruning.running:
            self._pruning.stop()
        if self.certificates is not None:
            self.certificates.stop()
        stopping = super().stopService()
        self.reloader.closeFilters()
        return stopping

    def setServiceParent(self, parent: Any) -> None:
        if self.logObserver is not None and isinstance(parent, Componentized):
            # twistd then logs through this observer instead of its own.
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Before the ports listen: once a client (or a test) can connect, a
        # SIGHUP reloads instead of ending the process.
        if self.reloader.path is not None and hasattr(signal, "SIGHUP"):
            self._previousHandler = signal.signal(signal.SIGHUP, self._hangup)
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as error:
                what = "metrics.listen" if service is self.metricsService else f"listener {service.name}"
                raise SystemExit(f"mailproxy: {what}: {error}") from None


def buildService(config: Config, reactor: Any, configPath: str | None = None) -> ListenersService:
    """
    Build the listeners of C{config} on C{reactor}; SIGHUP reloads
    C{configPath} if given.

    @raise ConfigError: if a certificate, key or TLS setting cannot be used.
    """
    for upstream in config.upstreams.values():
        upstreamOptions(upstream)  # fail at start-up on an unreadable CA file
        if not upstream.verify:
            log.warn("upstream {name}: certificate verification is OFF (verify = false)", name=upstream.name)
    hashing = HashPoolService(config.hashThreads)
    runInThread = threadRunner(reactor, hashing.pool)
    # One per process, shared by every checker a reload builds.
    credentialsCache = CredentialsCache(config.authCacheTTL, config.authCacheSize, reactor)
    try:
        portal = makePortal(config, runInThread, credentialsCache)
    except OSError as error:
        raise ConfigError(f"auth.users_file: cannot read {config.usersFile!r}: {error.strerror}") from None

    def connect(upstream: UpstreamConfig, username: str, password: str, client: str) -> Deferred[UpstreamSession]:
        return Deferred.fromCoroutine(connectUpstream(reactor, upstream, username, password, clientAddress=client))

    def connectRelay(upstream: UpstreamConfig, username: str, password: str, client: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(connectPOP3Upstream(reactor, upstream, username, password, clientAddress=client))

    def openBridge(upstream: UpstreamConfig, username: str, password: str, client: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(openMaildrop(reactor, upstream, username, password, client))

    pop3 = POP3Backends(connectRelay, openBridge)
    filters = buildFilters(config.filters)
    # A few checks queue per hashing thread; other attempts wait their turn.
    limits = Limits(config.limits, reactor, config.authFailureDelay, maxChecks=4 * config.hashThreads)
    contexts: list[ServerContext] = []
    reloader = ConfigReloader(
        configPath,
        config,
        portal,
        contexts,
        filters,
        lambda path: UsersFileChecker(path, runInThread, credentialsCache),
    )
    root = ListenersService(reloader, limits, reactor)
    hashing.setServiceParent(root)
    metrics = None
    if config.metricsListen is not None:
        from mailproxy.metrics import ProxyMetrics, metricsSite

        metrics = ProxyMetrics()
        root.metricsService = strports.service(config.metricsListen, metricsSite(metrics.registry), reactor=reactor)
        root.metricsService.setServiceParent(root)
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
            limits,
            metrics.forListener(listener.protocol, listener.name, listener.tls.value) if metrics else None,
        )
        contexts.append(context)
        factory: Any = POP3ServerFactory(context, pop3) if listener.protocol == "pop3" else IMAPServerFactory(context)
        if tlsOptions is not None and listener.tls is TLSMode.IMPLICIT:
            factory = TLSMemoryBIOFactory(tlsOptions, False, factory)
        if listener.proxyProtocol:
            # Outside TLS: load balancers send the header before the handshake.
            factory = ProxyProtocolFactory(factory, reactor, listener.name, listener.proxyProtocolTrusted)
        service = strports.service(withBacklog(listener.endpoint, config.listenBacklog), factory, reactor=reactor)
        service.setName(listener.name)
        service.setServiceParent(root)
    if tlsListeners:
        root.certificates = CertificateReloader(
            tlsListeners, config.certificateCheckInterval, config.tlsSessionLifetime, reactor
        )
    return root


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
