"""
The POP3-to-IMAP bridge against a real Dovecot: sizes, contents and unique
ids agree with what Dovecot itself says over IMAP and POP3; deletions apply
on commit only and touch nothing else.
"""

from __future__ import annotations

import functools
import imaplib
import poplib
import re
import shutil
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.upstream import UpstreamError
from mailproxy.pop3.bridge import IMAPMaildrop, openMaildrop
from tests.conftest import seedMessages
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
