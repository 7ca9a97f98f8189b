"""
C{python -m mailproxy.passwd} as an administrator meets it: plain help, a
clear line for a missing directory, and a users file the service account
can read (C{--owner}), or a note saying why it cannot.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailproxy.passwords import readUsers, verifyPassword

asRoot = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another account needs root")


def passwd(*arguments: str, stdin: str = "s3cret\n") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailproxy.passwd", *arguments],
        input=stdin,
        # argparse wraps help to the terminal's width
        env={**os.environ, "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_is_plain_text_without_epydoc_markup() -> None:
    """--help reads as plain text: no C{...}, L{...} or @param, and it documents --owner."""
    result = passwd("--help")
    assert result.returncode == 0
    assert "usage: python -m mailproxy.passwd" in result.stdout
    assert "--owner USER[:GROUP]" in result.stdout and "mode stays 0600" in result.stdout
    for markup in ("C{", "L{", "I{", "@param", "@return"):
        assert markup not in result.stdout


def test_missing_directory_is_one_line_naming_it(tmp_path: Path) -> None:
    """A users file in a directory that does not exist: exit 1, one line naming the directory, no temporary file."""
    missing = tmp_path / "no" / "such"
    result = passwd("--stdin", str(missing / "users"), "alice")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"python -m mailproxy.passwd: directory {missing} does not exist; create it first"
    ]
    assert result.stdout == ""
    assert not (tmp_path / "no").exists()


def test_unknown_owner_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """--owner with an account that does not exist is a usage error (exit 2) and writes nothing."""
    result = passwd("--stdin", "--owner", "no-such-account-here", str(tmp_path / "users"), "alice")
    assert result.returncode == 2
    assert "no such user 'no-such-account-here'" in result.stderr
    assert not (tmp_path / "users").exists()
    result = passwd("--stdin", "--owner", "nobody:no-such-group-here", str(tmp_path / "users"), "alice")
    assert result.returncode == 2
    assert "no such group 'no-such-group-here'" in result.stderr
    assert not (tmp_path / "users").exists()


@asRoot
def test_owner_gives_the_file_to_that_user_and_primary_group_with_mode_0600(tmp_path: Path) -> None:
    """--owner nobody: the file belongs to nobody and nobody's primary group, mode 0600, and the hash verifies."""
    usersFile = tmp_path / "users"
    result = passwd("--stdin", "--owner", "nobody", str(usersFile), "alice")
    assert result.returncode == 0, result.stderr
    nobody = pwd.getpwnam("nobody")
    status = os.stat(usersFile)
    assert (status.st_uid, status.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert "note:" not in result.stderr
    assert verifyPassword(b"s3cret", readUsers(str(usersFile))["alice"])


@asRoot
def test_owner_with_a_group_uses_that_group(tmp_path: Path) -> None:
    """--owner nobody:daemon: user nobody, group daemon, mode 0600."""
    usersFile = tmp_path / "users"
    result = passwd("--stdin", "--owner", "nobody:daemon", str(usersFile), "alice")
    assert result.returncode == 0, result.stderr
    status = os.stat(usersFile)
    assert (status.st_uid, status.st_gid) == (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("daemon").gr_gid)
    assert stat.S_IMODE(status.st_mode) == 0o600


@asRoot
def test_root_without_owner_is_told_the_service_cannot_read_the_file(tmp_path: Path) -> None:
    """As root without --owner: the file is root's, 0600, and a note names the service account and --owner."""
    usersFile = tmp_path / "users"
    result = passwd("--stdin", str(usersFile), "alice")
    assert result.returncode == 0, result.stderr
    status = os.stat(usersFile)
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, 0o600)
    assert result.stderr.splitlines() == [
        f"note: {usersFile} is owned by root with mode 0600, so only root can read it; "
        "the systemd unit runs the proxy as 'mailproxy': add --owner mailproxy"
    ]
    assert result.stdout == f"alice: password set in {usersFile}\n"


@asRoot
def test_rewriting_as_root_keeps_the_files_owner(tmp_path: Path) -> None:
    """Changing a password in a file given to nobody keeps it nobody's (the rewrite would make it root's)."""
    usersFile = tmp_path / "users"
    assert passwd("--stdin", "--owner", "nobody", str(usersFile), "alice").returncode == 0
    result = passwd("--stdin", str(usersFile), "bob", stdin="other\n")
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr
    status = os.stat(usersFile)
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (pwd.getpwnam("nobody").pw_uid, 0o600)
    assert sorted(readUsers(str(usersFile))) == ["alice", "bob"]


@asRoot
def test_the_new_file_has_its_owner_before_it_takes_the_old_ones_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner is set on the temporary file, so a proxy running as that user never finds the users file root's."""
    from mailproxy import passwords

    usersFile = tmp_path / "users"
    nobody = pwd.getpwnam("nobody")
    seen: list[int] = []
    replace = os.replace

    def replaceAndLook(source: str, destination: str) -> None:
        seen.append(os.stat(source).st_uid)
        replace(source, destination)

    monkeypatch.setattr(passwords.os, "replace", replaceAndLook)
    passwords.writeUser(str(usersFile), "alice", passwords.hashPassword("s3cret", log2N=4), (nobody.pw_uid, 0))
    assert seen == [nobody.pw_uid]
    assert os.stat(usersFile).st_uid == nobody.pw_uid
