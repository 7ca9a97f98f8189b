"""
L{mailproxy.ampcodec}: the lean AMP is Twisted's AMP on the wire.  Every
call is made four ways (lean or Twisted's caller, lean or Twisted's
responder) and must end as it does between two Twisted AMPs: the same
answer, the same error, the same octets, the same dropped connection.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.ampcodec import MAX_PENDING, BoxDecoder, LeanAMP, codecFor, encodeBox


class Everything(amp.Command):
    arguments = [
        (b"number", amp.Integer()),
        (b"octets", amp.String()),
        (b"text", amp.Unicode()),
        (b"flag", amp.Boolean()),
        (b"ratio", amp.Float()),
        (b"maybe", amp.Unicode(optional=True)),
        (b"with-dash", amp.Integer(optional=True)),
    ]
    response = arguments


class Refused(Exception):
    pass


class Fatal(Exception):
    pass


class Failing(amp.Command):
    arguments = [(b"how", amp.Unicode())]
    response = [(b"never", amp.Integer())]
    errors = {Refused: b"REFUSED"}
    fatalErrors = {Fatal: b"FATAL"}


class BadAnswer(amp.Command):
    response = [(b"number", amp.Integer())]


class Later(amp.Command):
    arguments = [(b"number", amp.Integer())]
    response = [(b"number", amp.Integer())]
    errors = {Refused: b"REFUSED"}


class Tell(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    requiresAnswer = False


class Asynchronous(amp.Command):
    arguments = [(b"number", amp.Integer())]
    response = [(b"number", amp.Integer())]


class Returned(amp.Command):
    # The responder returns a Failure of a declared error.
    errors = {Refused: b"REFUSED"}


class Relayed(amp.Command):
    # The responder passes on another peer's error, code and all.
    arguments = [(b"fatal", amp.Boolean())]


class Unwritable(amp.Command):
    # The answer cannot be written, and its error's type is declared: AMP
    # still calls it an unknown error.
    response = [(b"ratio", amp.Float())]
    errors = {ValueError: b"VALUE"}


class TellNothing(amp.Command):
    # A command wanting no answer whose responder returns no dictionary.
    requiresAnswer = False


class Strict(amp.Command):
    response = [(b"number", amp.Integer())]


class Loose(amp.Command):
    # The responder's side of Strict, answering without the number.
    commandName = b"Strict"


class Switch(amp.ProtocolSwitchCommand):
    arguments = [(b"name", amp.Unicode())]


class Inner(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Listing(amp.Command):
    # Not a simple type: AMP's own path, on either side.
    arguments = [(b"items", amp.ListOf(amp.Integer()))]
    response = [(b"total", amp.Integer())]


class Responders(amp.CommandLocator):
    def __init__(self) -> None:
        self.told: list[str] = []
        self.later: list[Deferred[dict[str, Any]]] = []

    @Everything.responder
    def everything(self, **objects: Any) -> dict[str, Any]:
        return objects

    @Failing.responder
    def failing(self, how: str) -> dict[str, Any]:
        raise {"refused": Refused("not you"), "fatal": Fatal("bye"), "other": ValueError("oops")}[how]

    @BadAnswer.responder
    def badAnswer(self) -> dict[str, Any]:
        return {"number": "not a number"}

    @Later.responder
    def laterOn(self, number: int) -> Deferred[dict[str, Any]]:
        answer: Deferred[dict[str, Any]] = Deferred()
        self.later.append(answer)
        return answer

    @Tell.responder
    def tell(self, text: str) -> dict[str, Any]:
        self.told.append(text)
        if text == "raise":
            raise ValueError("told badly")
        return {}

    @Listing.responder
    def listing(self, items: list[int]) -> dict[str, Any]:
        return {"total": sum(items)}

    @Asynchronous.responder
    async def asynchronous(self, number: int) -> dict[str, Any]:
        return {"number": number + 1}

    @Returned.responder
    def returned(self) -> Failure:
        return Failure(Refused("returned"))

    @Relayed.responder
    def relayed(self, fatal: bool) -> dict[str, Any]:
        raise amp.RemoteAmpError(b"CUSTOM", "from further away", fatal=fatal)

    @Unwritable.responder
    def unwritable(self) -> dict[str, Any]:
        return {"ratio": "not a float"}

    @TellNothing.responder
    def tellNothing(self) -> None:
        return None

    @Loose.responder
    def loose(self) -> dict[str, Any]:
        return {}

    @Switch.responder
    def switch(self, name: str) -> Protocol:
        self.inner = Inner()
        return self.inner


class Pair:
    """
    A caller and a responder connected in memory.
    """

    def __init__(self, leanCaller: bool, leanResponder: bool) -> None:
        self.responders = Responders()
        self.responder = (LeanAMP if leanResponder else amp.AMP)(locator=self.responders)
        self.leanCaller, self.leanResponder = leanCaller, leanResponder
        self.caller = (LeanAMP if leanCaller else amp.AMP)()
        self.serverTransport = makeFakeServer(self.responder)
        self.clientTransport = makeFakeClient(self.caller)
        self.pump: IOPump = connect(self.responder, self.serverTransport, self.caller, self.clientTransport)

    def call(self, command: type[amp.Command], **arguments: Any) -> tuple[str, Any]:
        """
        How the call ends: ("answer", result), ("error", (type, text)),
        ("raised", type) or ("pending", None); with the connection's state.
        """
        outcome: list[tuple[str, Any]] = []
        try:
            calling = self.caller.callRemote(command, **arguments)
        except Exception as error:
            return ("raised", type(error))
        if calling is None:
            self.pump.flush()
            return ("told", None)
        calling.addCallbacks(
            lambda result: outcome.append(("answer", result)),
            lambda failure: outcome.append(("error", (failure.type, str(failure.value)))),
        )
        self.pump.flush()
        return outcome[0] if outcome else ("pending", None)

    @property
    def dropped(self) -> bool:
        return bool(self.serverTransport.disconnecting or self.clientTransport.disconnecting)

    @property
    def droppedBy(self) -> tuple[bool, bool]:
        return bool(self.serverTransport.disconnecting), bool(self.clientTransport.disconnecting)


WAYS = [(False, False), (True, False), (False, True), (True, True)]


class Differential(SynchronousTestCase):
    def sameEverywhere(self, command: type[amp.Command], **arguments: Any) -> tuple[str, Any]:
        """
        The call ends the same four ways (and as between Twisted's AMPs).
        """
        outcomes = []
        for leanCaller, leanResponder in WAYS:
            pair = Pair(leanCaller, leanResponder)
            outcome = pair.call(command, **arguments)
            logged = sorted(failure.type.__name__ for failure in self.flushLoggedErrors())
            outcomes.append((outcome, pair.droppedBy, logged))
        self.assertEqual(outcomes, [outcomes[0]] * 4, f"Twisted, lean caller, lean responder, both: {outcomes}")
        return outcomes[0][0]


class CallsTests(Differential):
    @settings(max_examples=60, deadline=None)
    @given(
        number=st.integers(min_value=-(10**30), max_value=10**30),
        octets=st.binary(max_size=300),
        text=st.text(max_size=100),
        flag=st.booleans(),
        ratio=st.floats(allow_nan=False),
        maybe=st.one_of(st.none(), st.text(max_size=20)),
        dashed=st.one_of(st.none(), st.integers()),
    )
    def test_every_simple_type_travels_as_with_twisted_amp(self, **values: Any) -> None:
        """Each simple argument type, optional ones given or not, answers the same four ways."""
        dashed = values.pop("dashed")
        outcome = self.sameEverywhere(Everything, with_dash=dashed, **values)
        self.assertEqual(outcome[0], "answer")
        self.assertEqual(outcome[1], dict(values, with_dash=dashed))

    def test_a_declared_error_arrives_as_its_exception(self) -> None:
        """An error the command declares comes back as it, and the channel stays."""
        outcome = self.sameEverywhere(Failing, how="refused")
        self.assertEqual(outcome, ("error", (Refused, "not you")))

    def test_a_fatal_error_ends_the_connection(self) -> None:
        """A declared fatal error arrives, and the connection ends as AMP ends it."""
        self.assertEqual(self.sameEverywhere(Failing, how="fatal"), ("error", (Fatal, "bye")))
        pair = Pair(True, True)
        pair.call(Failing, how="fatal")
        self.assertTrue(pair.dropped)
        self.flushLoggedErrors()

    def test_an_undeclared_error_is_unknown_and_ends_the_connection(self) -> None:
        """Any other error is an unknown remote error, logged, and the connection ends."""
        self.assertEqual(
            self.sameEverywhere(Failing, how="other"),
            ("error", (amp.UnknownRemoteError, "Code<UNKNOWN>: Unknown Error")),
        )
        pair = Pair(False, True)
        pair.call(Failing, how="other")
        self.assertTrue(pair.dropped)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_an_answer_that_cannot_be_written_is_an_error(self) -> None:
        """A responder's answer of the wrong type is an unknown error, as with AMP."""
        outcome = self.sameEverywhere(BadAnswer)
        self.assertEqual(outcome[0], "error")
        self.assertEqual(outcome[1][0], amp.UnknownRemoteError)

    def test_a_missing_argument_fails_the_call(self) -> None:
        """A call without a required argument fails before anything is sent."""
        outcome = self.sameEverywhere(Later)
        self.assertEqual(outcome[0], "error")
        self.assertEqual(outcome[1][0], amp.InvalidSignature)

    def test_an_unknown_argument_raises(self) -> None:
        """As AMP: the call raises rather than fails."""
        self.assertEqual(self.sameEverywhere(Later, number=1, extra=2), ("raised", amp.InvalidSignature))

    def test_a_value_of_the_wrong_type_raises(self) -> None:
        self.assertEqual(self.sameEverywhere(Later, number="one")[0], "raised")

    def test_other_argument_types_take_twisted_path(self) -> None:
        """A command with a list argument still works between any two sides."""
        self.assertIsNone(codecFor(Listing))
        self.assertEqual(self.sameEverywhere(Listing, items=[1, 2, 3]), ("answer", {"total": 6}))

    def test_an_async_responder_answers(self) -> None:
        self.assertEqual(self.sameEverywhere(Asynchronous, number=1), ("answer", {"number": 2}))

    def test_a_returned_failure_of_a_declared_error_arrives_as_it(self) -> None:
        self.assertEqual(self.sameEverywhere(Returned), ("error", (Refused, "returned")))

    def test_another_peers_error_passes_on_with_its_code(self) -> None:
        """A remote error raised by a responder keeps its code; fatal or not, as it says."""
        for fatal in (False, True):
            outcome = self.sameEverywhere(Relayed, fatal=fatal)
            self.assertEqual(outcome, ("error", (amp.UnknownRemoteError, "Code<UNKNOWN>: from further away")))

    def test_an_unwritable_answer_is_unknown_even_if_its_error_is_declared(self) -> None:
        self.assertEqual(self.sameEverywhere(Unwritable)[1][0], amp.UnknownRemoteError)

    def test_an_answer_without_a_required_value_fails_the_call(self) -> None:
        self.assertEqual(self.sameEverywhere(Strict)[1][0], KeyError)

    def test_a_command_wanting_no_answer_whose_responder_returns_nothing_ends_the_connection(self) -> None:
        self.assertEqual(self.sameEverywhere(TellNothing), ("told", None))
        pair = Pair(True, True)
        pair.call(TellNothing)
        self.assertTrue(pair.dropped)
        self.assertTrue(self.flushLoggedErrors(amp.BadLocalReturn))

    def test_an_unknown_command_is_unhandled(self) -> None:
        class Nobody(amp.Command):
            arguments = [(b"number", amp.Integer())]

        outcome = self.sameEverywhere(Nobody, number=1)
        self.assertEqual(outcome[0], "error")


class DeferredAnswerTests(SynchronousTestCase):
    def test_an_answer_given_later_arrives_then(self) -> None:
        """A responder's Deferred answer is sent when it fires, on every pairing."""
        for leanCaller, leanResponder in WAYS:
            pair = Pair(leanCaller, leanResponder)
            answers: list[Any] = []
            pair.caller.callRemote(Later, number=5).addCallback(answers.append)
            pair.pump.flush()
            self.assertEqual(answers, [])
            pair.responders.later[0].callback({"number": 7})
            pair.pump.flush()
            self.assertEqual(answers, [{"number": 7}])
            self.assertFalse(pair.dropped)

    def test_a_later_declared_error_arrives_as_its_exception(self) -> None:
        for leanCaller, leanResponder in WAYS:
            pair = Pair(leanCaller, leanResponder)
            outcome: list[Any] = []
            pair.caller.callRemote(Later, number=5).addErrback(
                lambda failure, outcome=outcome: outcome.append(failure.type)
            )
            pair.pump.flush()
            pair.responders.later[0].errback(Refused("later"))
            pair.pump.flush()
            self.assertEqual(outcome, [Refused])


class TellTests(SynchronousTestCase):
    def test_a_call_without_answer_reaches_the_responder(self) -> None:
        for leanCaller, leanResponder in WAYS:
            pair = Pair(leanCaller, leanResponder)
            self.assertIsNone(pair.caller.callRemote(Tell, text="hello"))
            pair.pump.flush()
            self.assertEqual(pair.responders.told, ["hello"])
            self.assertFalse(pair.dropped)

    def test_an_error_in_a_call_without_answer_ends_the_connection(self) -> None:
        """As with AMP: nobody can be told, so it is logged and the connection ends."""
        for leanCaller, leanResponder in WAYS:
            pair = Pair(leanCaller, leanResponder)
            pair.caller.callRemote(Tell, text="raise")
            pair.pump.flush()
            self.assertTrue(pair.dropped, (leanCaller, leanResponder))
            self.assertTrue(self.flushLoggedErrors(ValueError))


class LeanPathTests(SynchronousTestCase):
    def test_lean_sides_convert_without_twisted_command_machinery(self) -> None:
        """Between two lean sides a simple command never reaches AMP's generic conversions or box parser."""

        def unused(*arguments: Any, **keywords: Any) -> Any:
            raise AssertionError("AMP's generic path was taken")

        for name in ("makeArguments", "parseArguments", "makeResponse", "parseResponse"):
            self.patch(Everything, name, classmethod(unused))
        self.patch(amp.BinaryBoxProtocol, "proto_key", unused)
        self.patch(amp.CommandLocator, "_wrapWithSerialization", unused)
        pair = Pair(True, True)
        arguments = {"number": 1, "octets": b"x", "text": "y", "flag": True, "ratio": 1.5}
        self.assertEqual(pair.call(Everything, **arguments), ("answer", dict(arguments, maybe=None, with_dash=None)))

    def test_extra_locators_answer_after_the_protocol_itself(self) -> None:
        """A lean protocol that is its own locator also finds responders in its extra locators."""
        responders = Responders()
        responder = LeanAMP()
        responder.extraLocators = (responders,)
        caller = LeanAMP()
        pump = connect(responder, makeFakeServer(responder), caller, makeFakeClient(caller))
        answers: list[Any] = []
        caller.callRemote(Listing, items=[2, 3]).addCallback(answers.append)
        caller.callRemote(Tell, text="hi")
        pump.flush()
        self.assertEqual(answers, [{"total": 5}])
        self.assertEqual(responders.told, ["hi"])


class EncodeBoxTests(SynchronousTestCase):
    @given(st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=2000), max_size=8))
    def test_encode_box_is_amp_serialize(self, fields: dict[bytes, bytes]) -> None:
        self.assertEqual(encodeBox(fields), amp.AmpBox(fields).serialize())

    def test_encode_box_refuses_what_amp_cannot_carry(self) -> None:
        self.assertRaises(amp.TooLong, encodeBox, {b"k" * 256: b""})
        self.assertRaises(amp.TooLong, encodeBox, {b"k": b"v" * 65536})


