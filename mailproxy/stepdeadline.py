# -*- test-case-name: tests.test_stepdeadline -*-
"""
One timer over the steps of connecting to an upstream and logging in.

Each step (the connection, the greeting, STARTTLS, CAPABILITY, the login)
may take C{connect_timeout} seconds from its start.  A timer per step costs
a C{callLater} and a C{cancel} each, five or more per session; moving one
timer later costs an addition (C{DelayedCall.reset} only notes how much
later, and the reactor moves the call if it comes due), and a handshake
that goes well ends long before it does.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime


class StepDeadline:
    """
    Give up on the current step C{seconds} after it started.

    @ivar expired: whether a step ran out of time.
    """

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._giveUp: Callable[[], object] | None = None
        self._call = clock.callLater(seconds, self._expire)

    def step(self, giveUp: Callable[[], object]) -> None:
        """
        A step starts now; if it is still under way C{seconds} from now,
        call C{giveUp}.  After the deadline has passed (or L{stop}), a new
        step gets no time: C{giveUp} is called at once.
        """
        self._giveUp = giveUp
        if self._call.active():
            self._call.reset(self.seconds)
        else:
            giveUp()

    def stop(self) -> None:
        """
        The steps are over (done or failed): no step is given up any more.
        """
        self._giveUp = None
        if self._call.active():
            self._call.cancel()

    def _expire(self) -> None:
        self.expired = True
        giveUp, self._giveUp = self._giveUp, None
        if giveUp is not None:
            giveUp()
