# -*- test-case-name: tests.test_limits -*-
"""
Connection limits and login throttling, shared by every listener of one
proxy process.

Clients are counted by network: an IPv4 address, or an IPv6 /64 (what one
subscriber usually gets, so a guesser cannot spread over its own range).

Logins take turns (L{LoginAttempt}): at most one password check in flight
per client network and per user name, later attempts queue behind it, and a
failed check keeps its turn until its reply delay is over, so guesses sent
in parallel cost as much time as guesses sent one after the other.  Whether
an attempt is locked out is decided when its turn comes, before any check.
A user logging in from a network they logged in from before takes no turn.

Failures are counted per network and per user name within a window; each
further failure doubles the reply delay (from C{auth.failure_delay},
capped), and past a threshold the network or the user is locked out for a
while.  A user's lockout does not apply to networks the user logged in from
successfully within C{limits.known_network_seconds}: anybody can make a
user's account refuse strangers, but not the owner's own devices.  Every
failure and refusal is one fail2ban-friendly line, the client-chosen user
name after the address, percent-encoded (L{mailproxy.logs.loggedName})::

    authentication failure: ip=203.0.113.7 protocol=imap user=alice failures=3
    authentication refused: ip=203.0.113.7 protocol=imap user=alice reason=address-locked-out

The reason is C{address-locked-out} (the client's network is locked out),
C{user-locked-out} (the name is, for networks it is not known from: maybe
the owner's new device, so not for fail2ban to count) or C{busy}.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailproxy.logs import loggedName

if TYPE_CHECKING:
    from mailproxy.sharedlimits import RemoteAttempt, SharedLimits

MAX_DELAY = 30.0
# Attempts that may wait for their turn, per network or user and in all;
# more are refused at once ("try again later").
MAX_WAITING_PER_KEY = 128
MAX_WAITING = 4096
# Networks remembered per user (the most recent; only a successful login
# adds one, so one account cannot push out another's) and counted keys,
# oldest forgotten first: a flood of made-up user names costs bounded memory.
MAX_KNOWN_NETWORKS_PER_USER = 32
MAX_COUNTED_KEYS = 100_000
# User names are counted by their first characters (longer ones are not
# real users, and must not cost memory).
MAX_USER_KEY = 256


@dataclass(frozen=True)
class LimitsConfig:
    maxConnections: int = 10000
    maxConnectionsPerIP: int = 100
    maxSessionsPerUser: int = 100
    failureWindow: float = 900.0
    failuresBeforeLockout: int = 10
    lockoutSeconds: float = 900.0
    maxLineLength: int = 65536
    maxPreauthLiteral: int = 16384
    knownNetworkSeconds: float = 30 * 86400.0


class Turn(enum.Enum):
    """
    What a login attempt may do when its turn comes.
    """

    CHECK = "check the password"
    LOCKED_OUT = "locked out: refuse without checking"
    BUSY = "too many attempts waiting: refuse at once"


@functools.lru_cache(maxsize=4096)
def networkOf(host: str) -> str:
    """
    The network a client at C{host} is counted by: the IPv4 address (also
    when mapped into IPv6), or the IPv6 /64.

    (Remembered for the last few thousand hosts: parsing an address is a
    tenth of what the limits cost a connection, and clients come back.)
    """
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if address.is_loopback:
        # ::1 is this machine (webmail, a local client), not a /64.
        return str(address)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Limits:
    """
    The counters of one proxy process.

    @param maxChecks: password checks in flight at once (the hashing
        threads' queue); further attempts wait for their turn.
    """

    def __init__(self, config: LimitsConfig, clock: IReactorTime, failureDelay: float, maxChecks: int = 64) -> None:
        # An instance attribute: a Logger on the class would take the
        # class's name as its namespace, which fail2ban filters match.
        self.log = Logger(namespace="mailproxy.auth")
        self.config = config
        self.clock = clock
        self.failureDelay = failureDelay
        self.maxChecks = maxChecks
        self.connections = 0
        self.checks = 0
        self._perIP: dict[str, int] = defaultdict(int)
        self._perUser: dict[str, int] = defaultdict(int)
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lockedUntil: dict[str, float] = {}
        self._known: dict[str, OrderedDict[str, float]] = {}
        self._waiting: deque[LoginAttempt] = deque()
        self._waitingPerKey: dict[str, int] = defaultdict(int)
        self._turnHeld: set[str] = set()
        self._checking = 0
        self._giving = False
        self._giveAgain = False

    # -- connections -------------------------------------------------------------

    def admit(self, network: str) -> str | None:
        """
        Count a new connection from C{network}; return why it is refused, or
        C{None} (then L{release} it when it ends).
        """
        if self.connections >= self.config.maxConnections:
            return "too many connections"
        if self._perIP[network] >= self.config.maxConnectionsPerIP:
            return "too many connections from your address"
        self.connections += 1
        self._perIP[network] += 1
        return None

    def release(self, network: str) -> None:
        self.connections -= 1
        self._perIP[network] -= 1
        if not self._perIP[network]:
            del self._perIP[network]

    def startSession(self, user: str) -> bool:
        """
        Count a logged-in session of C{user}; C{False} if over the limit.
        """
        if self._perUser[user] >= self.config.maxSessionsPerUser:
            return False
        self._perUser[user] += 1
        return True

    def endSession(self, user: str) -> None:
        self._perUser[user] -= 1
        if not self._perUser[user]:
            del self._perUser[user]

    # -- logins --------------------------------------------------------------------

    def beginLogin(self, network: str, user: str, protocol: str) -> LoginAttempt:
        """
        Queue a login attempt; its C{turn} fires when it may go on.
        """
        attempt = LoginAttempt(self, network, user, protocol, self.isKnown(network, user))
        # Known networks are never refused for the strangers in the queue.
        crowded = len(self._waiting) >= MAX_WAITING and not attempt.known
        if crowded or any(self._waitingPerKey.get(key, 0) >= MAX_WAITING_PER_KEY for key in attempt.keys):
            attempt.refuse("busy")
            attempt.turn.callback(Turn.BUSY)
            return attempt
        self._waiting.append(attempt)
        for key in attempt.keys:
            self._waitingPerKey[key] += 1
        self._giveTurns()
        return attempt

    def isKnown(self, network: str, user: str) -> bool:
        """
        C{True} if C{user} logged in from C{network} recently.
        """
        networks = self._known.get(user[:MAX_USER_KEY])
        until = networks.get(network) if networks is not None else None
        return until is not None and until > self.clock.seconds()

    def lockedOut(self, network: str, user: str, known: bool = False) -> bool:
        """
        C{True} while C{network}, or (for a network C{user} is not known
        from) C{user}, is locked out.
        """
        return self._lockout(network, user, known) is not None

    def _lockout(self, network: str, user: str, known: bool) -> str | None:
        now = self.clock.seconds()
        if self._lockedUntil.get(_networkKey(network), 0.0) > now:
            return "address-locked-out"
        if not known and self._lockedUntil.get(_userKey(user), 0.0) > now:
            return "user-locked-out"
        return None

    def _giveTurns(self) -> None:
        """
        Give every attempt whose keys are free its turn.  Turns fire
        synchronously and may free keys again (a departed client's turn is
        withdrawn at once): that asks for another round of this loop
        rather than a nested call, so a long queue never deepens the stack.
        """
        if self._giving:
            self._giveAgain = True
            return
        self._giving = True
        try:
            self._giveAgain = True
            while self._giveAgain:
                self._giveAgain = False
                for attempt, turn in self._pickTurns():
                    attempt.turn.callback(turn)
        finally:
            self._giving = False

    def _pickTurns(self) -> list[tuple[LoginAttempt, Turn]]:
        ready: list[tuple[LoginAttempt, Turn]] = []
        if self._checking >= self.maxChecks or not self._waiting:
            # The common case in a flood: no need to look at the queue.
            return ready
        # Users on networks they logged in from go first: a flood of
        # strangers' attempts must not keep the owners waiting.
        waiting = sorted(self._waiting, key=lambda attempt: not attempt.known)
        for attempt in waiting:
            if self._checking >= self.maxChecks:
                break
            if any(key in self._turnHeld for key in attempt.keys):
                continue
            self._unqueue(attempt)
            lockout = self._lockout(attempt.network, attempt.user, attempt.known)
            if lockout is not None:
                attempt.refuse(lockout)
                ready.append((attempt, Turn.LOCKED_OUT))
                continue
            self._checking += 1
            self.checks += 1
            self._turnHeld.update(attempt.keys)
            attempt.checking = True
            # Counted now, before the check: what decides the next attempt
            # must not wait for this one's hash.
            for key in attempt.countedKeys:
                self._count(key, attempt.started)
            ready.append((attempt, Turn.CHECK))
        return ready

    def _unqueue(self, attempt: LoginAttempt) -> None:
        self._waiting.remove(attempt)
        for key in attempt.keys:
            self._waitingPerKey[key] -= 1
            if not self._waitingPerKey[key]:
                del self._waitingPerKey[key]

    def _count(self, key: str, moment: float) -> int:
        recent = [when for when in self._failures.pop(key, []) if moment - when < self.config.failureWindow]
        recent.append(moment)
        self._failures[key] = recent
        while len(self._failures) > MAX_COUNTED_KEYS:
            self._failures.popitem(last=False)
        return len(recent)

    def _uncount(self, key: str, moment: float) -> None:
        recent = self._failures.get(key)
        if recent is not None and moment in recent:
            recent.remove(moment)
            if not recent:
                del self._failures[key]

    def _recent(self, key: str) -> int:
        now = self.clock.seconds()
        return sum(1 for when in self._failures.get(key, ()) if now - when < self.config.failureWindow)

    def _checked(self, attempt: LoginAttempt) -> None:
        self._checking -= 1
        # A check slot is free (the attempt's keys may stay held).
        self._giveTurns()

    def _releaseTurn(self, attempt: LoginAttempt) -> None:
        self._turnHeld.difference_update(attempt.keys)
        self._giveTurns()

    def _remember(self, network: str, user: str) -> None:
        networks = self._known.setdefault(user, OrderedDict())
        networks.pop(network, None)
        networks[network] = self.clock.seconds() + self.config.knownNetworkSeconds
        while len(networks) > MAX_KNOWN_NETWORKS_PER_USER:
            networks.popitem(last=False)

    def _lockIfDue(self, key: str, count: int) -> None:
        now = self.clock.seconds()
        if count >= self.config.failuresBeforeLockout and self._lockedUntil.get(key, 0.0) <= now:
            self._lockedUntil[key] = now + self.config.lockoutSeconds
            self.log.warn(
                "authentication lockout: {what} for {seconds:.0f} s after {count} failures",
                what=_shown(key),
                seconds=self.config.lockoutSeconds,
                count=count,
            )

    def delayFor(self, count: int) -> float:
        """
        How long to wait before answering the C{count}th failure.
        """
        return min(MAX_DELAY, self.failureDelay * 2 ** (max(count, 1) - 1))

    def prune(self) -> None:
        """
        Forget expired failures, lockouts and known networks (call now and
        then).
        """
        now = self.clock.seconds()
        for key in list(self._failures):
            recent = [moment for moment in self._failures[key] if now - moment < self.config.failureWindow]
            if recent:
                self._failures[key] = recent
            else:
                del self._failures[key]
        for key in [key for key, until in self._lockedUntil.items() if until <= now]:
            del self._lockedUntil[key]
        for user in list(self._known):
            networks = self._known[user]
            for network in [network for network, until in networks.items() if until <= now]:
                del networks[network]
            if not networks:
                del self._known[user]


class LoginAttempt:
    """
    One login's turn at the password check (see L{Limits.beginLogin}).

    After a C{CHECK} turn the server calls L{succeeded} or L{failed}; after
    C{LOCKED_OUT} or C{BUSY} it only answers (after L{delay}).  A client
    that leaves while waiting calls L{abandon}.

    @ivar turn: fires with a L{Turn}.
    @ivar delay: how long to wait before answering a refusal.
    """

    def __init__(self, limits: Limits, network: str, user: str, protocol: str, known: bool) -> None:
        self.limits = limits
        self.network = network
        self.user = user[:MAX_USER_KEY]
        self.protocol = protocol
        self.known = known
        # A user's known network takes no turn: the owner neither queues
        # behind strangers' guesses at the name nor behind whoever fails
        # behind the same NAT; its failures still count and lock it out.
        self.keys: tuple[str, ...] = () if known else (_networkKey(network), _userKey(self.user))
        self.countedKeys = (_networkKey(network), _userKey(self.user))
        self.turn: Deferred[Turn] = Deferred()
        self.delay = limits.failureDelay
        self.started = limits.clock.seconds()
        self.checking = False

    def succeeded(self) -> None:
        """
        The password was right: the attempt was no failure, the network
        becomes known for the user, and the next attempts may go on.
        """
        if self.checking:
            self.limits._remember(self.network, self.user)
            self.withdraw()

    def failed(self) -> float:
        """
        The password was wrong, or the upstream refused a password the
        proxy passed on: log it, lock out what is due, and keep the turn
        (if the check still holds it) until the returned delay is over,
        also if the client leaves.
        """
        limits = self.limits
        holding, self.checking = self.checking, False
        if not holding:
            for key in self.countedKeys:
                limits._count(key, limits.clock.seconds())
        counts = [limits._recent(key) for key in self.countedKeys]
        for key, count in zip(self.countedKeys, counts, strict=True):
            limits._lockIfDue(key, count)
        # Strangers' failures do not slow the owner's known networks.
        counted = counts[0] if self.known else max(counts)
        self.delay = limits.delayFor(counted)
        self._report("failure", "failures={count}", count=counted)
        if holding:
            limits._checked(self)
            limits.clock.callLater(self.delay, limits._releaseTurn, self)
        return self.delay

    def unavailable(self) -> float:
        """
        The check could not be made (the account backend did not say): the
        attempt counts as no failure, but keeps its turn for the first
        failure delay, so that making the backend slow or fail does not let
        anyone ask it at full speed.  The delay before saying so.
        """
        limits = self.limits
        if self.checking:
            self.checking = False
            for key in self.countedKeys:
                limits._uncount(key, self.started)
            limits._checked(self)
            limits.clock.callLater(limits.failureDelay, limits._releaseTurn, self)
        self.delay = limits.failureDelay
        return self.delay

    def refuse(self, reason: str) -> None:
        """
        Log an attempt refused without a check.
        """
        limits = self.limits
        if reason.endswith("locked-out"):
            self.delay = limits.delayFor(limits.config.failuresBeforeLockout)
        self._report("refused", "reason={reason}", reason=reason)

    def _report(self, outcome: str, detail: str, **fields: object) -> None:
        """
        The attempt's one fail2ban line: address first, then the
        client-chosen name encoded, then C{detail}.
        """
        self.limits.log.warn(
            "authentication " + outcome + ": ip={ip} protocol={protocol} user={user} " + detail,
            ip=self.network,
            protocol=self.protocol,
            user=loggedName(self.user),
            **fields,
        )

    def abandon(self) -> None:
        """
        The client left before its turn came (a check already running still
        ends in L{succeeded} or L{failed}).
        """
        if self in self.limits._waiting:
            self.limits._unqueue(self)

    def withdraw(self) -> None:
        """
        The client left as its turn came, before the check began: the
        attempt is not counted and its turn is given back.
        """
        if not self.checking:
            return
        self.checking = False
        for key in self.countedKeys:
            self.limits._uncount(key, self.started)
        self.limits._checked(self)
        self.limits._releaseTurn(self)


def _networkKey(network: str) -> str:
    return f"ip={network}"


def _userKey(user: str) -> str:
    # Spellings a directory or database may take for one account (case,
    # spaces: LDAP's caseIgnoreMatch) count as one: guesses at one account
    # are not multiplied by respelling its name.
    return f"user={' '.join(user.split()).casefold()[:MAX_USER_KEY]}"


def _shown(key: str) -> str:
    """
    A counted key as log lines show it (a user name encoded and cut).
    """
    if key.startswith("user="):
        return "user=" + loggedName(key[len("user=") :])
    return key


def hostOf(clientAddress: str) -> str:
    """
    The IP part of C{"host:port"} (IPv6 hosts contain colons).
    """
    return clientAddress.rsplit(":", 1)[0]


class Admission(enum.Enum):
    """
    Where a connection's place in the limits stands.
    """

    NONE = "not admitted"
    PENDING = "asked the supervisor"
    ADMITTED = "counted"
    RELEASED = "given back"
    GONE = "closed while asking"


class Gate:
    """
    One connection's view of the limits: what the IMAP and POP3 servers
    call, so both apply them the same way.

    With workers the limits are the supervisor's (a
    L{mailproxy.sharedlimits.SharedLimits}) and L{admit} and
    L{startSession} answer with L{Deferred}s; a connection that ends before
    the answer gives back what the answer grants.
    """

    def __init__(self, limits: Limits | SharedLimits, clientAddress: str, protocol: str) -> None:
        self.limits = limits
        self.ip = hostOf(clientAddress)
        self.network = networkOf(self.ip)
        self.protocol = protocol
        self._admission = Admission.NONE
        self._sessionUser: str | None = None
        # The login attempt the supervisor checks (workers).
        self._remote: RemoteAttempt | None = None

    def admit(self) -> str | None | Deferred[str | None]:
        """
        Count the connection; why it is refused, or C{None}.
        """
        decided = self.limits.admit(self.network)
        if isinstance(decided, Deferred):
            self._admission = Admission.PENDING
            return decided.addCallback(self._decided)
        return self._decided(decided)

    def _decided(self, refusal: str | None) -> str | None:
        if refusal is not None:
            self._admission = Admission.NONE
            self.limits.log.warn(
                "connection refused: ip={ip} protocol={protocol}: {reason}",
                ip=self.ip,
                protocol=self.protocol,
                reason=refusal,
            )
            return refusal
        if self._admission is Admission.GONE:
            self._admission = Admission.RELEASED
            self.limits.release(self.network)
            return "closed"
        self._admission = Admission.ADMITTED
        return None

    def release(self) -> None:
        """
        Free the connection's place (and its session's); safe to call
        again.
        """
        if self._admission is Admission.ADMITTED:
            self._admission = Admission.RELEASED
            self.limits.release(self.network)
        elif self._admission is Admission.PENDING:
            self._admission = Admission.GONE
        if self._remote is not None:
            self._remote.giveBackSession()
        self.endSession()

    def beginLogin(
        self, user: str, password: bytes, tls: bool = False, number: int = 1
    ) -> LoginAttempt | RemoteAttempt:
        """
        Queue a login attempt; with workers the supervisor checks
        C{password} when its turn comes (C{tls}: whether the client's
        connection is encrypted, C{number}: the attempt's on the
        connection; an account backend may ask both).
        """
        if isinstance(self.limits, Limits):
            return self.limits.beginLogin(self.network, user, self.protocol)
        self._remote = self.limits.beginLogin(self.network, user, self.protocol, password, self.ip, tls, number)
        return self._remote

    def endSession(self) -> None:
        """
        Give back the session counted at login (its upstream never came).
        """
        if self._sessionUser is not None:
            self.limits.endSession(self._sessionUser)
            self._sessionUser = None

    def startSession(self, user: str) -> bool | Deferred[bool]:
        """
        Count a logged-in session; C{False} if the user has too many.
        """
        counted = self._remote.takeSession() if self._remote is not None else None
        if counted is not None:
            # The supervisor counted it with the password check.
            return self._sessionDecided(counted, user)
        started = self.limits.startSession(user)
        if isinstance(started, Deferred):
            return started.addCallback(self._sessionDecided, user)
        return self._sessionDecided(started, user)

    def _sessionDecided(self, started: bool, user: str) -> bool:
        if not started:
            self.limits.log.warn(
                "session refused: ip={ip} protocol={protocol} user={user}: too many sessions",
                ip=self.ip,
                protocol=self.protocol,
                user=loggedName(user),
            )
            return False
        if self._admission in (Admission.RELEASED, Admission.GONE):
            # The connection ended while the supervisor answered.
            self.limits.endSession(user)
            return False
        self._sessionUser = user
        return True
