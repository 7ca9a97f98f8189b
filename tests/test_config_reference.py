"""
The configuration reference (L{mailproxy.configref}, README's
"Configuration reference") says exactly what the configuration code
accepts: the same keys in every table, the same defaults, the same types,
the same required keys.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from mailproxy import configref
from mailproxy.accounts.registry import BackendContext, buildBackend
from mailproxy.config import USERS_FILE_BACKEND, Config, ConfigError, parseConfig
from mailproxy.configref import Computed, Key, Required, Table
from mailproxy.filters.registry import buildFilters, closeFilters

README = Path(__file__).resolve().parent.parent / "README.md"
# An (empty) SQLite database the [auth.sql] table can name.
SQLITE_DATABASE = tempfile.mkstemp(prefix="mp-reference-", suffix=".db")[1]
atexit.register(os.unlink, SQLITE_DATABASE)
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
FILTER_TYPE = re.compile(r'type = "([a-z0-9_-]+)"')
# Where each table stands in a document, and a wrong value of each type.
WRONG_TYPE: dict[str, Any] = {
    "string": 12345,
    "string or list": 12345,
    "number": "soon",
    "integer": "many",
    "boolean": "yes",
    "list of strings": "one",
    "table": 5,
    "list of tables": 5,
    "path": 5,
    "endpoint": 5,
}


# What a value of each documented type is once TOML is read.
PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "string or list": (str, list),
    "number": (int, float),
    "integer": int,
    "boolean": bool,
    "list of strings": list,
    "table": dict,
    "list of tables": list,
    "path": str,
    "endpoint": str,
}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("reference") / "cert.pem"
    trustme.CA().issue_cert("mail.example.test").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


def baseDocument(certificate: str) -> dict[str, Any]:
    """
    The smallest document with every table present, a TLS listener and one
    filter: each test changes one key of it.
    """
    return {
        "server": {},
        "auth": {"users_file": "users"},
        "limits": {},
        "metrics": {},
        "listener": [{"endpoint": "tcp:0", "tls": "implicit", "certificate": certificate}],
        "upstream": {"main": {"host": "localhost", "port": 993}},
        "routing": {"default_upstream": "main"},
        "filters": {"f": {"type": "audit", "log": False}},
        "oauth2": {
            "token_store": "tokens",
            "key_file": "token.key",
            "p": {"client_id": "proxy", "token_endpoint": "https://as.example.test/token"},
        },
    }


def tableIn(document: dict[str, Any], item: Table) -> dict[str, Any]:
    """
    The table of C{document} that C{item} documents (made if missing).
    """
    match = FILTER_TYPE.fullmatch(item.heading)
    if match is not None:
        document["filters"]["f"] = {"type": match.group(1)}
        return document["filters"]["f"]
    if item.location == "listener[N]":
        return document["listener"][0]
    if item.location == "listener[N].certificates[N]":
        listener = document["listener"][0]
        listener["certificates"] = [{"certificate": listener["certificate"]}]
        return listener["certificates"][0]
    if item.location == "upstream.NAME":
        return document["upstream"]["main"]
    if item.location == "filters.NAME":
        return document["filters"]["f"]
    if item.location == "routing.users.NAME":
        return document["routing"].setdefault("users", {}).setdefault("alice", {})
    if item.location == "oauth2.NAME":
        return document["oauth2"]["p"]
    if item.location == "auth.http":
        document["auth"]["backend"] = "http"
        return document["auth"].setdefault("http", {"url": "http://127.0.0.1:9/auth"})
    if item.location == "auth.sql":
        document["auth"]["backend"] = "sql"
        return document["auth"].setdefault("sql", {"database": SQLITE_DATABASE})
    if item.location == "auth.ldap":
        document["auth"]["backend"] = "ldap"
        return document["auth"].setdefault("ldap", {"url": "ldap://127.0.0.1:9", "base": "dc=example,dc=org"})
    return document[item.location]


def where(item: Table, key: str) -> str:
    location = {
        "listener[N]": "listener[0]",
        "listener[N].certificates[N]": "listener[0].certificates[0]",
        "upstream.NAME": "upstream.main",
        "routing.users.NAME": "routing.users.alice",
        "filters.NAME": "filters.f",
        "oauth2.NAME": "oauth2.p",
    }.get(item.location, item.location)
    return f"{location}.{key}"


def load(document: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """
    Parse C{document} and build its filters and account backend, as
    start-up does.
    """
    config = parseConfig(document, "/nonexistent")
    filters = buildFilters(config.filters)
    closeFilters(filters.values())
    built = dict(filters)
    if config.authBackend != USERS_FILE_BACKEND:
        backend = buildBackend(config, BackendContext(None, config, config.lookupTimeout, None))
        built["[auth backend]"] = backend
    return config, built


def describe(config: Config, built: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    # Built filters and backends have no equality of their own; their
    # settings do (a backend's settings table is compared as built).
    own = {
        name: {
            key: value
            for key, value in vars(item).items()
            if key not in ("reactor", "config", "_pool", "_connections", "_decoy")
        }
        for name, item in built.items()
    }
    return dataclasses.replace(config, filters={}, authBackendSettings={}), own


ALL_KEYS = [pytest.param(item, key, id=f"{item.heading} {key.name}") for item in configref.TABLES for key in item.keys]


def test_readme_holds_the_generated_reference() -> None:
    """README's reference is exactly C{python -m mailproxy.configref}'s output."""
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "README lacks the reference markers"
    inside = text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert inside == configref.markdown(), "README is out of date: paste `python -m mailproxy.configref` into it"


def test_every_table_of_the_file_is_documented(certificate: str) -> None:
    """The top-level tables the parser knows are the documented ones."""
    document = baseDocument(certificate)
    document["nonsense"] = {}
    with pytest.raises(ConfigError) as raised:
        parseConfig(document, "/nonexistent")
    accepted = set(re.search(r"expected one of (.*)\)", str(raised.value)).group(1).split(", "))  # type: ignore[union-attr]
    documented = {item.location.split(".")[0].split("[")[0] for item in configref.TABLES}
    assert accepted == documented


# Keys of [filters.NAME] besides type are the plugin's options, documented per type.
CLOSED_TABLES = [item for item in configref.TABLES if item.heading != "[filters.NAME]"]


@pytest.mark.parametrize("item", CLOSED_TABLES, ids=[item.heading for item in CLOSED_TABLES])
def test_documented_keys_are_exactly_the_accepted_ones(item: Table, certificate: str) -> None:
    """An unknown key is refused with the list of known ones: the documented ones."""
    document = baseDocument(certificate)
    tableIn(document, item)["zz_unknown"] = 1
    with pytest.raises(ConfigError) as raised:
        load(document)
    message = str(raised.value)
    assert "zz_unknown" in message
    accepted = set(re.search(r"expected one of:? (.*)\)", message).group(1).split(", "))  # type: ignore[union-attr]
    if FILTER_TYPE.fullmatch(item.heading):
        accepted.add("type")
        documented = {key.name for key in item.keys} | {"type"}
    else:
        documented = {key.name for key in item.keys}
    assert accepted == documented


@pytest.mark.parametrize(
    ("item", "key"),
    [param for param in ALL_KEYS if not isinstance(param.values[1].default, Required | Computed)],  # type: ignore[attr-defined]
)
def test_a_documented_default_changes_nothing(item: Table, key: Key, certificate: str) -> None:
    """Writing a key with its documented default (of its documented type) gives what leaving it out gives."""
    assert isinstance(key.default, PYTHON_TYPES[key.type]) and not (
        isinstance(key.default, bool) and key.type != "boolean"
    ), f"the default {key.default!r} is not a {key.type}"
    document = baseDocument(certificate)
    table = tableIn(document, item)
    if key.name in table:
        # The base document's TLS listener: the default is plain.
        table.clear()
        table["endpoint"] = "tcp:0"
    before = describe(*load(copy.deepcopy(document)))
    table[key.name] = copy.deepcopy(key.default)
    assert describe(*load(document)) == before


@pytest.mark.parametrize(("item", "key"), ALL_KEYS)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(item: Table, key: Key, certificate: str) -> None:
    """A value of another type than documented stops start-up with the key named."""
    document = baseDocument(certificate)
    tableIn(document, item)[key.name] = WRONG_TYPE[key.type]
    with pytest.raises(ConfigError) as raised:
        load(document)
    message = str(raised.value)
    if FILTER_TYPE.fullmatch(item.heading) and not message.startswith(where(item, key.name) + ":"):
        # Options are checked by the filter plugin, which names the option.
        assert message.startswith("filters.f: ") and key.name in message
    else:
        assert message.startswith(where(item, key.name) + ":")


@pytest.mark.parametrize(
    ("item", "key"),
    [param for param in ALL_KEYS if param.values[1].type == "integer"],  # type: ignore[attr-defined]
)
def test_an_integer_key_refuses_a_fraction(item: Table, key: Key, certificate: str) -> None:
    """A key documented as an integer does not quietly round 1.5."""
    document = baseDocument(certificate)
    tableIn(document, item)[key.name] = 1.5
    with pytest.raises(ConfigError) as raised:
        load(document)
    assert key.name in str(raised.value)


@pytest.mark.parametrize(
    ("item", "key"),
    [param for param in ALL_KEYS if isinstance(param.values[1].default, Required)],  # type: ignore[attr-defined]
)
def test_a_required_key_is_required(item: Table, key: Key, certificate: str) -> None:
    """Leaving out a required key (in the case the reference names) is refused naming it."""
    document = baseDocument(certificate)
    table = tableIn(document, item)
    if key.default.when == "with proxy_protocol":
        table["proxy_protocol"] = True
    else:
        assert key.name in table, "the base document should have every required key"
    table.pop(key.name, None)
    with pytest.raises(ConfigError) as raised:
        load(document)
    assert str(raised.value).startswith(where(item, key.name) + ":")


@given(
    st.recursive(
        st.text() | st.booleans() | st.integers(-(2**63), 2**63 - 1),
        lambda inner: st.lists(inner, max_size=4),
        max_leaves=8,
    )
)
def test_toml_values_read_back_as_themselves(value: Any) -> None:
    """tomlValue (the reference's defaults, the tests' configuration files) writes TOML that reads back unchanged."""
    assert tomllib.loads(f"key = {configref.tomlValue(value)}")["key"] == value
