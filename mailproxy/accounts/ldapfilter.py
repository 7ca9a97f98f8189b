# -*- test-case-name: tests.test_accounts_ldap -*-
"""
LDAP search filters with Dovecot's variables: the configured text (RFC
4515) is parsed once, and each login's values are put into the parsed
filter's assertion values, never into its text.  A user name such as
C{*)(uid=*} is then a value like any other: it cannot widen the search,
and nothing has to be escaped right for that to hold.

Variables: C{%u} the user name, C{%s} the protocol, C{%r} the client's
address, C{%%} a percent sign.  They may stand in values only, not in
attribute names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ldaptor import ldapfilter
from ldaptor.protocols import pureldap

VARIABLES = {"u": "user", "s": "protocol", "r": "ip"}
_VARIABLE = re.compile(r"%(.)")
# Nested deeper than this, a filter is a mistake (and recursion is bounded).
MAX_DEPTH = 16


class FilterTemplate:
    """
    A search filter with variables in its values.
    """

    def __init__(self, text: str) -> None:
        """
        @raise ValueError: for a filter that does not parse, an unknown
            variable, a variable in an attribute name, or no C{%u}.
        """
        try:
            self._parsed = ldapfilter.parseFilter(text)
        except (ldapfilter.InvalidLDAPFilter, Exception):
            raise ValueError(f"filter: not an LDAP filter (RFC 4515): {text!r}") from None
        self.text = text
        used: set[str] = set()
        self._check(self._parsed, used, 0)
        if "user" not in used:
            raise ValueError("filter: must look the user up by %u")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilterTemplate) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def _check(self, node: Any, used: set[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"filter: nested more than {MAX_DEPTH} deep")
        if isinstance(node, pureldap.LDAPFilter_and | pureldap.LDAPFilter_or):
            for child in node.data:
                self._check(child, used, depth + 1)
            return
        if isinstance(node, pureldap.LDAPFilter_not):
            self._check(node.value, used, depth + 1)
            return
        for name in _attributeNames(node):
            if "%" in name:
                raise ValueError(f"filter: a variable in the attribute name {name!r}")
        for value in _values(node):
            used.update(_variablesIn(value))

    def render(self, values: Mapping[str, str]) -> Any:
        """
        The filter for one lookup: C{values} by variable name (C{user},
        C{protocol}, C{ip}) in place of the variables.
        """
        return _render(self._parsed, values)


def _variablesIn(value: str) -> set[str]:
    names = set()
    for match in _VARIABLE.finditer(value):
        letter = match.group(1)
        if letter == "%":
            continue
        if letter not in VARIABLES:
            raise ValueError(f"filter: %{letter} is no variable (%u user, %s protocol, %r client address, %% a %)")
        names.add(VARIABLES[letter])
    return names


def _substituted(value: str, values: Mapping[str, str]) -> str:
    # One pass over the template's text: what is put in is never read again.
    return _VARIABLE.sub(lambda match: "%" if match.group(1) == "%" else values[VARIABLES[match.group(1)]], value)


def _attributeNames(node: Any) -> list[str]:
    if isinstance(node, pureldap.LDAPAttributeValueAssertion):
        return [node.attributeDesc.value]
    if isinstance(node, pureldap.LDAPFilter_substrings):
        return [node.type]
    if isinstance(node, pureldap.LDAPFilter_present):
        return [node.value]
    if isinstance(node, pureldap.LDAPFilter_extensibleMatch):
        return [part.value for part in (node.type, node.matchingRule) if part is not None]
    raise ValueError(f"filter: {type(node).__name__} is not supported")


def _values(node: Any) -> list[str]:
    if isinstance(node, pureldap.LDAPAttributeValueAssertion):
        return [node.assertionValue.value]
    if isinstance(node, pureldap.LDAPFilter_substrings):
        return [part.value for part in node.substrings]
    if isinstance(node, pureldap.LDAPFilter_extensibleMatch):
        return [node.matchValue.value]
    return []


def _render(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, pureldap.LDAPFilter_and | pureldap.LDAPFilter_or):
        return type(node)([_render(child, values) for child in node.data])
    if isinstance(node, pureldap.LDAPFilter_not):
        return pureldap.LDAPFilter_not(_render(node.value, values))
    if isinstance(node, pureldap.LDAPAttributeValueAssertion):
        value = _substituted(node.assertionValue.value, values)
        return type(node)(attributeDesc=node.attributeDesc, assertionValue=pureldap.LDAPAssertionValue(value))
    if isinstance(node, pureldap.LDAPFilter_substrings):
        parts = [type(part)(_substituted(part.value, values)) for part in node.substrings]
        return pureldap.LDAPFilter_substrings(type=node.type, substrings=parts)
    if isinstance(node, pureldap.LDAPFilter_extensibleMatch):
        return pureldap.LDAPFilter_extensibleMatch(
            matchingRule=node.matchingRule,
            type=node.type,
            matchValue=pureldap.LDAPMatchingRuleAssertion_matchValue(_substituted(node.matchValue.value, values)),
            dnAttributes=node.dnAttributes,
        )
    return node