boxes = st.lists(
    st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=700), max_size=6), min_size=1, max_size=5
)


def readAll(decoder: BoxDecoder, data: bytes) -> list[amp.AmpBox]:
    decoder.feed(data)
    return list(iter(decoder.next, None))


class DecoderTests(SynchronousTestCase):
    @given(boxes, st.lists(st.integers(min_value=0, max_value=5000), max_size=6))
    def test_boxes_split_anywhere_read_as_sent(self, sent: list[dict[bytes, bytes]], cuts: list[int]) -> None:
        """However the octets are cut, the boxes read are those sent, in order."""
        octets = b"".join(amp.AmpBox(box).serialize() for box in sent)
        decoder = BoxDecoder()
        read: list[amp.AmpBox] = []
        start = 0
        for cut in sorted(cut % (len(octets) + 1) for cut in cuts) + [len(octets)]:
            read += readAll(decoder, octets[start:cut])
            start = cut
        self.assertEqual(read, sent)
        self.assertTrue(all(isinstance(box, amp.AmpBox) for box in read))
        self.assertEqual(decoder.rest(), b"")

    def test_one_octet_at_a_time(self) -> None:
        sent = [{b"_command": b"Admit", b"_ask": b"1", b"network": b"192.0.2.1"}, {b"_answer": b"1"}]
        octets = b"".join(amp.AmpBox(box).serialize() for box in sent)
        decoder = BoxDecoder()
        read = []
        for index in range(len(octets)):
            read += readAll(decoder, octets[index : index + 1])
        self.assertEqual(read, sent)

    def test_what_follows_the_boxes_is_left_for_another_protocol(self) -> None:
        decoder = BoxDecoder()
        self.assertEqual(readAll(decoder, amp.AmpBox({b"k": b"v"}).serialize() + b"\x00\x05hello"), [{b"k": b"v"}])
        self.assertEqual(decoder.rest(), b"\x00\x05hello")

    def test_a_key_too_long_is_refused_after_the_boxes_before_it(self) -> None:
        decoder = BoxDecoder()
        good = amp.AmpBox({b"k": b"v"}).serialize()
        self.assertEqual(readAll(decoder, good + b"\x01\x00" + b"k" * 256 + good), [{b"k": b"v"}])
        self.assertEqual(decoder.refusal, "a key of 256 octets")
        self.assertTrue(decoder.keyTooLong)
        self.assertEqual(readAll(decoder, good), [])

    def test_a_box_that_never_ends_is_refused(self) -> None:
        """An incomplete box is held up to a bound, not without end."""
        decoder = BoxDecoder()
        value = b"\x00\x01k\xff\xff" + b"v" * 65535
        for _ in range(MAX_PENDING // len(value) + 2):
            self.assertEqual(readAll(decoder, value), [])
        self.assertEqual(decoder.refusal, f"a box of more than {MAX_PENDING} octets")
        self.assertFalse(decoder.keyTooLong)

    def test_a_lean_amp_fed_a_key_too_long_disconnects(self) -> None:
        """As AMP does: the boxes before it are read, the connection ends and says why."""
        for kind in (amp.AMP, LeanAMP):
            responders = Responders()
            protocol = kind(locator=responders)
            transport = StringTransport()
            protocol.makeConnection(transport)
            told = Tell.makeArguments({"text": "first"}, protocol)
            told[b"_command"] = b"Tell"
            protocol.dataReceived(told.serialize() + b"\x01\x00" + b"k" * 256)
            self.assertEqual(responders.told, ["first"], kind)
            self.assertTrue(transport.disconnecting, kind)
            failures: list[Failure] = []
            pending = protocol.callRemote(Later, number=1)
            pending.addErrback(failures.append)
            protocol.connectionLost(Failure(amp.ConnectionLost()))
            self.assertTrue(failures[0].check(amp.TooLong), kind)

    def test_a_lean_amp_fed_a_box_without_end_disconnects_and_logs(self) -> None:
        protocol = LeanAMP()
        transport = StringTransport()
        protocol.makeConnection(transport)
        value = b"\x00\x01k\xff\xff" + b"v" * 65535
        for _ in range(MAX_PENDING // len(value) + 2):
            protocol.dataReceived(value)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(protocol._keyLengthLimitExceeded)


def responderOctets(kind: type[amp.AMP], request: bytes) -> tuple[bytes, bool, list[str]]:
    """
    What a responder of C{kind} writes for C{request}, whether it ends
    the connection, and the responders' record.
    """
    responders = Responders()
    protocol = kind(locator=responders)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    return transport.value(), bool(transport.disconnecting), responders.told


def request(command: bytes, ask: bytes | None = b"1", **fields: bytes) -> bytes:
    box = {b"_command": command, **{key.encode(): value for key, value in fields.items()}}
    if ask is not None:
        box[b"_ask"] = ask
    return amp.AmpBox(box).serialize()


class ResponderOctetsTests(SynchronousTestCase):
    """
    The same request octets to Twisted's AMP and to the lean one: the same
    octets back, the same end.
    """

    REQUESTS = {
        "every type": request(
            b"Everything", number=b"-3", octets=b"\xff", text="é".encode(), flag=b"True", ratio=b"0.25"
        ),
        "optional ones": request(
            b"Everything",
            number=b"1",
            octets=b"",
            text=b"",
            flag=b"False",
            ratio=b"1e+300",
            maybe=b"x",
            **{"with-dash": b"7"},
        ),
        "a bad boolean": request(b"Everything", number=b"1", octets=b"", text=b"", flag=b"maybe", ratio=b"1.0"),
        "a bad integer": request(b"Everything", number=b"one", octets=b"", text=b"", flag=b"True", ratio=b"1.0"),
        "a missing argument": request(b"Everything", number=b"1"),
        "a declared error": request(b"Failing", how=b"refused"),
        "a fatal error": request(b"Failing", how=b"fatal"),
        "an unknown error": request(b"Failing", how=b"other"),
        "an unwritable answer": request(b"BadAnswer"),
        "a declared type, unwritable": request(b"Unwritable"),
        "a returned failure": request(b"Returned"),
        "a relayed error": request(b"Relayed", fatal=b"False"),
        "a relayed fatal error": request(b"Relayed", fatal=b"True"),
        "an async answer": request(b"Asynchronous", number=b"41"),
        "a tell, then a question": request(b"Tell", None, text=b"hi") + request(b"Listing", b"2", items=b"\x00\x011"),
        "a tell that fails": request(b"Tell", None, text=b"raise"),
        "a tell answered by nothing": request(b"TellNothing", None),
        "an unknown command": request(b"Nobody", number=b"1"),
        "two in one read": request(b"Asynchronous", b"1", number=b"1") + request(b"Asynchronous", b"2", number=b"2"),
    }

    def test_every_request_gets_the_octets_amp_writes(self) -> None:
        for name, octets in self.REQUESTS.items():
            twisted = responderOctets(amp.AMP, octets)
            logged = sorted(failure.type.__name__ for failure in self.flushLoggedErrors())
            lean = responderOctets(LeanAMP, octets)
            self.assertEqual(lean, twisted, name)
            self.assertEqual(sorted(failure.type.__name__ for failure in self.flushLoggedErrors()), logged, name)


class CallerOctetsTests(SynchronousTestCase):
    def written(self, protocol: amp.AMP) -> bytes:
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.callRemote(Tell, text="first")
        protocol.callRemote(Everything, number=12, octets=b"\x00\xff", text="é", flag=False, ratio=0.5, with_dash=3)
        protocol.callRemote(Everything, number=1, octets=b"", text="", flag=True, ratio=-0.0, maybe=None)
        protocol.callRemote(Listing, items=[1])
        return transport.value()

    def test_calls_write_the_octets_amp_writes(self) -> None:
        """Tags included: a command wanting no answer takes one, as in AMP."""
        self.assertEqual(self.written(LeanAMP()), self.written(amp.AMP()))

    def test_a_lost_connection_fails_the_calls_waiting(self) -> None:
        for kind in (amp.AMP, LeanAMP):
            protocol = kind()
            protocol.makeConnection(StringTransport())
            failures: list[Failure] = []
            protocol.callRemote(Later, number=1).addErrback(failures.append)
            protocol.connectionLost(Failure(amp.ConnectionLost("gone")))
            self.assertEqual([failure.type for failure in failures], [amp.ConnectionLost], kind)


class SwitchTests(SynchronousTestCase):
    """
    LeanAMP switches protocols as AMP does (it never does so itself, but a
    caller may): what follows the switch in the same read is the new
    protocol's.
    """

    def test_a_responder_hands_what_follows_to_the_new_protocol(self) -> None:
        for kind in (amp.AMP, LeanAMP):
            responders = Responders()
            protocol = kind(locator=responders)
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(request(b"Switch", name=b"inner") + b"\x00\x05hello")
            self.assertEqual(responders.inner.received, b"\x00\x05hello", kind)

    def test_a_caller_hands_what_follows_the_answer_to_the_new_protocol(self) -> None:
        for kind in (amp.AMP, LeanAMP):
            inner = Inner()
            protocol = kind()
            protocol.makeConnection(StringTransport())
            protocol.callRemote(Switch, Factory.forProtocol(lambda inner=inner: inner), name="inner")
            protocol.dataReceived(amp.AmpBox({b"_answer": b"1"}).serialize() + b"\x00\x05hello more")
            self.assertEqual(inner.received, b"\x00\x05hello more", kind)
            protocol.dataReceived(b" later")
            self.assertEqual(inner.received, b"\x00\x05hello more later", kind)


class LocatorTests(SynchronousTestCase):
    def test_boxes_go_to_the_box_receiver_given(self) -> None:
        for kind in (amp.AMP, LeanAMP):
            received: list[dict[bytes, bytes]] = []

            class Receiver(amp.BoxDispatcher):
                def ampBoxReceived(self, box: amp.AmpBox) -> None:
                    self.received.append(dict(box))

            receiver = Receiver(amp.CommandLocator())
            receiver.received = received
            protocol = kind(boxReceiver=receiver)
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(request(b"Tell", None, text=b"x"))
            self.assertEqual(received, [{b"_command": b"Tell", b"text": b"x"}], kind)

    def test_a_locator_that_decides_for_itself_is_asked(self) -> None:
        """A locator overriding locateResponder (refusing while it drains, say) decides, as with AMP."""
        for kind in (amp.AMP, LeanAMP):

            class Draining(Responders):
                def locateResponder(self, name: bytes) -> Any:
                    return None if name == b"Everything" else super().locateResponder(name)

            protocol = kind(locator=Draining())
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(request(b"Everything", number=b"1", octets=b"", text=b"", flag=b"True", ratio=b"1.0"))
            self.assertIn(b"UNHANDLED", transport.value(), kind)

    def test_the_protocol_answers_before_its_extra_locators(self) -> None:
        class Own(LeanAMP):
            @Tell.responder
            def tell(self, text: str) -> dict[str, Any]:
                self.told = text
                return {}

        responders = Responders()
        protocol = Own()
        protocol.extraLocators = (responders,)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(request(b"Tell", None, text=b"mine"))
        self.assertEqual((protocol.told, responders.told), ("mine", []))
