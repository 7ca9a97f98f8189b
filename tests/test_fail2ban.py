"""
The fail2ban filter and jail shipped in C{etc/fail2ban} against a real
C{twistd -n mailproxy}: clients log in with user names made to forge log
fields and whole log lines, over IMAP and POP3, in a text-log and a
JSON-log run side by side.  The real C{fail2ban-regex} with the filter must
match one line per attempt, each naming the client's real address, and a
real C{fail2ban-server} with the example jail must ban that address and no
other.  The logs must grow by a bounded amount per attempt, carry no forged
line, timestamp or field, and the audit file must hold the names bounded
and encoded.

fail2ban is a system package (C{make system-deps}); without it these tests
fail, they do not skip.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from mailproxy.logs import MAX_LOGGED_NAME, loggedName
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "mailproxy.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "mailproxy.local"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex") or "/usr/bin/fail2ban-regex"
FAIL2BAN_CLIENT = shutil.which("fail2ban-client") or "/usr/bin/fail2ban-client"

# The address the forged names try to get banned; the real client is HOST.
FORGED_IP = "198.51.100.77"
FORGED_TIME = "2026-12-03T12:00:00+0000"
FORGED_LINE = (
    f"{FORGED_TIME} [mailproxy.auth#warn] authentication failure: ip={FORGED_IP} protocol=imap user=y failures=1"
)
FORGED_JSON = json.dumps(
    {
        "time": "2026-12-03T12:00:00.000+00:00",
        "level": "warn",
        "namespace": "mailproxy.auth",
        "message": f"authentication failure: ip={FORGED_IP} protocol=pop3 user=y failures=1",
    }
)
WRONG = b"wrong-password"
# Forged names cost at most this much log per attempt (every line of one
# connection: connected, audit records, failure, lockouts, disconnected;
# JSON lines repeat the name in fields), however long the name.
MAX_GROWTH_PER_ATTEMPT = {"text": 2048, "json": 6144}
MAX_LINE = 1000
MAX_AUDIT_FIELD = 200

# Every failure locks the network (and the name) out for LOCKOUT seconds, so
# an attempt right after a failure is refused without a check: both kinds
# of line get the forged names.  The reply delay doubles with each failure
# in the window (all of this test's): FAILURE_DELAY keeps the longest,
# after the 7th, well below LOCKOUT, and the whole run short.
LOCKOUT = 0.3
FAILURE_DELAY = 0.002
CONFIG = """
[server]
log_format = "{logFormat}"

[auth]
users_file = "users"
failure_delay = {failureDelay}

[limits]
failures_before_lockout = 1
lockout_seconds = {lockout}

[filters.audit]
type = "audit"
file = "audit.jsonl"

[[listener]]
name = "imap"
endpoint = "tcp:{imap}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["audit"]

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{pop3}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["audit"]

# Failed logins never get here.
[upstream.closed]
host = "127.0.0.1"
port = {closed}
connect_timeout = 1

