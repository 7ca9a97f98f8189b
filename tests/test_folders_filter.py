"""
The folder filter (mapping and hiding mailboxes) and modified UTF-7.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailproxy.filters import DROP, PASS, Reject, Rewrite
from mailproxy.filters.chain import FilterChain
from mailproxy.filters.folders import NO_SUCH_MAILBOX, FolderFilter
from mailproxy.imap import mutf7
from mailproxy.imap.model import IMAPCommand, IMAPResponse, parseCommand, parseResponse
from mailproxy.interfaces import ICommandFilter, IResponseFilter

SESSION = SimpleNamespace(
    protocol="imap",
    listener="imap",
    clientAddress="127.0.0.1:1234",
    tls=True,
    user="alice",
    upstream="mail",
    selected=None,
)

OPTIONS = {
    "map": {
        "Sent": "INBOX/Sent",
        "Entwürfe": "INBOX/Drafts",
        "My Mail": "INBOX/Old Mail",
        "Papierkorb": "INBOX/Gelöschte Elemente",
        "Archiv": "Archive",
    },
    "hide": ["INBOX/Secret", "Junk*", "%/Private"],
}
FILTER = FolderFilter.fromOptions(OPTIONS)


def command(*parts: bytes) -> IMAPCommand:
    parsed = parseCommand(list(parts))
    assert parsed is not None
    return parsed


def response(*parts: bytes) -> IMAPResponse:
    return parseResponse(list(parts))


def wire(verdict: Any) -> bytes:
    assert isinstance(verdict, Rewrite), verdict
    parts = verdict.message.toWire(literalPlus=True)
    assert all(isinstance(part, bytes) for part in parts)
    return b"".join(parts)


def filterCommand(*parts: bytes, folders: FolderFilter = FILTER) -> Any:
    return folders.filterCommand(SESSION, command(*parts))


def filterResponse(*parts: bytes, folders: FolderFilter = FILTER) -> Any:
    return folders.filterResponse(SESSION, response(*parts))


# modified UTF-7

VECTORS = [
    ("", b""),
    ("INBOX", b"INBOX"),
    ("&", b"&-"),
    ("Tom & Jerry", b"Tom &- Jerry"),
    ("Entwürfe", b"Entw&APw-rfe"),
    ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("Gelöschte Elemente", b"Gel&APY-schte Elemente"),
    ("😀", b"&2D3eAA-"),
    ("a\tb", b"a&AAk-b"),
    ("\x7f", b"&AH8-"),
]


@pytest.mark.parametrize(("name", "encoded"), VECTORS)
def test_mutf7_known_vectors(name: str, encoded: bytes) -> None:
    """Known names encode and decode exactly as RFC 3501 describes."""
    assert mutf7.encode(name) == encoded
    assert mutf7.decode(encoded) == name


@given(st.text(st.characters(exclude_categories=("Cs",))))
def test_mutf7_round_trips_any_text(name: str) -> None:
    """Any text without surrogates round-trips through printable US-ASCII."""
    encoded = mutf7.encode(name)
    assert all(0x20 <= byte <= 0x7E for byte in encoded)
    assert mutf7.decode(encoded) == name


@given(st.binary(max_size=20) | st.text("&-AaPw+,/=\t ", max_size=12).map(str.encode))
def test_mutf7_decode_accepts_only_canonical_input(data: bytes) -> None:
    """Whatever decodes encodes back to the same bytes; anything else raises ValueError."""
    try:
        name = mutf7.decode(data)
    except ValueError:
        return
    assert mutf7.encode(name) == data


@pytest.mark.parametrize(
    "data",
    [
        b"&",  # not closed
        b"&APw",  # not closed
        b"&A-",  # impossible BASE64 length
        b"&AP-",  # an odd number of bytes
        b"&APw=-",  # padding
        b"&APw/-",  # "/" instead of ","
        b"&APx-",  # bits set after the last character
        b"&AGE-",  # a printable character ("a") in BASE64
        b"&APw-&APw-",  # two BASE64 runs in a row
        b"&2D0-",  # a lone surrogate
        b"Entw\xc3\xbcrfe",  # raw UTF-8
        b"a\tb",  # a control character
    ],
)
def test_mutf7_decode_rejects_invalid_input(data: bytes) -> None:
    """Invalid or non-canonical modified UTF-7 raises ValueError."""
    with pytest.raises(ValueError):
        mutf7.decode(data)


def test_mutf7_encode_rejects_lone_surrogates() -> None:
    """A lone surrogate has no UTF-16 form."""
    with pytest.raises(ValueError):
        mutf7.encode("a\ud800b")


# options


def test_provides_the_filter_interfaces() -> None:
    """The filter sees commands and only LIST, LSUB, STATUS and ESEARCH responses."""
    assert verifyObject(ICommandFilter, FILTER)
    assert verifyObject(IResponseFilter, FILTER)
    assert FILTER.responseNames == frozenset({b"LIST", b"LSUB", b"STATUS", b"ESEARCH"})
    chain = FilterChain([FILTER])
    assert chain.wantsResponse(b"LIST") and chain.wantsResponse(b"STATUS")
    assert not chain.wantsResponse(b"FETCH")


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"map": ["Sent"]}, "map"),
        ({"map": "Sent"}, "map"),
        ({"map": {"Sent": 1}}, "map"),
        ({"map": {"Sent": ""}}, "map"),
        ({"map": {"": "INBOX/Sent"}}, "map"),
        ({"map": {"Sent/": "INBOX/Sent"}}, "map"),
        ({"map": {"Sent": "/INBOX/Sent"}}, "map"),
        ({"map": {"Sent": "INBOX/Sent", "Gesendet": "INBOX/Sent"}}, "map"),
        ({"map": {"INBOX/Sent": "Sent", "inbox/Sent": "Other"}}, "map"),
        ({"hide": "Junk"}, "hide"),
        ({"hide": [""]}, "hide"),
        ({"hide": [1]}, "hide"),
        ({"separator": ""}, "separator"),
        ({"separator": "//"}, "separator"),
        ({"separator": 1}, "separator"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, Any], option: str) -> None:
    """Wrong options raise ValueError starting with the option's name."""
    with pytest.raises(ValueError, match=rf"^{option}: "):
        FolderFilter.fromOptions(options)


