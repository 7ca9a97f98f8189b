"""
Password hashing, the users file and the C{python -m mailproxy.passwd} tool.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailproxy.passwords import (
    UsersFileError,
    hashPassword,
    isValidHash,
    isValidUserName,
    readUsers,
    verifyPassword,
    writeUser,
)

FAST = {"log2N": 10}


def test_hash_then_verify_accepts_the_password() -> None:
    """A password verifies against its own hash, including non-ASCII passwords."""
    for password in ("correct horse", 'p"ä ß \\ 東京'):
        encoded = hashPassword(password, **FAST)
        assert verifyPassword(password.encode("utf-8"), encoded)


def test_hash_has_documented_format_and_parameters() -> None:
    """hashPassword produces $scrypt$ln=..,r=..,p=..$salt$key with the requested parameters."""
    encoded = hashPassword("pw", log2N=10, r=4, p=2)
    assert encoded.startswith("$scrypt$ln=10,r=4,p=2$")
    assert isValidHash(encoded)
    assert "=" not in encoded.split("$")[-1] and "=" not in encoded.split("$")[-2]


def test_hashes_of_the_same_password_use_fresh_salts() -> None:
    """Two hashes of one password differ but both verify."""
    first, second = hashPassword("same", **FAST), hashPassword("same", **FAST)
    assert first != second
    assert verifyPassword(b"same", first) and verifyPassword(b"same", second)


@pytest.mark.parametrize("wrong", [b"correct hors", b"correct horse ", b"Correct horse", b""])
def test_wrong_password_is_rejected(wrong: bytes) -> None:
    """Any other password, including near misses and the empty one, fails verification."""
    assert not verifyPassword(wrong, hashPassword("correct horse", **FAST))


def test_tampered_key_is_rejected() -> None:
    """Changing one character of the stored key makes the right password fail."""
    encoded = hashPassword("pw", **FAST)
    # The key's first character carries six real bits (the last one may
    # carry padding bits only).
    head, _, key = encoded.rpartition("$")
    tampered = f"{head}${'A' if key[0] != 'A' else 'B'}{key[1:]}"
    assert not verifyPassword(b"pw", tampered)


SALT = "c2FsdHNhbHRzYWx0c2FsdA"
KEY = "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U"

MALFORMED = [
    "",
    "plaintext",
    f"$bcrypt$ln=10,r=8,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=8,p=1${SALT}",
    f"$scrypt$ln=10,r=8${SALT}${KEY}",
    f"$scrypt$ln=0,r=8,p=1${SALT}${KEY}",
    f"$scrypt$ln=23,r=8,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=8,p=1${SALT}!${KEY}",
    f"$scrypt$ln=10,r=8,p=1${SALT}${KEY}\n",
    f"$scrypt$ln=10,r=8,p=1${SALT}==${KEY}",
    f" $scrypt$ln=10,r=8,p=1${SALT}${KEY}",
]


@pytest.mark.parametrize("encoded", MALFORMED)
def test_malformed_hash_is_invalid_and_never_verifies(encoded: str) -> None:
    """Strings not in the $scrypt$ format are invalid hashes and verify nothing."""
    assert not isValidHash(encoded)
    assert verifyPassword(b"pw", encoded) is False


@pytest.mark.parametrize(
    "encoded",
    [
        f"$scrypt$ln=10,r=8,p=1$A${KEY}",  # salt of 4k+1 base64 characters cannot be decoded
        f"$scrypt$ln=10,r=8,p=1${SALT}$A",  # same for the key
        f"$scrypt$ln=10,r=0,p=1${SALT}${KEY}",  # r = 0
        f"$scrypt$ln=10,r=8,p=0${SALT}${KEY}",  # p = 0
        f"$scrypt$ln=22,r=8,p=1${SALT}${KEY}",  # needs more memory than hashlib allows
        f"$scrypt$ln=10,r=99999999,p=1${SALT}${KEY}",
    ],
    ids=["salt-not-base64", "key-not-base64", "r-zero", "p-zero", "ln-22", "r-huge"],
)
def test_well_formed_but_unusable_hash_verifies_false_without_raising(encoded: str) -> None:
    """A hash that matches the format but cannot be computed makes verifyPassword return False."""
    assert verifyPassword(b"pw", encoded) is False


# The users file


def test_read_users_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    """Comment and blank lines are ignored; name:hash lines are returned, whitespace stripped."""
    alice, bob = hashPassword("a", **FAST), hashPassword("b", **FAST)
    path = tmp_path / "users"
    path.write_text(f"# users\n\n   \nalice:{alice}\n  # indented comment\n  bob:{bob}  \n")
    assert readUsers(str(path)) == {"alice": alice, "bob": bob}


@pytest.mark.parametrize(
    "badLine", ["alice", "alice:not-a-hash", "al ice:{hash}", ":{hash}", "alice {hash}", "alice:{hash}:extra"]
)
def test_read_users_reports_malformed_line_with_path_and_number(tmp_path: Path, badLine: str) -> None:
    """A malformed line raises UsersFileError naming "path:line"."""
    encoded = hashPassword("x", **FAST)
    path = tmp_path / "users"
    path.write_text(f"# header\nbob:{encoded}\n\n{badLine.format(hash=encoded)}\n")
    with pytest.raises(UsersFileError) as raised:
        readUsers(str(path))
    assert str(raised.value).startswith(f"{path}:4:")


def test_read_users_of_missing_file_raises_users_file_error(tmp_path: Path) -> None:
    """A users file that cannot be read raises UsersFileError naming it."""
    path = str(tmp_path / "absent")
    with pytest.raises(UsersFileError, match="absent"):
        readUsers(path)


def test_write_user_creates_file_with_mode_0600(tmp_path: Path) -> None:
    """Writing to a missing users file creates it, private to the owner, readable by readUsers."""
    path = str(tmp_path / "users")
    encoded = hashPassword("pw", **FAST)
    writeUser(path, "alice", encoded)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert readUsers(path) == {"alice": encoded}


def test_write_user_adds_without_disturbing_other_lines(tmp_path: Path) -> None:
    """Adding a user keeps existing users and comments."""
    path = tmp_path / "users"
    alice, bob = hashPassword("a", **FAST), hashPassword("b", **FAST)
    path.write_text(f"# keep me\nalice:{alice}\n")
    writeUser(str(path), "bob", bob)
    assert readUsers(str(path)) == {"alice": alice, "bob": bob}
    assert path.read_text().splitlines()[0] == "# keep me"


def test_write_user_replaces_existing_entry_atomically(tmp_path: Path) -> None:
    """Replacing a user rewrites its single line via a new file with mode 0600 and no leftovers."""
    path = tmp_path / "users"
    old, new, carol = hashPassword("old", **FAST), hashPassword("new", **FAST), hashPassword("c", **FAST)
    path.write_text(f"alice:{old}\n# note\ncarol:{carol}\n")
    os.chmod(path, 0o644)
    inodeBefore = os.stat(path).st_ino
    writeUser(str(path), "alice", new)
    assert readUsers(str(path)) == {"alice": new, "carol": carol}
    assert path.read_text().count("alice:") == 1
    assert path.read_text().splitlines()[1] == "# note"
    assert os.stat(path).st_ino != inodeBefore  # renamed into place, not rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_write_user_failure_leaves_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    """If the final rename fails, the old users file is intact and the temporary file is removed."""
    path = tmp_path / "users"
    old = hashPassword("old", **FAST)
    path.write_text(f"alice:{old}\n")

    def failingReplace(source: str, destination: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failingReplace)
    with pytest.raises(OSError, match="disk on fire"):
        writeUser(str(path), "alice", hashPassword("new", **FAST))
    assert path.read_text() == f"alice:{old}\n"
    assert sorted(os.listdir(tmp_path)) == ["users"]


@pytest.mark.parametrize("name", ["a b", "a:b", "", "#alice", "tab\there"])
def test_write_user_refuses_names_the_file_cannot_hold(tmp_path: Path, name: str) -> None:
    """Names with spaces, colons, a leading # or nothing at all raise UsersFileError and write nothing."""
    assert not isValidUserName(name)
    with pytest.raises(UsersFileError):
        writeUser(str(tmp_path / "users"), name, hashPassword("pw", **FAST))
    assert not (tmp_path / "users").exists()


# The command-line tool


def runPasswd(usersFile: Path, name: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailproxy.passwd", str(usersFile), name, "--stdin"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_passwd_cli_writes_a_verifiable_hash_and_never_prints_the_password(tmp_path: Path) -> None:
    """python -m mailproxy.passwd FILE NAME --stdin stores a hash of stdin's first line and keeps it quiet."""
    password = "Sup3r-Secr3t ü"
    usersFile = tmp_path / "users"
    result = runPasswd(usersFile, "alice", password + "\nsecond line ignored\n")
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout and password not in result.stderr
    assert "alice" in result.stdout
    users = readUsers(str(usersFile))
    assert list(users) == ["alice"]
    assert password not in usersFile.read_text()
    assert verifyPassword(password.encode("utf-8"), users["alice"])
    assert not verifyPassword(b"second line ignored", users["alice"])


def test_passwd_cli_refuses_empty_password(tmp_path: Path) -> None:
    """An empty password on stdin exits non-zero and writes nothing."""
    usersFile = tmp_path / "users"
    result = runPasswd(usersFile, "alice", "\n")
    assert result.returncode != 0
    assert "empty password" in result.stderr
    assert not usersFile.exists()
