# -*- test-case-name: tests.test_folders_filter -*-
"""
Mailbox renaming and hiding: the client sees the upstream's folders under
other names, and never sees some of them at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from mailproxy.filters import DROP, PASS, Reject, Rewrite, Verdict, checkOptions
from mailproxy.imap import mutf7
from mailproxy.imap.mailboxes import LISTING, mayContain, namedMailboxes, responseMailbox
from mailproxy.imap.model import IMAPCommand, IMAPResponse, List, Message, String, Token, astring, text
from mailproxy.interfaces import ICommandFilter, IResponseFilter, ISession

NO_SUCH_MAILBOX = Reject("No such mailbox", "NO", "NONEXISTENT")
NOT_RENAMED = Reject("This mailbox cannot be renamed through this proxy", "NO", "CANNOT")
UNREADABLE = Reject("Command arguments could not be checked by the proxy's folder filter", "BAD")

# Which arguments of a command are mailbox names; -1 is the last one.
_MAILBOX_ARGUMENTS: dict[bytes, tuple[int, ...]] = {
    b"SELECT": (0,),
    b"EXAMINE": (0,),
    b"STATUS": (0,),
    b"APPEND": (0,),
    b"CREATE": (0,),
    b"DELETE": (0,),
    b"RENAME": (0, 1),
    b"SUBSCRIBE": (0,),
    b"UNSUBSCRIBE": (0,),
    b"GETQUOTAROOT": (0,),
    b"COPY": (-1,),
    b"MOVE": (-1,),
}
_OPTIONS = ("map", "hide", "separator")


@implementer(ICommandFilter, IResponseFilter)
class FolderFilter:
    """
    Maps client mailbox names to upstream ones and hides upstream mailboxes.

    Options (see L{fromOptions}): C{map}, a table of client name = upstream
    name (a mapping covers the children too: with C{Sent = "INBOX/Sent"},
    C{Sent/2024} is C{INBOX/Sent/2024} upstream); C{hide}, a list of
    upstream name patterns (C{*} matches anything, C{%} anything but the
    separator) the client never sees, a match hiding its children too; and
    C{separator}, the hierarchy separator (default C{"/"}).  Names are
    compared decoded from modified UTF-7; C{INBOX} case-insensitively.

    Commands (UID variants too): the mailbox arguments of SELECT, EXAMINE,
    STATUS, APPEND, CREATE, DELETE, RENAME (both), SUBSCRIBE, UNSUBSCRIBE,
    GETQUOTAROOT, COPY and MOVE (the target) are mapped; a command naming a
    hidden mailbox is answered C{NO [NONEXISTENT]}.  LIST and LSUB
    patterns are mapped as described below, never rejected.

    Responses: the names in LIST and LSUB (including a LIST-EXTENDED
    C{OLDNAME}) and STATUS are mapped back; those of hidden mailboxes, and
    of upstream mailboxes shadowed by a client name (with C{Sent =
    "INBOX/Sent"}, an upstream C{Sent} the client could not reach), are
    dropped.

    Limitations:
     - A LIST/LSUB pattern is rewritten only when it has no wildcard or
       the part before its first wildcard lies below a mapped name
       (C{Sent/*}, C{Sent/2024/%}); other patterns are relayed unchanged,
       so C{*} lists everything (shown under client names), but C{%} or
       C{S*} do not find C{Sent} if it lives at C{INBOX/Sent} upstream, and
       a listed name may not match the client's pattern after mapping.
     - The reference is taken to be prefixed to the pattern; a rewritten
       LIST sends an empty reference and the joined, mapped pattern.
     - A mapped upstream mailbox is listed only under its client name, but
       a command naming it by its upstream name (C{INBOX/Sent}) is relayed
       unchanged, so it stays reachable that way.
     - Names that are not valid modified UTF-7 (raw UTF-8 after
       C{ENABLE UTF8=ACCEPT}) are never mapped; hide patterns are still
       matched against their UTF-8 reading.
     - Other commands and responses naming mailboxes (ACL, METADATA,
       QUOTAROOT, ...) are neither mapped nor checked for hidden names.

    @ivar responseNames: the responses this filter looks at.
    """

    responseNames = frozenset({b"LIST", b"LSUB", b"STATUS", b"ESEARCH"})

    def __init__(
        self, mapping: Mapping[str, str] | None = None, hide: list[str] | None = None, separator: str = "/"
    ) -> None:
        """
        @param mapping: client name to upstream name.
        @param hide: upstream name patterns.
        @param separator: the hierarchy separator.
        """
        self.separator = separator
        pairs = [(self._canonical(client), self._canonical(upstream)) for client, upstream in (mapping or {}).items()]
        self._byClient = sorted(pairs, key=lambda pair: -len(pair[0]))
        self._byUpstream = sorted(pairs, key=lambda pair: -len(pair[1]))
        anyName, anyLevel = ".*", f"[^{re.escape(separator)}]*"
        below = f"(?:{re.escape(separator)}.*)?"
        alternatives = [
            "".join({"*": anyName, "%": anyLevel}.get(char, re.escape(char)) for char in self._canonical(pattern))
            + below
            for pattern in hide or []
        ]
        self._hidden = re.compile("|".join(f"(?:{item})" for item in alternatives), re.DOTALL) if alternatives else None
        self._hidePatterns = [self._canonical(pattern) for pattern in hide or []]

    @classmethod
    def fromOptions(cls, options: Mapping[str, Any]) -> FolderFilter:
        """
        Build a filter from its configuration options C{map}, C{hide} and
        C{separator}.

        @raise ValueError: naming the option that is wrong.
        """
        checkOptions(options, _OPTIONS)
        separator = options.get("separator", "/")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError("separator: expected a single character")
        mapping = options.get("map", {})
        if not isinstance(mapping, Mapping) or not all(
            isinstance(name, str) and isinstance(target, str) for name, target in mapping.items()
        ):
            raise ValueError("map: expected a table of client name = upstream name")
        hide = options.get("hide", [])
        if not isinstance(hide, list) or not all(isinstance(pattern, str) and pattern for pattern in hide):
            raise ValueError("hide: expected a list of upstream mailbox name patterns")
        for name in [*mapping, *mapping.values()]:
            if not name or name.startswith(separator) or name.endswith(separator):
                raise ValueError(f"map: {name!r} is empty or starts or ends with the separator {separator!r}")
        result = cls(mapping, hide, separator)
        for side, position in (("client", 0), ("upstream", 1)):
            names = [pair[position] for pair in result._byClient]
            for name in names:
                if names.count(name) > 1:
                    raise ValueError(f"map: {side} name {name!r} appears twice")
        return result

    def filterCommand(self, session: ISession, command: IMAPCommand) -> Verdict:
        """
        Map the mailbox names of a command; reject one naming a hidden
        mailbox.
        """
        arguments = list(command.arguments)
        if command.name in LISTING:
            return self._filterList(command, arguments)
        # Every other way of naming a mailbox (URLs, NOTIFY, ESEARCH, ACL
        # and METADATA commands...) is not mapped, but a hidden one is
        # refused whichever way it is named.
        named = namedMailboxes(command)
        if named is None:
            return UNREADABLE
        for raw in named:
            name, decoded = _decodeName(raw)
            if self._isHidden(self._toUpstream(name) if decoded else name):
                return NO_SUCH_MAILBOX
        if command.name == b"RENAME" and named:
            name, decoded = _decodeName(named[0])
            upstream = self._canonical(self._toUpstream(name) if decoded else name)
            # (RENAME INBOX moves its messages, not its children.)
            if upstream != "INBOX" and mayContain(upstream, self._hidePatterns, self.separator):
                # It would move a hidden mailbox to a name that is not.
                return NOT_RENAMED
        positions = _MAILBOX_ARGUMENTS.get(command.name, ())
        if positions == (-1,):
            positions = (len(arguments) - 1,) if len(arguments) >= 2 else ()
        for index in positions:
            if index >= len(arguments):
                continue
            read = _readName(arguments[index])
            if read is None:
                continue
            name, decoded = read
            upstream = self._toUpstream(name) if decoded else name
            if self._isHidden(upstream):
                return NO_SUCH_MAILBOX
            if upstream != name:
                arguments[index] = astring(mutf7.encode(upstream))
        return _verdict(command, arguments)

    def filterResponse(self, session: ISession, response: IMAPResponse) -> Verdict:
        """
        Map the mailbox name of a LIST, LSUB or STATUS response; drop it if
        the mailbox is hidden or shadowed by a mapped client name.
        """
        if response.tag != b"*" or response.name not in self.responseNames:
            return PASS
        if response.name == b"ESEARCH":
            searched = responseMailbox(response)
            return DROP if searched is not None and self._isHidden(_decodeName(searched)[0]) else PASS
        arguments = list(response.arguments)
        index = 0 if response.name == b"STATUS" else 2
        read = _readName(arguments[index]) if index < len(arguments) else None
        if read is None:
            return PASS
        client = self._toClient(*read)
        if client is None:
            return DROP
        if client != read[0]:
            arguments[index] = astring(mutf7.encode(client))
        if index == 2 and len(arguments) > 3 and isinstance(arguments[3], List):
            arguments[3] = self._extendedData(arguments[3])
        return _verdict(response, arguments)

    def _filterList(self, command: IMAPCommand, arguments: list[Token]) -> Verdict:
        start = 1 if arguments and isinstance(arguments[0], List) else 0  # LIST-EXTENDED selection options
        if len(arguments) < start + 2:
            return PASS
        reference, patternToken = _readName(arguments[start]), arguments[start + 1]
        if reference is None or not reference[1]:
            return PASS
        prefix = reference[0]
        tokens: list[Token] = list(patternToken.items) if isinstance(patternToken, List) else [patternToken]
        changed = False
        for position, token in enumerate(tokens):
            pattern = _readName(token)
            if pattern is None or not pattern[1]:
                if prefix:
                    return PASS  # it cannot be joined to the reference
                continue
            full = prefix + pattern[0]
            mapped = self._mapPattern(full)
            changed = changed or mapped != full
            if mapped != pattern[0]:
                tokens[position] = astring(mutf7.encode(mapped))
        if not changed:
            return PASS
        if prefix:
            arguments[start] = String(b"")
        arguments[start + 1] = List(tuple(tokens)) if isinstance(patternToken, List) else tokens[0]
        return _verdict(command, arguments)

    def _mapPattern(self, pattern: str) -> str:
        wildcards = [pattern.index(char) for char in "*%" if char in pattern]
        if not wildcards:
            return self._toUpstream(pattern)
        fixed = self._canonical(pattern[: min(wildcards)])
        for client, upstream in self._byClient:
            if fixed.startswith(client + self.separator):
                return upstream + pattern[len(client) :]
        return pattern

    def _extendedData(self, data: List) -> List:
        """
        Map or drop the C{OLDNAME} in LIST-EXTENDED data (tag, value pairs).
        """
        items = data.items
        if len(items) % 2:
            return data
        result: list[Token] = []
        for tag, value in zip(items[::2], items[1::2], strict=True):
            read = None
            if (text(tag) or b"").upper() == b"OLDNAME" and isinstance(value, List) and len(value.items) == 1:
                read = _readName(value.items[0])
            if read is None:
                result.extend((tag, value))
                continue
            client = self._toClient(*read)
            if client is not None:
                result.extend((tag, List((astring(mutf7.encode(client)),)) if client != read[0] else value))
        return List(tuple(result))

    def _canonical(self, name: str) -> str:
        head, separator, rest = name.partition(self.separator)
        return "INBOX" + separator + rest if head.upper() == "INBOX" else name

    def _under(self, name: str, parent: str) -> bool:
        return name == parent or name.startswith(parent + self.separator)

    def _toUpstream(self, name: str) -> str:
        canonical = self._canonical(name)
        for client, upstream in self._byClient:
            if self._under(canonical, client):
                return upstream + name[len(client) :]
        return name

    def _toClient(self, name: str, decoded: bool) -> str | None:
        """
        The client's name for an upstream mailbox, or C{None} if the client
        must not see it (hidden or shadowed by a mapped client name).
        """
        if self._isHidden(name):
            return None
        if not decoded:
            return name
        canonical = self._canonical(name)
        for client, upstream in self._byUpstream:
            if self._under(canonical, upstream):
                return client + name[len(upstream) :]
        if any(self._under(canonical, client) for client, _ in self._byClient):
            return None
        return name

    def _isHidden(self, name: str) -> bool:
        return self._hidden is not None and self._hidden.fullmatch(self._canonical(name)) is not None


def _readName(token: Token) -> tuple[str, bool] | None:
    """
    The name an astring token holds, and whether it was valid modified
    UTF-7 (else it is read as UTF-8, only to match hide patterns).
    """
    value = text(token)
    if value is None:
        return None
    return _decodeName(value)


def _decodeName(value: bytes) -> tuple[str, bool]:
    try:
        return mutf7.decode(value), True
    except ValueError:
        return value.decode("utf-8", "surrogateescape"), False


def _verdict(message: Message, arguments: list[Token]) -> Verdict:
    if arguments == message.arguments:
        return PASS
    return Rewrite(message.withArguments(arguments))


__all__ = ["NO_SUCH_MAILBOX", "FolderFilter"]
