"""
Attacks through SASL LOGIN (C{AUTHENTICATE LOGIN}, C{AUTH LOGIN}), as an
attacker would try to use its two steps to get around what holds for PLAIN
and IMAP LOGIN, against a real C{twistd -n mailproxy} in front of the
private Dovecot: parallel exchanges against the lockout and the login
turns, exchanges held open at the password step, started and cancelled
against the command cap, kept open past the login deadline, pipelined
behind and after, injected behind STARTTLS, invited in the clear, and user
names forging log lines.

Every test checks Dovecot's own log as well as the proxy's replies: the
local users here all log in upstream as the module's own Dovecot user
(stored credentials), so what reached Dovecot is counted exactly.  Each
test uses its own loopback source addresses and local user names, so one
test's lockouts and turns never touch another's.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mailproxy.frontdoor import MAX_PRELOGIN_COMMANDS
from tests.dovecot import DovecotUpstream
from tests.proxyprocess import ProxyProcess, freePort, runningProxy
from tests.rawclient import authLines, closeAbruptly, connectFrom, readEach, readLine, readTagged
from tests.test_prelogin_attacks import fail2banHosts
from tests.tomlconfig import authTable, namedListeners, routingTable, table, upstreamTable

DEADLINE = 6.0
LOCKOUT_AFTER = 5
SLOTS = 300

# The Dovecot account every local user below logs in upstream as, but the
# sentinel (see Target.reachedUpstream), which has its own.
UPSTREAM_USER, UPSTREAM_PASSWORD = "saslatk", "saslatk-pw"
SENTINEL_UPSTREAM_USER, SENTINEL_UPSTREAM_PASSWORD = "saslatk-sentinel", "saslatk-sentinel-pw"
# Local name -> password.
USERS = {
    name: f"{name}-right"
    for name in ("sentinel", "par", "hold", "cap", "pipe", "pipeok", "poppipe", "inj", "clear", "forge")
}

USERNAME = b"+ VXNlcm5hbWU6\r\n"
PASSWORD = b"+ UGFzc3dvcmQ6\r\n"
AUTOLOGOUT_IMAP = b"* BYE Autologout; login took too long\r\n"
AUTOLOGOUT_POP3 = b"-ERR Autologout; login took too long\r\n"
PRIVACY_IMAP = b"NO [PRIVACYREQUIRED] Use STARTTLS before authenticating\r\n"
PRIVACY_POP3 = b"-ERR [AUTH] Plaintext authentication disallowed on unencrypted connections\r\n"


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


@dataclass
class Target:
    ports: dict[str, int]
    directory: str
    dovecot: DovecotUpstream
    process: ProxyProcess

    def connect(self, listener: str, source: str) -> socket.socket:
        sock = connectFrom(self.ports[listener], source, timeout=30)
        greeting = readLine(sock)
        assert greeting.startswith((b"* OK", b"+OK")), greeting
        return sock

    def log(self) -> str:
        return self.process.log()

    def authLines(self, source: str, kind: str) -> list[str]:
        return authLines(self.log(), source, kind)

    def clientLines(self, source: str) -> list[str]:
        return [line for line in self.log().splitlines() if f" {source}:" in line]

    def countClientLines(self, source: str, text: str, expected: int) -> int:
        """
        How many of C{source}'s lines hold C{text}, once there are
        C{expected} or 10 s have passed (workers' lines reach the log
        through the supervisor, maybe just after the client saw the close).
        """
        deadline = time.monotonic() + 10
        while True:
            count = sum(text in line for line in self.clientLines(source))
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.05)

    def dovecotLog(self) -> str:
        with open(self.dovecot.logFile, errors="replace") as handle:
            return handle.read()

    def upstreamLogins(self, user: str = UPSTREAM_USER) -> int:
        """
        How many times Dovecot logged C{user} (the module's account) in, in
        any protocol.
        """
        return len(re.findall(rf"-login: (?:Info: )?Login: user=<{re.escape(user)}>", self.dovecotLog()))

    def upstreamAuthFailures(self) -> int:
        """
        Failed authentications Dovecot logged for any user (auth_verbose).
        """
        return len(re.findall(r"auth failed|Password mismatch|unknown user", self.dovecotLog()))

    def reachedUpstream(self, logins: int) -> int:
        """
        Log in once more from a fresh address as the sentinel (its own
        upstream account), wait until Dovecot shows that very login, and
        return how many logins of the module's account Dovecot shows since
        C{logins}.
        """
        source = f"127.0.69.{next(_sentinels)}"
        sentinels = self.upstreamLogins(SENTINEL_UPSTREAM_USER)
        with self.connect("plain", source) as sock:
            sock.sendall(b"s AUTHENTICATE LOGIN " + b64("sentinel") + b"\r\n" + b64(USERS["sentinel"]) + b"\r\n")
            assert readLine(sock) == PASSWORD
            assert readTagged(sock, b"s").startswith(b"s OK ")
        deadline = time.monotonic() + 10
        while self.upstreamLogins(SENTINEL_UPSTREAM_USER) <= sentinels and time.monotonic() < deadline:
            time.sleep(0.05)
        # Whatever came before the sentinel is in Dovecot's log by now (a
        # wait for any new line would return before a slower login
        # process's line of an earlier login).
        return self.upstreamLogins() - logins


_sentinels = iter(range(1, 250))


def proxyConfig(ports: dict[str, int], dovecot: DovecotUpstream) -> str:
    """
    The proxy's configuration: the listeners of C{ports}, and every local
    user routed to Dovecot as the module's account.
    """
    upstreamAccount = {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}
    sentinelAccount = {"username": SENTINEL_UPSTREAM_USER, "password": SENTINEL_UPSTREAM_PASSWORD}
    return "".join(
        [
            table("server", loginDeadline=DEADLINE, preauthTimeout=60),
            authTable(failureDelay=0.02, hashThreads=2),
            table(
                "limits",
                maxConnections=SLOTS,
                maxConnectionsPerIp=SLOTS,
                failuresBeforeLockout=LOCKOUT_AFTER,
                lockoutSeconds=600,
            ),
            namedListeners(ports, dovecot.certFile, dovecot.keyFile),
            upstreamTable("imap", dovecot.ports["imap"]),
            routingTable("imap", {name: sentinelAccount if name == "sentinel" else upstreamAccount for name in USERS}),
        ]
    )


@pytest.fixture(scope="module")
def target(dovecot: DovecotUpstream) -> Iterator[Target]:
    dovecot.addUsers({UPSTREAM_USER: UPSTREAM_PASSWORD, SENTINEL_UPSTREAM_USER: SENTINEL_UPSTREAM_PASSWORD})
    ports = {name: freePort() for name in ("plain", "cleartext", "starttls", "pop3", "pop3clear", "pop3tls")}
    config = proxyConfig(ports, dovecot)
    with runningProxy(config, USERS, list(ports.values()), prefix="mp-saslatk-") as (directory, process):
        yield Target(ports, directory, dovecot, process)


def sendQuietly(sock: socket.socket, data: bytes) -> None:
    """
    Send C{data}, stopping quietly where the proxy has cut the connection.
    """
    try:
        sock.sendall(data)
    except OSError:
        pass


def untilClosed(sockets: list[socket.socket], seconds: float) -> list[bytes | None]:
    """
    Everything each socket receives until the proxy closes it, or C{None}
    for one still open after C{seconds}.
    """
    return [result[1] if result else None for result in readEach(sockets, seconds, lambda data, ended: ended)]


def openAtPassword(target: Target, listener: str, source: str, user: str, initial: bool) -> socket.socket:
    """
    A connection whose LOGIN exchange has asked for the password.
    """
    sock = target.connect(listener, source)
    command = b"a AUTHENTICATE LOGIN" if listener != "pop3" else b"AUTH LOGIN"
    if initial:
        sock.sendall(command + b" " + b64(user) + b"\r\n")
    else:
        sock.sendall(command + b"\r\n")
        assert readLine(sock) == USERNAME
        sock.sendall(b64(user) + b"\r\n")
    assert readLine(sock) == PASSWORD
    return sock


# -- lockouts and login turns -------------------------------------------------------------


def test_parallel_login_exchanges_from_one_address_stop_at_the_lockout(target: Target) -> None:
    """
    40 LOGIN exchanges (IMAP and POP3) from one address all held at the password step, then 39 wrong
    passwords at once and the right one last: 5 checks, the rest refused unchecked, never logged in,
    and nothing of it reaches Dovecot.
    """
    source = "127.0.60.1"
    logins = target.upstreamLogins()
    failures = target.upstreamAuthFailures()
    sockets = [
        openAtPassword(target, "plain" if index % 4 else "pop3", source, "par", initial=bool(index % 2))
        for index in range(40)
    ]
    try:
        # The password step tells nothing about the name: an unknown one is asked the same.
        with openAtPassword(target, "plain", "127.0.60.2", "nobody-par", initial=False):
            pass
        for index, sock in enumerate(sockets[:-1]):
            sock.sendall(b64(f"guess-{index}") + b"\r\n")
        time.sleep(0.2)
        sockets[-1].sendall(b64(USERS["par"]) + b"\r\n")
        replies = [readLine(sock) for sock in sockets]
    finally:
        for sock in sockets:
            closeAbruptly(sock)
    assert all(reply.startswith((b"a NO [AUTHENTICATIONFAILED]", b"-ERR [AUTH]")) for reply in replies), replies
    checked, refused = target.authLines(source, "failure"), target.authLines(source, "refused")
    assert len(checked) == LOCKOUT_AFTER, checked
    assert len(checked) + len(refused) == len(sockets)
    assert "logged in as par" not in target.log()
    assert target.reachedUpstream(logins) == 0
    assert target.upstreamAuthFailures() == failures


def test_an_exchange_held_at_the_password_step_holds_no_turn_and_ends_at_the_deadline(target: Target) -> None:
    """
    15 exchanges held at Password: (one trickling its password a byte at a time) from one address: the
    same address and user still log in at once over both protocols, and every held one is ended by the
    login deadline with its goodbye; a password completed after that is never checked.
    """
    source = "127.0.61.1"
    logins = target.upstreamLogins()
    held = [
        openAtPassword(target, "pop3" if index % 3 == 0 else "plain", source, "hold", index % 2 == 0)
        for index in range(15)
    ]
    kinds = ["pop3" if index % 3 == 0 else "plain" for index in range(15)]
    password = b64(USERS["hold"])
    stop = threading.Event()

    def trickle() -> None:
        # At most the password's length, one byte every 0.3 s: past the deadline, never its line end.
        for octet in password:
            if stop.wait(0.3):
                return
            sendQuietly(held[1], bytes([octet]))

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        with openAtPassword(target, "plain", source, "hold", initial=False) as imap:
            imap.sendall(password + b"\r\n")
            assert readTagged(imap).startswith(b"a OK [CAPABILITY ")
        with openAtPassword(target, "pop3", source, "hold", initial=True) as pop3:
            pop3.sendall(password + b"\r\n")
            assert readLine(pop3) == b"+OK Logged in.\r\n"
        received = untilClosed(held, DEADLINE + 10)
        for sock in held:
            # Too late: the connection is gone.
            sendQuietly(sock, password + b"\r\n")
    finally:
        stop.set()
        trickler.join(5)
        for sock in held:
            sock.close()
    assert None not in received, "a held exchange outlived the login deadline"
    for kind, data in zip(kinds, received, strict=True):
        assert data == (AUTOLOGOUT_POP3 if kind == "pop3" else AUTOLOGOUT_IMAP), (kind, data)
    assert target.countClientLines(source, "not logged in within", len(held)) == len(held)
    assert not target.authLines(source, "failure") and not target.authLines(source, "refused")
    assert target.reachedUpstream(logins) == 2


def test_starting_and_cancelling_exchanges_does_not_dodge_the_command_cap(target: Target) -> None:
    """
    AUTHENTICATE LOGIN / AUTH LOGIN and '*' sixty times in one write: each line counts, so 50 exchanges
    are cancelled and the connection ends at the 100-command cap; wrong passwords the same way are checked
    5 times only.  Dovecot sees none of it.
    """
    logins = target.upstreamLogins()
    cancel = b"a AUTHENTICATE LOGIN\r\n*\r\n" * 30 + (b"b AUTHENTICATE LOGIN " + b64("cap") + b"\r\n*\r\n") * 30
    imap = target.connect("plain", "127.0.62.1")
    pop3 = target.connect("pop3", "127.0.62.1")
    guesses = target.connect("pop3", "127.0.62.2")
    try:
        imap.sendall(cancel)
        pop3.sendall(b"AUTH LOGIN\r\n*\r\n" * 30 + (b"AUTH LOGIN " + b64("cap") + b"\r\n*\r\n") * 30)
        guesses.sendall(b"".join(b"AUTH LOGIN " + b64("cap") + b"\r\n" + b64(f"g{n}") + b"\r\n" for n in range(60)))
        imapOut, pop3Out, guessesOut = untilClosed([imap, pop3, guesses], 30)
    finally:
        for sock in (imap, pop3, guesses):
            sock.close()
    assert imapOut is not None and pop3Out is not None and guessesOut is not None
    # Two commands an exchange: the command and the cancel.
    assert imapOut.count(b" BAD Authentication cancelled\r\n") == MAX_PRELOGIN_COMMANDS // 2
    assert imapOut.endswith(b"* BYE Too many commands before login\r\n")
    assert pop3Out.count(b"-ERR Authentication cancelled\r\n") == MAX_PRELOGIN_COMMANDS // 2
    assert pop3Out.endswith(b"-ERR Too many commands before login\r\n")
    # The guesses are refused more and more slowly: the deadline or the cap ends them.
    assert set(guessesOut.split(b"\r\n")) <= {
        PASSWORD.rstrip(),
        b"-ERR [AUTH] Authentication failed.",
        AUTOLOGOUT_POP3.rstrip(),
        b"-ERR Too many commands before login",
        b"",
    }, guessesOut
    assert guessesOut.count(b"-ERR [AUTH] Authentication failed.\r\n") > LOCKOUT_AFTER
    assert len(target.authLines("127.0.62.2", "failure")) == LOCKOUT_AFTER
    assert not target.authLines("127.0.62.1", "failure")
    assert target.reachedUpstream(logins) == 0


# -- pipelining ---------------------------------------------------------------------------


def test_exchanges_pipelined_one_behind_another_get_no_extra_checks(target: Target) -> None:
    """
    Six wrong LOGIN exchanges and the right one in one write, each answer sent before its challenge,
    then a command: 5 checks, the right one refused unchecked, the command refused before login; over
    POP3 too.  Dovecot sees none of it.
    """
    logins = target.upstreamLogins()
    user = b64("pipe")
    burst = b"".join(b"g%d AUTHENTICATE LOGIN\r\n%s\r\n%s\r\n" % (n, user, b64(f"wrong{n}")) for n in range(6))
    burst += b"a AUTHENTICATE LOGIN " + user + b"\r\n" + b64(USERS["pipe"]) + b"\r\nb SELECT INBOX\r\n"
    with target.connect("plain", "127.0.63.1") as imap:
        imap.sendall(burst)
        assert readTagged(imap).startswith(b"a NO [AUTHENTICATIONFAILED]")
        assert readLine(imap) == b"b BAD Command SELECT is not valid before authentication\r\n"
    popUser = b64("poppipe")
    popBurst = b"".join(b"AUTH LOGIN\r\n%s\r\n%s\r\n" % (popUser, b64(f"wrong{n}")) for n in range(6))
    popBurst += b"AUTH LOGIN " + popUser + b"\r\n" + b64(USERS["poppipe"]) + b"\r\nSTAT\r\nQUIT\r\n"
    with target.connect("pop3", "127.0.63.2") as pop3:
        pop3.sendall(popBurst)
        (received,) = untilClosed([pop3], 30)
    assert received is not None
    lines = received.split(b"\r\n")
    assert lines[-4:] == [
        b"-ERR [AUTH] Authentication failed.",
        b"-ERR Unknown command or not valid before login",
        b"+OK Bye",
        b"",
    ], lines
    assert received.count(b"-ERR [AUTH] Authentication failed.\r\n") == 7
    for source in ("127.0.63.1", "127.0.63.2"):
        assert len(target.authLines(source, "failure")) == LOCKOUT_AFTER
    assert "logged in as pipe" not in target.log() and "logged in as poppipe" not in target.log()
    assert target.reachedUpstream(logins) == 0


def test_a_second_login_pipelined_after_the_last_response_goes_nowhere(target: Target) -> None:
    """
    Behind a good exchange's password: another AUTHENTICATE LOGIN for somebody else, its responses, a
    LOGIN: the proxy refuses both logins itself, and Dovecot logs exactly the one login the proxy made.
    """
    logins = target.upstreamLogins()
    carolLogins = len(re.findall(r"Login: user=<carol>", target.dovecotLog()))
    burst = (
        b"a AUTHENTICATE LOGIN\r\n"
        + b64("pipeok")
        + b"\r\n"
        + b64(USERS["pipeok"])
        + b"\r\nb AUTHENTICATE LOGIN "
        + b64("carol")
        + b"\r\n"
        + b64("carolpw")
        + b'\r\nc LOGIN carol "carolpw"\r\nd LOGOUT\r\n'
    )
    with target.connect("plain", "127.0.63.3") as imap:
        imap.sendall(burst)
        (received,) = untilClosed([imap], 30)
    assert received is not None
    assert received.startswith(USERNAME + PASSWORD + b"a OK [CAPABILITY ")
    assert b"\r\nb BAD Command not available after login through this proxy\r\n" in received
    assert b"\r\nc BAD Command not available after login through this proxy\r\n" in received
    assert b"\r\nd OK " in received
    assert target.reachedUpstream(logins) == 1
    assert len(re.findall(r"Login: user=<carol>", target.dovecotLog())) == carolLogins


# -- TLS ----------------------------------------------------------------------------------


def tlsClient(sock: socket.socket, dovecot: DovecotUpstream) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=dovecot.caFile)
    return context.wrap_socket(sock, server_hostname="localhost")


def test_a_login_exchange_pipelined_behind_starttls_is_never_run(target: Target) -> None:
    """
    STARTTLS / STLS with AUTHENTICATE LOGIN / AUTH LOGIN and its password in the same plaintext write: the
    upgrade is answered, then the connection closed; no challenge, no check, nothing upstream.
    """
    source = "127.0.64.1"
    logins = target.upstreamLogins()
    user, password = b64("inj"), b64(USERS["inj"])
    imap = target.connect("starttls", source)
    pop3 = target.connect("pop3tls", source)
    try:
        imap.sendall(b"s STARTTLS\r\na AUTHENTICATE LOGIN " + user + b"\r\n" + password + b"\r\n")
        pop3.sendall(b"STLS\r\nAUTH LOGIN\r\n" + user + b"\r\n" + password + b"\r\n")
        imapOut, pop3Out = untilClosed([imap, pop3], 15)
    finally:
        imap.close()
        pop3.close()
    assert imapOut == b"s OK Begin TLS negotiation now\r\n"
    assert pop3Out == b"+OK Begin TLS negotiation\r\n"
    assert target.countClientLines(source, "pipelined data after STARTTLS", 2) == 2
    assert not target.authLines(source, "failure") and not target.authLines(source, "refused")
    assert target.reachedUpstream(logins) == 0


def test_an_exchange_started_in_plaintext_does_not_carry_over_into_tls(target: Target) -> None:
    """
    AUTHENTICATE LOGIN (refused without a challenge) then STARTTLS, then the password as the first thing
    over TLS: it is a command there, not a SASL response; a LOGIN exchange over TLS then works.  POP3 too.
    """
    source = "127.0.64.2"
    logins = target.upstreamLogins()
    user, password = b64("inj"), b64(USERS["inj"])
    with target.connect("starttls", source) as raw:
        raw.sendall(b"a AUTHENTICATE LOGIN " + user + b"\r\ns STARTTLS\r\n")
        assert readLine(raw) == b"a " + PRIVACY_IMAP
        assert readLine(raw) == b"s OK Begin TLS negotiation now\r\n"
        with tlsClient(raw, target.dovecot) as imap:
            imap.sendall(password + b"\r\n")
            assert readLine(imap) == b"* BAD Invalid tag or command\r\n"
            imap.sendall(b"b AUTHENTICATE LOGIN\r\n")
            assert readLine(imap) == USERNAME
            imap.sendall(user + b"\r\n")
            assert readLine(imap) == PASSWORD
            imap.sendall(password + b"\r\n")
            assert readTagged(imap, b"b").startswith(b"b OK [CAPABILITY ")
    with target.connect("pop3tls", source) as raw:
        raw.sendall(b"AUTH LOGIN\r\nSTLS\r\n")
        assert readLine(raw) == PRIVACY_POP3
        assert readLine(raw) == b"+OK Begin TLS negotiation\r\n"
        with tlsClient(raw, target.dovecot) as pop3:
            pop3.sendall(password + b"\r\n")
            assert readLine(pop3) == b"-ERR Unknown command or not valid before login\r\n"
            pop3.sendall(b"AUTH LOGIN " + user + b"\r\n")
            assert readLine(pop3) == PASSWORD
            pop3.sendall(password + b"\r\n")
            assert readLine(pop3) == b"+OK Logged in.\r\n"
    assert not target.authLines(source, "failure")
    assert target.reachedUpstream(logins) == 2


IMAP_IN_THE_CLEAR = [
    b"a AUTHENTICATE LOGIN\r\n",
    b"a AUTHENTICATE login\r\n",
    b"a AUTHENTICATE LOGIN =\r\n",
    b"a AUTHENTICATE LOGIN " + b64("clear") + b"\r\n",
    b'a AUTHENTICATE "LOGIN"\r\n',
    b'a AUTHENTICATE "LOGIN" "' + b64("clear") + b'"\r\n',
    b"a AUTHENTICATE {5}\r\n",
    b"a AUTHENTICATE LOGIN {8}\r\n",
    b"a AUTHENTICATE {5+}\r\nLOGIN\r\n",
    b"a AUTHENTICATE LOGIN {8+}\r\n" + b64("clear") + b"\r\n",
]
POP3_IN_THE_CLEAR = [
    b"AUTH LOGIN\r\n",
    b"auth login\r\n",
    b"AUTH LOGIN =\r\n",
    b"AUTH LOGIN " + b64("clear") + b"\r\n",
    b"AUTH  LOGIN  " + b64("clear") + b" \r\n",
]


@pytest.mark.parametrize("listener", ["cleartext", "starttls"])
def test_no_challenge_invites_a_login_in_the_clear(target: Target, listener: str) -> None:
    """
    Every form of AUTHENTICATE LOGIN (quoted, literal mechanism, literal initial response) and AUTH LOGIN
    where plaintext logins are refused: the refusal at once, never a '+', the user name that follows read
    as a command; nothing checked, nothing upstream.
    """
    source = "127.0.65.1" if listener == "cleartext" else "127.0.65.2"
    logins = target.upstreamLogins()
    with target.connect(listener, source) as imap:
        for command in IMAP_IN_THE_CLEAR:
            imap.sendall(command)
            assert readLine(imap) == b"a " + PRIVACY_IMAP, command
        imap.sendall(b"a AUTHENTICATE LOGIN\r\n" + b64("clear") + b"\r\n")
        assert readLine(imap) == b"a " + PRIVACY_IMAP
        assert readLine(imap) == b"* BAD Invalid tag or command\r\n"
    with target.connect("pop3clear" if listener == "cleartext" else "pop3tls", source) as pop3:
        for command in POP3_IN_THE_CLEAR:
            pop3.sendall(command)
            assert readLine(pop3) == PRIVACY_POP3, command
        pop3.sendall(b"AUTH LOGIN\r\n" + b64("clear") + b"\r\n")
        assert readLine(pop3) == PRIVACY_POP3
        assert readLine(pop3) == b"-ERR Unknown command or not valid before login\r\n"
    assert not target.authLines(source, "failure") and not target.authLines(source, "refused")
    assert target.reachedUpstream(logins) == 0


# -- log forging ----------------------------------------------------------------------------

FORGED_HOST = "198.51.100.77"
FORGED = f"2019-01-01T00:00:00+0000 [mailproxy.auth#warn] authentication failure: ip={FORGED_HOST} protocol=imap user=y failures=1"
# Numbered: failures count a name without regard to case and spaces (all of these are), so that
# the names are ten users, each failing once per protocol, and none is locked out.
FORGED_NAMES = [
    f"x{number}{rest}"
    for number, rest in enumerate(
        [
            "\r\n" + FORGED,
            "\n" + FORGED,
            "\r" + FORGED,
            "\u2028" + FORGED,
            "\x85" + FORGED,
            "\x0b" + FORGED,
            "\x0c" + FORGED,
            f" ip={FORGED_HOST}",
            f'" ip={FORGED_HOST}',
            f"\tip={FORGED_HOST}",
        ]
    )
]


def test_user_names_in_base64_forge_no_log_line_and_no_host(target: Target) -> None:
    """
    User names with CR, LF, U+2028, NEL, VT, FF, a whole forged line or a forged ip= field, sent as
    LOGIN's user name (challenged and initial) over IMAP and POP3, with and without NUL or invalid
    UTF-8: the proxy's log has no forged line and no forged field, fail2ban finds only loopback hosts,
    and Dovecot never hears of the names.
    """
    logins = target.upstreamLogins()
    # One connection and address a name: each is a checked failure, none waits behind a lockout.
    for index, name in enumerate(FORGED_NAMES):
        initial = bool(index % 2)
        with openAtPassword(target, "plain", f"127.0.66.{index + 1}", name, initial) as imap:
            imap.sendall(b64("wrong") + b"\r\n")
            assert readTagged(imap, b"a").startswith(b"a NO [AUTHENTICATIONFAILED]")
        with openAtPassword(target, "pop3", f"127.0.67.{index + 1}", name, initial) as pop3:
            pop3.sendall(b64("wrong") + b"\r\n")
            assert readLine(pop3) == b"-ERR [AUTH] Authentication failed.\r\n"
    with target.connect("plain", "127.0.66.99") as imap:
        imap.sendall(b"n AUTHENTICATE LOGIN " + b64("x\0" + FORGED) + b"\r\n")
        assert readLine(imap) == b"n BAD NUL in LOGIN user name or password\r\n"
        imap.sendall(b"u AUTHENTICATE LOGIN " + b64(b"x\xff\r\n" + FORGED.encode()) + b"\r\n")
        assert readLine(imap) == b"u BAD User name is not UTF-8\r\n"
    with target.connect("pop3", "127.0.67.99") as pop3:
        pop3.sendall(b"AUTH LOGIN\r\n" + b64(b"x\r\n" + FORGED.encode() + b"\xc0") + b"\r\n")
        assert readLine(pop3) == USERNAME
        assert readLine(pop3) == b"-ERR User name is not UTF-8\r\n"
    time.sleep(0.3)
    log = target.log()
    lines = [
        line
        for index in range(len(FORGED_NAMES))
        for source in (f"127.0.66.{index + 1}", f"127.0.67.{index + 1}")
        for line in target.authLines(source, "failure")
    ]
    assert len(lines) == 2 * len(FORGED_NAMES), lines
    # Each name fails once over IMAP, once over POP3.
    assert all(re.search(r" user=x\d%[0-9A-F]{2}\S* failures=[12]$", line) for line in lines), lines
    assert not target.authLines("127.0.66.99", "failure") and not target.authLines("127.0.67.99", "failure")
    assert f"ip={FORGED_HOST}" not in log
    assert not [line for line in log.splitlines() if line.startswith("2019-01-01")]
    assert "Traceback" not in log
    hosts = set(fail2banHosts(target.directory))
    assert hosts and all(host.startswith("127.") for host in hosts), hosts
    assert FORGED_HOST not in target.dovecotLog()
    assert target.reachedUpstream(logins) == 0
