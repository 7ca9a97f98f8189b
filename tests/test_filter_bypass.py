"""
Attacks that tried to walk past the proxy's filters, against the real
Dovecot behind the real twistd proxy (fixture C{bypassProxy}): each checks
what Dovecot received (its rawlog) and has (a direct snapshot), not only
the proxy's reply.  Most attacks are also tried directly against Dovecot
(as victor, who is no proxy user) to show they would do harm if relayed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.bypass import BYPASS_SUBSCRIBED, BYPASS_USERS, BypassProxy, RawLog, RawSession


@pytest.fixture(autouse=True)
def restored(bypassProxy: BypassProxy) -> Iterator[None]:
    """Each test starts from the seeded mail, whatever an attack did before."""
    for user in BYPASS_USERS:
        bypassProxy.restore(user)
    yield


def assertAudited(session: RawSession, rawlog: RawLog, last: str = "v") -> None:
    """Every command Dovecot answered in this session has an audit record with its tag."""
    audited = {record["tag"] for record in session.audit(until=last)}
    unaudited = [tag for tag in rawlog.taggedReplies() if tag.decode() not in audited]
    assert not unaudited, f"Dovecot answered {unaudited} that the audit log never saw: {rawlog.received!r}"


def assertNotRelayed(session: RawSession, *tags: str) -> None:
    """The audit records of C{tags} say the proxy answered them itself."""
    records = [record for record in session.audit(until="v") if record.get("tag") in tags]
    assert records, f"no audit record for {tags}"
    for record in records:
        assert record["relayed"] is False, record


def assertStillWorks(session: RawSession) -> None:
    """The session is in step: a NOOP gets its OK."""
    session.send(b"v NOOP\r\n")
    replies = session.readTags([b"v"], timeout=15)
    assert replies.reply(b"v").startswith(b"v OK"), replies.reply(b"v")


def test_fixture_seeds_and_logs(bypassProxy: BypassProxy) -> None:
    """The seeded state, the rawlog of a proxied session and the audit log are what the attacks rely on."""
    snapshot = bypassProxy.snapshot("mallory")
    assert {"INBOX", "Archive", "Lists", "Lists/dev", "Trash"} <= snapshot.mailboxes
    assert snapshot.subscribed == set(BYPASS_SUBSCRIBED)
    assert (snapshot.count("INBOX"), snapshot.count("Archive"), snapshot.count("Lists/dev")) == (3, 2, 1)
    assert all(flags == frozenset() for flags in snapshot.messages["INBOX"])
    with bypassProxy.session("mallory") as session:
        assert session.command(b"s SELECT INBOX")[-1].startswith(b"s OK")
        assert session.command(b"v NOOP")[-1].startswith(b"v OK")
        rawlog = session.rawlog(waitFor=b"v NOOP")
        assert b"SELECT INBOX" in rawlog.sent and b"v NOOP" in rawlog.sent
        assert b"v" in rawlog.taggedReplies()
        assertAudited(session, rawlog)
    assert bypassProxy.snapshot("mallory") == snapshot


# -- 1. literal smuggling -------------------------------------------------------


@dataclass(frozen=True)
class Smuggling:
    user: str
    setup: tuple[bytes, ...]
    carrier: bytes  # up to the literal's "{"
    plus: bool  # {n+} instead of {n}
    smuggled: bytes  # the hidden command lines, CRLFs included: the literal's n octets
    hidden: bytes = b""  # what Dovecot must never receive (default: the first hidden command)
    expect: tuple[bytes, ...] = (b"u NO [NOPERM]",)  # the hidden commands' replies from the proxy
    harmful: bool = False  # run directly, it changes the mail

    def hiddenCommand(self) -> bytes:
        return self.hidden or self.smuggled.split(b" ", 1)[1].split(b"\r\n", 1)[0]

    def attack(self) -> bytes:
        size = b"%d+" % len(self.smuggled) if self.plus else b"%d" % len(self.smuggled)
        return self.carrier + b"{" + size + b"}\r\n" + self.smuggled


SELECT_ARCHIVE = b"u SELECT Archive\r\n"
SMUGGLINGS = {
    "noop": Smuggling("mallory", (), b't NOOP "x', False, SELECT_ARCHIVE),
    "fetch-header-fields": Smuggling(
        "mallory", (b"s SELECT INBOX",), b't FETCH 1 (BODY.PEEK[HEADER.FIELDS ("x', False, SELECT_ARCHIVE
    ),
    "search-subject": Smuggling("mallory", (b"s SELECT INBOX",), b't SEARCH SUBJECT "x', False, SELECT_ARCHIVE),
    "literal-plus": Smuggling("mallory", (), b't NOOP "x', True, SELECT_ARCHIVE),
    "readonly-create": Smuggling(
        "rory", (b"s EXAMINE INBOX",), b't NOOP "x', False, b"u CREATE Smuggled\r\n", harmful=True
    ),
    # Dovecot ignores a STORE in an EXAMINEd mailbox ("OK Store ignored with
    # read-only mailbox"): the rawlog shows the bypass, the mail cannot.
    "readonly-store": Smuggling(
        "rory", (b"s EXAMINE INBOX",), b't NOOP "x', False, b"u STORE 1 +FLAGS (\\Deleted)\r\n"
    ),
    # ... so the harmful variant smuggles a SELECT (the proxy makes it EXAMINE) first.
    "readonly-select-store": Smuggling(
        "rory",
        (b"s EXAMINE INBOX",),
        b't NOOP "x',
        False,
        b"u SELECT INBOX\r\nw STORE 1 +FLAGS (\\Deleted)\r\n",
        hidden=b"STORE 1 +FLAGS",
        expect=(b"u OK [READ-ONLY]", b"w NO [NOPERM]"),
        harmful=True,
    ),
}


@pytest.mark.parametrize("name", list(SMUGGLINGS))
def test_literal_smuggling_is_refused(bypassProxy: BypassProxy, name: str) -> None:
    """A "{n}" inside an unfinished quoted string is no literal: the next line is a command of its own, filtered."""
    case = SMUGGLINGS[name]
    tags = [b"t"] + [expected.split(b" ", 1)[0] for expected in case.expect]
    # Directly, Dovecot runs the hidden lines as commands of their own.
    victorBefore = bypassProxy.snapshot("victor")
    with bypassProxy.directSession("victor") as direct:
        for line in case.setup:
            assert direct.command(line)[-1].split(b" ")[1] == b"OK"
        direct.send(case.attack())
        shown = direct.readTags(tags)
        assert all(tag in shown.tagged for tag in tags), shown
        assert not any(line.startswith(b"+") for line in shown.lines)
    assert (bypassProxy.snapshot("victor") != victorBefore) == case.harmful
    before = bypassProxy.snapshot(case.user)
    with bypassProxy.session(case.user) as session:
        for line in case.setup:
            assert session.command(line)[-1].split(b" ")[1] == b"OK"
        session.send(case.attack())
        replies = session.readTags(tags)
        session.send(b"v NOOP\r\n")
        after = session.readTags([b"v"], timeout=15)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    hidden = case.hiddenCommand()
    assert hidden not in rawlog.sent, f"the smuggled {hidden!r} reached Dovecot: {rawlog.sent!r}"
    assert bypassProxy.snapshot(case.user) == before
    assert not any(line.startswith(b"+") for line in replies.lines), replies.lines
    assert replies.reply(b"t").startswith(b"t BAD"), replies.reply(b"t")
    for tag, expected in zip(tags[1:], case.expect, strict=True):
        assert replies.reply(tag).startswith(expected), replies.reply(tag)
    assert after.reply(b"v").startswith(b"v OK"), after.reply(b"v")
    assertAudited(session, rawlog)
    refused = [tag for tag, expected in zip(tags[1:], case.expect, strict=True) if b" OK" not in expected]
    assertNotRelayed(session, "t", *(tag.decode() for tag in refused))


@pytest.mark.parametrize("bare", [False, True], ids=["audit-only", "no-filters"])
def test_literal_smuggling_of_compress_on_passthrough(bypassProxy: BypassProxy, bare: bool) -> None:
    """A COMPRESS hidden behind a fake literal never reaches Dovecot, also without filters: no hang, BAD, in step."""
    hiddenLine = b"u COMPRESS DEFLATE\r\n"
    attack = b't NOOP "x{%d}\r\n' % len(hiddenLine) + hiddenLine
    with bypassProxy.directSession("victor") as direct:
        direct.send(attack)
        shown = direct.readTags([b"t", b"u"])
        assert shown.reply(b"u").startswith(b"u OK Begin compression"), shown
        direct.abort()
    with bypassProxy.session("penny", bare=bare) as session:
        session.send(attack)
        replies = session.readTags([b"t", b"u"])
        session.send(b"v NOOP\r\n")
        after = session.readTags([b"v"], timeout=15)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"COMPRESS" not in rawlog.sent, f"COMPRESS reached Dovecot: {rawlog.sent!r}"
    assert not any(line.startswith(b"+") for line in replies.lines), replies.lines
    assert b"t" in replies.tagged, replies.reply(b"t")
    assert replies.reply(b"u").startswith(b"u BAD"), replies.reply(b"u")
    assert after.reply(b"v").startswith(b"v OK"), after.reply(b"v")


# -- 2. backslash escapes in quoted mailbox names --------------------------------


@dataclass(frozen=True)
class Escape:
    user: str
    setup: tuple[bytes, ...]
    command: bytes  # tagged "t"
    directShows: bytes  # in Dovecot's own reply: it unescaped the name
    harmful: bool = False  # run directly, it changes the mail


ESCAPES = {
    "select": Escape("mallory", (), b't SELECT "Arch\\ive"', b"* 2 EXISTS"),
    "status": Escape("mallory", (), b't STATUS "A\\rchive" (MESSAGES)', b"* STATUS Archive (MESSAGES 2)"),
    "copy": Escape("mallory", (b"s SELECT INBOX",), b't COPY 1 "Ar\\chive"', b"t OK", harmful=True),
    "create": Escape("mallory", (), b't CREATE "Arc\\hive/x"', b"t OK", harmful=True),
    "readonly-hidden-examine": Escape("rory", (), b't EXAMINE "L\\ists/dev"', b"* 1 EXISTS"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_backslash_escaped_mailbox_names_are_refused(bypassProxy: BypassProxy, name: str) -> None:
    """Dovecot reads "Arch\\ive" as Archive: the proxy must not let the escaped name past its mailbox rules."""
    case = ESCAPES[name]
    victorBefore = bypassProxy.snapshot("victor")
    with bypassProxy.directSession("victor") as direct:
        for line in case.setup:
            assert direct.command(line)[-1].split(b" ")[1] == b"OK"
        shown = direct.command(case.command, timeout=10)
        assert shown[-1].startswith(b"t OK"), shown
        assert any(line.startswith(case.directShows) for line in shown), shown
    assert (bypassProxy.snapshot("victor") != victorBefore) == case.harmful
    before = bypassProxy.snapshot(case.user)
    with bypassProxy.session(case.user) as session:
        for line in case.setup:
            assert session.command(line)[-1].split(b" ")[1] == b"OK"
        session.send(case.command + b"\r\n")
        replies = session.readTags([b"t"])
        session.send(b"v NOOP\r\n")
        after = session.readTags([b"v"], timeout=15)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    relayed = [line for line in rawlog.sent.split(b"\r\n") if line.startswith(b"t ")]
    assert not relayed, f"Dovecot received {relayed!r}"
    snapshot = bypassProxy.snapshot(case.user)
    assert "Archive/x" not in snapshot.mailboxes
    assert snapshot == before
    status = [line for line in replies.lines if line.startswith(b"* STATUS") and b"rchive" in line]
    assert not status, status
    assert replies.reply(b"t").startswith((b"t BAD", b"t NO")), replies.reply(b"t")
    assert after.reply(b"v").startswith(b"v OK"), after.reply(b"v")
    assertAudited(session, rawlog)
    assertNotRelayed(session, "t")


# -- 3. other routes to a denied mailbox ----------------------------------------


def catenate(bypassProxy: BypassProxy, user: str) -> bytes:
    validity = bypassProxy.uidvalidity[user]["Archive"]
    return b'c APPEND INBOX CATENATE (URL "/Archive;UIDVALIDITY=%d/;UID=1")' % validity


def test_catenate_url_into_denied_mailbox_is_refused(bypassProxy: BypassProxy) -> None:
    """APPEND ... CATENATE (URL "/Archive;...") would copy a message out of Archive: refused by the proxy."""
    victorInbox = bypassProxy.snapshot("victor").count("INBOX")
    with bypassProxy.directSession("victor") as direct:
        assert direct.command(catenate(bypassProxy, "victor"), timeout=10)[-1].startswith(b"c OK"), "no CATENATE?"
    assert bypassProxy.snapshot("victor").count("INBOX") == victorInbox + 1
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(catenate(bypassProxy, "mallory") + b"\r\n")
        replies = session.readTags([b"c"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"/Archive;" not in rawlog.sent, f"the URL reached Dovecot: {rawlog.sent!r}"
    assert bypassProxy.snapshot("mallory") == before
    assert replies.reply(b"c").startswith(b"c NO"), replies.reply(b"c")
    assertAudited(session, rawlog)
    assertNotRelayed(session, "c")


def test_list_return_status_does_not_show_denied_mailbox(bypassProxy: BypassProxy) -> None:
    """LIST-STATUS would report Archive's counters: no "* STATUS Archive" reaches mallory."""
    command = b't LIST "" "*" RETURN (STATUS (MESSAGES))'
    with bypassProxy.directSession("victor") as direct:
        shown = direct.command(command, timeout=10)
    assert b"* STATUS Archive (MESSAGES 2)\r\n" in shown, shown
    with bypassProxy.session("mallory") as session:
        session.send(command + b"\r\n")
        replies = session.readTags([b"t"])
        assertStillWorks(session)
    leaked = [line for line in replies.lines if line.startswith((b"* STATUS Archive", b'* STATUS "Archive'))]
    assert not leaked, leaked
    assert replies.reply(b"t").startswith(b"t OK"), replies.reply(b"t")


