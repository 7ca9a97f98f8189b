"""
The private slapd of L{tests.slapd} does what the LDAP backend's tests rely
on: a deployment's access rules, TLS a client can verify, and a log of the
connections and operations.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.slapd import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, SlapdServer, binary

pytestmark = pytest.mark.skipif(binary() is None, reason="slapd is not installed (apt-get install slapd ldap-utils)")


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    with SlapdServer() as server:
        server.addUser("alice", "alice pw ü", extraAttributes={"mailProxyUpstream": ["imap"]})
        yield server


def test_serviceAccountReadsPasswords(directory: SlapdServer) -> None:
    """
    The service account, bound over StartTLS verified with the CA, finds a
    user and reads the hash; slapd logs the search and who bound.
    """
    mark = directory.logMark()
    found = directory.search(
        PEOPLE,
        "(uid=alice)",
        ["userPassword", "mailProxyUpstream"],
        bindDn=SERVICE_DN,
        password=SERVICE_PASSWORD,
        url=directory.url("ldap"),
        startTLS=True,
    )
    assert "dn: uid=alice,ou=people,dc=example,dc=org" in found
    # ldapsearch always prints userPassword in base64.
    hashed = re.search(r"^userPassword:: (\S+)$", found, re.MULTILINE)
    assert hashed is not None and base64.b64decode(hashed.group(1)).startswith(b"{SSHA}")
    assert "mailProxyUpstream: imap" in found
    assert directory.connectionsAccepted(mark) == 1
    assert directory.binds(mark, succeeded=True) == [SERVICE_DN]
    assert directory.searches(mark) == [(PEOPLE, "(uid=alice)")]


def test_anonymousCannotRead(directory: SlapdServer) -> None:
    """
    Anonymous clients see nothing under the suffix (not even that the
    entry exists) but the root DSE.
    """
    found = directory.search(
        PEOPLE, "(uid=alice)", ["userPassword"], bindDn=None, url=directory.url("ldaps"), check=False
    )
    assert "userPassword" not in found
    assert "No such object (32)" in found
    rootDse = directory.run(["ldapsearch", "-x", "-LLL", "-H", directory.url("ldap"), "-b", "", "-s", "base", "+"])
    assert "supportedExtension: 1.3.6.1.4.1.1466.20037" in rootDse.stdout  # StartTLS


def test_userBindsOverTls(directory: SlapdServer) -> None:
    """
    A user's password (stored as {SSHA}) binds over LDAPS and StartTLS;
    a wrong one is refused with invalidCredentials.
    """
    dn = "uid=alice,ou=people,dc=example,dc=org"
    for extra in (["-H", directory.url("ldaps")], ["-ZZ", "-H", directory.url("ldap")]):
        done = directory.run(["ldapwhoami", "-x", *extra, "-D", dn, "-w", "alice pw ü"])
        assert done.stdout.strip() == f"dn:{dn}"
    mark = directory.logMark()
    wrong = directory.run(["ldapwhoami", "-x", "-H", directory.url("ldaps"), "-D", dn, "-w", "wrong"], check=False)
    assert wrong.returncode == 49
    assert "RESULT tag=97 err=49" in directory.log(mark)


def test_wrongNameFailsVerification() -> None:
    """
    A certificate for another name fails verification; the same search
    succeeds when the client does not check it.
    """
    with SlapdServer(serverNames=("mail.example.net",)) as server:
        for extra in (["-H", server.url("ldaps")], ["-ZZ", "-H", server.url("ldap")]):
            command = ["ldapsearch", "-x", *extra, "-b", "", "-s", "base"]
            assert server.run(command, check=False).returncode != 0
            server.run(command, extraEnvironment={"LDAPTLS_REQCERT": "never"})


def test_restartKeepsData(directory: SlapdServer) -> None:
    """
    stop and start again: the same ports serve the same entries; a frozen
    server hangs until thawed.
    """
    directory.addUser("bob", "bobpw")
    ports = directory.ldapPort, directory.ldapsPort
    directory.stop()
    directory.start()
    assert (directory.ldapPort, directory.ldapsPort) == ports
    assert "uid: bob" in directory.search(PEOPLE, "(uid=bob)", ["uid"], url=directory.url("ldaps"))
    directory.freeze()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            directory.run(["ldapsearch", "-x", "-H", directory.url("ldap"), "-b", "", "-s", "base"], timeout=0.5)
    finally:
        directory.thaw()
    directory.run(["ldapsearch", "-x", "-H", directory.url("ldap"), "-b", "", "-s", "base"], timeout=5)
