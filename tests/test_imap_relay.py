"""
The filtered relay: commands and responses parsed, decided by filters
(synchronously or later), and relayed without breaking literals,
pipelining or IDLE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.filters import DROP, PASS, Reject, Rewrite
from mailproxy.imap.model import Atom, StreamedLiteral, String
from mailproxy.interfaces import ICommandFilter, IResponseFilter, ISessionObserver
from mailproxy.limits import LimitsConfig
from tests.support import UpstreamScript, loggedIn

LITERAL_PLUS = [b"IMAP4rev1", b"LITERAL+", b"IDLE", b"MOVE"]


@implementer(ICommandFilter, IResponseFilter, ISessionObserver)
class Scripted:
    """
    A filter that records what it sees and answers from a script.
    """

    def __init__(self, onCommand: Any = None, onResponse: Any = None) -> None:
        self.commands: list[Any] = []
        self.responses: list[Any] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.onCommand = onCommand or (lambda command: PASS)
        self.onResponse = onResponse or (lambda response: PASS)

    def filterCommand(self, session: Any, command: Any) -> Any:
        self.commands.append(command)
        return self.onCommand(command)

    def filterResponse(self, session: Any, response: Any) -> Any:
        self.responses.append(response)
        return self.onResponse(response)

    def sessionEvent(self, session: Any, event: str, details: dict[str, Any]) -> None:
        self.events.append((event, details))


def filtered(tmp_path: Path, *filters: object, capabilities: list[bytes] | None = None) -> Any:
    script = UpstreamScript(capabilities=capabilities or LITERAL_PLUS)
    return loggedIn(tmp_path, filters=list(filters), upstream=script)


def test_passed_commands_reach_the_upstream_unchanged_and_parsed(tmp_path: Path) -> None:
    """A PASS relays the exact bytes; the filter saw tag, name, UID flag and arguments."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b'x UID COPY 1:3 "My Folder"\r\n')
    assert connection.upstream.sent == b'x UID COPY 1:3 "My Folder"\r\n'
    [command] = seen.commands
    assert (command.tag, command.name, command.uid) == (b"x", b"COPY", True)
    assert command.arguments == [Atom(b"1:3"), String(b"My Folder")]


def test_small_synchronising_literals_are_answered_by_the_proxy(tmp_path: Path) -> None:
    """The proxy sends '+' itself; upstream the literal is synchronising even with LITERAL+, its '+' swallowed."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b"x APPEND INBOX {5}\r\n")
    assert connection.received() == b"+ Ready for literal data\r\n"
    assert connection.upstream.sent == b""
    connection.send(b"ab\r\nc\r\n")
    assert connection.upstream.sent == b"x APPEND INBOX {5}\r\n"
    assert seen.commands[0].arguments == [Atom(b"INBOX"), String(b"ab\r\nc", literal=True)]
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent == b"x APPEND INBOX {5}\r\nab\r\nc\r\n"
    assert connection.received() == b""


def test_without_literal_plus_upstream_continuations_are_awaited_and_swallowed(tmp_path: Path) -> None:
    """An upstream without LITERAL+ gets a synchronising literal; its '+' never reaches the client."""
    connection = filtered(tmp_path, Scripted(), capabilities=[b"IMAP4rev1"])
    connection.send(b"x APPEND INBOX {5}\r\n")
    connection.received()
    connection.send(b"hello\r\ny NOOP\r\n")
    assert connection.upstream.sent == b"x APPEND INBOX {5}\r\n"
    connection.fromUpstream(b"+ go ahead\r\n")
    assert connection.upstream.sent == b"x APPEND INBOX {5}\r\nhello\r\ny NOOP\r\n"
    connection.fromUpstream(b"x OK appended\r\ny OK noop\r\n")
    assert connection.received() == b"x OK appended\r\ny OK noop\r\n"


def test_rewritten_commands_are_serialised_afresh(tmp_path: Path) -> None:
    """A Rewrite sends the new command; quoting is redone."""

    def rename(command: Any) -> Any:
        return Rewrite(command.withArguments([String(b"Other Box")]))

    connection = filtered(tmp_path, Scripted(onCommand=rename))
    connection.send(b"x SELECT INBOX\r\n")
    assert connection.upstream.sent == b'x SELECT "Other Box"\r\n'


def test_rejected_commands_are_answered_and_never_relayed(tmp_path: Path) -> None:
    """A Reject answers the tag with the given status, code and text."""
    connection = filtered(tmp_path, Scripted(onCommand=lambda command: Reject("No way", "NO", "NOPERM")))
    connection.send(b"x DELETE INBOX\r\n")
    assert connection.received() == b"x NO [NOPERM] No way\r\n"
    assert connection.upstream.sent == b""


def test_deferred_verdicts_keep_pipelined_commands_in_order(tmp_path: Path) -> None:
    """While a verdict is pending, later commands wait and the client is paused."""
    pending: list[Deferred[Any]] = []

    def later(command: Any) -> Any:
        if command.tag == b"x":
            deferred: Deferred[Any] = Deferred()
            pending.append(deferred)
            return deferred
        return PASS

    connection = filtered(tmp_path, Scripted(onCommand=later))
    connection.send(b"x NOOP\r\ny NOOP\r\n")
    assert connection.upstream.sent == b""
    assert connection.transport.producerState == "paused"
    pending[0].callback(PASS)
    assert connection.upstream.sent == b"x NOOP\r\ny NOOP\r\n"
    assert connection.transport.producerState == "producing"


def test_a_raising_filter_gets_serverbug_and_the_session_goes_on(tmp_path: Path) -> None:
    """An exception in a filter answers NO [SERVERBUG]; the next command works."""

    def explode(command: Any) -> Any:
        if command.name == b"FETCH":
            raise RuntimeError("bug")
        return PASS

    connection = filtered(tmp_path, Scripted(onCommand=explode))
    connection.send(b"x FETCH 1 FLAGS\r\ny NOOP\r\n")
    assert connection.received() == b"x NO [SERVERBUG] Internal error in a proxy filter\r\n"
    assert connection.upstream.sent == b"y NOOP\r\n"


def test_large_literals_stream_past_filters_with_their_size(tmp_path: Path) -> None:
    """A literal over the buffer limit is announced to filters as StreamedLiteral and streamed."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    size = 300_000
    connection.send(b"x APPEND INBOX {%d}\r\n" % size)
    assert seen.commands[0].arguments[-1] == StreamedLiteral(size)
    assert connection.upstream.sent == b"x APPEND INBOX {%d}\r\n" % size
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.received() == b"+ OK\r\n"
    connection.send(b"z" * size + b"\r\n")
    assert connection.upstream.sent.endswith(b"z" * size + b"\r\n")


