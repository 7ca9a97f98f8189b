"""A private Dovecot IMAP/POP3 server on 127.0.0.1 for tests and the demo.

The instance never reads ``/etc/dovecot``: everything (config, passwd-file,
certificates, sockets, state, logs, mail) lives in one directory.  It listens
on four TCP ports on 127.0.0.1 only: IMAP (STARTTLS), IMAPS, POP3 (STLS) and
POP3S.  The TLS certificate is issued by a throw-away trustme CA for
``localhost``, ``127.0.0.1`` and ``::1``.

Library use::

    with DovecotUpstream() as upstream:
        upstream.addUser("alice", "alicepw")
        imaplib.IMAP4(upstream.host, upstream.ports["imap"])

Command line (used by the demo)::

    python -m tests.dovecot start DIR [--imap-port N ...] [--user NAME:PASSWORD ...]
    python -m tests.dovecot stop DIR

``start`` prints one line of JSON and leaves Dovecot running in the
background; ``stop`` finds the master process through ``DIR``.

As root the master drops privileges (login processes run as ``dovenull``,
internal ones as ``dovecot``, mail access as ``nobody:nogroup``), so every
directory above the instance directory must be traversable by ``nobody``.
As a normal user Dovecot runs "rootless", everything as that user.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import json
import math
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import NoReturn, TypedDict

import trustme

__all__ = ["HOST", "PORT_NAMES", "DovecotUpstream", "stopInstance"]

HOST = "127.0.0.1"
PORT_NAMES: tuple[str, ...] = ("imap", "imaps", "pop3", "pop3s")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02

EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
DOVECOT_LIBEXEC = "/usr/lib/dovecot"
IMAP_ZLIB_PLUGIN = "/usr/lib/dovecot/modules/lib30_imap_zlib_plugin.so"
DH_PARAMS = "/usr/share/dovecot/dh.pem"

ROOT_LOGIN_USER = "dovenull"
ROOT_INTERNAL_USER = "dovecot"
ROOT_INTERNAL_GROUP = "dovecot"
ROOT_MAIL_USER = "nobody"
ROOT_MAIL_GROUP = "nogroup"

# idle=False: Dovecot 2.3 cannot drop one capability, only replace the whole
# list with ``imap_capability = LIST`` (no leading "+").  With an explicit list
# Dovecot adds nothing by itself (not even imap_zlib's COMPRESS=DEFLATE) except
# STARTTLS and AUTH= before login.  The setting is shared by the imap and
# imap-login processes, so the pre-login list is given to imap-login alone
# through a small exec wrapper that adds ``-o imap_capability=...``.
#
# Dovecot 2.3.19's post-login list, without IDLE and COMPRESS=DEFLATE:
NO_IDLE_CAPABILITY = " ".join(
    (
        "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT SORT=DISPLAY",
        "THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND",
        "URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS",
        "LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES",
        "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY",
        "PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY",
        "SPECIAL-USE",
    )
)
# ... and its pre-login list (the greeting's [CAPABILITY ...]) without IDLE:
NO_IDLE_LOGIN_CAPABILITY = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+"

SPECIAL_USE_MAILBOXES = (
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)


def _findDovecot() -> str | None:
    """Return the path of the ``dovecot`` binary, also looking in sbin dirs."""
    searchPath = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_PATH])
    return shutil.which("dovecot", path=searchPath)


def _freePorts(count: int, exclude: Iterable[int] = ()) -> list[int]:
    """Pick ``count`` distinct free TCP ports on 127.0.0.1.

    All sockets stay bound until every port is picked, so the ports differ;
    the usual race (another process grabbing a port before Dovecot binds it)
    remains and shows up as a start failure.
    """
    excluded = set(exclude)
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
            if port not in excluded:
                ports.append(port)
                excluded.add(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _portAccepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _greets(host: str, port: int, prefix: bytes, timeout: float = 1.0) -> bool:
    """True if a server on ``port`` sends a greeting line starting with ``prefix``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
            return data.startswith(prefix)
    except OSError:
        return False


