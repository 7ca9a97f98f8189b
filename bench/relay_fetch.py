"""
Relay overhead, measured in one run against the direct upstream.

    make bench            (or: .venv/bin/python -m bench.relay_fetch --messages 200 --size 51200 --rounds 5)

Starts a private Dovecot, seeds one mailbox, starts the proxy (twistd) in
front of it, then interleaves rounds of the same workload direct and through
the proxy, in plaintext and over TLS (client and upstream side), and through
a listener with an audit + policy filter chain, and prints ratios:
proxy/direct, and filtered/unfiltered.  With --metrics a second proxy
process with Prometheus metrics on joins the rounds (metrics are per
process), and the ratios metrics on/off are printed too. Absolute times depend on the machine; the ratios are
the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import statistics
import tempfile
import time

from mailproxy.passwords import hashPassword
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort

USER, PASSWORD = "bench", "benchpw"
TAG = b"Zq9"


class RawClient:
    """
    A minimal IMAP client that reads whole responses without parsing them,
    so the client costs the same for both targets.
    """

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        sock = socket.create_connection((HOST, port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.counter = 0
        self.buffer = b""
        self._readLine()

    def _readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def command(self, text: bytes) -> int:
        """
        Send a command, wait for its tagged OK; return the octets received.
        """
        self.counter += 1
        tag = TAG + b"%d" % self.counter
        self.sock.sendall(tag + b" " + text + b"\r\n")
        marker = b"\r\n" + tag + b" "
        data = bytearray(self.buffer)
        self.buffer = b""
        searched = 0
        start = -1
        while True:
            # Search only what arrived since the last look: a rescan of the
            # whole buffer per TLS record would dominate the measurement.
            if start < 0 and data.startswith(tag + b" "):
                start = 0
            elif start < 0:
                index = data.find(marker, max(0, searched - len(marker)))
                start = -1 if index < 0 else index + 2
            if start >= 0:
                end = data.find(b"\r\n", start)
                if end >= 0:
                    status = bytes(data[start:end])
                    if b" OK" not in status[: len(tag) + 4]:
                        raise RuntimeError(status.decode(errors="replace"))
                    self.buffer = bytes(data[end + 2 :])
                    return end + 2
            searched = len(data)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk

    def close(self) -> None:
        self.sock.close()


def seed(upstream: DovecotUpstream, count: int, size: int) -> None:
    client = RawClient(upstream.ports["imap"], None)
    client.command(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    body = os.urandom(size * 3 // 4).hex().encode()[:size]
    lines = b"\r\n".join(body[index : index + 76] for index in range(0, len(body), 76))
    for number in range(count):
        message = b"Subject: bench %d\r\nFrom: bench@example.test\r\n\r\n%s\r\n" % (number, lines)
        client.command(b"APPEND INBOX {%d+}\r\n%s" % (len(message), message))
    client.command(b"LOGOUT")
    client.close()


def measure(port: int, context: ssl.SSLContext | None, count: int) -> dict[str, float]:
    started = time.perf_counter()
    client = RawClient(port, context)
    client.command(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    login = time.perf_counter() - started
    client.command(b"EXAMINE INBOX")
    started = time.perf_counter()
    octets = client.command(b"UID FETCH 1:* (BODY.PEEK[])")
    bulk = time.perf_counter() - started
    latencies = []
    for uid in range(1, count + 1):
        started = time.perf_counter()
        client.command(b"UID FETCH %d (BODY.PEEK[HEADER])" % uid)
        latencies.append(time.perf_counter() - started)
    noops = []
    for _ in range(200):
        started = time.perf_counter()
        client.command(b"NOOP")
        noops.append(time.perf_counter() - started)
    client.command(b"LOGOUT")
    client.close()
    return {
        "login_ms": login * 1000,
        "bulk_MBps": octets / bulk / 1e6,
        "fetch_p50_ms": statistics.median(latencies) * 1000,
        "noop_p50_us": statistics.median(noops) * 1e6,
    }


def writeConfig(
    directory: str,
    upstream: DovecotUpstream,
    plainPort: int,
    tlsPort: int,
    filteredPort: int,
    metricsPort: int | None = None,
) -> str:
    with open(os.path.join(directory, "users"), "w") as handle:
        handle.write(f"{USER}:{hashPassword(PASSWORD)}\n")
    path = os.path.join(directory, "mailproxy.toml")
    metrics = f'[metrics]\nlisten = "tcp:{metricsPort}:interface=127.0.0.1"\n' if metricsPort else ""
    with open(path, "w") as handle:
        handle.write(
            metrics
            + f"""
