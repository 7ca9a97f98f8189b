"""
The LDAP account backend's parts without a directory: the search filter
template (attacks in user names), the settings, the stored-hash schemes
directories keep, the strict client (what a directory, or someone in the
way, sends that it must not read) and the connection pool.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from ldaptor.protocols import pureber, pureldap
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from mailproxy.accounts.directory import DirectoryAddress, DirectoryClient, DirectoryConnections, connect
from mailproxy.accounts.hashes import DecoyHash, UnsupportedHash, verifyStored
from mailproxy.accounts.ldap import LDAPBackend
from mailproxy.accounts.ldapfilter import FilterTemplate
from mailproxy.accounts.model import Account, BackendUnavailable, LoginRequest
from mailproxy.accounts.registry import BackendContext, buildBackend
from mailproxy.plugins.mailproxy_accounts import BuiltinBackend, ldap
from tests.tlssupport import parsedExample

VALUES = {"user": "sam", "protocol": "imap", "ip": "192.0.2.7"}


def equalityValues(node: Any) -> list[tuple[str, bytes]]:
    """
    The (attribute, value) pairs of a filter's equality assertions, as sent.
    """
    if isinstance(node, pureldap.LDAPFilter_and | pureldap.LDAPFilter_or):
        return [pair for child in node.data for pair in equalityValues(child)]
    if isinstance(node, pureldap.LDAPFilter_not):
        return equalityValues(node.value)
    if isinstance(node, pureldap.LDAPFilter_equalityMatch):
        return [(node.attributeDesc.value, pureldap.LDAPAssertionValue(node.assertionValue.value).toWire()[2:])]
    return []


@pytest.mark.parametrize(
    "name",
    ["*", "sam)(uid=*", "*)(|(uid=*", "sam\\2a", "sam\x00", "%u", "a)(objectClass=*))(&(uid=b", "é"],
)
def test_a_user_name_is_one_value_whatever_filter_syntax_it_holds(name: str) -> None:
    """No name adds a clause, a wildcard or an escape: the structure is the template's, the name one value."""
    template = FilterTemplate("(&(objectClass=inetOrgPerson)(uid=%u)(!(employeeType=disabled)))")
    rendered = template.render({**VALUES, "user": name})
    plain = template.render(VALUES)
    assert type(rendered) is type(plain) and len(rendered.data) == len(plain.data)
    assert equalityValues(rendered) == [
        ("objectClass", b"inetOrgPerson"),
        ("uid", name.encode("utf-8")),
        ("employeeType", b"disabled"),
    ]
    # What the directory is sent: that one value, as octets, and nothing parsed from it.
    assert isinstance(rendered.data[1], pureldap.LDAPFilter_equalityMatch)


def test_variables_stand_for_values_in_every_kind_of_assertion() -> None:
    template = FilterTemplate("(|(mail=%u@*)(&(uid=%u)(host>=%r))(cn:dn:2.5.13.5:=%s)(note=100%%))")
    text = template.render({**VALUES, "user": "s*m"}).asText()
    assert text == r"(|(mail=s\2am@*)(&(uid=s\2am)(host>=192.0.2.7))(cn:dn:2.5.13.5:=imap)(note=100%))"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("(uid=sam)", "must look the user up by %u"),
        ("(%u=x)", "not an LDAP filter"),
        ("(uid=%d)", "%d is no variable"),
        ("uid=%u", "not an LDAP filter"),
        ("(&(uid=%u)", "not an LDAP filter"),
        ("(&" * 20 + "(uid=%u)" + ")" * 20, "nested more than"),
    ],
)
def test_filters_that_cannot_work_are_refused_at_start(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        FilterTemplate(text)


def build(**settings: Any) -> LDAPBackend:
    context = SimpleNamespace(
        reactor=MemoryReactorClock(),
        config=SimpleNamespace(directory="/", upstreams={}, filters={}),
        timeout=2.0,
        runInThread=None,
    )
    backend: LDAPBackend = ldap.build(
        {"url": "ldap://127.0.0.1:3389", "base": "dc=example,dc=org", **settings}, context
    )
    return backend


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"url": "http://x"}, "url: 'http://x' is no ldap://"),
        ({"url": "ldap://x/dc=example?uid"}, "url: 'ldap://x/dc=example"),
        ({"url": "ldap://user@x"}, "only a host and a port"),
        ({"url": "ldap://:s3cret@x"}, "only a host and a port"),
        ({"url": []}, "url: required"),
        ({"url": "ldaps://x", "starttls": True}, "starttls: not with ldaps://"),
        ({"starttls": "yes"}, "starttls: true or false"),
        ({"bind_dn": "cn=a"}, "bind_dn: and bind_password come together"),
        ({"base": ""}, "base: a non-empty string"),
        ({"scope": "deep"}, "scope: one of base, onelevel, subtree"),
        ({"verify": "compare"}, "verify: bind"),
        ({"attributes": {"host": "mailHost"}}, "'host' is no route field"),
        ({"attributes": {"server": 3}}, "attributes: a table"),
        ({"connections": 0}, "connections: the connections users bind over, 1 to 64"),
        ({"filter": "(uid=x)"}, "must look the user up by %u"),
        ({"password": "x"}, "password: unknown key"),
    ],
)
def test_settings_that_cannot_work_name_the_key(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError) as raised:
        build(**settings)
    assert error in str(raised.value)


