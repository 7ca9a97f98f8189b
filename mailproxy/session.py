# -*- test-case-name: tests.test_filter_chain -*-
"""
The session a filter sees (L{ISession}).
"""

from __future__ import annotations

import time
from typing import Any

from zope.interface import implementer

from mailproxy.filters.chain import FilterChain
from mailproxy.interfaces import ISession


@implementer(ISession)
class ProxySession:
    """
    One client connection, as filters see it.
    """

    def __init__(self, protocol: str, listener: str, clientAddress: str, tls: bool, chain: FilterChain) -> None:
        self.protocol = protocol
        self.listener = listener
        self.clientAddress = clientAddress
        self.tls = tls
        self.user: str | None = None
        self.upstream: str | None = None
        self.selected: bytes | None = None
        self.chain = chain
        self.started = time.monotonic()

    def notify(self, event: str, **details: Any) -> None:
        """
        Tell the chain's observers about C{event}.
        """
        self.chain.notify(self, event, **details)
