"""
A bounded soak: 200 concurrent clients doing mixed IMAP and POP3 work
through a real C{twistd} proxy in front of a private Dovecot, with zero
protocol errors allowed, flat memory and no leaked file descriptors.

The clients (see L{tests.soakdriver}) run on one asyncio loop in the test
process: 110 IMAP clients, 45 POP3 clients relayed to Dovecot's POP3 and 45
POP3 clients bridged to IMAP, over 40 users, each session on a random
plain, STARTTLS/STLS or implicit-TLS listener; the upstream hop uses plain,
STARTTLS and implicit TLS too, and half of the IMAP users have a filter
chain (the filtered relay) while the others take the fast path.

C{MAILPROXY_SOAK_SECONDS} sets how long the clients run (default 60)::

    MAILPROXY_SOAK_SECONDS=300 PYTHONPATH=$PWD .venv/bin/python -m pytest -s -p no:cacheprovider tests/test_soak.py

With C{-s} the figures are printed: operations by kind, sessions, the
proxy's RSS and file descriptors.
"""

from __future__ import annotations

import asyncio
import glob
import imaplib
import os
import poplib
import re
import shutil
import ssl
import statistics
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailproxy.passwords import hashPassword
from tests.conftest import seedMessages
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, openFiles, residentKiB
from tests.soakdriver import (
    Endpoint,
    Mailbox,
    Message,
    SoakContext,
    bridgeClient,
    imapClient,
    pop3RelayClient,
)

SOAK_SECONDS = float(os.environ.get("MAILPROXY_SOAK_SECONDS", "60"))
# A read that takes longer than this is a protocol error (the machine is
# shared with other test runs, so it is generous; a hang still fails).
OPERATION_TIMEOUT = 30.0
# Clients finish the round they are in after the deadline; beyond this the
# soak counts as hung.
FINISH_TIMEOUT = 120.0
CLIENTS_PER_USER = 5
IMAP_USERS = [f"soakimap{index:02d}" for index in range(22)]
RELAY_USERS = [f"soakrelay{index}" for index in range(9)]
BRIDGE_USERS = [f"soakbridge{index}" for index in range(9)]
IMAP_UPSTREAMS = ("imap-plain", "imap-starttls", "imap-implicit")
RELAY_UPSTREAMS = ("pop3-plain", "pop3-stls", "pop3-implicit")

# Memory.  The proxy's RSS climbs while the thread pool (scrypt checks) and
# the allocator's arenas reach the high-water mark of 200 concurrent
# sessions, then levels off: measured on 2 cores, 50 MB idle, 105 MB at 30 s,
# 113 MB at 90 s, 116 MB at 180 s, at a constant ~30 sessions/s.  So the
# first half of the run is warm-up; after it the median RSS of the last third
# may exceed that of the first third by at most 10% (or 4 MiB).  At the
# default 60 s that catches a leak of about 15 kB per session; at 300 s,
# about 3 kB.
WARMUP_FRACTION = 0.5
RSS_SAMPLE_INTERVAL = 0.5
RSS_GROWTH_LIMIT_KIB = 4096
RSS_GROWTH_LIMIT_FRACTION = 0.10


def password(user: str) -> str:
    return f"{user}-pw"


def soakMessages() -> list[tuple[str, bytes]]:
    """
    (seed tag, message): the shared seed's small messages (dot-stuffing,
    8-bit headers and body, multipart/alternative) and a 100 kB attachment,
    each with an X-Soak-Seed header to SEARCH for.
    """
    plain, eightBit, _, alternative = seedMessages()
    attachment = MIMEMultipart("mixed")
    attachment["From"] = "Soak <soak@example.test>"
    attachment["Subject"] = "medium attachment"
    attachment.attach(MIMEText("See attachment.\n", "plain", "utf-8"))
    attachment.attach(MIMEApplication(bytes((index * 31) % 256 for index in range(75_000)), Name="soak.bin"))
    medium = attachment.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    seeded = []
    for index, message in enumerate((plain, eightBit, alternative, medium), 1):
        tag = f"seed{index}end"
        seeded.append((tag, f"X-Soak-Seed: {tag}\r\n".encode() + message))
    return seeded


