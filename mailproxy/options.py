# -*- test-case-name: tests.test_tap -*-
"""
The command line of C{twistd mailproxy}.
"""

from __future__ import annotations

from twisted.python import usage


class Options(usage.Options):
    """
    C{twistd mailproxy --config FILE}.
    """

    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required (see etc/mailproxy.example.toml)")