[auth]
users_file = "users"
[[listener]]
name = "plain"
endpoint = "tcp:{plainPort}:interface=127.0.0.1"
allow_plaintext_auth = true
[[listener]]
name = "filtered"
endpoint = "tcp:{filteredPort}:interface=127.0.0.1"
allow_plaintext_auth = true
filters = ["audit", "policy"]
[filters.audit]
type = "audit"
file = "audit.jsonl"
log = false
[filters.policy]
type = "policy"
deny = ["SETACL", "DELETEACL"]
mailboxes_deny = ["Private*"]
max_append_size = 52428800
[[listener]]
name = "tls"
endpoint = "tcp:{tlsPort}:interface=127.0.0.1"
tls = "implicit"
certificate = "{upstream.certFile}"
private_key = "{upstream.keyFile}"
[upstream.plain]
host = "127.0.0.1"
port = {upstream.ports["imap"]}
[upstream.tls]
host = "localhost"
port = {upstream.ports["imaps"]}
tls = "implicit"
ca_file = "{upstream.caFile}"
[routing]
default_upstream = "plain"
"""
        )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=51200, help="octets per message body")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metrics", action="store_true", help="also measure a proxy with Prometheus metrics on")
    arguments = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="mp-bench-")
    upstream = DovecotUpstream()
    upstream.addUser(USER, PASSWORD)
    proxy = metered = None
    try:
        upstream.start()
        seed(upstream, arguments.messages, arguments.size)
        ports = {"plain": freePort(), "tls": freePort(), "filtered": freePort()}
        configPath = writeConfig(directory, upstream, ports["plain"], ports["tls"], ports["filtered"])
        proxy = ProxyProcess(configPath, f"{directory}/log")
        proxy.waitForPorts(list(ports.values()))
        context = ssl.create_default_context(cafile=upstream.caFile)
        targets = {
            "direct plain": (upstream.ports["imap"], None),
            "proxy plain": (ports["plain"], None),
            "proxy filters": (ports["filtered"], None),
            "direct TLS": (upstream.ports["imaps"], context),
            "proxy TLS": (ports["tls"], context),
        }
        if arguments.metrics:
            meteredDirectory = os.path.join(directory, "metered")
            os.mkdir(meteredDirectory)
            meteredPorts = {name: freePort() for name in ("plain", "tls", "filtered", "metrics")}
            meteredConfig = writeConfig(
                meteredDirectory,
                upstream,
                meteredPorts["plain"],
                meteredPorts["tls"],
                meteredPorts["filtered"],
                meteredPorts["metrics"],
            )
            metered = ProxyProcess(meteredConfig, f"{meteredDirectory}/log")
            metered.waitForPorts(list(meteredPorts.values()))
            targets["metrics plain"] = (meteredPorts["plain"], None)
            targets["metrics TLS"] = (meteredPorts["tls"], context)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for port, tls in targets.values():  # warm-up round, not counted
            measure(port, tls, arguments.messages)
        for _ in range(arguments.rounds):
            for name, (port, tls) in targets.items():
                results[name].append(measure(port, tls, arguments.messages))
        report(results, arguments)
    finally:
        for process in (proxy, metered):
            if process is not None:
                process.stop()
        upstream.stop()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(upstream.baseDir, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, float]]], arguments: argparse.Namespace) -> None:
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()
    }
    megabytes = arguments.messages * arguments.size / 1e6
    print(
        f"\n{arguments.messages} messages x {arguments.size} octets (~{megabytes:.1f} MB), "
        f"median of {arguments.rounds} interleaved rounds"
    )
    keys = ["login_ms", "bulk_MBps", "fetch_p50_ms", "noop_p50_us"]
    print(f"{'target':<14}" + "".join(f"{key:>14}" for key in keys))
    for name, values in medians.items():
        print(f"{name:<14}" + "".join(f"{values[key]:>14.2f}" for key in keys))
    empty, chained = medians["proxy plain"], medians["proxy filters"]
    print(
        f"audit+policy chain vs empty chain: bulk throughput {chained['bulk_MBps'] / empty['bulk_MBps']:.2f}x, "
        f"per-message FETCH +{chained['fetch_p50_ms'] - empty['fetch_p50_ms']:.3f} ms, "
        f"NOOP +{chained['noop_p50_us'] - empty['noop_p50_us']:.0f} us"
    )
    for mode in ("plain", "TLS"):
        if f"metrics {mode}" not in medians:
            continue
        off, on = medians[f"proxy {mode}"], medians[f"metrics {mode}"]
        print(
            f"{mode:<5} metrics on/off: bulk throughput {on['bulk_MBps'] / off['bulk_MBps']:.2f}x, "
            f"per-message FETCH {on['fetch_p50_ms'] / off['fetch_p50_ms']:.2f}x "
            f"(+{on['fetch_p50_ms'] - off['fetch_p50_ms']:.3f} ms), "
            f"NOOP +{on['noop_p50_us'] - off['noop_p50_us']:.0f} us"
        )
    for mode in ("plain", "TLS"):
        direct, proxied = medians[f"direct {mode}"], medians[f"proxy {mode}"]
        print(
            f"{mode:<5} proxy/direct: bulk throughput {proxied['bulk_MBps'] / direct['bulk_MBps']:.2f}x, "
            f"per-message FETCH +{proxied['fetch_p50_ms'] - direct['fetch_p50_ms']:.3f} ms "
            f"({proxied['fetch_p50_ms'] / direct['fetch_p50_ms']:.2f}x), "
            f"NOOP +{proxied['noop_p50_us'] - direct['noop_p50_us']:.0f} us, "
            f"login +{proxied['login_ms'] - direct['login_ms']:.1f} ms (includes scrypt)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
