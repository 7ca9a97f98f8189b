"""
The POP3-to-IMAP bridge against a real Dovecot: sizes, contents and unique
ids agree with what Dovecot itself says over IMAP and POP3; deletions apply
on commit only and touch nothing else; a message another session expunges
is refused as Dovecot's POP3 refuses it.
"""

from __future__ import annotations

import functools
import imaplib
import poplib
import re
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.upstream import UpstreamError
from mailproxy.pop3.bridge import IMAPMaildrop, openMaildrop
from tests.conftest import UPSTREAM_USERS, POP3Proxy, seedMessages
from tests.dovecot import HOST, DovecotUpstream

PASSWORD = "bridgepw"
# What Dovecot 2.3's pop3_uidl_format %08Xu%08Xv really produces.
DOVECOT_UIDL_FORMAT = "{uid:08x}{uidvalidity:08x}"
USERS = ("contents", "uidl", "commit", "abandon", "snapshot", "seen", "top")


def bridgeMessages() -> list[bytes]:
    """
    The shared seed (dot-stuffing candidates, 8-bit, a large attachment)
    plus a few small ones, one with bare LF line ends.
    """
    extra = [
        b"Subject: small %d\r\nFrom: x@example.test\r\n\r\nBody %d\r\n..\r\n.\r\nend\r\n" % (index, index)
        for index in range(5)
    ]
    extra.append(b"Subject: bare LF\nFrom: y@example.test\n\nline one\nline two\n")
    return seedMessages() + extra


@pytest.fixture(scope="module")
def bridgeDovecot() -> Iterator[DovecotUpstream]:
    upstream = DovecotUpstream()
    upstream.addUsers({name: PASSWORD for name in USERS})
    upstream.start()
    try:
        messages = bridgeMessages()
        for name in USERS:
            client = imapClient(upstream, name)
            for message in messages:
                client.append("INBOX", None, None, message)
            client.logout()
        yield upstream
    finally:
        upstream.stop()
        shutil.rmtree(upstream.baseDir, ignore_errors=True)


@pytest.fixture(scope="class")
def attachDovecot(request: Any, bridgeDovecot: DovecotUpstream) -> None:
    request.cls.dovecot = bridgeDovecot


