# -*- test-case-name: tests.test_shared_limits -*-
"""
One set of limits, lockouts and verified credentials for every worker
process (C{server.workers}): the supervisor keeps them, workers ask it.

L{SharedLimits} is what a worker's connections see in place of a
L{Limits}: the same calls, answered over AMP (see
L{mailproxy.workerprotocol}), so a per-address limit is per address and a
lockout holds whichever worker the next guess reaches.

A login is one round trip: the worker sends the name and password with
the attempt, and the supervisor checks the password (users file,
credentials cache, hashing threads) as soon as the attempt's turn comes,
settles the attempt, and answers with the turn, the verdict and the delay.
So a login turn is held for the check alone, not for messages to and fro.

L{LimitsResponder} answers one worker in the supervisor, and gives back
what that worker held (connections, sessions, queued attempts) when it
dies.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailproxy.accounts.model import Account, AccountRefused, BackendUnavailable, LoginCredentials
from mailproxy.limits import MAX_USER_KEY, Limits, LoginAttempt, Turn
from mailproxy.workerprotocol import AbandonLogin, Admit, BeginLogin, EndSession, LoginFailed, Release, StartSession

# What a worker says when the supervisor cannot answer (it is going away).
UNAVAILABLE = "service unavailable"
# Longer user names and passwords are refused without a check: no real
# account has one, and AMP carries at most 64 KiB a value.
MAX_CHECKED = 16384


class SharedLimits:
    """
    A worker's view of the supervisor's L{Limits}: the calls a L{Gate}
    makes, each answered by the supervisor (C{admit} and C{startSession}
    return L{Deferred}s).
    """

    def __init__(self, supervisor: amp.AMP, failureDelay: float) -> None:
        self.log = Logger(namespace="mailproxy.auth")
        self.supervisor = supervisor
        self.failureDelay = failureDelay
        self._attempts = 0

    def admit(self, network: str) -> Deferred[str | None]:
        asking: Deferred[dict[str, Any]] = self.supervisor.callRemote(Admit, network=network)
        return asking.addCallbacks(lambda answer: answer.get("refusal"), lambda failure: UNAVAILABLE)

    def release(self, network: str) -> None:
        self._tell(Release, network=network)

    def startSession(self, user: str) -> Deferred[bool]:
        asking: Deferred[dict[str, Any]] = self.supervisor.callRemote(StartSession, user=user)
        return asking.addCallbacks(lambda answer: bool(answer["started"]), lambda failure: False)

    def endSession(self, user: str) -> None:
        self._tell(EndSession, user=user)

    def beginLogin(
        self,
        network: str,
        user: str,
        protocol: str,
        password: bytes,
        client: str = "",
        tls: bool = False,
        number: int = 1,
    ) -> RemoteAttempt:
        self._attempts += 1
        return RemoteAttempt(self, self._attempts, network, user, protocol, password, client, tls, number)

    def _tell(self, command: type[amp.Command], **arguments: Any) -> None:
        try:
            self.supervisor.callRemote(command, **arguments)
        except Exception:
            # The supervisor is gone, and this worker with it soon.
            pass


class RemoteAttempt:
    """
    A login attempt the supervisor queues, checks and settles (see
    L{LoginAttempt} for the rules).

    @ivar turn: fires with a L{Turn} when the supervisor gives one; after
        a C{CHECK} turn, L{avatar} holds the verdict.
    @ivar avatar: the checked user's avatar ID, or C{None} if the password
        was wrong.
    @ivar session: after a right password, whether the user's session was
        counted (see L{takeSession}).
    @ivar delay: how long to wait before answering a refusal.
    """

    def __init__(
        self,
        limits: SharedLimits,
        number: int,
        network: str,
        user: str,
        protocol: str,
        password: bytes,
        client: str = "",
        tls: bool = False,
        loginAttempt: int = 1,
    ) -> None:
        self.limits = limits
        self.number = number
        self.network = network
        self.user = user[:MAX_USER_KEY]
        self.protocol = protocol
        self.delay = limits.failureDelay
        self.avatar: str | None = None
        self.account: str | None = None
        self.backendUnavailable = False
        self.session: bool | None = None
        self.turn: Deferred[Turn] = Deferred()
        checkable = len(user.encode("utf-8")) <= MAX_CHECKED and len(password) <= MAX_CHECKED
        self.checkedUser = user if checkable else self.user
        asking: Deferred[dict[str, Any]] = limits.supervisor.callRemote(
            BeginLogin,
            attempt=number,
            network=network,
            user=self.checkedUser,
            protocol=protocol,
            password=password if checkable else None,
            client=client,
            tls=tls,
            loginAttempt=loginAttempt,
        )
        asking.addCallbacks(self._given, self._unanswered)

    def _given(self, answer: dict[str, Any]) -> None:
        self.delay = float(answer["delay"])
        self.avatar = answer.get("avatar")
        self.account = answer.get("account")
        self.backendUnavailable = bool(answer.get("unavailable"))
        self.session = answer.get("session")
        self.turn.callback(Turn[answer["turn"]])

    def takeSession(self) -> bool | None:
        """
        Whether the supervisor counted the user's session with the check
        (C{None} if it did not decide); asked once.
        """
        session, self.session = self.session, None
        return session

    def _unanswered(self, failure: Failure) -> None:
        self.turn.callback(Turn.BUSY)

    def verdict(self) -> Deferred[Any]:
        """
        The avatar ID the check gave (an L{Account} when an account backend
        vouched for the user), or L{UnauthorizedLogin}, or
        L{BackendUnavailable}.
        """
        if self.backendUnavailable:
            return fail(BackendUnavailable("the account backend is unavailable"))
        if self.avatar is None:
            return fail(UnauthorizedLogin())
        if self.account is not None:
            return succeed(Account.fromJSON(self.account))
        return succeed(self.avatar)

    def succeeded(self) -> None:
        """
        Settled by the supervisor when the password checked.
        """

    def unavailable(self) -> float:
        """
        Settled by the supervisor, which holds the turn: its delay.
        """
        return self.delay

    def failed(self) -> Deferred[float]:
        """
        The delay before saying so: the supervisor's, for a wrong password;
        counted afresh when a checked login fails later (its upstream
        refused the password, or it has no route).
        """
        if self.avatar is None:
            return succeed(self.delay)
        asking: Deferred[dict[str, Any]] = self.limits.supervisor.callRemote(
            LoginFailed, network=self.network, user=self.user, protocol=self.protocol
        )
        return asking.addCallbacks(lambda answer: float(answer["delay"]), lambda failure: self.delay)

    def abandon(self) -> None:
        """
        The client left: an attempt still waiting leaves the queue (one
        being checked is settled anyway).
        """
        if not self.turn.called:
            self.limits._tell(AbandonLogin, attempt=self.number)

    def withdraw(self) -> None:
        """
        The client left as its turn came: the supervisor has settled it;
        a session it counted is given back.
        """
        self.giveBackSession()

    def giveBackSession(self) -> None:
        """
        End the session the supervisor counted with the check, if nobody
        took it (the connection ended first).
        """
        if self.takeSession():
            # Under the name the supervisor counted it: the account's (a backend may spell it otherwise).
            self.limits.endSession(self.avatar if self.avatar is not None else self.checkedUser)


class LimitsResponder(amp.CommandLocator):
    """
    The supervisor's answers to one worker, and what that worker holds, to
    give back if it dies (L{workerGone}).

    @ivar checker: the users-file checker in use (a reload replaces it).
    """

    log = Logger(namespace="mailproxy.auth")

    def __init__(self, limits: Limits, checker: Any) -> None:
        super().__init__()
        self.limits = limits
        self.checker = checker
        self._connections: dict[str, int] = defaultdict(int)
        self._sessions: dict[str, int] = defaultdict(int)
        self._waiting: dict[int, tuple[LoginAttempt, Deferred[dict[str, Any]]]] = {}

    @Admit.responder
    def admit(self, network: str) -> dict[str, Any]:
        refusal = self.limits.admit(network)
        if refusal is None:
            self._connections[network] += 1
        return {"refusal": refusal}

    @Release.responder
    def release(self, network: str) -> dict[str, Any]:
        if _take(self._connections, network):
            self.limits.release(network)
        return {}

    @StartSession.responder
    def startSession(self, user: str) -> dict[str, Any]:
        started = self.limits.startSession(user)
        if started:
            self._sessions[user] += 1
        return {"started": started}

    @EndSession.responder
    def endSession(self, user: str) -> dict[str, Any]:
        if _take(self._sessions, user):
            self.limits.endSession(user)
        return {}

    @BeginLogin.responder
    def beginLogin(
        self,
        attempt: int,
        network: str,
        user: str,
        protocol: str,
        password: bytes | None,
        client: str | None = None,
        tls: bool | None = None,
        loginAttempt: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        queued = self.limits.beginLogin(network, user, protocol)
        answer: Deferred[dict[str, Any]] = Deferred()
        self._waiting[attempt] = (queued, answer)

        def given(turn: Turn) -> None:
            self._waiting.pop(attempt, None)
            if answer.called:
                # Abandoned while it waited.
                return
            if turn is not Turn.CHECK:
                answer.callback({"turn": turn.name, "delay": queued.delay})
                return
            self._check(queued, user, password, client or network, bool(tls), loginAttempt or 1).addCallback(
                answer.callback
            )

        queued.turn.addCallback(given)
        return answer

    def _check(
        self, queued: LoginAttempt, user: str, password: bytes | None, client: str, tls: bool, number: int
    ) -> Deferred[dict[str, Any]]:
        """
        Check the password, settle the attempt, and say how.
        """
        if password is None:
            checking: Deferred[Any] = fail(UnauthorizedLogin())
        else:
            credentials = LoginCredentials(user.encode("utf-8"), password, queued.protocol, client, tls, number)
            checking = self.checker.requestAvatarId(credentials)

        def checked(avatar: Any) -> dict[str, Any]:
            queued.succeeded()
            # The session is counted now too: one round trip less a login.
            session = self.startSession(str(avatar))["started"]
            answer = {"turn": Turn.CHECK.name, "delay": queued.delay, "avatar": str(avatar), "session": session}
            if isinstance(avatar, Account):
                answer["account"] = avatar.toJSON()
            return answer

        def refused(failure: Failure) -> dict[str, Any]:
            if failure.check(BackendUnavailable):
                # No verdict: not counted against the user or the address.
                return {"turn": Turn.CHECK.name, "delay": queued.unavailable(), "unavailable": True}
            if failure.check(UnauthorizedLogin) is None:
                self.log.failure("password check failed unexpectedly", failure)
            delay = queued.failed()
            if failure.check(AccountRefused):
                delay = max(delay, failure.value.wait)
            return {"turn": Turn.CHECK.name, "delay": delay}

        return checking.addCallbacks(checked, refused)

    @LoginFailed.responder
    def loginFailed(self, network: str, user: str, protocol: str) -> dict[str, Any]:
        # Failed after its password checked: counted afresh, as a single
        # process does.
        attempt = LoginAttempt(self.limits, network, user, protocol, self.limits.isKnown(network, user))
        return {"delay": attempt.failed()}

    @AbandonLogin.responder
    def abandonLogin(self, attempt: int) -> dict[str, Any]:
        waiting = self._waiting.pop(attempt, None)
        if waiting is not None:
            queued, answer = waiting
            queued.abandon()
            if not answer.called:
                # Nobody waits for this turn any more.
                answer.callback({"turn": Turn.BUSY.name, "delay": 0.0})
        return {}

    def workerGone(self) -> None:
        """
        The worker died: its connections, sessions and queued attempts are
        given back (checks already running end as they would).
        """
        for network, count in self._connections.items():
            for _ in range(count):
                self.limits.release(network)
        for user, count in self._sessions.items():
            for _ in range(count):
                self.limits.endSession(user)
        self._connections.clear()
        self._sessions.clear()
        for attempt in list(self._waiting):
            self.abandonLogin(attempt)


def _take(counts: dict[str, int], key: str) -> bool:
    """
    Count one C{key} down; C{False} if there was none.
    """
    if counts.get(key, 0) <= 0:
        return False
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
    return True
