# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one set of listening sockets
(C{server.workers}), started and supervised by the twistd process.

The supervisor binds every listener (before twistd drops privileges, so
ports below 1024 work) but never accepts on them: each worker inherits the
sockets and accepts on them itself (L{mailproxy.worker}), so the kernel
spreads connections over the workers.  The supervisor keeps what must hold
across workers (limits, lockouts, login turns, the credentials cache; see
L{mailproxy.sharedlimits}), writes every worker's log lines to the one log,
serves their merged metrics, restarts a worker that dies (after a delay
that grows while it keeps dying), passes SIGHUP on to every worker, and on
SIGTERM drains them: they stop accepting, say goodbye to every client at a
response boundary, and exit.
"""

from __future__ import annotations

import enum
import os
import socket
import sys
import time
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mailproxy.accounts.checker import replaced
from mailproxy.oauth.tokens import AccessTokens, answerAccessToken
from mailproxy.sharedlimits import LimitsResponder
from mailproxy.workerprotocol import (
    AccessToken,
    Channel,
    CollectMetrics,
    ForgetAccessToken,
    GetConfig,
    OneProtocolFactory,
    Ready,
    Reload,
    fetchPages,
    pageOf,
)

# A worker that dies soon after starting is restarted after a delay that
# doubles each time (it would only die again), up to this.
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# Running this long counts as having started well: the delay starts over.
STABLE_SECONDS = 60.0
# How long draining workers may take before they are killed: their own
# close grace (mailproxy.frontdoor.CLOSE_GRACE) and a margin.
DRAIN_TIMEOUT = 15.0
# File descriptors of a worker: the supervisor's channel, the pipe for its
# log lines, then listeners.
CHANNEL_FD = 3
LOG_FD = 4
FIRST_LISTENER_FD = 5
# A log line longer than this is written in pieces rather than held back.
MAX_LOG_LINE = 1 << 20


class WorkerState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    ENDED = "ended"


class InheritedListener(Service):
    """
    The listening sockets of one listener, bound by the supervisor and
    accepted on by its workers.

    A TCP listener gets one socket per worker, all bound to the same
    address with C{SO_REUSEPORT}, so the kernel spreads new connections
    evenly over the workers (one shared socket would let whichever worker
    wakes first take a whole burst).  A restarted worker gets its
    predecessor's socket, with the connections that queued meanwhile.  Any
    other endpoint (UNIX sockets, systemd's) is one socket all workers
    share.
    """

    def __init__(self, name: str, endpoint: str, workers: int, reactor: Any) -> None:
        self.setName(name)
        self.endpoint = endpoint
        self.workers = workers
        self.reactor = reactor
        self._sockets: list[socket.socket] = []
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = serverFromString(self.reactor, self.endpoint)
        if isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
            family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
            port = endpoint._port
            if port:
                # SO_REUSEPORT would let this join another process's
                # listener on the port (a second proxy started by mistake)
                # and share its connections: fail as a plain bind does.
                _reusePortSocket(family, endpoint._interface, port, 1, reusePort=False).close()
            for _ in range(self.workers):
                sock = _reusePortSocket(family, endpoint._interface, port, endpoint._backlog)
                # Port 0: the others join the port the first one got.
                port = sock.getsockname()[1]
                self._sockets.append(sock)
            return
        outcome: list[Any] = []
        endpoint.listen(Factory.forProtocol(Protocol)).addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        port = outcome[0]
        # Only the workers accept.
        port.stopReading()
        self._port = port
        self._sockets.append(port.socket)

    def socketFor(self, number: int) -> socket.socket:
        """
        The socket worker C{number} (from 1) accepts on.
        """
        return self._sockets[(number - 1) % len(self._sockets)]

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            self._sockets.clear()
            return port.stopListening()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        return None


def _reusePortSocket(family: int, interface: str, port: int, backlog: int, reusePort: bool = True) -> socket.socket:
    """
    A listening TCP socket on C{interface} and C{port} that the other
    workers' sockets may bind too (C{SO_REUSEPORT}, unless C{reusePort} is
    false).

    @raise CannotListenError: if it cannot be bound.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reusePort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise CannotListenError(interface, port, error) from None
    sock.setblocking(False)
    return sock


