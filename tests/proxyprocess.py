"""
Run the proxy as a real C{twistd -n mailproxy} process (tests, benchmarks
and the demo share this).
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mailproxy.passwords import hashPassword

HOST = "127.0.0.1"
# How long a test waits for a log line or a reply.
LOG_WAIT = 20.0
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def freePort(host: str = HOST) -> int:
    """
    A TCP port on C{host} (127.0.0.1 by default) that nothing listens on
    right now.  For a listener on C{::} (both families) pass C{"::"}: a port
    free on 127.0.0.1 may be taken on an IPv6 address.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """
    Whether a TCP socket of this machine listens on C{port} (read from
    /proc/net/tcp and tcp6, so that checking makes no connection).
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = list(handle)[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return f"({path}: no log)\n"


class ProxyProcess:
    """
    C{twistd -n mailproxy --config CONFIG}, logging to C{logFile} (stdout
    when C{None}); stopped by PID.

    twistd runs in a session of its own, so the one signal that stops it is
    L{stop}'s: a terminal's Ctrl-C reaches only the parent, which then stops
    the proxy.  (A second stop signal while twistd shuts down makes it log a
    critical C{ReactorNotRunning} traceback.)

    @ivar twistd: the C{twistd} program run (by default the one beside this
        Python).
    """

    def __init__(self, configPath: str, logFile: str | None = None, twistd: str = TWISTD) -> None:
        self.configPath = configPath
        self.logFile = logFile
        self.twistd = twistd
        directory = os.path.dirname(configPath)
        self.stderrFile = os.path.join(directory, "twistd-stderr.log")
        command = [twistd, "-n", "--pidfile=", "mailproxy", "--config", configPath]
        if logFile is not None:
            command[2:2] = [f"--logfile={logFile}"]
        with open(self.stderrFile, "wb") as errors:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=errors if logFile is not None else None,
                stderr=subprocess.STDOUT if logFile is not None else None,
                cwd=directory,
                start_new_session=True,
            )

    def waitForPorts(self, ports: list[int], timeout: float = 20.0) -> None:
        """
        Return once every port listens and, with workers, every worker
        serves.  Nothing connects: a connection made while workers start
        would wait in the queue and be counted after the test began.

        @raise RuntimeError: with the proxy's output if it exits or is slow.
        """
        deadline = time.monotonic() + timeout
        for port in ports:
            self._waitUntil(lambda port=port: listening(port), f"proxy not listening on {port}", deadline, timeout)
        if self.workers > 1:
            self._waitUntil(lambda: "workers serving" in self.log(), "workers not serving", deadline, timeout)

    def _waitUntil(self, done: Callable[[], bool], what: str, deadline: float, timeout: float) -> None:
        while not done():
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} after {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    @property
    def workers(self) -> int:
        """
        How many worker processes the configuration asks for.
        """
        try:
            with open(self.configPath, "rb") as handle:
                server = tomllib.load(handle).get("server", {})
        except (OSError, tomllib.TOMLDecodeError):
            return 1
        return int(server.get("workers", os.cpu_count() or 1))

    def output(self) -> str:
        return tail(self.stderrFile) + (tail(self.logFile) if self.logFile else "")

    def log(self) -> str:
        assert self.logFile is not None
        with open(self.logFile, errors="replace") as handle:
            return handle.read()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """
        Stop twistd with one SIGTERM (SIGKILL after 10 s) and reap it.
        Idempotent.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def runningProxy(
    config: str, users: Mapping[str, str], ports: Sequence[int], prefix: str = "mp-proxy-"
) -> Iterator[tuple[str, ProxyProcess]]:
    """
    Run C{twistd -n mailproxy} in a new directory holding C{config} as
    C{mailproxy.toml} and a C{users} file (cheap scrypt hashes of the given
    passwords), logging to C{twistd.log} there.

    @return: a context giving the directory and the process once every one
        of C{ports} accepts connections; on leaving it the process is
        stopped and the directory removed.
    """
    directory = tempfile.mkdtemp(prefix=prefix)
    process = None
    try:
        with open(os.path.join(directory, "users"), "w") as handle:
            for name, password in users.items():
                handle.write(f"{name}:{hashPassword(password, log2N=10)}\n")
        configPath = os.path.join(directory, "mailproxy.toml")
        with open(configPath, "w") as handle:
            handle.write(config)
        process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
        process.waitForPorts(list(ports))
        yield directory, process
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(directory, ignore_errors=True)


