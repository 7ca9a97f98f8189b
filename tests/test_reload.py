"""
SIGHUP reloads users, routes and filters without dropping sessions.
"""

from __future__ import annotations

import imaplib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent

from mailproxy.auth import ProxyRealm
from mailproxy.config import loadConfig
from mailproxy.interfaces import IProxyUser
from mailproxy.passwords import hashPassword
from mailproxy.tap import ListenersService, buildService
from tests.conftest import HOST, UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import TWISTD, ProxyProcess, freePort

BASE = """
[auth]
users_file = "users"
failure_delay = 0.1

[[listener]]
name = "plain"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.plain]
host = "127.0.0.1"
port = {upstreamPort}

[routing]
default_upstream = "plain"
"""

READ_ONLY = """
[filters.readonly]
type = "policy"
read_only = true

[routing.users.carol]
filters = ["readonly"]
"""
ELSEWHERE = """
[upstream.other]
host = "127.0.0.1"
port = {upstreamPort}
"""


def writeUsers(directory: str, users: dict[str, str]) -> None:
    with open(os.path.join(directory, "users.new"), "w") as handle:
        for name, password in users.items():
            handle.write(f"{name}:{hashPassword(password, log2N=10)}\n")
    os.replace(os.path.join(directory, "users.new"), os.path.join(directory, "users"))


def writeConfig(directory: str, text: str, **values: Any) -> str:
    path = os.path.join(directory, "mailproxy.toml")
    with open(path, "w") as handle:
        handle.write(text.format(**values))
    return path


