# -*- test-case-name: tests.test_faults -*-
"""
Notice an upstream that stops answering a command in flight.

The login handshake has its own bound (C{connect_timeout}); after login a
command sent upstream could otherwise wait forever for a server that has
hung.  A L{ResponseWatchdog} fires when the upstream owes a response and has
sent nothing for C{timeout} seconds while the proxy was reading from it: a
slow client that pauses the upstream socket (backpressure) or an IDLE (which
has its own refresh) never trips it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


class ResponseWatchdog:
    """
    A timer over one upstream connection.

    @param clock: where time comes from.
    @param timeout: seconds of silence allowed while a response is owed.
    @param onTimeout: called once when they run out.
    """

    def __init__(self, clock: IReactorTime, timeout: float, onTimeout: Callable[[], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self.onTimeout = onTimeout
        self._owed = False
        self._pauses = 0
        self._stopped = False
        self._lastHeard = clock.seconds()
        self._call: IDelayedCall | None = None

    def owed(self, owed: bool) -> None:
        """
        Say whether the upstream owes a response now; the silence is
        counted from the later of this moment and its last data.
        """
        if owed == self._owed:
            return
        self._owed = owed
        if owed:
            self._lastHeard = self.clock.seconds()
        if self._call is None or self._stopped:
            # (A running timer stays: _check looks at the state when it runs.)
            self._arm()

    def heard(self, owed: bool | None = None) -> None:
        """
        The upstream sent something; if C{owed} is given, L{owed} too.
        """
        self._lastHeard = self.clock.seconds()
        if owed is not None and owed != self._owed:
            self.owed(owed)

    def pause(self) -> None:
        """
        The proxy stopped reading from the upstream (a slow client, a
        filter deciding); silence does not count until L{resume}.
        """
        self._pauses += 1
        self._arm()

    def resume(self) -> None:
        self._pauses = max(0, self._pauses - 1)
        if not self._pauses:
            self._lastHeard = self.clock.seconds()
        self._arm()

    def stop(self) -> None:
        """
        The session ended: never fire.
        """
        self._stopped = True
        self._arm()

    @property
    def running(self) -> bool:
        """
        C{True} while silence is being counted.
        """
        return self._call is not None

    def _arm(self) -> None:
        counting = self._owed and not self._pauses and not self._stopped
        if counting and self._call is None:
            self._call = self.clock.callLater(self._remaining(), self._check)
        elif self._stopped and self._call is not None:
            # Otherwise a timer no longer needed is left to run out
            # (_check then does nothing): answering a command costs no
            # cancel, and the next command no callLater.
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _remaining(self) -> float:
        return max(0.0, self._lastHeard + self.timeout - self.clock.seconds())

    def _check(self) -> None:
        self._call = None
        if not self._owed or self._pauses or self._stopped:
            return
        remaining = self._remaining()
        if remaining > 0:
            # Data arrived meanwhile (heard() only notes the time, so that a
            # busy stream costs no timer juggling).
            self._call = self.clock.callLater(remaining, self._check)
            return
        self._stopped = True
        self.onTimeout()


@implementer(IPushProducer)
class WatchedProducer:
    """
    The upstream transport as the client transport's producer: a client
    that stops reading pauses the upstream and the watchdog together.
    """

    def __init__(self, producer: Any, watchdog: ResponseWatchdog | None) -> None:
        """
        @param producer: an C{IPushProducer} (a transport).
        """
        self.producer = producer
        self.watchdog = watchdog
        self._paused = False

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            if self.watchdog is not None:
                self.watchdog.pause()
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if self.watchdog is not None:
                self.watchdog.resume()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()
