"""
A small OAuth 2.0 authorization server for the tests, on 127.0.0.1: the
token endpoint (RFC 6749: refresh_token and authorization_code with PKCE,
RFC 7636; RFC 8628 device_code), the device authorization endpoint (RFC
8628), an authorization endpoint that approves at once for
L{AuthorizationServer.browserUser}, and token introspection (RFC 7662) for
Dovecot's oauth2 passdb, which needs HTTP Basic client authentication.

The tests steer it: grant, revoke, expire access tokens, approve or deny
device codes, delay answers, and count what was asked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "mailproxy-tests"
CLIENT_SECRET = "client secret"
INTROSPECTION_USER, INTROSPECTION_PASSWORD = "dovecot", "introspection-pw"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Device:
    userCode: str
    expires: float
    interval: float
    user: str | None = None
    denied: bool = False
    lastPoll: float = 0.0


@dataclass
class _State:
    refreshTokens: dict[str, str] = field(default_factory=dict)  # token -> user
    accessTokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user, expiry)
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code -> state
    codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # code -> (user, challenge, redirect)


class AuthorizationServer:
    """
    The server, running in a thread of the test process until L{stop}.

    @ivar accessLifetime: C{expires_in} of new access tokens, seconds.
    @ivar rotate: issue a new refresh token with every refresh (the old
        one stops working).
    @ivar delay: seconds every token endpoint answer waits (a slow or
        unreachable provider).
    """

    def __init__(self) -> None:
        self.state = _State()
        self.lock = threading.Lock()
        self.accessLifetime = 3600.0
        self.rotate = False
        self.delay = 0.0
        self.deviceInterval = 0.2
        # Random octets in an access token: real ones run to 1-2 KB.
        self.accessTokenOctets = 16
        # A misbehaving token endpoint: the body this long after the
        # headers, or a body this long (padding inside the JSON).
        self.bodyDelay = 0.0
        self.bodyPadding = 0
        self.browserUser: str | None = None
        # Approve every device code at its first poll, as this user (a demo).
        self.autoApprove: str | None = None
        self.refreshes: Counter[str] = Counter()
        self.introspections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handlerFor(server))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="oauth-server", daemon=True)

    @property
    def introspectionUrl(self) -> str:
        return f"http://{INTROSPECTION_USER}:{INTROSPECTION_PASSWORD}@127.0.0.1:{self.port}/introspect"

    def start(self) -> AuthorizationServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what the tests do -------------------------------------------------

    def grant(self, user: str) -> str:
        """
        A refresh token for C{user}, as if they had authorized the proxy.
        """
        token = "rt-" + secrets.token_urlsafe(16)
        with self.lock:
            self.state.refreshTokens[token] = user
        return token

    def accessToken(self, user: str) -> str:
        """
        An access token for C{user}, issued directly (to seed a mailbox).
        """
        with self.lock:
            return self._issueAccess(user)

    def revoke(self, user: str) -> None:
        """
        Revoke every token of C{user}, as a user does in the provider's
        account page.
        """
        with self.lock:
            for tokens in (self.state.refreshTokens,):
                for token in [token for token, owner in tokens.items() if owner == user]:
                    del tokens[token]
            for token in [token for token, (owner, _) in self.state.accessTokens.items() if owner == user]:
                del self.state.accessTokens[token]

    def expireAccessTokens(self) -> None:
        with self.lock:
            self.state.accessTokens.clear()

    def approve(self, userCode: str, user: str) -> None:
        with self.lock:
            self._device(userCode).user = user

    def deny(self, userCode: str) -> None:
        with self.lock:
            self._device(userCode).denied = True

    def _device(self, userCode: str) -> _Device:
        for device in self.state.devices.values():
            if device.userCode == userCode:
                return device
        raise KeyError(userCode)

    # -- the endpoints, under the lock -------------------------------------------

    def _issueAccess(self, user: str) -> str:
        token = "at-" + secrets.token_urlsafe(self.accessTokenOctets)
        self.state.accessTokens[token] = (user, time.time() + self.accessLifetime)
        return token

    def _tokens(self, user: str, refreshToken: str | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "access_token": self._issueAccess(user),
            "token_type": "Bearer",
            "expires_in": self.accessLifetime,
            "scope": "mail",
        }
        if refreshToken is None:
            refreshToken = "rt-" + secrets.token_urlsafe(16)
            self.state.refreshTokens[refreshToken] = user
            answer["refresh_token"] = refreshToken
        return answer

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client"}
        grantType = form.get("grant_type")
        if grantType == "refresh_token":
            user = self.state.refreshTokens.get(form.get("refresh_token", ""))
            if user is None:
                return 400, {"error": "invalid_grant", "error_description": "refresh token revoked or unknown"}
            self.refreshes[user] += 1
            if self.rotate:
                del self.state.refreshTokens[form["refresh_token"]]
                return 200, self._tokens(user)
            return 200, self._tokens(user, form["refresh_token"])
        if grantType == DEVICE_GRANT:
            code = form.get("device_code", "")
            device = self.state.devices.get(code)
            now = time.time()
            if device is None:
                return 400, {"error": "invalid_grant"}
            if now > device.expires:
                del self.state.devices[code]
                return 400, {"error": "expired_token"}
            if device.denied:
                del self.state.devices[code]
                return 400, {"error": "access_denied"}
            tooSoon = now - device.lastPoll < device.interval * 0.9
            device.lastPoll = now
            if device.user is None and self.autoApprove is not None:
                device.user = self.autoApprove
            if device.user is None:
                return 400, {"error": "slow_down" if tooSoon else "authorization_pending"}
            del self.state.devices[code]
            return 200, self._tokens(device.user)
        if grantType == "authorization_code":
            issued = self.state.codes.pop(form.get("code", ""), None)
            if issued is None:
                return 400, {"error": "invalid_grant"}
            user, challenge, redirect = issued
            verifier = form.get("code_verifier", "")
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if computed != challenge or form.get("redirect_uri") != redirect:
                return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}
            return 200, self._tokens(user)
        return 400, {"error": "unsupported_grant_type"}

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        code = secrets.token_urlsafe(24)
        userCode = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
        self.state.devices[code] = _Device(userCode, time.time() + 600, self.deviceInterval)
        return 200, {
            "device_code": code,
            "user_code": userCode,
            "verification_uri": f"{self.url}/device-login",
            "expires_in": 600,
            "interval": self.deviceInterval,
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """
        The browser's visit: approve at once for L{browserUser}; the
        redirect target.
        """
        redirect = query.get("redirect_uri", "")
        host = urllib.parse.urlsplit(redirect).hostname
        if query.get("client_id") != CLIENT_ID or host not in ("127.0.0.1", "localhost", "::1"):
            return 400, ""
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, ""
        separator = "&" if "?" in redirect else "?"
        if self.browserUser is None:
            parameters = {"error": "access_denied", "state": query.get("state", "")}
        else:
            code = secrets.token_urlsafe(16)
            self.state.codes[code] = (self.browserUser, query["code_challenge"], redirect)
            parameters = {"code": code, "state": query.get("state", "")}
        return 302, redirect + separator + urllib.parse.urlencode(parameters)

    def introspect(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        expected = "Basic " + base64.b64encode(f"{INTROSPECTION_USER}:{INTROSPECTION_PASSWORD}".encode()).decode()
        if authorization != expected:
            return 401, {"error": "invalid_client"}
        self.introspections += 1
        found = self.state.accessTokens.get(form.get("token", ""))
        if found is None or found[1] < time.time():
            return 200, {"active": False}
        user, expiry = found
        return 200, {"active": True, "username": user, "scope": "mail", "exp": int(expiry), "client_id": CLIENT_ID}


def _handlerFor(server: AuthorizationServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, code: int, document: dict[str, Any], misbehave: bool = False) -> None:
            if misbehave and server.bodyPadding:
                document = {**document, "padding": "x" * server.bodyPadding}
            body = json.dumps(document).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if misbehave and server.bodyDelay:
                self.wfile.flush()
                time.sleep(server.bodyDelay)
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            path = urllib.parse.urlsplit(self.path).path
            server.requests.append((path, form))
            if path == "/introspect":
                with server.lock:
                    code, document = server.introspect(form, self.headers.get("Authorization", ""))
                self._answer(code, document)
                return
            if server.delay:
                time.sleep(server.delay)
            with server.lock:
                if path == "/token":
                    code, document = server.token(form)
                elif path == "/device":
                    code, document = server.device(form)
                else:
                    code, document = 404, {"error": "not_found"}
            self._answer(code, document, misbehave=True)

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            if parts.path != "/authorize":
                self._answer(404, {"error": "not_found"})
                return
            with server.lock:
                code, location = server.authorize(dict(urllib.parse.parse_qsl(parts.query)))
            self.send_response(code)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
