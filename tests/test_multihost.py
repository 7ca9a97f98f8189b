"""
Several proxy hosts behind a load balancer: two proxies (each its own
configuration and directory, as on two hosts) behind a private HAProxy that
sends PROXY protocol v2, both asking one private PostgreSQL for accounts,
in front of one Dovecot.  What the README's multi-host layout promises:
sessions spread over both; per-user session limits hold per host; a
stopped proxy says BYE to its IDLE sessions while the other's go on; new
connections then reach the other proxy.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from bench.haproxy import findHaproxy
from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.postgres import PROXY_ROLE, PostgresCluster
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy, tail
from tests.rawclient import readLine, readTagged
from tests.tomlconfig import listenerTable, table, upstreamTable

HAPROXY, WHY_NOT = findHaproxy()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason=WHY_NOT)

ANN, ANN_PW, ANN_UP, ANN_UP_PW = "ann", "ann local pw", "ann@mail.test", "ann upstream pw"
BOB, BOB_PW, BOB_UP, BOB_UP_PW = "bob", "bob local pw", "bob@mail.test", "bob upstream pw"
WAIT = 20.0

HAPROXY_CONFIG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    # A connection a stopped proxy refuses is tried again on the other.
    retries 3
    option redispatch
frontend imap
    bind {host}:{port}
    default_backend proxies
backend proxies
    balance roundrobin
    default-server send-proxy-v2 check check-send-proxy inter 500ms fall 1 rise 2
    server a {host}:{a}
    server b {host}:{b}
"""


@dataclass
class Host:
    name: str
    port: int
    directory: str
    process: ProxyProcess

    def logins(self, user: str) -> int:
        return len(re.findall(rf" logged in as {user}\b", self.process.log()))


@dataclass
class Deployment:
    port: int
    hosts: list[Host]
    dovecot: DovecotUpstream

    def connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=WAIT)
        greeting = readLine(sock)
        assert greeting.startswith(b"* OK"), greeting
        return sock

    def loginsPerHost(self, user: str, expected: list[int]) -> list[int]:
        """
        C{user}'s logins each host's log shows, once they are C{expected}
        or after a while (a worker's lines reach the log a moment later).
        """
        deadline = time.monotonic() + WAIT
        while True:
            found = [host.logins(user) for host in self.hosts]
            if found == expected or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def dovecotLogins(self, user: str) -> int:
        with open(self.dovecot.logFile, errors="replace") as handle:
            return len(re.findall(rf"imap-login: (?:Info: )?Login: user=<{re.escape(user)}>", handle.read()))

    def login(self, user: str, password: str, tag: bytes = b"l") -> tuple[socket.socket, bytes]:
        sock = self.connect()
        sock.sendall(tag + b' LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n')
        return sock, readTagged(sock, tag)


def proxyConfig(port: int, dovecot: DovecotUpstream, conninfo: str) -> str:
    return (
        table("auth", backend="sql", failureDelay=0.05, lookupTimeout=3)
        + table("auth.sql", driver="postgresql", database=conninfo)
        + table("limits", maxSessionsPerUser=1)
        + listenerTable("imap", port, allowPlaintextAuth=True, proxyProtocol=True, proxyProtocolTrusted=["127.0.0.0/8"])
        + upstreamTable("mail", dovecot.ports["imap"])
        + table("routing", defaultUpstream="mail")
        + table(f"routing.users.{ANN}", username=ANN_UP, password=ANN_UP_PW)
        + table(f"routing.users.{BOB}", username=BOB_UP, password=BOB_UP_PW)
    )


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    with ExitStack() as stack:
        dovecot = stack.enter_context(DovecotUpstream())
        dovecot.addUsers({ANN_UP: ANN_UP_PW, BOB_UP: BOB_UP_PW})
        cluster = stack.enter_context(PostgresCluster())
        cluster.sql(
            f"CREATE TABLE users (username text PRIMARY KEY, password text); GRANT SELECT ON users TO {PROXY_ROLE};"
        )
        for user, password in ((ANN, ANN_PW), (BOB, BOB_PW)):
            cluster.sql(f"INSERT INTO users VALUES ('{user}', '{hashPassword(password, log2N=10)}')")
        hosts = []
        for name in ("a", "b"):
            port = freePort()
            config = proxyConfig(port, dovecot, cluster.conninfo())
            directory, process = stack.enter_context(runningProxy(config, {}, [port], f"mp-host-{name}-"))
            hosts.append(Host(name, port, directory, process))
        port = stack.enter_context(PrivateHaproxy(hosts))
        yield Deployment(port, hosts, dovecot)


