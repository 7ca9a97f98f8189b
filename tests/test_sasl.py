"""
The sans-IO SASL exchanges (PLAIN and LOGIN) both front ends use.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.sasl import (
    MAX_RESPONSE,
    MECHANISMS,
    Challenge,
    Credentials,
    LoginExchange,
    PlainExchange,
    Refusal,
    SASLError,
    SASLExchange,
    Stage,
    exchangeFor,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(authorizationId: bytes, username: bytes, password: bytes) -> bytes:
    return b64(authorizationId + b"\0" + username + b"\0" + password)


def refused(error: SASLError) -> Refusal:
    return Refusal(error)


# -- choosing a mechanism --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [(b"PLAIN", PlainExchange), (b"plain", PlainExchange), (b"LOGIN", LoginExchange), (b"LoGiN", LoginExchange)],
)
def test_mechanism_names_are_case_insensitive(name: bytes, kind: type[SASLExchange]) -> None:
    exchange = exchangeFor(name)
    assert isinstance(exchange, kind)
    assert exchange.stage is Stage.NOT_STARTED


@pytest.mark.parametrize("name", [b"CRAM-MD5", b"XOAUTH2", b"", b"PLAIN ", b"LOGIN\0", b"\xff"])
def test_other_mechanisms_are_not_offered(name: bytes) -> None:
    assert exchangeFor(name) is None


def test_mechanisms_are_offered_plain_first() -> None:
    assert list(MECHANISMS) == [b"PLAIN", b"LOGIN"]
    assert PlainExchange.mechanism == "PLAIN" and LoginExchange.mechanism == "LOGIN"


def test_each_exchange_is_new() -> None:
    assert exchangeFor(b"LOGIN") is not exchangeFor(b"LOGIN")


# -- PLAIN -------------------------------------------------------------------------


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    exchange = PlainExchange()
    step = exchange.start(None)
    assert step == Challenge(b"") and step.wire == b""
    assert exchange.stage is Stage.AWAITING_RESPONSE
    assert exchange.respond(plain(b"", b"alice", b"alicepw")) == Credentials(b"alice", b"alicepw")
    assert exchange.stage is Stage.FINISHED


def test_plain_initial_response_gives_credentials_at_once() -> None:
    exchange = PlainExchange()
    assert exchange.start(plain(b"", b"alice", b"pw")) == Credentials(b"alice", b"pw")
    assert exchange.stage is Stage.FINISHED


def test_plain_authorization_identity_may_be_the_users_own() -> None:
    assert PlainExchange().start(plain(b"alice", b"alice", b"pw")) == Credentials(b"alice", b"pw")


def test_plain_refuses_to_act_as_another_user() -> None:
    assert PlainExchange().start(plain(b"bob", b"alice", b"pw")) == refused(SASLError.OTHER_AUTHORIZATION)


@pytest.mark.parametrize(
    "decoded",
    [b"", b"alice", b"\0alice", b"alice\0pw", b"\0alice\0pw\0", b"a\0b\0c\0d", b"\0\0\0"],
)
def test_plain_needs_exactly_three_fields(decoded: bytes) -> None:
    assert PlainExchange().start(b64(decoded)) == refused(SASLError.MALFORMED_PLAIN)
    exchange = PlainExchange()
    exchange.start(None)
    assert exchange.respond(b64(decoded)) == refused(SASLError.MALFORMED_PLAIN)


def test_plain_empty_initial_response_is_malformed() -> None:
    """'=' is an empty response, which is no PLAIN message."""
    assert PlainExchange().start(b"=") == refused(SASLError.MALFORMED_PLAIN)


def test_plain_empty_continuation_is_malformed() -> None:
    exchange = PlainExchange()
    exchange.start(None)
    assert exchange.respond(b"") == refused(SASLError.MALFORMED_PLAIN)


def test_plain_refuses_an_empty_user_name() -> None:
    assert PlainExchange().start(plain(b"", b"", b"pw")) == refused(SASLError.EMPTY_USER)


def test_plain_refuses_a_user_name_that_is_not_utf8() -> None:
    assert PlainExchange().start(plain(b"", b"al\xffice", b"pw")) == refused(SASLError.USER_NOT_UTF8)
    assert PlainExchange().start(plain(b"", b"\xc3", b"pw")) == refused(SASLError.USER_NOT_UTF8)


def test_plain_passes_any_password_bytes_on() -> None:
    """Passwords are checked as sent: 8-bit, not UTF-8, empty, with spaces."""
    for password in (b"\xff\xfe", "pässwörd".encode(), b"", b" a b ", "pässwörd".encode("latin-1")):
        assert PlainExchange().start(plain(b"", b"alice", password)) == Credentials(b"alice", password)


def test_plain_accepts_utf8_user_names() -> None:
    name = "jürgen@例え.jp".encode()
    assert PlainExchange().start(plain(b"", name, b"pw")) == Credentials(name, b"pw")


# -- LOGIN -------------------------------------------------------------------------


def test_login_asks_for_the_user_name_then_the_password() -> None:
    exchange = LoginExchange()
    step = exchange.start(None)
    assert step == Challenge(b"Username:") and step.wire == b"VXNlcm5hbWU6"
    assert exchange.stage is Stage.AWAITING_USERNAME
    step = exchange.respond(b64(b"alice"))
    assert step == Challenge(b"Password:") and step.wire == b"UGFzc3dvcmQ6"
    assert exchange.stage is Stage.AWAITING_PASSWORD
    assert exchange.respond(b64(b"alicepw")) == Credentials(b"alice", b"alicepw")
    assert exchange.stage is Stage.FINISHED


def test_login_initial_response_is_the_user_name() -> None:
    exchange = LoginExchange()
    assert exchange.start(b64(b"alice")) == Challenge(b"Password:")
    assert exchange.respond(b64(b"pw")) == Credentials(b"alice", b"pw")


def test_login_empty_initial_response_asks_for_the_user_name() -> None:
    """'=' counts as no initial response, as Dovecot takes it."""
    exchange = LoginExchange()
    assert exchange.start(b"=") == Challenge(b"Username:")
    assert exchange.stage is Stage.AWAITING_USERNAME
    assert exchange.respond(b64(b"alice")) == Challenge(b"Password:")


def test_login_refuses_an_empty_user_name() -> None:
    exchange = LoginExchange()
    exchange.start(None)
    assert exchange.respond(b"") == refused(SASLError.EMPTY_USER)
    assert exchange.stage is Stage.FINISHED


def test_login_empty_password_is_passed_on() -> None:
    """An empty password is a (wrong) password, for the login path to refuse."""
    exchange = LoginExchange()
    exchange.start(b64(b"alice"))
    assert exchange.respond(b"") == Credentials(b"alice", b"")


@pytest.mark.parametrize("name", [b"al\0ice", b"\0", b"alice\0", b"\0alice\0pw"])
def test_login_refuses_nul_in_the_user_name(name: bytes) -> None:
    assert LoginExchange().start(b64(name)) == refused(SASLError.NUL_IN_LOGIN)
    exchange = LoginExchange()
    exchange.start(None)
    assert exchange.respond(b64(name)) == refused(SASLError.NUL_IN_LOGIN)


@pytest.mark.parametrize("password", [b"pw\0", b"\0", b"p\0w", b"\0alice\0pw"])
def test_login_refuses_nul_in_the_password(password: bytes) -> None:
    exchange = LoginExchange()
    exchange.start(b64(b"alice"))
    assert exchange.respond(b64(password)) == refused(SASLError.NUL_IN_LOGIN)
    assert exchange.stage is Stage.FINISHED


def test_login_refuses_a_user_name_that_is_not_utf8() -> None:
    assert LoginExchange().start(b64(b"\xff\xfe")) == refused(SASLError.USER_NOT_UTF8)
    exchange = LoginExchange()
    exchange.start(None)
    assert exchange.respond(b64(b"caf\xe9")) == refused(SASLError.USER_NOT_UTF8)


def test_login_passes_any_password_bytes_on() -> None:
    exchange = LoginExchange()
    exchange.start(b64("jürgen".encode()))
    assert exchange.respond(b64(b"caf\xe9 \xff")) == Credentials("jürgen".encode(), b"caf\xe9 \xff")


# -- what both share: cancel, base64, sizes ------------------------------------------


def startedAt(mechanism: str, stage: Stage) -> SASLExchange:
    """
    An exchange of C{mechanism} waiting in C{stage}.
    """
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    exchange.start(None)
    if stage is Stage.AWAITING_PASSWORD:
        exchange.respond(b64(b"alice"))
    assert exchange.stage is stage
    return exchange


WAITING = [
    ("PLAIN", Stage.AWAITING_RESPONSE),
    ("LOGIN", Stage.AWAITING_USERNAME),
    ("LOGIN", Stage.AWAITING_PASSWORD),
]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_star_as_initial_response_cancels(mechanism: str) -> None:
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    assert exchange.start(b"*") == refused(SASLError.CANCELLED)
    assert exchange.stage is Stage.FINISHED


@pytest.mark.parametrize(("mechanism", "stage"), WAITING)
@pytest.mark.parametrize("response", [b"*", b" *", b"*\t", b"* "])
def test_star_cancels_at_every_step(mechanism: str, stage: Stage, response: bytes) -> None:
    exchange = startedAt(mechanism, stage)
    assert exchange.respond(response) == refused(SASLError.CANCELLED)
    assert exchange.stage is Stage.FINISHED


@pytest.mark.parametrize(("mechanism", "stage"), WAITING)
@pytest.mark.parametrize(
    "response",
    [b"!!!", b"=", b"YWJ", b"YW=J", b"YWJj=", b"YWJj====", b"YR==", b"YW Jj", b"YWJj\0", b"**", b"\xff", b"-_-_"],
)
def test_invalid_base64_is_refused_at_every_step(mechanism: str, stage: Stage, response: bytes) -> None:
    exchange = startedAt(mechanism, stage)
    assert exchange.respond(response) == refused(SASLError.INVALID_BASE64)
    assert exchange.stage is Stage.FINISHED


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("response", [b"!!!", b"YWJ", b"==", b"\xc3\xa9"])
def test_invalid_base64_initial_response_is_refused(mechanism: str, response: bytes) -> None:
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    assert exchange.start(response) == refused(SASLError.INVALID_BASE64)


def test_surrounding_white_space_is_ignored() -> None:
    exchange = LoginExchange()
    assert exchange.start(b" " + b64(b"alice") + b"\t") == Challenge(b"Password:")
    assert exchange.respond(b64(b"pw") + b"  ") == Credentials(b"alice", b"pw")


@pytest.mark.parametrize(("mechanism", "stage"), WAITING)
def test_responses_over_the_limit_are_refused_at_every_step(mechanism: str, stage: Stage) -> None:
    exchange = startedAt(mechanism, stage)
    assert exchange.respond(b"A" * (MAX_RESPONSE + 4)) == refused(SASLError.TOO_LONG)
    assert exchange.stage is Stage.FINISHED


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_initial_responses_over_the_limit_are_refused(mechanism: str) -> None:
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    assert exchange.start(b"A" * (MAX_RESPONSE + 4)) == refused(SASLError.TOO_LONG)


def test_a_response_at_the_limit_is_taken() -> None:
    """A 48 KB PLAIN message (64 KB of base64) is still read."""
    password = b"p" * (MAX_RESPONSE // 4 * 3 - len(b"\0alice\0"))
    response = plain(b"", b"alice", password)
    assert len(response) == MAX_RESPONSE
    assert PlainExchange().start(response) == Credentials(b"alice", password)


# -- misuse by the caller ----------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_responding_before_the_start_is_a_bug(mechanism: str) -> None:
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    with pytest.raises(RuntimeError):
        exchange.respond(b64(b"alice"))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starting_twice_is_a_bug(mechanism: str) -> None:
    exchange = exchangeFor(mechanism.encode())
    assert exchange is not None
    exchange.start(None)
    with pytest.raises(RuntimeError):
        exchange.start(None)


@pytest.mark.parametrize(
    "finish",
    [
        lambda: (PlainExchange(), b"*", None),
        lambda: (PlainExchange(), plain(b"", b"alice", b"pw"), None),
        lambda: (LoginExchange(), b"!!!", None),
        lambda: (LoginExchange(), b64(b"alice"), b64(b"pw")),
    ],
)
def test_responding_after_the_end_is_a_bug(finish: object) -> None:
    exchange, initial, response = finish()  # type: ignore[operator]
    step = exchange.start(initial)
    if response is not None:
        step = exchange.respond(response)
    assert not isinstance(step, Challenge)
    with pytest.raises(RuntimeError):
        exchange.respond(b64(b"again"))


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials(b"alice", b"s3cret-pw")
    assert "s3cret-pw" not in repr(credentials) and "s3cret-pw" not in str(credentials)
    assert "alice" in repr(credentials)


def test_refusals_tell_the_client_in_ascii() -> None:
    for error in SASLError:
        assert Refusal(error).text == error.value
        assert error.value.encode("ascii")


# -- properties ----------------------------------------------------------------------


@given(st.binary(max_size=64), st.lists(st.binary(max_size=64), max_size=4), st.sampled_from([b"PLAIN", b"LOGIN"]))
def test_any_input_ends_in_a_step_and_never_raises(initial: bytes, responses: list[bytes], mechanism: bytes) -> None:
    exchange = exchangeFor(mechanism)
    assert exchange is not None
    step = exchange.start(initial)
    for response in responses:
        if not isinstance(step, Challenge):
            break
        step = exchange.respond(response)
    assert isinstance(step, Challenge | Credentials | Refusal)
    assert (exchange.stage is Stage.FINISHED) == (not isinstance(step, Challenge))


userNames = st.text(min_size=1, max_size=20).map(str.encode).filter(lambda name: b"\0" not in name)
passwords = st.binary(max_size=40).filter(lambda password: b"\0" not in password)


@given(userNames, passwords, st.booleans())
def test_login_round_trips_any_user_name_and_password(name: bytes, password: bytes, initial: bool) -> None:
    exchange = LoginExchange()
    if initial:
        assert exchange.start(b64(name)) == Challenge(b"Password:")
    else:
        assert exchange.start(None) == Challenge(b"Username:")
        assert exchange.respond(b64(name)) == Challenge(b"Password:")
    assert exchange.respond(b64(password)) == Credentials(name, password)


@given(userNames, passwords)
def test_plain_round_trips_any_user_name_and_password(name: bytes, password: bytes) -> None:
    assert PlainExchange().start(plain(b"", name, password)) == Credentials(name, password)
    assert PlainExchange().start(plain(name, name, password)) == Credentials(name, password)