def test_settings_give_the_directories_in_order_with_tls_as_asked() -> None:
    backend = build(url=["ldaps://ldap1.example", "ldap://[::1]:3389"], verify="hash")
    first, second = backend.connections.addresses
    assert (first.host, first.port, first.implicitTLS, first.tlsOptions is not None) == (
        "ldap1.example",
        636,
        True,
        True,
    )
    assert (second.host, second.port, second.implicitTLS, second.tlsOptions) == ("::1", 3389, False, None)
    assert backend._requested == ["uid", "userPassword"]
    started = build(starttls=True, attributes={"server": "mailHost"})
    assert started.connections.addresses[0].startTLS and started.connections.addresses[0].tlsOptions is not None
    # Only the name and what the route needs are asked for.
    assert started._requested == ["mailHost", "uid"]
    assert build(name_attribute="sAMAccountName")._requested == ["sAMAccountName"]


def test_without_ldaptor_the_backend_says_which_extra_installs_it() -> None:
    missing = BuiltinBackend("ldap", "", "mailproxy.accounts.ldap.LDAPBackend", extra=("no_such_module_x", "ldap"))
    with pytest.raises(ValueError, match=r"needs no_such_module_x \(pip install 'mailproxy\[ldap\]'\)"):
        missing.build({}, None)


def test_the_ldap_example_config_is_valid(tmp_path: Path) -> None:
    """etc/mailproxy-ldap.example.toml parses and builds its backend."""
    config = parsedExample("mailproxy-ldap.example.toml", tmp_path)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ldap-ca.pem"))
    backend = buildBackend(config, BackendContext(MemoryReactorClock(), config, config.lookupTimeout, None))
    assert [address.host for address in backend.connections.addresses] == ["ldap1.example.org", "ldap2.example.org"]
    assert backend.attributes == {
        "upstream": "mailProxyUpstream",
        "username": "mailProxyUser",
        "filters": "mailProxyFilter",
    }


def digest(scheme: str, algorithm: str, password: bytes, salt: bytes) -> str:
    return "{" + scheme + "}" + base64.b64encode(hashlib.new(algorithm, password + salt).digest() + salt).decode()


def test_the_salted_digests_openldap_stores_verify_and_refuse() -> None:
    stored = [
        # slappasswd -h {SSHA} -s 'pä ss'
        "{SSHA}ZqD5jDgAiW1Pn2s6W9iBxQryHldjTu4w",
        "{ssha}ZqD5jDgAiW1Pn2s6W9iBxQryHldjTu4w",
        # slappasswd -h {SHA} -s 'pä ss'
        "{SHA}lI0OH0WdoE/oe0HAdiHwtq5j1Ro=",
        digest("SSHA256", "sha256", "pä ss".encode(), b"salt1234"),
        digest("SSHA512", "sha512", "pä ss".encode(), b"salt"),
        digest("SHA512", "sha512", "pä ss".encode(), b""),
    ]
    for encoded in stored:
        assert verifyStored("pä ss".encode(), encoded), encoded
        assert not verifyStored(b"pa ss", encoded), encoded
    for broken in ("{SSHA}not base64!", "{SHA}" + base64.b64encode(b"short").decode(), "{SSHA512}YWJj"):
        with pytest.raises(UnsupportedHash):
            verifyStored(b"x", broken)


def response(messageID: int, value: Any) -> bytes:
    return bytes(pureldap.LDAPMessage(value, id=messageID).toWire())


def connected(clock: MemoryReactorClock | None = None) -> tuple[DirectoryClient, StringTransport]:
    client = DirectoryClient(clock or MemoryReactorClock())
    transport = StringTransport()
    transport.abortConnection = transport.loseConnection  # type: ignore[method-assign]
    client.makeConnection(transport)
    return client, transport