def test_large_literal_rejected_before_it_is_sent(tmp_path: Path) -> None:
    """Rejecting a streamed APPEND answers at once; the client never sends the literal."""
    connection = filtered(tmp_path, Scripted(onCommand=lambda command: Reject("Too big", "NO", "TOOBIG")))
    connection.send(b"x APPEND INBOX {300000}\r\n")
    assert connection.received() == b"x NO [TOOBIG] Too big\r\n"
    connection.send(b"y NOOP\r\n")
    assert connection.upstream.sent == b""
    assert connection.received() == b"y NO [TOOBIG] Too big\r\n"


def test_idle_passes_through_filters(tmp_path: Path) -> None:
    """IDLE, its continuation, untagged updates and DONE all pass; filters see the updates."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n* 4 EXISTS\r\n")
    assert connection.received() == b"+ idling\r\n* 4 EXISTS\r\n"
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"i OK Idle completed\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\n"
    assert connection.received() == b"i OK Idle completed\r\n"
    assert [response.name for response in seen.responses][-2:] == [b"EXISTS", b"OK"]


def test_response_filters_drop_and_rewrite(tmp_path: Path) -> None:
    """DROP hides an untagged response; Rewrite replaces one."""

    def decide(response: Any) -> Any:
        if response.name == b"LIST" and response.arguments[-1] == Atom(b"Secret"):
            return DROP
        if response.name == b"STATUS":
            return Rewrite(response.withArguments([String(b"Shown"), *response.arguments[1:]]))
        return PASS

    connection = filtered(tmp_path, Scripted(onResponse=decide))
    connection.send(b'l LIST "" *\r\n')
    connection.fromUpstream(b'* LIST () "/" INBOX\r\n* LIST () "/" Secret\r\n* STATUS X (MESSAGES 1)\r\nl OK done\r\n')
    assert connection.received() == b'* LIST () "/" INBOX\r\n* STATUS "Shown" (MESSAGES 1)\r\nl OK done\r\n'


def test_responses_with_large_literals_are_relayed_intact(tmp_path: Path) -> None:
    """A FETCH body over the buffer limit streams to the client byte for byte."""
    connection = filtered(tmp_path, Scripted())
    body = bytes(range(256)) * 1200
    connection.send(b"f FETCH 1 BODY[]\r\n")
    connection.fromUpstream(b"* 1 FETCH (BODY[] {%d}\r\n" % len(body))
    for offset in range(0, len(body), 7000):
        connection.fromUpstream(body[offset : offset + 7000])
    connection.fromUpstream(b")\r\nf OK done\r\n")
    assert connection.received() == b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\nf OK done\r\n"


def test_login_reply_goes_through_response_filters(tmp_path: Path) -> None:
    """The proxy's own login OK [CAPABILITY] is filtered like an upstream response."""

    def noIdle(response: Any) -> Any:
        if response.code and response.code.startswith(b"CAPABILITY"):
            return Rewrite(dataclasses.replace(response, code=response.code.replace(b" IDLE", b""), wire=None))
        return PASS

    script = UpstreamScript(capabilities=LITERAL_PLUS)
    from tests.support import connect

    connection = connect(str(tmp_path), allowPlaintextAuth=True, filters=[Scripted(onResponse=noIdle)], upstream=script)
    connection.received()
    connection.send(b"a LOGIN alice alicepw\r\n")
    assert connection.received() == b"a OK [CAPABILITY IMAP4rev1 LITERAL+ MOVE] Logged in\r\n"


