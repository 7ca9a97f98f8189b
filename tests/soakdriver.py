"""
The client side of the soak test: many concurrent IMAP and POP3 sessions on
one asyncio loop, every reply checked against what was seeded.

Three kinds of client loop until a deadline, each session on a randomly
chosen listener (plain, STARTTLS/STLS or implicit TLS):

- L{imapClient}: LOGIN, SELECT (UIDVALIDITY checked), then a random handful
  of header and body FETCHes, SEARCHes, APPEND/STORE/UID EXPUNGE cycles of
  its own messages, brief IDLEs, pipelined batches and an expected C{NO},
  then LOGOUT (C{BYE}, C{OK}, end of stream).
- L{pop3RelayClient}: USER/PASS, STAT, LIST, UIDL, RETR, TOP, DELE and
  RSET, QUIT, against a mailbox nobody changes: counts, sizes, UIDLs and
  contents must be exact.
- L{bridgeClient}: APPENDs a message of its own over IMAP, finds it over
  POP3 by its expected UIDL, checks LIST/RETR, DELEs it and QUITs; the next
  round checks over IMAP that it is gone.

Anything else (a tagged C{NO}/C{BAD} that was not asked for, an untagged
C{BYE}/C{BAD}, C{-ERR}, a wrong byte, a reset or a read that takes longer
than the per-operation timeout) is a protocol error: it is recorded with the
client, operation and reply, the connection is dropped and the client starts
a new session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

HOST = "127.0.0.1"
TLS_SERVER_NAME = "localhost"
READ_LIMIT = 1 << 20
# Bounds on what one command may produce, so that no loop can run forever.
MAX_RESPONSES = 10_000
MAX_LINES = 200_000
T = TypeVar("T")
FETCH_RE = re.compile(rb"^\* (\d+) FETCH \((.*)\)\r\n$", re.DOTALL)


class ProtocolError(Exception):
    """
    A reply the soak did not expect.
    """


# What a session can fail with: all of it counts as a protocol error.
FAILURES = (ProtocolError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError)


@dataclass(frozen=True)
class Message:
    uid: int
    data: bytes
    seedTag: str | None = None

    @property
    def header(self) -> bytes:
        return self.data[: self.data.index(b"\r\n\r\n") + 4]

    def top(self, lines: int) -> bytes:
        """
        What POP3 C{TOP n lines} returns: the header, the blank line and the
        first C{lines} lines of the body.
        """
        body = self.data[len(self.header) :]
        return self.header + b"".join(body.splitlines(keepends=True)[:lines])


@dataclass
class Mailbox:
    """
    A soak user and the messages seeded into its INBOX (which nobody
    removes), with their POP3 unique ids.
    """

    user: str
    password: str
    uidvalidity: int
    messages: list[Message]
    uidls: list[bytes]


@dataclass(frozen=True)
class Endpoint:
    port: int
    tls: str  # plain, starttls or implicit


@dataclass
class SoakContext:
    imapEndpoints: list[Endpoint]
    pop3Endpoints: list[Endpoint]
    sslContext: ssl.SSLContext
    deadline: float
    timeout: float
    operations: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    async def run(self, client: str, name: str, step: Awaitable[T]) -> T:
        """
        Count C{step} as operation C{name} once it succeeded; name the
        operation in its error otherwise.
        """
        try:
            result = await step
        except FAILURES as error:
            raise ProtocolError(f"{client} {name}: {type(error).__name__}: {error}") from None
        self.operations[name] += 1
        return result


class LineStream:
    """
    An asyncio stream whose every read is bounded by the per-operation
    timeout.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def open(cls, endpoint: Endpoint, context: SoakContext) -> LineStream:
        implicit = context.sslContext if endpoint.tls == "implicit" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                HOST,
                endpoint.port,
                ssl=implicit,
                server_hostname=TLS_SERVER_NAME if implicit else None,
                limit=READ_LIMIT,
            ),
            context.timeout,
        )
        return cls(reader, writer, context.timeout)

    async def readline(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
        if not line.endswith(b"\r\n"):
            raise ProtocolError(f"line without CRLF: {line[:200]!r}")
        return line

    async def readexactly(self, count: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(count), self.timeout)

    async def expectEnd(self) -> None:
        """
        The server must close the connection now.
        """
        rest = await asyncio.wait_for(self.reader.read(1), self.timeout)
        if rest:
            raise ProtocolError(f"data after the end of the session: {rest!r}")

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def startTLS(self, context: ssl.SSLContext) -> None:
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname=TLS_SERVER_NAME), self.timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), self.timeout)


