"""
C{make demo-oauth} (C{scripts/oauth_demo.py}): the device flow runs, the
banner comes once the proxy serves, curl fetches the demo message through
the OAuth 2.0 login, and Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.proxyprocess import freePort
from tests.test_demo import EXIT_TIMEOUT, READY_TIMEOUT, startDemo, waitForText


def test_the_oauth_demo_authorizes_serves_and_stops_on_ctrl_c() -> None:
    directory = Path(tempfile.mkdtemp(prefix="mp-oauth-demo-"))
    directory.chmod(0o755)
    imap = freePort()
    environment = {
        **os.environ,
        "DEMO_DIR": str(directory / "demo"),
        "DEMO_OAUTH_IMAP_PORT": str(imap),
        "DEMO_OAUTH_POP3_PORT": str(freePort()),
    }
    demo = startDemo(environment, directory / "out", "scripts.oauth_demo")
    try:
        shown = waitForText(demo, "Ctrl-C stops everything.", READY_TIMEOUT)
        assert "To let the proxy read mail for this user, open http://127.0.0.1:" in shown
        assert "stored the grant of demo from demo in" in shown
        fetched = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-u", "demo:demo", f"imap://127.0.0.1:{imap}/INBOX;UID=1"],
            capture_output=True,
            timeout=30,
        )
        assert fetched.returncode == 0 and b"Subject: Hello through OAuth 2.0" in fetched.stdout, fetched.stderr
        os.killpg(demo.process.pid, signal.SIGINT)
        assert demo.process.wait(timeout=EXIT_TIMEOUT) == 0, demo.output()
        assert demo.output().rstrip().endswith("demo stopped")
    finally:
        if demo.process.poll() is None:
            os.killpg(demo.process.pid, signal.SIGTERM)
            demo.process.wait(timeout=EXIT_TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)
