"""
C{make demo-oauth}: the OAuth 2.0 flow end to end on loopback, until
Ctrl-C.  An OAuth-only Dovecot (it takes access tokens, no passwords) checks
every token at the tests' authorization server (L{tests.oauthserver});
C{mailproxy-oauth authorize} obtains the demo user's grant with the device
flow (the demo's authorization server approves the code as if the user had
signed in); then the proxy serves clients that know only a password.

Everything lives in C{.demo-oauth/} of the checkout (or C{$DEMO_DIR}).
"""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import subprocess
import sys

from mailproxy.oauth.authorize import writeKey
from mailproxy.passwords import hashPassword
from scripts.demo import (
    CHECKOUT,
    HOST,
    LISTEN_TIMEOUT,
    LOG_NAME,
    PASSWORD,
    USER,
    DemoRunning,
    dovecotDirectory,
    lockDemoDirectory,
    raiseKeyboardInterrupt,
    serveUntilInterrupted,
)
from tests.dovecot import DovecotUpstream
from tests.oauthserver import CLIENT_ID, CLIENT_SECRET, AuthorizationServer
from tests.proxyprocess import ProxyProcess

PROXY_IMAP_PORT = int(os.environ.get("DEMO_OAUTH_IMAP_PORT", "10144"))
PROXY_POP3_PORT = int(os.environ.get("DEMO_OAUTH_POP3_PORT", "10111"))
DEMO_DIR = os.path.abspath(os.environ.get("DEMO_DIR", os.path.join(CHECKOUT, ".demo-oauth")))
# The demo user's name at the provider, and so at Dovecot.
UPSTREAM_USER = "demo@mail.test"

CONFIG = """\
# Written by `make demo-oauth`: the proxy logs in to an OAuth-only Dovecot with tokens.
[auth]
users_file = "users"

[[listener]]
name = "imap"
endpoint = "tcp:{imap}:interface=127.0.0.1"
allow_plaintext_auth = true   # loopback demo only

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{pop3}:interface=127.0.0.1"
allow_plaintext_auth = true   # POP3 users are bridged to IMAP

[upstream.dovecot]
host = "127.0.0.1"
port = {upstreamPort}
oauth2 = "demo"

[routing]
default_upstream = "dovecot"

[routing.users.demo]
username = "{upstreamUser}"

[oauth2]
token_store = "tokens"
key_file = "token.key"

[oauth2.demo]
token_endpoint = "{server}/token"
device_authorization_endpoint = "{server}/device"
authorization_endpoint = "{server}/authorize"
client_id = "{clientId}"
client_secret = "{clientSecret}"
scopes = ["mail"]
"""


def seed(upstream: DovecotUpstream, server: AuthorizationServer) -> None:
    token = server.accessToken(UPSTREAM_USER)
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    client.authenticate("XOAUTH2", lambda _: f"user={UPSTREAM_USER}\x01auth=Bearer {token}\x01\x01".encode())
    if int(client.select("INBOX")[1][0] or 0) == 0:
        message = (
            b"From: demo@mail.test\r\nSubject: Hello through OAuth 2.0\r\n\r\nLogged in upstream with a token.\r\n"
        )
        client.append("INBOX", None, None, message)
    client.logout()


def writeFiles(server: AuthorizationServer, upstream: DovecotUpstream) -> str:
    with open(os.path.join(DEMO_DIR, "users"), "w") as handle:
        handle.write(f"{USER}:{hashPassword(PASSWORD, log2N=10)}\n")
    keyPath = os.path.join(DEMO_DIR, "token.key")
    if not os.path.exists(keyPath):
        writeKey(keyPath)
    # A new authorization server each run: old grants mean nothing to it.
    shutil.rmtree(os.path.join(DEMO_DIR, "tokens"), ignore_errors=True)
    path = os.path.join(DEMO_DIR, "mailproxy.toml")
    with open(path, "w") as handle:
        handle.write(
            CONFIG.format(
                imap=PROXY_IMAP_PORT,
                pop3=PROXY_POP3_PORT,
                upstreamPort=upstream.ports["imap"],
                upstreamUser=UPSTREAM_USER,
                server=server.url,
                clientId=CLIENT_ID,
                clientSecret=CLIENT_SECRET,
            )
        )
    return path


def authorize(configPath: str) -> None:
    print("\n$ mailproxy-oauth --config mailproxy.toml authorize demo demo", flush=True)
    print("(the demo's authorization server approves the code as if you had signed in)", flush=True)
    command = [os.path.join(os.path.dirname(sys.executable), "mailproxy-oauth"), "--config", configPath]
    subprocess.run([*command, "authorize", USER, "demo"], check=True, timeout=60, stdin=subprocess.DEVNULL)


def banner(proxy: ProxyProcess, upstream: DovecotUpstream) -> str:
    return (
        f"\nmailproxy OAuth 2.0 demo: Dovecot on 127.0.0.1:{upstream.ports['imap']} takes only XOAUTH2 tokens;\n"
        f"the proxy (twistd pid {proxy.pid}) on imap://127.0.0.1:{PROXY_IMAP_PORT} and "
        f"pop3://127.0.0.1:{PROXY_POP3_PORT} takes user '{USER}', password '{PASSWORD}'.\n"
        f"The proxy logs to {DEMO_DIR}/twistd.log.\n\n"
        "Try, in another terminal:\n"
        f"  curl -u {USER}:{PASSWORD} 'imap://127.0.0.1:{PROXY_IMAP_PORT}/INBOX;UID=1'\n"
        f"  curl -u {USER}:{PASSWORD} 'pop3://127.0.0.1:{PROXY_POP3_PORT}/1'\n"
        "Ctrl-C stops everything."
    )


def main() -> int:
    signal.signal(signal.SIGTERM, raiseKeyboardInterrupt)
    os.makedirs(DEMO_DIR, exist_ok=True)
    try:
        lock = lockDemoDirectory(DEMO_DIR)
    except DemoRunning as running:
        print(f"make demo-oauth: another demo is already running in {DEMO_DIR} (pid {running})", file=sys.stderr)
        return 1
    with lock:
        server = AuthorizationServer().start()
        server.autoApprove = UPSTREAM_USER
        upstream = DovecotUpstream(dovecotDirectory(DEMO_DIR), oauth2IntrospectionUrl=server.introspectionUrl)

        def start(running: list[ProxyProcess]) -> ProxyProcess:
            upstream.start()
            seed(upstream, server)
            configPath = writeFiles(server, upstream)
            authorize(configPath)
            proxy = ProxyProcess(configPath, os.path.join(DEMO_DIR, LOG_NAME))
            running.append(proxy)
            proxy.waitForPorts([PROXY_IMAP_PORT, PROXY_POP3_PORT], timeout=LISTEN_TIMEOUT)
            print(banner(proxy, upstream), flush=True)
            return proxy

        def stopTheRest() -> None:
            upstream.stop()
            server.stop()

        return serveUntilInterrupted(
            "make demo-oauth", "the proxy, Dovecot and the authorization server", start, stopTheRest
        )


if __name__ == "__main__":
    raise SystemExit(main())
