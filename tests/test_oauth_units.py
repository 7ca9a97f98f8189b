"""
The pieces of OAuth 2.0 upstream login in memory: configuration, the SASL
messages, and the encrypted token store.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailproxy.auth import NoRoute, ProxyRealm
from mailproxy.config import ConfigError, TLSMode, UpstreamConfig, parseConfig
from mailproxy.imap.upstream import OAuthRefused, OAuthUnavailable
from mailproxy.interfaces import IProxyUser
from mailproxy.oauth.sasl import BadToken, Bearer, challengeStatus
from mailproxy.oauth.settings import OAuthLogin, OAuthProvider
from mailproxy.oauth.store import StoredGrant, TokenStore, TokenStoreError, loadKeys, newKey
from mailproxy.oauth.tokens import RemoteAccessTokens
from mailproxy.pop3.upstream import _bearer
from tests.tlssupport import parsedExample


def document(**oauthRoute: Any) -> dict[str, Any]:
    return {
        "auth": {"users_file": "users"},
        "listener": [{"endpoint": "tcp:0"}],
        "upstream": {"main": {"host": "127.0.0.1", "port": 143}},
        "routing": {"default_upstream": "main", "users": {"alice": {"oauth2": "ms", **oauthRoute}}},
        "oauth2": {
            "token_store": "tokens",
            "key_file": "token.key",
            "ms": {"preset": "microsoft", "tenant": "contoso.example", "client_id": "app"},
        },
    }


def test_the_microsoft_preset_fills_in_its_endpoints_for_the_tenant() -> None:
    config = parseConfig(document(), "/etc/mailproxy")
    assert config.oauth2 is not None
    provider = config.oauth2.providers["ms"]
    assert provider.tokenEndpoint == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert "offline_access" in provider.scopes and provider.mechanism == "xoauth2"
    assert config.oauth2.tokenStore == "/etc/mailproxy/tokens"
    route = config.routeFor("alice")
    assert route is not None and route.oauth2 == "ms"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"route": {"password": "secret"}}, "routing.users.alice.password: not with oauth2"),
        ({"route": {"oauth2": "nobody"}}, r"routing.users.alice.oauth2: no provider \[oauth2.nobody\]"),
        ({"provider": {"token_endpoint": "http://as.example.test/token"}}, "must be an https URL"),
        ({"provider": {"client_id": None}}, "oauth2.ms.client_id: required"),
        ({"provider": {"mechanism": "plain"}}, "oauth2.ms.mechanism: 'plain' is not one of"),
        ({"oauth2": {"key_file": None}}, "oauth2.key_file: required"),
        ({"oauth2": {"tokens_dir": "x"}}, r"oauth2.tokens_dir: unknown key, and not a provider's table"),
    ],
)
def test_bad_oauth_settings_are_refused_naming_the_key(change: dict[str, dict[str, Any]], message: str) -> None:
    config = document(**change.get("route", {}))
    changed(config["oauth2"]["ms"], change.get("provider", {}))
    changed(config["oauth2"], change.get("oauth2", {}))
    with pytest.raises(ConfigError, match=message):
        parseConfig(config, "/etc/mailproxy")


def changed(table: dict[str, Any], changes: dict[str, Any]) -> None:
    """
    Set each key of C{changes} in C{table}; C{None} removes it.
    """
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def test_an_upstream_with_oauth2_needs_the_oauth2_table() -> None:
    config = document()
    del config["oauth2"]
    del config["routing"]["users"]
    config["upstream"]["main"]["oauth2"] = "ms"
    with pytest.raises(ConfigError, match=r"upstream.main.oauth2: no \[oauth2\] table"):
        parseConfig(config, "/etc/mailproxy")


def decoded(message: bytes) -> bytes:
    return base64.b64decode(message)


def test_xoauth2_and_oauthbearer_messages() -> None:
    assert decoded(Bearer("ya29.a0-_~+/=", "xoauth2").initialResponse("alice@mail.test", "imap.test", 993)) == (
        b"user=alice@mail.test\x01auth=Bearer ya29.a0-_~+/=\x01\x01"
    )
    # RFC 7628: the gs2 header's authzid has "," and "=" escaped (RFC 5801).
    assert decoded(Bearer("tok", "oauthbearer").initialResponse("a,b=c", "imap.test", 993)) == (
        b"n,a=a=2Cb=3Dc,\x01host=imap.test\x01port=993\x01auth=Bearer tok\x01\x01"
    )
    assert Bearer("tok", "xoauth2").errorAcknowledgement == b""
    assert decoded(Bearer("tok", "oauthbearer").errorAcknowledgement) == b"\x01"


@pytest.mark.parametrize("token", ["", "tok\x01en", "tok en", "tok\r\nA1 DELETE INBOX"])
def test_a_token_that_could_break_the_sasl_message_is_refused(token: str) -> None:
    with pytest.raises(BadToken):
        Bearer(token, "xoauth2")


def test_reprs_never_show_tokens() -> None:
    assert "secret" not in repr(Bearer("secret", "xoauth2"))
    assert "secret" not in repr(StoredGrant("p", "secret", 0.0))


def test_the_error_challenge_is_summarized_for_the_log() -> None:
    challenge = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')
    assert challengeStatus(b" " + challenge + b"\r\n") == "status=401 scope=mail"
    assert challengeStatus(b" not base64!") == "not base64!"


def test_a_grant_is_sealed_in_a_private_file_and_read_back(tmp_path: Path) -> None:
    store = TokenStore(str(tmp_path / "tokens"), MultiFernet([Fernet(newKey())]))
    grant = StoredGrant("ms", "rt-secret", 1_800_000_000.0, "mail")
    store.save("../alice/x", grant)
    path = store.path("../alice/x")
    assert os.path.dirname(path) == str(tmp_path / "tokens")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert b"rt-secret" not in Path(path).read_bytes()
    assert store.load("../alice/x") == grant
    assert store.load("bob") is None
    assert [name for name in os.listdir(tmp_path / "tokens") if name.startswith(".new-")] == []


def test_a_new_first_key_still_reads_grants_sealed_with_the_old_one(tmp_path: Path) -> None:
    old, new = newKey(), newKey()
    (tmp_path / "key").write_bytes(old + b"\n")
    TokenStore(str(tmp_path), loadKeys(str(tmp_path / "key"))).save("alice", StoredGrant("ms", "rt", 0.0))
    (tmp_path / "key").write_bytes(new + b"\n" + old + b"\n")
    assert TokenStore(str(tmp_path), loadKeys(str(tmp_path / "key"))).load("alice") == StoredGrant("ms", "rt", 0.0)
    (tmp_path / "key").write_bytes(new + b"\n")
    with pytest.raises(TokenStoreError, match="cannot be decrypted with oauth2.key_file"):
        TokenStore(str(tmp_path), loadKeys(str(tmp_path / "key"))).load("alice")


def test_a_bad_key_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"not a key\n")
    with pytest.raises(TokenStoreError, match="line 1 is not a Fernet key .*mailproxy-oauth new-key"):
        loadKeys(str(tmp_path / "key"))
    with pytest.raises(TokenStoreError, match="cannot read"):
        loadKeys(str(tmp_path / "missing"))


def test_the_oauth_example_config_is_valid(tmp_path: Path) -> None:
    """etc/mailproxy-oauth.example.toml parses: Microsoft 365 by the device flow, Gmail by the browser."""
    config = parsedExample("mailproxy-oauth.example.toml", tmp_path)
    assert config.oauth2 is not None
    m365, gmail = config.oauth2.providers["m365"], config.oauth2.providers["gmail"]
    assert m365.tokenEndpoint == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert m365.deviceFlowAllowed and not gmail.deviceFlowAllowed
    assert gmail.scopes == ("https://mail.google.com/",)
    assert {user: route.oauth2 for user, route in config.routes.items()} == {"alice": "m365", "bob": "gmail"}


class Supervisor:
    """
    A worker's channel whose every question fails with C{error}.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error

    def callRemote(self, command: Any, **arguments: Any) -> Deferred[Any]:
        return fail(self.error)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OAuthRefused("test refused the OAuth 2.0 grant of olivia: invalid_grant"), OAuthRefused),
        (ConnectionDone("the supervisor went away"), OAuthUnavailable),
    ],
)
def test_a_worker_gets_the_supervisors_refusal_or_no_token_never_another_error(
    error: Exception, expected: type[Exception]
) -> None:
    provider = OAuthProvider("test", "https://as.example.test/token", "proxy")
    asking = RemoteAccessTokens(Supervisor(error)).bearer("olivia", provider)
    failures: list[Failure] = []
    asking.addErrback(failures.append)
    [failure] = failures
    assert failure.check(expected) and failure.check(OAuthRefused, OAuthUnavailable)


