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
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.ampcodec import MAX_PENDING, BoxDecoder, BoxTooLong, LeanAMP, codecFor, encodeBox


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


class Pair:
    """
    A caller and a responder connected in memory.
    """

    def __init__(self, leanCaller: bool, leanResponder: bool) -> None:
        self.responders = Responders()
        self.responder = (LeanAMP if leanResponder else amp.AMP)(locator=self.responders)
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
        calling.addCallbacks(
            lambda result: outcome.append(("answer", result)),
            lambda failure: outcome.append(("error", (failure.type, str(failure.value)))),
        )
        self.pump.flush()
        return outcome[0] if outcome else ("pending", None)

    @property
    def dropped(self) -> bool:
        return bool(self.serverTransport.disconnecting or self.clientTransport.disconnecting)


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
            outcomes.append((outcome, pair.dropped))
            self.flushLoggedErrors()
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


class WireTests(SynchronousTestCase):
    def written(self, protocol: amp.AMP, command: type[amp.Command], **arguments: Any) -> bytes:
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.callRemote(command, **arguments)
        return transport.value()

    def test_a_lean_call_writes_the_octets_amp_writes(self) -> None:
        arguments = {"number": 12, "octets": b"\x00\xff", "text": "é", "flag": False, "ratio": 0.5, "with_dash": 3}
        self.assertEqual(
            self.written(LeanAMP(), Everything, **arguments), self.written(amp.AMP(), Everything, **arguments)
        )

    @given(st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=2000), max_size=8))
    def test_encode_box_is_amp_serialize(self, fields: dict[bytes, bytes]) -> None:
        self.assertEqual(encodeBox(fields), amp.AmpBox(fields).serialize())

    def test_encode_box_refuses_what_amp_cannot_carry(self) -> None:
        self.assertRaises(amp.TooLong, encodeBox, {b"k" * 256: b""})
        self.assertRaises(amp.TooLong, encodeBox, {b"k": b"v" * 65536})


boxes = st.lists(
    st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=700), max_size=6), min_size=1, max_size=5
)


class DecoderTests(SynchronousTestCase):
    @given(boxes, st.lists(st.integers(min_value=0, max_value=5000), max_size=6))
    def test_boxes_split_anywhere_read_as_sent(self, sent: list[dict[bytes, bytes]], cuts: list[int]) -> None:
        """However the octets are cut, the boxes read are those sent, in order."""
        octets = b"".join(amp.AmpBox(box).serialize() for box in sent)
        decoder = BoxDecoder()
        read: list[dict[bytes, bytes]] = []
        start = 0
        for cut in sorted(cut % (len(octets) + 1) for cut in cuts) + [len(octets)]:
            read += decoder.feed(octets[start:cut])
            start = cut
        self.assertEqual(read, sent)
        self.assertTrue(all(isinstance(box, amp.AmpBox) for box in read))

    def test_one_octet_at_a_time(self) -> None:
        sent = [{b"_command": b"Admit", b"_ask": b"1", b"network": b"192.0.2.1"}, {b"_answer": b"1"}]
        octets = b"".join(amp.AmpBox(box).serialize() for box in sent)
        decoder = BoxDecoder()
        read = []
        for index in range(len(octets)):
            read += decoder.feed(octets[index : index + 1])
        self.assertEqual(read, sent)

    def test_a_key_too_long_is_refused(self) -> None:
        self.assertRaises(BoxTooLong, BoxDecoder().feed, b"\x01\x00" + b"k" * 256)

    def test_a_box_that_never_ends_is_refused(self) -> None:
        """An incomplete box is held up to a bound, not without end."""
        decoder = BoxDecoder()
        value = b"\x00\x01k\xff\xff" + b"v" * 65535
        with self.assertRaises(BoxTooLong):
            for _ in range(MAX_PENDING // len(value) + 2):
                decoder.feed(value)

    def test_a_lean_amp_fed_a_key_too_long_disconnects(self) -> None:
        """As AMP does: the connection ends and says why."""
        protocol = LeanAMP()
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x01\x00" + b"k" * 256)
        self.assertTrue(transport.disconnecting)
        failures: list[Failure] = []
        pending = protocol.callRemote(Later, number=1)
        pending.addErrback(failures.append)
        protocol.connectionLost(Failure(amp.ConnectionLost()))
        self.assertTrue(failures)
        self.assertTrue(failures[0].check(amp.TooLong))
