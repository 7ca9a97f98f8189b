"""
The strict IMAP argument lexer that the client framer and the command
parser share, and what each does with it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailproxy.imap.framer import IMAPFramer, Line, LiteralChunk
from mailproxy.imap.lexer import MAX_DEPTH, Announcement, ArgumentLexer, Atom, LexError, List, String, commandHead
from mailproxy.imap.model import ParseError, parseCommand, serialize


def lexed(data: bytes) -> list[object]:
    lexer = ArgumentLexer()
    assert lexer.segment(data) is None
    return list(lexer.finish())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'"x{18}', "unterminated quoted string"),
        (b'"Arch\\ive"', 'escape only \\" and \\\\'),
        (b'"A\\rchive"', 'escape only \\" and \\\\'),
        (b'"a\\', 'escape only \\" and \\\\'),
        (b'"a\x00b"', "CR, LF or NUL"),
        (b"a{5}", "invalid character 0x7b"),
        (b"a(b", "invalid character 0x28"),
        (b'a"b"', "invalid character 0x22"),
        (b"caf\xc3\xa9", "invalid character 0xc3"),
        (b'"a""b"', "separated by a space"),
        (b"(a)(b)", "separated by a space"),
        (b"a)", "unbalanced ')'"),
        (b"(a", "unbalanced '('"),
        (b"{5} x", "no literal announcement at the end"),
        (b"{x}", "no literal announcement at the end"),
        (b"\\", "empty atom"),
        (b"BODY[HEADER.FIELDS (FROM", "unterminated section"),
        (b'BODY[HEADER.FIELDS ("x{5}', "unterminated quoted string"),
        (b"BODY[TEXT]x", "a section must end its atom"),
        (b"(" * (MAX_DEPTH + 1) + b")" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
    ],
)
def test_what_servers_may_read_differently_is_an_error(data: bytes, reason: str) -> None:
    """Unterminated or badly escaped strings, specials in atoms, missing spaces, unbalanced or deep lists are refused."""
    lexer = ArgumentLexer()
    with pytest.raises(LexError, match=reason.replace("\\", "\\\\").replace("(", r"\(").replace(")", r"\)")):
        lexer.segment(data)
        lexer.finish()


def test_tokens_of_ordinary_commands() -> None:
    """Atoms, flags, sequence sets, wildcards, quoted strings with \\" and \\\\, nested lists and sections read as tokens."""
    assert lexed(b'1:* +FLAGS.SILENT (\\Seen $Junk) "a \\"q\\" \\\\ b" % * ]x') == [
        Atom(b"1:*"),
        Atom(b"+FLAGS.SILENT"),
        List((Atom(b"\\Seen"), Atom(b"$Junk"))),
        String(b'a "q" \\ b'),
        Atom(b"%"),
        Atom(b"*"),
        Atom(b"]x"),
    ]
    assert lexed(b'1 (BODY.PEEK[HEADER.FIELDS (From "X-A b" "{x}" "Y")]<0.100> UID)') == [
        Atom(b"1"),
        List((Atom(b'BODY.PEEK[HEADER.FIELDS (From "X-A b" "{x}" Y)]<0.100>'), Atom(b"UID"))),
    ]
    assert lexed(b"") == [] and lexed(b"  a   b  ") == [Atom(b"a"), Atom(b"b")]


def test_literals_are_announced_only_where_an_argument_starts() -> None:
    """{n}, {n+}, ~{n} count after a space or '(' or a literal, with everything before reading cleanly."""
    assert ArgumentLexer().segment(b"INBOX {5}") == Announcement(5, False, False)
    assert ArgumentLexer().segment(b"INBOX (x {5+}") == Announcement(5, True, False)
    assert ArgumentLexer().segment(b"INBOX ~{7}") == Announcement(7, False, True)
    for text in (b'"x{5}', b"x{5}", b'"x" a{5}', b'x "y {5}'):
        with pytest.raises(LexError):
            ArgumentLexer().segment(text)
    lexer = ArgumentLexer()
    announcement = lexer.segment(b"INBOX (TEXT {3}")
    assert announcement is not None
    lexer.literal(b"abc", announcement)
    with pytest.raises(LexError, match="separated"):
        ArgumentLexer(lexer.depth, afterToken=True).segment(b"{3}")
    assert lexer.segment(b" {2+}") == Announcement(2, True, False)


@pytest.mark.parametrize(
    ("line", "tag", "name", "uid", "start"),
    [
        (b"t NOOP", b"t", b"NOOP", False, 6),
        (b"a.1 uid fetch 1 x", b"a.1", b"FETCH", True, 14),
        (b"t SELECT INBOX/x", b"t", b"SELECT", False, 9),
    ],
)
def test_command_head(line: bytes, tag: bytes, name: bytes, uid: bool, start: int) -> None:
    """The tag, the name (UID folded in) and where the arguments start."""
    head = commandHead(line)
    assert head is not None and (head.tag, head.name, head.uid, head.arguments) == (tag, name, uid, start)


