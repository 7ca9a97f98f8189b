"""
Before login: what a login flood, silent connections and a parallel
guessing burst do to the proxy, measured in one run (direct Dovecot beside
it where there is a direct figure).

    .venv/bin/python -m bench.prelogin [--quick]

1. NOOP latency of a logged-in relayed IMAP session, with no flood and
   during a flood of wrong-password LOGINs (one per connection, each from its
   own source address 127.0.1.N so per-address throttling does not serialize
   them, each for its own user name so per-user throttling does not either),
   interleaved NOOP by NOOP with the same loop straight to Dovecot; the
   proxy's PSS before and at its peak during the flood, how long the flood
   took to be fully answered, and how long a legitimate login (from
   127.0.0.1, where the user is known) takes 1 s into the flood, direct and
   through the proxy.  The users file has mailproxy's default scrypt cost
   (the point is the hash pool, C{[auth] hash_threads}); the flood's users
   all share one hash, so writing the file costs one hash.
2. 1,000 connections to an implicit-TLS listener that never send a
   ClientHello, with C{[server] login_deadline = 5} and C{[limits]
   max_connections = 1000}: a legitimate TLS client is refused meanwhile;
   how long until the proxy has closed all 1,000, how many were still open
   at the deadline + 1 s, and whether a legitimate client logs in right
   after.
3. 48 connections from 127.0.0.1 send C{LOGIN victim <password>} at once
   (47 wrong, the right one last) with C{[auth] failure_delay = 0.2} and the
   default limits: how many password checks ran (from the proxy's log) and
   whether the right password got in (it should not: the user and address
   are locked out after C{failures_before_lockout}, 10).

Everything listens on and connects from 127.0.0.0/8; every loop is bounded
in count and time, and the whole run by --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import multiprocessing
import os
import re
import resource
import selectors
import signal
import socket
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from bench.common import (
    HOST,
    PASSWORD,
    USER,
    RawClient,
    freePort,
    percentile,
    privateDovecot,
    startProxy,
    textTable,
    treeMemoryKiB,
    treeOpenFiles,
    workDirectory,
    writeUsersFile,
)
from bench.logins import loginOnce
from mailproxy.passwords import DEFAULT_LOG2_N, hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyProcess
from tests.rawclient import readEach, taggedLine

VICTIM, VICTIM_PASSWORD = "victim", "victimpw"
FLOOD_USER = "flood{number}"
LOGIN_DEADLINE = 5.0
BURST_FAILURE_DELAY = 0.2
REPLY_TIMEOUT = 10.0
PSS_INTERVAL = 0.1
# when a legitimate user (from a network known for them) logs in during the flood
LEGITIMATE_AFTER = 1.0
# a NOOP this slow on loopback waited for something (the reactor, a CPU)
SPIKE = 0.020

HEADER = ["", "direct Dovecot", "mailproxy"]


@dataclass(frozen=True)
class Workload:
    floodSize: int
    floodSeconds: float
    noopRounds: int
    noopSeconds: float
    silent: int
    silentGrace: float
    burst: int
    burstSeconds: float


FULL = Workload(
    floodSize=200,
    floodSeconds=120.0,
    noopRounds=2000,
    noopSeconds=10.0,
    silent=1000,
    silentGrace=10.0,
    burst=48,
    burstSeconds=62.0,
)
QUICK = Workload(
    floodSize=50,
    floodSeconds=30.0,
    noopRounds=300,
    noopSeconds=3.0,
    silent=1000,
    silentGrace=5.0,
    burst=48,
    burstSeconds=12.0,
)

COMMON_CONFIG = """
[upstream.dovecot]
host = "127.0.0.1"
port = {upstreamPort}
[routing]
default_upstream = "dovecot"
"""

FLOOD_CONFIG = """
[server]
listen_backlog = 1024
[auth]
users_file = "users"
[[listener]]
name = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
"""

SILENT_CONFIG = """
[server]
login_deadline = {deadline:g}
listen_backlog = 1024
[auth]
users_file = "users"
[[listener]]
name = "imaps"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "implicit"
certificate = "{certificate}"
private_key = "{privateKey}"
[limits]
max_connections = {silent}
max_connections_per_ip = 2000
"""

BURST_CONFIG = """
[server]
listen_backlog = 1024
[auth]
users_file = "users"
failure_delay = {failureDelay:g}
[[listener]]
name = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
"""


# -- helpers -------------------------------------------------------------------


def writeUsers(directory: str, floodUsers: int) -> None:
    """
    The proxy's users file at mailproxy's default scrypt cost: the NOOP
    user, the victim and C{floodUsers} flood users sharing one hash.
    """
    path = writeUsersFile(directory, {USER: (PASSWORD, DEFAULT_LOG2_N), VICTIM: (VICTIM_PASSWORD, DEFAULT_LOG2_N)})
    shared = hashPassword("flood password nobody sends", log2N=DEFAULT_LOG2_N)
    with open(path, "a") as handle:
        for number in range(floodUsers):
            handle.write(f"{FLOOD_USER.format(number=number)}:{shared}\n")


def proxyConfig(template: str, upstream: DovecotUpstream, **values: Any) -> str:
    return template.format(**values) + COMMON_CONFIG.format(upstreamPort=upstream.ports["imap"])


def raiseFileLimit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def readLine(sock: socket.socket, timeout: float = REPLY_TIMEOUT, limit: int = 65536) -> bytes:
    """
    One line (or what came before the peer closed), read byte-wise within
    C{timeout} seconds: the servers here send short lines.
    """
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def logCounts(proxy: ProxyProcess) -> tuple[int, int, Counter[str]]:
    """
    (password checks failed, logins, refusals by reason) from the proxy's
    log.
    """
    failures = logins = 0
    refused: Counter[str] = Counter()
    for line in proxy.log().splitlines():
        if "authentication failure: " in line:
            failures += 1
        elif " logged in as " in line:
            logins += 1
        elif "authentication refused: " in line:
            match = re.search(r"reason=(\S+)", line)
            refused[match.group(1) if match else "?"] += 1
    return failures, logins, refused


def _ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"{statistics.median(values) * 1000:.3f} / {percentile(values, 0.99) * 1000:.3f} / {max(values) * 1000:.3f}"


def _versus(values: list[float], direct: list[float]) -> str:
    if not values or not direct:
        return _ms(values)
    return (
        f"{_ms(values)} (p50 {statistics.median(values) / statistics.median(direct):.1f}x, "
        f"p99 {percentile(values, 0.99) / percentile(direct, 0.99):.1f}x direct)"
    )


def _reply(line: bytes | str) -> str:
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    return text if len(text) <= 70 else text[:67] + "..."


# -- 1. NOOPs during a login flood ---------------------------------------------


def noopPairs(
    direct: RawClient, proxied: RawClient, rounds: int, seconds: float, done: Callable[[], bool]
) -> tuple[list[float], list[float]]:
    """
    NOOP latencies (direct, proxied), one command in flight at a time,
    alternating between the two (which goes first too), until C{done()},
    C{rounds} pairs or C{seconds}.
    """
    samples: tuple[list[float], list[float]] = ([], [])
    clients = (direct, proxied)
    started = time.monotonic()
    for number in range(rounds):
        if done() or time.monotonic() - started > seconds:
            break
        for index in (number % 2, 1 - number % 2):
            before = time.perf_counter()
            clients[index].command(b"NOOP")
            samples[index].append(time.perf_counter() - before)
    return samples


async def _guess(port: int, local: str, user: str, started: float, timeout: float) -> tuple[str, float]:
    """
    One connection from C{local}: greeting, one wrong LOGIN; (outcome,
    seconds from the flood's start to the answer).
    """

    async def attempt() -> str:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(local, 0))
        try:
            greeting = await reader.readline()
            if not greeting.startswith(b"* OK"):
                return f"greeting {_reply(greeting) or 'closed'}"
            writer.write(b"a LOGIN %s wrong-%s\r\n" % (user.encode(), user.encode()))
            for _ in range(100):
                line = await reader.readline()
                if not line:
                    return "closed"
                if line.startswith(b"a "):
                    return (line.split(b" ") + [b""])[1].decode(errors="replace")
            return "no tagged reply"
        finally:
            writer.close()

    try:
        outcome = await asyncio.wait_for(attempt(), timeout)
    except TimeoutError:
        outcome = "unanswered"
    except OSError as error:
        outcome = f"error {error.strerror or error}"
    return outcome, time.monotonic() - started


async def _legitimate(port: int, timeout: float) -> str:
    """
    One legitimate login (greeting, LOGIN, LOGOUT) from 127.0.0.1: how long
    it took, or why it failed.
    """
    started = time.monotonic()
    try:
        await asyncio.wait_for(loginOnce(port, USER, PASSWORD), timeout)
    except (OSError, RuntimeError, TimeoutError) as error:
        return f"failed after {time.monotonic() - started:.2f} s: {_reply(str(error) or type(error).__name__)}"
    return f"{time.monotonic() - started:.2f}"


async def _flood(port: int, directPort: int, base: str, size: int, proxyPid: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    peak = 0

    async def sample() -> None:
        nonlocal peak
        for _ in range(int(timeout / PSS_INTERVAL) + 1):
            try:
                peak = max(peak, treeMemoryKiB(proxyPid))
            except OSError:
                return
            await asyncio.sleep(PSS_INTERVAL)

    async def legitimate() -> dict[str, str]:
        # the flood's attempts are queued by now; direct first, for scale
        await asyncio.sleep(LEGITIMATE_AFTER)
        return {"direct": await _legitimate(directPort, timeout), "proxy": await _legitimate(port, timeout)}

    sampler = asyncio.ensure_future(sample())
    login = asyncio.ensure_future(legitimate())
    results = await asyncio.gather(
        *(
            _guess(port, f"{base}.{number + 1}", FLOOD_USER.format(number=number), started, timeout)
            for number in range(size)
        )
    )
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    return {
        "outcomes": Counter(outcome for outcome, _ in results),
        "answered": [seconds for _, seconds in results],
        "peakPss": peak,
        "legitimate": await login,
    }


def _floodChild(
    port: int, directPort: int, base: str, size: int, proxyPid: int, timeout: float, pipe: Connection
) -> None:
    try:
        pipe.send(asyncio.run(_flood(port, directPort, base, size, proxyPid, timeout)))
    except Exception as error:  # reported by the parent
        pipe.send({"error": repr(error)})
    finally:
        pipe.close()


def floodFigures(upstream: DovecotUpstream, directory: str, work: Workload) -> dict[str, Any]:
    port = freePort()
    config = proxyConfig(FLOOD_CONFIG, upstream, port=port)
    figures: dict[str, Any] = {}
    with startProxy(directory, config, [port]) as proxy:
        pid = proxy.process.pid
        direct = RawClient(upstream.ports["imap"])
        proxied = RawClient(port)
        try:
            direct.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
            proxied.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
            noopPairs(direct, proxied, 50, 2.0, lambda: False)  # warm-up
            print(f"NOOPs, no flood: up to {work.noopRounds} pairs")
            figures["quiet"] = noopPairs(direct, proxied, work.noopRounds, work.noopSeconds, lambda: False)
            time.sleep(0.5)
            figures["pssBefore"] = treeMemoryKiB(pid)
            print(f"NOOPs during a flood of {work.floodSize} wrong LOGINs from {work.floodSize} addresses")
            receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
            child = multiprocessing.get_context("fork").Process(
                target=_floodChild,
                args=(port, upstream.ports["imap"], "127.0.1", work.floodSize, pid, work.floodSeconds, sender),
            )
            child.start()
            sender.close()
            try:
                figures["flood"] = noopPairs(
                    direct, proxied, 10**6, work.floodSeconds + REPLY_TIMEOUT, lambda: receiver.poll()
                )
                result = receiver.recv() if receiver.poll(work.floodSeconds + REPLY_TIMEOUT) else {"error": "no result"}
            finally:
                child.join(REPLY_TIMEOUT)
                if child.is_alive():
                    child.terminate()
                    child.join(REPLY_TIMEOUT)
            if "error" in result:
                raise RuntimeError(f"flood client failed: {result['error']}")
            figures.update(result)
            figures["pssAfter"] = treeMemoryKiB(pid)
            direct.command(b"LOGOUT")
            proxied.command(b"LOGOUT")
        finally:
            direct.close()
            proxied.close()
        time.sleep(0.3)
        figures["checks"] = logCounts(proxy)
        if proxy.process.poll() is not None:
            raise RuntimeError(f"mailproxy exited during the flood:\n{proxy.output()}")
    return figures


# -- 2. silent TLS connections ---------------------------------------------------


def tlsContext(caFile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=caFile)


def tlsGreeting(port: int, caFile: str) -> tuple[ssl.SSLSocket | None, str]:
    """
    A TLS client's first line from the proxy (or what went wrong).
    """
    plain = socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT)
    try:
        wrapped = tlsContext(caFile).wrap_socket(plain, server_hostname="localhost")
    except (OSError, ssl.SSLError) as error:
        plain.close()
        return None, f"TLS handshake failed: {error}"
    try:
        line = readLine(wrapped)
    except (OSError, ssl.SSLError) as error:
        wrapped.close()
        return None, f"no greeting: {error}"
    return wrapped, _reply(line) or "closed without a reply"


def tlsLogin(port: int, caFile: str) -> str:
    started = time.perf_counter()
    sock, greeting = tlsGreeting(port, caFile)
    if sock is None or not greeting.startswith("* OK"):
        if sock is not None:
            sock.close()
        return f"refused: {greeting}"
    try:
        sock.sendall(b"a LOGIN %s %s\r\n" % (USER.encode(), PASSWORD.encode()))
        for _ in range(100):
            line = readLine(sock)
            if not line or line.startswith(b"a "):
                break
        if not line.startswith(b"a OK"):
            return f"refused: {_reply(line) or 'closed'}"
        seconds = time.perf_counter() - started
        sock.sendall(b"b LOGOUT\r\n")
        return f"logged in, {seconds:.2f} s"
    except (OSError, ssl.SSLError) as error:
        return f"failed: {error}"
    finally:
        sock.close()


def waitUntilClosed(sockets: list[socket.socket], seconds: float) -> list[float | None]:
    """
    When (time.monotonic()) the peer closed or reset each socket; C{None}
    for those still open after C{seconds}.
    """
    return [result[0] if result else None for result in readEach(sockets, seconds, lambda data, ended: ended)]


def openSilent(port: int, count: int, seconds: float) -> tuple[list[socket.socket], list[float | None]]:
    """
    Start C{count} TCP connections at once (non-blocking connects) and wait
    at most C{seconds} for them to complete: (sockets, when each completed,
    C{None} for those that did not).
    """
    sockets: list[socket.socket] = []
    opened: list[float | None] = [None] * count
    selector = selectors.DefaultSelector()
    try:
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setblocking(False)
            code = sock.connect_ex((HOST, port))
            if code == 0:
                opened[index] = time.monotonic()
            elif code == errno.EINPROGRESS:
                selector.register(sock, selectors.EVENT_WRITE, index)
            else:
                raise OSError(code, f"connect: {os.strerror(code)}")
        deadline = time.monotonic() + seconds
        for _ in range(10 * count + 100):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.get_map():
                break
            for key, _ in selector.select(left):
                sock = sockets[key.data]
                selector.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    opened[key.data] = time.monotonic()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        selector.close()
    return sockets, opened


def silentFigures(upstream: DovecotUpstream, directory: str, work: Workload) -> dict[str, Any]:
    raiseFileLimit(work.silent + 512)
    port = freePort()
    config = proxyConfig(
        SILENT_CONFIG,
        upstream,
        port=port,
        deadline=LOGIN_DEADLINE,
        silent=work.silent,
        certificate=upstream.certFile,
        privateKey=upstream.keyFile,
    )
    figures: dict[str, Any] = {}
    with startProxy(directory, config, [port]) as proxy:
        pid = proxy.process.pid
        time.sleep(0.3)  # let the start-up probe's connection go
        baseline = treeOpenFiles(pid)
        print(f"{work.silent} silent TLS connections, login_deadline {LOGIN_DEADLINE:g} s")
        started = time.monotonic()
        sockets, opened = openSilent(port, work.silent, work.silentGrace)
        try:
            figures["openSeconds"] = max((o for o in opened if o is not None), default=started) - started
            figures["opened"] = len(opened) - opened.count(None)
            for _ in range(100):
                if treeOpenFiles(pid) >= baseline + work.silent or time.monotonic() - started > 3.0:
                    break
                time.sleep(0.03)
            figures["held"] = treeOpenFiles(pid) - baseline
            probe, figures["during"] = tlsGreeting(port, upstream.caFile)
            if probe is not None:
                probe.close()
            closed = waitUntilClosed(
                sockets, started + figures["openSeconds"] + LOGIN_DEADLINE + work.silentGrace - time.monotonic()
            )
            figures["allClosed"] = None if None in closed else max(c for c in closed if c is not None) - started
            figures["stillOpen"] = sum(
                1
                for begin, end in zip(opened, closed, strict=True)
                if begin is not None and (end is None or end - begin > LOGIN_DEADLINE + 1)
            )
            figures["neverClosed"] = sum(
                1 for begin, end in zip(opened, closed, strict=True) if begin is not None and end is None
            )
            figures["waited"] = time.monotonic() - started
            figures["after"] = tlsLogin(port, upstream.caFile)
        finally:
            for sock in sockets:
                sock.close()
        if proxy.process.poll() is not None:
            raise RuntimeError(f"mailproxy exited during the silent connections:\n{proxy.output()}")
    return figures


# -- 3. a parallel guessing burst -------------------------------------------------


def burstFigures(upstream: DovecotUpstream, directory: str, work: Workload) -> dict[str, Any]:
    port = freePort()
    config = proxyConfig(BURST_CONFIG, upstream, port=port, failureDelay=BURST_FAILURE_DELAY)
    figures: dict[str, Any] = {}
    with startProxy(directory, config, [port]) as proxy:
        print(f"{work.burst} parallel guesses at {VICTIM!r} from 127.0.0.1, the right password last")
        sockets: list[socket.socket] = []
        try:
            for _ in range(work.burst):
                sock = socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT)
                sockets.append(sock)
            greetings = [readLine(sock) for sock in sockets]
            if not all(greeting.startswith(b"* OK") for greeting in greetings):
                raise RuntimeError(f"greetings: {Counter(_reply(g) for g in greetings)}")
            commands = [b"a LOGIN %s wrong%d\r\n" % (VICTIM.encode(), number) for number in range(work.burst - 1)]
            commands.append(b"a LOGIN %s %s\r\n" % (VICTIM.encode(), VICTIM_PASSWORD.encode()))
            started = time.monotonic()
            for sock, command in zip(sockets, commands, strict=True):
                sock.sendall(command)
            replies = tagged(sockets, work.burstSeconds)
            figures["seconds"] = time.monotonic() - started
            figures["replies"] = Counter(
                _reply(reply.split(b" ", 2)[1]) if reply else "closed" if reply == b"" else "unanswered"
                for reply in replies
            )
            last = replies[-1]
            figures["right"] = (
                _reply(last)
                if last
                else "closed without a reply"
                if last == b""
                else f"no answer in {work.burstSeconds:g} s"
            )
            figures["gotIn"] = bool(last and last.startswith(b"a OK"))
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(0.5)
        figures["checks"] = logCounts(proxy)
        if proxy.process.poll() is not None:
            raise RuntimeError(f"mailproxy exited during the burst:\n{proxy.output()}")
    return figures


def tagged(sockets: list[socket.socket], seconds: float, tag: bytes = b"a") -> list[bytes | None]:
    """
    Each socket's tagged reply line: b"" if it closed without one, C{None}
    if none came within C{seconds}; lines that came before it are skipped.
    """
    results = readEach(sockets, seconds, lambda data, ended: ended or taggedLine(data, tag) is not None)
    return [None if result is None else taggedLine(result[1], tag) or b"" for result in results]


# -- the table -----------------------------------------------------------------


def measure(work: Workload) -> tuple[list[list[str]], list[str]]:
    """
    Run all three parts: (table rows under L{HEADER}, notes).
    """
    with (
        workDirectory("mp-bench-prelogin-") as directory,
        privateDovecot({USER: PASSWORD, VICTIM: VICTIM_PASSWORD}) as upstream,
    ):
        writeUsers(directory, work.floodSize)
        parts = {}
        for name, part in (("flood", floodFigures), ("silent", silentFigures), ("burst", burstFigures)):
            partDirectory = os.path.join(directory, name)
            os.mkdir(partDirectory)
            os.link(os.path.join(directory, "users"), os.path.join(partDirectory, "users"))
            started = time.monotonic()
            parts[name] = part(upstream, partDirectory, work)
            print(f"  ({time.monotonic() - started:.1f} s)")
    return list(tableRows(parts, work)), notes(work)


def tableRows(parts: dict[str, dict[str, Any]], work: Workload) -> Iterator[list[str]]:
    flood, silent, burst = parts["flood"], parts["silent"], parts["burst"]
    quietDirect, quietProxy = flood["quiet"]
    floodDirect, floodProxy = flood["flood"]
    yield ["NOOP p50 / p99 / max, ms, no flood", _ms(quietDirect), _versus(quietProxy, quietDirect)]
    yield [
        f"NOOP p50 / p99 / max, ms, during a flood of {work.floodSize} wrong LOGINs",
        _ms(floodDirect),
        _versus(floodProxy, floodDirect),
    ]
    yield [
        "NOOPs measured (no flood / during the flood)",
        f"{len(quietDirect)} / {len(floodDirect)}",
        f"{len(quietProxy)} / {len(floodProxy)}",
    ]
    yield [
        f"NOOPs over {SPIKE * 1000:g} ms during the flood",
        str(sum(value > SPIKE for value in floodDirect)),
        str(sum(value > SPIKE for value in floodProxy)),
    ]
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in flood["outcomes"].most_common())
    failures, logins, refused = flood["checks"]
    yield [
        "flood answered: half / all after, s (replies; password checks in the log)",
        "-",
        f"{statistics.median(flood['answered']):.2f} / {max(flood['answered']):.2f} ({outcomes}; {failures} failed checks"
        + "".join(f", {count} refused {reason}" for reason, count in refused.items())
        + ")",
    ]
    yield [
        f"a legitimate LOGIN {LEGITIMATE_AFTER:g} s into the flood took, s",
        flood["legitimate"]["direct"],
        flood["legitimate"]["proxy"],
    ]
    yield [
        "proxy PSS before / peak during / after the flood, MiB",
        "-",
        f"{flood['pssBefore'] / 1024:.1f} / {flood['peakPss'] / 1024:.1f} / {flood['pssAfter'] / 1024:.1f}",
    ]
    allClosed = silent["allClosed"]
    yield [
        f"{work.silent} silent TLS connections: opened in, s / all closed after, s",
        "-",
        (f"{silent['openSeconds']:.2f}" if silent["opened"] == work.silent else f"{silent['opened']} opened")
        + " / "
        + (
            f"{allClosed:.2f}"
            if allClosed is not None
            else f"not all: {silent['neverClosed']} open after {silent['waited']:.1f}"
        ),
    ]
    yield [
        f"  still open at the deadline ({LOGIN_DEADLINE:g} s) + 1 s",
        "-",
        f"{silent['stillOpen']} of {work.silent} (proxy held {silent['held']} descriptors for them)",
    ]
    yield [f"  a TLS client while {work.silent} are held", "-", silent["during"]]
    yield ["  a TLS client right after they are closed", "-", silent["after"]]
    failures, logins, refused = burst["checks"]
    yield [
        f"{work.burst} parallel guesses from one address: password checks run",
        "-",
        f"{failures + logins} ({failures} failed, {logins} logged in"
        + "".join(f", {count} refused {reason}" for reason, count in refused.items())
        + f"; replies after {burst['seconds']:.1f} s: "
        + ", ".join(f"{count} {reply}" for reply, count in burst["replies"].most_common())
        + ")",
    ]
    yield [
        "  the right password (sent last) got in",
        "-",
        f"{'YES' if burst['gotIn'] else 'no'} ({burst['right']})",
    ]


def notes(work: Workload) -> list[str]:
    return [
        f"Flood: {work.floodSize} connections, each from its own address (127.0.1.1 up) and for its own user "
        f"name (in the users file, mailproxy's default scrypt ln={DEFAULT_LOG2_N}), one wrong LOGIN each, all at "
        "once; default [auth] hash_threads and failure_delay. NOOPs: one logged-in session through the proxy and "
        "one straight to Dovecot, NOOPs alternating between them one at a time, so both see the same flood; "
        "ratios are against direct in the same conditions. The legitimate LOGIN is the NOOP session's user from "
        f"127.0.0.1 (a network the proxy knows for it), {LEGITIMATE_AFTER:g} s after the flood's first connect: "
        "connect, greeting, LOGIN, LOGOUT, direct then through the proxy.",
        f"Silent: [server] login_deadline = {LOGIN_DEADLINE:g}, [limits] max_connections = {work.silent}; "
        "'all closed' counts from the first connect to the last EOF/RST seen.",
        f"Burst: [auth] failure_delay = {BURST_FAILURE_DELAY:g}, default limits (failures_before_lockout = 10); "
        "checks = 'authentication failure' + 'logged in as' lines in the proxy's log; refusals are attempts "
        f"answered without a check. Waited at most {work.burstSeconds:g} s for the answers.",
        f"Machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end.",
    ]


class RunTimedOut(Exception):
    pass


def _timedOut(signum: int, frame: FrameType | None) -> None:
    raise RunTimedOut("the benchmark ran past --time-limit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a short run (a flood of {QUICK.floodSize}, fewer NOOPs)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run")
    arguments = parser.parse_args(argv)
    work = QUICK if arguments.quick else FULL
    signal.signal(signal.SIGALRM, _timedOut)
    signal.setitimer(signal.ITIMER_REAL, arguments.time_limit)
    started = time.monotonic()
    try:
        rows, lines = measure(work)
    except RunTimedOut:
        print(
            f"bench.prelogin: stopped after --time-limit {arguments.time_limit:g} s; everything it started is stopped"
        )
        return 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"\n{textTable(HEADER, rows)}\n")
    print("\n".join(lines))
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