def test_observers_get_one_event_per_completed_command(tmp_path: Path) -> None:
    """After the tagged reply, observers hear the command, its result and its bytes."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b"s SELECT INBOX\r\n")
    connection.fromUpstream(b"* 3 EXISTS\r\ns OK [READ-WRITE] done\r\n")
    [(event, details)] = [item for item in seen.events if item[0] == "command" and item[1]["command"].name == b"SELECT"]
    assert details["command"].name == b"SELECT" and details["result"] == "OK"
    assert details["bytesIn"] == len(b"s SELECT INBOX\r\n")
    assert details["bytesOut"] == len(b"* 3 EXISTS\r\ns OK [READ-WRITE] done\r\n")
    assert connection.protocol.session.selected == b"INBOX"


def test_observers_hear_preauth_commands_without_credentials(tmp_path: Path) -> None:
    """Before login observers get CAPABILITY with its result, and LOGIN with no arguments at all."""
    from tests.support import connect

    seen = Scripted()
    connection = connect(str(tmp_path), allowPlaintextAuth=True, filters=[seen])
    connection.send(b"a CAPABILITY\r\nb LOGIN alice alicepw\r\n")
    commands = [details for event, details in seen.events if event == "command"]
    assert [(item["command"].name, item["result"]) for item in commands[:2]] == [
        (b"CAPABILITY", "OK"),
        (b"LOGIN", "LOGIN"),
    ]
    assert commands[1]["command"].arguments == [] and commands[1]["command"].wire is None
    assert [event for event, _ in seen.events][:1] == ["connected"]
    assert ("login", {"ok": True, "mechanism": "LOGIN"}) in seen.events
    assert b"alicepw" not in repr(seen.events).encode()


def test_overlong_line_after_login_is_refused_and_never_relayed(tmp_path: Path) -> None:
    """Passthrough: a command line over max_line_length gets BAD [TOOBIG]; the upstream sees nothing of it."""
    connection = loggedIn(tmp_path, limits=LimitsConfig(maxLineLength=1024))
    connection.send(b"x UID FETCH " + b"1," * 1000 + b"2 FLAGS\r\ny NOOP\r\n")
    assert connection.received() == b"x BAD [TOOBIG] Command line too long (limit 1024 octets)\r\n"
    assert connection.upstream.sent == b"y NOOP\r\n"


def test_overlong_line_is_refused_in_order_by_a_filtered_relay(tmp_path: Path) -> None:
    """Filtered: the refusal waits for the verdict on an earlier command."""
    pending: Deferred[Any] = Deferred()
    connection = loggedIn(
        tmp_path, filters=[Scripted(onCommand=lambda command: pending)], limits=LimitsConfig(maxLineLength=1024)
    )
    connection.send(b"a NOOP\r\nb NOOP " + b"x" * 2000 + b"\r\n")
    assert connection.received() == b""
    pending.callback(PASS)
    assert connection.upstream.sent == b"a NOOP\r\n"
    assert connection.received() == b"b BAD [TOOBIG] Command line too long (limit 1024 octets)\r\n"


def test_overlong_line_inside_a_relayed_command_closes_after_the_current_response(tmp_path: Path) -> None:
    """Half a command is already upstream: BYE, sent only once the response in progress is complete."""
    connection = loggedIn(tmp_path, limits=LimitsConfig(maxLineLength=1024))
    connection.send(b"f FETCH 1 BODY[]\r\n")
    connection.fromUpstream(b"* 1 FETCH (BODY[] {10}\r\n01234")
    connection.send(b"x APPEND INBOX {2+}\r\nhi " + b"y" * 2000 + b"\r\n")
    assert connection.received() == b"* 1 FETCH (BODY[] {10}\r\n01234"
    assert not connection.transport.disconnecting
    connection.fromUpstream(b"56789)\r\n")
    assert connection.received() == (
        b"56789)\r\nx BAD [TOOBIG] Command line too long (limit 1024 octets)\r\n* BYE Command broken off\r\n"
    )
    assert connection.transport.disconnecting


def test_literal_sent_before_the_upstreams_continuation_waits_for_it(tmp_path: Path) -> None:
    """Passthrough: octets sent before the upstream's "+" go upstream only once it came."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1"]))
    connection.send(b"a APPEND INBOX {5}\r\nhello\r\n")
    assert connection.upstream.sent == b"a APPEND INBOX {5}\r\n"
    connection.fromUpstream(b"+ go ahead\r\n")
    assert connection.upstream.sent == b"a APPEND INBOX {5}\r\nhello\r\n"
    assert connection.received() == b"+ go ahead\r\n"


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_literal_the_upstream_refuses_never_reaches_it_as_commands(tmp_path: Path, filters: list[Any]) -> None:
    """Sent along before the upstream refused its literal, a refused command is not smuggled upstream."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1"]), filters=filters)
    announcement = b"a APPEND Missing {300000}\r\n"
    connection.send(announcement + b"c2 COMPRESS DEFLATE\r\n" + b"x" * 1000)
    connection.fromUpstream(b"a NO [TRYCREATE] No such mailbox\r\n")
    connection.send(b"b NOOP\r\n")
    assert connection.upstream.sent == announcement + b"b NOOP\r\n"
    assert b"a NO [TRYCREATE]" in connection.received()


def test_client_flooding_before_the_continuation_is_cut_off(tmp_path: Path) -> None:
    """What is held for the upstream's answer is bounded."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1"]))
    connection.send(b"a APPEND INBOX {500000}\r\n")
    connection.send(b"z" * 70000)
    assert connection.received().endswith(b"* BYE Literal data sent before the continuation\r\n")
    assert connection.transport.disconnecting
    assert connection.upstream.sent == b"a APPEND INBOX {500000}\r\n"


