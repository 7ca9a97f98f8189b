"""
A private OpenLDAP directory on 127.0.0.1 for tests and benchmarks.

It never touches the system's slapd or its configuration: everything (an
old-style ``slapd.conf``, the certificates, the MDB database, the ldapi
socket and the log) lives in one temporary directory, and ``slapd`` serves
it on two free high ports on 127.0.0.1: ``ldap://`` (StartTLS) and
``ldaps://``.  The certificate is issued by a trustme CA for ``localhost``
and ``127.0.0.1`` (or other names, to see hostname verification fail).

The access rules are a deployment's: the service account the proxy binds
as (L{SERVICE_DN}) reads everything, userPassword included; users read
their own entry and change their own password; anonymous clients may only
bind (and read the root DSE and the schema, which clients probe).
Administration (L{SlapdServer.addUser}, L{SlapdServer.search}, ...) binds
as the rootdn over the ldapi socket, so it adds no TCP connection to what a
test counts in the log.

slapd runs in the foreground with the ``stats`` debug level, its log in the
directory: L{SlapdServer.log} has each ``ACCEPT``, ``BIND``, ``SRCH`` and
``RESULT`` the proxy caused.

Library use::

    with SlapdServer() as directory:
        directory.addUser("alice", "alicepw", extraAttributes={"mailProxyUpstream": ["imap"]})
        directory.url("ldaps"), directory.caFile
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import trustme

__all__ = [
    "ACCESS",
    "HOST",
    "PEOPLE",
    "ROOT_DN",
    "ROOT_PASSWORD",
    "SERVICE_DN",
    "SERVICE_PASSWORD",
    "SERVICES",
    "SUFFIX",
    "SlapdServer",
    "binary",
    "escapeDnValue",
    "ldifLine",
    "userDn",
]

HOST = "127.0.0.1"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICES = f"ou=services,{SUFFIX}"
ROOT_DN, ROOT_PASSWORD = f"cn=admin,{SUFFIX}", "directory admin pw"
SERVICE_DN, SERVICE_PASSWORD = f"cn=mailproxy,{SERVICES}", "mailproxy's ldap pw"
MAIL_DOMAIN = "example.org"
SERVER_NAMES = ("localhost", "127.0.0.1")

MODULE_PATH = "/usr/lib/ldap"
SYSTEM_SCHEMAS = tuple(f"/etc/ldap/schema/{name}.schema" for name in ("core", "cosine", "nis", "inetorgperson"))
MAILPROXY_SCHEMA = Path(__file__).resolve().parent.parent / "etc/ldap/mailproxy.schema"
MAP_SIZE = 64 * 1024 * 1024
# stats (256): ACCEPT, BIND, SRCH, RESULT and closed, one line each;
# none (32768): what slapd logs at any level, configuration errors included.
DEBUG_LEVEL = 256 | 32768

# The root DSE and the schema are public (clients read them to find
# StartTLS and attribute syntaxes); all else is the service account's, and
# each user's own entry is theirs.  Rules in the global section, as here,
# apply to every database and the frontend alike.
ACCESS = f"""\
access to dn.base=""
    by * read
access to dn.base="cn=Subschema"
    by * read
access to attrs=userPassword
    by dn.exact="{SERVICE_DN}" read
    by self write
    by anonymous auth
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    by self read
    by * none
