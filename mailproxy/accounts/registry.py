# -*- test-case-name: tests.test_accounts -*-
"""
Find account backend plugins and build the configured one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.plugin import getPlugins

import mailproxy.plugins
from mailproxy.config import Config, ConfigError
from mailproxy.interfaces import IAccountBackendFactory


@dataclass(frozen=True)
class BackendContext:
    """
    What a backend factory may use besides its own settings.

    @ivar config: the configuration the backend serves.
    @ivar timeout: C{[auth] lookup_timeout}: how long one lookup may take.
    @ivar runInThread: runs a function (a password hash) in the hashing
        threads, off the reactor.
    """

    reactor: Any
    config: Config
    timeout: float
    runInThread: Any


# A factory's error that starts with the setting's name.
_NAMES_A_SETTING = re.compile(r"[a-z0-9_]+: ")


def backendFactories() -> dict[str, Any]:
    """
    Every L{IAccountBackendFactory} plugin, by name: built-in and
    third-party.
    """
    return {factory.name: factory for factory in getPlugins(IAccountBackendFactory, mailproxy.plugins)}


def buildBackend(config: Config, context: BackendContext, factories: dict[str, Any] | None = None) -> Any:
    """
    The backend C{config} names, built from its C{[auth.NAME]} settings.
    A factory's C{ValueError} names the setting first (C{"url: required"}).

    @raise ConfigError: naming the setting and the problem.
    """
    if factories is None:
        factories = backendFactories()
    name = config.authBackend
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories)) or "none"
        raise ConfigError(f"auth.backend: no account backend plugin {name!r} (installed: {known}, and users_file)")
    try:
        return factory.build(dict(config.authBackendSettings), context)
    except (ValueError, TypeError, OSError) as error:
        # "url: required" names the setting: auth.http.url: required
        message = str(error)
        separator = "." if _NAMES_A_SETTING.match(message) else ": "
        raise ConfigError(f"auth.{name}{separator}{message}") from None


def refuseUnknownKeys(settings: dict[str, Any], known: set[str]) -> None:
    """
    @raise ValueError: naming the first key of C{settings} not in C{known}.
    """
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (expected one of {', '.join(sorted(known))})")
