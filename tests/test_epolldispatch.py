"""
The epoll reactor's dispatch without a log context: connections still read,
write and close as on Twisted's own, an error in a handler is logged with
the connection named and leaves the reactor serving, and only the epoll
reactor is changed.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from mailproxy.epolldispatch import dispatchWithoutLogContext

# a reactor run that goes wrong stops after this, failing the test
RUN_LIMIT = 10.0


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"raise"):
            raise RuntimeError("handler broke")
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if getattr(self.factory, "raiseOnLost", False):  # type: ignore[attr-defined]
            raise RuntimeError("connectionLost broke")


class Talker(Protocol):
    """
    Sends C{message}, collects the answer until the connection closes or
    C{expected} octets came.
    """

    def __init__(self, message: bytes, expected: int, done: Any) -> None:
        self.message = message
        self.expected = expected
        self.done = done
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.message)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.done(self.received)


def talk(reactor: EPollReactor, port: int, conversations: list[tuple[bytes, int]]) -> list[bytes]:
    """
    Run C{conversations} one after the other against C{port} on C{reactor};
    what each received.
    """
    answers: list[bytes] = []

    def next(previous: bytes | None = None) -> None:
        if previous is not None:
            answers.append(previous)
        if len(answers) == len(conversations):
            reactor.stop()
            return
        message, expected = conversations[len(answers)]
        factory = ClientFactory.forProtocol(lambda: Talker(message, expected, next))
        reactor.connectTCP("127.0.0.1", port, factory)

    reactor.callWhenRunning(next)
    reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    return answers


def echoReactor(raiseOnLost: bool = False) -> tuple[EPollReactor, int, Any]:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    factory = Factory.forProtocol(Echo)
    factory.raiseOnLost = raiseOnLost  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return reactor, port.getHost().port, port


def capturedErrors() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    return events, lambda: globalLogPublisher.removeObserver(observer)


def test_connections_read_write_and_close() -> None:
    reactor, port, _ = echoReactor()
    big = b"x" * (4 << 20)
    answers = talk(reactor, port, [(b"hello", 5), (big, len(big))])
    assert answers == [b"hello", big]


def test_error_in_a_read_handler_closes_that_connection_and_the_reactor_serves_on() -> None:
    reactor, port, _ = echoReactor()
    errors, stop = capturedErrors()
    try:
        answers = talk(reactor, port, [(b"raise now", 1), (b"after", 5)])
    finally:
        stop()
    # the broken connection closed without an answer; the next one is served
    assert answers == [b"", b"after"]
    assert any("handler broke" in str(event.get("log_failure", event.get("failure", ""))) for event in errors)


def test_error_in_connection_lost_is_logged_with_the_connection() -> None:
    reactor, port, _ = echoReactor(raiseOnLost=True)
    errors, stop = capturedErrors()
    try:
        answers = talk(reactor, port, [(b"one", 3), (b"two", 3)])
    finally:
        stop()
    assert answers == [b"one", b"two"]
    lost = [event for event in errors if "connectionLost broke" in str(event.get("log_failure"))]
    assert lost, errors
    assert all(event["log_namespace"] == "mailproxy.epolldispatch" for event in lost)
    assert all("Echo" in event["connection"] for event in lost)


def test_other_reactors_are_left_as_they_are() -> None:
    selectReactor = SelectReactor()
    doIteration = selectReactor.doIteration
    assert not dispatchWithoutLogContext(selectReactor)
    assert selectReactor.doIteration == doIteration
    assert not dispatchWithoutLogContext(MemoryReactorClock())


def test_timed_calls_run_when_due_in_order_and_a_cancelled_one_never() -> None:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    ran: list[str] = []
    reactor.callLater(0.05, ran.append, "second")
    reactor.callLater(0.01, ran.append, "first")
    reactor.callLater(0.02, ran.append, "cancelled").cancel()
    postponed = reactor.callLater(0.01, ran.append, "postponed")
    postponed.delay(0.07)
    reactor.callLater(0.15, reactor.stop)
    reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert ran == ["first", "second", "postponed"]


def test_a_call_from_another_thread_wakes_the_sleeping_loop() -> None:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    ran: list[str] = []

    def fromThread() -> None:
        reactor.callFromThread(ran.append, "from thread")
        reactor.callFromThread(reactor.stop)

    # Only the run limit is pending while the thread asks: the thread's
    # calls run at once only if the loop looks at them when the waker wakes it.
    reactor.callWhenRunning(lambda: threading.Thread(target=fromThread).start())
    limit = reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert ran == ["from thread"]
    assert limit.active(), "the thread's calls waited for the next timed call"


def test_an_error_in_a_timed_call_is_logged_and_the_loop_goes_on() -> None:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("timed call broke")

    reactor.callLater(0.01, broken)
    reactor.callLater(0.02, ran.append, "after")
    reactor.callLater(0.03, reactor.stop)
    reactor.callLater(RUN_LIMIT, reactor.stop)
    errors, stop = capturedErrors()
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        stop()
    assert ran == ["after"]
    assert any("timed call broke" in str(event.get("log_failure", "")) for event in errors)


def test_stopping_fires_the_shutdown_triggers() -> None:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    fired: list[str] = []
    reactor.addSystemEventTrigger("before", "shutdown", fired.append, "before")
    reactor.addSystemEventTrigger("during", "shutdown", fired.append, "during")
    reactor.callWhenRunning(reactor.stop)
    reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert fired == ["before", "during"]


class HalfClosingEcho(Echo):
    """
    Echoes, and answers the client's half-close with what it read in all.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"got " + self.received)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


def test_a_half_close_reaches_a_half_closeable_protocol_as_on_twisted() -> None:
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    factory = Factory.forProtocol(implementer(IHalfCloseableProtocol)(HalfClosingEcho))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    answer: list[bytes] = []

    def talk() -> None:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            answer.append(b"".join(iter(lambda: client.recv(100), b"")))
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(lambda: threading.Thread(target=talk, daemon=True).start())
    reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert answer == [b"got hello"]


class AbortedWhilePaused(Protocol):
    """
    Stops reading at once; later aborts, then resumes (as closing a relayed
    session may), while the peer's data waits unread.
    """

    def __init__(self, reactor: EPollReactor, events: list[tuple[str, Any]]) -> None:
        self.reactor = reactor
        self.events = events

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.reactor.callLater(0.2, self.abortAndResume)

    def abortAndResume(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append(("lost", reason.type.__name__))
        self.reactor.callLater(0.05, self.reactor.stop)


def test_an_aborted_connection_reads_nothing_more_even_if_resumed() -> None:
    """Twisted's abortConnection makes doRead a no-op on the connection: the inline read honours it."""
    reactor = EPollReactor()
    assert dispatchWithoutLogContext(reactor)
    events: list[tuple[str, Any]] = []
    factory = Factory.forProtocol(lambda: AbortedWhilePaused(reactor, events))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port

    def talk() -> None:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"sent before the abort")

    reactor.callWhenRunning(lambda: threading.Thread(target=talk, daemon=True).start())
    reactor.callLater(RUN_LIMIT, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert events == [("lost", "ConnectionAborted")]
