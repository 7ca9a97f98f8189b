# -*- test-case-name: tests.test_imap_relay -*-
"""
The relay of a logged-in IMAP session, in both directions.

With no filters configured, framed bytes pass straight through (the fast
path).  With filters, each command and response is assembled, parsed and
run through the chain first; literals up to L{BUFFER_LIMIT} are held for
that (the proxy answers the client's synchronising literals itself and
forwards them with LITERAL+ or by its own continuation dance upstream),
larger ones stream: the filters see the command up to the literal, with
its size, and responses carrying one pass unfiltered.
"""

from __future__ import annotations

import enum
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.filters import DROP, Reject, Rewrite, Verdict
from mailproxy.filters.chain import FilterChain
from mailproxy.imap.framer import ClientEvent, Event, Line, LiteralChunk, OverlongLine
from mailproxy.imap.idle import IdleController
from mailproxy.imap.lexer import ArgumentLexer, Atom, LexError, commandHead
from mailproxy.imap.model import IMAPCommand, ParseError, StreamedLiteral, lexCommand, parseResponse, text
from mailproxy.imap.syntax import RELAY_CAPABILITIES, rewriteCapabilities, tagAndCommand, tagOf
from mailproxy.watchdog import ResponseWatchdog, WatchedProducer
from mailproxy.writenow import writeNow

BUFFER_LIMIT = 256 * 1024
# Client octets held while a synchronising literal awaits the upstream's
# "+" (a well-behaved client sends none): past this, the client is cut off.
HOLD_LIMIT = 64 * 1024
# The same for a LITERAL+ literal, whose octets the client sends at once:
# the proxy stops reading until the "+", so this bounds one read's worth.
PAUSED_HOLD_LIMIT = 4 * HOLD_LIMIT
# The only commands whose literals may stream past the filters unseen: the
# content of a message is not the filters' business, its mailbox is.
STREAMABLE = frozenset({b"APPEND", b"REPLACE"})
# Sent to the upstream after a streamed literal to abort a command whose
# rest the proxy will not relay: an unbalanced list, which every server
# answers BAD without executing anything.
_ABORT_COMMAND = b" (\r\n"
# A line ending like a literal announcement.
_ENDS_LIKE_LITERAL = re.compile(rb"~?\{[0-9]+\+?\}\r?\n\Z")
# What every such line ends with (a cheap test before the expression).
_LITERAL_ENDINGS = (b"}\r\n", b"}\n")
# Commands tracked for their tagged reply at once; past this the oldest is
# forgotten (a reply the upstream could not tag never comes), and no new
# command is relayed until replies come.
MAX_IN_FLIGHT = 1000
# The tags of the proxy's own commands (IDLE emulation polls).
_PROXY_TAG = re.compile(rb"mpi[0-9]+\Z")
# Commands timed at once in the passthrough relay (pipelining beyond this
# goes untimed rather than growing the table).
MAX_TIMED_COMMANDS = 1000

# Commands the proxy answers itself after login instead of relaying.
NOT_RELAYED = frozenset({b"LOGIN", b"AUTHENTICATE", b"STARTTLS", b"COMPRESS"})
# Command names fromClientLines leaves to the full path.
_NOT_PLAIN = NOT_RELAYED | {b"IDLE"}
_NOT_RELAYED_REPLY = b"BAD Command not available after login through this proxy"
_SYNC_ANNOUNCEMENT = re.compile(rb"\{([0-9]+)\}\r\n\Z")
_RESPONSE_NAME = re.compile(rb"\A(?:\*|[^ ]+)(?: [0-9]+)? ([A-Za-z][A-Za-z0-9.\-]*)")

Part = bytes | StreamedLiteral

# The response lines the passthrough relay acts on (see _fromUpstreamBatch
# and _baseRewrite), found by the framer's scan: tagged replies and
# continuations (not starting with "*"), and untagged ones that may be a
# BYE, a BAD, a capability list or carry a CAPABILITY response code (a "["
# where _baseRewrite looks for one; a mailbox's [UIDVALIDITY ...] and the
# like are passed over).  Every other line passes untouched.
_NOTABLE_LINE = re.compile(
    rb"^(?:[^*]|\*[^ ]|\* (?i:BYE|BAD |CAPABILITY)|\* [^\n]{0,8}\[(?i:CAPABILITY ))", re.MULTILINE
)


class _Literal(enum.Enum):
    """
    Who is waiting for the upstream's "+" to a literal the proxy relayed.

    Every literal goes upstream synchronising: the upstream's "+" is the
    only proof that it reads the octets that follow as literal data (and
    not as commands, as it would after a line it rejected, or past the
    arguments its command takes).
    """

    CLIENT_WAITS = "the client sent a synchronising literal and waits for the '+' too"
    CLIENT_SENDS = "the client sent LITERAL+ and its octets are held: the '+' is the proxy's"


def _synchronizing(raw: bytes) -> bytes:
    """
    A line announcing a LITERAL+ literal, announcing it synchronising.
    """
    return raw[:-4] + b"}\r\n" if raw.endswith(b"+}\r\n") else raw


def _tag(response: bytes) -> bytes:
    """
    The first word of a response line (its tag, for a tagged reply).
    """
    space = response.find(b" ")
    return response if space < 0 else response[:space]


def _withIdle(names: list[bytes]) -> list[bytes]:
    """
    Relayed capabilities plus IDLE, which the proxy emulates.
    """
    kept = RELAY_CAPABILITIES(names)
    return kept if b"IDLE" in {name.upper() for name in kept} else [*kept, b"IDLE"]


@dataclass
class _Assembly:
    """
    A command or response being collected from framed events.
    """

    parts: list[Part] = field(default_factory=list)
    literal: bytearray = field(default_factory=bytearray)
    tag: bytes | None = None
    name: bytes | None = None

    def addLiteral(self, chunk: LiteralChunk) -> None:
        self.literal += chunk.data
        if not chunk.remaining:
            self.parts.append(bytes(self.literal))
            self.literal = bytearray()


@dataclass
class _Outbound:
    """
    A command on its way upstream, as its remaining parts (octets, is
    text); C{owes} is the tag whose "+" the upstream owes once it is all
    sent (a relayed IDLE, or a literal that streams).
    """

    tag: bytes
    parts: deque[tuple[bytes, bool]]
    owes: bytes | None = None


