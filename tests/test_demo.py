"""
C{make demo} (C{python -m scripts.demo}) as a person runs it: it says
"Try" only once every listener answers, a second demo of the same
directory is refused without disturbing the first, and Ctrl-C (SIGINT to
the terminal's foreground process group) stops everything cleanly.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dovecot import stopInstance
from tests.proxyprocess import HOST, freePort

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90.0
EXIT_TIMEOUT = 30.0
GONE_TIMEOUT = 10.0
READY_TEXT = "Try, in another terminal:"
REFUSAL = "another demo is already running"
BANNER = re.compile(
    r"CA certificate for TLS: (?P<ca>\S+)\n"
    r"proxy: twistd pid (?P<twistd>\d+), config \S+; Dovecot: pid (?P<dovecot>\d+), in (?P<dovecotDir>\S+)\n"
    r"The proxy logs to (?P<log>\S+) "
)


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    outputPath: Path

    def output(self) -> str:
        return self.outputPath.read_text(errors="replace")


def startDemo(environment: dict[str, str], outputPath: Path, module: str = "scripts.demo") -> Demo:
    """
    Start the demo in a process group of its own, as a shell starts a
    foreground job, with its output going to C{outputPath}.

    Ctrl-C is not ignored in a terminal's foreground job, even when the
    tests run as a background job (which a shell starts with SIGINT
    ignored, and children inherit that).
    """
    ignoring = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignoring:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(outputPath, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=REPO,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        if ignoring:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Demo(process, outputPath)


def waitForText(demo: Demo, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while text not in demo.output():
        if demo.process.poll() is not None:
            raise AssertionError(f"the demo exited with {demo.process.returncode}:\n{demo.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} after {timeout} s:\n{demo.output()}")
        time.sleep(0.1)
    return demo.output()


def processGone(pid: int) -> bool:
    """
    True once C{pid} does not exist or is a zombie nobody reaped yet.
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def waitUntilGone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_TIMEOUT
    while not processGone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def messageCount(port: int) -> int:
    client = imaplib.IMAP4(HOST, port, timeout=10)
    try:
        client.login("demo", "demo")
        typ, data = client.select("INBOX")
        assert typ == "OK", data
        return int(data[0] or b"0")
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


@pytest.fixture
def demoEnvironment() -> Iterator[tuple[dict[str, str], Path]]:
    """
    The environment of a demo with its own directory (traversable, so
    Dovecot lives inside it) and free ports; the directory is removed
    afterwards.
    """
    directory = Path(tempfile.mkdtemp(prefix="mp-demo-"))
    directory.chmod(0o755)
    environment = {
        **os.environ,
        "DEMO_DIR": str(directory / "demo"),
        "DEMO_IMAP_PORT": str(freePort()),
        "DEMO_IMAPS_PORT": str(freePort()),
        "DEMO_POP3_PORT": str(freePort()),
    }
    try:
        yield environment, directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_demo_serves_refuses_a_second_run_and_stops_cleanly_on_ctrl_c(
    demoEnvironment: tuple[dict[str, str], Path],
) -> None:
    """
    The banner comes once all three listeners answer; a second demo of the
    same directory exits 1 with one clear line while the first keeps
    serving; Ctrl-C ends the first with status 0, its twistd stopped by one
    signal (no ReactorNotRunning, no traceback) and its Dovecot gone.
    """
    environment, directory = demoEnvironment
    demoDir = Path(environment["DEMO_DIR"])
    ports = {name: int(environment[f"DEMO_{name.upper()}_PORT"]) for name in ("imap", "imaps", "pop3")}
    first = startDemo(environment, directory / "first.out")
    pids: dict[str, int] = {}
    try:
        output = waitForText(first, READY_TEXT, READY_TIMEOUT)
        banner = BANNER.search(output)
        assert banner is not None, output
        pids = {"twistd": int(banner["twistd"]), "dovecot": int(banner["dovecot"])}
        # Dovecot lives in the demo directory, not in a directory shared by every checkout.
        assert banner["dovecotDir"] == str(demoDir / "dovecot")
        assert banner["log"] == str(demoDir / "twistd.log")

        # No retries: the banner promises that every listener is up.
        assert messageCount(ports["imap"]) == 1
        context = ssl.create_default_context(cafile=banner["ca"])
        imaps = imaplib.IMAP4_SSL("localhost", ports["imaps"], ssl_context=context, timeout=10)
        imaps.logout()
        pop3 = poplib.POP3(HOST, ports["pop3"], timeout=10)
        assert pop3.getwelcome().startswith(b"+OK")
        pop3.quit()

        second = startDemo(environment, directory / "second.out")
        assert second.process.wait(timeout=EXIT_TIMEOUT) == 1
        refusal = second.output()
        assert refusal.strip().splitlines() == [
            f"make demo: {REFUSAL} in {demoDir} (pid {first.process.pid}); stop it with Ctrl-C first, "
            "or set DEMO_DIR and the DEMO_*_PORT variables for a second one"
        ]
        assert not processGone(pids["dovecot"]) and not processGone(pids["twistd"])
        assert messageCount(ports["imap"]) == 1

        # What a terminal's Ctrl-C does: SIGINT to the whole foreground process group.
        os.killpg(first.process.pid, signal.SIGINT)
        assert first.process.wait(timeout=EXIT_TIMEOUT) == 0, first.output()
        output = first.output()
        log = (demoDir / "twistd.log").read_text()
        for unwanted in ("Traceback", "ReactorNotRunning", "CRITICAL", "critical", "Received SIGINT"):
            assert unwanted not in output + log, output + log
        # One stop signal, from the demo: the terminal's SIGINT never reached twistd.
        assert log.count("Received SIGTERM, shutting down.") == 1, log
        assert "Server Shut Down." in log
        assert output.rstrip().endswith("demo stopped"), output
        assert (demoDir / "twistd-stderr.log").read_text() == ""
        assert waitUntilGone(pids["twistd"]) and waitUntilGone(pids["dovecot"])
    finally:
        if first.process.poll() is None:
            os.killpg(first.process.pid, signal.SIGTERM)
            try:
                first.process.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                first.process.kill()
                first.process.wait()
        # Whatever went wrong above, leave no proxy or Dovecot behind.
        if pids and not processGone(pids["twistd"]):
            os.kill(pids["twistd"], signal.SIGKILL)
        stopInstance(str(demoDir / "dovecot"))
