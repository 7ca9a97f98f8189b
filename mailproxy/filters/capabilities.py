# -*- test-case-name: tests.test_capability_filter -*-
"""
The C{capabilities} filter: hide capabilities from clients, or announce
more, in C{* CAPABILITY} responses and C{[CAPABILITY ...]} response codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from zope.interface import implementer

from mailproxy.filters import PASS, Rewrite, Verdict, checkOptions
from mailproxy.imap.model import Atom, IMAPResponse
from mailproxy.imap.syntax import RELAY_CAPABILITIES, isAtom
from mailproxy.interfaces import IResponseFilter, ISession


@implementer(IResponseFilter)
class CapabilityFilter:
    """
    Rewrite capability lists.

    @ivar hidden: upper-case names to remove.
    @ivar hiddenFamilies: upper-case prefixes ending in C{=} (C{AUTH=})
        whose names are removed.
    @ivar added: names appended unless already listed.
    """

    responseNames = frozenset({b"CAPABILITY", b"OK"})

    def __init__(self, hide: Iterable[str] = (), add: Iterable[str] = ()) -> None:
        hiddenNames = [name.upper().encode("ascii") for name in hide]
        self.hidden = frozenset(name for name in hiddenNames if not name.endswith(b"="))
        self.hiddenFamilies = tuple(name for name in hiddenNames if name.endswith(b"="))
        self.added = tuple(name.encode("ascii") for name in add)

    @classmethod
    def fromOptions(cls, options: dict[str, Any]) -> CapabilityFilter:
        """
        Build the filter from its configuration options (C{hide}, C{add}).

        @raise ValueError: naming the option that is wrong.
        """
        checkOptions(options, ("hide", "add"))
        hide, add = _names(options, "hide"), _names(options, "add")
        for name in add:
            if not RELAY_CAPABILITIES([name.encode("ascii")]):
                raise ValueError(f"option 'add': the proxy cannot relay {name}")
        return cls(hide, add)

    def transform(self, names: list[bytes]) -> list[bytes]:
        """
        C{names} without the hidden ones, with the added ones.
        """
        kept = [name for name in names if not self._isHidden(name.upper())]
        present = {name.upper() for name in kept}
        for name in self.added:
            if name.upper() not in present:
                kept.append(name)
                present.add(name.upper())
        return kept

    def _isHidden(self, upper: bytes) -> bool:
        return upper in self.hidden or upper.startswith(self.hiddenFamilies)

    def filterResponse(self, session: ISession, response: IMAPResponse) -> Verdict:
        """
        Rewrite the capability list of C{response}, if it has one that
        changes.
        """
        if response.name == b"CAPABILITY" and response.tag == b"*":
            names = [token.value for token in response.arguments if isinstance(token, Atom)]
            changed = self.transform(names)
            if changed != names or len(names) != len(response.arguments):
                return Rewrite(response.withArguments([Atom(name) for name in changed]))
        elif response.isStatus and response.code is not None:
            word, _, rest = response.code.partition(b" ")
            if word.upper() == b"CAPABILITY":
                names = rest.split()
                changed = self.transform(names)
                if changed != names:
                    return Rewrite(replace(response, code=b" ".join([word, *changed]), wire=None))
        return PASS


def _names(options: dict[str, Any], key: str) -> list[str]:
    value = options.get(key, [])
    if not isinstance(value, list | tuple):
        raise ValueError(f"option {key!r}: must be a list of capability names")
    for name in value:
        if not isinstance(name, str) or not name.isascii() or not isAtom(name.encode("ascii")):
            raise ValueError(f"option {key!r}: {name!r} is not a capability name")
    return list(value)
