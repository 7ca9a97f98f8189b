"""
Limits shared by worker processes (L{mailproxy.sharedlimits}): two workers'
L{SharedLimits} talking AMP (the workers' lean L{Channel}) to one supervisor's L{Limits}, over in-memory
connections (L{twisted.test.iosim}); and the merged metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.accounts.model import Account
from mailproxy.limits import Gate, Limits, LimitsConfig, Turn
from mailproxy.metricsmerge import mergedExposition
from mailproxy.sharedlimits import UNAVAILABLE, LimitsResponder, SharedLimits
from mailproxy.workerprotocol import Channel


class PasswordsOf:
    """
    A checker knowing C{users}' passwords.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self.users = users
        self.asked = 0

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        self.asked += 1
        if self.users.get(credentials.username.decode()) == credentials.password:
            return succeed(credentials.username.decode())
        return fail(UnauthorizedLogin())


class Worker:
    """
    One worker's end, connected in memory to the supervisor's responder.
    """

    def __init__(self, limits: Limits, checker: Any) -> None:
        self.responder = LimitsResponder(limits, checker)
        supervisorSide = Channel(locator=self.responder)
        self.channel = Channel()
        self.pump: IOPump = connect(
            supervisorSide, makeFakeServer(supervisorSide), self.channel, makeFakeClient(self.channel)
        )
        self.limits = SharedLimits(self.channel, failureDelay=0.5)

    def flush(self) -> None:
        self.pump.flush()


class SharedLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        config = LimitsConfig(maxConnectionsPerIP=2, maxSessionsPerUser=1, failuresBeforeLockout=3)
        self.limits = Limits(config, self.clock, failureDelay=0.5)
        self.checker = PasswordsOf({"alice": b"right"})
        self.one = Worker(self.limits, self.checker)
        self.two = Worker(self.limits, self.checker)

    def flush(self) -> None:
        self.one.flush()
        self.two.flush()
        self.one.flush()

    def admit(self, worker: Worker, network: str = "192.0.2.1") -> str | None:
        answer = worker.limits.admit(network)
        self.flush()
        return self.successResultOf(answer)

    def test_connections_from_one_address_count_on_every_worker(self) -> None:
        """Per-address places are the supervisor's: one taken on each worker, the third is refused on either."""
        self.assertIsNone(self.admit(self.one))
        self.assertIsNone(self.admit(self.two))
        self.assertEqual(self.admit(self.one), "too many connections from your address")
        self.assertEqual(self.admit(self.two), "too many connections from your address")
        self.one.limits.release("192.0.2.1")
        self.flush()
        self.assertIsNone(self.admit(self.two))

    def test_sessions_of_one_user_count_on_every_worker(self) -> None:
        started = self.one.limits.startSession("alice")
        refused = self.two.limits.startSession("alice")
        self.flush()
        self.assertEqual((self.successResultOf(started), self.successResultOf(refused)), (True, False))

    def login(self, worker: Worker, password: bytes, network: str = "192.0.2.9") -> Any:
        attempt = worker.limits.beginLogin(network, "alice", "imap", password)
        self.flush()
        return attempt

    def test_the_supervisor_checks_the_password_with_the_turn(self) -> None:
        """One round trip: the turn comes with the verdict (the avatar ID, or none and the failure delay)."""
        right = self.login(self.one, b"right")
        self.assertEqual(self.successResultOf(right.turn), Turn.CHECK)
        self.assertEqual(self.successResultOf(right.verdict()), "alice")
        wrong = self.login(self.two, b"wrong", network="192.0.2.10")
        self.assertEqual(self.successResultOf(wrong.turn), Turn.CHECK)
        self.failureResultOf(wrong.verdict(), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(wrong.failed()), 0.5)
        self.assertEqual(self.checker.asked, 2)

    def test_failures_on_both_workers_lock_the_address_out(self) -> None:
        """Guesses spread over workers add up: the third failure locks the address out for both."""
        for worker in (self.one, self.two, self.one):
            attempt = self.login(worker, b"a guess")
            self.assertEqual(self.successResultOf(attempt.turn), Turn.CHECK)
            self.clock.advance(60)
        attempt = self.login(self.two, b"right")
        self.assertEqual(self.successResultOf(attempt.turn), Turn.LOCKED_OUT)
        self.assertTrue(self.limits.lockedOut("192.0.2.9", "alice"))
        self.assertEqual(self.checker.asked, 3)

    def test_second_guess_waits_for_the_first_on_the_other_worker(self) -> None:
        """One check in flight per address across workers: a failed guess holds the turn for its delay."""
        first = self.login(self.one, b"a guess")
        second = self.login(self.two, b"another")
        self.assertEqual(self.successResultOf(first.turn), Turn.CHECK)
        self.assertNoResult(second.turn)
        self.clock.advance(first.delay)
        self.flush()
        self.assertEqual(self.successResultOf(second.turn), Turn.CHECK)

    def test_a_login_failing_after_its_check_is_counted(self) -> None:
        """The upstream refused the password passed on: counted as a failure in the supervisor."""
        attempt = self.login(self.one, b"right")
        self.successResultOf(attempt.turn)
        delay = attempt.failed()
        self.flush()
        self.assertEqual(self.successResultOf(delay), 0.5)
        self.assertEqual(self.limits._recent("user=alice"), 1)

    def test_abandoned_attempt_is_answered_and_forgotten(self) -> None:
        """A client leaving while its attempt waits: the supervisor answers the pending call and keeps nothing."""
        first = self.login(self.one, b"a guess")
        second = self.login(self.one, b"another")
        self.assertNoResult(second.turn)
        second.abandon()
        self.flush()
        self.assertEqual(self.successResultOf(second.turn), Turn.BUSY)
        self.assertEqual(self.one.responder._waiting, {})
        self.clock.advance(first.delay)
        self.assertEqual(self.limits._turnHeld, set())
        self.assertEqual(self.checker.asked, 1)

    def test_a_dead_worker_gives_back_what_it_held(self) -> None:
        """Its connections, sessions and queued attempts are freed; the other worker's stay counted."""
        self.assertIsNone(self.admit(self.one))
        self.assertIsNone(self.admit(self.two))
        self.one.limits.startSession("alice")
        self.login(self.one, b"a guess")
        waiting = self.login(self.one, b"another")
        self.assertNoResult(waiting.turn)
        self.one.responder.workerGone()
        self.assertEqual(self.limits.connections, 1)
        self.assertEqual(dict(self.limits._perUser), {})
        self.assertEqual(list(self.limits._waiting), [])
        self.assertIsNone(self.admit(self.two))

    def test_names_and_passwords_too_long_to_send_are_refused_without_a_check(self) -> None:
        """A 70,000-character name or password (more than AMP carries) is a failed attempt, never checked."""
        for name, password in (("a" * 70000, b"right"), ("alice", b"p" * 70000)):
            attempt = self.one.limits.beginLogin(f"192.0.2.{len(password) % 200}", name, "imap", password)
            self.flush()
            self.assertEqual(self.successResultOf(attempt.turn), Turn.CHECK)
            self.failureResultOf(attempt.verdict(), UnauthorizedLogin)
        self.assertEqual(self.checker.asked, 0)

    def test_a_gone_supervisor_refuses_instead_of_hanging(self) -> None:
        """The channel closed: admissions are refused, turns say busy, sessions are refused."""
        self.one.channel.transport.loseConnection()  # type: ignore[union-attr]
        self.flush()
        self.assertEqual(self.successResultOf(self.one.limits.admit("192.0.2.1")), UNAVAILABLE)
        attempt = self.one.limits.beginLogin("192.0.2.1", "a", "imap", b"pw")
        self.assertEqual(self.successResultOf(attempt.turn), Turn.BUSY)
        self.assertFalse(self.successResultOf(self.one.limits.startSession("alice")))


