"""
The LDAP account backend end to end: a private OpenLDAP directory (see
tests/slapd.py) with a deployment's access rules, a real twistd with two
workers asking it over StartTLS or LDAPS with the certificate verified,
and a real Dovecot behind.  Dovecot's log and slapd's own log (its binds,
searches and connections) show what happened, not only the replies.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyInFront, freePort, runningProxy
from tests.slapd import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, SlapdServer, binary, userDn
from tests.test_accounts_postgres import loginFrom
from tests.test_accounts_sql import (
    SAM,
    SAM_PW,
    SAM_UP,
    SID,
    SID_PW,
    SID_UP,
    SUE,
    SUE_PW,
    SUE_UP,
    UPSTREAM_USERS,
    accountsDovecot,
    assertOutageEndsByItself,
    assertRefusalsReachNoUpstream,
    assertRowsGiveHashAndRoute,
    sha512crypt,
)
from tests.tomlconfig import listenerTable, table, upstreamTable

pytestmark = pytest.mark.skipif(binary() is None, reason="slapd is not installed (make test installs it)")

WAIT = 20.0
CLEO, CLEO_PW = "cleo", "hunter2 in clear"
LOCKOUT_AFTER = 3
FILTER = "(&(objectClass=inetOrgPerson)(uid=%u)(!(employeeType=disabled)))"
# Names that, written into the filter's text, would match other entries (as IMAP quoted strings: imaplib
# sends a user name as it is given).
LDAP_INJECTIONS = ('"*"', '"sam)(uid=*"', '"*)(|(uid=*"', '"sam\\\\2a"')
ROUTE_ATTRIBUTES = {
    "upstream": "mailProxyUpstream",
    "username": "mailProxyUser",
    "upstreamPassword": "mailProxyUpstreamPassword",
    "filters": "mailProxyFilter",
}


def route(upstreamUser: str, **more: list[str]) -> dict[str, list[str]]:
    return {"mailProxyUser": [upstreamUser], "mailProxyUpstreamPassword": [UPSTREAM_USERS[upstreamUser]], **more}


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    with SlapdServer() as running:
        # sam: {SSHA} as slapd stores it; sue: {CRYPT} SHA-512, her own upstream and the read-only policy;
        # sid: disabled (the filter leaves him out).
        running.addUser(SAM, SAM_PW, extraAttributes=route(SAM_UP))
        sueHash = "{CRYPT}" + sha512crypt(SUE_PW).removeprefix("{SHA512-CRYPT}")
        running.addUser(
            SUE,
            None,
            passwordHash=sueHash,
            extraAttributes=route(SUE_UP, mailProxyUpstream=["mail"], mailProxyFilter=["readonly"]),
        )
        running.addUser(SID, SID_PW, extraAttributes=route(SID_UP, employeeType=["disabled"]))
        # cleo's password is kept in clear, as OpenLDAP does unless something hashes it.
        running.addUser(CLEO, None, passwordHash=CLEO_PW, extraAttributes=route(SID_UP))
        yield running


@pytest.fixture(scope="module")
def ldapDovecot() -> Iterator[DovecotUpstream]:
    yield from accountsDovecot()


@pytest.fixture
def startProxy(
    directory: SlapdServer, ldapDovecot: DovecotUpstream, tmp_path: Path
) -> Iterator[Callable[..., ProxyInFront]]:
    with ExitStack() as running:

        def start(**settings: Any) -> ProxyInFront:
            ports = {"imap": freePort()}
            config = proxyConfig(ports["imap"], ldapDovecot, directory, **settings)
            proxyDirectory, process = running.enter_context(runningProxy(config, {}, list(ports.values()), "mp-ldap-"))
            return ProxyInFront(proxyDirectory, process, ports, ldapDovecot)

        yield start


def proxyConfig(
    port: int,
    dovecot: DovecotUpstream,
    directory: SlapdServer,
    workers: int = 2,
    lookupTimeout: float = 2,
    cacheTtl: int | None = None,
    lockoutAfter: int = 20,
    sessionsPerUser: int | None = None,
    url: str | list[str] | None = None,
    **ldap: Any,
) -> str:
    settings: dict[str, Any] = {
        "url": url or directory.url("ldap"),
        "starttls": url is None,
        "caFile": directory.caFile,
        "bindDn": SERVICE_DN,
        "bindPassword": SERVICE_PASSWORD,
        "base": PEOPLE,
        "filter": FILTER,
        **ldap,
    }
    return (
        table("server", workers=workers)
        + table(
            "auth",
            backend="ldap",
            failureDelay=0.05,
            lookupTimeout=lookupTimeout,
            negativeTtl=0,
            cacheTtl=cacheTtl,
        )
        + table("auth.ldap", **settings)
        + table("auth.ldap.attributes", **ROUTE_ATTRIBUTES)
        + table("limits", failuresBeforeLockout=lockoutAfter, lockoutSeconds=600, maxSessionsPerUser=sessionsPerUser)
        + listenerTable("imap", port, allowPlaintextAuth=True)
        + upstreamTable("mail", dovecot.ports["imap"])
        + table("filters.readonly", type="policy", readOnly=True)
        + table("routing", defaultUpstream="mail")
    )


def test_users_bind_as_their_entry_over_starttls_and_go_where_it_says(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    verify = "bind": the search account finds the entry, the user's own password binds as it ({SSHA} and
    {CRYPT} alike, checked by slapd); Dovecot sees each login where the entry routes it.
    """
    mark = directory.logMark()
    proxy = startProxy()
    assertRowsGiveHashAndRoute(proxy)
    bound = directory.binds(mark, succeeded=True)
    assert SERVICE_DN in bound and userDn(SAM) in bound and userDn(SUE) in bound, bound
    # Every connection the proxy opened switched to TLS before binding.
    log = directory.log(mark)
    assert directory.connectionsAccepted(mark) == len(re.findall(r" EXT oid=1\.3\.6\.1\.4\.1\.1466\.20037", log))
    assert SERVICE_PASSWORD not in proxy.log()


