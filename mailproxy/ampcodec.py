# -*- test-case-name: tests.test_ampcodec -*-
"""
AMP without Twisted's general machinery for the commands the supervisor
and its workers exchange on every login.

Twisted's L{amp.AMP} reads a box a key and a value at a time through a
state machine, and converts each command's arguments and answer through
several layers of generic calls and L{Deferred}s.  With workers, a login
makes four calls to the supervisor, and that machinery cost the supervisor
more instructions than the login's relaying cost the worker.
L{LeanAMP} is the same protocol on the wire (a peer running Twisted's
AMP sees the same octets and the same answers and errors), with:

  - L{BoxDecoder}: whole boxes read from a buffer in one loop;
  - L{encodeBox}: a box written as L{amp.AmpBox.serialize} writes it;
  - L{CommandCodec}: a command's arguments and answer converted by a table
    made once per command, for plain commands (L{codecFor}) whose
    arguments are of the simple types (L{amp.Integer}, L{amp.String},
    L{amp.Unicode}, L{amp.Boolean}, L{amp.Float}), with AMP's own
    conversions; any other command takes AMP's path;
  - calls and answers that go straight to the responder method and back,
    for locators that find responders as Twisted's do.

One deliberate difference: an incomplete box may hold at most
L{MAX_PENDING} octets (AMP holds any), so that a broken peer cannot grow
the buffer without end.

It relies on private parts of Twisted's AMP: C{_nextTag},
C{_outstandingRequests}, C{_failAllReason}, C{_commandReceived},
C{_commandDispatch}, C{_switchTo} and C{recvd}, C{innerProtocol},
C{_justStartedTLS}, C{_keyLengthLimitExceeded} and
C{_wireNameToPythonIdentifier}; the tests hold it to Twisted's AMP in both
directions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from struct import pack
from types import CoroutineType, MethodType
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

log = Logger()

_END = b"\x00\x00"
# An incomplete box past this many octets ends the channel: no box the
# supervisor and workers send comes near it (the longest is a page of
# 60,000 octets, see L{mailproxy.workerprotocol.PAGE}).
MAX_PENDING = 256 * 1024


class BoxDecoder:
    """
    Octets in (L{feed}), whole boxes out (L{next}), sans-IO.

    @ivar refusal: why the octets cannot be read on (a key longer than AMP
        allows, or a box over L{MAX_PENDING} octets), once they cannot.
    @ivar keyTooLong: whether the refusal is AMP's own (a key too long).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._start = 0
        self.refusal: str | None = None
        self.keyTooLong = False

    def feed(self, data: bytes) -> None:
        if self._start:
            self._buffer = self._buffer[self._start :]
            self._start = 0
        self._buffer = self._buffer + data if self._buffer else data

    def next(self) -> amp.AmpBox | None:
        """
        The next whole box, or C{None} when there is none yet (or, after a
        L{refusal}, ever).
        """
        if self.refusal is not None:
            return None
        buffer = self._buffer
        end = len(buffer)
        box = _newBox()
        position = self._start
        while position + 2 <= end:
            keyLength = buffer[position] << 8 | buffer[position + 1]
            if not keyLength:
                self._start = position + 2
                return box
            if keyLength > amp.MAX_KEY_LENGTH:
                self.refusal, self.keyTooLong = f"a key of {keyLength} octets", True
                return None
            valueAt = position + 2 + keyLength
            if valueAt + 2 > end:
                break
            valueEnd = valueAt + 2 + (buffer[valueAt] << 8 | buffer[valueAt + 1])
            if valueEnd > end:
                break
            box[buffer[position + 2 : valueAt]] = buffer[valueAt + 2 : valueEnd]
            position = valueEnd
        if end - self._start > MAX_PENDING:
            self.refusal = f"a box of more than {MAX_PENDING} octets"
        return None

    def rest(self) -> bytes:
        """
        Take what has not been read as boxes (for the protocol switched to).
        """
        rest = self._buffer[self._start :]
        self._buffer, self._start = b"", 0
        return rest


def _newBox() -> amp.AmpBox:
    # An empty AmpBox without its __init__, which looks for text keys.
    box: amp.AmpBox = dict.__new__(amp.AmpBox)
    return box


