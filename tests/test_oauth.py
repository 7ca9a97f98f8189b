"""
OAuth 2.0 upstream login (XOAUTH2 / OAUTHBEARER) end to end: clients log in
to the proxy with their local password; the proxy logs in to an OAuth-only
Dovecot (oauth2 passdb, every token checked by RFC 7662 introspection at
the tests' authorization server) with an access token it refreshes from
the user's stored, encrypted grant.  Each attack or fault is checked in
Dovecot's own log and at the authorization server, not only in the reply.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailproxy.oauth.store import StoredGrant, TokenStore, loadKeys, newKey
from tests.conftest import HOST
from tests.dovecot import DovecotUpstream
from tests.oauthserver import CLIENT_ID, CLIENT_SECRET, AuthorizationServer
from tests.proxyprocess import ProxyInFront, freePort, runningProxy
from tests.tomlconfig import authTable, listenerTable, routingTable, table, upstreamTable

USER = "olivia"
PASSWORD = "olivia's local pw"
# Her name at the provider (and so at Dovecot): not her local name.
UPSTREAM_USER = "olivia@mail.test"
OTHER = "oscar"
OTHER_PASSWORD = "oscar's local pw"
OTHER_UPSTREAM = "oscar@mail.test"
# Routed to Dovecot's POP3 (relay, AUTH XOAUTH2 upstream): olivia's mailbox.
POP_USER = "pia"
POP_PASSWORD = "pia's local pw"
WAIT = 20.0
SUBJECT = b"Subject: through OAuth"


@pytest.fixture(scope="module")
def authorizationServer() -> Iterator[AuthorizationServer]:
    server = AuthorizationServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oauthDovecot(authorizationServer: AuthorizationServer) -> Iterator[DovecotUpstream]:
    upstream = DovecotUpstream(oauth2IntrospectionUrl=authorizationServer.introspectionUrl)
    upstream.start()
    try:
        # One message in each INBOX, put there over XOAUTH2 itself.
        for name in (UPSTREAM_USER, OTHER_UPSTREAM):
            token = authorizationServer.accessToken(name)
            client = imaplib.IMAP4(HOST, upstream.ports["imap"])
            client.authenticate("XOAUTH2", lambda _, name=name, token=token: xoauth2(name, token))
            client.append("INBOX", None, None, SUBJECT + b"\r\n\r\nhello " + name.encode() + b"\r\n")
            client.logout()
        yield upstream
    finally:
        upstream.stop()


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


@dataclass
class OAuthProxy(ProxyInFront):
    """
    A proxy logging in upstream with tokens from the tests' authorization
    C{server}.

    @ivar keyDirectory: where the token store and its key are.
    """

    server: AuthorizationServer
    keyDirectory: str

    @property
    def store(self) -> TokenStore:
        return TokenStore(
            os.path.join(self.keyDirectory, "tokens"), loadKeys(os.path.join(self.keyDirectory, "token.key"))
        )

    def authorize(self, user: str, upstreamUser: str, provider: str = "test") -> None:
        """
        Store a grant for C{user}, as C{mailproxy-oauth authorize} would.
        """
        self.store.save(user, StoredGrant(provider, self.server.grant(upstreamUser), time.time()))

    def logsIn(self, user: str, password: str) -> None:
        client = self.imap()
        client.login(user, password)
        client.logout()

    def dovecotLogins(self, user: str, service: str = "imap", method: str | None = "XOAUTH2") -> int:
        return super().dovecotLogins(user, service, method)


def oauthConfig(
    directory: str,
    ports: dict[str, int],
    server: AuthorizationServer,
    dovecot: DovecotUpstream,
    routes: dict[str, dict[str, object]] | None = None,
    **oauth: object,
) -> str:
    return (
        # Two workers, so that one refresh serving both is shown.
        table("server", workers=2)
        + authTable(failureDelay=0.05)
        + listenerTable("imap", ports["imap"], allowPlaintextAuth=True)
        + listenerTable("pop3", ports["pop3"], protocol="pop3", allowPlaintextAuth=True)
        + upstreamTable("mail", dovecot.ports["imap"], oauth2="test")
        + upstreamTable("mailpop", dovecot.ports["pop3"], protocol="pop3", oauth2="test")
        + routingTable(
            "mail",
            {
                USER: {"username": UPSTREAM_USER},
                OTHER: {"username": OTHER_UPSTREAM},
                POP_USER: {"upstream": "mailpop", "username": UPSTREAM_USER},
                **(routes or {}),
            },  # type: ignore[dict-item]
        )
        + table(
            "oauth2",
            tokenStore=os.path.join(directory, "tokens"),
            keyFile=os.path.join(directory, "token.key"),
            **oauth,  # type: ignore[arg-type]
        )
        + table(
            "oauth2.test",
            tokenEndpoint=f"{server.url}/token",
            deviceAuthorizationEndpoint=f"{server.url}/device",
            authorizationEndpoint=f"{server.url}/authorize",
            clientId=CLIENT_ID,
            clientSecret=CLIENT_SECRET,
            scopes=["mail"],
        )
        # The same server, with RFC 7628's mechanism.
        + table(
            "oauth2.bearer",
            tokenEndpoint=f"{server.url}/token",
            clientId=CLIENT_ID,
            clientSecret=CLIENT_SECRET,
            mechanism="oauthbearer",
        )
    )


@pytest.fixture
def startProxy(
    authorizationServer: AuthorizationServer, oauthDovecot: DovecotUpstream, tmp_path: Path
) -> Iterator[Callable[..., OAuthProxy]]:
    server = authorizationServer
    server.accessLifetime, server.rotate, server.delay = 3600.0, False, 0.0
    server.accessTokenOctets, server.bodyDelay, server.bodyPadding = 16, 0.0, 0
    server.expireAccessTokens()
    server.refreshes.clear()
    with ExitStack() as running:

        def start(routes: dict[str, dict[str, object]] | None = None, **oauth: object) -> OAuthProxy:
            ports = {"imap": freePort(), "pop3": freePort()}
            keyDirectory = tmp_path
            (keyDirectory / "token.key").write_bytes(newKey() + b"\n")
            config = oauthConfig(str(keyDirectory), ports, server, oauthDovecot, routes, **oauth)
            directory, process = running.enter_context(
                runningProxy(
                    config,
                    {USER: PASSWORD, OTHER: OTHER_PASSWORD, POP_USER: POP_PASSWORD},
                    list(ports.values()),
                    "mp-oauth-",
                )
            )
            proxy = OAuthProxy(directory, process, ports, oauthDovecot, server, str(keyDirectory))
            return proxy

        yield start


def test_first_login_logs_in_upstream_with_a_refreshed_token(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    before = proxy.dovecotLogins(UPSTREAM_USER)
    client = proxy.imap()
    client.login(USER, PASSWORD)
    typ, data = client.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0] or 0) >= 1
    assert SUBJECT in client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0][1]  # type: ignore[index]
    client.logout()
    assert proxy.server.refreshes[UPSTREAM_USER] == 1
    assert proxy.dovecotLogins(UPSTREAM_USER) == before + 1
    log = proxy.log()
    assert "access token of olivia at test refreshed" in log
    # Never a token or a secret in the log.
    assert "at-" not in log and "rt-" not in log and CLIENT_SECRET not in log


def test_a_cached_token_serves_the_next_session_and_an_expired_one_is_refreshed(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    proxy = startProxy(refreshMargin=1)
    proxy.server.accessLifetime = 3.0
    proxy.authorize(USER, UPSTREAM_USER)
    long = proxy.imap()
    long.login(USER, PASSWORD)
    assert long.select("INBOX")[0] == "OK"
    second = proxy.imap()
    second.login(USER, PASSWORD)
    second.logout()
    assert proxy.server.refreshes[UPSTREAM_USER] == 1
    # The token expires (at the provider, and by the proxy's clock).
    time.sleep(3.2)
    third = proxy.imap()
    third.login(USER, PASSWORD)
    assert third.select("INBOX")[0] == "OK"
    third.logout()
    assert proxy.server.refreshes[UPSTREAM_USER] == 2
    # The long session, logged in with the first token, still works.
    assert long.noop()[0] == "OK"
    assert long.fetch("1", "(FLAGS)")[0] == "OK"
    long.logout()


def test_concurrent_logins_share_one_refresh(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    proxy.server.delay = 0.5

    def login(_: int) -> str:
        client = proxy.imap()
        try:
            client.login(USER, PASSWORD)
            return client.select("INBOX", readonly=True)[0]
        finally:
            client.logout()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(login, range(6)))
    assert results == ["OK"] * 6
    assert proxy.server.refreshes[UPSTREAM_USER] == 1


def test_a_revoked_grant_is_refused_with_authenticationfailed_and_says_what_to_do(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    proxy.logsIn(USER, PASSWORD)
    before = proxy.dovecotLogins(UPSTREAM_USER)
    # The user revokes the proxy's access at the provider: the cached
    # access token is refused upstream, and so is the refresh token.
    proxy.server.revoke(UPSTREAM_USER)
    proxy.loginRefused("AUTHENTICATIONFAILED", USER, PASSWORD)
    assert proxy.dovecotLogins(UPSTREAM_USER) == before
    proxy.waitForLog(
        r"test refused the grant of olivia \(invalid_grant.*mailproxy-oauth --config \S+ authorize olivia test"
    )
    # POP3 too, with its own code.
    pop = poplib.POP3(HOST, proxy.ports["pop3"], timeout=WAIT)
    pop.user(USER)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop.pass_(PASSWORD)
    pop.quit()
    # Not the client's wrong password: no lockout follows.
    proxy.authorize(USER, UPSTREAM_USER)
    proxy.logsIn(USER, PASSWORD)


def test_an_unreachable_provider_gives_unavailable_within_the_timeout(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy(timeout=1)
    proxy.authorize(USER, UPSTREAM_USER)
    # Longer than the client waits: only the proxy's own timeout answers in time.
    proxy.server.delay = 2 * WAIT
    proxy.loginRefused("UNAVAILABLE", USER, PASSWORD)
    proxy.waitForLog(r"cannot refresh the access token of olivia at test: .*no answer in 1 s")


def test_a_damaged_token_file_or_a_wrong_key_gives_unavailable_and_a_log_line(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    proxy.authorize(OTHER, OTHER_UPSTREAM)
    damaged = proxy.store.path(USER)
    with open(damaged, "r+b") as handle:
        handle.seek(20)
        handle.write(b"XXXX")
    proxy.loginRefused("UNAVAILABLE", USER, PASSWORD)
    proxy.waitForLog(r"token file \S+ of 'olivia' cannot be decrypted with oauth2.key_file")
    # Oscar's file, sealed under another key.
    other = TokenStore(proxy.store.directory, loadKeys_from(newKey()))
    other.save(OTHER, StoredGrant("test", proxy.server.grant(OTHER_UPSTREAM), time.time()))
    proxy.loginRefused("UNAVAILABLE", OTHER, OTHER_PASSWORD)
    assert proxy.server.refreshes[OTHER_UPSTREAM] == 0


def loadKeys_from(key: bytes):  # type: ignore[no-untyped-def]
    from cryptography.fernet import Fernet, MultiFernet

    return MultiFernet([Fernet(key)])


def test_pop3_bridge_and_relay_reach_the_oauth_only_dovecot(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    proxy.authorize(POP_USER, UPSTREAM_USER)
    relayed = proxy.dovecotLogins(UPSTREAM_USER, "pop3")
    for user, password in ((USER, PASSWORD), (POP_USER, POP_PASSWORD)):
        pop = poplib.POP3(HOST, proxy.ports["pop3"], timeout=WAIT)
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        assert count >= 1
        assert SUBJECT in b"\r\n".join(pop.retr(1)[1])
        pop.quit()
    # Pia's session went to Dovecot's POP3, logged in there with AUTH XOAUTH2.
    assert proxy.dovecotLogins(UPSTREAM_USER, "pop3") == relayed + 1


def test_curl_fetches_through_the_oauth_login(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    proxy.authorize(USER, UPSTREAM_USER)
    fetched = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-u",
            f"{USER}:{PASSWORD}",
            f"imap://{HOST}:{proxy.ports['imap']}/INBOX;UID=1",
        ],
        capture_output=True,
        timeout=30,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert SUBJECT in fetched.stdout


def runAuthorize(proxy: OAuthProxy, user: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mailproxy-oauth"), "--config", proxy.configPath]
        + ["authorize", user, "test", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def shown(authorizing: subprocess.Popen[str], pattern: str) -> str:
    """
    What the command's first two lines show for C{pattern}'s group.
    """
    assert authorizing.stdout is not None
    lines = authorizing.stdout.readline() + authorizing.stdout.readline()
    found = re.search(pattern, lines)
    assert found, lines
    return found.group(1)


def userCode(authorizing: subprocess.Popen[str]) -> str:
    return shown(authorizing, r"open \S+\nand enter the code (\w+)")


def test_the_device_flow_stores_a_grant_that_logs_the_user_in(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    authorizing = runAuthorize(proxy, USER)
    code = userCode(authorizing)
    # The user signs in at the provider a little later: the command polls.
    time.sleep(0.5)
    proxy.server.approve(code, UPSTREAM_USER)
    output, _ = authorizing.communicate(timeout=WAIT)
    assert authorizing.returncode == 0, output
    assert f"stored the grant of {USER} from test in {proxy.store.path(USER)}" in output
    assert os.stat(proxy.store.path(USER)).st_mode & 0o777 == 0o600
    # Sealed: neither token shows in the file.
    assert b"rt-" not in Path(proxy.store.path(USER)).read_bytes()
    client = proxy.imap()
    client.login(USER, PASSWORD)
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()


def test_a_declined_device_login_stores_nothing(startProxy: Callable[..., OAuthProxy]) -> None:
    proxy = startProxy()
    authorizing = runAuthorize(proxy, OTHER)
    proxy.server.deny(userCode(authorizing))
    output, _ = authorizing.communicate(timeout=WAIT)
    assert authorizing.returncode == 1
    assert "mailproxy-oauth: the user declined" in output
    assert not os.path.exists(proxy.store.path(OTHER))


def authorizationLink(authorizing: subprocess.Popen[str]) -> str:
    return shown(authorizing, r"open in a browser on this machine:\n(\S+)")


def visit(link: str) -> tuple[int, str]:
    """
    What a browser does with the link: sign in (the test server approves
    at once) and follow the redirect back to the command's loopback port.
    """
    try:
        with urllib.request.urlopen(link, timeout=WAIT) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_browser_flow_with_pkce_stores_a_grant_that_logs_the_user_in(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    proxy = startProxy()
    proxy.server.browserUser = UPSTREAM_USER
    authorizing = runAuthorize(proxy, USER, "--browser")
    link = authorizationLink(authorizing)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert query["code_challenge_method"] == ["S256"] and query["redirect_uri"][0].startswith("http://127.0.0.1:")
    assert visit(link) == (200, "mailproxy-oauth got the answer; you may close this window.\n")
    output, _ = authorizing.communicate(timeout=WAIT)
    assert authorizing.returncode == 0, output
    client = proxy.imap()
    client.login(USER, PASSWORD)
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()


def test_a_forged_redirect_is_refused_and_the_real_answer_still_awaited(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    """Another page sending the browser to the loopback port with a code of its own neither ends nor hijacks the flow."""
    proxy = startProxy()
    proxy.server.browserUser = OTHER_UPSTREAM
    authorizing = runAuthorize(proxy, OTHER, "--browser")
    link = authorizationLink(authorizing)
    redirect = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["redirect_uri"][0]
    assert visit(redirect + "?code=attackers-code&state=guess") == (
        400,
        "Not the answer to this authorization request.\n",
    )
    assert visit(redirect + "?error=access_denied") == (400, "Not the answer to this authorization request.\n")
    assert authorizing.poll() is None
    assert visit(link)[0] == 200
    output, _ = authorizing.communicate(timeout=WAIT)
    assert authorizing.returncode == 0, output
    proxy.logsIn(OTHER, OTHER_PASSWORD)


@pytest.mark.parametrize(("user", "password"), [(USER, PASSWORD), (POP_USER, POP_PASSWORD)], ids=["bridge", "relay"])
def test_fetchmail_fetches_through_the_oauth_login(
    startProxy: Callable[..., OAuthProxy], tmp_path: Path, user: str, password: str
) -> None:
    """A legacy POP3 client with a password, a mailbox that takes only tokens: every message arrives, and stays."""
    proxy = startProxy()
    proxy.authorize(user, UPSTREAM_USER)
    messages = tmp_path / "msgs"
    messages.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text('#!/bin/sh\nexec cat > "$1/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rc = tmp_path / "rc"
    rc.write_text(
        "set no syslog\nset no bouncemail\n"
        f'poll "{HOST}" with proto pop3 service {proxy.ports["pop3"]} timeout 30\n'
        f'  user "{user}" there with password "{password}" is root here\n'
        f'  options keep fetchall sslproto ""\n'
        f'  mda "{mda} {messages}"\n'
    )
    rc.chmod(0o600)
    fetched = subprocess.run(
        ["fetchmail", "-N", "-v", "-f", str(rc), "--idfile", str(tmp_path / "ids"), "--pidfile", str(tmp_path / "pid")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )
    delivered = [path.read_bytes() for path in messages.iterdir()]
    assert fetched.returncode == 0 and delivered, fetched.stdout[-2000:] + fetched.stderr[-2000:]
    assert any(SUBJECT in message for message in delivered)
    assert CLIENT_SECRET not in fetched.stdout + proxy.log()


def test_oauthbearer_logs_in_over_imap_and_pop3(startProxy: Callable[..., OAuthProxy]) -> None:
    """RFC 7628's mechanism, chosen per user; Dovecot's log names it."""
    proxy = startProxy(
        routes={
            OTHER: {"username": OTHER_UPSTREAM, "oauth2": "bearer"},
            POP_USER: {"upstream": "mailpop", "username": OTHER_UPSTREAM, "oauth2": "bearer"},
        }
    )
    # A grant from another provider is none for this one.
    proxy.authorize(OTHER, OTHER_UPSTREAM, "test")
    proxy.loginRefused("AUTHENTICATIONFAILED", OTHER, OTHER_PASSWORD)
    proxy.waitForLog(r"oauth2: oscar has no grant from bearer; to give one, run: mailproxy-oauth")
    proxy.authorize(OTHER, OTHER_UPSTREAM, "bearer")
    proxy.authorize(POP_USER, OTHER_UPSTREAM, "bearer")
    imap = proxy.dovecotLogins(OTHER_UPSTREAM, method="OAUTHBEARER")
    pop3 = proxy.dovecotLogins(OTHER_UPSTREAM, "pop3", "OAUTHBEARER")
    client = proxy.imap()
    client.login(OTHER, OTHER_PASSWORD)
    assert client.select("INBOX", readonly=True)[0] == "OK"
    client.logout()
    pop = poplib.POP3(HOST, proxy.ports["pop3"], timeout=WAIT)
    pop.user(POP_USER)
    pop.pass_(POP_PASSWORD)
    assert pop.stat()[0] >= 1
    pop.quit()
    assert proxy.dovecotLogins(OTHER_UPSTREAM, method="OAUTHBEARER") == imap + 1
    assert proxy.dovecotLogins(OTHER_UPSTREAM, "pop3", "OAUTHBEARER") == pop3 + 1


def test_a_token_endpoint_that_stalls_or_floods_gives_unavailable_in_time(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    """Headers at once and then nothing, or an endless answer: the timeout covers the whole answer, its size is bounded."""
    proxy = startProxy(timeout=1)
    proxy.authorize(USER, UPSTREAM_USER)
    # Longer than the client waits: only the proxy's own timeout answers in time.
    proxy.server.bodyDelay = 2 * WAIT
    proxy.loginRefused("UNAVAILABLE", USER, PASSWORD)
    proxy.server.bodyDelay, proxy.server.bodyPadding = 0.0, 1 << 20
    proxy.loginRefused("UNAVAILABLE", USER, PASSWORD)
    proxy.waitForLog(r"cannot refresh the access token of olivia at test: .*an answer of over 65536 octets")
    # The provider recovers: so do the logins.
    proxy.server.bodyPadding = 0
    proxy.logsIn(USER, PASSWORD)


def test_real_length_tokens_log_in_over_imap_and_pop3(startProxy: Callable[..., OAuthProxy]) -> None:
    """A 2 KB token: POP3 sends AUTH on its own line, then the response (RFC 2449's 255-octet lines)."""
    proxy = startProxy()
    proxy.server.accessTokenOctets = 1500
    proxy.authorize(POP_USER, UPSTREAM_USER)
    proxy.authorize(USER, UPSTREAM_USER)
    relayed = proxy.dovecotLogins(UPSTREAM_USER, "pop3")
    pop = poplib.POP3(HOST, proxy.ports["pop3"], timeout=WAIT)
    pop.user(POP_USER)
    pop.pass_(POP_PASSWORD)
    assert pop.stat()[0] >= 1
    pop.quit()
    assert proxy.dovecotLogins(UPSTREAM_USER, "pop3") == relayed + 1
    proxy.logsIn(USER, PASSWORD)


def test_a_refusal_refreshing_cannot_cure_refreshes_once_not_at_every_login(
    startProxy: Callable[..., OAuthProxy],
) -> None:
    """Tokens for oscar, but a route naming another mailbox: Dovecot refuses every one; the provider is asked twice, not twice per login."""
    proxy = startProxy(routes={OTHER: {"username": "someone-else@mail.test"}})
    proxy.authorize(OTHER, OTHER_UPSTREAM)
    for _ in range(3):
        proxy.loginRefused("AUTHENTICATIONFAILED", OTHER, OTHER_PASSWORD)
    # The first login's refresh, and one forced refresh after its refusal.
    assert proxy.server.refreshes[OTHER_UPSTREAM] == 2