def test_no_options_changes_nothing() -> None:
    """Without options, every command and response is passed."""
    folders = FolderFilter.fromOptions({})
    assert filterCommand(b"a SELECT Sent\r\n", folders=folders) is PASS
    assert filterCommand(b'a LIST "" *\r\n', folders=folders) is PASS
    assert filterResponse(b'* LIST () "/" INBOX/Sent\r\n', folders=folders) is PASS


# commands


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a SELECT Sent", b"a SELECT INBOX/Sent"),
        (b"a SELECT Sent (CONDSTORE)", b"a SELECT INBOX/Sent (CONDSTORE)"),
        (b'a SELECT "Sent"', b"a SELECT INBOX/Sent"),
        (b"a EXAMINE Sent/2024", b"a EXAMINE INBOX/Sent/2024"),
        (b"a STATUS Sent (MESSAGES UNSEEN)", b"a STATUS INBOX/Sent (MESSAGES UNSEEN)"),
        (b"a CREATE Sent/2025", b"a CREATE INBOX/Sent/2025"),
        (b"a DELETE Sent/2020", b"a DELETE INBOX/Sent/2020"),
        (b"a RENAME Sent/2023 Sent/Old", b"a RENAME INBOX/Sent/2023 INBOX/Sent/Old"),
        (b"a RENAME Other/Sub Sent/Other", b"a RENAME Other/Sub INBOX/Sent/Other"),
        (b"a RENAME Sent/Other Other", b"a RENAME INBOX/Sent/Other Other"),
        (b"a SUBSCRIBE Sent", b"a SUBSCRIBE INBOX/Sent"),
        (b"a UNSUBSCRIBE Sent", b"a UNSUBSCRIBE INBOX/Sent"),
        (b"a GETQUOTAROOT Sent", b"a GETQUOTAROOT INBOX/Sent"),
        (b"a COPY 1:3 Sent", b"a COPY 1:3 INBOX/Sent"),
        (b"a UID COPY 1:3 Sent", b"a UID COPY 1:3 INBOX/Sent"),
        (b"a MOVE 1:* Archiv", b"a MOVE 1:* Archive"),
        (b"a UID MOVE 4,7 Archiv/2020", b"a UID MOVE 4,7 Archive/2020"),
        (b"a SELECT Entw&APw-rfe", b"a SELECT INBOX/Drafts"),
        (b"a CREATE Entw&APw-rfe/Alt", b"a CREATE INBOX/Drafts/Alt"),
        (b'a SELECT "My Mail"', b'a SELECT "INBOX/Old Mail"'),
        (b'a SELECT "My Mail/Tom &- Jerry"', b'a SELECT "INBOX/Old Mail/Tom &- Jerry"'),
        (b"a SELECT Papierkorb", b'a SELECT "INBOX/Gel&APY-schte Elemente"'),
        (b"a SELECT Papierkorb/Alt", b'a SELECT "INBOX/Gel&APY-schte Elemente/Alt"'),
    ],
)
def test_commands_are_mapped(line: bytes, expected: bytes) -> None:
    """Client names, and their children, become upstream names."""
    assert wire(filterCommand(line + b"\r\n")) == expected + b"\r\n"


