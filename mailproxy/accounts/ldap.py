# -*- test-case-name: tests.test_accounts_ldap -*-
"""
An account backend that finds users in an LDAP directory, as Dovecot's
LDAP passdb and perdition do, with ldaptor (the C{ldap} extra).

Each login searches the directory, as the search account (C{bind_dn}) or
anonymously, for the one entry the configured filter finds (see
L{mailproxy.accounts.ldapfilter}: the user name is put into the parsed
filter, never into its text).  Then, by C{verify}:

  - C{bind} (the default): the user's password is checked by binding as
    that entry.  The directory keeps its hashes to itself, and its
    password policies (lockouts, expiry) apply.  An empty password is
    refused before any bind: LDAP takes a bind with a name and no password
    as an anonymous one that succeeds (RFC 4513 5.1.2).
  - C{hash}: the entry's stored hash (C{password_attribute}, by default
    C{userPassword}) is read by the search account and checked in the
    proxy's hashing threads (L{mailproxy.accounts.hashes}: OpenLDAP's
    C{{SSHA}} family, C{{CRYPT}}, scrypt...).  An unknown user costs a
    decoy hash, as a wrong password does.

The entry's C{name_attribute} (C{uid}) is the account's name, for limits,
routes and logs, however the user spelt it (a directory's matching rules
ignore case, say).  Its attributes named in C{[auth.ldap.attributes]} give the route
(C{upstream}, C{server}, C{port}, C{username}, C{upstream_password},
C{filters}); what they leave out comes from the configuration's routing.

No entry, or a wrong password, refuses the login.  More than one entry,
a directory that does not answer within the lookup time, refuses the
search account or fails otherwise makes the backend unavailable.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Any

from ldaptor.protocols import pureldap
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailproxy.accounts.directory import (
    SUCCESS,
    DirectoryAddress,
    DirectoryConnections,
    answerMessage,
    resultText,
)
from mailproxy.accounts.hashes import DecoyHash, UnsupportedHash, verifyStored
from mailproxy.accounts.ldapfilter import FilterTemplate
from mailproxy.accounts.model import (
    ROUTE_FIELDS,
    Account,
    AccountRefused,
    BackendUnavailable,
    LoginRequest,
    routedAccount,
)
from mailproxy.accounts.registry import refuseUnknownKeys
from mailproxy.config import resolvePath
from mailproxy.interfaces import IAccountBackend
from mailproxy.tls import clientOptions

log = Logger(namespace="mailproxy.accounts.ldap")
DEFAULT_FILTER = "(&(objectClass=inetOrgPerson)(uid=%u))"
DEFAULT_BINDERS = 4
SCOPES = {"base": 0, "onelevel": 1, "subtree": 2}
VERIFY_MODES = ("bind", "hash")
_SETTINGS = {
    "url",
    "starttls",
    "ca_file",
    "verify_certificate",
    "bind_dn",
    "bind_password",
    "base",
    "scope",
    "filter",
    "verify",
    "password_attribute",
    "name_attribute",
    "attributes",
    "connections",
}
INVALID_CREDENTIALS = 49
SIZE_LIMIT_EXCEEDED = 4


@implementer(IAccountBackend)
class LDAPBackend:
    """
    Look users up in a directory (see the module's description).
    """

    def __init__(
        self,
        reactor: Any,
        connections: DirectoryConnections,
        base: str,
        scope: int,
        searchFilter: Any,
        verify: str,
        passwordAttribute: str,
        nameAttribute: str,
        attributes: Mapping[str, str],
        runInThread: Any,
        timeout: float,
    ) -> None:
        """
        @param searchFilter: a L{mailproxy.accounts.ldapfilter.FilterTemplate}.
        @param nameAttribute: the attribute whose value is the account's
            name (for limits, routes and logs), however the user typed it.
        @param attributes: route fields to the attributes that hold them.
        """
        self.reactor = reactor
        self.connections = connections
        self.base = base
        self.scope = scope
        self.searchFilter = searchFilter
        self.verify = verify
        self.passwordAttribute = passwordAttribute
        self.nameAttribute = nameAttribute
        self.attributes = dict(attributes)
        self.runInThread = runInThread
        self.timeout = timeout
        self._decoy = DecoyHash()
        wanted = {*self.attributes.values(), nameAttribute}
        if verify == "hash":
            wanted.add(passwordAttribute)
        self._requested = sorted(wanted)
        self.where = connections.addresses[0].url

    @classmethod
    def fromSettings(cls, settings: dict[str, Any], context: Any) -> LDAPBackend:
        refuseUnknownKeys(settings, _SETTINGS)
        urls = settings.get("url")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            raise ValueError("url: required, an ldap:// or ldaps:// URL, or a list of them tried in order")
        startTLS = _boolean(settings, "starttls", False)
        verifyCertificate = _boolean(settings, "verify_certificate", True)
        caFile = settings.get("ca_file")
        if caFile is not None:
            if not isinstance(caFile, str):
                raise ValueError("ca_file: a path")
            caFile = resolvePath(context.config.directory, caFile)

        def tlsOptions(host: str) -> Any:
            return clientOptions(host, caFile, verifyCertificate, "auth.ldap")

        trust = "unverified" if not verifyCertificate else f"ca_file {caFile}" if caFile else "the system's trust store"
        addresses = [DirectoryAddress.fromURL(url, startTLS, tlsOptions, trust) for url in urls]
        for address in addresses:
            if address.tlsOptions is None and not _loopback(address.host):
                log.warn(
                    "auth.ldap: {url} without TLS: users' passwords and bind_password cross the network in clear "
                    "(ldaps://, or starttls = true)",
                    url=address.url,
                )
        bindDN = _text(settings, "bind_dn")
        bindPassword = _text(settings, "bind_password")
        if (bindDN is None) != (bindPassword is None):
            raise ValueError("bind_dn: and bind_password come together (neither: anonymous searches)")
        base = _text(settings, "base")
        if base is None:
            raise ValueError("base: required, the DN searches start at")
        scope = settings.get("scope", "subtree")
        if scope not in SCOPES:
            raise ValueError(f"scope: one of {', '.join(SCOPES)}")
        filterText = settings.get("filter", DEFAULT_FILTER)
        if not isinstance(filterText, str):
            raise ValueError("filter: an LDAP filter")
        verify = settings.get("verify", "bind")
        if verify not in VERIFY_MODES:
            raise ValueError("verify: bind (as the user's entry) or hash (the stored password hash)")
        passwordAttribute = _text(settings, "password_attribute") or "userPassword"
        nameAttribute = _text(settings, "name_attribute") or "uid"
        attributes = settings.get("attributes", {})
        if not isinstance(attributes, dict) or not all(isinstance(name, str) and name for name in attributes.values()):
            raise ValueError("attributes: a table of route fields to attribute names")
        for field in attributes:
            if field not in ROUTE_FIELDS:
                raise ValueError(f"attributes: {field!r} is no route field (one of {', '.join(ROUTE_FIELDS)})")
        binders = settings.get("connections", DEFAULT_BINDERS)
        if isinstance(binders, bool) or not isinstance(binders, int) or not 1 <= binders <= 64:
            raise ValueError("connections: the connections users bind over, 1 to 64")
        connections = DirectoryConnections(context.reactor, addresses, context.timeout, bindDN, bindPassword, binders)
        return cls(
            context.reactor,
            connections,
            base,
            SCOPES[scope],
            FilterTemplate(filterText),
            verify,
            passwordAttribute,
            nameAttribute,
            attributes,
            context.runInThread,
            context.timeout,
        )

    def __repr__(self) -> str:
        return f"<LDAPBackend {self.where}>"

    def authenticate(self, request: LoginRequest) -> Deferred[Account]:
        return Deferred.fromCoroutine(self._authenticate(request))

    async def _authenticate(self, request: LoginRequest) -> Account:
        if self.verify == "bind" and not request.password:
            # A bind with a name and no password is an anonymous bind (RFC 4513 5.1.2).
            raise AccountRefused("an empty password")
        entry = await self._find(request)
        values = _attributes(entry) if entry is not None else None
        if self.verify == "bind":
            if entry is None:
                raise AccountRefused("unknown user")
            await self._bind(entry.objectName, request.password)
        else:
            await self._verifyStored(values, request)
        assert values is not None
        return self._account(request, values)

    async def _find(self, request: LoginRequest) -> Any:
        """
        The user's entry, or C{None}.
        """
        searchFilter = self.searchFilter.render(
            {"user": request.username, "protocol": request.protocol, "ip": request.clientIP}
        )
        operation = pureldap.LDAPSearchRequest(
            baseObject=self.base,
            scope=self.scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            # Two are enough to tell one from more than one.
            sizeLimit=2,
            timeLimit=max(1, math.ceil(self.timeout)),
            typesOnly=0,
            filter=searchFilter,
            attributes=self._requested,
        )
        client = await self.connections.searcher()
        try:
            entries, result = await client.search(operation)
        except CancelledError:
            self.connections.searchGivenUp(client)
            raise
        if result.resultCode == SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            raise BackendUnavailable(f"{self.where}: the filter found more than one entry for one user")
        if result.resultCode != SUCCESS:
            raise BackendUnavailable(f"{self.where}: the search failed: {resultText(result)}")
        return entries[0] if entries else None

    async def _bind(self, dn: bytes, password: bytes) -> None:
        client = await self.connections.binder()
        try:
            answer = await client.request(pureldap.LDAPBindRequest(dn=dn, auth=password))
        except BaseException:
            # Given up (or lost) before the answer: what the connection is bound as is unknown.
            self.connections.drop(client, "a bind was given up")
            raise
        self.connections.giveBack(client)
        if answer.resultCode == INVALID_CREDENTIALS:
            raise AccountRefused("wrong password" + _told(answer))
        if answer.resultCode != SUCCESS:
            raise BackendUnavailable(f"{self.where}: a user's bind failed: {resultText(answer)}")

    async def _verifyStored(self, values: dict[str, list[bytes]] | None, request: LoginRequest) -> None:
        """
        Check the password against the entry's stored hashes (C{values}:
        its attributes, C{None} for no entry) in the hashing threads.
        """
        stored = [] if values is None else values.get(self.passwordAttribute.lower(), [])
        hashes = [value.decode("utf-8", "replace") for value in stored]
        decoy = self._decoy

        def check() -> bool:
            if not hashes:
                decoy.check(request.password)
                return False
            unsupported = []
            for encoded in hashes:
                try:
                    right = verifyStored(request.password, encoded)
                except UnsupportedHash as error:
                    unsupported.append(error)
                    continue
                decoy.seen(encoded)
                if right:
                    return True
            if len(unsupported) == len(hashes):
                raise BackendUnavailable(f"{self.where}: {request.username!r}: {unsupported[0]}")
            return False

        right = await self.runInThread(check)
        if values is None:
            raise AccountRefused("unknown user")
        if not stored:
            raise AccountRefused(f"no {self.passwordAttribute} the search account may read")
        if not right:
            raise AccountRefused("wrong password")

    def _account(self, request: LoginRequest, values: dict[str, list[bytes]]) -> Account:
        names = values.get(self.nameAttribute.lower(), [])
        # A directory matches "SAM" to uid=sam: the account is sam's, for limits too.
        name = request.username
        if len(names) == 1:
            try:
                name = names[0].decode("utf-8")
            except UnicodeDecodeError:
                raise BackendUnavailable(
                    f"{self.where}: {self.nameAttribute} of {request.username!r} is not UTF-8"
                ) from None
        route: dict[str, str | None] = {}
        for field in ROUTE_FIELDS:
            attribute = self.attributes.get(field)
            found = values.get(attribute.lower(), []) if attribute else []
            if field != "filters" and len(found) > 1:
                raise BackendUnavailable(f"{self.where}: {attribute} of {request.username!r} has more than one value")
            try:
                texts = [value.decode("utf-8") for value in found]
            except UnicodeDecodeError:
                raise BackendUnavailable(f"{self.where}: {attribute} of {request.username!r} is not UTF-8") from None
            route[field] = ",".join(texts) if texts else None
        return routedAccount(name, route, self.where, request.username)

    def close(self) -> None:
        self.connections.close()


def _attributes(entry: Any) -> dict[str, list[bytes]]:
    """
    An entry's attributes by lower-case name (attribute names are
    case-insensitive).
    """
    values: dict[str, list[bytes]] = {}
    for name, found in entry.attributes:
        key = name.decode("utf-8", "replace").lower() if isinstance(name, bytes) else str(name).lower()
        values.setdefault(key, []).extend(value if isinstance(value, bytes) else str(value).encode() for value in found)
    return values


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _told(answer: Any) -> str:
    message = answerMessage(answer)
    return f": {message}" if message else ""


def _boolean(settings: dict[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: true or false")
    return value


def _text(settings: dict[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{key}: a non-empty string")
    return value
