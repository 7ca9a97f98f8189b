# -*- test-case-name: tests.test_audit_filter -*-
"""
The C{audit} filter: one record per command, login and closed session, as
a structured log event and a JSON line.

Records carry the command's name, tag and mailbox, never its other
arguments, so credentials cannot reach the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailproxy.filters import checkOptions
from mailproxy.filters.policy import decodeMailbox
from mailproxy.imap.mailboxes import MAILBOX_COMMANDS, namedMailboxes
from mailproxy.imap.model import IMAPCommand
from mailproxy.interfaces import ISession, ISessionObserver
from mailproxy.logs import MAX_LOGGED_NAME

log = Logger(namespace="mailproxy.audit")

_COMMAND_FORMAT = (
    "{who}@{client} {tag} {command} {where}: {result} ({bytes_in} bytes in, {bytes_out} bytes out, {duration_ms} ms)"
)
_LOGIN_FORMAT = "login of {who} from {client} {outcome}"
_CLOSED_FORMAT = "{who}@{client} closed after {duration_ms} ms ({bytes_in} bytes in, {bytes_out} bytes out)"
# Line breaks JSON leaves raw but some line readers split on.
_UNSAFE = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


@implementer(ISessionObserver)
class AuditFilter:
    """
    Record every command, login and closed session.

    @ivar file: the open JSON-lines file, or C{None}.
    """

    def __init__(self, path: str | None = None, logEvents: bool = True, clock: Callable[[], float] = time.time) -> None:
        """
        @param path: the JSON-lines file to append to, or C{None}.
        @param logEvents: emit C{twisted.logger} events too.
        @param clock: the time of a record, in seconds since the epoch.
        """
        self.logEvents = logEvents
        self.clock = clock
        self.file: IO[str] | None = None
        if path is not None:
            self.file = open(path, "a", encoding="utf-8", errors="backslashreplace", newline="\n", buffering=1)

    @classmethod
    def fromOptions(cls, options: dict[str, Any]) -> AuditFilter:
        """
        Build the filter from its configuration options (C{file}, C{log}).

        @raise ValueError: naming the option that is wrong.
        """
        checkOptions(options, ("file", "log"))
        path = options.get("file")
        if path is not None and (not isinstance(path, str) or not path):
            raise ValueError("option 'file': must be a file name")
        logEvents = options.get("log", True)
        if not isinstance(logEvents, bool):
            raise ValueError("option 'log': must be true or false")
        try:
            return cls(path, logEvents)
        except OSError as error:
            raise ValueError(f"option 'file': cannot open {path}: {error.strerror}") from None

    def close(self) -> None:
        """
        Close the file.
        """
        if self.file is not None:
            self.file.close()
            self.file = None

    def sessionEvent(self, session: ISession, event: str, details: dict[str, Any]) -> None:
        """
        Record a C{command}, C{login} or C{closed} event; ignore others.
        """
        record = {
            "time": datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "user": session.user,
            "client": clientHost(session.clientAddress),
            "listener": session.listener,
            "upstream": session.upstream,
            "tls": bool(session.tls),
        }
        level = LogLevel.info
        if event == "command":
            command = details.get("command")
            # IMAP and POP3 commands both have name, fullName, tag, arguments.
            record.update(commandFields(session, command if hasattr(command, "fullName") else None))
            record["result"] = str(details.get("result", "?"))
            # Answered by the upstream, or by the proxy itself (a filter's
            # refusal, a command it could not read).
            record["relayed"] = bool(details.get("relayed", True))
            template = _COMMAND_FORMAT
        elif event == "login":
            user = details.get("user")
            if user is not None:
                record["user"] = user.decode("utf-8", "replace") if isinstance(user, bytes) else str(user)
            record["ok"] = bool(details.get("ok"))
            if details.get("mechanism") is not None:
                record["mechanism"] = str(details["mechanism"])
            level = LogLevel.info if record["ok"] else LogLevel.warn
            template = _LOGIN_FORMAT
        elif event == "closed":
            template = _CLOSED_FORMAT
        else:
            return
        if event != "login":
            record["bytes_in"] = int(details.get("bytesIn", 0))
            record["bytes_out"] = int(details.get("bytesOut", 0))
            record["duration_ms"] = round(float(details.get("duration", 0.0)) * 1000, 3)
        self._write(record)
        if self.logEvents:
            shown = {
                "who": record["user"] or "-",
                "where": record.get("mailbox") or "-",
                "outcome": "succeeded" if record.get("ok") else "failed",
            }
            log.emit(level, template, **record, **shown)

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).translate(_UNSAFE)
            self.file.write(line + "\n")


def commandFields(session: ISession, command: IMAPCommand | None) -> dict[str, Any]:
    """
    What a record tells about C{command} (C{None} if it did not parse): its
    name, tag and mailbox; the named mailbox for commands that name one,
    else the selected one.
    """
    if command is None:
        return {"command": "?", "tag": None, "mailbox": _mailboxText(session.selected)}
    if command.name in MAILBOX_COMMANDS:
        names = namedMailboxes(command)
        mailbox = _mailboxText(names[0]) if names else None
    else:
        mailbox = _mailboxText(session.selected)
    return {
        "command": _cut(command.fullName.decode("ascii", "replace")),
        "tag": _cut(command.tag.decode("ascii", "replace")),
        "mailbox": mailbox,
    }


def _cut(atom: str) -> str:
    """
    A client-chosen atom (tag, command name: no spaces or controls) cut to
    a bounded length, so a record stays small whatever the client sent.
    """
    return atom if len(atom) <= MAX_LOGGED_NAME else atom[:MAX_LOGGED_NAME] + "..."


def _mailboxText(raw: bytes | None) -> str | None:
    return None if raw is None else decodeMailbox(raw)


def clientHost(address: str) -> str:
    """
    The host of a C{"host:port"} address; IPv6 hosts keep their colons and
    lose their brackets.
    """
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        host = address
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host