# -- IMAP ------------------------------------------------------------------------


@dataclass
class Response:
    """
    One IMAP response: its lines joined (literal data left out) and its
    literals in order.
    """

    text: bytes
    literals: list[bytes]


class IMAPSession:
    def __init__(self, stream: LineStream, client: str) -> None:
        self.stream = stream
        self.client = client
        self.counter = 0
        self.loggingOut = False

    @classmethod
    async def open(cls, endpoint: Endpoint, context: SoakContext, client: str) -> IMAPSession:
        stream = await LineStream.open(endpoint, context)
        session = cls(stream, client)
        try:
            greeting = await session.readResponse()
            if not greeting.text.startswith(b"* OK"):
                raise ProtocolError(f"greeting {greeting.text!r}")
            if endpoint.tls == "starttls":
                await session.command(b"STARTTLS")
                await stream.startTLS(context.sslContext)
        except BaseException:
            await stream.close()
            raise
        return session

    def nextTag(self) -> bytes:
        self.counter += 1
        return b"s%d" % (self.counter,)

    async def readResponse(self) -> Response:
        pieces = [await self.stream.readline()]
        literals: list[bytes] = []
        for _ in range(MAX_RESPONSES):
            match = re.search(rb"\{(\d+)\}\r\n$", pieces[-1])
            if match is None:
                return Response(b"".join(pieces), literals)
            literals.append(await self.stream.readexactly(int(match.group(1))))
            pieces.append(await self.stream.readline())
        raise ProtocolError("too many literals in one response")

    def checkUntagged(self, response: Response) -> None:
        if response.text.startswith((b"* BAD", b"* NO")):
            raise ProtocolError(f"untagged {response.text!r}")
        if response.text.startswith(b"* BYE") and not self.loggingOut:
            raise ProtocolError(f"untagged {response.text!r}")
        if not response.text.startswith(b"* "):
            raise ProtocolError(f"unexpected {response.text!r}")

    async def complete(self, tags: list[bytes], expect: bytes = b"OK") -> tuple[dict[bytes, bytes], list[Response]]:
        """
        Read until every tag in C{tags} is answered C{expect}; return the
        tagged lines and the untagged responses in between.
        """
        tagged: dict[bytes, bytes] = {}
        untagged: list[Response] = []
        for _ in range(MAX_RESPONSES):
            response = await self.readResponse()
            tag, _, rest = response.text.partition(b" ")
            if tag in tags:
                if tag in tagged:
                    raise ProtocolError(f"tag answered twice: {response.text!r}")
                if rest.split(b" ", 1)[0] != expect:
                    raise ProtocolError(f"expected {expect.decode()}, got {response.text!r}")
                tagged[tag] = response.text
                if len(tagged) == len(tags):
                    return tagged, untagged
            else:
                self.checkUntagged(response)
                untagged.append(response)
        raise ProtocolError("too many responses")

    async def command(self, line: bytes, expect: bytes = b"OK") -> tuple[bytes, list[Response]]:
        tag = self.nextTag()
        self.stream.write(tag + b" " + line + b"\r\n")
        tagged, untagged = await self.complete([tag], expect)
        return tagged[tag], untagged

    async def pipeline(self, lines: list[bytes]) -> tuple[dict[bytes, bytes], list[Response]]:
        """
        Send C{lines} in one write; Dovecot may answer them in any order.
        """
        tags = [self.nextTag() for _ in lines]
        self.stream.write(b"".join(tag + b" " + line + b"\r\n" for tag, line in zip(tags, lines, strict=True)))
        return await self.complete(tags)

    async def continuation(self) -> None:
        for _ in range(MAX_RESPONSES):
            response = await self.readResponse()
            if response.text.startswith(b"+"):
                return
            self.checkUntagged(response)
        raise ProtocolError("no continuation")

    async def logout(self) -> None:
        self.loggingOut = True
        _, untagged = await self.command(b"LOGOUT")
        if not any(response.text.startswith(b"* BYE") for response in untagged):
            raise ProtocolError("LOGOUT without BYE")
        await self.stream.expectEnd()


