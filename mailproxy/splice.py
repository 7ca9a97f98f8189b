# -*- test-case-name: tests.test_tls_close -*-
"""
A client and an upstream transport as each other's streaming producers,
and the undoing of it before either is closed.

Each side pauses the other when its write buffer fills, so a slow reader
never makes the proxy hold a whole message.  But a TLS transport (a
STARTTLS client or upstream, an implicit-TLS one) sends its close_notify
and closes only once no producer is registered with it: Twisted waits for
the producer to finish first.  Closing a spliced TLS transport without
unsplicing would leave it open until the peer gives up.
"""

from __future__ import annotations

from typing import Any


class Splice:
    """
    The mutual producer registration of one relayed session.
    """

    def __init__(self, client: Any, upstream: Any, upstreamProducer: Any = None) -> None:
        """
        @param upstreamProducer: what pauses and resumes the upstream for
            the client (the upstream transport itself by default, or a
            wrapper that also pauses a timer).
        """
        self.client = client
        self.upstream = upstream
        client.registerProducer(upstreamProducer or upstream, True)
        upstream.registerProducer(client, True)
        self.active = True

    def undo(self) -> None:
        """
        Unregister both producers (once); a transport already asked to
        close then finishes closing.  A transport whose connection is lost
        has dropped its producer already (and a STARTTLS one cannot be asked
        any more).
        """
        if not self.active:
            return
        self.active = False
        for transport in (self.client, self.upstream):
            if transport.connected:
                transport.unregisterProducer()


def closeClient(transport: Any, splice: Splice | None) -> None:
    """
    Close a client connection after what is buffered for it, unsplicing it
    first.  Its input may be paused (a login or command in flight,
    backpressure), but TLS finishes closing only on reading the client's
    close_notify.
    """
    if splice is not None:
        splice.undo()
    if transport.disconnecting:
        return
    transport.resumeProducing()
    transport.loseConnection()
