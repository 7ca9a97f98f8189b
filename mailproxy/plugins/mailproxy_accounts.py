"""
The built-in account backends, registered like any third-party one.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from mailproxy.interfaces import IAccountBackendFactory


@implementer(IPlugin, IAccountBackendFactory)
class BuiltinBackend:
    """
    A backend factory that imports its class only when a configuration
    uses it, so listing plugins stays cheap.
    """

    def __init__(self, name: str, description: str, className: str) -> None:
        self.name = name
        self.description = description
        self.className = className

    def build(self, settings: dict[str, Any], context: Any) -> Any:
        return namedAny(self.className).fromSettings(settings, context)


http = BuiltinBackend(
    "http",
    "An HTTP service speaking nginx's auth_http protocol decides each login and its upstream.",
    "mailproxy.accounts.http.HTTPBackend",
)
sql = BuiltinBackend(
    "sql",
    "An SQL database (SQLite) holds users, their password hashes and routes, as Dovecot's SQL passdb.",
    "mailproxy.accounts.sql.SQLBackend",
)