class WorkerChannel(Channel):
    """
    The supervisor's end of one worker's channel: limits and passwords
    answered by the shared L{LimitsResponder}.
    """

    def __init__(self, worker: Worker, responder: LimitsResponder) -> None:
        super().__init__()
        self.worker = worker
        self.responder = responder
        self.extraLocators = (responder,)

    @AccessToken.responder
    def accessToken(self, user: str, provider: str) -> Deferred[dict[str, Any]]:
        return answerAccessToken(self.worker.pool.tokens, user, provider)

    @ForgetAccessToken.responder
    def forgetAccessToken(self, user: str, token: str) -> dict[str, Any]:
        tokens = self.worker.pool.tokens
        if tokens is not None:
            tokens.forgetToken(user, token)
        return {}

    @GetConfig.responder
    def getConfig(self, page: int) -> dict[str, Any]:
        return pageOf(self.worker.pool.configText, page)

    @Ready.responder
    def ready(self, pid: int) -> dict[str, Any]:
        self.worker.serving()
        return {}

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        # What the worker held is given back, whatever ended it.
        self.responder.workerGone()


class WorkerProcess(ProcessProtocol):
    """
    A worker's process: what it writes to stdout or stderr (a traceback
    before its logging started, say) goes to the log line by line.
    """

    log = Logger(namespace="mailproxy.workers")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        data = self._partial.pop(childFD, b"") + data
        # Whole lines only: the rest waits for its end.
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) > MAX_LOG_LINE:
            data, end = data + b"\n", len(data) + 1
        if end < len(data):
            self._partial[childFD] = data[end:]
        if end == 0:
            return
        if childFD == LOG_FD:
            self.worker.pool.writeWorkerLog(self.worker.number, data[:end])
            return
        for line in data[:end].splitlines():
            self.log.warn(
                "worker {number}: {line}", number=self.worker.number, line=line.decode("utf-8", "replace").rstrip()
            )

    def processEnded(self, reason: Failure) -> None:
        self.worker.ended(reason)


class Worker:
    """
    One worker slot: its process, restarted when it dies.
    """

    log = Logger(namespace="mailproxy.workers")

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.state = WorkerState.ENDED
        self.pid: int | None = None
        self.channel: WorkerChannel | None = None
        self.process: Any = None
        self.started = 0.0
        self.restartDelay = FIRST_RESTART_DELAY
        self._restart: Any = None
        self._ended: list[Deferred[None]] = []

    def start(self) -> None:
        self._restart = None
        pool = self.pool
        reactor = pool.reactor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs: dict[int, Any] = {0: pool.devNull, 1: "r", 2: "r", CHANNEL_FD: theirs.fileno(), LOG_FD: "r"}
        arguments = [
            sys.executable,
            "-m",
            "mailproxy.worker",
            "--config",
            pool.configPath,
            "--number",
            str(self.number),
        ]
        arguments += ["--channel", str(CHANNEL_FD), "--log-fd", str(LOG_FD), "--log-format", pool.workerLogFormat]
        for offset, listener in enumerate(pool.listeners):
            inherited = listener.socketFor(self.number)
            childFDs[FIRST_LISTENER_FD + offset] = inherited.fileno()
            arguments += ["--listener", f"{listener.name}={FIRST_LISTENER_FD + offset}:{int(inherited.family)}"]
        try:
            self.process = reactor.spawnProcess(
                WorkerProcess(self), sys.executable, arguments, env=dict(os.environ), childFDs=childFDs
            )
        finally:
            theirs.close()
        self.channel = WorkerChannel(self, LimitsResponder(pool.limits, pool.checker))
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocolFactory(self.channel))
        ours.close()
        self.pid = self.process.pid
        self.state = WorkerState.STARTING
        self.started = reactor.seconds()
        self.log.info("worker {number} started (pid {pid})", number=self.number, pid=self.pid)

    def serving(self) -> None:
        if self.state is WorkerState.STARTING:
            self.state = WorkerState.SERVING
            self.pool.workerServing()

    def ended(self, reason: Failure) -> None:
        stopping = self.state is WorkerState.STOPPING or not self.pool.running
        self.state = WorkerState.ENDED
        ran = self.pool.reactor.seconds() - self.started
        if stopping:
            self.log.info("worker {number} (pid {pid}) stopped", number=self.number, pid=self.pid)
        else:
            if ran >= STABLE_SECONDS:
                self.restartDelay = FIRST_RESTART_DELAY
            how = "was killed" if getattr(reason.value, "signal", None) else "exited"
            self.log.error(
                "worker {number} (pid {pid}) {how} ({reason}); restarting it in {delay:g} s",
                number=self.number,
                pid=self.pid,
                how=how,
                reason=str(reason.value),
                delay=self.restartDelay,
            )
            self._restart = self.pool.reactor.callLater(self.restartDelay, self.start)
            self.restartDelay = min(MAX_RESTART_DELAY, self.restartDelay * 2)
        self.pid = None
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        waiting, self._ended = self._ended, []
        for waiter in waiting:
            waiter.callback(None)

    def stop(self) -> Deferred[None]:
        """
        Drain the worker (SIGTERM): it stops accepting, says goodbye to its
        clients and exits; killed if it takes longer than
        L{DRAIN_TIMEOUT}.
        """
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self.state is WorkerState.ENDED:
            return succeed(None)
        self.state = WorkerState.STOPPING
        ended: Deferred[None] = Deferred()
        self._ended.append(ended)
        self.signal("TERM")
        killing = self.pool.reactor.callLater(DRAIN_TIMEOUT, self.signal, "KILL")
        ended.addBoth(lambda result: killing.cancel() if killing.active() else None)
        return ended

    def signal(self, name: str) -> None:
        if self.state is not WorkerState.ENDED and self.process is not None:
            try:
                self.process.signalProcess(name)
            except (OSError, ProcessLookupError):
                pass


