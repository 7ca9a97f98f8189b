"""
The whole benchmark in one run, side by side: direct Dovecot, mailproxy
with C{[server] workers = 1} and C{= N} (N = the number of CPUs), and,
when installed, nginx's mail proxy and haproxy in TCP mode, and two byte
forwarders in Python (bench.forwarder: one on Twisted's reactor, one on a
bare epoll loop; the floor for a proxy in this language), all in front of
the same private Dovecot on 127.0.0.1.

    make bench                      (or: .venv/bin/python -m bench [--quick] [--output FILE])

Figures: bulk FETCH throughput, per-message FETCH latency (one command in
flight, and pipelined batches), NOOP round trips, logins per second (one at
a time and in parallel), memory per idle IMAP session, POP3 download, and
the load generator (bench.load: 20 clients in login churn, and 20 logged-in
clients in a mixed loop), Dovecot's imaptest where installed; then the
goals of issue 13, met or not; then the before-login table (bench.prelogin,
left out with --no-prelogin); then thousands of concurrent IDLE sessions
through the proxy (bench.idle_scale, --idle-sessions, 0 leaves it out).
The targets are interleaved round by round; results are medians, shown
with their ratio or difference against direct Dovecot measured in the same
run (absolute numbers depend on the machine and its load; the comparison
is the result). The tables are printed and written as Markdown
(bench/results.md unless --output says otherwise). Every loop is bounded in
count, and the whole run in time (--time-limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from bench import idle_scale, prelogin
from bench.common import (
    PASSWORD,
    USER,
    ProxyProcess,
    RawClient,
    freePort,
    markdownTable,
    percentile,
    privateDovecot,
    raiseFileLimit,
    seed,
    startProxy,
    textTable,
    treeCpuSeconds,
    treeMemoryKiB,
    workDirectory,
    writeUsersFile,
)
from bench.forwarder import PythonForwarder
from bench.haproxy import HaproxyTcpProxy, findHaproxy, haproxyVersion
from bench.idle_sessions import Session, openMany
from bench.load import (
    CHURN,
    LOAD_USERS,
    MIXED,
    LoadGenerator,
    LoadPlan,
    LoadResult,
    findImaptest,
    loadGenerator,
    runImaptest,
    warmUp,
    writeMbox,
)
from bench.logins import loginRate
from bench.nginx import NginxMailProxy, findNginx
from bench.pop3_download import download
from bench.relay_fetch import bulkFetch, noopLatencies, perMessageLatencies, pipelinedLatencies
from mailproxy.passwords import DEFAULT_LOG2_N

# A users-file hash this cheap (scrypt N=2, r=1) costs microseconds, so a
# login through mailproxy measures the proxy, not its password hashing.
CHEAP_LOG2_N = 1
SCRYPT_USER = "benchscrypt"
POP3_RELAY_USER = "popbench"
SMALL_MAILBOX = b"Small"
OPEN_TIMEOUT = 300.0
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")

DIRECT, MAILPROXY, NGINX, HAPROXY, FORWARDER = "direct", "mailproxy", "nginx", "haproxy", "forwarder"
PROXIES = (MAILPROXY, NGINX, HAPROXY, FORWARDER)
# the Python forwarders' columns: (engine, column)
FORWARDERS = (("twisted", "Twisted forwarder"), ("epoll", "epoll forwarder"))

PROXY_CONFIG = """
{server}
[auth]
users_file = "users"
[[listener]]
name = "imap"
endpoint = "tcp:{imapPort}:interface=127.0.0.1:backlog=1024"
allow_plaintext_auth = true
[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{pop3Port}:interface=127.0.0.1"
allow_plaintext_auth = true
[upstream.imap]
host = "127.0.0.1"
port = {upstreamImap}
[upstream.pop3]
protocol = "pop3"
host = "127.0.0.1"
port = {upstreamPop3}
[routing]
default_upstream = "imap"
[routing.users.{scryptUser}]
username = "{user}"
[routing.users.{relayUser}]
upstream = "pop3"
username = "{user}"
[limits]
max_connections_per_ip = {sessions}
max_sessions_per_user = {sessions}
"""


@dataclass
class Target:
    """
    One column: what it is, where to connect and how to read its memory.

    @ivar kind: L{DIRECT}, L{MAILPROXY}, L{NGINX}, L{HAPROXY} or L{FORWARDER}.
    """

    name: str
    kind: str
    imapPort: int
    pop3Port: int
    memory: Callable[[], int]
    cpu: Callable[[], float]
    # the CPU time counted under load: with the processes that served one
    # session and exited (Dovecot's imap processes)
    loadCpu: Callable[[], float] | None = None
    fetch: dict[str, list[float]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    load: dict[str, list[LoadResult]] = field(default_factory=dict)
    imaptest: dict[str, dict[str, int]] = field(default_factory=dict)

    def cpuUnderLoad(self) -> float:
        return (self.loadCpu or self.cpu)()

    def add(self, key: str, values: list[float]) -> None:
        self.fetch.setdefault(key, []).extend(values)

    def loadRate(self, scenario: str) -> float:
        return statistics.median(result.rate for result in self.load[scenario])

    def loadErrors(self, scenario: str) -> int:
        return sum(result.errors for result in self.load[scenario])


@dataclass
class Workload:
    messages: int
    size: int
    bulkRepeats: int
    smallMessages: int
    smallSize: int
    depth: int
    rounds: int
    sessions: int
    parallel: int
    maxLogins: int
    loginSeconds: float
    pop3Rounds: int
    loadClients: int
    loadSeconds: float
    loadRounds: int
    loadMessages: int
    loadSize: int
    imaptestSeconds: float
    idleSessions: int
    idleRounds: int


FULL = Workload(
    messages=200,
    size=51200,
    bulkRepeats=3,
    smallMessages=200,
    smallSize=2000,
    depth=16,
    rounds=5,
    sessions=500,
    parallel=16,
    maxLogins=2000,
    loginSeconds=4.0,
    pop3Rounds=5,
    loadClients=20,
    loadSeconds=6.0,
    loadRounds=2,
    loadMessages=20,
    loadSize=8000,
    imaptestSeconds=20.0,
    idleSessions=10000,
    idleRounds=2,
)
QUICK = Workload(
    messages=40,
    size=51200,
    bulkRepeats=1,
    smallMessages=64,
    smallSize=2000,
    depth=16,
    rounds=2,
    sessions=50,
    parallel=8,
    maxLogins=200,
    loginSeconds=1.0,
    pop3Rounds=1,
    loadClients=20,
    loadSeconds=2.0,
    loadRounds=1,
    loadMessages=20,
    loadSize=8000,
    imaptestSeconds=5.0,
    idleSessions=500,
    idleRounds=2,
)


def idleDirectSessions(sessions: int) -> int:
    """
    The direct sessions beside C{sessions} proxied ones: each costs Dovecot
    an imap process, so a tenth, at most 500.
    """
    return max(1, min(500, sessions // 10))


def fetchRound(target: Target, work: Workload) -> None:
    client = RawClient(target.imapPort)
    try:
        client.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        client.command(b"EXAMINE INBOX")
        for _ in range(work.bulkRepeats):
            cpuBefore = target.cpu()
            octets, seconds = bulkFetch(client)
            target.add("bulk_MBps", [octets / seconds / 1e6])
            target.add("bulk_cpu_s_per_MB", [(target.cpu() - cpuBefore) / (octets / 1e6)])
        client.command(b"EXAMINE " + SMALL_MAILBOX)
        uids = range(1, work.smallMessages + 1)
        target.add("single_s", perMessageLatencies(client, uids))
        target.add("pipelined_s", pipelinedLatencies(client, uids, work.depth))
        target.add("noop_s", noopLatencies(client))
        client.command(b"LOGOUT")
    finally:
        client.close()


def loginFigures(target: Target, user: str, label: str, work: Workload) -> None:
    for parallel in (1, work.parallel):
        rate = asyncio.run(loginRate(target.imapPort, user, PASSWORD, parallel, work.maxLogins, work.loginSeconds))
        target.figures[f"logins_{label}_{parallel}"] = rate


async def _idleSessionMemory(target: Target, user: str, count: int) -> float:
    sessions: list[Session] = []
    try:
        before = target.memory()
        sessions = await asyncio.wait_for(openMany(target.imapPort, count, 16, user, PASSWORD), OPEN_TIMEOUT)
        await asyncio.sleep(2.0)
        after = target.memory()
    finally:
        for session in sessions:
            session.close()
        await asyncio.sleep(0.5)
    return (after - before) / count


def pop3Figures(targets: list[Target], work: Workload) -> None:
    runs: dict[str, tuple[Target, int, str]] = {}
    for target in targets:
        user = POP3_RELAY_USER if target.kind == MAILPROXY else USER
        runs[target.name] = (target, target.pop3Port, user)
        if target.kind == MAILPROXY:
            runs[target.name + " bridge"] = (target, target.pop3Port, USER)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    octets: dict[str, int] = {}
    for _, port, user in runs.values():
        download(port, user, PASSWORD)  # warm-up
    for _ in range(work.pop3Rounds):
        for name, (_, port, user) in runs.items():
            elapsed, octets[name] = download(port, user, PASSWORD)
            seconds[name].append(elapsed)
    if len(set(octets.values())) != 1:
        raise RuntimeError(f"POP3 targets returned different octet counts: {octets}")
    for name, (target, _, _) in runs.items():
        key = "pop3_bridge_MBps" if name.endswith(" bridge") else "pop3_MBps"
        target.figures[key] = octets[name] / statistics.median(seconds[name]) / 1e6


def loadFigures(targets: list[Target], work: Workload, generator: LoadGenerator) -> None:
    """
    The load generator against every target, scenario by scenario, the
    targets interleaved round by round; one warm-up login per user first.
    """
    direct = targets[0]
    for target in targets:
        asyncio.run(warmUp(target.imapPort, LOAD_USERS))
    for scenario in (CHURN, MIXED):
        for _ in range(work.loadRounds):
            for target in targets:
                plan = LoadPlan(target.imapPort, LOAD_USERS, work.loadClients, work.loadSeconds, work.loadMessages)
                result = generator.run(plan, scenario, functools.partial(loadMeter, direct, target))
                target.load.setdefault(scenario, []).append(result)


def loadMeter(direct: Target, target: Target) -> tuple[float, float]:
    """
    What is read at the start and the end of a load run against C{target}:
    Dovecot's CPU time and the proxy's (none for C{direct}), with the
    processes that served a session and exited.
    """
    return direct.cpuUnderLoad(), 0.0 if target is direct else target.cpuUnderLoad()


def imaptestFigures(targets: list[Target], work: Workload, directory: str, notes: list[str]) -> None:
    binary = findImaptest()
    if binary is None:
        print("imaptest: skipped (not on PATH; it is not a Debian package)")
        notes.append("imaptest rows skipped: imaptest is not on PATH (it is not a Debian package).")
        return
    mbox = os.path.join(directory, "imaptest.mbox")
    writeMbox(mbox, 50, work.loadSize)
    for logout, key in ((True, "churn"), (False, "nologout")):
        for target in targets:
            totals, output = runImaptest(
                binary, target.imapPort, LOAD_USERS, mbox, work.loadClients, work.imaptestSeconds, logout
            )
            if not totals:
                notes.append(f"imaptest against {target.name}: no totals in its output: {output!r}")
            target.imaptest[key] = totals


def run(
    work: Workload, withNginx: bool, withHaproxy: bool, generator: LoadGenerator, withForwarders: bool = True
) -> tuple[list[Target], list[str]]:
    notes: list[str] = []
    nginxBinary, why = findNginx() if withNginx else (None, "nginx left out (--no-nginx)")
    if nginxBinary is None:
        notes.append(f"nginx mail column skipped: {why}.")
    haproxyBinary, why = findHaproxy() if withHaproxy else (None, "haproxy left out (--no-haproxy)")
    if haproxyBinary is None:
        notes.append(f"haproxy column skipped: {why}.")
    cpus = os.cpu_count() or 1
    proxies: list[tuple[str, int | None]] = [("mailproxy w=1", 1)]
    if cpus > 1:
        proxies.append((f"mailproxy w={cpus}", cpus))
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(workDirectory("mp-bench-"))
        upstream = stack.enter_context(
            privateDovecot({USER: PASSWORD, **dict(LOAD_USERS)}, maxSessions=work.sessions + 200)
        )
        print(
            f"seeding: {work.messages} x {work.size} octets in INBOX, {work.smallMessages} x {work.smallSize} in "
            f"Small, {work.loadMessages} x {work.loadSize} for each of {len(LOAD_USERS)} load users"
        )
        seed(upstream.ports["imap"], work.messages, work.size)
        seed(upstream.ports["imap"], work.smallMessages, work.smallSize, SMALL_MAILBOX)
        for user, password in LOAD_USERS:
            seed(upstream.ports["imap"], work.loadMessages, work.loadSize, user=user, password=password)
        usersFile = writeUsersFile(
            directory,
            {
                USER: (PASSWORD, CHEAP_LOG2_N),
                SCRYPT_USER: (PASSWORD, DEFAULT_LOG2_N),
                POP3_RELAY_USER: (PASSWORD, CHEAP_LOG2_N),
                **{user: (password, DEFAULT_LOG2_N) for user, password in LOAD_USERS},
            },
        )
        dovecotPid = upstream.pid
        assert dovecotPid is not None
        targets = [
            Target(
                "direct Dovecot",
                DIRECT,
                upstream.ports["imap"],
                upstream.ports["pop3"],
                lambda: treeMemoryKiB(dovecotPid),
                lambda: treeCpuSeconds(dovecotPid),
                lambda: treeCpuSeconds(dovecotPid, reaped=True),
            )
        ]
        for name, workers in proxies:
            proxyDirectory = os.path.join(directory, name.replace(" ", "-").replace("=", ""))
            os.mkdir(proxyDirectory)
            shutil.copy(usersFile, proxyDirectory)
            ports = {"imap": freePort(), "pop3": freePort()}
            config = PROXY_CONFIG.format(
                server="" if workers is None else f"[server]\nworkers = {workers}\n",
                imapPort=ports["imap"],
                pop3Port=ports["pop3"],
                upstreamImap=upstream.ports["imap"],
                upstreamPop3=upstream.ports["pop3"],
                scryptUser=SCRYPT_USER,
                relayUser=POP3_RELAY_USER,
                user=USER,
                sessions=work.sessions + 2 * max(work.parallel, work.loadClients) + 100,
            )
            try:
                proxy = stack.enter_context(startProxy(proxyDirectory, config, list(ports.values())))
            except RuntimeError as error:
                if workers is None or workers == 1:
                    raise
                notes.append(f"{name} column skipped: the proxy did not start: {error}")
                continue
            pid = proxy.pid
            targets.append(
                Target(
                    name,
                    MAILPROXY,
                    ports["imap"],
                    ports["pop3"],
                    # workers are children of the twistd process: the whole tree
                    lambda pid=pid: treeMemoryKiB(pid),  # type: ignore[misc]
                    lambda pid=pid: treeCpuSeconds(pid),  # type: ignore[misc]
                    lambda pid=pid: treeCpuSeconds(pid, reaped=True),  # type: ignore[misc]
                )
            )
            stack.callback(_checkAlive, proxy, name)
        upstreamPorts = (upstream.ports["imap"], upstream.ports["pop3"], 2 * work.sessions + 256)
        if nginxBinary is not None:
            nginxPath = nginxBinary
            targets.append(
                peerTarget(
                    stack,
                    directory,
                    "nginx mail",
                    NGINX,
                    lambda where: NginxMailProxy(nginxPath, where, *upstreamPorts),
                    lambda nginx: f"{nginxVersion(nginxPath)}, 1 worker, proxy_buffer {nginx.buffer}.",
                    notes,
                )
            )
        if haproxyBinary is not None:
            haproxyPath = haproxyBinary
            targets.append(
                peerTarget(
                    stack,
                    directory,
                    "haproxy (TCP)",
                    HAPROXY,
                    lambda where: HaproxyTcpProxy(haproxyPath, where, *upstreamPorts),
                    lambda haproxy: f"{haproxyVersion(haproxyPath)}, mode tcp, {haproxy.threads} threads.",
                    notes,
                )
            )
        if withForwarders:
            for engine, label in FORWARDERS:
                targets.append(
                    peerTarget(
                        stack,
                        directory,
                        label,
                        FORWARDER,
                        lambda where, engine=engine: PythonForwarder(engine, where, *upstreamPorts[:2]),  # type: ignore[misc]
                        lambda forwarder: f"{forwarder.engine} forwarder: bench/forwarder.py, one process.",
                        notes,
                    )
                )
        else:
            notes.append("Python forwarder columns left out (--no-forwarders).")
        measureAll(targets, work, generator, directory, notes)
    return targets, notes


def peerTarget(
    stack: contextlib.ExitStack,
    directory: str,
    label: str,
    kind: str,
    makePeer: Callable[[str], Any],
    describe: Callable[[Any], str],
    notes: list[str],
) -> Target:
    """
    Start a peer proxy (nginx, haproxy) in a directory of its own, stopped
    with C{stack}; its target, and a note saying what ran.
    """
    peerDirectory = tempfile.mkdtemp(prefix=kind + "-", dir=directory)
    peer = makePeer(peerDirectory)
    peer.start()
    stack.callback(peer.stop)
    notes.append(describe(peer))
    return Target(label, kind, peer.ports["imap"], peer.ports["pop3"], peer.memoryKiB, peer.cpuSeconds)


def _checkAlive(proxy: ProxyProcess, name: str) -> None:
    if proxy.process.poll() is not None:
        raise RuntimeError(f"{name} exited during the run:\n{proxy.output()}")


def measureAll(
    targets: list[Target], work: Workload, generator: LoadGenerator, directory: str, notes: list[str]
) -> None:
    # First, while the processes are fresh: memory freed by earlier phases
    # would be reused by the new sessions and hide their cost.
    print(f"memory: {work.sessions} idle sessions per target")
    for target in targets:
        target.figures["idle_KiB"] = asyncio.run(_idleSessionMemory(target, USER, work.sessions))
    print("FETCH: warm-up and", work.rounds, "interleaved rounds")
    for target in targets:
        fetchRound(target, work)
        target.fetch.clear()
    for _ in range(work.rounds):
        for target in targets:
            fetchRound(target, work)
    print("logins")
    for target in targets:
        loginFigures(target, USER, "cheap", work)
    for target in targets:
        if target.kind == MAILPROXY:
            loginFigures(target, SCRYPT_USER, "scrypt", work)
    print(
        f"load: {work.loadClients} clients, login churn and mixed, {work.loadRounds} x {work.loadSeconds:g} s "
        f"per target, {generator.processes} client processes"
    )
    loadFigures(targets, work, generator)
    # imaptest APPENDs, EXPUNGEs and deletes: after the load generator
    imaptestFigures(targets, work, directory, notes)
    print("POP3 downloads")
    pop3Figures(targets, work)


def nginxVersion(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def tableRows(targets: list[Target], work: Workload) -> Iterator[list[str]]:
    direct = targets[0]

    def row(label: str, cell: Callable[[Target], str], kinds: tuple[str, ...] = ()) -> list[str]:
        return [label] + [cell(target) if not kinds or target.kind in kinds else "-" for target in targets]

    def versusDirect(value: Callable[[Target], float], unit: float = 1000, digits: int = 3) -> Callable[[Target], str]:
        def cell(target: Target) -> str:
            own = value(target) * unit
            if target is direct:
                return f"{own:.{digits}f}"
            return f"{own:.{digits}f} ({own - value(direct) * unit:+.{digits}f})"

        return cell

    def share(value: Callable[[Target], float]) -> Callable[[Target], str]:
        def cell(target: Target) -> str:
            own = value(target)
            if target is direct:
                return f"{own:.1f}"
            return f"{own:.1f} ({own / value(direct):.0%})"

        return cell

    def loadShare(scenario: str) -> Callable[[Target], str]:
        plain = share(lambda t: t.loadRate(scenario))

        def cell(target: Target) -> str:
            errors = target.loadErrors(scenario)
            return plain(target) + (f" [{errors} errors]" if errors else "")

        return cell

    def median(key: str) -> Callable[[Target], float]:
        return lambda target: statistics.median(target.fetch[key])

    def tail(key: str) -> Callable[[Target], str]:
        return lambda t: f"{_ms(percentile(t.fetch[key], 0.99))} / {_ms(max(t.fetch[key]))}"

    def meteredRuns(t: Target, scenario: str) -> list[LoadResult]:
        """
        C{t}'s load runs of C{scenario} whose servers' CPU time was read in
        time.
        """
        return [result for result in t.load[scenario] if result.metered]

    def cpuPerOperation(scenario: str, unit: float, digits: int) -> Callable[[Target], str]:
        """
        CPU time per operation of the load: the clients', Dovecot's and the
        proxy's, their sum, and the sum against direct's.
        """

        def parts(t: Target) -> tuple[float, float, float] | None:
            results = meteredRuns(t, scenario)
            operations = sum(result.operations for result in results)
            if not operations:
                return None
            clients = sum(result.clientCpuSeconds for result in results)
            dovecot = sum(result.metered[0] for result in results)
            proxy = sum(result.metered[1] for result in results)
            return clients / operations * unit, dovecot / operations * unit, proxy / operations * unit

        def cell(t: Target) -> str:
            own, directs = parts(t), parts(direct)
            if own is None or directs is None:
                return "-"
            clients, dovecot, proxy = own
            shown = "-" if t is direct else f"{proxy:.{digits}f}"
            text = f"{clients:.{digits}f} / {dovecot:.{digits}f} / {shown} = {clients + dovecot + proxy:.{digits}f}"
            if t is direct:
                return text
            return f"{text} ({(clients + dovecot + proxy) / sum(directs):.2f}x)"

        return cell

    def proxyShare(t: Target) -> str:
        """
        The proxy's CPU time over the load's time: how much of a core it
        took from what the clients and Dovecot share.
        """
        shares = []
        for scenario in (CHURN, MIXED):
            results = meteredRuns(t, scenario)
            seconds = sum(result.seconds for result in results)
            shares.append(f"{sum(result.metered[1] for result in results) / seconds:.2f}" if seconds else "-")
        return " / ".join(shares)

    def loginLatency(t: Target) -> str:
        values = [value for result in t.load[CHURN] for value in result.loginSeconds]
        return f"{_ms(statistics.median(values))} / {_ms(percentile(values, 0.99))}" if values else "-"

    yield row("bulk FETCH, MB/s (% of direct)", share(median("bulk_MBps")))
    yield row(
        "CPU per MB of bulk FETCH, ms (server or proxy processes)",
        lambda t: f"{statistics.median(t.fetch['bulk_cpu_s_per_MB']) * 1000:.2f}",
    )
    yield row("per-message FETCH p50, ms (overhead)", versusDirect(median("single_s")))
    yield row("per-message FETCH p99 / max, ms", tail("single_s"))
    yield row(f"{work.depth} pipelined FETCHes p50, ms (overhead)", versusDirect(median("pipelined_s")))
    yield row(f"{work.depth} pipelined FETCHes p99 / max, ms", tail("pipelined_s"))
    yield row("NOOP round trip p50, µs (overhead)", versusDirect(median("noop_s"), 1e6, 0))
    clients = work.loadClients
    yield row(f"load: login churn, {clients} clients, logins/s, warm cache (% of direct)", loadShare(CHURN))
    yield row("load: login churn, connect to LOGIN OK p50 / p99, ms", loginLatency)
    yield row(
        "load: login churn, CPU per login, ms: clients / Dovecot / proxy = all (x direct)",
        cpuPerOperation(CHURN, 1e3, 2),
    )
    yield row(f"load: mixed, no logout, {clients} clients, commands/s (% of direct)", loadShare(MIXED))
    yield row(
        "load: mixed, CPU per command, µs: clients / Dovecot / proxy = all (x direct)", cpuPerOperation(MIXED, 1e6, 0)
    )
    yield row("load: the proxy's share of a core, login churn / mixed (see bench.contention)", proxyShare, PROXIES)
    if any(target.imaptest for target in targets):
        seconds = f"{work.imaptestSeconds:g} s"
        yield row(
            f"imaptest {clients} clients, login/logout churn, logins in {seconds} (% of direct)",
            share(lambda t: float(t.imaptest.get("churn", {}).get("Logi", 0))),
        )
        yield row(
            f"imaptest {clients} clients, no logout, FETCHes in {seconds} (% of direct)",
            share(lambda t: float(t.imaptest.get("nologout", {}).get("Fetc", 0))),
        )
    for parallel in (1, work.parallel):
        what = "1 at a time" if parallel == 1 else f"{parallel} in parallel"
        yield row(
            f"logins/s, {what}, cheap local hash (% of direct)",
            share(lambda t, p=parallel: t.figures[f"logins_cheap_{p}"]),  # type: ignore[misc]
        )
    for parallel in (1, work.parallel):
        what = "1 at a time" if parallel == 1 else f"{parallel} in parallel"
        yield row(
            f"logins/s, {what}, mailproxy's default scrypt ln={DEFAULT_LOG2_N}, cache on",
            lambda t, p=parallel: f"{t.figures[f'logins_scrypt_{p}']:.1f}",  # type: ignore[misc]
            (MAILPROXY,),
        )
    yield row("memory per idle IMAP session, KiB PSS", lambda t: f"{t.figures['idle_KiB']:.0f}")
    yield row("POP3 download, MB/s (% of direct)", share(lambda t: t.figures["pop3_MBps"]))
    yield row(
        "POP3 download via mailproxy's IMAP bridge, MB/s (% of direct)",
        lambda t: (
            f"{t.figures['pop3_bridge_MBps']:.1f} ({t.figures['pop3_bridge_MBps'] / direct.figures['pop3_MBps']:.0%})"
        ),
        (MAILPROXY,),
    )


STALL_SECONDS = 0.030
LOGIN_GOAL = 0.9
MIXED_GOAL = 0.85
BULK_GOAL = 0.8
OVERHEAD_GOAL_MS = 0.1


def stalls(target: Target, direct: Target) -> tuple[int, int]:
    """
    (stalled, total) FETCH samples, single and pipelined: a sample stalled
    when it took C{STALL_SECONDS} longer than direct's median (a Nagle and
    delayed-ACK stall costs about 40 ms on Linux).
    """
    stalled = total = 0
    for key in ("single_s", "pipelined_s"):
        limit = statistics.median(direct.fetch[key]) + STALL_SECONDS
        stalled += sum(value >= limit for value in target.fetch[key])
        total += len(target.fetch[key])
    return stalled, total


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def goalRows(targets: list[Target]) -> list[list[str]]:
    """
    Issue 13's goals, one row each, one cell per target in front of
    Dovecot (the goals are mailproxy's; the peers show where they stand).
    """
    direct = targets[0]

    def ratio(value: Callable[[Target], float], goal: float) -> Callable[[Target], str]:
        def cell(target: Target) -> str:
            own = value(target) / value(direct)
            return f"{own:.2f}x, {verdict(own >= goal)}"

        return cell

    def overhead(target: Target) -> str:
        extra = (statistics.median(target.fetch["single_s"]) - statistics.median(direct.fetch["single_s"])) * 1000
        return f"{extra:+.3f} ms, {verdict(extra < OVERHEAD_GOAL_MS)}"

    def noStalls(target: Target) -> str:
        stalled, total = stalls(target, direct)
        return f"{stalled} of {total}, {verdict(stalled == 0)}"

    goals: list[tuple[str, Callable[[Target], str]]] = [
        (f"login churn logins/s, warm cache, >= {LOGIN_GOAL}x direct", ratio(lambda t: t.loadRate(CHURN), LOGIN_GOAL)),
        (f"mixed load (no logouts) commands/s >= {MIXED_GOAL}x direct", ratio(lambda t: t.loadRate(MIXED), MIXED_GOAL)),
        (
            f"bulk FETCH MB/s >= {BULK_GOAL}x direct",
            ratio(lambda t: statistics.median(t.fetch["bulk_MBps"]), BULK_GOAL),
        ),
        (f"per-message FETCH p50 overhead < {OVERHEAD_GOAL_MS} ms", overhead),
        (f"no Nagle stalls (FETCHes {STALL_SECONDS * 1000:.0f} ms or more over direct's median)", noStalls),
    ]
    return [[goal] + [cell(target) for target in targets[1:]] for goal, cell in goals]


def workloadText(work: Workload, generator: LoadGenerator) -> str:
    return (
        f"Workload: bulk = UID FETCH 1:* (BODY.PEEK[]) of {work.messages} x {work.size // 1024} KiB messages, "
        f"{work.bulkRepeats} per round; "
        f"per-message = UID FETCH n (BODY.PEEK[]) of {work.smallMessages} ~{work.smallSize // 1000} kB messages, one "
        f"in flight, and in batches of {work.depth} sent in one write; median of {work.rounds} interleaved rounds "
        "(p99/max over all samples). "
        f"Load (bench.load, asyncio clients in {generator.processes} client processes on the same machine): "
        f"{work.loadClients} clients as {len(LOAD_USERS)} users, each with {work.loadMessages} messages of "
        f"~{work.loadSize // 1000} kB; 'login churn' = each client loops connect, LOGIN, SELECT INBOX, FETCH 1:4 "
        "(headers), LOGOUT; 'mixed' = each client logs in once, then loops SELECT INBOX, FETCH 1:* (FLAGS), "
        "UID FETCH n (BODY.PEEK[]), UID STORE n +FLAGS (\\Seen), NOOP; "
        f"median of {work.loadRounds} interleaved rounds of {work.loadSeconds:g} s. The load users are in mailproxy's "
        f"users file with the default scrypt ln={DEFAULT_LOG2_N}; one warm-up login per user first fills the "
        "verified-credentials cache ([auth] cache_ttl, default 3600 s), so churn logins are 'warm'. "
        "Logins rows: connect, greeting, LOGIN, LOGOUT, "
        f"for up to {work.loginSeconds:g} s or {work.maxLogins} logins. 'cheap local hash': mailproxy checks a "
        f"users-file entry with scrypt ln={CHEAP_LOG2_N} (microseconds) so the figure is proxy overhead; nginx "
        "asks an auth_http server in the bench that accepts everybody; haproxy and the forwarders relay bytes; all then "
        "log in to "
        "Dovecot, which checks the password as it does directly. "
        f"'scrypt ln={DEFAULT_LOG2_N}': mailproxy's default hash (32 MiB, deliberately slow, run in a thread pool), "
        "paid once per user and password while the credentials cache holds it. Memory: (PSS after - before) / "
        f"sessions for {work.sessions} sessions in LOGIN, SELECT, IDLE; direct = the whole Dovecot process tree, "
        "mailproxy = the twistd process and its workers, nginx = master + worker, haproxy and the forwarders = their "
        "process (the "
        "Dovecot sessions behind the proxies are not counted). "
        "CPU: user + system time of the Dovecot tree (its side of direct), the mailproxy tree, nginx's "
        "master + worker, haproxy or a forwarder during a bulk FETCH; it counts only the proxy's work (the Dovecot behind it is "
        "not counted) and depends less on the machine's load than the throughput. "
        "CPU per login / per command under load: the CPU time, over the run's window, of the load's client processes, "
        "of the Dovecot tree (with the imap processes that served one session and exited) and of the proxy's processes, "
        "over the logins or commands done in it; the sum against direct's says how much more CPU time the machine "
        "spends per operation through a proxy. On a machine the clients, Dovecot and the proxy share, the proxy's "
        "share of the CPU slows Dovecot's own work (python -m bench.contention measures what a share costs). "
        "POP3: poplib STAT, LIST, UIDL, RETR of every INBOX message; mailproxy relays to Dovecot's POP3, "
        "nginx, haproxy and the forwarders too; the bridge row is mailproxy speaking IMAP upstream."
    )


def render(
    targets: list[Target],
    work: Workload,
    generator: LoadGenerator,
    notes: list[str],
    load: tuple[float, float],
) -> tuple[str, str]:
    header = [""] + [target.name for target in targets]
    rows = list(tableRows(targets, work))
    goalHeader = ["goal (issue 13)"] + [target.name for target in targets[1:]]
    goals = goalRows(targets)
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} at start, {load[1]:.2f} at end."
    )
    workload = workloadText(work, generator)
    text = "\n".join(
        [textTable(header, rows), "", "Goals:", textTable(goalHeader, goals), "", workload, machine, *notes]
    )
    markdown = "\n".join(
        [
            markdownTable(header, rows),
            "",
            "## Goals",
            "",
            markdownTable(goalHeader, goals),
            "",
            workload,
            "",
            machine,
            *(part for note in notes for part in ("", note)),
            "",
        ]
    )
    return text, markdown


def renderIdleScale(result: idle_scale.IdleScaleResult) -> tuple[str, str]:
    header = ["", "through mailproxy", "direct Dovecot"]
    rows = idle_scale.rows(result)
    goalLines = [f"{goal}: {figure}, {verdict(met)}" for goal, figure, met in result.goals()]
    notes = idle_scale.notes(result)
    text = "\n".join([textTable(header, rows), "", *("goal: " + line for line in goalLines), *notes])
    markdown = "\n".join([markdownTable(header, rows), "", *(f"- goal: {line}" for line in goalLines), "", *notes, ""])
    return text, markdown


class RunTimedOut(Exception):
    pass


def _timedOut(signum: int, frame: FrameType | None) -> None:
    raise RunTimedOut("the benchmark ran past --time-limit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer messages, rounds and sessions)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="Markdown file for the table (default: %(default)s)")
    parser.add_argument("--no-nginx", action="store_true", help="leave out the nginx column")
    parser.add_argument("--no-haproxy", action="store_true", help="leave out the haproxy column")
    parser.add_argument(
        "--no-forwarders", action="store_true", help="leave out the Python forwarder columns (bench.forwarder)"
    )
    parser.add_argument("--no-prelogin", action="store_true", help="leave out the before-login table (bench.prelogin)")
    parser.add_argument(
        "--idle-sessions",
        type=int,
        default=None,
        help="concurrent IDLE sessions through the proxy (bench.idle_scale; default 10000, 500 with --quick; 0: none)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=1200.0, help="seconds for the whole run (default: %(default)g)"
    )
    arguments = parser.parse_args(argv)
    work = QUICK if arguments.quick else FULL
    idleSessions = work.idleSessions if arguments.idle_sessions is None else arguments.idle_sessions
    # before anything is started, so that Dovecot, the proxies and the load
    # generator's processes inherit it
    fileLimit = raiseFileLimit(2 * (idleSessions + idleDirectSessions(idleSessions)) + idle_scale.FILE_LIMIT_MARGIN)
    signal.signal(signal.SIGALRM, _timedOut)
    signal.setitimer(signal.ITIMER_REAL, arguments.time_limit)
    started = time.monotonic()
    startLoad = os.getloadavg()[0]
    preloginRows: list[list[str]] = []
    preloginNotes: list[str] = []
    idleResult: idle_scale.IdleScaleResult | None = None
    try:
        # the client processes are forked first, before any thread or server
        with loadGenerator() as generator:
            targets, notes = run(
                work, not arguments.no_nginx, not arguments.no_haproxy, generator, not arguments.no_forwarders
            )
            endLoad = os.getloadavg()[0]
            notes.append(fileLimit)
            if not arguments.no_prelogin:
                print("before login (bench.prelogin)")
                preloginRows, preloginNotes = prelogin.measure(prelogin.QUICK if arguments.quick else prelogin.FULL)
            if idleSessions > 0:
                print(f"IDLE scale: {idleSessions} sessions through the proxy (bench.idle_scale)")
                idleResult = idle_scale.measure(idleSessions, idleDirectSessions(idleSessions), work.idleRounds)
    except RunTimedOut:
        print(f"bench: stopped after --time-limit {arguments.time_limit:g} s; everything it started is stopped")
        return 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    text, markdown = render(targets, work, generator, notes, (startLoad, endLoad))
    if preloginRows:
        text += "\n\nBefore login:\n" + "\n".join([textTable(prelogin.HEADER, preloginRows), "", *preloginNotes])
        markdown += (
            "\n## Before login\n\n" + "\n\n".join([markdownTable(prelogin.HEADER, preloginRows), *preloginNotes]) + "\n"
        )
    if idleResult is not None:
        idleText, idleMarkdown = renderIdleScale(idleResult)
        title = f"{idleResult.sessions:,} concurrent IDLE sessions"
        text += f"\n\n{title}:\n{idleText}"
        markdown += f"\n## {title}\n\n{idleMarkdown}"
    print(f"\n{text}\n\n({time.monotonic() - started:.0f} s)")
    with open(arguments.output, "w") as handle:
        handle.write(markdown)
    print(f"Markdown table written to {arguments.output}")
    return 0
