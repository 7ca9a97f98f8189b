"""
Pieces the benchmarks share: a private Dovecot with a seeded mailbox, the
proxy as a real twistd process, a raw IMAP client that costs the same for
every target, process memory from /proc, percentiles and tables.

Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, processTree

__all__ = [
    "PeerProcess",
    "greets",
    "waitForGreeting",
    "HOST",
    "PASSWORD",
    "USER",
    "ProxyProcess",
    "RawClient",
    "freePort",
    "markdownTable",
    "memoryKiB",
    "percentile",
    "privateDovecot",
    "raiseFileLimit",
    "seed",
    "startProxy",
    "textTable",
    "treeCpuSeconds",
    "treeMemoryKiB",
    "treeOpenFiles",
    "processTree",
    "workDirectory",
    "writeUsersFile",
]

USER, PASSWORD = "bench", "benchpw"
TAG = b"Zq9"
SOCKET_TIMEOUT = 60.0
# How long a peer (nginx, haproxy) may take to greet after starting.
PEER_START_TIMEOUT = 10.0
PEER_STOP_TIMEOUT = 10.0


class RawClient:
    """
    A minimal IMAP client that reads whole responses without parsing them,
    so the client costs the same for every target.
    """

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.counter = 0
        self.buffer = b""
        self._readLine()

    def _readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed before the greeting")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _nextTag(self) -> bytes:
        self.counter += 1
        return TAG + b"%d" % self.counter

    def command(self, text: bytes) -> int:
        """
        Send a command, wait for its tagged OK; return the octets received.
        """
        tag = self._nextTag()
        self.sock.sendall(tag + b" " + text + b"\r\n")
        return self._waitFor(tag)

    def pipeline(self, commands: Sequence[bytes]) -> int:
        """
        Send all C{commands} in one write and wait for the last tagged OK
        (a server answers pipelined commands in order here: all are FETCH or
        NOOP); return the octets received.
        """
        tags = [self._nextTag() for _ in commands]
        self.sock.sendall(b"".join(tag + b" " + text + b"\r\n" for tag, text in zip(tags, commands, strict=True)))
        return self._waitFor(tags[-1])

    def _waitFor(self, tag: bytes) -> int:
        marker = b"\r\n" + tag + b" "
        data = bytearray(self.buffer)
        self.buffer = b""
        searched = 0
        start = -1
        while True:
            # Search only what arrived since the last look: a rescan of the
            # whole buffer per TLS record would dominate the measurement.
            if start < 0 and data.startswith(tag + b" "):
                start = 0
            elif start < 0:
                index = data.find(marker, max(0, searched - len(marker)))
                start = -1 if index < 0 else index + 2
            if start >= 0:
                end = data.find(b"\r\n", start)
                if end >= 0:
                    status = bytes(data[start:end])
                    if b" OK" not in status[: len(tag) + 4]:
                        raise RuntimeError(status.decode(errors="replace"))
                    self.buffer = bytes(data[end + 2 :])
                    return end + 2
            searched = len(data)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk

    def close(self) -> None:
        self.sock.close()


def messageBody(size: int) -> bytes:
    """
    C{size} octets of random hex text in 76-character lines.
    """
    body = os.urandom(size // 2 + 1).hex().encode()[:size]
    return b"\r\n".join(body[index : index + 76] for index in range(0, len(body), 76))


def seed(
    port: int,
    count: int,
    size: int,
    mailbox: bytes = b"INBOX",
    user: str = USER,
    password: str = PASSWORD,
    lastLine: bytes = b".dot line",
) -> None:
    """
    APPEND C{count} messages with C{size}-octet bodies and C{lastLine}
    (by default one that POP3 must dot-stuff) to C{mailbox} (created unless
    it is INBOX), directly on the upstream at C{port}.
    """
    client = RawClient(port)
    client.command(b"LOGIN %s %s" % (user.encode(), password.encode()))
    if mailbox.upper() != b"INBOX":
        client.command(b"CREATE " + mailbox)
    lines = messageBody(size)
    for number in range(count):
        message = b"Subject: bench %d\r\nFrom: bench@example.test\r\n\r\n%s\r\n%s\r\n" % (number, lines, lastLine)
        client.command(b"APPEND %s {%d+}\r\n%s" % (mailbox, len(message), message))
    client.command(b"LOGOUT")
    client.close()


@contextlib.contextmanager
def privateDovecot(users: dict[str, str], maxSessions: int = 1000) -> Iterator[DovecotUpstream]:
    """
    A running private Dovecot with C{users}; stopped and removed afterwards.

    Its master stops its children on SIGTERM, but is killed if that takes
    more than a few seconds (thousands of sessions): then the children it
    had are ended here, each by the PID (and start time) recorded just
    before the stop.
    """
    upstream = DovecotUpstream(maxSessions=maxSessions)
    upstream.addUsers(users)
    try:
        upstream.start()
        yield upstream
    finally:
        master = upstream.pid
        children = [(pid, _startTime(pid)) for pid in processTree(master)[1:]] if master is not None else []
        upstream.stop()
        _endSurvivors(children)
        shutil.rmtree(upstream.baseDir, ignore_errors=True)


SURVIVOR_GRACE = 10.0


def _startTime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _endSurvivors(processes: Sequence[tuple[int, str | None]]) -> None:
    """
    Wait (bounded) for C{processes} to exit; SIGKILL those still there that
    are the same processes (same start time), not a reused PID.
    """
    deadline = time.monotonic() + SURVIVOR_GRACE
    remaining = [(pid, started) for pid, started in processes if started is not None]
    while remaining and time.monotonic() < deadline:
        remaining = [(pid, started) for pid, started in remaining if _startTime(pid) == started]
        if remaining:
            time.sleep(0.2)
    for pid, started in remaining:
        if _startTime(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def raiseFileLimit(wanted: int) -> str:
    """
    Raise this process's RLIMIT_NOFILE, soft and hard, to at least
    C{wanted} where allowed (root may raise the hard limit), so everything
    it starts afterwards inherits it; return a sentence saying what was
    done.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return f"File descriptors: RLIMIT_NOFILE {soft} (soft) / {hard} (hard) was enough for {wanted}."
    newHard = max(hard, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, newHard))
    except (ValueError, OSError):
        # not permitted (no CAP_SYS_RESOURCE): the soft limit can still go
        # up to the hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        raised = f"raised its soft limit from {soft} to {hard}" if soft < hard else f"ran with {hard}"
        return (
            f"File descriptors: wanted {wanted}, but raising the hard limit ({hard}) is not permitted here; "
            f"the bench {raised}, which everything it starts inherits (each process stays under it: the proxy's "
            "descriptors are spread over its workers)."
        )
    return (
        f"File descriptors: the bench raised its RLIMIT_NOFILE from {soft} / {hard} (soft / hard) to "
        f"{wanted} / {newHard} before starting Dovecot and mailproxy, which inherit it."
    )


