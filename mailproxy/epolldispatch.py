# -*- test-case-name: tests.test_epolldispatch -*-
"""
The epoll reactor's dispatch of ready sockets, without a log context per
event.

Twisted's C{EPollReactor.doPoll} calls each ready socket's handler through
C{log.callWithLogger}, which asks the transport for its log prefix and
pushes and pops a context dictionary around the call: all so that a legacy
C{log.msg} made inside the handler is tagged with the connection.  The
proxy logs through C{twisted.logger}, which never reads that context; yet
the wrapper was a tenth of the CPU spent relaying a command (a read, a
write, twice per command).  L{dispatchWithoutLogContext} gives a running
reactor a C{doPoll} that calls the handler directly.  What the wrapper
also did, catching and logging whatever the handler raises, it keeps,
naming the connection in the log line.
"""

from __future__ import annotations

import types
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


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
    return True


def _doPoll(self: EPollReactor, timeout: float | None) -> None:
    """
    L{EPollReactor.doPoll}, calling C{_doReadOrWrite} directly.
    """
    try:
        ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except InterruptedError:
        return
    selectables = self._selectables
    readOrWrite = self._doReadOrWrite
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:
            # removed by a handler earlier in this turn
            continue
        try:
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
