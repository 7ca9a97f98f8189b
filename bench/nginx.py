"""
nginx's mail proxy as a peer: a private nginx (own prefix, config, pid file
and logs in a temporary directory, nothing under /etc/nginx read), proxying
IMAP and POP3 on 127.0.0.1 to the private Dovecot.

nginx delegates authentication to an C{auth_http} server; the bench answers
it itself (an http.server in a thread) with C{Auth-Status: OK} and the
Dovecot port for the protocol asked about, so nginx never checks a password:
Dovecot does, when nginx logs in upstream with the client's credentials.

Install with C{make bench-deps} (Debian: nginx, libnginx-mod-mail).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.common import HOST, PeerProcess, freePort, waitForGreeting
from tests.proxyprocess import tail

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def findNginx() -> tuple[str | None, str]:
    """
    (path of nginx, "") when nginx with the mail module is installed, else
    (None, why not).
    """
    binary = shutil.which("nginx") or next((path for path in NGINX_PATHS if os.access(path, os.X_OK)), None)
    if binary is None:
        return None, "nginx is not installed (make bench-deps installs nginx and libnginx-mod-mail)"
    if not os.path.exists(MAIL_MODULE):
        return None, f"nginx's mail module is missing ({MAIL_MODULE}; make bench-deps installs libnginx-mod-mail)"
    return binary, ""


class _AuthHandler(BaseHTTPRequestHandler):
    """
    nginx's auth_http protocol: every login is accepted and sent to the
    upstream port for its protocol (C{Auth-Protocol: imap} or C{pop3}).
    """

    server: AuthHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        port = self.server.upstreamPorts.get(self.headers.get("Auth-Protocol", ""))
        self.send_response(200)
        if port is None:
            self.send_header("Auth-Status", "unknown protocol")
        else:
            self.send_header("Auth-Status", "OK")
            self.send_header("Auth-Server", HOST)
            self.send_header("Auth-Port", str(port))
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.requests += 1

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # one line per login would swamp the bench output
        pass


class AuthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstreamPorts: dict[str, int]) -> None:
        super().__init__((HOST, 0), _AuthHandler)
        self.upstreamPorts = upstreamPorts
        self.requests = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


CONFIG = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {files};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections {connections};
}}
mail {{
    server_name localhost;
    auth_http {host}:{authPort}/auth;
    proxy_pass_error_message on;
    # the same buffer for both directions: nginx's default is one page (4 KiB)
    proxy_buffer {buffer};
    imap_capabilities IMAP4rev1 LITERAL+ SASL-IR IDLE UIDPLUS MOVE;
    imap_auth plain;
    pop3_auth plain;
    pop3_capabilities TOP USER UIDL PIPELINING;
    server {{
        listen {host}:{imapPort};
        protocol imap;
    }}
    server {{
        listen {host}:{pop3Port};
        protocol pop3;
    }}
}}
"""


class NginxMailProxy(PeerProcess):
    """
    A private nginx mail proxy in C{directory}, proxying to C{imapPort} and
    C{pop3Port} on 127.0.0.1; stopped by PID.
    """

    def __init__(
        self, binary: str, directory: str, imapPort: int, pop3Port: int, connections: int = 4096, buffer: str = "64k"
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.auth = AuthHTTPServer({"imap": imapPort, "pop3": pop3Port})
        self.ports = {"imap": freePort(), "pop3": freePort()}
        self.configPath = os.path.join(directory, "nginx.conf")
        self.errorLog = os.path.join(directory, "error.log")
        self.buffer = buffer
        with open(self.configPath, "w") as handle:
            handle.write(
                CONFIG.format(
                    module=MAIL_MODULE,
                    directory=directory,
                    files=2 * connections + 64,
                    connections=connections,
                    host=HOST,
                    authPort=self.auth.port,
                    buffer=buffer,
                    imapPort=self.ports["imap"],
                    pop3Port=self.ports["pop3"],
                )
            )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.auth.start()
        with open(os.path.join(self.directory, "stderr.log"), "wb") as errors:
            # -e: the error log before the config is read (else /var/log/nginx)
            self.process = subprocess.Popen(
                [self.binary, "-p", self.directory + "/", "-c", self.configPath, "-e", self.errorLog],
                stdin=subprocess.DEVNULL,
                stdout=errors,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        waitForGreeting(self.process, self.ports["imap"], "nginx", self.output, self.stop)

    def output(self) -> str:
        return tail(os.path.join(self.directory, "stderr.log")) + tail(self.errorLog)

    def stop(self) -> None:
        self.stopProcess()
        self.auth.stop()
