# -*- test-case-name: tests.test_imap_idle -*-
"""
IDLE (RFC 2177) for a relayed session.

When the upstream has IDLE, the client's IDLE is relayed; every
C{refreshInterval} the proxy ends and restarts it upstream (DONE, IDLE) so
that neither the upstream nor a NAT drops a long IDLE, without the client
noticing.  When the upstream lacks IDLE, the proxy offers it anyway and
emulates it: it answers the continuation itself and polls the upstream with
NOOP every C{pollInterval}, relaying the untagged updates.

While a client idles its inactivity timeout is off: an IDLE-ing client is
not cut while the upstream lives.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

# How soon the proxy tries again to send a poll or refresh of its own that
# had to wait for a client command to be wholly relayed.
BUSY_RETRY = 1.0


class _Refresh(enum.Enum):
    NONE = "none"
    DONE_SENT = "done sent"
    IDLE_RESENT = "idle re-sent"


class IdleController:
    """
    The IDLE state of one relayed session.

    @param relay: provides C{sendLocal(bytes)}, C{toUpstream(bytes)},
        C{upstreamMidCommand()}, C{tagAnswered(tag)} and C{client} (with
        C{setTimeout}).
    """

    log = Logger()

    def __init__(
        self,
        relay: Any,
        clock: IReactorTime,
        *,
        emulate: bool,
        pollInterval: float,
        refreshInterval: float,
        timeout: float,
    ) -> None:
        self.relay = relay
        self.clock = clock
        self.emulate = emulate
        self.pollInterval = pollInterval
        self.refreshInterval = refreshInterval
        self.timeout = timeout
        self.tag: bytes | None = None
        self._timer: IDelayedCall | None = None
        self._polls = 0
        self._noopTag: bytes | None = None
        self._doneRequested = False
        self._refresh = _Refresh.NONE
        self._doneDuringRefresh = False
        self._clientDone = False

    @property
    def idling(self) -> bool:
        return self.tag is not None

    @property
    def watching(self) -> bool:
        """
        C{True} while L{swallow} may claim a response line: an IDLE runs,
        or the proxy's own poll is unanswered.
        """
        return self.tag is not None or self._noopTag is not None

    @property
    def quiet(self) -> bool:
        """
        C{True} while neither an IDLE nor a poll or refresh of the proxy's
        own is under way: no response line is claimed (L{watching}) and
        the upstream owes the proxy nothing (L{owedByUpstream}).
        """
        return self.tag is None and self._noopTag is None and self._refresh is _Refresh.NONE

    @property
    def ending(self) -> bool:
        """
        C{True} once the client sent DONE and waits for the IDLE's tagged
        reply (which may depend on the proxy's own poll or refresh).
        """
        return self.tag is not None and self._clientDone

    @property
    def owedByUpstream(self) -> bool:
        """
        C{True} while the upstream owes a reply to the proxy's own poll or
        refresh: a hung upstream must not leave an idling client waiting.
        """
        return self._noopTag is not None or self._refresh is not _Refresh.NONE

    def start(self, tag: bytes) -> bool:
        """
        The client sent C{tag IDLE}, allowed by the filters.

        @return: C{True} if the proxy handles it (emulation): it must not
            be relayed.
        """
        self.tag = tag
        self.relay.client.setTimeout(None)
        if self.emulate:
            self.relay.sendLocal(b"+ idling\r\n")
            self._schedule(self.pollInterval, self._poll)
            return True
        self._schedule(self.refreshInterval, self._refreshNow)
        return False

    def clientDone(self) -> bool:
        """
        The client sent DONE.

        @return: C{True} if the proxy handles it: it must not be relayed.
        """
        if self.tag is None:
            return False
        self._clientDone = True
        self._cancelTimer()
        if self.emulate:
            if self._noopTag is not None:
                self._doneRequested = True
            else:
                self._finish(emulated=True)
            return True
        if self._refresh is _Refresh.DONE_SENT:
            # Our own DONE is on its way; its tagged reply will be the
            # client's.
            self._doneDuringRefresh = True
            return True
        return False

    def swallow(self, line: bytes) -> bool:
        """
        Look at a complete upstream response line; C{True} if it belongs to
        the proxy's own IDLE bookkeeping and must not reach the client.
        """
        if self._noopTag is not None and line.startswith(self._noopTag + b" "):
            self._noopTag = None
            if self._doneRequested:
                self._finish(emulated=True)
            elif self.tag is not None:
                self._schedule(self.pollInterval, self._poll)
            return True
        tag = self.tag
        if tag is None or self.emulate:
            return False
        if self._refresh is _Refresh.DONE_SENT and line.startswith(tag + b" "):
            if self._doneDuringRefresh:
                self._refresh = _Refresh.NONE
                self._finish(emulated=False)
                return False
            if self.relay.upstreamMidCommand():
                # The client began a command meanwhile (while idling, which
                # it must not): its IDLE is over, not re-sent into it.
                self._refresh = _Refresh.NONE
                self._finish(emulated=True)
                return True
            self._refresh = _Refresh.IDLE_RESENT
            self.relay.toUpstream(tag + b" IDLE\r\n")
            return True
        if self._refresh is _Refresh.IDLE_RESENT and line.startswith(b"+"):
            self._refresh = _Refresh.NONE
            if self.tag is not None:
                self._schedule(self.refreshInterval, self._refreshNow)
            return True
        if line.startswith(tag + b" "):
            self._finish(emulated=False)
        return False

    def stop(self) -> None:
        """
        The session ended.
        """
        self._cancelTimer()
        self.tag = None

    def _poll(self) -> None:
        self._timer = None
        if self.relay.upstreamMidCommand():
            # A client that sends commands while idling (it must not) still
            # never gets the proxy's NOOP in the middle of one.
            self._schedule(BUSY_RETRY, self._poll)
            return
        self._polls += 1
        self._noopTag = b"mpi%d" % self._polls
        self.relay.toUpstream(self._noopTag + b" NOOP\r\n")
        self.relay.updateWatchdog()

    def _refreshNow(self) -> None:
        self._timer = None
        if self.relay.upstreamMidCommand():
            self._schedule(BUSY_RETRY, self._refreshNow)
            return
        self._refresh = _Refresh.DONE_SENT
        self.relay.toUpstream(b"DONE\r\n")
        self.relay.updateWatchdog()

    def _finish(self, *, emulated: bool) -> None:
        tag, self.tag = self.tag, None
        # (An IDLE the upstream refused when re-sent ends here too: no "+"
        # is owed for it any more.)
        self._refresh = _Refresh.NONE
        self._doneRequested = False
        self._doneDuringRefresh = False
        self._clientDone = False
        self._cancelTimer()
        if emulated and tag is not None:
            self.relay.sendLocal(tag + b" OK IDLE terminated\r\n")
            self.relay.tagAnswered(tag)
        self.relay.client.setTimeout(self.timeout)

    def _schedule(self, delay: float, action: Any) -> None:
        self._cancelTimer()
        self._timer = self.clock.callLater(delay, action)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
