# -*- test-case-name: tests.test_writenow -*-
"""
Write to a plain TCP transport at once instead of on the reactor's next turn.

C{transport.write} only buffers: the octets go out when the reactor next
finds the socket writable, which costs a relay one more trip through the
event loop per write and two C{epoll_ctl} calls (start and stop watching
for writability).  For a request-response protocol relayed a command at a
time, that is most of the proxy's own latency.  L{writeNow} sends what it
can straight away when nothing is queued before it, and leaves only the
rest (a full socket buffer) to the transport, so the order of octets and
the transport's backpressure stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it immediately if C{transport} is
    a plain (not TLS) TCP connection with nothing queued (what is sent now
    cannot overtake anything); any other transport, or what the socket does
    not take, goes through C{transport.write}.
    """
    # One function, no helper: this runs twice per relayed command.
    if (
        data
        and isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or the connection broke: the transport's own
            # write path finds out again and reports it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
