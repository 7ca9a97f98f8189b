"""
Filter bypass attacks against the real Dovecot: the configuration of the
C{bypassProxy} fixture (conftest.py), raw IMAP sessions through it that
never hang, Dovecot's rawlog of each session, and snapshots of a user's
mail taken directly from Dovecot.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess

BYPASS_USERS = {
    "mallory": "mallorypw",  # filters: deny (Archive, Archive/*, Lists/dev off limits)
    "rory": "rorypw",  # filters: readonly (+ Archive off limits), hide Lists*
    "penny": "pennypw",  # no filters of her own (and the listener without any)
    "victor": "victorpw",  # not a proxy user: direct experiments against Dovecot
}
BYPASS_MAILBOXES = ("INBOX", "Archive", "Lists", "Lists/dev", "Trash")
BYPASS_SEED = {"INBOX": 3, "Archive": 2, "Lists/dev": 1}
BYPASS_SUBSCRIBED = ("INBOX", "Archive")

BYPASS_CONFIG = """
[auth]
users_file = "users"
failure_delay = 0.3

[filters.audit]
type = "audit"
file = "audit.jsonl"

[filters.deny]
type = "policy"
mailboxes_deny = ["Archive", "Archive/*", "Lists/dev"]

[filters.readonly]
type = "policy"
read_only = true
mailboxes_deny = ["Archive", "Archive/*"]

[filters.hide]
type = "folders"
hide = ["Lists*"]

[[listener]]
name = "filtered"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["audit"]

[[listener]]
name = "bare"
endpoint = "tcp:{barePort}:interface=127.0.0.1"
allow_plaintext_auth = true

[upstream.plain]
host = "127.0.0.1"
port = {upstreamPort}

[routing]
default_upstream = "plain"

[routing.users.mallory]
filters = ["deny"]

[routing.users.rory]
filters = ["readonly", "hide"]

