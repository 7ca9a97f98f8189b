"""
The IMAP syntax helpers: tags, arguments, quoting and capability lists.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailproxy.imap.syntax import (
    RELAY_CAPABILITIES,
    CapabilityTransform,
    SyntaxError_,
    capabilitiesIn,
    isAtom,
    parseArguments,
    quoted,
    rewriteCapabilities,
    tagAndCommand,
)

# tagAndCommand


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a1 login alice pw\r\n", (b"a1", b"LOGIN")),
        (b"A001 Capability\r\n", (b"A001", b"CAPABILITY")),
        (b"x.y-z] uid fetch 1 (FLAGS)\r\n", (b"x.y-z]", b"UID")),
        (b"t1 NOOP", (b"t1", b"NOOP")),
        (b"t1 x-custom.cmd arg\r\n", (b"t1", b"X-CUSTOM.CMD")),
    ],
)
def test_tag_and_command_returns_tag_and_upper_cased_name(line: bytes, expected: tuple[bytes, bytes]) -> None:
    """The tag is returned verbatim and the command name upper-cased."""
    assert tagAndCommand(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"+ NOOP\r\n",
        b"a+1 NOOP\r\n",
        b"a(1 NOOP\r\n",
        b"a)1 NOOP\r\n",
        b"a{1 NOOP\r\n",
        b"a%1 NOOP\r\n",
        b"a*1 NOOP\r\n",
        b'"a" NOOP\r\n',
        b"a\\1 NOOP\r\n",
        b"a\x01 NOOP\r\n",
        b" NOOP\r\n",
    ],
)
def test_tag_and_command_rejects_invalid_tags(line: bytes) -> None:
    """Tags with atom-specials, "+" or no tag at all are refused."""
    assert tagAndCommand(line) is None


@pytest.mark.parametrize("line", [b"a1\r\n", b"a1 \r\n", b"a1", b"a1 1NOOP\r\n", b"a1 NOOP(\r\n", b"a1  NOOP\r\n"])
def test_tag_and_command_requires_a_command_name(line: bytes) -> None:
    """A tag without a well-formed command name after one space is refused."""
    assert tagAndCommand(line) is None


# parseArguments


def test_parse_arguments_reads_atoms_and_quoted_strings() -> None:
    """Atoms and quoted strings (with spaces) become argument values."""
    assert parseArguments([b' alice "pass word" INBOX\r\n'], []) == [b"alice", b"pass word", b"INBOX"]


def test_parse_arguments_unescapes_quote_and_backslash() -> None:
    """\\" and \\\\ inside a quoted string become " and \\."""
    assert parseArguments([b' "a\\"b" "c\\\\d" ""\r\n'], []) == [b'a"b', b"c\\d", b""]


def test_parse_arguments_of_command_without_arguments_is_empty() -> None:
    """A segment holding only CRLF yields no arguments."""
    assert parseArguments([b"\r\n"], []) == []


def test_parse_arguments_takes_literals_across_segments() -> None:
    """Each literal follows its segment, with announcements stripped and binary data kept."""
    segments = [b" {5}\r\n", b" {8+}\r\n", b"\r\n"]
    literals = [b"alice", b"pa\r\n\x00 \xffw"]
    assert parseArguments(segments, literals) == [b"alice", b"pa\r\n\x00 \xffw"]


def test_parse_arguments_mixes_tokens_before_and_after_literals() -> None:
    """Tokens before an announcement, the literal, and tokens after it come out in order."""
    segments = [b' INBOX "q s" {3}\r\n', b" tail ~{2}\r\n", b" end\r\n"]
    assert parseArguments(segments, [b'"x(', b"\x00\x01"]) == [b"INBOX", b"q s", b'"x(', b"tail", b"\x00\x01", b"end"]


def test_parse_arguments_rejects_unterminated_quote() -> None:
    """A quoted string without its closing quote raises SyntaxError_."""
    with pytest.raises(SyntaxError_):
        parseArguments([b' alice "secret\r\n'], [])


def test_parse_arguments_rejects_escaped_final_quote() -> None:
    """A quoted string whose only closing quote is escaped is unterminated."""
    with pytest.raises(SyntaxError_):
        parseArguments([b' "abc\\"\r\n'], [])


@pytest.mark.parametrize("segment", [b" a(b\r\n", b" ab)\r\n", b" a%\r\n", b" a*\r\n", b" a\\b\r\n", b" a\x01b\r\n"])
def test_parse_arguments_rejects_atom_specials_in_atoms(segment: bytes) -> None:
    """Atoms containing specials or controls raise SyntaxError_."""
    with pytest.raises(SyntaxError_):
        parseArguments([segment], [])


# (space, CR and LF end an atom, or its line)
@pytest.mark.parametrize("octet", [octet for octet in range(256) if octet not in b" \r\n"])
def test_an_atom_argument_is_refused_exactly_for_specials_and_controls(octet: int) -> None:
    """Every octet: an atom holding one of ( ) { % * " \\, a control or DEL is refused; any other is read."""
    refused = octet in b'(){%*"\\' or octet < 0x20 or octet == 0x7F
    segment = b" a" + bytes([octet]) + b"b\r\n"
    if refused:
        with pytest.raises(SyntaxError_):
            parseArguments([segment], [])
    else:
        assert parseArguments([segment], []) == [b"a" + bytes([octet]) + b"b"]


# quoted and isAtom


def test_quoted_escapes_backslash_and_double_quote() -> None:
    """quoted() wraps in quotes and escapes \\ and "."""
    assert quoted(b'pa"ss\\word') == b'"pa\\"ss\\\\word"'
    assert quoted(b"") == b'""'


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b", b"\r\n"])
def test_quoted_refuses_cr_lf_and_nul(value: bytes) -> None:
    """Values with CR, LF or NUL cannot be quoted and raise ValueError."""
    with pytest.raises(ValueError):
        quoted(value)


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=50).filter(lambda value: not {0, 10, 13} & set(value)))
def test_quoted_value_parses_back_to_itself(value: bytes) -> None:
    """Any quotable value survives quoted() then parseArguments()."""
    assert parseArguments([b" " + quoted(value) + b"\r\n"], []) == [value]


