# -*- test-case-name: tests.test_config_reference -*-
"""
The configuration reference: every key, its type, default and meaning.

README's "Configuration reference" is this module's output
(C{python -m mailproxy.configref}); C{tests/test_config_reference.py} checks
it against what L{mailproxy.config} and the built-in filters accept, so the
two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Required:
    """
    The key has no default; C{when} says when it is required.
    """

    when: str = ""


@dataclass(frozen=True)
class Computed:
    """
    A default worked out at start-up, described in words.
    """

    text: str


REQUIRED = Required()


@dataclass(frozen=True)
class Key:
    """
    One configuration key.

    @ivar type: C{string}, C{number} (may have a fraction; never nan or inf), C{integer},
        C{boolean}, C{list of strings}, C{table}, C{list of tables}, C{path} (a file name,
        relative to the configuration file's directory) or C{endpoint} (a
        Twisted endpoint string).
    @ivar default: a TOML value, L{Required} or L{Computed}.
    """

    name: str
    type: str
    default: Any
    meaning: str


@dataclass(frozen=True)
class Table:
    """
    A table of the configuration file and its keys.

    @ivar heading: as written in the file (C{[server]}, C{[[listener]]}).
    @ivar location: the dotted location errors name, with C{NAME} or C{N}
        standing for the table's own name or index.
    """

    heading: str
    location: str
    about: str
    keys: tuple[Key, ...]

    def key(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)


SECONDS = "number"

TABLES: tuple[Table, ...] = (
    Table(
        "[server]",
        "server",
        "Connection handling. Reloaded on SIGHUP for new connections, except where noted.",
        (
            Key("greeting", "string", "mailproxy ready.", "Text of the IMAP greeting and the POP3 `+OK` line."),
            Key(
                "login_deadline",
                SECONDS,
                60,
                "Seconds from accept to logged in, whatever the client sends; then `* BYE`, or an abort "
                "during a TLS handshake.",
            ),
            Key("preauth_timeout", SECONDS, 60, "Seconds of silence before login after which a connection is closed."),
            Key(
                "authenticated_timeout",
                SECONDS,
                1800,
                "Seconds of silence on both sides after which a logged-in session is closed (IDLE excepted).",
            ),
            Key(
                "idle_refresh",
                SECONDS,
                1500,
                "An IDLE longer than this is ended and restarted upstream, unseen by the client.",
            ),
            Key(
                "idle_poll_interval",
                SECONDS,
                15,
                "NOOP interval when emulating IDLE for an upstream without it.",
            ),
            Key(
                "listen_backlog",
                "integer",
                1024,
                "Listen queue of every `tcp`, `tcp6` and `unix` listener whose endpoint has no `backlog=`. "
                "Restart only.",
            ),
            Key(
                "workers",
                "integer",
                Computed("the number of CPUs"),
                "Processes serving the listeners (1 to 256). With more than one, the twistd process supervises "
                "them: it binds the listeners, keeps the limits, lockouts and credentials cache they share, "
                "restarts a worker that dies, passes SIGHUP on and drains them on SIGTERM. 1 serves everything "
                "in the twistd process itself. Restart only.",
            ),
            Key(
                "certificate_check_interval",
                SECONDS,
                60,
                "Seconds between checks of the listeners' certificate and key files (0: only on SIGHUP, "
                "otherwise at least 1): a renewed pair is served to new connections. Restart only.",
            ),
            Key(
                "tls_session_lifetime",
                "integer",
                43200,
                "Seconds a TLS session can be resumed (0: never, otherwise 60 to 604800); the ticket keys are "
                "replaced this often and on every certificate reload. Restart only.",
            ),
            Key(
                "log_format",
                "string",
                "text",
                '`"text"` or `"json"` (one object per line), written where twistd logs. Restart only.',
            ),
        ),
    ),
    Table(
        "[auth]",
        "auth",
        "Local authentication.",
        (
            Key(
                "backend",
                "string",
                "users_file",
                "Where users and passwords come from: `users_file`, `http` (an nginx `auth_http` service, "
                "`[auth.http]`), `sql` (`[auth.sql]`), `ldap` (`[auth.ldap]`), or an account backend plugin's name, set up in "
                "`[auth.NAME]`.",
            ),
            Key(
                "users_file",
                "path",
                Required('with backend = "users_file"'),
                "The users file (`name:$scrypt$...` lines, written by `mailproxy-passwd`); re-read when it changes.",
            ),
            Key(
                "lookup_timeout",
                SECONDS,
                5.0,
                "Seconds an account backend may take to answer a login; then the client is told "
                "`NO [UNAVAILABLE]` (POP3 `-ERR [SYS/TEMP]`), which counts as no failure.",
            ),
            Key(
                "negative_ttl",
                SECONDS,
                60,
                "Seconds an account backend's refusal is remembered for that name, password and protocol: the same "
                "wrong password is refused (after the failure delay) without asking again; 0 turns it off.",
            ),
            Key(
                "failure_delay",
                SECONDS,
                2.0,
                "Seconds before a failed login is answered; doubles with each failure (at most 30). Restart only.",
            ),
            Key(
                "hash_threads",
                "integer",
                Computed("half the CPUs, at least 1"),
                "Threads that check passwords (1 to 64). Restart only.",
            ),
            Key(
                "cache_ttl",
                SECONDS,
                3600,
                "Seconds a successful login is remembered (as an HMAC under a per-process random key of the name, "
                "password and stored hash), so the same user and password log in again without the slow hash; a "
                "changed or removed users entry is never matched, failures are never remembered. With an account "
                "backend, its answer (the account and route) is remembered for the name, password and protocol. "
                "A memory dump of the process would let cached passwords be guessed at HMAC speed; 0 turns the "
                "cache off. Restart only.",
            ),
            Key(
                "cache_size",
                "integer",
                10000,
                "Successful logins remembered at most (at least 1); the least recently used are forgotten first. "
                "Restart only.",
            ),
        ),
    ),
    Table(
        "[auth.http]",
        "auth.http",
        "The `http` account backend: an HTTP service in nginx's `auth_http` protocol decides each login.",
        (
            Key("url", "string", REQUIRED, "The service's URL (`http://` or `https://`, certificate verified)."),
            Key(
                "headers",
                "table",
                {},
                "Header names to values added to every request (nginx's `auth_http_header`), a shared secret say.",
            ),
            Key(
                "upstream",
                "string",
                Computed("the user's `[routing]` upstream"),
                "The `[upstream.NAME]` whose settings (TLS, timeouts) reach an `Auth-Server`/`Auth-Port` address.",
            ),
            Key("max_wait", SECONDS, 30, "At most this many seconds of an answer's `Auth-Wait` are waited (0 to 300)."),
        ),
    ),
    Table(
        "[auth.sql]",
        "auth.sql",
        "The `sql` account backend: one query per login finds the user's stored hash and route.",
        (
            Key(
                "driver",
                "string",
                "sqlite",
                "The database: `sqlite` (the standard library's) or `postgresql` (psycopg 3: "
                "`pip install 'mailproxy[postgresql]'`).",
            ),
            Key(
                "database",
                "string",
                REQUIRED,
                "sqlite: the database file (opened read-only; it must exist). postgresql: a libpq connection "
                "string or URI (`host=db.example dbname=mail user=mailproxy password=... sslmode=verify-full`); "
                "each session is read-only, each query cut off after `lookup_timeout`, and logs show the string "
                "without its password.",
            ),
            Key(
                "query",
                "string",
                "SELECT password FROM users WHERE username = %u",
                "The lookup: `%u` the user name, `%s` the protocol, `%r` the client's address (passed as "
                "parameters). Columns: `password` (the stored hash: `$scrypt$`, `{SHA512-CRYPT}`, "
                "`{SHA256-CRYPT}`, `{BLF-CRYPT}`, yescrypt, `{PLAIN}`), and optionally `upstream`, `server`, "
                "`port`, `username`, `upstream_password`, `filters`.",
            ),
        ),
    ),
    Table(
        "[auth.ldap]",
        "auth.ldap",
        "The `ldap` account backend: a directory search per login finds the user's entry, then a bind as that "
        "entry (or its stored hash) checks the password (ldaptor: `pip install 'mailproxy[ldap]'`).",
        (
            Key(
                "url",
                "string or list",
                REQUIRED,
                "The directory: `ldap://HOST[:PORT]` or `ldaps://HOST[:PORT]` (TLS from the start), or a list of "
                "them tried in order when one cannot be reached.",
            ),
            Key("starttls", "boolean", False, "Switch an `ldap://` connection to TLS (StartTLS) before anything else."),
            Key(
                "ca_file",
                "path",
                Computed("the system's trust store"),
                "CA certificates (PEM) the directory's certificate must chain to; its name is checked against the URL's host.",
            ),
            Key(
                "verify_certificate",
                "boolean",
                True,
                "Check the directory's certificate; `false` for a test directory only.",
            ),
            Key(
                "bind_dn",
                "string",
                Computed("anonymous searches"),
                'The account searches bind as (with `bind_password`); with `verify = "hash"` it must be allowed to '
                "read the password attribute.",
            ),
            Key("bind_password", "string", Computed("none"), "The search account's password (never logged)."),
            Key("base", "string", REQUIRED, "The DN searches start at (`ou=people,dc=example,dc=org`)."),
            Key("scope", "string", "subtree", "How deep searches go: `base`, `onelevel` or `subtree`."),
            Key(
                "filter",
                "string",
                "(&(objectClass=inetOrgPerson)(uid=%u))",
                "The search (RFC 4515): `%u` the user name, `%s` the protocol, `%r` the client's address, `%%` a "
                "percent sign; put into the parsed filter as values, so nothing a user types can change the search. "
                "It must find one entry: none refuses the login, more than one is an error.",
            ),
            Key(
                "verify",
                "string",
                "bind",
                "How the password is checked: `bind` (as the entry found; the directory's password policy applies, "
                "empty passwords are refused) or `hash` (the stored hash in `password_attribute`: `{SSHA}`, "
                "`{SSHA256}`, `{SSHA512}`, `{CRYPT}`, `$scrypt$`..., checked in the hashing threads).",
            ),
            Key(
                "password_attribute",
                "string",
                "userPassword",
                'The attribute holding the stored hash (`verify = "hash"`).',
            ),
            Key(
                "name_attribute",
                "string",
                "uid",
                "The attribute whose value is the account's name for limits, per-user routes and logs, however the "
                "client spelt it (`SAM` finds `uid=sam`: one user, one session count); without one value, the name "
                "as typed.",
            ),
            Key(
                "attributes",
                "table",
                {},
                "Route fields to the attributes holding them: `upstream`, `server`, `port`, `username`, "
                "`upstream_password`, `filters` (each value a filter name, or names separated by commas); an "
                "attribute the entry lacks leaves the field to `[routing]`. `etc/ldap/mailproxy.schema` has "
                "attributes for each.",
            ),
            Key(
                "connections",
                "integer",
                4,
                "Connections users' binds go over (1 to 64), kept open; searches share one more.",
            ),
        ),
    ),
    Table(
        "[limits]",
        "limits",
        "Connection and login limits; a client network is an IPv4 address or an IPv6 /64. Restart only.",
        (
            Key("max_connections", "integer", 10000, "Client connections open at once, in all."),
            Key("max_connections_per_ip", "integer", 100, "Client connections open at once per client network."),
            Key("max_sessions_per_user", "integer", 100, "Logged-in sessions at once per user."),
            Key("failure_window", SECONDS, 900, "Seconds over which failed logins are counted."),
            Key(
                "failures_before_lockout",
                "integer",
                10,
                "Failures (per network, and per user name) that lock the network or name out.",
            ),
            Key("lockout_seconds", SECONDS, 900, "How long a lockout lasts."),
            Key(
                "known_network_seconds",
                SECONDS,
                2592000,
                "A network the user logged in from this recently is spared the user's lockout.",
            ),
            Key(
                "max_line_length",
                "integer",
                65536,
                "Longest IMAP command line, literals not counted (at least 1024); `BAD [TOOBIG]` beyond.",
            ),
            Key(
                "max_preauth_literal",
                "integer",
                16384,
                "Largest IMAP literal before login (at most 65536); `BAD [TOOBIG]` beyond.",
            ),
        ),
    ),
    Table(
        "[metrics]",
        "metrics",
        "Prometheus metrics; leave the table out to turn them off.",
        (
            Key(
                "listen",
                "endpoint",
                Computed("none: metrics off"),
                "Where `/metrics` is served over HTTP, e.g. `tcp:9100:interface=127.0.0.1`. Restart only.",
            ),
        ),
    ),
    Table(
        "[[listener]]",
        "listener[N]",
        "One per listening socket; at least one. Restart only, except `filters`.",
        (
            Key("name", "string", Computed("the endpoint"), "Name in logs, metrics and errors; unique."),
            Key(
                "endpoint",
                "endpoint",
                REQUIRED,
                "Twisted server endpoint string: `tcp:993:interface=\\:\\:`, `tcp6:...`, `unix:...`, `systemd:...`.",
            ),
            Key("protocol", "string", "imap", '`"imap"` or `"pop3"`.'),
            Key(
                "tls",
                "string",
                "plain",
                '`"plain"`, `"starttls"` (STARTTLS/STLS offered) or `"implicit"` (TLS from the first byte).',
            ),
            Key(
                "certificate",
                "path",
                Required("with TLS"),
                "PEM file: the leaf certificate, then its chain.",
            ),
            Key(
                "private_key",
                "path",
                Computed("the certificate file"),
                "PEM file holding the certificate's private key.",
            ),
            Key(
                "certificates",
                "list of tables",
                [],
                "More certificates, chosen by the name a client asks for (SNI): `[[listener.certificates]]`, below.",
            ),
            Key(
                "tls_min_version",
                "string",
                "1.2",
                '`"1.2"` or `"1.3"`: the oldest TLS version accepted (TLS listeners only).',
            ),
            Key(
                "tls_ciphers",
                "string",
                Computed("ECDHE with AES-GCM or ChaCha20-Poly1305"),
                "OpenSSL cipher list for TLS 1.2 (TLS listeners only); one selecting nothing stops start-up.",
            ),
            Key(
                "allow_plaintext_auth",
                "boolean",
                False,
                "Allow LOGIN, AUTHENTICATE, USER/PASS and AUTH without TLS (loopback and tests).",
            ),
            Key(
                "filters",
                "list of strings",
                [],
                "Filters (names of `[filters.NAME]`) of every session on this listener, before and after login.",
            ),
            Key(
                "proxy_protocol",
                "boolean",
                False,
                "Every connection starts with a PROXY protocol v1 or v2 header (from a load balancer).",
            ),
            Key(
                "proxy_protocol_trusted",
                "list of strings",
                Required("with proxy_protocol"),
                'Networks allowed to send the header (`["10.0.0.0/8"]`; `["0.0.0.0/0", "::/0"]` trusts anyone).',
            ),
        ),
    ),
    Table(
        "[[listener.certificates]]",
        "listener[N].certificates[N]",
        "A certificate served to clients asking (by SNI) for one of its names; others get the listener's "
        "`certificate`. Reloaded like it.",
        (
            Key(
                "names",
                "list of strings",
                Computed("the certificate's DNS names"),
                "Names served with it: exact, or `*.example.net` for any one label; case is ignored.",
            ),
            Key("certificate", "path", REQUIRED, "PEM file: the leaf certificate, then its chain."),
            Key(
                "private_key",
                "path",
                Computed("the certificate file"),
                "PEM file holding the certificate's private key.",
            ),
        ),
    ),
    Table(
        "[upstream.NAME]",
        "upstream.NAME",
        "The servers behind the proxy; at least one.",
        (
            Key("host", "string", REQUIRED, "Host name or address."),
            Key("port", "integer", REQUIRED, "Port, 1 to 65535."),
            Key("protocol", "string", "imap", '`"imap"` or `"pop3"` (POP3 clients of an IMAP upstream are bridged).'),
            Key("tls", "string", "plain", '`"plain"`, `"starttls"` or `"implicit"`.'),
            Key(
                "ca_file", "path", Computed("the system trust store"), "PEM file of the CAs trusted for this upstream."
            ),
            Key("server_name", "string", Computed("host"), "The name the upstream's certificate must match."),
            Key(
                "verify",
                "boolean",
                True,
                "Verify the certificate chain and name; `false` is for lab set-ups only and is logged.",
            ),
            Key("connect_timeout", SECONDS, 10.0, "Seconds for each step of connecting, greeting and logging in."),
            Key(
                "response_timeout",
                SECONDS,
                120.0,
                "Seconds a command in flight may wait for the upstream's next octet (not during IDLE).",
            ),
            Key(
                "forward_client_address",
                "boolean",
                False,
                "Send the client's address with IMAP `ID` before login (Dovecot: `login_trusted_networks`).",
            ),
            Key(
                "oauth2",
                "string",
                Computed("none: password logins"),
                "Its users log in with an access token from this `[oauth2.NAME]` provider (XOAUTH2 or OAUTHBEARER).",
            ),
            Key("bridge_mailbox", "string", "INBOX", "POP3 bridge: the mailbox POP3 clients see."),
            Key(
                "bridge_uidl_format",
                "string",
                "{uid:08x}{uidvalidity:08x}",
                "POP3 bridge: UIDL from `{uid}` and `{uidvalidity}` (the default equals Dovecot's POP3 UIDLs).",
            ),
            Key("bridge_mark_seen", "boolean", False, "POP3 bridge: RETR sets `\\Seen`."),
            Key(
                "bridge_fallback_folder",
                "string",
                Computed("none"),
                "POP3 bridge: where DELE moves messages if the upstream lacks UIDPLUS.",
            ),
        ),
    ),
    Table(
        "[routing]",
        "routing",
        "Which upstream each user goes to, and with which credentials.",
        (
            Key(
                "default_upstream",
                "string",
                Computed("none: only users in [routing.users] log in"),
                "Upstream of users without their own entry.",
            ),
            Key(
                "default_password",
                "string",
                "passthrough",
                'Upstream password of those users; `"passthrough"` reuses the one the client logged in with.',
            ),
            Key(
                "default_filters",
                "list of strings",
                [],
                "Filters after login for users without their own `filters`.",
            ),
            Key("users", "table", {}, "`[routing.users.NAME]` tables, below."),
        ),
    ),
    Table(
        "[routing.users.NAME]",
        "routing.users.NAME",
        "One user's route.",
        (
            Key("upstream", "string", Computed("routing.default_upstream"), "The user's upstream."),
            Key("username", "string", Computed("the local name"), "The user name upstream."),
            Key("password", "string", "passthrough", 'The upstream password; `"passthrough"` reuses the client\'s.'),
            Key("filters", "list of strings", Computed("routing.default_filters"), "Filters after login."),
            Key(
                "oauth2",
                "string",
                Computed("the upstream's oauth2"),
                "Log in upstream with an access token from this `[oauth2.NAME]` provider; not with `password`.",
            ),
        ),
    ),
    Table(
        "[oauth2]",
        "oauth2",
        "OAuth 2.0 upstream logins: where grants are kept (see OAuth 2.0 upstreams). Restart to change.",
        (
            Key("token_store", "path", Required("with [oauth2]"), "Directory of the users' encrypted grants (0700)."),
            Key(
                "key_file",
                "path",
                Required("with [oauth2]"),
                "Fernet keys, one per line (`mailproxy-oauth new-key FILE`); the first encrypts, all decrypt.",
            ),
            Key("timeout", SECONDS, 10, "Seconds a token endpoint has to answer."),
            Key("refresh_margin", SECONDS, 60, "An access token is refreshed this many seconds before it expires."),
        ),
    ),
    Table(
        "[oauth2.NAME]",
        "oauth2.NAME",
        "One OAuth 2.0 provider (authorization server).",
        (
            Key(
                "preset",
                "string",
                "generic",
                '`"google"`, `"microsoft"` or `"generic"`: fills in endpoints and scopes.',
            ),
            Key(
                "tenant",
                "string",
                "common",
                "Replaces `{tenant}` in the endpoints (the Microsoft preset's): `common`, `organizations`, or an id.",
            ),
            Key("client_id", "string", REQUIRED, "The client id of the proxy's app registration."),
            Key("client_secret", "string", Computed("none: a public client"), "The client secret, if it has one."),
            Key("token_endpoint", "string", Computed("the preset's"), "Token endpoint URL (https; http on loopback)."),
            Key(
                "device_authorization_endpoint",
                "string",
                Computed("the preset's"),
                "Device authorization endpoint (RFC 8628), for `mailproxy-oauth authorize`.",
            ),
            Key(
                "authorization_endpoint", "string", Computed("the preset's"), "Authorization endpoint (browser login)."
            ),
            Key("scopes", "list of strings", Computed("the preset's"), "Scopes asked for."),
            Key("mechanism", "string", "xoauth2", '`"xoauth2"` or `"oauthbearer"` (RFC 7628) upstream.'),
        ),
    ),
    Table(
        "[filters.NAME]",
        "filters.NAME",
        "A named filter: a plugin `type` and its options. Reloaded on SIGHUP.",
        (
            Key(
                "type",
                "string",
                REQUIRED,
                "The filter plugin: `audit`, `policy`, `folders`, `capabilities` or a third-party one.",
            ),
        ),
    ),
    Table(
        'type = "audit"',
        "filters.NAME",
        "One log event and one JSON line per command and its result; never credentials.",
        (
            Key("file", "path", Computed("none"), "JSON-lines file the records are appended to."),
            Key("log", "boolean", True, "Also log each record as a twisted.logger event."),
        ),
    ),
    Table(
        'type = "policy"',
        "filters.NAME",
        "Refuse commands and mailboxes, make sessions read-only.",
        (
            Key(
                "allow",
                "list of strings",
                Computed("all"),
                "Only these commands (and CAPABILITY, NOOP, LOGOUT) are allowed.",
            ),
            Key("deny", "list of strings", [], "Commands refused with `NO [NOPERM]`."),
            Key("read_only", "boolean", False, "Refuse every command that writes; SELECT becomes EXAMINE."),
            Key(
                "mailboxes_allow",
                "list of strings",
                Computed("all"),
                "Only mailboxes matching these patterns (`*`, `%`) may be named.",
            ),
            Key("mailboxes_deny", "list of strings", [], "Mailboxes matching these patterns are refused."),
            Key("separator", "string", "/", "The upstream's hierarchy separator, for the patterns."),
            Key(
                "max_append_size",
                "integer",
                Computed("none"),
                "Largest APPEND message in octets; `NO [TOOBIG]` beyond.",
            ),
            Key(
                "allow_unknown",
                "list of strings",
                [],
                "Commands the proxy does not know that read-only or mailbox-restricted sessions may still send.",
            ),
        ),
    ),
    Table(
        'type = "folders"',
        "filters.NAME",
        "Rename and hide mailboxes.",
        (
            Key("map", "table", {}, 'Client name = upstream name (`{ "Sent" = "INBOX/Sent" }`), children included.'),
            Key("hide", "list of strings", [], "Upstream mailbox patterns the client never sees."),
            Key("separator", "string", "/", "The upstream's hierarchy separator."),
        ),
    ),
    Table(
        'type = "capabilities"',
        "filters.NAME",
        "Change the capabilities clients see after login.",
        (
            Key("hide", "list of strings", [], "Capabilities removed (`NAME=` removes a family)."),
            Key("add", "list of strings", [], "Capabilities added (only ones the proxy can relay)."),
        ),
    ),
)


def table(heading: str) -> Table:
    """
    The table with this heading.
    """
    for item in TABLES:
        if item.heading == heading:
            return item
    raise KeyError(heading)


def tomlValue(value: Any) -> str:
    """
    C{value} written as in a TOML file.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(tomlValue(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name} = {tomlValue(item)}" for name, item in value.items()) + "}"
    return repr(value)


def _defaultText(default: Any) -> str:
    if isinstance(default, Required):
        return f"required {default.when}".strip()
    if isinstance(default, Computed):
        return default.text
    return f"`{tomlValue(default)}`"


def markdown() -> str:
    """
    The reference as Markdown, one table per configuration table.
    """
    return "\n".join(_markdownLines()) + "\n"


def _markdownLines() -> Iterator[str]:
    for index, item in enumerate(TABLES):
        if index:
            yield ""
        yield f"**`{item.heading}`** {item.about}"
        yield ""
        yield "| key | type | default | meaning |"
        yield "| --- | --- | --- | --- |"
        for key in item.keys:
            meaning = key.meaning.replace("|", "\\|")
            yield f"| `{key.name}` | {key.type} | {_defaultText(key.default)} | {meaning} |"


if __name__ == "__main__":
    print(markdown(), end="")