class AccountNamed:
    """
    An account backend's checker that finds one account whatever the name's
    spelling (as a directory matching uid without case).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return succeed(Account(name=self.name))


class GateTests(SynchronousTestCase):
    """
    A connection's L{Gate} when the supervisor answers later.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = Limits(LimitsConfig(maxConnectionsPerIP=5), self.clock, failureDelay=0.5)
        self.worker = Worker(self.limits, PasswordsOf({}))

    def test_closed_while_admission_pending_gives_the_place_back(self) -> None:
        gate = Gate(self.worker.limits, "192.0.2.1:4000", "imap")
        admission = gate.admit()
        assert isinstance(admission, Deferred)
        gate.release()
        self.worker.flush()
        self.worker.flush()
        self.assertEqual(self.successResultOf(admission), "closed")
        self.assertEqual(self.limits.connections, 0)

    def test_a_session_counted_with_the_check_is_given_back_when_the_connection_ends_first(self) -> None:
        """The supervisor counts the session with a right password; a connection ending before it is used returns it."""
        self.worker.responder.checker = PasswordsOf({"alice": b"right"})
        gate = Gate(self.worker.limits, "192.0.2.1:4000", "imap")
        gate.admit()
        self.worker.flush()
        attempt = gate.beginLogin("alice", b"right")
        self.worker.flush()
        self.worker.flush()
        self.successResultOf(attempt.turn)
        self.assertEqual(dict(self.limits._perUser), {"alice": 1})
        gate.release()
        self.worker.flush()
        self.assertEqual((self.limits.connections, dict(self.limits._perUser)), (0, {}))

    def test_a_session_counted_under_the_accounts_name_is_given_back_under_it(self) -> None:
        """A backend names the account otherwise than typed (SAM is sam): the session returns to sam's count."""
        self.worker.responder.checker = AccountNamed("sam")
        for _ in range(2):
            gate = Gate(self.worker.limits, "192.0.2.1:4000", "imap")
            gate.admit()
            self.worker.flush()
            attempt = gate.beginLogin("SAM", b"right")
            self.worker.flush()
            self.worker.flush()
            self.successResultOf(attempt.turn)
            self.assertEqual(dict(self.limits._perUser), {"sam": 1})
            gate.release()
            self.worker.flush()
            self.worker.flush()
            self.assertEqual(dict(self.limits._perUser), {})

    def test_a_session_counted_with_the_check_is_used_without_asking_again(self) -> None:
        self.worker.responder.checker = PasswordsOf({"alice": b"right"})
        gate = Gate(self.worker.limits, "192.0.2.1:4000", "imap")
        gate.admit()
        self.worker.flush()
        gate.beginLogin("alice", b"right")
        self.worker.flush()
        self.worker.flush()
        self.assertIs(gate.startSession("alice"), True)
        gate.release()
        self.worker.flush()
        self.assertEqual(dict(self.limits._perUser), {})

    def test_closed_while_session_pending_gives_the_session_back(self) -> None:
        gate = Gate(self.worker.limits, "192.0.2.1:4000", "imap")
        gate.admit()
        self.worker.flush()
        started = gate.startSession("alice")
        gate.release()
        self.worker.flush()
        self.worker.flush()
        self.assertFalse(self.successResultOf(started))
        self.assertEqual((self.limits.connections, dict(self.limits._perUser)), (0, {}))


def exposition(loginsOk: float, active: float) -> str:
    registry = CollectorRegistry()
    Counter("mailproxy_logins", "Logins.", ["result"], registry=registry).labels("ok").inc(loginsOk)
    Gauge("mailproxy_connections_active", "Open.", registry=registry).set(active)
    Gauge("process_start_time_seconds", "Start.", registry=registry).set(1000 + loginsOk)
    return generate_latest(registry).decode()


def test_merged_metrics_sum_counters_and_gauges_and_keep_the_earliest_start() -> None:
    merged = mergedExposition([exposition(3, 2), exposition(4, 5)]).decode()
    assert 'mailproxy_logins_total{result="ok"} 7.0' in merged
    assert "mailproxy_connections_active 7.0" in merged
    assert "process_start_time_seconds 1003.0" in merged
    assert merged.count("# TYPE mailproxy_logins_total counter") == 1
