# -*- test-case-name: tests.test_passwd -*-
"""
C{python -m mailproxy.passwd USERS_FILE NAME} (also C{mailproxy-passwd}):
add or change a user.

The password is read from the terminal (twice), or from standard input with
C{--stdin}; it never appears on the command line.  The file is written with
mode 0600; C{--owner} hands it to the account the proxy runs as.
"""

from __future__ import annotations

import argparse
import getpass
import grp
import os
import pwd
import sys
from dataclasses import dataclass

from mailproxy.passwords import UsersFileError, hashPassword, writeUser

# Messages name the command as it was typed: the console script or the module.
PROG = "mailproxy-passwd" if os.path.basename(sys.argv[0]) == "mailproxy-passwd" else "python -m mailproxy.passwd"
# The account of etc/mailproxy.service.
SERVICE_USER = "mailproxy"

DESCRIPTION = """\
Add a user to a mailproxy users file, or change a user's password.

The password is read from the terminal (twice), or from the first line of
standard input with --stdin; it never appears on the command line. The
file is created if missing, and written with mode 0600.
"""


@dataclass(frozen=True)
class Owner:
    """
    The account that is to own the users file.
    """

    spec: str
    uid: int
    gid: int


def parseOwner(spec: str) -> Owner:
    """
    C{USER} (with that user's primary group) or C{USER:GROUP}, as names or
    numbers, resolved now so a typo fails before anything is written.

    @raise argparse.ArgumentTypeError: naming the unknown user or group.
    """
    userName, _, groupName = spec.partition(":")
    try:
        user = pwd.getpwuid(int(userName)) if userName.isdigit() else pwd.getpwnam(userName)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user {userName!r}") from None
    if not groupName:
        return Owner(spec, user.pw_uid, user.pw_gid)
    try:
        group = grp.getgrgid(int(groupName)) if groupName.isdigit() else grp.getgrnam(groupName)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group {groupName!r}") from None
    return Owner(spec, user.pw_uid, group.gr_gid)


def currentOwner(path: str) -> Owner | None:
    """
    The owner of the file at C{path}, or C{None} if there is none.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    return Owner(f"{status.st_uid}:{status.st_gid}", status.st_uid, status.st_gid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("users_file", help="the users file (created if missing; its directory must exist)")
    parser.add_argument("name", help="the local user name")
    parser.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    parser.add_argument(
        "--owner",
        type=parseOwner,
        metavar="USER[:GROUP]",
        help=f"give the file to this account (e.g. {SERVICE_USER}, which the systemd unit runs as); "
        "the mode stays 0600",
    )
    arguments = parser.parse_args(argv)
    usersFile: str = arguments.users_file
    directory = os.path.dirname(os.path.abspath(usersFile))
    # Checked first: the atomic write would otherwise report its temporary file.
    if not os.path.isdir(directory):
        print(f"{PROG}: directory {directory} does not exist; create it first", file=sys.stderr)
        return 1
    if arguments.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {arguments.name}: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ; nothing written", file=sys.stderr)
            return 1
    if not password:
        print("empty password refused; nothing written", file=sys.stderr)
        return 1
    owner: Owner | None = arguments.owner
    if owner is None and os.geteuid() == 0:
        # Rewriting replaces the file: the new one keeps the old one's owner.
        owner = currentOwner(usersFile)
    try:
        writeUser(usersFile, arguments.name, hashPassword(password), None if owner is None else (owner.uid, owner.gid))
    except UsersFileError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{PROG}: cannot write {usersFile}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"{arguments.name}: password set in {usersFile}")
    if os.geteuid() == 0 and os.stat(usersFile).st_uid == 0:
        print(
            f"note: {usersFile} is owned by root with mode 0600, so only root can read it; "
            f"the systemd unit runs the proxy as {SERVICE_USER!r}: add --owner {SERVICE_USER}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