def test_closing_at_a_boundary_that_never_comes_still_closes(tmp_path: Path) -> None:
    """The upstream lost mid-response while a BYE waits for the response's end: the client is closed."""
    connection = loggedIn(tmp_path, limits=LimitsConfig(maxLineLength=1024))
    connection.send(b"f FETCH 1 BODY[]\r\n")
    connection.fromUpstream(b"* 1 FETCH (BODY[] {10}\r\n01234")
    connection.send(b"x APPEND INBOX {2+}\r\nhi " + b"y" * 2000 + b"\r\n")
    assert not connection.transport.disconnecting
    connection.upstreamProtocol.connectionLost(Failure(ConnectionLost()))
    assert connection.transport.disconnecting


def test_long_upstream_response_lines_are_relayed_whole(tmp_path: Path) -> None:
    """A SEARCH result far over any client line limit (a big mailbox) is relayed whole."""
    connection = loggedIn(tmp_path)
    connection.received()
    line = b"* SEARCH " + b" ".join(b"%d" % uid for uid in range(1, 200001)) + b"\r\n"
    assert len(line) > 1024 * 1024
    connection.send(b"s UID SEARCH ALL\r\n")
    for start in range(0, len(line), 65536):
        connection.fromUpstream(line[start : start + 65536])
    connection.fromUpstream(b"s OK done\r\n")
    assert connection.received() == line + b"s OK done\r\n"
    assert not connection.transport.disconnecting


def test_upstream_breaking_framing_is_dropped_at_once(tmp_path: Path) -> None:
    """A line over the upstream limit aborts it (no polite close to wait on); the client gets BYE."""
    connection = loggedIn(tmp_path)
    connection.received()
    upstream = connection.upstreamProtocol
    upstream.framer.maxLineLength = 100
    connection.fromUpstream(b"* SEARCH " + b"1 " * 100)
    assert upstream.transport.disconnected  # type: ignore[attr-defined]
    upstream.connectionLost(Failure(ConnectionLost()))
    assert connection.received() == b"* BYE Upstream server closed the connection\r\n"
    assert connection.transport.disconnecting


def test_a_refused_literal_leaves_proxy_and_upstream_agreeing_on_command_boundaries(tmp_path: Path) -> None:
    """Pipelined past a literal the upstream then refuses: nothing of it is relayed and framing restarts."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1"]))
    connection.send(b"a APPEND x {5}\r\nhello\r\nb APPEND y {9}\r\n")
    connection.fromUpstream(b"a NO [TRYCREATE] No such mailbox\r\n")
    assert not connection.protocol.framer.inLiteral
    connection.send(b"c NOOP\r\n")
    assert connection.upstream.sent == b"a APPEND x {5}\r\nc NOOP\r\n"


def test_an_idles_continuation_is_not_taken_for_a_literals(tmp_path: Path) -> None:
    """Each "+" answers the oldest IDLE or literal that is owed one."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1", b"IDLE"]))
    connection.send(b"i IDLE\r\nDONE\r\nb APPEND y {99999}\r\nc COMPRESS DEFLATE\r\nd NOOP\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\nb APPEND y {99999}\r\n"
    connection.fromUpstream(b"i OK done\r\nb NO [OVERQUOTA] Too big\r\n")
    connection.send(b"e NOOP\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\nb APPEND y {99999}\r\ne NOOP\r\n"


def test_a_continuation_held_back_by_a_response_filter_still_releases_the_literal(tmp_path: Path) -> None:
    """The upstream's "+" reaches the relay after a filter's late verdict: the held octets follow it, in order."""
    pending: Deferred[Any] = Deferred()
    filters = [Scripted(onResponse=lambda response: pending if b"EXISTS" in response.toWire()[0] else PASS)]
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=[b"IMAP4rev1"]), filters=filters)
    announcement = b"a APPEND INBOX {300000}\r\n"
    connection.send(announcement + b"x" * 1000)
    connection.fromUpstream(b"* 3 EXISTS\r\n+ go ahead\r\n")
    assert connection.upstream.sent == announcement
    pending.callback(PASS)
    connection.send(b"y" * 299000 + b"\r\n")
    assert connection.upstream.sent == announcement + b"x" * 1000 + b"y" * 299000 + b"\r\n"


