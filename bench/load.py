"""
An imaptest-like load generator: many IMAP clients at once, in asyncio,
spread over several client processes so that the client is not the
bottleneck.

    .venv/bin/python -m bench.load --port 143 --user load1:pw --user load2:pw [--seconds 10] [--clients 20]

Two workloads, each for a fixed time:

 - I{churn}: every client loops connect, LOGIN, SELECT INBOX, FETCH of a
   few messages, LOGOUT; the figure is logins per second.
 - I{mixed}: every client logs in once (before the clock starts), then
   loops SELECT INBOX, FETCH 1:* (FLAGS), UID FETCH n (BODY.PEEK[]),
   UID STORE n +FLAGS (\\Seen) and NOOP; the figure is commands per second.

Client C{i} logs in as user C{i} modulo the users given, so twenty users
spread the load as imaptest's C{users=1-20} does. Responses are read
literal by literal (C{{n}}), not parsed further: every target costs the
client the same. Every loop is bounded in count and in time; connections
go to 127.0.0.1 only.

L{runImaptest} runs Dovecot's own imaptest with the same clients, users and
duration where it is installed (it is not a Debian package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import Pool

from bench.common import HOST

CHURN = "churn"
MIXED = "mixed"
SCENARIOS = (CHURN, MIXED)

OPERATION_TIMEOUT = 30.0
# each client's loop stops at the deadline, or after this many rounds
MAX_ROUNDS = 1_000_000
# after an error a client waits this long before it tries again, so a
# refusing target is not hammered in a hot loop
ERROR_PAUSE = 0.05
# time for every client process to be ready (and, for the mixed workload,
# logged in) before the clock starts
START_MARGIN = {CHURN: 0.5, MIXED: 1.5}
# how long after the deadline the mixed load's clients stay logged in
METER_GRACE = 0.25
# the load users of make bench and bench.contention, like imaptest's user%d
# with users=1-20; in mailproxy's users file with the default scrypt cost,
# so its logins/s depend on the verified-credentials cache ([auth] cache_ttl)
LOAD_USERS = tuple((f"load{number}", "loadpw") for number in range(1, 21))
READ_LIMIT = 1 << 22
TAG = b"L"
LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class LoadError(Exception):
    """
    A target answered something other than the tagged OK expected.
    """


# what a client counts as an error and recovers from (a connection refused
# or cut, an answer other than OK, a timeout, a line over the read limit)
CLIENT_ERRORS = (OSError, EOFError, TimeoutError, LoadError, asyncio.LimitOverrunError)


@dataclass(frozen=True)
class LoadPlan:
    """
    What to run against one target.

    @ivar port: the IMAP port on 127.0.0.1.
    @ivar users: (name, password) pairs; client C{i} uses C{users[i % len]}.
    @ivar messages: how many messages each user's INBOX holds at least
        (the mixed workload fetches and flags UIDs 1 to C{messages}).
    """

    port: int
    users: tuple[tuple[str, str], ...]
    clients: int = 20
    seconds: float = 10.0
    messages: int = 20


@dataclass
class LoadResult:
    """
    Totals of one workload against one target, over all client processes.

    @ivar operations: logins (churn) or commands (mixed) completed within
        the time.
    @ivar clientCpuSeconds: CPU time the client processes spent within the
        time.
    @ivar metered: what the meter given to L{LoadGenerator.run} counted
        within the time (its reading at the end less its reading at the
        start), one figure for each it reads; empty if the end could not be
        read in time (see L{METER_GRACE}).
    """

    scenario: str
    operations: int = 0
    commands: int = 0
    errors: int = 0
    seconds: float = 0.0
    firstError: str = ""
    loginSeconds: list[float] = field(default_factory=list)
    clientCpuSeconds: float = 0.0
    metered: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: LoadResult) -> None:
        self.operations += other.operations
        self.commands += other.commands
        self.errors += other.errors
        self.seconds = max(self.seconds, other.seconds)
        self.firstError = self.firstError or other.firstError
        self.loginSeconds += other.loginSeconds
        self.clientCpuSeconds += other.clientCpuSeconds


class LoadClient:
    """
    One IMAP connection that sends a command and reads up to its tagged
    reply, literal-aware but otherwise unparsed.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.counter = 0

    @classmethod
    async def connect(cls, port: int) -> LoadClient:
        reader, writer = await asyncio.open_connection(HOST, port, limit=READ_LIMIT)
        client = cls(reader, writer)
        greeting = await client._response()
        if not greeting.startswith(b"* OK"):
            client.abort()
            raise LoadError(f"greeting {greeting[:80]!r}")
        return client

    async def _response(self) -> bytes:
        """
        One response line with any literals it announces.
        """
        line = await self.reader.readuntil(b"\r\n")
        parts = [line]
        # bounded: a response cannot announce more literals than it has octets
        for _ in range(READ_LIMIT):
            literal = LITERAL.search(line)
            if literal is None:
                break
            parts.append(await self.reader.readexactly(int(literal.group(1))))
            line = await self.reader.readuntil(b"\r\n")
            parts.append(line)
        return b"".join(parts)

    async def command(self, text: bytes) -> None:
        """
        Send C{text} and read up to its tagged reply, which must be OK.
        """
        self.counter += 1
        tag = TAG + b"%d" % self.counter
        self.writer.write(tag + b" " + text + b"\r\n")
        prefix = tag + b" "
        # bounded by the read limit: a server cannot send more lines than octets
        for _ in range(READ_LIMIT):
            response = await self._response()
            if response.startswith(prefix):
                if not response.startswith(prefix + b"OK"):
                    raise LoadError(f"{text.split(b' ', 1)[0].decode()}: {response[:120].decode(errors='replace')}")
                return
            if response.startswith(b"* BYE") and not text.startswith(b"LOGOUT"):
                raise LoadError(f"BYE: {response[:120].decode(errors='replace')}")
        raise LoadError("no tagged reply")

    async def login(self, user: str, password: str) -> None:
        await self.command(b"LOGIN %s %s" % (quoted(user), quoted(password)))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        self.writer.transport.abort()


def quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@dataclass
class _Window:
    start: float
    deadline: float

    def open(self) -> bool:
        return time.monotonic() < self.deadline


CHURN_FETCH = b"FETCH 1:4 (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"


async def _churnOnce(plan: LoadPlan, user: str, password: str, result: LoadResult, window: _Window) -> None:
    started = time.monotonic()
    client = await LoadClient.connect(plan.port)
    try:
        await client.login(user, password)
        loggedIn = time.monotonic()
        await client.command(b"SELECT INBOX")
        await client.command(CHURN_FETCH)
        await client.command(b"LOGOUT")
    finally:
        await client.close()
    if time.monotonic() <= window.deadline:
        result.operations += 1
        result.commands += 4
        result.loginSeconds.append(loggedIn - started)


async def _churnClient(plan: LoadPlan, index: int, result: LoadResult, window: _Window) -> None:
    user, password = plan.users[index % len(plan.users)]
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    for _ in range(MAX_ROUNDS):
        if not window.open():
            return
        try:
            await asyncio.wait_for(_churnOnce(plan, user, password, result, window), OPERATION_TIMEOUT)
        except CLIENT_ERRORS as error:
            _failed(result, error)
            await asyncio.sleep(ERROR_PAUSE)


def mixedCommands(plan: LoadPlan, index: int, turn: int) -> list[bytes]:
    """
    The commands of client C{index}'s round C{turn} of the mixed workload.
    """
    uid = (index * 7 + turn) % plan.messages + 1
    return [
        b"SELECT INBOX",
        b"FETCH 1:* (FLAGS)",
        b"UID FETCH %d (BODY.PEEK[])" % uid,
        b"UID STORE %d +FLAGS (\\Seen)" % uid,
        b"NOOP",
    ]


async def _mixedClient(plan: LoadPlan, index: int, result: LoadResult, window: _Window) -> None:
    user, password = plan.users[index % len(plan.users)]
    client: LoadClient | None = None
    try:
        # logged in once, before the clock starts; again only after an error
        for turn in range(MAX_ROUNDS):
            if client is None:
                try:
                    client = await asyncio.wait_for(_loggedIn(plan.port, user, password), OPERATION_TIMEOUT)
                except CLIENT_ERRORS as error:
                    _failed(result, error)
                    await asyncio.sleep(ERROR_PAUSE)
                    if not window.open():
                        return
                    continue
                await asyncio.sleep(max(0.0, window.start - time.monotonic()))
            for text in mixedCommands(plan, index, turn):
                if not window.open():
                    return
                try:
                    await asyncio.wait_for(client.command(text), OPERATION_TIMEOUT)
                except CLIENT_ERRORS as error:
                    _failed(result, error)
                    client.abort()
                    client = None
                    break
                if time.monotonic() <= window.deadline:
                    result.operations += 1
                    result.commands += 1
    finally:
        if client is not None:
            # Logged out only once the servers' CPU time has been read at the
            # deadline: a session's process that is exiting just then is in
            # neither the live processes' counters nor (not yet waited for)
            # its parent's.
            await asyncio.sleep(max(0.0, window.deadline + METER_GRACE - time.monotonic()))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.command(b"LOGOUT"), OPERATION_TIMEOUT)
            await client.close()


async def _loggedIn(port: int, user: str, password: str) -> LoadClient:
    client = await LoadClient.connect(port)
    try:
        await client.login(user, password)
        await client.command(b"SELECT INBOX")
    except BaseException:
        client.abort()
        raise
    return client