class PrivateHaproxy:
    """
    A private HAProxy in front of C{hosts}, run in the foreground and
    stopped by its PID.
    """

    def __init__(self, hosts: list[Host]) -> None:
        self.directory = tempfile.mkdtemp(prefix="mp-haproxy-")
        self.port = freePort()
        self.configPath = os.path.join(self.directory, "haproxy.cfg")
        self.logPath = os.path.join(self.directory, "haproxy.log")
        with open(self.configPath, "w") as handle:
            handle.write(HAPROXY_CONFIG.format(host=HOST, port=self.port, a=hosts[0].port, b=hosts[1].port))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> int:
        assert HAPROXY is not None
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", self.configPath], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as probe:
                    if probe.recv(100).startswith(b"* OK"):
                        return self.port
            except OSError:
                pass
            assert self.process.poll() is None, tail(self.logPath)
            assert time.monotonic() < deadline, "haproxy did not relay a greeting:\n" + tail(self.logPath)
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def test_sessions_spread_over_both_hosts_and_the_user_limit_holds_per_host(deployment: Deployment) -> None:
    """Limit 1 session per user on each host: ann gets one on each (two in all), a third is refused."""
    first, reply = deployment.login(ANN, ANN_PW)
    assert reply.startswith(b"l OK"), reply
    second, reply = deployment.login(ANN, ANN_PW)
    assert reply.startswith(b"l OK"), reply
    assert deployment.loginsPerHost(ANN, [1, 1]) == [1, 1]
    third, reply = deployment.login(ANN, ANN_PW)
    assert reply.startswith(b"l NO [LIMIT]"), reply
    for sock in (first, second, third):
        sock.close()
    assert deployment.dovecotLogins(ANN_UP) == 2
    # HAProxy checked each host every 0.5 s meanwhile (PROXY v2 LOCAL headers): no lines of their own.
    time.sleep(1.5)
    connected = sum(len(re.findall(r" connected to IMAP listener", host.process.log())) for host in deployment.hosts)
    # (the three logins, and the probe that saw HAProxy relay a greeting at start)
    assert connected == 4


def firstLineOtherThanStillHere(sock: socket.socket) -> bytes:
    """
    The first line an idler hears within a second, other than Dovecot's
    keepalive (every 10 s in the tests' Dovecot): C{b""} if none.
    """
    sock.settimeout(1)
    while True:
        line = readLine(sock)
        if line != b"* OK Still here\r\n":
            return line


def test_a_stopped_host_says_bye_to_its_idlers_and_new_clients_reach_the_other(deployment: Deployment) -> None:
    idlers = []
    for _ in range(2):
        sock, reply = deployment.login(BOB, BOB_PW)
        assert reply.startswith(b"l OK"), reply
        sock.sendall(b"s SELECT INBOX\r\n")
        assert readTagged(sock, b"s").startswith(b"s OK")
        sock.sendall(b"i IDLE\r\n")
        assert readLine(sock).startswith(b"+ ")
        idlers.append(sock)
    stopped, surviving = deployment.hosts
    assert deployment.loginsPerHost(BOB, [1, 1]) == [1, 1]
    # Which idler is on the stopped host: the one that hears BYE.
    stopped.process.stop()
    byes = [firstLineOtherThanStillHere(sock) for sock in idlers]
    assert sorted(byes) == [b"", b"* BYE Server shutting down\r\n"], byes
    survivor = idlers[byes.index(b"")]
    survivor.settimeout(WAIT)
    survivor.sendall(b"DONE\r\n")
    assert readTagged(survivor, b"i").startswith(b"i OK")
    survivor.sendall(b"n NOOP\r\n")
    assert readTagged(survivor, b"n").startswith(b"n OK")
    survivor.close()
    # New clients, as many as a round robin would send to each host: all served, by the other.
    for number in range(4):
        sock, reply = deployment.login(ANN, ANN_PW)
        assert reply.startswith(b"l OK"), (number, reply)
        sock.sendall(b"z LOGOUT\r\n")
        readTagged(sock, b"z")
        sock.close()
    assert deployment.loginsPerHost(ANN, [0, 4]) == [0, 4]
