# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of one proxy process, served over HTTP at C{/metrics}.

Everything lives in the proxy's own L{CollectorRegistry} (with the process
collector: RSS, open file descriptors, CPU), never the global default one.
Labels have bounded values: protocol, listener, TLS mode, result, upstream
name, error kind, and command names from a fixed set; never a user name or
a client address.

Each listener's protocols share one L{ListenerMetrics} whose label children
are bound once, so the relay's per-event cost is an attribute lookup and an
increment.  With metrics off the protocols hold C{None} and skip it all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from mailproxy.workers import WorkerPool

log = Logger()

# Commands with a latency series of their own; anything else is "other",
# so a client cannot create series by sending made-up command names.
IMAP_COMMANDS = frozenset(
    name.replace("_", " ").encode("ascii")
    for name in (
        "APPEND CAPABILITY CHECK CLOSE COPY CREATE DELETE DELETEACL ENABLE EXAMINE EXPUNGE FETCH GETACL "
        "GETMETADATA GETQUOTA GETQUOTAROOT ID LIST LISTRIGHTS LOGOUT LSUB MOVE MYRIGHTS NAMESPACE NOOP "
        "RENAME SEARCH SELECT SETACL SETMETADATA SETQUOTA SORT STATUS STORE SUBSCRIBE THREAD UNSELECT "
        "UNSUBSCRIBE UID_COPY UID_EXPUNGE UID_FETCH UID_MOVE UID_SEARCH UID_SORT UID_STORE UID_THREAD"
    ).split()
)
POP3_COMMANDS = frozenset(name.encode("ascii") for name in "STAT LIST RETR DELE NOOP RSET QUIT TOP UIDL LAST".split())
COMMANDS = {"imap": IMAP_COMMANDS, "pop3": POP3_COMMANDS}

LOGIN_RESULTS = (
    "ok",
    "failed",
    "locked_out",
    "busy",
    "expired",
    "too_many_sessions",
    "upstream_refused",
    "upstream_error",
    "backend_unavailable",
)
UPSTREAM_ERROR_KINDS = (
    "connect_failed",
    "timeout",
    "tls",
    "login_refused",
    "protocol",
    "closed",
    "reset",
    "oauth_refused",
    "oauth_unavailable",
)