[routing.users.penny]
filters = []
"""

_RAWLOG_STAMP = re.compile(rb"^\d+\.\d+ ", re.MULTILINE)
_LIST_LINE = re.compile(rb'^\((?P<flags>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')
_FETCH_FLAGS = re.compile(rb"^(?P<seq>\d+) \(.*FLAGS \((?P<flags>[^)]*)\)")


def imapUnquote(raw: bytes) -> str:
    """
    A mailbox name from a LIST/LSUB line: unquoted and unescaped if quoted.
    """
    if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
    return raw.decode("utf-8", "replace")


def stripRawlogStamps(data: bytes) -> bytes:
    """
    Rawlog bytes without Dovecot's C{<seconds>.<microseconds> } line prefixes.
    """
    return _RAWLOG_STAMP.sub(b"", data)


@dataclass(frozen=True)
class MailSnapshot:
    """
    A user's mail as Dovecot has it: mailboxes, subscriptions, and per
    mailbox the flags of each message in sequence order (without \\Recent).
    """

    mailboxes: frozenset[str]
    subscribed: frozenset[str]
    messages: dict[str, tuple[frozenset[str], ...]]

    def count(self, mailbox: str) -> int:
        return len(self.messages[mailbox])


@dataclass(frozen=True)
class RawLog:
    """
    One Dovecot session's rawlog, timestamps stripped: C{sent} is what
    Dovecot read (from the proxy), C{received} what it answered.
    """

    sent: bytes
    received: bytes

    def taggedReplies(self) -> list[bytes]:
        """
        The tags of Dovecot's tagged replies, except the login's (the
        first line, written by imap-login before the session started).
        """
        lines = self.received.split(b"\r\n")
        tags = []
        for index, line in enumerate(lines):
            if index == 0 or not line or line.startswith((b"* ", b"+")):
                continue
            tag, space, rest = line.partition(b" ")
            if space and rest[:3] in (b"OK ", b"NO ", b"BAD"):
                tags.append(tag)
        return tags


@dataclass
class Replies:
    """
    What L{RawSession.readTags} read: every line, the tagged reply of each
    tag, and why it stopped early (C{None} if every tag was answered).
    """

    lines: list[bytes]
    tagged: dict[bytes, bytes]
    problem: str | None = None

    def reply(self, tag: bytes) -> bytes:
        """
        The tagged reply of C{tag}, or a description of what went wrong.
        """
        return self.tagged.get(tag, b"<no reply to %s: %s; lines %r>" % (tag, str(self.problem).encode(), self.lines))


class RawSession:
    """
    A raw socket IMAP session through the proxy, logged in with
    C{a LOGIN user password}.  Every read has a deadline: nothing hangs.
    """

    def __init__(self, proxy: BypassProxy, user: str, port: int, timeout: float = 30.0, direct: bool = False) -> None:
        self.proxy = proxy
        self.user = user
        self.buffer = b""
        self.closed = False
        self.auditStart = len(proxy.audit())
        before = proxy.dovecot.rawlogSessions(user)
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.greeting = self.readLine(time.monotonic() + timeout)
        assert self.greeting.startswith(b"* OK"), self.greeting
        self.send(b"a LOGIN %s %s\r\n" % (user.encode(), BYPASS_USERS[user].encode()))
        reply = self.readUntilTag(b"a", timeout)
        assert reply[-1].startswith(b"a OK"), reply
        self.rawlogFiles = proxy.newRawlog(user, before)
        if direct and self.rawlogFiles is not None:
            proxy.directRawlogs.add(self.rawlogFiles[0])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply in time; unparsed: {self.buffer[-2000:]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no complete reply in time; unparsed: {self.buffer[-2000:]!r}") from None
        if not chunk:
            self.closed = True
            raise ConnectionError(f"the proxy closed the connection; unparsed: {self.buffer[-2000:]!r}")
        self.buffer += chunk

    def readLine(self, deadline: float) -> bytes:
        """
        The next response line with its CRLF; a line announcing a literal
        comes with the literal and the rest of its line, as one item.
        """
        line = b""
        for _ in range(10_000):
            while b"\r\n" not in self.buffer:
                self._fill(deadline)
            part, _, self.buffer = self.buffer.partition(b"\r\n")
            line += part + b"\r\n"
            literal = re.search(rb"\{(\d+)\}$", part)
            if literal is None:
                return line
            size = int(literal.group(1))
            while len(self.buffer) < size:
                self._fill(deadline)
            line += self.buffer[:size]
            self.buffer = self.buffer[size:]
        raise AssertionError("more than 10000 literals in one response")

    def readUntilTag(self, tag: bytes, timeout: float = 30.0) -> list[bytes]:
        """
        All lines up to and including the one tagged C{tag}.

        @raise AssertionError: with the lines read so far, on timeout or
            when the connection closes first.
        """
        deadline = time.monotonic() + timeout
        lines: list[bytes] = []
        for _ in range(1_000_000):
            try:
                line = self.readLine(deadline)
            except (TimeoutError, ConnectionError) as error:
                raise AssertionError(f"waiting for {tag!r}: {error}; lines so far: {lines!r}") from None
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines
        raise AssertionError(f"no reply tagged {tag!r} in a million lines")

    def readTags(self, tags: list[bytes], timeout: float = 10.0) -> Replies:
        """
        Read until each of C{tags} got its tagged reply (in any order: Dovecot
        may finish pipelined commands out of order), the connection closes or
        C{timeout} passes; never raises for those, the result tells.
        """
        deadline = time.monotonic() + timeout
        replies = Replies([], {})
        for _ in range(1_000_000):
            if all(tag in replies.tagged for tag in tags):
                break
            try:
                line = self.readLine(deadline)
            except (TimeoutError, ConnectionError) as error:
                replies.problem = str(error)
                break
            replies.lines.append(line)
            tag, space, _ = line.partition(b" ")
            if space and tag not in (b"*", b"+") and tag not in replies.tagged:
                replies.tagged[tag] = line
        return replies

    def command(self, line: bytes, timeout: float = 30.0) -> list[bytes]:
        """
        Send one command line (CRLF added) and read until its tagged reply.
        """
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        return self.readUntilTag(tag, timeout)

    def rawlog(self, waitFor: bytes | None = None, timeout: float = 5.0) -> RawLog:
        """
        This session's rawlog in Dovecot; with C{waitFor}, once Dovecot's
        input contains it (Dovecot files what it reads as it reads it).
        """
        assert self.rawlogFiles is not None, f"no Dovecot rawlog for {self.user}'s session"
        deadline = time.monotonic() + timeout
        while True:
            log = self.proxy.readRawlog(self.rawlogFiles)
            if waitFor is None or waitFor in log.sent or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def audit(self, until: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """
        This user's command records since the session started; with
        C{until}, once a record with that tag is there (or the time is up).
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [
                record
                for record in self.proxy.audit()[self.auditStart :]
                if record.get("event") == "command" and record.get("user") == self.user
            ]
            if until is None or any(r.get("tag") == until for r in records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def abort(self) -> None:
        """
        Close without LOGOUT (say, once the stream is compressed).
        """
        self.closed = True
        self.sock.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.sendall(b"zz LOGOUT\r\n")
                self.sock.settimeout(5)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and self.sock.recv(65536):
                    pass
        self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BypassProxy:
    """
    A rawlogging Dovecot (users in L{BYPASS_USERS}, seeded) behind the
    proxy with audit/deny/readonly/hide filters; C{barePort} is a listener
    without any filters.
    """

    port: int
    barePort: int
    directory: str
    process: ProxyProcess
    dovecot: DovecotUpstream
    uidvalidity: dict[str, dict[str, int]] = field(default_factory=dict)
    directRawlogs: set[str] = field(default_factory=set)
    seeded: dict[str, MailSnapshot] = field(default_factory=dict)

    def log(self) -> str:
        return self.process.log()

    def audit(self) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self.directory, "audit.jsonl")) as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError:
            return []

    @contextlib.contextmanager
    def direct(self, user: str) -> Iterator[imaplib.IMAP4]:
        """
        An imaplib connection straight to Dovecot (its rawlog is noted as
        not the proxy's).
        """
        before = {stem for stem, _ in self.dovecot.rawlogSessions(user)}
        client = imaplib.IMAP4(HOST, self.dovecot.ports["imap"], timeout=30)
        try:
            client.login(user, BYPASS_USERS[user])
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()
            self.directRawlogs |= {stem for stem, _ in self.dovecot.rawlogSessions(user)} - before

    def newRawlog(self, user: str, before: list[tuple[str, str]], timeout: float = 5.0) -> tuple[str, str] | None:
        """
        The rawlog files of a session that started after C{before}.
        """
        deadline = time.monotonic() + timeout
        while True:
            new = [
                pair
                for pair in self.dovecot.rawlogSessions(user)
                if pair not in before and pair[0] not in self.directRawlogs
            ]
            if new:
                return new[-1]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def readRawlog(self, files: tuple[str, str]) -> RawLog:
        with open(files[0], "rb") as sent, open(files[1], "rb") as received:
            return RawLog(stripRawlogStamps(sent.read()), stripRawlogStamps(received.read()))

    def rawlog(self, user: str) -> RawLog:
        """
        The latest rawlog of C{user}'s sessions through the proxy.
        """
        sessions = [pair for pair in self.dovecot.rawlogSessions(user) if pair[0] not in self.directRawlogs]
        assert sessions, f"no rawlog of a proxied session of {user}"
        return self.readRawlog(sessions[-1])

    def session(self, user: str, bare: bool = False, timeout: float = 30.0) -> RawSession:
        """
        A raw session through the proxy (the listener without filters if
        C{bare}), logged in.
        """
        return RawSession(self, user, self.barePort if bare else self.port, timeout)

    def directSession(self, user: str, timeout: float = 30.0) -> RawSession:
        """
        A raw session straight to Dovecot, to show what an attack does there.
        """
        return RawSession(self, user, self.dovecot.ports["imap"], timeout, direct=True)

    def snapshot(self, user: str) -> MailSnapshot:
        """
        C{user}'s mailboxes, subscriptions and message flags, read directly
        from Dovecot without changing anything (EXAMINE, FETCH FLAGS).
        """
        with self.direct(user) as client:
            mailboxes = self._names(client.list('""', "*"))
            subscribed = self._names(client.lsub('""', "*"))
            messages: dict[str, tuple[frozenset[str], ...]] = {}
            for mailbox in sorted(mailboxes):
                typ, data = client.select(f'"{mailbox}"', readonly=True)
                if typ != "OK":
                    continue
                count = int(data[0] or b"0")
                flags: dict[int, frozenset[str]] = {}
                if count:
                    typ, lines = client.fetch("1:*", "(FLAGS)")
                    assert typ == "OK", lines
                    for line in lines:
                        assert isinstance(line, bytes), line
                        match = _FETCH_FLAGS.match(line)
                        assert match is not None, line
                        flags[int(match.group("seq"))] = frozenset(
                            flag for flag in match.group("flags").decode().split() if flag != "\\Recent"
                        )
                assert sorted(flags) == list(range(1, count + 1)), (mailbox, flags)
                messages[mailbox] = tuple(flags[seq] for seq in sorted(flags))
                client.close()
        return MailSnapshot(frozenset(mailboxes), frozenset(subscribed), messages)

    @staticmethod
    def _names(reply: tuple[str, list[Any]]) -> set[str]:
        typ, lines = reply
        assert typ == "OK", lines
        names = set()
        for line in lines:
            if line is None:
                continue
            if isinstance(line, tuple):  # a name sent as a literal
                names.add(line[1].decode("utf-8", "replace"))
                continue
            match = _LIST_LINE.match(line)
            assert match is not None, line
            names.add(imapUnquote(match.group("name")))
        return names

    def seed(self, user: str) -> None:
        """
        Give C{user} the mailboxes, messages and subscriptions the attacks
        start from; note each mailbox's UIDVALIDITY.
        """
        with self.direct(user) as client:
            for mailbox in BYPASS_MAILBOXES:
                if mailbox != "INBOX":
                    assert client.create(f'"{mailbox}"')[0] == "OK", mailbox
            for mailbox, count in BYPASS_SEED.items():
                for number in range(1, count + 1):
                    message = (
                        f"From: seed@example.test\r\nTo: {user}@example.test\r\n"
                        f"Subject: {mailbox} message {number}\r\n\r\nbody {number}\r\n"
                    ).encode()
                    assert client.append(f'"{mailbox}"', None, None, message)[0] == "OK"
            for mailbox in BYPASS_SUBSCRIBED:
                assert client.subscribe(f'"{mailbox}"')[0] == "OK"
            validity = {}
            for mailbox in BYPASS_MAILBOXES:
                typ, data = client.status(f'"{mailbox}"', "(UIDVALIDITY)")
                assert typ == "OK", data
                assert isinstance(data[0], bytes), data
                match = re.search(rb"UIDVALIDITY (\d+)", data[0])
                assert match is not None, data
                validity[mailbox] = int(match.group(1))
            self.uidvalidity[user] = validity
        self.seeded[user] = self.snapshot(user)

    def restore(self, user: str) -> None:
        """
        Wipe and seed C{user}'s mail again unless it is as seeded (an attack
        that got through changed it).
        """
        if self.snapshot(user) == self.seeded[user]:
            return
        self.dovecot.wipe(user)
        self.dovecot.enableRawlog(user)
        self.seed(user)
