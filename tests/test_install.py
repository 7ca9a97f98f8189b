"""
A new user's install in a fresh virtual environment: C{pip install -e .}
(PEP 660, without setuptools' compat mode) and C{pip install .} both give a
C{twistd mailproxy} that twistd finds, that reports mailproxy's version and
that serves, plus the C{mailproxy-example-config} and C{mailproxy-passwd}
commands.

Nothing is downloaded: the new environment sees this one's dependencies
(not its mailproxy) through a C{.pth} file, and pip builds with this
environment's setuptools (C{--no-build-isolation --no-deps --no-index}).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import mailproxy
from mailproxy import examples
from mailproxy.examples import exampleNames
from tests.proxyprocess import HOST, ProxyProcess, freePort

REPO = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 120.0
EXAMPLES = [
    "fail2ban/filter.d/mailproxy.conf",
    "fail2ban/jail.d/mailproxy.local",
    "ldap/mailproxy.schema",
    "mailproxy-http-auth.example.toml",
    "mailproxy-ldap.example.toml",
    "mailproxy-oauth.example.toml",
    "mailproxy.example.toml",
    "mailproxy.service",
]
# This environment's own installation of mailproxy, which the new one must not see.
OWN_INSTALLATION = re.compile(r"^(mailproxy-.*\.dist-info|__editable__.*|.*\.pth)$")


def sourceFiles() -> list[str]:
    """
    The checkout's files as git knows them: tracked ones and new ones not
    ignored (symbolic links included, as links).
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=COMMAND_TIMEOUT,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and os.path.lexists(REPO / name)]


def copySource(destination: Path) -> Path:
    for name in sourceFiles():
        source, target = REPO / name, destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return destination


