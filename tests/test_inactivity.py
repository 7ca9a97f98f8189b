"""
The inactivity timeout: a connection times out exactly C{timeOut} seconds
after its last activity, with one timer however often activity is noted.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from mailproxy.inactivity import Inactivity


class Connection(Inactivity):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.timedOutAt: list[float] = []

    def timeoutConnection(self) -> None:
        self.timedOutAt.append(self.clock.seconds())


def test_an_inactive_connection_times_out_after_the_period() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(10)
    clock.advance(9.5)
    assert connection.timedOutAt == []
    clock.advance(0.5)
    assert connection.timedOutAt == [10]


def test_activity_moves_the_timeout_to_a_full_period_after_it() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(10)
    for _ in range(7):
        clock.advance(3)
        connection.resetTimeout()
    assert clock.seconds() == 21
    clock.advance(9.9)
    assert connection.timedOutAt == []
    clock.advance(0.1)
    assert connection.timedOutAt == [31]


def test_noting_activity_keeps_one_timer_and_moves_none() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(10)
    (timer,) = clock.getDelayedCalls()
    for _ in range(100):
        clock.advance(0.01)
        connection.resetTimeout()
    assert clock.getDelayedCalls() == [timer]
    assert timer.getTime() == 10


def test_no_period_means_no_timeout_and_no_timer() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(10)
    clock.advance(5)
    assert connection.setTimeout(None) == 10
    assert clock.getDelayedCalls() == []
    connection.resetTimeout()
    clock.advance(100)
    assert connection.timedOutAt == []


def test_a_new_period_counts_from_when_it_is_set() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(100)
    clock.advance(50)
    connection.setTimeout(5)
    clock.advance(4.9)
    assert connection.timedOutAt == []
    clock.advance(0.1)
    assert connection.timedOutAt == [55]
    connection.setTimeout(20)
    clock.advance(20)
    assert connection.timedOutAt == [55, 75]


def test_a_timer_that_runs_out_after_the_period_was_removed_does_nothing() -> None:
    clock = Clock()
    connection = Connection(clock)
    connection.setTimeout(10)
    (timer,) = clock.getDelayedCalls()
    connection.timeOut = None  # as if removed between the timer's firing and its check
    clock.advance(10)
    assert connection.timedOutAt == []
    assert not timer.active()