def fetches(untagged: list[Response], uid: int) -> list[Response]:
    """
    The FETCH responses about C{uid}.
    """
    return [
        response
        for response in untagged
        if FETCH_RE.match(response.text) and re.search(rb"\bUID %d\b" % (uid,), response.text)
    ]


def searchResults(untagged: list[Response]) -> list[list[int]]:
    return [
        [int(number) for number in response.text[len(b"* SEARCH") :].split()]
        for response in untagged
        if response.text.startswith(b"* SEARCH")
    ]


async def checkBody(session: IMAPSession, message: Message) -> None:
    _, untagged = await session.command(b"UID FETCH %d (RFC822.SIZE BODY.PEEK[])" % (message.uid,))
    found = fetches(untagged, message.uid)
    if len(found) != 1 or len(found[0].literals) != 1:
        raise ProtocolError(f"UID {message.uid}: FETCH responses {[r.text for r in found]!r}")
    size = re.search(rb"RFC822\.SIZE (\d+)", found[0].text)
    if size is None or int(size.group(1)) != len(message.data):
        raise ProtocolError(f"UID {message.uid}: size {found[0].text!r}, expected {len(message.data)}")
    if found[0].literals[0] != message.data:
        raise ProtocolError(
            f"UID {message.uid}: body sha256 {hashlib.sha256(found[0].literals[0]).hexdigest()}"
            f" != {hashlib.sha256(message.data).hexdigest()}"
        )


async def checkHeader(session: IMAPSession, message: Message) -> None:
    _, untagged = await session.command(b"UID FETCH %d (BODY.PEEK[HEADER])" % (message.uid,))
    found = fetches(untagged, message.uid)
    if len(found) != 1 or found[0].literals != [message.header]:
        raise ProtocolError(f"UID {message.uid}: header FETCH {[(r.text, r.literals) for r in found]!r}")


async def checkSearch(session: IMAPSession, message: Message) -> None:
    assert message.seedTag is not None
    _, untagged = await session.command(b"UID SEARCH HEADER X-Soak-Seed %s" % (message.seedTag.encode(),))
    if searchResults(untagged) != [[message.uid]]:
        raise ProtocolError(f"SEARCH {message.seedTag}: {[r.text for r in untagged]!r}")


def newMessage(client: str, rng: random.Random) -> tuple[bytes, bytes]:
    """
    A message of the client's own, with a unique token, lines that need
    POP3 dot-stuffing and 8-bit text; returns (token, message).
    """
    token = b"%s-%016x" % (client.encode(), rng.getrandbits(64))
    lines = [b"line %d of %s \xc3\xa4\xc3\xb6\xc3\xbc" % (index, token) for index in range(rng.randint(1, 400))]
    lines[rng.randrange(len(lines))] = b"."
    lines.append(b".. dot-stuffed")
    header = (
        b"From: Soak <soak@example.test>\r\nTo: %s@example.test\r\nSubject: soak append %s\r\n"
        b"X-Soak-Token: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" % (client.encode(), token, token)
    )
    return token, header + b"\r\n".join(lines) + b"\r\n"


async def append(session: IMAPSession, mailbox: Mailbox, data: bytes, rng: random.Random) -> int:
    """
    APPEND C{data} to INBOX (a synchronising literal or LITERAL+); return
    its UID from APPENDUID.
    """
    tag = session.nextTag()
    if rng.random() < 0.5:
        session.stream.write(tag + b" APPEND INBOX (\\Seen) {%d}\r\n" % (len(data),))
        await session.continuation()
        session.stream.write(data + b"\r\n")
    else:
        session.stream.write(tag + b" APPEND INBOX {%d+}\r\n" % (len(data),) + data + b"\r\n")
    tagged, _ = await session.complete([tag])
    match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", tagged[tag])
    if match is None or int(match.group(1)) != mailbox.uidvalidity:
        raise ProtocolError(f"APPEND: {tagged[tag]!r}")
    return int(match.group(2))


