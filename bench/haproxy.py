"""
haproxy in TCP mode as a peer: a plain byte relay in front of the private
Dovecot (no IMAP awareness, no authentication of its own), the floor any
proxy's overhead can be measured against.

A private haproxy: its own configuration in a temporary directory, run in
the foreground (C{-db}) and stopped by PID; nothing under /etc/haproxy is
read. Install with C{make bench-deps} (Debian: haproxy).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from bench.common import HOST, PeerProcess, freePort, waitForGreeting
from tests.proxyprocess import tail

HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")

CONFIG = """\
global
    maxconn {maxconn}
    nbthread {threads}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend imap
    bind {host}:{imapPort}
    default_backend imap
frontend pop3
    bind {host}:{pop3Port}
    default_backend pop3
backend imap
    server dovecot {host}:{upstreamImap}
backend pop3
    server dovecot {host}:{upstreamPop3}
"""


def findHaproxy() -> tuple[str | None, str]:
    """
    (path of haproxy, "") when installed, else (None, why not).
    """
    binary = shutil.which("haproxy") or next((path for path in HAPROXY_PATHS if os.access(path, os.X_OK)), None)
    if binary is None:
        return None, "haproxy is not installed (make bench-deps installs it)"
    return binary, ""


def haproxyVersion(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (result.stdout or result.stderr).strip().splitlines()[:1]
    return first[0].split(" - ")[0] if first else "haproxy"


class HaproxyTcpProxy(PeerProcess):
    """
    A private haproxy relaying C{imapPort} and C{pop3Port} on 127.0.0.1
    byte for byte, with C{threads} threads (haproxy's default is one per
    CPU; set here so the note can say it).
    """

    def __init__(
        self,
        binary: str,
        directory: str,
        imapPort: int,
        pop3Port: int,
        connections: int = 4096,
        threads: int = 0,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.ports = {"imap": freePort(), "pop3": freePort()}
        self.configPath = os.path.join(directory, "haproxy.cfg")
        self.outputPath = os.path.join(directory, "haproxy.log")
        with open(self.configPath, "w") as handle:
            handle.write(
                CONFIG.format(
                    maxconn=connections,
                    threads=self.threads,
                    host=HOST,
                    imapPort=self.ports["imap"],
                    pop3Port=self.ports["pop3"],
                    upstreamImap=imapPort,
                    upstreamPop3=pop3Port,
                )
            )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.outputPath, "wb") as output:
            # -db: foreground, no daemon; the pid is ours to stop
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", self.configPath],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        waitForGreeting(self.process, self.ports["imap"], "haproxy", lambda: tail(self.outputPath), self.stop)

    def stop(self) -> None:
        self.stopProcess()
