"""
Reading and validating the TOML configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailproxy.config import ConfigError, TLSMode, UpstreamConfig, UserRoute, loadConfig, parseConfig

VALID = """
[server]
greeting = "hello from the proxy"
preauth_timeout = 30
authenticated_timeout = 600

[auth]
users_file = "users"
failure_delay = 0.5

[[listener]]
name = "plain"
endpoint = "tcp:1143:interface=127.0.0.1"
allow_plaintext_auth = true

[[listener]]
name = "starttls"
endpoint = "tcp:1144"
tls = "starttls"
certificate = "certs/server.pem"

[[listener]]
endpoint = "tcp:1993"
tls = "implicit"
certificate = "certs/server.pem"
private_key = "certs/server.key"

[upstream.main]
host = "imap.example.test"
port = 993
tls = "implicit"
ca_file = "certs/ca.pem"
server_name = "mail.example.test"
connect_timeout = 5

[upstream.legacy]
host = "10.0.0.2"
port = 143

[routing]
default_upstream = "main"

[routing.users.bob]
upstream = "legacy"

[routing.users.svc]
upstream = "legacy"
username = "service-account"
password = "upstream-secret"
"""


def writeConfig(directory: Path, text: str) -> str:
    """
    Write C{text} as mailproxy.toml in C{directory}, with the certificate
    files the valid configuration names; return its path.
    """
    certs = directory / "certs"
    certs.mkdir(exist_ok=True)
    for name in ("server.pem", "server.key", "ca.pem"):
        (certs / name).write_text("dummy")
    path = directory / "mailproxy.toml"
    path.write_text(text)
    return str(path)


def configError(directory: Path, text: str) -> str:
    """
    Load C{text} and return the ConfigError message it must produce.
    """
    with pytest.raises(ConfigError) as raised:
        loadConfig(writeConfig(directory, text))
    return str(raised.value)


def test_valid_config_parses_into_dataclasses(tmp_path: Path) -> None:
    """A complete configuration yields listeners, upstreams, routes and server settings."""
    config = loadConfig(writeConfig(tmp_path, VALID))
    assert config.greeting == "hello from the proxy"
    assert (config.preAuthTimeout, config.authenticatedTimeout, config.authFailureDelay) == (30, 600, 0.5)
    assert [listener.name for listener in config.listeners] == ["plain", "starttls", "tcp:1993"]
    assert [listener.tls for listener in config.listeners] == [TLSMode.PLAIN, TLSMode.STARTTLS, TLSMode.IMPLICIT]
    assert config.listeners[0].allowPlaintextAuth is True
    assert config.listeners[1].allowPlaintextAuth is False
    assert config.listeners[0].endpoint == "tcp:1143:interface=127.0.0.1"
    assert config.upstreams["main"] == UpstreamConfig(
        name="main",
        host="imap.example.test",
        port=993,
        tls=TLSMode.IMPLICIT,
        caFile=str(tmp_path / "certs" / "ca.pem"),
        verify=True,
        serverName="mail.example.test",
        connectTimeout=5,
    )
    assert config.upstreams["main"].verifyName == "mail.example.test"
    legacy = config.upstreams["legacy"]
    assert (legacy.tls, legacy.caFile, legacy.verifyName, legacy.connectTimeout) == (
        TLSMode.PLAIN,
        None,
        "10.0.0.2",
        10.0,
    )


def test_relative_paths_are_resolved_against_the_config_directory(tmp_path: Path, monkeypatch) -> None:
    """users_file, certificate, private_key and ca_file are relative to the config file, not the cwd."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    configDir = tmp_path / "etc"
    configDir.mkdir()
    path = writeConfig(configDir, VALID)
    monkeypatch.chdir(elsewhere)
    config = loadConfig(os.path.relpath(path, elsewhere))
    assert config.usersFile == str(configDir / "users")
    starttls, implicit = config.listeners[1], config.listeners[2]
    assert starttls.certificate == str(configDir / "certs" / "server.pem")
    assert starttls.privateKey == starttls.certificate  # defaults to the certificate file
    assert implicit.privateKey == str(configDir / "certs" / "server.key")
    assert config.upstreams["main"].caFile == str(configDir / "certs" / "ca.pem")


