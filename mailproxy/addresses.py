# -*- test-case-name: tests.test_client_address_forwarding -*-
"""
How a client connection's addresses are named in logs, limits and what is
forwarded upstream.
"""

from __future__ import annotations

from typing import Any


class ClientAddress(str):
    """
    A client's C{host:port}, as logged and counted, that also knows the
    C{host:port} the client connected to (C{connected}: the listener's
    address, or the load balancer's destination behind a PROXY header).
    """

    connected: str

    def __new__(cls, peer: str, connected: str = "") -> ClientAddress:
        address = super().__new__(cls, peer)
        address.connected = connected
        return address


def _hostPort(address: Any) -> str:
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"


def clientAddressOf(transport: Any) -> ClientAddress:
    """
    The addresses of the client connection on C{transport}.
    """
    return ClientAddress(_hostPort(transport.getPeer()), _hostPort(transport.getHost()))


def balancerCheck(transport: Any) -> bool:
    """
    C{True} if the connection on C{transport} began with a PROXY v2
    C{LOCAL} header: the load balancer's own health check, not a client's.
    """
    for layer in (transport, getattr(transport, "transport", None)):
        header = getattr(layer, "header", None)
        if header is not None:
            return bool(getattr(header, "local", False))
    return False
