"""
Account backends in memory: the configuration, the checker's time limit
and cache, and how the realm turns an account into a session's route.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from mailproxy.accounts.checker import AccountChecker
from mailproxy.accounts.model import Account, AccountRefused, BackendUnavailable, LoginCredentials, LoginRequest
from mailproxy.accounts.registry import BackendContext, backendFactories, buildBackend
from mailproxy.auth import NoRoute, ProxyRealm
from mailproxy.config import ConfigError, parseConfig
from mailproxy.credentialscache import CredentialsCache
from mailproxy.interfaces import IProxyUser
from tests.tlssupport import parsedExample


def document(**auth: Any) -> dict[str, Any]:
    return {
        "auth": {"backend": "http", "http": {"url": "http://127.0.0.1:9/auth"}, **auth},
        "listener": [{"endpoint": "tcp:0"}],
        "upstream": {
            "main": {"host": "127.0.0.1", "port": 143},
            "tls": {"host": "mail.example", "port": 993, "tls": "implicit"},
        },
        "filters": {"ro": {"type": "policy", "read_only": True}},
        "routing": {
            "default_upstream": "main",
            "users": {"amy": {"upstream": "tls", "username": "amy@example", "password": "stored"}},
        },
    }


def test_a_backend_needs_no_users_file_and_keeps_its_settings() -> None:
    config = parseConfig(document(lookup_timeout=3, negative_ttl=0), "/etc/mailproxy")
    assert config.authBackend == "http"
    assert config.authBackendSettings == {"url": "http://127.0.0.1:9/auth"}
    assert config.lookupTimeout == 3 and config.negativeTTL == 0
    assert config.usersFile == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "ldapx"}, r"auth.backend: no account backend plugin 'ldapx' \(installed: http"),
        ({"http": {}}, r"auth.http.url: required"),
        ({"http": {"url": "ftp://x/"}}, r"auth.http.url: required, an http:// or https:// URL"),
        ({"http": {"url": "http://x/", "colour": 1}}, r"auth.http.colour: unknown key \(expected one of headers,"),
        ({"http": {"url": "http://x/", "upstream": "nope"}}, r"auth.http.upstream: no \[upstream.nope\]"),
        ({"http": {"url": "http://x/", "headers": {"X-A": "a\nb"}}}, r"auth.http.headers:"),
        ({"http": {"url": "http://x/", "max_wait": -1}}, r"auth.http.max_wait:"),
    ],
)
def test_bad_backend_settings_are_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    raw = document()
    if "backend" in change:
        # (its table would be an unknown key for another backend)
        del raw["auth"]["http"]
    raw["auth"].update(change)
    with pytest.raises(ConfigError, match=message):
        config = parseConfig(raw, "/etc/mailproxy")
        buildBackend(config, BackendContext(None, config, 1.0, None))


def test_unknown_auth_keys_are_still_refused() -> None:
    raw = document()
    raw["auth"]["ldap"] = {"url": "ldap://x"}
    with pytest.raises(ConfigError, match=r"auth.ldap: unknown key \(expected one of backend, "):
        parseConfig(raw, "/etc/mailproxy")
    with pytest.raises(ConfigError, match="lookup_timeout"):
        parseConfig(document(lookup_timeout=0), "/etc/mailproxy")


def test_the_http_backend_is_a_plugin() -> None:
    assert "http" in backendFactories()


class Backend:
    """
    A backend answering from a script: each authenticate pops the next
    answer (an Account, an exception, or a Deferred left unfired).
    """

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked: list[LoginRequest] = []

    def authenticate(self, request: LoginRequest) -> Deferred[Account]:
        self.asked.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)

    def close(self) -> None:
        pass


def checked(checker: AccountChecker, user: str = "amy", password: bytes = b"pw", protocol: str = "imap") -> Any:
    results: list[Any] = []
    checker.requestAvatarId(LoginCredentials(user.encode(), password, protocol, "192.0.2.7", True)).addBoth(
        results.append
    )
    assert results, "no answer yet"
    return results[0]


def test_a_plugins_own_unauthorized_login_is_a_refusal() -> None:
    clock = Clock()
    checker = AccountChecker(Backend(UnauthorizedLogin()), "test", clock, 5.0, CredentialsCache(60, 10, clock))
    result = checked(checker)
    assert result.check(UnauthorizedLogin) and not result.check(BackendUnavailable)


def test_what_a_checker_remembers_is_its_own() -> None:
    """After a reload (a new checker, the cache kept), the new backend is asked."""
    clock = Clock()
    cache = CredentialsCache(60, 10, clock)
    old = Backend(Account("amy", upstream="main"))
    new = Backend(Account("amy", upstream="tls"))
    assert checked(AccountChecker(old, "test", clock, 5.0, cache)) == Account("amy", upstream="main")
    assert checked(AccountChecker(new, "test", clock, 5.0, cache)) == Account("amy", upstream="tls")


def test_the_address_and_tls_are_part_of_what_is_remembered() -> None:
    clock = Clock()
    backend = Backend(Account("amy"), Account("amy"), Account("amy"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock))
    for clientIP, tls in (("192.0.2.7", True), ("192.0.2.8", True), ("192.0.2.7", False), ("192.0.2.7", True)):
        checker.requestAvatarId(LoginCredentials(b"amy", b"pw", "imap", clientIP, tls))
    assert [(request.clientIP, request.tls) for request in backend.asked] == [
        ("192.0.2.7", True),
        ("192.0.2.8", True),
        ("192.0.2.7", False),
    ]


def test_the_backend_is_asked_with_the_logins_context_and_its_account_remembered() -> None:
    clock = Clock()
    backend = Backend(Account("amy", upstream="main"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock), negativeTTL=10)
    assert checked(checker) == Account("amy", upstream="main")
    assert checked(checker) == Account("amy", upstream="main")
    (request,) = backend.asked
    assert (request.username, request.password, request.protocol, request.clientIP, request.tls) == (
        "amy",
        b"pw",
        "imap",
        "192.0.2.7",
        True,
    )
    # Another protocol, another password: asked again.
    backend.answers += [Account("amy"), AccountRefused("no")]
    checked(checker, protocol="pop3")
    assert isinstance(checked(checker, password=b"other"), Failure)
    assert len(backend.asked) == 3
    # The cache's time to live ends: asked again.
    clock.advance(61)
    backend.answers.append(Account("amy"))
    checked(checker)
    assert len(backend.asked) == 4


def test_a_refusal_is_remembered_for_the_negative_ttl_only() -> None:
    clock = Clock()
    backend = Backend(AccountRefused("wrong", wait=3.0), AccountRefused("wrong"), Account("amy"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock), negativeTTL=10)
    first = checked(checker)
    assert isinstance(first, Failure) and first.check(AccountRefused) and first.value.wait == 3.0
    again = checked(checker)
    assert again.check(UnauthorizedLogin) and len(backend.asked) == 1
    clock.advance(11)
    assert checked(checker).check(AccountRefused) and len(backend.asked) == 2
    # The right password is never refused from memory.
    assert checked(checker, password=b"right") == Account("amy")


def test_no_negative_cache_with_a_ttl_of_zero() -> None:
    clock = Clock()
    backend = Backend(AccountRefused("wrong"), AccountRefused("wrong"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock), negativeTTL=0)
    checked(checker)
    checked(checker)
    assert len(backend.asked) == 2


def test_no_answer_in_time_is_unavailable_and_never_remembered() -> None:
    clock = Clock()
    pending: Deferred[Account] = Deferred()
    backend = Backend(pending, Account("amy"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock), negativeTTL=10)
    results: list[Any] = []
    checker.requestAvatarId(LoginCredentials(b"amy", b"pw", "imap", "", False)).addBoth(results.append)
    assert not results
    clock.advance(5)
    (failure,) = results
    assert failure.check(BackendUnavailable) and "no answer in 5 s" in str(failure.value)
    assert pending.called  # cancelled, so the backend lets go of it
    assert checked(checker) == Account("amy")


@pytest.mark.parametrize(
    "answer",
    [BackendUnavailable("LDAP server down"), RuntimeError("bug in a plugin"), "not an account"],
)
def test_anything_but_an_account_or_a_refusal_is_unavailable(answer: Any) -> None:
    clock = Clock()
    backend = Backend(answer, Account("amy"))
    checker = AccountChecker(backend, "test", clock, 5.0, CredentialsCache(60, 10, clock), negativeTTL=10)
    result = checked(checker)
    assert isinstance(result, Failure) and result.check(BackendUnavailable)
    assert checked(checker) == Account("amy")


def test_accounts_travel_to_workers_as_json() -> None:
    account = Account("amy", "main", "192.0.2.1", 1143, "amy@x", "secret", ("ro",))
    assert Account.fromJSON(account.toJSON()) == account
    assert "secret" not in repr(account)
    assert "pw" not in repr(LoginRequest("amy", b"pw"))


def avatar(account: Account) -> Any:
    config = parseConfig(document(), "/etc/mailproxy")
    _, user, _ = ProxyRealm(config).requestAvatar(account, None, IProxyUser)
    return user


def test_what_the_backend_leaves_out_comes_from_the_routing() -> None:
    # amy's route: upstream "tls" as amy@example with a stored password.
    user = avatar(Account("amy"))
    assert (user.upstream.name, user.upstreamUsername, user.upstreamPassword) == ("tls", "amy@example", "stored")
    # Another upstream: the route's name and password are not for it.
    user = avatar(Account("amy", upstream="main"))
    assert (user.upstream.name, user.upstreamUsername, user.upstreamPassword) == ("main", "amy", None)
    # A user with no route of their own: the default upstream.
    user = avatar(Account("zoe", username="zoe@x", password="pw2", filters=("ro",)))
    assert (user.upstream.name, user.upstreamUsername, user.upstreamPassword, user.filters) == (
        "main",
        "zoe@x",
        "pw2",
        ("ro",),
    )


def test_an_address_from_the_backend_keeps_the_upstreams_other_settings() -> None:
    user = avatar(Account("zoe", upstream="tls", server="192.0.2.9", port=10993))
    assert (user.upstream.host, user.upstream.port, user.upstream.tls.value) == ("192.0.2.9", 10993, "implicit")
    # The certificate must still name the configured host, not the address.
    assert user.upstream.verifyName == "mail.example"


def test_an_empty_upstream_password_is_one() -> None:
    user = avatar(Account("zoe", password=""))
    assert user.upstreamCredential(b"client pw") == ""


def httpBackend() -> Any:
    config = parseConfig(document(), "/etc/mailproxy")
    return buildBackend(config, BackendContext(None, config, 1.0, None))


def answered(*pairs: tuple[bytes, bytes]) -> Any:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    try:
        return httpBackend().verdict(LoginRequest("zoe", b"pw"), 200, headers)
    except (AccountRefused, BackendUnavailable) as error:
        return error


def test_answers_are_read_as_nginx_reads_them() -> None:
    # Of a repeated header, the last counts.
    account = answered(
        (b"Auth-Status", b"OK"),
        (b"Auth-Server", b"192.0.2.1"),
        (b"Auth-Port", b"143"),
        (b"Auth-Server", b"192.0.2.2"),
        (b"Auth-Port", b"1143"),
        (b"Auth-User", b"first"),
        (b"Auth-User", b"zoe@x"),
    )
    assert (account.server, account.port, account.username) == ("192.0.2.2", 1143, "zoe@x")
    # A refusal anywhere wins over OK.
    refused = answered((b"Auth-Status", b"OK"), (b"Auth-Status", b"Account disabled"), (b"Auth-Wait", b"7"))
    assert isinstance(refused, AccountRefused) and (refused.reason, refused.wait) == ("Account disabled", 7.0)
    # WAIT: the seconds to wait before asking again (capped by max_wait).
    assert answered((b"Auth-Status", b"WAIT"), (b"Auth-Wait", b"3")) == 3.0
    assert answered((b"Auth-Status", b"WAIT"), (b"Auth-Wait", b"999")) == 30.0


@pytest.mark.parametrize(
    "pairs",
    [
        ((b"Auth-Status", b"OK"), (b"Auth-Server", b"mail.example"), (b"Auth-Port", b"143")),
        ((b"Auth-Status", b"OK"), (b"Auth-Server", b"192.0.2.1"), (b"Auth-Port", b"000001999999")),
        ((b"Auth-Status", b"OK"), (b"Auth-Server", b"192.0.2.1"), (b"Auth-Port", "١٤٣".encode())),
        ((b"Auth-Status", b"OK"), (b"Auth-Server", b"192.0.2.1")),
        ((b"Auth-Status", b"OK"), (b"Auth-Upstream", b"gone")),
        ((b"Auth-Status", b"OK"), (b"Auth-Filters", b"ro, gone")),
        ((b"Content-Type", b"text/html"),),
    ],
)
def test_an_answer_that_cannot_be_used_is_unavailable(pairs: tuple[tuple[bytes, bytes], ...]) -> None:
    assert isinstance(answered(*pairs), BackendUnavailable)


def test_a_wait_that_is_no_number_is_no_wait() -> None:
    refused = answered((b"Auth-Status", b"No"), (b"Auth-Wait", "²".encode()))
    assert isinstance(refused, AccountRefused) and refused.wait == 0.0


def test_an_account_naming_what_the_configuration_lacks_is_no_verdict() -> None:
    """A remembered account after a reload that removed its upstream or filter: unavailable, no failure."""
    with pytest.raises(BackendUnavailable, match=r"no \[upstream.gone\]"):
        avatar(Account("zoe", upstream="gone"))
    with pytest.raises(BackendUnavailable, match=r"no \[filters.gone\]"):
        avatar(Account("zoe", filters=("ro", "gone")))


def test_no_route_at_all_is_no_route() -> None:
    config = parseConfig(document(), "/etc/mailproxy")
    config = dataclasses.replace(config, defaultRoute=None)
    with pytest.raises(NoRoute):
        ProxyRealm(config).requestAvatar(Account("zoe"), None, IProxyUser)


def test_the_http_auth_example_config_is_valid(tmp_path: Path) -> None:
    """etc/mailproxy-http-auth.example.toml parses and builds its backend."""
    config = parsedExample("mailproxy-http-auth.example.toml", tmp_path)
    backend = buildBackend(config, BackendContext(None, config, config.lookupTimeout, None))
    assert backend.url == "http://127.0.0.1:9000/auth" and backend.upstream == "backends"
