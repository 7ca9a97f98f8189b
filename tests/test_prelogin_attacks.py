"""
Attacks on the defences before login, as an adversarial review ran them,
against real C{twistd -n mailproxy} processes in front of the private
Dovecot: filling the login queue, clients that never read, getting others
banned, colliding user names, retries through an outage, log flooding,
mixed mechanisms, pipelining, dual stack, disconnecting at every moment,
silent connections in every state, renegotiation and forged names.

Each test uses its own loopback source addresses (127.0.x.y) and its own
user names, so one test's lockouts and turns never touch another's.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, openFiles, residentKiB, runningProxy
from tests.rawclient import (
    authLines,
    clientHello,
    closeAbruptly,
    connectFrom,
    imapLogin,
    readLine,
    readTagged,
)
from tests.tomlconfig import arrayTable, authTable, listenerTable, namedListeners, routingTable, table, upstreamTable

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "mailproxy.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "mailproxy.local"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex") or "/usr/bin/fail2ban-regex"

DEADLINE = 4.0
LOCKOUT_AFTER = 5
LOCKOUT_SECONDS = 3.0
FAILURE_DELAY = 0.02
MAX_SESSIONS = 3
SLOTS = 150

# Names longer than the 64 characters a log line shows (mailproxy.logs.MAX_LOGGED_NAME).
LONG_PREFIX = "a" * 64
LONG_REAL = LONG_PREFIX + "-alice"
LONG_FAKE = LONG_PREFIX + "-mallory"

# local name -> password; every one logs in upstream as carol (stored credentials).
USERS = {
    "carol": "carolpw",
    "mx": "mx-right",
    "pl": "pl-right",
    "ds": "ds-right",
    "tl": "tl-right",
    "inn": "inn-right",
    "sl": "sl-right",
    "slow": "slow-right",
    "st": "st-right",
    "fx": "fx-right",
    LONG_REAL: "long-right",
}


def _ipv6Available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _ipv6Available()


def arenaConfig(ports: dict[str, int], dovecot: DovecotUpstream, flakyPort: int, slowPort: int) -> str:
    standard = {name: ports[name] for name in ("plain", "pop3", "starttls", "implicit")}
    dual = ""
    if IPV6:
        dual = arrayTable(
            "listener", name="dual", endpoint=f"tcp6:{ports['dual']}:interface=\\:\\:", allowPlaintextAuth=True
        )
    carol = {"username": "carol", "password": "carolpw"}
    users: dict[str, dict[str, str]] = {
        "carol": {"upstream": "plain"},
        "sl": {"upstream": "flaky", **carol},
        "slow": {"upstream": "slow", **carol},
    }
    users.update((name, carol) for name in USERS if name not in users)
    return (
        table("server", loginDeadline=DEADLINE, preauthTimeout=60)
        + authTable(failureDelay=FAILURE_DELAY, hashThreads=2)
        + table(
            "limits",
            maxConnections=SLOTS,
            maxConnectionsPerIp=SLOTS,
            maxSessionsPerUser=MAX_SESSIONS,
            failuresBeforeLockout=LOCKOUT_AFTER,
            lockoutSeconds=LOCKOUT_SECONDS,
        )
        + namedListeners(standard, dovecot.certFile, dovecot.keyFile)
        + listenerTable(
            "lb", ports["lb"], allowPlaintextAuth=True, proxyProtocol=True, proxyProtocolTrusted=["127.0.0.0/8"]
        )
        + dual
        + upstreamTable("plain", dovecot.ports["imap"])
        + upstreamTable("flaky", flakyPort, connectTimeout=2)
        + upstreamTable("slow", slowPort, connectTimeout=30)
        + routingTable("plain", users)
    )


@dataclass
class Arena:
    ports: dict[str, int]
    directory: str
    process: ProxyProcess
    flakyPort: int
    slowListener: socket.socket

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def log(self) -> str:
        return fullLog(self.directory)

    def connect(self, listener: str, source: str = HOST) -> socket.socket:
        return connectFrom(self.ports[listener], source)

    def authLines(self, source: str, kind: str) -> list[str]:
        return authLines(self.log(), source, kind)


def fullLog(directory: str) -> str:
    """
    The whole log: twistd rotates twistd.log every megabyte (twistd.log.1 is the newest rotated one).
    """
    rotated = sorted(
        (name for name in os.listdir(directory) if re.fullmatch(r"twistd\.log\.\d+", name)),
        key=lambda name: -int(name.rsplit(".", 1)[1]),
    )
    text = []
    for name in [*rotated, "twistd.log"]:
        with open(os.path.join(directory, name), errors="replace") as handle:
            text.append(handle.read())
    return "".join(text)


@pytest.fixture(scope="module")
def arena(dovecot: DovecotUpstream) -> Iterator[Arena]:
    ports = {name: freePort() for name in ["plain", "pop3", "starttls", "implicit", "lb"]}
    if IPV6:
        # Bound on :: (IPv6 and IPv4): free on every address, not only 127.0.0.1.
        ports["dual"] = freePort("::")
    flakyPort = freePort()
    # An upstream that accepts TCP (the kernel does) and never says a word.
    slow = socket.socket()
    slow.bind((HOST, 0))
    slow.listen(64)
    config = arenaConfig(ports, dovecot, flakyPort, slow.getsockname()[1])
    try:
        with runningProxy(config, USERS, [port for name, port in ports.items() if name != "lb"], prefix="mp-zz-") as (
            directory,
            process,
        ):
            yield Arena(ports, directory, process, flakyPort, slow)
    finally:
        slow.close()


# -- small client helpers ------------------------------------------------------------


def plainResponse(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def fail2banHosts(directory: str) -> list[str]:
    """The host of every line the shipped filter matches in the whole log (the real fail2ban-regex)."""
    assert os.path.exists(FAIL2BAN_REGEX), "fail2ban-regex not found"
    logPath = os.path.join(directory, "whole.log")
    with open(logPath, "w") as handle:
        handle.write(fullLog(directory))
    rows = subprocess.run(
        [FAIL2BAN_REGEX, "--raw", "--encoding=UTF-8", "--out=row", logPath, str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    hosts = []
    for line in rows.stdout.splitlines():
        if line.strip():
            hosts.append(str(ast.literal_eval(line.strip().rstrip(","))[0]))
    return hosts


def jailMaxRetry() -> int:
    match = re.search(r"^maxretry\s*=\s*(\d+)", JAIL.read_text(), re.MULTILINE)
    assert match
    return int(match.group(1))


def waitFor(predicate, seconds: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def tracebacks(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Traceback" in line or "Unhandled" in line]


# =====================================================================================
# Findings: their own proxies with the shipped defaults where it matters.
# =====================================================================================

DEFAULTS_CONFIG = """
[server]
log_format = "json"

