"""
One timer over the steps of an upstream handshake: each step gets the whole
period from its start, the step under way when it runs out is given up,
and nothing is left on the clock afterwards.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.stepdeadline import StepDeadline


class StepDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadline = StepDeadline(self.clock, 5)
        self.givenUp: list[str] = []

    def giveUp(self, name: str) -> object:
        return lambda: self.givenUp.append(name)

    def test_a_step_that_runs_over_is_given_up(self) -> None:
        self.deadline.step(self.giveUp("greeting"))
        self.clock.advance(4.9)
        self.assertEqual(self.givenUp, [])
        self.clock.advance(0.2)
        self.assertEqual((self.givenUp, self.deadline.expired), (["greeting"], True))

    def test_each_step_gets_the_whole_period_from_its_start(self) -> None:
        self.deadline.step(self.giveUp("greeting"))
        self.clock.advance(4.9)
        self.deadline.step(self.giveUp("login"))
        self.clock.advance(4.9)
        self.assertEqual(self.givenUp, [])
        self.clock.advance(0.2)
        self.assertEqual(self.givenUp, ["login"])

    def test_one_timer_serves_every_step(self) -> None:
        [timer] = self.clock.getDelayedCalls()
        for name in ("connect", "greeting", "capability", "login"):
            self.deadline.step(self.giveUp(name))
            self.clock.advance(1)
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.assertEqual(timer.getTime(), 3 + 5)  # the last step started at 3

    def test_stopped_leaves_nothing_on_the_clock_and_gives_up_nothing(self) -> None:
        self.deadline.step(self.giveUp("login"))
        self.deadline.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual((self.givenUp, self.deadline.expired), ([], False))

    def test_a_step_after_the_deadline_passed_is_given_up_at_once(self) -> None:
        self.clock.advance(6)
        self.deadline.step(self.giveUp("late"))
        self.assertEqual(self.givenUp, ["late"])