def processTree(pid: int) -> list[int]:
    """
    C{pid} and its descendants (a proxy with workers: the supervisor and
    its worker processes).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # The command name may hold spaces: the fields after it.
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, waiting = [], [pid]
    while waiting:
        current = waiting.pop()
        tree.append(current)
        waiting.extend(children.get(current, ()))
    return tree


def residentKiB(pid: int) -> int:
    """
    The resident set (VmRSS) of process C{pid} and its descendants, in KiB.
    """
    total = 0
    for member in processTree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                total += next((int(line.split()[1]) for line in handle if line.startswith("VmRSS:")), 0)
        except OSError:
            if member == pid:
                raise AssertionError(f"no VmRSS for {pid}") from None
    return total


def openFiles(pid: int) -> int:
    """
    How many file descriptors process C{pid} and its descendants have open.
    """
    total = 0
    for member in processTree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            if member == pid:
                raise
    return total


@dataclass
class ProxyInFront:
    """
    A running proxy (L{runningProxy}) in front of a test's Dovecot, and
    what its tests ask of both: the proxy's log, IMAP logins, and the logins
    Dovecot's own log shows.
    """

    directory: str
    process: ProxyProcess
    ports: dict[str, int]
    dovecot: Any

    @property
    def configPath(self) -> str:
        return os.path.join(self.directory, "mailproxy.toml")

    def log(self) -> str:
        return self.process.log()

    def waitForLog(self, pattern: str, timeout: float = LOG_WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found or time.monotonic() > deadline:
                assert found, f"{pattern!r} not in log:\n{self.log()[-3000:]}"
                return found
            time.sleep(0.05)

    def imap(self) -> imaplib.IMAP4:
        return imaplib.IMAP4(HOST, self.ports["imap"], timeout=LOG_WAIT)

    def login(self, user: str, password: str) -> imaplib.IMAP4:
        client = self.imap()
        client.login(user, password)
        return client

    def awaitLogin(self, user: str, password: str, what: str, timeout: float = LOG_WAIT) -> None:
        """
        Log in (and out) as soon as the proxy lets C{user} in, within
        C{timeout} seconds; C{what} names what the login waits for.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.login(user, password).logout()
                return
            except imaplib.IMAP4.error:
                assert time.monotonic() < deadline, f"{what}: no login:\n" + self.log()[-4000:]
                time.sleep(0.2)

    def loginRefused(self, code: str, user: str, password: str) -> None:
        """
        Log in, expecting a refusal with response code C{code}.  A proxy
        that hangs instead fails this by the client's timeout.
        """
        client = self.imap()
        try:
            client.login(user, password)
        except imaplib.IMAP4.error as error:
            assert f"[{code}]" in str(error), error
        else:
            raise AssertionError(f"{user} logged in; [{code}] expected")
        client.logout()

    def dovecotLogins(self, user: str, service: str = "imap", method: str | None = None) -> int:
        """
        The logins of C{user} Dovecot's log shows, by C{service} (and SASL
        C{method}).
        """
        with open(self.dovecot.logFile, errors="replace") as handle:
            pattern = rf"{service}-login: (?:Info: )?Login: user=<{re.escape(user)}>"
            if method is not None:
                pattern += rf".*method={method}"
            return len(re.findall(pattern, handle.read()))
