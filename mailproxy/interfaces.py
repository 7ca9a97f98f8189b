"""
Public interfaces of mailproxy.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IProxyUser(Interface):
    """
    The avatar of a locally authenticated user: who they are and where their
    session is relayed.
    """

    username = Attribute("The local user name (str).")
    upstream = Attribute("The mailproxy.config.UpstreamConfig the session is relayed to.")
    upstreamUsername = Attribute("The user name presented upstream (str).")
    upstreamPassword = Attribute("The stored upstream password (str), or None to reuse the client's (passthrough).")
