"""
Filter discovery through Twisted's plugin system: the built-in filters, and
the README's third-party example found from another directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailproxy.config import ConfigError, FilterConfig
from mailproxy.filters.registry import buildFilters, filterFactories

REPO = Path(__file__).resolve().parent.parent


def readmeExample() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- example-filter -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match is not None, "the README lost its example filter"
    return match.group(1)


def test_builtin_filters_are_plugins() -> None:
    """audit, policy, folders and capabilities are found by name."""
    assert {"audit", "policy", "folders", "capabilities"} <= set(filterFactories())


def test_unknown_type_and_bad_options_are_config_errors() -> None:
    """A missing plugin or a wrong option is a ConfigError naming the filter."""
    with pytest.raises(ConfigError, match=r"filters.x.type: no filter plugin 'nope' \(installed: .*audit"):
        buildFilters({"x": FilterConfig("x", "nope")})
    with pytest.raises(ConfigError, match=r"filters.p: .*max_append_size"):
        buildFilters({"p": FilterConfig("p", "policy", {"max_append_size": "big"})})


def test_readme_example_is_found_and_works_from_another_directory(tmp_path: Path) -> None:
    """The README's plugin, dropped into DIR/mailproxy/plugins on PYTHONPATH, is discovered and refuses EXPUNGE."""
    plugins = tmp_path / "mailproxy" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "no_expunge.py").write_text(readmeExample())
    script = """
import json
from mailproxy.config import FilterConfig
from mailproxy.filters.registry import buildFilters
from mailproxy.imap.model import parseCommand
from mailproxy.session import ProxySession
from mailproxy.filters.chain import FilterChain

built = buildFilters({"keep": FilterConfig("keep", "no-expunge", {"message": "Ask the admin"})})
chain = FilterChain([built["keep"]])
session = ProxySession("imap", "imap", "127.0.0.1:1", True, chain)
refused = chain.filterCommand(session, parseCommand([b"a UID EXPUNGE 1:5\\r\\n"]))
passed = chain.filterCommand(session, parseCommand([b"b NOOP\\r\\n"]))
print(json.dumps([refused.text, refused.code, repr(passed)]))
"""
    environment = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=tmp_path, check=True
    )
    assert json.loads(result.stdout) == ["Ask the admin", "NOPERM", "PASS"]