def seedMailbox(upstream: DovecotUpstream, user: str, messages: list[tuple[str, bytes]]) -> Mailbox:
    """
    APPEND the seed directly to Dovecot; UIDs and UIDVALIDITY from
    APPENDUID, the bridge's UIDLs from them.
    """
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    try:
        client.login(user, password(user))
        seeded = []
        uidvalidity = 0
        for tag, data in messages:
            status, detail = client.append("INBOX", None, None, data)
            match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", detail[0] or b"")
            assert status == "OK" and match is not None, detail
            uidvalidity = int(match.group(1))
            seeded.append(Message(int(match.group(2)), data, tag))
    finally:
        client.logout()
    uidls = [b"%08x%08x" % (message.uid, uidvalidity) for message in seeded]
    return Mailbox(user, password(user), uidvalidity, seeded, uidls)


def dovecotUidls(upstream: DovecotUpstream, user: str) -> list[bytes]:
    """
    The UIDLs Dovecot's own POP3 gives (what the relay must pass on).
    """
    client = poplib.POP3(HOST, upstream.ports["pop3"], timeout=10)
    try:
        client.user(user)
        client.pass_(password(user))
        _, lines, _ = client.uidl()
        return [line.split()[1] for line in lines]
    finally:
        client.quit()


def inboxUids(upstream: DovecotUpstream, user: str) -> list[int]:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    try:
        client.login(user, password(user))
        client.select("INBOX", readonly=True)
        _, data = client.uid("SEARCH", "ALL")
        return [int(uid) for uid in (data[0] or b"").split()]
    finally:
        client.logout()


@dataclass
class SoakSetup:
    upstream: DovecotUpstream
    mailboxes: dict[str, Mailbox]


@pytest.fixture(scope="module")
def soakDovecot() -> Iterator[SoakSetup]:
    """
    A Dovecot of its own (the soak's load and mailboxes stay apart from the
    other tests), every soak user seeded.
    """
    # 200 sessions and their logins stay well below the process and client
    # limits DovecotUpstream sets by default (maxSessions=1000).
    upstream = DovecotUpstream()
    users = IMAP_USERS + RELAY_USERS + BRIDGE_USERS
    upstream.addUsers({user: password(user) for user in users})
    upstream.start()
    try:
        messages = soakMessages()
        mailboxes = {user: seedMailbox(upstream, user, messages) for user in users}
        for user in RELAY_USERS:
            mailboxes[user].uidls = dovecotUidls(upstream, user)
        yield SoakSetup(upstream, mailboxes)
    finally:
        upstream.stop()
        shutil.rmtree(upstream.baseDir, ignore_errors=True)


SOAK_CONFIG = """
[auth]
users_file = "users"
failure_delay = 0.3

[limits]
# 200 clients from 127.0.0.1, five per user (the defaults allow 100 per IP)
max_connections_per_ip = 1000
max_sessions_per_user = 50

[filters.policy]
type = "policy"
deny = ["SETACL"]

[filters.caps]
type = "capabilities"
add = ["X-SOAK"]

{listeners}

[upstream.imap-plain]
host = "127.0.0.1"
port = {imap}

[upstream.imap-starttls]
host = "localhost"
port = {imap}
tls = "starttls"
ca_file = "{ca}"

[upstream.imap-implicit]
host = "127.0.0.1"
port = {imaps}
tls = "implicit"
ca_file = "{ca}"

[upstream.pop3-plain]
protocol = "pop3"
host = "127.0.0.1"
port = {pop3}

[upstream.pop3-stls]
protocol = "pop3"
host = "localhost"
port = {pop3}
tls = "starttls"
ca_file = "{ca}"

[upstream.pop3-implicit]
protocol = "pop3"
host = "localhost"
port = {pop3s}
tls = "implicit"
ca_file = "{ca}"

[routing]
default_upstream = "imap-plain"
{routes}
"""

LISTENER = """
[[listener]]
name = "{name}"
protocol = "{protocol}"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "{tls}"
allow_plaintext_auth = true
certificate = "{cert}"
private_key = "{key}"
"""