@pytest.mark.parametrize("value", [b"INBOX", b"alice", b"a+b~c", b"x.y-z_1", b"!#$&'"])
def test_is_atom_accepts_plain_atoms(value: bytes) -> None:
    """Printable ASCII without atom-specials is an atom."""
    assert isAtom(value)


@pytest.mark.parametrize(
    "value", [b"", b"a b", b"a(", b"a)", b"a{", b"a%", b"a*", b'a"', b"a\\", b"a]", b"a\x7f", b"a\x00", b"caf\xc3\xa9"]
)
def test_is_atom_rejects_specials_controls_8bit_and_empty(value: bytes) -> None:
    """Empty values, atom-specials, controls, DEL and 8-bit bytes are not atoms."""
    assert not isAtom(value)


# Capabilities

SERVER_CAPABILITIES = (
    b"IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=XOAUTH2 COMPRESS=DEFLATE SASL-IR LOGINDISABLED "
    b"LOGIN-REFERRALS MAILBOX-REFERRALS IDLE MOVE LITERAL+ ID"
)


def test_rewrite_capability_response_drops_unrelayable_capabilities() -> None:
    """A * CAPABILITY response loses STARTTLS, AUTH=, COMPRESS=, SASL-IR, LOGINDISABLED and referrals."""
    line = b"* CAPABILITY " + SERVER_CAPABILITIES + b"\r\n"
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == b"* CAPABILITY IMAP4rev1 IDLE MOVE LITERAL+ ID\r\n"


