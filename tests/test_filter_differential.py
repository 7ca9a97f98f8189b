"""
What the filters saw is what Dovecot executed: tricky spellings of
commands (hypothesis-generated) go through the filtered proxy to the real
Dovecot, and Dovecot's own record of the session (its rawlog) and its
state afterwards are checked against the audit log and the policy:

 - every command Dovecot answered is one the filters judged and relayed
   (same tag, same command name in Dovecot's reply text), and every
   command the audit says was relayed, Dovecot answered;
 - a denied mailbox (mallory's and rory's Archive) and a hidden one
   (rory's Lists) never reach Dovecot or the client: no STATUS about them,
   their UIDVALIDITY in no reply, their contents and subscriptions as
   they were;
 - a read-only session (rory) changes nothing at all.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bypass import BypassProxy, MailSnapshot, RawLog

# Dovecot names the command it ran in its tagged reply: "Select completed",
# "Error in IMAP command SELECT: ...", "Unknown command." for unknown ones.
_COMPLETED = re.compile(rb"(?:\[[^\]]*\] )?(\w+) (?:completed|failed)", re.IGNORECASE)
_ERROR_IN = re.compile(rb"Error in IMAP command (?:UID )?(\S+):", re.IGNORECASE)

MAILBOXES = ["Archive", "archive", "ARCHIVE", "Archive/2024", "Lists/dev", "Lists", "INBOX", "inbox", "Trash", "NewBox"]


def _quoted(name: bytes) -> bytes:
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@dataclass(frozen=True)
class Spelling:
    """
    One way of writing a mailbox argument: the line text up to it, the
    literal that follows (if any) and the text after it.
    """

    text: bytes
    literal: bytes | None = None
    synchronising: bool = True

    def __repr__(self) -> str:
        return f"Spelling({self.text!r}, {self.literal!r}, sync={self.synchronising})"


@st.composite
def spellings(draw: st.DrawFn) -> Spelling:
    name = draw(st.sampled_from(MAILBOXES)).encode()
    kind = draw(
        st.sampled_from(
            [
                "atom",
                "quoted",
                "escaped",
                "bad escape",
                "literal",
                "literal+",
                "binary",
                "mutf7",
                "trailing separator",
                "unterminated",
                "atom brace",
            ]
        )
    )
    if kind == "atom":
        return Spelling(name)
    if kind == "quoted":
        return Spelling(_quoted(name))
    if kind == "escaped":
        # A real backslash in the name (a different mailbox, as far as it goes).
        return Spelling(b'"' + name[:2] + b"\\\\" + name[2:] + b'"')
    if kind == "bad escape":
        position = draw(st.integers(1, len(name) - 1))
        return Spelling(b'"' + name[:position] + b"\\" + name[position:] + b'"')
    if kind in ("literal", "literal+"):
        return Spelling(b"", name, kind == "literal")
    if kind == "binary":
        return Spelling(b"~", name, True)
    if kind == "mutf7":
        # The first letter in modified UTF-7, which it never needs.
        encoded = base64.b64encode(name[:1].decode().encode("utf-16-be")).rstrip(b"=").replace(b"/", b",")
        return Spelling(b"&" + encoded + b"-" + name[1:])
    if kind == "trailing separator":
        return Spelling(name + b"/")
    if kind == "unterminated":
        return Spelling(b'"x', b"u SELECT " + name + b"\r\n", draw(st.booleans()))
    return Spelling(b"a", b"u EXAMINE " + name + b"\r\n", draw(st.booleans()))


# Commands and where the mailbox goes: {} is the argument.
TEMPLATES = [
    b"SELECT {}",
    b"EXAMINE {}",
    b"STATUS {} (MESSAGES UIDVALIDITY)",
    b"CREATE {}",
    b"DELETE {}",
    b"RENAME {} Renamed",
    b"SUBSCRIBE {}",
    b"UNSUBSCRIBE {}",
    b"COPY 1 {}",
    b"MOVE 1 {}",
    b"UID COPY 1:* {}",
    b'LIST "" {}',
    b"GETACL {}",
    b"NOTIFY SET (mailboxes {} (MessageNew))",
    b"X-FOO {}",
    b"NOOP {}",
    b"SEARCH SUBJECT {}",
    b"FETCH 1 (BODY.PEEK[HEADER.FIELDS ({})])",
    b'APPEND INBOX CATENATE (URL "/{}/;UID=1")',
    b'APPEND INBOX CATENATE (URL "/INBOX/../{}/;UID=1")',
    b"ESEARCH IN (mailboxes {}) ALL",
    b"SELECT INBOX (" + b"(" * 70 + b"{}" + b")" * 70 + b")",
]


@dataclass(frozen=True)
class Attempt:
    user: str
    prelude: bytes
    tag: bytes
    template: bytes
    spelling: Spelling

    def pieces(self) -> tuple[bytes, bytes | None, bytes, bool]:
        """
        The first line (up to and with the literal announcement), the
        literal, the rest of the command with CRLF, and whether the literal
        waits for a continuation.
        """
        before, after = self.template.split(b"{}")
        spelling = self.spelling
        head = self.tag + b" " + before
        if spelling.literal is None:
            return head + spelling.text + after + b"\r\n", None, b"", True
        plus = b"" if spelling.synchronising else b"+"
        announcement = spelling.text + b"{%d%s}\r\n" % (len(spelling.literal), plus)
        return head + announcement, spelling.literal, after + b"\r\n", spelling.synchronising


attempts = st.builds(
    Attempt,
    user=st.sampled_from(["mallory", "rory"]),
    # Pipelined before the attempt; an IDLE's "+" races its literal.
    prelude=st.sampled_from([b"", b"p SELECT INBOX\r\n", b"p EXAMINE INBOX\r\n", b"i IDLE\r\nDONE\r\n"]),
    # Dovecot refuses "]" in a tag (with an untagged BAD).
    tag=st.sampled_from([b"t", b"t", b"t]1"]),
    template=st.sampled_from(TEMPLATES),
    spelling=spellings(),
)


def commandOf(reply: bytes) -> bytes | None:
    """
    The command Dovecot says it ran, from the text of its tagged reply.
    """
    text = reply.split(b" ", 2)[2] if reply.count(b" ") >= 2 else b""
    error = _ERROR_IN.search(text)
    if error is not None:
        return error.group(1).upper()
    completed = _COMPLETED.match(text)
    if completed is not None:
        return completed.group(1).upper()
    return None


def assertDovecotRanOnlyWhatTheFiltersSaw(log: RawLog, records: list[dict[str, object]], shown: bytes) -> None:
    relayed = {str(record["tag"]): str(record["command"]) for record in records if record.get("relayed", True)}
    answered = {}
    for line in log.received.split(b"\r\n")[1:]:
        tag, space, rest = line.partition(b" ")
        if space and tag not in (b"*", b"+") and rest[:3] in (b"OK ", b"NO ", b"BAD"):
            answered[tag.decode()] = line
    answered.pop("zz", None)
    relayed.pop("zz", None)
    assert set(answered) == set(relayed), (answered, relayed, log.sent)
    for tag, line in answered.items():
        ran = commandOf(line)
        audited = relayed[tag].split(" ")[-1].encode()
        assert ran is None or ran == audited, (tag, line, relayed[tag])


def assertNothingAbout(proxy: BypassProxy, user: str, log: RawLog, shown: bytes) -> None:
    forbidden = [b"Archive"] + ([b"Lists"] if user == "rory" else [])
    for name in forbidden:
        assert not re.search(rb"\* STATUS \"?" + name, log.received), log.received
        assert not re.search(rb"\* STATUS \"?" + name, shown), shown
        uidvalidity = proxy.uidvalidity[user]["Archive" if name == b"Archive" else "Lists/dev"]
        assert b"[UIDVALIDITY %d]" % uidvalidity not in log.received, log.received
    if user == "rory":
        assert b"Lists" not in shown, shown


def assertStateKept(user: str, before: MailSnapshot, after: MailSnapshot) -> None:
    if user == "rory":
        assert after == before
        return
    assert after.messages["Archive"] == before.messages["Archive"]
    assert ("Archive" in after.subscribed) == ("Archive" in before.subscribed)
    assert {name for name in after.mailboxes if name.startswith("Archive")} == {
        name for name in before.mailboxes if name.startswith("Archive")
    }


@pytest.fixture(scope="module")
def initial(bypassProxy: BypassProxy) -> dict[str, MailSnapshot]:
    return {user: bypassProxy.snapshot(user) for user in ("mallory", "rory")}


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(attempt=attempts)
def test_dovecot_executes_exactly_what_the_filters_saw(
    bypassProxy: BypassProxy, initial: dict[str, MailSnapshot], attempt: Attempt
) -> None:
    """Any spelling: Dovecot answers only audited commands, denied and hidden mailboxes stay out of reach."""
    first, literal, rest, synchronising = attempt.pieces()
    with bypassProxy.session(attempt.user) as session:
        shown = b""
        session.send(attempt.prelude + first)
        if literal is not None and synchronising:
            # A client waits for "+" (an attacker takes any "+"); a reply to
            # the command (or an untagged BAD) means: do not send it.
            deadline = time.monotonic() + 30
            while True:
                answer = session.readLine(deadline)
                shown += answer
                if answer.startswith((b"+", attempt.tag + b" ", b"* BAD")):
                    break
            if answer.startswith(b"+"):
                session.send(literal + rest)
        elif literal is not None:
            session.send(literal + rest)
        # Whatever the proxy made of it, a NOOP gets through afterwards.
        session.send(b"v NOOP\r\n")
        shown += b"".join(session.readUntilTag(b"v"))
        records = session.audit(until="v")
        log = session.rawlog(waitFor=b"v NOOP")
    assertDovecotRanOnlyWhatTheFiltersSaw(log, records, shown)
    assertNothingAbout(bypassProxy, attempt.user, log, shown)
    assertStateKept(attempt.user, initial[attempt.user], bypassProxy.snapshot(attempt.user))