def routes() -> str:
    """
    Every upstream TLS mode for each kind of user; half of the IMAP users
    (and some POP3 ones) with a filter chain.
    """
    lines = []
    for index, user in enumerate(IMAP_USERS):
        filters = '["policy", "caps"]' if index % 2 else "[]"
        upstream = IMAP_UPSTREAMS[index % len(IMAP_UPSTREAMS)]
        lines.append(f'[routing.users.{user}]\nupstream = "{upstream}"\nfilters = {filters}\n')
    for index, user in enumerate(RELAY_USERS):
        filters = '["policy"]' if index % 2 else "[]"
        lines.append(
            f'[routing.users.{user}]\nupstream = "{RELAY_UPSTREAMS[index % len(RELAY_UPSTREAMS)]}"\nfilters = {filters}\n'
        )
    for index, user in enumerate(BRIDGE_USERS):
        filters = '["policy"]' if index % 2 else "[]"
        lines.append(
            f'[routing.users.{user}]\nupstream = "{IMAP_UPSTREAMS[index % len(IMAP_UPSTREAMS)]}"\nfilters = {filters}\n'
        )
    return "\n".join(lines)


@dataclass
class SoakProxy:
    imap: list[Endpoint]
    pop3: list[Endpoint]
    process: ProxyProcess


@pytest.fixture(scope="module")
def soakProxy(soakDovecot: SoakSetup) -> Iterator[SoakProxy]:
    upstream = soakDovecot.upstream
    directory = tempfile.mkdtemp(prefix="mp-soak-")
    with open(os.path.join(directory, "users"), "w") as handle:
        for user in soakDovecot.mailboxes:
            handle.write(f"{user}:{hashPassword(password(user), log2N=10)}\n")
    imap = [Endpoint(freePort(), tls) for tls in ("plain", "starttls", "implicit")]
    pop3 = [Endpoint(freePort(), tls) for tls in ("plain", "starttls", "implicit")]
    listeners = "".join(
        LISTENER.format(
            name=f"{protocol}-{endpoint.tls}",
            protocol=protocol,
            port=endpoint.port,
            tls=endpoint.tls,
            cert=upstream.certFile,
            key=upstream.keyFile,
        )
        for protocol, endpoints in (("imap", imap), ("pop3", pop3))
        for endpoint in endpoints
    )
    configPath = os.path.join(directory, "mailproxy.toml")
    with open(configPath, "w") as handle:
        handle.write(
            SOAK_CONFIG.format(
                listeners=listeners,
                imap=upstream.ports["imap"],
                imaps=upstream.ports["imaps"],
                pop3=upstream.ports["pop3"],
                pop3s=upstream.ports["pop3s"],
                ca=upstream.caFile,
                routes=routes(),
            )
        )
    process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
    try:
        process.waitForPorts([endpoint.port for endpoint in imap + pop3])
        yield SoakProxy(imap, pop3, process)
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