def test_notify_on_denied_mailbox_is_refused(bypassProxy: BypassProxy) -> None:
    """NOTIFY SET naming Archive (Dovecot 2.3 has NOTIFY) is refused by the proxy, never relayed."""
    command = b"n NOTIFY SET (mailboxes Archive (MessageNew))"
    with bypassProxy.directSession("victor") as direct:
        capability = direct.command(b"c CAPABILITY", timeout=10)
        assert b" NOTIFY" in b"".join(capability), capability
        assert direct.command(command, timeout=10)[-1].startswith(b"n OK")
    with bypassProxy.session("mallory") as session:
        session.send(command + b"\r\n")
        replies = session.readTags([b"n"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"NOTIFY" not in rawlog.sent, f"NOTIFY reached Dovecot: {rawlog.sent!r}"
    assert replies.reply(b"n").startswith(b"n NO"), replies.reply(b"n")
    assertAudited(session, rawlog)
    assertNotRelayed(session, "n")


@pytest.mark.parametrize("command", [b"SUBSCRIBE Trash", b"UNSUBSCRIBE Archive", b"UNSUBSCRIBE INBOX"])
def test_read_only_user_cannot_change_subscriptions(bypassProxy: BypassProxy, command: bytes) -> None:
    """Subscriptions are state too: rory's SUBSCRIBE/UNSUBSCRIBE get NO [NOPERM] and LSUB stays as it was."""
    victorBefore = bypassProxy.snapshot("victor").subscribed
    with bypassProxy.directSession("victor") as direct:
        assert direct.command(b"t " + command, timeout=10)[-1].startswith(b"t OK")
    assert bypassProxy.snapshot("victor").subscribed != victorBefore
    before = bypassProxy.snapshot("rory")
    with bypassProxy.session("rory") as session:
        session.send(b"t " + command + b"\r\n")
        replies = session.readTags([b"t"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert bypassProxy.snapshot("rory") == before
    assert replies.reply(b"t").startswith(b"t NO [NOPERM]"), replies.reply(b"t")
    assert b"SUBSCRIBE" not in rawlog.sent, rawlog.sent
    assertAudited(session, rawlog)
    assertNotRelayed(session, "t")


@pytest.mark.parametrize("user", ["mallory", "rory"])
@pytest.mark.parametrize("command", [b"X-FOO Archive", b"XYZZY"])
def test_unknown_commands_are_not_relayed_on_filtered_sessions(
    bypassProxy: BypassProxy, user: str, command: bytes
) -> None:
    """A filter cannot judge a command it does not know: the proxy refuses it instead of relaying it."""
    with bypassProxy.session(user) as session:
        session.send(b"t " + command + b"\r\n")
        replies = session.readTags([b"t"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert command not in rawlog.sent, f"{command!r} reached Dovecot: {rawlog.sent!r}"
    assert replies.reply(b"t").startswith((b"t BAD", b"t NO")), replies.reply(b"t")
    assertAudited(session, rawlog)
    assertNotRelayed(session, "t")


@pytest.mark.parametrize("plus", [False, True], ids=["sync", "literal-plus"])
@pytest.mark.parametrize(
    ("user", "hiddenLine"),
    [("mallory", SELECT_ARCHIVE), ("penny", b"u COMPRESS DEFLATE\r\n")],
    ids=["filtered-select", "passthrough-compress"],
)
def test_unknown_command_literal_does_not_smuggle(
    bypassProxy: BypassProxy, user: str, hiddenLine: bytes, plus: bool
) -> None:
    """Dovecot answers "t XYZZY {n}" with BAD at once and reads the next n octets as a command: never relay them."""
    attack = b"t XYZZY {%d%s}\r\n" % (len(hiddenLine), b"+" if plus else b"") + hiddenLine
    hidden = hiddenLine.split(b" ", 1)[1].rstrip(b"\r\n")
    with bypassProxy.directSession("victor") as direct:
        direct.send(attack)
        shown = direct.readTags([b"t", b"u"])
        assert shown.reply(b"t").startswith(b"t BAD"), shown
        assert shown.reply(b"u").startswith(b"u OK"), shown
        assert not any(line.startswith(b"+") for line in shown.lines), shown
        direct.abort()
    with bypassProxy.session(user, bare=user == "penny") as session:
        session.send(attack)
        replies = session.readTags([b"t"], timeout=5)
        session.send(b"v NOOP\r\n")
        after = session.readTags([b"v"], timeout=5)
        rawlog = session.rawlog(waitFor=b"v NOOP", timeout=2)
    # Like Dovecot, the proxy reads the octets as the next command: the
    # filters refuse SELECT Archive, and COMPRESS is never relayed.
    assert hidden not in rawlog.sent, f"the hidden {hidden!r} reached Dovecot: {rawlog.sent!r}"
    if user != "penny":
        assert b"XYZZY" not in rawlog.sent, rawlog.sent
    assert not any(line.startswith(b"+") for line in replies.lines), replies.lines
    assert replies.reply(b"t").startswith((b"t BAD", b"t NO")), replies.reply(b"t")
    # like Dovecot, the n octets were a command line: in step, "v" is answered
    assert after.reply(b"v").startswith(b"v OK"), after.reply(b"v")
    if user != "penny":
        assertAudited(session, rawlog)
        assertNotRelayed(session, "t")


# -- 4. deep nesting ------------------------------------------------------------

DEEP = 1200
NESTINGS = {
    "select": b"t SELECT INBOX " + b"(" * DEEP + b")" * DEEP,
    "fetch": b"t FETCH 1 " + b"(" * DEEP + b"FLAGS" + b")" * DEEP,
    "search": b"t SEARCH " + b"(" * DEEP + b"ALL" + b")" * DEEP,
}


# Directly, Dovecot answers the SELECT and FETCH with BAD ("contain non-atoms")
# but runs the 1200-deep SEARCH (OK): the proxy's BAD there is its own limit.
@pytest.mark.parametrize("name", list(NESTINGS))
def test_deep_nesting_is_refused_without_crashing(bypassProxy: BypassProxy, name: str) -> None:
    """1200 nested parentheses get a tagged BAD from the proxy; no RecursionError, the session goes on."""
    logStart = len(bypassProxy.log())
    with bypassProxy.session("rory") as session:
        assert session.command(b"s EXAMINE INBOX")[-1].startswith(b"s OK")
        session.send(NESTINGS[name] + b"\r\n")
        replies = session.readTags([b"t"], timeout=15)
        assertStillWorks(session)
    log = bypassProxy.log()[logStart:]
    assert "RecursionError" not in log and "Traceback" not in log, log[-3000:]
    assert replies.reply(b"t").startswith(b"t BAD"), replies.reply(b"t")[:300]
    assertNotRelayed(session, "t")


# -- 5. found by review: races and framing the first fix missed -------------------


def test_an_idle_continuation_cannot_release_a_refused_literal(bypassProxy: BypassProxy) -> None:
    """IDLE's "+" raced a literal Dovecot refuses: its octets (a DELETE of Archive) must never run upstream."""
    hidden = b"y DELETE Archive\r\n"
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(b"i IDLE\r\nDONE\r\nx APPEND Nope {%d}\r\n" % len(hidden) + hidden + b"\r\n")
        replies = session.readTags([b"i", b"x"], timeout=15)
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"DELETE" not in rawlog.sent, rawlog.sent
    assert bypassProxy.snapshot("mallory") == before
    assert replies.reply(b"x").startswith(b"x NO"), replies.reply(b"x")
    assertAudited(session, rawlog)


@pytest.mark.parametrize("url", [b"./Archive/;UID=1", b"/INBOX/../Archive/;UID=1", b"/%2E/Archive/;UID=1"])
def test_catenate_urls_with_dot_segments_are_refused(bypassProxy: BypassProxy, url: bytes) -> None:
    """Dovecot resolves . and .. in URLs: such a URL never reaches it from a session with mailbox rules."""
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(b'c APPEND INBOX CATENATE (URL "%s")\r\n' % url)
        replies = session.readTags([b"c"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"CATENATE" not in rawlog.sent, rawlog.sent
    assert replies.reply(b"c").startswith(b"c BAD"), replies.reply(b"c")
    assert bypassProxy.snapshot("mallory") == before
    assertNotRelayed(session, "c")


def test_tags_dovecot_refuses_are_refused_by_the_proxy(bypassProxy: BypassProxy) -> None:
    """A tag with "]" gets an untagged BAD from Dovecot, so the proxy neither relays nor tracks it."""
    with bypassProxy.session("mallory") as session:
        session.send(b'x]1 SEARCH SUBJECT "a"\r\n')
        line = session.readLine(time.monotonic() + 10)
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert line.startswith(b"* BAD "), line
    assert b"x]1" not in rawlog.sent, rawlog.sent


@pytest.mark.parametrize("bare", [False, True], ids=["audit-only", "no-filters"])
def test_a_literal_in_a_command_only_dovecot_knows_smuggles_nothing(bypassProxy: BypassProxy, bare: bool) -> None:
    """X-CANCEL reads a literal in Dovecot, not in the proxy: the line is refused, so proxy and Dovecot stay in step."""
    hidden = b"v COMPRESS DEFLATE"
    announced = b"u APPEND INBOX {%d}\r\n" % len(hidden)
    with bypassProxy.session("penny", bare=bare) as session:
        # Relayed, Dovecot would read the APPEND line as X-CANCEL's literal
        # and the client's next line (COMPRESS) as a command.
        session.send(b"t X-CANCEL {%d}\r\n" % len(announced) + announced)
        first = session.readTags([b"t"], timeout=10)
        continuation = session.readLine(time.monotonic() + 10)
        # Both read the APPEND as a command: what follows is its message.
        session.send(hidden + b"\r\n")
        appended = session.readTags([b"u"], timeout=10)
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"X-CANCEL" not in rawlog.sent, rawlog.sent
    assert b"Begin compression" not in rawlog.received, rawlog.received
    assert first.reply(b"t").startswith(b"t BAD"), first.reply(b"t")
    assert continuation.startswith(b"+"), continuation
    assert appended.reply(b"u").startswith(b"u OK"), appended.reply(b"u")


def test_renaming_the_parent_of_a_denied_mailbox_is_refused(bypassProxy: BypassProxy) -> None:
    """RENAME Lists moves Lists/dev (denied to mallory) to Moved/dev, out of the rule's reach: refused."""
    with bypassProxy.directSession("victor") as direct:
        assert direct.command(b"r RENAME Lists Moved")[-1].startswith(b"r OK")
    assert "Moved/dev" in bypassProxy.snapshot("victor").mailboxes
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(b"r RENAME Lists Moved\r\n")
        replies = session.readTags([b"r"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert replies.reply(b"r").startswith(b"r NO [NOPERM]"), replies.reply(b"r")
    assert b"RENAME" not in rawlog.sent, rawlog.sent
    assert bypassProxy.snapshot("mallory") == before
    assertNotRelayed(session, "r")


def test_a_reused_tag_cannot_desynchronise_literals(bypassProxy: BypassProxy) -> None:
    """`a NOOP` then `a APPEND ... {8+}`: the NOOP's reply must not pass for the APPEND's, nor the next command become data."""
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(b"a NOOP\r\na APPEND INBOX {8+}\r\n12345678\r\n")
        first = session.readTags([b"a"], timeout=10)
        time.sleep(0.3)  # let any second reply for "a" arrive
        session.send(b"c SEARCH CATENATE (URL /Archive/;UID=1)\r\n")
        session.readTags([b"c"], timeout=10)
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    # The SEARCH is an ordinary command (Dovecot answers it BAD), not data of an APPEND.
    assert b"APPEND" not in rawlog.sent and b"APPENDUID" not in rawlog.received, rawlog.sent
    assert bypassProxy.snapshot("mallory") == before
    assert any(line.startswith(b"a BAD Tag already in use") for line in first.lines), first.lines
    assertAudited(session, rawlog)


@pytest.mark.parametrize("idle", [b"a IDLE {%d}\r\n", b"a IDLE {%d+}\r\n", b'a IDLE "x"\r\n'])
def test_idle_with_arguments_smuggles_nothing(bypassProxy: BypassProxy, idle: bytes) -> None:
    """Dovecot answers IDLE {n} with "+ idling" and reads no literal: the proxy refuses it; the next lines are commands."""
    hidden = b"DONE\r\nx SELECT Archive\r\n"
    attack = (idle % len(hidden) if b"%d" in idle else idle) + hidden
    with bypassProxy.directSession("victor") as direct:
        direct.send(attack)
        shown = direct.readTags([b"a", b"x"])
        assert shown.reply(b"x").startswith(b"x OK"), shown
    before = bypassProxy.snapshot("mallory")
    with bypassProxy.session("mallory") as session:
        session.send(attack)
        replies = session.readTags([b"a", b"x"])
        assertStillWorks(session)
        rawlog = session.rawlog(waitFor=b"v NOOP")
    assert b"IDLE" not in rawlog.sent and b"Archive" not in rawlog.sent, rawlog.sent
    assert replies.reply(b"a").startswith(b"a BAD"), replies.reply(b"a")
    assert replies.reply(b"x").startswith(b"x NO [NOPERM]"), replies.reply(b"x")
    assert bypassProxy.snapshot("mallory") == before
