"""
POP3: the client-facing server, relay to POP3 upstreams, and the POP3-to-IMAP
bridge.
"""


class NoSuchMessage(LookupError):
    """
    The message number does not exist or is marked deleted.
    """


class MessageExpunged(NoSuchMessage):
    """
    The message was in the session's snapshot but another session has
    expunged it upstream since.

    Answered as Dovecot's own POP3 server answers it
    (C{-ERR Message 3 expunged.}); the message keeps its number and
    listed size, as the snapshot does not change during a session.

    @ivar number: the POP3 message number.
    """

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number