"""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TOOL_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


def binary() -> str | None:
    """
    The path of C{slapd} (it lives in sbin, often not in a user's PATH),
    or C{None} if it is not installed.
    """
    searchPath = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which("slapd", path=searchPath)


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/bin"]))
    if found is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install slapd ldap-utils)")
    return found


def _freePorts(count: int) -> list[int]:
    # All stay bound until each is picked, so that they differ.
    probes: list[socket.socket] = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probes.append(probe)
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def escapeDnValue(value: str) -> str:
    """
    C{value} as an RDN value (RFC 4514), so that a test's odd user name
    still makes one entry.
    """
    escaped = re.sub(r'([,+"\\<>;=])', r"\\\1", value).replace("\0", "\\00")
    if len(value) > 1 and value.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    if value.startswith((" ", "#")):
        escaped = "\\" + escaped
    return escaped


def userDn(uid: str) -> str:
    return f"uid={escapeDnValue(uid)},{PEOPLE}"


_SAFE_LDIF = re.compile(r"[\x01-\x09\x0b\x0c\x0e-\x1f\x21-\x39\x3b\x3d-\x7f][\x01-\x09\x0b\x0c\x0e-\x7f]*")


def ldifLine(name: str, value: str) -> str:
    """
    One LDIF attribute line; values LDIF cannot carry as they are (8-bit,
    leading space, colon or <, trailing space, line breaks) go in base64.
    """
    if value == "" or (_SAFE_LDIF.fullmatch(value) and not value.endswith(" ")):
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}"


def _tail(text: str, size: int = 3000) -> str:
    return text[-size:]


class SlapdServer:
    """
    A directory of its own, started on entry and removed on exit.

    C{ca} issues the server's certificate for C{serverNames} (a new CA if
    none: L{caFile} is its certificate); C{access} replaces the L{ACCESS}
    rules (slapd.conf C{access to} lines).

    L{stop} and L{start} again keep the ports and the entries (an outage
    and its end); L{freeze} and L{thaw} make it hang with connections open.
    """

    def __init__(
        self, ca: trustme.CA | None = None, serverNames: Sequence[str] = SERVER_NAMES, access: str = ACCESS
    ) -> None:
        slapd = binary()
        if slapd is None:
            raise RuntimeError("slapd is not installed (Debian: apt-get install slapd ldap-utils)")
        self.slapd = slapd
        self.ca = ca if ca is not None else trustme.CA(organization_name="mailproxy tests")
        self.serverNames = tuple(serverNames)
        self.access = access
        self.host = HOST
        self.ldapPort, self.ldapsPort = _freePorts(2)
        self.process: subprocess.Popen[bytes] | None = None
        self._seeded = False
        self.directory = tempfile.mkdtemp(prefix="mp-ldap-", dir="/tmp")
        self.configFile = os.path.join(self.directory, "slapd.conf")
        self.databaseDirectory = os.path.join(self.directory, "db")
        self.socketPath = os.path.join(self.directory, "ldapi")
        self.logFile = os.path.join(self.directory, "slapd.log")
        self.caFile = os.path.join(self.directory, "ca.pem")
        self.certFile = os.path.join(self.directory, "server.pem")
        self.keyFile = os.path.join(self.directory, "server.key")
        # The clients' own ldap.conf: never the user's ~/.ldaprc or /etc/ldap/ldap.conf.
        self.clientConfigFile = os.path.join(self.directory, "ldap.conf")

    def __enter__(self) -> SlapdServer:
        try:
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()

    # Addresses

    def url(self, scheme: str = "ldap") -> str:
        """
        The server's URL for C{scheme}: C{ldap} (StartTLS available),
        C{ldaps} or C{ldapi} (the rootdn's socket).
        """
        if scheme == "ldap":
            return f"ldap://{self.host}:{self.ldapPort}"
        if scheme == "ldaps":
            return f"ldaps://{self.host}:{self.ldapsPort}"
        if scheme == "ldapi":
            return "ldapi://" + urllib.parse.quote(self.socketPath, safe="")
        raise ValueError(f"no {scheme} URL")

    # Life cycle

    def start(self) -> None:
        """
        Serve the directory and return once it answers; the first time,
        also write the configuration and certificates and add the base
        entries.
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("slapd is already running")
        if not os.path.exists(self.configFile):
            self._configure()
        with open(self.logFile, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.slapd,
                    "-f",
                    self.configFile,
                    "-h",
                    " ".join((self.url("ldap"), self.url("ldaps"), self.url("ldapi"))),
                    "-d",
                    str(DEBUG_LEVEL),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.directory,
            )
        try:
            self._awaitReady()
            if not self._seeded:
                self._seed()
                self._seeded = True
        except BaseException:
            self.stop()
            raise

    def _configure(self) -> None:
        os.makedirs(self.databaseDirectory, exist_ok=True)
        leaf = self.ca.issue_cert(*self.serverNames, common_name=self.serverNames[0] if self.serverNames else None)
        _write(self.caFile, self.ca.cert_pem.bytes(), 0o644)
        _write(self.certFile, b"".join(blob.bytes() for blob in leaf.cert_chain_pems), 0o644)
        _write(self.keyFile, leaf.private_key_pem.bytes(), 0o600)
        includes = "".join(f"include {path}\n" for path in (*SYSTEM_SCHEMAS, str(MAILPROXY_SCHEMA)))
        _write(
            self.configFile,
            (
                f"{includes}\n"
                f"pidfile {self.directory}/slapd.pid\n"
                f"argsfile {self.directory}/slapd.args\n"
                f"modulepath {MODULE_PATH}\n"
                "moduleload back_mdb\n"
                f"TLSCACertificateFile {self.caFile}\n"
                f"TLSCertificateFile {self.certFile}\n"
                f"TLSCertificateKeyFile {self.keyFile}\n"
                "\n"
                f"{self.access}\n"
                "database mdb\n"
                f"suffix {SUFFIX}\n"
                f"rootdn {ROOT_DN}\n"
                f"rootpw {self.hashPassword(ROOT_PASSWORD)}\n"
                f"directory {self.databaseDirectory}\n"
                f"maxsize {MAP_SIZE}\n"
                "dbnosync\n"
                "index objectClass eq\n"
                "index uid,mail eq\n"
            ).encode(),
            0o600,
        )
        _write(
            self.clientConfigFile,
            f"TLS_CACERT {self.caFile}\nTLS_REQCERT demand\n".encode(),
            0o644,
        )

    def _awaitReady(self) -> None:
        """
        Wait for an anonymous root DSE search to succeed on the ldap port
        (a listening socket alone may precede the database being open).
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited {self.process.returncode}:\n{_tail(self.log())}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd not ready in {START_TIMEOUT} s:\n{_tail(self.log())}")
            time.sleep(POLL_INTERVAL)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.ldapPort), timeout=1):
                pass
        except OSError:
            return False
        try:
            done = subprocess.run(
                [_tool("ldapsearch"), "-x", "-H", self.url("ldap"), "-o", "nettimeout=2", "-b", "", "-s", "base"],
                capture_output=True,
                env=self.environment(init=False),
                cwd=self.directory,
                timeout=5,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def _seed(self) -> None:
        self.add(
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
            f"dn: {SERVICES}\nobjectClass: organizationalUnit\nou: services\n\n"
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: mailproxy\n{ldifLine('userPassword', self.hashPassword(SERVICE_PASSWORD))}\n"
        )

    def stop(self) -> None:
        """
        Stop the server (the process this started, by its PID) and keep the
        directory: L{start} serves it again on the same ports.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            # A frozen server cannot act on SIGTERM.
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    pause = stop
    resume = start

    def remove(self) -> None:
        """
        Stop the server and delete its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def freeze(self) -> None:
        """
        Stop slapd dead (SIGSTOP): connections stay open and nothing
        answers, as with a hung directory.  L{thaw} undoes it.
        """
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # The log

    def log(self, since: int = 0) -> str:
        """
        slapd's log (all runs), from the offset C{since} (see L{logMark}).
        """
        try:
            with open(self.logFile, "rb") as handle:
                handle.seek(since)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def logMark(self) -> int:
        """
        Where the log ends now: pass it to L{log} and the helpers below to
        see only what follows.
        """
        try:
            return os.path.getsize(self.logFile)
        except OSError:
            return 0

    def connectionsAccepted(self, since: int = 0) -> int:
        """
        How many TCP connections slapd accepted (not the ldapi socket's,
        which administration uses).
        """
        return len(re.findall(r" ACCEPT from IP=", self.log(since)))

    def binds(self, since: int = 0, succeeded: bool = False) -> list[str]:
        """
        The DNs of the simple binds, in order (C{""} for anonymous); with
        C{succeeded}, only those that succeeded (slapd logs a second BIND
        line with the mechanism for these).
        """
        pattern = r' BIND dn="(.*)" mech=SIMPLE ' if succeeded else r' BIND dn="(.*)" method=128$'
        return re.findall(pattern, self.log(since), re.MULTILINE)

    def searches(self, since: int = 0) -> list[tuple[str, str]]:
        """
        The (base, filter) of each search, in slapd's normalised form
        (assertion values escaped as C{\\2A}, C{\\28}, ...).
        """
        return re.findall(r' SRCH base="(.*)" scope=\d+ deref=\d+ filter="(.*)"$', self.log(since), re.MULTILINE)

    # Administration (the rootdn over ldapi)

    def environment(self, init: bool = True) -> dict[str, str]:
        """
        The environment for ldap-utils: the server's CA with verification
        required, and neither the user's C{~/.ldaprc} nor the system's
        C{ldap.conf}.  C{init=False}: no defaults at all (C{LDAPNOINIT}),
        so no LDAPTLS_* variable either.
        """
        environment = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": self.directory,
            "LDAPCONF": self.clientConfigFile,
            "LDAPRC": "no-such-ldaprc",
        }
        if init:
            environment.update(LDAPTLS_CACERT=self.caFile, LDAPTLS_REQCERT="demand")
        else:
            environment["LDAPNOINIT"] = "1"
        return environment

    def run(
        self,
        command: Sequence[str],
        input: str | None = None,
        init: bool = True,
        check: bool = True,
        timeout: float = TOOL_TIMEOUT,
        extraEnvironment: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run an ldap-utils program (C{command[0]} found in the PATH) with
        L{environment} and C{extraEnvironment} (e.g. C{LDAPTLS_REQCERT});
        raise with its output if it fails and C{check}.
        """
        done = subprocess.run(
            [_tool(command[0]), *command[1:]],
            input=input,
            capture_output=True,
            text=True,
            env={**self.environment(init), **(extraEnvironment or {})},
            cwd=self.directory,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:1])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def _admin(self, program: str, *arguments: str, input: str | None = None) -> str:
        done = self.run(
            [program, "-x", "-H", self.url("ldapi"), "-D", ROOT_DN, "-w", ROOT_PASSWORD, *arguments],
            input=input,
            init=False,
        )
        return done.stdout

    def hashPassword(self, password: str, scheme: str = "{SSHA}") -> str:
        """
        C{password} hashed by slappasswd, as an administrator would store it.
        """
        done = subprocess.run(
            [_tool("slappasswd"), "-h", scheme, "-s", password],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=True,
        )
        return done.stdout.strip()

    def add(self, ldif: str) -> None:
        """
        Add the entries of C{ldif}.
        """
        self._admin("ldapadd", input=ldif)

    def addUser(
        self,
        uid: str,
        password: str | None,
        *,
        passwordHash: str | None = None,
        extraAttributes: Mapping[str, Iterable[str]] | None = None,
        objectClasses: Sequence[str] = ("inetOrgPerson",),
    ) -> str:
        """
        Add C{uid=UID,ou=people,...}: an inetOrgPerson (cn, sn, uid, mail;
        C{extraAttributes} add to or replace these), with the auxiliary
        class mailProxyAccount when a mailProxy* attribute is given.  Its
        userPassword is C{passwordHash} verbatim, or C{password} salted and
        hashed ({SSHA}); none if both are C{None}.  Return the DN.
        """
        attributes: dict[str, list[str]] = {
            "cn": [uid],
            "sn": [uid],
            "uid": [uid],
            "mail": [f"{uid}@{MAIL_DOMAIN}"],
        }
        if passwordHash is not None:
            attributes["userPassword"] = [passwordHash]
        elif password is not None:
            attributes["userPassword"] = [self.hashPassword(password)]
        for name, values in (extraAttributes or {}).items():
            attributes[name] = list(values)
        classes = list(objectClasses)
        if any(name.lower().startswith("mailproxy") for name in attributes) and "mailproxyaccount" not in {
            objectClass.lower() for objectClass in classes
        }:
            classes.append("mailProxyAccount")
        dn = userDn(uid)
        lines = [ldifLine("dn", dn), *(ldifLine("objectClass", objectClass) for objectClass in classes)]
        lines += [ldifLine(name, value) for name, values in attributes.items() for value in values]
        self.add("\n".join(lines) + "\n")
        return dn

    def modify(self, dn: str, changes: str) -> None:
        """
        Apply C{changes} (the LDIF of a modify after C{changetype: modify},
        e.g. C{"replace: mail\\nmail: a@b\\n-\\n"}) to C{dn}.
        """
        self._admin("ldapmodify", input=f"{ldifLine('dn', dn)}\nchangetype: modify\n{changes}")

    def setAttribute(self, dn: str, name: str, values: Iterable[str]) -> None:
        """
        Replace the values of C{name}; no values removes the attribute.
        """
        lines = [f"replace: {name}", *(ldifLine(name, value) for value in values), "-"]
        self.modify(dn, "\n".join(lines) + "\n")

    def setPassword(self, uid: str, password: str) -> None:
        self.setAttribute(userDn(uid), "userPassword", [self.hashPassword(password)])

    def deleteEntry(self, dn: str) -> None:
        self._admin("ldapdelete", dn)

    def search(
        self,
        base: str = SUFFIX,
        filter: str = "(objectClass=*)",
        attrs: Sequence[str] = (),
        *,
        bindDn: str | None = ROOT_DN,
        password: str = ROOT_PASSWORD,
        url: str | None = None,
        startTLS: bool = False,
        check: bool = True,
    ) -> str:
        """
        ldapsearch's LDIF (C{-LLL}, unwrapped; base64 for values it cannot
        print as they are) of a subtree search, bound as C{bindDn} (C{None}:
        anonymously) over C{url} (the ldapi socket by default).  With
        C{check=False} a failure (e.g. C{No such object (32)}, what
        anonymous clients get) returns its output instead of raising.
        """
        command = ["ldapsearch", "-x", "-LLL", "-o", "ldif_wrap=no", "-H", url or self.url("ldapi")]
        if startTLS:
            command.append("-ZZ")
        if bindDn is not None:
            command += ["-D", bindDn, "-w", password]
        done = self.run([*command, "-b", base, filter, *attrs], check=check)
        return done.stdout + done.stderr if done.returncode else done.stdout


def _write(path: str, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(descriptor, "wb") as handle:
        handle.write(data)
