# -*- test-case-name: tests.test_auth -*-
"""
Local authentication: a twisted.cred checker over the hashed users file and
a realm that turns an authenticated name into an L{IProxyUser}.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailproxy.accounts.model import Account, BackendUnavailable
from mailproxy.config import Config, UpstreamConfig
from mailproxy.credentialscache import CredentialsCache
from mailproxy.interfaces import IProxyUser
from mailproxy.oauth.settings import OAuthLogin, OAuthProvider
from mailproxy.passwords import UsersFileError, hashPassword, readUsers, verifyPassword

RunInThread = Callable[[Callable[[], bool]], "Deferred[bool]"]

# Verified for unknown users so that a missing name costs the same time as a
# wrong password.
_DECOY_HASH = hashPassword("mailproxy decoy", log2N=15)


def threadRunner(reactor: IReactorThreads, pool: ThreadPool | None = None) -> RunInThread:
    """
    Run hashing in C{pool} (by default C{reactor}'s thread pool), off the
    reactor thread.
    """

    def run(work: Callable[[], bool]) -> Deferred[bool]:
        return deferToThreadPool(reactor, pool or reactor.getThreadPool(), work)

    return run


class HashPoolService(Service):
    """
    The threads that hash passwords, their own so that a login flood cannot
    take the threads (and cores) other work needs: at most C{threads}
    scrypt runs at once (32 MiB and about 0.1 s of CPU each).
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="mailproxy-hash")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Any:
        self.pool.stop()
        return super().stopService()