def encodeBox(fields: dict[bytes, bytes]) -> bytes:
    """
    The octets of a box, as L{amp.AmpBox.serialize} writes them.

    @raise amp.TooLong: for a key or value longer than AMP allows.
    """
    parts: list[bytes] = []
    for key in sorted(fields):
        value = fields[key]
        if len(key) > amp.MAX_KEY_LENGTH:
            raise amp.TooLong(True, True, key, None)
        if len(value) > amp.MAX_VALUE_LENGTH:
            raise amp.TooLong(False, True, value, key)
        parts += (pack("!H", len(key)), key, pack("!H", len(value)), value)
    parts.append(_END)
    return b"".join(parts)


def _floatToWire(value: float) -> bytes:
    if not isinstance(value, float):
        raise ValueError(f"Bad float value {value!r}")
    return str(value).encode("ascii")


def _booleanFromWire(value: bytes) -> bool:
    if value == b"True":
        return True
    if value == b"False":
        return False
    raise TypeError(f"Bad boolean value: {value!r}")


# AMP's own conversions (amp.Integer.toString and so on), by exact type:
# a subclass may convert otherwise and takes AMP's path.
_CONVERSIONS: dict[type[amp.Argument], tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    amp.Integer: (lambda value: b"%d" % (value,), int),
    amp.String: (lambda value: value, lambda value: value),
    amp.Unicode: (lambda value: value.encode("utf-8"), lambda value: value.decode("utf-8")),
    amp.Boolean: (lambda value: b"True" if value else b"False", _booleanFromWire),
    amp.Float: (_floatToWire, float),
}


@dataclass(frozen=True)
class _Field:
    wireName: bytes
    name: str
    optional: bool
    toWire: Callable[[Any], bytes]
    fromWire: Callable[[bytes], Any]


def _fields(schema: Sequence[tuple[bytes, amp.Argument]]) -> tuple[_Field, ...] | None:
    fields = []
    for wireName, argument in schema:
        conversions = _CONVERSIONS.get(type(argument))
        if conversions is None:
            return None
        name = amp._wireNameToPythonIdentifier(wireName)
        fields.append(_Field(wireName, name, argument.optional, *conversions))
    return tuple(fields)


def _encode(fields: tuple[_Field, ...], objects: dict[str, Any]) -> dict[bytes, bytes]:
    if not isinstance(objects, dict):
        raise TypeError(f"{objects!r} is not a dictionary of values")
    box = {}
    for field in fields:
        value = objects.get(field.name)
        if value is not None or not field.optional:
            box[field.wireName] = field.toWire(value)
    return box


def _decode(fields: tuple[_Field, ...], box: dict[bytes, bytes]) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for field in fields:
        value = box.get(field.wireName)
        if value is None:
            if not field.optional:
                raise KeyError(field.wireName)
            objects[field.name] = None
        else:
            objects[field.name] = field.fromWire(value)
    return objects


@dataclass(frozen=True)
class CommandCodec:
    """
    How one command's arguments and answer go to and from the wire.
    """

    command: type[amp.Command]
    arguments: tuple[_Field, ...]
    response: tuple[_Field, ...]

    @cached_property
    def _names(self) -> frozenset[str]:
        return frozenset(field.name for field in self.arguments)

    @cached_property
    def _required(self) -> frozenset[str]:
        return frozenset(field.name for field in self.arguments if not field.optional)

    def forgotten(self, objects: dict[str, Any]) -> amp.InvalidSignature | None:
        """
        The error AMP gives a call missing required arguments (a failed
        call), if it is.
        """
        if self._required.issubset(objects):
            return None
        missing = [field.name for field in self.arguments if not field.optional and field.name not in objects]
        return amp.InvalidSignature(f"forgot {', '.join(missing)} for {self.command.commandName!r}")

    def encodeArguments(self, objects: dict[str, Any]) -> dict[bytes, bytes]:
        """
        @raise amp.InvalidSignature: for an argument the command does not
            have (which AMP raises rather than fails the call with).
        """
        if not self._names.issuperset(objects):
            unknown = next(name for name in objects if name not in self._names)
            raise amp.InvalidSignature(f"{unknown} is not a valid argument")
        return _encode(self.arguments, objects)

    def decodeArguments(self, box: dict[bytes, bytes]) -> dict[str, Any]:
        return _decode(self.arguments, box)

    def encodeResponse(self, objects: dict[str, Any]) -> dict[bytes, bytes]:
        return _encode(self.response, objects)

    def decodeResponse(self, box: dict[bytes, bytes]) -> dict[str, Any]:
        return _decode(self.response, box)

    def remoteError(self, failure: Failure) -> Failure:
        """
        An error answer as the exception the command declares for its code
        (what L{amp.AMP.callRemote} gives).
        """
        failure.trap(amp.RemoteAmpError)
        error = failure.value
        command: Any = self.command
        errorType = command.reverseErrors.get(error.errorCode, amp.UnknownRemoteError)
        return Failure(errorType(error.description))


