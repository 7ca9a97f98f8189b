"""
Fault injection against a real C{twistd} proxy: upstreams that are
unreachable, never greet, refuse, reject the login, reset or close in the
middle of a message, stall, or present a bad certificate (implicit TLS and
STARTTLS/STLS), for IMAP clients, the POP3 relay and the POP3-to-IMAP
bridge.  Each client gets a protocol-correct error in bounded time and the
log says why, without a traceback; meanwhile the proxy keeps serving a
normal Dovecot session, and after many faulted sessions its descriptors
return to the baseline and its memory stays put.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import trustme

from mailproxy.passwords import hashPassword
from tests.conftest import UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.faultyupstream import MESSAGE_SIZE, PARTIAL, Blackhole, Fault, FaultyUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, openFiles, residentKiB
from tests.support import FAST_HASH

TIMEOUT = 1  # connect_timeout and response_timeout of the faulty upstreams
CLIENT_DEADLINE = 15.0  # a session that takes longer has hung: the test fails
PASSWORD = "pw"

# name -> (fault, TLS mode, certificate); "refused" and "blackhole" have no server.
CASES = {
    "refused": (None, "plain", None),
    "blackhole": (None, "plain", None),
    "nevergreet": (Fault.NEVER_GREET, "plain", None),
    "freezetls": (Fault.FREEZE, "implicit", "good"),  # never answers a TLS close either
    "refuse": (Fault.REFUSE, "plain", None),
    "reject": (Fault.REJECT_LOGIN, "plain", None),
    "reset": (Fault.RESET_MID_FETCH, "plain", None),
    "close": (Fault.CLOSE_MID_FETCH, "plain", None),
    "stall": (Fault.STALL, "plain", None),
    "trickle": (Fault.TRICKLE, "plain", None),  # each handshake step bounded as a whole, not per line
    "stalltls": (Fault.STALL, "implicit", "good"),
    "untrusted": (Fault.NONE, "implicit", "untrusted"),
    "untrustedstarttls": (Fault.NONE, "starttls", "untrusted"),
    "wrongname": (Fault.NONE, "implicit", "wrongname"),
    "wrongnamestarttls": (Fault.NONE, "starttls", "wrongname"),
}
LOGIN_FAULTS = {name for name in CASES if name not in ("reset", "close", "stall", "stalltls")}
# (client protocol, upstream protocol): IMAP relay, POP3 relay, POP3 bridge.
PATHS = [("imap", "imap"), ("pop3", "pop3"), ("pop3", "imap")]


@dataclass
class FaultyProxy:
    ports: dict[str, int]
    process: ProxyProcess

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def log(self) -> str:
        return self.process.log()


def user(case: str, upstreamProtocol: str) -> str:
    return f"{upstreamProtocol}-{case}"


@pytest.fixture(scope="module")
def faultyProxy(dovecot: DovecotUpstream) -> Iterator[FaultyProxy]:
    directory = tempfile.mkdtemp(prefix="mp-faults-")
    trusted, untrusted = trustme.CA(), trustme.CA()
    certificates = {
        "good": trusted.issue_cert("127.0.0.1"),
        "untrusted": untrusted.issue_cert("127.0.0.1"),
        "wrongname": trusted.issue_cert("wrong.example"),
    }
    caFile = os.path.join(directory, "ca.pem")
    trusted.cert_pem.write_to_path(caFile)
    servers: list[FaultyUpstream] = []
    blackhole = Blackhole()
    process = None
    try:
        upstreams = []
        for (name, (fault, tls, certificate)), protocol in [
            (case, p) for case in CASES.items() for p in ("imap", "pop3")
        ]:
            if name == "refused":
                port = freePort()
            elif name == "blackhole":
                port = blackhole.port
            else:
                assert fault is not None
                paths = {}
                if certificate is not None:
                    leaf = certificates[certificate]
                    paths = {"certFile": os.path.join(directory, f"{certificate}.pem")}
                    leaf.private_key_and_cert_chain_pem.write_to_path(paths["certFile"])
                server = FaultyUpstream(fault, protocol, tls, **paths)
                servers.append(server)
                port = server.port
            upstreams.append(
                f'[upstream.{user(name, protocol)}]\nprotocol = "{protocol}"\nhost = "{HOST}"\nport = {port}\n'
                f'tls = "{tls}"\nca_file = "{caFile}"\nconnect_timeout = {TIMEOUT}\nresponse_timeout = {TIMEOUT}\n'
                f'[routing.users.{user(name, protocol)}]\nupstream = "{user(name, protocol)}"\n'
            )
        users = {user(name, protocol): PASSWORD for name in CASES for protocol in ("imap", "pop3")}
        users["carol"] = UPSTREAM_USERS["carol"]
        users["pat"] = UPSTREAM_USERS["pat"]
        with open(os.path.join(directory, "users"), "w") as handle:
            for name, password in users.items():
                handle.write(f"{name}:{hashPassword(password, **FAST_HASH)}\n")
        ports = {"imap": freePort(), "pop3": freePort()}
        configPath = os.path.join(directory, "mailproxy.toml")
        with open(configPath, "w") as handle:
            handle.write(
                f"""