def test_routes_distinguish_passthrough_from_stored_passwords(tmp_path: Path) -> None:
    """Users route to their upstream; without a password the client's is passed through (None)."""
    config = loadConfig(writeConfig(tmp_path, VALID))
    assert config.routes["bob"] == UserRoute("legacy", None, None)
    assert config.routes["svc"] == UserRoute("legacy", "service-account", "upstream-secret")
    assert config.routeFor("svc").password == "upstream-secret"
    assert config.routeFor("bob").password is None


def test_unlisted_users_take_the_default_route(tmp_path: Path) -> None:
    """A user without a [routing.users] table gets the default upstream with passthrough."""
    config = loadConfig(writeConfig(tmp_path, VALID))
    assert config.defaultRoute == UserRoute("main", None, None)
    assert config.routeFor("anybody") == UserRoute("main", None, None)


def test_default_password_is_stored_on_the_default_route(tmp_path: Path) -> None:
    """routing.default_password other than "passthrough" is kept on the default route."""
    text = VALID.replace('default_upstream = "main"', 'default_upstream = "main"\ndefault_password = "shared"')
    config = loadConfig(writeConfig(tmp_path, text))
    assert config.defaultRoute == UserRoute("main", None, "shared")


def test_no_default_upstream_means_unlisted_users_have_no_route(tmp_path: Path) -> None:
    """Without routing.default_upstream, only listed users have a route."""
    text = VALID.replace('default_upstream = "main"', "")
    config = loadConfig(writeConfig(tmp_path, text))
    assert config.defaultRoute is None
    assert config.routeFor("anybody") is None
    assert config.routeFor("bob") == UserRoute("legacy", None, None)


def test_parse_config_accepts_a_decoded_document(tmp_path: Path) -> None:
    """parseConfig builds a Config from a dict, resolving paths against baseDir."""
    document = {
        "auth": {"users_file": "users"},
        "listener": [{"endpoint": "tcp:143"}],
        "upstream": {"u": {"host": "h", "port": 143}},
    }
    config = parseConfig(document, str(tmp_path))
    assert config.usersFile == str(tmp_path / "users")
    assert config.listeners[0].name == "tcp:143"
    assert config.defaultRoute is None


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('endpoint = "tcp:1143:interface=127.0.0.1"\n', "", "listener[0].endpoint"),
        ('endpoint = "tcp:1143:interface=127.0.0.1"', 'endpoint = "tcp:abc"', "listener[0].endpoint"),
        ('tls = "starttls"', 'tls = "bogus"', "listener[1].tls"),
        ('tls = "starttls"\ncertificate = "certs/server.pem"', 'tls = "implicit"', "listener[1].certificate"),
        ('certificate = "certs/server.pem"\n\n', 'certificate = "certs/missing.pem"\n\n', "listener[1].certificate"),
        ('private_key = "certs/server.key"', 'private_key = "certs/nope.key"', "listener[2].private_key"),
        ("allow_plaintext_auth = true", 'colour = "blue"', "listener[0].colour"),
        ('host = "imap.example.test"', "", "upstream.main.host"),
        ("port = 993", "port = 70000", "upstream.main.port"),
        ("port = 993", "", "upstream.main.port"),
        ('tls = "implicit"\nca_file', 'tls = "tls"\nca_file', "upstream.main.tls"),
        ('ca_file = "certs/ca.pem"', 'ca_file = "certs/none.pem"', "upstream.main.ca_file"),
        ('default_upstream = "main"', 'default_upstream = "missing"', "routing.default_upstream"),
        (
            '[routing.users.bob]\nupstream = "legacy"',
            '[routing.users.bob]\nupstream = "gone"',
            "routing.users.bob.upstream",
        ),
        ('users_file = "users"', "", "auth.users_file"),
        ("failure_delay = 0.5", "failure_delay = -1", "auth.failure_delay"),
        ("preauth_timeout = 30", 'preauth_timeout = "30"', "server.preauth_timeout"),
        ("allow_plaintext_auth = true", 'allow_plaintext_auth = "yes"', "listener[0].allow_plaintext_auth"),
        ("[server]", "[serverx]", "serverx"),
        ('greeting = "hello from the proxy"', 'greeting = "two\\r\\nlines"', "server.greeting"),
        ('greeting = "hello from the proxy"', 'greeting = "caf\u00e9 ready"', "server.greeting"),
    ],
)
def test_invalid_setting_raises_config_error_naming_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    """Each invalid or missing setting raises one ConfigError whose message starts with its key."""
    assert old in VALID
    message = configError(tmp_path, VALID.replace(old, new, 1))
    assert message.startswith(key + ":"), message


