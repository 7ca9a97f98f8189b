"""
The epoll reactor's dispatch without a log context: connections still read,
write and close as on Twisted's own, an error in a handler is logged with
the connection named and leaves the reactor serving, and only the epoll
reactor is changed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher

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