[auth]
users_file = "users"
failure_delay = 0.05

[limits]
failure_window = 0.001   # repeated upstream rejections must not throttle the test client

[[listener]]
name = "imap"
endpoint = "tcp:{ports["imap"]}:interface=127.0.0.1"
allow_plaintext_auth = true

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{ports["pop3"]}:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.dovecot]
host = "{HOST}"
port = {dovecot.ports["imap"]}

[routing]
default_upstream = "dovecot"

"""
                + "\n".join(upstreams)
            )
        process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
        process.waitForPorts(list(ports.values()))
        yield FaultyProxy(ports, process)
    finally:
        if process is not None:
            process.stop()
        for server in servers:
            server.close()
        blackhole.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- clients --------------------------------------------------------------------


class Client:
    """
    A raw client socket; reads fail the test after L{CLIENT_DEADLINE}.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=1)
        host, port = self.sock.getsockname()
        self.address = f"{host}:{port}"
        self.buffer = b""
        self.closed = False
        self.deadline = time.monotonic() + CLIENT_DEADLINE

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"no answer in {CLIENT_DEADLINE} s; got {self.buffer[-200:]!r}")
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
        self.buffer += data

    def readUntil(self, marker: bytes) -> bytes:
        """
        What arrives up to and including C{marker}, or up to the close.
        """
        while marker not in self.buffer and not self.closed:
            self._read()
        end = self.buffer.find(marker)
        end = len(self.buffer) if end == -1 else end + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def readLine(self) -> bytes:
        return self.readUntil(b"\r\n")

    def readToEnd(self) -> bytes:
        while not self.closed:
            self._read()
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


def imapSession(proxy: FaultyProxy, name: str) -> tuple[Client, bytes]:
    """
    Log in and fetch message 1; return the client and what came after the
    login (or the login's refusal).
    """
    client = Client(proxy.ports["imap"])
    try:
        client.readLine()
        client.send(b"a LOGIN %s %s\r\n" % (name.encode(), PASSWORD.encode()))
        reply = client.readLine()
        if not reply.startswith(b"a OK"):
            return client, reply
        client.send(b"b SELECT INBOX\r\n")
        client.readUntil(b"b OK")
        client.readLine()
        client.send(b"c FETCH 1 BODY.PEEK[]\r\n")
        return client, client.readToEnd()
    finally:
        client.close()


def pop3Session(proxy: FaultyProxy, name: str) -> tuple[Client, bytes]:
    """
    Log in and retrieve message 1, as L{imapSession}.
    """
    client = Client(proxy.ports["pop3"])
    try:
        client.readLine()
        client.send(b"USER %s\r\nPASS %s\r\n" % (name.encode(), PASSWORD.encode()))
        client.readLine()
        reply = client.readLine()
        if not reply.startswith(b"+OK"):
            return client, reply
        client.send(b"RETR 1\r\n")
        return client, client.readToEnd()
    finally:
        client.close()


def runCase(proxy: FaultyProxy, case: str, clientProtocol: str, upstreamProtocol: str) -> tuple[Client, bytes]:
    session = imapSession if clientProtocol == "imap" else pop3Session
    return session(proxy, user(case, upstreamProtocol))


def checkOutcome(case: str, clientProtocol: str, upstreamProtocol: str, client: Client, outcome: bytes) -> None:
    """
    The protocol-correct answer to each fault.
    """
    if case in LOGIN_FAULTS:
        if clientProtocol == "imap":
            code = b"AUTHENTICATIONFAILED" if case == "reject" else b"UNAVAILABLE"
            assert outcome.startswith(b"a NO [%s] " % code), outcome
        else:
            code = b"AUTH" if case == "reject" else b"SYS/TEMP"
            assert outcome.startswith(b"-ERR [%s] " % code), outcome
        return
    assert client.closed, outcome
    if case in ("reset", "close"):
        # Part of the message, then the close: nothing that could complete it.
        head = {
            "imap": b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % MESSAGE_SIZE,
            "pop3": b"+OK message follows\r\n" if upstreamProtocol == "pop3" else b"+OK Message follows\r\n",
        }[clientProtocol]
        assert outcome.startswith(head), outcome[:100]
        body = outcome[len(head) :]
        assert body == b"x" * len(body), body[-100:]
        assert len(body) <= PARTIAL if case == "reset" else len(body) == PARTIAL
        return
    expected = {
        ("imap", "imap"): b"* BYE [UNAVAILABLE] Upstream server not responding\r\n",
        ("pop3", "pop3"): b"-ERR [SYS/TEMP] Upstream server not responding\r\n",
        ("pop3", "imap"): b"-ERR [SYS/TEMP] Mailbox unavailable\r\n",
    }[clientProtocol, upstreamProtocol]
    assert outcome == expected