class POP3Handshake:
    """
    Records the POP3 commands sent and answers from C{replies}.
    """

    def __init__(self, *replies: bytes) -> None:
        self.sent: list[bytes] = []
        self.replies = list(replies)

    async def command(self, line: bytes) -> bytes:
        self.sent.append(line)
        return self.replies.pop(0)


@pytest.mark.parametrize("octets", [16, 1500])
def test_pop3_auth_keeps_command_lines_within_255_octets(octets: int) -> None:
    """RFC 2449: a real (long) token goes as the answer to the server's empty challenge, not on the AUTH line."""
    token = "t" * octets
    handshake = (
        POP3Handshake(b"+ \r\n", b"+OK Logged in.\r\n") if octets > 100 else POP3Handshake(b"+OK Logged in.\r\n")
    )
    upstream = UpstreamConfig("pop", "127.0.0.1", 110, TLSMode.PLAIN, protocol="pop3")
    reply = Deferred.fromCoroutine(
        _bearer(handshake, {b"XOAUTH2"}, "olivia@mail.test", Bearer(token, "xoauth2"), upstream)  # type: ignore[arg-type]
    )
    replies: list[bytes] = []
    reply.addCallback(replies.append)
    assert replies == [b"+OK Logged in.\r\n"]
    assert all(len(line) + 2 <= 255 for line in handshake.sent[:1])
    assert b"".join(handshake.sent).endswith(
        Bearer(token, "xoauth2").initialResponse("olivia@mail.test", "127.0.0.1", 110)
    )


def test_a_provider_added_by_a_reload_is_refused_until_a_restart() -> None:
    """[oauth2] is bound at start-up: a route naming a provider that is not loaded gets no session."""
    config = parseConfig(document(), "/etc/mailproxy")
    assert config.oauth2 is not None
    running = dataclasses.replace(config, oauth2=dataclasses.replace(config.oauth2, providers={}))
    with pytest.raises(NoRoute, match="OAuth 2.0 provider 'ms' of 'alice' is not loaded; restart the proxy"):
        ProxyRealm(running).requestAvatar("alice", None, IProxyUser)
    _, user, _ = ProxyRealm(config).requestAvatar("alice", None, IProxyUser)
    assert user.upstreamCredential(b"local pw") == OAuthLogin("alice", config.oauth2.providers["ms"])
