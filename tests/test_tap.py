"""
The twistd plugin: discovery, options, service construction and start-up
failures as an administrator sees them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from twisted.application.service import IServiceMaker
from twisted.copyright import version as twistedVersion
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from mailproxy import __version__, tap
from mailproxy.filters.registry import buildFilters
from mailproxy.imap.server import IMAPServerFactory
from mailproxy.workers import InheritedListener, WorkerPool
from tests.support import writeUsersFile

REPO = Path(__file__).resolve().parent.parent
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def writeConfig(directory: Path, listeners: str) -> Path:
    writeUsersFile(str(directory), {"alice": "pw"})
    path = directory / "mailproxy.toml"
    # One process: these tests look at the listeners twistd itself runs.
    server = "[server]\nworkers = 1\n"
    if "[server]\n" in listeners:
        listeners, server = listeners.replace("[server]\n", server, 1), ""
    path.write_text(
        f"""
{server}
[auth]
users_file = "users"
{listeners}
[upstream.main]
host = "127.0.0.1"
port = 993
tls = "implicit"
[routing]
default_upstream = "main"
"""
    )
    return path


def certificateFiles(directory: Path) -> tuple[Path, Path]:
    authority = trustme.CA()
    leaf = authority.issue_cert("localhost")
    certificate, key = directory / "cert.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(certificate))
    leaf.private_key_pem.write_to_path(str(key))
    return certificate, key


def test_plugin_is_discovered_by_tapname() -> None:
    """twistd finds the 'mailproxy' service maker through the dropin."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "mailproxy" in makers
    assert makers["mailproxy"].options is tap.Options


def test_config_option_is_required() -> None:
    """Running without --config is a usage error."""
    with pytest.raises(usage.UsageError, match="--config"):
        tap.Options().parseOptions([])


