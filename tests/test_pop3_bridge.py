"""
The POP3-to-IMAP bridge and its IMAP command client, against a scripted
upstream in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.config import TLSMode, UpstreamConfig
from mailproxy.imap.upstream import UpstreamError, UpstreamIMAPProtocol, UpstreamSession
from mailproxy.interfaces import IPOP3Maildrop
from mailproxy.pop3 import MessageExpunged, NoSuchMessage
from mailproxy.pop3.bridge import COMMIT_TIMEOUT_FACTOR, BridgeError, IMAPMaildrop, uidSets
from mailproxy.pop3.imapclient import IMAPCommandClient
from mailproxy.pop3.transaction import MaildropSession

CAPABILITIES = [b"IMAP4rev1", b"UIDPLUS", b"MOVE", b"LITERAL+"]

SELECT_REPLY = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
    b"* %d EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"
    b"* OK [UIDNEXT 40] Predicted next UID\r\n"
    b"pb1 OK [READ-WRITE] Select completed.\r\n"
)


def connected() -> tuple[UpstreamIMAPProtocol, StringTransport]:
    protocol = UpstreamIMAPProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def sent(transport: StringTransport) -> bytes:
    value: bytes = transport.value()
    transport.clear()
    return value


class CommandClientTests(SynchronousTestCase):
    def test_tags_and_queue(self) -> None:
        """Commands get unique tags and go out one at a time."""
        protocol, transport = connected()
        client = IMAPCommandClient(protocol)
        first = client.command(b"NOOP")
        second = client.command(b"CHECK")
        self.assertEqual(sent(transport), b"pb1 NOOP\r\n")
        protocol.dataReceived(b"* 3 EXISTS\r\npb1 OK done\r\n")
        reply = self.successResultOf(first)
        self.assertEqual((reply.status, reply.text, reply.untagged), (b"OK", b"done", [b"* 3 EXISTS\r\n"]))
        self.assertEqual(sent(transport), b"pb2 CHECK\r\n")
        self.assertNoResult(second)
        protocol.dataReceived(b"pb2 no [X] nope\r\n")
        reply = self.successResultOf(second)
        self.assertEqual((reply.status, reply.text, reply.ok), (b"NO", b"[X] nope", False))

    def test_buffered_literal(self) -> None:
        """Without onLiteral, literals stay in the untagged response."""
        protocol, transport = connected()
        client = IMAPCommandClient(protocol)
        done = client.command(b"FETCH 1 BODY[]")
        protocol.dataReceived(b"* 1 FETCH (BODY[] {5}\r\nab")
        protocol.dataReceived(b"cde)\r\npb1 OK\r\n")
        reply = self.successResultOf(done)
        self.assertEqual(reply.untagged, [b"* 1 FETCH (BODY[] {5}\r\nabcde)\r\n"])
        self.assertEqual(reply.text, b"")

    def test_streamed_literal(self) -> None:
        """With onLiteral, literal chunks are handed over as they arrive."""
        protocol, transport = connected()
        client = IMAPCommandClient(protocol)
        chunks: list[tuple[bytes, bytes, int]] = []
        done = client.command(b"X", onLiteral=lambda *args: chunks.append(args))
        protocol.dataReceived(b"* 1 FETCH (UID 4 BODY[] {5}\r\nab")
        protocol.dataReceived(b"cde UID 4)\r\n")
        head = b"* 1 FETCH (UID 4 BODY[] {5}\r\n"
        self.assertEqual(chunks, [(head, b"ab", 3), (head, b"cde", 0)])
        protocol.dataReceived(b"pb1 OK\r\n")
        self.assertEqual(self.successResultOf(done).untagged, [b"* 1 FETCH (UID 4 BODY[] {5}\r\n UID 4)\r\n"])

    def test_connection_lost_fails_pending(self) -> None:
        """A lost connection fails the running and the queued commands."""
        protocol, transport = connected()
        client = IMAPCommandClient(protocol)
        first = client.command(b"NOOP")
        second = client.command(b"NOOP")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(first, UpstreamError)
        self.failureResultOf(second, UpstreamError)
        self.failureResultOf(client.command(b"NOOP"), UpstreamError)
        self.assertFalse(client.connected)

    def test_unsolicited_between_commands(self) -> None:
        """Untagged data with no command running is dropped."""
        protocol, transport = connected()
        client = IMAPCommandClient(protocol)
        protocol.dataReceived(b"* 5 EXISTS\r\n")
        done = client.command(b"NOOP")
        protocol.dataReceived(b"pb1 OK\r\n")
        self.assertEqual(self.successResultOf(done).untagged, [])

    def test_rejects_line_breaks(self) -> None:
        protocol, _ = connected()
        client = IMAPCommandClient(protocol)
        self.assertRaises(ValueError, client.command, b"NOOP\r\nLOGOUT")


class UidSetTests(SynchronousTestCase):
    def test_ranges(self) -> None:
        self.assertEqual(uidSets([9, 1, 2, 3, 4, 5, 7, 10, 11, 12, 3]), [b"1:5,7,9:12"])

    def test_single_and_empty(self) -> None:
        self.assertEqual(uidSets([42]), [b"42"])
        self.assertEqual(uidSets([]), [])

    def test_split_long_sets(self) -> None:
        uids = list(range(1, 20000, 2))
        sets = uidSets(uids, maxLength=1000)
        self.assertGreater(len(sets), 1)
        self.assertTrue(all(len(uidSet) <= 1000 for uidSet in sets))
        rejoined = [int(item) for uidSet in sets for item in uidSet.split(b",")]
        self.assertEqual(rejoined, uids)


class Upstream:
    """
    A maildrop opened against a scripted upstream.
    """

    def __init__(self, test: SynchronousTestCase, capabilities: list[bytes] | None = None, **options: Any) -> None:
        self.protocol, self.transport = connected()
        config = UpstreamConfig("d", "127.0.0.1", 143, TLSMode.PLAIN, **options)
        session = UpstreamSession(self.protocol, CAPABILITIES if capabilities is None else capabilities)
        self.maildrop = IMAPMaildrop(session, config)
        self.test = test

    def open(self, fetchLines: bytes, exists: int) -> None:
        opened = self.maildrop.open()
        self.test.assertEqual(self.sent(), b'pb1 SELECT "INBOX"\r\n')
        self.feed(SELECT_REPLY % (exists,))
        if exists:
            self.test.assertEqual(self.sent(), b"pb2 UID FETCH 1:* (UID RFC822.SIZE)\r\n")
            self.feed(fetchLines + b"pb2 OK Fetch completed.\r\n")
        self.test.successResultOf(opened)

    def sent(self) -> bytes:
        return sent(self.transport)

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


HEADER_REPLY = b"* 1 FETCH (UID 3 BODY[HEADER] {5}\r\nH\r\n\r\n)\r\npb3 OK\r\n"

SNAPSHOT = (
    b"* 2 FETCH (UID 7 RFC822.SIZE 200)\r\n"
    b"* 1 FETCH (UID 3 RFC822.SIZE 100)\r\n"
    b"* 3 FETCH (RFC822.SIZE 300 UID 12)\r\n"
    b"* 3 FETCH (FLAGS (\\Seen))\r\n"
)


class SnapshotTests(SynchronousTestCase):
    def opened(self, **options: Any) -> Upstream:
        upstream = Upstream(self, **options)
        upstream.open(SNAPSHOT, 3)
        return upstream

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IPOP3Maildrop, self.opened().maildrop))

    def test_snapshot_ordered_by_uid(self) -> None:
        maildrop = self.opened().maildrop
        self.assertEqual(maildrop.uidValidity, 1700000000)
        self.assertEqual(maildrop.listing(), [(1, 100), (2, 200), (3, 300)])
        self.assertEqual(maildrop.stat(), (3, 600))

    def test_fifty_thousand_messages_in_one_listing(self) -> None:
        """A 50,000-message maildrop is snapshotted from one UID FETCH command, in UID order."""
        upstream = Upstream(self)
        lines = b"".join(
            b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (number, 2 * number + 7, 1000 + number % 97)
            for number in range(1, 50001)
        )
        upstream.open(lines, 50000)
        maildrop = upstream.maildrop
        count, octets = maildrop.stat()
        self.assertEqual(count, 50000)
        self.assertEqual(octets, sum(1000 + number % 97 for number in range(1, 50001)))
        self.assertEqual(maildrop.listing()[-1], (50000, 1000 + 50000 % 97))
        self.assertEqual(maildrop.uniqueIds()[0][1], "00000009" + "6553f100")

    def test_uidl_default_format(self) -> None:
        """The default matches what Dovecot's %08Xu%08Xv writes: lower-case hex."""
        maildrop = self.opened().maildrop
        self.assertEqual(
            maildrop.uniqueIds(), [(1, "000000036553f100"), (2, "000000076553f100"), (3, "0000000c6553f100")]
        )

    def test_uidl_custom_format(self) -> None:
        """A configured format uses UIDVALIDITY and UID as given."""
        maildrop = self.opened(bridgeUidlFormat="{uidvalidity}.{uid}").maildrop
        self.assertEqual(maildrop.uniqueIds()[0], (1, "1700000000.3"))

    def test_empty_mailbox(self) -> None:
        """An empty mailbox is not listed with a sequence set at all."""
        upstream = Upstream(self)
        upstream.open(b"", 0)
        self.assertEqual(upstream.sent(), b"")
        self.assertEqual(upstream.maildrop.stat(), (0, 0))
        self.assertEqual(upstream.maildrop.listing(), [])
        self.assertRaises(NoSuchMessage, upstream.maildrop.retrieve, 1, lambda data: None, None)

    def test_select_refused(self) -> None:
        upstream = Upstream(self, bridgeMailbox="Posteingang ü")
        opened = upstream.maildrop.open()
        self.assertEqual(upstream.sent(), b'pb1 SELECT "Posteingang &APw-"\r\n')
        upstream.feed(b"pb1 NO Mailbox doesn't exist\r\n")
        self.assertIn("cannot select", str(self.failureResultOf(opened, BridgeError).value))


class RetrieveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = Upstream(self)
        self.upstream.open(SNAPSHOT, 3)
        self.written: list[bytes] = []

    def test_retrieve_streams_chunks(self) -> None:
        """RETR peeks and passes literal chunks on as they arrive."""
        done = self.upstream.maildrop.retrieve(2, self.written.append, None)
        self.assertEqual(self.upstream.sent(), b"pb3 UID FETCH 7 (BODY.PEEK[])\r\n")
        self.upstream.feed(b"* 2 FETCH (UID 7 BODY[] {14}\r\nSubj")
        self.assertEqual(self.written, [b"Subj"])
        self.upstream.feed(b"ect: x\r\n")
        self.upstream.feed(b"\r\n)\r\n")
        self.assertNoResult(done)
        self.upstream.feed(b"pb3 OK Fetch completed.\r\n")
        self.successResultOf(done)
        self.assertEqual(self.written, [b"Subj", b"ect: x\r\n", b"\r\n"])

    def test_retrieve_marks_seen_when_configured(self) -> None:
        upstream = Upstream(self, bridgeMarkSeen=True)
        upstream.open(SNAPSHOT, 3)
        upstream.maildrop.retrieve(1, self.written.append, None)
        self.assertEqual(upstream.sent(), b"pb3 UID FETCH 3 (BODY[])\r\n")

    def test_retrieve_ignores_other_messages(self) -> None:
        """Unsolicited FETCH data of other UIDs is not written."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, None)
        self.upstream.feed(b"* 9 FETCH (UID 30 BODY[] {3}\r\nxyz)\r\n* 1 FETCH (UID 3 BODY[] {2}\r\nok)\r\npb3 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(self.written, [b"ok"])

    def test_retrieve_vanished(self) -> None:
        """No FETCH data: the message is gone upstream."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, None)
        self.upstream.feed(b"pb3 OK Fetch completed.\r\n")
        self.assertEqual(self.failureResultOf(done, MessageExpunged).value.number, 1)
        self.assertEqual(self.written, [])

    def test_retrieve_quoted(self) -> None:
        """A section sent as a quoted string is written too."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, None)
        self.upstream.feed(b'* 1 FETCH (UID 3 BODY[] "a\\"b")\r\npb3 OK\r\n')
        self.successResultOf(done)
        self.assertEqual(self.written, [b'a"b'])

    def test_retrieve_connection_lost(self) -> None:
        done = self.upstream.maildrop.retrieve(1, self.written.append, None)
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[] {20}\r\npartial")
        self.upstream.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, UpstreamError)

    def test_no_such_number(self) -> None:
        for number in (0, 4, -1):
            self.assertRaises(NoSuchMessage, self.upstream.maildrop.retrieve, number, self.written.append, None)

    def test_top_zero_lines(self) -> None:
        """TOP n 0 fetches the header (with its blank line) only."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, 0)
        self.assertEqual(self.upstream.sent(), b"pb3 UID FETCH 3 (BODY.PEEK[HEADER])\r\n")
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[HEADER] {12}\r\nSubject:\r\n\r\n)\r\npb3 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(b"".join(self.written), b"Subject:\r\n\r\n")
        self.assertEqual(self.upstream.sent(), b"")

    def test_top_counts_lines_across_chunks(self) -> None:
        """TOP stops after the k-th line end, wherever chunks split."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, 3)
        self.upstream.feed(HEADER_REPLY)
        self.assertEqual(
            self.upstream.sent(),
            b"pb3 UID FETCH 3 (BODY.PEEK[HEADER])\r\npb4 UID FETCH 3 (BODY.PEEK[TEXT]<0.16384>)\r\n",
        )
        body = b"one\r\ntw" + b"o\r" + b"\nthree\r\nfour\r\nfive\r\n"
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[TEXT]<0> {%d}\r\none\r\ntw" % (len(body),))
        self.upstream.feed(b"o\r")
        self.upstream.feed(b"\nthree\r\nfo")
        self.upstream.feed(b"ur\r\nfive\r\n)\r\npb4 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(b"".join(self.written), b"H\r\n\r\none\r\ntwo\r\nthree\r\n")

    def test_top_more_lines_than_text(self) -> None:
        done = self.upstream.maildrop.retrieve(1, self.written.append, 10)
        self.upstream.feed(HEADER_REPLY)
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[TEXT]<0> {6}\r\na\r\nb\r\n)\r\npb4 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(b"".join(self.written), b"H\r\n\r\na\r\nb\r\n")

    def test_top_fetches_further_windows(self) -> None:
        """A long first line makes TOP ask for the next, larger window."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, 1)
        self.upstream.feed(HEADER_REPLY)
        self.upstream.sent()
        window = b"x" * 16384
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[TEXT]<0> {16384}\r\n" + window + b")\r\npb4 OK\r\n")
        self.assertEqual(self.upstream.sent(), b"pb5 UID FETCH 3 (BODY.PEEK[TEXT]<16384.32768>)\r\n")
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[TEXT]<16384> {6}\r\nyy\r\nzz)\r\npb5 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(b"".join(self.written), b"H\r\n\r\n" + window + b"yy\r\n")

    def test_top_empty_window(self) -> None:
        """A zero-length literal ends the text."""
        done = self.upstream.maildrop.retrieve(1, self.written.append, 2)
        self.upstream.feed(HEADER_REPLY)
        self.upstream.feed(b"* 1 FETCH (UID 3 BODY[TEXT]<0> {0}\r\n)\r\npb4 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(b"".join(self.written), b"H\r\n\r\n")

    def test_top_vanished(self) -> None:
        done = self.upstream.maildrop.retrieve(1, self.written.append, 2)
        self.upstream.feed(b"pb3 OK\r\n")
        self.failureResultOf(done, MessageExpunged)


# What Dovecot 2.3 answers to a UID FETCH of a message another session has
# expunged (seen by tests.test_pop3_bridge_dovecot): the section is NIL and
# the tagged OK has EXPUNGEISSUED.
EXPUNGED_NIL = (
    b"* 2 FETCH (UID 7 BODY[] NIL)\r\n* 2 EXPUNGE\r\npb3 OK [EXPUNGEISSUED] Some messages were already expunged.\r\n"
)


class ExpungedElsewhereTests(SynchronousTestCase):
    """
    A message of the snapshot that another session expunged: every way an
    IMAP server may say so fails the retrieval with L{MessageExpunged}
    before anything is written, and the maildrop stays usable.
    """

    def setUp(self) -> None:
        self.upstream = Upstream(self)
        self.upstream.open(SNAPSHOT, 3)
        self.written: list[bytes] = []

    def assertExpunged(self, reply: bytes, bodyLines: int | None = None, command: bytes = b"BODY.PEEK[]") -> None:
        done = self.upstream.maildrop.retrieve(2, self.written.append, bodyLines)
        self.assertEqual(self.upstream.sent(), b"pb3 UID FETCH 7 (%s)\r\n" % (command,))
        self.upstream.feed(reply)
        self.assertEqual(self.failureResultOf(done, MessageExpunged).value.number, 2)
        self.assertEqual(self.written, [])
        self.assertStillUsable()

    def assertStillUsable(self) -> None:
        """The snapshot is unchanged and other messages are still served."""
        maildrop = self.upstream.maildrop
        self.assertEqual(maildrop.listing(), [(1, 100), (2, 200), (3, 300)])
        self.assertEqual(maildrop.stat(), (3, 600))
        self.assertTrue(maildrop.connected)
        done = maildrop.retrieve(3, self.written.append, None)
        self.assertEqual(self.upstream.sent(), b"pb4 UID FETCH 12 (BODY.PEEK[])\r\n")
        self.upstream.feed(b"* 3 FETCH (UID 12 BODY[] {5}\r\nthree)\r\npb4 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(self.written, [b"three"])

    def test_body_nil_and_expungeissued(self) -> None:
        """Dovecot's answer: BODY[] NIL, then OK [EXPUNGEISSUED]."""
        self.assertExpunged(EXPUNGED_NIL)

    def test_body_nil(self) -> None:
        """A NIL section alone is enough (never an empty message)."""
        self.assertExpunged(b"* 2 FETCH (UID 7 BODY[] NIL)\r\npb3 OK Fetch completed.\r\n")

    def test_peek_echoed_nil(self) -> None:
        """A server echoing BODY.PEEK[] in its response is understood too."""
        self.assertExpunged(b"* 2 FETCH (UID 7 BODY.PEEK[] NIL)\r\npb3 OK Fetch completed.\r\n")

    def test_section_missing(self) -> None:
        """A FETCH response for the UID without the section."""
        self.assertExpunged(b"* 2 FETCH (UID 7 FLAGS (\\Seen))\r\npb3 OK Fetch completed.\r\n")

    def test_no_fetch_response(self) -> None:
        """No FETCH response at all (the expunge was already reported)."""
        self.assertExpunged(b"pb3 OK Fetch completed.\r\n")

    def test_other_uid_only(self) -> None:
        """Another message's data does not stand in for the missing one."""
        self.assertExpunged(b"* 1 FETCH (UID 3 BODY[] {2}\r\nok)\r\npb3 OK Fetch completed.\r\n")

    def test_no_expungeissued(self) -> None:
        """A tagged NO [EXPUNGEISSUED]."""
        self.assertExpunged(b"pb3 NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n")

    def test_ok_expungeissued_with_empty_literal(self) -> None:
        """EXPUNGEISSUED with an empty section: gone, not an empty message."""
        self.assertExpunged(b"* 2 FETCH (UID 7 BODY[] {0}\r\n)\r\npb3 OK [expungeissued] gone\r\n")

    def test_ok_expungeissued_with_quoted_section(self) -> None:
        """EXPUNGEISSUED wins over a quoted section not yet written."""
        self.assertExpunged(b'* 2 FETCH (UID 7 BODY[] "x")\r\npb3 OK [EXPUNGEISSUED] gone\r\n')

    def test_whole_literal_then_expungeissued(self) -> None:
        """A section already streamed whole counts, whatever the tagged reply says."""
        done = self.upstream.maildrop.retrieve(2, self.written.append, None)
        self.upstream.feed(b"* 2 FETCH (UID 7 BODY[] {3}\r\nabc)\r\npb3 OK [EXPUNGEISSUED] gone\r\n")
        self.successResultOf(done)
        self.assertEqual(self.written, [b"abc"])

    def test_refused_without_expungeissued(self) -> None:
        """A plain NO is an upstream failure, not a missing message."""
        done = self.upstream.maildrop.retrieve(2, self.written.append, None)
        self.assertEqual(self.upstream.sent(), b"pb3 UID FETCH 7 (BODY.PEEK[])\r\n")
        self.upstream.feed(b"pb3 NO [SERVERBUG] Internal error\r\n")
        failure = self.failureResultOf(done, BridgeError)
        self.assertNotIsInstance(failure.value, NoSuchMessage)
        self.assertIn("SERVERBUG", str(failure.value))
        self.assertEqual(self.written, [])
        self.assertStillUsable()

    def test_top_header_nil(self) -> None:
        self.assertExpunged(
            b"* 2 FETCH (UID 7 BODY[HEADER] NIL)\r\npb3 OK [EXPUNGEISSUED] gone\r\n", 1, b"BODY.PEEK[HEADER]"
        )

    def test_top_text_nil_after_header(self) -> None:
        """Expunged between the header and the text: the header is held back, so still a clean failure."""
        done = self.upstream.maildrop.retrieve(2, self.written.append, 1)
        self.upstream.feed(b"* 2 FETCH (UID 7 BODY[HEADER] {5}\r\nH\r\n\r\n)\r\npb3 OK\r\n")
        self.assertEqual(
            self.upstream.sent(),
            b"pb3 UID FETCH 7 (BODY.PEEK[HEADER])\r\npb4 UID FETCH 7 (BODY.PEEK[TEXT]<0.16384>)\r\n",
        )
        self.upstream.feed(b"* 2 FETCH (UID 7 BODY[TEXT]<0> NIL)\r\npb4 OK [EXPUNGEISSUED] gone\r\n")
        self.assertEqual(self.failureResultOf(done, MessageExpunged).value.number, 2)
        self.assertEqual(self.written, [])

    def test_logged(self) -> None:
        """One structured line names the client, the user and the message."""
        maildrop = self.upstream.maildrop
        maildrop.clientAddress, maildrop.user = "192.0.2.7:4000", "pat"
        with capturedLogs() as events:
            self.assertExpunged(EXPUNGED_NIL)
        [event] = [event for event in events if "expunged" in event.get("log_format", "")]
        self.assertEqual(
            {key: event[key] for key in ("client", "user", "command", "number", "uid")},
            {"client": "192.0.2.7:4000", "user": "pat", "command": "RETR", "number": 2, "uid": 7},
        )
        self.assertIn("expunged", event["log_format"])


class ExpungedElsewhereSessionTests(SynchronousTestCase):
    """
    What the POP3 client sees (the bridge behind L{MaildropSession}).
    """

    def setUp(self) -> None:
        self.upstream = Upstream(self)
        self.upstream.open(SNAPSHOT, 3)
        self.output: list[bytes] = []
        self.closed = False

        def close() -> None:
            self.closed = True

        self.session = MaildropSession(
            self.upstream.maildrop, StringTransport(), self.output.append, close, lambda: None
        )

    def pop(self, command: bytes, upstreamReply: bytes = b"") -> bytes:
        keyword, *arguments = command.split()
        done = self.session.command(keyword, arguments)
        if upstreamReply:
            self.upstream.feed(upstreamReply)
        if done is not None:
            self.successResultOf(done)
        self.assertTrue(self.session.atBoundary)
        reply = b"".join(self.output)
        self.output.clear()
        return reply

    def test_err_and_the_session_goes_on(self) -> None:
        """
        RETR and TOP of the expunged message answer -ERR as Dovecot's POP3
        does; STAT, LIST, UIDL and other messages still work, and QUIT
        commits the other deletions.
        """
        self.assertEqual(self.pop(b"RETR 2", EXPUNGED_NIL), b"-ERR Message 2 expunged.\r\n")
        self.assertEqual(self.upstream.sent(), b"pb3 UID FETCH 7 (BODY.PEEK[])\r\n")
        self.assertEqual(self.pop(b"TOP 2 0", b"pb4 OK Fetch completed.\r\n"), b"-ERR Message 2 expunged.\r\n")
        self.assertEqual(self.upstream.sent(), b"pb4 UID FETCH 7 (BODY.PEEK[HEADER])\r\n")
        self.assertEqual(self.pop(b"STAT"), b"+OK 3 600\r\n")
        self.assertEqual(self.pop(b"LIST 2"), b"+OK 2 200\r\n")
        self.assertEqual(self.pop(b"LIST"), b"+OK\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n")
        self.assertEqual(self.pop(b"UIDL 2"), b"+OK 2 000000076553f100\r\n")
        retrieved = self.pop(b"RETR 3", b"* 3 FETCH (UID 12 BODY[] {7}\r\nA\r\n.\r\nB)\r\npb5 OK\r\n")
        self.assertEqual(retrieved, b"+OK Message follows\r\nA\r\n..\r\nB\r\n.\r\n")
        self.assertEqual(self.upstream.sent(), b"pb5 UID FETCH 12 (BODY.PEEK[])\r\n")
        self.assertEqual(self.pop(b"DELE 1"), b"+OK Message 1 deleted\r\n")
        self.assertEqual(self.pop(b"DELE 2"), b"+OK Message 2 deleted\r\n")
        quitting = self.session.command(b"QUIT", [])
        assert quitting is not None
        self.assertEqual(self.upstream.sent(), b"pb6 UID STORE 3,7 +FLAGS.SILENT (\\Deleted)\r\n")
        self.upstream.feed(b"pb6 OK Store completed.\r\n")
        self.assertEqual(self.upstream.sent(), b"pb7 UID EXPUNGE 3,7\r\n")
        self.upstream.feed(b"* 1 EXPUNGE\r\npb7 OK Expunge completed.\r\n")
        self.successResultOf(quitting)
        self.assertEqual(b"".join(self.output), b"+OK Bye\r\n")
        self.assertTrue(self.closed)

    def test_upstream_refusal_is_temporary(self) -> None:
        """A NO without EXPUNGEISSUED is a temporary failure; the session goes on."""
        self.assertEqual(self.pop(b"RETR 2", b"pb3 NO Internal error\r\n"), b"-ERR [SYS/TEMP] Mailbox unavailable\r\n")
        self.assertFalse(self.closed)
        self.assertEqual(self.pop(b"NOOP"), b"+OK\r\n")


class DeletionTests(SynchronousTestCase):
    def opened(self, capabilities: list[bytes] | None = None, **options: Any) -> Upstream:
        upstream = Upstream(self, capabilities, **options)
        lines = b"".join(b"* %d FETCH (UID %d RFC822.SIZE 10)\r\n" % (uid, uid) for uid in range(1, 13))
        upstream.open(lines, 12)
        return upstream

    def test_delete_and_reset(self) -> None:
        maildrop = self.opened().maildrop
        maildrop.delete(2)
        self.assertRaises(NoSuchMessage, maildrop.delete, 2)
        self.assertRaises(NoSuchMessage, maildrop.retrieve, 2, lambda data: None, None)
        self.assertRaises(NoSuchMessage, maildrop.delete, 13)
        self.assertEqual(maildrop.stat(), (11, 110))
        self.assertNotIn(2, [number for number, _ in maildrop.listing()])
        self.assertNotIn(2, [number for number, _ in maildrop.uniqueIds()])
        maildrop.reset()
        self.assertEqual(maildrop.stat(), (12, 120))

    def markSome(self, upstream: Upstream) -> None:
        for number in (1, 2, 3, 4, 5, 7, 9, 10, 11, 12):
            upstream.maildrop.delete(number)

    def test_commit_with_uidplus(self) -> None:
        upstream = self.opened()
        self.markSome(upstream)
        done = upstream.maildrop.commit()
        self.assertEqual(upstream.sent(), b"pb3 UID STORE 1:5,7,9:12 +FLAGS.SILENT (\\Deleted)\r\n")
        upstream.feed(b"pb3 OK Store completed.\r\n")
        self.assertEqual(upstream.sent(), b"pb4 UID EXPUNGE 1:5,7,9:12\r\n")
        upstream.feed(b"* 1 EXPUNGE\r\npb4 OK Expunge completed.\r\n")
        self.successResultOf(done)
        self.assertEqual(upstream.sent(), b"pb5 LOGOUT\r\n")
        self.assertTrue(upstream.transport.disconnecting)

    def test_commit_against_a_silent_upstream_times_out(self) -> None:
        """A hung upstream fails the commit after the timeout and is disconnected."""
        upstream = self.opened()
        clock = Clock()
        upstream.maildrop.clock = clock
        upstream.maildrop.delete(1)
        done = upstream.maildrop.commit()
        self.assertNoResult(done)
        clock.advance(COMMIT_TIMEOUT_FACTOR * upstream.maildrop.upstream.connectTimeout)
        self.failureResultOf(done, BridgeError)
        self.assertTrue(upstream.transport.disconnecting)

    def test_commit_nothing(self) -> None:
        """Without deletions, commit only logs out (no EXPUNGE, no CLOSE)."""
        upstream = self.opened()
        self.successResultOf(upstream.maildrop.commit())
        self.assertEqual(upstream.sent(), b"pb3 LOGOUT\r\n")
        self.assertTrue(upstream.transport.disconnecting)

    def test_commit_after_another_session_expunged(self) -> None:
        """
        A STORE refused with EXPUNGEISSUED (some of the UIDs are gone) is
        sent once more, and the rest are deleted.
        """
        upstream = self.opened()
        upstream.maildrop.delete(1)
        upstream.maildrop.delete(2)
        done = upstream.maildrop.commit()
        line = b"UID STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n"
        self.assertEqual(upstream.sent(), b"pb3 " + line)
        upstream.feed(b"* 2 EXPUNGE\r\npb3 NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n")
        self.assertEqual(upstream.sent(), b"pb4 " + line)
        upstream.feed(b"pb4 OK Store completed.\r\n")
        self.assertEqual(upstream.sent(), b"pb5 UID EXPUNGE 1:2\r\n")
        upstream.feed(b"* 1 EXPUNGE\r\npb5 OK Expunge completed.\r\n")
        self.successResultOf(done)

    def test_commit_store_refused(self) -> None:
        upstream = self.opened()
        upstream.maildrop.delete(1)
        done = upstream.maildrop.commit()
        upstream.feed(b"pb3 NO [READ-ONLY] Mailbox is read-only\r\n")
        self.assertIn("UID STORE", str(self.failureResultOf(done, BridgeError).value))
        self.assertEqual(upstream.sent(), b"pb3 UID STORE 1 +FLAGS.SILENT (\\Deleted)\r\npb4 LOGOUT\r\n")

    def test_commit_with_move_fallback(self) -> None:
        upstream = self.opened([b"IMAP4rev1", b"MOVE"], bridgeFallbackFolder="Trash")
        self.markSome(upstream)
        done = upstream.maildrop.commit()
        self.assertEqual(upstream.sent(), b'pb3 UID MOVE 1:5,7,9:12 "Trash"\r\n')
        upstream.feed(b"pb3 OK Move completed.\r\n")
        self.successResultOf(done)
        self.assertEqual(upstream.sent(), b"pb4 LOGOUT\r\n")

    def test_move_creates_folder(self) -> None:
        upstream = self.opened([b"IMAP4rev1", b"MOVE"], bridgeFallbackFolder="Gelöscht")
        upstream.maildrop.delete(3)
        done = upstream.maildrop.commit()
        self.assertEqual(upstream.sent(), b'pb3 UID MOVE 3 "Gel&APY-scht"\r\n')
        upstream.feed(b"pb3 NO [TRYCREATE] Mailbox doesn't exist\r\n")
        self.assertEqual(upstream.sent(), b'pb4 CREATE "Gel&APY-scht"\r\n')
        upstream.feed(b"pb4 OK\r\n")
        self.assertEqual(upstream.sent(), b'pb5 UID MOVE 3 "Gel&APY-scht"\r\n')
        upstream.feed(b"pb5 OK\r\n")
        self.successResultOf(done)

    def test_commit_with_copy_fallback(self) -> None:
        """Without MOVE: copy first, then \\Deleted (left for a later expunge)."""
        upstream = self.opened([b"IMAP4rev1"], bridgeFallbackFolder="Trash")
        upstream.maildrop.delete(1)
        done = upstream.maildrop.commit()
        self.assertEqual(upstream.sent(), b'pb3 UID COPY 1 "Trash"\r\n')
        upstream.feed(b"pb3 OK\r\n")
        self.assertEqual(upstream.sent(), b"pb4 UID STORE 1 +FLAGS.SILENT (\\Deleted)\r\n")
        upstream.feed(b"pb4 OK\r\n")
        self.successResultOf(done)
        self.assertEqual(upstream.sent(), b"pb5 LOGOUT\r\n")

    def test_commit_refused_without_uidplus_or_folder(self) -> None:
        """Nothing is touched when deletion is impossible."""
        upstream = self.opened([b"IMAP4rev1", b"MOVE"])
        upstream.maildrop.delete(1)
        done = upstream.maildrop.commit()
        self.assertIn("UIDPLUS", str(self.failureResultOf(done, BridgeError).value))
        self.assertEqual(upstream.sent(), b"pb3 LOGOUT\r\n")

    def test_abandon_deletes_nothing(self) -> None:
        upstream = self.opened()
        upstream.maildrop.delete(1)
        upstream.maildrop.abandon()
        self.assertEqual(upstream.sent(), b"pb3 LOGOUT\r\n")
        self.assertTrue(upstream.transport.disconnecting)
        upstream.maildrop.abandon()
        self.assertEqual(upstream.sent(), b"")

    def test_abandon_during_retrieve(self) -> None:
        upstream = self.opened()
        done: Deferred[None] = upstream.maildrop.retrieve(1, lambda data: None, None)
        upstream.sent()
        upstream.maildrop.abandon()
        self.assertTrue(upstream.transport.disconnecting)
        upstream.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, UpstreamError)
