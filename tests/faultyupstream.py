"""
Misbehaving IMAP and POP3 upstreams on 127.0.0.1 for fault-injection tests.

Each L{FaultyUpstream} listens on a free port and serves every connection
in a thread with blocking sockets: it greets, accepts any login and answers
just enough IMAP (SELECT, the bridge's snapshot, FETCH) or POP3 (CAPA,
STAT, RETR) to reach the point where it misbehaves as its L{Fault} says.
L{Blackhole} is a port whose connects never complete.  Every socket has a
timeout and every thread a deadline, so nothing outlives a test for long.
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
import threading
import time

HOST = "127.0.0.1"
MESSAGE_SIZE = 100_000
# How much of a message a resetting upstream sends before it goes away.
PARTIAL = 30_000
LIFETIME = 30.0
_TICK = 0.2
# Under the tests' connect_timeout (1 s): each line alone comes in time.
TRICKLE_INTERVAL = 0.4


class Fault(enum.Enum):
    NEVER_GREET = "never-greet"  # accepts, then silence
    FREEZE = "freeze"  # accepts (and completes implicit TLS), then reads nothing, ever
    REFUSE = "refuse"  # greets with * BYE / -ERR and closes
    REJECT_LOGIN = "reject-login"  # NO [AUTHENTICATIONFAILED] / -ERR [AUTH]
    RESET_MID_FETCH = "reset"  # part of a message, then RST (SO_LINGER 0)
    CLOSE_MID_FETCH = "close"  # part of a message, then a clean FIN
    STALL = "stall"  # after login, never answers NOOP or a message fetch
    TRICKLE = "trickle"  # answers the login step (IMAP LOGIN, POP3 CAPA) a line at a time, never ending it
    NONE = "none"  # behaves (bad-certificate cases fail before anything else)


class FaultyUpstream:
    """
    A fake upstream speaking C{protocol} (C{"imap"} or C{"pop3"}) with TLS
    mode C{tls} (C{"plain"}, C{"implicit"}, C{"starttls"}) and, for TLS,
    the server certificate C{certFile}/C{keyFile}.
    """

    def __init__(
        self,
        fault: Fault,
        protocol: str = "imap",
        tls: str = "plain",
        certFile: str | None = None,
        keyFile: str | None = None,
    ) -> None:
        self.fault = fault
        self.protocol = protocol
        self.tls = tls
        self.context: ssl.SSLContext | None = None
        if tls != "plain":
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(certFile or "", keyFile)
        self.accepted = 0
        self._stopped = threading.Event()
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self._listener.settimeout(_TICK)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"faulty-{fault.value}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        session = _Session(self, raw)
        try:
            session.run()
        except (OSError, ValueError):
            pass  # the proxy hung up, or the TLS handshake failed: both expected
        finally:
            session.close()


class _Session:
    def __init__(self, server: FaultyUpstream, sock: socket.socket) -> None:
        self.server = server
        self.fault = server.fault
        self.sock: socket.socket = sock
        self.sock.settimeout(_TICK)
        self.buffer = b""
        self.deadline = time.monotonic() + LIFETIME
        self.loggedIn = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def alive(self) -> bool:
        return not self.server._stopped.is_set() and time.monotonic() < self.deadline

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes | None:
        while b"\n" not in self.buffer:
            if not self.alive():
                return None
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def silence(self) -> None:
        """Read and ignore everything until the peer leaves."""
        while self.readLine() is not None:
            pass

    def secure(self) -> None:
        assert self.server.context is not None
        self.sock.settimeout(5)
        self.sock = self.server.context.wrap_socket(self.sock, server_side=True)
        self.sock.settimeout(_TICK)

    def trickle(self, line: bytes) -> None:
        """Send C{line} again and again, a little under a timeout apart, until the peer leaves."""
        while self.alive():
            self.send(line)
            self.server._stopped.wait(TRICKLE_INTERVAL)

    def partialThenGone(self, head: bytes) -> None:
        self.send(head + b"x" * PARTIAL)
        if self.fault is Fault.RESET_MID_FETCH:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.sock.shutdown(socket.SHUT_WR)
            self.silence()
        self.sock.close()

    def run(self) -> None:
        if self.server.tls == "implicit":
            self.secure()
        if self.fault is Fault.NEVER_GREET:
            self.silence()
            return
        if self.fault is Fault.FREEZE:
            while self.alive():
                self.server._stopped.wait(_TICK)
            return
        if self.server.protocol == "imap":
            self.imap()
        else:
            self.pop3()

    # -- IMAP -------------------------------------------------------------------

    def imap(self) -> None:
        if self.fault is Fault.REFUSE:
            self.send(b"* BYE [UNAVAILABLE] fake upstream refuses service\r\n")
            return
        starttls = b" STARTTLS" if self.server.tls == "starttls" else b""
        capabilities = b"IMAP4rev1 SASL-IR AUTH=PLAIN UIDPLUS" + starttls
        self.send(b"* OK [CAPABILITY " + capabilities + b"] fake upstream\r\n")
        while (line := self.readLine()) is not None:
            tag, _, rest = line.partition(b" ")
            words = rest.upper().split()
            name = words[0] if words else b""
            if name == b"STARTTLS":
                self.send(tag + b" OK begin TLS\r\n")
                self.secure()
            elif name == b"CAPABILITY":
                self.send(b"* CAPABILITY " + capabilities + b"\r\n" + tag + b" OK done\r\n")
            elif name in (b"AUTHENTICATE", b"LOGIN"):
                if self.fault is Fault.TRICKLE:
                    self.trickle(b"* OK still checking\r\n")
                    return
                if self.fault is Fault.REJECT_LOGIN:
                    self.send(tag + b" NO [AUTHENTICATIONFAILED] fake upstream rejects you\r\n")
                else:
                    self.loggedIn = True
                    self.send(tag + b" OK [CAPABILITY IMAP4rev1 UIDPLUS LITERAL+] logged in\r\n")
            elif name in (b"SELECT", b"EXAMINE"):
                self.send(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n" + tag + b" OK [READ-WRITE] selected\r\n")
            elif name == b"LOGOUT":
                self.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            elif b"RFC822.SIZE" in rest.upper():
                self.send(b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % MESSAGE_SIZE + tag + b" OK done\r\n")
            elif b"BODY" in rest.upper() or name == b"NOOP":
                self.misbehave(tag, b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % MESSAGE_SIZE)
                if self.fault is not Fault.NONE:
                    return
            else:
                self.send(tag + b" OK done\r\n")

    def misbehave(self, tag: bytes, head: bytes) -> None:
        if self.fault is Fault.STALL:
            self.silence()
        elif self.fault in (Fault.RESET_MID_FETCH, Fault.CLOSE_MID_FETCH):
            self.partialThenGone(head)
        elif self.server.protocol == "imap":
            self.send(head + b"x" * MESSAGE_SIZE + b")\r\n" + tag + b" OK done\r\n")
        else:
            self.send(head + b"x" * MESSAGE_SIZE + b"\r\n.\r\n")

    # -- POP3 -------------------------------------------------------------------

    def pop3(self) -> None:
        if self.fault is Fault.REFUSE:
            self.send(b"-ERR [SYS/TEMP] fake upstream refuses service\r\n")
            return
        self.send(b"+OK fake upstream\r\n")
        while (line := self.readLine()) is not None:
            words = line.split()
            name = words[0].upper() if words else b""
            if name == b"CAPA" and self.fault is Fault.TRICKLE:
                self.send(b"+OK\r\n")
                self.trickle(b"X-STILL-LISTING\r\n")
                return
            if name == b"CAPA":
                stls = b"STLS\r\n" if self.server.tls == "starttls" else b""
                self.send(b"+OK\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\nTOP\r\n" + stls + b".\r\n")
            elif name == b"STLS":
                self.send(b"+OK begin TLS\r\n")
                self.secure()
            elif name in (b"AUTH", b"PASS"):
                if self.fault is Fault.REJECT_LOGIN:
                    self.send(b"-ERR [AUTH] fake upstream rejects you\r\n")
                else:
                    self.send(b"+OK logged in\r\n")
            elif name == b"STAT":
                self.send(b"+OK 1 %d\r\n" % MESSAGE_SIZE)
            elif name in (b"RETR", b"NOOP"):
                self.misbehave(b"", b"+OK message follows\r\n")
                if self.fault is not Fault.NONE:
                    return
            elif name == b"QUIT":
                self.send(b"+OK bye\r\n")
                return
            else:
                self.send(b"+OK\r\n")


class Blackhole:
    """
    A port whose connects never complete: a listener that never accepts,
    with its (minimal) accept queue filled, so the kernel drops new SYNs.
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((HOST, self.port))
            self._fillers.append(filler)
            time.sleep(0.05)
            if filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and not _connected(filler):
                return  # this one hangs: the queue is full
        raise RuntimeError("could not fill the accept queue of the blackhole listener")

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._listener.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False
