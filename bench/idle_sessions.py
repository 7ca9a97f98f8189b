"""
Concurrent IDLE sessions through the proxy, measured in one run against the
direct upstream.

    .venv/bin/python -m bench.idle_sessions --sessions 2000

Starts a private Dovecot (limits raised for the run) and the proxy (twistd);
opens N sessions through the proxy (LOGIN, SELECT, IDLE) and a sample of
direct ones; reports the proxy's memory per idle session (PSS from /proc of
twistd and its workers, after minus before), their file descriptors, and how long an APPEND by
another session takes to reach idling clients as EXISTS, proxied versus
direct, over several rounds. Every wait is bounded; all connections stay on
127.0.0.1. The bench users file uses a cheap scrypt cost (ln=10) so that
2,000 logins do not measure hashing.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import statistics
import time

from bench.common import (
    HOST,
    freePort,
    percentile,
    privateDovecot,
    startProxy,
    treeMemoryKiB,
    treeOpenFiles,
    workDirectory,
    writeUsersFile,
)
from mailproxy.limits import LimitsConfig
from tests.dovecot import DovecotUpstream

USER, PASSWORD = "idler", "idlerpw"
DEADLINE = 600.0
# cheap enough that thousands of logins do not measure hashing
CHEAP_LOG2_N = 10


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, user: str = USER, password: str = PASSWORD) -> Session:
        reader, writer = await asyncio.open_connection(HOST, port)
        session = cls(reader, writer)
        await reader.readline()
        await session.command(b"a LOGIN %s %s" % (user.encode(), password.encode()))
        await session.command(b"s SELECT INBOX")
        writer.write(b"i IDLE\r\n")
        line = await reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE refused: {line!r}")
        return session

    async def command(self, line: bytes) -> None:
        tag = line.split(b" ", 1)[0]
        self.writer.write(line + b"\r\n")
        while True:
            response = await self.reader.readline()
            if not response:
                raise RuntimeError(f"closed during {line!r}")
            if response.startswith(tag + b" "):
                if b" OK" not in response:
                    raise RuntimeError(response.decode(errors="replace"))
                return

    async def waitForExists(self) -> float:
        while True:
            line = await self.reader.readline()
            if not line:
                raise RuntimeError("closed while idling")
            if line.endswith(b"EXISTS\r\n"):
                return time.perf_counter()

    def close(self) -> None:
        self.writer.close()


async def openMany(
    port: int, count: int, concurrency: int = 64, user: str = USER, password: str = PASSWORD
) -> list[Session]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Session:
        async with gate:
            return await Session.open(port, user, password)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def appendDirect(upstream: DovecotUpstream, number: int) -> float:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"], timeout=60)
    client.login(USER, PASSWORD)
    started = time.perf_counter()
    client.append("INBOX", None, None, b"Subject: wake up %d\r\n\r\nhello\r\n" % number)
    client.logout()
    return started


async def latencies(upstream: DovecotUpstream, groups: dict[str, list[Session]], rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in groups}
    for number in range(rounds):
        waiters = {
            name: [asyncio.ensure_future(s.waitForExists()) for s in sessions] for name, sessions in groups.items()
        }
        await asyncio.sleep(0.2)
        started = await asyncio.get_running_loop().run_in_executor(None, appendDirect, upstream, number)
        for name, tasks in waiters.items():
            arrived = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            results[name] += [(moment - started) * 1000 for moment in arrived]
        await asyncio.sleep(1.0)
    return results


def proxyConfig(port: int, upstreamPort: int, sessions: int, workers: int | None = None, backlog: int = 1024) -> str:
    """
    mailproxy in front of Dovecot with room for C{sessions} idle sessions
    from one address (and C{workers}, if given).
    """
    limit = sessions + 100
    server = f"[server]\nworkers = {workers}\n" if workers is not None else ""
    return f"""
{server}[auth]
users_file = "users"
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1:backlog={backlog}"
allow_plaintext_auth = true
[upstream.dovecot]
host = "127.0.0.1"
port = {upstreamPort}
[routing]
default_upstream = "dovecot"
[limits]
max_connections = {max(limit, LimitsConfig.maxConnections)}
max_connections_per_ip = {limit}
max_sessions_per_user = {limit}
"""


async def run(arguments: argparse.Namespace) -> None:
    sessions: list[Session] = []
    with (
        workDirectory("mp-bench-idle-") as directory,
        privateDovecot({USER: PASSWORD}, maxSessions=arguments.sessions + arguments.direct + 50) as upstream,
    ):
        writeUsersFile(directory, {USER: (PASSWORD, CHEAP_LOG2_N)})
        port = freePort()
        with startProxy(directory, proxyConfig(port, upstream.ports["imap"], arguments.sessions), [port]) as proxy:
            try:
                pid = proxy.process.pid
                await asyncio.sleep(0.5)
                beforePss = treeMemoryKiB(pid)
                started = time.perf_counter()
                proxied = await asyncio.wait_for(openMany(port, arguments.sessions), DEADLINE)
                opened = time.perf_counter() - started
                sessions += proxied
                direct = await asyncio.wait_for(openMany(upstream.ports["imap"], arguments.direct), DEADLINE)
                sessions += direct
                await asyncio.sleep(2.0)
                afterPss = treeMemoryKiB(pid)
                descriptors = treeOpenFiles(pid)
                measured = await latencies(upstream, {"direct": direct, "proxy": proxied}, arguments.rounds)
                alive = proxy.process.poll() is None
            finally:
                for session in sessions:
                    session.close()
    print(f"\n{arguments.sessions} IDLE sessions through the proxy (+{arguments.direct} direct), 2-core machine")
    print(f"opened in {opened:.1f} s ({arguments.sessions / opened:.0f} sessions/s incl. login, SELECT, IDLE)")
    print(
        f"proxy memory per idle session: PSS {(afterPss - beforePss) / arguments.sessions:.1f} KiB "
        f"(PSS of twistd and its workers {beforePss / 1024:.1f} -> {afterPss / 1024:.1f} MiB); "
        f"{descriptors} fds; alive: {alive}"
    )
    print(f"notification latency, APPEND by another session -> EXISTS, {arguments.rounds} rounds:")
    for name, values in measured.items():
        print(
            f"  {name:<12} n={len(values):>5}  p50 {statistics.median(values):7.2f} ms  "
            f"p95 {percentile(values, 0.95):7.2f} ms  max {max(values):7.2f} ms"
        )
    direct50 = statistics.median(measured["direct"])
    proxy50 = statistics.median(measured["proxy"])
    print(f"proxy p50 / direct p50: {proxy50 / direct50:.2f}x ({proxy50 - direct50:+.2f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--direct", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    asyncio.run(run(arguments))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