def expectedLogLine(case: str, clientProtocol: str, upstreamProtocol: str, client: Client) -> str:
    name = user(case, upstreamProtocol)
    if case in LOGIN_FAULTS:
        return rf"{re.escape(client.address)} user {name}: upstream {name} unavailable: \S"
    if case in ("reset", "close"):
        if clientProtocol == "imap":
            return rf"{re.escape(client.address)} upstream closed the session"
        if upstreamProtocol == "pop3":
            return r"upstream closed the session"
        return r"message stream failed: message 1 failed after its first octets: upstream closed"
    return rf"{re.escape(client.address)} (IMAP )?upstream( {name})? did not answer for {TIMEOUT}(\.0)? s"


def waitForLog(proxy: FaultyProxy, pattern: str) -> None:
    deadline = time.monotonic() + 5
    while not re.search(pattern, proxy.log()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}:\n{proxy.log()[-3000:]}")
        time.sleep(0.05)


def assertNoTraceback(proxy: FaultyProxy) -> None:
    log = proxy.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]


def normalSession(proxy: FaultyProxy, dovecot: DovecotUpstream) -> None:
    """
    carol's first message through the proxy is byte for byte what Dovecot
    itself returns; pat's POP3 (bridge) listing works.
    """
    direct = Client(dovecot.ports["imap"])
    through = Client(proxy.ports["imap"])
    bodies = []
    try:
        for client in (direct, through):
            client.readLine()
            password = UPSTREAM_USERS["carol"].encode()
            client.send(b"a LOGIN carol %s\r\nb EXAMINE INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n" % password)
            bodies.append(client.readUntil(b"\r\nc OK").split(b"* 1 FETCH", 1)[1])
    finally:
        direct.close()
        through.close()
    assert bodies[0] == bodies[1] and len(bodies[0]) > 100
    client = Client(proxy.ports["pop3"])
    try:
        client.readLine()
        client.send(b"USER pat\r\nPASS %s\r\nSTAT\r\nQUIT\r\n" % UPSTREAM_USERS["pat"].encode())
        assert re.search(rb"\+OK Logged in\.\r\n\+OK [1-9]\d* \d+\r\n\+OK", client.readToEnd())
    finally:
        client.close()


ALL = [(case, clientProtocol, upstreamProtocol) for case in CASES for clientProtocol, upstreamProtocol in PATHS]


@pytest.mark.parametrize(("case", "clientProtocol", "upstreamProtocol"), ALL)
def test_fault_gets_a_protocol_error_and_a_log_line(
    faultyProxy: FaultyProxy, case: str, clientProtocol: str, upstreamProtocol: str
) -> None:
    """Each fault, on each path: the right error in bounded time, a log line saying why, no traceback."""
    client, outcome = runCase(faultyProxy, case, clientProtocol, upstreamProtocol)
    checkOutcome(case, clientProtocol, upstreamProtocol, client, outcome)
    waitForLog(faultyProxy, expectedLogLine(case, clientProtocol, upstreamProtocol, client))
    assertNoTraceback(faultyProxy)


def settledDescriptors(pid: int, atMost: int | None = None) -> int:
    """
    The descriptor count once it stops changing (and is at most C{atMost}),
    within a bounded wait.
    """
    deadline = time.monotonic() + 15
    last = -1
    while True:
        count = openFiles(pid)
        if count == last and (atMost is None or count <= atMost):
            return count
        if time.monotonic() > deadline:
            return count
        last = count
        time.sleep(0.3)


ROUNDS = 4


def test_faulted_sessions_leak_nothing_and_others_are_served(
    faultyProxy: FaultyProxy, dovecot: DovecotUpstream
) -> None:
    """
    Rounds of every fault on every path, run concurrently with normal
    sessions to Dovecot (which keep working): afterwards the proxy's open
    descriptors are back to the baseline and its RSS grew little.
    """
    pid = faultyProxy.pid
    with ThreadPoolExecutor(max_workers=12) as pool:

        def round() -> int:
            jobs = [pool.submit(runCase, faultyProxy, *case) for case in ALL]
            served = [pool.submit(normalSession, faultyProxy, dovecot) for _ in range(2)]
            for job, case in zip(jobs, ALL, strict=True):
                checkOutcome(*case, *job.result())
            for job in served:
                job.result()
            return len(jobs)

        round()  # warm up: thread pool, TLS contexts, caches
        baseline = settledDescriptors(pid)
        rssBefore = residentKiB(pid)
        faulted = sum(round() for _ in range(ROUNDS))
        after = settledDescriptors(pid, atMost=baseline)
        rssAfter = residentKiB(pid)
    print(
        f"\n{faulted} faulted sessions: descriptors {baseline} -> {after}; "
        f"RSS {rssBefore} KiB -> {rssAfter} KiB ({(rssAfter - rssBefore) / 1024:+.1f} MiB)"
    )
    assert faulted >= 100
    assert after <= baseline
    assert rssAfter - rssBefore < 16 * 1024
    assertNoTraceback(faultyProxy)