@dataclass
class Environment:
    """
    A virtual environment made for one test.
    """

    directory: Path

    @property
    def bin(self) -> Path:
        return self.directory / "bin"

    def run(
        self, program: str, *arguments: str, cwd: Path, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        environment.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
        return subprocess.run(
            [str(self.bin / program), *arguments],
            cwd=cwd,
            env=environment,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )

    def pipInstall(self, *arguments: str, cwd: Path) -> None:
        result = self.run(
            "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *arguments, cwd=cwd
        )
        assert result.returncode == 0, result.stdout + result.stderr


def makeEnvironment(directory: Path) -> Environment:
    """
    A fresh virtual environment whose only view of this one is a C{.pth}
    line naming a directory of links to its installed distributions (all
    but mailproxy), and a C{twistd} script as Twisted's installer writes it.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=COMMAND_TIMEOUT)
    environment = Environment(directory)
    ownSitePackages = Path(sysconfig.get_paths()["purelib"])
    dependencies = directory / "dependencies"
    dependencies.mkdir()
    for entry in ownSitePackages.iterdir():
        if not OWN_INSTALLATION.match(entry.name):
            os.symlink(entry, dependencies / entry.name)
    newSitePackages = environment.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=directory
    ).stdout.strip()
    Path(newSitePackages, "dependencies.pth").write_text(f"{dependencies}\n")
    twistd = environment.bin / "twistd"
    twistd.write_text(
        f"#!{environment.bin / 'python'}\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n"
    )
    twistd.chmod(0o755)
    return environment


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copySource(tmp_path_factory.mktemp("source"))


def importedFrom(environment: Environment, cwd: Path) -> Path:
    result = environment.run("python", "-c", "import mailproxy; print(mailproxy.__file__)", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def checkCommands(environment: Environment, work: Path) -> None:
    """
    twistd finds the plugin and shows mailproxy's version; the example and
    password commands work.
    """
    helpText = environment.run("twistd", "mailproxy", "--help", cwd=work)
    assert helpText.returncode == 0, helpText.stdout + helpText.stderr
    assert "--config=" in helpText.stdout
    version = environment.run("twistd", "mailproxy", "--version", cwd=work)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(rf"mailproxy {re.escape(mailproxy.__version__)} \(Twisted \d+\.\d+\.\d+\S*\)\n", version.stdout)

    listed = environment.run("mailproxy-example-config", "--list", cwd=work)
    assert listed.stdout.splitlines() == EXAMPLES == exampleNames(), listed.stderr
    unit = environment.run("mailproxy-example-config", "mailproxy.service", cwd=work)
    assert unit.stdout == (REPO / "etc" / "mailproxy.service").read_text()
    written = environment.run("mailproxy-example-config", "--output", str(work / "examples"), cwd=work)
    assert written.returncode == 0, written.stderr
    for name in EXAMPLES:
        assert (work / "examples" / name).read_bytes() == (REPO / "etc" / name).read_bytes()

    passwd = environment.run("mailproxy-passwd", "--stdin", str(work / "users"), "alice", cwd=work, stdin="alicepw\n")
    assert passwd.returncode == 0, passwd.stderr


def checkServes(environment: Environment, work: Path) -> None:
    """
    A real C{twistd -n mailproxy --config} run starts and greets on its
    listener (the upstream need not exist for that).
    """
    port = freePort()
    config = work / "mailproxy.toml"
    config.write_text(
        f"""
[auth]
users_file = "users"
[[listener]]
name = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1"
[upstream.main]
host = "127.0.0.1"
port = {freePort()}
tls = "plain"
[routing]
default_upstream = "main"
"""
    )
    proxy = ProxyProcess(str(config), str(work / "twistd.log"), twistd=str(environment.bin / "twistd"))
    try:
        proxy.waitForPorts([port], timeout=60)
        with socket.create_connection((HOST, port), timeout=10) as connection:
            assert connection.makefile("rb").readline().startswith(b"* OK ")
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.output()


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """
    A working directory outside the source tree, so nothing is found there
    by accident.
    """
    directory = tmp_path / "work"
    directory.mkdir()
    yield directory


def test_editable_install_gives_a_working_twistd_plugin(source: Path, tmp_path: Path, work: Path) -> None:
    """pip install -e . (PEP 660, no compat mode): twistd finds the plugin in the checkout."""
    environment = makeEnvironment(tmp_path / "venv")
    environment.pipInstall("-e", str(source), cwd=source)
    assert importedFrom(environment, work).is_relative_to(source)
    checkCommands(environment, work)
    checkServes(environment, work)


def test_regular_install_gives_a_working_twistd_plugin(source: Path, tmp_path: Path, work: Path) -> None:
    """pip install . : the plugin and the example files are in site-packages."""
    environment = makeEnvironment(tmp_path / "venv")
    environment.pipInstall(str(source), cwd=source)
    assert importedFrom(environment, work).is_relative_to(environment.directory)
    checkCommands(environment, work)
    checkServes(environment, work)


def test_example_output_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--output stops (exit 1, naming the file) before writing anything if one file exists; --force overwrites."""
    (tmp_path / "mailproxy.service").write_text("mine\n")
    assert examples.main(["--output", str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err
        == f"mailproxy-example-config: {tmp_path / 'mailproxy.service'} exists (--force overwrites)\n"
    )
    assert (tmp_path / "mailproxy.service").read_text() == "mine\n"
    assert not (tmp_path / "mailproxy.example.toml").exists()
    assert examples.main(["--output", str(tmp_path), "--force", "mailproxy.service"]) == 0
    assert (tmp_path / "mailproxy.service").read_bytes() == (REPO / "etc" / "mailproxy.service").read_bytes()
    assert not (tmp_path / "mailproxy.example.toml").exists()


def test_unknown_example_is_a_usage_error_listing_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown NAME exits 2 and says which names exist."""
    with pytest.raises(SystemExit) as exited:
        examples.main(["mailproxy.conf"])
    assert exited.value.code == 2
    assert "no example file 'mailproxy.conf'; there are: fail2ban/filter.d/mailproxy.conf" in capsys.readouterr().err