def inlineRunner(work: Callable[[], bool]) -> Deferred[bool]:
    """
    Run hashing inline: for tests only.
    """
    return succeed(work())


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """
    Check user names and passwords against a users file of scrypt hashes.

    The file is read again whenever its modification time changes, so
    C{python -m mailproxy.passwd} takes effect without a restart.

    @ivar cache: the verified credentials a login may succeed from without
        the slow hash, if any; shared by every checker of the process, so a
        reload does not empty it.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, path: str, runInThread: RunInThread, cache: CredentialsCache | None = None) -> None:
        self._path = path
        self._runInThread = runInThread
        self.cache = cache
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        """
        Read the users file if it changed.

        @raise UsersFileError: if it cannot be read.
        """
        status = os.stat(self._path)
        # The inode changes on every atomic rewrite (mailproxy.passwd renames
        # a new file into place), even when size and mtime tick do not.
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if stamp != self._stamp:
            self._users = readUsers(self._path)
            self._stamp = stamp

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[Any]:
        try:
            self.reload()
        except (OSError, UsersFileError) as error:
            # Keep serving with the users we had; an admin mid-edit must not
            # lock everybody out.
            self.log.error("users file {path} not reloaded: {error}", path=self._path, error=str(error))
        rawName: bytes | str = credentials.username
        username = rawName.decode("utf-8", "replace") if isinstance(rawName, bytes) else rawName
        rawPassword: bytes | str = credentials.password
        password = rawPassword.encode("utf-8") if isinstance(rawPassword, str) else rawPassword
        encoded = self._users.get(username)
        cache = self.cache
        # Checked against the hash stored now: a changed entry never matches.
        if encoded is not None and cache is not None and cache.knows(username, password, encoded):
            return succeed(username)

        def check() -> bool:
            return verifyPassword(password, encoded or _DECOY_HASH) and encoded is not None

        def decide(ok: bool) -> str:
            if not ok:
                # Failures are never remembered: each pays the full check.
                raise UnauthorizedLogin()
            if cache is not None and encoded is not None:
                cache.remember(username, password, encoded)
            return username

        return self._runInThread(check).addCallback(decide)


@implementer(IProxyUser)
class ProxyUser:
    """
    An authenticated user and the upstream their session goes to.
    """

    def __init__(
        self,
        username: str,
        upstream: UpstreamConfig,
        upstreamUsername: str,
        upstreamPassword: str | None,
        oauth2: OAuthProvider | None = None,
        filters: tuple[str, ...] | None = None,
    ) -> None:
        self.username = username
        self.upstream = upstream
        self.upstreamUsername = upstreamUsername
        self.upstreamPassword = upstreamPassword
        self.oauth2 = oauth2
        self.filters = filters

    def upstreamCredential(self, clientPassword: bytes) -> str | OAuthLogin:
        """
        What the upstream login uses: an access token from the user's
        provider, the route's password, or the client's own (passthrough).
        """
        if self.oauth2 is not None:
            return OAuthLogin(self.username, self.oauth2)
        # surrogateescape: a passthrough password that was not UTF-8 goes
        # back out as the very octets the client sent.  (An empty password
        # is one: an account backend may answer it, as nginx's passes it on.)
        if self.upstreamPassword is not None:
            return self.upstreamPassword
        return clientPassword.decode("utf-8", "surrogateescape")


class NoRoute(UnauthorizedLogin):
    """
    The user authenticated but the configuration routes them nowhere.
    """


@implementer(IRealm)
class ProxyRealm:
    """
    Map local users to their upstream routes.
    """

    def __init__(self, config: Config) -> None:
        self._config = config

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> tuple[Any, ProxyUser, Callable[[], None]]:
        if IProxyUser not in interfaces:
            raise NotImplementedError("mailproxy only offers IProxyUser avatars")
        if isinstance(avatarId, Account):
            return IProxyUser, self._accountUser(avatarId), lambda: None
        route = self._config.routeFor(avatarId)
        if route is None:
            raise NoRoute(f"no upstream route for {avatarId!r}")
        provider = None
        if route.oauth2 is not None:
            oauth2 = self._config.oauth2
            provider = oauth2.providers.get(route.oauth2) if oauth2 is not None else None
            if provider is None:
                # Added by a reload: [oauth2] is bound at start-up.
                raise NoRoute(f"OAuth 2.0 provider {route.oauth2!r} of {avatarId!r} is not loaded; restart the proxy")
        upstream = self._config.upstreams[route.upstream]
        user = ProxyUser(avatarId, upstream, route.username or avatarId, route.password, provider)
        return IProxyUser, user, lambda: None

    def _accountUser(self, account: Account) -> ProxyUser:
        """
        The user an account backend vouched for: what the backend said,
        the configuration's routing for what it left out.

        @raise BackendUnavailable: if the account names an upstream or a
            filter this configuration lacks (a reload since it was
            remembered): no verdict on the password, so no failure.
        """
        config = self._config
        route = config.routeFor(account.name)
        upstreamName = account.upstream or (route.upstream if route is not None else None)
        if upstreamName is None:
            raise NoRoute(f"no upstream route for {account.name!r} (the account backend named none)")
        upstream = config.upstreams.get(upstreamName)
        if upstream is None:
            raise BackendUnavailable(f"the account of {account.name!r} names no [upstream.{upstreamName}]")
        missing = [name for name in account.filters or () if name not in config.filters]
        if missing:
            raise BackendUnavailable(f"the account of {account.name!r} names no [filters.{missing[0]}]")
        if account.server is not None:
            # The certificate is still checked against the upstream's name.
            upstream = dataclasses.replace(
                upstream, host=account.server, port=account.port or upstream.port, serverName=upstream.verifyName
            )
        # A route's upstream password and OAuth login are for its own upstream.
        ownRoute = route if route is not None and route.upstream == upstreamName else None
        password = account.password
        if password is None and ownRoute is not None:
            password = ownRoute.password
        provider = None
        if account.password is None and ownRoute is not None and ownRoute.oauth2 is not None:
            provider = config.oauth2.providers.get(ownRoute.oauth2) if config.oauth2 is not None else None
        username = account.username or (ownRoute.username if ownRoute is not None else None) or account.name
        return ProxyUser(account.name, upstream, username, password, provider, account.filters)


def makePortal(config: Config, runInThread: RunInThread, cache: CredentialsCache | None = None) -> Portal:
    """
    Build the portal every front end logs users in through, its checker
    remembering verified credentials in C{cache} if given.
    """
    return Portal(ProxyRealm(config), [UsersFileChecker(config.usersFile, runInThread, cache)])
