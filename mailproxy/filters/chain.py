# -*- test-case-name: tests.test_filter_chain -*-
"""
An ordered chain of filters, run with the same rules for every protocol.

Results that are not Deferreds are handled synchronously, so a chain of
synchronous filters adds no reactor turns.  A filter that raises is
contained: the command is answered C{NO [SERVERBUG]}, an untagged response
is dropped (failing closed: a hiding filter must not leak), and the error is
logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.filters import DROP, PASS, Reject, Rewrite, Verdict
from mailproxy.interfaces import ICommandFilter, IResponseFilter, ISession, ISessionObserver

log = Logger()

FILTER_ERROR = Reject("Internal error in a proxy filter", "NO", "SERVERBUG")


class FilterChain:
    """
    The filters of one session, in order.
    """

    def __init__(self, filters: Sequence[object] = ()) -> None:
        self.filters = list(filters)
        self.commandFilters = [item for item in self.filters if ICommandFilter.providedBy(item)]
        self.responseFilters = [item for item in self.filters if IResponseFilter.providedBy(item)]
        self.observers = [item for item in self.filters if ISessionObserver.providedBy(item)]

    def __bool__(self) -> bool:
        return bool(self.filters)

    def wantsResponse(self, name: bytes) -> bool:
        """
        C{True} if some response filter looks at responses called C{name};
        a filter limits what it sees with a C{responseNames} attribute.
        """
        for item in self.responseFilters:
            names = getattr(item, "responseNames", None)
            if names is None or name in names:
                return True
        return False

    def filterCommand(self, session: ISession, command: Any) -> Verdict | Deferred[Verdict]:
        return _run([_bind(item.filterCommand, session) for item in self.commandFilters], command, lambda: FILTER_ERROR)

    def filterResponse(self, session: ISession, response: Any) -> Verdict | Deferred[Verdict]:
        steps = []
        for item in self.responseFilters:
            names = getattr(item, "responseNames", None)
            if names is None or response.name in names:
                steps.append(_bind(item.filterResponse, session))

        def onError() -> Verdict:
            if not response.tagged:
                return DROP
            return Rewrite(type(response)(tag=response.tag, name=b"NO", code=b"SERVERBUG", text=b"Proxy filter error"))

        return _run(steps, response, onError)

    def notify(self, session: ISession, event: str, **details: Any) -> None:
        for observer in self.observers:
            try:
                observer.sessionEvent(session, event, details)
            except Exception:
                log.failure("filter {filter!r} failed on a {event} event", filter=observer, event=event)


def _bind(method: Callable[[ISession, Any], Any], session: ISession) -> Callable[[Any], Any]:
    return lambda message: method(session, message)


def _run(
    steps: list[Callable[[Any], Any]], message: Any, onError: Callable[[], Verdict], rewritten: bool = False
) -> Verdict | Deferred[Verdict]:
    """
    Apply C{steps} in order; a Rewrite feeds the next step, anything but
    PASS or Rewrite stops the chain.
    """
    for index, step in enumerate(steps):
        try:
            verdict = step(message)
        except Exception:
            log.failure("filter raised; answering with an error")
            return onError()
        if isinstance(verdict, Deferred):
            return _continueLater(verdict, steps[index + 1 :], message, rewritten, onError)
        outcome = _settle(verdict, onError)
        if isinstance(outcome, Rewrite):
            message, rewritten = outcome.message, True
        elif outcome is not PASS:
            return outcome
    return Rewrite(message) if rewritten else PASS


def _continueLater(
    pending: Deferred[Any],
    rest: list[Callable[[Any], Any]],
    message: Any,
    rewritten: bool,
    onError: Callable[[], Verdict],
) -> Deferred[Verdict]:
    def resume(verdict: Any) -> Verdict | Deferred[Verdict]:
        outcome = _settle(verdict, onError)
        if isinstance(outcome, Rewrite):
            return _run(rest, outcome.message, onError, True)
        if outcome is not PASS:
            return outcome
        return _run(rest, message, onError, rewritten)

    def failed(failure: Failure) -> Verdict:
        log.failure("filter failed; answering with an error", failure)
        return onError()

    return pending.addCallbacks(resume, failed)


def _settle(verdict: Any, onError: Callable[[], Verdict]) -> Verdict:
    if verdict is None or verdict is PASS:
        return PASS
    if isinstance(verdict, Rewrite | Reject) or verdict is DROP:
        return verdict
    log.error("filter returned {verdict!r}, which is not a verdict", verdict=verdict)
    return onError()
