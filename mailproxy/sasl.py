# -*- test-case-name: tests.test_sasl -*-
"""
The server side of the SASL mechanisms the front ends offer, without I/O:
PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login).

An exchange is fed the client's responses as they come off the wire (the
base64 text of a line, without its line end) and answers each with a
L{Step}: a L{Challenge} to send, the L{Credentials} to log in with, or a
L{Refusal} naming what was wrong.  The wire conventions are those IMAP
AUTHENTICATE (RFC 9051, SASL-IR from RFC 4959) and POP3 AUTH (RFC 5034)
share: C{*} cancels, and C{=} as the initial response is an empty one.

LOGIN asks for the user name (C{Username:}) and then the password
(C{Password:}), as Dovecot does; an initial response is the user name, and
an empty one (C{=}) is treated as none, again as Dovecot does.

User names must be UTF-8 and not empty: no user has such a name, and
refusing it here keeps it out of the login path (limits, logs).  Passwords
are passed on as the client sent them.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from typing import ClassVar

# Base64 octets in one response.  The default pre-login line limit bounds
# IMAP responses already, POP3's line limit much more; this keeps a larger
# configured line limit from letting credentials grow with it.
MAX_RESPONSE = 64 * 1024

CANCEL = b"*"
EMPTY_INITIAL_RESPONSE = b"="


class SASLError(enum.Enum):
    """
    Why an exchange ended without credentials; the value is what the client
    is told.
    """

    CANCELLED = "Authentication cancelled"
    TOO_LONG = "SASL response too long"
    INVALID_BASE64 = "Invalid base64 in SASL response"
    MALFORMED_PLAIN = "Malformed PLAIN response"
    NUL_IN_LOGIN = "NUL in LOGIN user name or password"
    EMPTY_USER = "Empty user name"
    USER_NOT_UTF8 = "User name is not UTF-8"
    OTHER_AUTHORIZATION = "Cannot act as another user"


@dataclass(frozen=True)
class Challenge:
    """
    Send C{data} to the client (L{wire} is its base64 form) and feed its
    answer to L{SASLExchange.respond}.
    """

    data: bytes

    @property
    def wire(self) -> bytes:
        return base64.b64encode(self.data)


@dataclass(frozen=True)
class Credentials:
    """
    The exchange is over: log C{username} in with C{password}.
    """

    username: bytes
    # Never shown, so that a logged or printed step cannot leak it.
    password: bytes = field(repr=False)


@dataclass(frozen=True)
class Refusal:
    """
    The exchange is over without credentials, for C{error}.
    """

    error: SASLError

    @property
    def text(self) -> str:
        return self.error.value


Step = Challenge | Credentials | Refusal


class Stage(enum.Enum):
    """
    Where an exchange is.
    """

    NOT_STARTED = "not started"
    AWAITING_RESPONSE = "awaiting PLAIN response"
    AWAITING_USERNAME = "awaiting user name"
    AWAITING_PASSWORD = "awaiting password"
    FINISHED = "finished"


class SASLExchange:
    """
    One authentication exchange of one mechanism: L{start} it, then feed
    each client response to L{respond} while the last step was a
    L{Challenge}.

    @cvar mechanism: the mechanism's name (for logs and for the client).
    @ivar stage: where the exchange is.
    """

    mechanism: ClassVar[str] = "?"

    def __init__(self) -> None:
        self.stage = Stage.NOT_STARTED

    def start(self, initialResponse: bytes | None) -> Step:
        """
        Begin with the client's initial response as sent (base64, or C{=}
        for an empty one), or C{None} if it sent none.
        """
        if self.stage is not Stage.NOT_STARTED:
            raise RuntimeError(f"SASL {self.mechanism} exchange already started")
        if initialResponse is None:
            return self._noInitialResponse()
        if initialResponse.strip() == EMPTY_INITIAL_RESPONSE:
            return self._step(b"")
        return self._decoded(initialResponse)

    def respond(self, response: bytes) -> Step:
        """
        Go on with the client's answer to the last L{Challenge}.
        """
        if self.stage in (Stage.NOT_STARTED, Stage.FINISHED):
            raise RuntimeError(f"SASL {self.mechanism} exchange is {self.stage.value}")
        return self._decoded(response)

    def _decoded(self, response: bytes) -> Step:
        response = response.strip()
        if response == CANCEL:
            return self._finish(SASLError.CANCELLED)
        if len(response) > MAX_RESPONSE:
            return self._finish(SASLError.TOO_LONG)
        try:
            decoded = base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return self._finish(SASLError.INVALID_BASE64)
        if base64.b64encode(decoded) != response:
            # Excess or missing padding, stray bits: not what any encoder sends.
            return self._finish(SASLError.INVALID_BASE64)
        return self._step(decoded)

    def _finish(self, outcome: SASLError | Credentials) -> Step:
        self.stage = Stage.FINISHED
        return Refusal(outcome) if isinstance(outcome, SASLError) else outcome

    def _noInitialResponse(self) -> Step:
        raise NotImplementedError

    def _step(self, decoded: bytes) -> Step:
        """
        Take a decoded response in the current stage.
        """
        raise NotImplementedError


def _userNameError(username: bytes) -> SASLError | None:
    if not username:
        return SASLError.EMPTY_USER
    try:
        username.decode("utf-8")
    except UnicodeDecodeError:
        return SASLError.USER_NOT_UTF8
    return None


class PlainExchange(SASLExchange):
    """
    PLAIN: one response, C{authzid NUL authcid NUL passwd}; an authorization
    identity other than the user's own is refused.
    """

    mechanism = "PLAIN"

    def _noInitialResponse(self) -> Step:
        self.stage = Stage.AWAITING_RESPONSE
        return Challenge(b"")

    def _step(self, decoded: bytes) -> Step:
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            return self._finish(SASLError.MALFORMED_PLAIN)
        authorizationId, username, password = fields
        error = _userNameError(username)
        if error is not None:
            return self._finish(error)
        if authorizationId and authorizationId != username:
            return self._finish(SASLError.OTHER_AUTHORIZATION)
        return self._finish(Credentials(username, password))


USERNAME_CHALLENGE = Challenge(b"Username:")
PASSWORD_CHALLENGE = Challenge(b"Password:")


class LoginExchange(SASLExchange):
    """
    LOGIN: the user name, then the password, each asked for; neither may
    hold a NUL (it would be cut off somewhere down the line).
    """

    mechanism = "LOGIN"

    def __init__(self) -> None:
        super().__init__()
        self._username = b""

    def _noInitialResponse(self) -> Step:
        self.stage = Stage.AWAITING_USERNAME
        return USERNAME_CHALLENGE

    def _step(self, decoded: bytes) -> Step:
        if self.stage is Stage.AWAITING_PASSWORD:
            if b"\0" in decoded:
                return self._finish(SASLError.NUL_IN_LOGIN)
            return self._finish(Credentials(self._username, decoded))
        if not decoded and self.stage is Stage.NOT_STARTED:
            # An empty initial response asks for the user name, as Dovecot does.
            return self._noInitialResponse()
        if b"\0" in decoded:
            return self._finish(SASLError.NUL_IN_LOGIN)
        error = _userNameError(decoded)
        if error is not None:
            return self._finish(error)
        self._username = decoded
        self.stage = Stage.AWAITING_PASSWORD
        return PASSWORD_CHALLENGE


# Offered in this order.
MECHANISMS: dict[bytes, type[SASLExchange]] = {b"PLAIN": PlainExchange, b"LOGIN": LoginExchange}


def exchangeFor(mechanism: bytes) -> SASLExchange | None:
    """
    A new exchange for the mechanism the client named (in any case), or
    C{None} if it is not offered.
    """
    factory = MECHANISMS.get(mechanism.upper())
    return factory() if factory is not None else None
