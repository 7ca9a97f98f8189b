"""
Prometheus metrics in memory: the metrics module, the IMAP server and relay
hooks (passthrough and filtered), the HTTP resource, configuration and the
service that serves them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from mailproxy import tap
from mailproxy.config import ConfigError, TLSMode, parseConfig
from mailproxy.filters import PASS
from mailproxy.imap.server import State
from mailproxy.imap.upstream import UpstreamError
from mailproxy.interfaces import ICommandFilter
from mailproxy.metrics import MetricsResource, ProxyMetrics, metricsSite
from tests.support import UpstreamScript, connect, writeUsersFile


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def imapMetrics() -> tuple[ProxyMetrics, object]:
    metrics = ProxyMetrics(processCollector=False)
    return metrics, metrics.forListener("imap", "imap", "starttls")


@implementer(ICommandFilter)
class _Observer:
    """A filter that only looks: enough to take the relay off its fast path."""

    def filterCommand(self, session: object, command: object) -> object:
        return PASS


def test_connections_are_counted_and_active_ones_tracked() -> None:
    """Accepted connections only grow; the active gauge follows opens and closes."""
    metrics, listener = imapMetrics()
    listener.opened()  # type: ignore[attr-defined]
    listener.opened()  # type: ignore[attr-defined]
    listener.closed()  # type: ignore[attr-defined]
    labels = {"protocol": "imap", "listener": "imap", "tls": "starttls"}
    assert value(metrics, "mailproxy_connections_total", **labels) == 2
    assert value(metrics, "mailproxy_connections_active", **labels) == 1


def test_unknown_command_names_share_one_series() -> None:
    """Made-up command names all land in 'other', so clients cannot create series."""
    metrics, listener = imapMetrics()
    for index in range(50):
        listener.commandDone(b"X-MADE-UP-%d" % index, 0.01)  # type: ignore[attr-defined]
    listener.commandDone(b"UID FETCH", 0.002)  # type: ignore[attr-defined]
    count = "mailproxy_command_duration_seconds_count"
    assert value(metrics, count, protocol="imap", command="other") == 50
    assert value(metrics, count, protocol="imap", command="UID FETCH") == 1
    commands = {
        sample.labels["command"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == count
    }
    assert commands == {"other", "UID FETCH"}


def test_upstream_error_kinds_are_bounded() -> None:
    """An unexpected error kind is counted as 'protocol', not as a new series."""
    metrics = ProxyMetrics(processCollector=False)
    metrics.upstreamError("main", "timeout")
    metrics.upstreamError("main", "something new")
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="timeout") == 1
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="protocol") == 1


def test_process_collector_is_in_the_proxys_own_registry() -> None:
    """RSS and open file descriptors come with the proxy's registry, not the global one."""
    metrics = ProxyMetrics()
    assert value(metrics, "process_resident_memory_bytes") > 0
    assert value(metrics, "process_open_fds") > 0
    assert ProxyMetrics().registry is not metrics.registry


def test_imap_session_moves_connection_login_starttls_and_byte_counters(tmp_path: Path) -> None:
    """A STARTTLS session that fails once, logs in, relays and closes is counted."""
    metrics, listener = imapMetrics()
    connection = connect(str(tmp_path), tls=TLSMode.STARTTLS, metrics=listener)
    labels = {"protocol": "imap", "listener": "imap", "tls": "starttls"}
    assert value(metrics, "mailproxy_connections_active", **labels) == 1
    connection.send(b"s STARTTLS\r\n")
    connection.send(b"a LOGIN alice wrong\r\n")
    connection.clock.advance(2.1)
    connection.send(b"b LOGIN alice alicepw\r\n")
    assert connection.protocol.state is State.RELAYING
    connection.received()
    connection.send(b"c NOOP\r\n")
    connection.fromUpstream(b"* 3 EXISTS\r\nc OK NOOP done\r\n")
    assert connection.received() == b"* 3 EXISTS\r\nc OK NOOP done\r\n"
    connection.protocol.connectionLost(None)
    assert value(metrics, "mailproxy_starttls_upgrades_total", protocol="imap", listener="imap") == 1
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="failed") == 1
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="ok") == 1
    assert value(metrics, "mailproxy_relayed_bytes_total", protocol="imap", direction="from_client") == len(
        b"c NOOP\r\n"
    )
    # The login reply (relayed as an upstream response) and the NOOP's.
    toClient = value(metrics, "mailproxy_relayed_bytes_total", protocol="imap", direction="to_client")
    assert toClient > len(b"* 3 EXISTS\r\nc OK NOOP done\r\n")
    assert value(metrics, "mailproxy_connections_total", **labels) == 1
    assert value(metrics, "mailproxy_connections_active", **labels) == 0