def test_plain_text_after_the_starttls_answer_is_never_read() -> None:
    """Someone in the way appends a forged answer to the StartTLS one: the connection is closed, TLS never starts."""
    client, transport = connected()
    started: list[Any] = []
    transport.startTLS = started.append  # type: ignore[attr-defined]
    switching = client._startTLS(object())
    ok = pureldap.LDAPStartTLSResponse(resultCode=0)
    forged = pureldap.LDAPBindResponse(resultCode=0)
    failures: list[Any] = []
    switching.addErrback(failures.append)
    client.dataReceived(response(1, ok) + response(2, forged))
    assert started == [] and transport.disconnecting
    assert failures and failures[0].check(BackendUnavailable)


def test_answers_to_nothing_asked_or_that_do_not_decode_close_the_connection() -> None:
    for data in (response(7, pureldap.LDAPBindResponse(resultCode=0)), b"\x30\x03\x02\x01\xff\xff\xff", b"\x00\x00"):
        client, transport = connected()
        pending = client.request(pureldap.LDAPBindRequest(dn="cn=x", auth=b"pw"))
        failures: list[Any] = []
        pending.addErrback(failures.append)
        client.dataReceived(data)
        assert transport.disconnecting, data
        client.connectionLost(Failure(ConnectionDone()))
        assert failures and failures[0].check(BackendUnavailable), data


def test_an_oversized_message_closes_the_connection() -> None:
    client, transport = connected()
    # A sequence announcing two megabytes, arriving slowly.
    client.dataReceived(b"\x30\x84\x00\x20\x00\x00" + b"\x04" * (1024 * 1024))
    assert transport.disconnecting and "more than" in client.why


def test_a_search_given_up_is_abandoned_at_the_directory() -> None:
    client, transport = connected()
    searching = client.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org"))
    searching.addErrback(lambda failure: None)
    [messageID] = client.onwire
    transport.clear()
    searching.cancel()
    sent, used = pureber.berDecodeObject(client.berdecoder, transport.value())
    assert used == len(transport.value())
    assert isinstance(sent.value, pureldap.LDAPAbandonRequest) and sent.value.value == messageID
    assert client.onwire == {}


class FakeConnections(DirectoryConnections):
    """
    The pool with connections that open when the test says.
    """

    def __init__(self, binders: int) -> None:
        address = DirectoryAddress("ldap://x", "x", 389, False, False)
        self.reactor: MemoryReactorClock
        super().__init__(MemoryReactorClock(), [address], 2.0, None, None, binders)
        self.opening: list[Deferred[DirectoryClient]] = []

    def _open(self, bindDN: str | None, bindPassword: str | None) -> Deferred[DirectoryClient]:
        opening: Deferred[DirectoryClient] = Deferred()
        self.opening.append(opening)
        return opening


def searchResult(searching: Deferred[tuple[list[Any], Any]]) -> tuple[list[Any], Any]:
    """
    What a fired search gave.
    """
    fired: list[tuple[list[Any], Any]] = []
    searching.addCallback(fired.append)
    [result] = fired
    return result


def openSearcher(pool: FakeConnections) -> tuple[DirectoryClient, StringTransport]:
    """
    The pool's search connection, opened.
    """
    waiting = pool.searcher()
    client, transport = connected(pool.reactor)
    pool.opening[-1].callback(client)
    assert waiting.result is client
    return client, transport


def test_binds_share_at_most_the_configured_connections_and_reuse_them() -> None:
    pool = FakeConnections(binders=2)
    waiters = [pool.binder() for _ in range(3)]
    # Two connections open for three waiting binds; the third waits for one of them.
    assert len(pool.opening) == 2
    first, _ = connected()
    second, secondTransport = connected()
    pool.opening[0].callback(first)
    pool.opening[1].callback(second)
    got = [waiter.result for waiter in waiters[:2]]
    assert got == [first, second] and not waiters[2].called
    pool.giveBack(first)
    assert waiters[2].result is first
    # A bind given up: its connection is closed, and another opens for the next bind.
    pool.drop(second, "given up")
    assert secondTransport.disconnecting
    nextWaiter = pool.binder()
    assert len(pool.opening) == 3 and not nextWaiter.called


def test_a_waiting_bind_given_up_takes_no_connection() -> None:
    pool = FakeConnections(binders=1)
    holding = pool.binder()
    client, _ = connected()
    pool.opening[0].callback(client)
    assert holding.result is client
    waiting = pool.binder()
    waiting.addErrback(lambda failure: None)
    waiting.cancel()
    pool.giveBack(client)
    assert pool.binder().result is client


