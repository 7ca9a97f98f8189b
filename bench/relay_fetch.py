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
import contextlib
import os
import ssl
import statistics
import time
from collections.abc import Sequence

from bench.common import (
    PASSWORD,
    USER,
    RawClient,
    freePort,
    privateDovecot,
    seed,
    startProxy,
    workDirectory,
    writeUsersFile,
)
from mailproxy.passwords import DEFAULT_LOG2_N
from tests.dovecot import DovecotUpstream

# one round trip per command: a Nagle/delayed-ACK stall (40 ms class) shows
# up here as an overhead far above a millisecond
NOOP_ROUNDS = 200


def bulkFetch(client: RawClient) -> tuple[int, float]:
    """
    FETCH every message of the selected mailbox in one command: (octets,
    seconds).
    """
    started = time.perf_counter()
    octets = client.command(b"UID FETCH 1:* (BODY.PEEK[])")
    return octets, time.perf_counter() - started


def perMessageLatencies(client: RawClient, uids: Sequence[int], item: bytes = b"BODY.PEEK[]") -> list[float]:
    """
    Seconds per single-message FETCH, one command in flight at a time.
    """
    latencies = []
    for uid in uids:
        started = time.perf_counter()
        client.command(b"UID FETCH %d (%s)" % (uid, item))
        latencies.append(time.perf_counter() - started)
    return latencies


def pipelinedLatencies(client: RawClient, uids: Sequence[int], depth: int) -> list[float]:
    """
    Seconds per batch of C{depth} single-message FETCHes sent in one write.
    """
    latencies = []
    for first in range(0, len(uids) - depth + 1, depth):
        batch = [b"UID FETCH %d (BODY.PEEK[])" % uid for uid in uids[first : first + depth]]
        started = time.perf_counter()
        client.pipeline(batch)
        latencies.append(time.perf_counter() - started)
    return latencies


def noopLatencies(client: RawClient, rounds: int = NOOP_ROUNDS) -> list[float]:
    latencies = []
    for _ in range(rounds):
        started = time.perf_counter()
        client.command(b"NOOP")
        latencies.append(time.perf_counter() - started)
    return latencies


def measure(port: int, context: ssl.SSLContext | None, count: int) -> dict[str, float]:
    started = time.perf_counter()
    client = RawClient(port, context)
    client.command(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    login = time.perf_counter() - started
    client.command(b"EXAMINE INBOX")
    octets, bulk = bulkFetch(client)
    latencies = perMessageLatencies(client, range(1, count + 1), b"BODY.PEEK[HEADER]")
    noops = noopLatencies(client)
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
    writeUsersFile(directory, {USER: (PASSWORD, DEFAULT_LOG2_N)})
    metrics = f'[metrics]\nlisten = "tcp:{metricsPort}:interface=127.0.0.1"\n' if metricsPort else ""
    return (
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
[limits]
max_sessions_per_user = 1000
"""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=51200, help="octets per message body")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metrics", action="store_true", help="also measure a proxy with Prometheus metrics on")
    arguments = parser.parse_args()

    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(workDirectory("mp-bench-"))
        upstream = stack.enter_context(privateDovecot({USER: PASSWORD}))
        seed(upstream.ports["imap"], arguments.messages, arguments.size)
        ports = {"plain": freePort(), "tls": freePort(), "filtered": freePort()}
        config = writeConfig(directory, upstream, ports["plain"], ports["tls"], ports["filtered"])
        stack.enter_context(startProxy(directory, config, list(ports.values())))
        context = ssl.create_default_context(cafile=upstream.caFile)
        targets = {
            "direct plain": (upstream.ports["imap"], None),
            "proxy plain": (ports["plain"], None),
            "proxy filters": (ports["filtered"], None),
            "direct TLS": (upstream.ports["imaps"], context),
            "proxy TLS": (ports["tls"], context),
        }
        if arguments.metrics:
            # Metrics are per process: a second proxy with them on.
            meteredDirectory = os.path.join(directory, "metered")
            os.mkdir(meteredDirectory)
            metered = {name: freePort() for name in ("plain", "tls", "filtered", "metrics")}
            meteredConfig = writeConfig(
                meteredDirectory, upstream, metered["plain"], metered["tls"], metered["filtered"], metered["metrics"]
            )
            stack.enter_context(startProxy(meteredDirectory, meteredConfig, list(metered.values())))
            targets["metrics plain"] = (metered["plain"], None)
            targets["metrics TLS"] = (metered["tls"], context)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for port, tls in targets.values():  # warm-up round, not counted
            measure(port, tls, arguments.messages)
        for _ in range(arguments.rounds):
            for name, (port, tls) in targets.items():
                results[name].append(measure(port, tls, arguments.messages))
    report(results, arguments)
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
