"""
A small authentication service in the protocol of nginx's C{auth_http},
for the tests, on 127.0.0.1, in a thread of the test process.

It accepts the users it is given (password, and the headers to answer them
with), refuses the rest with C{Auth-Status: Invalid login or password}, and
records every request.  The tests steer it: delay answers, answer an HTTP
status, say WAIT first, or answer extra headers.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SECRET_HEADER = "X-Auth-Key"
SECRET = "shared secret"
REFUSAL = "Invalid login or password"


@dataclass
class AuthRequest:
    """
    One request as the service saw it: its headers (names in lower case:
    they are case-insensitive; values as their octets), C{Auth-User} and
    C{Auth-Pass} decoded as nginx's escaping is undone.
    """

    headers: dict[str, bytes]
    user: str
    password: bytes


@dataclass
class AuthService:
    """
    The service, running until L{stop}.

    @ivar users: name -> (password, headers answered when it is right).
    @ivar delay: seconds each answer waits.
    @ivar status: the HTTP status answered (nginx reads the headers whatever
        it is).
    @ivar bare: answer no Auth- header at all (an error page).
    @ivar redirect: answer a redirect to this URL instead.
    @ivar waits: how many answers say C{Auth-Status: WAIT} before the real one.
    @ivar refusalWait: C{Auth-Wait} sent with a refusal, if any.
    """

    users: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    delay: float = 0.0
    status: int = 200
    bare: bool = False
    redirect: str | None = None
    waits: int = 0
    refusalWait: int | None = None
    requests: list[AuthRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handlerFor(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="auth-http", daemon=True)
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    def start(self) -> AuthService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def add(self, user: str, password: str | bytes, **answer: str) -> None:
        """
        Accept C{user} with C{password}, answering C{answer} as headers
        (C{Auth_Server="127.0.0.1"} is sent as C{Auth-Server}).
        """
        secret = password.encode("utf-8") if isinstance(password, str) else password
        self.users[user] = (secret, {name.replace("_", "-"): value for name, value in answer.items()})

    def asked(self, user: str | None = None) -> list[AuthRequest]:
        with self._lock:
            return [request for request in self.requests if user is None or request.user == user]

    def answer(self, raw: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        # (http.server reads header octets as Latin-1: back to octets)
        headers = {name.lower(): value.encode("latin-1") for name, value in raw.items()}
        password = urllib.parse.unquote_to_bytes(headers.get("auth-pass", b""))
        user = urllib.parse.unquote_to_bytes(headers.get("auth-user", b"")).decode("utf-8", "surrogateescape")
        with self._lock:
            self.requests.append(AuthRequest(headers, user, password))
            waiting = self.waits > 0
            if waiting:
                self.waits -= 1
        if self.delay:
            time.sleep(self.delay)
        if self.redirect is not None:
            return 302, {"Location": self.redirect}
        if self.bare:
            return self.status, {}
        if headers.get(SECRET_HEADER.lower()) != SECRET.encode():
            return self.status, {"Auth-Status": "Missing shared secret"}
        if waiting:
            return self.status, {"Auth-Status": "WAIT", "Auth-Wait": "0"}
        known = self.users.get(user)
        if known is None or known[0] != password:
            refusal = {"Auth-Status": REFUSAL}
            if self.refusalWait is not None:
                refusal["Auth-Wait"] = str(self.refusalWait)
            return self.status, refusal
        return self.status, {"Auth-Status": "OK", **known[1]}


def _handlerFor(service: AuthService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            code, headers = service.answer({name: value for name, value in self.headers.items()})
            self.send_response(code)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
