"""
The policy filter: allowed and denied commands, read-only sessions, mailbox
patterns and the APPEND size limit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mailproxy.filters import DROP, PASS, Reject, Rewrite
from mailproxy.filters.chain import FilterChain
from mailproxy.filters.policy import PolicyFilter, appendedSizes, namedMailboxes
from mailproxy.imap.model import IMAPCommand, StreamedLiteral, parseCommand, parseResponse
from mailproxy.session import ProxySession
from tests.support import UpstreamScript, loggedIn

NOPERM_READ_ONLY = Reject("Mailbox access is read-only", "NO", "NOPERM")


def makeSession() -> ProxySession:
    session = ProxySession("imap", "imap", "192.0.2.7:40000", True, FilterChain())
    session.user, session.upstream, session.selected = "alice", "mailhost", b"INBOX"
    return session


def command(*parts: bytes | StreamedLiteral) -> IMAPCommand:
    parsed = parseCommand(list(parts))
    assert parsed is not None
    return parsed


def decide(options: dict[str, Any], *parts: bytes | StreamedLiteral) -> Any:
    return PolicyFilter.fromOptions(options).filterCommand(makeSession(), command(*parts))


def test_without_options_everything_passes() -> None:
    """An empty policy passes commands unchanged."""
    assert decide({}, b"a DELETE INBOX\r\n") is PASS
    assert decide({}, b"a SELECT INBOX\r\n") is PASS


def test_denied_commands_are_refused_with_noperm_naming_the_command() -> None:
    """A denied name is refused case-insensitively, with its UID form covered too."""
    verdict = decide({"deny": ["copy"]}, b"a UID COPY 1:2 Trash\r\n")
    assert isinstance(verdict, Reject)
    assert (verdict.status, verdict.code) == ("NO", "NOPERM")
    assert "UID COPY" in verdict.text
    assert decide({"deny": ["COPY"]}, b"a copy 1 Trash\r\n") == Reject(
        "COPY is not permitted by the proxy's policy", "NO", "NOPERM"
    )
    assert decide({"deny": ["COPY"]}, b"a MOVE 1 Trash\r\n") is PASS


def test_an_allow_list_refuses_everything_else() -> None:
    """With allow, only the listed commands pass."""
    options = {"allow": ["select", "FETCH", "LOGOUT"]}
    assert decide(options, b"a SELECT INBOX\r\n") is PASS
    assert decide(options, b"a UID FETCH 1 FLAGS\r\n") is PASS
    verdict = decide(options, b"a STORE 1 +FLAGS (\\Deleted)\r\n")
    assert isinstance(verdict, Reject) and verdict.code == "NOPERM" and "STORE" in verdict.text


def test_an_allow_list_keeps_the_session_basics() -> None:
    """CAPABILITY, NOOP and LOGOUT pass even when the allow list forgets them."""
    options = {"allow": ["FETCH"]}
    for line in (b"a CAPABILITY\r\n", b"a NOOP\r\n", b"a LOGOUT\r\n"):
        assert decide(options, line) is PASS


@pytest.mark.parametrize(
    "line",
    [
        b"a STORE 1 +FLAGS (\\Seen)\r\n",
        b"a UID STORE 1 +FLAGS (\\Seen)\r\n",
        b"a EXPUNGE\r\n",
        b"a UID EXPUNGE 1:5\r\n",
        b"a DELETE Old\r\n",
        b"a RENAME Old New\r\n",
        b"a MOVE 1 Trash\r\n",
        b"a UID COPY 1 Trash\r\n",
        b"a CREATE New\r\n",
        b"a SETACL INBOX bob lr\r\n",
        b"a DELETEACL INBOX bob\r\n",
        b'a SETMETADATA INBOX (/private/comment "x")\r\n',
        b'a SETQUOTA "" (STORAGE 512)\r\n',
    ],
)
def test_read_only_refuses_every_changing_command(line: bytes) -> None:
    """Read-only mode answers changing commands NO [NOPERM]."""
    assert decide({"read_only": True}, line) == NOPERM_READ_ONLY


def test_read_only_refuses_append_with_its_literal() -> None:
    """APPEND, buffered or streamed, is refused in read-only mode."""
    assert decide({"read_only": True}, b"a APPEND INBOX {5}\r\n", b"hello", b"\r\n") == NOPERM_READ_ONLY
    assert decide({"read_only": True}, b"a APPEND INBOX {900000}\r\n", StreamedLiteral(900000)) == NOPERM_READ_ONLY


def test_read_only_turns_select_into_examine() -> None:
    """SELECT becomes EXAMINE with the same arguments, serialised afresh."""
    verdict = decide({"read_only": True}, b"a3 SELECT Archive (CONDSTORE)\r\n")
    assert isinstance(verdict, Rewrite)
    assert verdict.message.toWire(literalPlus=True) == [b"a3 EXAMINE Archive (CONDSTORE)\r\n"]


def test_read_only_passes_reading_commands() -> None:
    """FETCH, SEARCH, EXAMINE and LIST pass a read-only policy."""
    for line in (b"a FETCH 1 BODY[]\r\n", b"a UID SEARCH ALL\r\n", b"a EXAMINE INBOX\r\n", b'a LIST "" *\r\n'):
        assert decide({"read_only": True}, line) is PASS


def test_read_only_select_reaches_the_upstream_as_examine(tmp_path: Path) -> None:
    """Through the relay the upstream receives EXAMINE, and STORE is answered by the proxy."""
    connection = loggedIn(tmp_path, filters=[PolicyFilter(readOnly=True)], upstream=UpstreamScript())
    connection.send(b"s SELECT INBOX\r\nt STORE 1 +FLAGS (\\Seen)\r\n")
    assert connection.upstream.sent == b"s EXAMINE INBOX\r\n"
    assert connection.received() == b"t NO [NOPERM] Mailbox access is read-only\r\n"


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        (b"a SELECT Private\r\n", True),
        (b"a SELECT Private/Taxes\r\n", True),
        (b"a SELECT Private/Taxes/2024\r\n", False),  # '%' stops at the separator
        (b"a SELECT Privateer\r\n", False),
        (b"a STATUS Private (MESSAGES)\r\n", True),
        (b"a UID COPY 1 Private/Inbox\r\n", True),
        (b"a MOVE 1:* Work\r\n", False),
        (b"a RENAME Work Private/Work\r\n", True),
        (b"a RENAME Private/Old Work\r\n", True),
        (b'a LIST "" Private/%\r\n', True),
        (b'a LIST "Private/" Tax\r\n', True),
        (b'a LIST "" *\r\n', False),
        (b"a FETCH 1 BODY[]\r\n", False),
    ],
)
def test_denied_mailbox_patterns_cover_every_named_mailbox(line: bytes, refused: bool) -> None:
    """mailboxes_deny applies to the named, target, both RENAME and LIST mailboxes."""
    verdict = decide({"mailboxes_deny": ["Private", "Private/%"]}, line)
    if refused:
        assert isinstance(verdict, Reject) and (verdict.status, verdict.code) == ("NO", "NOPERM")
    else:
        assert verdict is PASS


def test_a_trailing_separator_names_the_same_mailbox() -> None:
    """CREATE "Private/" creates Private, so it is refused like CREATE Private."""
    assert isinstance(decide({"mailboxes_deny": ["Private"]}, b"a CREATE Private/\r\n"), Reject)
    assert isinstance(decide({"mailboxes_deny": ["Private"]}, b"a CREATE Private//\r\n"), Reject)


def test_mailbox_allow_lists_refuse_other_names_but_not_wildcard_listings() -> None:
    """With mailboxes_allow, only matching names pass; LIST with wildcards is left to the server."""
    options = {"mailboxes_allow": ["INBOX", "Shared/*"]}
    assert decide(options, b"a SELECT inbox\r\n") is PASS
    assert decide(options, b"a SELECT Shared/Team/Plans\r\n") is PASS
    assert decide(options, b'a LIST "" "*"\r\n') is PASS
    assert isinstance(decide(options, b"a SELECT Sent\r\n"), Reject)
    assert isinstance(decide(options, b'a LIST "" Sent\r\n'), Reject)


def test_mailbox_patterns_match_decoded_names_in_either_encoding() -> None:
    """Modified UTF-7 and UTF-8 spellings of a name are both matched against its text."""
    options = {"mailboxes_deny": ["Entwürfe"]}
    assert isinstance(decide(options, b"a SELECT Entw&APw-rfe\r\n"), Reject)
    assert isinstance(decide(options, 'a SELECT "Entwürfe"\r\n'.encode()), Reject)
    assert decide(options, b"a SELECT Entwurf\r\n") is PASS


def test_non_canonical_modified_utf7_cannot_dodge_a_pattern() -> None:
    """'Priv&AGEALQ-te'-style spellings (ASCII in BASE64) are matched by their lenient reading too."""
    options = {"mailboxes_deny": ["Private"]}
    assert isinstance(decide(options, b"a SELECT Priv&AGE-te\r\n"), Reject)


def test_mailbox_separator_option_changes_what_percent_spans() -> None:
    """With separator '.', '%' stops at dots and not at slashes."""
    options = {"mailboxes_deny": ["Private.%"], "separator": "."}
    assert isinstance(decide(options, b"a SELECT Private.a/b\r\n"), Reject)
    assert decide(options, b"a SELECT Private.a.b\r\n") is PASS


def test_unreadable_mailbox_arguments_fail_closed() -> None:
    """A mailbox command whose arguments do not parse is refused when mailbox rules apply."""
    verdict = decide({"mailboxes_deny": ["Private"]}, b"a SELECT (Private)\r\n")
    assert isinstance(verdict, Reject) and verdict.status == "BAD"


@pytest.mark.parametrize(
    ("parts", "refused"),
    [
        ([b"a APPEND INBOX {10}\r\n", b"0123456789", b"\r\n"], False),
        ([b"a APPEND INBOX {11}\r\n", b"0123456789!", b"\r\n"], True),
        ([b'a APPEND INBOX (\\Seen) "01-Jan-2024 00:00:00 +0000" {11}\r\n', b"0123456789!", b"\r\n"], True),
        ([b"a APPEND INBOX {900000}\r\n", StreamedLiteral(900000)], True),
        ([b"a APPEND INBOX {3}\r\n", b"abc", b" {11}\r\n", b"0123456789!", b"\r\n"], True),  # MULTIAPPEND
        (
            [
                b"a APPEND INBOX CATENATE (TEXT {6}\r\n",
                b"012345",
                b' URL "/INBOX;UID=1" TEXT {6}\r\n',
                b"678901",
                b")\r\n",
            ],
            True,
        ),
    ],
)
def test_appends_over_the_size_limit_are_refused_with_toobig(
    parts: list[bytes | StreamedLiteral], refused: bool
) -> None:
    """The message literal, streamed or held, decides; at the limit it passes."""
    verdict = decide({"max_append_size": 10}, *parts)
    assert verdict == (Reject("Message too large", "NO", "TOOBIG") if refused else PASS)


def test_appended_sizes_skip_the_mailbox_and_date() -> None:
    """Only message literals count, not a literal mailbox name or the quoted date."""
    parsed = command(b"a APPEND {5}\r\n", b"Inbox", b' "01-Jan-2024 00:00:00 +0000" {2}\r\n', b"hi", b"\r\n")
    assert appendedSizes(parsed) == [2]


def test_named_mailboxes_follow_each_command_s_syntax() -> None:
    """LIST-EXTENDED options and pattern lists, GETMETADATA options and RENAME pairs are understood."""
    assert namedMailboxes(command(b'a LIST (SUBSCRIBED) "" ("INBOX" "Work/*") RETURN (CHILDREN)\r\n')) == [
        b"INBOX",
        b"Work/*",
    ]
    assert namedMailboxes(command(b"a GETMETADATA (DEPTH 1) Work /private\r\n")) == [b"Work"]
    assert namedMailboxes(command(b"a RENAME A B\r\n")) == [b"A", b"B"]
    assert namedMailboxes(command(b"a NOOP\r\n")) == []
    assert namedMailboxes(command(b"a RENAME A\r\n")) is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"alow": ["FETCH"]}, "alow"),
        ({"allow": "FETCH"}, "allow"),
        ({"deny": ["UID FETCH"]}, "deny"),
        ({"deny": [""]}, "deny"),
        ({"read_only": "yes"}, "read_only"),
        ({"mailboxes_allow": [1]}, "mailboxes_allow"),
        ({"mailboxes_deny": "Private"}, "mailboxes_deny"),
        ({"separator": "::"}, "separator"),
        ({"max_append_size": "10M"}, "max_append_size"),
        ({"max_append_size": -1}, "max_append_size"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict[str, Any], named: str) -> None:
    """Each wrong option is reported by name."""
    with pytest.raises(ValueError, match=re.escape(named)):
        PolicyFilter.fromOptions(options)


# -- Every route to a mailbox ------------------------------------------------------

DENY_ARCHIVE = {"mailboxes_deny": ["Archive", "Archive/*"]}


@pytest.mark.parametrize(
    "line",
    [
        b'a APPEND INBOX CATENATE (URL "/Archive;UIDVALIDITY=5/;UID=1")\r\n',
        b"a APPEND INBOX CATENATE (TEXT {1}\r\n",
        b'a APPEND INBOX CATENATE (URL "imap://alice@mail.test/Arch%69ve/;UID=1")\r\n',
        b'a URLFETCH "/Archive;UIDVALIDITY=5/;UID=1;URLAUTH=anonymous:internal:ab"\r\n',
        b'a GENURLAUTH "imap://a@b/Archive/x;UID=1" INTERNAL\r\n',
        b"a NOTIFY SET (mailboxes Archive (MessageNew))\r\n",
        b"a NOTIFY SET STATUS (selected (MessageNew)) (subtree (Trash Archive/2024) (MessageNew))\r\n",
        b'a ESEARCH IN (mailboxes "Archive") ALL\r\n',
        b"a RESETKEY Archive\r\n",
    ],
)
def test_a_denied_mailbox_is_refused_however_the_command_names_it(line: bytes) -> None:
    """CATENATE and URLFETCH URLs (percent-encoded too), NOTIFY and ESEARCH filters name mailboxes as arguments do."""
    parts: list[bytes | StreamedLiteral] = [line]
    if line.endswith(b"{1}\r\n"):
        parts = [line, b"x", b' URL "/Archive/;UID=1")\r\n']
    verdict = decide(DENY_ARCHIVE, *parts)
    assert isinstance(verdict, Reject) and (verdict.status, verdict.code) == ("NO", "NOPERM"), verdict


@pytest.mark.parametrize(
    "line",
    [
        b'a APPEND INBOX CATENATE (URL "/INBOX;UIDVALIDITY=5/;UID=1" URL ";UID=3")\r\n',
        b"a NOTIFY SET (personal (MessageNew)) (subscribed (MessageNew))\r\n",
        b"a NOTIFY NONE\r\n",
        b"a ESEARCH IN (personal) RETURN (COUNT) ALL\r\n",
        b'a LIST "" "*" RETURN (STATUS (MESSAGES))\r\n',
    ],
)
def test_routes_that_name_no_denied_mailbox_pass(line: bytes) -> None:
    """Other mailboxes, relative URLs and selectors such as personal pass (their STATUS responses are filtered)."""
    assert decide(DENY_ARCHIVE, line) is PASS


@pytest.mark.parametrize(
    ("response", "dropped"),
    [
        (b"* STATUS Archive (MESSAGES 2)\r\n", True),
        (b'* STATUS "Archive/2024" (MESSAGES 2)\r\n', True),
        (b"* STATUS INBOX (MESSAGES 2)\r\n", False),
        (b'* ESEARCH (TAG "a" MAILBOX "Archive" UIDVALIDITY 1) UID ALL 1:3\r\n', True),
        (b'* ESEARCH (TAG "a" MAILBOX "INBOX" UIDVALIDITY 1) UID ALL 1:3\r\n', False),
        (b"a OK [STATUS Archive] done\r\n", False),
    ],
)
def test_status_and_esearch_about_a_denied_mailbox_are_dropped(response: bytes, dropped: bool) -> None:
    """LIST RETURN (STATUS), NOTIFY and multi-mailbox ESEARCH cannot report on a denied mailbox."""
    policy = PolicyFilter.fromOptions(DENY_ARCHIVE)
    parsed = parseResponse([response])
    assert parsed.name in policy.responseNames or parsed.tagged
    verdict = policy.filterResponse(makeSession(), parsed)
    assert (verdict is DROP) is dropped


def test_without_mailbox_rules_no_response_is_parsed() -> None:
    """Read-only alone (or no option) asks the chain for no responses."""
    assert not FilterChain([PolicyFilter.fromOptions({"read_only": True})]).wantsResponse(b"STATUS")


@pytest.mark.parametrize(
    "line", [b"a SUBSCRIBE Trash\r\n", b"a UNSUBSCRIBE INBOX\r\n", b"a GENURLAUTH x INTERNAL\r\n", b"a RESETKEY\r\n"]
)
def test_read_only_refuses_subscription_and_url_authorization_changes(line: bytes) -> None:
    """Subscriptions and URLAUTH keys are server state: read-only refuses changing them."""
    assert decide({"read_only": True}, line) == NOPERM_READ_ONLY


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"read_only": True}, True),
        (DENY_ARCHIVE, True),
        ({"mailboxes_allow": ["INBOX"]}, True),
        ({"read_only": True, "allow_unknown": ["XAPPLEPUSHSERVICE"]}, False),
        ({"read_only": True, "allow": ["XAPPLEPUSHSERVICE", "FETCH"]}, False),
        ({"deny": ["DELETE"]}, False),
        ({}, False),
    ],
)
def test_unknown_commands_are_refused_on_restricted_sessions_unless_allowed_by_name(
    options: dict[str, Any], refused: bool
) -> None:
    """A command whose arguments the proxy does not know could write or name a mailbox unseen."""
    verdict = decide(options, b"a XAPPLEPUSHSERVICE aps-version 2 mailboxes (Archive)\r\n")
    if refused:
        assert verdict == Reject("XAPPLEPUSHSERVICE is not known to the proxy's policy", "NO", "NOPERM")
    else:
        assert verdict is PASS


def test_known_commands_still_pass_read_only() -> None:
    """Reading commands the proxy knows pass a read-only policy."""
    for line in (b"a UID FETCH 1:* (FLAGS)\r\n", b"a ID NIL\r\n", b"a NAMESPACE\r\n", b"a ESEARCH ALL\r\n"):
        assert decide({"read_only": True}, line) is PASS


@pytest.mark.parametrize(
    "url",
    [b"./Archive/;UID=1", b"/INBOX/../Archive/;UID=1", b"/%2E/Archive;UID=1", b"/INBOX/%2e%2E/Archive;UID=1"],
)
def test_urls_with_dot_segments_are_refused(url: bytes) -> None:
    """Servers resolve . and .. in URL paths: such a URL names no mailbox the policy can check."""
    verdict = decide(DENY_ARCHIVE, b'a APPEND INBOX CATENATE (URL "%s")\r\n' % url)
    assert isinstance(verdict, Reject) and verdict.status == "BAD"


@pytest.mark.parametrize(
    ("deny", "source", "refused"),
    [
        (["Parent/Secret"], b"Parent", True),
        (["Parent/Secret"], b"Par", False),
        (["Archive", "Archive/*"], b"Arch", False),
        (["%/Private"], b"Work", True),  # Work/Private would become Other/Deep/Private
        (["%/Private"], b"Work/Team", False),
        (["*/Old"], b"Anything", True),
    ],
)
def test_renaming_a_mailbox_that_may_hold_a_denied_one_is_refused(
    deny: list[str], source: bytes, refused: bool
) -> None:
    """RENAME moves children along: one that could hold a denied mailbox would carry it out of reach of the rules."""
    verdict = decide({"mailboxes_deny": deny}, b"a RENAME %s Other/Deep\r\n" % source)
    if refused:
        assert isinstance(verdict, Reject) and verdict.code == "NOPERM", verdict
    else:
        assert verdict is PASS


def test_renaming_inbox_is_not_refused_for_its_children() -> None:
    """RENAME INBOX moves INBOX's messages, never its children."""
    assert decide({"mailboxes_deny": ["INBOX/Secret"]}, b"a RENAME inbox Old\r\n") is PASS


@pytest.mark.parametrize(
    ("allow", "source", "refused"),
    [
        (["A", "B", "B/*"], b"A", True),  # A/x, not allowed, would become the allowed B/x
        (["A", "A/*", "B", "B/*"], b"A", False),
        (["A", "A/%", "B", "B/*"], b"A", True),  # A/x/y is not allowed
        (["INBOX", "B", "B/*"], b"INBOX", False),  # RENAME INBOX moves no children
    ],
)
def test_with_an_allow_list_renaming_a_mailbox_whose_children_are_not_all_allowed_is_refused(
    allow: list[str], source: bytes, refused: bool
) -> None:
    """RENAME moves children along: a child outside the allow list could land under an allowed name."""
    verdict = decide({"mailboxes_allow": allow}, b"a RENAME %s B/New\r\n" % source)
    if refused:
        assert isinstance(verdict, Reject) and verdict.code == "NOPERM", verdict
    else:
        assert verdict is PASS
