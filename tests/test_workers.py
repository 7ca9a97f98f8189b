"""
Workers (C{server.workers}): several processes serve the same listeners,
and what must hold for the whole proxy holds across them: per-address and
per-user limits, lockouts, the credentials cache, reloads and metrics.  A
worker that dies is restarted and what it held is given back; SIGTERM
drains every worker.  All against a real twistd and the real Dovecot.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailproxy.passwords import hashPassword, writeUser
from tests.conftest import HOST, UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import TWISTD, ProxyProcess, freePort, runningProxy
from tests.tlssupport import Exit, Issuer, Startup, assertStoppedWithOneLine, served
from tests.tomlconfig import authTable, listenerTable, routingTable, table, upstreamTable

USER = "wendy"
PASSWORD = "wendy's proxy pw"
WORKERS = 2
WAIT = 20.0


@dataclass
class Workers:
    directory: str
    process: ProxyProcess
    port: int
    metricsPort: int
    dovecot: DovecotUpstream

    @property
    def log(self) -> str:
        return self.process.log()

    def waitForLog(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[re.Match[str]]:
        """
        The matches of C{pattern} in the proxy's log once there are
        C{count}.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log))
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{count} x {pattern!r} not in log:\n{self.log[-3000:]}"
                return found
            time.sleep(0.05)

    def workerPids(self) -> dict[int, int]:
        """
        The running workers' pids, by worker number, as the supervisor
        last logged them.
        """
        pids = {}
        for number, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log):
            pids[int(number)] = int(pid)
        return pids

    def serving(self, client: socket.socket | imaplib.IMAP4) -> int:
        """
        The number of the worker that logged C{client}'s connection.
        """
        sock = client.sock if isinstance(client, imaplib.IMAP4) else client
        port = sock.getsockname()[1]
        (match,) = self.waitForLog(rf"\[worker (\d+)\] 127\.0\.0\.1:{port} connected")
        return int(match.group(1))


def workersConfig(port: int, metricsPort: int, dovecot: DovecotUpstream, limits: dict[str, int] | None = None) -> str:
    return (
        table("server", workers=WORKERS, greeting="first greeting")
        + authTable(failureDelay=0.05)
        + listenerTable("imap", port, allowPlaintextAuth=True)
        + upstreamTable("dovecot", dovecot.ports["imap"])
        + routingTable("dovecot", {USER: {"password": UPSTREAM_USERS[USER]}})
        + table("limits", **(limits or {}))
        + table("metrics", listen=f"tcp:{metricsPort}:interface={HOST}")
    )


@pytest.fixture
def startWorkers(dovecot: DovecotUpstream) -> Iterator[Callable[..., Workers]]:
    with ExitStack() as running:

        def start(limits: dict[str, int] | None = None) -> Workers:
            port, metricsPort = freePort(), freePort()
            config = workersConfig(port, metricsPort, dovecot, limits)
            directory, process = running.enter_context(
                runningProxy(config, {USER: PASSWORD}, [port, metricsPort], "mp-workers-")
            )
            workers = Workers(directory, process, port, metricsPort, dovecot)
            workers.waitForLog(r"\[worker \d+\] IMAPServerFactory.* starting", WORKERS)
            return workers

        yield start


