"""
Metrics and JSON-lines logs of a real C{twistd -n mailproxy} in front of the
private Dovecot: sessions over IMAP (plain and STARTTLS) and POP3 (bridge
and relay), then a scrape of C{/metrics} over HTTP and a read of the log.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import shutil
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailproxy.passwords import hashPassword
from tests.conftest import UPSTREAM_USERS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import HOST, ProxyProcess, freePort
from tests.tomlconfig import authTable, listenerTable, routingTable, table, upstreamTable

WRONG_PASSWORD = "Wr0ng-S3cret-never-logged"
PASSWORDS = {"carol": "carolpw", "pat": "patpw", "paul": "paulpw", "downuser": "down-pw-7", "badcert": "badcert-pw-9"}


@dataclass
class MeteredProxy:
    ports: dict[str, int]
    caFile: str
    process: ProxyProcess

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://{HOST}:{self.ports['metrics']}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def proxyConfig(ports: dict[str, int], dovecot: DovecotUpstream, closed: int) -> str:
    """
    The proxy's configuration: JSON logs, metrics on C{ports["metrics"]},
    and Dovecot's IMAP, its POP3 over STARTTLS, a C{closed} port and
    Dovecot's IMAPS under the wrong name as upstreams.
    """
    return "".join(
        [
            table("server", logFormat="json"),
            authTable(failureDelay=0.1),
            table("metrics", listen=f"tcp:{ports['metrics']}:interface={HOST}"),
            listenerTable("imap", ports["imap"], allowPlaintextAuth=True),
            listenerTable(
                "imap-starttls",
                ports["starttls"],
                tls="starttls",
                certificate=dovecot.certFile,
                privateKey=dovecot.keyFile,
            ),
            listenerTable("pop3", ports["pop3"], protocol="pop3", allowPlaintextAuth=True),
            upstreamTable("plain", dovecot.ports["imap"]),
            upstreamTable(
                "pop3", dovecot.ports["pop3"], protocol="pop3", host="localhost", tls="starttls", caFile=dovecot.caFile
            ),
            upstreamTable("down", closed, connectTimeout=3),
            upstreamTable(
                "badcert",
                dovecot.ports["imaps"],
                tls="implicit",
                caFile=dovecot.caFile,
                serverName="wrong.example",
            ),
            routingTable(
                "plain",
                {"paul": {"upstream": "pop3"}, "downuser": {"upstream": "down"}, "badcert": {"upstream": "badcert"}},
            ),
        ]
    )


@pytest.fixture(scope="module")
def meteredProxy(dovecot: DovecotUpstream) -> Iterator[MeteredProxy]:
    directory = tempfile.mkdtemp(prefix="mp-metrics-")
    with open(os.path.join(directory, "users"), "w") as handle:
        for name, password in PASSWORDS.items():
            handle.write(f"{name}:{hashPassword(password, log2N=10)}\n")
    assert all(UPSTREAM_USERS[name] == PASSWORDS[name] for name in ("carol", "pat", "paul"))
    ports = {name: freePort() for name in ("metrics", "imap", "starttls", "pop3")}
    configPath = os.path.join(directory, "mailproxy.toml")
    with open(configPath, "w") as handle:
        handle.write(proxyConfig(ports, dovecot, freePort()))
    process = ProxyProcess(configPath, os.path.join(directory, "twistd.log"))
    try:
        process.waitForPorts(list(ports.values()))
        yield MeteredProxy(ports, dovecot.caFile, process)
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


def delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def settled(proxy: MeteredProxy, protocol: str, listener: str, tls: str, expected: float) -> dict:  # type: ignore[type-arg]
    """
    Scrape until the proxy has seen the clients' connections close (bounded).
    """
    key = ("mailproxy_connections_active", frozenset({"protocol": protocol, "listener": listener, "tls": tls}.items()))
    deadline = time.monotonic() + 10
    while True:
        scraped = proxy.scrape()
        if scraped.get(key, 0.0) == expected or time.monotonic() > deadline:
            return scraped
        time.sleep(0.05)


def test_imap_sessions_move_the_counters_by_the_right_amounts(meteredProxy: MeteredProxy) -> None:
    """One failed and one good login, a fetch, a STARTTLS session and two broken upstreams, as scraped."""
    before = meteredProxy.scrape()
    client = imaplib.IMAP4(HOST, meteredProxy.ports["imap"])
    with pytest.raises(imaplib.IMAP4.error):
        client.login("carol", WRONG_PASSWORD)
    client.login("carol", "carolpw")
    client.select("INBOX", readonly=True)
    status, data = client.fetch("1:*", "(BODY.PEEK[])")
    assert status == "OK"
    fetched = sum(len(item[1]) for item in data if isinstance(item, tuple))
    client.logout()

    for user in ("downuser", "badcert"):
        broken = imaplib.IMAP4(HOST, meteredProxy.ports["imap"])
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            broken.login(user, PASSWORDS[user])
        broken.logout()

    secured = imaplib.IMAP4(HOST, meteredProxy.ports["starttls"])
    secured.starttls(ssl.create_default_context(cafile=meteredProxy.caFile))
    secured.logout()

    plain = {"protocol": "imap", "listener": "imap", "tls": "plain"}
    after = settled(meteredProxy, "imap", "imap", "plain", 0)
    assert delta(before, after, "mailproxy_connections_total", **plain) == 3
    assert after[("mailproxy_connections_active", frozenset(plain.items()))] == 0
    tlsLabels = {"protocol": "imap", "listener": "imap-starttls", "tls": "starttls"}
    assert delta(before, after, "mailproxy_connections_total", **tlsLabels) == 1
    assert delta(before, after, "mailproxy_starttls_upgrades_total", protocol="imap", listener="imap-starttls") == 1
    assert delta(before, after, "mailproxy_logins_total", protocol="imap", result="ok") == 1
    assert delta(before, after, "mailproxy_logins_total", protocol="imap", result="failed") == 1
    assert delta(before, after, "mailproxy_logins_total", protocol="imap", result="upstream_error") == 2
    assert delta(before, after, "mailproxy_upstream_errors_total", upstream="down", kind="connect_failed") == 1
    assert delta(before, after, "mailproxy_upstream_errors_total", upstream="badcert", kind="tls") == 1
    toClient = delta(before, after, "mailproxy_relayed_bytes_total", protocol="imap", direction="to_client")
    assert fetched > 1_000_000 and fetched < toClient < fetched + 10_000
    fromClient = delta(before, after, "mailproxy_relayed_bytes_total", protocol="imap", direction="from_client")
    assert 0 < fromClient < 1000
    for command in ("SELECT", "EXAMINE", "FETCH", "LOGOUT"):
        count = delta(before, after, "mailproxy_command_duration_seconds_count", protocol="imap", command=command)
        # imaplib selects read-only with EXAMINE.
        assert count == (0 if command == "SELECT" else 1), command
    fetchSeconds = delta(before, after, "mailproxy_command_duration_seconds_sum", protocol="imap", command="FETCH")
    assert fetchSeconds > 0
    assert after[("process_resident_memory_bytes", frozenset())] > 0
    assert after[("process_open_fds", frozenset())] > 0


def test_pop3_bridge_and_relay_sessions_are_counted(meteredProxy: MeteredProxy) -> None:
    """POP3 logins, retrievals and their latency, through the bridge and the relay."""
    before = meteredProxy.scrape()
    bridged = poplib.POP3(HOST, meteredProxy.ports["pop3"], timeout=30)
    bridged.user("pat")
    bridged.pass_("patpw")
    count, _ = bridged.stat()
    assert count >= 1
    _, lines, octets = bridged.retr(1)
    bridged.quit()
    relayed = poplib.POP3(HOST, meteredProxy.ports["pop3"], timeout=30)
    relayed.user("paul")
    with pytest.raises(poplib.error_proto):
        relayed.pass_(WRONG_PASSWORD)
    relayed.user("paul")
    relayed.pass_("paulpw")
    relayed.list()
    relayed.quit()

    labels = {"protocol": "pop3", "listener": "pop3", "tls": "plain"}
    after = settled(meteredProxy, "pop3", "pop3", "plain", 0)
    assert delta(before, after, "mailproxy_connections_total", **labels) == 2
    assert after[("mailproxy_connections_active", frozenset(labels.items()))] == 0
    assert delta(before, after, "mailproxy_logins_total", protocol="pop3", result="ok") == 2
    assert delta(before, after, "mailproxy_logins_total", protocol="pop3", result="failed") == 1
    expected = {"STAT": 1, "RETR": 1, "LIST": 1, "QUIT": 2}
    for command, times in expected.items():
        assert (
            delta(before, after, "mailproxy_command_duration_seconds_count", protocol="pop3", command=command) == times
        ), command
    toClient = delta(before, after, "mailproxy_relayed_bytes_total", protocol="pop3", direction="to_client")
    assert toClient > octets
    fromClient = delta(before, after, "mailproxy_relayed_bytes_total", protocol="pop3", direction="from_client")
    assert fromClient == len(b"STAT\r\nRETR 1\r\nQUIT\r\nLIST\r\nQUIT\r\n")


def test_json_log_has_one_object_per_line_and_no_password(meteredProxy: MeteredProxy) -> None:
    """The twistd log is JSON lines with flat fields; no password ever appears in it."""
    client = imaplib.IMAP4(HOST, meteredProxy.ports["imap"])
    with pytest.raises(imaplib.IMAP4.error):
        client.login("carol", WRONG_PASSWORD)
    client.login("carol", "carolpw")
    client.logout()
    text = ""
    deadline = time.monotonic() + 10
    while "disconnected" not in text.rsplit("logged in as carol", 1)[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
        text = meteredProxy.process.log()
    records = [json.loads(line) for line in text.splitlines()]
    assert all(set(record) >= {"time", "level", "namespace", "message"} for record in records)
    loggedIn = [record for record in records if "logged in as carol" in record["message"]]
    assert loggedIn and loggedIn[-1]["user"] == "carol" and loggedIn[-1]["upstream"] == "plain"
    assert loggedIn[-1]["namespace"] == "mailproxy.imap.server.IMAPServerProtocol"
    assert loggedIn[-1]["client"].startswith("127.0.0.1:")
    failures = [
        record
        for record in records
        if record["message"].startswith("authentication failure: ip=127.0.0.1 protocol=imap user=carol ")
    ]
    assert failures and failures[-1]["level"] == "warn"
    assert any("twistd" in record["message"] and "starting up" in record["message"] for record in records)
    for password in (WRONG_PASSWORD, *PASSWORDS.values()):
        assert password not in text
