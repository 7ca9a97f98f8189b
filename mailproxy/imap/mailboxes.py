# -*- test-case-name: tests.test_imap_mailboxes -*-
"""
Every way an IMAP command names a mailbox.

Filters that allow, deny, hide or log mailboxes ask L{namedMailboxes}, so
that a mailbox cannot be reached by a route one of them forgot: the
arguments of SELECT, COPY, RENAME and the like, LIST patterns, CATENATE and
URLFETCH URLs (RFC 4469, 4467, 5092), NOTIFY's and ESEARCH's mailbox
filters (RFC 5465, 7377).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote_to_bytes

from mailproxy.imap.commands import KNOWN_COMMANDS
from mailproxy.imap.model import Atom, IMAPCommand, IMAPResponse, List, Token, text

# Commands whose first argument is a mailbox name.
FIRST_ARGUMENT = frozenset(
    {
        b"SELECT",
        b"EXAMINE",
        b"STATUS",
        b"APPEND",
        b"CREATE",
        b"DELETE",
        b"SUBSCRIBE",
        b"UNSUBSCRIBE",
        b"GETACL",
        b"SETACL",
        b"DELETEACL",
        b"LISTRIGHTS",
        b"MYRIGHTS",
        b"GETQUOTAROOT",
        b"SETMETADATA",
    }
)
# Commands whose second argument is the target mailbox (after a sequence set).
SECOND_ARGUMENT = frozenset({b"COPY", b"MOVE", b"REPLACE"})
LISTING = frozenset({b"LIST", b"LSUB", b"XLIST"})
# Commands whose arguments hold IMAP URLs, which name mailboxes.
_URL_COMMANDS = frozenset({b"URLFETCH", b"GENURLAUTH"})
# NOTIFY and ESEARCH name mailboxes through filter-mailboxes lists.
_FILTERED = frozenset({b"NOTIFY", b"ESEARCH"})

MAILBOX_COMMANDS = (
    FIRST_ARGUMENT | SECOND_ARGUMENT | LISTING | _URL_COMMANDS | _FILTERED | {b"RENAME", b"GETMETADATA", b"RESETKEY"}
)
"""Every command L{namedMailboxes} may find a mailbox in."""

assert MAILBOX_COMMANDS <= KNOWN_COMMANDS

# Selectors of a filter-mailboxes list that a mailbox name (or a list of
# them) follows; the others (selected, inboxes, personal, subscribed...)
# name none.
_SELECTORS_WITH_NAMES = frozenset({b"SUBTREE", b"SUBTREE-ONE", b"MAILBOXES"})
_IMAP_URL = re.compile(rb"\Aimap://[^/]*", re.IGNORECASE)


def namedMailboxes(command: IMAPCommand) -> list[bytes] | None:
    """
    The mailbox names C{command} names, as sent (URLs decoded), the most
    telling first: the first argument of C{SELECT}, C{STATUS}, C{APPEND}
    and the like, the target of C{COPY} and C{MOVE}, source then
    destination of C{RENAME}, for C{LIST} and C{LSUB} each pattern with the
    reference before it, then the mailboxes of URLs and of NOTIFY's and
    ESEARCH's mailbox filters.

    @return: the names; C{[]} if C{command} names no mailbox; C{None} if it
        should name one but its arguments do not say which.
    """
    name, arguments = command.name, command.arguments
    if name in FIRST_ARGUMENT:
        names = _astrings(arguments[:1], 1)
        if name == b"APPEND" and names is not None:
            return _withURLs(names, arguments[1:])
        return names
    if name in SECOND_ARGUMENT:
        names = _astrings(arguments[1:2], 1)
        if name == b"REPLACE" and names is not None:
            return _withURLs(names, arguments[2:])
        return names
    if name == b"RENAME":
        return _astrings(arguments[:2], 2)
    if name == b"GETMETADATA":
        return _astrings([item for item in arguments if not isinstance(item, List)][:1], 1)
    if name == b"RESETKEY":
        return _astrings(arguments[:1], 1) if arguments else []
    if name in LISTING:
        return _listed(arguments)
    if name in _URL_COMMANDS:
        urls = [item.items[0] if isinstance(item, List) and item.items else item for item in arguments]
        if name == b"GENURLAUTH":
            urls = urls[::2]
        return _urlMailboxes(urls)
    if name == b"NOTIFY":
        return _notified(arguments)
    if name == b"ESEARCH":
        return _searched(arguments)
    return []


def _astrings(tokens: Sequence[Token], wanted: int) -> list[bytes] | None:
    values = [value for value in map(text, tokens) if value is not None]
    return values if len(values) == wanted else None


def _listed(arguments: Sequence[Token]) -> list[bytes] | None:
    if arguments and isinstance(arguments[0], List):  # LIST-EXTENDED selection options
        arguments = arguments[1:]
    if len(arguments) < 2:
        return None
    reference, patterns = text(arguments[0]), arguments[1]
    values = [text(item) for item in (patterns.items if isinstance(patterns, List) else [patterns])]
    if reference is None or not values or None in values:
        return None
    return [reference + value for value in values if value is not None]


def _withURLs(names: list[bytes], rest: Sequence[Token]) -> list[bytes] | None:
    """
    C{names} plus the mailboxes of the URL parts of any CATENATE list in
    C{rest} (an APPEND's messages).
    """
    urls: list[Token] = []
    for index, token in enumerate(rest):
        if isinstance(token, List) and index and _word(rest[index - 1]) == b"CATENATE":
            parts = token.items
            urls.extend(parts[i + 1] for i in range(0, len(parts) - 1, 2) if _word(parts[i]) == b"URL")
            if len(parts) % 2:
                return None
    found = _urlMailboxes(urls)
    return None if found is None else [*names, *found]


def _urlMailboxes(urls: Iterable[Token]) -> list[bytes] | None:
    names = []
    for token in urls:
        url = text(token)
        if url is None:
            return None
        try:
            mailbox = urlMailbox(url)
        except ValueError:
            return None
        if mailbox:
            names.append(mailbox)
    return names


def urlMailbox(url: bytes) -> bytes:
    """
    The mailbox an IMAP URL (RFC 5092) names, percent-decoded: the path up
    to its first C{;} or C{?}, without the C{/} before C{;UID=}; C{b""} for
    a URL relative to the selected mailbox.

    @raise ValueError: if the path has C{.} or C{..} segments (servers
        resolve them, RFC 3986, so the name is not what it seems).
    """
    authority = _IMAP_URL.match(url)
    path = url[authority.end() :] if authority else url
    path = path.removeprefix(b"/")
    end = min((position for position in (path.find(b";"), path.find(b"?")) if position >= 0), default=len(path))
    raw = path[:end]
    decoded = unquote_to_bytes(raw)
    for segments in (raw.split(b"/"), decoded.split(b"/")):
        if b"." in segments or b".." in segments:
            raise ValueError("dot segments in an IMAP URL")
    return decoded.removesuffix(b"/")


def _notified(arguments: Sequence[Token]) -> list[bytes] | None:
    # NOTIFY NONE | NOTIFY SET [STATUS] (filter events) ...
    if not arguments or _word(arguments[0]) == b"NONE":
        return []
    names: list[bytes] = []
    for group in arguments[1:]:
        if isinstance(group, List):
            found = _filterMailboxes(group.items)
            if found is None:
                return None
            names.extend(found)
        elif _word(group) != b"STATUS":
            return None
    return names


def _searched(arguments: Sequence[Token]) -> list[bytes] | None:
    # ESEARCH [IN (filter-mailboxes)] [RETURN (...)] criteria
    if len(arguments) >= 2 and _word(arguments[0]) == b"IN":
        source = arguments[1]
        return _filterMailboxes(source.items) if isinstance(source, List) else None
    return []


def _filterMailboxes(items: Sequence[Token]) -> list[bytes] | None:
    """
    The names in a filter-mailboxes list: selectors, some followed by one
    mailbox or a list of them (events, in NOTIFY's case, are lists too, and
    name none).
    """
    names: list[bytes] = []
    index = 0
    while index < len(items):
        selector = _word(items[index])
        index += 1
        if selector not in _SELECTORS_WITH_NAMES:
            continue
        if index >= len(items):
            return None
        value = items[index]
        index += 1
        found = _astrings(value.items, len(value.items)) if isinstance(value, List) else _astrings([value], 1)
        if found is None:
            return None
        names.extend(found)
    return names


def _word(token: Token) -> bytes | None:
    return token.value.upper() if isinstance(token, Atom) else None


def responseMailbox(response: IMAPResponse) -> bytes | None:
    """
    The mailbox an untagged C{STATUS} response, or an C{ESEARCH} one with a
    C{MAILBOX} correlator (RFC 7377), is about; else C{None}.
    """
    arguments = response.arguments
    if response.name == b"STATUS":
        return text(arguments[0]) if arguments else None
    if response.name == b"ESEARCH" and arguments and isinstance(arguments[0], List):
        items = arguments[0].items
        for index in range(len(items) - 1):
            if _word(items[index]) == b"MAILBOX":
                return text(items[index + 1])
    return None


def mayContain(name: str, patterns: Iterable[str], separator: str) -> bool:
    """
    C{True} if a mailbox below C{name} could match one of C{patterns}
    (C{*} matches anything, C{%} anything but the C{separator}): renaming
    C{name} would move it along.
    """
    below = name + separator
    for pattern in patterns:

        def closure(states: set[int], pattern: str = pattern) -> set[int]:
            # A wildcard may match nothing: the state after it is reached too.
            pending = list(states)
            while pending:
                state = pending.pop()
                if state < len(pattern) and pattern[state] in "*%" and state + 1 not in states:
                    states.add(state + 1)
                    pending.append(state + 1)
            return states

        states = closure({0})
        for char in below:
            following = set()
            for state in states:
                if state >= len(pattern):
                    continue
                token = pattern[state]
                if token == "*" or (token == "%" and char != separator):
                    following.add(state)
                elif token == char:
                    following.add(state + 1)
            states = closure(following)
            if not states:
                break
        # What is left of the pattern can always be matched by some name.
        if states:
            return True
    return False