def test_rewrite_capability_response_is_case_insensitive() -> None:
    """Lower-case response and capability names are matched and filtered too."""
    line = b"* capability imap4rev1 starttls auth=plain compress=deflate sasl-ir idle literal+\r\n"
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == b"* capability imap4rev1 idle literal+\r\n"


def test_rewrite_capability_response_code_in_tagged_ok() -> None:
    """The [CAPABILITY ...] code of a tagged OK is filtered and the rest of the line kept."""
    line = b"a OK [CAPABILITY " + SERVER_CAPABILITIES + b"] Logged in\r\n"
    expected = b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE LITERAL+ ID] Logged in\r\n"
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == expected


def test_rewrite_lower_case_capability_code_in_greeting() -> None:
    """A lower-case [capability ...] code in a greeting is filtered."""
    line = b"* OK [capability IMAP4rev1 StartTLS Auth=Plain Idle] ready\r\n"
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == b"* OK [CAPABILITY IMAP4rev1 Idle] ready\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"* OK [ALERT] STARTTLS AUTH=PLAIN mentioned in text\r\n",
        b"* OK IMAP4rev1 STARTTLS ready\r\n",
        b"a1 OK done\r\n",
        b"* 3 EXISTS\r\n",
    ],
)
def test_rewrite_leaves_lines_without_capability_lists_unchanged(line: bytes) -> None:
    """Lines that carry no capability list are returned unchanged."""
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == line


def test_rewrite_leaves_capability_text_inside_fetch_data_unchanged() -> None:
    """A "[CAPABILITY ...]" inside a FETCH envelope subject is message data, not a response code."""
    line = b'* 1 FETCH (ENVELOPE ("Mon, 1 Jan 2024" "[CAPABILITY STARTTLS] howto" NIL NIL NIL NIL NIL NIL NIL NIL))\r\n'
    assert rewriteCapabilities(line, RELAY_CAPABILITIES) == line


def test_capability_transform_with_custom_lists() -> None:
    """A CapabilityTransform drops exact names and prefixes case-insensitively, keeping order."""
    transform = CapabilityTransform([b"idle"], [b"x-"])
    assert transform([b"B", b"IDLE", b"X-FOO", b"A", b"x-bar", b"IDLEX"]) == [b"B", b"A", b"IDLEX"]


def test_capabilities_in_capability_response() -> None:
    """capabilitiesIn lists the names of a * CAPABILITY response."""
    assert capabilitiesIn(b"* CAPABILITY IMAP4rev1 IDLE  LITERAL+\r\n") == [b"IMAP4rev1", b"IDLE", b"LITERAL+"]


def test_capabilities_in_response_code() -> None:
    """capabilitiesIn lists the names of a [CAPABILITY ...] response code."""
    line = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"
    assert capabilitiesIn(line) == [b"IMAP4rev1", b"STARTTLS", b"AUTH=PLAIN"]


@pytest.mark.parametrize("line", [b"* OK Dovecot ready.\r\n", b"a1 OK [READ-WRITE] done\r\n", b"* 1 EXISTS\r\n"])
def test_capabilities_in_returns_none_without_a_list(line: bytes) -> None:
    """capabilitiesIn returns None for lines without a capability list."""
    assert capabilitiesIn(line) is None


def test_a_transform_remembers_lists_without_sharing_its_answers() -> None:
    """The same list again gets the same answer, which the caller may change; past the remembered lists, still right."""
    transform = CapabilityTransform(hidden=[b"STARTTLS"], hiddenPrefixes=[b"AUTH="])
    names = [b"IMAP4rev1", b"STARTTLS", b"AUTH=PLAIN", b"IDLE"]
    first = transform(names)
    first.append(b"CHANGED")
    assert transform(names) == [b"IMAP4rev1", b"IDLE"]
    for number in range(200):
        assert transform([b"X%d" % number, b"starttls"]) == [b"X%d" % number]
    assert transform(names) == [b"IMAP4rev1", b"IDLE"]