[auth]
users_file = "users"
failure_delay = 1.0
hash_threads = 1

[[listener]]
name = "plain"
endpoint = "tcp:{imap}:interface=127.0.0.1"
allow_plaintext_auth = true

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{pop3}:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.plain]
host = "127.0.0.1"
port = {upstream}

[routing]
default_upstream = "plain"
"""


def test_strangers_filling_the_login_queue_never_refuse_the_owners_known_network(dovecot: DovecotUpstream) -> None:
    """48 networks x 100 connections of made-up logins fill the queue; the owner's known network still logs in, unbanned."""
    imap, pop3 = freePort(), freePort()
    config = DEFAULTS_CONFIG.format(imap=imap, pop3=pop3, upstream=dovecot.ports["imap"])
    owner = "127.0.40.1"
    with runningProxy(config, {"carol": "carolpw"}, [imap, pop3], prefix="mp-zz-queue-") as (directory, process):
        # The owner's network becomes known for carol (a real Dovecot session).
        assert imapLogin(imap, "carol", "carolpw", owner).startswith(b"a OK")
        flood: list[socket.socket] = []
        replies: list[bytes] = []
        try:
            # Each connection pipelines a few guesses: after a "busy" refusal the next one re-queues.
            for network in range(48):
                source = f"127.0.41.{network + 1}"
                for index in range(100):
                    sock = connectFrom(imap, source)
                    sock.sendall(b"".join(b"a LOGIN g%d-%d-%d x\r\n" % (network, index, n) for n in range(8)))
                    flood.append(sock)
            time.sleep(1.5)
            owners = [connectFrom(imap, owner, 20) for _ in range(5)]
            for sock in owners:
                readLine(sock)
                sock.sendall(b'a LOGIN carol "carolpw"\r\n')
            replies = [readTagged(sock) for sock in owners]
            for sock in owners:
                sock.close()
        finally:
            for sock in flood:
                closeAbruptly(sock)
        ownerHits = fail2banHosts(directory).count(owner)
        refusedOwner = [
            line for line in fullLog(directory).splitlines() if f"ip={owner} " in line and "refused" in line
        ]
    assert all(reply.startswith(b"a OK") for reply in replies), (
        f"the owner's known network was refused: {replies}; fail2ban matches against the owner: {ownerHits} "
        f"(jail maxretry {jailMaxRetry()}); log: {refusedOwner[:2]}"
    )


