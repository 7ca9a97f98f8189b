"""
The proxy's own work per relayed command, per login and per round of the mixed load, counted in
instructions by valgrind's callgrind: within about 5% for the same code
whatever else the machine is doing, where the timed figures of C{python -m
bench} move by several points between runs.

    python -m bench.instructions        (valgrind: apt install valgrind)

Each target runs under callgrind four times against one private Dovecot:
a few logins, FETCHes and rounds of the mixed load, then more FETCHes, more
logins, more rounds.  The differences between the runs' totals, divided by
the extra work, are the instructions one FETCH (one at a time, C{UID FETCH
n (BODY.PEEK[])} of a 2 kB message), one login (connect, C{LOGIN},
C{SELECT}, C{FETCH 1:4 (FLAGS)}, C{LOGOUT}) and one round of the mixed
load's five commands (L{bench.load.mixedCommands}, on an INBOX of 20
messages of 8 kB, as the load's users have) cost the target's processes in user space: start-up
and shut-down cancel out.  The targets are mailproxy (twistd, C{workers = 1};
and C{workers = 2}, the supervisor and both workers counted, which is what
sharing limits across workers costs) and the two Python forwarders of
L{bench.forwarder}, which relay octets
without reading them: the floor for a proxy on Twisted's reactor and for
one in plain Python.  The kernel's share (system calls, loopback TCP) is
not counted: it is about the same for every target.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bench.common import (
    HOST,
    PASSWORD,
    USER,
    RawClient,
    freePort,
    markdownTable,
    privateDovecot,
    seed,
    workDirectory,
    writeUsersFile,
)
from bench.load import LoadPlan, mixedCommands
from tests.proxyprocess import TWISTD, tail

SMALL_MAILBOX = b"Small"
MESSAGES = 200
MESSAGE_SIZE = 2000
# Under callgrind a Python process starts some fifty times slower.
START_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0
CHEAP_LOG2_N = 1

PROXY_CONFIG = """
[server]
workers = {workers}
[auth]
users_file = "users"
[[listener]]
name = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
[upstream.imap]
host = "127.0.0.1"
port = {upstream}
[routing]
default_upstream = "imap"
"""


@dataclass(frozen=True)
class Work:
    """
    What one run under callgrind does: C{fetches} FETCHes in one session,
    then C{logins} logins one after the other, then C{rounds} rounds of
    the mixed load's commands (L{bench.load.mixedCommands}) in one session.
    """

    fetches: int
    logins: int
    rounds: int = 0


@dataclass(frozen=True)
class Counts:
    """
    Instructions per FETCH, per login and per mixed-load round of one
    target.
    """

    perFetch: float
    perLogin: float
    perRound: float


def findValgrind() -> str | None:
    return shutil.which("valgrind")


def fetches(port: int, count: int) -> None:
    client = RawClient(port)
    try:
        client.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        client.command(b"EXAMINE " + SMALL_MAILBOX)
        for number in range(count):
            client.command(b"UID FETCH %d (BODY.PEEK[])" % (number % MESSAGES + 1))
        client.command(b"LOGOUT")
    finally:
        client.close()


def logins(port: int, count: int) -> None:
    for _ in range(count):
        client = RawClient(port)
        try:
            client.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
            client.command(b"SELECT " + SMALL_MAILBOX)
            client.command(b"FETCH 1:4 (FLAGS)")
            client.command(b"LOGOUT")
        finally:
            client.close()


# The mixed load's rounds (bench.load) on an INBOX like its users'.
MIXED_MESSAGES = 20
MIXED_MESSAGE_SIZE = 8000


def mixedRounds(port: int, count: int) -> None:
    plan = LoadPlan(port, ((USER, PASSWORD),), messages=MIXED_MESSAGES)
    client = RawClient(port)
    try:
        client.command(b"LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        for turn in range(count):
            for command in mixedCommands(plan, 0, turn):
                client.command(command)
        client.command(b"LOGOUT")
    finally:
        client.close()


def _waitForPort(process: subprocess.Popen[bytes], port: int, output: str) -> None:
    """
    Wait until the target greets on C{port}.  Not L{bench.common.greets}:
    it gives up on a greeting after a second and connects again, and under
    callgrind a greeting can take longer, so the number of connections (and
    the instructions they cost) would depend on the machine's speed; here
    the first connection accepted waits for its greeting.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            RawClient(port).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the target did not start under callgrind:\n{tail(output)}") from None
            time.sleep(0.2)


class IncompleteProfile(Exception):
    """
    A profile holds no totals: its process did not end by itself (it was
    killed) and callgrind never wrote them.  Counted as nothing, it would
    throw every difference with that run off by the whole run.
    """


def totalInstructions(outputs: str) -> int:
    total = 0
    paths = glob.glob(outputs)
    if not paths:
        raise IncompleteProfile(f"no profile matches {outputs}")
    for path in paths:
        with open(path) as handle:
            for line in handle:
                if line.startswith("totals:"):
                    total += int(line.split()[1])
                    break
            else:
                raise IncompleteProfile(f"{path} has no totals (its process was killed before callgrind wrote them)")
    return total


