"""
POP3 download of a whole maildrop with poplib: through the proxy's
POP3-to-IMAP bridge and its POP3 relay, against Dovecot's own POP3, in one
run.

    .venv/bin/python -m bench.pop3_download --messages 500 --size 20000 --rounds 3

Each round logs in, runs STAT, LIST, UIDL and RETR for every message, and
QUITs (keeping the messages); the targets are interleaved and the median
round is reported, with ratios against direct POP3.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import poplib
import shutil
import statistics
import tempfile
import time

from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort

USER, PASSWORD = "popbench", "popbenchpw"


def seed(upstream: DovecotUpstream, count: int, size: int) -> None:
    client = imaplib.IMAP4(HOST, upstream.ports["imap"])
    client.login(USER, PASSWORD)
    body = os.urandom(size * 3 // 4).hex().encode()[:size]
    text = b"\r\n".join(body[index : index + 76] for index in range(0, len(body), 76))
    for number in range(count):
        client.append("INBOX", None, None, b"Subject: pop bench %d\r\n\r\n%s\r\n.dot line\r\n" % (number, text))
    client.logout()


def download(port: int, user: str, password: str) -> tuple[float, int]:
    started = time.perf_counter()
    client = poplib.POP3(HOST, port, timeout=120)
    client.user(user)
    client.pass_(password)
    count, _ = client.stat()
    client.list()
    client.uidl()
    octets = 0
    for number in range(1, count + 1):
        octets += client.retr(number)[2]
    client.quit()
    return time.perf_counter() - started, octets


CONFIG = """
[auth]
users_file = "users"
[[listener]]
protocol = "pop3"
endpoint = "tcp:{port}:interface=127.0.0.1"
allow_plaintext_auth = true
[upstream.imap]
host = "127.0.0.1"
port = {imap}
[upstream.pop3]
protocol = "pop3"
host = "127.0.0.1"
port = {pop3}
[routing]
default_upstream = "imap"
[routing.users.relayed]
upstream = "pop3"
username = "{user}"
password = "{password}"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="mp-bench-pop3-")
    upstream = DovecotUpstream()
    upstream.addUser(USER, PASSWORD)
    proxy = None
    try:
        upstream.start()
        seed(upstream, arguments.messages, arguments.size)
        with open(os.path.join(directory, "users"), "w") as handle:
            handle.write(f"{USER}:{hashPassword(PASSWORD, log2N=10)}\n")
            handle.write(f"relayed:{hashPassword('relayedpw', log2N=10)}\n")
        port = freePort()
        configPath = os.path.join(directory, "mailproxy.toml")
        with open(configPath, "w") as handle:
            handle.write(
                CONFIG.format(
                    port=port, imap=upstream.ports["imap"], pop3=upstream.ports["pop3"], user=USER, password=PASSWORD
                )
            )
        proxy = ProxyProcess(configPath, os.path.join(directory, "log"))
        proxy.waitForPorts([port])
        targets = {
            "direct POP3": (upstream.ports["pop3"], USER, PASSWORD),
            "proxy bridge": (port, USER, PASSWORD),
            "proxy relay": (port, "relayed", "relayedpw"),
        }
        results: dict[str, list[float]] = {name: [] for name in targets}
        octets: dict[str, int] = {}
        for target in targets.values():
            download(*target)  # warm-up
        for _ in range(arguments.rounds):
            for name, target in targets.items():
                seconds, octets[name] = download(*target)
                results[name].append(seconds)
        direct = statistics.median(results["direct POP3"])
        print(f"\n{arguments.messages} messages of ~{arguments.size} octets, median of {arguments.rounds} rounds")
        for name, values in results.items():
            seconds = statistics.median(values)
            print(
                f"{name:<14} {seconds:7.3f} s  {octets[name] / seconds / 1e6:7.1f} MB/s  "
                f"{seconds / direct:5.2f}x direct time"
            )
        if len(set(octets.values())) != 1:
            raise SystemExit(f"targets returned different octet counts: {octets}")
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(upstream.baseDir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
