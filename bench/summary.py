"""
The whole benchmark in one run, side by side: direct Dovecot, mailproxy and
(when installed) nginx's mail proxy, all in front of the same private
Dovecot on 127.0.0.1.

    make bench                      (or: .venv/bin/python -m bench [--quick] [--output FILE])

Figures: bulk FETCH throughput, per-message FETCH latency (one command in
flight, and pipelined batches), NOOP round trips, logins per second (one at
a time and in parallel), memory per idle IMAP session, POP3 download; then
a second table (bench.prelogin, left out with --no-prelogin): NOOPs during
a login flood, silent TLS connections against the login deadline, a
parallel guessing burst. The targets are interleaved round by round;
results are medians, shown with their ratio or difference against direct
Dovecot measured in the same run (absolute numbers depend on the machine
and its load; the comparison is the result). The table is printed and written as Markdown (bench/results.md
unless --output says otherwise). Every loop is bounded in count, and the
whole run in time (--time-limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from bench import prelogin
from bench.common import (
    PASSWORD,
    USER,
    RawClient,
    freePort,
    markdownTable,
    memoryKiB,
    percentile,
    privateDovecot,
    seed,
    startProxy,
    textTable,
    treeCpuSeconds,
    treeMemoryKiB,
    workDirectory,
    writeUsersFile,
)
from bench.idle_sessions import Session, openMany
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

PROXY_CONFIG = """
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
    One column: where to connect and how to read its memory.
    """

    name: str
    imapPort: int
    pop3Port: int
    memory: Callable[[], int]
    cpu: Callable[[], float]
    fetch: dict[str, list[float]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, values: list[float]) -> None:
        self.fetch.setdefault(key, []).extend(values)


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
)


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
    runs: dict[str, tuple[int, str]] = {}
    for target in targets:
        user = POP3_RELAY_USER if target.name == "mailproxy" else USER
        runs[target.name] = (target.pop3Port, user)
    runs["mailproxy bridge"] = (targets[1].pop3Port, USER)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    octets: dict[str, int] = {}
    for port, user in runs.values():
        download(port, user, PASSWORD)  # warm-up
    for _ in range(work.pop3Rounds):
        for name, (port, user) in runs.items():
            elapsed, octets[name] = download(port, user, PASSWORD)
            seconds[name].append(elapsed)
    if len(set(octets.values())) != 1:
        raise RuntimeError(f"POP3 targets returned different octet counts: {octets}")
    for target in targets:
        target.figures["pop3_MBps"] = octets[target.name] / statistics.median(seconds[target.name]) / 1e6
    targets[1].figures["pop3_bridge_MBps"] = (
        octets["mailproxy bridge"] / statistics.median(seconds["mailproxy bridge"]) / 1e6
    )


def run(work: Workload, withNginx: bool) -> tuple[list[Target], list[str]]:
    notes: list[str] = []
    nginxBinary, why = findNginx() if withNginx else (None, "nginx left out (--no-nginx)")
    if nginxBinary is None:
        notes.append(f"nginx mail column skipped: {why}.")
    with (
        workDirectory("mp-bench-") as directory,
        privateDovecot({USER: PASSWORD}, maxSessions=work.sessions + 200) as upstream,
    ):
        print(
            f"seeding: {work.messages} x {work.size} octets in INBOX, {work.smallMessages} x {work.smallSize} in Small"
        )
        seed(upstream.ports["imap"], work.messages, work.size)
        seed(upstream.ports["imap"], work.smallMessages, work.smallSize, SMALL_MAILBOX)
        writeUsersFile(
            directory,
            {
                USER: (PASSWORD, CHEAP_LOG2_N),
                SCRYPT_USER: (PASSWORD, DEFAULT_LOG2_N),
                POP3_RELAY_USER: (PASSWORD, CHEAP_LOG2_N),
            },
        )
        ports = {"imap": freePort(), "pop3": freePort()}
        config = PROXY_CONFIG.format(
            imapPort=ports["imap"],
            pop3Port=ports["pop3"],
            upstreamImap=upstream.ports["imap"],
            upstreamPop3=upstream.ports["pop3"],
            scryptUser=SCRYPT_USER,
            relayUser=POP3_RELAY_USER,
            user=USER,
            sessions=work.sessions + 2 * work.parallel + 100,
        )
        dovecotPid = upstream.pid
        assert dovecotPid is not None
        with startProxy(directory, config, list(ports.values())) as proxy:
            proxyPid = proxy.process.pid
            targets = [
                Target(
                    "direct",
                    upstream.ports["imap"],
                    upstream.ports["pop3"],
                    lambda: treeMemoryKiB(dovecotPid),
                    lambda: treeCpuSeconds(dovecotPid),
                ),
                Target(
                    "mailproxy",
                    ports["imap"],
                    ports["pop3"],
                    lambda: memoryKiB(proxyPid)[0],
                    lambda: treeCpuSeconds(proxyPid),
                ),
            ]
            nginx = None
            if nginxBinary is not None:
                nginxDirectory = os.path.join(directory, "nginx")
                os.mkdir(nginxDirectory)
                nginx = NginxMailProxy(
                    nginxBinary, nginxDirectory, upstream.ports["imap"], upstream.ports["pop3"], 2 * work.sessions + 256
                )
                nginx.start()
                notes.append(f"{nginxVersion(nginxBinary)}, 1 worker, proxy_buffer {nginx.buffer}.")
                targets.append(
                    Target("nginx", nginx.ports["imap"], nginx.ports["pop3"], nginx.memoryKiB, nginx.cpuSeconds)
                )
            try:
                measureAll(targets, work)
            finally:
                if nginx is not None:
                    nginx.stop()
            if proxy.process.poll() is not None:
                raise RuntimeError(f"mailproxy exited during the run:\n{proxy.output()}")
    return targets, notes


def measureAll(targets: list[Target], work: Workload) -> None:
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
    loginFigures(targets[1], SCRYPT_USER, "scrypt", work)
    print("POP3 downloads")
    pop3Figures(targets, work)


def nginxVersion(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def tableRows(targets: list[Target], work: Workload) -> Iterator[list[str]]:
    direct = targets[0]

    def row(label: str, cell: Callable[[Target], str]) -> list[str]:
        return [label] + [cell(target) for target in targets]

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

    def median(key: str) -> Callable[[Target], float]:
        return lambda target: statistics.median(target.fetch[key])

    def tail(key: str) -> Callable[[Target], str]:
        return lambda t: f"{_ms(percentile(t.fetch[key], 0.99))} / {_ms(max(t.fetch[key]))}"

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
    for parallel in (1, work.parallel):
        what = "1 at a time" if parallel == 1 else f"{parallel} in parallel"
        yield row(
            f"logins/s, {what}, cheap local hash (% of direct)",
            share(lambda t, p=parallel: t.figures[f"logins_cheap_{p}"]),  # type: ignore[misc]
        )
    for parallel in (1, work.parallel):
        what = "1 at a time" if parallel == 1 else f"{parallel} in parallel"
        yield [f"logins/s, {what}, mailproxy scrypt ln={DEFAULT_LOG2_N}", "-"] + [
            f"{t.figures[f'logins_scrypt_{parallel}']:.1f}" if t.name == "mailproxy" else "-" for t in targets[1:]
        ]
    yield row("memory per idle IMAP session, KiB PSS", lambda t: f"{t.figures['idle_KiB']:.0f}")
    yield row("POP3 download, MB/s (% of direct)", share(lambda t: t.figures["pop3_MBps"]))
    bridge = targets[1].figures["pop3_bridge_MBps"]
    yield [
        "POP3 download via mailproxy's IMAP bridge, MB/s",
        "-",
        f"{bridge:.1f} ({bridge / direct.figures['pop3_MBps']:.0%})",
    ] + ["-" for _ in targets[2:]]


STALL_SECONDS = 0.030


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


def goals(targets: list[Target]) -> list[str]:
    direct, proxy = targets[0], targets[1]
    ratio = statistics.median(proxy.fetch["bulk_MBps"]) / statistics.median(direct.fetch["bulk_MBps"])
    overhead = (statistics.median(proxy.fetch["single_s"]) - statistics.median(direct.fetch["single_s"])) * 1000

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    lines = [
        f"mailproxy bulk throughput >= 60% of direct: {ratio:.0%}, {verdict(ratio >= 0.6)}",
        f"mailproxy per-message latency overhead < 0.2 ms: {overhead:+.3f} ms, {verdict(overhead < 0.2)}",
    ]
    for target in targets[1:]:
        stalled, total = stalls(target, direct)
        lines.append(
            f"{target.name}: no Nagle stalls (FETCHes {STALL_SECONDS * 1000:.0f} ms or more over direct's median): "
            f"{stalled} of {total}, {verdict(stalled == 0)}"
        )
    return lines


def render(targets: list[Target], work: Workload, notes: list[str], load: tuple[float, float]) -> tuple[str, str]:
    header = ["", "direct Dovecot", "mailproxy"] + (["nginx mail"] if len(targets) > 2 else [])
    rows = list(tableRows(targets, work))
    workload = (
        f"Workload: bulk = UID FETCH 1:* (BODY.PEEK[]) of {work.messages} x {work.size // 1024} KiB messages, "
        f"{work.bulkRepeats} per round; "
        f"per-message = UID FETCH n (BODY.PEEK[]) of {work.smallMessages} ~{work.smallSize // 1000} kB messages, one "
        f"in flight, and in batches of {work.depth} sent in one write; median of {work.rounds} interleaved rounds "
        "(p99/max over all samples). Logins: connect, greeting, LOGIN, LOGOUT, "
        f"for up to {work.loginSeconds:g} s or {work.maxLogins} logins. 'cheap local hash': mailproxy checks a "
        f"users-file entry with scrypt ln={CHEAP_LOG2_N} (microseconds) so the figure is proxy overhead; nginx "
        "asks an auth_http server in the bench that accepts everybody; both then log in to Dovecot, which checks "
        f"the password as it does directly. 'scrypt ln={DEFAULT_LOG2_N}': mailproxy's default hash (32 MiB, "
        "deliberately slow, run in a thread pool). Memory: (PSS after - before) / sessions for "
        f"{work.sessions} sessions in LOGIN, SELECT, IDLE; direct = the whole Dovecot process tree, mailproxy = "
        "the twistd process, nginx = master + worker (the Dovecot sessions behind the proxies are not counted). "
        "CPU: user + system time of the Dovecot tree (its side of direct), the twistd process, or nginx's "
        "master + worker during a bulk FETCH; it counts only the proxy's work (the Dovecot behind it is not "
        "counted) and depends less on the machine's load than the throughput. "
        "POP3: poplib STAT, LIST, UIDL, RETR of every INBOX message; mailproxy relays to Dovecot's POP3, "
        "nginx too; the bridge row is mailproxy speaking IMAP upstream."
    )
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} at start, {load[1]:.2f} at end."
    )
    goalLines = goals(targets)
    text = "\n".join(
        [textTable(header, rows), "", *("goal: " + line for line in goalLines), "", workload, machine, *notes]
    )
    markdown = "\n".join(
        [
            markdownTable(header, rows),
            "",
            *(f"- goal: {line}" for line in goalLines),
            "",
            workload,
            "",
            machine,
            *(part for note in notes for part in ("", note)),
            "",
        ]
    )
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
    parser.add_argument("--no-prelogin", action="store_true", help="leave out the before-login table (bench.prelogin)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    arguments = parser.parse_args(argv)
    work = QUICK if arguments.quick else FULL
    signal.signal(signal.SIGALRM, _timedOut)
    signal.setitimer(signal.ITIMER_REAL, arguments.time_limit)
    started = time.monotonic()
    startLoad = os.getloadavg()[0]
    preloginRows: list[list[str]] = []
    preloginNotes: list[str] = []
    try:
        targets, notes = run(work, not arguments.no_nginx)
        if not arguments.no_prelogin:
            print("before login (bench.prelogin)")
            preloginRows, preloginNotes = prelogin.measure(prelogin.QUICK if arguments.quick else prelogin.FULL)
    except RunTimedOut:
        print(f"bench: stopped after --time-limit {arguments.time_limit:g} s; everything it started is stopped")
        return 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    text, markdown = render(targets, work, notes, (startLoad, os.getloadavg()[0]))
    if preloginRows:
        text += "\n\nBefore login:\n" + "\n".join([textTable(prelogin.HEADER, preloginRows), "", *preloginNotes])
        markdown += (
            "\n## Before login\n\n" + "\n\n".join([markdownTable(prelogin.HEADER, preloginRows), *preloginNotes]) + "\n"
        )
    print(f"\n{text}\n\n({time.monotonic() - started:.0f} s)")
    with open(arguments.output, "w") as handle:
        handle.write(markdown)
    print(f"Markdown table written to {arguments.output}")
    return 0
