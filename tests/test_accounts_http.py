"""
The HTTP account backend (nginx's auth_http protocol) end to end: a real
twistd with two workers asks the tests' authentication service (in this
process) about each login and relays to a real Dovecot where the service
says.  What each attack or fault did is checked in Dovecot's own log and
in what the service was asked, not only in the proxy's reply.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailproxy.accounts.http import escape
from tests.authhttpserver import SECRET, SECRET_HEADER, AuthService
from tests.conftest import HOST
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyInFront, freePort, runningProxy
from tests.rawclient import imapLogin
from tests.tomlconfig import listenerTable, table, upstreamTable

WAIT = 20.0
# Local names and passwords (the service knows them) and where the service
# sends each: its Dovecot name and password.
HUGO, HUGO_PW = "hugo", "hugo's local pw"
HUGO_UP, HUGO_UP_PW = "hugo@mail.test", "hugo upstream pw"
HANA, HANA_PW = "hana", "hana local pw"
HANA_UP, HANA_UP_PW = "hana@mail.test", "hana upstream pw"
ODD, ODD_PW = "odd", "100% sure é"
ODD_UP, ODD_UP_PW = "odd@mail.test", "odd upstream pw"
READER, READER_PW = "reader", "reader local pw"
READER_UP, READER_UP_PW = "reader@mail.test", "reader upstream pw"
UPSTREAM_USERS = {HUGO_UP: HUGO_UP_PW, HANA_UP: HANA_UP_PW, ODD_UP: ODD_UP_PW, READER_UP: READER_UP_PW}
MESSAGE = b"Subject: through auth_http\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def mailDovecot() -> Iterator[DovecotUpstream]:
    upstream = DovecotUpstream()
    upstream.addUsers(UPSTREAM_USERS)
    upstream.start()
    try:
        for name, password in UPSTREAM_USERS.items():
            client = imaplib.IMAP4(HOST, upstream.ports["imap"])
            client.login(name, password)
            client.append("INBOX", None, None, MESSAGE)
            client.logout()
        yield upstream
    finally:
        upstream.stop()


@dataclass
class HTTPProxy(ProxyInFront):
    service: AuthService


def httpConfig(
    ports: dict[str, int], service: AuthService, dovecot: DovecotUpstream, workers: int, url: str | None = None
) -> str:
    return (
        table("server", workers=workers)
        + table("auth", backend="http", lookupTimeout=1.5, failureDelay=0.05, negativeTtl=60)
        + table("auth.http", url=url or service.url, upstream="nowhere")
        + f'\n[auth.http.headers]\n"{SECRET_HEADER}" = "{SECRET}"\n'
        + listenerTable("imap", ports["imap"], allowPlaintextAuth=True)
        + listenerTable("pop3", ports["pop3"], protocol="pop3", allowPlaintextAuth=True)
        # Where Auth-Server and Auth-Port send a session: this upstream's
        # settings, their address; its own port has nothing listening.
        + upstreamTable("nowhere", freePort())
        + upstreamTable("mail", dovecot.ports["imap"])
        + upstreamTable("mailpop", dovecot.ports["pop3"], protocol="pop3")
        + table("filters.readonly", type="policy", readOnly=True)
        + table("routing", defaultUpstream="mail")
        # Fewer failures than the tests' unavailable logins lock a user out.
        + table("limits", failuresBeforeLockout=3)
    )


@pytest.fixture
def service() -> Iterator[AuthService]:
    running = AuthService().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def startProxy(service: AuthService, mailDovecot: DovecotUpstream) -> Iterator[Callable[..., HTTPProxy]]:
    imapPort = str(mailDovecot.ports["imap"])
    service.add(HUGO, HUGO_PW, Auth_Server="127.0.0.1", Auth_Port=imapPort, Auth_User=HUGO_UP, Auth_Pass=HUGO_UP_PW)
    service.add(HANA, HANA_PW, Auth_User=HANA_UP, Auth_Pass=HANA_UP_PW)
    service.add(ODD, ODD_PW, Auth_Upstream="mail", Auth_User=ODD_UP, Auth_Pass=ODD_UP_PW)
    service.add(READER, READER_PW, Auth_User=READER_UP, Auth_Pass=READER_UP_PW, Auth_Filters="readonly")
    with ExitStack() as running:

        def start(workers: int = 2) -> HTTPProxy:
            ports = {"imap": freePort(), "pop3": freePort()}
            config = httpConfig(ports, service, mailDovecot, workers)
            directory, process = running.enter_context(runningProxy(config, {}, list(ports.values()), "mp-http-"))
            return HTTPProxy(directory, process, ports, mailDovecot, service)

        yield start


@pytest.mark.parametrize("workers", [1, 2])
def test_the_service_decides_the_login_and_where_the_session_goes(
    startProxy: Callable[..., HTTPProxy], workers: int
) -> None:
    proxy = startProxy(workers)
    before = proxy.dovecotLogins(HUGO_UP)
    client = proxy.imap()
    client.login(HUGO, HUGO_PW)
    typ, data = client.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0] or 0) >= 1
    client.logout()
    # Dovecot saw the name and password the service answered, at the
    # address it answered (the configured upstream's port is closed).
    assert proxy.dovecotLogins(HUGO_UP) == before + 1
    (asked,) = proxy.service.asked(HUGO)
    headers = asked.headers
    assert headers["auth-method"] == b"plain"
    assert headers["auth-protocol"] == b"imap"
    assert headers["auth-login-attempt"] == b"1"
    assert headers["client-ip"] == b"127.0.0.1"
    assert headers[SECRET_HEADER.lower()] == SECRET.encode()
    assert "auth-ssl" not in headers
    assert asked.password == HUGO_PW.encode()
    # The password is never logged.
    assert HUGO_PW not in proxy.log() and HUGO_UP_PW not in proxy.log()


def test_pop3_asks_with_its_protocol_and_relays_to_the_upstream_named(
    startProxy: Callable[..., HTTPProxy], service: AuthService
) -> None:
    proxy = startProxy()
    service.add(HANA, HANA_PW, Auth_Upstream="mailpop", Auth_User=HANA_UP, Auth_Pass=HANA_UP_PW)
    before = proxy.dovecotLogins(HANA_UP, "pop3")
    client = poplib.POP3(HOST, proxy.ports["pop3"], timeout=WAIT)
    client.user(HANA)
    client.pass_(HANA_PW)
    count, _ = client.stat()
    assert count >= 1
    client.quit()
    assert proxy.dovecotLogins(HANA_UP, "pop3") == before + 1
    assert [request.headers["auth-protocol"] for request in service.asked(HANA)] == [b"pop3"]


def test_a_refusal_fails_the_login_and_the_same_wrong_password_is_refused_from_memory(
    startProxy: Callable[..., HTTPProxy], service: AuthService
) -> None:
    proxy = startProxy()
    before = proxy.dovecotLogins(HUGO_UP)
    proxy.loginRefused("AUTHENTICATIONFAILED", HUGO, "a guess")
    proxy.waitForLog(r"authentication failure: ip=127\.0\.0\.1 protocol=imap user=hugo")
    assert len(service.asked(HUGO)) == 1
    # The same guess again: refused without asking (negative_ttl), and
    # still a failure that counts.
    proxy.loginRefused("AUTHENTICATIONFAILED", HUGO, "a guess")
    assert len(service.asked(HUGO)) == 1
    assert len(re.findall(r"authentication failure: ip=127\.0\.0\.1 protocol=imap user=hugo", proxy.log())) == 2
    # The right password is asked about, and accepted; then remembered.
    for _ in range(2):
        client = proxy.imap()
        client.login(HUGO, HUGO_PW)
        client.logout()
    assert len(service.asked(HUGO)) == 2
    assert proxy.dovecotLogins(HUGO_UP) == before + 2


@pytest.mark.parametrize("fault", ["http-500", "slow", "down", "unknown-upstream", "redirect"])
def test_an_unusable_service_answers_unavailable_and_locks_nobody_out(
    startProxy: Callable[..., HTTPProxy], service: AuthService, fault: str
) -> None:
    proxy = startProxy()
    before = proxy.dovecotLogins(HANA_UP)
    elsewhere = AuthService().start()
    elsewhere.add(HANA, HANA_PW, Auth_User=HANA_UP, Auth_Pass=HANA_UP_PW)
    if fault == "http-500":
        service.status, service.bare = 500, True
    elif fault == "redirect":
        service.redirect = elsewhere.url
    elif fault == "slow":
        service.delay = 3.0
    elif fault == "down":
        service.stop()
    else:
        service.add(HANA, HANA_PW, Auth_Upstream="elsewhere")
    # More attempts than a lockout takes (3): none of them counts.
    for _ in range(6):
        proxy.loginRefused("UNAVAILABLE", HANA, HANA_PW)
    # A redirect is never followed: the password goes nowhere else.
    assert not elsewhere.asked()
    elsewhere.stop()
    reason = {
        "http-500": "HTTP 500 without Auth-Status",
        "redirect": "HTTP 302 without Auth-Status",
        "slow": r"no answer in 1\.5 s",
        "down": "Connection refused",
        "unknown-upstream": r"Auth-Upstream names no \[upstream\.elsewhere\]",
    }[fault]
    proxy.waitForLog(rf"account backend http unavailable for hana: .*{reason}")
    proxy.waitForLog(r"login of hana not checked")
    assert "authentication failure" not in proxy.log()
    assert proxy.dovecotLogins(HANA_UP) == before
    if fault == "down":
        return
    service.status, service.bare, service.redirect, service.delay = 200, False, None, 0.0
    service.add(HANA, HANA_PW, Auth_User=HANA_UP, Auth_Pass=HANA_UP_PW)
    client = proxy.imap()
    client.login(HANA, HANA_PW)
    client.logout()
    assert proxy.dovecotLogins(HANA_UP) == before + 1


def test_a_slow_service_holds_up_no_other_session(startProxy: Callable[..., HTTPProxy], service: AuthService) -> None:
    proxy = startProxy(workers=1)
    working = proxy.imap()
    working.login(HUGO, HUGO_PW)
    working.select("INBOX", readonly=True)
    service.delay = 3.0
    refused: list[BaseException] = []

    def slowLogin() -> None:
        try:
            proxy.loginRefused("UNAVAILABLE", HANA, HANA_PW)
        except BaseException as error:
            refused.append(error)

    waiting = threading.Thread(target=slowLogin)
    waiting.start()
    # While the one worker waits for the service, the logged-in session
    # is served: a NOOP round trip per 50 ms until the login is refused.
    rounds = 0
    while waiting.is_alive():
        assert working.noop()[0] == "OK"
        rounds += 1
        time.sleep(0.05)
    waiting.join()
    assert not refused, refused
    assert rounds >= 5
    working.logout()


def test_the_service_can_set_the_users_filters(
    startProxy: Callable[..., HTTPProxy], mailDovecot: DovecotUpstream
) -> None:
    proxy = startProxy()
    client = proxy.imap()
    client.login(READER, READER_PW)
    # The read-only policy the service named opens mailboxes read-only and
    # refuses what would write.
    with pytest.raises(imaplib.IMAP4.readonly):
        client.select("INBOX")
    # (imaplib refuses any further command, LOGOUT too)
    client.shutdown()
    client = proxy.imap()
    client.login(READER, READER_PW)
    appended = client.append("INBOX", None, None, MESSAGE)
    assert appended[0] == "NO", appended
    client.shutdown()
    # Dovecot's state, asked directly: no flag, no second message.
    direct = imaplib.IMAP4(HOST, mailDovecot.ports["imap"])
    direct.login(READER_UP, READER_UP_PW)
    typ, data = direct.select("INBOX", readonly=True)
    assert int(data[0] or 0) == 1
    assert b"\\Flagged" not in direct.fetch("1", "(FLAGS)")[1][0]  # type: ignore[operator]
    direct.logout()


def test_odd_passwords_are_escaped_as_nginx_sends_them(
    startProxy: Callable[..., HTTPProxy], service: AuthService
) -> None:
    proxy = startProxy()
    assert imapLogin(proxy.ports["imap"], ODD, ODD_PW, HOST).startswith(b"a OK")
    (asked,) = service.asked(ODD)
    # As nginx: space, "%" and control characters escaped, UTF-8 as it is.
    assert asked.headers["auth-pass"] == "100%25%20sure%20é".encode()
    assert asked.password == ODD_PW.encode()
    assert escape(b"a b%c\x01\r\n\x7f\xc3\xa9") == b"a%20b%25c%01%0D%0A\x7f\xc3\xa9"


def test_wait_asks_again(startProxy: Callable[..., HTTPProxy], service: AuthService) -> None:
    proxy = startProxy()
    service.waits = 2
    client = proxy.imap()
    client.login(HANA, HANA_PW)
    client.logout()
    assert len(service.asked(HANA)) == 3


def test_a_reload_asks_the_service_the_new_configuration_names(
    startProxy: Callable[..., HTTPProxy], service: AuthService, mailDovecot: DovecotUpstream, tmp_path: Path
) -> None:
    proxy = startProxy()
    other = AuthService().start()
    try:
        other.add(HANA, "hana's new pw", Auth_User=HANA_UP, Auth_Pass=HANA_UP_PW)
        config = Path(proxy.configPath).read_text().replace(service.url, other.url)
        Path(proxy.configPath).write_text(config)
        os.kill(proxy.process.pid, signal.SIGHUP)
        proxy.waitForLog(r"reloading 2 workers")
        deadline = time.monotonic() + WAIT
        while not other.asked(HANA):
            assert time.monotonic() < deadline, "the reloaded service was never asked"
            client = proxy.imap()
            try:
                client.login(HANA, "hana's new pw")
            except imaplib.IMAP4.error:
                time.sleep(0.2)
            finally:
                client.logout()
        client = proxy.imap()
        client.login(HANA, "hana's new pw")
        client.logout()
    finally:
        other.stop()


def test_a_refusal_with_another_http_status_still_counts(
    startProxy: Callable[..., HTTPProxy], service: AuthService
) -> None:
    """nginx reads Auth-Status whatever the status line says: a 403 refusal is a refusal."""
    proxy = startProxy()
    service.status = 403
    proxy.loginRefused("AUTHENTICATIONFAILED", HANA, "a guess")
    proxy.waitForLog(r"authentication failure: ip=127\.0\.0\.1 protocol=imap user=hana")
    proxy.waitForLog(r"account backend http refused hana: Invalid login or password")


def test_each_attempt_on_a_connection_is_numbered_and_each_address_asked_for_itself(
    startProxy: Callable[..., HTTPProxy], service: AuthService
) -> None:
    proxy = startProxy()
    client = proxy.imap()
    with pytest.raises(imaplib.IMAP4.error):
        client.login(HANA, "a guess")
    client.login(HANA, HANA_PW)
    client.logout()
    assert [request.headers["auth-login-attempt"] for request in service.asked(HANA)] == [b"1", b"2"]
    # Remembered for 127.0.0.1 only: another address is asked about again.
    assert imapLogin(proxy.ports["imap"], HANA, HANA_PW, HOST).startswith(b"a OK")
    assert len(service.asked(HANA)) == 2
    assert imapLogin(proxy.ports["imap"], HANA, HANA_PW, "127.0.0.2").startswith(b"a OK")
    assert [request.headers["client-ip"] for request in service.asked(HANA)][-1] == b"127.0.0.2"