def _failed(result: LoadResult, error: BaseException) -> None:
    result.errors += 1
    if not result.firstError:
        result.firstError = f"{type(error).__name__}: {error}"


async def runClients(
    plan: LoadPlan,
    scenario: str,
    indices: Sequence[int],
    start: float,
    meter: Callable[[], Sequence[float]] | None = None,
) -> LoadResult:
    """
    Run clients C{indices} of C{plan} in this process from C{start}
    (C{time.monotonic()}, which is one clock for every process on Linux)
    for C{plan.seconds}, reading C{meter} (if any) at the start and the
    deadline.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    result = LoadResult(scenario)
    window = _Window(start, start + plan.seconds)
    run = _churnClient if scenario == CHURN else _mixedClient
    # (a late reading only adds the wind-down's CPU time: still counted)
    cpu = _readAt(window, lambda: (time.process_time(),), late=True)
    metered = _readAt(window, meter) if meter is not None else None
    # each client stops by itself at the deadline; this bounds a stuck one
    await asyncio.wait_for(
        asyncio.gather(*(run(plan, index, result, window) for index in indices)),
        plan.seconds + START_MARGIN[scenario] + 2 * OPERATION_TIMEOUT,
    )
    result.seconds = plan.seconds
    result.clientCpuSeconds = sum(cpu.difference())
    if metered is not None:
        result.metered = metered.difference()
    return result


class _Readings:
    """
    A reading taken at a window's start and at its deadline, for their
    difference.
    """

    def __init__(self, window: _Window, read: Callable[[], Sequence[float]], late: bool = False) -> None:
        """
        @param late: whether a reading at the end taken after L{METER_GRACE}
            still counts.
        """
        self.window = window
        self.read = read
        self.lateCounts = late
        self.values: list[Sequence[float]] = []
        self.late = False

    def take(self) -> None:
        self.values.append(self.read())
        if len(self.values) == 2 and time.monotonic() > self.window.deadline + METER_GRACE:
            # The mixed load's sessions may have ended before this reading.
            self.late = True

    def difference(self) -> tuple[float, ...]:
        """
        The end's reading less the start's; empty if the end was read late
        and that does not count.
        """
        # A moment not reached yet (a run cut short) is read now.
        while len(self.values) < 2:
            self.take()
        if self.late and not self.lateCounts:
            return ()
        return tuple(after - before for before, after in zip(*self.values, strict=True))


def _readAt(window: _Window, read: Callable[[], Sequence[float]], late: bool = False) -> _Readings:
    """
    Read C{read} at C{window}'s start and deadline on the running event loop.
    """
    readings = _Readings(window, read, late)
    loop = asyncio.get_running_loop()
    for moment in (window.start, window.deadline):
        loop.call_later(max(0.0, moment - time.monotonic()), readings.take)
    return readings


def _defaultSignals() -> None:
    """
    A client process ends on SIGTERM (which L{LoadGenerator.close} sends),
    and on SIGINT, whatever handlers it inherited: a reactor that ran in the
    parent (a test's) leaves its own, which only stop that reactor, and the
    close then waits for a child that never exits.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _runShare(plan: LoadPlan, scenario: str, indices: Sequence[int], start: float) -> LoadResult:
    return asyncio.run(runClients(plan, scenario, indices, start))


def _readWhileWaiting(window: _Window, meter: Callable[[], Sequence[float]]) -> tuple[float, ...]:
    """
    Read C{meter} at C{window}'s start and deadline, sleeping in between
    (the clients run in other processes); their difference.
    """
    readings = _Readings(window, meter)
    for moment in (window.start, window.deadline):
        time.sleep(max(0.0, moment - time.monotonic()))
        readings.take()
    return readings.difference()


class LoadGenerator:
    """
    A pool of C{processes} client processes (forked once, reused for every
    run, stopped on L{close}); with C{processes=1} the clients run in the
    calling process.

    Make it before the caller starts threads (a forked child has only the
    forking thread) or servers whose descriptors the children would
    inherit. Fork rather than spawn: a spawned child imports the parent's
    C{__main__} again, which for a script re-runs it.
    """

    def __init__(self, processes: int = 0) -> None:
        self.processes = processes or max(1, os.cpu_count() or 1)
        self._pool: Pool | None = None
        if self.processes > 1:
            self._pool = multiprocessing.get_context("fork").Pool(self.processes, initializer=_defaultSignals)

    def run(self, plan: LoadPlan, scenario: str, meter: Callable[[], Sequence[float]] | None = None) -> LoadResult:
        """
        @param meter: read at the start and at the deadline of the time: what
            it counts, say the servers' CPU time, goes to
            L{LoadResult.metered}.
        """
        start = time.monotonic() + START_MARGIN[scenario]
        shares = [list(range(plan.clients))[offset :: self.processes] for offset in range(self.processes)]
        shares = [share for share in shares if share]
        result = LoadResult(scenario)
        if self._pool is None:
            parts = [asyncio.run(runClients(plan, scenario, shares[0], start, meter))]
            result.metered = parts[0].metered
        else:
            pending = self._pool.starmap_async(_runShare, [(plan, scenario, share, start) for share in shares])
            if meter is not None:
                result.metered = _readWhileWaiting(_Window(start, start + plan.seconds), meter)
            parts = pending.get(timeout=plan.seconds + START_MARGIN[scenario] + 3 * OPERATION_TIMEOUT)
        for part in parts:
            result.merge(part)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


@contextlib.contextmanager
def loadGenerator(processes: int = 0) -> Iterator[LoadGenerator]:
    generator = LoadGenerator(processes)
    try:
        yield generator
    finally:
        generator.close()


async def warmUp(port: int, users: Sequence[tuple[str, str]]) -> None:
    """
    One login per user (filling a proxy's verified-credentials cache).
    """
    for user, password in users:
        client = await asyncio.wait_for(LoadClient.connect(port), OPERATION_TIMEOUT)
        try:
            await asyncio.wait_for(client.login(user, password), OPERATION_TIMEOUT)
            await asyncio.wait_for(client.command(b"LOGOUT"), OPERATION_TIMEOUT)
        finally:
            await client.close()


# -- Dovecot's imaptest, where installed --------------------------------------


def findImaptest() -> str | None:
    return shutil.which("imaptest")


def writeMbox(path: str, count: int, size: int) -> None:
    """
    An mbox of C{count} messages for imaptest's APPENDs.
    """
    body = b"\n".join(b"x" * 75 for _ in range(max(1, size // 76)))
    with open(path, "wb") as handle:
        for number in range(count):
            handle.write(
                b"From bench@example.test Thu Jan  1 00:00:00 2026\n"
                b"From: bench@example.test\nSubject: imaptest %d\n\n%s\n\n" % (number, body)
            )


def parseImaptestTotals(output: str) -> dict[str, int]:
    """
    The column totals of imaptest's output: after "Totals:" come its column
    header (C{Logi List ... Logo}), one or two lines of probabilities
    (C{100%  50% ...}) and the line of counts. Empty when there are none.
    """
    lines = output.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != "Totals:":
            continue
        following = [text.split() for text in lines[number + 1 :] if text.strip()]
        if not following or following[0][:1] != ["Logi"]:
            return {}
        header = following[0]
        for fields in following[1:]:
            if all(field.isdigit() for field in fields):
                return dict(zip(header, map(int, fields), strict=False))
        return {}
    return {}


def runImaptest(
    binary: str,
    port: int,
    users: Sequence[tuple[str, str]],
    mbox: str,
    clients: int,
    seconds: float,
    logout: bool,
) -> tuple[dict[str, int], str]:
    """
    Run imaptest against C{port} with users C{PREFIX1..N} (all with the
    first user's password, named like C{load1}): (column totals, output
    tail). C{logout=False} sets the LOGOUT probability to 0 (imaptest's
    C{logout=0}).
    """
    prefix = users[0][0].rstrip("0123456789")
    command = [
        binary,
        f"host={HOST}",
        f"port={port}",
        f"user={prefix}%d",
        f"users=1-{len(users)}",
        f"pass={users[0][1]}",
        f"mbox={mbox}",
        f"clients={clients}",
        f"secs={max(1, round(seconds))}",
        "no_pipelining",
    ]
    if not logout:
        command.append("logout=0")
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False, stdin=subprocess.DEVNULL
    )
    output = completed.stdout + completed.stderr
    return parseImaptestTotals(output), "\n".join(output.splitlines()[-8:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="IMAP port on 127.0.0.1")
    parser.add_argument("--user", action="append", required=True, metavar="NAME:PASSWORD")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=20, help="messages in each user's INBOX (at least)")
    parser.add_argument("--processes", type=int, default=0, help="client processes (default: one per CPU)")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    arguments = parser.parse_args()
    users = tuple((name, password) for name, _, password in (text.partition(":") for text in arguments.user))
    plan = LoadPlan(arguments.port, users, arguments.clients, arguments.seconds, arguments.messages)
    asyncio.run(warmUp(plan.port, users))
    with loadGenerator(arguments.processes) as generator:
        for scenario in arguments.scenario or SCENARIOS:
            result = generator.run(plan, scenario)
            unit = "logins" if scenario == CHURN else "commands"
            print(
                f"{scenario}: {result.rate:.1f} {unit}/s ({result.operations} in {result.seconds:g} s, "
                f"{plan.clients} clients, {generator.processes} processes), {result.errors} errors"
                + (f" (first: {result.firstError})" if result.firstError else "")
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