async def appendCycle(session: IMAPSession, mailbox: Mailbox, client: str, rng: random.Random) -> None:
    """
    APPEND a message, read it back, find it, flag it and UID EXPUNGE exactly
    it; then it must be gone.
    """
    token, data = newMessage(client, rng)
    uid = await append(session, mailbox, data, rng)
    await checkBody(session, Message(uid, data))
    _, untagged = await session.command(b"UID SEARCH HEADER X-Soak-Token %s" % (token,))
    if searchResults(untagged) != [[uid]]:
        raise ProtocolError(f"SEARCH token: {[r.text for r in untagged]!r}")
    _, untagged = await session.command(b"UID STORE %d +FLAGS (\\Flagged \\Deleted)" % (uid,))
    flags = [re.search(rb"FLAGS \(([^)]*)\)", response.text) for response in fetches(untagged, uid)]
    if not flags or flags[-1] is None or not {b"\\Flagged", b"\\Deleted"} <= set(flags[-1].group(1).split()):
        raise ProtocolError(f"STORE: {[r.text for r in untagged]!r}")
    _, untagged = await session.command(b"UID EXPUNGE %d" % (uid,))
    if not any(re.match(rb"\* \d+ EXPUNGE\r\n", response.text) for response in untagged):
        raise ProtocolError(f"UID EXPUNGE without EXPUNGE: {[r.text for r in untagged]!r}")
    await checkGone(session, uid)


async def checkGone(session: IMAPSession, uid: int) -> None:
    _, untagged = await session.command(b"UID SEARCH UID %d" % (uid,))
    if searchResults(untagged) != [[]]:
        raise ProtocolError(f"deleted UID {uid} still found: {[r.text for r in untagged]!r}")


async def idle(session: IMAPSession, rng: random.Random) -> None:
    tag = session.nextTag()
    session.stream.write(tag + b" IDLE\r\n")
    await session.continuation()
    await asyncio.sleep(rng.uniform(0.1, 1.0))
    session.stream.write(b"DONE\r\n")
    await session.complete([tag])


async def pipelined(session: IMAPSession, mailbox: Mailbox, rng: random.Random) -> None:
    """
    NOOP, a size FETCH, a SEARCH and a body FETCH in one write.
    """
    sized, searched, fetched = (rng.choice(mailbox.messages) for _ in range(3))
    assert searched.seedTag is not None
    _, untagged = await session.pipeline(
        [
            b"NOOP",
            b"UID FETCH %d (RFC822.SIZE)" % (sized.uid,),
            b"UID SEARCH HEADER X-Soak-Seed %s" % (searched.seedTag.encode(),),
            b"UID FETCH %d (BODY.PEEK[])" % (fetched.uid,),
        ]
    )
    sizes = [re.search(rb"RFC822\.SIZE (\d+)", response.text) for response in fetches(untagged, sized.uid)]
    if not any(size is not None and int(size.group(1)) == len(sized.data) for size in sizes):
        raise ProtocolError(f"pipelined size of UID {sized.uid}: {[r.text for r in untagged]!r}")
    if [searched.uid] not in searchResults(untagged):
        raise ProtocolError(f"pipelined SEARCH: {[r.text for r in untagged]!r}")
    bodies = [literal for response in fetches(untagged, fetched.uid) for literal in response.literals]
    if bodies != [fetched.data]:
        raise ProtocolError(f"pipelined body of UID {fetched.uid}: {len(bodies)} literals, wrong bytes")


async def login(session: IMAPSession, mailbox: Mailbox) -> None:
    await session.command(b'LOGIN "%s" "%s"' % (mailbox.user.encode(), mailbox.password.encode()))


async def select(session: IMAPSession, mailbox: Mailbox) -> None:
    _, untagged = await session.command(b"SELECT INBOX")
    if not any(b"[UIDVALIDITY %d]" % (mailbox.uidvalidity,) in response.text for response in untagged):
        raise ProtocolError(f"SELECT: no UIDVALIDITY {mailbox.uidvalidity}: {[r.text for r in untagged]!r}")


async def missingMailbox(session: IMAPSession, rng: random.Random) -> None:
    await session.command(b'STATUS "soak-missing-%d" (MESSAGES)' % (rng.getrandbits(32),), expect=b"NO")


