# -*- test-case-name: tests.test_epolldispatch -*-
"""
The epoll reactor's main loop and dispatch of ready sockets, with less
Python per wake-up.

A relayed command wakes the proxy twice (the command, then its response),
and each wake-up went through Twisted's generic machinery, written for any
selectable and any reactor, before reaching a protocol:

  - C{EPollReactor.doPoll} calls each ready socket's handler through
    C{log.callWithLogger}, which asks the transport for its log prefix and
    pushes and pops a context dictionary around the call, so that a legacy
    C{log.msg} inside is tagged with the connection.  The proxy logs
    through C{twisted.logger}, which never reads that context; yet the
    wrapper was a tenth of the CPU spent relaying a command.
  - A TCP connection's read then passes through C{_doReadOrWrite},
    C{Connection.doRead} and C{Connection._dataReceived}: three calls and
    their checks around one C{recv}.
  - C{mainLoop} runs every timed call that is due and works out how long to
    sleep, on every turn, through five calls and two clock reads, although
    on most turns no timed call is due.

L{dispatchWithoutLogContext} gives a running reactor a loop and a
C{doPoll} that do the same with less: ready sockets are handled without a
log context, a plain read on a TCP connection goes straight from C{recv} to
its protocol, and timed calls are looked at through C{runUntilCurrent} only
when one is due or new.  What the wrappers also did, catching and logging
whatever a handler raises, it keeps, naming the connection in the log line.
"""

from __future__ import annotations

import types
from errno import EWOULDBLOCK
from select import EPOLLIN
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.tcp import Client, Connection, Server
from twisted.logger import Logger

log = Logger()

# epoll_wait takes milliseconds in a C int: the longest sleep it can be asked
# for (as ReactorBase.timeout caps it).
_LONGEST_SLEEP = 2147483

# The connection classes whose reads are Connection.doRead and
# Connection._dataReceived: a recv handed to the protocol (a subclass that
# reads otherwise, such as a UNIX socket passing descriptors, is left to
# its own doRead).
_PLAIN_READS = frozenset(
    kind
    for kind in (Server, Client)
    if kind.doRead is Connection.doRead and kind._dataReceived is Connection._dataReceived
)


def dispatchWithoutLogContext(reactor: Any) -> bool:
    """
    Make C{reactor} dispatch ready sockets with L{_doPoll}, if it is
    Twisted's epoll reactor (any other is left as it is).

    @return: whether C{reactor} now does.
    """
    if type(reactor) is not EPollReactor:
        return False
    poll = types.MethodType(_doPoll, reactor)
    # mainLoop calls doIteration, which the class binds to doPoll
    reactor.doPoll = reactor.doIteration = poll  # type: ignore[method-assign]
    reactor.mainLoop = types.MethodType(_mainLoop, reactor)  # type: ignore[method-assign]
    return True


def _mainLoop(self: EPollReactor) -> None:
    """
    L{ReactorBase.mainLoop}, calling C{runUntilCurrent} and C{timeout} only
    when a timed call is due or new, a thread asked for a call, or the
    reactor has just stopped (cancelled calls wait in the heap until then,
    as they may on Twisted's loop).
    """
    seconds = self.seconds
    poll = self.doIteration
    while self._started:
        try:
            while self._started:
                pending = self._pendingTimedCalls
                if self.threadCallQueue or self._newTimedCalls or self._justStopped:
                    self.runUntilCurrent()
                    timeout = self.timeout()
                elif pending:
                    timeout = pending[0].time - seconds()
                    if timeout <= 0:
                        self.runUntilCurrent()
                        timeout = self.timeout()
                    elif timeout > _LONGEST_SLEEP:
                        timeout = _LONGEST_SLEEP
                else:
                    timeout = None
                poll(timeout if self.running else 0)
        except BaseException:
            log.failure("Unexpected error in main loop.")
    log.info("Main loop terminated.")


def _doPoll(self: EPollReactor, timeout: float | None) -> None:
    """
    L{EPollReactor.doPoll}, calling C{_doReadOrWrite} directly, and reading
    a plain TCP connection inline.
    """
    try:
        ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except InterruptedError:
        return
    selectables = self._selectables
    readOrWrite = self._doReadOrWrite
    plainReads = _PLAIN_READS
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:
            # removed by a handler earlier in this turn
            continue
        try:
            if event == EPOLLIN and type(selectable) in plainReads and "doRead" not in selectable.__dict__:
                # Connection.doRead, inline (unless the connection put its
                # own in place: abortConnection makes reading a no-op).
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except OSError as error:
                    if error.args[0] != EWOULDBLOCK:
                        self._disconnectSelectable(selectable, CONNECTION_LOST, True)
                    continue
                if not data:
                    self._disconnectSelectable(selectable, CONNECTION_DONE, True)
                    continue
                try:
                    selectable.protocol.dataReceived(data)
                except BaseException as error:
                    # As _doReadOrWrite: logged, and the connection closed.
                    log.failure("Unhandled error reading from {connection}", connection=_prefix(selectable))
                    self._disconnectSelectable(selectable, error, True)
                continue
            readOrWrite(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            # _doReadOrWrite logs what doRead and doWrite raise; this is
            # what the connection's connectionLost raised.
            log.failure("Unhandled error handling I/O on {connection}", connection=_prefix(selectable))


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return repr(selectable)