# -- Parsing exactly as the upstream does -------------------------------------------


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b'c1 NOOP "x{18}\r\n', b"unterminated quoted string"),
        (b'c1 SELECT "Arch\\ive"\r\n', b'escape only \\" and \\\\'),
        (b"c1 SELECT INBOX " + b"(" * 1200 + b")" * 1200 + b"\r\n", b"deeper than 64"),
        (b"c1 FETCH 1 a{5}\r\n", b"invalid character 0x7b in an atom"),
        (b'c1 STATUS "A\0b" (MESSAGES)\r\n', b"CR, LF or NUL"),
    ],
)
def test_commands_the_proxy_cannot_read_get_bad_and_never_reach_the_upstream(
    tmp_path: Path, sent: bytes, reason: bytes
) -> None:
    """Filtered: an unreadable command is answered BAD with the reason, audited as not relayed, and the session goes on."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(sent + b"c2 NOOP\r\n")
    reply = connection.received()
    assert reply.startswith(b"c1 BAD Command syntax not accepted by the proxy: ") and reason in reply
    assert connection.upstream.sent == b"c2 NOOP\r\n"
    assert [command.tag for command in seen.commands] == [b"c2"]
    [details] = [details for event, details in seen.events if event == "command" and details["result"] == "BAD"]
    assert details["relayed"] is False and details["command"].tag == b"c1"


def test_a_quoted_string_ending_like_a_literal_smuggles_no_command(tmp_path: Path) -> None:
    """`t NOOP "x{18}` gets BAD and no '+'; the 18 octets after it are the next command, which the filters judge."""
    seen = Scripted(onCommand=lambda command: Reject("no", "NO", "NOPERM") if command.name == b"SELECT" else PASS)
    connection = filtered(tmp_path, seen)
    connection.send(b't NOOP "x{18}\r\nu SELECT Archive\r\n')
    reply = connection.received()
    assert b"+ " not in reply
    assert reply.startswith(b"t BAD ") and reply.endswith(b"u NO [NOPERM] no\r\n")
    assert connection.upstream.sent == b""


def test_commands_are_relayed_as_written_afresh_not_as_received(tmp_path: Path) -> None:
    """Filtered: extra spaces and needless quoting or literals are normalised; what goes upstream is what filters saw."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b'c1 uid COPY  1:3   "Trash"\r\n')
    assert connection.upstream.sent == b'c1 UID COPY 1:3 "Trash"\r\n'


def test_a_literal_plus_literal_waits_upstream_for_the_continuation_which_the_client_never_sees(tmp_path: Path) -> None:
    """Passthrough: {n+} goes upstream as {n}; the client's octets wait for the '+', which is swallowed."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS))
    connection.send(b"c1 APPEND INBOX {5+}\r\nhello\r\nc2 NOOP\r\n")
    assert connection.upstream.sent == b"c1 APPEND INBOX {5}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent == b"c1 APPEND INBOX {5}\r\nhello\r\nc2 NOOP\r\n"
    assert connection.received() == b""


def test_a_literal_plus_literal_the_upstream_refuses_runs_nothing(tmp_path: Path) -> None:
    """Passthrough: if the upstream answers instead of '+', the literal's octets (a command, say) are dropped."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS))
    smuggled = b"u COMPRESS DEFLATE\r\n"
    connection.send(b"c1 SELECT INBOX (CONDSTORE) {%d+}\r\n" % len(smuggled))
    connection.send(smuggled[:7])
    connection.fromUpstream(b"c1 OK [READ-WRITE] Select completed\r\n")
    connection.send(smuggled[7:] + b"\r\nc2 NOOP\r\n")
    assert connection.upstream.sent == b"c1 SELECT INBOX (CONDSTORE) {%d}\r\nc2 NOOP\r\n" % len(smuggled)
    assert connection.received() == b"c1 OK [READ-WRITE] Select completed\r\n"