def test_a_client_that_never_reads_cannot_make_the_proxy_buffer_without_bound(
    dovecot: DovecotUpstream,
) -> None:
    """An unauthenticated client pipelining CAPA with a closed window is cut off after 100 commands; memory stays flat."""
    imap, pop3 = freePort(), freePort()
    config = DEFAULTS_CONFIG.format(imap=imap, pop3=pop3, upstream=dovecot.ports["imap"])
    with runningProxy(config, {"carol": "carolpw"}, [imap, pop3], prefix="mp-zz-buffer-") as (_, process):
        pid = process.process.pid
        before = residentKiB(pid)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.42.1", 0))
        sock.connect((HOST, pop3))
        sock.setblocking(False)
        block = b"CAPA\r\n" * 10000
        sent, started = 0, time.monotonic()
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_WRITE)
        while time.monotonic() - started < 5:
            if selector.select(0.1):
                try:
                    sent += sock.send(block)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    break  # cut off: what the proxy does
        grown = (residentKiB(pid) - before) // 1024
        selector.close()
        closeAbruptly(sock)
    assert grown < 32, f"proxy RSS grew by {grown} MiB for {sent // 1024} KiB of CAPA from one unauthenticated client"


# =====================================================================================
# Findings against the shared arena proxy.
# =====================================================================================