class WorkerPool(Service):
    """
    C{count} workers serving C{listeners}, with the supervisor's C{limits}
    and C{checker} (see L{LimitsResponder}).
    """

    log = Logger(namespace="mailproxy.workers")

    def __init__(
        self, count: int, configPath: str, listeners: list[InheritedListener], limits: Any, checker: Any, reactor: Any
    ) -> None:
        self.configPath = os.path.abspath(configPath)
        self.listeners = listeners
        self.limits = limits
        self.checker = checker
        self.reactor = reactor
        self.workers = [Worker(self, number) for number in range(1, count + 1)]
        self.devNull = -1
        # The configuration file as last loaded (what workers load).
        self.configText = b""
        # Where the log goes (twistd's file or stdout), if the supervisor
        # writes it itself, and in which format (see mailproxy.logs).
        self.logDestination: IO[Any] | None = None
        self.logFormat = "text"
        # The OAuth 2.0 access tokens workers ask for, if configured.
        self.tokens: AccessTokens | None = None
        self._allServing = False

    def startService(self) -> None:
        super().startService()
        self.devNull = os.open(os.devnull, os.O_RDWR)
        for worker in self.workers:
            worker.start()

    def workerServing(self) -> None:
        if not self._allServing and all(worker.state is WorkerState.SERVING for worker in self.workers):
            self._allServing = True
            self.log.info("all {count} workers serving", count=len(self.workers))

    @property
    def workerLogFormat(self) -> str:
        """
        How workers write their log lines: ready for L{logDestination}, or
        as events for the supervisor's own observers.
        """
        return self.logFormat if self.logDestination is not None else "events"

    def writeWorkerLog(self, number: int, lines: bytes) -> None:
        """
        Write whole log C{lines} of worker C{number}.
        """
        text = lines.decode("utf-8", "replace")
        if self.logDestination is not None:
            try:
                self.logDestination.write(text)
                self.logDestination.flush()
            except OSError:
                # The log itself cannot be written (a full disk): the lines
                # are lost either way, and the worker's pipe must stay open.
                pass
            return
        for line in text.splitlines():
            try:
                event = eventFromJSON(line)
            except ValueError:
                event = {"log_format": "{line}", "line": line, "log_level": LogLevel.warn, "log_time": time.time()}
            event["log_system"] = f"worker {number}"
            globalLogPublisher(event)

    def setChecker(self, checker: Any) -> None:
        """
        Check passwords with C{checker} from now on (a reload).
        """
        replaced(self.checker, checker)
        self.checker = checker
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.responder.checker = checker

    def reload(self) -> Deferred[Any]:
        """
        Ask every worker to reload; fires when all have answered.
        """
        asking = []
        for worker in self.workers:
            if worker.channel is not None and worker.state is WorkerState.SERVING:
                asking.append(worker.channel.callRemote(Reload))
        return DeferredList(asking, consumeErrors=True)

    def collectMetrics(self) -> Deferred[list[str]]:
        """
        Every serving worker's metrics text.
        """
        return gatherResults(
            [_collect(worker.channel) for worker in self.workers if worker.channel is not None],
            consumeErrors=True,
        ).addCallback(lambda texts: [text for text in texts if text])

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopping = [worker.stop() for worker in self.workers]

        def closed(result: Any) -> Any:
            if self.devNull >= 0:
                os.close(self.devNull)
                self.devNull = -1
            return result

        return gatherResults(stopping).addBoth(closed)


def _collect(channel: WorkerChannel) -> Deferred[str]:
    """
    A worker's metrics text; empty if it is going away.
    """
    collecting = fetchPages(channel, CollectMetrics)
    return collecting.addCallbacks(lambda text: text.decode("utf-8"), lambda failure: "")