@pytest.mark.parametrize("plus", [b"", b"+"])
def test_an_unknown_command_announces_no_literal(tmp_path: Path, plus: bytes) -> None:
    """An unknown command's {n} is no literal: the next line is a command; passthrough too, where the line is refused."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS))
    connection.send(b"c1 XYZZY {20%s}\r\nu COMPRESS DEFLATE\r\nc2 NOOP\r\n" % plus)
    # Relayed, a server that knows the command would read the next line as
    # its literal, which the proxy took for a command.
    assert connection.upstream.sent == b"c2 NOOP\r\n"
    assert connection.received() == (
        b"c1 BAD Literal not accepted here by the proxy\r\n"
        b"u BAD Command not available after login through this proxy\r\n"
    )
    filteredConnection = filtered(tmp_path, Scripted())
    filteredConnection.send(b"c1 XYZZY {20%s}\r\nu SELECT Archive\r\n" % plus)
    assert filteredConnection.received().startswith(b"c1 BAD ")
    assert filteredConnection.upstream.sent == b"u SELECT Archive\r\n"


def test_only_append_literals_stream_past_the_filters(tmp_path: Path) -> None:
    """Filtered: a literal over 256 KiB in anything but APPEND is refused; the session goes on."""
    connection = filtered(tmp_path, Scripted())
    connection.send(b"c1 SEARCH TEXT {300000+}\r\n" + b"x" * 300000 + b"\r\nc2 NOOP\r\n")
    assert connection.received() == b"c1 BAD [TOOBIG] Literal too large for a filtered command\r\n"
    assert connection.upstream.sent == b"c2 NOOP\r\n"


def test_a_catenate_url_after_a_streamed_literal_aborts_the_append(tmp_path: Path) -> None:
    """Filtered: the filters saw the APPEND up to its large literal; a URL after it is not relayed, the command aborted."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b"c1 APPEND INBOX CATENATE (TEXT {300000}\r\n")
    assert seen.commands[0].arguments == [
        Atom(b"INBOX"),
        Atom(b"CATENATE"),
        dataclasses.replace(seen.commands[0].arguments[2]),
    ]
    assert connection.upstream.sent == b"c1 APPEND INBOX CATENATE (TEXT {300000}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.received() == b"+ OK\r\n"
    connection.send(b"y" * 300000 + b' URL "/Archive;UID=1")\r\nc2 NOOP\r\n')
    sent = connection.upstream.sent
    assert sent.endswith(b"y" * 300000 + b" (\r\nc2 NOOP\r\n") and b"Archive" not in sent


def test_more_messages_after_a_streamed_literal_are_relayed(tmp_path: Path) -> None:
    """Filtered: MULTIAPPEND's further messages and flags after a large literal pass, synchronising upstream."""
    connection = filtered(tmp_path, Scripted())
    # Until the upstream's "+" the proxy reads no more than one read's worth.
    connection.send(b"c1 APPEND INBOX {300000+}\r\n" + b"z" * 60000)
    assert connection.upstream.sent == b"c1 APPEND INBOX {300000}\r\n"
    connection.fromUpstream(b"+ OK\r\n")
    connection.send(b"z" * 240000 + b' (\\Seen) "01-Jan-2024 00:00:00 +0000" {3+}\r\nabc\r\n')
    assert connection.upstream.sent.endswith(b'z (\\Seen) "01-Jan-2024 00:00:00 +0000" {3}\r\n')
    connection.fromUpstream(b"+ OK\r\n")
    assert connection.upstream.sent.endswith(b" {3}\r\nabc\r\n")
    assert connection.received() == b""


@pytest.mark.parametrize("plus", [b"", b"+"])
def test_after_an_aborted_streamed_append_the_next_command_is_filtered_again(tmp_path: Path, plus: bytes) -> None:
    """Filtered: a URL after a large literal aborts the APPEND; the rest is dropped and the next command is judged."""
    seen = Scripted(onCommand=lambda command: Reject("no", "NO", "NOPERM") if command.name == b"DELETE" else PASS)
    connection = filtered(tmp_path, seen)
    connection.send(b"c1 APPEND INBOX CATENATE (TEXT {300000}\r\n")
    connection.fromUpstream(b"+ OK\r\n")
    connection.send(b"y" * 300000 + b' URL "/Archive;UID=1" TEXT {4%s}\r\n' % plus)
    if plus:
        connection.send(b"abcd)\r\n")
    connection.send(b"c2 DELETE Archive\r\nc3 NOOP\r\n")
    sent = connection.upstream.sent
    assert sent.endswith(b"y (\r\nc3 NOOP\r\n"), sent[-60:]
    assert b"DELETE" not in sent and b"abcd" not in sent
    assert connection.received().endswith(b"c2 NO [NOPERM] no\r\n")


def test_an_idle_continuation_never_releases_a_literal_the_upstream_refuses(tmp_path: Path) -> None:
    """Filtered: a command behind an IDLE waits for the IDLE's '+'; a refused literal then runs nothing upstream."""
    connection = filtered(tmp_path, Scripted())
    connection.send(b"i IDLE\r\nDONE\r\nx APPEND Nope {18}\r\ny DELETE Archive\r\n\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\n"
    connection.fromUpstream(b"+ idling\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\nx APPEND Nope {18}\r\n"
    connection.fromUpstream(b"i OK Idle completed\r\nx NO [TRYCREATE] Mailbox doesn't exist\r\n")
    assert b"DELETE" not in connection.upstream.sent
    assert connection.received().endswith(b"x NO [TRYCREATE] Mailbox doesn't exist\r\n")


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_a_continuation_nothing_asked_for_is_not_relayed(tmp_path: Path, filters: list[object]) -> None:
    """An upstream '+' that no relayed command is owed does not invite the client to send octets as data."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=filters)
    connection.send(b"c1 NOOP\r\n")
    connection.fromUpstream(b"+ OK\r\nc1 OK done\r\n")
    assert connection.received() == b"c1 OK done\r\n"


def test_commands_queued_behind_a_continuation_that_never_comes_are_bounded(tmp_path: Path) -> None:
    """Filtered: past 256 KiB queued behind a literal's '+' the client is cut off, nothing more is held."""
    connection = filtered(tmp_path, Scripted())
    connection.send(b"x1 SEARCH SUBJECT {3}\r\nabc\r\n")
    for index in range(300):
        connection.send(b'c%d SEARCH SUBJECT "%s"\r\n' % (index, b"a" * 1000))
    assert connection.upstream.sent == b"x1 SEARCH SUBJECT {3}\r\n"
    assert connection.transport.disconnecting
    assert connection.protocol.relay._outboundSize == 0


def test_commands_awaiting_a_reply_are_bounded(tmp_path: Path) -> None:
    """Filtered: replies that never come (untaggable commands) do not grow the in-flight table without bound."""
    from mailproxy.imap.relay import MAX_IN_FLIGHT

    connection = filtered(tmp_path, Scripted())
    connection.send(b"".join(b"t%d NOOP\r\n" % index for index in range(MAX_IN_FLIGHT + 50)))
    assert len(connection.protocol.relay._inFlight) == MAX_IN_FLIGHT


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_a_tag_still_in_use_is_refused(tmp_path: Path, filters: list[object]) -> None:
    """A second command with an unanswered tag would take the first one's reply as its own: BAD, not relayed."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=filters)
    connection.send(b"a NOOP\r\na APPEND INBOX {8+}\r\n12345678\r\nmpi1 NOOP\r\n")
    assert connection.upstream.sent == b"a NOOP\r\n"
    assert connection.received() == (
        b"a BAD Tag already in use by a command in progress\r\nmpi1 BAD Tags mpi<N> are reserved by the proxy\r\n"
    )
    connection.fromUpstream(b"a OK NOOP completed\r\n")
    connection.send(b"a NOOP\r\n")
    assert connection.upstream.sent == b"a NOOP\r\na NOOP\r\n"


def test_commands_the_proxy_answers_itself_are_audited(tmp_path: Path) -> None:
    """COMPRESS, STARTTLS, LOGIN after login and a too large literal each leave a command record, not relayed."""
    seen = Scripted()
    connection = filtered(tmp_path, seen)
    connection.send(b"b COMPRESS DEFLATE\r\nc STARTTLS\r\ne LOGIN a b\r\nd SEARCH TEXT {300000}\r\n")
    records = [details for event, details in seen.events if event == "command" and details["relayed"] is False]
    assert [(record["command"].tag, record["command"].name, record["result"]) for record in records[-4:]] == [
        (b"b", b"COMPRESS", "BAD"),
        (b"c", b"STARTTLS", "BAD"),
        (b"e", b"LOGIN", "BAD"),
        (b"d", b"SEARCH", "BAD"),
    ]


def test_a_tag_is_free_only_once_its_reply_is_handled_in_order(tmp_path: Path) -> None:
    """Filtered: a reply held behind a response filter's Deferred keeps its tag in use until it is handled."""
    pending: Deferred[Any] = Deferred()
    seen = Scripted(onResponse=lambda response: pending if response.name == b"EXISTS" else PASS)
    connection = filtered(tmp_path, seen)
    connection.send(b"a NOOP\r\n")
    connection.fromUpstream(b"* 3 EXISTS\r\na OK NOOP completed\r\n")
    connection.send(b"a APPEND INBOX {11+}\r\nhello world\r\n")
    assert connection.received() == b"a BAD Tag already in use by a command in progress\r\n"
    pending.callback(PASS)
    assert connection.received() == b"* 3 EXISTS\r\na OK NOOP completed\r\n"
    assert connection.upstream.sent == b"a NOOP\r\n"


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_an_idle_refreshed_by_the_proxy_keeps_its_tag_in_use(tmp_path: Path, filters: list[object]) -> None:
    """The refresh swallows the IDLE's reply and re-sends the IDLE: its tag stays in use until the real reply."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=filters)
    connection.send(b"a IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.clock.advance(25 * 60.0)
    connection.fromUpstream(b"a OK Idle completed\r\n+ idling\r\n")
    assert connection.upstream.sent == b"a IDLE\r\nDONE\r\na IDLE\r\n"
    connection.received()
    connection.send(b"DONE\r\na APPEND INBOX {11+}\r\nhello world\r\n")
    assert connection.received() == b"a BAD Tag already in use by a command in progress\r\n"
    assert connection.upstream.sent == b"a IDLE\r\nDONE\r\na IDLE\r\nDONE\r\n"


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_a_line_without_a_tag_goes_upstream_only_as_the_done_of_an_idle(tmp_path: Path, filters: list[object]) -> None:
    """A server tags its reply to "DONE" or "X {5}" outside an IDLE with that word: such lines are answered, not relayed."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=filters)
    connection.send(b"DONE\r\nX {5}\r\nhello\r\ngarbage\r\n")
    assert connection.received().count(b"* BAD ") == 4
    assert connection.upstream.sent == b""
    connection.send(b"i IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.send(b"DONE\r\n")
    assert connection.upstream.sent == b"i IDLE\r\nDONE\r\n"


def test_an_idle_refreshed_by_the_proxy_frees_its_tag_with_the_last_reply(tmp_path: Path) -> None:
    """A command during the refresh is refused; DONE ends the IDLE and its tag is free with the upstream's reply."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS))
    connection.send(b"t IDLE\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.clock.advance(25 * 60.0)
    connection.send(b"x APPEND INBOX {10+}\r\nabc")
    connection.fromUpstream(b"t OK done\r\n")
    connection.send(b"defghij\r\n")
    connection.fromUpstream(b"+ idling\r\n")
    connection.send(b"DONE\r\n")
    connection.fromUpstream(b"t OK Idle completed\r\n")
    connection.send(b"t NOOP\r\n")
    received = connection.received()
    assert b"x BAD Expected DONE" in received and b"Tag already in use" not in received
    assert connection.upstream.sent == b"t IDLE\r\nDONE\r\nt IDLE\r\nDONE\r\nt NOOP\r\n"


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
@pytest.mark.parametrize("idle", [b'a IDLE "x"\r\n', b"a IDLE {40}\r\n", b"a IDLE {40+}\r\n"])
def test_idle_with_arguments_is_refused_and_its_literal_is_no_literal(
    tmp_path: Path, filters: list[object], idle: bytes
) -> None:
    """Dovecot answers IDLE {40} with "+ idling" without reading a literal: the proxy refuses it and reads the next lines as commands."""
    seen = Scripted(onCommand=lambda command: Reject("no", "NO", "NOPERM") if command.name == b"SELECT" else PASS)
    connection = loggedIn(
        tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=[seen] if filters else []
    )
    connection.send(idle + b"DONE\r\nx SELECT Private\r\n")
    received = connection.received()
    assert b"+ " not in received
    assert received.startswith(b"a BAD ")
    assert b"x SELECT" not in connection.upstream.sent or not filters
    assert b"IDLE" not in connection.upstream.sent


@pytest.mark.parametrize("filters", [[], [Scripted()]], ids=["passthrough", "filtered"])
def test_a_refused_literal_sent_without_waiting_does_not_reset_a_later_command(
    tmp_path: Path, filters: list[object]
) -> None:
    """The refused command's literal octets (sent before any '+') stay its own; the next command's literal stays whole."""
    connection = loggedIn(tmp_path, upstream=UpstreamScript(capabilities=LITERAL_PLUS), filters=filters)
    connection.send(b"mpi1 APPEND x {5}\r\nhello\r\nC APPEND y {40+}\r\n0123456789")
    assert connection.received().startswith(b"mpi1 BAD ")
    connection.fromUpstream(b"+ go\r\n")
    connection.send(b"Z DELETE secret\r\nyyyyyyyyyyyyy\r\n")
    if filters:
        # The filtered relay sends C once it has all of it, then waits for its "+".
        connection.fromUpstream(b"+ go\r\n")
    sent = connection.upstream.sent
    assert sent == b"C APPEND y {40}\r\n0123456789Z DELETE secret\r\nyyyyyyyyyyyyy\r\n", sent
    assert connection.received() == b""