def test_a_stranger_cannot_get_the_owners_new_network_banned_by_fail2ban(arena: Arena) -> None:
    """After a stranger locks an account, the owner's right password from a new network is refused but never counted by fail2ban."""
    stranger, innocent = "127.0.13.1", "127.0.13.2"
    for index in range(LOCKOUT_AFTER):
        assert imapLogin(arena.ports["plain"], "inn", f"wrong-{index}", stranger).startswith(b"a NO")
    sockets = [arena.connect("plain", innocent) for _ in range(jailMaxRetry())]
    for sock in sockets:
        readLine(sock)
        sock.sendall(b'a LOGIN inn "inn-right"\r\n')
    replies = [readTagged(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert all(reply.startswith(b"a NO [AUTHENTICATIONFAILED]") for reply in replies), replies
    refused = arena.authLines(innocent, "refused")
    assert refused and all(re.search(r"user=inn reason=[a-z-]*locked-out$", line) for line in refused), refused
    assert not arena.authLines(innocent, "failure")
    hits = fail2banHosts(arena.directory).count(innocent)
    assert hits < jailMaxRetry(), (
        f"fail2ban counts {hits} failures (jail maxretry {jailMaxRetry()}) against {innocent}, which only ever "
        f"sent the right password, because a stranger locked the account"
    )


def test_user_names_sharing_64_characters_have_their_own_lockouts(arena: Arena) -> None:
    """Guesses at a made-up name sharing a real one's first 64 characters do not lock the real one out."""
    stranger, owner = "127.0.14.1", "127.0.14.2"
    for index in range(LOCKOUT_AFTER):
        assert imapLogin(arena.ports["plain"], LONG_FAKE, f"wrong-{index}", stranger).startswith(b"a NO")
    reply = imapLogin(arena.ports["plain"], LONG_REAL, "long-right", owner)
    assert reply.startswith(b"a OK"), (
        f"{LONG_REAL!r} with its right password was refused after guesses at the different name {LONG_FAKE!r}: "
        f"{reply!r}; {arena.authLines(owner, 'refused')}"
    )


class Forwarder:
    """A TCP forwarder to the real Dovecot, started late: the upstream coming back after an outage."""

    def __init__(self, port: int, target: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(8)
        self.target = target
        self.accepted = 0
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection((HOST, self.target))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.listener.close()


def test_retrying_login_through_an_upstream_outage_leaks_no_session(arena: Arena, dovecot: DovecotUpstream) -> None:
    """Correct LOGINs refused while the upstream is down give their sessions back."""
    retries = arena.connect("plain", "127.0.15.1")
    readLine(retries)
    for attempt in range(MAX_SESSIONS):
        retries.sendall(b'a LOGIN sl "sl-right"\r\n')
        assert readTagged(retries).startswith(b"a NO [UNAVAILABLE]"), attempt
    retries.sendall(b"z LOGOUT\r\n")
    readTagged(retries, b"z")
    retries.close()
    forwarder = Forwarder(arena.flakyPort, dovecot.ports["imap"])
    first = second = None
    try:
        first = arena.connect("plain", "127.0.15.2")
        readLine(first)
        first.sendall(b'a LOGIN sl "sl-right"\r\n')
        assert readTagged(first).startswith(b"a OK"), "the upstream is back: the first session works"
        second = arena.connect("plain", "127.0.15.3")
        readLine(second)
        second.sendall(b'a LOGIN sl "sl-right"\r\n')
        reply = readTagged(second)
    finally:
        for sock in (first, second):
            if sock is not None:
                sock.close()
        forwarder.close()
    refused = [line for line in arena.log().splitlines() if "session refused" in line and "user=sl" in line]
    assert reply.startswith(b"a OK"), (
        f"second session of sl (max_sessions_per_user={MAX_SESSIONS}, one open) refused: {reply!r}; {refused}"
    )


def sendQuietly(sock: socket.socket, data: bytes) -> None:
    """
    Send C{data}, stopping quietly where the proxy cuts the connection.
    """
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_one_unauthenticated_connection_writes_a_bounded_log(arena: Arena) -> None:
    """20,000 pipelined LOGINs before STARTTLS: 100 answers, a BYE, and a bounded amount of log."""
    before = len(arena.log())
    count = 20000
    with arena.connect("starttls", "127.0.24.1") as sock:
        readLine(sock)
        sender = threading.Thread(target=sendQuietly, args=(sock, b"a LOGIN x y\r\n" * count))
        sender.start()
        received = b""
        while received.count(b"\r\n") < count:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        sender.join(10)
    assert received.count(b"a NO [PRIVACYREQUIRED]") == 100
    assert received.endswith(b"* BYE Too many commands before login\r\n")
    time.sleep(0.2)
    lines = sum(1 for line in arena.log().splitlines() if "127.0.24.1" in line and "plaintext authentication" in line)
    grown = len(arena.log()) - before
    assert grown < 256 * 1024, f"one connection wrote {grown // 1024} KiB of log ({lines} lines) before login"


# =====================================================================================
# Attacks that held.
# =====================================================================================


def test_mixing_mechanisms_and_protocols_shares_one_lockout(arena: Arena) -> None:
    """IMAP LOGIN, AUTHENTICATE PLAIN with and without SASL-IR, POP3 USER/PASS and AUTH PLAIN: 5 checks, then none."""
    source = "127.0.16.1"
    plain, pop3 = arena.ports["plain"], arena.ports["pop3"]
    replies = []
    with connectFrom(plain, source) as sock:
        readLine(sock)
        sock.sendall(b"a LOGIN mx wrong1\r\n")
        replies.append(readTagged(sock))
        sock.sendall(b"a AUTHENTICATE PLAIN " + plainResponse("mx", "wrong2") + b"\r\n")
        replies.append(readTagged(sock))
        sock.sendall(b"a AUTHENTICATE PLAIN\r\n")
        assert readLine(sock).startswith(b"+")
        sock.sendall(plainResponse("mx", "wrong3") + b"\r\n")
        replies.append(readTagged(sock))
        # authzid tricks are refused without a check
        sock.sendall(b"a AUTHENTICATE PLAIN " + plainResponse("MX", "mx-right", authzid="mx") + b"\r\n")
        assert readTagged(sock).startswith(b"a NO [AUTHORIZATIONFAILED]")
    with connectFrom(pop3, source) as sock:
        readLine(sock)
        sock.sendall(b"USER mx\r\n")
        readLine(sock)
        sock.sendall(b"PASS wrong4\r\n")
        replies.append(readLine(sock))
        sock.sendall(b"AUTH PLAIN " + plainResponse("mx", "wrong5") + b"\r\n")
        replies.append(readLine(sock))
        # locked now: the right password over either protocol is refused unchecked
        sock.sendall(b"AUTH PLAIN\r\n")
        readLine(sock)
        sock.sendall(plainResponse("mx", "mx-right") + b"\r\n")
        replies.append(readLine(sock))
    replies.append(imapLogin(plain, "mx", "mx-right", source))
    assert all(b"NO" in reply or b"-ERR" in reply for reply in replies), replies
    assert len(arena.authLines(source, "failure")) == LOCKOUT_AFTER
    assert len(arena.authLines(source, "refused")) == 2
    assert "logged in as mx" not in arena.log()


def test_pipelined_logins_on_one_connection_get_no_extra_checks(arena: Arena) -> None:
    """8 wrong LOGINs and the right one pipelined in one write: 5 checks, the rest refused unchecked."""
    source = "127.0.17.1"
    with arena.connect("plain", source) as sock:
        sock.settimeout(30)
        readLine(sock)
        sock.sendall(b"".join(b"g%d LOGIN pl wrong%d\r\n" % (n, n) for n in range(8)) + b'a LOGIN pl "pl-right"\r\n')
        reply = readTagged(sock)
    assert reply.startswith(b"a NO [AUTHENTICATIONFAILED]"), reply
    assert len(arena.authLines(source, "failure")) == LOCKOUT_AFTER
    assert len(arena.authLines(source, "refused")) == 9 - LOCKOUT_AFTER


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
def test_ipv4_mapped_clients_on_a_dual_stack_listener_share_the_ipv4_lockout(arena: Arena) -> None:
    """A network locked on the IPv4 listener stays locked as ::ffff:a.b.c.d on a tcp6 listener; ::1 is its own."""
    source = "127.0.18.1"
    for index in range(LOCKOUT_AFTER):
        assert imapLogin(arena.ports["plain"], f"nobody{index}", "x", source).startswith(b"a NO")
    assert imapLogin(arena.ports["dual"], "ds", "ds-right", source).startswith(b"a NO [AUTHENTICATIONFAILED]")
    assert re.search(r"user=ds reason=[a-z-]*locked-out$", arena.authLines(source, "refused")[-1])
    assert imapLogin(arena.ports["dual"], "ds", "ds-right", "::1").startswith(b"a OK")


def test_disconnecting_at_every_moment_leaks_no_turn(arena: Arena) -> None:
    """
    From one network: LOGINs closed at once (FIN and RST), during the delay, mid-SASL, mid-literal, silent
    until the deadline, POP3 PASS then RST.  At most 5 checks; once the lockout is over the network and the
    user log in at once (no turn stuck), and nothing in the log is a traceback.
    """
    source = "127.0.12.1"
    plain, pop3 = "plain", "pop3"
    started = time.monotonic()
    keep: list[socket.socket] = []
    for index in range(40):
        kind = index % 8
        sock = arena.connect(pop3 if kind == 7 else plain, source)
        if kind == 0:
            sock.sendall(b"a LOGIN tl w%d\r\n" % index)
            sock.close()
        elif kind == 1:
            sock.sendall(b"a LOGIN tl w%d\r\n" % index)
            closeAbruptly(sock)
        elif kind == 2:
            readLine(sock)
            sock.sendall(b"a LOGIN tl w%d\r\n" % index)
            keep.append(sock)  # answered later; closed during its delay below
        elif kind == 3:
            readLine(sock)
            sock.sendall(b"a AUTHENTICATE PLAIN\r\n")
            readLine(sock)
            closeAbruptly(sock)
        elif kind == 4:
            readLine(sock)
            sock.sendall(b"a LOGIN tl {5}\r\n")
            readLine(sock)
            sock.sendall(b"wr")
            sock.close()
        elif kind == 5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(b"a LOGIN tl w%d\r\n" % index)
            keep.append(sock)  # never read: the deadline ends it
        elif kind == 6:
            sock.sendall(b"a AUTHENTICATE PLAIN " + plainResponse("tl", f"w{index}") + b"\r\n")
            closeAbruptly(sock)
        else:
            sock.sendall(b"USER tl\r\nPASS w%d\r\n" % index)
            closeAbruptly(sock)
    for sock in keep[::2]:
        closeAbruptly(sock)
    # Everything settles: the deadline ends the silent ones, the lockout runs out.
    time.sleep(max(0.0, DEADLINE + 1.5 - (time.monotonic() - started)))
    for sock in keep:
        sock.close()
    assert len(arena.authLines(source, "failure")) <= LOCKOUT_AFTER
    time.sleep(max(0.0, LOCKOUT_SECONDS + 1 - (time.monotonic() - started)))
    began = time.monotonic()
    assert imapLogin(arena.ports["plain"], "tl", "tl-right", source, timeout=DEADLINE + 2).startswith(b"a OK")
    assert time.monotonic() - began < 2, "the legitimate login waited for a turn"
    assert not tracebacks(arena.log())


def test_silent_connections_in_every_state_free_their_slots_and_descriptors(arena: Arena) -> None:
    """
    After greeting, mid-literal, mid-SASL (IMAP and POP3), TLS without/after ClientHello, after STARTTLS,
    zero-window flooders, PROXY listener without header, and a good LOGIN whose upstream never greets:
    every descriptor of the proxy is back to the baseline within deadline + grace.
    """
    pid = arena.pid
    time.sleep(0.3)
    baseline = openFiles(pid)
    hello = clientHello()
    clients: list[socket.socket] = []
    started = time.monotonic()
    for index in range(5):
        source = f"127.0.20.{index + 1}"
        sock = arena.connect("plain", source)
        clients.append(sock)
        sock = arena.connect("plain", source)
        readLine(sock)
        sock.sendall(b"a LOGIN {10}\r\n")
        readLine(sock)
        sock.sendall(b"abc")
        clients.append(sock)
        sock = arena.connect("plain", source)
        readLine(sock)
        sock.sendall(b"a AUTHENTICATE PLAIN\r\n")
        clients.append(sock)
        clients.append(arena.connect("implicit", source))
        sock = arena.connect("implicit", source)
        sock.sendall(hello)
        clients.append(sock)
        sock = arena.connect("starttls", source)
        readLine(sock)
        sock.sendall(b"s STARTTLS\r\n")
        clients.append(sock)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.bind((source, 0))
        sock.connect((HOST, arena.ports["plain"]))
        sock.setblocking(False)
        try:
            for _ in range(20):
                sock.send(b"a CAPABILITY\r\n" * 1000)
        except BlockingIOError:
            pass
        clients.append(sock)
        sock = arena.connect("pop3", source)
        readLine(sock)
        sock.sendall(b"AUTH PLAIN\r\n")
        clients.append(sock)
        clients.append(arena.connect("lb", source))
    for index in range(MAX_SESSIONS):
        sock = arena.connect("plain", f"127.0.21.{index + 1}")
        readLine(sock)
        sock.sendall(b'a LOGIN slow "slow-right"\r\n')
        clients.append(sock)
    waitFor(lambda: openFiles(pid) >= baseline + len(clients), 3)
    peak = openFiles(pid)
    # PROXY headers get 5 s; everything else its deadline plus a second's grace.
    back = waitFor(lambda: openFiles(pid) <= baseline, started + max(DEADLINE, 5.0) + 1.0 + 2.0 - time.monotonic())
    settled = openFiles(pid)
    for sock in clients:
        try:
            closeAbruptly(sock)
        except OSError:
            pass
    # (The zero-window flooders are cut off after 100 commands, before the peak.)
    assert peak >= baseline + len(clients) - 5
    assert back, f"descriptors: baseline {baseline}, peak {peak}, still {settled} after the deadlines"
    # The slots are free again.
    assert imapLogin(arena.ports["plain"], "carol", "carolpw", "127.0.20.9").startswith(b"a OK")


def test_starttls_listener_before_tls_and_pipelined_starttls(arena: Arena) -> None:
    """No '+' for LOGIN/AUTHENTICATE before STARTTLS; a LOGIN pipelined behind STARTTLS is never checked."""
    source = "127.0.22.1"
    with arena.connect("starttls", source) as sock:
        assert b"LOGINDISABLED" in readLine(sock)
        sock.sendall(b"a LOGIN st {8}\r\n")
        assert readLine(sock).startswith(b"a NO [PRIVACYREQUIRED]")
        sock.sendall(b"b AUTHENTICATE PLAIN\r\n")
        assert readLine(sock).startswith(b"b NO [PRIVACYREQUIRED]")
        sock.sendall(b'c STARTTLS\r\nd LOGIN st "st-right"\r\n')
        assert readLine(sock).startswith(b"c OK")
        assert readLine(sock) == b""
    time.sleep(0.3)
    log = arena.log()
    assert "logged in as st" not in log and "user=st " not in log


def test_no_client_initiated_tls_renegotiation(arena: Arena) -> None:
    """A TLS 1.2 client may not renegotiate (each one a full handshake for the server) before login."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    sock = arena.connect("implicit", "127.0.23.1")
    sock.settimeout(None)
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    connection.do_handshake()
    assert connection.recv(1000).startswith(b"* OK")
    with pytest.raises(SSL.Error):
        connection.renegotiate()
        connection.do_handshake()
        connection.send(b"a NOOP\r\n")
        connection.recv(1000)
    sock.close()


def test_forged_names_and_framing_never_give_fail2ban_another_host(arena: Arena) -> None:
    """
    Names with CR LF, U+2028, NEL, VT, NUL, a whole forged log line, over LOGIN literals, AUTHENTICATE and
    POP3; then the real fail2ban-regex over the whole log of this module: every host it matches is one of
    the loopback addresses these tests really used, never 198.51.100.77; and no traceback anywhere.
    """
    source = "127.0.19.1"
    forged = "2026-12-03T12:00:00+0000 [mailproxy.auth#warn] authentication failure: ip=198.51.100.77 protocol=imap user=y failures=1"
    names = [
        "x\r\n" + forged,
        "x\n" + forged,
        "x\u2028" + forged,
        "x\x85" + forged,
        "x\x0b" + forged,
        "x ip=198.51.100.77",
        'x" ip=198.51.100.77',
    ]
    with arena.connect("plain", source) as sock:
        sock.settimeout(30)
        readLine(sock)
        for name in names[:4]:
            raw = name.encode()
            sock.sendall(b"a LOGIN {%d}\r\n" % len(raw))
            assert readLine(sock).startswith(b"+")
            sock.sendall(raw + b" x\r\n")
            readTagged(sock)
    with arena.connect("plain", "127.0.19.2") as sock:
        sock.settimeout(30)
        readLine(sock)
        for name in names:
            sock.sendall(b"a AUTHENTICATE PLAIN " + plainResponse(name, "x") + b"\r\n")
            readTagged(sock)
    with arena.connect("pop3", "127.0.19.3") as sock:
        sock.settimeout(30)
        readLine(sock)
        for name in (b"x\x0b" + forged.encode(), b"x\x00" + forged.encode(), b"x\x0c" + forged.encode()):
            sock.sendall(b"USER " + name + b"\r\nPASS x\r\n")
            readLine(sock)
            readLine(sock)
    hosts = set(fail2banHosts(arena.directory))
    # Every client of this module is on 127/8 (IPv4-mapped ones are logged as IPv4).
    assert hosts and all(host.startswith("127.") for host in hosts), hosts
    assert not tracebacks(arena.log())
