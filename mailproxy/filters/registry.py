# -*- test-case-name: tests.test_filter_registry -*-
"""
Find filter plugins and build the configured filters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.plugin import getPlugins

import mailproxy.plugins
from mailproxy.config import Config, ConfigError, FilterConfig, ListenerConfig
from mailproxy.filters.chain import FilterChain
from mailproxy.interfaces import IFilterFactory


def filterFactories() -> dict[str, Any]:
    """
    Every L{IFilterFactory} plugin, by name: built-in and third-party.
    """
    return {factory.name: factory for factory in getPlugins(IFilterFactory, mailproxy.plugins)}


def buildFilters(
    configured: Mapping[str, FilterConfig],
    factories: Mapping[str, Any] | None = None,
    reuse: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Build one filter object per configured filter, or take it from
    C{reuse} (by name) where one is given.

    @raise ConfigError: naming the filter and the problem; what was built
        until then is closed.
    """
    if factories is None:
        factories = filterFactories()
    reuse = reuse or {}
    built: dict[str, Any] = {}
    try:
        for name, item in configured.items():
            if name in reuse:
                built[name] = reuse[name]
                continue
            factory = factories.get(item.type)
            if factory is None:
                known = ", ".join(sorted(factories)) or "none"
                raise ConfigError(f"filters.{name}.type: no filter plugin {item.type!r} (installed: {known})")
            try:
                built[name] = factory.build(dict(item.options))
            except (ValueError, TypeError, OSError) as error:
                raise ConfigError(f"filters.{name}: {error}") from None
    except ConfigError:
        closeFilters(item for name, item in built.items() if name not in reuse)
        raise
    return built


def closeFilters(filters: Iterable[Any]) -> None:
    """
    Close every filter with a C{close} method (files, connections), each
    once.
    """
    seen: set[int] = set()
    for item in filters:
        close = getattr(item, "close", None)
        if close is not None and id(item) not in seen:
            seen.add(id(item))
            close()


def chainFactory(
    config: Config, listener: ListenerConfig, built: Mapping[str, Any]
) -> Callable[[str | None], FilterChain]:
    """
    What a listener's sessions call to get their chain, before (C{None})
    and after login.
    """

    def chainFor(username: str | None, own: tuple[str, ...] | None = None) -> FilterChain:
        return FilterChain([built[name] for name in config.filterNamesFor(listener, username, own)])

    return chainFor