def test_service_listens_on_every_endpoint_with_its_tls_mode(tmp_path: Path) -> None:
    """Each listener binds its endpoint; implicit TLS wraps the factory in TLS."""
    certificate, key = certificateFiles(tmp_path)
    config = writeConfig(
        tmp_path,
        f"""
[[listener]]
name = "imap"
endpoint = "tcp:10143:interface=127.0.0.1"
tls = "starttls"
certificate = "{certificate}"
private_key = "{key}"
[[listener]]
name = "imaps"
endpoint = "tcp:10993:interface=127.0.0.1"
tls = "implicit"
certificate = "{certificate}"
private_key = "{key}"
""",
    )
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    reactor = MemoryReactorClock()
    service = tap.makeService(options, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    ports = {(port, interface): factory for port, factory, _, interface in reactor.tcpServers}
    assert isinstance(ports[(10143, "127.0.0.1")], IMAPServerFactory)
    implicit = ports[(10993, "127.0.0.1")]
    assert isinstance(implicit, TLSMemoryBIOFactory)
    assert isinstance(implicit.wrappedFactory, IMAPServerFactory)
    assert [child.name for child in service if not isinstance(child, tap.HashPoolService)] == ["imap", "imaps"]


def test_workers_default_to_the_number_of_cpus_and_are_supervised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without server.workers, one worker per CPU: twistd's service binds the listeners and supervises the pool."""
    config = writeConfig(tmp_path, '[[listener]]\nname = "imap"\nendpoint = "tcp:10143:interface=127.0.0.1"\n')
    config.write_text(config.read_text().replace("workers = 1\n", ""))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    service = tap.makeService(options, reactor=MemoryReactorClock())
    (pool,) = [child for child in service if isinstance(child, WorkerPool)]
    assert [worker.number for worker in pool.workers] == [1, 2, 3]
    # The workers load the very text the supervisor's configuration came from.
    assert pool.configText == config.read_bytes()
    assert [child.name for child in service if isinstance(child, InheritedListener)] == ["imap"]


def test_broken_config_is_one_clear_line(tmp_path: Path) -> None:
    """In makeService a bad key ends start-up with one line naming it."""
    config = writeConfig(tmp_path, '[[listener]]\nendpoint = "tcp:10143"\ntls = "ssl"\n')
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    with pytest.raises(SystemExit) as raised:
        tap.makeService(options, reactor=MemoryReactorClock())
    assert str(raised.value) == (
        "mailproxy: configuration error: listener[0].tls: 'ssl' is not one of plain, starttls, implicit"
    )


def runTwistd(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailproxy", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
    )


def test_twistd_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    """The real twistd exits non-zero printing just the configuration error."""
    config = writeConfig(tmp_path, '[[listener]]\nendpoint = "tcp:notaport"\n')
    result = runTwistd(config)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "mailproxy: configuration error: listener[0].endpoint: invalid endpoint 'tcp:notaport': "
        "invalid literal for int() with base 10: 'notaport'"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_twistd_refuses_to_start_on_a_busy_port(tmp_path: Path) -> None:
    """A listener whose port is taken is fatal at start-up, with one line and no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = writeConfig(tmp_path, f'[[listener]]\nname = "imap"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
        result = runTwistd(config)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(rf"mailproxy: listener imap: Couldn't listen on 127.0.0.1:{port}", output)
    assert "Traceback" not in output


def test_example_config_is_valid(tmp_path: Path) -> None:
    """etc/mailproxy.example.toml parses and builds its filters once its files exist."""
    text = (REPO / "etc" / "mailproxy.example.toml").read_text()
    text = text.replace("/etc/mailproxy/", f"{tmp_path}/").replace("/var/log/mailproxy/", f"{tmp_path}/")
    os.makedirs(tmp_path / "tls")
    certificate, key = certificateFiles(tmp_path)
    shutil.copy(certificate, tmp_path / "tls" / "fullchain.pem")
    shutil.copy(key, tmp_path / "tls" / "privkey.pem")
    writeUsersFile(str(tmp_path), {"alice": "pw"})
    path = tmp_path / "example.toml"
    path.write_text(text)
    from mailproxy.config import loadConfig

    config = loadConfig(str(path))
    assert [listener.name for listener in config.listeners] == ["imap", "imaps", "imaps-lb", "pop3s"]
    assert [listener.proxyProtocol for listener in config.listeners] == [False, False, True, False]
    assert (config.metricsListen, config.logFormat) == ("tcp:9100:interface=127.0.0.1", "text")
    assert config.routeFor("bob") is not None and config.routeFor("bob").upstream == "legacy"  # type: ignore[union-attr]
    assert config.routeFor("anyone").password is None  # type: ignore[union-attr]
    built = buildFilters(config.filters)
    assert set(built) == {"audit", "readonly", "standard", "folders"}
    assert config.filterNamesFor(config.listeners[0], "bob") == ("audit", "readonly")
    assert config.filterNamesFor(config.listeners[0], "anyone") == ("audit", "standard", "folders")
    assert config.filterNamesFor(config.listeners[1], None) == ()
    built["audit"].close()


def test_twistd_version_names_mailproxy_and_twisted() -> None:
    """twistd mailproxy --version prints mailproxy's version, then Twisted's, and exits 0."""
    result = subprocess.run(
        [TWISTD, "mailproxy", "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mailproxy {__version__} (Twisted {twistedVersion})\n"


def test_with_syslog_twistd_logs_through_the_proxys_own_observer(tmp_path: Path) -> None:
    """twistd --syslog: the service names an observer for twistd (one that leaves debug events out)."""
    config = writeConfig(tmp_path, '[[listener]]\nname = "imap"\nendpoint = "tcp:10143:interface=127.0.0.1"\n')
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    options.parent = {"syslog": True, "prefix": "mailproxy", "nodaemon": True}  # type: ignore[attr-defined]
    assert tap.makeService(options, reactor=MemoryReactorClock()).logObserver is not None
    options.parent = {"nodaemon": True, "logger": "some.observer"}  # type: ignore[attr-defined]
    assert tap.makeService(options, reactor=MemoryReactorClock()).logObserver is None
