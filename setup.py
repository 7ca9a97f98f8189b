from setuptools import find_packages, setup

setup(
    name="mailproxy",
    version="0.1.0",
    description="IMAP/POP3 access proxy: TLS termination, local auth, relay with filters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*", "scripts", "scripts.*"])
    + ["twisted.plugins"],
    package_data={"mailproxy": ["py.typed"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl>=24",
        "service-identity>=24",
        "zope.interface>=6",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "trustme>=1.1"],
        "dev": ["pytest>=8", "hypothesis>=6", "trustme>=1.1", "mypy>=1.10", "mypy-zope>=1.0", "ruff>=0.5"],
        # Coverage-guided fuzzing (make fuzz): libFuzzer for Python, maintained by Google.
        "fuzz": ["atheris>=2.3"],
    },
    entry_points={"console_scripts": ["mailproxy-passwd = mailproxy.passwd:main"]},
)