@contextlib.contextmanager
def _underCallgrind(
    command: Sequence[str], directory: str, cwd: str, port: int, children: bool = False
) -> Iterator[str]:
    """
    Run C{command} under callgrind until it serves C{port}; stop it with
    SIGINT (by PID) afterwards, and give the pattern of its profiles (one
    a process: with C{children}, the processes it starts are counted too).
    """
    valgrind = findValgrind()
    assert valgrind is not None
    os.makedirs(directory)
    outputs = os.path.join(directory, "callgrind.%p")
    log = os.path.join(directory, "valgrind.log")
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [valgrind, "--tool=callgrind", f"--trace-children={'yes' if children else 'no'}"]
            + [f"--callgrind-out-file={outputs}", *command],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _waitForPort(process, port, log)
        yield outputs.replace("%p", "*")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measureTarget(name: str, directory: str, upstreamPort: int, runs: Sequence[Work]) -> list[int]:
    """
    The total instructions of target C{name} for each of C{runs}.
    """
    totals = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for index, work in enumerate(runs):
        port = freePort()
        runDirectory = os.path.join(directory, f"{name}-{index}")
        if name in WORKERS:
            os.makedirs(runDirectory)
            writeUsersFile(runDirectory, {USER: (PASSWORD, CHEAP_LOG2_N)})
            with open(os.path.join(runDirectory, "mailproxy.toml"), "w") as handle:
                handle.write(PROXY_CONFIG.format(workers=WORKERS[name], port=port, upstream=upstreamPort))
            command = [sys.executable, TWISTD, "-n", "--pidfile=", "--logfile=twistd.log"]
            command += ["mailproxy", "--config", "mailproxy.toml"]
            cwd = runDirectory
            profiles = os.path.join(runDirectory, "profiles")
        else:
            command = [sys.executable, "-m", "bench.forwarder", "--engine", name, "--route", f"{port}:{upstreamPort}"]
            cwd = root
            profiles = runDirectory
        with _underCallgrind(command, profiles, cwd, port, children=WORKERS.get(name, 1) > 1) as outputs:
            fetches(port, work.fetches)
            logins(port, work.logins)
            mixedRounds(port, work.rounds)
        totals.append(totalInstructions(outputs))
    return totals


def counts(totals: Sequence[int], runs: Sequence[Work]) -> Counts:
    """
    Per FETCH, per login and per mixed round, from four runs: the base,
    more FETCHes, more logins, more rounds.
    """
    base, moreFetches, moreLogins, moreRounds = totals
    return Counts(
        (moreFetches - base) / (runs[1].fetches - runs[0].fetches),
        (moreLogins - base) / (runs[2].logins - runs[0].logins),
        (moreRounds - base) / (runs[3].rounds - runs[0].rounds),
    )


# mailproxy with one process, and with two workers and their supervisor
# (every process counted: the workers' questions and their answers).
WORKERS = {"mailproxy": 1, "mailproxy-workers": 2}
LABELS = {
    "mailproxy": "mailproxy (w=1)",
    "mailproxy-workers": "mailproxy (w=2, all processes)",
    "twisted": "Twisted forwarder",
    "epoll": "epoll forwarder",
}
TARGETS = tuple(LABELS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fetches", type=int, default=1000, help="extra FETCHes in the second run")
    parser.add_argument("--logins", type=int, default=200, help="extra logins in the third run")
    parser.add_argument("--rounds", type=int, default=200, help="extra mixed-load rounds in the fourth run")
    parser.add_argument("--target", choices=TARGETS, action="append", help="only these (default: all)")
    arguments = parser.parse_args(argv)
    if findValgrind() is None:
        print("valgrind is not installed (apt install valgrind): no instruction counts.")
        return 0
    base = Work(fetches=100, logins=20, rounds=20)
    runs = [
        base,
        Work(base.fetches + arguments.fetches, base.logins, base.rounds),
        Work(base.fetches, base.logins + arguments.logins, base.rounds),
        Work(base.fetches, base.logins, base.rounds + arguments.rounds),
    ]
    results: dict[str, Counts] = {}
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(workDirectory("mp-instructions-"))
        upstream = stack.enter_context(privateDovecot({USER: PASSWORD}))
        seed(upstream.ports["imap"], MESSAGES, MESSAGE_SIZE, SMALL_MAILBOX)
        seed(upstream.ports["imap"], MIXED_MESSAGES, MIXED_MESSAGE_SIZE)
        for name in arguments.target or TARGETS:
            print(f"{LABELS[name]}: four runs under callgrind on {HOST} ...", flush=True)
            results[name] = counts(measureTarget(name, directory, upstream.ports["imap"], runs), runs)
    floor = results.get("twisted")
    rows = []
    for name, result in results.items():
        row = [LABELS[name]]
        for value, floorValue in (
            (result.perFetch, floor and floor.perFetch),
            (result.perLogin, floor and floor.perLogin),
            (result.perRound, floor and floor.perRound),
        ):
            row.append(f"{value:,.0f}" + ("" if not floorValue else f" ({value / floorValue:.2f}x)"))
        rows.append(row)
    header = ["target"] + [
        f"instructions per {what} (x Twisted forwarder)" for what in ("FETCH", "login", "mixed-load round")
    ]
    print(markdownTable(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