_codecs: dict[type[amp.Command], CommandCodec | None] = {}
_COMMAND_CLASSMETHODS = ("makeArguments", "parseArguments", "makeResponse", "parseResponse")


def _isPlain(command: type[amp.Command]) -> bool:
    """
    Whether C{command} is sent, answered and converted as L{amp.Command}
    does it (no protocol switch, no TLS, no conversions of its own).
    """
    if issubclass(command, (amp.ProtocolSwitchCommand, amp.StartTLS)):
        return False
    plain: Any = amp.Command
    if command.commandType is not amp.AmpBox or command.responseType is not amp.AmpBox:
        return False
    if command.__init__ is not plain.__init__ or command._doCommand is not plain._doCommand:
        return False
    return all(getattr(command, name).__func__ is getattr(plain, name).__func__ for name in _COMMAND_CLASSMETHODS)


def codecFor(command: type[amp.Command]) -> CommandCodec | None:
    """
    The codec of C{command}, or C{None} if it is not plain (L{_isPlain}) or
    one of its arguments or answers is not of a simple type.
    """
    try:
        return _codecs[command]
    except KeyError:
        pass
    codec = None
    if _isPlain(command):
        arguments, response = _fields(command.arguments), _fields(command.response)
        if arguments is not None and response is not None:
            codec = CommandCodec(command, arguments, response)
    _codecs[command] = codec
    return codec


