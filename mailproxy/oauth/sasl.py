# -*- test-case-name: tests.test_oauth_sasl -*-
"""
The SASL messages of an OAuth 2.0 login: C{XOAUTH2} (Google's, also
Microsoft's and Dovecot's) and C{OAUTHBEARER} (RFC 7628), and the reply to
the error challenge a server sends for a token it refuses.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

# RFC 6750 b64token: what a bearer token may hold.  Anything else (a
# control character from a broken provider, say) would end the SASL
# message early.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class BadToken(ValueError):
    """
    The provider gave an access token that is not an RFC 6750 b64token.
    """


@dataclass(frozen=True)
class Bearer:
    """
    An access token to log in upstream with, and how.

    @ivar mechanism: C{"xoauth2"} or C{"oauthbearer"}.
    """

    token: str
    mechanism: str

    def __post_init__(self) -> None:
        if not _B64TOKEN.fullmatch(self.token):
            raise BadToken("the access token is not an RFC 6750 b64token")

    def __repr__(self) -> str:
        # Never the token: reprs reach logs and tracebacks.
        return f"Bearer(mechanism={self.mechanism!r})"

    def initialResponse(self, username: str, host: str, port: int) -> bytes:
        """
        The client's first SASL message, base64-encoded.

        @raise BadToken: if C{username} holds a control character, which
            would end a field of the message early.
        """
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in username):
            raise BadToken("the upstream user name holds a control character")
        user = username.encode("utf-8")
        if self.mechanism == "oauthbearer":
            # RFC 5801 saslname: "," and "=" escaped in the authzid.
            name = user.replace(b"=", b"=3D").replace(b",", b"=2C")
            message = b"n,a=" + name + b",\x01host=" + host.encode("idna") + b"\x01port=%d" % port
            message += b"\x01auth=Bearer " + self.token.encode("ascii") + b"\x01\x01"
        else:
            message = b"user=" + user + b"\x01auth=Bearer " + self.token.encode("ascii") + b"\x01\x01"
        return base64.b64encode(message)

    @property
    def errorAcknowledgement(self) -> bytes:
        """
        The reply to a server's error challenge, base64-encoded: empty for
        XOAUTH2, a lone %x01 for OAUTHBEARER (RFC 7628 section 3.2.3); the
        server then fails the exchange.
        """
        return b"" if self.mechanism == "xoauth2" else base64.b64encode(b"\x01")


def challengeStatus(challenge: bytes) -> str:
    """
    What a server's error challenge (base64 JSON) says, for the log:
    C{status} and C{scope}, or the raw text if it is not that.
    """
    try:
        document = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (ValueError, TypeError, RecursionError):
        return challenge.strip()[:100].decode("ascii", "replace")
    if not isinstance(document, dict):
        return str(document)[:100]
    fields = [f"{key}={document[key]}" for key in ("status", "scope") if key in document]
    return " ".join(fields)[:200]