def test_duplicate_listener_names_are_refused(tmp_path: Path) -> None:
    """Two listeners with the same name raise a ConfigError naming the listener key and the name."""
    message = configError(tmp_path, VALID.replace('name = "starttls"', 'name = "plain"'))
    assert message.startswith("listener:") and "'plain'" in message


def test_config_without_upstreams_is_refused(tmp_path: Path) -> None:
    """A configuration with no upstream table raises a ConfigError naming upstream."""
    document = {"auth": {"users_file": "users"}, "listener": [{"endpoint": "tcp:143"}]}
    with pytest.raises(ConfigError, match=r"^upstream:"):
        parseConfig(document, str(tmp_path))


def test_config_without_listeners_is_refused(tmp_path: Path) -> None:
    """A configuration with no [[listener]] raises a ConfigError naming listener."""
    document = {"auth": {"users_file": "users"}, "upstream": {"u": {"host": "h", "port": 143}}}
    with pytest.raises(ConfigError, match=r"^listener:"):
        parseConfig(document, str(tmp_path))


def test_unreadable_config_path_raises_config_error(tmp_path: Path) -> None:
    """A config path that cannot be read raises a ConfigError naming the path."""
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as raised:
        loadConfig(path)
    assert str(raised.value).startswith(path + ": cannot read")


def test_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    """A file that is not valid TOML raises a ConfigError naming the path and the TOML problem."""
    path = tmp_path / "broken.toml"
    path.write_text("[server\ngreeting = \n")
    with pytest.raises(ConfigError) as raised:
        loadConfig(str(path))
    assert str(raised.value).startswith(f"{path}: invalid TOML")


# A listener's certificates chosen by SNI, and the certificate reload and
# TLS session settings.

SNI = """
[[listener.certificates]]
names = ["Mail.Example.Test.", "*.example.net"]
certificate = "certs/server.pem"
private_key = "certs/server.key"

[[listener.certificates]]
certificate = "certs/ca.pem"
"""


def test_listener_certificates_parse_with_names_lowercased_and_paths_relative(tmp_path: Path) -> None:
    """certificates entries: names lower case without a final dot, files relative to the config, the key defaulting to the certificate."""
    config = loadConfig(writeConfig(tmp_path, VALID.replace("\n[upstream.main]", SNI + "\n[upstream.main]", 1)))
    first, second = config.listeners[2].certificates
    assert first.names == ("mail.example.test", "*.example.net")
    assert (first.certificate, first.privateKey) == (
        str(tmp_path / "certs/server.pem"),
        str(tmp_path / "certs/server.key"),
    )
    assert second.names == () and second.privateKey == second.certificate == str(tmp_path / "certs/ca.pem")
    assert config.listeners[1].certificates == ()