def test_append_is_mapped_and_keeps_its_literal() -> None:
    """APPEND's mailbox is mapped; the message literal is untouched."""
    verdict = filterCommand(b"a APPEND Sent (\\Seen) {5}\r\n", b"hello", b"\r\n")
    assert wire(verdict) == b"a APPEND INBOX/Sent (\\Seen) {5+}\r\nhello\r\n"


def test_literal_names_are_mapped() -> None:
    """A name sent as a literal is mapped too, written as an atom or quoted string."""
    assert wire(filterCommand(b"a SELECT {4}\r\n", b"Sent", b"\r\n")) == b"a SELECT INBOX/Sent\r\n"
    assert wire(filterCommand(b"a SELECT {7}\r\n", b"My Mail", b"\r\n")) == b'a SELECT "INBOX/Old Mail"\r\n'
    verdict = filterCommand(b"a RENAME {4}\r\n", b"Sent", b" {12}\r\n", b"Entw&APw-rfe", b"\r\n")
    assert wire(verdict) == b"a RENAME INBOX/Sent INBOX/Drafts\r\n"


def test_another_separator() -> None:
    """Children are found with the configured separator."""
    folders = FolderFilter.fromOptions({"map": {"Sent": "INBOX.Sent"}, "hide": ["%.Private"], "separator": "."})
    assert wire(filterCommand(b"a SELECT Sent.2024\r\n", folders=folders)) == b"a SELECT INBOX.Sent.2024\r\n"
    assert filterCommand(b"a SELECT Sent/2024\r\n", folders=folders) is PASS
    assert filterCommand(b"a SELECT Work.Private\r\n", folders=folders) == NO_SUCH_MAILBOX
    assert filterCommand(b"a SELECT Work.Team.Private\r\n", folders=folders) is PASS


@pytest.mark.parametrize(
    "line",
    [
        b"a SELECT INBOX",
        b"a SELECT Other",
        b"a SELECT Sentinel",
        b"a SELECT INBOX/Sent",  # the upstream name itself is relayed as it is
        b'a SELECT "Other Mail"',
        b"a SELECT &",  # not modified UTF-7
        b"a EXAMINE Work/Team/Private",
        b"a SELECT INBOX/Secrets",
        b"a COPY 1:3 Other",
        b"a UID COPY 1:3 Other",
        b"a UID FETCH 1:* (FLAGS)",
        b"a FETCH 1 BODY[HEADER.FIELDS (Sent)]",
        b"a NOOP",
        b"a SEARCH SUBJECT Sent",
    ],
)
def test_unchanged_commands_pass(line: bytes) -> None:
    """Commands naming no mapped or hidden mailbox are passed, so their bytes are relayed."""
    assert filterCommand(line + b"\r\n") is PASS


