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
from typing import TYPE_CHECKING, Any, Protocol

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.logger import Logger

from mailproxy.accounts.checker import replaced
from mailproxy.auth import ProxyRealm
from mailproxy.config import Config, ConfigError, ListenerConfig, configFromText, loadConfig, readConfigText
from mailproxy.filters.registry import buildFilters, chainFactory, closeFilters
from mailproxy.imap.server import ServerContext
from mailproxy.passwords import UsersFileError
from mailproxy.tls import upstreamOptions

if TYPE_CHECKING:
    from mailproxy.workers import WorkerPool

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
    "workers",
    "oauth2",
)


class Reloader(Protocol):
    """
    What SIGHUP runs (see L{mailproxy.tap.ListenersService}).
    """

    path: str | None
    log: Logger

    def reload(self, loaded: Config | None = None) -> bool: ...

    def closeFilters(self) -> None: ...


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
        makeChecker: Callable[[Config], Any] | None,
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

    def reload(self, loaded: Config | None = None) -> bool:
        """
        Apply the configuration file as it is now (or as C{loaded} from
        it); C{False} (and one error line) if it cannot be used.
        """
        if self.path is None:
            return False
        listeners: dict[str, ListenerConfig] = {}
        checker = None
        try:
            config = loadConfig(self.path) if loaded is None else loaded
            for upstream in config.upstreams.values():
                upstreamOptions(upstream)
            checker = self._makeChecker(config) if self._makeChecker is not None else None
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
            # An account backend built for the new configuration lets go.
            replaced(checker, None)
            return False
        if checker is not None:
            old = self.portal.checkers.get(IUsernamePassword)
            self.portal.registerChecker(checker)
            replaced(old, checker)
        # [oauth2] is bound at start-up: routes resolve providers in that one.
        self.portal.realm = ProxyRealm(_withStartupSettings(config, self.config))
        for context in self.contexts:
            listener = self._applied[context.listener.name] = listeners[context.listener.name]
            context.filtersFor = chainFactory(config, listener, filters)
            context.config = _withStartupSettings(config, context.config)
        self.filterGenerations.append(filters)
        _warnRestartOnly(self.log, config, self.config)
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


class SupervisorReloader:
    """
    The supervisor's reload (workers): the users file it checks passwords
    against, then every worker's own reload (routes, filters, certificates).
    """

    log = Logger()

    def __init__(self, path: str, config: Config, pool: WorkerPool, makeChecker: Callable[[Config], Any]) -> None:
        self.path: str | None = path
        self.config = config
        self.pool = pool
        self._makeChecker = makeChecker

    def reload(self, loaded: Config | None = None) -> bool:
        assert self.path is not None
        try:
            text = readConfigText(self.path)
            config = configFromText(text, self.path)
            checker = self._makeChecker(config)
        except (ConfigError, UsersFileError, OSError) as error:
            self.log.error("configuration not reloaded, keeping the running one: {error}", error=str(error))
            return False
        self.pool.setChecker(checker)
        # What workers load, also when one restarts.
        self.pool.configText = text
        _warnRestartOnly(self.log, config, self.config)
        self.config = _withStartupSettings(config, self.config)
        self.log.info("reloading {count} workers", count=len(self.pool.workers))
        self.pool.reload()
        return True

    def closeFilters(self) -> None:
        """
        The supervisor runs no filters (its workers do).
        """


def _warnRestartOnly(log: Logger, new: Config, running: Config) -> None:
    restartOnly = [name for name in _RESTART_ONLY if _startupValue(new, name) != _startupValue(running, name)]
    if restartOnly:
        log.warn(
            "configuration changes to {settings} take effect only after a restart",
            settings=", ".join(restartOnly),
        )


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
