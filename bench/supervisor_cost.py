"""
What sharing limits across workers costs a login: the supervisor's
bookkeeping asked over AMP from another process, against the same calls on
a L{Limits} in the worker's own process, and against a whole login to the
private Dovecot measured in the same run.

    .venv/bin/python -m bench.supervisor_cost [--logins 3000]

Each login is what a connection asks of the limits: admit, the login turn
(with the password check, here against an in-memory users table so that no
hashing is measured), the session, then ending the session and releasing
the connection.  The supervisor runs in a child process on one end of a
UNIX socket pair, as it does for real workers.  Loops are bounded by
C{--logins}; everything stays on this machine.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import signal
import socket
import statistics
import sys
import time
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock

from bench.common import HOST, privateDovecot
from mailproxy.limits import Gate, Limits, LimitsConfig
from mailproxy.sharedlimits import LimitsResponder, SharedLimits
from mailproxy.workerprotocol import Channel, OneProtocolFactory

USER, PASSWORD = "costuser", "costpw"
CONFIG = LimitsConfig(maxConnectionsPerIP=1_000_000, maxSessionsPerUser=1_000_000)


class Users:
    """
    A checker knowing one password, with no hashing.
    """

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        if credentials.password == PASSWORD.encode():
            return succeed(credentials.username.decode())
        return fail(UnauthorizedLogin())


def supervise(fd: int) -> None:
    """
    The supervisor's side, in this (child) process, until the worker hangs up.
    """
    from twisted.internet import reactor

    limits = Limits(CONFIG, reactor, failureDelay=0.0)

    class SupervisorEnd(Channel):
        def connectionLost(self, reason: Any = None) -> None:
            super().connectionLost(reason)
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping

    channel = SupervisorEnd(locator=LimitsResponder(limits, Users()))
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, OneProtocolFactory(channel))  # type: ignore[attr-defined]
    os.close(fd)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]  # SIGTERM ends it at once


def oneLogin(limits: Any, number: int) -> Deferred[None]:
    """
    A connection's calls on C{limits}, as the front door makes them.
    """
    gate = Gate(limits, f"192.0.2.{number % 250}:{1024 + number % 60000}", "imap")
    done: Deferred[None] = Deferred()

    def admitted(refusal: str | None) -> None:
        assert refusal is None, refusal
        attempt = gate.beginLogin(USER, PASSWORD.encode())
        attempt.turn.addCallback(turned, attempt)

    def turned(turn: Any, attempt: Any) -> None:
        verdict = attempt.verdict() if hasattr(attempt, "verdict") else succeed(USER)
        verdict.addCallback(checked, attempt)

    def checked(avatar: str, attempt: Any) -> None:
        attempt.succeeded()
        started = gate.startSession(avatar)
        if isinstance(started, Deferred):
            started.addCallback(sessionStarted)
        else:
            sessionStarted(started)

    def sessionStarted(started: bool) -> None:
        assert started
        gate.release()
        done.callback(None)

    admission = gate.admit()
    if isinstance(admission, Deferred):
        admission.addCallback(admitted)
    else:
        admitted(admission)
    return done


def timeLogins(limits: Any, count: int) -> float:
    """
    Seconds per login, C{count} logins one after another.
    """
    from twisted.internet import reactor

    started = time.perf_counter()
    outcome: list[Any] = []

    def run(number: int) -> None:
        if number == count:
            outcome.append(time.perf_counter() - started)
            reactor.stop()
            return
        oneLogin(limits, number).addCallback(lambda _: run(number + 1)).addErrback(outcome.append)

    reactor.callWhenRunning(run, 0)
    reactor.run()
    if not outcome or not isinstance(outcome[0], float):
        raise RuntimeError(f"logins failed: {outcome}")
    return float(outcome[0]) / count


def localCost(count: int) -> float:
    """
    Seconds per login on a Limits in this process (a check answered at once).
    """
    limits = Limits(CONFIG, Clock(), failureDelay=0.0)
    started = time.perf_counter()
    for number in range(count):
        oneLogin(limits, number)
    return (time.perf_counter() - started) / count


def dovecotLogin(port: int, rounds: int) -> float:
    """
    Median seconds of a whole login straight to Dovecot (connect, greeting,
    LOGIN, LOGOUT).
    """
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        client = imaplib.IMAP4(HOST, port, timeout=30)
        client.login(USER, PASSWORD)
        client.logout()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.supervisor_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=3000, help="logins to time (default 3000)")
    arguments = parser.parse_args(argv)
    count = max(10, min(arguments.logins, 100_000))
    with privateDovecot({USER: PASSWORD}) as dovecot:
        direct = dovecotLogin(dovecot.ports["imap"], 50)
    local = localCost(count)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        ours.close()
        try:
            supervise(os.dup(theirs.fileno()))
        finally:
            os._exit(0)
    theirs.close()
    from twisted.internet import reactor

    channel = Channel()
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocolFactory(channel))  # type: ignore[attr-defined]
    ours.close()
    try:
        remote = timeLogins(SharedLimits(channel, failureDelay=0.0), count)
    finally:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
    print(f"{count} logins' limits bookkeeping, one after another (Python {sys.version.split()[0]}):")
    print(f"  in the worker's own process:        {local * 1e6:8.1f} us per login")
    print(f"  asked of the supervisor over AMP:   {remote * 1e6:8.1f} us per login")
    print(f"  a whole login straight to Dovecot:  {direct * 1e6:8.1f} us (median of 50)")
    print(f"  the supervisor adds {(remote - local) * 1e6:.1f} us, {(remote - local) / direct:.1%} of a direct login")
    return 0


if __name__ == "__main__":
    sys.exit(main())