@pytest.mark.parametrize(
    "parts",
    [
        [b"a SELECT INBOX/Secret\r\n"],
        [b"a SELECT inbox/Secret\r\n"],
        [b"a EXAMINE INBOX/Secret/Deeper\r\n"],
        [b"a STATUS Junk (MESSAGES)\r\n"],
        [b'a STATUS "Junk E-Mail" (MESSAGES)\r\n'],
        [b"a APPEND Junk {3}\r\n", b"abc", b"\r\n"],
        [b"a CREATE Junk/New\r\n"],
        [b"a DELETE Junk\r\n"],
        [b"a RENAME Junk Other\r\n"],
        [b"a RENAME Other INBOX/Secret\r\n"],
        [b"a SUBSCRIBE Work/Private\r\n"],
        [b"a UNSUBSCRIBE Work/Private\r\n"],
        [b"a GETQUOTAROOT Junk\r\n"],
        [b"a COPY 1:3 Junk\r\n"],
        [b"a UID COPY 1:3 Junk\r\n"],
        [b"a MOVE 1 INBOX/Secret\r\n"],
        [b"a UID MOVE 1 INBOX/Secret\r\n"],
        [b"a SELECT {12}\r\n", b"INBOX/Secret", b"\r\n"],
        [b'a SELECT "Junk\xc3\xa4"\r\n'],  # raw UTF-8 is still matched
    ],
)
def test_commands_naming_hidden_mailboxes_are_rejected(parts: list[bytes]) -> None:
    """Hidden mailboxes (and their children) do not exist for the client."""
    verdict = filterCommand(*parts)
    assert verdict == Reject("No such mailbox", "NO", "NONEXISTENT")


def test_client_names_mapped_to_hidden_mailboxes_are_rejected() -> None:
    """Hiding applies to upstream names, whatever the client calls them."""
    folders = FolderFilter.fromOptions({"map": {"Geheim": "INBOX/Secret"}, "hide": ["INBOX/Secret"]})
    assert filterCommand(b"a SELECT Geheim\r\n", folders=folders) == NO_SUCH_MAILBOX
    assert filterResponse(b'* LIST () "/" INBOX/Secret\r\n', folders=folders) is DROP


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'a LIST "" Sent', b'a LIST "" INBOX/Sent'),
        (b'a LIST "" Sent/2024', b'a LIST "" INBOX/Sent/2024'),
        (b'a LIST "" "Sent/*"', b'a LIST "" "INBOX/Sent/*"'),
        (b'a LIST "" Sent/%', b'a LIST "" "INBOX/Sent/%"'),
        (b'a LIST "" Sent/20*', b'a LIST "" "INBOX/Sent/20*"'),
        (b'a LIST "" Entw&APw-rfe/*', b'a LIST "" "INBOX/Drafts/*"'),
        (b'a LIST "" "My Mail/%"', b'a LIST "" "INBOX/Old Mail/%"'),
        (b"a LIST Sent/ %", b'a LIST "" "INBOX/Sent/%"'),
        (b"a LIST Sent/ 2024", b'a LIST "" INBOX/Sent/2024'),
        (b'a LSUB "" Sent/*', b'a LSUB "" "INBOX/Sent/*"'),
        (b'a LSUB "" Sent', b'a LSUB "" INBOX/Sent'),
        (
            b'a LIST (SUBSCRIBED) "" (Sent "Other/*" Entw&APw-rfe) RETURN (CHILDREN)',
            b'a LIST (SUBSCRIBED) "" (INBOX/Sent "Other/*" INBOX/Drafts) RETURN (CHILDREN)',
        ),
        (b"a LIST Sent/ (% 2024)", b'a LIST "" ("INBOX/Sent/%" INBOX/Sent/2024)'),
    ],
)
def test_list_patterns_are_mapped(line: bytes, expected: bytes) -> None:
    """Patterns naming a mapped mailbox, or the inside of one, are mapped."""
    assert wire(filterCommand(line + b"\r\n")) == expected + b"\r\n"


def test_list_reference_and_pattern_are_joined_when_mapped() -> None:
    """With a reference, a mapped pattern is sent joined, and so are the others in a list."""
    verdict = filterCommand(b'a LIST Se ("nt" "x*")\r\n')
    assert wire(verdict) == b'a LIST "" (INBOX/Sent "Sex*")\r\n'


