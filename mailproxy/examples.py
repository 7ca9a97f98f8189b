# -*- test-case-name: tests.test_install -*-
"""
C{mailproxy-example-config}: the example configuration, systemd unit and
fail2ban files that ship with mailproxy, for those who installed it with
pip and have no checkout's C{etc/}.

The files are package data under C{mailproxy/etc} (in a checkout, a
symbolic link to C{etc/}).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable

DESCRIPTION = """\
Show or write the example files that ship with mailproxy: the configuration
(mailproxy.example.toml), the systemd unit (mailproxy.service) and the
fail2ban filter and jail. Without arguments, list their names.
"""

EPILOG = """\
examples:
  mailproxy-example-config mailproxy.example.toml > /etc/mailproxy/mailproxy.toml
  mailproxy-example-config --output /tmp/mailproxy-examples
"""


def exampleRoot() -> Traversable:
    """
    The directory of the shipped example files.
    """
    return files("mailproxy").joinpath("etc")


def exampleNames() -> list[str]:
    """
    The shipped example files, as sorted C{/}-separated paths relative to
    L{exampleRoot}.
    """
    names: list[str] = []
    pending: list[tuple[str, Traversable]] = [("", exampleRoot())]
    while pending:
        prefix, directory = pending.pop()
        for entry in directory.iterdir():
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                pending.append((f"{prefix}{entry.name}/", entry))
            else:
                names.append(prefix + entry.name)
    return sorted(names)


def readExample(name: str) -> bytes:
    """
    The content of the example file C{name} (one of L{exampleNames}).

    @raise KeyError: for any other name.
    """
    if name not in exampleNames():
        raise KeyError(name)
    return exampleRoot().joinpath(*name.split("/")).read_bytes()


def writeExamples(names: Sequence[str], directory: str, replace: bool) -> list[str]:
    """
    Write the example files C{names} under C{directory}, keeping their
    relative paths; an existing file is only overwritten when C{replace}.

    @return: the paths written.
    @raise FileExistsError: before writing anything, if a file exists and
        C{replace} is false.
    """
    targets = [(name, os.path.join(directory, *name.split("/"))) for name in names]
    if not replace:
        existing = [path for _, path in targets if os.path.lexists(path)]
        if existing:
            raise FileExistsError(f"{existing[0]} exists (--force overwrites)")
    written = []
    for name, path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(readExample(name))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mailproxy-example-config",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="an example file (see --list)")
    parser.add_argument("--list", action="store_true", help="list the example files (the default)")
    parser.add_argument("--output", metavar="DIR", help="write the files (all, or the NAMEs) under DIR")
    parser.add_argument("--force", action="store_true", help="with --output: overwrite existing files")
    arguments = parser.parse_args(argv)
    available = exampleNames()
    unknown = [name for name in arguments.names if name not in available]
    if unknown:
        parser.error(f"no example file {unknown[0]!r}; there are: {', '.join(available)}")
    if arguments.output is not None:
        try:
            written = writeExamples(arguments.names or available, arguments.output, arguments.force)
        except OSError as error:
            print(f"mailproxy-example-config: {error}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
        return 0
    if arguments.list or not arguments.names:
        print("\n".join(available))
        return 0
    for name in arguments.names:
        sys.stdout.buffer.write(readExample(name))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
