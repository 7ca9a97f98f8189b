"""
POP3: the client-facing server, relay to POP3 upstreams, and the POP3-to-IMAP
bridge.
"""


class NoSuchMessage(LookupError):
    """
    The message number does not exist or is marked deleted.
    """
