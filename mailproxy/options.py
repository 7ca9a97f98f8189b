# -*- test-case-name: tests.test_tap -*-
"""
The command line of C{twistd mailproxy}.
"""

from __future__ import annotations

from typing import NoReturn

from twisted.copyright import version as twistedVersion
from twisted.python import usage

import mailproxy


class Options(usage.Options):
    """
    C{twistd mailproxy --config FILE}.
    """

    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def opt_version(self) -> NoReturn:
        """
        Display mailproxy's and Twisted's versions and exit.
        """
        print(f"mailproxy {mailproxy.__version__} (Twisted {twistedVersion})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError(
                "--config FILE is required (mailproxy-example-config --output DIR writes an example to start from)"
            )
