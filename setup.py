import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# mailproxy/__init__.py holds the version; read, not imported, so building needs no dependencies.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "mailproxy" / "__init__.py").read_text(), re.M)
assert VERSION is not None, "mailproxy/__init__.py has no __version__"

setup(
    name="mailproxy",
    version=VERSION.group(1),
    description="IMAP/POP3 access proxy: TLS termination, local auth, relay with filters.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    # An explicit root (rather than none) makes setuptools' PEP 660 editable install a static .pth
    # naming the checkout, not an import hook: twistd finds plugins only by scanning the
    # twisted/plugins directories of sys.path entries, which an import hook does not add.
    package_dir={"": "."},
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*", "scripts", "scripts.*"])
    + ["twisted.plugins"],
    # mailproxy/etc is a symbolic link to the checkout's etc/: the example configuration, systemd
    # unit and fail2ban files ship as package data (see mailproxy-example-config).
    package_data={"mailproxy": ["py.typed", "etc/**/*"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl>=24",
        # Already pyOpenSSL's own dependency; used directly to load and match certificates and keys.
        "cryptography>=42",
        "service-identity>=24",
        "zope.interface>=6",
        "prometheus-client>=0.20",
        # OAuth 2.0 token requests: Twisted's own HTTP client, with forms,
        # timeouts and connection pooling done right.
        "treq>=24",
    ],
    extras_require={
        # setuptools: tests/test_install.py builds the project without downloading anything.
        # The SQL account backend on PostgreSQL: psycopg 3, the maintained driver (libpq itself; its
        # binary wheel brings libpq along), run in the backend's own threads.
        "postgresql": ["psycopg[binary]>=3.1"],
        # The LDAP account backend: ldaptor, LDAP for Twisted (its BER codec and message types; no
        # threads, no C library), as the issue asks.
        "ldap": ["ldaptor>=21.2"],
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "trustme>=1.1",
            "setuptools>=70.1",
            "psycopg[binary]>=3.1",
            "ldaptor>=21.2",
        ],
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "trustme>=1.1",
            "setuptools>=70.1",
            "psycopg[binary]>=3.1",
            "ldaptor>=21.2",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "ruff>=0.5",
        ],
        # Coverage-guided fuzzing (make fuzz): libFuzzer for Python, maintained by Google.
        "fuzz": ["atheris>=2.3"],
    },
    entry_points={
        "console_scripts": [
            "mailproxy-passwd = mailproxy.passwd:main",
            "mailproxy-example-config = mailproxy.examples:main",
            "mailproxy-oauth = mailproxy.oauth.authorize:main",
        ]
    },
)
