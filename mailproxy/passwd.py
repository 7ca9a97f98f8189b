# -*- test-case-name: tests.test_passwords -*-
"""
C{python -m mailproxy.passwd USERS_FILE NAME}: add or change a user.

The password is read from the terminal (twice), or from standard input with
C{--stdin}; it never appears on the command line.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from mailproxy.passwords import UsersFileError, hashPassword, writeUser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailproxy.passwd", description=__doc__)
    parser.add_argument("users_file", help="the users file (created if missing)")
    parser.add_argument("name", help="the local user name")
    parser.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    arguments = parser.parse_args(argv)
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
    try:
        writeUser(arguments.users_file, arguments.name, hashPassword(password))
    except (UsersFileError, OSError) as error:
        print(f"mailproxy.passwd: {error}", file=sys.stderr)
        return 1
    print(f"{arguments.name}: password set in {arguments.users_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