@pytest.mark.parametrize(
    "line", [b"+ x", b"t{5}", b"t NOOP{5}", b"t UID", b"t UID {5}", b"\xff NOOP", b" NOOP", b"DONE"]
)
def test_lines_without_a_tag_and_name_have_no_head(line: bytes) -> None:
    """Servers do not read an argument (so no literal) where the tag and name should be."""
    assert commandHead(line) is None


@pytest.mark.parametrize(
    "stream",
    [
        b't NOOP "x{18}\r\nu SELECT Archive\r\n',
        b't NOOP "x{18+}\r\nu SELECT Archive\r\n',
        b't FETCH 1 (BODY.PEEK[HEADER.FIELDS ("x{18}\r\nu SELECT Archive\r\n',
        b"t NOOP a{18}\r\nu SELECT Archive\r\n",
        b"t NOOP{18}\r\nu SELECT Archive\r\n",
        b"t UID {18}\r\nu SELECT Archive\r\n",
        b'{3}\r\n"a{18}\r\nu SELECT Archive\r\n',
    ],
)
def test_the_framer_takes_no_literal_from_text_servers_reject(stream: bytes) -> None:
    """A quoted string or atom ending in {n}, or {n} in the head, is no literal: the next line is a command."""
    events = IMAPFramer().feed(stream)
    assert not any(isinstance(event, LiteralChunk) for event in events)
    assert events[-1] == Line(b"u SELECT Archive\r\n", continuation=False)


def test_the_framer_reads_each_line_of_a_command_in_its_context() -> None:
    """After a literal the next line continues the command's lists; its own literal counts only if it reads cleanly."""
    framer = IMAPFramer()
    events = framer.feed(b'a APPEND INBOX CATENATE (TEXT {2}\r\nab URL "/x" TEXT {1+}\r\nc)\r\n')
    assert [type(event) for event in events] == [Line, LiteralChunk, Line, LiteralChunk, Line]
    events = framer.feed(b'a APPEND INBOX {2}\r\nab "x{1}\r\nb NOOP\r\n')
    assert events[-1] == Line(b"b NOOP\r\n", continuation=False)


def test_commands_are_written_the_one_way_every_server_reads_them() -> None:
    """Canonical form: single spaces, minimal quoting, 8-bit and CR/LF as literals, binary literals kept."""
    command = parseCommand([b'a APPEND  "IN\\\\BOX"  (\\Seen)  ~{3}\r\n', b"x\0y", b"\r\n"])
    assert command.toWire(literalPlus=False) == [b'a APPEND "IN\\\\BOX" (\\Seen) ~{3}\r\n', b"x\0y", b"\r\n"]
    assert serialize([String(b"caf\xc3\xa9")], literalPlus=True) == [b"{5+}\r\n", b"caf\xc3\xa9", b""]
    with pytest.raises(ParseError):
        serialize([Atom(b"a b")], literalPlus=False, command=True)


def test_deep_lists_serialise_without_recursion() -> None:
    """A rewritten list deeper than the recursion limit is written iteratively."""
    token: object = Atom(b"x")
    for _ in range(5000):
        token = List((token,))  # type: ignore[arg-type]
    parts = serialize([token], literalPlus=False)  # type: ignore[list-item]
    assert parts == [b"(" * 5000 + b"x" + b")" * 5000]


_atoms = st.sampled_from([b"x", b"INBOX", b"1:*", b"\\Seen", b"BODY[]", b"BODY[HEADER.FIELDS (A B)]<0.5>", b"NIL"])
_strings = st.binary(max_size=12).map(String)
_tokens = st.recursive(
    st.one_of(_atoms.map(Atom), _strings),
    lambda children: st.lists(children, max_size=3).map(tuple).map(List),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(arguments=st.lists(_tokens, max_size=5))
def test_what_the_proxy_writes_it_reads_back_as_the_same_tokens(arguments: list[object]) -> None:
    """Serialise then parse (what the upstream does) gives back the filters' tokens."""
    command = parseCommand([b"t X\r\n"]).withArguments(arguments)  # type: ignore[arg-type]
    parts = command.toWire(literalPlus=False)  # type: ignore[attr-defined]
    reparsed = parseCommand(parts)
    normalised = [String(token.value) if isinstance(token, String) else token for token in reparsed.arguments]

    def plain(token: object) -> object:
        if isinstance(token, String):
            return String(token.value)
        if isinstance(token, List):
            return List(tuple(plain(item) for item in token.items))
        return token

    assert [plain(token) for token in normalised] == [plain(token) for token in arguments]
