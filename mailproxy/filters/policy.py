# -*- test-case-name: tests.test_policy_filter -*-
"""
The C{policy} filter: which commands and mailboxes a session may use.

Also home of the helpers that find the mailbox a command names
(L{namedMailboxes}, L{decodeMailbox}); the audit filter logs the same
mailbox this filter checks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import cache
from typing import Any

from zope.interface import implementer

from mailproxy.filters import DROP, PASS, Reject, Rewrite, Verdict, checkOptions
from mailproxy.imap.commands import KNOWN_COMMANDS
from mailproxy.imap.mailboxes import (
    LISTING,
    MAILBOX_COMMANDS,
    mayContain,
    namedMailboxes,
    responseMailbox,
)
from mailproxy.imap.model import Atom, IMAPCommand, IMAPResponse, List, StreamedLiteral, String, Token
from mailproxy.interfaces import ICommandFilter, IResponseFilter, ISession

__all__ = ["MAILBOX_COMMANDS", "PolicyFilter", "decodeMailbox", "namedMailboxes"]

READ_ONLY_REFUSED = frozenset(
    {
        b"DELE",  # POP3
        b"STORE",
        b"EXPUNGE",
        b"APPEND",
        b"REPLACE",
        b"DELETE",
        b"RENAME",
        b"MOVE",
        b"COPY",
        b"CREATE",
        b"SETACL",
        b"DELETEACL",
        b"SETMETADATA",
        b"SETQUOTA",
        b"SUBSCRIBE",
        b"UNSUBSCRIBE",
        b"GENURLAUTH",
        b"RESETKEY",
    }
)
"""
What read-only mode refuses (C{REPLACE} too: it is APPEND and EXPUNGE;
subscriptions and URL authorizations are server state too).
"""

READ_ONLY = Reject("Mailbox access is read-only", "NO", "NOPERM")
TOO_BIG = Reject("Message too large", "NO", "TOOBIG")
UNREADABLE = Reject("Command arguments could not be checked by the proxy's policy", "BAD")

_COMMAND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9.\-]*\Z")
_BASE64_RUN = re.compile(rb"&([A-Za-z0-9+,]*)-")


def decodeMailbox(raw: bytes) -> str:
    """
    The text of a mailbox name: modified UTF-7 if it is valid, else UTF-8
    (as C{UTF8=ACCEPT} clients send it), invalid bytes replaced.
    """
    decode = _mutf7Decoder()
    if decode is not None:
        try:
            return decode(raw)
        except ValueError:
            pass
    return raw.decode("utf-8", "replace")


@cache
def _mutf7Decoder() -> Callable[[bytes], str] | None:
    try:
        from mailproxy.imap import mutf7
    except ImportError:
        return None
    return mutf7.decode


def mailboxReadings(raw: bytes) -> list[str]:
    """
    Every text a server might read C{raw} as: just L{decodeMailbox} for
    valid modified UTF-7; for anything else both UTF-8 and a lenient
    modified UTF-7 reading, so a non-canonical encoding cannot slip a name
    past a pattern.
    """
    decoded = decodeMailbox(raw)
    readings = [decoded]
    if b"&" in raw and decoded == raw.decode("utf-8", "replace"):
        lenient = _lenientMutf7(raw)
        if lenient is not None and lenient != decoded:
            readings.append(lenient)
    return readings


def _lenientMutf7(raw: bytes) -> str | None:
    pieces = []
    position = 0
    for match in _BASE64_RUN.finditer(raw):
        pieces.append(raw[position : match.start()].decode("utf-8", "replace"))
        run = match.group(1)
        try:
            decoded = base64.b64decode(run.replace(b",", b"/") + b"=" * (-len(run) % 4), validate=True)
        except binascii.Error:
            return None
        pieces.append(decoded.decode("utf-16-be", "replace") if run else "&")
        position = match.end()
    pieces.append(raw[position:].decode("utf-8", "replace"))
    return "".join(pieces)


def canonicalName(name: str, separator: str) -> str:
    """
    C{name} as patterns see it: C{INBOX} in upper case (it is
    case-insensitive), without trailing separators (C{CREATE "a/"} creates
    C{a}).
    """
    if separator:
        while len(name) > 1 and name.endswith(separator):
            name = name[: -len(separator)]
    if name[:5].upper() == "INBOX" and (len(name) == 5 or name[5:].startswith(separator)):
        name = "INBOX" + name[5:]
    return name


def compilePattern(pattern: str, separator: str) -> re.Pattern[str]:
    """
    Compile an IMAP mailbox pattern: C{*} matches anything, C{%} anything
    but the hierarchy C{separator}.
    """
    anyButSeparator = f"[^{re.escape(separator)}]*"
    pieces = []
    for char in canonicalName(pattern, separator):
        pieces.append(".*" if char == "*" else anyButSeparator if char == "%" else re.escape(char))
    return re.compile("".join(pieces), re.DOTALL)


ALWAYS_ALLOWED = frozenset({b"CAPABILITY", b"NOOP", b"LOGOUT"})


@implementer(ICommandFilter, IResponseFilter)
class PolicyFilter:
    """
    Refuse commands and mailboxes by name, make sessions read-only, limit
    the size of appended messages.

    A read-only session, or one with mailbox rules, refuses commands whose
    arguments the proxy does not know (L{KNOWN_COMMANDS}): they might write
    or name a mailbox where no rule looks.  C{allow_unknown} (or C{allow})
    permits such commands by name.

    With mailbox rules, C{STATUS} and C{ESEARCH} responses about a mailbox
    the rules refuse are dropped: LIST's C{RETURN (STATUS ...)}, NOTIFY and
    ESEARCH over several mailboxes can ask for them without naming it.

    @ivar allow: upper-case command names; if not C{None}, only these (and
        L{ALWAYS_ALLOWED}) pass.
    @ivar deny: upper-case command names refused.
    @ivar responseNames: the responses this filter looks at.
    """

    def __init__(
        self,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] = (),
        readOnly: bool = False,
        mailboxesAllow: Iterable[str] | None = None,
        mailboxesDeny: Iterable[str] = (),
        separator: str = "/",
        maxAppendSize: int | None = None,
        allowUnknown: Iterable[str] = (),
    ) -> None:
        # An allow list never locks a client out of the session basics.
        self.allow = None if allow is None else ALWAYS_ALLOWED | {name.upper().encode("ascii") for name in allow}
        self.deny = frozenset(name.upper().encode("ascii") for name in deny)
        self.readOnly = readOnly
        self.separator = separator
        self.mailboxesAllow = None if mailboxesAllow is None else [compilePattern(p, separator) for p in mailboxesAllow]
        self.mailboxesDeny = [compilePattern(pattern, separator) for pattern in mailboxesDeny]
        # RENAME moves a mailbox's children along: one that may have a
        # denied child is refused.
        self._denyPatterns = [canonicalName(pattern, separator) for pattern in mailboxesDeny]
        self.maxAppendSize = maxAppendSize
        self.allowUnknown = frozenset(name.upper().encode("ascii") for name in allowUnknown)
        restricted = readOnly or mailboxesAllow is not None or bool(self.mailboxesDeny)
        self.refuseUnknown = restricted
        self.responseNames = _ABOUT_MAILBOXES if mailboxesAllow is not None or self.mailboxesDeny else frozenset()

    @classmethod
    def fromOptions(cls, options: dict[str, Any]) -> PolicyFilter:
        """
        Build the filter from its configuration options.

        @raise ValueError: naming the option that is wrong.
        """
        known = {
            "allow",
            "allow_unknown",
            "deny",
            "read_only",
            "mailboxes_allow",
            "mailboxes_deny",
            "separator",
            "max_append_size",
        }
        checkOptions(options, known)
        separator = options.get("separator", "/")
        if not isinstance(separator, str) or len(separator) != 1 or separator in "*%":
            raise ValueError("option 'separator': must be one character, not '*' or '%'")
        readOnly = options.get("read_only", False)
        if not isinstance(readOnly, bool):
            raise ValueError("option 'read_only': must be true or false")
        maxAppendSize = options.get("max_append_size")
        if maxAppendSize is not None and (
            not isinstance(maxAppendSize, int) or isinstance(maxAppendSize, bool) or maxAppendSize < 0
        ):
            raise ValueError("option 'max_append_size': must be a number of octets, 0 or more")
        return cls(
            allow=_commandNames(options, "allow"),
            deny=_commandNames(options, "deny") or (),
            readOnly=readOnly,
            mailboxesAllow=_strings(options, "mailboxes_allow"),
            mailboxesDeny=_strings(options, "mailboxes_deny") or (),
            separator=separator,
            maxAppendSize=maxAppendSize,
            allowUnknown=_commandNames(options, "allow_unknown") or (),
        )

    def filterCommand(self, session: ISession, command: IMAPCommand) -> Verdict:
        """
        Refuse what the policy forbids; under read-only, rewrite C{SELECT}
        to C{EXAMINE} so that reading a message cannot set C{\\Seen}.
        """
        name = command.name
        if (self.allow is not None and name not in self.allow) or name in self.deny:
            shown = command.fullName.decode("ascii", "replace")
            return Reject(f"{shown} is not permitted by the proxy's policy", "NO", "NOPERM")
        if self.readOnly and name in READ_ONLY_REFUSED:
            return READ_ONLY
        # (POP3 commands name no mailbox; read-only refuses DELE.)
        unknown = isinstance(command, IMAPCommand) and name not in KNOWN_COMMANDS
        if self.refuseUnknown and unknown and not self._allowedByName(name):
            shown = command.fullName.decode("ascii", "replace")
            return Reject(f"{shown} is not known to the proxy's policy", "NO", "NOPERM")
        refused = self._checkMailboxes(command)
        if refused is not None:
            return refused
        if self.maxAppendSize is not None and name in (b"APPEND", b"REPLACE"):
            sizes = appendedSizes(command)
            if sizes is None:
                return UNREADABLE
            if any(size > self.maxAppendSize for size in sizes):
                return TOO_BIG
        if self.readOnly and name == b"SELECT":
            return Rewrite(replace(command, name=b"EXAMINE", wire=None))
        return PASS

    def _allowedByName(self, name: bytes) -> bool:
        return name in self.allowUnknown or (self.allow is not None and name in self.allow - ALWAYS_ALLOWED)

    def filterResponse(self, session: ISession, response: IMAPResponse) -> Verdict:
        """
        Drop a C{STATUS} or C{ESEARCH} response about a mailbox the rules
        refuse.
        """
        if response.tag != b"*":
            return PASS
        name = responseMailbox(response)
        if name is not None and not self._permitted(name, listing=False):
            return DROP
        return PASS

    def _checkMailboxes(self, command: IMAPCommand) -> Reject | None:
        if self.mailboxesAllow is None and not self.mailboxesDeny:
            return None
        names = namedMailboxes(command)
        if names is None:
            return UNREADABLE
        for raw in names:
            if raw and not self._permitted(raw, listing=command.name in LISTING):
                return Reject(f'Access to mailbox "{_shown(raw)}" is not permitted', "NO", "NOPERM")
        if (
            command.name == b"RENAME"
            and names
            and (self._mayHoldDenied(names[0]) or not self._allAllowedBelow(names[0]))
        ):
            return Reject(f'Mailboxes below "{_shown(names[0])}" are not permitted', "NO", "NOPERM")
        return None

    def _allAllowedBelow(self, raw: bytes) -> bool:
        """
        With an allow list: C{True} if every mailbox below C{raw} is allowed
        (one that is not could reach an allowed name by a RENAME of its
        parent); probed with a child and a grandchild no pattern names.
        """
        if self.mailboxesAllow is None:
            return True
        for reading in mailboxReadings(raw):
            name = canonicalName(reading, self.separator)
            if name == "INBOX":
                continue
            child = name + self.separator + "\x01"
            for probe in (child, child + self.separator + "\x01"):
                if not any(pattern.fullmatch(probe) for pattern in self.mailboxesAllow):
                    return False
        return True

    def _mayHoldDenied(self, raw: bytes) -> bool:
        names = [canonicalName(reading, self.separator) for reading in mailboxReadings(raw)]
        # (RENAME INBOX moves its messages, not its children.)
        return any(name != "INBOX" and mayContain(name, self._denyPatterns, self.separator) for name in names)

    def _permitted(self, raw: bytes, listing: bool) -> bool:
        for reading in mailboxReadings(raw):
            name = canonicalName(reading, self.separator)
            if any(pattern.fullmatch(name) for pattern in self.mailboxesDeny):
                return False
            # A LIST pattern with wildcards is no one mailbox: what it shows
            # is up to the server (and to filters on its responses).
            if listing and ("*" in name or "%" in name):
                continue
            if self.mailboxesAllow is not None and not any(p.fullmatch(name) for p in self.mailboxesAllow):
                return False
        return True


_ABOUT_MAILBOXES = frozenset({b"STATUS", b"ESEARCH"})


def appendedSizes(command: IMAPCommand) -> list[int] | None:
    """
    The sizes of the messages an C{APPEND} (or C{REPLACE}) carries: every
    literal after the mailbox (C{MULTIAPPEND} sends several), and for
    C{CATENATE} the sum of its C{TEXT} parts.

    @return: the sizes, or C{None} if the arguments hold no message.
    """
    start = 2 if command.name == b"REPLACE" else 1
    arguments = command.arguments[start:]
    sizes = []
    for index, token in enumerate(arguments):
        if isinstance(token, String) and token.literal or isinstance(token, StreamedLiteral):
            sizes.append(_size(token))
        elif isinstance(token, List) and index and arguments[index - 1] == Atom(b"CATENATE"):
            parts = token.items
            sizes.append(sum(_size(part) for i, part in enumerate(parts) if i and parts[i - 1] == Atom(b"TEXT")))
    return sizes or None


def _size(token: Token) -> int:
    if isinstance(token, StreamedLiteral):
        return token.size
    if isinstance(token, String):
        return len(token.value)
    return 0


def _shown(raw: bytes) -> str:
    return "".join(char if " " <= char <= "~" else "?" for char in raw.decode("ascii", "replace"))


def _strings(options: dict[str, Any], key: str) -> list[str] | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"option {key!r}: must be a list of non-empty strings")
    return list(value)


def _commandNames(options: dict[str, Any], key: str) -> list[str] | None:
    names = _strings(options, key)
    for name in names or ():
        if not _COMMAND_NAME.match(name):
            hint = " (name commands without UID: COPY covers UID COPY)" if name.upper().startswith("UID ") else ""
            raise ValueError(f"option {key!r}: {name!r} is not a command name{hint}")
    return names
