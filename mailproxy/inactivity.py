# -*- test-case-name: tests.test_inactivity -*-
"""
An inactivity timeout cheap enough to note activity on every read.

Twisted's L{TimeoutMixin} moves its timer on every C{resetTimeout} (two
Python calls and a clock read, twice per relayed command).  L{Inactivity}
keeps the same interface but only notes the time; its one timer, when it
runs out, looks at when the connection was last active and waits for the
rest, so the connection still times out C{timeOut} seconds after its last
activity.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Inactivity:
    """
    Mixin: call L{timeoutConnection} after C{timeOut} seconds without a
    L{resetTimeout}.

    @ivar clock: where time comes from; set by the class that mixes this in.
    """

    clock: IReactorTime
    timeOut: float | None = None
    _lastActive = 0.0
    _inactivityTimer: IDelayedCall | None = None

    def resetTimeout(self) -> None:
        """
        The connection is active now.
        """
        self._lastActive = self.clock.seconds()

    def setTimeout(self, period: float | None) -> float | None:
        """
        Time out after C{period} seconds of inactivity from now on, or never
        (C{None}); return the previous period.
        """
        previous = self.timeOut
        self.timeOut = period
        timer = self._inactivityTimer
        if period is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._inactivityTimer = None
            return previous
        self._lastActive = self.clock.seconds()
        if timer is not None and timer.active():
            timer.reset(period)
        else:
            self._inactivityTimer = self.clock.callLater(period, self._timedOut)
        return previous

    def _timedOut(self) -> None:
        self._inactivityTimer = None
        if self.timeOut is None:
            return
        remaining = self._lastActive + self.timeOut - self.clock.seconds()
        if remaining > 0:
            self._inactivityTimer = self.clock.callLater(remaining, self._timedOut)
            return
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        """
        Called after C{timeOut} seconds of inactivity.
        """
        raise NotImplementedError