@dataclass
class _InFlight:
    command: IMAPCommand | None
    started: float
    bytesIn: int
    bytesOutAtStart: int


class Relay:
    """
    Relay one session between C{client} (the server protocol) and
    C{upstream} (an L{UpstreamIMAPProtocol}).

    With a C{responseTimeout}, an upstream that leaves a command unanswered
    that long (see L{ResponseWatchdog}) ends the session through
    C{client.upstreamTimedOut()}.

    @ivar upstreamProducer: the upstream transport as a producer for the
        client transport, pausing the watchdog along with it.
    """

    log = Logger()

    def __init__(
        self,
        client: Any,
        upstream: Any,
        chain: FilterChain,
        session: Any,
        capabilities: list[bytes],
        *,
        responseTimeout: float | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.chain = chain
        # Fixed for the session: the passthrough relay asks on every event.
        self._filtered = bool(chain)
        self.session = session
        # (In C, not a loop over the names: this runs once per login.)
        offersIdle = b"IDLE" in b" ".join(capabilities).upper().split()
        config = client.context.config
        self.idle = IdleController(
            self,
            client.context.clock,
            emulate=not offersIdle,
            pollInterval=config.idlePollInterval,
            refreshInterval=config.idleRefresh,
            timeout=config.authenticatedTimeout,
        )
        self._capabilities = RELAY_CAPABILITIES if offersIdle else _withIdle
        self.bytesIn = 0
        self.bytesOut = 0
        self.upstreamSaidBye = False
        self.midResponse = False
        self._batching = False
        self._localReplies: list[bytes] = []
        self._closeAfterReplies = False
        # client -> upstream
        self._clientEvents: deque[ClientEvent] = deque()
        self._clientBlocked = False
        self._command: _Assembly | None = None
        self._streamingCommand = False
        self._discard: tuple[bytes, bytes, bytes] | None = None
        self._refusedRest = False
        self._held: deque[Event] = deque()
        self._heldSize = 0
        self._releaseHeld = False
        self._awaitingContinuation: bytes | None = None
        self._awaitingKind = _Literal.CLIENT_WAITS
        self._pausedForLiteral = False
        # The rest of a streamed APPEND after its large literal, read as it
        # arrives (the filters judged the command up to that literal).
        self._tail: ArgumentLexer | None = None
        # Tags whose "+" the upstream still owes, in the order it will send
        # them: relayed IDLEs and synchronising literals.
        self._continuations: deque[bytes] = deque()
        self._clientTag: bytes | None = None
        # Commands waiting to go upstream, each as its remaining parts; the
        # first may be stopped at a synchronising literal.
        self._outbound: deque[_Outbound] = deque()
        self._outboundSize = 0
        self._outboundWaiting = False
        self._inFlight: dict[bytes, _InFlight] = {}
        self._pendingSelect: tuple[bytes, bytes | None] | None = None
        # upstream -> client
        self._upstreamEvents: deque[Event] = deque()
        self._upstreamBlocked = False
        self._response: _Assembly | None = None
        self._streamingResponse = False
        # Command latency for metrics, when they are on: tag -> (name, start).
        self._metrics = getattr(client, "metrics", None)
        self._timing: dict[bytes, tuple[bytes, float]] = {}
        # Tags of relayed commands the upstream has not answered yet.
        self._unanswered: dict[bytes, int] = {}
        # Tags of relayed commands not answered yet: a second command with
        # one of them would make its reply (or "+") look like another's.
        self._tagsInUse: dict[bytes, None] = {}
        self.watchdog = (
            ResponseWatchdog(client.context.clock, responseTimeout, self._upstreamSilent)
            if responseTimeout is not None
            else None
        )
        self.upstreamProducer = WatchedProducer(upstream.transport, self.watchdog)

    # -- writing -------------------------------------------------------------

    def toClient(self, data: bytes, *, complete: bool = True) -> None:
        self.bytesOut += len(data)
        writeNow(self.client.transport, data)
        if self._metrics is not None:
            self._metrics.bytesToClient.inc(len(data))
        self.midResponse = not complete
        if complete and self._localReplies:
            replies, self._localReplies = self._localReplies, []
            self._writeLocal(b"".join(replies))
            if self._closeAfterReplies:
                self.client.disconnect()

    def sendLocal(self, data: bytes) -> None:
        """
        Write a reply of the proxy's own between two upstream responses.
        """
        if self.midResponse or self._batching:
            self._localReplies.append(data)
        else:
            self._writeLocal(data)

    def _writeLocal(self, data: bytes) -> None:
        writeNow(self.client.transport, data)
        if self._metrics is not None:
            self._metrics.bytesToClient.inc(len(data))

    def closeAtBoundary(self, data: bytes) -> None:
        """
        Send a last reply of the proxy's own (a BYE) and close, without
        cutting an upstream response in two.
        """
        self.client.transport.pauseProducing()
        self.sendLocal(data)
        if self._localReplies:
            self._closeAfterReplies = True
        else:
            self.client.disconnect()

    def toUpstream(self, data: bytes) -> None:
        self.bytesIn += len(data)
        writeNow(self.upstream.transport, data)

    # -- client -> upstream ------------------------------------------------------

    def fromClient(self, event: ClientEvent) -> None:
        if isinstance(event, OverlongLine):
            self._overlong(event)
            return
        if not self._filtered:
            self._passthroughFromClient(event)
        else:
            self._clientEvents.append(event)
            self._drainClient()
        self.updateWatchdog()

    def fromClientLines(self, data: bytes) -> int:
        """
        The lean passthrough path for client reads: relay the whole command
        lines that start C{data} without framing them, as long as each is a
        plain command the relay only passes on (see L{_passthroughFromClient}
        for what it does with the rest), and all in one write.

        The caller guarantees that the client framer is between commands,
        that C{data} is whole lines no longer than the framer allows and that
        none ends like a literal announcement.

        @return: how many octets of C{data} were relayed; the rest (from the
            first line that needs more) is for the framer.
        """
        if self._filtered or self._discard is not None or self._refusedRest:
            return 0
        if self._awaitingContinuation is not None or self._outbound or not self.idle.quiet:
            return 0
        tagsInUse = self._tagsInUse
        unanswered = self._unanswered if self.watchdog is not None else None
        metrics = self._metrics
        position = 0
        end = len(data)
        while position < end:
            newline = data.index(b"\n", position) + 1
            head = commandHead(data[position:newline].rstrip(b"\r\n"))
            if head is None:
                break
            tag = head.tag
            name = head.name
            if (
                name in _NOT_PLAIN
                or tag in tagsInUse
                or len(tagsInUse) >= MAX_IN_FLIGHT
                or _PROXY_TAG.match(tag) is not None
            ):
                # Refused, answered by the proxy or an IDLE: the full path.
                break
            tagsInUse[tag] = None
            if unanswered is not None:
                unanswered[tag] = unanswered.get(tag, 0) + 1
            if metrics is not None:
                self._startTiming(tag, b"UID " + name if head.uid else name)
            self._clientTag = tag
            position = newline
        if position:
            self.toUpstream(data if position == end else data[:position])
            if unanswered:
                # What updateWatchdog works out between commands, with no
                # IDLE and no continuation awaited.
                assert self.watchdog is not None
                self.watchdog.owed(True)
        return position

    def _passthroughFromClient(self, event: Event) -> None:
        if self._discard is not None:
            self._discardCommand(event)
            return
        if self._refusedRest:
            # Octets framed with a command refused at its synchronising
            # literal: the client should not have sent them, and relayed
            # they could smuggle a refused command upstream.
            if isinstance(event, LiteralChunk) or event.continuation:
                return
            self._refusedRest = False
        if self._awaitingContinuation is not None:
            self._hold(event)
            return
        if isinstance(event, LiteralChunk):
            if self.watchdog is not None:
                # The upstream cannot answer before the literal is complete.
                self.watchdog.heard()
            self._toUpstreamInOrder(event.data)
            return
        if not event.continuation:
            raw = event.raw
            head = commandHead(raw.rstrip(b"\r\n"))
            if head is None:
                self._clientTag = None
                if not self._endsIdle(raw):
                    # Never relayed: a server tags its reply with whatever
                    # word starts the line ("DONE BAD ..."), which could then
                    # pass for the reply to a command of the client's with
                    # that tag.
                    self._unreadable(None, b"*", ParseError("invalid tag or command name"))
                    return
                if self.idle.clientDone():
                    return
            else:
                tag = self._clientTag = head.tag
                name = b"UID " + head.name if head.uid else head.name
                if name in NOT_RELAYED:
                    self._startDiscard(event, tag, _NOT_RELAYED_REPLY, name)
                    return
                refusal = self._refusal(tag, name, raw)
                if refusal is not None:
                    self._startDiscard(event, tag, refusal, name)
                    return
                if event.literal is None and raw.endswith(_LITERAL_ENDINGS) and _ENDS_LIKE_LITERAL.search(raw):
                    # The proxy reads no literal here (an unknown command, or
                    # text that does not read cleanly); a server that did would
                    # take the next octets as data the proxy took for commands.
                    self.sendLocal(tag + b" BAD Literal not accepted here by the proxy\r\n")
                    return
                if name == b"IDLE" and len(raw.split()) == 2:
                    if event.complete and self.idle.start(tag):
                        return
                    self._continuations.append(tag)
                self._commandSent(tag)
                if self._metrics is not None:
                    self._startTiming(tag, name)
        raw = event.raw
        if self._tail is not None and event.continuation:
            checked = self._checkTail(event)
            if checked is None:
                return
            raw = checked
        elif (
            event.continuation
            and event.literal is None
            and raw.endswith(_LITERAL_ENDINGS)
            and _ENDS_LIKE_LITERAL.search(raw)
        ):
            # The same at the end of a command already on its way: the
            # upstream gets a line that ends it with BAD instead.
            raw = _ABORT_COMMAND
        if event.literal is not None:
            self._awaitLiteral(self._clientTag, event.nonSynchronizing)
            raw = _synchronizing(raw)
        self._toUpstreamInOrder(raw)

    def _awaitLiteral(self, tag: bytes | None, clientSends: bool, owedNow: bool = True) -> None:
        """
        A literal goes upstream synchronising: hold what the client sends
        after it until the upstream's "+" (for LITERAL+, stop reading too).

        @param owedNow: the announcement is sent now (else its L{_Outbound}
            registers the "+" it is owed once sent).
        """
        self._awaitingContinuation = tag
        if owedNow:
            self._continuations.append(tag or b"")
        if clientSends:
            self._awaitingKind = _Literal.CLIENT_SENDS
            if not self._pausedForLiteral:
                self._pausedForLiteral = True
                self.client.transport.pauseProducing()
        else:
            self._awaitingKind = _Literal.CLIENT_WAITS

    def _checkTail(self, event: Line) -> bytes | None:
        """
        Read a line of a streamed APPEND's rest: more messages, flags, dates
        and CATENATE text parts may follow, but not a CATENATE URL, which
        names a mailbox the filters never saw, nor anything unreadable.

        @return: the line to relay, or C{None} if the command was aborted.
        """
        lexer = self._tail
        assert lexer is not None
        try:
            announcement = lexer.segment(event.raw.rstrip(b"\r\n"))
            if any(isinstance(token, Atom) and token.value.upper() == b"URL" for token in lexer.tokens()):
                raise LexError("a CATENATE URL after a literal over 256 KiB is not relayed")
            if announcement is None:
                lexer.finish()
        except LexError as error:
            self.log.warn(
                "{client} {tag}: {reason}; the command is aborted upstream",
                client=self.client.clientAddress,
                tag=self._clientTag,
                reason=str(error),
            )
            self._tail = None
            self._toUpstreamInOrder(_ABORT_COMMAND)
            if event.literal is not None and not event.nonSynchronizing:
                # The client will not send it: no "+" is coming.
                self.client.framer.cancelLiteral(event)
            # The command is over upstream: what the client still sends of it
            # is dropped by the filtered path (no command is assembling), and
            # its next command is filtered again.
            self._streamingCommand = False
            return None
        self._tail = ArgumentLexer(lexer.depth, afterToken=True) if announcement is not None else None
        return event.raw

    def _hold(self, event: Event) -> None:
        """
        Keep what the client sent after a synchronising literal's
        announcement until the upstream answers it: relayed at once, octets
        of a literal the upstream then refuses would run there as commands
        (ones the proxy may refuse, or a filter deny).
        """
        self._held.append(event)
        self._heldSize += len(event.data if isinstance(event, LiteralChunk) else event.raw)
        limit = PAUSED_HOLD_LIMIT if self._awaitingKind is _Literal.CLIENT_SENDS else HOLD_LIMIT
        if self._heldSize > limit:
            self._held.clear()
            self._cutOff(
                "sent {size} octets before the upstream's continuation",
                self._heldSize,
                b"Literal data sent before the continuation",
            )

    def _release(self) -> None:
        """
        The upstream answered the literal: pass on (or, after a refusal,
        drop the rest of the refused command from) what was held.
        """
        self._releaseHeld = False
        held, self._held, self._heldSize = self._held, deque(), 0
        if self._pausedForLiteral:
            self._pausedForLiteral = False
            if not self._clientBlocked and not self.client.transport.disconnecting:
                self.client.transport.resumeProducing()
        if self._refusedRest:
            # The literal was refused: what was held never reaches the
            # upstream, which now expects a new command.
            if self._awaitingKind is _Literal.CLIENT_WAITS:
                # Nor does anything the client framer holds of it: the
                # client was not to send the literal.
                self.client.framer.reset()
                self._refusedRest = False
            else:
                # The client sends the literal regardless: its octets are
                # framed as they come and dropped with the command.
                self._refusedRest = not self.chain
            return
        if self.chain:
            self._clientEvents.extendleft(reversed(held))
            self._drainClient()
            return
        for event in held:
            self._passthroughFromClient(event)

    def _toUpstreamInOrder(self, data: bytes) -> None:
        """
        Send client octets that pass unassembled (lines without a tag such
        as DONE, streamed literals) behind any command the filtered relay
        still holds for the upstream's continuation.
        """
        if self._outbound:
            self._queue(_Outbound(b"", deque([(data, False)])))
        else:
            self.toUpstream(data)

    def _overlong(self, event: OverlongLine) -> None:
        """
        A command line over the limit never goes upstream.  Handled here, in
        order, because a filtered relay may still hold earlier commands.
        """
        if self.chain and (self._clientEvents or self._clientBlocked):
            self._clientEvents.append(event)
            return
        self.client.refuseOverlong(event, self._overlongTag(event))

    def _overlongTag(self, event: OverlongLine) -> bytes:
        if event.continuation:
            tag = self._command.tag if self._command is not None else self._clientTag
            if tag:
                return tag
        return tagOf(event.head)

    def _startTiming(self, tag: bytes, name: bytes) -> None:
        """
        Time the command C{name} (C{b"UID FETCH"} style) tagged C{tag}.
        """
        # An IDLE's reply comes when the client ends it: not a latency.
        if name == b"IDLE" or len(self._timing) >= MAX_TIMED_COMMANDS:
            return
        self._timing[tag] = (name, time.monotonic())

    def _commandsAnswered(self, tags: list[bytes]) -> None:
        now = time.monotonic()
        assert self._metrics is not None
        for tag in tags:
            timed = self._timing.pop(tag, None)
            if timed is not None:
                self._metrics.commandDone(timed[0], now - timed[1])

    def _endsIdle(self, raw: bytes) -> bool:
        """
        C{True} for a DONE while an IDLE runs: the one line without a tag
        that goes upstream.
        """
        return self.idle.idling and raw.rstrip(b"\r\n").upper() == b"DONE"

    def tagAnswered(self, tag: bytes) -> None:
        """
        The proxy answered C{tag} itself (ending an IDLE): it is free again.
        """
        self._tagsInUse.pop(tag, None)

    def _startDiscard(self, event: Line, tag: bytes, reply: bytes, name: bytes = b"?") -> None:
        self._discard = (tag, reply, name)
        self._discardCommand(event)

    def _discardCommand(self, event: Event) -> None:
        """
        Swallow a refused command, literals included, then answer it.
        """
        assert self._discard is not None
        if isinstance(event, LiteralChunk) or (event.literal is not None and event.nonSynchronizing):
            return
        if event.literal is not None:
            # The client waits for a continuation we will not send; the
            # tagged reply tells it not to send the literal (unless it sent
            # it already: then its octets come framed as this command's).
            self.client.framer.cancelLiteral(event)
            # (The filtered path drops them itself: no command is assembling.)
            self._refusedRest = not self.chain
        tag, reply, name = self._discard
        self._discard = None
        self.session.notify(
            "command",
            command=IMAPCommand(tag=tag, name=name),
            result=reply.split(b" ", 1)[0].decode("ascii", "replace"),
            relayed=False,
            bytesIn=0,
            bytesOut=0,
            duration=0.0,
        )
        self.sendLocal(tag + b" " + reply + b"\r\n")

    def _replyHandled(self, raw: bytes) -> None:
        """
        A response line is handled in order (not merely read: a filter may
        hold earlier ones, and the proxy's own IDLE refresh swallows the
        IDLE's reply and re-sends the IDLE): a tagged reply frees its tag.
        """
        if raw[:1] not in (b"*", b"+"):
            self._tagsInUse.pop(_tag(raw), None)

    def _refusal(self, tag: bytes, name: bytes, line: bytes) -> bytes | None:
        """
        Why the command C{name} tagged C{tag} (starting C{line}) cannot be
        relayed now, if it cannot.
        """
        if name == b"IDLE" and len(line.split()) != 2:
            # Servers that ignore IDLE's arguments answer it "+": relayed,
            # its literal (or the next line) would be read as commands.
            return b"BAD IDLE takes no arguments"
        if self.idle.idling and not self.idle.ending:
            # Dovecot reads such a line as a bad DONE; relayed, its literal
            # would be read as commands.
            return b"BAD Expected DONE to end the IDLE first"
        if tag in self._tagsInUse:
            return b"BAD Tag already in use by a command in progress"
        if _PROXY_TAG.match(tag):
            return b"BAD Tags mpi<N> are reserved by the proxy"
        if len(self._tagsInUse) >= MAX_IN_FLIGHT:
            return b"BAD [LIMIT] Too many commands in progress"
        return None

    def _drainClient(self) -> None:
        while self._clientEvents and not self._clientBlocked:
            event = self._clientEvents.popleft()
            if isinstance(event, OverlongLine):
                self.client.refuseOverlong(event, self._overlongTag(event))
            else:
                self._filteredFromClient(event)

    def _filteredFromClient(self, event: Event) -> None:
        if self._discard is not None:
            self._discardCommand(event)
            return
        if self._streamingCommand:
            self._passthroughFromClient(event)
            # A held line comes back through here once the upstream's "+"
            # releases it: the command ends when its last line is relayed.
            held = bool(self._held) and self._held[-1] is event
            if isinstance(event, Line) and event.complete and not held:
                self._streamingCommand = False
                self._tail = None
                self._refusedRest = False
            return
        if isinstance(event, LiteralChunk):
            if self._command is None:
                # Literal octets sent along with a command that was refused
                # or cancelled before its continuation: not to be relayed.
                return
            self._command.addLiteral(event)
            return
        if not event.continuation:
            head = commandHead(event.raw.rstrip(b"\r\n"))
            if head is None:
                if self._endsIdle(event.raw):
                    # One fixed line.
                    self._passthroughFromClient(Line(b"DONE\r\n", continuation=False))
                else:
                    # Without a tag and name nothing is relayed; the framer
                    # announced no literal for such a line.
                    self._unreadable(None, b"*", ParseError("invalid tag or command name"))
                return
            if head.name in NOT_RELAYED:
                self._startDiscard(event, head.tag, _NOT_RELAYED_REPLY, head.name)
                return
            refusal = self._refusal(head.tag, head.name, event.raw)
            if refusal is not None:
                self._startDiscard(event, head.tag, refusal, head.name)
                return
            self._command = _Assembly(tag=head.tag, name=head.name)
        command = self._command
        if command is None:
            # The rest of a command whose literal was refused or cancelled.
            return
        command.parts.append(event.raw)
        if event.literal is None:
            self._command = None
            self._decide(command.parts)
        elif event.literal > BUFFER_LIMIT:
            self._command = None
            if command.name not in STREAMABLE:
                tag = command.tag or b"*"
                self._startDiscard(
                    event, tag, b"BAD [TOOBIG] Literal too large for a filtered command", command.name or b"?"
                )
                return
            binary = event.raw.rstrip(b"+}\r\n0123456789").endswith(b"~{")
            self._decide([*command.parts, StreamedLiteral(event.literal, binary)], streamed=event)
        elif not event.nonSynchronizing:
            self.sendLocal(b"+ Ready for literal data\r\n")

    def _decide(self, parts: list[Part], streamed: Line | None = None) -> None:
        try:
            command, lexer = lexCommand(parts)
            if streamed is None:
                command.arguments = lexer.finish()
            else:
                self._tail = ArgumentLexer(lexer.depth, afterToken=True)
        except ParseError as error:
            head = commandHead(parts[0].rstrip(b"\r\n")) if isinstance(parts[0], bytes) else None
            if head is None:
                self._unreadable(streamed, b"*", error)
            else:
                self._unreadable(streamed, head.tag, error, IMAPCommand(tag=head.tag, name=head.name, uid=head.uid))
            return
        verdict = self.chain.filterCommand(self.session, command)
        if isinstance(verdict, Deferred):
            self._clientBlocked = True
            self.client.transport.pauseProducing()
            verdict.addCallback(self._decided, command, streamed)
            verdict.addErrback(self._bug)
            return
        self._decided(verdict, command, streamed)

    def _unreadable(
        self, streamed: Line | None, tag: bytes, error: ParseError, command: IMAPCommand | None = None
    ) -> None:
        """
        Answer BAD a command the proxy cannot read the way every server
        would; nothing of it reaches the upstream.
        """
        self.log.info(
            "{client} {tag}: command refused, not relayed: {reason}",
            client=self.client.clientAddress,
            tag=tag.decode("ascii", "replace"),
            reason=str(error),
        )
        reply = b"BAD Command syntax not accepted by the proxy: " + str(error).encode("ascii", "replace")
        command = command or IMAPCommand(tag=tag, name=b"?")
        self.session.notify(
            "command", command=command, result="BAD", relayed=False, bytesIn=0, bytesOut=0, duration=0.0
        )
        if streamed is not None:
            self._tail = None
            self._startDiscard(streamed, tag, reply)
        else:
            self.sendLocal(tag + b" " + reply + b"\r\n")

    def _decided(self, verdict: Verdict, command: IMAPCommand, streamed: Line | None) -> None:
        if isinstance(verdict, Reject):
            self._tail = None
            self._reject(command, verdict, streamed)
        else:
            final = verdict.message if isinstance(verdict, Rewrite) else command
            try:
                # Never LITERAL+ upstream: each "+" confirms a literal.
                wire = final.toWire(literalPlus=False)
            except ParseError as error:
                self.log.error(
                    "a filter rewrote {tag} into an unsendable command: {error}", tag=command.tag, error=str(error)
                )
                self._reject(command, Reject("Internal error in a proxy filter", "NO", "SERVERBUG"), streamed)
                wire = None
            idle = streamed is None and final.name == b"IDLE" and not final.arguments
            if wire is not None and not (idle and self.idle.start(final.tag)):
                self._trackCommand(final)
                # An IDLE with arguments gets BAD, not "+".
                self._forward(wire, streamed, final.tag, idle=final.name == b"IDLE" and not final.arguments)
        if self._clientBlocked:
            self._clientBlocked = False
            self.client.transport.resumeProducing()
            self._drainClient()
        self.updateWatchdog()

    def _reject(self, command: IMAPCommand, verdict: Reject, streamed: Line | None) -> None:
        code = f"[{verdict.code}] " if verdict.code else ""
        reply = f"{verdict.status} {code}{verdict.text}".encode("utf-8", "replace")
        self.session.notify(
            "command", command=command, result=verdict.status, relayed=False, bytesIn=0, bytesOut=0, duration=0.0
        )
        if streamed is not None:
            self._startDiscard(streamed, command.tag, reply)
        else:
            self.sendLocal(command.tag + b" " + reply + b"\r\n")

    def _forward(self, parts: list[Part], streamed: Line | None, tag: bytes | None = None, idle: bool = False) -> None:
        """
        Send a command upstream; a trailing L{StreamedLiteral} switches to
        streaming the rest of it as it arrives.
        """
        first = parts[0]
        parsed = tagAndCommand(first) if isinstance(first, bytes) else None
        if parsed is not None:
            self._commandSent(parsed[0])
        if streamed is not None:
            self._streamingCommand = True
            self._clientTag = tag
            self._awaitLiteral(tag, streamed.nonSynchronizing, owedNow=False)
        # (octets, is text): only text parts announce literals; literal data
        # that happens to end like "{5}\r\n" must not stop the sending.
        outbound: deque[tuple[bytes, bool]] = deque()
        for index, part in enumerate(parts):
            if isinstance(part, StreamedLiteral):
                break
            outbound.append((part, index % 2 == 0))
        owes = (tag or b"") if streamed is not None or idle else None
        self._queue(_Outbound(tag or b"", outbound, owes))
        self._flushOutbound()

    def _queue(self, command: _Outbound) -> None:
        """
        Queue C{command} for the upstream; a client that piles up more than
        L{PAUSED_HOLD_LIMIT} octets behind a continuation that does not come
        is cut off.
        """
        self._outbound.append(command)
        self._outboundSize += sum(len(part) for part, _ in command.parts)
        if self._outboundSize > PAUSED_HOLD_LIMIT:
            size, self._outboundSize = self._outboundSize, 0
            self._outbound.clear()
            self._cutOff(
                "queued {size} octets behind an upstream continuation", size, b"Too much data queued for the upstream"
            )

    def _cutOff(self, what: str, size: int, reply: bytes) -> None:
        """
        Log why a client piling up octets the proxy will not hold is cut
        off, and close it with C{reply} at a response boundary.
        """
        self.log.warn("{client} " + what + "; disconnecting", client=self.client.clientAddress, size=size)
        self.client.closeAtBoundary(reply)

    def _flushOutbound(self) -> None:
        """
        Send what waits to go upstream, but never while a "+" is owed: then
        the next "+" can only answer the one thing waiting for it (an IDLE's
        "+" must not release a literal the upstream then refuses).
        """
        while self._outbound and not self._outboundWaiting and not self._continuations:
            current = self._outbound[0]
            while current.parts:
                part, isText = current.parts.popleft()
                self._outboundSize -= len(part)
                self.toUpstream(part)
                if current.parts and isText and _SYNC_ANNOUNCEMENT.search(part):
                    self._outboundWaiting = True
                    return
            self._outbound.popleft()
            if current.owes is not None:
                self._continuations.append(current.owes)

    def _commandSent(self, tag: bytes) -> None:
        self._tagsInUse[tag] = None
        if self.watchdog is not None:
            self._unanswered[tag] = self._unanswered.get(tag, 0) + 1

    def _responseSeen(self, events: list[Event]) -> None:
        """
        Note tagged replies as they arrive (before any filter holds them).
        """
        unanswered = self._unanswered
        for event in events:
            if not unanswered:
                return
            if isinstance(event, LiteralChunk) or event.continuation:
                continue
            self._replySeen(event.raw)

    def _replySeen(self, raw: bytes) -> None:
        """
        Note the response that starts with C{raw} if it is a tagged reply
        (or an untagged BAD) to a relayed command.
        """
        unanswered = self._unanswered
        kind = raw[:1]
        if kind == b"+":
            return
        if kind == b"*":
            if raw[:6].upper() != b"* BAD ":
                return
            # A command the upstream could not even tag: the latest (its
            # tag stays in use: that is not sure enough to reuse it).
            tag = next(reversed(unanswered))
        else:
            tag = _tag(raw)
        count = unanswered.pop(tag, 0)
        if count > 1:
            unanswered[tag] = count - 1

    def upstreamMidCommand(self) -> bool:
        """
        C{True} while a client command is partly relayed (or queued): the
        proxy's own commands (IDLE polls and refreshes) must wait, or they
        would land inside it, and what followed them run as a command.
        """
        if self._awaitingContinuation is not None:
            return True
        if self.chain:
            return bool(self._outbound) or self._outboundWaiting or self._streamingCommand
        # (A command being refused is not relayed at all.)
        return self.client.framer.midCommand and self._discard is None and not self._refusedRest

    def updateWatchdog(self) -> None:
        """
        Count upstream silence while it owes a reply to a relayed command,
        except during an IDLE (which may last for hours) until the client
        ends it.
        """
        if self.watchdog is not None:
            idle = self.idle
            # Mid-command with no continuation awaited, the client owes the
            # next octets (a slow upload), not the upstream.
            clientOwes = self._awaitingContinuation is None and not self.client.framer.atBoundary
            owed = bool(self._unanswered) and not idle.idling and not clientOwes
            self.watchdog.owed(owed or idle.ending or idle.owedByUpstream)

    def _upstreamSilent(self) -> None:
        self.client.upstreamTimedOut()

    def _trackCommand(self, command: IMAPCommand) -> None:
        if len(self._inFlight) >= MAX_IN_FLIGHT:
            del self._inFlight[next(iter(self._inFlight))]
        self._inFlight[command.tag] = _InFlight(command, time.monotonic(), self.bytesIn, self.bytesOut)
        if command.name in (b"SELECT", b"EXAMINE"):
            self._pendingSelect = (command.tag, text(command.arguments[0]) if command.arguments else None)
        elif command.name in (b"CLOSE", b"UNSELECT"):
            self._pendingSelect = (command.tag, None)

    # -- upstream -> client --------------------------------------------------------

    def fromUpstream(self, event: Event) -> None:
        self.fromUpstreamBatch([event])

    def fromUpstreamBatch(self, events: list[Event], read: bytes | None = None) -> None:
        """
        Relay what one upstream read framed; without filters, as one write.

        @param read: the octets C{events} were framed from, if they are all
            of them: relayed unchanged, they are written as they came.
        """
        self.client.resetTimeout()
        if self.watchdog is not None:
            self.watchdog.heard()
        self._responseSeen(events)
        try:
            self._fromUpstreamBatch(events, read)
        finally:
            if self._releaseHeld:
                self._release()
            self.updateWatchdog()

    def _fromUpstreamBatch(self, events: list[Event], read: bytes | None) -> None:
        if self._filtered:
            self._upstreamEvents.extend(events)
            self._drainUpstream()
            return
        out = []
        complete = not self.midResponse
        timing = self._timing
        answered: list[bytes] = []
        idle = self.idle
        # Replies of the proxy's own caused by this batch go after it.
        self._batching = True
        for event in events:
            if isinstance(event, LiteralChunk):
                out.append(event.data)
                complete = False
                continue
            raw = event.raw
            if not event.continuation:
                if idle.watching and event.literal is None and idle.swallow(raw):
                    read = None
                    continue
                kind = raw[:1]
                tag = None
                if kind != b"*" and kind != b"+":
                    # A tagged reply frees its tag (what _replyHandled does).
                    tag = _tag(raw)
                    self._tagsInUse.pop(tag, None)
                if (self._continuations or kind == b"+") and not self._answered(raw):
                    read = None
                    continue
                if timing and tag is not None:
                    answered.append(tag)
                rewritten = self._baseRewrite(raw)
                if rewritten is not raw:
                    raw, read = rewritten, None
            out.append(raw)
            complete = event.literal is None
        self._batching = False
        self.toClient(b"".join(out) if read is None else read, complete=complete)
        if answered:
            self._commandsAnswered(answered)

    def fromUpstreamRead(self, read: bytes) -> bool:
        """
        The lean passthrough path for upstream reads: frame C{read} with
        L{IMAPFramer.scan} and relay it as it came, looking only at the
        lines the relay acts on (see L{_NOTABLE_LINE}): it does what
        L{fromUpstreamBatch} does with the same octets in far fewer steps,
        which is most of what relaying a command costs the proxy.

        @return: C{False}, having done nothing, if the relay needs framed
            events instead: filters, an IDLE or a poll of the proxy's own,
            or a continuation owed.
        @raise FramingError: as the framer does.
        """
        if self._filtered or self._continuations or self._awaitingContinuation is not None:
            return False
        if not self.idle.quiet:
            return False
        framer = self.upstream.framer
        read, starts, framed = framer.scan(read, _NOTABLE_LINE)
        if not framed:
            return True
        client = self.client
        client.resetTimeout()
        unanswered = self._unanswered
        tagsInUse = self._tagsInUse
        timing = self._timing
        answered: list[bytes] = []
        pieces: list[bytes] = []
        copied = 0
        for start in starts:
            end = read.index(b"\n", start) + 1
            raw = read[start:end]
            kind = raw[:1]
            if kind == b"*":
                if unanswered:
                    self._replySeen(raw)
            elif kind == b"+":
                # No continuation is owed: not relayed (see _answered).
                self._answered(raw)
                pieces += (read[copied:start],)
                copied = end
                continue
            else:
                # A tagged reply: its command is answered, its tag free.
                space = raw.find(b" ")
                tag = raw if space < 0 else raw[:space]
                tagsInUse.pop(tag, None)
                count = unanswered.pop(tag, 0)
                if count > 1:
                    unanswered[tag] = count - 1
                if timing:
                    answered.append(tag)
            rewritten = self._baseRewrite(raw)
            if rewritten is not raw:
                pieces += (read[copied:start], rewritten)
                copied = end
        if pieces:
            pieces.append(read[copied:framed])
            read = b"".join(pieces)
        elif framed < len(read):
            read = read[:framed]
        self.toClient(read, complete=not framer.midCommand)
        if answered:
            self._commandsAnswered(answered)
        watchdog = self.watchdog
        if watchdog is not None:
            # What updateWatchdog works out, with no IDLE and no
            # continuation awaited.
            watchdog.heard(bool(unanswered) and client.framer.atBoundary)
        return True

    def _passthroughFromUpstream(self, event: Event) -> None:
        if isinstance(event, LiteralChunk):
            self.toClient(event.data, complete=False)
            return
        raw = event.raw
        if not event.continuation:
            if not self._answered(raw):
                return
            raw = self._baseRewrite(raw)
        self.toClient(raw, complete=event.complete)

    def _baseRewrite(self, raw: bytes) -> bytes:
        """
        Note a BYE, and hide the capabilities the proxy cannot relay from a
        capability list (C{* CAPABILITY ...} or a C{[CAPABILITY ...]} code
        right after a status word).
        """
        space = raw.find(b" ")
        if space < 0:
            return raw
        if space == 1 and raw[:1] == b"*" and raw[2:5].upper() == b"BYE":
            self.upstreamSaidBye = True
        # "[CAPABILITY " right after the status word ("PREAUTH " is the
        # longest: the first "[" after the tag is where a code starts), or
        # "CAPABILITY" as the response's name: anything else lists none.
        # (A "[" there means the response's name is not CAPABILITY.)
        bracket = raw.find(b"[", space, space + 10)
        if bracket >= 0:
            listed = raw[bracket + 1 : bracket + 12].upper() == b"CAPABILITY "
        else:
            listed = raw[space + 1 : space + 11].upper() == b"CAPABILITY"
        return rewriteCapabilities(raw, self._capabilities) if listed else raw

    def _answered(self, response: bytes) -> bool:
        """
        Follow what C{response} (the start of one) answers of what the
        upstream owes a "+"; C{False} if the client must not see it: a "+"
        for a literal the client sent as LITERAL+, or one nothing relayed
        asked for (the upstream then reads octets as data that the proxy
        reads as commands: the client is not invited to send any).
        """
        if response[:1] == b"+" and not self._continuations:
            self.log.warn(
                "{client}: the upstream sent a continuation no relayed command asked for; not relayed",
                client=self.client.clientAddress,
            )
            return False
        return not (self._continuations and self._continuationAnswered(response))

    def _continuationAnswered(self, response: bytes) -> bool:
        """
        Follow the upstream's continuations: each C{+} answers the oldest
        relayed IDLE or synchronising literal still owed one; a tagged reply
        instead of C{+} means the upstream does not read the literal.

        @return: C{True} if C{response} is a C{+} the client must not see
            (it sent its literal as LITERAL+).
        """
        if response.startswith(b"+"):
            owed = self._continuations.popleft()
            self._flushOutbound()
            if owed == self._awaitingContinuation:
                self._awaitingContinuation = None
                self._releaseHeld = True
                return self._awaitingKind is _Literal.CLIENT_SENDS
            return False
        tag = response.split(b" ", 1)[0]
        if tag not in self._continuations:
            return False
        self._continuations.remove(tag)
        self._flushOutbound()
        if tag == self._awaitingContinuation:
            self._awaitingContinuation = None
            self._streamingCommand = False
            self._tail = None
            # What the client sent of it anyway is dropped (the filtered
            # path drops it itself: no command assembles).
            self._refusedRest = True
            self._releaseHeld = True
            if self._awaitingKind is _Literal.CLIENT_WAITS:
                self.client.framer.cancelLiteral()
        return False

    def _drainUpstream(self) -> None:
        while self._upstreamEvents and not self._upstreamBlocked:
            self._filteredFromUpstream(self._upstreamEvents.popleft())
        if self._releaseHeld:
            # A continuation seen late (after a filter's verdict) still frees
            # what the client sent after the announcement.
            self._release()
            self.updateWatchdog()

    def _filteredFromUpstream(self, event: Event) -> None:
        if self._streamingResponse:
            self._passthroughFromUpstream(event)
            if isinstance(event, Line) and event.complete:
                self._streamingResponse = False
            return
        if isinstance(event, LiteralChunk):
            assert self._response is not None
            self._response.addLiteral(event)
            return
        if not event.continuation:
            if event.complete and self.idle.swallow(event.raw):
                return
            self._replyHandled(event.raw)
            if self._outboundWaiting and event.raw.startswith(b"+"):
                # Our own continuation dance for a buffered literal (nothing
                # else is owed a "+" meanwhile: see _flushOutbound).
                self._outboundWaiting = False
                self._flushOutbound()
                return
            if self._outboundWaiting:
                self._abandonOutbound(event.raw)
            self._response = _Assembly()
        response = self._response
        assert response is not None
        response.parts.append(event.raw)
        if event.literal is not None and event.literal > BUFFER_LIMIT:
            # Large literals (message bodies) stream past the filters.
            self._response = None
            self._streamingResponse = True
            if self._continuations:
                self._continuationAnswered(response.parts[0])  # type: ignore[arg-type]
            for index, part in enumerate(response.parts):
                self.toClient(self._baseRewrite(part) if index == 0 else part, complete=False)  # type: ignore[arg-type]
            return
        if event.literal is None:
            self._response = None
            self._deliver(response.parts)

    def _abandonOutbound(self, raw: bytes) -> None:
        """
        The upstream answered a command whose literal it was to accept with
        a tagged reply: the rest of that command is not sent.
        """
        tag = self._outbound[0].tag
        if raw.startswith(tag + b" "):
            dropped = self._outbound.popleft()
            self._outboundSize -= sum(len(part) for part, _ in dropped.parts)
            self._outboundWaiting = False
            self._flushOutbound()

    def _deliver(self, parts: list[Part]) -> None:
        first = parts[0]
        assert isinstance(first, bytes)
        if not self._answered(first):
            return
        if first.startswith(b"+"):
            self._writeResponse(parts)
            return
        parts[0] = self._baseRewrite(first)
        match = _RESPONSE_NAME.match(first)
        name = match.group(1).upper() if match else b""
        if not self.chain.wantsResponse(name):
            self._responseDelivered(parts)
            return
        try:
            response = parseResponse(parts)
        except ParseError as error:
            self._unreadableResponse(parts, first, error)
            return
        verdict = self.chain.filterResponse(self.session, response)
        if isinstance(verdict, Deferred):
            self._upstreamBlocked = True
            self.upstream.transport.pauseProducing()
            if self.watchdog is not None:
                self.watchdog.pause()
            verdict.addCallback(self._responseDecided, parts, response)
            verdict.addErrback(self._bug)
            return
        self._responseDecided(verdict, parts, response)

    def _unreadableResponse(self, parts: list[Part], first: bytes, error: ParseError) -> None:
        """
        A response the filters want but cannot read: a tagged one is
        relayed (the client needs it), an untagged one dropped, so that a
        hiding filter fails closed.
        """
        if first[:2] != b"* ":
            self._responseDelivered(parts)
            return
        match = _RESPONSE_NAME.match(first)
        self.log.warn(
            "{client}: dropped an unreadable {name} response from the upstream: {error}",
            client=self.client.clientAddress,
            name=match.group(1).decode("ascii", "replace") if match else "?",
            error=str(error),
        )

    def _responseDecided(self, verdict: Verdict, parts: list[Part], response: Any) -> None:
        if verdict is DROP and not response.tagged:
            pass
        elif isinstance(verdict, Rewrite):
            self._responseDelivered(verdict.message.toWire(), verdict.message.tag)
        else:
            self._responseDelivered(parts)
        if self._upstreamBlocked:
            self._upstreamBlocked = False
            self.upstream.transport.resumeProducing()
            if self.watchdog is not None:
                self.watchdog.resume()
            self._drainUpstream()

    def _responseDelivered(self, parts: list[Part], tag: bytes | None = None) -> None:
        self._writeResponse(parts)
        first = parts[0]
        assert isinstance(first, bytes)
        tag = tag or first.split(b" ", 1)[0]
        flight = self._inFlight.pop(tag, None)
        if flight is None:
            return
        status = first.split(b" ", 2)[1:2]
        result = status[0].decode("ascii", "replace").upper() if status else "?"
        if self._pendingSelect is not None and self._pendingSelect[0] == tag:
            if result == "OK":
                self.session.selected = self._pendingSelect[1]
            self._pendingSelect = None
        duration = time.monotonic() - flight.started
        if self._metrics is not None and flight.command is not None and flight.command.name != b"IDLE":
            self._metrics.commandDone(flight.command.fullName, duration)
        self.session.notify(
            "command",
            command=flight.command,
            result=result,
            bytesIn=self.bytesIn - flight.bytesIn,
            bytesOut=self.bytesOut - flight.bytesOutAtStart,
            duration=duration,
        )

    def _writeResponse(self, parts: list[Part]) -> None:
        self.toClient(b"".join(part for part in parts if isinstance(part, bytes)))

    def _bug(self, failure: Failure) -> None:
        self.log.failure("relay failed; closing the session", failure)
        self.client.disconnect()
