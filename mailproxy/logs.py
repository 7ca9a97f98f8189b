# -*- test-case-name: tests.test_logs -*-
"""
JSON-lines logs (C{[server] log_format = "json"}): one flat JSON object per
event, to wherever twistd would have written its text log.

Each object has C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
(the formatted text), C{system} for Twisted's own connection-scoped events,
C{traceback} when the event carries a failure, and then the event's own
fields (C{client}, C{user}, C{upstream}, ...).  Twisted's bookkeeping keys
are left out, and so is any field whose name says it holds a secret:
passwords are never logged, and a mistake elsewhere must not change that.

twistd gives a plugin no say in its log observer, except through an
L{ILogObserver} component on the application, which it uses instead of its
own; so the proxy's root service sets that component when twistd makes it
the application's child (see L{mailproxy.tap.ListenersService}), picking
the destination twistd's options name (C{--logfile}, C{-n} for stdout).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile

# Keys of Twisted's legacy log events that are bookkeeping, not fields.
_LEGACY_KEYS = frozenset({"message", "isError", "printed", "system", "time", "format", "failure", "why"})
_SECRET = re.compile(r"pass|secret|credential|token|sasl", re.IGNORECASE)
_MAX_DEPTH = 4
# A user name is logged as at most this many characters (then "...").
MAX_LOGGED_NAME = 64
# Printable ASCII but the space, and not the characters a log reader could
# take for a field's end or an escape.
_NAME_AS_IS = frozenset(chr(code) for code in range(0x21, 0x7F)) - set('%"=\\')
# Characters that end or break a line in a log reader (str.splitlines,
# universal newlines), but the newline twistd itself continues with a tab.
_LINE_BREAKERS = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def loggedName(name: str | bytes) -> str:
    """
    A user name as log lines and audit records show it, where the client
    chose it: percent-encoded outside printable ASCII and for space, C{%},
    C{"}, C{=} and C{\\}, cut to L{MAX_LOGGED_NAME} characters.

    So a name can neither end its field (C{user=x ip=198.51.100.77} would
    make a fail2ban rule ban an innocent address) nor its line (CR, LF),
    and a 60 KB name costs 64 characters of log.
    """
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    cut = len(name) > MAX_LOGGED_NAME
    shown = "".join(
        char if char in _NAME_AS_IS else "".join(f"%{octet:02X}" for octet in char.encode("utf-8", "surrogateescape"))
        for char in name[:MAX_LOGGED_NAME]
    )
    return (shown or '""') + ("..." if cut else "")


def eventAsSafeText(event: dict[str, Any]) -> str | None:
    """
    twistd's classic text line for an event, with control characters that
    could start a forged line (CR, form feed, ...) written as escapes: the
    safety net under L{loggedName} for any text a client chose; nothing for
    a debug event (see L{_written}).
    """
    if not _written(event):
        return None
    text = _plainClassicText(event)
    if text is None:
        text = formatEventAsClassicLogText(event, formatTime=_timestamp)
        if text is None:
            return None
    return _LINE_BREAKERS.sub(_escape, text)


class _TimestampOfTheSecond:
    """
    L{formatTime}, computed once per second: the classic line's timestamp
    has whole seconds, and working out the local offset and calling
    C{strftime} for every line was a fifth of what a line cost.
    """

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = math.floor(when)
        if second != self.second:
            self.text = formatTime(second)
            self.second = second
        return self.text


_timestamp = _TimestampOfTheSecond()


def _plainClassicText(event: dict[str, Any]) -> str | None:
    """
    What L{formatEventAsClassicLogText} makes of an event whose format
    string only names fields (the proxy's own lines), formatted as
    L{str.format_map} does: Twisted's formatter gives the same text for
    such a string, at twice the cost, to support C{{name()}} calls.
    C{None} for anything else (a call, a failure, a flattened event, a
    field that cannot be formatted): Twisted formats that.
    """
    template = event.get("log_format")
    if type(template) is not str or "()" in template or "log_failure" in event or "log_flattened" in event:
        return None
    try:
        message = template.format_map(event)
    except Exception:
        return None
    if not message:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            return None
    line = f"{_timestamp(event.get('log_time'))} [{system}] {message}"
    return line.replace("\n", "\n\t") + "\n"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _written(event: dict[str, Any]) -> bool:
    """
    C{False} for a debug event: twistd writes every level, and the log is
    the operators' (a load balancer's health checks, say, are debug).
    """
    return event.get("log_level") is not LogLevel.debug


def eventAsJSONLine(event: dict[str, Any]) -> str | None:
    """
    One event as a flat JSON object, with its line end; nothing for a debug
    event.
    """
    if not _written(event):
        return None
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0.0, UTC).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    system = event.get("log_system", event.get("system"))
    if system not in (None, "-"):
        record["system"] = str(system)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record or _SECRET.search(key):
            continue
        record[key] = _plain(value, 0)
    return json.dumps(record) + "\n"


def _plain(value: Any, depth: int) -> Any:
    """
    C{value} as something JSON can hold, readable rather than exact.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        return [_plain(item, depth + 1) for item in value]
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {str(key): _plain(item, depth + 1) for key, item in value.items() if not _SECRET.search(str(key))}
    return str(value)


def jsonLinesObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing L{eventAsJSONLine}s to C{outFile}.
    """
    return FileLogObserver(outFile, eventAsJSONLine)


def textLinesObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing L{eventAsSafeText} lines to C{outFile}.
    """
    return FileLogObserver(outFile, eventAsSafeText)


# How a worker writes its log lines for the supervisor: as the log's own
# lines (text or JSON), which the supervisor writes as they are, or as
# Twisted's JSON events, which it publishes (when it logs elsewhere, to
# syslog say).
WORKER_LOG_FORMATS = ("text", "json", "events")


def workerLineFormatter(logFormat: str) -> Callable[[dict[str, Any]], str | None]:
    """
    The formatter of a worker's log lines in C{logFormat} (one of
    L{WORKER_LOG_FORMATS}); each line ends with a newline.
    """
    if logFormat == "json":
        return eventAsJSONLine
    if logFormat == "events":
        return lambda event: eventAsJSON(event) + "\n"
    return eventAsSafeText


def twistdLogFile(twistdOptions: Mapping[str, Any] | None) -> IO[Any] | None:
    """
    The file twistd would log to with these (global) options: stdout with
    C{-n} and no C{--logfile} or C{--logfile=-}, else the named file
    (C{twistd.log} by default), rotated on SIGUSR1 as twistd does.

    C{None} when twistd is to log elsewhere (C{--syslog}, C{--logger}), when
    a daemon was told to log to stdout (twistd refuses that itself), or
    without twistd options (the service was not made by twistd).
    """
    if twistdOptions is None or twistdOptions.get("syslog") or twistdOptions.get("logger"):
        return None
    name = twistdOptions.get("logfile") or ""
    nodaemon = bool(twistdOptions.get("nodaemon"))
    if name == "-" or (nodaemon and not name):
        return sys.stdout if nodaemon else None
    logFile = LogFile.fromFullPath(name or "twistd.log")
    _rotateOnSIGUSR1(logFile)
    return logFile


def syslogObserver(twistdOptions: Mapping[str, Any] | None) -> ILogObserver | None:
    """
    With twistd's C{--syslog}: what twistd would log to syslog with (its
    C{--prefix}), less the debug events, as the log file leaves them out
    (a load balancer's health checks, say).  C{None} without C{--syslog}.
    """
    if twistdOptions is None or not twistdOptions.get("syslog"):
        return None
    from twisted.python import log, syslog

    legacy = syslog.SyslogObserver(twistdOptions.get("prefix") or "").emit
    toSyslog = LegacyLogObserverWrapper(cast(log.ILogObserver, legacy))

    def emit(event: dict[str, Any]) -> None:
        if _written(event):
            toSyslog(event)

    return cast(ILogObserver, emit)


def _rotateOnSIGUSR1(logFile: LogFile) -> None:
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)
