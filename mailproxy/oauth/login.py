# -*- test-case-name: tests.test_oauth_tokens -*-
"""
An upstream login with an access token instead of a password: the token
comes from L{AccessTokens}, and one the upstream refuses (revoked early,
say) is refreshed and tried once more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred

from mailproxy.imap.upstream import UpstreamError
from mailproxy.oauth.sasl import Bearer
from mailproxy.oauth.settings import OAuthLogin, OAuthProvider

T = TypeVar("T")


class TokenSource(Protocol):
    """
    Where access tokens come from: L{mailproxy.oauth.tokens.AccessTokens},
    or the supervisor's, asked over a worker's channel.
    """

    def bearer(self, user: str, provider: OAuthProvider) -> Deferred[Bearer]: ...

    def forget(self, user: str, bearer: Bearer) -> None: ...


async def loginWith(
    tokens: TokenSource | None, credential: str | OAuthLogin, login: Callable[[str | Bearer], Awaitable[T]]
) -> T:
    """
    Run C{login} with C{credential}: a password as it is, an L{OAuthLogin}
    as a current access token.
    """
    if not isinstance(credential, OAuthLogin):
        return await login(credential)
    if tokens is None:
        raise UpstreamError("OAuth 2.0 login without an [oauth2] configuration", kind="oauth_unavailable")
    bearer = await tokens.bearer(credential.user, credential.provider)
    try:
        return await login(bearer)
    except UpstreamError as error:
        if not error.authenticationFailed:
            raise
        # Revoked or expired before its time: one more try, refreshed.
        tokens.forget(credential.user, bearer)
        fresh = await tokens.bearer(credential.user, credential.provider)
        if fresh == bearer:
            raise
        return await login(fresh)