@pytest.mark.parametrize(
    "line",
    [
        b'a LIST "" *',
        b'a LIST "" %',
        b'a LIST "" Sent*',
        b'a LIST "" ""',
        b'a LIST "" INBOX/*',
        b'a LIST "" INBOX/Secret',  # hidden: the responses are dropped instead
        b"a LIST Other/ %",
        b'a LSUB "" *',
        b'a LIST (SUBSCRIBED) "" ("*" Other) RETURN (STATUS (MESSAGES))',
        b'a LIST Sent/ "&"',  # the pattern is not modified UTF-7
    ],
)
def test_unchanged_list_commands_pass(line: bytes) -> None:
    """Patterns with wildcards outside mapped mailboxes are relayed as they are."""
    assert filterCommand(line + b"\r\n") is PASS


# responses


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b'* LIST (\\HasNoChildren) "/" INBOX/Sent'], b'* LIST (\\HasNoChildren) "/" Sent'),
        ([b'* LIST () "/" INBOX/Sent/2024'], b'* LIST () "/" Sent/2024'),
        ([b'* LIST () "/" "inbox/Sent"'], b'* LIST () "/" Sent'),
        ([b'* LIST () "/" INBOX/Drafts'], b'* LIST () "/" Entw&APw-rfe'),
        ([b'* LIST () "/" INBOX/Drafts/Alt'], b'* LIST () "/" Entw&APw-rfe/Alt'),
        ([b'* LIST () "/" "INBOX/Old Mail"'], b'* LIST () "/" "My Mail"'),
        ([b'* LIST () "/" "INBOX/Gel&APY-schte Elemente"'], b'* LIST () "/" Papierkorb'),
        ([b'* LIST () "/" Archive/2020'], b'* LIST () "/" Archiv/2020'),
        ([b'* LIST () "/" {10}\r\n', b"INBOX/Sent", b""], b'* LIST () "/" Sent'),
        ([b'* LSUB () "/" INBOX/Sent'], b'* LSUB () "/" Sent'),
        ([b'* LSUB (\\Noselect) "/" "INBOX/Old Mail"'], b'* LSUB (\\Noselect) "/" "My Mail"'),
        ([b"* STATUS INBOX/Sent (MESSAGES 3 UNSEEN 1)"], b"* STATUS Sent (MESSAGES 3 UNSEEN 1)"),
        ([b'* STATUS "INBOX/Old Mail" (MESSAGES 0)'], b'* STATUS "My Mail" (MESSAGES 0)'),
        ([b"* STATUS INBOX/Drafts (MESSAGES 0)"], b"* STATUS Entw&APw-rfe (MESSAGES 0)"),
        (
            [b'* LIST () "/" INBOX/Sent/New ("OLDNAME" (INBOX/Sent/Old))'],
            b'* LIST () "/" Sent/New ("OLDNAME" (Sent/Old))',
        ),
        (
            [b'* LIST () "/" Other ("CHILDINFO" ("SUBSCRIBED") "OLDNAME" ("INBOX/Old Mail"))'],
            b'* LIST () "/" Other ("CHILDINFO" ("SUBSCRIBED") "OLDNAME" ("My Mail"))',
        ),
        ([b'* LIST () "/" Other ("OLDNAME" (INBOX/Secret))'], b'* LIST () "/" Other ()'),
    ],
)
def test_responses_are_mapped(parts: list[bytes], expected: bytes) -> None:
    """Upstream names in LIST, LSUB and STATUS responses become client names."""
    assert wire(filterResponse(*parts[:-1], parts[-1] + b"\r\n")) == expected + b"\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b'* LIST () "/" INBOX/Secret',
        b'* LIST (\\HasNoChildren) "/" INBOX/Secret/Deeper',
        b'* LIST () "/" Junk',
        b'* LIST () "/" "Junk E-Mail"',
        b'* LIST () "/" Work/Private',
        b'* LIST () "/" "Junk\xc3\xa4"',  # raw UTF-8 is still matched
        b'* LSUB () "/" Junk',
        b"* STATUS Junk (MESSAGES 4)",
        b'* LIST () "/" Sent',  # shadowed by the client name "Sent"
        b'* LIST () "/" Sent/2024',
        b'* LIST () "/" Archiv',
        b"* STATUS Sent (MESSAGES 1)",
    ],
)
def test_responses_about_hidden_mailboxes_are_dropped(line: bytes) -> None:
    """Hidden mailboxes, and upstream ones the client could not reach, are not shown."""
    assert filterResponse(line + b"\r\n") is DROP