# From well under a millisecond (NOOP through the proxy) to a minute (a big
# FETCH or a slow SEARCH).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ProxyMetrics:
    """
    The metrics of one proxy process, in their own registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, processCollector: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if processCollector:
            ProcessCollector(registry=self.registry)
        listener = ["protocol", "listener", "tls"]
        self.connections = Counter(
            "mailproxy_connections", "Client connections accepted.", listener, registry=self.registry
        )
        self.activeConnections = Gauge(
            "mailproxy_connections_active", "Client connections open now.", listener, registry=self.registry
        )
        self.startTLS = Counter(
            "mailproxy_starttls_upgrades",
            "Client connections upgraded with STARTTLS (IMAP) or STLS (POP3).",
            ["protocol", "listener"],
            registry=self.registry,
        )
        self.logins = Counter(
            "mailproxy_logins", "Client login attempts by outcome.", ["protocol", "result"], registry=self.registry
        )
        self.bytes = Counter(
            "mailproxy_relayed_bytes",
            "Octets from and to clients after login.",
            ["protocol", "direction"],
            registry=self.registry,
        )
        self.commandLatency = Histogram(
            "mailproxy_command_duration_seconds",
            "From a command reaching the proxy to its tagged (IMAP) or complete (POP3) reply reaching the client.",
            ["protocol", "command"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstreamErrors = Counter(
            "mailproxy_upstream_errors",
            "Upstream connections that failed or ended abnormally, by kind.",
            ["upstream", "kind"],
            registry=self.registry,
        )

    def forListener(self, protocol: str, listener: str, tls: str) -> ListenerMetrics:
        return ListenerMetrics(self, protocol, listener, tls)

    def upstreamError(self, upstream: str, kind: str) -> None:
        if kind not in UPSTREAM_ERROR_KINDS:
            kind = "protocol"
        self.upstreamErrors.labels(upstream, kind).inc()


class ListenerMetrics:
    """
    The label children of one listener, bound once and shared by its
    connections.

    @ivar bytesFromClient: counter child: octets received from clients
        after login.
    @ivar bytesToClient: counter child: octets sent to clients after login.
    """

    def __init__(self, metrics: ProxyMetrics, protocol: str, listener: str, tls: str) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self._accepted = metrics.connections.labels(protocol, listener, tls)
        self._active = metrics.activeConnections.labels(protocol, listener, tls)
        self._startTLS = metrics.startTLS.labels(protocol, listener)
        self._logins = {result: metrics.logins.labels(protocol, result) for result in LOGIN_RESULTS}
        self.bytesFromClient = metrics.bytes.labels(protocol, "from_client")
        self.bytesToClient = metrics.bytes.labels(protocol, "to_client")
        self._known = COMMANDS[protocol]
        # Bound on first use: a series per command actually seen.
        self._latency: dict[bytes, Any] = {}

    def opened(self) -> None:
        self._accepted.inc()
        self._active.inc()

    def closed(self) -> None:
        self._active.dec()

    def upgraded(self) -> None:
        self._startTLS.inc()

    def login(self, result: str) -> None:
        self._logins[result].inc()

    def commandDone(self, name: bytes, seconds: float) -> None:
        """
        C{name} (upper case, C{b"UID FETCH"} style) took C{seconds}.
        """
        child = self._latency.get(name)
        if child is None:
            key = name if name in self._known else b"other"
            child = self._latency.get(key)
            if child is None:
                child = self._latency[key] = self.metrics.commandLatency.labels(self.protocol, key.decode("ascii"))
        child.observe(seconds)

    def upstreamError(self, upstream: str, kind: str) -> None:
        self.metrics.upstreamError(upstream, kind)


class MetricsResource(Resource):
    """
    The registry in the Prometheus text format (or OpenMetrics, if the
    scraper asks), rendered on the reactor thread: no thread pool, and no
    counter changes halfway through a scrape.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept or "")
        request.setHeader("Content-Type", contentType)
        return encoder(self.registry)


class _QuietSite(Site):
    # A scrape every few seconds is not worth a log line each.
    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metricsSite(registry: CollectorRegistry) -> Site:
    """
    An HTTP site serving C{registry} at C{/metrics} (and nothing else).
    """
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return _QuietSite(root)


class WorkersMetricsResource(Resource):
    """
    The supervisor's C{/metrics}: every worker's metrics and its own process
    figures, merged (see L{mailproxy.metricsmerge}), in the Prometheus text
    format.
    """

    isLeaf = True

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool
        self.own = CollectorRegistry()
        ProcessCollector(registry=self.own)

    def render_GET(self, request: Request) -> Any:
        from twisted.web.server import NOT_DONE_YET

        from mailproxy.metricsmerge import mergedExposition

        def write(texts: list[str]) -> None:
            body = mergedExposition([generate_latest(self.own).decode("utf-8"), *texts])
            request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
            request.write(body)
            request.finish()

        collecting = self.pool.collectMetrics()
        collecting.addCallback(write)
        collecting.addErrback(lambda failure: _failed(request, failure))
        return NOT_DONE_YET


def _failed(request: Request, failure: Failure) -> None:
    log.failure("metrics not collected", failure)
    request.setResponseCode(http.INTERNAL_SERVER_ERROR)
    request.finish()


def workersMetricsSite(pool: WorkerPool) -> Site:
    """
    An HTTP site serving the merged metrics of C{pool}'s workers at
    C{/metrics}.
    """
    root = Resource()
    root.putChild(b"metrics", WorkersMetricsResource(pool))
    return _QuietSite(root)
