# -*- test-case-name: tests.test_pop3_bridge,tests.test_pop3_bridge_dovecot -*-
"""
The POP3-to-IMAP bridge: a POP3 maildrop backed by one IMAP mailbox.

At login the bridge selects the configured mailbox and takes a snapshot of
its messages (UID and RFC822.SIZE, ordered by UID); POP3 message numbers
are positions in that snapshot.  Messages are always fetched with
C{BODY.PEEK} unless C{bridgeMarkSeen} is set, so reading through POP3 does
not mark them C{\\Seen}.  Deletions are local marks until L{commit}.

A message another client expunges during the session keeps its number and
listed size (the snapshot does not change); fetching it finds nothing
(C{BODY[] NIL}, no section or no FETCH response at all, or a tagged
C{[EXPUNGEISSUED]}), and L{IMAPMaildrop.retrieve} fails with
L{MessageExpunged} before writing anything, so the client gets C{-ERR} and
the session goes on.

Unique ids are C{bridgeUidlFormat} applied to the UID and UIDVALIDITY.
Dovecot's POP3 default (C{%08Xu%08Xv}) writes lower-case hex digits, so
C{{uid:08x}{uidvalidity:08x}} gives the same ids and a client switching
between direct POP3 and the bridge does not download everything again.

Committing deletions never uses a plain C{EXPUNGE} or C{CLOSE}, which
would also remove messages other clients marked C{\\Deleted}:

 - with UIDPLUS: C{UID STORE +FLAGS.SILENT (\\Deleted)}, then
   C{UID EXPUNGE} of exactly those UIDs;
 - else with MOVE and a fallback folder: C{UID MOVE} to that folder;
 - else with a fallback folder: C{UID COPY} to that folder, then
   C{\\Deleted} is set and left for the next expunge by any client (the
   messages stay visible upstream until then, but a fresh POP3 session
   does not hide them either);
 - else the commit fails without touching anything.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from zope.interface import implementer

from mailproxy.config import UpstreamConfig
from mailproxy.imap import mutf7
from mailproxy.imap.syntax import SyntaxError_, quoted, readQuoted
from mailproxy.imap.upstream import UpstreamError, UpstreamSession, connectUpstream
from mailproxy.interfaces import IPOP3Maildrop
from mailproxy.oauth.sasl import Bearer
from mailproxy.pop3 import MessageExpunged, NoSuchMessage
from mailproxy.pop3.imapclient import IMAPCommandClient, IMAPReply

# Keep command lines well below common server limits (Dovecot: 64 KiB).
MAX_SET_LENGTH = 4000
# TOP fetches the body text in growing partial windows.
TOP_FIRST_WINDOW = 16 * 1024
TOP_MAX_WINDOW = 4 * 1024 * 1024

_EXISTS = re.compile(rb"\A\* (\d+) EXISTS\b", re.IGNORECASE)
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH = re.compile(rb"\A\* \d+ FETCH \(", re.IGNORECASE)
_UID = re.compile(rb"[( ]UID (\d+)", re.IGNORECASE)
_SIZE = re.compile(rb"[( ]RFC822\.SIZE (\d+)", re.IGNORECASE)
# A body section announcing a literal at the end of the response so far
# (servers echo BODY[...] for BODY.PEEK[...]; a sloppy one may not).
_SECTION_LITERAL = re.compile(rb"BODY(?:\.PEEK)?\[[^\]]*\](?:<\d+>)? ~?\{\d+\+?\}\r\n\Z", re.IGNORECASE)
# A body section given as a quoted string or NIL instead of a literal.
_SECTION_INLINE = re.compile(rb"BODY(?:\.PEEK)?\[[^\]]*\](?:<\d+>)? (\"|NIL)", re.IGNORECASE)
# RFC 5530: another session expunged (some of) the messages the command named.
_EXPUNGEISSUED = re.compile(rb"\A\[EXPUNGEISSUED\]", re.IGNORECASE)
# What _fetch returns when the message is gone upstream.
_GONE = -1
# TOP holds the header back until the first text window arrives (so that a
# message expunged in between still gets a clean -ERR), up to this size.
TOP_HOLD_LIMIT = 256 * 1024


class BridgeError(UpstreamError):
    """
    The IMAP upstream refused something the bridge needs (selecting the
    mailbox, fetching, deleting), or cannot delete at all.
    """


def uidSets(uids: Iterable[int], maxLength: int = MAX_SET_LENGTH) -> list[bytes]:
    """
    Compress UIDs into IMAP sets of ranges (C{1:5,7,9:12}), each at most
    about C{maxLength} octets long.

    @param uids: UIDs in any order; duplicates are ignored.
    """
    sets: list[bytes] = []
    current: list[bytes] = []
    length = 0
    for first, last in _ranges(sorted(set(uids))):
        item = b"%d" % (first,) if first == last else b"%d:%d" % (first, last)
        if current and length + 1 + len(item) > maxLength:
            sets.append(b",".join(current))
            current, length = [], 0
        current.append(item)
        length += len(item) + 1
    if current:
        sets.append(b",".join(current))
    return sets


def _ranges(uids: list[int]) -> Iterator[tuple[int, int]]:
    if not uids:
        return
    first = last = uids[0]
    for uid in uids[1:]:
        if uid == last + 1:
            last = uid
            continue
        yield first, last
        first = last = uid
    yield first, last


def mailboxArgument(name: str) -> bytes:
    """
    C{name} as an IMAP mailbox argument: modified UTF-7, quoted.
    """
    return quoted(mutf7.encode(name))


class _Holder:
    """
    Hold data back until L{release} (or until more than C{limit} octets are
    held), then pass it, and everything after it, on.
    """

    def __init__(self, write: Callable[[bytes], Any], limit: int) -> None:
        self._write = write
        self._limit = limit
        self._held: list[bytes] = []
        self._size = 0
        self.released = False

    def feed(self, data: bytes) -> None:
        if self.released:
            self._write(data)
            return
        self._held.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held, self._held = self._held, []
        for data in held:
            self._write(data)


class _LineLimiter:
    """
    Pass on data up to and including the C{limit}-th line end.
    """

    def __init__(self, write: Callable[[bytes], Any], limit: int) -> None:
        self._write = write
        self._left = limit

    @property
    def done(self) -> bool:
        return self._left <= 0

    def feed(self, data: bytes) -> None:
        if self._left <= 0 or not data:
            return
        count = data.count(b"\n")
        if count < self._left:
            self._left -= count
            self._write(data)
            return
        position = -1
        for _ in range(self._left):
            position = data.index(b"\n", position + 1)
        self._left = 0
        self._write(data[: position + 1])


# Deleting needs up to a few round trips (STORE, EXPUNGE or MOVE, LOGOUT).
COMMIT_TIMEOUT_FACTOR = 6


@implementer(IPOP3Maildrop)
class IMAPMaildrop:
    """
    A POP3 maildrop over a logged-in IMAP upstream session.

    Build it with L{openMaildrop}; or, given an L{UpstreamSession}, call
    L{open} before anything else.

    @ivar uidValidity: the mailbox's UIDVALIDITY.
    @ivar producer: the upstream transport, an C{IPushProducer}: a server
        streaming L{retrieve} to a slow client may register it with the
        client transport to pause the upstream.
    """

    log = Logger()

    def __init__(
        self,
        session: UpstreamSession,
        upstream: UpstreamConfig,
        clock: Any = None,
        clientAddress: str = "?",
        user: str = "?",
    ) -> None:
        """
        @param user: the upstream user name, for the log.
        """
        self.upstream = upstream
        self.clientAddress = clientAddress
        self.user = user
        self.clock = clock
        self.capabilities = {name.upper() for name in session.capabilities}
        self.client = IMAPCommandClient(
            session.protocol, clock, upstream.responseTimeout, upstream.connectTimeout, clientAddress
        )
        self.producer = session.protocol.transport
        self.uidValidity = 0
        self._uids: array[int] = array("Q")
        self._sizes: array[int] = array("Q")
        self._deleted: set[int] = set()
        self._finished = False

    # -- opening -----------------------------------------------------------

    def pauseProducing(self) -> None:
        """
        The POP3 client is not keeping up: stop reading from the upstream.
        """
        self.client.pauseProducing()

    def resumeProducing(self) -> None:
        self.client.resumeProducing()

    @property
    def connected(self) -> bool:
        """
        C{True} until the upstream connection is lost.
        """
        return self.client.connected

    def open(self) -> Deferred[None]:
        """
        Select the mailbox and take the snapshot.

        @return: a Deferred failing with L{BridgeError} if the mailbox
            cannot be selected or listed.
        """
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        mailbox = mailboxArgument(self.upstream.bridgeMailbox)
        reply = await self.client.command(b"SELECT " + mailbox)
        if not reply.ok:
            raise BridgeError(f"cannot select {self.upstream.bridgeMailbox!r}: {_text(reply)}")
        exists = 0
        for response in reply.untagged:
            match = _EXISTS.match(response)
            if match is not None:
                exists = int(match.group(1))
            match = _UIDVALIDITY.search(response)
            if match is not None and response[:4].upper() == b"* OK":
                self.uidValidity = int(match.group(1))
        if exists == 0:
            return
        sizes: dict[int, int] = {}

        def onUntagged(response: bytes) -> None:
            if _FETCH.match(response) is None:
                return
            uid = _UID.search(response)
            size = _SIZE.search(response)
            if uid is not None and size is not None:
                sizes[int(uid.group(1))] = int(size.group(1))

        reply = await self.client.command(b"UID FETCH 1:* (UID RFC822.SIZE)", onUntagged=onUntagged)
        if not reply.ok:
            raise BridgeError(f"cannot list {self.upstream.bridgeMailbox!r}: {_text(reply)}")
        for uid in sorted(sizes):
            self._uids.append(uid)
            self._sizes.append(sizes[uid])

    # -- IPOP3Maildrop -----------------------------------------------------

    def stat(self) -> tuple[int, int]:
        listing = self.listing()
        return len(listing), sum(size for _, size in listing)

    def listing(self) -> list[tuple[int, int]]:
        deleted = self._deleted
        return [(index + 1, size) for index, size in enumerate(self._sizes) if index + 1 not in deleted]

    def uniqueIds(self) -> list[tuple[int, str]]:
        deleted = self._deleted
        return [(index + 1, self.uniqueId(uid)) for index, uid in enumerate(self._uids) if index + 1 not in deleted]

    def uniqueId(self, uid: int) -> str:
        """
        The POP3 unique id of the message with IMAP UID C{uid}.
        """
        return self.upstream.bridgeUidlFormat.format(uid=uid, uidvalidity=self.uidValidity)

    def retrieve(self, number: int, write: Callable[[bytes], Any], bodyLines: int | None) -> Deferred[None]:
        uid = self._uid(number)
        if bodyLines is None:
            return Deferred.fromCoroutine(self._retrieve(number, uid, write))
        return Deferred.fromCoroutine(self._top(number, uid, write, max(0, bodyLines)))

    def delete(self, number: int) -> None:
        self._uid(number)
        self._deleted.add(number)

    def reset(self) -> None:
        self._deleted.clear()

    def commit(self) -> Deferred[None]:
        """
        Apply the deletions, then log out.

        @return: a Deferred failing with L{BridgeError} (or
            L{UpstreamError} if the connection is lost) if the deletions
            could not all be applied.
        """
        committing = Deferred.fromCoroutine(self._commit())
        if self.clock is not None:
            # A hung upstream must not keep the client waiting forever; the
            # upstream connection is dropped, so nothing half-done continues.
            committing.addTimeout(COMMIT_TIMEOUT_FACTOR * self.upstream.connectTimeout, self.clock)
            committing.addErrback(self._commitTimedOut)
        return committing

    def _commitTimedOut(self, failure: Any) -> None:
        failure.trap(TimeoutError)
        self._finish()
        raise BridgeError("the upstream did not finish the deletions in time")

    def abandon(self) -> None:
        self._finish()

    # -- the rest ----------------------------------------------------------

    def _uid(self, number: int) -> int:
        if not 1 <= number <= len(self._uids) or number in self._deleted:
            raise NoSuchMessage(number)
        return self._uids[number - 1]

    async def _retrieve(self, number: int, uid: int, write: Callable[[bytes], Any]) -> None:
        section = b"BODY[]" if self.upstream.bridgeMarkSeen else b"BODY.PEEK[]"
        if await self._fetch(uid, section, write) == _GONE:
            raise self._expunged(number, uid, "RETR")

    async def _top(self, number: int, uid: int, write: Callable[[bytes], Any], bodyLines: int) -> None:
        holder = _Holder(write, TOP_HOLD_LIMIT)
        if await self._fetch(uid, b"BODY.PEEK[HEADER]", holder.feed) == _GONE:
            raise self._expunged(number, uid, "TOP")
        limiter = _LineLimiter(holder.feed, bodyLines)
        offset = 0
        window = TOP_FIRST_WINDOW
        while not limiter.done:
            got = await self._fetch(uid, b"BODY.PEEK[TEXT]<%d.%d>" % (offset, window), limiter.feed)
            if got == _GONE:
                # Expunged since the header came: still a clean -ERR
                # unless the header had to be let go (then the server drops
                # the client, as for any message failing mid-stream).
                raise self._expunged(number, uid, "TOP")
            holder.release()
            if got < window:
                break
            offset += got
            window = min(window * 2, TOP_MAX_WINDOW)
        holder.release()

    def _expunged(self, number: int, uid: int, command: str) -> MessageExpunged:
        self.log.info(
            "{client} user {user}: {command} {number}: message UID {uid} was expunged upstream "
            "by another session; answering -ERR",
            client=self.clientAddress,
            user=self.user,
            command=command,
            number=number,
            uid=uid,
        )
        return MessageExpunged(number)

    async def _fetch(self, uid: int, item: bytes, write: Callable[[bytes], Any]) -> int:
        """
        Fetch one body section of C{uid}, streaming it to C{write}.

        @return: the octets written, or L{_GONE} (having written nothing)
            if the message is gone: the section is C{NIL} or missing, there
            is no FETCH response for C{uid}, or the tagged reply (OK or NO)
            has C{[EXPUNGEISSUED]}.
        @raise BridgeError: if the upstream answers BAD, or NO without
            C{[EXPUNGEISSUED]} and without data.
        """
        received = 0
        seen = False

        def onLiteral(head: bytes, chunk: bytes, remaining: int) -> None:
            nonlocal received, seen
            if _FETCH.match(head) is None or _SECTION_LITERAL.search(head) is None:
                return
            found = _UID.search(head)
            if found is not None and int(found.group(1)) != uid:
                return
            seen = True
            if chunk:
                received += len(chunk)
                write(chunk)

        reply = await self.client.command(b"UID FETCH %d (%s)" % (uid, item), onLiteral=onLiteral)
        if reply.status == b"BAD":
            raise BridgeError(f"upstream refused to fetch a message: {_text(reply)}")
        if received:
            # Streamed whole already (a literal arrives complete or the
            # connection is lost); whatever the tagged reply says, the
            # client has the section.
            return received
        if _EXPUNGEISSUED.match(reply.text) is not None:
            return _GONE
        if not seen:
            inline = _inlineSection(reply.untagged, uid)
            if inline is not None:
                seen = True
                received = len(inline)
                if inline:
                    write(inline)
        if not seen and not reply.ok:
            raise BridgeError(f"upstream refused to fetch a message: {_text(reply)}")
        return received if seen else _GONE

    async def _commit(self) -> None:
        try:
            if self._deleted:
                await self._applyDeletions(sorted(self._uids[number - 1] for number in self._deleted))
        finally:
            self._finish()

    async def _applyDeletions(self, uids: list[int]) -> None:
        folder = self.upstream.bridgeFallbackFolder
        sets = uidSets(uids)
        if b"UIDPLUS" in self.capabilities:
            for uidSet in sets:
                await self._check(b"UID STORE " + uidSet + b" +FLAGS.SILENT (\\Deleted)")
            for uidSet in sets:
                await self._check(b"UID EXPUNGE " + uidSet)
        elif folder and b"MOVE" in self.capabilities:
            for uidSet in sets:
                await self._toFolder(b"UID MOVE " + uidSet, folder)
        elif folder:
            for uidSet in sets:
                await self._toFolder(b"UID COPY " + uidSet, folder)
            for uidSet in sets:
                await self._check(b"UID STORE " + uidSet + b" +FLAGS.SILENT (\\Deleted)")
        else:
            raise BridgeError(
                "cannot delete: the IMAP upstream supports neither UIDPLUS nor MOVE "
                "and no bridge_fallback_folder is configured"
            )

    async def _toFolder(self, command: bytes, folder: str) -> None:
        line = command + b" " + mailboxArgument(folder)
        reply = await self._deleting(line)
        if not reply.ok and b"[TRYCREATE]" in reply.text.upper():
            await self.client.command(b"CREATE " + mailboxArgument(folder))
            reply = await self._deleting(line)
        if not reply.ok:
            raise BridgeError(f"upstream refused {command.split(b' ')[1].decode()}: {_text(reply)}")

    async def _deleting(self, line: bytes) -> IMAPReply:
        """
        Send a command naming UIDs to delete; once more if the server
        refuses it because another session expunged some of them (its
        EXPUNGE responses came with the refusal, so the rest now stand
        alone).
        """
        reply = await self.client.command(line)
        if not reply.ok and _EXPUNGEISSUED.match(reply.text) is not None:
            reply = await self.client.command(line)
        return reply

    async def _check(self, line: bytes) -> IMAPReply:
        reply = await self._deleting(line)
        if not reply.ok:
            name = b" ".join(line.split(b" ")[:2]).decode("ascii", "replace")
            raise BridgeError(f"upstream refused {name}: {_text(reply)}")
        return reply

    def _finish(self) -> None:
        """
        Log out (without waiting: nothing may be expunged by it anyway) and
        close the connection; never CLOSE or EXPUNGE.
        """
        if self._finished:
            return
        self._finished = True
        if self.client.connected:
            self.client.command(b"LOGOUT").addErrback(lambda _: None)
            self.client.close()


def _inlineSection(untagged: list[bytes], uid: int) -> bytes | None:
    for response in untagged:
        if _FETCH.match(response) is None:
            continue
        found = _UID.search(response)
        if found is not None and int(found.group(1)) != uid:
            continue
        match = _SECTION_INLINE.search(response)
        if match is None:
            continue
        if match.group(1).upper() == b"NIL":
            # No such section: the message was expunged (RFC 3501 has no
            # NIL body section for a message that exists).
            return None
        try:
            return readQuoted(response, match.start(1))[0]
        except SyntaxError_:
            return None
    return None


def _text(reply: IMAPReply) -> str:
    return (reply.status + b" " + reply.text).decode("utf-8", "replace")[:200]


async def openMaildrop(
    reactor: Any, upstream: UpstreamConfig, username: str, password: str | Bearer, clientAddress: str = ""
) -> IMAPMaildrop:
    """
    Log in to the IMAP upstream and take the snapshot of the bridged mailbox.

    @raise UpstreamError: if the upstream cannot be reached or refuses the
        login (C{authenticationFailed} tells which).
    @raise BridgeError: if the mailbox cannot be selected or listed; the
        connection is closed.
    """
    session = await connectUpstream(reactor, upstream, username, password, clientAddress=clientAddress)
    maildrop = IMAPMaildrop(session, upstream, reactor, clientAddress, username)
    try:
        await maildrop.open()
    except BaseException:
        maildrop.abandon()
        raise
    return maildrop
