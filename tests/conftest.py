"""
Fixtures for integration tests: a private Dovecot and the proxy running as
a real C{twistd} process in front of it, on 127.0.0.1 high ports.
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from tests.bypass import BYPASS_CONFIG, BYPASS_USERS, BypassProxy
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort, runningProxy

# Local user -> upstream route; passwords are the same locally and upstream
# (passthrough) unless the route stores its own.
UPSTREAM_USERS = {
    "alice": "alicepw",
    "bob": "bobpw",
    "carol": "carolpw",
    "dora": 'dora pw "q" ü',
    "kim": "kimpw",
    "fred": "fredpw",  # filter tests: default filter chain
    "rita": "ritapw",  # filter tests: read-only chain
    "ida": "idapw",  # IDLE tests
    "ivy": "ivypw",  # emulated IDLE with a policy (no Archive)
    "pat": "patpw",  # POP3 bridge (IMAP upstream)
    "paul": "paulpw",  # POP3 relay (POP3 upstream, STLS)
    "pia": "piapw",  # POP3 relay (POP3 upstream, implicit TLS)
    "pete": "petepw",  # POP3 deletion tests (bridge)
    "phil": "philpw",  # POP3 deletion tests (relay)
    "wendy": "wendypw",  # workers tests
}
POP3_USERS = {
    "pat": "bridge",
    "paul": "pop3-stls",
    "pia": "pop3-implicit",
    "pete": "bridge",
    "phil": "pop3-stls",
}
SEEDED_USERS = ("alice", "bob", "carol", "dora", "fred", "rita", "pat", "paul", "pia")
LOCAL_USERS = {
    "alice": "alicepw",  # implicit TLS upstream
    "bob": "bobpw",  # STARTTLS upstream
    "carol": "carolpw",  # plaintext upstream
    "dora": 'dora pw "q" ü',  # implicit TLS; quotes, space and 8-bit in the password
    "kim": "kimpw",  # implicit TLS; gets kicked by the upstream
    "stored": "localpw",  # stored upstream credentials (logs in upstream as carol)
    "downuser": "pw",  # upstream port closed
    "badcert": "pw",  # upstream certificate does not match the name
    "ida": "idapw",  # IDLE tests, plaintext upstream
}


def seedMessages() -> list[bytes]:
    """
    Messages with the shapes real mailboxes have, CRLF line ends.
    """
    plain = EmailMessage()
    plain["From"] = "Alice <alice@example.test>"
    plain["To"] = "bob@example.test"
    plain["Subject"] = "plain text"
    plain.set_content("Hello.\n.\nFrom the start of a line.\n")

    eightBit = (
        "From: Jürgen Müller <juergen@example.test>\r\n"
        "To: Zoë <zoe@example.test>\r\n"
        "Subject: Grüße aus Köln – 東京 ✓\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Größe, Straße, naïve café.\r\n"
    ).encode()

    multipart = MIMEMultipart("mixed")
    multipart["From"] = "Bob <bob@example.test>"
    multipart["To"] = "alice@example.test"
    multipart["Subject"] = "multipart with a large attachment"
    multipart.attach(MIMEText("See attachment.\n", "plain", "utf-8"))
    blob = bytes((index * 7919) % 251 for index in range(1_200_000))
    multipart.attach(MIMEApplication(blob, Name="blob.bin"))

    alternative = MIMEMultipart("alternative")
    alternative["From"] = "Ops <ops@example.test>"
    alternative["Subject"] = "alternative"
    alternative.attach(MIMEText("text part\n", "plain", "utf-8"))
    alternative.attach(MIMEText("<p>html part</p>\n", "html", "utf-8"))

    messages = [plain.as_bytes(), eightBit, multipart.as_bytes(), alternative.as_bytes()]
    return [message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for message in messages]


def tlsContext(caFile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=caFile)
    return context


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotUpstream]:
    upstream = DovecotUpstream()
    for name, password in UPSTREAM_USERS.items():
        upstream.addUser(name, password)
    upstream.start()
    try:
        messages = seedMessages()
        for name in SEEDED_USERS:
            client = imaplib.IMAP4(HOST, upstream.ports["imap"])
            secret = UPSTREAM_USERS[name].encode()
            plain = b"\0" + name.encode() + b"\0" + secret

            def respond(challenge: bytes, plain: bytes = plain) -> bytes:
                return plain

            client.authenticate("PLAIN", respond)
            for message in messages:
                client.append("INBOX", None, None, message)
            client.logout()
        yield upstream
    finally:
        upstream.stop()
        shutil.rmtree(upstream.baseDir, ignore_errors=True)


@dataclass
class RunningProxy:
    ports: dict[str, int]
    caFile: str
    process: ProxyProcess

    def log(self) -> str:
        return self.process.log()


def proxyConfig(dovecot: DovecotUpstream, ports: dict[str, int]) -> str:
    closedPort = freePort()
    return f"""