@pytest.mark.parametrize(
    "line",
    [
        b'* LIST (\\HasChildren) "/" INBOX',
        b'* LIST () "/" Other',
        b'* LIST () "/" Sentinel',
        b'* LIST () "/" Work/Team/Private',
        b'* LIST () "/" "&"',  # not modified UTF-7: relayed as it is
        b'* LIST (\\Noselect) NIL ""',
        b'* LIST () "/" Other ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LSUB () "/" Other',
        b"* STATUS Other (MESSAGES 1)",
        b"* STATUS INBOX (MESSAGES 1)",
        b"* LIST",
        b"a LIST completed",
        b"a OK LIST completed",
        b"* 3 EXISTS",
        b"* SEARCH 1 2 3",
    ],
)
def test_unchanged_responses_pass(line: bytes) -> None:
    """Responses about visible, unmapped mailboxes (or none) are passed."""
    assert filterResponse(line + b"\r\n") is PASS


@pytest.mark.parametrize(
    "line",
    [
        b'a APPEND INBOX CATENATE (URL "/INBOX/Secret;UIDVALIDITY=1/;UID=1")\r\n',
        b'a URLFETCH "imap://u@h/Junk%2FSpam;UID=1"\r\n',
        b"a NOTIFY SET (subtree-one Junk (MessageNew))\r\n",
        b'a ESEARCH IN (mailboxes ("INBOX" "Junk")) ALL\r\n',
        b"a GETACL INBOX/Secret\r\n",
        b"a MYRIGHTS Junk\r\n",
    ],
)
def test_a_hidden_mailbox_is_nonexistent_however_a_command_names_it(line: bytes) -> None:
    """URLs, NOTIFY and ESEARCH filters and ACL commands cannot reach a hidden mailbox."""
    assert FILTER.filterCommand(SESSION, command(line)) == NO_SUCH_MAILBOX


def test_a_hidden_mailbox_in_an_esearch_response_is_dropped() -> None:
    """A multi-mailbox ESEARCH result about a hidden mailbox never reaches the client."""
    hidden = response(b'* ESEARCH (TAG "a" MAILBOX "Junk" UIDVALIDITY 1) ALL 1:3\r\n')
    shown = response(b'* ESEARCH (TAG "a" MAILBOX "INBOX" UIDVALIDITY 1) ALL 1:3\r\n')
    assert FILTER.filterResponse(SESSION, hidden) is DROP
    assert FILTER.filterResponse(SESSION, shown) is PASS


@pytest.mark.parametrize("line", [b'a APPEND INBOX CATENATE (URL "/INBOX/../Junk/;UID=1")\r\n', b"a COPY Sent\r\n"])
def test_mailbox_arguments_the_filter_cannot_read_are_refused(line: bytes) -> None:
    """A URL with dot segments could name a hidden mailbox; a COPY without a target names none it can check: BAD."""
    verdict = FILTER.filterCommand(SESSION, command(line))
    assert isinstance(verdict, Reject) and verdict.status == "BAD"


@pytest.mark.parametrize(("source", "refused"), [(b"Work", True), (b"Work/Team", False), (b"INBOX", False)])
def test_renaming_a_mailbox_that_may_hold_a_hidden_one_is_refused(source: bytes, refused: bool) -> None:
    """RENAME would move a hidden child (Work/Private) to a name that is not hidden; RENAME INBOX moves no children."""
    verdict = FILTER.filterCommand(SESSION, command(b"a RENAME %s Elsewhere/Deep\r\n" % source))
    if refused:
        assert verdict == Reject("This mailbox cannot be renamed through this proxy", "NO", "CANNOT")
    else:
        assert verdict is PASS