def settledFiles(pid: int, atMost: int | None = None, timeout: float = 20.0) -> int:
    """
    The proxy's descriptor count once it holds still for a second (and is
    down to C{atMost}, if given), or after C{timeout} seconds: closing is
    asynchronous.
    """
    deadline = time.monotonic() + timeout
    count = openFiles(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        previous, count = count, openFiles(pid)
        if count == previous and (atMost is None or count <= atMost):
            break
    return count


def fullLog(process: ProxyProcess) -> str:
    """
    The proxy's log including the files twistd rotated away (every 1 MB).
    """
    assert process.logFile is not None
    rotated = sorted(glob.glob(process.logFile + ".*"), key=lambda path: int(path.rsplit(".", 1)[1]))
    texts = []
    for path in reversed(rotated):
        with open(path, errors="replace") as handle:
            texts.append(handle.read())
    return "".join(texts) + process.log()


@dataclass
class SoakResult:
    context: SoakContext
    rss: list[tuple[float, int]]
    duration: float


async def soak(proxy: SoakProxy, mailboxes: dict[str, Mailbox], caFile: str, seconds: float) -> SoakResult:
    context = SoakContext(
        imapEndpoints=proxy.imap,
        pop3Endpoints=proxy.pop3,
        sslContext=ssl.create_default_context(cafile=caFile),
        deadline=time.monotonic() + seconds,
        timeout=OPERATION_TIMEOUT,
    )
    clients = []
    for kind, users in ((imapClient, IMAP_USERS), (pop3RelayClient, RELAY_USERS), (bridgeClient, BRIDGE_USERS)):
        for user in users:
            for number in range(CLIENTS_PER_USER):
                name = f"{user}/{number}"
                clients.append(kind(context, name, mailboxes[user], zlib.crc32(name.encode())))
    assert len(clients) == 200
    rss: list[tuple[float, int]] = []
    pid = proxy.process.process.pid
    started = time.monotonic()

    async def sample() -> None:
        while True:
            rss.append((time.monotonic() - started, residentKiB(pid)))
            await asyncio.sleep(RSS_SAMPLE_INTERVAL)

    sampler = asyncio.ensure_future(sample())
    try:
        await asyncio.wait_for(asyncio.gather(*clients), seconds + FINISH_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"clients still busy {FINISH_TIMEOUT:g} s after the end: {context.errors[:20]}") from None
    finally:
        sampler.cancel()
    return SoakResult(context, rss, time.monotonic() - started)


def rssThirds(rss: list[tuple[float, int]], seconds: float) -> tuple[int, int]:
    """
    Median RSS of the first and the last third of the run after warm-up
    (the clients' closing phase after the deadline left out).
    """
    steady = [kib for at, kib in rss if WARMUP_FRACTION * seconds <= at <= seconds]
    third = len(steady) // 3
    assert third >= 5, f"too few RSS samples: {len(steady)}"
    return int(statistics.median(steady[:third])), int(statistics.median(steady[-third:]))


def test_200_mixed_clients_without_errors_leaks_or_tracebacks(soakDovecot: SoakSetup, soakProxy: SoakProxy) -> None:
    """
    200 concurrent IMAP, POP3-relay and POP3-bridge clients run for
    C{MAILPROXY_SOAK_SECONDS}: every reply is as expected, every mailbox
    ends with exactly its seeded messages, the proxy's RSS stays flat after
    warm-up, its descriptors return to the idle count and it logs no
    traceback.
    """
    pid = soakProxy.process.process.pid
    filesBefore = settledFiles(pid)
    result = asyncio.run(soak(soakProxy, soakDovecot.mailboxes, soakDovecot.upstream.caFile, SOAK_SECONDS))
    filesAfter = settledFiles(pid, atMost=filesBefore)
    first, last = rssThirds(result.rss, SOAK_SECONDS)
    operations = result.context.operations
    print(
        f"\nsoak: {SOAK_SECONDS:g} s of clients, {result.duration:.1f} s in all;"
        f" {sum(operations.values())} operations, {len(result.context.errors)} errors"
    )
    for name, count in sorted(operations.items()):
        print(f"  {name:40} {count}")
    sessions = sum(count for name, count in operations.items() if " connect " in name)
    print(
        f"sessions: {sessions}; RSS (s: MiB) "
        + ", ".join(f"{at:.0f}: {kib / 1024:.1f}" for at, kib in result.rss[:: max(1, len(result.rss) // 12)])
    )
    print(
        f"proxy RSS: {result.rss[0][1]} KiB at start, max {max(kib for _, kib in result.rss)} KiB,"
        f" {result.rss[-1][1]} KiB at the end; median of the first / last third after warm-up:"
        f" {first} / {last} KiB; descriptors {filesBefore} before, {filesAfter} after"
    )

    assert result.context.errors == [], "\n".join(result.context.errors[:20])
    for kind in ("imap LOGOUT", "pop3 QUIT", "bridge QUIT", "bridge deletion verified"):
        assert operations[kind] > 0, f"no {kind!r} at all: {operations}"
    for user, mailbox in soakDovecot.mailboxes.items():
        assert inboxUids(soakDovecot.upstream, user) == [message.uid for message in mailbox.messages], user
    assert last - first <= max(RSS_GROWTH_LIMIT_KIB, RSS_GROWTH_LIMIT_FRACTION * first), (first, last)
    assert filesAfter == filesBefore
    log = fullLog(soakProxy.process)
    for marker in ("Traceback", "Unhandled"):
        assert marker not in log, log[log.index(marker) - 2000 : log.index(marker) + 3000]