def test_a_connection_that_does_not_open_fails_one_waiting_bind_each() -> None:
    pool = FakeConnections(binders=1)
    first, second = pool.binder(), pool.binder()
    errors: list[Any] = []
    first.addErrback(errors.append)
    second.addErrback(errors.append)
    pool.opening[0].errback(BackendUnavailable("refused"))
    assert len(errors) == 1 and len(pool.opening) == 2
    pool.opening[1].errback(BackendUnavailable("refused"))
    assert len(errors) == 2


def test_searches_wait_for_one_connection_and_share_it() -> None:
    pool = FakeConnections(binders=1)
    waiters = [pool.searcher() for _ in range(3)]
    assert len(pool.opening) == 1
    client, _ = connected()
    pool.opening[0].callback(client)
    assert [waiter.result for waiter in waiters] == [client] * 3
    assert pool.searcher().result is client


def test_a_search_given_up_closes_its_connection_only_when_the_directory_fell_silent() -> None:
    """Another login's answer on its way keeps the connection; nothing heard for the lookup time closes it."""
    pool = FakeConnections(binders=1)
    clock = pool.reactor
    client, transport = openSearcher(pool)
    slow = client.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org"))
    slow.addErrback(lambda failure: None)
    fast = client.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org"))
    fastID = max(client.onwire)
    clock.advance(1.5)
    client.dataReceived(response(fastID, pureldap.LDAPSearchResultDone(resultCode=0)))
    clock.advance(0.6)
    slow.cancel()
    pool.searchGivenUp(client)
    entries, done = searchResult(fast)
    assert entries == [] and done.resultCode == 0 and not transport.disconnecting
    assert pool.searcher().result is client
    # Silent from now on: the next search given up finds it hung.
    silent = client.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org"))
    silent.addErrback(lambda failure: None)
    clock.advance(2.0)
    silent.cancel()
    pool.searchGivenUp(client)
    assert transport.disconnecting
    pool.searcher()
    assert len(pool.opening) == 2


def test_a_reload_lets_lookups_under_way_finish() -> None:
    """Closing the pool closes idle connections now and busy ones after the lookup time, their answers read."""
    pool = FakeConnections(binders=1)
    clock = pool.reactor
    busy, busyTransport = openSearcher(pool)
    holding = pool.binder()
    idle, idleTransport = connected(clock)
    pool.opening[1].callback(idle)
    assert holding.result is idle
    pool.giveBack(idle)
    pool._connections.update({busy, idle})
    searching = busy.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org"))
    [messageID] = busy.onwire
    pool.close()
    assert idleTransport.disconnecting and not busyTransport.disconnecting
    busy.dataReceived(response(messageID, pureldap.LDAPSearchResultDone(resultCode=0)))
    assert searchResult(searching)[1].resultCode == 0
    clock.advance(2.0)
    assert busyTransport.disconnecting


def test_closing_fails_what_waits_and_closes_every_connection() -> None:
    pool = FakeConnections(binders=1)
    waiting = pool.searcher()
    errors: list[Any] = []
    waiting.addErrback(errors.append)
    pool.close()
    assert errors and "replaced" in str(errors[0].value)


def test_an_entrys_attributes_give_the_route_and_its_name() -> None:
    backend = build(
        attributes={
            "upstream": "mailProxyUpstream",
            "server": "mailHost",
            "port": "mailProxyPort",
            "username": "mail",
            "upstream_password": "mailProxyUpstreamPassword",
            "filters": "mailProxyFilter",
        }
    )
    request = LoginRequest("SAM", b"pw")
    values = {
        "uid": [b"sam"],
        "mailproxyupstream": [b"mail"],
        "mailhost": [b"192.0.2.9"],
        "mailproxyport": [b"1143"],
        "mail": ["sam@exämple.org".encode()],
        "mailproxyupstreampassword": [b"up pw"],
        "mailproxyfilter": [b"readonly", b"audit, folders"],
    }
    assert backend._account(request, values) == Account(
        name="sam",
        upstream="mail",
        server="192.0.2.9",
        port=1143,
        username="sam@exämple.org",
        password="up pw",
        filters=("readonly", "audit", "folders"),
    )
    # Without a name value: the name as typed; without route values: the configuration's routing.
    assert backend._account(request, {}) == Account(name="SAM")
    for broken, error in (
        ({"mailhost": [b"a", b"b"]}, "mailHost of 'SAM' has more than one value"),
        ({"mailproxyport": [b"99999"]}, "port '99999' of 'SAM' is not a port"),
        ({"mailproxyport": [b"\xd9\xa3"]}, "is not a port"),
        ({"mail": [b"\xff"]}, "mail of 'SAM' is not UTF-8"),
        ({"uid": [b"\xff"]}, "uid of 'SAM' is not UTF-8"),
    ):
        with pytest.raises(BackendUnavailable, match=re.escape(error)):
            backend._account(request, broken)