def imapClient(upstream: DovecotUpstream, name: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    client.login(name, PASSWORD)
    return client


def asDeferred(method: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    @functools.wraps(method)
    def wrapper(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(method(self))

    return wrapper


@pytest.mark.usefixtures("attachDovecot")
class BridgeDovecotTests(TestCase):
    dovecot: DovecotUpstream
    timeout = 30

    def config(self, **options: Any) -> UpstreamConfig:
        return UpstreamConfig("d", "127.0.0.1", self.dovecot.ports["imap"], TLSMode.PLAIN, **options)

    async def open(self, user: str, **options: Any) -> IMAPMaildrop:
        return await openMaildrop(reactor, self.config(**options), user, PASSWORD, "127.0.0.1:1")

    async def finish(self, maildrop: IMAPMaildrop, commit: bool = True) -> None:
        """
        Commit (or abandon) and wait until the upstream connection is gone.
        """
        closed = maildrop.client.protocol.closed
        if commit:
            await maildrop.commit()
        else:
            maildrop.abandon()
        await closed

    async def retrieve(self, maildrop: IMAPMaildrop, number: int, bodyLines: int | None = None) -> bytes:
        chunks: list[bytes] = []
        await maildrop.retrieve(number, chunks.append, bodyLines)
        return b"".join(chunks)

    def imapUids(self, user: str) -> list[int]:
        client = imapClient(self.dovecot, user)
        try:
            client.select("INBOX")
            _, data = client.uid("SEARCH", "ALL")
            return [int(uid) for uid in data[0].split()]
        finally:
            client.logout()

    def imapBodies(self, user: str) -> dict[int, bytes]:
        client = imapClient(self.dovecot, user)
        try:
            client.select("INBOX", readonly=True)
            _, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
            bodies: dict[int, bytes] = {}
            for item in data:
                if isinstance(item, tuple):
                    match = re.search(rb"UID (\d+)", item[0])
                    assert match is not None
                    bodies[int(match.group(1))] = item[1]
            return bodies
        finally:
            client.logout()

    @asDeferred
    async def test_sizes_and_contents(self) -> None:
        """Listed sizes equal the octets RETR sends and Dovecot's own BODY[]."""
        direct = self.imapBodies("contents")
        maildrop = await self.open("contents")
        listing = maildrop.listing()
        self.assertEqual(len(listing), len(bridgeMessages()))
        self.assertEqual([uid for uid in maildrop._uids], sorted(direct))
        for (number, size), uid in zip(listing, sorted(direct), strict=True):
            data = await self.retrieve(maildrop, number)
            self.assertEqual(len(data), size, f"message {number}")
            self.assertEqual(data, direct[uid], f"message {number}")
            self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertEqual(maildrop.stat(), (len(listing), sum(size for _, size in listing)))
        self.assertIn(b"\r\n.\r\n", b"".join([await self.retrieve(maildrop, 1)]))
        self.assertIn("Größe".encode(), await self.retrieve(maildrop, 2))
        await self.finish(maildrop)
        self.assertEqual(self.imapBodies("contents"), direct)

    @asDeferred
    async def test_top(self) -> None:
        """TOP gives the header, the blank line and the first lines of the text."""
        direct = self.imapBodies("top")
        maildrop = await self.open("top")
        for number, uid in enumerate(sorted(direct), start=1):
            whole = direct[uid]
            header, _, text = whole.partition(b"\r\n\r\n")
            for lines in (0, 1, 3, 100000):
                top = await self.retrieve(maildrop, number, lines)
                expected = header + b"\r\n\r\n" + b"".join(text.splitlines(keepends=True)[:lines])
                self.assertEqual(top, expected, f"message {number}, {lines} lines")
        await self.finish(maildrop)

    @asDeferred
    async def test_uidl_matches_dovecot_pop3(self) -> None:
        """
        UIDLs are stable across sessions and equal Dovecot's POP3 UIDLs.

        Dovecot's C{%08Xu%08Xv} writes lower-case hex digits, so the
        matching format is C{{uid:08x}{uidvalidity:08x}}.
        """
        first = await self.open("uidl", bridgeUidlFormat=DOVECOT_UIDL_FORMAT)
        firstIds = first.uniqueIds()
        await self.finish(first)
        second = await self.open("uidl", bridgeUidlFormat=DOVECOT_UIDL_FORMAT)
        self.assertEqual(second.uniqueIds(), firstIds)
        await self.finish(second, commit=False)

        pop = poplib.POP3(HOST, self.dovecot.ports["pop3"], timeout=10)
        try:
            pop.user("uidl")
            pop.pass_(PASSWORD)
            _, lines, _ = pop.uidl()
            direct = [tuple(line.decode().split(" ", 1)) for line in lines]
            _, sizes, _ = pop.list()
            directSizes = [tuple(int(field) for field in line.split()) for line in sizes]
        finally:
            pop.quit()
        self.assertEqual([(str(number), uid) for number, uid in firstIds], direct)
        self.assertEqual(second.listing(), directSizes)

    @asDeferred
    async def test_delete_and_commit(self) -> None:
        """Exactly the marked messages go; another client's \\Deleted stays."""
        before = self.imapUids("commit")
        client = imapClient(self.dovecot, "commit")
        client.select("INBOX")
        client.uid("STORE", str(before[6]), "+FLAGS", "(\\Deleted)")
        client.logout()

        maildrop = await self.open("commit")
        maildrop.delete(2)
        maildrop.delete(5)
        maildrop.delete(6)
        maildrop.reset()
        maildrop.delete(2)
        maildrop.delete(5)
        await self.finish(maildrop)
        self.assertEqual(self.imapUids("commit"), [uid for index, uid in enumerate(before) if index not in (1, 4)])

        again = await self.open("commit")
        self.assertEqual(len(again.listing()), len(before) - 2)
        await self.finish(again)

    @asDeferred
    async def test_delete_and_abandon(self) -> None:
        """Without commit nothing is deleted, not even flagged."""
        before = self.imapUids("abandon")
        maildrop = await self.open("abandon")
        maildrop.delete(1)
        maildrop.delete(3)
        await self.finish(maildrop, commit=False)
        self.assertEqual(self.imapUids("abandon"), before)
        client = imapClient(self.dovecot, "abandon")
        client.select("INBOX", readonly=True)
        _, data = client.uid("SEARCH", "DELETED")
        client.logout()
        self.assertEqual(data, [b""])

    @asDeferred
    async def test_snapshot(self) -> None:
        """A message arriving during the session shows in the next one."""
        maildrop = await self.open("snapshot")
        count = maildrop.stat()[0]
        client = imapClient(self.dovecot, "snapshot")
        client.append("INBOX", None, None, b"Subject: late\r\n\r\nlate\r\n")
        client.logout()
        self.assertEqual(maildrop.stat()[0], count)
        self.assertEqual(len(maildrop.uniqueIds()), count)
        await self.finish(maildrop)
        again = await self.open("snapshot")
        self.assertEqual(again.stat()[0], count + 1)
        self.assertEqual(await self.retrieve(again, count + 1), b"Subject: late\r\n\r\nlate\r\n")
        await self.finish(again)

    def seenUids(self, user: str) -> list[int]:
        client = imapClient(self.dovecot, user)
        try:
            client.select("INBOX", readonly=True)
            _, data = client.uid("SEARCH", "SEEN")
            return [int(uid) for uid in data[0].split()]
        finally:
            client.logout()

    @asDeferred
    async def test_mark_seen(self) -> None:
        """RETR and TOP peek unless bridge_mark_seen; then RETR marks \\Seen."""
        maildrop = await self.open("seen")
        await self.retrieve(maildrop, 1)
        await self.retrieve(maildrop, 2, 1)
        await self.finish(maildrop)
        self.assertEqual(self.seenUids("seen"), [])
        marking = await self.open("seen", bridgeMarkSeen=True)
        await self.retrieve(marking, 2, 1)
        await self.retrieve(marking, 3)
        await self.finish(marking)
        self.assertEqual(self.seenUids("seen"), [marking._uids[2]])

    @asDeferred
    async def test_wrong_password(self) -> None:
        with self.assertRaises(UpstreamError) as caught:
            await openMaildrop(reactor, self.config(), "contents", "wrong")
        self.assertTrue(caught.exception.authenticationFailed)

    @asDeferred
    async def test_missing_mailbox(self) -> None:
        with self.assertRaises(UpstreamError) as caught:
            await openMaildrop(reactor, self.config(bridgeMailbox="Nope"), "contents", PASSWORD)
        self.assertIn("cannot select", str(caught.exception))


def expungeDirect(client: imaplib.IMAP4, uid: int) -> None:
    client.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
    client.uid("EXPUNGE", str(uid))


def inboxUids(client: imaplib.IMAP4) -> list[int]:
    client.noop()
    _, data = client.uid("SEARCH", "ALL")
    return [int(uid) for uid in data[0].split()]


def test_message_expunged_by_another_session(pop3Proxy: POP3Proxy, dovecot: DovecotUpstream) -> None:
    """
    RETR and TOP of a message another IMAP session expunged after the POP3
    login answer -ERR through the bridge, word for word what Dovecot's own
    POP3 answers, never an empty +OK message; the session goes on: the
    snapshot is unchanged, other messages are served whole, and QUIT
    commits the other deletions.

    User pete (bridged) gets three messages of its own, removed again
    afterwards.
    """
    user = "pete"
    password = UPSTREAM_USERS[user]
    messages = [
        b"Subject: expunge test %d\r\nFrom: z@example.test\r\n\r\nline one %d\r\n.\r\nline three\r\n" % (n, n)
        for n in range(3)
    ]
    direct = imaplib.IMAP4(HOST, dovecot.ports["imap"], timeout=30)
    direct.login(user, password)
    direct.select("INBOX")
    before = inboxUids(direct)
    for message in messages:
        direct.append("INBOX", None, None, message)
    ours = inboxUids(direct)[len(before) :]
    assert len(ours) == 3
    logStart = len(pop3Proxy.process.log())
    bridged = pop = None
    restored = False
    try:
        bridged = poplib.POP3(HOST, pop3Proxy.ports["plain"], timeout=30)
        bridged.user(user)
        bridged.pass_(password)
        pop = poplib.POP3(HOST, dovecot.ports["pop3"], timeout=30)
        pop.user(user)
        pop.pass_(password)
        count, octets = bridged.stat()
        assert count == len(before) + 3
        listing = bridged.list()[1]
        uidls = bridged.uidl()[1]
        first, victim, last = count - 2, count - 1, count
        assert bridged.top(victim, 0)[1][0] == b"Subject: expunge test 1"

        expungeDirect(direct, ours[1])
        assert inboxUids(direct) == [*before, ours[0], ours[2]]

        with pytest.raises(poplib.error_proto) as dovecotSays:
            pop.retr(victim)
        with pytest.raises(poplib.error_proto) as caught:
            bridged.retr(victim)
        assert caught.value.args[0] == dovecotSays.value.args[0] == b"-ERR Message %d expunged." % (victim,)
        with pytest.raises(poplib.error_proto) as caught:
            bridged.top(victim, 1)
        assert caught.value.args[0] == b"-ERR Message %d expunged." % (victim,)
        with pytest.raises(poplib.error_proto):
            bridged.retr(victim)

        assert bridged.stat() == (count, octets)
        assert bridged.list()[1] == listing
        assert bridged.uidl()[1] == uidls
        for number, message in ((last, messages[2]), (first, messages[0])):
            _, lines, size = bridged.retr(number)
            assert b"\r\n".join(lines) + b"\r\n" == message
            assert listing[number - 1] == b"%d %d" % (number, len(message))
        assert bridged.top(last, 1)[1] == [b"Subject: expunge test 2", b"From: z@example.test", b"", b"line one 2"]
        bridged.dele(first)
        bridged.dele(victim)
        assert bridged.quit().startswith(b"+OK")
        bridged = None
        assert inboxUids(direct) == [*before, ours[2]]
        _, data = direct.uid("FETCH", str(ours[2]), "(BODY.PEEK[])")
        assert isinstance(data[0], tuple) and data[0][1] == messages[2]

        log = ""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            log = pop3Proxy.process.log()[logStart:]
            if f"user {user}: TOP {victim}:" in log:
                break
            time.sleep(0.05)
        logLines = [line for line in log.splitlines() if f"user {user}: " in line and "expunged" in line]
        assert [line.split(f"user {user}: ")[1].split(":")[0] for line in logLines[-3:]] == [
            f"RETR {victim}",
            f"TOP {victim}",
            f"RETR {victim}",
        ], logLines
        assert f"UID {ours[1]} " in logLines[-1] and "Traceback" not in log and password not in log
    finally:
        for client in (bridged, pop):
            if client is not None:
                client.close()
        leftovers = [uid for uid in inboxUids(direct) if uid in ours]
        if leftovers:
            direct.uid("STORE", ",".join(map(str, leftovers)), "+FLAGS.SILENT", "(\\Deleted)")
            direct.uid("EXPUNGE", ",".join(map(str, leftovers)))
        restored = inboxUids(direct) == before
        direct.logout()
    assert restored
