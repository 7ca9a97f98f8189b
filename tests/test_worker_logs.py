"""
Workers' log lines: each worker formats its events as the one log wants
them and writes them in batches (at most 50 ms or 64 KiB; a warning or
an error at once) to a pipe the supervisor reads; the supervisor writes whole lines only, as they came, or
publishes them as events when it logs elsewhere (syslog).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from mailproxy import worker
from mailproxy.worker import BATCH_SECONDS, LogForwarder
from mailproxy.workers import LOG_FD, MAX_LOG_LINE, WorkerPool, WorkerProcess


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    readEnd, writeEnd = os.pipe()
    os.set_blocking(readEnd, False)
    yield readEnd, writeEnd
    for fd in (readEnd, writeEnd):
        try:
            os.close(fd)
        except OSError:
            pass


def readAll(fd: int) -> str:
    try:
        return os.read(fd, 1 << 20).decode("utf-8")
    except BlockingIOError:
        return ""


def emit(forwarder: LogForwarder, text: str, **fields: Any) -> None:
    event = {
        "log_format": text,
        "log_level": LogLevel.info,
        "log_namespace": "mailproxy.test",
        "log_time": 1_800_000_000.0,
        **fields,
    }
    forwarder(event)


def test_lines_wait_for_the_batch_and_leave_together(pipe: tuple[int, int]) -> None:
    readEnd, writeEnd = pipe
    clock = Clock()
    forwarder = LogForwarder(writeEnd, "text", "worker 3", clock)
    emit(forwarder, "{client} connected", client="192.0.2.1:1024")
    clock.advance(BATCH_SECONDS / 2)
    emit(forwarder, "{client} disconnected", client="192.0.2.1:1024")
    assert readAll(readEnd) == ""
    clock.advance(BATCH_SECONDS / 2)
    lines = readAll(readEnd).splitlines(keepends=True)
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[worker 3] 192.0.2.1:1024 connected\n",
        "[worker 3] 192.0.2.1:1024 disconnected\n",
    ]
    assert clock.getDelayedCalls() == []


def test_a_warning_leaves_at_once_with_the_lines_before_it(pipe: tuple[int, int]) -> None:
    """What explains a worker's end is never held back."""
    readEnd, writeEnd = pipe
    clock = Clock()
    forwarder = LogForwarder(writeEnd, "text", "worker 3", clock)
    emit(forwarder, "first")
    emit(forwarder, "then trouble", log_level=LogLevel.warn)
    assert [line.split(" ", 1)[1] for line in readAll(readEnd).splitlines()] == [
        "[worker 3] first",
        "[worker 3] then trouble",
    ]
    assert clock.getDelayedCalls() == []


def test_a_full_batch_leaves_at_once(pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "BATCH_OCTETS", 4000)
    readEnd, writeEnd = pipe
    clock = Clock()
    forwarder = LogForwarder(writeEnd, "text", "worker 3", clock)
    line = "x" * 1000
    for _ in range(3):
        emit(forwarder, line)
    assert readAll(readEnd) == ""
    emit(forwarder, line)
    assert readAll(readEnd).count(line) == 4
    assert clock.getDelayedCalls() == []


def test_json_lines_name_the_worker_as_their_system(pipe: tuple[int, int]) -> None:
    readEnd, writeEnd = pipe
    clock = Clock()
    forwarder = LogForwarder(writeEnd, "json", "worker 2", clock)
    emit(forwarder, "{client} logged in as {user}", client="192.0.2.1:1024", user="alice", password="secret")
    forwarder.flush()
    [record] = [json.loads(line) for line in readAll(readEnd).splitlines()]
    assert record["system"] == "worker 2"
    assert record["message"] == "192.0.2.1:1024 logged in as alice"
    assert "password" not in record


def test_a_worker_whose_supervisor_is_gone_writes_to_stderr(
    pipe: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    readEnd, writeEnd = pipe
    os.close(readEnd)
    forwarder = LogForwarder(writeEnd, "text", "worker 1", Clock())
    emit(forwarder, "still here")
    forwarder.flush()
    assert "[worker 1] still here" in capsys.readouterr().err


def pool(destination: io.StringIO | None) -> WorkerPool:
    workers = WorkerPool(1, "mailproxy.toml", [], None, None, Clock())
    workers.logDestination = destination
    return workers


def test_the_supervisor_writes_whole_lines_only() -> None:
    destination = io.StringIO()
    process = WorkerProcess(pool(destination).workers[0])
    process.childDataReceived(LOG_FD, b"first line\nsecond ")
    assert destination.getvalue() == "first line\n"
    process.childDataReceived(LOG_FD, "h\u00e4lf\n".encode())
    assert destination.getvalue() == "first line\nsecond h\u00e4lf\n"


def test_an_endless_line_is_written_rather_than_held() -> None:
    destination = io.StringIO()
    process = WorkerProcess(pool(destination).workers[0])
    process.childDataReceived(LOG_FD, b"x" * (MAX_LOG_LINE + 1))
    assert destination.getvalue() == "x" * (MAX_LOG_LINE + 1) + "\n"


def test_without_a_log_file_the_supervisor_publishes_worker_events(pipe: tuple[int, int]) -> None:
    """Logging to syslog, say: workers send events, which reach the supervisor's observers."""
    workers = pool(None)
    assert workers.workerLogFormat == "events"
    readEnd, writeEnd = pipe
    forwarder = LogForwarder(writeEnd, workers.workerLogFormat, "worker 1", Clock())
    emit(forwarder, "{client} connected", client="192.0.2.1:1024")
    forwarder.flush()
    published: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(published.append)
    try:
        WorkerProcess(workers.workers[0]).childDataReceived(LOG_FD, readAll(readEnd).encode() + b"not json\n")
    finally:
        globalLogPublisher.removeObserver(published.append)
    assert [(event["log_system"], event.get("client")) for event in published] == [
        ("worker 1", "192.0.2.1:1024"),
        ("worker 1", None),
    ]
    assert published[1]["line"] == "not json"


def test_with_a_log_file_workers_write_its_format() -> None:
    workers = pool(io.StringIO())
    workers.logFormat = "json"
    assert workers.workerLogFormat == "json"