def test_server_certificate_check_and_session_lifetime_have_defaults(tmp_path: Path) -> None:
    """Without settings, certificates are checked every 60 s and TLS sessions last 12 hours."""
    config = loadConfig(writeConfig(tmp_path, VALID))
    assert (config.certificateCheckInterval, config.tlsSessionLifetime) == (60.0, 43200.0)
    config = loadConfig(
        writeConfig(
            tmp_path, VALID.replace("[server]", "[server]\ncertificate_check_interval = 0\ntls_session_lifetime = 0")
        )
    )
    assert (config.certificateCheckInterval, config.tlsSessionLifetime) == (0.0, 0)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("certificate_check_interval = 1", 1.0),
        ("certificate_check_interval = 2.5", 2.5),
        ("certificate_check_interval = 86400", 86400.0),
        ("tls_session_lifetime = 60", 60),
        ("tls_session_lifetime = 3600.0", 3600),
        ("tls_session_lifetime = 604800", 604800),
    ],
)
def test_certificate_check_and_session_lifetime_take_values_in_their_ranges(
    tmp_path: Path, setting: str, expected: float
) -> None:
    """A check interval of 1 s or more, a session lifetime of whole seconds from 60 to 604800: taken as given (the lifetime an integer)."""
    config = loadConfig(writeConfig(tmp_path, VALID.replace("[server]", f"[server]\n{setting}")))
    value = config.certificateCheckInterval if setting.startswith("certificate") else config.tlsSessionLifetime
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        (
            'names = ["Mail.Example.Test.", "*.example.net"]',
            'names = ["mail..example.test"]',
            "listener[2].certificates[0].names",
        ),
        (
            'names = ["Mail.Example.Test.", "*.example.net"]',
            'names = ["*.*.example.net"]',
            "listener[2].certificates[0].names",
        ),
        (
            'names = ["Mail.Example.Test.", "*.example.net"]',
            'names = ["mail*.example.net"]',
            "listener[2].certificates[0].names",
        ),
        ('names = ["Mail.Example.Test.", "*.example.net"]', 'names = ["*"]', "listener[2].certificates[0].names"),
        (
            'names = ["Mail.Example.Test.", "*.example.net"]',
            'names = ["m\u00e4il.example.test"]',
            "listener[2].certificates[0].names",
        ),
        (
            'names = ["Mail.Example.Test.", "*.example.net"]',
            'names = "mail.example.test"',
            "listener[2].certificates[0].names",
        ),
        ('certificate = "certs/ca.pem"', 'private_key = "certs/server.key"', "listener[2].certificates[1].certificate"),
        ('certificate = "certs/ca.pem"', 'certificate = "certs/gone.pem"', "listener[2].certificates[1].certificate"),
        (
            'private_key = "certs/server.key"\n\n[[listener.certificates]]\ncertificate',
            'private_key = "certs/gone.key"\n\n[[listener.certificates]]\ncertificate',
            "listener[2].certificates[0].private_key",
        ),
        (
            'certificate = "certs/ca.pem"',
            'certificate = "certs/ca.pem"\nnmaes = ["x.test"]',
            "listener[2].certificates[1].nmaes",
        ),
        (
            'certificate = "certs/ca.pem"',
            'certificate = "certs/ca.pem"\nnames = ["MAIL.example.test"]',
            "listener[2].certificates[1].names",
        ),
    ],
)
def test_invalid_listener_certificates_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    """A bad entry of a listener's certificates raises one ConfigError naming certificates[N] and its key."""
    text = VALID.replace("\n[upstream.main]", SNI + "\n[upstream.main]", 1)
    assert old in text
    message = configError(tmp_path, text.replace(old, new, 1))
    assert message.startswith(key + ":"), message


def test_a_name_given_to_two_certificates_is_refused(tmp_path: Path) -> None:
    """The same name on two entries (here in another case) names the second entry and the first."""
    text = VALID.replace("\n[upstream.main]", SNI + "\n[upstream.main]", 1)
    message = configError(
        tmp_path,
        text.replace('certificate = "certs/ca.pem"', 'certificate = "certs/ca.pem"\nnames = ["*.EXAMPLE.net"]'),
    )
    assert message == "listener[2].certificates[1].names: '*.example.net' is already given to certificates[0]"


