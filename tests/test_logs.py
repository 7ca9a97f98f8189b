"""
JSON-lines logs: the event format, where twistd's options send it, how the
service hands the observer to twistd, and a real twistd start-up.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from mailproxy import tap
from mailproxy.logs import eventAsJSONLine, eventAsSafeText, jsonLinesObserver, syslogObserver, twistdLogFile
from tests.proxyprocess import TWISTD
from tests.test_tap import writeConfig


def logged(emit: Any) -> list[dict[str, Any]]:
    """
    The JSON objects a L{Logger} call writes through the observer.
    """
    output = io.StringIO()
    publisher = LogPublisher(jsonLinesObserver(output))
    emit(Logger(namespace="mailproxy.test", observer=publisher))
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_event_is_one_flat_json_object_with_its_own_fields() -> None:
    """Time, level, namespace and the formatted message, then the event's fields as plain values."""
    [record] = logged(
        lambda log: log.warn(
            "{client} logged in as {user}", client="192.0.2.1:4000", user="alice", octets=12, raw=b"caf\xc3\xa9"
        )
    )
    assert record["level"] == "warn"
    assert record["namespace"] == "mailproxy.test"
    assert record["message"] == "192.0.2.1:4000 logged in as alice"
    assert record["time"].endswith("+00:00")
    assert (record["client"], record["user"], record["octets"], record["raw"]) == (
        "192.0.2.1:4000",
        "alice",
        12,
        "café",
    )
    assert not any(key.startswith("log_") for key in record)


def test_fields_named_like_secrets_are_never_written() -> None:
    """Defence in depth: a field called password (or similar) is dropped, even nested."""
    [record] = logged(
        lambda log: log.info(
            "login", user="alice", password="hunter2", sasl_response="AGFsaWNl", details={"passwd": "x", "ok": True}
        )
    )
    assert "hunter2" not in json.dumps(record) and "AGFsaWNl" not in json.dumps(record)
    assert record["details"] == {"ok": True}
    assert record["user"] == "alice"


def test_failures_carry_their_traceback() -> None:
    """An event with a failure gets a traceback field."""

    def emit(log: Logger) -> None:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("filter {name} broke", Failure(), name="audit")

    [record] = logged(emit)
    assert record["level"] == "critical"
    assert record["message"] == "filter audit broke"
    assert "ZeroDivisionError" in record["traceback"]


def test_twisted_legacy_events_keep_their_text_and_system() -> None:
    """Events from twisted.python.log (Twisted's own messages) read as text with their system."""
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(events.append)
    legacyLog.addObserver(publisher)
    try:
        legacyLog.msg("Starting factory", system="IMAPServerFactory,0,127.0.0.1")
    finally:
        legacyLog.removeObserver(publisher)
    [event] = [event for event in events if event.get("log_text") == "Starting factory"]
    line = eventAsJSONLine(event)
    assert line.endswith("}\n") and line.count("\n") == 1
    record = json.loads(line)
    assert (record["level"], record["message"], record["system"]) == (
        "info",
        "Starting factory",
        "IMAPServerFactory,0,127.0.0.1",
    )
    assert set(record) == {"time", "level", "namespace", "message", "system"}


