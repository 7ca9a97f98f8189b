"""
The proxy's TOML configuration for the integration tests, written from
Python values: one function a kind of table, every value written by
L{tomlValue} and every key by L{tomlKey} (the camelCase name of a keyword
argument as the configuration's snake_case key).  A key given C{None} is
left out, so that the proxy's own default is what a test gets.

Each function returns its table with a blank line before it; a
configuration is the tables joined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mailproxy.configref import tomlValue
from tests.proxyprocess import HOST

TomlValue = str | bool | int | float | Sequence[str]


@dataclass(frozen=True)
class ListenerKind:
    """
    What a listener the integration tests name alike is (C{None}: the
    proxy's default).
    """

    protocol: str | None = None
    tls: str | None = None
    allowPlaintextAuth: bool | None = None


# A test connects to "plain" for IMAP where a password may be sent without
# TLS, to "cleartext" for IMAP without TLS and with the default (no
# password before TLS), and so on.
LISTENER_KINDS = {
    "plain": ListenerKind(allowPlaintextAuth=True),
    "cleartext": ListenerKind(),
    "starttls": ListenerKind(tls="starttls"),
    "implicit": ListenerKind(tls="implicit"),
    "pop3": ListenerKind(protocol="pop3", allowPlaintextAuth=True),
    "pop3clear": ListenerKind(protocol="pop3"),
    "pop3tls": ListenerKind(protocol="pop3", tls="starttls"),
}


def tomlKey(name: str) -> str:
    """
    The configuration key for the keyword C{name}: C{privateKey} is
    C{private_key}.
    """
    return re.sub(r"[A-Z]", lambda match: "_" + match.group().lower(), name)


def table(header: str, /, **keys: TomlValue | None) -> str:
    """
    The table C{[header]} with C{keys} (those not C{None}).
    """
    return _lines(f"[{header}]", keys)


def arrayTable(header: str, /, **keys: TomlValue | None) -> str:
    """
    One more table of the array C{[[header]]}, with C{keys} (those not C{None}).
    """
    return _lines(f"[[{header}]]", keys)


def _lines(header: str, keys: Mapping[str, TomlValue | None]) -> str:
    lines = [header] + [f"{tomlKey(key)} = {tomlValue(value)}" for key, value in keys.items() if value is not None]
    return "\n" + "\n".join(lines) + "\n"


def authTable(**keys: TomlValue | None) -> str:
    """
    C{[auth]} with the C{users} file L{tests.proxyprocess.runningProxy}
    writes, and C{keys}.
    """
    return table("auth", usersFile="users", **keys)


def listenerTable(
    name: str,
    port: int,
    protocol: str | None = None,
    tls: str | None = None,
    certificate: str | None = None,
    privateKey: str | None = None,
    allowPlaintextAuth: bool | None = None,
    **more: TomlValue | None,
) -> str:
    """
    A C{[[listener]]} on C{port} of the loopback address.
    """
    return arrayTable(
        "listener",
        name=name,
        protocol=protocol,
        endpoint=f"tcp:{port}:interface={HOST}",
        tls=tls,
        certificate=certificate,
        privateKey=privateKey,
        allowPlaintextAuth=allowPlaintextAuth,
        **more,
    )


def namedListeners(ports: Mapping[str, int], certificate: str, privateKey: str) -> str:
    """
    A listener for each name of C{ports} (a key of L{LISTENER_KINDS}), on
    its port, those with TLS serving C{certificate}.
    """
    tables = []
    for name, port in ports.items():
        kind = LISTENER_KINDS[name]
        tls = kind.tls is not None
        tables.append(
            listenerTable(
                name,
                port,
                protocol=kind.protocol,
                tls=kind.tls,
                certificate=certificate if tls else None,
                privateKey=privateKey if tls else None,
                allowPlaintextAuth=kind.allowPlaintextAuth,
            )
        )
    return "".join(tables)


def upstreamTable(name: str, port: int, protocol: str | None = None, host: str = HOST, **more: TomlValue | None) -> str:
    """
    C{[upstream.name]}: the server at C{host} and C{port}.
    """
    return table(f"upstream.{name}", protocol=protocol, host=host, port=port, **more)


def routingTable(defaultUpstream: str, users: Mapping[str, Mapping[str, TomlValue]] | None = None) -> str:
    """
    C{[routing]} to C{defaultUpstream}, and a C{[routing.users."NAME"]}
    table for each of C{users}, with its keys.
    """
    return table("routing", defaultUpstream=defaultUpstream) + "".join(
        table(f"routing.users.{tomlValue(user)}", **keys) for user, keys in (users or {}).items()
    )
