# -*- test-case-name: tests.test_imap_lexer -*-
"""
The one reading of IMAP command arguments the proxy trusts.

The client framer asks it whether a line's C{{n}} is a literal, and the
command parser builds the filters' tokens with it, so the two can never
disagree.  It is stricter than the RFC 9051 grammar allows servers to be,
never looser: anything it cannot read is an error, and a filtered session
answers such a command C{BAD} instead of relaying it.

 - C{{n}}, C{{n+}}, C{~{n}} and C{~{n+}} are literals only where an
   argument may start (after a space or C{(}, or at the start of the text
   that follows a literal) and only at the end of a line.
 - Quoted strings accept only the escapes C{\\"} and C{\\\\}, never CR, LF
   or NUL.
 - Atoms are ASCII ATOM-CHARs (plus the list wildcards C{%} and C{*}, C{]},
   and a leading C{\\} for flags); C{[} opens a FETCH section whose header
   list holds atoms and quoted strings.
 - Lists nest at most L{MAX_DEPTH} deep; nothing here recurses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

MAX_DEPTH = 64
"""The deepest list nesting accepted (real commands stay below ten)."""


class LexError(ValueError):
    """
    Command arguments that the proxy does not read the way every server
    would; the message says what is wrong, for a C{BAD} reply.
    """


@dataclass(frozen=True)
class Atom:
    """
    An atom, number, flag, sequence set, NIL or section spec such as
    C{BODY[HEADER.FIELDS (FROM)]<0.100>}: anything unquoted.
    """

    value: bytes


@dataclass(frozen=True)
class String:
    """
    A quoted string or literal, unescaped.

    @ivar literal: it arrived as a literal (and is written back as one).
    @ivar binary: a C{~{n}} literal (BINARY, RFC 3516).
    """

    value: bytes
    literal: bool = False
    binary: bool = False


@dataclass(frozen=True)
class StreamedLiteral:
    """
    A literal too large to hold: its C{size} is known, its content streams
    past the filters.
    """

    size: int
    binary: bool = False


@dataclass(frozen=True)
class List:
    """
    A parenthesised list.
    """

    items: tuple[Token, ...]


Token = Atom | String | StreamedLiteral | List


@dataclass(frozen=True)
class Announcement:
    """
    A literal announced at the end of a line.
    """

    size: int
    nonSynchronizing: bool
    binary: bool


# ATOM-CHAR (RFC 9051): CHAR except atom-specials; the proxy also reads the
# list wildcards and "]" (ASTRING-CHAR) as atom characters, as servers do.
_ATOM_CHARS = frozenset(range(0x21, 0x7F)) - frozenset(b'(){"\\')
# Inside a section's brackets: no "]" (it ends the section), no "[".
_SECTION_CHARS = _ATOM_CHARS - frozenset(b"[]")
_ASTRING_CHARS = _ATOM_CHARS - frozenset(b"%*[")
_ANNOUNCEMENT = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
_PARTIAL = re.compile(rb"<[0-9]{1,10}(?:\.[0-9]{1,10})?>")
# What may follow a token: a space, the end of its list, or the end.
_SEPARATORS = frozenset(b" )")
# tag = 1*<any ASTRING-CHAR except "+">, less "]", which Dovecot refuses in
# tags (its reply to such a command is an untagged BAD); command names are
# letters, digits, ".", "-" and "_", starting with a letter.
_TAG = rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5e-\x7a\x7c-\x7e]+"
_NAME = rb"[A-Za-z][A-Za-z0-9._\-]*"
_HEAD = re.compile(rb"(" + _TAG + rb") (" + _NAME + rb")(?: |\Z)")
_UID_NAME = re.compile(rb"(" + _NAME + rb")(?: |\Z)")


class Head(NamedTuple):
    """
    The start of a command line: tag, command name (upper case, without
    C{UID}), whether it was a C{UID} command, and where its arguments start.

    (A named tuple, not a frozen dataclass: one is made for every command
    relayed, and a tuple is made several times faster.)
    """

    tag: bytes
    name: bytes
    uid: bool
    arguments: int


def commandHead(line: bytes) -> Head | None:
    """
    Read the tag and name that start C{line} (a command's first segment,
    CRLF removed); C{None} if it does not start with them.
    """
    match = _HEAD.match(line)
    if match is None:
        return None
    tag, name = match.group(1), match.group(2).upper()
    if name == b"UID":
        # Servers read the word after UID as a command name, never as an
        # argument: without one, the line is not a command.
        command = _UID_NAME.match(line, match.end())
        if command is None:
            return None
        return Head(tag, command.group(1).upper(), True, command.end())
    return Head(tag, name, False, match.end())


class ArgumentLexer:
    """
    Read the arguments of one command, a line (segment) at a time.

    Feed each segment without its CRLF; a segment that announces a literal
    returns the L{Announcement}, and the literal's value is then given to
    L{literal}.  L{finish} returns the arguments.
    """

    def __init__(self, depth: int = 0, *, afterToken: bool = False) -> None:
        """
        @param depth: lists already open (to read the rest of a command).
        @param afterToken: a token (a literal, say) just ended.
        """
        self._stack: list[list[Token]] = [[] for _ in range(depth + 1)]
        # A token just ended: only a separator may follow.
        self._afterToken = afterToken

    @property
    def depth(self) -> int:
        """
        How many lists are open.
        """
        return len(self._stack) - 1

    def segment(self, data: bytes) -> Announcement | None:
        """
        Read one segment; return the literal it announces at its end, if any.

        @raise LexError: if it does not read cleanly.
        """
        stack = self._stack
        position = 0
        length = len(data)
        while position < length:
            char = data[position]
            if char == 0x20:
                self._afterToken = False
                position += 1
                continue
            if char == 0x29:  # )
                if len(stack) == 1:
                    raise LexError("unbalanced ')'")
                items = stack.pop()
                stack[-1].append(List(tuple(items)))
                self._afterToken = True
                position += 1
                continue
            if self._afterToken:
                raise LexError("arguments must be separated by a space")
            if char == 0x28:  # (
                if len(stack) > MAX_DEPTH:
                    raise LexError(f"lists nested deeper than {MAX_DEPTH}")
                stack.append([])
                position += 1
                continue
            if char == 0x22:  # "
                value, position = readQuoted(data, position)
                stack[-1].append(String(value))
            elif char == 0x7B or (char == 0x7E and data[position + 1 : position + 2] == b"{"):  # { or ~{
                match = _ANNOUNCEMENT.match(data, position)
                if match is None:
                    raise LexError("'{' starts no literal announcement at the end of the line")
                return Announcement(int(match.group(2)), bool(match.group(3)), bool(match.group(1)))
            else:
                atom, position = _readAtom(data, position)
                stack[-1].append(Atom(atom))
            self._afterToken = True
        return None

    def literal(self, value: bytes | StreamedLiteral, announcement: Announcement) -> None:
        """
        Add the literal that the last segment announced.
        """
        if isinstance(value, StreamedLiteral):
            self._stack[-1].append(value)
        else:
            self._stack[-1].append(String(value, literal=True, binary=announcement.binary))
        self._afterToken = True

    def tokens(self) -> Iterator[Token]:
        """
        Every token read so far, lists and their items alike.
        """
        pending: list[Iterator[Token]] = [iter(items) for items in self._stack]
        while pending:
            token = next(pending[-1], None)
            if token is None:
                pending.pop()
                continue
            yield token
            if isinstance(token, List):
                pending.append(iter(token.items))

    def partial(self) -> list[Token]:
        """
        The arguments read so far, open lists closed: what the filters see
        of a command whose rest streams past them.
        """
        closed = list(self._stack[-1])
        for items in reversed(self._stack[:-1]):
            closed = [*items, List(tuple(closed))]
        return closed

    def finish(self) -> list[Token]:
        """
        The arguments, once the last segment was read.

        @raise LexError: if a list is still open.
        """
        if len(self._stack) != 1:
            raise LexError("unbalanced '('")
        return self._stack[0]


def readQuoted(data: bytes, position: int) -> tuple[bytes, int]:
    """
    Read the quoted string starting at C{data[position]} (a C{"}); return
    its value and the position after its closing quote.

    @raise LexError: if it is not terminated, holds CR, LF or NUL, or an
        escape other than C{\\"} and C{\\\\}.
    """
    end = data.find(b'"', position + 1)
    # The common case: no escapes at all.
    if end > 0 and data.find(b"\\", position + 1, end) < 0:
        value = data[position + 1 : end]
        # (find, not "in": bytes.__contains__ first tries its argument as
        # an integer, raising and clearing a TypeError each time)
        if value.find(b"\0") >= 0 or value.find(b"\r") >= 0 or value.find(b"\n") >= 0:
            raise LexError("CR, LF or NUL in a quoted string")
        return value, end + 1
    collected = bytearray()
    position += 1
    length = len(data)
    while position < length:
        char = data[position]
        if char == 0x22:
            return bytes(collected), position + 1
        if char == 0x5C:
            escaped = data[position + 1 : position + 2]
            if escaped not in (b'"', b"\\"):
                raise LexError('a quoted string may escape only \\" and \\\\')
            collected += escaped
            position += 2
            continue
        if char in (0x00, 0x0D, 0x0A):
            raise LexError("CR, LF or NUL in a quoted string")
        collected.append(char)
        position += 1
    raise LexError("unterminated quoted string")


def _readAtom(data: bytes, position: int) -> tuple[bytes, int]:
    start = position
    length = len(data)
    if data[position] == 0x5C:  # \Flag
        position += 1
    while position < length:
        char = data[position]
        if char in _SEPARATORS:
            break
        if char == 0x5B:  # [
            section, position = _readSection(data, position)
            partial = _PARTIAL.match(data, position)
            if partial is not None:
                position = partial.end()
                section += partial.group()
            if position < length and data[position] not in _SEPARATORS:
                raise LexError("a section must end its atom")
            return data[start : data.index(b"[", start)] + section, position
        if char not in _ATOM_CHARS:
            raise LexError(f"invalid character 0x{char:02x} in an atom")
        position += 1
    if position == start or (position == start + 1 and data[start] == 0x5C):
        raise LexError("empty atom")
    return data[start:position], position


def _readSection(data: bytes, position: int) -> tuple[bytes, int]:
    """
    Read the section starting at C{data[position]} (a C{[}): section text,
    then optionally a space and a parenthesised list of header names.

    @return: the section written canonically (header names as atoms or
        quoted strings, single spaces) and the position after its C{]}.
    """
    start = position
    position += 1
    length = len(data)
    while position < length and data[position] in _SECTION_CHARS:
        position += 1
    canonical = data[start:position]
    if data[position : position + 2] == b" (":
        position += 2
        names: list[bytes] = []
        while True:
            if position >= length:
                raise LexError("unterminated section")
            char = data[position]
            if char == 0x29:  # )
                position += 1
                break
            if names:
                if char != 0x20:
                    raise LexError("section items must be separated by a space")
                position += 1
                char = data[position] if position < length else 0
            if char == 0x22:
                value, position = readQuoted(data, position)
            else:
                end = position
                while end < length and data[end] in _ASTRING_CHARS:
                    end += 1
                if end == position:
                    raise LexError("invalid header name in a section")
                value, position = data[position:end], end
            names.append(value)
        canonical += b" (" + b" ".join(map(_astring, names)) + b")"
    if data[position : position + 1] != b"]":
        raise LexError("unterminated section")
    return canonical + b"]", position + 1


def _astring(value: bytes) -> bytes:
    if value and all(byte in _ASTRING_CHARS for byte in value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def readsAsAtom(value: bytes) -> bool:
    """
    C{True} if C{value} reads back as this same atom.
    """
    try:
        atom, end = _readAtom(value, 0) if value else (b"", -1)
    except LexError:
        return False
    return end == len(value) and atom == value


def announcedLiteral(line: bytes, lexer: ArgumentLexer) -> Announcement | None:
    """
    The literal C{line} (one segment, CRLF removed) announces, read with
    C{lexer}; C{None} if it announces none or does not read cleanly, in
    which case C{{n}} at its end is only text to the proxy.
    """
    try:
        return lexer.segment(line)
    except LexError:
        return None
