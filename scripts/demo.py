"""
C{make demo}: a private Dovecot on loopback with a demo mailbox, and the
proxy in front of it under C{twistd -n}, until Ctrl-C.

Everything lives in the demo directory (C{.demo/} of the checkout, or
C{$DEMO_DIR}), Dovecot's own directory too where the mail user can
traverse it (see L{tests.dovecot}); otherwise Dovecot's directory is one
under /tmp named after the demo directory.  A lock file in the demo
directory keeps a second demo of the same checkout from starting: it would
share (and on exit stop) the first one's Dovecot.

Ctrl-C reaches only this script (twistd runs in a session of its own, see
L{ProxyProcess}), which stops the proxy and then Dovecot, once each.
"""

from __future__ import annotations

import fcntl
import hashlib
import imaplib
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import IO

from mailproxy.passwords import hashPassword, writeUser
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyProcess

HOST = "127.0.0.1"
PROXY_IMAP_PORT = int(os.environ.get("DEMO_IMAP_PORT", "10143"))
PROXY_IMAPS_PORT = int(os.environ.get("DEMO_IMAPS_PORT", "10993"))
PROXY_POP3_PORT = int(os.environ.get("DEMO_POP3_PORT", "10110"))
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.abspath(os.environ.get("DEMO_DIR", os.path.join(CHECKOUT, ".demo")))
USER, PASSWORD = "demo", "demo"
LOCK_NAME = "demo.lock"
LOG_NAME = "twistd.log"
# Enough for a slow first start (scrypt, TLS contexts), bounded all the same.
LISTEN_TIMEOUT = 30.0
POLL_INTERVAL = 0.5

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


class DemoRunning(Exception):
    """
    Another demo holds the lock of this demo directory.
    """


def lockDemoDirectory(demoDir: str) -> IO[str]:
    """
    Take the demo directory's lock (held until the returned file is closed,
    or the process ends) and write this process's id into it.

    @raise DemoRunning: naming the holder's pid, if another demo holds it.
    """
    handle = open(os.path.join(demoDir, LOCK_NAME), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DemoRunning(holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def traversableByMailUser(path: str) -> bool:
    """
    Whether Dovecot's mail processes can reach C{path}: as root they run as
    C{nobody} and need the others' C{x} bit on every directory above it.
    """
    if os.geteuid() != 0:
        return True
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def dovecotDirectory(demoDir: str) -> str:
    """
    Where this demo directory's Dovecot lives: inside it if possible, else
    under /tmp with a name of its own (one per demo directory, never shared).
    """
    if traversableByMailUser(demoDir):
        return os.path.join(demoDir, "dovecot")
    digest = hashlib.sha256(demoDir.encode("utf-8")).hexdigest()[:12]
    return os.path.join("/tmp", f"mailproxy-demo-{pwd.getpwuid(os.getuid()).pw_name}-{digest}")


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


def writeConfig(demoDir: str, upstream: DovecotUpstream) -> str:
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
    return configPath


def banner(upstream: DovecotUpstream, proxy: ProxyProcess) -> str:
    return f"""
mailproxy demo: Dovecot upstream on {HOST}:{upstream.ports["imaps"]} (implicit TLS), proxy on
  imap://{HOST}:{PROXY_IMAP_PORT}  (STARTTLS; plaintext login allowed for the demo)
  imaps://{HOST}:{PROXY_IMAPS_PORT}
  pop3://{HOST}:{PROXY_POP3_PORT}  (STLS offered; POP3-to-IMAP bridge)
user {USER!r}, password {PASSWORD!r}; CA certificate for TLS: {upstream.caFile}
proxy: twistd pid {proxy.pid}, config {proxy.configPath}; Dovecot: pid {upstream.pid}, in {upstream.baseDir}
The proxy logs to {proxy.logFile} (tail -f it to watch the sessions).

Try, in another terminal:
  curl -u {USER}:{PASSWORD} 'imap://{HOST}:{PROXY_IMAP_PORT}/INBOX;UID=1'
  curl --cacert {upstream.caFile} -u {USER}:{PASSWORD} 'imaps://localhost:{PROXY_IMAPS_PORT}/'
  curl -u {USER}:{PASSWORD} 'pop3://{HOST}:{PROXY_POP3_PORT}/1'
  python3 -c "import imaplib; c=imaplib.IMAP4('{HOST}', {PROXY_IMAP_PORT}); c.login('{USER}','{PASSWORD}'); print(c.select())"
Ctrl-C stops the proxy and Dovecot.
"""


def raiseKeyboardInterrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serveUntilInterrupted(
    name: str, what: str, start: Callable[[list[ProxyProcess]], ProxyProcess], stopTheRest: Callable[[], None]
) -> int:
    """
    Bring the demo up with C{start} (which notes the proxy in the list it
    is given as soon as it runs, and returns it serving), then wait for
    Ctrl-C, SIGTERM or the proxy's exit; stop the proxy, then the rest,
    either way.

    @return: the exit status: 0 after Ctrl-C or SIGTERM, 1 on a failure.
    """
    running: list[ProxyProcess] = []
    try:
        proxy = start(running)
        while proxy.process.poll() is None:
            time.sleep(POLL_INTERVAL)
        print(
            f"{name}: the proxy exited by itself, with status {proxy.process.returncode}:\n{proxy.output()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, subprocess.SubprocessError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave Dovecot or twistd behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"stopping {what}...", flush=True)
        for proxy in running:
            proxy.stop()
        stopTheRest()
        print("demo stopped", flush=True)


def serve(demoDir: str, upstream: DovecotUpstream) -> int:
    """
    Run Dovecot and the proxy until Ctrl-C, SIGTERM or the proxy's exit;
    stop both either way.
    """

    def start(running: list[ProxyProcess]) -> ProxyProcess:
        upstream.addUser(USER, PASSWORD)
        upstream.start()
        seed(upstream)
        # The log goes to a file: the terminal keeps the banner in view.
        proxy = ProxyProcess(writeConfig(demoDir, upstream), os.path.join(demoDir, LOG_NAME))
        running.append(proxy)
        proxy.waitForPorts([PROXY_IMAP_PORT, PROXY_IMAPS_PORT, PROXY_POP3_PORT], timeout=LISTEN_TIMEOUT)
        print(banner(upstream, proxy), flush=True)
        return proxy

    return serveUntilInterrupted("make demo", "the proxy and Dovecot", start, upstream.stop)


def main() -> int:
    signal.signal(signal.SIGTERM, raiseKeyboardInterrupt)
    os.makedirs(DEMO_DIR, exist_ok=True)
    try:
        lock = lockDemoDirectory(DEMO_DIR)
    except DemoRunning as running:
        print(
            f"make demo: another demo is already running in {DEMO_DIR} (pid {running}); "
            "stop it with Ctrl-C first, or set DEMO_DIR and the DEMO_*_PORT variables for a second one",
            file=sys.stderr,
        )
        return 1
    with lock:
        try:
            upstream = DovecotUpstream(dovecotDirectory(DEMO_DIR))
        except ValueError as error:
            print(f"make demo: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        return serve(DEMO_DIR, upstream)


if __name__ == "__main__":
    raise SystemExit(main())
