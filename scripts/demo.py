"""
C{make demo}: a private Dovecot on loopback with a demo mailbox, and the
proxy in front of it under C{twistd -n}, until Ctrl-C.

Everything lives in C{.demo/} of the checkout except Dovecot's own
directory, which must be traversable by the mail user and is made under
/tmp.
"""

from __future__ import annotations

import imaplib
import os
import signal
import time
from email.message import EmailMessage

from mailproxy.passwords import hashPassword, writeUser
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyProcess

HOST = "127.0.0.1"
PROXY_IMAP_PORT = int(os.environ.get("DEMO_IMAP_PORT", "10143"))
PROXY_IMAPS_PORT = int(os.environ.get("DEMO_IMAPS_PORT", "10993"))
PROXY_POP3_PORT = int(os.environ.get("DEMO_POP3_PORT", "10110"))
USER, PASSWORD = "demo", "demo"

CONFIG = """\
# Written by `make demo`.
[server]
greeting = "mailproxy demo ready."

[auth]
users_file = "users"
failure_delay = 1.0

[[listener]]
name = "imap"
endpoint = "tcp:{imap}:interface=127.0.0.1"
tls = "starttls"
certificate = "{cert}"
private_key = "{key}"
# Loopback demo only: lets `curl imap://` log in without STARTTLS.
allow_plaintext_auth = true

[[listener]]
name = "imaps"
endpoint = "tcp:{imaps}:interface=127.0.0.1"
tls = "implicit"
certificate = "{cert}"
private_key = "{key}"

[[listener]]
name = "pop3"
protocol = "pop3"
endpoint = "tcp:{pop3}:interface=127.0.0.1"
tls = "starttls"
certificate = "{cert}"
private_key = "{key}"
# Loopback demo only, as above. POP3 users are bridged to IMAP.
allow_plaintext_auth = true

[upstream.dovecot]
host = "localhost"
port = {upstreamPort}
tls = "implicit"
ca_file = "{ca}"

[routing]
default_upstream = "dovecot"
"""


def seed(upstream: DovecotUpstream) -> None:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    client.login(USER, PASSWORD)
    typ, data = client.select("INBOX")
    if data == [b"0"]:
        message = EmailMessage()
        message["From"] = "mailproxy <demo@example.test>"
        message["To"] = "demo@example.test"
        message["Subject"] = "Welcome to the mailproxy demo"
        message.set_content("This message is stored in a private Dovecot and was fetched through mailproxy.\n")
        client.append("INBOX", None, None, message.as_bytes().replace(b"\n", b"\r\n"))
    client.logout()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    demoDir = os.path.abspath(".demo")
    os.makedirs(demoDir, exist_ok=True)
    upstream = DovecotUpstream(os.path.join("/tmp", f"mailproxy-demo-dovecot-{os.getuid()}"))
    upstream.addUser(USER, PASSWORD)
    upstream.start()
    proxy: ProxyProcess | None = None
    try:
        seed(upstream)
        writeUser(os.path.join(demoDir, "users"), USER, hashPassword(PASSWORD))
        configPath = os.path.join(demoDir, "mailproxy.toml")
        with open(configPath, "w") as handle:
            handle.write(
                CONFIG.format(
                    imap=PROXY_IMAP_PORT,
                    imaps=PROXY_IMAPS_PORT,
                    pop3=PROXY_POP3_PORT,
                    cert=upstream.certFile,
                    key=upstream.keyFile,
                    ca=upstream.caFile,
                    upstreamPort=upstream.ports["imaps"],
                )
            )
        print(
            f"""
mailproxy demo: Dovecot upstream on {HOST}:{upstream.ports["imaps"]} (implicit TLS), proxy on
  imap://{HOST}:{PROXY_IMAP_PORT}  (STARTTLS; plaintext login allowed for the demo)
  imaps://{HOST}:{PROXY_IMAPS_PORT}
  pop3://{HOST}:{PROXY_POP3_PORT}  (STLS offered; POP3-to-IMAP bridge)
user {USER!r}, password {PASSWORD!r}; CA certificate for TLS: {upstream.caFile}

Try, in another terminal:
  curl -u {USER}:{PASSWORD} 'imap://{HOST}:{PROXY_IMAP_PORT}/INBOX;UID=1'
  curl --cacert {upstream.caFile} -u {USER}:{PASSWORD} 'imaps://localhost:{PROXY_IMAPS_PORT}/'
  curl -u {USER}:{PASSWORD} 'pop3://{HOST}:{PROXY_POP3_PORT}/1'
  python3 -c "import imaplib; c=imaplib.IMAP4('{HOST}', {PROXY_IMAP_PORT}); c.login('{USER}','{PASSWORD}'); print(c.select())"
Ctrl-C stops the proxy and Dovecot.
""",
            flush=True,
        )
        proxy = ProxyProcess(configPath)
        while proxy.process.poll() is None:
            time.sleep(0.5)
        return proxy.process.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()
        print("demo stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