[routing]
default_upstream = "closed"
"""

# loggedName: printable ASCII but space, %, ", = and \ as is, else %XX of
# UTF-8, the first MAX_LOGGED_NAME characters (of up to 4 octets) then "...".
_SHOWN_NAME = re.compile(r'(?:[\x21\x23\x24\x26-\x3c\x3e-\x5b\x5d-\x7e]|%[0-9A-F]{2})+(?:\.\.\.)?|""')
MAX_SHOWN_NAME = MAX_LOGGED_NAME * 4 * 3 + 3
_TEXT_START = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) ")
NAMESPACES = ("mailproxy.auth",)
_AUTH_LINE = re.compile(
    r"authentication (failure|refused): ip=(\S+) protocol=(imap|pop3) user=(\S+) (?:failures=\d+|reason=[a-z-]+)"
)


@dataclass(frozen=True)
class AuthLine:
    namespace: str
    kind: str
    ip: str
    protocol: str
    user: str


# -- clients -------------------------------------------------------------------


class LineClient:
    """
    A raw client on one connection, reading CRLF-terminated lines.
    """

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection((HOST, port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.socket.recv(65536)
            if not chunk:
                raise AssertionError(f"the proxy closed the connection; had {self.buffer[:200]!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def tagged(self, tag: bytes) -> bytes:
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return line

    def close(self) -> None:
        self.socket.close()


def plain(name: bytes) -> bytes:
    return base64.b64encode(b"\0" + name + b"\0" + WRONG)


def imapLogin(client: LineClient, name: bytes) -> bytes:
    """
    LOGIN with the name as a quoted string if it can be one, else as a
    synchronising literal.
    """
    if re.fullmatch(rb"[\x20-\x7e]*", name) and b'"' not in name and b"\\" not in name:
        client.send(b'a LOGIN "' + name + b'" ' + WRONG + b"\r\n")
    else:
        client.send(b"a LOGIN {%d}\r\n" % len(name))
        assert client.line().startswith(b"+")
        client.send(name + b" " + WRONG + b"\r\n")
    return client.tagged(b"a")


def imapAuthenticate(client: LineClient, name: bytes) -> bytes:
    """
    AUTHENTICATE PLAIN, the response on a line of its own.
    """
    client.send(b"a AUTHENTICATE PLAIN\r\n")
    assert client.line().startswith(b"+")
    client.send(plain(name) + b"\r\n")
    return client.tagged(b"a")


def imapInitialResponse(client: LineClient, name: bytes) -> bytes:
    """
    AUTHENTICATE PLAIN, the response on the command line (SASL-IR).
    """
    client.send(b"a AUTHENTICATE PLAIN " + plain(name) + b"\r\n")
    return client.tagged(b"a")


def pop3User(client: LineClient, name: bytes) -> bytes:
    client.send(b"USER " + name + b"\r\n")
    assert client.line().startswith(b"+OK")
    client.send(b"PASS " + WRONG + b"\r\n")
    return client.line()


def pop3AuthPlain(client: LineClient, name: bytes) -> bytes:
    client.send(b"AUTH PLAIN " + plain(name) + b"\r\n")
    return client.line()


@dataclass
class Forgery:
    """
    A login with a forged user name, on the IMAP or the POP3 listener.
    """

    what: str
    name: bytes
    exchange: Callable[[LineClient, bytes], bytes]

    @property
    def protocol(self) -> str:
        return "pop3" if self.exchange in (pop3User, pop3AuthPlain) else "imap"

    @property
    def shown(self) -> str:
        """
        The name as log lines and audit records must show it.
        """
        return loggedName(self.name.decode("utf-8", "replace"))

    def login(self, port: int) -> None:
        """
        Connect, fail to log in, leave.
        """
        client = LineClient(port)
        try:
            if self.protocol == "imap":
                assert client.line().startswith(b"* OK")
                reply = self.exchange(client, self.name)
                assert reply.split(b" ")[1:2] == [b"NO"], reply
                client.send(b"z LOGOUT\r\n")
                client.tagged(b"z")
            else:
                assert client.line().startswith(b"+OK")
                reply = self.exchange(client, self.name)
                assert reply.startswith(b"-ERR"), reply
                client.send(b"QUIT\r\n")
                assert client.line().startswith(b"+OK")
        finally:
            client.close()


# About 48 KB (the base64 PLAIN response, 64 KB, on one line: just under the
# 64 KiB pre-login line limit), made of forged fields.
BIG_NAME = (f"x ip={FORGED_IP} protocol=imap failures=1 ".encode() * 2000)[:48000]
FORGERIES = [
    Forgery("fields in a quoted name", f"x ip={FORGED_IP} protocol=imap".encode(), imapLogin),
    Forgery("CR LF and a whole line in a literal", b"\r\n" + FORGED_LINE.encode(), imapLogin),
    Forgery("48 KB name in AUTHENTICATE PLAIN", BIG_NAME, imapAuthenticate),
    Forgery(
        "percent, non-ASCII, escapes and line breakers in a literal",
        '100%25 %41 ü東京 "q" a\\b \x1b[2J \x85\u2028\u2029 \x0b\x0c= end'.encode(),
        imapLogin,
    ),
    Forgery(
        "LF, CR and a JSON line in SASL-IR",
        b"z\n" + FORGED_LINE.encode() + b"\r" + FORGED_JSON.encode() + b"\n\t" + FORGED_LINE.encode(),
        imapInitialResponse,
    ),
    Forgery("spaces and fields in USER", f"a b ip={FORGED_IP} protocol=pop3 user=c".encode(), pop3User),
    Forgery(
        "CR LF and a whole line in AUTH PLAIN",
        b"\r\n" + FORGED_LINE.replace("imap", "pop3").encode() + b"\r\n" + FORGED_JSON.encode(),
        pop3AuthPlain,
    ),
]


# -- the proxy run -------------------------------------------------------------


@dataclass
class Attempt:
    forgery: Forgery
    grew: int = 0


@dataclass
class ForgedRun:
    """
    What one proxy run logged for the forged logins.
    """

    logFormat: str
    log: str
    logPath: str
    audit: list[dict[str, object]]
    attempts: list[Attempt]
    started: float
    ended: float
    seconds: float = 0.0


def runForgeries(logFormat: str, directory: str, process: ProxyProcess, ports: dict[str, int], keep: Path) -> ForgedRun:
    """
    Every forgery twice in a row (a failure, then a refusal while locked
    out), waiting for the lockout to end before the next one.
    """
    assert process.logFile is not None
    logPath = process.logFile
    started = time.time()
    attempts: list[Attempt] = []
    sizes = []
    for forgery in FORGERIES:
        failed = 0.0
        for _ in range(2):
            sizes.append(os.path.getsize(logPath))
            forgery.login(ports[forgery.protocol])
            attempts.append(Attempt(forgery))
            failed = failed or time.monotonic()
        # The lockout began before the first login's (delayed) answer.
        time.sleep(max(0.0, failed + LOCKOUT - time.monotonic()))
    # The last connection's closing lines.
    time.sleep(0.2)
    sizes.append(os.path.getsize(logPath))
    for attempt, before, after in zip(attempts, sizes, sizes[1:], strict=False):
        attempt.grew = after - before
    ended = time.time()
    with open(logPath, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        log = handle.read()
    with open(os.path.join(directory, "audit.jsonl"), encoding="utf-8", newline="") as handle:
        audit = [json.loads(line) for line in handle.read().split("\n") if line]
    # fail2ban-regex reads a copy: the proxy's directory goes with it.
    copy = keep / f"twistd-{logFormat}.log"
    shutil.copyfile(logPath, copy)
    return ForgedRun(logFormat, log, str(copy), audit, attempts, started, ended, seconds=ended - started)


def forgedRunOf(logFormat: str, keep: Path) -> ForgedRun:
    """
    Start a proxy logging in C{logFormat}, run the forgeries, stop it.
    """
    ports = {"imap": freePort(), "pop3": freePort()}
    config = CONFIG.format(logFormat=logFormat, failureDelay=FAILURE_DELAY, lockout=LOCKOUT, closed=freePort(), **ports)
    with runningProxy(config, {"alice": "alicepw"}, list(ports.values()), f"mp-f2b-{logFormat}-") as (
        directory,
        process,
    ):
        return runForgeries(logFormat, directory, process, ports, keep)


@pytest.fixture(scope="module")
def forgedRuns(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ForgedRun]:
    """
    The text and the JSON run, side by side (two processes: their lockouts
    do not meet).
    """
    formats = ("text", "json")
    with ThreadPoolExecutor(len(formats)) as pool:
        runs = {name: pool.submit(forgedRunOf, name, tmp_path_factory.mktemp(f"f2b-{name}")) for name in formats}
        return {name: run.result() for name, run in runs.items()}


@pytest.fixture(params=["text", "json"])
def forgedRun(request: pytest.FixtureRequest, forgedRuns: dict[str, ForgedRun]) -> ForgedRun:
    return forgedRuns[request.param]


# -- fail2ban-regex --------------------------------------------------------------


@dataclass
class Fail2banResult:
    hosts: list[str]
    total: int
    matched: int
    output: str


def fail2banRegex(logPath: str) -> Fail2banResult:
    """
    Run the real fail2ban-regex with the shipped filter on C{logPath}: once
    for one row per match (C{-o row}: host, time, groups), once for its
    summary.
    """
    assert os.path.exists(FAIL2BAN_REGEX), "fail2ban-regex not found: make system-deps installs fail2ban"
    command = [FAIL2BAN_REGEX, "--raw", "--encoding=UTF-8"]
    rows = subprocess.run(
        [*command, "--out=row", logPath, str(FILTER)], capture_output=True, text=True, timeout=60, check=True
    )
    hosts = []
    for line in rows.stdout.splitlines():
        if line.strip():
            row = ast.literal_eval(line.strip().rstrip(","))
            hosts.append(str(row[0]))
    summary = subprocess.run(
        [*command, "--print-all-matched", "--print-all-missed", logPath, str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    total = re.search(r"^Failregex: (\d+) total$", summary.stdout, re.MULTILINE)
    lines = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched, \d+ missed$", summary.stdout, re.MULTILINE)
    assert total and lines, summary.stdout
    return Fail2banResult(hosts, int(total.group(1)), int(lines.group(1)), summary.stdout + summary.stderr)


# -- the log -----------------------------------------------------------------------


def authLines(run: ForgedRun) -> list[AuthLine]:
    """
    The failure and refusal lines, in order.
    """
    found = []
    for line in run.log.split("\n"):
        if run.logFormat == "json":
            if not line:
                continue
            record = json.loads(line)
            namespace, text = record.get("namespace"), record.get("message", "")
        else:
            start = re.match(r"\S+ \[([\w.]+)#warn\] ", line)
            if start is None:
                continue
            namespace, text = start.group(1), line[start.end() :]
        match = _AUTH_LINE.fullmatch(text)
        if match is not None and namespace in NAMESPACES:
            found.append(AuthLine(namespace, *match.groups()))
    return found


def offendingLines(run: ForgedRun) -> list[str]:
    """
    Lines (or JSON values) that carry a forged field or timestamp, a raw
    control character, or too much text.
    """
    bad = []
    for number, line in enumerate(run.log.split("\n"), 1):
        if not line:
            continue
        where = f"line {number}: {line[:300]!r}"
        if len(line) > MAX_LINE * (2 if run.logFormat == "json" else 1):
            bad.append(f"{where}: {len(line)} characters")
        if f"ip={FORGED_IP}" in line:
            bad.append(f"{where}: forged ip= field")
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]", line):
            bad.append(f"{where}: raw control or line-breaking character")
        if run.logFormat == "text":
            start = _TEXT_START.match(line)
            if line.startswith("\t"):
                if _TEXT_START.match(line.lstrip("\t")):
                    bad.append(f"{where}: a continuation line that looks like a log line")
                continue
            if start is None or start.group(1) == FORGED_TIME:
                bad.append(f"{where}: no timestamp, or the forged one")
                continue
            moment = datetime.strptime(start.group(1), "%Y-%m-%dT%H:%M:%S%z").timestamp()
            if not run.started - 60 <= moment <= run.ended + 2:
                bad.append(f"{where}: forged timestamp {start.group(1)}")
        else:
            try:
                record = json.loads(line)
            except ValueError:
                bad.append(f"{where}: not JSON")
                continue
            moment = datetime.fromisoformat(record["time"]).timestamp()
            if not run.started - 60 <= moment <= run.ended + 2:
                bad.append(f"{where}: forged time {record['time']}")
            if "traceback" in record:
                bad.append(f"{where}: traceback")
            for key, value in record.items():
                if isinstance(value, str) and len(value) > MAX_LINE:
                    bad.append(f"{where}: field {key} has {len(value)} characters")
    return bad


# -- tests ---------------------------------------------------------------------------


def test_fail2ban_bans_only_the_real_client(forgedRun: ForgedRun) -> None:
    """
    fail2ban-regex with the shipped filter matches one line per forged
    attempt, each naming 127.0.0.1, never the forged address.
    """
    result = fail2banRegex(forgedRun.logPath)
    attempts = len(forgedRun.attempts)
    assert FORGED_IP not in result.hosts
    assert set(result.hosts) == {HOST}, result.output
    assert len(result.hosts) == attempts, result.output
    assert result.total == attempts, result.output
    assert result.matched == attempts, result.output


def test_one_auth_line_per_attempt_with_the_encoded_name(forgedRun: ForgedRun) -> None:
    """
    The failure and refusal lines come one per attempt, in order, from
    127.0.0.1, with the name percent-encoded and cut; the forged names got
    both kinds of line.
    """
    lines = authLines(forgedRun)
    expected = [(attempt.forgery.protocol, attempt.forgery.shown) for attempt in forgedRun.attempts]
    assert [(line.protocol, line.user) for line in lines] == expected
    assert {line.ip for line in lines} == {HOST}
    kinds = [line.kind for line in lines]
    assert "failure" in kinds and "refused" in kinds, kinds
    assert all(len(line.user) <= MAX_SHOWN_NAME and _SHOWN_NAME.fullmatch(line.user) for line in lines), lines


def test_auth_lines_in_the_documented_namespace(forgedRun: ForgedRun) -> None:
    """
    The lines are in the namespace the documentation names, mailproxy.auth.
    """
    lines = authLines(forgedRun)
    assert lines
    assert {line.namespace for line in lines} == {"mailproxy.auth"}


def test_no_forged_lines_or_fields(forgedRun: ForgedRun) -> None:
    """
    No log line starts with a forged timestamp, carries a forged ip= field
    or a raw control character, or is overlong.
    """
    assert offendingLines(forgedRun) == []


def test_log_grows_boundedly_per_attempt(forgedRun: ForgedRun) -> None:
    """
    A 48 KB name costs as little log as a short one.
    """
    bound = MAX_GROWTH_PER_ATTEMPT[forgedRun.logFormat]
    grown = {f"{attempt.forgery.what} #{index}": attempt.grew for index, attempt in enumerate(forgedRun.attempts)}
    assert all(0 < grew < bound for grew in grown.values()), grown
    big = [attempt.grew for attempt in forgedRun.attempts if attempt.forgery.name is BIG_NAME]
    assert len(big) == 2 and max(big) < bound < len(BIG_NAME) // 4, big


def test_audit_records_bounded_and_encoded(forgedRun: ForgedRun) -> None:
    """
    The audit file has one failed-login record per failure line, with the
    name as the log shows it; no field is long or has a line break.
    """
    logins = [record for record in forgedRun.audit if record["event"] == "login"]
    failures = [line.user for line in authLines(forgedRun) if line.kind == "failure"]
    assert [record["user"] for record in logins] == failures
    assert not any(record["ok"] for record in logins)
    shown = {attempt.forgery.shown for attempt in forgedRun.attempts}
    assert {record["user"] for record in logins} <= shown
    bad = [
        (number, key, str(value)[:200])
        for number, record in enumerate(forgedRun.audit, 1)
        for key, value in record.items()
        if isinstance(value, str)
        and (len(value) > MAX_AUDIT_FIELD or re.search(r"[\x00-\x1f\x7f\x85\u2028\u2029]", value))
    ]
    assert bad == []
    assert all(FORGED_IP not in str(record.get("client")) for record in forgedRun.audit)


def fail2banConfig(directory: Path, logPaths: list[str], jailOptions: str = "") -> Path:
    """
    A copy of /etc/fail2ban without its own jails, with the shipped filter
    and the example jail on C{logPaths}, plus C{jailOptions}.
    """
    config = directory / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    for local in [config / "jail.local", *(config / "jail.d").iterdir()]:
        if local.exists():
            local.unlink()
    shutil.copyfile(FILTER, config / "filter.d" / "mailproxy.conf")
    jail = JAIL.read_text()
    assert re.search(r"^port\s*=\s*143,993,110,995$", jail, re.MULTILINE)
    logpath = "logpath  = " + "\n           ".join(logPaths)
    jail = re.sub(r"^logpath\s*=.*$", lambda _: logpath, jail, flags=re.MULTILINE)
    for line in jailOptions.strip().splitlines():
        name = line.split("=", 1)[0].strip()
        jail = re.sub(rf"^{name}\s*=.*\n", "", jail, flags=re.MULTILINE) + line + "\n"
    (config / "jail.d" / "mailproxy.local").write_text(jail)
    return config


def counted(status: str, what: str) -> int | None:
    """
    A number in fail2ban-client's status of a jail.
    """
    found = re.search(rf"{what}:\s*(\d+)$", status, re.MULTILINE)
    return None if found is None else int(found.group(1))


def test_fail2ban_server_bans_only_the_real_client(forgedRuns: dict[str, ForgedRun], tmp_path: Path) -> None:
    """
    A real fail2ban-server with the example jail on both logs counts every
    attempt as a failure of 127.0.0.1 and bans that address only.
    """
    assert os.path.exists(FAIL2BAN_CLIENT), "fail2ban-client not found: make system-deps installs fail2ban"
    server = shutil.which("fail2ban-server") or "/usr/bin/fail2ban-server"
    bans = tmp_path / "bans"
    socketPath, pidPath = tmp_path / "f2b.sock", tmp_path / "f2b.pid"
    config = fail2banConfig(
        tmp_path,
        [run.logPath for run in forgedRuns.values()],
        f"""