def test_refusals_and_filter_injections_reach_neither_upstream_nor_a_bind(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    A wrong password, an unknown or disabled user, and names that would widen the search if written into the
    filter's text: refused, no upstream login; slapd searched for each name as one escaped value and bound as
    no one but the users it found.
    """
    mark = directory.logMark()
    proxy = startProxy()
    assertRefusalsReachNoUpstream(proxy, "ldap", LDAP_INJECTIONS)
    searched = [found for _, found in directory.searches(mark)]
    assert any("(uid=\\2A)" in text for text in searched), searched
    assert any("(uid=sam\\29\\28uid=\\2A)" in text for text in searched), searched
    assert any("(uid=sam\\5C2a)" in text for text in searched), searched
    users = {dn for dn in directory.binds(mark) if dn != SERVICE_DN}
    # Only sam's wrong password reached a bind (found, then refused by slapd).
    assert users == {userDn(SAM)}, users


def test_an_empty_password_never_binds(directory: SlapdServer, startProxy: Callable[..., ProxyInFront]) -> None:
    """LDAP takes a bind with a DN and no password as anonymous, and succeeds: it must never be sent."""
    proxy = startProxy()
    mark = directory.logMark()
    before = proxy.dovecotLogins(SAM_UP)
    proxy.loginRefused("AUTHENTICATIONFAILED", SAM, "")
    assert userDn(SAM) not in directory.binds(mark)
    assert proxy.dovecotLogins(SAM_UP) == before


def test_stored_hashes_are_checked_by_the_proxy_over_ldaps(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """verify = "hash": the search account reads userPassword; users never bind, wrong passwords are refused."""
    mark = directory.logMark()
    proxy = startProxy(url=directory.url("ldaps"), verify="hash")
    assertRowsGiveHashAndRoute(proxy)
    proxy.loginRefused("AUTHENTICATIONFAILED", SAM, "a guess")
    proxy.loginRefused("AUTHENTICATIONFAILED", "nobody", SAM_PW)
    proxy.waitForLog(r"account backend ldap refused nobody: unknown user")
    assert set(directory.binds(mark)) == {SERVICE_DN}


def test_connections_are_reused_across_logins(directory: SlapdServer, startProxy: Callable[..., ProxyInFront]) -> None:
    """Nine logins (no cache) open at most a search and a bind connection per worker, and nine more open none."""
    proxy = startProxy(cacheTtl=0)
    mark = directory.logMark()
    for _ in range(9):
        proxy.login(SAM, SAM_PW).logout()
    opened = directory.connectionsAccepted(mark)
    assert 2 <= opened <= 4, opened
    mark = directory.logMark()
    for _ in range(9):
        proxy.login(SAM, SAM_PW).logout()
    assert directory.connectionsAccepted(mark) == 0
    assert len(directory.binds(mark, succeeded=True)) == 9


def test_a_directory_whose_certificate_names_another_host_is_never_sent_a_password(
    ldapDovecot: DovecotUpstream, tmp_path: Path
) -> None:
    """StartTLS and LDAPS alike: the name is checked, the login is UNAVAILABLE, and slapd sees no bind."""
    with SlapdServer(serverNames=("ldap.elsewhere.example",)) as impostor, ExitStack() as running:
        mark = impostor.logMark()
        for url, startTLS in ((impostor.url("ldap"), True), (impostor.url("ldaps"), False)):
            port = freePort()
            config = proxyConfig(port, ldapDovecot, impostor, url=url, starttls=startTLS)
            proxyDirectory, process = running.enter_context(runningProxy(config, {}, [port], "mp-ldap-"))
            proxy = ProxyInFront(proxyDirectory, process, {"imap": port}, ldapDovecot)
            proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
            proxy.waitForLog(r"account backend ldap unavailable for sam: .*VerificationError.*IPAddressMismatch")
        assert impostor.binds(mark) == []


def test_an_outage_is_unavailable_without_lockout_and_ends_by_itself(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    proxy = startProxy(lockoutAfter=LOCKOUT_AFTER)
    assertOutageEndsByItself(proxy, "ldap", directory.stop, directory.start, LOCKOUT_AFTER)
    proxy.waitForLog(r"account backend ldap unavailable for sue: .*cannot connect")


def test_a_hung_directory_ends_each_lookup_in_time_and_blocks_no_one_else(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    slapd stopped dead (SIGSTOP: connections open, nothing answered): 12 lookups at once from 12 addresses end
    UNAVAILABLE within the lookup time, a user the cache knows still logs in meanwhile, and once slapd answers
    again so does everyone.
    """
    proxy = startProxy(workers=1, lookupTimeout=2)
    proxy.login(SAM, SAM_PW).logout()
    directory.freeze()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(12) as clients:
            waiting = [clients.submit(loginFrom, proxy, number, f"nobody{number}", "pw") for number in range(12)]
            proxy.login(SAM, SAM_PW).logout()
            replies = [reply.result() for reply in waiting]
        assert all(reply.startswith(b"l NO [UNAVAILABLE]") for reply in replies), replies
        assert time.monotonic() - started < 10
    finally:
        directory.thaw()
    proxy.awaitLogin(SUE, SUE_PW, "slapd answering again", WAIT)


def test_a_wrong_search_password_is_unavailable_and_a_reload_mends_it(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    proxy = startProxy(bindPassword="not the service's")
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    proxy.waitForLog(r"account backend ldap unavailable for sam: .*the search account cannot bind: InvalidCredentials")
    assert "not the service's" not in proxy.log()
    Path(proxy.configPath).write_text(proxyConfig(proxy.ports["imap"], proxy.dovecot, directory))
    os.kill(proxy.process.pid, signal.SIGHUP)
    proxy.waitForLog(r"reloading 2 workers")
    proxy.awaitLogin(SAM, SAM_PW, "the reloaded settings", WAIT)
    assert SERVICE_PASSWORD not in proxy.log()


def test_a_filter_finding_two_entries_is_an_error_not_a_login(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """Both sam and sue have mail at the same domain: a filter on it is ambiguous, and nobody logs in by it."""
    proxy = startProxy(filter="(|(uid=%u)(mail=*@example.org))")
    before = proxy.dovecotLogins(SAM_UP)
    proxy.loginRefused("UNAVAILABLE", SAM, SAM_PW)
    proxy.waitForLog(r"account backend ldap unavailable for sam: .*more than one entry")
    assert proxy.dovecotLogins(SAM_UP) == before


def test_a_user_is_one_account_however_the_name_is_spelt(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    The directory finds uid=sam for "SAM" and "Sam" too: with one session allowed per user, the other spellings
    are refused while sam's session lasts, and Dovecot sees one login.
    """
    proxy = startProxy(sessionsPerUser=1)
    before = proxy.dovecotLogins(SAM_UP)
    held = proxy.login(SAM, SAM_PW)
    for spelling in ("SAM", "Sam"):
        client = proxy.imap()
        with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
            client.login(spelling, SAM_PW)
        client.logout()
    proxy.waitForLog(r"session refused: ip=127\.0\.0\.1 protocol=imap user=sam: too many sessions")
    assert proxy.dovecotLogins(SAM_UP) == before + 1
    held.logout()
    proxy.login("SAM", SAM_PW).logout()
    assert proxy.dovecotLogins(SAM_UP) == before + 2


def test_a_hung_first_directory_hands_over_to_the_next_within_the_lookup_time(
    directory: SlapdServer, ldapDovecot: DovecotUpstream
) -> None:
    """
    The first URL's slapd is stopped dead (connections accepted, nothing answered): logins still succeed through
    the second within the lookup time, and the next ones go straight to the second.
    """
    with SlapdServer(ca=directory.ca) as hung, ExitStack() as running:
        hung.freeze()
        try:
            port = freePort()
            urls = [hung.url("ldap"), directory.url("ldap")]
            config = proxyConfig(port, ldapDovecot, directory, url=urls, starttls=True, lookupTimeout=4, cacheTtl=0)
            proxyDirectory, process = running.enter_context(runningProxy(config, {}, [port], "mp-ldap-"))
            proxy = ProxyInFront(proxyDirectory, process, {"imap": port}, ldapDovecot)
            mark = directory.logMark()
            before = proxy.dovecotLogins(SAM_UP)
            for _ in range(3):
                proxy.login(SAM, SAM_PW).logout()
            assert proxy.dovecotLogins(SAM_UP) == before + 3
            assert directory.binds(mark).count(userDn(SAM)) == 3
            assert "authentication failure" not in proxy.log() and "unavailable" not in proxy.log()
        finally:
            hung.thaw()


def test_respelling_a_name_gives_no_more_guesses(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    The directory finds uid=sam for SAM, " sam" and "Sam ": three wrong passwords under three spellings, from
    three addresses, lock sam out, so that even sam's right password from a fourth is refused and never reaches
    Dovecot (counted per spelling, sam would log in).
    """
    proxy = startProxy(lockoutAfter=LOCKOUT_AFTER, cacheTtl=0)
    mark = directory.logMark()
    before = proxy.dovecotLogins(SAM_UP)
    for number, spelling in enumerate(('"SAM"', '" sam"', '"Sam "')):
        assert loginFrom(proxy, number, spelling, "a guess").startswith(b"l NO [AUTHENTICATIONFAILED]")
    # Each spelling found sam's entry and was refused by a bind as it.
    assert directory.binds(mark).count(userDn(SAM)) == LOCKOUT_AFTER
    assert loginFrom(proxy, LOCKOUT_AFTER, SAM, SAM_PW).startswith(b"l NO [AUTHENTICATIONFAILED]")
    proxy.waitForLog(r"authentication lockout: .*user=sam")
    assert proxy.dovecotLogins(SAM_UP) == before


def test_a_password_kept_in_clear_is_never_compared_nor_logged(
    directory: SlapdServer, startProxy: Callable[..., ProxyInFront]
) -> None:
    """
    verify = "hash" and a userPassword without a scheme: even its own text does not log in (UNAVAILABLE, no
    upstream login), and no part of it reaches the proxy's log.
    """
    proxy = startProxy(verify="hash")
    before = proxy.dovecotLogins(SID_UP)
    proxy.loginRefused("UNAVAILABLE", CLEO, CLEO_PW)
    proxy.waitForLog(r"account backend ldap unavailable for cleo: .*unsupported scheme \(no \{SCHEME\} prefix\)")
    assert "hunt" not in proxy.log()
    assert proxy.dovecotLogins(SID_UP) == before
