"""
Shared helpers for the tests: configurations, users files and an in-memory
proxy connection with a scripted upstream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailproxy.auth import inlineRunner, makePortal
from mailproxy.config import Config, ListenerConfig, TLSMode, UpstreamConfig, UserRoute
from mailproxy.filters.chain import FilterChain
from mailproxy.imap.server import IMAPServerProtocol, ServerContext, State
from mailproxy.imap.upstream import UpstreamError, UpstreamIMAPProtocol, UpstreamSession
from mailproxy.limits import LimitsConfig
from mailproxy.passwords import hashPassword

FAST_HASH = {"log2N": 4}


def writeUsersFile(directory: str, users: dict[str, str]) -> str:
    """
    Write a users file with cheap hashes; return its path.
    """
    path = os.path.join(directory, "users")
    with open(path, "w") as handle:
        for name, password in users.items():
            handle.write(f"{name}:{hashPassword(password, **FAST_HASH)}\n")
    return path


def makeConfig(
    usersFile: str,
    *,
    routes: dict[str, UserRoute] | None = None,
    delay: float = 2.0,
    upstream: UpstreamConfig | None = None,
    limits: LimitsConfig | None = None,
    loginDeadline: float = 60.0,
) -> Config:
    upstream = upstream or UpstreamConfig("main", "127.0.0.1", 1, TLSMode.PLAIN)
    return Config(
        listeners=(ListenerConfig("imap", "tcp:0", TLSMode.STARTTLS, certificate="x", privateKey="x"),),
        upstreams={"main": upstream},
        usersFile=usersFile,
        defaultRoute=UserRoute("main"),
        routes=routes or {},
        authFailureDelay=delay,
        limits=limits or LimitsConfig(),
        loginDeadline=loginDeadline,
    )


class FakeTLSTransport(StringTransport):
    """
    A StringTransport that records STARTTLS.
    """

    tlsStarted: Any = None

    def startTLS(self, options: Any) -> None:
        self.tlsStarted = options


@dataclass
class UpstreamScript:
    """
    Records the upstream connections a server protocol asks for.
    """

    capabilities: list[bytes] = field(default_factory=lambda: [b"IMAP4rev1", b"IDLE", b"COMPRESS=DEFLATE", b"MOVE"])
    error: UpstreamError | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    protocol: UpstreamIMAPProtocol | None = None
    pending: Deferred[UpstreamSession] | None = None
    hold: bool = False

    def __call__(
        self, upstream: UpstreamConfig, username: str, password: str, client: str
    ) -> Deferred[UpstreamSession]:
        self.requests.append((upstream.name, username, password))
        if self.error is not None:
            return fail(self.error)
        protocol = UpstreamIMAPProtocol()
        protocol.makeConnection(StringTransport())
        self.protocol = protocol
        session = UpstreamSession(protocol, self.capabilities)
        if self.hold:
            self.pending = Deferred()
            return self.pending
        return succeed(session)

    def release(self) -> None:
        assert self.pending is not None and self.protocol is not None
        self.pending.callback(UpstreamSession(self.protocol, self.capabilities))

    @property
    def sent(self) -> bytes:
        assert self.protocol is not None
        return self.protocol.transport.value()  # type: ignore[attr-defined, no-any-return]


@dataclass
class ProxyConnection:
    """
    One client connection to an in-memory proxy.
    """

    protocol: IMAPServerProtocol
    transport: FakeTLSTransport
    clock: Clock
    upstream: UpstreamScript

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value  # type: ignore[no-any-return]

    @property
    def upstreamProtocol(self) -> UpstreamIMAPProtocol:
        """
        The upstream connection the proxy opened (after login).
        """
        assert self.upstream.protocol is not None
        return self.upstream.protocol

    def fromUpstream(self, data: bytes) -> None:
        self.upstreamProtocol.dataReceived(data)


def connect(
    directory: str,
    *,
    tls: TLSMode = TLSMode.STARTTLS,
    allowPlaintextAuth: bool = False,
    users: dict[str, str] | None = None,
    routes: dict[str, UserRoute] | None = None,
    upstream: UpstreamScript | None = None,
    filters: list[object] | None = None,
    limits: LimitsConfig | None = None,
    clock: Clock | None = None,
    metrics: Any = None,
    loginDeadline: float = 60.0,
) -> ProxyConnection:
    usersFile = writeUsersFile(directory, users or {"alice": "alicepw"})
    config = makeConfig(usersFile, routes=routes, limits=limits, loginDeadline=loginDeadline)
    listener = ListenerConfig(
        "imap", "tcp:0", tls, certificate="x", privateKey="x", allowPlaintextAuth=allowPlaintextAuth
    )
    clock = clock or Clock()
    script = upstream or UpstreamScript()
    chain = FilterChain(filters or [])
    context = ServerContext(
        config,
        listener,
        makePortal(config, inlineRunner),
        clock,
        script,
        "TLS-OPTIONS",
        lambda user, own=None: chain,
        metrics=metrics,
    )
    return another(context, script)


def another(context: ServerContext, script: UpstreamScript, host: str = "192.0.2.1") -> ProxyConnection:
    """
    One more client connection to the same listener (shared limits).
    """
    protocol = IMAPServerProtocol(context)
    transport = FakeTLSTransport(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return ProxyConnection(protocol, transport, context.clock, script)  # type: ignore[arg-type]


def loggedIn(tmp_path: Any, **kwargs: Any) -> ProxyConnection:
    """
    A connection on a plaintext listener allowing auth, logged in as alice,
    with the greeting and login reply already read.
    """
    connection = connect(str(tmp_path), tls=TLSMode.PLAIN, allowPlaintextAuth=True, **kwargs)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.protocol.state is State.RELAYING
    connection.received()
    return connection