class LeanAMP(amp.AMP):
    """
    L{amp.AMP} with the lean paths above; anything else (other commands,
    commands answered by C{amp_} methods or found by a locator of its own
    kind) takes AMP's own.

    @ivar extraLocators: where responders are looked for after this
        protocol itself, when it is its own locator.
    """

    extraLocators: tuple[amp.CommandLocator, ...] = ()
    _refused = False

    def __init__(self, *arguments: Any, **keywords: Any) -> None:
        super().__init__(*arguments, **keywords)
        self._decoder = BoxDecoder()
        self._responders: dict[bytes, tuple[CommandCodec, Callable[..., Any]]] = {}

    def locateResponder(self, name: bytes) -> Any:
        found = super().locateResponder(name)
        for locator in self.extraLocators:
            if found is not None:
                break
            found = locator.locateResponder(name)
        return found

    # Reading

    def dataReceived(self, data: bytes) -> None:
        self._justStartedTLS = False
        if self.innerProtocol is not None:
            self.innerProtocol.dataReceived(data)
            return
        decoder = self._decoder
        decoder.feed(data)
        # A box at a time: one may switch the protocol (see _switchTo).
        while self.innerProtocol is None:
            box = decoder.next()
            if box is None:
                break
            self.boxReceiver.ampBoxReceived(box)
        if decoder.refusal is not None and self.transport is not None and not self._refused:
            self._refused = True
            if decoder.keyTooLong:
                # As AMP: the calls still waiting fail with amp.TooLong.
                self._keyLengthLimitExceeded = True
            else:
                log.error("AMP channel closed: its peer sent {what}", what=decoder.refusal)
            self.transport.loseConnection()

    def _switchTo(self, newProto: Any, clientFactory: Any = None) -> None:
        # AMP hands what it has not read to the new protocol from recvd.
        self.recvd = self._decoder.rest()
        super()._switchTo(newProto, clientFactory)

    # Calling

    def callRemote(self, commandType: Any, *arguments: Any, **keywords: Any) -> Any:
        codec = codecFor(commandType)
        if codec is None or arguments or self._failAllReason is not None:
            return super().callRemote(commandType, *arguments, **keywords)
        forgotten = codec.forgotten(keywords)
        if forgotten is not None:
            return fail(forgotten)
        fields = codec.encodeArguments(keywords)
        fields[amp.COMMAND] = commandType.commandName
        # A tag for every command, as AMP takes one: the same octets.
        tag = self._nextTag()
        if commandType.requiresAnswer:
            fields[amp.ASK] = tag
        self.sendFields(fields)
        if not commandType.requiresAnswer:
            return None
        answer: Deferred[Any] = Deferred()
        outstanding: dict[bytes, Deferred[Any]] = self._outstandingRequests  # type: ignore[assignment]
        outstanding[tag] = answer
        return answer.addCallbacks(codec.decodeResponse, codec.remoteError)

    def sendFields(self, fields: dict[bytes, bytes]) -> None:
        """
        Send a box given as a dictionary.
        """
        self.sendBox(amp.AmpBox(fields))

    # Answering

    def _commandReceived(self, box: amp.AmpBox) -> None:
        name = box[amp.COMMAND]
        found = self._responders.get(name) or self._leanResponder(name)
        if found is None:
            super()._commandReceived(box)
            return
        codec, method = found
        try:
            objects = codec.decodeArguments(box)
        except Exception:
            # AMP answers a malformed box its own way.
            super()._commandReceived(box)
            return
        # What maybeDeferred makes of the responder's result.
        try:
            result = method(**objects)
        except BaseException:
            result = fail()
        else:
            if isinstance(result, Failure):
                result = fail(result)
            elif type(result) is CoroutineType:
                result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            result.addCallbacks(self._answer, self._answerFailed, callbackArgs=(box, codec), errbackArgs=(box, codec))
            result.addErrback(self.unhandledError)
            return
        try:
            self._answer(result, box, codec)
        except BaseException:
            # A box that cannot be written (amp.TooLong): as AMP, the end.
            self.unhandledError(Failure())

    def _leanResponder(self, name: bytes) -> tuple[CommandCodec, Callable[..., Any]] | None:
        locators = (self.locator, *self.extraLocators) if self.locator is self else (self.locator,)
        for locator in locators:
            if type(locator).locateResponder not in _TWISTED_LOOKUPS:
                # A locator that decides for itself: AMP's path asks it.
                return None
            dispatch = getattr(locator, "_commandDispatch", {})
            if name in dispatch:
                command, function = dispatch[name]
                codec = codecFor(command)
                if codec is None:
                    return None
                found = self._responders[name] = (codec, MethodType(function, locator))
                return found
            if isinstance(locator, amp.SimpleStringLocator) and amp.SimpleStringLocator.locateResponder(locator, name):
                # An amp_ method answers it: AMP's path.
                return None
        return None

    def _answer(self, objects: Any, box: amp.AmpBox, codec: CommandCodec) -> None:
        try:
            fields = codec.encodeResponse(objects)
        except BaseException:
            unwritable = amp.BadLocalReturn(f"{codec.command.__name__} could not write {objects!r}", Failure())
            self._answerFailed(Failure(unwritable), box, codec)
            return
        if amp.ASK in box:
            fields[amp.ANSWER] = box[amp.ASK]
            self._emit(fields)

    def _answerFailed(self, failure: Failure, box: amp.AmpBox, codec: CommandCodec) -> None:
        """
        As AMP answers an error: with the code the command declares for it,
        or a remote error's own, or as an unknown error (logged) that ends
        the connection; a command that wants no answer ends the connection
        on any error, logged.
        """
        command: Any = codec.command
        errors = command.allErrors
        known = failure.check(*errors)
        if amp.ASK not in box:
            self.unhandledError(failure)
            return
        if known is not None:
            code, fatal = errors[known], known in command.fatalErrors
            description = str(failure.value).encode("utf-8", "replace")
        elif failure.check(amp.RemoteAmpError):
            code, fatal, description = failure.value.errorCode, failure.value.fatal, failure.value.description
            if isinstance(description, str):
                description = description.encode("utf-8", "replace")
        else:
            log.failure("while answering {command}", failure, command=box[amp.COMMAND].decode("ascii", "replace"))
            code, description, fatal = amp.UNKNOWN_ERROR_CODE, b"Unknown Error", True
        self._emit({amp.ERROR: box[amp.ASK], amp.ERROR_CODE: code, amp.ERROR_DESCRIPTION: description})
        if fatal and self.transport is not None:
            self.transport.loseConnection()

    def _emit(self, fields: dict[bytes, bytes]) -> None:
        try:
            self.sendFields(fields)
        except (amp.ProtocolSwitched, amp.ConnectionLost):
            pass


# Twisted's ways of finding a responder, which the lean path follows.
_TWISTED_LOOKUPS = (amp.CommandLocator.locateResponder, amp.AMP.locateResponder, LeanAMP.locateResponder)