async def imapSession(context: SoakContext, client: str, mailbox: Mailbox, rng: random.Random) -> None:
    session: IMAPSession | None = None
    try:
        endpoint = rng.choice(context.imapEndpoints)
        session = await context.run(client, f"imap connect {endpoint.tls}", IMAPSession.open(endpoint, context, client))
        await context.run(client, "imap LOGIN", login(session, mailbox))
        await context.run(client, "imap SELECT", select(session, mailbox))
        steps: list[tuple[str, Callable[[IMAPSession], Awaitable[object]]]] = [
            ("imap FETCH header", lambda s: checkHeader(s, rng.choice(mailbox.messages))),
            ("imap FETCH body", lambda s: checkBody(s, rng.choice(mailbox.messages))),
            ("imap SEARCH", lambda s: checkSearch(s, rng.choice(mailbox.messages))),
            ("imap APPEND+STORE+EXPUNGE", lambda s: appendCycle(s, mailbox, client, rng)),
            ("imap IDLE", lambda s: idle(s, rng)),
            ("imap pipelined", lambda s: pipelined(s, mailbox, rng)),
            ("imap expected NO", lambda s: missingMailbox(s, rng)),
        ]
        for name, step in rng.sample(steps, rng.randint(2, len(steps))):
            await context.run(client, name, step(session))
            await asyncio.sleep(rng.uniform(0, 0.05))
        await context.run(client, "imap LOGOUT", session.logout())
    finally:
        if session is not None:
            await session.stream.close()


# -- POP3 ------------------------------------------------------------------------


class POP3Session:
    def __init__(self, stream: LineStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, endpoint: Endpoint, context: SoakContext) -> POP3Session:
        stream = await LineStream.open(endpoint, context)
        session = cls(stream)
        try:
            greeting = await stream.readline()
            if not greeting.startswith(b"+OK"):
                raise ProtocolError(f"greeting {greeting!r}")
            if endpoint.tls == "starttls":
                await session.command(b"STLS")
                await stream.startTLS(context.sslContext)
        except BaseException:
            await stream.close()
            raise
        return session

    async def command(self, line: bytes, expect: bytes = b"+OK") -> bytes:
        self.stream.write(line + b"\r\n")
        reply = await self.stream.readline()
        if not reply.startswith(expect):
            raise ProtocolError(f"{line.split()[0].decode()}: {reply!r}")
        return reply

    async def multiline(self, line: bytes) -> tuple[bytes, bytes]:
        """
        A multi-line command: its status line and its dot-unstuffed body.
        """
        status = await self.command(line)
        body: list[bytes] = []
        for _ in range(MAX_LINES):
            received = await self.stream.readline()
            if received == b".\r\n":
                return status, b"".join(body)
            body.append(received[1:] if received.startswith(b".") else received)
        raise ProtocolError(f"{line!r}: no end of the multi-line reply")

    async def login(self, mailbox: Mailbox, rng: random.Random) -> None:
        if rng.random() < 0.5:
            await self.command(b"USER " + mailbox.user.encode())
            await self.command(b"PASS " + mailbox.password.encode())
        else:
            credentials = base64.b64encode(b"\0%s\0%s" % (mailbox.user.encode(), mailbox.password.encode()))
            await self.command(b"AUTH PLAIN " + credentials)

    async def stat(self) -> tuple[int, int]:
        reply = await self.command(b"STAT")
        match = re.match(rb"\+OK (\d+) (\d+)\r\n$", reply)
        if match is None:
            raise ProtocolError(f"STAT: {reply!r}")
        return int(match.group(1)), int(match.group(2))

    async def listing(self, command: bytes) -> dict[int, bytes]:
        _, body = await self.multiline(command)
        entries: dict[int, bytes] = {}
        for line in body.splitlines():
            number, _, value = line.partition(b" ")
            if not number.isdigit() or not value or int(number) in entries:
                raise ProtocolError(f"{command.decode()}: bad line {line!r}")
            entries[int(number)] = value
        return entries

    async def retrieve(self, number: int, expected: bytes) -> None:
        _, body = await self.multiline(b"RETR %d" % (number,))
        if body != expected:
            raise ProtocolError(
                f"RETR {number}: sha256 {hashlib.sha256(body).hexdigest()} != {hashlib.sha256(expected).hexdigest()}"
            )

    async def top(self, number: int, message: Message, lines: int) -> None:
        _, body = await self.multiline(b"TOP %d %d" % (number, lines))
        if body != message.top(lines):
            raise ProtocolError(f"TOP {number} {lines}: {len(body)} octets, expected {len(message.top(lines))}")

    async def quit(self) -> None:
        await self.command(b"QUIT")
        await self.stream.expectEnd()