def test_a_directory_sending_more_entries_than_asked_for_is_cut_off() -> None:
    client, transport = connected()
    searching = client.search(pureldap.LDAPSearchRequest(baseObject="dc=example,dc=org", sizeLimit=2))
    failures: list[Any] = []
    searching.addErrback(failures.append)
    [messageID] = client.onwire
    entry = pureldap.LDAPSearchResultEntry(objectName="uid=x", attributes=[("uid", ["x"])])
    client.dataReceived(response(messageID, entry) * 3)
    assert transport.disconnecting and "more entries" in client.why
    client.connectionLost(Failure(ConnectionDone()))
    assert failures and failures[0].check(BackendUnavailable)


def test_a_connection_given_up_while_connecting_fails_as_given_up() -> None:
    """Not as a failed connection: that would send the caller on to the next directory."""
    reactor = MemoryReactorClock()
    address = DirectoryAddress("ldap://127.0.0.1:1", "127.0.0.1", 1, False, False)
    connecting = Deferred.fromCoroutine(connect(reactor, address, 2.0, None, None))
    failures: list[Any] = []
    connecting.addErrback(failures.append)
    connecting.cancel()
    assert failures and failures[0].check(CancelledError)


def test_a_directory_that_never_answers_leaves_time_for_the_next() -> None:
    reactor = MemoryReactorClock()
    addresses = [DirectoryAddress(f"ldap://127.0.0.1:{port}", "127.0.0.1", port, False, False) for port in (1, 2)]
    pool = DirectoryConnections(reactor, addresses, 2.0, None, None, 1)
    waiting = pool.searcher()
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    # Each directory is given its share of the lookup time to connect in.
    [(host, port, _, timeout, _)] = reactor.tcpClients
    assert (port, timeout) == (1, 1.0)
    reactor.tcpClients[0][2].clientConnectionFailed(reactor.connectors[0], Failure(TimeoutError()))
    reactor.advance(0.3)
    assert [(connector[1], connector[3]) for connector in reactor.tcpClients] == [(1, 1.0), (2, 1.0)]
    reactor.advance(2.0)
    assert failures and failures[0].check(BackendUnavailable)
    assert str(failures[0].value).endswith("ldap://127.0.0.1:2: no answer in 1 s")


def test_a_stored_value_without_a_scheme_is_never_shown() -> None:
    """A directory may keep a password in clear: the error names no part of it."""
    with pytest.raises(UnsupportedHash) as raised:
        verifyStored(b"guess", "hunter2")
    assert "hunt" not in str(raised.value) and "no {SCHEME} prefix" in str(raised.value)


def test_an_unknown_user_costs_what_the_accounts_own_hashes_cost() -> None:
    """The decoy is the proxy's scrypt until a real hash was checked, then a hash of the accounts' own scheme."""
    decoy = DecoyHash()
    decoy.check(b"guess")
    assert decoy._encoded is not None and decoy._encoded.startswith("$scrypt$")
    ssha = digest("SSHA", "sha1", b"right", b"salt")
    decoy.seen(ssha)
    decoy.check(b"right")
    assert decoy._encoded == ssha


def test_unknown_tags_in_a_message_close_the_connection_and_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    client, transport = connected()
    pending = client.request(pureldap.LDAPBindRequest(dn="cn=x", auth=b"pw"))
    pending.addErrback(lambda failure: None)
    [messageID] = client.onwire
    answer = bytearray(response(messageID, pureldap.LDAPBindResponse(resultCode=0)))
    # The bind response's result code (ENUMERATED, 0x0a) turned into a tag LDAP has not.
    answer[answer.index(b"\x0a\x01\x00")] = 0x1F
    client.dataReceived(bytes(answer))
    assert transport.disconnecting and "does not decode" in client.why
    assert capsys.readouterr().out == ""


def test_a_directory_reached_without_tls_over_the_network_is_warned_of() -> None:
    with capturedLogs() as events:
        build(url=["ldap://127.0.0.1:3389", "ldap://ldap.example.org", "ldaps://ldap2.example.org"])
    warned = [event["url"] for event in events if "without TLS" in event.get("log_format", "")]
    assert warned == ["ldap://ldap.example.org"]
