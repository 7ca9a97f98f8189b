"""
The wheel and sdist carry the twistd dropin correctly (twisted/plugins
without any __init__.py of ours), the example files as package data, the
licence, and no development-only packages.  Built with this environment's
setuptools, so nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import mailproxy

REPO = Path(__file__).resolve().parent.parent
VERSION = mailproxy.__version__
EXAMPLES = (
    "mailproxy.example.toml",
    "mailproxy.service",
    "fail2ban/filter.d/mailproxy.conf",
    "fail2ban/jail.d/mailproxy.local",
)
BUILD_TIMEOUT = 300


def buildWheel(source: Path, destination: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(destination),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=destination,
        timeout=BUILD_TIMEOUT,
    )
    [wheel] = destination.glob("mailproxy-*.whl")
    return wheel


def checkWheel(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert "twisted/plugins/mailproxy_twistd.py" in names
    assert "mailproxy/py.typed" in names and "mailproxy/imap/framer.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.endswith("dropin.cache")]
    assert not [name for name in names if name.split("/")[0] in ("tests", "scripts", "bench", "etc")]
    for example in EXAMPLES:
        assert archive.read(f"mailproxy/etc/{example}") == (REPO / "etc" / example).read_bytes()
    distInfo = f"mailproxy-{VERSION}.dist-info"
    assert archive.read(f"{distInfo}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    metadata = archive.read(f"{distInfo}/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in metadata and "\nLicense-File: LICENSE\n" in metadata
    entryPoints = archive.read(f"{distInfo}/entry_points.txt").decode()
    assert "mailproxy-passwd = mailproxy.passwd:main" in entryPoints
    assert "mailproxy-example-config = mailproxy.examples:main" in entryPoints


def test_wheel_ships_the_dropin_examples_and_licence_without_shadowing_twisted(tmp_path: Path) -> None:
    """The wheel has the plugin module, the example files and LICENSE; no twisted/__init__.py, dropin.cache, tests or scripts."""
    checkWheel(buildWheel(REPO, tmp_path))


def test_licence_is_mit_as_setup_py_says() -> None:
    """LICENSE is the MIT licence of the mailproxy contributors, matching setup.py's license="MIT"."""
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 mailproxy contributors\n")
    assert 'license="MIT"' in (REPO / "setup.py").read_text()


def test_sdist_has_the_example_files_as_files_and_builds_the_same_wheel(tmp_path: Path) -> None:
    """The sdist holds etc/, the package's copy of it (not a link) and LICENSE; a wheel built from it is complete."""
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=BUILD_TIMEOUT,
    )
    [sdist] = tmp_path.glob("mailproxy-*.tar.gz")
    root = f"mailproxy-{VERSION}"
    with tarfile.open(sdist) as archive:
        members = {member.name: member for member in archive.getmembers()}
        for example in EXAMPLES:
            for path in (f"{root}/etc/{example}", f"{root}/mailproxy/etc/{example}"):
                assert members[path].isfile(), path
        assert members[f"{root}/LICENSE"].isfile()
        archive.extractall(tmp_path / "unpacked", filter="data")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    checkWheel(buildWheel(tmp_path / "unpacked" / root, wheels))
