# -*- test-case-name: tests.test_oauth_tokens -*-
"""
Access tokens for upstream logins: kept in memory until shortly before
they expire, then refreshed from the user's stored grant, at most one
refresh per user at a time (the logins waiting meanwhile share it).  With
workers, the supervisor keeps them and workers ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.httpclient import connectionPool
from mailproxy.imap.upstream import OAuthRefused, OAuthUnavailable
from mailproxy.oauth.client import IssuedTokens, ProviderUnavailable, TokenError, refresh
from mailproxy.oauth.sasl import BadToken, Bearer
from mailproxy.oauth.settings import OAuthConfig, OAuthProvider
from mailproxy.oauth.store import StoredGrant, TokenStore, TokenStoreError, loadKeys
from mailproxy.workerprotocol import AccessToken, ForgetAccessToken

# Without expires_in, a token is taken to last this long (RFC 6749 leaves
# it to the documentation; Google's and Microsoft's last an hour).
DEFAULT_LIFETIME = 3600.0


# A token the upstream refuses is dropped (and so refreshed) at most this
# often per user: when refreshing does not help (a wrong user name, a
# disabled account), every login would otherwise hammer the provider.
MIN_FORCED_REFRESH = 60.0


@dataclass(frozen=True)
class _Cached:
    bearer: Bearer
    provider: str
    refreshAt: float


class AccessTokens:
    """
    Access tokens of local users, refreshed from their grants in C{store}.
    """

    log = Logger(namespace="mailproxy.oauth")

    def __init__(self, config: OAuthConfig, store: TokenStore, reactor: Any, configPath: str = "") -> None:
        self.config = config
        self.store = store
        self.reactor = reactor
        self.configPath = configPath
        self._cached: dict[str, _Cached] = {}
        self._refreshing: dict[str, list[Deferred[Bearer]]] = {}
        self._forcedAt: dict[str, float] = {}
        self.pool = connectionPool(reactor)

    @classmethod
    def fromConfig(cls, config: OAuthConfig, reactor: Any, configPath: str = "") -> AccessTokens:
        """
        @raise TokenStoreError: if the key file cannot be used.
        """
        return cls(config, TokenStore(config.tokenStore, loadKeys(config.keyFile)), reactor, configPath)

    def bearer(self, user: str, provider: OAuthProvider) -> Deferred[Bearer]:
        """
        A current access token of C{user} at C{provider}.

        @return: fails with L{OAuthRefused} if the grant is missing or
            refused, L{OAuthUnavailable} if there is no token now.
        """
        cached = self._cached.get(user)
        if cached is not None and cached.provider == provider.name and self.reactor.seconds() < cached.refreshAt:
            return succeed(cached.bearer)
        waiter: Deferred[Bearer] = Deferred()
        waiting = self._refreshing.get(user)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._refreshing[user] = [waiter]
        refreshing = Deferred.fromCoroutine(self._refresh(user, provider))
        refreshing.addBoth(self._refreshed, user)
        return waiter

    def forget(self, user: str, bearer: Bearer) -> None:
        """
        The upstream refused C{bearer}: the next login refreshes.
        """
        self.forgetToken(user, bearer.token)

    def forgetToken(self, user: str, token: str) -> None:
        cached = self._cached.get(user)
        if cached is None or cached.bearer.token != token:
            return
        now = self.reactor.seconds()
        if now - self._forcedAt.get(user, -MIN_FORCED_REFRESH) >= MIN_FORCED_REFRESH:
            self._forcedAt[user] = now
            del self._cached[user]

    def _refreshed(self, result: Bearer | Failure, user: str) -> None:
        for waiter in self._refreshing.pop(user, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _inThread(self, function: Any, *arguments: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *arguments)

    async def _refresh(self, user: str, provider: OAuthProvider) -> Bearer:
        authorize = f"mailproxy-oauth --config {self.configPath or 'CONFIG'} authorize {user} {provider.name}"
        try:
            grant: StoredGrant | None = await self._inThread(self.store.load, user)
        except TokenStoreError as error:
            self.log.error("oauth2: {error}", error=str(error))
            raise OAuthUnavailable(f"OAuth 2.0 token store: {error}") from None
        if grant is None or grant.provider != provider.name:
            self.log.warn(
                "oauth2: {user} has no grant from {provider}; to give one, run: {authorize}",
                user=user,
                provider=provider.name,
                authorize=authorize,
            )
            raise OAuthRefused(f"{user} has no OAuth 2.0 grant from {provider.name}")
        started = self.reactor.seconds()
        try:
            issued: IssuedTokens = await refresh(
                self.reactor, provider, grant.refreshToken, self.config.timeout, self.pool
            )
        except TokenError as error:
            self.log.error(
                "oauth2: {provider} refused the grant of {user} ({error}); the user must authorize again: {authorize}",
                provider=provider.name,
                user=user,
                error=str(error),
                authorize=authorize,
            )
            raise OAuthRefused(f"{provider.name} refused the OAuth 2.0 grant of {user}: {error.error}") from None
        except ProviderUnavailable as error:
            self.log.warn(
                "oauth2: cannot refresh the access token of {user} at {provider}: {error}",
                user=user,
                provider=provider.name,
                error=str(error),
            )
            raise OAuthUnavailable(f"OAuth 2.0 provider {provider.name}: {error}") from None
        try:
            bearer = Bearer(issued.accessToken, provider.mechanism)
        except BadToken as error:
            raise OAuthUnavailable(f"OAuth 2.0 provider {provider.name}: {error}") from None
        if issued.refreshToken is not None and issued.refreshToken != grant.refreshToken:
            # A rotating provider: the old refresh token no longer works.
            rotated = StoredGrant(
                provider.name, issued.refreshToken, self.reactor.seconds(), issued.scope or grant.scope
            )
            try:
                await self._inThread(self.store.save, user, rotated)
            except OSError as error:
                self.log.error(
                    "oauth2: cannot store the new refresh token of {user}: {error}; "
                    "the next refresh may need a new authorization",
                    user=user,
                    error=str(error),
                )
        lifetime = issued.expiresIn if issued.expiresIn is not None else DEFAULT_LIFETIME
        refreshAt = started + max(0.0, lifetime - self.config.refreshMargin)
        self._cached[user] = _Cached(bearer, provider.name, refreshAt)
        self.log.info(
            "oauth2: access token of {user} at {provider} refreshed, valid for {lifetime:g} s",
            user=user,
            provider=provider.name,
            lifetime=lifetime,
        )
        return bearer


class RemoteAccessTokens:
    """
    A worker's access tokens: asked of its supervisor's L{AccessTokens}
    (see L{mailproxy.workers}), so that all workers share one cache and one
    refresh per user.
    """

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def bearer(self, user: str, provider: OAuthProvider) -> Deferred[Bearer]:
        asking: Deferred[dict[str, Any]] = self.supervisor.callRemote(AccessToken, user=user, provider=provider.name)
        return asking.addCallbacks(lambda answer: Bearer(answer["token"], answer["mechanism"]), _unavailable)

    def forget(self, user: str, bearer: Bearer) -> None:
        try:
            self.supervisor.callRemote(ForgetAccessToken, user=user, token=bearer.token)
        except Exception:
            # The supervisor is gone: the worker stops anyway.
            pass


def _unavailable(failure: Failure) -> Failure:
    """
    Keep the supervisor's answers; anything else (the supervisor gone, a
    bug there) is no token now, not a traceback in the worker's log.
    """
    if failure.check(OAuthRefused, OAuthUnavailable):
        return failure
    return Failure(OAuthUnavailable(f"no access token from the supervisor: {failure.getErrorMessage()}"))


def answerAccessToken(tokens: AccessTokens | None, user: str, provider: str) -> Deferred[dict[str, Any]]:
    """
    The supervisor's answer to a worker's L{AccessToken}.
    """
    found = tokens.config.providers.get(provider) if tokens is not None else None
    if tokens is None or found is None:
        raise OAuthUnavailable(f"no OAuth 2.0 provider {provider!r} loaded (restart after adding one)")
    return tokens.bearer(user, found).addCallback(lambda bearer: {"token": bearer.token, "mechanism": bearer.mechanism})
