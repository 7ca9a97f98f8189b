"""
A private PostgreSQL cluster on 127.0.0.1 for tests and benchmarks.

It never touches the system's clusters: ``initdb`` makes a new one in a
temporary directory, and ``postgres`` serves it on a free high port (TCP on
127.0.0.1 only, its Unix socket in the same directory).  The superuser
``mailproxy_admin`` connects over the socket without a password; the
account the proxy uses logs in over TCP with a password (SCRAM), as a
deployment's would.

PostgreSQL refuses to run as root: as root, the cluster belongs to the
``postgres`` system user (Debian's package creates it), and its directory
is made in ``/tmp`` where that user can reach it.

Library use::

    with PostgresCluster() as cluster:
        cluster.sql("CREATE TABLE t (x int)")
        cluster.conninfo()  # for the proxy's account
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
ADMIN = "mailproxy_admin"
DATABASE = "mail"
PROXY_ROLE, PROXY_PASSWORD = "mailproxy", "proxy's db pw"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def binaries() -> str | None:
    """
    The directory of Debian's PostgreSQL programs (the newest installed),
    or C{None} if there is none.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return os.path.dirname(found[-1]) if found else None


def _version(path: str) -> tuple[int, ...]:
    version = path.split("/")[4]
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _freePort() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """
    A cluster of its own, started on entry and removed on exit.
    """

    def __init__(self) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bindir = bindir
        self.port = _freePort()
        self.process: subprocess.Popen[bytes] | None = None
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.directory = tempfile.mkdtemp(prefix="mp-pg-", dir="/tmp")
        self.dataDirectory = os.path.join(self.directory, "data")
        self.logFile = os.path.join(self.directory, "postgres.log")

    def __enter__(self) -> PostgresCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT, **self._as(), **kwargs)

    def _as(self) -> dict[str, Any]:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def start(self) -> None:
        if self.owner is not None:
            os.chown(self.directory, self.owner.pw_uid, self.owner.pw_gid)
        passwordFile = os.path.join(self.directory, "admin-password")
        with open(passwordFile, "w") as handle:
            handle.write("unused\n")
        if self.owner is not None:
            os.chown(passwordFile, self.owner.pw_uid, self.owner.pw_gid)
        self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D",
                self.dataDirectory,
                "-U",
                ADMIN,
                "--pwfile",
                passwordFile,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        with open(self.logFile, "wb") as log:
            self.process = subprocess.Popen(
                [
                    os.path.join(self.bindir, "postgres"),
                    "-D",
                    self.dataDirectory,
                    "-p",
                    str(self.port),
                    "-k",
                    self.directory,
                    "-c",
                    f"listen_addresses={HOST}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "log_connections=on",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as(),
            )
        self._awaitReady()
        self.sql(f"CREATE DATABASE {DATABASE}", database="postgres")
        self.sql(f"CREATE ROLE {PROXY_ROLE} LOGIN PASSWORD '{PROXY_PASSWORD.replace(chr(39), chr(39) * 2)}'")

    def _awaitReady(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}:\n{self.log()[-3000:]}")
            ready = subprocess.run(
                [os.path.join(self.bindir, "pg_isready"), "-h", self.directory, "-p", str(self.port), "-q"],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready in {START_TIMEOUT} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            with open(self.logFile, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def sql(self, statement: str, database: str = DATABASE) -> str:
        """
        Run C{statement} as the superuser (psql over the Unix socket);
        return what it printed (unaligned, tuples only).
        """
        done = self._run(
            [
                os.path.join(self.bindir, "psql"),
                "-h",
                self.directory,
                "-p",
                str(self.port),
                "-U",
                ADMIN,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                statement,
            ]
        )
        return done.stdout.decode()

    def conninfo(self, password: str = PROXY_PASSWORD) -> str:
        """
        What the proxy connects with: TCP on 127.0.0.1, its own role.
        """
        quoted = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"host={HOST} port={self.port} dbname={DATABASE} user={PROXY_ROLE} password='{quoted}'"

    def stop(self) -> None:
        """
        Stop the server (the process this started, by its PID) and remove
        the cluster.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            # SIGINT: PostgreSQL's fast shutdown (disconnects clients).
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def freeze(self) -> None:
        """
        Stop the server and its backends dead (SIGSTOP): connections stay
        open and nothing answers, as with a hung server.  L{thaw} undoes it.
        """
        for pid in self._tree():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._tree():
            os.kill(pid, signal.SIGCONT)

    def _tree(self) -> list[int]:
        from tests.proxyprocess import processTree

        assert self.process is not None
        # (Each backend runs in a process group of its own: the postmaster's
        # group alone would leave them answering.)
        return processTree(self.process.pid)

    def pause(self) -> None:
        """
        Stop the server but keep the cluster (an outage); L{resume} serves
        it again on the same port.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        self.process.wait(STOP_TIMEOUT)

    def resume(self) -> None:
        assert self.process is not None and self.process.poll() is not None
        with open(self.logFile, "ab") as log:
            self.process = subprocess.Popen(
                self.process.args,  # type: ignore[arg-type]
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as(),
            )
        self._awaitReady()