def connect(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4(HOST, port, timeout=WAIT)


def loggedIn(port: int, password: str = PASSWORD) -> imaplib.IMAP4:
    client = connect(port)
    client.login(USER, password)
    return client


def closeAll(clients: list[imaplib.IMAP4]) -> None:
    for client in clients:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


def connectionsOnEveryWorker(workers: Workers, count: int = WORKERS, tries: int = 60) -> list[imaplib.IMAP4]:
    """
    C{count} open connections that reach every worker (the kernel picks
    the worker): a connection to a worker already served is closed and
    tried again until each has one.
    """
    kept: list[imaplib.IMAP4] = []
    seen: set[int] = set()
    for _ in range(tries):
        if len(kept) == count and len(seen) == WORKERS:
            return kept
        try:
            client = connect(workers.port)
        except imaplib.IMAP4.error:
            # Over a limit until a closed connection is given back.
            time.sleep(0.1)
            continue
        number = workers.serving(client)
        if number in seen and len(kept) + (WORKERS - len(seen)) >= count:
            closeAll([client])
            continue
        kept.append(client)
        seen.add(number)
    raise AssertionError(f"{count} connections reaching every worker not made in {tries} tries: {seen}")


def dovecotLogins(dovecot: DovecotUpstream) -> int:
    with open(dovecot.logFile, errors="replace") as handle:
        return len(re.findall(rf"imap-login: (?:Info: )?Login: user=<{USER}>", handle.read()))


def test_every_worker_serves_and_logs_to_the_one_log(startWorkers: Callable[..., Workers]) -> None:
    """Each worker is a separate process accepting on the same port; all their lines are in the supervisor's log."""
    workers = startWorkers()
    pids = workers.workerPids()
    assert sorted(pids) == [1, 2] and workers.process.pid not in pids.values()
    clients = connectionsOnEveryWorker(workers)
    for client in clients:
        client.login(USER, PASSWORD)
        assert client.select("INBOX", readonly=True)[0] == "OK"
    closeAll(clients)
    workers.waitForLog(r"\[worker 1\] .* logged in as wendy")
    workers.waitForLog(r"\[worker 2\] .* logged in as wendy")
    workers.waitForLog(r"\[worker \d\] .* disconnected", WORKERS)
    # Whole lines, each stamped; nothing about each session's upstream factory.
    lines = workers.log.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[", line) for line in lines), lines
    assert not [line for line in lines if "factory <twisted.internet.protocol.Factory" in line]


def test_per_address_connection_limit_counts_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """With 3 connections allowed per address, spread over both workers, the 4th is refused, and a freed place is reused."""
    workers = startWorkers({"max_connections_per_ip": 3})
    clients = connectionsOnEveryWorker(workers, 3)
    for _ in range(6):
        with pytest.raises(imaplib.IMAP4.error, match="too many connections from your address"):
            connect(workers.port)
    assert "connection refused: ip=127.0.0.1 protocol=imap: too many connections from your address" in workers.log
    closeAll(clients[:1])
    deadline = time.monotonic() + WAIT
    while True:
        try:
            again = loggedIn(workers.port)
            break
        except imaplib.IMAP4.error:
            assert time.monotonic() < deadline, "the freed place was never given back"
            time.sleep(0.1)
    closeAll([again, *clients[1:]])


def test_lockout_after_failures_on_different_workers_holds_on_every_worker(
    startWorkers: Callable[..., Workers],
) -> None:
    """
    Wrong passwords sent through both workers add up to one lockout: the
    right password is then refused on every worker and never reaches
    Dovecot.
    """
    workers = startWorkers({"failures_before_lockout": 4})
    clients = connectionsOnEveryWorker(workers, 4)
    for client in clients:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(USER, "a wrong guess")
    workers.waitForLog(r"authentication lockout: ip=127\.0\.0\.1")
    before = dovecotLogins(workers.dovecot)
    closeAll(clients)
    locked = connectionsOnEveryWorker(workers)
    for client in locked:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(USER, PASSWORD)
    closeAll(locked)
    workers.waitForLog(r"authentication refused: ip=127\.0\.0\.1 protocol=imap user=wendy reason=address-locked-out", 2)
    assert dovecotLogins(workers.dovecot) == before


def test_per_user_session_limit_counts_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """
    Two sessions allowed per user, one on each worker: a third login is
    refused whichever worker takes it, and never reaches Dovecot.
    """
    workers = startWorkers({"max_sessions_per_user": 2})
    before = dovecotLogins(workers.dovecot)
    sessions = connectionsOnEveryWorker(workers)
    for client in sessions:
        client.login(USER, PASSWORD)
    extra = connectionsOnEveryWorker(workers)
    for client in extra:
        with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
            client.login(USER, PASSWORD)
    closeAll(extra)
    closeAll(sessions)
    workers.waitForLog(r"session refused: ip=127\.0\.0\.1 protocol=imap user=wendy: too many sessions", len(extra))
    # Dovecot logs a login as it starts: the two sessions, none of the refused.
    assert dovecotLogins(workers.dovecot) - before == len(sessions)


def test_a_changed_password_is_refused_by_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """
    The credentials cache is the supervisor's: a login cached through one
    worker, then a new password in the users file, and the old password is
    refused through every worker (never reaching Dovecot), the new one
    accepted.
    """
    workers = startWorkers()
    for client in connectionsOnEveryWorker(workers):
        client.login(USER, PASSWORD)
        client.logout()
    writeUser(os.path.join(workers.directory, "users"), USER, hashPassword("the new one", log2N=10))
    before = dovecotLogins(workers.dovecot)
    clients = connectionsOnEveryWorker(workers)
    for client in clients:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(USER, PASSWORD)
    closeAll(clients)
    assert dovecotLogins(workers.dovecot) == before
    loggedIn(workers.port, "the new one").logout()


def test_a_killed_worker_is_restarted_and_what_it_held_is_given_back(startWorkers: Callable[..., Workers]) -> None:
    """
    Both workers killed with SIGKILL while holding the only two places an
    address has: they are restarted, and the places are free again.
    """
    workers = startWorkers({"max_connections_per_ip": 2})
    clients = connectionsOnEveryWorker(workers, 2)
    old = workers.workerPids()
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    workers.waitForLog(r"worker \d \(pid \d+\) was killed .*; restarting it in", WORKERS)
    workers.waitForLog(r"worker \d started \(pid \d+\)", 2 * WORKERS)
    new = workers.workerPids()
    assert sorted(new) == [1, 2] and not set(new.values()) & set(old.values())
    for client in clients:
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            client.noop()
    fresh = [loggedIn(workers.port), loggedIn(workers.port)]
    closeAll(fresh)


def test_sighup_reloads_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """SIGHUP to the supervisor reaches each worker: each logs the reload, and every new connection sees the new greeting."""
    workers = startWorkers()
    configPath = os.path.join(workers.directory, "mailproxy.toml")
    with open(configPath) as handle:
        text = handle.read()
    with open(configPath, "w") as handle:
        handle.write(text.replace("first greeting", "second greeting"))
    os.kill(workers.process.pid, signal.SIGHUP)
    workers.waitForLog(r"\[worker 1\] configuration reloaded")
    workers.waitForLog(r"\[worker 2\] configuration reloaded")
    clients = connectionsOnEveryWorker(workers)
    assert all(b"second greeting" in client.welcome for client in clients)
    closeAll(clients)


def test_metrics_add_up_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """One /metrics: the logins counted by both workers are summed."""
    workers = startWorkers()
    clients = connectionsOnEveryWorker(workers)
    for client in clients:
        client.login(USER, PASSWORD)
    closeAll(clients)
    url = f"http://{HOST}:{workers.metricsPort}/metrics"
    deadline = time.monotonic() + WAIT
    while True:
        text = urllib.request.urlopen(url, timeout=WAIT).read().decode()
        match = re.search(r'^mailproxy_logins_total\{protocol="imap",result="ok"\} (\S+)$', text, re.M)
        if match and float(match.group(1)) == len(clients) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert match is not None and float(match.group(1)) == len(clients), text
    assert text.count("# TYPE mailproxy_logins_total counter") == 1


def test_sigterm_drains_every_worker(startWorkers: Callable[..., Workers]) -> None:
    """SIGTERM: every idling client gets BYE, then the connection closes, and twistd and its workers exit."""
    workers = startWorkers()
    clients = connectionsOnEveryWorker(workers)
    for client in clients:
        client.login(USER, PASSWORD)
        client.select("INBOX", readonly=True)
        client.send(b"i1 IDLE\r\n")
        assert client.readline().startswith(b"+")
    pids = list(workers.workerPids().values())
    os.kill(workers.process.pid, signal.SIGTERM)
    for client in clients:
        rest = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = client.readline()
            if not line:
                break
            rest += line
        assert b"* BYE Server shutting down" in rest
    # twistd ends itself with the signal that stopped it.
    assert workers.process.process.wait(WAIT) in (0, -signal.SIGTERM)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_sighup_reloads_the_certificates_of_every_worker(dovecot: DovecotUpstream, tmp_path: Path) -> None:
    """A renewed certificate and SIGHUP: each worker logs the reload, and every new connection is served the new one."""
    issuer = Issuer(tmp_path)
    old = issuer.issue("server", "localhost")
    port = freePort()
    config = (
        table("server", workers=WORKERS, certificateCheckInterval=0)
        + authTable()
        + listenerTable("imaps", port, tls="implicit", certificate=old.certFile, privateKey=old.keyFile)
        + upstreamTable("dovecot", dovecot.ports["imap"])
        + routingTable("dovecot")
    )
    with runningProxy(config, {USER: PASSWORD}, [port], "mp-workers-tls-") as (directory, process):
        workers = Workers(directory, process, port, 0, dovecot)
        workers.waitForLog(r"\[worker \d+\] IMAPServerFactory.* starting", WORKERS)
        new = issuer.issue("server", "localhost")
        os.kill(process.pid, signal.SIGHUP)
        for number in range(1, WORKERS + 1):
            workers.waitForLog(rf"\[worker {number}\] listener imaps: certificate reloaded \(listener\[0\]\)")
        for _ in range(8):
            certificate, greeting = served(port, issuer.caFile, "localhost")
            assert certificate.serial_number == new.serial and greeting.startswith(b"* OK")


def test_an_unusable_key_stops_start_up_before_any_worker_starts(tmp_path: Path) -> None:
    """The supervisor checks every certificate and key: one line, exit 1, and no worker ever started."""
    issuer = Issuer(tmp_path)
    good, other = issuer.issue("good", "localhost"), issuer.issue("other", "localhost")
    port = freePort()
    listener = listenerTable("imaps", port, tls="implicit", certificate=good.certFile, privateKey=other.keyFile)
    result = Startup(tmp_path, {port: listener}, workers=WORKERS).exit(time.monotonic() + WAIT)
    assertStoppedWithOneLine(result, "listener[0].private_key: does not match the certificate")
    assert isinstance(result, Exit) and "worker" not in result.stdout + result.stderr


def test_a_second_proxy_on_the_same_port_is_refused_not_joined(startWorkers: Callable[..., Workers]) -> None:
    """SO_REUSEPORT must not let a second proxy share a port in use: it stops at start-up with one line."""
    workers = startWorkers()
    directory = Path(workers.directory) / "second"
    directory.mkdir()
    (directory / "users").write_text(f"{USER}:{hashPassword(PASSWORD, log2N=4)}\n")
    config = directory / "mailproxy.toml"
    config.write_text(workersConfig(workers.port, freePort(), workers.dovecot))
    second = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailproxy", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=directory,
        stdin=subprocess.DEVNULL,
    )
    assert second.returncode != 0
    assert f"mailproxy: listener imap: Couldn't listen on {HOST}:{workers.port}" in second.stderr + second.stdout
    assert "Traceback" not in second.stderr + second.stdout
    loggedIn(workers.port).logout()