def test_upstream_failures_count_as_login_and_upstream_errors(tmp_path: Path) -> None:
    """An unreachable upstream counts a login upstream_error and an upstream error of its kind."""
    metrics, listener = imapMetrics()
    script = UpstreamScript(error=UpstreamError("cannot connect", kind="connect_failed"))
    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, upstream=script, metrics=listener)
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(0)
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="upstream_error") == 1
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="connect_failed") == 1


def test_upstream_refusing_the_passthrough_password_is_upstream_refused(tmp_path: Path) -> None:
    """The upstream rejecting the client's own password is counted as upstream_refused."""
    metrics, listener = imapMetrics()
    script = UpstreamScript(error=UpstreamError("no", authenticationFailed=True))
    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, upstream=script, metrics=listener)
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.clock.advance(2.1)
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="upstream_refused") == 1
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="login_refused") == 1


def test_upstream_vanishing_mid_session_is_an_upstream_error(tmp_path: Path) -> None:
    """An upstream that closes without BYE counts 'closed' (or 'reset'); after its BYE it does not count."""
    metrics, listener = imapMetrics()
    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, metrics=listener)
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.upstreamProtocol.connectionLost(Failure(ConnectionDone()))
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="closed") == 1

    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, metrics=listener)
    connection.send(b"a LOGIN alice alicepw\r\n")
    connection.upstreamProtocol.connectionLost(Failure(ConnectionLost()))
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="reset") == 1

    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, metrics=listener)
    connection.send(b"a LOGIN alice alicepw\r\nb LOGOUT\r\n")
    connection.fromUpstream(b"* BYE bye\r\nb OK done\r\n")
    connection.upstreamProtocol.connectionLost(Failure(ConnectionDone()))
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="closed") == 1
    assert value(metrics, "mailproxy_upstream_errors_total", upstream="main", kind="reset") == 1


def test_locked_out_logins_are_counted_as_such(tmp_path: Path) -> None:
    """After the lockout threshold, refusals count as locked_out, not failed."""
    from mailproxy.limits import LimitsConfig

    metrics, listener = imapMetrics()
    connection = connect(
        str(tmp_path),
        tls=TLSMode.PLAIN,
        allowPlaintextAuth=True,
        limits=LimitsConfig(failuresBeforeLockout=2),
        metrics=listener,
    )
    for tag in (b"a", b"b", b"c"):
        connection.send(tag + b" LOGIN alice wrong\r\n")
        connection.clock.advance(10)
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="failed") == 2
    assert value(metrics, "mailproxy_logins_total", protocol="imap", result="locked_out") == 1