class Reloadable:
    """
    The service of a proxy built in memory from a config file in C{tmp_path}.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.directory = str(tmp_path)
        self.values = {"port": 1143, "upstreamPort": 1}
        writeUsers(self.directory, {"carol": "carolpw"})
        self.path = writeConfig(self.directory, BASE, **self.values)
        self.service: ListenersService = buildService(loadConfig(self.path), MemoryReactorClock(), self.path)
        self.events: list[dict[str, Any]] = []
        self.service.reloader.log = Logger(observer=self.events.append)

    @property
    def context(self) -> Any:
        return self.service.reloader.contexts[0]

    def rewrite(self, text: str) -> None:
        writeConfig(self.directory, text, **self.values)

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


def test_reload_gives_new_logins_new_filters_and_routes_and_keeps_old_chains(tmp_path: Path) -> None:
    """Chains handed out before the reload stay as they were; new ones follow the file."""
    proxy = Reloadable(tmp_path)
    before = proxy.context.filtersFor("carol")
    assert before.filters == []
    proxy.rewrite(
        BASE + ELSEWHERE + READ_ONLY.replace("[routing.users.carol]", '[routing.users.carol]\nupstream = "other"')
    )
    assert proxy.service.reloader.reload()
    assert [type(item).__name__ for item in proxy.context.filtersFor("carol").filters] == ["PolicyFilter"]
    assert before.filters == []
    realm = proxy.service.reloader.portal.realm
    assert isinstance(realm, ProxyRealm)
    _, user, _ = realm.requestAvatar("carol", None, IProxyUser)
    assert user.upstream.name == "other"
    assert "configuration reloaded: 1 routed users, 2 upstreams, 1 filters" in proxy.messages()


def test_reload_picks_up_a_new_users_file(tmp_path: Path) -> None:
    """A users_file pointing elsewhere is read at once (new users can log in)."""
    proxy = Reloadable(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    writeUsers(str(other), {"newcomer": "pw"})
    proxy.rewrite(BASE.replace('users_file = "users"', f'users_file = "{other}/users"'))
    assert proxy.service.reloader.reload()
    [checker] = set(proxy.service.reloader.portal.checkers.values())
    assert "newcomer" in checker._users


def test_broken_configuration_is_logged_and_the_running_one_kept(tmp_path: Path) -> None:
    """A file that does not load changes nothing."""
    proxy = Reloadable(tmp_path)
    chainFor = proxy.context.filtersFor
    proxy.rewrite(BASE + "[routing.users.carol]\nupstream = 'nowhere'\n")
    assert not proxy.service.reloader.reload()
    assert proxy.context.filtersFor is chainFor
    [message] = proxy.messages()
    assert message.startswith("configuration not reloaded, keeping the running one: ")
    assert "nowhere" in message


def test_listener_changes_are_reported_as_needing_a_restart(tmp_path: Path) -> None:
    """Ports and limits are bound at start-up; the rest still applies."""
    proxy = Reloadable(tmp_path)
    proxy.values["port"] = 1144
    proxy.rewrite(BASE + "[limits]\nmax_connections = 5\n")
    assert proxy.service.reloader.reload()
    assert "configuration changes to listeners, limits take effect only after a restart" in proxy.messages()
    assert proxy.context.config.limits.maxConnections != 5
    assert proxy.context.listener.endpoint.startswith("tcp:1143")


AUDIT = '\n[filters.audit]\ntype = "audit"\nfile = "{file}"\n'


def test_unchanged_filters_are_kept_across_reloads(tmp_path: Path) -> None:
    """Reloading again and again opens nothing new: a filter configured as before is the same object."""
    proxy = Reloadable(tmp_path)
    proxy.values["file"] = "audit.jsonl"
    proxy.rewrite((BASE + AUDIT).replace("[routing]", '[routing]\ndefault_filters = ["audit"]'))
    assert proxy.service.reloader.reload()
    first = proxy.service.reloader.filterGenerations[-1]["audit"]
    for _ in range(5):
        assert proxy.service.reloader.reload()
    assert proxy.service.reloader.filterGenerations[-1]["audit"] is first


def test_every_generation_of_filters_is_closed_once_at_stop(tmp_path: Path) -> None:
    """Sessions may still use old filters, so all of them are closed when the proxy stops."""
    proxy = Reloadable(tmp_path)
    files = []
    for name in ("one.jsonl", "two.jsonl"):
        proxy.values["file"] = name
        proxy.rewrite((BASE + AUDIT).replace("[routing]", '[routing]\ndefault_filters = ["audit"]'))
        assert proxy.service.reloader.reload()
        files.append(proxy.service.reloader.filterGenerations[-1]["audit"].file)
    assert files[0] is not files[1] and not any(item.closed for item in files)
    proxy.service.reloader.closeFilters()
    assert all(item.closed for item in files)


def test_a_running_listener_naming_a_removed_filter_refuses_the_reload(tmp_path: Path) -> None:
    """A listener gone from the file keeps running with its filters: they must still exist."""
    proxy = Reloadable(tmp_path)
    proxy.values["file"] = "audit.jsonl"
    withAudit = (BASE + AUDIT).replace(
        "allow_plaintext_auth = true", 'allow_plaintext_auth = true\nfilters = ["audit"]'
    )
    proxy.rewrite(withAudit)
    assert proxy.service.reloader.reload()
    proxy.rewrite(BASE.replace('name = "plain"', 'name = "renamed"'))
    assert not proxy.service.reloader.reload()
    assert "listener plain: no filter named audit" in proxy.messages()[-1]
    assert [type(item).__name__ for item in proxy.context.filtersFor(None).filters] == ["AuditFilter"]


def test_a_listeners_filters_change_without_a_restart(tmp_path: Path) -> None:
    """Only what is bound at start-up is reported as needing a restart."""
    proxy = Reloadable(tmp_path)
    proxy.values["file"] = "audit.jsonl"
    proxy.rewrite(
        (BASE + AUDIT).replace("allow_plaintext_auth = true", 'allow_plaintext_auth = true\nfilters = ["audit"]')
    )
    assert proxy.service.reloader.reload()
    assert [type(item).__name__ for item in proxy.context.filtersFor(None).filters] == ["AuditFilter"]
    assert not any("restart" in message for message in proxy.messages())


def test_the_hangup_handler_is_installed_before_the_ports_listen(tmp_path: Path) -> None:
    """Once a port accepts connections SIGHUP is the proxy's: a signal then reloads, it never ends the process."""
    proxy = Reloadable(tmp_path)
    reactor = proxy.service._clock
    previous = signal.getsignal(signal.SIGHUP)
    proxy.service.privilegedStartService()
    try:
        assert reactor.tcpServers, "no port bound"
        assert signal.getsignal(signal.SIGHUP) == proxy.service._hangup
    finally:
        proxy.service.startService()
        proxy.service.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_tls_server_settings_are_reported_as_needing_a_restart(tmp_path: Path) -> None:
    """certificate_check_interval and tls_session_lifetime are bound at start-up."""
    proxy = Reloadable(tmp_path)
    proxy.rewrite("[server]\ncertificate_check_interval = 5\ntls_session_lifetime = 60\n" + BASE)
    assert proxy.service.reloader.reload()
    assert (
        "configuration changes to certificateCheckInterval, tlsSessionLifetime take effect only after a restart"
        in proxy.messages()
    )
    assert (proxy.context.config.certificateCheckInterval, proxy.context.config.tlsSessionLifetime) == (60.0, 43200.0)


TLS_LISTENER = """
[[listener]]
name = "imaps"
endpoint = "tcp:1993:interface=127.0.0.1"
tls = "implicit"
certificate = "cert.pem"
private_key = "key.pem"
"""


def writePair(directory: Path, authority: trustme.CA) -> int:
    """
    A new certificate for localhost as cert.pem and key.pem; its serial.
    """
    leaf = authority.issue_cert("localhost")
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def test_sighup_reloads_certificates_even_when_the_configuration_does_not_load(tmp_path: Path) -> None:
    """The hang-up handler reloads the configuration and, independently of its fate, re-reads the certificate files."""
    authority = trustme.CA()
    writePair(tmp_path, authority)
    writeUsers(str(tmp_path), {"carol": "carolpw"})
    text = BASE.replace("[upstream.plain]", TLS_LISTENER + "\n[upstream.plain]")
    path = writeConfig(str(tmp_path), text, port=1143, upstreamPort=1)
    service = buildService(loadConfig(path), MemoryReactorClock(), path)
    assert service.certificates is not None
    [tls] = service.certificates.listeners
    before = tls.getContext()
    renewed = writePair(tmp_path, authority)
    writeConfig(str(tmp_path), text + "[routing\n", port=1143, upstreamPort=1)
    events: list[dict[str, Any]] = []
    service.reloader.log = service.certificates.log = Logger(observer=events.append)

    service._reload()

    assert tls.getContext() is not before
    assert tls.certificates[0].current.chain[0].get_serial_number() == renewed
    messages = [formatEvent(event) for event in events]
    assert messages[0].startswith("SIGHUP received")
    assert messages[1].startswith("configuration not reloaded, keeping the running one: ")
    assert messages[2].startswith("listener imaps: certificate reloaded (listener[1]): ")
    assert len(messages) == 3