async def checkMaildrop(session: POP3Session, mailbox: Mailbox) -> None:
    """
    STAT, LIST and UIDL of a mailbox that holds exactly the seeded messages.
    """
    count, size = await session.stat()
    sizes = [len(message.data) for message in mailbox.messages]
    if (count, size) != (len(sizes), sum(sizes)):
        raise ProtocolError(f"STAT {count} {size}, expected {len(sizes)} {sum(sizes)}")
    listed = await session.listing(b"LIST")
    if listed != {number: b"%d" % (size,) for number, size in enumerate(sizes, 1)}:
        raise ProtocolError(f"LIST {listed!r}")
    uidls = await session.listing(b"UIDL")
    if uidls != dict(enumerate(mailbox.uidls, 1)):
        raise ProtocolError(f"UIDL {uidls!r}, expected {mailbox.uidls!r}")


async def relayRetrieve(session: POP3Session, mailbox: Mailbox, rng: random.Random) -> None:
    number = rng.randrange(len(mailbox.messages))
    await session.retrieve(number + 1, mailbox.messages[number].data)


async def relayTop(session: POP3Session, mailbox: Mailbox, rng: random.Random) -> None:
    number = rng.randrange(len(mailbox.messages))
    await session.top(number + 1, mailbox.messages[number], rng.choice((0, 1, 3, 10_000)))


async def deleteAndReset(session: POP3Session, mailbox: Mailbox, rng: random.Random) -> None:
    """
    DELE marks, RSET unmarks: nothing is deleted at QUIT.
    """
    number = rng.randrange(len(mailbox.messages)) + 1
    await session.command(b"DELE %d" % (number,))
    count, _ = await session.stat()
    if count != len(mailbox.messages) - 1:
        raise ProtocolError(f"STAT after DELE: {count}")
    await session.command(b"RETR %d" % (number,), expect=b"-ERR")
    await session.command(b"RSET")


async def pop3RelaySession(context: SoakContext, client: str, mailbox: Mailbox, rng: random.Random) -> None:
    session: POP3Session | None = None
    try:
        endpoint = rng.choice(context.pop3Endpoints)
        session = await context.run(client, f"pop3 connect {endpoint.tls}", POP3Session.open(endpoint, context))
        await context.run(client, "pop3 login", session.login(mailbox, rng))
        await context.run(client, "pop3 STAT+LIST+UIDL", checkMaildrop(session, mailbox))
        steps: list[tuple[str, Callable[[POP3Session], Awaitable[object]]]] = [
            ("pop3 RETR", lambda s: relayRetrieve(s, mailbox, rng)),
            ("pop3 TOP", lambda s: relayTop(s, mailbox, rng)),
            ("pop3 DELE+RSET", lambda s: deleteAndReset(s, mailbox, rng)),
            ("pop3 NOOP", lambda s: s.command(b"NOOP")),
        ]
        for name, step in rng.sample(steps, rng.randint(1, len(steps))):
            await context.run(client, name, step(session))
            await asyncio.sleep(rng.uniform(0, 0.05))
        await context.run(client, "pop3 QUIT", session.quit())
    finally:
        if session is not None:
            await session.stream.close()


# -- POP3 bridge -----------------------------------------------------------------


@dataclass
class BridgeState:
    """
    What a bridge client deleted last round (to check it is gone).
    """

    deletedUid: int | None = None


def bridgeUidl(mailbox: Mailbox, uid: int) -> bytes:
    return b"%08x%08x" % (uid, mailbox.uidvalidity)


async def bridgeAppend(
    context: SoakContext, client: str, mailbox: Mailbox, state: BridgeState, rng: random.Random
) -> Message:
    """
    Over IMAP: last round's deletion took effect; APPEND a new message.
    """
    session: IMAPSession | None = None
    try:
        endpoint = rng.choice(context.imapEndpoints)
        session = await context.run(
            client, f"bridge imap connect {endpoint.tls}", IMAPSession.open(endpoint, context, client)
        )
        await context.run(client, "bridge imap LOGIN", login(session, mailbox))
        await context.run(client, "bridge imap SELECT", select(session, mailbox))
        if state.deletedUid is not None:
            await context.run(client, "bridge deletion verified", checkGone(session, state.deletedUid))
        _, data = newMessage(client, rng)
        uid = await context.run(client, "bridge imap APPEND", append(session, mailbox, data, rng))
        await context.run(client, "bridge imap LOGOUT", session.logout())
        return Message(uid, data)
    finally:
        if session is not None:
            await session.stream.close()


