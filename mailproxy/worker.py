# -*- test-case-name: tests.test_workers -*-
"""
One worker process (C{python -m mailproxy.worker}), started by the
supervisor (L{mailproxy.workers}): it accepts on the listening sockets it
inherits and serves the connections, asking the supervisor over its
channel for limits and password checks, and writing its log lines to a
pipe the supervisor reads.

Its configuration is the one the supervisor last loaded, fetched over the
channel: a worker restarted while an admin edits the file starts with the
configuration in force, not with the half-edited file.  It reloads when
the supervisor asks (the supervisor gets the SIGHUP) and drains on SIGTERM,
or when the supervisor goes away (see
L{mailproxy.tap.ListenersService.stopService}).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.config import Config, ConfigError, configFromText
from mailproxy.epolldispatch import dispatchWithoutLogContext
from mailproxy.logs import WORKER_LOG_FORMATS, workerLineFormatter
from mailproxy.passwords import UsersFileError
from mailproxy.workerprotocol import (
    Channel,
    CollectMetrics,
    GetConfig,
    OneProtocolFactory,
    Ready,
    Reload,
    fetchPages,
    pageOf,
)

log = Logger(namespace="mailproxy.workers")


@dataclass
class WorkerLink:
    """
    What a worker's service is built with: its channel to the supervisor
    and the listening sockets it inherited, by listener name (descriptor,
    address family).
    """

    channel: SupervisorChannel
    listeners: dict[str, tuple[int, int]]
    configPath: str
    metricsRegistry: Any = None
    service: Any = field(default=None, repr=False)


class SupervisorChannel(Channel):
    """
    The worker's end of its channel.
    """

    link: WorkerLink | None = None

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.closed = False
        self._metricsText = b""

    def fetchConfig(self, path: str) -> Deferred[Config]:
        """
        The configuration as the supervisor last loaded it from C{path}.
        """
        return fetchPages(self, GetConfig).addCallback(configFromText, path)

    @Reload.responder
    def reload(self) -> Deferred[dict[str, Any]]:
        assert self.link is not None
        service = self.link.service

        def failed(failure: Failure) -> bool:
            log.error("configuration not reloaded, keeping the running one: {error}", error=str(failure.value))
            return False

        loading = self.fetchConfig(self.link.configPath)
        loading.addCallbacks(service.reloadNow, failed)
        return loading.addCallback(lambda reloaded: {"reloaded": bool(reloaded)})

    @CollectMetrics.responder
    def collectMetrics(self, page: int) -> dict[str, Any]:
        if page == 0:
            # One snapshot, however many pages it takes.
            registry = self.link.metricsRegistry if self.link is not None else None
            self._metricsText = generate_latest(registry) if registry is not None else b""
        return pageOf(self._metricsText, page)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        super().connectionLost(reason)
        # The supervisor is gone: nobody answers for limits any more.
        stop(self.reactor)


# A worker's log lines wait up to this long, or until about this many
# octets (counted in characters), to leave for the supervisor together:
# under load a line per event would wake the supervisor several times a
# login.  Warnings and errors leave at once, with the lines before them, and
# what is left goes when the worker ends; a worker killed outright loses at
# most the last 50 ms of its informational lines.
BATCH_SECONDS = 0.05
BATCH_OCTETS = 64 * 1024
_AT_ONCE = frozenset((LogLevel.warn, LogLevel.error, LogLevel.critical))


@implementer(ILogObserver)
class LogForwarder:
    """
    A log observer writing each event, formatted as the supervisor's log
    wants it (see L{mailproxy.logs.workerLineFormatter}), to the pipe the
    supervisor reads it from, in batches (L{BATCH_SECONDS},
    L{BATCH_OCTETS}); a worker whose supervisor is gone writes to stderr.

    The pipe is blocking: a worker whose supervisor cannot keep up waits,
    as it would for a slow log file, rather than losing lines or piling
    them up.
    """

    def __init__(self, fd: int, logFormat: str, system: str, reactor: Any) -> None:
        self.fd = fd
        self.format = workerLineFormatter(logFormat)
        self.system = system
        self.reactor = reactor
        self._pending: list[str] = []
        self._pendingCharacters = 0
        self._flushing: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        event = dict(event, log_system=self.system)
        text = self.format(event)
        if not text:
            return
        self._pending.append(text)
        self._pendingCharacters += len(text)
        if event.get("log_level") in _AT_ONCE or self._pendingCharacters >= BATCH_OCTETS:
            self.flush()
        elif self._flushing is None:
            self._flushing = self.reactor.callLater(BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        if not self._pending:
            return
        data = memoryview("".join(self._pending).encode("utf-8", "replace"))
        self._pending.clear()
        self._pendingCharacters = 0
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            # The supervisor is gone (it stops us too): stderr, if anyone
            # still reads it; else the lines are lost with it.
            try:
                sys.stderr.write(bytes(data).decode("utf-8", "replace"))
                sys.stderr.flush()
            except OSError:
                pass


def stop(reactor: Any) -> None:
    """
    Stop the worker: the service drains on the way (see
    L{mailproxy.tap.ListenersService.stopService}).
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def start(reactor: Any, link: WorkerLink, config: Config) -> None:
    """
    Serve C{config} on the inherited sockets, and tell the supervisor.
    """
    from mailproxy.tap import buildService

    service = link.service = buildService(config, reactor, configPath=link.configPath, worker=link)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    link.channel.callRemote(Ready, pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailproxy.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--log-fd", type=int, required=True, help="the pipe to write log lines to")
    parser.add_argument("--log-format", choices=WORKER_LOG_FORMATS, required=True)
    parser.add_argument("--listener", action="append", default=[], help="NAME=FD:FAMILY")
    arguments = parser.parse_args(argv)
    listeners: dict[str, tuple[int, int]] = {}
    for item in arguments.listener:
        name, _, where = item.rpartition("=")
        fd, _, family = where.partition(":")
        listeners[name] = (int(fd), int(family))

    from twisted.internet import reactor

    dispatchWithoutLogContext(reactor)
    channel = SupervisorChannel(reactor)
    reactor.adoptStreamConnection(arguments.channel, socket.AF_UNIX, OneProtocolFactory(channel))  # type: ignore[attr-defined]
    os.close(arguments.channel)
    forwarder = LogForwarder(arguments.log_fd, arguments.log_format, f"worker {arguments.number}", reactor)
    globalLogBeginner.beginLoggingTo([forwarder], redirectStandardIO=False, discardBuffer=True)
    link = channel.link = WorkerLink(channel, listeners, arguments.config)
    exitCode = [0]

    def failed(failure: Failure) -> None:
        if failure.check(ConfigError, UsersFileError):
            log.error("worker {number} not started: {error}", number=arguments.number, error=str(failure.value))
        else:
            log.failure("worker {number} not started", failure, number=arguments.number)
        exitCode[0] = 1
        stop(reactor)

    def fetchAndStart() -> None:
        loading = channel.fetchConfig(arguments.config)
        loading.addCallback(lambda config: start(reactor, link, config)).addErrback(failed)

    # Ctrl-C reaches the whole process group: the supervisor drains us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(stop, reactor))  # type: ignore[attr-defined]
    reactor.callWhenRunning(fetchAndStart)
    try:
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    finally:
        forwarder.flush()
    return exitCode[0]


if __name__ == "__main__":
    sys.exit(main())