# End to end: a real twistd and a real Dovecot.


@pytest.fixture
def running(dovecot: DovecotUpstream) -> Iterator[tuple[ProxyProcess, str, int]]:
    directory = tempfile.mkdtemp(prefix="mp-reload-")
    port = freePort()
    writeUsers(directory, {"carol": "carolpw"})
    path = writeConfig(directory, BASE, port=port, upstreamPort=dovecot.ports["imap"])
    process = ProxyProcess(path, os.path.join(directory, "twistd.log"))
    try:
        process.waitForPorts([port])
        yield process, directory, port
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


def waitForLog(process: ProxyProcess, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{process.log()}"
        time.sleep(0.05)


def test_sighup_reloads_users_and_filters_without_dropping_sessions(
    running: tuple[ProxyProcess, str, int], dovecot: DovecotUpstream
) -> None:
    """An open session keeps working unchanged; new logins get the new filters; new users can log in."""
    process, directory, port = running
    old = imaplib.IMAP4(HOST, port, timeout=30)
    assert old.login("carol", "carolpw")[0] == "OK"
    assert old.select("INBOX")[0] == "OK"
    writeUsers(directory, {"carol": "carolpw", "kim": UPSTREAM_USERS["kim"]})
    writeConfig(directory, BASE + READ_ONLY, port=port, upstreamPort=dovecot.ports["imap"])
    process.process.send_signal(signal.SIGHUP)
    waitForLog(process, "configuration reloaded")

    # The session opened before the reload is still there, without the new policy.
    assert old.noop()[0] == "OK"
    assert old.create("ReloadScratch")[0] == "OK"
    assert old.delete("ReloadScratch")[0] == "OK"
    old.logout()

    fresh = imaplib.IMAP4(HOST, port, timeout=30)
    assert fresh.login("carol", "carolpw")[0] == "OK"
    assert fresh.create("ReloadScratch")[0] == "NO"
    fresh.logout()

    newcomer = imaplib.IMAP4(HOST, port, timeout=30)
    assert newcomer.login("kim", UPSTREAM_USERS["kim"])[0] == "OK"
    newcomer.logout()
    assert process.process.poll() is None


def test_sighup_with_a_broken_file_keeps_serving(running: tuple[ProxyProcess, str, int]) -> None:
    """A typo in the reloaded file is logged; the proxy goes on with the configuration it had."""
    process, directory, port = running
    with open(os.path.join(directory, "mailproxy.toml"), "a") as handle:
        handle.write("[routing\n")
    process.process.send_signal(signal.SIGHUP)
    waitForLog(process, "configuration not reloaded")
    client = imaplib.IMAP4(HOST, port, timeout=30)
    assert client.login("carol", "carolpw")[0] == "OK"
    client.logout()


def test_systemd_unit_starts_the_proxy_and_reload_sends_sighup(
    running: tuple[ProxyProcess, str, int], tmp_path: Path
) -> None:
    """etc/mailproxy.service verifies with systemd-analyze, and its ExecStart and ExecReload work as written."""
    _, directory, _ = running
    unit = (Path(__file__).parent.parent / "etc" / "mailproxy.service").read_text()
    service = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith(("#", "[")))
    start = shlex.split(service["ExecStart"])
    assert start[0].endswith("/twistd") and "--nodaemon" in start and "mailproxy" in start
    start[0] = TWISTD
    start[start.index("--config") + 1] = os.path.join(directory, "mailproxy.toml")
    port = freePort()
    with open(start[-1]) as handle:
        config = re.sub(r"tcp:[0-9]+:", f"tcp:{port}:", handle.read())
    with open(start[-1], "w") as handle:
        handle.write(config)

    runnable = tmp_path / "mailproxy.service"
    runnable.write_text(unit.replace(shlex.split(service["ExecStart"])[0], TWISTD))
    verified = subprocess.run(["systemd-analyze", "verify", str(runnable)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr

    output = tmp_path / "stdout.log"
    with open(output, "wb") as handle:
        process = subprocess.Popen(start, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while b"IMAPServerFactory starting on %d" % port not in output.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
        reload = shlex.split(service["ExecReload"].replace("$MAINPID", str(process.pid)))
        subprocess.run(reload, check=True, timeout=10)
        while b"configuration reloaded" not in output.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=10)
