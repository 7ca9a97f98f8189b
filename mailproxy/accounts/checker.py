# -*- test-case-name: tests.test_accounts -*-
"""
An account backend behind twisted.cred: each login asks the backend once,
within a time limit, unless the cache answers.

What the cache remembers is keyed by a digest (the credentials cache's
HMAC under a key of this process's own) of everything the backend is
told: the user name, the password, the protocol, the client's address
and whether it came over TLS, as well as the checker it was asked
through, so a reload (a new backend, new settings) starts afresh.  An
account is remembered for C{[auth] cache_ttl} seconds after the backend
accepted it, a refusal for C{[auth] negative_ttl} seconds; a refusal from
memory still pays the failure delay and counts.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.accounts.model import Account, AccountRefused, BackendUnavailable, LoginRequest, requestFrom
from mailproxy.credentialscache import CredentialsCache
from mailproxy.logs import loggedName

# What the cache holds for a refusal.
_REFUSED = "refused"


@implementer(ICredentialsChecker)
class AccountChecker:
    """
    Check credentials with an L{mailproxy.interfaces.IAccountBackend}; the
    avatar ID is the L{Account} it answers.

    @ivar backend: the backend asked.
    @ivar name: the backend's name, for log lines.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger(namespace="mailproxy.accounts")

    def __init__(
        self,
        backend: Any,
        name: str,
        clock: IReactorTime,
        timeout: float,
        cache: CredentialsCache | None = None,
        negativeTTL: float = 0.0,
    ) -> None:
        self.backend = backend
        self.name = name
        self._clock = clock
        self._timeout = timeout
        self._cache = cache
        self._negativeTTL = negativeTTL
        # What this checker remembers is its own: after a reload, the new
        # checker asks its backend again.
        self._generation = secrets.token_bytes(16)

    def close(self) -> None:
        """
        Close the backend (a reload replaced this checker).
        """
        try:
            closing = self.backend.close()
        except Exception:
            self.log.failure("account backend {backend} did not close", backend=self.name)
            return
        if isinstance(closing, Deferred):
            closing.addErrback(
                lambda failure: self.log.failure("account backend {backend} did not close", failure, backend=self.name)
            )

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        request = requestFrom(credentials)
        key = (
            self._generation,
            request.protocol,
            request.clientIP,
            b"tls" if request.tls else b"plain",
            request.username,
            request.password,
        )
        cache = self._cache
        if cache is not None:
            known = cache.recall(key)
            if isinstance(known, Account):
                return succeed(known)
            if known == _REFUSED:
                return fail(AccountRefused("refused again from the cache"))
        asking = maybeDeferred(self.backend.authenticate, request)
        asking.addTimeout(self._timeout, self._clock)
        asking.addCallback(self._accepted, key)
        return asking.addErrback(self._notAccepted, key, request)

    def _accepted(self, account: Any, key: tuple[str | bytes, ...]) -> Account:
        if not isinstance(account, Account):
            raise BackendUnavailable(f"account backend {self.name} answered {type(account).__name__}, not an Account")
        if self._cache is not None:
            self._cache.store(key, account)
        return account

    def _notAccepted(self, failure: Failure, key: tuple[str | bytes, ...], request: LoginRequest) -> Failure:
        if failure.check(UnauthorizedLogin):
            # AccountRefused, or twisted.cred's own from a plugin
            if self._cache is not None:
                self._cache.store(key, _REFUSED, self._negativeTTL)
            reason = getattr(failure.value, "reason", "") or str(failure.value)
            self.log.info(
                "account backend {backend} refused {user}: {reason}",
                backend=self.name,
                user=loggedName(request.username),
                reason=reason[:200],
            )
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer in {self._timeout:g} s"
        elif failure.check(BackendUnavailable):
            why = str(failure.value)
        else:
            self.log.failure("account backend {backend} failed", failure, backend=self.name)
            why = f"{type(failure.value).__name__}: {failure.value}"
        self.log.error(
            "account backend {backend} unavailable for {user}: {why}",
            backend=self.name,
            user=loggedName(request.username),
            why=why,
        )
        return Failure(BackendUnavailable(why))


def replaced(old: Any, new: Any) -> None:
    """
    C{new} checks passwords instead of C{old}: close C{old} if it holds
    anything (an account backend's connections).
    """
    if old is not new and isinstance(old, AccountChecker):
        old.close()