[server]
greeting = "test proxy ready"

[auth]
users_file = "users"
failure_delay = 0.3

[[listener]]
name = "plain"
endpoint = "tcp:{ports["plain"]}:interface=127.0.0.1"
tls = "plain"
allow_plaintext_auth = true

[[listener]]
name = "starttls"
endpoint = "tcp:{ports["starttls"]}:interface=127.0.0.1"
tls = "starttls"
certificate = "{dovecot.certFile}"
private_key = "{dovecot.keyFile}"

[[listener]]
name = "implicit"
endpoint = "tcp:{ports["implicit"]}:interface=127.0.0.1"
tls = "implicit"
certificate = "{dovecot.certFile}"
private_key = "{dovecot.keyFile}"

[upstream.implicit]
host = "127.0.0.1"
port = {dovecot.ports["imaps"]}
tls = "implicit"
ca_file = "{dovecot.caFile}"

[upstream.starttls]
host = "localhost"
port = {dovecot.ports["imap"]}
tls = "starttls"
ca_file = "{dovecot.caFile}"

[upstream.plain]
host = "127.0.0.1"
port = {dovecot.ports["imap"]}
tls = "plain"

[upstream.down]
host = "127.0.0.1"
port = {closedPort}
connect_timeout = 3

[upstream.badcert]
host = "127.0.0.1"
port = {dovecot.ports["imaps"]}
tls = "implicit"
ca_file = "{dovecot.caFile}"
server_name = "wrong.example"

[routing]
default_upstream = "implicit"

[routing.users.bob]
upstream = "starttls"

[routing.users.carol]
upstream = "plain"

[routing.users.ida]
upstream = "plain"

[routing.users.stored]
upstream = "plain"
username = "carol"
password = "carolpw"

[routing.users.downuser]
upstream = "down"

[routing.users.badcert]
upstream = "badcert"
"""


@pytest.fixture(scope="session")
def proxy(dovecot: DovecotUpstream) -> Iterator[RunningProxy]:
    ports = {name: freePort() for name in ("plain", "starttls", "implicit")}
    with runningProxy(proxyConfig(dovecot, ports), LOCAL_USERS, list(ports.values())) as (_, process):
        yield RunningProxy(ports, dovecot.caFile, process)


FILTERED_CONFIG = """
[auth]
users_file = "users"
failure_delay = 0.3

[filters.audit]
type = "audit"
file = "audit.jsonl"

[filters.readonly]
type = "policy"
read_only = true

[filters.limits]
type = "policy"
max_append_size = 100000
mailboxes_deny = ["Archive*"]

[filters.folders]
type = "folders"
map = {{ "Gesendet" = "Sent", "Entwürfe" = "Drafts" }}
hide = ["Junk"]

[filters.caps]
type = "capabilities"
hide = ["MOVE"]
add = ["X-MAILPROXY"]

[[listener]]
name = "filtered"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["audit"]

[upstream.plain]
host = "127.0.0.1"
port = {upstreamPort}

[routing]
default_upstream = "plain"
default_filters = ["limits", "folders", "caps"]

[routing.users.rita]
filters = ["readonly"]
"""


@dataclass
class FilteredProxy:
    port: int
    directory: str
    process: ProxyProcess

    def audit(self) -> list[dict[str, object]]:
        with open(os.path.join(self.directory, "audit.jsonl")) as handle:
            return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="session")
def filteredProxy(dovecot: DovecotUpstream) -> Iterator[FilteredProxy]:
    """
    The proxy with every built-in filter configured: audit on the listener,
    limits + folders + capabilities by default, read-only for rita.
    """
    port = freePort()
    config = FILTERED_CONFIG.format(port=port, upstreamPort=dovecot.ports["imap"])
    users = {name: UPSTREAM_USERS[name] for name in ("fred", "rita")}
    with runningProxy(config, users, [port], "mp-filtered-") as (directory, process):
        yield FilteredProxy(port, directory, process)


@dataclass
class EmulatingProxy:
    port: int
    upstream: DovecotUpstream
    process: ProxyProcess


@pytest.fixture(scope="session")
def emulatingProxy() -> Iterator[EmulatingProxy]:
    """
    A Dovecot without IDLE and the proxy in front of it, polling every 0.3 s
    to emulate IDLE; ivy may not touch Archive.
    """
    upstream = DovecotUpstream(idle=False)
    users = {name: UPSTREAM_USERS[name] for name in ("ida", "ivy")}
    upstream.addUsers(users)
    upstream.start()
    try:
        port = freePort()
        config = f"""