@pytest.mark.parametrize("filtered", [False, True], ids=["passthrough", "filtered"])
def test_command_latency_runs_from_command_to_tagged_reply(tmp_path: Path, filtered: bool) -> None:
    """Both relay paths time each command until its tagged reply, UID commands by their full name."""
    metrics, listener = imapMetrics()
    connection = connect(
        str(tmp_path),
        tls=TLSMode.PLAIN,
        allowPlaintextAuth=True,
        metrics=listener,
        filters=[_Observer()] if filtered else None,
    )
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert bool(connection.protocol.relay.chain) is filtered  # type: ignore[union-attr]
    connection.send(b"b UID FETCH 1:* (FLAGS)\r\nc SELECT INBOX\r\nd IDLE\r\n")
    connection.clock.advance(0)
    count = "mailproxy_command_duration_seconds_count"
    connection.fromUpstream(b"* 1 FETCH (UID 1 FLAGS ())\r\n")
    assert value(metrics, count, protocol="imap", command="UID FETCH") == 0
    connection.fromUpstream(b"b OK done\r\n* 1 EXISTS\r\nc OK [READ-WRITE] done\r\n+ idling\r\n")
    assert value(metrics, count, protocol="imap", command="UID FETCH") == 1
    assert value(metrics, count, protocol="imap", command="SELECT") == 1
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"d OK IDLE done\r\n")
    # IDLE lasts as long as the client wants: not a latency.
    assert value(metrics, count, protocol="imap", command="IDLE") == 0
    assert value(metrics, count, protocol="imap", command="other") == 0


def test_metrics_resource_renders_the_registry() -> None:
    """GET /metrics returns the Prometheus text format of the proxy's registry."""
    metrics, listener = imapMetrics()
    listener.login("ok")  # type: ignore[attr-defined]
    request = DummyRequest([b""])
    body = MetricsResource(metrics.registry).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b'mailproxy_logins_total{protocol="imap",result="ok"} 1.0' in body
    site = metricsSite(metrics.registry)
    assert isinstance(site.resource.getStaticEntity(b"metrics"), MetricsResource)


def configDocument(tmp_path: Path, **tables: dict[str, object]) -> dict[str, object]:
    document: dict[str, object] = {
        "auth": {"users_file": writeUsersFile(str(tmp_path), {"alice": "pw"})},
        "listener": [{"name": "imap", "endpoint": "tcp:10143:interface=127.0.0.1", "allow_plaintext_auth": True}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
        "routing": {"default_upstream": "main"},
    }
    document.update(tables)
    return document


def test_metrics_listen_and_log_format_are_read_and_checked(tmp_path: Path) -> None:
    """[metrics] listen and server.log_format default to off and text; bad values name the key."""
    config = parseConfig(configDocument(tmp_path), str(tmp_path))
    assert (config.metricsListen, config.logFormat) == (None, "text")
    config = parseConfig(
        configDocument(tmp_path, metrics={"listen": "tcp:9100"}, server={"log_format": "json"}), str(tmp_path)
    )
    assert (config.metricsListen, config.logFormat) == ("tcp:9100", "json")
    with pytest.raises(ConfigError, match=r"^metrics\.listen: invalid endpoint 'tcp:nope'"):
        parseConfig(configDocument(tmp_path, metrics={"listen": "tcp:nope"}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"^metrics\.path: unknown key"):
        parseConfig(configDocument(tmp_path, metrics={"path": "/x"}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"^server\.log_format: 'xml' is not one of text, json"):
        parseConfig(configDocument(tmp_path, server={"log_format": "xml"}), str(tmp_path))


def test_service_serves_metrics_only_when_configured(tmp_path: Path) -> None:
    """With [metrics] listen the root service gets an HTTP port; without it, none."""
    reactor = MemoryReactorClock()
    plain = tap.buildService(parseConfig(configDocument(tmp_path), str(tmp_path)), reactor)
    assert plain.metricsService is None
    config = parseConfig(configDocument(tmp_path, metrics={"listen": "tcp:9100:interface=127.0.0.1"}), str(tmp_path))
    service = tap.buildService(config, reactor)
    service.privilegedStartService()
    service.startService()
    ports = {(port, interface): factory for port, factory, _, interface in reactor.tcpServers}
    site = ports[(9100, "127.0.0.1")]
    assert isinstance(site.resource.getStaticEntity(b"metrics"), MetricsResource)
    imapFactory = ports[(10143, "127.0.0.1")]
    assert imapFactory.context.metrics is not None
    assert plain is not service
