"""
The wheel carries the twistd dropin correctly: twisted/plugins without any
__init__.py of ours, and no development-only packages.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_dropin_without_shadowing_twisted(tmp_path: Path) -> None:
    """The wheel has the plugin module but no twisted/__init__.py, dropin.cache, tests or scripts."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("mailproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/mailproxy_twistd.py" in names
    assert "mailproxy/py.typed" in names and "mailproxy/imap/framer.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.endswith("dropin.cache")]
    assert not [name for name in names if name.split("/")[0] in ("tests", "scripts", "bench")]
    entryPoints = zipfile.ZipFile(wheel).read("mailproxy-0.1.0.dist-info/entry_points.txt").decode()
    assert "mailproxy-passwd = mailproxy.passwd:main" in entryPoints
