# -*- test-case-name: tests.test_oauth_tokens -*-
"""
The proxy's requests to an OAuth 2.0 token endpoint (RFC 6749 section
3.2), with treq: the refresh grant (section 6) here, and the grants
C{mailproxy-oauth authorize} uses (L{mailproxy.oauth.authorize}).

Client authentication is C{client_secret_post} (the credentials in the
form): both Google and Microsoft document it for their token endpoints, and
a public client (no secret) sends its C{client_id} the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.web.client import HTTPConnectionPool

from mailproxy.httpclient import HTTPUnavailable, exchange
from mailproxy.oauth.settings import OAuthProvider

# A token endpoint's answer is a small JSON object; more is not one.
MAX_RESPONSE = 64 * 1024
# Access tokens last an hour at the big providers; a longer claim is capped.
MAX_LIFETIME = 86400.0


class ProviderUnavailable(HTTPUnavailable):
    """
    The token endpoint could not be asked, or answered with no usable
    reply (a timeout, a refused connection, a 5xx, not JSON).
    """


class TokenError(Exception):
    """
    The token endpoint refused the request: RFC 6749 section 5.2's
    C{error} (C{invalid_grant} for a revoked or expired refresh token) and
    its C{error_description}.
    """

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class IssuedTokens:
    """
    A token endpoint's successful answer (RFC 6749 section 5.1).

    @ivar refreshToken: a new refresh token if the provider rotates them.
    """

    accessToken: str
    expiresIn: float | None
    refreshToken: str | None = None
    scope: str = ""

    def __repr__(self) -> str:
        return f"IssuedTokens(expiresIn={self.expiresIn!r}, rotated={self.refreshToken is not None})"


def clientFields(provider: OAuthProvider) -> dict[str, str]:
    fields = {"client_id": provider.clientId}
    if provider.clientSecret:
        fields["client_secret"] = provider.clientSecret
    return fields


async def postForm(
    reactor: Any, url: str, fields: dict[str, str], timeout: float, pool: HTTPConnectionPool | None = None
) -> tuple[int, dict[str, Any]]:
    """
    POST C{fields} as a form; the status and the JSON object answered.

    @raise ProviderUnavailable: if there is no such answer in C{timeout} s.
    """
    answer = await exchange(
        reactor,
        "POST",
        url,
        data=fields,
        headers={b"Accept": [b"application/json"]},
        timeout=timeout,
        maxBody=MAX_RESPONSE,
        pool=pool,
        unavailable=ProviderUnavailable,
    )
    try:
        document = json.loads(answer.body)
    except (ValueError, RecursionError):
        raise ProviderUnavailable(f"{url}: HTTP {answer.code}, not JSON") from None
    if not isinstance(document, dict):
        raise ProviderUnavailable(f"{url}: HTTP {answer.code}, not a JSON object")
    return answer.code, document


async def tokenRequest(
    reactor: Any,
    provider: OAuthProvider,
    fields: dict[str, str],
    timeout: float,
    pool: HTTPConnectionPool | None = None,
) -> IssuedTokens:
    """
    Ask C{provider}'s token endpoint for tokens with C{fields} (the grant).

    @raise TokenError: if it refuses (HTTP 400 or 401 with an C{error}).
    @raise ProviderUnavailable: if it cannot be asked or answers nonsense.
    """
    code, document = await postForm(
        reactor, provider.tokenEndpoint, {**fields, **clientFields(provider)}, timeout, pool
    )
    if code in (400, 401) and isinstance(document.get("error"), str):
        raise TokenError(document["error"], str(document.get("error_description", ""))[:300])
    if code != 200:
        raise ProviderUnavailable(f"{provider.tokenEndpoint}: HTTP {code}")
    accessToken = document.get("access_token")
    if not isinstance(accessToken, str) or not accessToken:
        raise ProviderUnavailable(f"{provider.tokenEndpoint}: no access_token in the answer")
    refreshToken = document.get("refresh_token")
    return IssuedTokens(
        accessToken=accessToken,
        expiresIn=_lifetime(document.get("expires_in")),
        refreshToken=refreshToken if isinstance(refreshToken, str) and refreshToken else None,
        scope=str(document.get("scope", "")),
    )


def _lifetime(value: Any) -> float | None:
    """
    C{expires_in} as seconds from 0 to a day; C{None} if it is not a number.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        seconds = MAX_LIFETIME
    return min(max(seconds, 0.0), MAX_LIFETIME) if seconds == seconds else None


async def refresh(
    reactor: Any, provider: OAuthProvider, refreshToken: str, timeout: float, pool: HTTPConnectionPool | None = None
) -> IssuedTokens:
    """
    A new access token for C{refreshToken} (RFC 6749 section 6).
    """
    fields = {"grant_type": "refresh_token", "refresh_token": refreshToken}
    if provider.scopes:
        # Microsoft's identity platform requires the scopes again (RFC 6749 section 6 allows them).
        fields["scope"] = " ".join(provider.scopes)
    return await tokenRequest(reactor, provider, fields, timeout, pool)