def _sleepUntil(wallTime: float) -> None:
    delay = wallTime - time.time()
    if delay > 0:
        time.sleep(delay)


def _processGone(pid: int) -> bool:
    """True if ``pid`` does not exist any more or is a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # "pid (comm) S ..."; comm may contain spaces and parentheses
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _recordedMasterGone(runDir: str) -> bool:
    """Whether ``run/master.pid`` names a process that has exited.

    A pid file being written (empty or partial) or a master still starting
    does not count: under load Dovecot may be caught between the two.
    """
    try:
        with open(os.path.join(runDir, "master.pid"), encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    return pid > 1 and _processGone(pid)


def _masterPid(baseDir: str) -> int | None:
    """The pid of the running Dovecot master of the instance in ``baseDir``.

    The pid comes from ``run/master.pid`` and only counts if that process's
    command line names this instance's config file (guards against pid
    reuse).
    """
    baseDir = os.path.abspath(baseDir)
    try:
        with open(os.path.join(baseDir, "run", "master.pid"), encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1 or _processGone(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    conf = os.fsencode(os.path.join(baseDir, "etc", "dovecot.conf"))
    if conf not in argv:
        return None
    return pid


def stopInstance(baseDir: str, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the Dovecot master of the instance in ``baseDir``.

    Sends SIGTERM to that one pid, waits up to ``timeout`` seconds, then
    sends SIGKILL.  Returns the pid that was stopped, or None if the
    instance was not running.
    """
    pid = _masterPid(baseDir)
    if pid is None:
        return None
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while not _processGone(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(POLL_INTERVAL)
    return pid


class _Instance(TypedDict, total=False):
    ports: dict[str, int]
    idle: bool


def _savedInstance(baseDir: str) -> _Instance:
    """Ports and idle flag of the last start in ``baseDir`` (instance.json)."""
    try:
        with open(os.path.join(baseDir, "instance.json"), encoding="utf-8") as f:
            saved = json.load(f)
        ports = {str(k): int(v) for k, v in saved["ports"].items() if k in PORT_NAMES}
        return {"ports": ports, "idle": bool(saved["idle"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({path}: {e.strerror})\n"


def _checkField(kind: str, value: str) -> None:
    if not value or any(c in value for c in ":\r\n\0"):
        raise ValueError(f"{kind} must be non-empty without ':', CR, LF or NUL: {value!r}")


def _checkUser(name: str, password: str) -> None:
    _checkField("user name", name)
    if name in (".", "..") or "/" in name:
        raise ValueError(f"user name must be usable as a directory name: {name!r}")
    _checkField("password", password)


class DovecotUpstream:
    """A private Dovecot on 127.0.0.1 high ports for tests and the demo.

    ``baseDir`` holds everything (``etc/dovecot.conf``, ``etc/users``,
    ``ssl/``, ``run/``, ``state/``, ``log/dovecot.log``, ``mail/USER``); by
    default a new directory under /tmp.  ``ports`` maps ``imap``, ``imaps``,
    ``pop3`` and ``pop3s`` to TCP ports; missing entries are those of the
    last start in ``baseDir`` (``instance.json``) or else picked free.  With
    ``idle=False`` the server advertises no IDLE (before or after login).
    ``maxSessions`` raises process and connection limits for load runs.
    ``loginTrustedNetworks`` (e.g. ``"127.0.0.0/8"``) makes Dovecot believe
    the client address a proxy forwards (IMAP ID ``x-originating-ip``).
    ``rawlog=True`` lets L{enableRawlog} record a user's IMAP sessions.
    With ``autoMailboxes=False`` the special-use mailboxes (Drafts, Sent,
    Trash, Junk, Archive) are neither created nor subscribed automatically,
    so tests can see SUBSCRIBE/UNSUBSCRIBE of them in LSUB.

    Things worth knowing:

    - start() takes about 0.05 s; stop() about 1.1 s (the Dovecot master
      always sleeps one second for its log process before it exits).
    - addUser() on a running instance returns at the next full second: the
      auth process looks at the passwd-file at most once per second
      (addUsers() adds several with one wait; before start() there is none).
    - No auth penalty: a wrong password does not slow down later logins
      from 127.0.0.1; a failed login is answered within 0.5 s.
    - The server certificate (``certFile``/``keyFile``, for localhost,
      127.0.0.1 and ::1, signed by ``caFile``) is kept in ``baseDir`` and
      can be reused, e.g. as the proxy's own certificate.
    """

    host: str
    ports: dict[str, int]
    idle: bool
    baseDir: str
    caFile: str
    certFile: str
    keyFile: str
    confFile: str
    usersFile: str
    logFile: str
    mailDir: str

    def __init__(
        self,
        baseDir: str | None = None,
        *,
        idle: bool = True,
        ports: dict[str, int] | None = None,
        maxSessions: int = 1000,
        loginTrustedNetworks: str | None = None,
        rawlog: bool = False,
        autoMailboxes: bool = True,
        oauth2IntrospectionUrl: str | None = None,
    ) -> None:
        """
        @param oauth2IntrospectionUrl: if given, an OAuth-only server:
            logins by C{XOAUTH2} or C{OAUTHBEARER} only, each token checked
            at this RFC 7662 introspection endpoint (C{POST token=...}; the
            reply's C{username} must be the login name).
        """
        self.oauth2IntrospectionUrl = oauth2IntrospectionUrl
        self.maxSessions = maxSessions
        self.rawlog = rawlog
        self.autoMailboxes = autoMailboxes
        self.loginTrustedNetworks = loginTrustedNetworks
        if baseDir is None:
            baseDir = tempfile.mkdtemp(prefix="mp-dovecot-", dir="/tmp")
        self.baseDir = os.path.abspath(baseDir)
        if any(c.isspace() or c in "\"'#<$" for c in self.baseDir):
            # the paths go unquoted into dovecot.conf
            raise ValueError(f"unsupported character in Dovecot directory {self.baseDir!r}")
        os.makedirs(self.baseDir, exist_ok=True)
        # the mail processes (uid nobody when root) must traverse it
        os.chmod(self.baseDir, 0o755)

        self.host = HOST
        self.idle = idle
        # ports not given: those of the last start in this directory, if any
        given = {**_savedInstance(self.baseDir).get("ports", {}), **(ports or {})}
        unknown = set(given) - set(PORT_NAMES)
        if unknown:
            raise ValueError(f"unknown port names {sorted(unknown)}; use {PORT_NAMES}")
        missing = [name for name in PORT_NAMES if name not in given]
        picked = iter(_freePorts(len(missing), exclude=given.values()))
        self.ports = {name: given[name] if name in given else next(picked) for name in PORT_NAMES}
        if len(set(self.ports.values())) != len(PORT_NAMES):
            raise ValueError(f"ports must be distinct: {self.ports}")

        self._etcDir = os.path.join(self.baseDir, "etc")
        self._sslDir = os.path.join(self.baseDir, "ssl")
        self._runDir = os.path.join(self.baseDir, "run")
        self._stateDir = os.path.join(self.baseDir, "state")
        self._logDir = os.path.join(self.baseDir, "log")
        self.mailDir = os.path.join(self.baseDir, "mail")
        self.confFile = os.path.join(self._etcDir, "dovecot.conf")
        self.usersFile = os.path.join(self._etcDir, "users")
        self._wrapperFile = os.path.join(self._etcDir, "imap-login-no-idle")
        self.logFile = os.path.join(self._logDir, "dovecot.log")
        self._startupLog = os.path.join(self._logDir, "startup.log")
        self.caFile = os.path.join(self._sslDir, "ca.pem")
        self.certFile = os.path.join(self._sslDir, "cert.pem")
        self.keyFile = os.path.join(self._sslDir, "key.pem")

        for d in (self._etcDir, self._sslDir, self._stateDir, self._logDir):
            os.makedirs(d, exist_ok=True)
        self._makeCertificates()
        self._users: dict[str, str] = self._readUsers()

    # -- public API ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The Dovecot master pid, or None if this instance is not running."""
        return _masterPid(self.baseDir)

    @property
    def running(self) -> bool:
        return self.pid is not None

    def addUser(self, name: str, password: str) -> None:
        """Add (or change) a user; works before and after start().

        Dovecot's auth process looks at the passwd-file at most once per
        second and rereads it when its mtime or size changed.  So when
        Dovecot is running this waits for the next full second (up to 1 s),
        after which the change is certain to be seen.
        """
        self.addUsers({name: password})

    def addUsers(self, users: Mapping[str, str]) -> None:
        """Add several users at once (a single wait when running)."""
        for name, password in users.items():
            _checkUser(name, password)
        self._users.update(users)
        if self._writeUsers() and self.running:
            _sleepUntil(math.floor(time.time()) + 1.01)

    def enableRawlog(self, user: str) -> str:
        """Log ``user``'s IMAP sessions from now on (needs ``rawlog=True``).

        Dovecot's ``rawlog_dir = %h/rawlog`` only logs when that directory
        exists: this creates it (and the home directory), owned by the mail
        uid, and returns its path.  Each IMAP session then leaves two files
        there, ``<YYYYMMDD-HHMMSS>-<pid>.in`` (what the client sent) and
        ``.out`` (what Dovecot answered); see L{rawlogSessions}.  The login
        itself (done by imap-login) is not in them, its reply opens ``.out``.
        Dovecot puts ``<seconds>.<microseconds> `` before every line (also
        inside literals) and files the bytes as it reads or writes them.
        """
        if not self.rawlog:
            raise RuntimeError("this Dovecot was not configured with rawlog=True")
        _checkUser(user, "-")
        home = os.path.join(self.mailDir, user)
        directory = os.path.join(home, "rawlog")
        os.makedirs(directory, exist_ok=True)
        if self._isRoot():
            uid, gid = self._mailIds()
            for path in (self.mailDir, home, directory):
                os.chown(path, uid, gid)
        return directory

    def rawlogSessions(self, user: str) -> list[tuple[str, str]]:
        """The ``(.in, .out)`` rawlog file pairs of ``user``, oldest first."""
        directory = os.path.join(self.mailDir, user, "rawlog")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        stems = [name[: -len(".in")] for name in names if name.endswith(".in")]
        paths = [os.path.join(directory, stem) for stem in stems]
        paths.sort(key=lambda stem: (os.stat(stem + ".in").st_mtime_ns, stem))
        return [(stem + ".in", stem + ".out") for stem in paths]

    def wipe(self, user: str) -> None:
        """Delete all mail (the whole home directory) of ``user``."""
        if not user or user in (".", "..") or "/" in user:
            raise ValueError(f"bad user name {user!r}")
        shutil.rmtree(os.path.join(self.mailDir, user), ignore_errors=True)

    def start(self) -> None:
        """Write the config, start Dovecot and wait until all ports accept.

        Does nothing if this instance is already running.  Raises
        RuntimeError (with the tail of the Dovecot log) on failure.
        """
        if self.running:
            saved = _savedInstance(self.baseDir)
            if saved.get("ports") != self.ports or saved.get("idle") != self.idle:
                raise RuntimeError(
                    f"Dovecot in {self.baseDir} is already running with another setup ({saved}); stop it first"
                )
            return
        dovecot = _findDovecot()
        if dovecot is None:
            raise RuntimeError(
                "dovecot is not installed (no 'dovecot' binary on PATH or in /usr/sbin); "
                "install the Debian packages dovecot-core dovecot-imapd dovecot-pop3d"
            )
        for binary in ("imap", "pop3"):
            if not os.access(os.path.join(DOVECOT_LIBEXEC, binary), os.X_OK):
                raise RuntimeError(f"{DOVECOT_LIBEXEC}/{binary} is missing; install dovecot-{binary}d")
        self._checkTraversable()
        self._prepareMailDir()
        self._writeUsers(force=True)
        self._writeConfig()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._runDir, "master.pid"))

        deadline = time.monotonic() + START_TIMEOUT
        # Dovecot's log process keeps the stdio it inherited open: never give
        # it the caller's (a pytest capture pipe would never reach EOF).
        with open(self._startupLog, "ab") as out:
            try:
                result = subprocess.run(
                    [dovecot, "-c", self.confFile],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                self._fail("dovecot did not daemonize in time")
        if result.returncode != 0:
            self._fail(f"dovecot exited with status {result.returncode}")

        # ready: the TLS ports accept, the plain ones greet (so the login
        # processes are up and talk to auth; stopping then is quick too)
        pending = list(PORT_NAMES)
        while True:
            pid = self.pid
            if pid is not None:
                pending = [n for n in pending if not self._ready(n)]
                if not pending:
                    break
            elif _recordedMasterGone(self._runDir):
                self._fail("dovecot master exited during start-up")
            if time.monotonic() >= deadline:
                self.stop()
                what = "no master pid" if pid is None else f"ports {pending} not accepting"
                self._fail(f"dovecot not ready after {START_TIMEOUT:g} s ({what})")
            time.sleep(POLL_INTERVAL)
        self._writeInstanceInfo()

    def _ready(self, name: str) -> bool:
        port = self.ports[name]
        if name == "imap":
            return _greets(self.host, port, b"* OK ")
        if name == "pop3":
            return _greets(self.host, port, b"+OK")
        return _portAccepts(self.host, port)

    def stop(self) -> None:
        """Stop this instance's master (SIGTERM, SIGKILL after 5 s). Idempotent."""
        pid = stopInstance(self.baseDir)
        if pid is None:
            return
        # the master's children inherited the listeners; wait (briefly) until
        # they are gone so the ports can be reused right away
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(
            _portAccepts(self.host, port, timeout=0.2) for port in self.ports.values()
        ):
            time.sleep(POLL_INTERVAL)

    def info(self) -> dict[str, object]:
        """What a client needs to reach this instance (JSON-serialisable)."""
        return {
            "pid": self.pid,
            "host": self.host,
            "ports": dict(self.ports),
            "caFile": self.caFile,
            "certFile": self.certFile,
            "keyFile": self.keyFile,
            "baseDir": self.baseDir,
            "idle": self.idle,
        }

    def __enter__(self) -> DovecotUpstream:
        self.start()
        return self

    def __exit__(
        self,
        excType: type[BaseException] | None,
        excValue: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<DovecotUpstream {self.baseDir} ports={self.ports} pid={self.pid}>"

    # -- implementation -----------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        startup = _tail(self._startupLog, 10).strip()
        raise RuntimeError(
            f"{message}\n--- {self._startupLog} (tail) ---\n{startup}\n"
            f"--- {self.logFile} (tail) ---\n{_tail(self.logFile)}"
        )

    @staticmethod
    def _isRoot() -> bool:
        return os.geteuid() == 0

    def _mailIds(self) -> tuple[int, int]:
        if not self._isRoot():
            return os.getuid(), os.getgid()
        user = pwd.getpwnam(ROOT_MAIL_USER)
        try:
            gid = grp.getgrnam(ROOT_MAIL_GROUP).gr_gid
        except KeyError:
            gid = user.pw_gid
        return user.pw_uid, gid

    def _checkTraversable(self) -> None:
        """As root, the mail uid must reach baseDir: check the 'x' bits."""
        if not self._isRoot():
            return
        path = self.baseDir
        while True:
            mode = os.stat(path).st_mode
            if not mode & stat.S_IXOTH:
                raise RuntimeError(
                    f"{path} is not traversable by {ROOT_MAIL_USER} (mode "
                    f"{stat.filemode(mode)}); put the Dovecot directory elsewhere, "
                    "e.g. under /tmp"
                )
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def _prepareMailDir(self) -> None:
        os.makedirs(self.mailDir, exist_ok=True)
        os.chmod(self.mailDir, 0o700)
        if self._isRoot():
            uid, gid = self._mailIds()
            os.chown(self.mailDir, uid, gid)

    def _makeCertificates(self) -> None:
        """Issue a CA and a server certificate, unless baseDir has them."""
        paths = (self.caFile, self.certFile, self.keyFile)
        if all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in paths):
            return
        ca = trustme.CA(organization_name="mailproxy tests")
        leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
        self._writeFile(self.caFile, ca.cert_pem.bytes(), 0o644)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        self._writeFile(self.certFile, chain, 0o644)
        self._writeFile(self.keyFile, leaf.private_key_pem.bytes(), 0o600)

    @staticmethod
    def _writeFile(
        path: str,
        data: bytes,
        mode: int,
        owner: tuple[int, int] | None = None,
        mtime: float | None = None,
    ) -> None:
        """Write ``path`` atomically (temporary file, then rename)."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
            if owner is not None:
                os.chown(tmp, *owner)
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _readUsers(self) -> dict[str, str]:
        users: dict[str, str] = {}
        try:
            with open(self.usersFile, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return users
        for line in lines:
            name, _, rest = line.partition(":")
            password = rest.split(":", 1)[0]
            if name and password.startswith("{PLAIN}"):
                users[name] = password[len("{PLAIN}") :]
        return users

    def _writeUsers(self, force: bool = False) -> bool:
        """Write the passwd-file if its content changed; True if written."""
        data = "".join(f"{n}:{{PLAIN}}{p}::::::\n" for n, p in self._users.items()).encode()
        try:
            with open(self.usersFile, "rb") as f:
                unchanged = f.read() == data
            oldMtime: float | None = os.stat(self.usersFile).st_mtime
        except FileNotFoundError:
            unchanged, oldMtime = False, None
        if unchanged and not force:
            return False
        # Dovecot compares whole-second mtimes (and the size): each version
        # gets a new one, counting down so it never lies in the future
        mtime = time.time() if oldMtime is None else math.floor(oldMtime) - 1.0
        owner: tuple[int, int] | None = None
        mode = 0o600
        if self._isRoot():
            # read by the auth worker, which runs as the internal user
            with contextlib.suppress(KeyError):
                owner = (0, grp.getgrnam(ROOT_INTERNAL_GROUP).gr_gid)
                mode = 0o640
        self._writeFile(self.usersFile, data, mode, owner, mtime)
        return True

    def _writeInstanceInfo(self) -> None:
        data = json.dumps({"ports": self.ports, "idle": self.idle}, indent=1) + "\n"
        self._writeFile(os.path.join(self.baseDir, "instance.json"), data.encode(), 0o644)

    def _instanceName(self) -> str:
        digest = hashlib.sha256(self.baseDir.encode("utf-8")).hexdigest()[:10]
        return f"mp-dovecot-{digest}"

    def _imapLoginWrapper(self) -> str:
        """An exec wrapper giving imap-login its own (pre-login) capability."""
        option = shlex.quote(f"imap_capability={NO_IDLE_LOGIN_CAPABILITY}")
        binary = shlex.quote(os.path.join(DOVECOT_LIBEXEC, "imap-login"))
        return f'#!/bin/sh\n# generated by tests/dovecot.py\nexec {binary} -o {option} "$@"\n'

    def _config(self) -> str:
        """The complete dovecot.conf text."""
        root = self._isRoot()
        if root:
            loginUser, internalUser = ROOT_LOGIN_USER, ROOT_INTERNAL_USER
        else:
            loginUser = internalUser = pwd.getpwuid(os.getuid()).pw_name
        mailUid, mailGid = self._mailIds()
        # rootless: no chroot possible for the services that use one
        chroot = [] if root else ["  chroot ="]
        zlib = os.path.exists(IMAP_ZLIB_PLUGIN)

        conf = [
            "# generated by tests/dovecot.py: private test instance, do not edit",
            f"base_dir = {self._runDir}",
            f"state_dir = {self._stateDir}",
            f"instance_name = {self._instanceName()}",
            "protocols = imap pop3",
            f"listen = {self.host}",
            f"log_path = {self.logFile}",
            f"info_log_path = {self.logFile}",
            'log_timestamp = "%Y-%m-%d %H:%M:%S "',
            "auth_verbose = yes",
            *([f"login_trusted_networks = {self.loginTrustedNetworks}"] if self.loginTrustedNetworks else []),
            "",
            f"default_login_user = {loginUser}",
            f"default_internal_user = {internalUser}",
        ]
        if not root:
            conf.append(f"default_internal_group = {grp.getgrgid(os.getgid()).gr_name}")
        conf += [
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            "",
            "ssl = yes",
            f"ssl_cert = <{self.certFile}",
            f"ssl_key = <{self.keyFile}",
        ]
        if os.path.exists(DH_PARAMS):
            conf.append(f"ssl_dh = <{DH_PARAMS}")
        conf += [
            "disable_plaintext_auth = no",
            "auth_failure_delay = 0",
            "",
        ]
        if self.oauth2IntrospectionUrl is None:
            conf += [
                "auth_mechanisms = plain login",
                "passdb {",
                "  driver = passwd-file",
                f"  args = scheme=PLAIN username_format=%u {self.usersFile}",
                "}",
            ]
        else:
            # No auth cache (the default): every login asks the endpoint,
            # so a revoked token is refused at once.
            conf += [
                "auth_mechanisms = xoauth2 oauthbearer",
                "passdb {",
                "  driver = oauth2",
                "  mechanisms = xoauth2 oauthbearer",
                f"  args = {self._oauth2File}",
                "}",
            ]
        conf += [
            "userdb {",
            "  driver = static",
            f"  args = uid={mailUid} gid={mailGid} home={self.mailDir}/%u",
            "}",
            "mail_location = maildir:~/Maildir",
            "mail_fsync = never",
            "mailbox_idle_check_interval = 1 secs",
            "",
            "namespace inbox {",
            "  inbox = yes",
            "  separator = /",
        ]
        for mailbox, use in SPECIAL_USE_MAILBOXES:
            conf += [
                f"  mailbox {mailbox} {{",
                f"    special_use = {use}",
                "    auto = subscribe" if self.autoMailboxes else "    auto = no",
                "  }",
            ]
        conf += [
            "}",
            "",
            f"default_process_limit = {max(1000, self.maxSessions + 100)}",
            f"default_client_limit = {max(4000, 2 * self.maxSessions + 100)}",
            "default_vsz_limit = 512M",
        ]
        for protocol, plain, tls in (("imap", "imap", "imaps"), ("pop3", "pop3", "pop3s")):
            conf.append(f"service {protocol}-login {{")
            if protocol == "imap" and not self.idle:
                conf.append(f"  executable = {self._wrapperFile}")
            conf += [
                f"  inet_listener {plain} {{",
                f"    address = {self.host}",
                f"    port = {self.ports[plain]}",
                "  }",
                f"  inet_listener {tls} {{",
                f"    address = {self.host}",
                f"    port = {self.ports[tls]}",
                "    ssl = yes",
                "  }",
                "  service_count = 0",
                "  process_min_avail = 1",
                "  client_limit = 1000",
                "  process_limit = 1000",
                *chroot,
                "}",
                f"service {protocol} {{",
                f"  process_limit = {max(1000, self.maxSessions + 100)}",
                "}",
            ]
        # No auth penalty: after a failed login Dovecot delays every further
        # login from that IP (2, 4, ... 15 s), which would make one test's
        # wrong password slow down the next ones.  The penalty is off when
        # the auth process cannot reach anvil's penalty socket: mode 0, and
        # auth runs as the (non-root) internal user.  A failed login is still
        # answered after up to 0.5 s (auth_failure_delay = 0 plus a timer).
        conf += [
            "service anvil {",
            f"  client_limit = {max(4000, 2 * self.maxSessions + 100)}",
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            *chroot,
            "}",
            "service auth {",
            f"  client_limit = {max(4000, 2 * self.maxSessions + 100)}",
            "  user = $default_internal_user",
            "}",
        ]
        if not root:
            for service in ("ipc", "old-stats", "aggregator"):
                conf += [f"service {service} {{", *chroot, "}"]
        conf += [
            "",
            "protocol imap {",
            f"  mail_max_userip_connections = {max(3000, self.maxSessions + 100)}",
            "  mail_plugins = $mail_plugins" + (" imap_zlib" if zlib else ""),
            "  imap_idle_notify_interval = 10 secs",
        ]
        if self.rawlog:
            # logs only users whose home has a rawlog directory (see enableRawlog)
            conf.append("  rawlog_dir = %h/rawlog")
        if not self.idle:
            capability = NO_IDLE_CAPABILITY + (" COMPRESS=DEFLATE" if zlib else "")
            conf.append(f"  imap_capability = {capability}")
        conf += [
            "}",
            "protocol pop3 {",
            "  mail_max_userip_connections = 3000",
            "  pop3_uidl_format = %08Xu%08Xv",
            "}",
        ]
        return "\n".join(conf) + "\n"

    @property
    def _oauth2File(self) -> str:
        return os.path.join(os.path.dirname(self.confFile), "dovecot-oauth2.conf.ext")

    def _writeConfig(self) -> None:
        if self.oauth2IntrospectionUrl is not None:
            # Read once when auth starts: the endpoint's port is fixed by now.
            settings = [
                f"introspection_url = {self.oauth2IntrospectionUrl}",
                "introspection_mode = post",
                "username_attribute = username",
                "active_attribute = active",
                "active_value = true",
                # else a silent endpoint holds a login for 60 s
                "timeout_msecs = 5000",
            ]
            self._writeFile(self._oauth2File, ("\n".join(settings) + "\n").encode(), 0o600)
        if not self.idle:
            self._writeFile(self._wrapperFile, self._imapLoginWrapper().encode(), 0o755)
        self._writeFile(self.confFile, self._config().encode("utf-8"), 0o644)


# -- command line -------------------------------------------------------------


def _parseUser(value: str) -> tuple[str, str]:
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {value!r}")
    return name, password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.dovecot",
        description="Run a private Dovecot IMAP/POP3 server on 127.0.0.1.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start (detached) and print JSON")
    start.add_argument("dir", help="instance directory (config, mail, logs)")
    for name in PORT_NAMES:
        start.add_argument(f"--{name}-port", type=int, metavar="N", dest=f"{name}Port")
    start.add_argument(
        "--user",
        action="append",
        default=[],
        type=_parseUser,
        metavar="NAME:PASSWORD",
        help="add a user (repeatable)",
    )
    start.add_argument("--no-idle", action="store_true", help="do not advertise IDLE")
    stop = commands.add_parser("stop", help="stop the instance in DIR")
    stop.add_argument("dir")
    args = parser.parse_args(argv)

    baseDir = os.path.abspath(args.dir)
    if args.command == "stop":
        pid = stopInstance(baseDir)
        print(json.dumps({"stopped": pid}))
        return 0

    # without options, a directory started before keeps its ports
    ports: dict[str, int] = {}
    for name in PORT_NAMES:
        port = getattr(args, f"{name}Port")
        if port is not None:
            ports[name] = port
    try:
        upstream = DovecotUpstream(baseDir, idle=not args.no_idle, ports=ports)
        upstream.addUsers(dict(args.user))
        upstream.start()
    except (RuntimeError, ValueError) as e:
        print(f"tests.dovecot: {e}", file=sys.stderr)
        return 1
    info = upstream.info()
    print(json.dumps({k: info[k] for k in ("pid", "host", "ports", "caFile", "certFile", "keyFile")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
