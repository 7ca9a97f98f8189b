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
