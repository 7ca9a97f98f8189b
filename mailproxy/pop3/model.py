# -*- test-case-name: tests.test_pop3_filters -*-
"""
POP3 commands as filters see them: the same shape as IMAP commands (name,
arguments as atoms), so that protocol-neutral filters (audit, policy) work
on both; C{session.protocol} tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mailproxy.imap.model import Atom, Token, text


@dataclass
class POP3Command:
    """
    A TRANSACTION-state command.

    @ivar name: upper case, e.g. C{b"RETR"}.
    @ivar arguments: its words, as L{Atom}s.
    """

    name: bytes
    arguments: list[Token] = field(default_factory=list)
    tag: bytes = b""
    uid: bool = False
    wire: None = None

    @property
    def fullName(self) -> bytes:
        return self.name

    @classmethod
    def fromWords(cls, name: bytes, words: list[bytes]) -> POP3Command:
        return cls(name, [Atom(word) for word in words])

    def words(self) -> list[bytes]:
        """
        The arguments as the bytes to send (atoms and strings alike).
        """
        return [value for value in (text(token) for token in self.arguments) if value is not None]

    def withArguments(self, arguments: list[Token]) -> POP3Command:
        return replace(self, arguments=arguments)
