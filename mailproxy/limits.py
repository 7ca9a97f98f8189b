# -*- test-case-name: tests.test_limits -*-
"""
Connection limits and authentication-failure throttling, shared by every
listener of one proxy process.

Failures are counted per client IP and per user name within a window; each
further failure doubles the reply delay (from C{auth.failure_delay}, capped),
and past a threshold the IP or user is locked out for a while.  Every
failure and lockout is logged in one fail2ban-friendly line::

    authentication failure: user=alice ip=203.0.113.7 protocol=imap failures=3
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

MAX_DELAY = 30.0


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


class Limits:
    """
    The counters of one proxy process.
    """

    log = Logger(namespace="mailproxy.auth")

    def __init__(self, config: LimitsConfig, clock: IReactorTime, failureDelay: float) -> None:
        self.config = config
        self.clock = clock
        self.failureDelay = failureDelay
        self.connections = 0
        self._perIP: dict[str, int] = defaultdict(int)
        self._perUser: dict[str, int] = defaultdict(int)
        self._failures: dict[str, list[float]] = defaultdict(list)
        self._lockedUntil: dict[str, float] = {}

    # -- connections -------------------------------------------------------------

    def admit(self, ip: str) -> str | None:
        """
        Count a new connection from C{ip}; return why it is refused, or
        C{None} (then L{release} it when it ends).
        """
        if self.connections >= self.config.maxConnections:
            return "too many connections"
        if self._perIP[ip] >= self.config.maxConnectionsPerIP:
            return "too many connections from your address"
        self.connections += 1
        self._perIP[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.connections -= 1
        self._perIP[ip] -= 1
        if not self._perIP[ip]:
            del self._perIP[ip]

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

    # -- authentication failures ------------------------------------------------

    def lockedOut(self, ip: str, user: str) -> bool:
        """
        C{True} while C{ip} or C{user} is locked out.
        """
        now = self.clock.seconds()
        return any(self._lockedUntil.get(key, 0.0) > now for key in (_ip(ip), _user(user)))

    def failed(self, ip: str, user: str, protocol: str) -> float:
        """
        Record a failed login; return how long to wait before answering it.
        """
        now = self.clock.seconds()
        counts = []
        for key in (_ip(ip), _user(user)):
            recent = [moment for moment in self._failures[key] if now - moment < self.config.failureWindow]
            recent.append(now)
            self._failures[key] = recent
            counts.append(len(recent))
            if len(recent) >= self.config.failuresBeforeLockout and self._lockedUntil.get(key, 0.0) <= now:
                self._lockedUntil[key] = now + self.config.lockoutSeconds
                self.log.warn(
                    "authentication lockout: {what} for {seconds:.0f} s after {count} failures",
                    what=key,
                    seconds=self.config.lockoutSeconds,
                    count=len(recent),
                )
        self.log.warn(
            "authentication failure: user={user} ip={ip} protocol={protocol} failures={count}",
            user=user,
            ip=ip,
            protocol=protocol,
            count=max(counts),
        )
        return min(MAX_DELAY, self.failureDelay * 2 ** (max(counts) - 1))

    def succeeded(self, ip: str, user: str) -> None:
        """
        A good login clears the user's failures (not the IP's: one good
        account must not reset a guessing run from the same address).
        """
        self._failures.pop(_user(user), None)

    def prune(self) -> None:
        """
        Forget expired failures and lockouts (call now and then).
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


def _ip(ip: str) -> str:
    return f"ip={ip}"


def _user(user: str) -> str:
    return f"user={user}"


def hostOf(clientAddress: str) -> str:
    """
    The IP part of C{"host:port"} (IPv6 hosts contain colons).
    """
    return clientAddress.rsplit(":", 1)[0]


class Gate:
    """
    One connection's view of the L{Limits}: what the IMAP and POP3 servers
    call, so both apply them the same way.
    """

    def __init__(self, limits: Limits, clientAddress: str, protocol: str) -> None:
        self.limits = limits
        self.ip = hostOf(clientAddress)
        self.protocol = protocol
        self._admitted = False
        self._sessionUser: str | None = None

    def admit(self) -> str | None:
        refusal = self.limits.admit(self.ip)
        self._admitted = refusal is None
        if refusal is not None:
            self.limits.log.warn(
                "connection refused: ip={ip} protocol={protocol}: {reason}",
                ip=self.ip,
                protocol=self.protocol,
                reason=refusal,
            )
        return refusal

    def release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.limits.release(self.ip)
        if self._sessionUser is not None:
            self.limits.endSession(self._sessionUser)
            self._sessionUser = None

    def lockedOut(self, user: str) -> bool:
        return self.limits.lockedOut(self.ip, user)

    def failed(self, user: str) -> float:
        return self.limits.failed(self.ip, user, self.protocol)

    def succeeded(self, user: str) -> bool:
        """
        Record a good login; C{False} if the user has too many sessions.
        """
        self.limits.succeeded(self.ip, user)
        if not self.limits.startSession(user):
            self.limits.log.warn(
                "session refused: user={user} ip={ip} protocol={protocol}: too many sessions",
                user=user,
                ip=self.ip,
                protocol=self.protocol,
            )
            return False
        self._sessionUser = user
        return True