@pytest.fixture
def restoredSIGUSR1() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_log_destination_follows_twistds_options(tmp_path: Path, restoredSIGUSR1: None) -> None:
    """stdout with -n (or --logfile=-), a rotatable file with --logfile, twistd's own for syslog and --logger."""
    import sys

    assert twistdLogFile({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistdLogFile({"nodaemon": True, "logfile": "-"}) is sys.stdout
    assert twistdLogFile({"nodaemon": False, "logfile": "-"}) is None
    assert twistdLogFile({"nodaemon": True, "syslog": True}) is None
    assert twistdLogFile({"nodaemon": True, "logger": "some.observer"}) is None
    assert twistdLogFile(None) is None
    logFile = twistdLogFile({"nodaemon": True, "logfile": str(tmp_path / "proxy.log")})
    assert isinstance(logFile, LogFile) and logFile.path == str(tmp_path / "proxy.log")
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
    logFile.close()


def test_service_gives_twistds_application_the_json_observer(tmp_path: Path, restoredSIGUSR1: None) -> None:
    """Made by twistd with log_format = "json", the service sets the application's ILogObserver."""
    config = writeConfig(tmp_path, '[server]\nlog_format = "json"\n[[listener]]\nendpoint = "tcp:10143"\n')
    logPath = tmp_path / "proxy.log"
    options = ServerOptions()
    options.parseOptions(["-n", f"--logfile={logPath}", "mailproxy", "--config", str(config)])
    service = tap.makeService(options.subOptions, reactor=MemoryReactorClock())
    application = Application("mailproxy")
    service.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is not None
    observer({"log_format": "hello {who}", "who": "world", "log_level": LogLevel.info, "log_time": 0.0})
    observer._outFile.close()  # type: ignore[attr-defined]
    assert json.loads(logPath.read_text())["message"] == "hello world"

    # Text logs get twistd's classic lines, with control characters escaped.
    text = writeConfig(tmp_path, '[[listener]]\nendpoint = "tcp:10143"\n')
    textPath = tmp_path / "proxy.txt"
    options = ServerOptions()
    options.parseOptions(["-n", f"--logfile={textPath}", "mailproxy", "--config", str(text)])
    application = Application("mailproxy")
    tap.makeService(options.subOptions, reactor=MemoryReactorClock()).setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is not None
    observer({"log_format": "user={who}", "who": "x\r\nforged\x0c", "log_level": LogLevel.info, "log_time": 0.0})
    observer._outFile.close()  # type: ignore[attr-defined]
    assert textPath.read_text().endswith("[-#info] user=x\\x0d\n\tforged\\x0c\n")


def test_twistd_logs_json_to_stdout_and_a_busy_metrics_port_is_one_line(tmp_path: Path) -> None:
    """A real twistd -n writes JSON lines to stdout; a metrics port in use stops it with one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = writeConfig(
            tmp_path,
            f'[server]\nlog_format = "json"\n[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
            '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\n',
        )
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "mailproxy", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode != 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert any("starting up" in record["message"] for record in records)
    assert f"mailproxy: metrics.listen: Couldn't listen on 127.0.0.1:{port}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


class _Named:
    name = "upstream-a"

    def __repr__(self) -> str:
        return "<Named>"


_TEXT_EVENTS: list[dict[str, Any]] = [
    {"log_format": "{client} logged in as {user}", "client": "127.0.0.1:5", "user": "alice"},
    {"log_format": "{count:5d} sessions, {ratio:.2f} {what!r}", "count": 3, "ratio": 0.5, "what": b"x"},
    {"log_format": "{item.name} and {items[1]}", "item": _Named(), "items": ["a", "b"]},
    {"log_format": "{missing} field", "present": 1},
    {"log_format": "{call()} called", "call": lambda: "yes"},
    {"log_format": "two\nlines and {x}", "x": "a\rb"},
    {"log_format": "system set", "log_system": "imap,3,127.0.0.1"},
    {"log_format": "system not text", "log_system": 42},
    {"log_format": "", "x": 1},
    {"log_format": None},
    {"log_format": "no level or namespace at all"},
    {"log_format": "{{braces}} {x}", "x": "kept", "log_time": None},
]


@pytest.mark.parametrize("fields", _TEXT_EVENTS)
def test_text_lines_are_twisteds_classic_lines(fields: dict[str, Any]) -> None:
    """
    The text observer's fast path writes exactly what Twisted's classic
    formatter would (then escapes line breakers), for every kind of format
    string, falling back to Twisted's for what it does not handle itself.
    """
    event = {"log_namespace": "mailproxy.test", "log_level": LogLevel.info, "log_time": 1764800000.75, **fields}
    if "no level" in str(fields.get("log_format")):
        del event["log_namespace"], event["log_level"]
    expected = formatEventAsClassicLogText(event)
    assert eventAsSafeText(event) == (None if expected is None else expected.replace("\r", "\\x0d"))


def test_text_line_timestamps_follow_the_second() -> None:
    """
    The timestamp computed once per second still changes with the second,
    both ways (a clock stepped back).
    """
    times = [1764800000.1, 1764800000.9, 1764800001.0, 1764799999.5, 1764800001.2]
    lines = [eventAsSafeText({"log_format": "tick", "log_namespace": "n", "log_time": when}) for when in times]
    assert [line.split(" ")[0] for line in lines if line] == [formatTime(int(when)) for when in times]


def test_failures_in_text_lines_carry_their_traceback() -> None:
    failure = Failure(ZeroDivisionError("division by zero"))
    event = {"log_format": "it broke", "log_namespace": "n", "log_time": 1764800000.0, "log_failure": failure}
    line = eventAsSafeText(event)
    assert line is not None and line.startswith(formatTime(1764800000) + " [n#-] it broke\n\t")
    assert "ZeroDivisionError" in line


def test_debug_events_are_not_written_in_either_format() -> None:
    """twistd writes every level; the proxy's log leaves debug out (a balancer's health checks), info and up stay."""
    debug = {"log_format": "checked {n}", "n": 1, "log_level": LogLevel.debug, "log_time": 0.0, "log_namespace": "x"}
    info = dict(debug, log_level=LogLevel.info)
    assert eventAsSafeText(debug) is None
    assert eventAsJSONLine(debug) is None
    assert eventAsSafeText(info) is not None and "checked 1" in eventAsSafeText(info)  # type: ignore[operator]
    assert json.loads(eventAsJSONLine(info) or "{}")["message"] == "checked 1"


def test_with_syslog_debug_events_are_left_out_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd --syslog: the proxy gives twistd a syslog observer of its own that leaves debug events out."""
    from twisted.python import syslog

    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(syslog.SyslogObserver, "openlog", staticmethod(lambda *arguments: None))
    monkeypatch.setattr(
        syslog.SyslogObserver, "syslog", staticmethod(lambda priority, line: sent.append((priority, line)))
    )
    assert syslogObserver({"syslog": False}) is None and syslogObserver(None) is None
    observer = syslogObserver({"syslog": True, "prefix": "mailproxy"})
    assert observer is not None
    debug = {"log_format": "checked {n}", "n": 1, "log_level": LogLevel.debug, "log_time": 0.0, "log_namespace": "x"}
    observer(debug)
    observer(dict(debug, log_level=LogLevel.warn, n=2))
    assert [line for _, line in sent] == ["[-] checked 2"]
