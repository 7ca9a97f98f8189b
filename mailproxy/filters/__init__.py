"""
Filter verdicts and the tools filter authors need.

    from mailproxy.filters import PASS, DROP, Reject, Rewrite
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class _Pass:
    def __repr__(self) -> str:
        return "PASS"


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


PASS = _Pass()
"""Relay unchanged."""

DROP = _Drop()
"""Do not relay this untagged response."""


@dataclass(frozen=True)
class Rewrite:
    """
    Relay C{message} (a command or response) instead of the original.
    """

    message: Any


@dataclass(frozen=True)
class Reject:
    """
    Do not relay the command; answer it with C{status} (C{"NO"} or
    C{"BAD"}; POP3 sends C{-ERR}), an optional response C{code} such as
    C{"NOPERM"} and C{text}.
    """

    text: str
    status: str = "NO"
    code: str | None = None


Verdict = _Pass | _Drop | Rewrite | Reject


def checkOptions(options: Mapping[str, Any], known: Iterable[str]) -> None:
    """
    For filter factories: refuse options the filter does not know.

    @raise ValueError: naming the first unknown option and the known ones.
    """
    allowed = sorted(known)
    for key in options:
        if key not in allowed:
            raise ValueError(f"{key}: unknown option (expected one of: {', '.join(allowed)})")


__all__ = ["DROP", "PASS", "Reject", "Rewrite", "Verdict", "checkOptions"]