def test_certificates_on_a_plain_listener_are_refused(tmp_path: Path) -> None:
    """A plain listener has no TLS to choose a certificate for."""
    text = VALID.replace(
        "allow_plaintext_auth = true",
        'allow_plaintext_auth = true\ncertificates = [{ certificate = "certs/server.pem" }]',
    )
    message = configError(tmp_path, text)
    assert message.startswith("listener[0].certificates: only for listeners with tls = starttls or implicit"), message


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("certificate_check_interval = -1", "server.certificate_check_interval"),
        ('certificate_check_interval = "60"', "server.certificate_check_interval"),
        ("tls_session_lifetime = 604801", "server.tls_session_lifetime"),
        ("tls_session_lifetime = -5", "server.tls_session_lifetime"),
    ],
)
def test_invalid_certificate_check_or_session_lifetime_names_the_key(tmp_path: Path, setting: str, key: str) -> None:
    """A negative interval, a string, or a session lifetime over 7 days raises a ConfigError naming the key."""
    message = configError(tmp_path, VALID.replace("[server]", f"[server]\n{setting}"))
    assert message.startswith(key + ":"), message


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # Checked every reactor turn, or about as often.
        ("certificate_check_interval = 0.001", "server.certificate_check_interval: must be 0 (never) or at least 1"),
        ("certificate_check_interval = 0.5", "server.certificate_check_interval: must be 0 (never) or at least 1"),
        ("certificate_check_interval = nan", "server.certificate_check_interval: must be a finite number"),
        ("certificate_check_interval = inf", "server.certificate_check_interval: must be a finite number"),
        # OpenSSL takes whole seconds: 0.5 would have been 0, its default.
        ("tls_session_lifetime = 0.5", "server.tls_session_lifetime: must be 0 (off) or an integer from 60 to 604800"),
        ("tls_session_lifetime = 1e-9", "server.tls_session_lifetime: must be 0 (off) or an integer from 60 to 604800"),
        ("tls_session_lifetime = 59", "server.tls_session_lifetime: must be 0 (off) or an integer from 60 to 604800"),
        ("tls_session_lifetime = 60.5", "server.tls_session_lifetime: must be 0 (off) or an integer from 60 to 604800"),
        ("tls_session_lifetime = nan", "server.tls_session_lifetime: must be a finite number"),
        ("tls_session_lifetime = inf", "server.tls_session_lifetime: must be a finite number"),
        ("tls_session_lifetime = true", "server.tls_session_lifetime: must be a non-negative number"),
    ],
)
def test_certificate_check_and_session_lifetime_out_of_their_ranges_are_refused(
    tmp_path: Path, setting: str, message: str
) -> None:
    """A check interval under 1 s (but 0), a session lifetime that is not 0 or whole seconds from 60 to 604800, nan or inf: one ConfigError saying what is accepted."""
    assert configError(tmp_path, VALID.replace("[server]", f"[server]\n{setting}")) == message


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("failure_delay = 0.5", "failure_delay = nan", "auth.failure_delay"),
        ("failure_delay = 0.5", "failure_delay = inf", "auth.failure_delay"),
        ("preauth_timeout = 30", "preauth_timeout = inf", "server.preauth_timeout"),
        ("preauth_timeout = 30", "preauth_timeout = -nan", "server.preauth_timeout"),
        ("connect_timeout = 5", "connect_timeout = nan", "upstream.main.connect_timeout"),
        ("[server]", "[server]\nlisten_backlog = inf", "server.listen_backlog"),
        ("[server]", "[limits]\nmax_connections = inf\n[server]", "limits.max_connections"),
    ],
)
def test_nan_and_infinity_are_refused_for_every_number(tmp_path: Path, old: str, new: str, key: str) -> None:
    """nan and inf are TOML floats, but no setting means them: a ConfigError naming the key."""
    assert old in VALID
    assert configError(tmp_path, VALID.replace(old, new, 1)) == f"{key}: must be a finite number"
