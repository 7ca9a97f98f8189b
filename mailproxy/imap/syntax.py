# -*- test-case-name: tests.test_imap_syntax -*-
"""
The small part of IMAP syntax the proxy itself has to read and write:
tags and command names, astring arguments (atoms, quoted strings and
literals) and capability lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from mailproxy.imap.lexer import LexError, readQuoted

_TAG_AND_NAME = re.compile(rb"\A([^\x00-\x20\x7f(){%*\"\\+]+) ([A-Za-z][A-Za-z0-9.\-]*)(?=[ \r\n]|\Z)")
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
# What an argument read as an atom must not hold (a space ends it).
_NOT_IN_ATOM = re.compile(rb'[(){%*"\\\x00-\x1f\x7f]')
# The code only counts right after the status word of a status response;
# "[CAPABILITY" elsewhere (a FETCH'd subject, say) is message data.
_CAPABILITY_CODE = re.compile(rb"\A(\S+ (?:OK|NO|BAD|PREAUTH|BYE) )\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_CAPABILITY_RESPONSE = re.compile(rb"\A(\* CAPABILITY )(.*?)(\r?\n)\Z", re.IGNORECASE | re.DOTALL)


# A command's arguments could not be parsed (the lexer's error).
SyntaxError_ = LexError


def tagAndCommand(line: bytes) -> tuple[bytes, bytes] | None:
    """
    Return the tag and the upper-cased command name that start C{line}, or
    C{None} if it does not start with them.
    """
    match = _TAG_AND_NAME.match(line)
    if match is None:
        return None
    return match.group(1), match.group(2).upper()


def tagOf(line: bytes) -> bytes:
    """
    The tag of the command starting C{line}, or C{*} (for a reply to a line
    that has none).
    """
    parsed = tagAndCommand(line)
    return parsed[0] if parsed is not None else b"*"


def parseArguments(segments: Sequence[bytes], literals: Sequence[bytes]) -> list[bytes]:
    """
    Parse the astring arguments of a complete command.

    @param segments: the command's lines without the tag and command name,
        each with its CRLF and any literal announcement at its end; the
        i-th literal follows the i-th segment.
    @param literals: the literal values, in order.
    @return: the argument values (atoms, unquoted strings and literals).
    @raise SyntaxError_: on a malformed argument.
    """
    arguments: list[bytes] = []
    for index, segment in enumerate(segments):
        text = segment.rstrip(b"\r\n")
        hasLiteral = index < len(literals)
        if hasLiteral:
            brace = text.rfind(b"{")
            if text.startswith(b"~", brace - 1) and brace > 0:
                brace -= 1
            text = text[:brace]
        arguments.extend(_tokens(text))
        if hasLiteral:
            arguments.append(literals[index])
    return arguments


def _tokens(text: bytes) -> Iterable[bytes]:
    position = 0
    length = len(text)
    while position < length:
        char = text[position]
        if char == 0x20:
            position += 1
        elif char == 0x22:
            value, position = readQuoted(text, position)
            yield value
        else:
            end = text.find(b" ", position)
            if end < 0:
                end = length
            atom = text[position:end]
            if _NOT_IN_ATOM.search(atom) is not None:
                raise SyntaxError_("invalid character in atom")
            yield atom
            position = end


def quoted(value: bytes) -> bytes:
    """
    Return C{value} as an IMAP quoted string.

    @raise ValueError: if C{value} cannot be quoted (CR, LF or NUL).
    """
    if b"\r" in value or b"\n" in value or b"\0" in value:
        raise ValueError("value cannot be sent as a quoted string")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def isAtom(value: bytes) -> bool:
    """
    C{True} if C{value} can be sent as an atom.
    """
    return bool(value) and not any(byte in _ATOM_SPECIALS or byte > 0x7E for byte in value)


def capabilityNames(text: bytes) -> list[bytes]:
    """
    Split a capability list into its names.
    """
    return text.split()


def rewriteCapabilities(line: bytes, transform: Callable[[list[bytes]], list[bytes]]) -> bytes:
    """
    Apply C{transform} to the capability list of a C{* CAPABILITY}
    response or of a C{[CAPABILITY ...]} response code in C{line}.
    """
    response = _CAPABILITY_RESPONSE.match(line)
    if response is not None:
        names = transform(capabilityNames(response.group(2)))
        return response.group(1) + b" ".join(names) + response.group(3)
    code = _CAPABILITY_CODE.match(line)
    if code is None:
        return line
    names = transform(capabilityNames(code.group(2)))
    return code.group(1) + b"[CAPABILITY " + b" ".join(names) + b"]" + line[code.end() :]


def capabilitiesIn(line: bytes) -> list[bytes] | None:
    """
    Return the capability names a response line lists, or C{None}.
    """
    response = _CAPABILITY_RESPONSE.match(line)
    if response is not None:
        return capabilityNames(response.group(2))
    code = _CAPABILITY_CODE.match(line)
    if code is not None:
        return capabilityNames(code.group(2))
    return None


class CapabilityTransform:
    """
    Remove capabilities the proxy cannot relay from a server's list.

    @param hidden: exact names (upper case) to drop.
    @param hiddenPrefixes: name prefixes (upper case) to drop, such as
        C{b"AUTH="}.
    """

    def __init__(self, hidden: Iterable[bytes], hiddenPrefixes: Iterable[bytes] = ()) -> None:
        self.hidden = frozenset(name.upper() for name in hidden)
        self.hiddenPrefixes = tuple(prefix.upper() for prefix in hiddenPrefixes)
        # An upstream sends the same lists login after login.
        self._seen: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}

    def __call__(self, names: list[bytes]) -> list[bytes]:
        key = tuple(names)
        kept = self._seen.get(key)
        if kept is None:
            kept = tuple(name for name in names if not self._hides(name.upper()))
            if len(self._seen) >= _TRANSFORMS_REMEMBERED:
                self._seen.clear()
            self._seen[key] = kept
        return list(kept)

    def _hides(self, upper: bytes) -> bool:
        return upper in self.hidden or upper.startswith(self.hiddenPrefixes)


# Capability lists a transform remembers the result for (a few upstreams,
# before and after login, each).
_TRANSFORMS_REMEMBERED = 64


# What a client must not see after login: the proxy terminates TLS and
# authentication itself (no re-authentication either), cannot relay
# compressed streams, and must not send clients around it with referrals.
RELAY_CAPABILITIES = CapabilityTransform(
    hidden=[b"STARTTLS", b"LOGINDISABLED", b"SASL-IR", b"LOGIN-REFERRALS", b"MAILBOX-REFERRALS", b"UNAUTHENTICATE"],
    hiddenPrefixes=[b"AUTH=", b"COMPRESS="],
)