ignoreip =
ignoreself = false
maxretry = 3
backend = polling
action = dummy[target="{bans}"]
""",
    )
    (config / "fail2ban.local").write_text(
        f"[Definition]\nlogtarget = {tmp_path / 'fail2ban.log'}\nsocket = {socketPath}\n"
        f"pidfile = {pidPath}\ndbfile = :memory:\n"
    )
    attempts = sum(len(run.attempts) for run in forgedRuns.values())
    process = subprocess.Popen(
        [server, "-f", "-x", "-c", str(config), "-s", str(socketPath), "-p", str(pidPath)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status = banned = ""
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            asked = subprocess.run(
                [FAIL2BAN_CLIENT, "-s", str(socketPath), "status", "mailproxy"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            status = asked.stdout
            if counted(status, "Total failed") == attempts and counted(status, "Total banned") == 1:
                break
            time.sleep(0.3)
        # Read before the stop: the dummy action removes its file then.
        banned = bans.read_text() if bans.exists() else ""
        subprocess.run([FAIL2BAN_CLIENT, "-s", str(socketPath), "stop"], capture_output=True, timeout=10)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert counted(status, "Total failed") == attempts, status
    listed = re.search(r"Banned IP list:\s*(.*)$", status, re.MULTILINE)
    assert listed and listed.group(1).split() == [HOST], status
    # What the action was given to ban.
    assert [line for line in banned.split() if line.startswith("+")] == [f"+{HOST}"], banned


# -- the filter and the jail alone ------------------------------------------------

SAMPLE = [
    # (line, host fail2ban must find, or None)
    (
        "2026-12-03T12:00:00+0000 [mailproxy.auth#warn] authentication failure: "
        "ip=203.0.113.7 protocol=imap user=alice failures=1",
        "203.0.113.7",
    ),
    (
        "2026-12-03T12:00:01+0000 [mailproxy.auth#warn] authentication refused: "
        "ip=2001:db8:1:2::/64 protocol=pop3 user=x%20ip%3D198.51.100.77 reason=address-locked-out",
        "2001:db8:1:2::/64",
    ),
    (
        "2026-12-03T12:00:02+0000 [mailproxy.auth#warn] authentication refused: "
        "ip=203.0.113.8 protocol=imap user=bob reason=busy",
        None,
    ),
    # Locked out by others' failures: maybe the owner on a new network.
    (
        "2026-12-03T12:00:02+0000 [mailproxy.auth#warn] authentication refused: "
        "ip=203.0.113.8 protocol=imap user=bob reason=user-locked-out",
        None,
    ),
    (
        '{"time": "2026-12-03T12:00:03.123+00:00", "level": "warn", "namespace": "mailproxy.auth", '
        '"message": "authentication failure: ip=2001:db8:1:2::/64 protocol=imap user=alice failures=2", '
        '"ip": "2001:db8:1:2::/64", "protocol": "imap", "user": "alice", "count": 2}',
        "2001:db8:1:2::/64",
    ),
    (
        '{"time": "2026-12-03T12:00:04.000+00:00", "level": "warn", "namespace": "mailproxy.auth", '
        '"message": "authentication refused: ip=203.0.113.9 protocol=pop3 user=%22 reason=address-locked-out", '
        '"ip": "203.0.113.9", "protocol": "pop3", "user": "%22", "reason": "address-locked-out"}',
        "203.0.113.9",
    ),
    # Another logger's namespace is not the proxy's authentication log.
    (
        "2026-12-03T12:00:05+0000 [mailproxy.limits.Limits#warn] authentication failure: "
        "ip=203.0.113.10 protocol=pop3 user=%F0%9F%94%91... failures=7",
        None,
    ),
    # Not failed logins, or not this proxy's lines:
    (
        "2026-12-03T12:00:05+0000 [mailproxy.auth#warn] authentication lockout: "
        "ip=203.0.113.7 for 900 s after 10 failures",
        None,
    ),
    (
        "2026-12-03T12:00:05+0000 [mailproxy.auth#warn] connection refused: "
        "ip=203.0.113.7 protocol=imap: too many connections from your address",
        None,
    ),
    ("2026-12-03T12:00:06+0000 [mailproxy.audit#warn] login of alice from 203.0.113.7 failed", None),
    # What a raw name would make of a line: never a ban, of anybody.
    (f"\t{FORGED_LINE}", None),
    (f"  {FORGED_LINE}", None),
    (
        "2026-12-03T12:00:07+0000 [mailproxy.auth#warn] authentication failure: "
        f"ip=203.0.113.7 protocol=imap user=x ip={FORGED_IP} failures=1",
        None,
    ),
    (
        "2026-12-03T12:00:08+0000 [mailproxy.auth#warn] authentication failure: "
        f"ip=203.0.113.7 protocol=imap user=x failures=1 ip={FORGED_IP}",
        None,
    ),
    (
        "2026-12-03T12:00:09+0000 [mailproxy.audit#info] x: "
        f"authentication failure: ip={FORGED_IP} protocol=imap user=y failures=1",
        None,
    ),
    (
        '{"time": "2026-12-03T12:00:10.000+00:00", "level": "info", "namespace": "mailproxy.audit", '
        f'"message": "login of y authentication failure: ip={FORGED_IP} protocol=imap user=y failures=1"}}',
        None,
    ),
    (
        '{"time": "2026-12-03T12:00:11.000+00:00", "level": "warn", "namespace": "mailproxy.auth", '
        f'"message": "authentication failure: ip=203.0.113.7 protocol=imap user=a\\" ip={FORGED_IP} failures=1"}}',
        None,
    ),
]


def test_filter_on_sample_lines(tmp_path: Path) -> None:
    """
    The filter on lines of both formats: IPv6 clients as their /64, and no
    host from anything but the ip= field of a well-formed line.
    """
    log = tmp_path / "sample.log"
    log.write_text("".join(line + "\n" for line, _ in SAMPLE), encoding="utf-8")
    result = fail2banRegex(str(log))
    assert result.hosts == [host for _, host in SAMPLE if host is not None], result.output
    assert result.total == result.matched == len(result.hosts)


def test_jail_configuration(tmp_path: Path) -> None:
    """
    The example jail and the filter pass fail2ban-client's configuration
    test (in a copy of /etc/fail2ban without its own jails).
    """
    assert os.path.exists(FAIL2BAN_CLIENT), "fail2ban-client not found: make system-deps installs fail2ban"
    log = tmp_path / "twistd.log"
    log.write_text("")
    config = fail2banConfig(tmp_path, [str(log)])
    checked = subprocess.run([FAIL2BAN_CLIENT, "-c", str(config), "--test"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dumped = subprocess.run([FAIL2BAN_CLIENT, "-c", str(config), "-d"], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0, dumped.stdout + dumped.stderr
    assert f"['set', 'mailproxy', 'addlogpath', '{log}', 'head']" in dumped.stdout
    assert "['add', 'mailproxy', 'auto']" in dumped.stdout
