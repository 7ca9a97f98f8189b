"""
The built-in filters, registered like any third-party one.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from mailproxy.interfaces import IFilterFactory


@implementer(IPlugin, IFilterFactory)
class BuiltinFilter:
    """
    A filter factory that imports its class only when a configuration uses
    it, so listing plugins stays cheap.
    """

    def __init__(self, name: str, description: str, className: str) -> None:
        self.name = name
        self.description = description
        self.className = className

    def build(self, options: dict[str, Any]) -> Any:
        return namedAny(self.className).fromOptions(options)


audit = BuiltinFilter(
    "audit",
    "One structured log event and JSON line per command, credentials redacted.",
    "mailproxy.filters.audit.AuditFilter",
)
policy = BuiltinFilter(
    "policy",
    "Allow/deny commands, read-only mode, mailbox patterns, APPEND size.",
    "mailproxy.filters.policy.PolicyFilter",
)
folders = BuiltinFilter(
    "folders", "Map and hide mailbox names, both ways, modified UTF-7 aware.", "mailproxy.filters.folders.FolderFilter"
)
capabilities = BuiltinFilter(
    "capabilities", "Hide or add capabilities.", "mailproxy.filters.capabilities.CapabilityFilter"
)
