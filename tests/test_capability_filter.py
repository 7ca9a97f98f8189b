"""
The capability filter: hide and add capabilities in CAPABILITY responses
and [CAPABILITY] response codes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mailproxy.filters import PASS, Rewrite
from mailproxy.filters.capabilities import CapabilityFilter
from mailproxy.filters.chain import FilterChain
from mailproxy.imap.model import parseResponse
from mailproxy.session import ProxySession
from tests.support import UpstreamScript, loggedIn


def makeSession() -> ProxySession:
    session = ProxySession("imap", "imap", "192.0.2.7:40000", True, FilterChain())
    session.user, session.upstream = "alice", "mailhost"
    return session


def decide(options: dict[str, Any], line: bytes) -> Any:
    return CapabilityFilter.fromOptions(options).filterResponse(makeSession(), parseResponse([line]))


def rewritten(options: dict[str, Any], line: bytes) -> bytes:
    verdict = decide(options, line)
    assert isinstance(verdict, Rewrite)
    return b"".join(part for part in verdict.message.toWire() if isinstance(part, bytes))


def test_hidden_names_leave_capability_responses_case_insensitively() -> None:
    """hide removes exact names, whatever their case."""
    line = b"* CAPABILITY IMAP4rev1 IDLE Move NAMESPACE\r\n"
    assert rewritten({"hide": ["move", "IDLE"]}, line) == b"* CAPABILITY IMAP4rev1 NAMESPACE\r\n"


def test_a_name_ending_in_equals_hides_the_whole_family() -> None:
    """'AUTH=' hides every AUTH= mechanism but not other names."""
    line = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN auth=XOAUTH2 AUTHX\r\n"
    assert rewritten({"hide": ["AUTH="]}, line) == b"* CAPABILITY IMAP4rev1 AUTHX\r\n"


def test_added_names_are_appended_once() -> None:
    """add appends missing names and does not repeat listed ones."""
    line = b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert rewritten({"add": ["idle", "X-PROXIED"]}, line) == b"* CAPABILITY IMAP4rev1 IDLE X-PROXIED\r\n"


def test_capability_response_codes_are_rewritten_too() -> None:
    """A [CAPABILITY ...] code in a status response is rewritten, text kept."""
    line = b"a1 OK [CAPABILITY IMAP4rev1 IDLE METADATA] Logged in\r\n"
    assert (
        rewritten({"hide": ["METADATA"], "add": ["X-A"]}, line)
        == b"a1 OK [CAPABILITY IMAP4rev1 IDLE X-A] Logged in\r\n"
    )
    assert rewritten({"hide": ["IDLE"]}, b"* OK [capability IMAP4rev1 IDLE] ready\r\n") == (
        b"* OK [capability IMAP4rev1] ready\r\n"
    )


@pytest.mark.parametrize(
    "line",
    [
        b"* CAPABILITY IMAP4rev1 IDLE\r\n",
        b"a1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n",
        b"a1 OK [READ-WRITE] METADATA is mentioned here\r\n",
        b"a1 OK done\r\n",
    ],
)
def test_unchanged_responses_pass(line: bytes) -> None:
    """Nothing to hide or add, or no capability list: PASS, so the exact bytes are relayed."""
    assert decide({"hide": ["METADATA"], "add": ["IDLE"]}, line) is PASS


def test_the_filter_only_asks_for_capability_and_ok_responses() -> None:
    """responseNames limits the chain to CAPABILITY and OK responses."""
    chain = FilterChain([CapabilityFilter(hide=["IDLE"])])
    assert chain.wantsResponse(b"CAPABILITY") and chain.wantsResponse(b"OK")
    assert not chain.wantsResponse(b"FETCH") and not chain.wantsResponse(b"LIST")


def test_capabilities_are_rewritten_through_the_relay(tmp_path: Path) -> None:
    """A client's CAPABILITY command gets the filtered list from a real session."""
    connection = loggedIn(tmp_path, filters=[CapabilityFilter(hide=["MOVE"])], upstream=UpstreamScript())
    connection.send(b"c CAPABILITY\r\n")
    connection.fromUpstream(b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\nc OK done\r\n")
    assert connection.received() == b"* CAPABILITY IMAP4rev1 IDLE\r\nc OK done\r\n"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"hyde": ["IDLE"]}, "hyde"),
        ({"hide": "IDLE"}, "hide"),
        ({"hide": ["TWO WORDS"]}, "hide"),
        ({"add": ["X]"]}, "add"),
        ({"add": [""]}, "add"),
        ({"add": ["STARTTLS"]}, "add"),
        ({"add": ["AUTH=PLAIN"]}, "add"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options: dict[str, Any], named: str) -> None:
    """Each wrong option (including capabilities the proxy cannot relay) is reported by name."""
    with pytest.raises(ValueError, match=re.escape(named)):
        CapabilityFilter.fromOptions(options)