[server]
idle_poll_interval = 0.3
[auth]
users_file = "users"
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
[upstream.noidle]
host = "127.0.0.1"
port = {upstream.ports["imap"]}
[routing]
default_upstream = "noidle"
[filters.deny]
type = "policy"
mailboxes_deny = ["Archive"]
[routing.users.ivy]
filters = ["deny"]
"""
        with runningProxy(config, users, [port], "mp-emulating-") as (_, process):
            yield EmulatingProxy(port, upstream, process)
    finally:
        upstream.stop()
        shutil.rmtree(upstream.baseDir, ignore_errors=True)


POP3_CONFIG = """
[auth]
users_file = "users"
failure_delay = 0.3

[[listener]]
name = "plain"
protocol = "pop3"
endpoint = "tcp:{plain}:interface=127.0.0.1"
allow_plaintext_auth = true

[[listener]]
name = "stls"
protocol = "pop3"
endpoint = "tcp:{stls}:interface=127.0.0.1"
tls = "starttls"
certificate = "{cert}"
private_key = "{key}"

[[listener]]
name = "implicit"
protocol = "pop3"
endpoint = "tcp:{implicit}:interface=127.0.0.1"
tls = "implicit"
certificate = "{cert}"
private_key = "{key}"

[upstream.bridge]
host = "127.0.0.1"
port = {imap}

[upstream.pop3-stls]
protocol = "pop3"
host = "localhost"
port = {pop3}
tls = "starttls"
ca_file = "{ca}"

[upstream.pop3-implicit]
protocol = "pop3"
host = "localhost"
port = {pop3s}
tls = "implicit"
ca_file = "{ca}"

[routing]
default_upstream = "bridge"
{routes}
"""


@dataclass
class POP3Proxy:
    ports: dict[str, int]
    caFile: str
    directory: str
    process: ProxyProcess


@pytest.fixture(scope="session")
def pop3Proxy(dovecot: DovecotUpstream) -> Iterator[POP3Proxy]:
    """
    POP3 listeners (plain, STLS, implicit TLS) in front of Dovecot: some users
    bridged to IMAP, others relayed to Dovecot's POP3 (STLS or POP3S).
    """
    ports = {name: freePort() for name in ("plain", "stls", "implicit")}
    routes = "".join(f'[routing.users.{name}]\nupstream = "{upstream}"\n' for name, upstream in POP3_USERS.items())
    config = POP3_CONFIG.format(
        **ports,
        cert=dovecot.certFile,
        key=dovecot.keyFile,
        ca=dovecot.caFile,
        imap=dovecot.ports["imap"],
        pop3=dovecot.ports["pop3"],
        pop3s=dovecot.ports["pop3s"],
        routes=routes,
    )
    users = {name: UPSTREAM_USERS[name] for name in POP3_USERS}
    with runningProxy(config, users, list(ports.values()), "mp-pop3-") as (directory, process):
        yield POP3Proxy(ports, dovecot.caFile, directory, process)


# -- filter bypass attacks (tests/test_filter_bypass.py, test_filter_differential.py)


@pytest.fixture(scope="session")
def bypassProxy() -> Iterator[BypassProxy]:
    """
    The proxy in front of its own rawlogging Dovecot, for filter bypass
    attacks: mallory may not touch Archive, rory is read-only without
    Archive and sees no Lists*, penny has no filters (and C{barePort} is a
    listener without any).
    """
    upstream = DovecotUpstream(rawlog=True, autoMailboxes=False)
    upstream.addUsers(BYPASS_USERS)
    upstream.start()
    try:
        for user in BYPASS_USERS:
            upstream.enableRawlog(user)
        port, barePort = freePort(), freePort()
        config = BYPASS_CONFIG.format(port=port, barePort=barePort, upstreamPort=upstream.ports["imap"])
        users = {name: BYPASS_USERS[name] for name in ("mallory", "rory", "penny")}
        with runningProxy(config, users, [port, barePort], "mp-bypass-") as (directory, process):
            proxy = BypassProxy(port, barePort, directory, process, upstream)
            for user in BYPASS_USERS:
                proxy.seed(user)
            yield proxy
    finally:
        upstream.stop()
        shutil.rmtree(upstream.baseDir, ignore_errors=True)
