"""
What the README says about the build agrees with the Makefile it describes.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_opens_with_the_two_commands() -> None:
    """The first code block is make demo and make test, as the project promises."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_lists_what_make_test_installs_with_apt() -> None:
    """The README's apt list is the Makefile's APT_PACKAGES, in its order."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    packages = re.search(r"^APT_PACKAGES := (.*)$", makefile, re.M).group(1).split()  # type: ignore[union-attr]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sentence = re.search(r"`make test` installs, with apt, (.*?), and with pip", readme, re.S)
    assert sentence is not None, "the README no longer says what make test installs"
    listed = re.findall(r"`([^`]+)`", sentence.group(1))
    assert listed == packages


def test_every_module_is_in_the_layout_table() -> None:
    """Each module of the package is named in README's layout table, as a path or beside one."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `mailproxy/")]
    named = " ".join(row.split(" | ")[0] for row in rows)
    missing = []
    for module in sorted((REPO / "mailproxy").rglob("*.py")):
        relative = module.relative_to(REPO)
        if module.name == "__init__.py" or "plugins" in relative.parts:
            continue
        inPackage = f"`{relative.parent.as_posix()}/`"
        if f"`{relative.as_posix()}`" not in named and f"`{module.name}`" not in named and inPackage not in named:
            missing.append(relative.as_posix())
    assert missing == []
