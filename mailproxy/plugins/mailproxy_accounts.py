"""
The built-in account backends, registered like any third-party one.
"""

from __future__ import annotations

import importlib.util
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

    def __init__(self, name: str, description: str, className: str, extra: tuple[str, str] | None = None) -> None:
        """
        @param extra: the module the backend needs beyond the proxy's own
            dependencies, and the extra that installs it.
        """
        self.name = name
        self.description = description
        self.className = className
        self.extra = extra

    def build(self, settings: dict[str, Any], context: Any) -> Any:
        if self.extra is not None:
            module, extra = self.extra
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"needs {module} (pip install 'mailproxy[{extra}]')")
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
ldap = BuiltinBackend(
    "ldap",
    "An LDAP directory holds users (checked by a bind or their stored hash) and routes, as Dovecot's LDAP passdb.",
    "mailproxy.accounts.ldap.LDAPBackend",
    extra=("ldaptor", "ldap"),
)
