# -*- test-case-name: tests.test_reload -*-
"""
Reloading the configuration on SIGHUP without dropping sessions.

What a running proxy can change safely is reloaded: the users file, routing
(users to upstreams, upstream credentials, upstream settings), filters (a
listener's included) and server settings for new connections.  Sessions
already open keep the routes and filter chains they started with; new
connections and logins get the new ones.  Listeners (ports, TLS settings
and certificate paths, PROXY protocol), limits, the failure delay, the
credentials cache's settings, the metrics endpoint, the log format and the
certificate check and TLS session intervals are bound at start-up: a change
to them is logged as needing a restart.  The credentials cache itself is
kept across reloads (an entry whose users-file hash changed no longer
matches).  The certificate files themselves are re-read on SIGHUP too, by
L{mailproxy.certificates}.  A configuration that does not load is logged
and ignored; the proxy goes on with the one it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.logger import Logger

from mailproxy.auth import ProxyRealm, UsersFileChecker
from mailproxy.config import Config, ConfigError, ListenerConfig, loadConfig
from mailproxy.filters.registry import buildFilters, chainFactory, closeFilters
from mailproxy.imap.server import ServerContext
from mailproxy.passwords import UsersFileError
from mailproxy.tls import upstreamOptions

# What is bound at start-up (ports, the shared counters, logging).
_RESTART_ONLY = (
    "listeners",
    "limits",
    "authFailureDelay",
    "metricsListen",
    "logFormat",
    "hashThreads",
    "authCacheTTL",
    "authCacheSize",
    "listenBacklog",
    "certificateCheckInterval",
    "tlsSessionLifetime",
)


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
        # Each listener's configuration as last applied (its filters).
        self._applied: dict[str, ListenerConfig] = {}
        self._makeChecker = makeChecker

    def reload(self) -> bool:
        """
        Apply the configuration file as it is now; C{False} (and one error
        line) if it cannot be used.
        """
        if self.path is None:
            return False
        listeners: dict[str, ListenerConfig] = {}
        try:
            config = loadConfig(self.path)
            for upstream in config.upstreams.values():
                upstreamOptions(upstream)
            checker = self._makeChecker(config.usersFile)
            listeners = {listener.name: listener for listener in config.listeners}
            for context in self.contexts:
                # A listener gone from the file keeps running as it is.
                name = context.listener.name
                listener = listeners.setdefault(name, self._applied.get(name, context.listener))
                missing = sorted(set(listener.filters) - set(config.filters))
                if missing:
                    raise ConfigError(f"listener {listener.name}: no filter named {', '.join(missing)}")
            # Filters configured as before are kept (their files stay open
            # once); changed and new ones are built afresh.
            current = self.filterGenerations[-1]
            unchanged = {
                name: current[name]
                for name, item in config.filters.items()
                if name in current and self.config.filters.get(name) == item
            }
            filters = buildFilters(config.filters, reuse=unchanged)
        except (ConfigError, UsersFileError, OSError) as error:
            self.log.error("configuration not reloaded, keeping the running one: {error}", error=str(error))
            return False
        self.portal.registerChecker(checker)
        self.portal.realm = ProxyRealm(config)
        for context in self.contexts:
            listener = self._applied[context.listener.name] = listeners[context.listener.name]
            context.filtersFor = chainFactory(config, listener, filters)
            context.config = _withStartupSettings(config, context.config)
        self.filterGenerations.append(filters)
        restartOnly = [
            name for name in _RESTART_ONLY if _startupValue(config, name) != _startupValue(self.config, name)
        ]
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
        Close every filter of every generation, each once.
        """
        closeFilters(item for generation in self.filterGenerations for item in generation.values())


def _startupValue(config: Config, name: str) -> Any:
    value = getattr(config, name)
    if name == "listeners":
        # A listener's filters change with a reload; the rest is bound.
        return tuple(dataclasses.replace(listener, filters=()) for listener in value)
    return value


def _withStartupSettings(new: Config, running: Config) -> Config:
    """
    C{new}, with what is bound at start-up kept as it is running.
    """
    return dataclasses.replace(new, **{name: getattr(running, name) for name in _RESTART_ONLY})
