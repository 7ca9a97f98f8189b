"""
Thousands of concurrent IDLE sessions through the proxy (issue 13's
"Scale": 10,000 on this machine), with its workers on all CPUs.

    .venv/bin/python -m bench.idle_scale [--sessions 10000] [--direct 500] [--rounds 2]

(also part of C{make bench}: C{python -m bench --idle-sessions N}).

Starts a private Dovecot with its limits raised for the run, and mailproxy
(twistd, C{[server] workers} = the number of CPUs where supported); opens N
sessions through the proxy (LOGIN, SELECT INBOX, IDLE) and a smaller
number straight to Dovecot, as N/10 users; then, each round, another
session straight to Dovecot APPENDs a message to every user's INBOX, and
every idler must see its EXISTS. Reported: how many sessions opened, how
many were still alive at the end (got the last round's EXISTS), how long
the EXISTS took to arrive (p50, p99, max, proxied and direct), the proxy
tree's PSS per session (after - before, over the twistd process and its
workers) and its descriptors.

File descriptors: the bench raises its own RLIMIT_NOFILE before it starts
anything (soft and hard where permitted, else the soft one up to the hard
one), so Dovecot, the proxy and its workers inherit it. Direct sessions
cost Dovecot one imap process each (about 0.6 MB PSS), and so do the
proxied ones behind the proxy: the direct comparison runs at a smaller
count. Everything stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field

from bench.common import (
    freePort,
    percentile,
    privateDovecot,
    processTree,
    raiseFileLimit,
    startProxy,
    textTable,
    treeMemoryKiB,
    treeOpenFiles,
    workDirectory,
    writeUsersFile,
)
from bench.idle_sessions import Session, proxyConfig
from bench.load import LoadClient
from tests.dovecot import DovecotUpstream

PASSWORD = "idlerpw"
# sessions per user: one mailbox watched by all 10,000 would make every
# APPEND wake 10,000 Dovecot processes that then queue on one mailbox's
# locks (measured: EXISTS after 15 s at p50, direct as well); real
# mailboxes are watched by a few sessions each
SESSIONS_PER_USER = 10
APPEND_CONCURRENCY = 8
# the scale, not password hashing, is measured here
CHEAP_LOG2_N = 1
OPEN_CONCURRENCY = 64
OPEN_TIMEOUT = 30.0
OPEN_DEADLINE = 600.0
ROUND_TIMEOUT = 30.0
PROGRESS_EVERY = 1000
SETTLE_SECONDS = 2.0
DRAIN_SECONDS = 60.0
NOTIFICATION_GOAL_MS = 1500.0
# client sessions + proxy-to-Dovecot sessions + everything else, with room
FILE_LIMIT_MARGIN = 4096


@dataclass
class IdleScaleResult:
    """
    What L{measure} found; latencies in milliseconds.
    """

    sessions: int
    directSessions: int
    workers: int | None
    opened: int = 0
    openedDirect: int = 0
    openSeconds: float = 0.0
    openErrors: int = 0
    firstError: str = ""
    alive: int = 0
    aliveDirect: int = 0
    pssBeforeKiB: int = 0
    pssAfterKiB: int = 0
    processes: int = 0
    descriptors: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"proxy": [], "direct": []})
    lastRound: dict[str, list[float]] = field(default_factory=lambda: {"proxy": [], "direct": []})
    fileLimit: str = ""
    proxyAlive: bool = True
    # the machine's 1-minute load average before opening and after the rounds
    loadAverage: tuple[float, float] = (0.0, 0.0)

    @property
    def pssPerSessionKiB(self) -> float:
        return (self.pssAfterKiB - self.pssBeforeKiB) / max(1, self.opened)

    def goals(self) -> list[tuple[str, str, bool]]:
        """
        (goal, figure, met) for issue 13's scale goals.
        """
        p99 = percentile(self.latencies["proxy"], 0.99) if self.latencies["proxy"] else float("inf")
        return [
            (
                f"{self.sessions:,} concurrent IDLE sessions through the proxy, all alive at the end",
                f"{self.alive:,} of {self.sessions:,} alive",
                self.alive == self.sessions,
            ),
            (
                f"notification p99 (APPEND -> EXISTS at every idler) <= {NOTIFICATION_GOAL_MS / 1000:g} s",
                f"{p99 / 1000:.2f} s",
                p99 <= NOTIFICATION_GOAL_MS,
            ),
        ]


def userNames(sessions: int) -> list[str]:
    """
    The users the sessions log in as, C{SESSIONS_PER_USER} sessions each.
    """
    return [f"idler{number}" for number in range(1, max(1, -(-sessions // SESSIONS_PER_USER)) + 1)]


@dataclass
class Idler:
    """
    One open IDLE session and the user (mailbox) it watches.
    """

    session: Session
    user: str


async def openAll(port: int, users: list[str], count: int, result: IdleScaleResult) -> list[Idler]:
    """
    Open C{count} IDLE sessions, session C{i} as user C{i} modulo the
    users, C{OPEN_CONCURRENCY} at a time; failures are counted in
    C{result}, not raised.
    """
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    opened = 0

    async def one(user: str) -> Idler | None:
        nonlocal opened
        async with gate:
            try:
                session = await asyncio.wait_for(Session.open(port, user, PASSWORD), OPEN_TIMEOUT)
            except (OSError, EOFError, RuntimeError, TimeoutError) as error:
                result.openErrors += 1
                if not result.firstError:
                    result.firstError = f"{type(error).__name__}: {error}"
                return None
        opened += 1
        if opened % PROGRESS_EVERY == 0:
            print(f"  {opened} open on port {port}", flush=True)
        return Idler(session, user)

    idlers = await asyncio.wait_for(
        asyncio.gather(*(one(users[number % len(users)]) for number in range(count))), OPEN_DEADLINE
    )
    return [idler for idler in idlers if idler is not None]


async def appendTo(port: int, user: str, number: int) -> float:
    """
    Log in straight to Dovecot as C{user} and APPEND one message to its
    INBOX; return when the APPEND was sent (C{time.perf_counter()}).
    """
    message = b"Subject: wake up %d\r\nFrom: bench@example.test\r\n\r\nhello\r\n" % number
    client = await LoadClient.connect(port)
    try:
        await client.login(user, PASSWORD)
        started = time.perf_counter()
        await client.command(b"APPEND INBOX {%d+}\r\n%s" % (len(message), message))
        await client.command(b"LOGOUT")
    finally:
        await client.close()
    return started


async def notificationRound(
    upstream: DovecotUpstream, users: list[str], groups: dict[str, list[Idler]], number: int
) -> dict[str, list[float]]:
    """
    One APPEND to every user's INBOX by another session straight to
    Dovecot, C{APPEND_CONCURRENCY} at a time; the milliseconds from each
    APPEND until each of that mailbox's idlers saw its EXISTS (idlers that
    did not, within C{ROUND_TIMEOUT} after the last APPEND, are left out).
    """
    waiters = {
        name: [(idler.user, asyncio.ensure_future(idler.session.waitForExists())) for idler in idlers]
        for name, idlers in groups.items()
    }
    gate = asyncio.Semaphore(APPEND_CONCURRENCY)

    async def append(user: str) -> float:
        async with gate:
            return await asyncio.wait_for(appendTo(upstream.ports["imap"], user, number), OPEN_TIMEOUT)

    started = dict(zip(users, await asyncio.gather(*(append(user) for user in users)), strict=True))
    everyone = [task for tasks in waiters.values() for _, task in tasks]
    await asyncio.wait(everyone, timeout=ROUND_TIMEOUT)
    arrived: dict[str, list[float]] = {}
    for name, tasks in waiters.items():
        arrived[name] = []
        for user, task in tasks:
            if task.done() and task.exception() is None:
                arrived[name].append((task.result() - started[user]) * 1000)
            else:
                task.cancel()
    return arrived


async def _measure(
    upstream: DovecotUpstream,
    proxyPid: int,
    port: int,
    rounds: int,
    result: IdleScaleResult,
    sessions: list[Session],
) -> None:
    """
    Open the sessions (into C{sessions}, which the caller closes) and
    measure.
    """
    await asyncio.sleep(0.5)
    startLoad = os.getloadavg()[0]
    result.pssBeforeKiB = treeMemoryKiB(proxyPid)
    started = time.perf_counter()
    users = userNames(result.sessions)
    proxied = await openAll(port, users, result.sessions, result)
    result.openSeconds = time.perf_counter() - started
    result.opened = len(proxied)
    sessions += [idler.session for idler in proxied]
    direct = await openAll(upstream.ports["imap"], users, result.directSessions, result)
    result.openedDirect = len(direct)
    sessions += [idler.session for idler in direct]
    await asyncio.sleep(SETTLE_SECONDS)
    result.pssAfterKiB = treeMemoryKiB(proxyPid)
    result.processes = len(processTree(proxyPid))
    result.descriptors = treeOpenFiles(proxyPid)
    groups = {"proxy": proxied, "direct": direct}
    for number in range(rounds):
        arrived = await notificationRound(upstream, users, groups, number)
        for name, values in arrived.items():
            result.latencies[name] += values
        result.lastRound = arrived
        await asyncio.sleep(1.0)
    result.loadAverage = (startLoad, os.getloadavg()[0])
    result.alive = len(result.lastRound["proxy"])
    result.aliveDirect = len(result.lastRound["direct"])


def measure(sessions: int, directSessions: int, rounds: int, workers: int | None = 0) -> IdleScaleResult:
    """
    Run the whole measurement. C{workers=0}: the number of CPUs; C{None}:
    leave the key out.
    """
    if workers == 0:
        workers = os.cpu_count() or 1
    result = IdleScaleResult(sessions, directSessions, workers)
    # each proxied session holds a client and an upstream descriptor
    result.fileLimit = raiseFileLimit(2 * (sessions + directSessions) + FILE_LIMIT_MARGIN)
    users = userNames(sessions)
    with (
        workDirectory("mp-bench-idle-scale-") as directory,
        privateDovecot(dict.fromkeys(users, PASSWORD), maxSessions=sessions + directSessions + 100) as upstream,
    ):
        writeUsersFile(directory, dict.fromkeys(users, (PASSWORD, CHEAP_LOG2_N)))
        port = freePort()
        config = proxyConfig(port, upstream.ports["imap"], sessions + directSessions, workers, backlog=4096)
        with startProxy(directory, config, [port]) as proxy:
            asyncio.run(_measureAndClose(upstream, proxy.pid, port, rounds, result))
            result.proxyAlive = proxy.process.poll() is None
        # the proxy is gone, so are its upstream sessions: let Dovecot's
        # thousands of imap processes exit before it is stopped
        drainDovecot(upstream)
    return result


async def _measureAndClose(
    upstream: DovecotUpstream, proxyPid: int, port: int, rounds: int, result: IdleScaleResult
) -> None:
    sessions: list[Session] = []
    try:
        await _measure(upstream, proxyPid, port, rounds, result, sessions)
    finally:
        for session in sessions:
            session.close()
        # let the event loop send the FINs before it closes
        await asyncio.sleep(0.5)


def drainDovecot(upstream: DovecotUpstream) -> None:
    """
    Wait (bounded) until Dovecot's tree is back to its few service processes.
    """
    pid = upstream.pid
    if pid is None:
        return
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and len(processTree(pid)) > 50:
        time.sleep(0.5)


def rows(result: IdleScaleResult) -> list[list[str]]:
    """
    Table rows: what, proxied, direct.
    """

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return (
            f"{statistics.median(values):.0f} / {percentile(values, 0.99):.0f} / {max(values):.0f} (n={len(values):,})"
        )

    workers = "key not supported" if result.workers is None else str(result.workers)
    return [
        ["sessions asked for", f"{result.sessions:,}", f"{result.directSessions:,}"],
        [
            "opened (LOGIN, SELECT, IDLE)",
            f"{result.opened:,} in {result.openSeconds:.1f} s",
            f"{result.openedDirect:,}",
        ],
        ["alive at the end (saw the last round's EXISTS)", f"{result.alive:,}", f"{result.aliveDirect:,}"],
        ["APPEND -> EXISTS p50 / p99 / max, ms", spread(result.latencies["proxy"]), spread(result.latencies["direct"])],
        ["mailproxy tree PSS per session, KiB", f"{result.pssPerSessionKiB:.1f}", "-"],
        [
            "mailproxy tree PSS before / after, MiB",
            f"{result.pssBeforeKiB / 1024:.1f} / {result.pssAfterKiB / 1024:.1f}",
            "-",
        ],
        [
            "mailproxy processes / open descriptors",
            f"{result.processes} (workers = {workers}) / {result.descriptors:,}",
            "-",
        ],
    ]


def notes(result: IdleScaleResult) -> list[str]:
    users = len(userNames(result.sessions))
    lines = [
        f"IDLE scale: {result.sessions:,} sessions through mailproxy (workers = "
        f"{'its default' if result.workers is None else result.workers}) and {result.directSessions:,} straight to "
        f"Dovecot at the same time, as {users:,} users ({SESSIONS_PER_USER} proxied sessions per mailbox); direct "
        "sessions cost Dovecot an imap process each, as do the proxied ones behind the proxy, so the direct "
        "comparison runs at a smaller count. Each round, another session straight to Dovecot APPENDs one message "
        f"to every user's INBOX ({APPEND_CONCURRENCY} at a time); latency from each APPEND to the EXISTS at each "
        "idler of that mailbox; 'alive' = idlers that got the last round's EXISTS. Dovecot here polls a mailbox "
        "each second (mailbox_idle_check_interval = 1 s) in the sessions beyond the kernel's inotify instances per "
        "user (fs.inotify.max_user_instances), so most latencies spread over up to one second, direct and "
        f"proxied alike. Load average {result.loadAverage[0]:.1f} before opening, {result.loadAverage[1]:.1f} after "
        f"the rounds. {result.fileLimit}",
    ]
    if result.openErrors:
        lines.append(f"IDLE scale: {result.openErrors} sessions failed to open (first: {result.firstError}).")
    if not result.proxyAlive:
        lines.append("IDLE scale: mailproxy exited during the run.")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--direct", type=int, default=500, help="sessions straight to Dovecot, for comparison")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="[server] workers (default: the number of CPUs)")
    arguments = parser.parse_args()
    result = measure(arguments.sessions, arguments.direct, arguments.rounds, arguments.workers)
    print(textTable(["", "mailproxy", "direct Dovecot"], rows(result)))
    for goal, figure, met in result.goals():
        print(f"goal: {goal}: {figure}, {'met' if met else 'NOT met'}")
    print("\n".join(notes(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
