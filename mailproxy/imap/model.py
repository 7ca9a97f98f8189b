# -*- test-case-name: tests.test_imap_model -*-
"""
Parsed IMAP commands and responses, as filters see them.

Tokens keep enough to write a command or response back: an untouched
message is relayed as the exact bytes that arrived; a rewritten one is
serialised in canonical form (single spaces, literals where needed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from mailproxy.imap.lexer import (
    ArgumentLexer,
    Atom,
    LexError,
    List,
    StreamedLiteral,
    String,
    Token,
    commandHead,
    readQuoted,
    readsAsAtom,
)
from mailproxy.imap.syntax import isAtom

__all__ = ["Atom", "IMAPCommand", "IMAPResponse", "List", "ParseError", "StreamedLiteral", "String", "Token"]


def text(token: Token | None) -> bytes | None:
    """
    The value of an atom or string token (an astring), else C{None}.
    """
    if isinstance(token, Atom | String):
        return token.value
    return None


# The arguments could not be read (a command gets BAD for it).
ParseError = LexError


# A BODYSTRUCTURE nests a list per MIME level; servers cap those levels
# (Dovecot at 100), so responses may nest deeper than commands.
MAX_RESPONSE_DEPTH = 1024
_LITERAL = re.compile(rb"~?\{([0-9]+)\+?\}\Z")


def tokenize(segments: Sequence[bytes], literals: Sequence[bytes | StreamedLiteral]) -> list[Token]:
    """
    Read the arguments of a command with the proxy's one strict grammar
    (L{mailproxy.imap.lexer}).

    @param segments: the text parts, without CRLF; segment i (except the
        last) ends with a literal announcement and literal i follows it.
    @raise ParseError: if they do not read cleanly.
    """
    lexer = _lex(segments, literals)
    return lexer.finish()


def _lex(segments: Sequence[bytes], literals: Sequence[bytes | StreamedLiteral]) -> ArgumentLexer:
    lexer = ArgumentLexer()
    for index, segment in enumerate(segments):
        announcement = lexer.segment(segment)
        if (announcement is None) != (index >= len(literals)):
            raise ParseError(
                "literal announcement expected"
                if announcement is None
                else "a literal in a command the proxy does not know"
            )
        if announcement is not None:
            literal = literals[index]
            size = literal.size if isinstance(literal, StreamedLiteral) else len(literal)
            if size != announcement.size:
                raise ParseError("literal of the wrong size")
            lexer.literal(literal, announcement)
    return lexer


def tokenizeResponse(segments: Sequence[bytes], literals: Sequence[bytes | StreamedLiteral]) -> list[Token]:
    """
    Tokenise the arguments of a response (the upstream's: flags such as
    C{\\*}, 8-bit atoms and response codes are read as they come).

    @raise ParseError: on unbalanced or too deeply nested parentheses or an
        unterminated quoted string.
    """
    stack: list[list[Token]] = [[]]
    for index, segment in enumerate(segments):
        body = segment
        hasLiteral = index < len(literals)
        if hasLiteral:
            match = _LITERAL.search(segment)
            if match is None:
                raise ParseError("literal announcement expected")
            body = segment[: match.start()]
        _scanResponse(body, stack)
        if hasLiteral:
            literal = literals[index]
            stack[-1].append(literal if isinstance(literal, StreamedLiteral) else String(literal, True))
    if len(stack) != 1:
        raise ParseError("unbalanced parentheses")
    return stack[0]


def _scanResponse(data: bytes, stack: list[list[Token]]) -> None:
    position = 0
    length = len(data)
    while position < length:
        char = data[position]
        if char == 0x20:
            position += 1
        elif char == 0x28:  # (
            if len(stack) > MAX_RESPONSE_DEPTH:
                raise ParseError(f"lists nested deeper than {MAX_RESPONSE_DEPTH}")
            stack.append([])
            position += 1
        elif char == 0x29:  # )
            if len(stack) == 1:
                raise ParseError("unbalanced parentheses")
            items = stack.pop()
            stack[-1].append(List(tuple(items)))
            position += 1
        elif char == 0x22:  # "
            value, position = readQuoted(data, position)
            stack[-1].append(String(value))
        else:
            start = position
            depth = 0
            while position < length:
                char = data[position]
                if char == 0x5B:  # [ : section specs hold spaces and parentheses
                    depth += 1
                elif char == 0x5D and depth:
                    depth -= 1
                elif depth == 0 and char in b" ()":
                    break
                position += 1
            stack[-1].append(Atom(data[start:position]))


def serialize(tokens: Sequence[Token], *, literalPlus: bool, command: bool = False) -> list[bytes | StreamedLiteral]:
    """
    Write tokens back as wire parts: text chunks, where a chunk ending in a
    literal announcement is followed by the literal's bytes as the next
    part (or a L{StreamedLiteral} placeholder for content still to stream).

    @param command: the tokens are a command's arguments: every atom must
        read back as itself (a filter's rewrite cannot slip in a space).
    @raise ParseError: for such an atom.
    """
    parts: list[bytes | StreamedLiteral] = []
    current = bytearray()
    # What is left to write, innermost list first: no recursion, however
    # deep a rewritten list is.
    pending: list[Iterator[Token]] = [iter(tokens)]
    first = True
    while pending:
        token = next(pending[-1], None)
        if token is None:
            pending.pop()
            if pending:
                current += b")"
                first = False
            continue
        if not first:
            current += b" "
        first = False
        if isinstance(token, Atom):
            if command and not readsAsAtom(token.value):
                raise ParseError(f"{token.value[:40]!r} cannot be sent as an atom")
            current += token.value
        elif isinstance(token, List):
            current += b"("
            pending.append(iter(token.items))
            first = True
        elif isinstance(token, String) and not token.literal and _quotable(token.value):
            current += b'"' + token.value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        else:
            size = token.size if isinstance(token, StreamedLiteral) else len(token.value)
            current += b"%s{%d%s}\r\n" % (b"~" if token.binary else b"", size, b"+" if literalPlus else b"")
            parts.append(bytes(current))
            parts.append(token if isinstance(token, StreamedLiteral) else token.value)
            current = bytearray()
    parts.append(bytes(current))
    return parts


def _quotable(value: bytes) -> bool:
    return len(value) < 1000 and not any(byte in b"\r\n\0" or byte > 0x7E for byte in value)


def astring(value: bytes) -> Token:
    """
    The natural token for an astring value: an atom if it can be one.
    """
    return Atom(value) if isAtom(value) and value.upper() != b"NIL" else String(value)


@dataclass
class Message:
    """
    What commands and responses share: the original wire form and the tokens.

    @ivar wire: the exact bytes received (text and literals, as parts), or
        C{None} once the message was rewritten.  Only responses are relayed
        as received; commands are always written afresh from their tokens.
    """

    arguments: list[Token] = field(default_factory=list)
    wire: list[bytes | StreamedLiteral] | None = None

    def withArguments(self, arguments: list[Token]) -> Message:
        """
        A copy with new arguments, to be serialised afresh.
        """
        return replace(self, arguments=arguments, wire=None)

    def strings(self) -> Iterator[bytes]:
        for token in self.arguments:
            value = text(token)
            if value is not None:
                yield value


@dataclass
class IMAPCommand(Message):
    """
    A client command.

    @ivar name: upper case, without C{UID}: C{b"FETCH"} for C{UID FETCH}.
    @ivar uid: it was a C{UID} command.
    """

    tag: bytes = b""
    name: bytes = b""
    uid: bool = False

    @property
    def fullName(self) -> bytes:
        return b"UID " + self.name if self.uid else self.name

    def toWire(self, *, literalPlus: bool) -> list[bytes | StreamedLiteral]:
        """
        The command written canonically from its tag, name and arguments,
        never from the bytes that arrived (L{wire}): the upstream executes
        exactly what the filters saw.

        @raise ParseError: if a filter's rewrite holds an atom that would not
            read back as itself.
        """
        parts = serialize(self.arguments, literalPlus=literalPlus, command=True)
        prefix = self.tag + b" " + self.fullName + (b" " if self.arguments else b"")
        parts[0] = prefix + parts[0] if isinstance(parts[0], bytes) else parts[0]
        parts[-1] = parts[-1] + b"\r\n"  # type: ignore[operator]
        return parts


@dataclass
class IMAPResponse(Message):
    """
    A server response: untagged (C{tag == b"*"}), tagged, or a continuation
    request (C{tag == b"+"}).

    @ivar name: upper case: C{OK}, C{LIST}, C{EXISTS}, C{FETCH}, ...
    @ivar number: the message number or count of C{* 5 EXISTS}-style data.
    @ivar code: for status responses, the response code without brackets.
    @ivar text: for status responses, the human-readable text after the code.
    """

    tag: bytes = b"*"
    name: bytes = b""
    number: int | None = None
    code: bytes | None = None
    text: bytes = b""

    @property
    def tagged(self) -> bool:
        return self.tag not in (b"*", b"+")

    @property
    def isStatus(self) -> bool:
        return self.name in _STATUS

    def toWire(self, *, literalPlus: bool = False) -> list[bytes | StreamedLiteral]:
        if self.wire is not None:
            return self.wire
        head = self.tag
        if self.tag == b"+":
            return [b"+ " + self.text + b"\r\n"]
        if self.number is not None:
            head += b" %d" % self.number
        head += b" " + self.name
        if self.isStatus:
            if self.code is not None:
                head += b" [" + self.code + b"]"
            return [head + b" " + self.text + b"\r\n"]
        # Server literals are never LITERAL+.
        parts = serialize(self.arguments, literalPlus=False)
        if self.arguments:
            head += b" "
        parts[0] = head + parts[0]  # type: ignore[operator]
        parts[-1] = parts[-1] + b"\r\n"  # type: ignore[operator]
        return parts


_STATUS = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})
_RESPONSE_HEAD = re.compile(
    rb"\A(\*|\+|[^\x00-\x20\x7f(){%*\"\\+]+)(?: ([0-9]+))?(?: ([A-Za-z][A-Za-z0-9.\-]*))?(?: |\Z)"
)
_CODE = re.compile(rb"\A\[((?:[^\]\[]|\[[^\]]*\])*)\] ?")


def _textSegments(parts: Sequence[bytes | StreamedLiteral]) -> tuple[list[bytes], list[bytes | StreamedLiteral]]:
    segments: list[bytes] = []
    literals: list[bytes | StreamedLiteral] = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            assert isinstance(part, bytes)
            segments.append(part.rstrip(b"\r\n") if index == len(parts) - 1 else part[:-2])
        else:
            literals.append(part)
    return segments, literals


def parseCommand(parts: list[bytes | StreamedLiteral]) -> IMAPCommand:
    """
    Parse a whole command from its wire parts (text, literal, text, ...)
    with the proxy's one strict grammar (L{mailproxy.imap.lexer}).

    @raise ParseError: if it has no valid tag and name or its arguments do
        not read cleanly; the message says why.
    """
    command, lexer = lexCommand(parts)
    command.arguments = lexer.finish()
    return command


def lexCommand(parts: list[bytes | StreamedLiteral]) -> tuple[IMAPCommand, ArgumentLexer]:
    """
    Read a command from its wire parts, which may end with a
    L{StreamedLiteral} whose rest is still to come.

    @return: the command with the arguments read so far (open lists closed)
        and the lexer, to finish or to read the rest with.
    @raise ParseError: as L{parseCommand}.
    """
    segments, literals = _textSegments(parts)
    head = commandHead(segments[0])
    if head is None:
        raise ParseError("invalid tag or command name")
    lexer = _lex([segments[0][head.arguments :], *segments[1:]], literals)
    command = IMAPCommand(arguments=lexer.partial(), wire=list(parts), tag=head.tag, name=head.name, uid=head.uid)
    return command, lexer


def parseResponse(parts: list[bytes | StreamedLiteral]) -> IMAPResponse:
    """
    Parse a whole response from its wire parts.

    @raise ParseError: if its arguments do not tokenise (a response filter
        cannot judge it: an untagged one is dropped).
    """
    segments, literals = _textSegments(parts)
    first = segments[0]
    if first.startswith(b"+"):
        return IMAPResponse(wire=list(parts), tag=b"+", text=first[2:] if first.startswith(b"+ ") else first[1:])
    head = _RESPONSE_HEAD.match(first)
    if head is None:
        return IMAPResponse(wire=list(parts), tag=first.split(b" ", 1)[0])
    tag = head.group(1)
    number = int(head.group(2)) if head.group(2) is not None else None
    name = (head.group(3) or b"").upper()
    rest = first[head.end() :]
    if name in _STATUS and not literals:
        code = None
        match = _CODE.match(rest)
        if match is not None:
            code, rest = match.group(1), rest[match.end() :]
        return IMAPResponse(wire=list(parts), tag=tag, name=name, number=number, code=code, text=rest)
    arguments = tokenizeResponse([rest, *segments[1:]], literals)
    return IMAPResponse(arguments=arguments, wire=list(parts), tag=tag, name=name, number=number)
