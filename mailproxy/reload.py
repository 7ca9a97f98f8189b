# -*- test-case-name: tests.test_reload -*-
"""
Reloading the configuration on SIGHUP without dropping sessions.

What a running proxy can change safely is reloaded: the users file, routing
(users to upstreams, upstream credentials, upstream settings) and filters.
Sessions already open keep the routes and filter chains they started with;
new connections and logins get the new ones.  Listeners, limits and server
settings are bound at start-up: a change to them is logged as needing a
restart.  A configuration that does not load is logged and ignored; the
proxy goes on with the one it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.logger import Logger

from mailproxy.auth import ProxyRealm, UsersFileChecker
from mailproxy.config import Config, ConfigError, loadConfig
from mailproxy.filters.registry import buildFilters, chainFactory
from mailproxy.imap.server import ServerContext
from mailproxy.passwords import UsersFileError
from mailproxy.tls import upstreamOptions

# What is bound at start-up (ports, the shared counters, logging).
_RESTART_ONLY = ("listeners", "limits", "authFailureDelay", "metricsListen", "logFormat")


class ConfigReloader:
    """
    Re-read C{path} (if any) and apply what can change to C{portal} and the
    listeners' C{contexts}.

    @ivar filterGenerations: every set of filters built so far; sessions may
        still use an old one, so all are closed only when the proxy stops.
    """

    log = Logger()

    def __init__(
        self,
        path: str | None,
        config: Config,
        portal: Portal,
        contexts: list[ServerContext],
        filters: dict[str, Any],
        makeChecker: Callable[[str], UsersFileChecker],
    ) -> None:
        self.path = path
        self.config = config
        self.portal = portal
        # The listeners' contexts, filled in as they are built.
        self.contexts = contexts
        self.filterGenerations = [filters]
        self._makeChecker = makeChecker

    def reload(self) -> bool:
        """
        Apply the configuration file as it is now; C{False} (and one error
        line) if it cannot be used.
        """
        if self.path is None:
            return False
        try:
            config = loadConfig(self.path)
            for upstream in config.upstreams.values():
                upstreamOptions(upstream)
            checker = self._makeChecker(config.usersFile)
            filters = buildFilters(config.filters)
        except (ConfigError, UsersFileError, OSError) as error:
            self.log.error("configuration not reloaded, keeping the running one: {error}", error=str(error))
            return False
        self.portal.registerChecker(checker)
        self.portal.realm = ProxyRealm(config)
        listeners = {listener.name: listener for listener in config.listeners}
        for context in self.contexts:
            listener = listeners.get(context.listener.name, context.listener)
            context.filtersFor = chainFactory(config, listener, filters)
            context.config = _withStartupSettings(config, context.config)
        self.filterGenerations.append(filters)
        restartOnly = [name for name in _RESTART_ONLY if getattr(config, name) != getattr(self.config, name)]
        if restartOnly:
            self.log.warn(
                "configuration changes to {settings} take effect only after a restart",
                settings=", ".join(restartOnly),
            )
        self.config = _withStartupSettings(config, self.config)
        self.log.info(
            "configuration reloaded: {users} routed users, {upstreams} upstreams, {filters} filters",
            users=len(config.routes),
            upstreams=len(config.upstreams),
            filters=len(filters),
        )
        return True

    def closeFilters(self) -> None:
        """
        Close every filter with a C{close} method (files, connections), each
        once.
        """
        seen: set[int] = set()
        for generation in self.filterGenerations:
            for item in generation.values():
                close = getattr(item, "close", None)
                if close is not None and id(item) not in seen:
                    seen.add(id(item))
                    close()


def _withStartupSettings(new: Config, running: Config) -> Config:
    """
    C{new}, with what is bound at start-up kept as it is running.
    """
    return dataclasses.replace(new, **{name: getattr(running, name) for name in _RESTART_ONLY})