async def bridgeCheck(session: POP3Session, mailbox: Mailbox, own: Message, rng: random.Random) -> None:
    """
    The snapshot holds the seeded messages first (numbers, UIDLs, sizes)
    and the client's own one; RETR both kinds exactly, DELE the own one.
    """
    count, size = await session.stat()
    listed = await session.listing(b"LIST")
    if len(listed) != count or sum(int(value) for value in listed.values()) != size:
        raise ProtocolError(f"STAT {count} {size} disagrees with LIST {listed!r}")
    uidls = await session.listing(b"UIDL")
    if len(uidls) != count:
        raise ProtocolError(f"UIDL has {len(uidls)} entries, STAT {count}")
    for number, (message, uidl) in enumerate(zip(mailbox.messages, mailbox.uidls, strict=True), 1):
        if uidls.get(number) != uidl or listed.get(number) != b"%d" % (len(message.data),):
            raise ProtocolError(f"seeded message {number}: UIDL {uidls.get(number)!r} LIST {listed.get(number)!r}")
    numbers = [number for number, uidl in uidls.items() if uidl == bridgeUidl(mailbox, own.uid)]
    if len(numbers) != 1 or listed[numbers[0]] != b"%d" % (len(own.data),):
        raise ProtocolError(f"own message UID {own.uid} not in the snapshot once with its size: {numbers}")
    single = await session.command(b"LIST %d" % (numbers[0],))
    if single != b"+OK %d %d\r\n" % (numbers[0], len(own.data)):
        raise ProtocolError(f"LIST {numbers[0]}: {single!r}")
    await session.retrieve(numbers[0], own.data)
    seeded = rng.randrange(len(mailbox.messages))
    if rng.random() < 0.5:
        await session.retrieve(seeded + 1, mailbox.messages[seeded].data)
    else:
        await session.top(seeded + 1, mailbox.messages[seeded], rng.choice((0, 2, 10_000)))
    await session.command(b"DELE %d" % (numbers[0],))


async def bridgeRound(
    context: SoakContext, client: str, mailbox: Mailbox, state: BridgeState, rng: random.Random
) -> None:
    own = await bridgeAppend(context, client, mailbox, state, rng)
    session: POP3Session | None = None
    try:
        endpoint = rng.choice(context.pop3Endpoints)
        session = await context.run(client, f"bridge connect {endpoint.tls}", POP3Session.open(endpoint, context))
        await context.run(client, "bridge login", session.login(mailbox, rng))
        await context.run(client, "bridge STAT+LIST+UIDL+RETR+DELE", bridgeCheck(session, mailbox, own, rng))
        await context.run(client, "bridge QUIT", session.quit())
        state.deletedUid = own.uid
    finally:
        if session is not None:
            await session.stream.close()


# -- clients -----------------------------------------------------------------------


Round = Callable[[SoakContext, str, Mailbox, random.Random], Awaitable[None]]


async def loop(context: SoakContext, client: str, mailbox: Mailbox, round: Round, seed: int) -> None:
    """
    Run rounds until the deadline; an error is recorded and the next round
    starts on a new connection.
    """
    rng = random.Random(seed)
    await asyncio.sleep(rng.uniform(0, 3))
    while time.monotonic() < context.deadline:
        try:
            await round(context, client, mailbox, rng)
        except FAILURES as error:
            context.errors.append(f"{client} ({mailbox.user}): {type(error).__name__}: {error}"[:2000])
            await asyncio.sleep(0.5)
        await asyncio.sleep(rng.uniform(0.1, 0.6))


def imapClient(context: SoakContext, client: str, mailbox: Mailbox, seed: int) -> Awaitable[None]:
    return loop(context, client, mailbox, imapSession, seed)


def pop3RelayClient(context: SoakContext, client: str, mailbox: Mailbox, seed: int) -> Awaitable[None]:
    return loop(context, client, mailbox, pop3RelaySession, seed)


def bridgeClient(context: SoakContext, client: str, mailbox: Mailbox, seed: int) -> Awaitable[None]:
    state = BridgeState()

    async def round(context: SoakContext, client: str, mailbox: Mailbox, rng: random.Random) -> None:
        await bridgeRound(context, client, mailbox, state, rng)

    return loop(context, client, mailbox, round, seed)
