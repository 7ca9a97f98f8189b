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
import poplib
import statistics
import time

from bench.common import HOST, freePort, privateDovecot, seed, startProxy, workDirectory, writeUsersFile

USER, PASSWORD = "popbench", "popbenchpw"
CHEAP_LOG2_N = 10


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
    with workDirectory("mp-bench-pop3-") as directory, privateDovecot({USER: PASSWORD}) as upstream:
        seed(upstream.ports["imap"], arguments.messages, arguments.size, user=USER, password=PASSWORD)
        writeUsersFile(directory, {USER: (PASSWORD, CHEAP_LOG2_N), "relayed": ("relayedpw", CHEAP_LOG2_N)})
        port = freePort()
        config = CONFIG.format(
            port=port, imap=upstream.ports["imap"], pop3=upstream.ports["pop3"], user=USER, password=PASSWORD
        )
        with startProxy(directory, config, [port]):
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