@contextlib.contextmanager
def workDirectory(prefix: str) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def writeUsersFile(directory: str, users: dict[str, tuple[str, int]]) -> str:
    """
    Write the proxy's users file: name -> (password, scrypt log2 N).
    """
    path = os.path.join(directory, "users")
    with open(path, "w") as handle:
        for name, (password, log2N) in users.items():
            handle.write(f"{name}:{hashPassword(password, log2N=log2N)}\n")
    return path


@contextlib.contextmanager
def startProxy(directory: str, config: str, ports: Sequence[int]) -> Iterator[ProxyProcess]:
    """
    Write C{config} to C{directory}/mailproxy.toml, run twistd on it until
    every port in C{ports} accepts, and stop it (by PID) afterwards.
    """
    path = os.path.join(directory, "mailproxy.toml")
    with open(path, "w") as handle:
        handle.write(config)
    proxy = ProxyProcess(path, os.path.join(directory, "twistd.log"))
    try:
        proxy.waitForPorts(list(ports))
        yield proxy
    finally:
        proxy.stop()


def memoryKiB(pid: int) -> tuple[int, int]:
    """
    (PSS, RSS) of a process in KiB.
    """
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            fields = line.split()
            if fields[0] in ("Pss:", "Rss:"):
                values[fields[0]] = int(fields[1])
    return values["Pss:"], values["Rss:"]


def treeMemoryKiB(root: int) -> int:
    """
    The summed PSS (KiB) of a process and all its descendants: PSS shares
    common pages out, so the sum is the tree's real footprint.
    """
    total = 0
    for pid in processTree(root):
        with contextlib.suppress(OSError, KeyError):
            total += memoryKiB(pid)[0]
    return total


def treeOpenFiles(root: int) -> int:
    """
    The file descriptors open in a process and all its descendants.
    """
    total = 0
    for pid in processTree(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def treeCpuSeconds(root: int, *, reaped: bool = False) -> float:
    """
    CPU time of a process and its live descendants, all threads, in
    seconds with nanosecond resolution (/proc/PID/task/TID/schedstat; the
    clock-tick counters in /proc/PID/stat are too coarse for a 25 ms FETCH).

    @param reaped: also count the descendants that have exited and been
        waited for (Dovecot's imap process of each session, in login
        churn), from the clock-tick counters C{cutime} and C{cstime}.
    """
    nanoseconds = 0
    ticks = 0
    for pid in processTree(root):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                        nanoseconds += int(handle.read().split()[0])
            if reaped:
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as handle:
                    # after the command name, which may hold spaces: fields 16 and 17 of proc(5)
                    fields = handle.read().rsplit(")", 1)[1].split()
                    ticks += int(fields[13]) + int(fields[14])
    return nanoseconds / 1e9 + ticks / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def textTable(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdownTable(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def greets(port: int) -> bool:
    """
    Whether an IMAP server on C{port} of the loopback address greets.
    """
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            return sock.recv(64).startswith(b"* OK")
    except OSError:
        return False


def waitForGreeting(
    process: subprocess.Popen[bytes], port: int, name: str, output: Callable[[], str], stop: Callable[[], None]
) -> None:
    """
    Wait until the peer C{process} greets on C{port}; stop it and raise
    with its C{output} if it exits or takes longer than
    L{PEER_START_TIMEOUT}.
    """
    deadline = time.monotonic() + PEER_START_TIMEOUT
    while not greets(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"{name} did not start:\n{output()}")
        time.sleep(0.05)


class PeerProcess:
    """
    A peer proxy the benchmark runs (nginx, haproxy): its process tree's
    memory and CPU, and a stop by PID.

    @ivar process: the peer's main process, once started.
    """

    process: subprocess.Popen[bytes] | None = None

    def memoryKiB(self) -> int:
        """
        The summed PSS of the peer's processes.
        """
        assert self.process is not None
        return treeMemoryKiB(self.process.pid)

    def cpuSeconds(self) -> float:
        assert self.process is not None
        return treeCpuSeconds(self.process.pid)

    def stopProcess(self) -> None:
        """
        SIGTERM (both peers' fast stop: open sessions are cut), then
        SIGKILL if it takes longer than L{PEER_STOP_TIMEOUT}.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=PEER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
