"""
Public interfaces of mailproxy.

Filters are objects providing any of L{ICommandFilter}, L{IResponseFilter}
and L{ISessionObserver}; an L{IFilterFactory} plugin builds them from the
options in the configuration.  Each filter method may return its verdict
directly or as a Deferred.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IProxyUser(Interface):
    """
    The avatar of a locally authenticated user: who they are and where their
    session is relayed.
    """

    username = Attribute("The local user name (str).")
    upstream = Attribute("The mailproxy.config.UpstreamConfig the session is relayed to.")
    upstreamUsername = Attribute("The user name presented upstream (str).")
    upstreamPassword = Attribute("The stored upstream password (str), or None to reuse the client's (passthrough).")
    filters = Attribute("The user's filter names (tuple of str), or None for the configuration's.")


class ISession(Interface):
    """
    What a filter knows about the session it sees.
    """

    protocol = Attribute("'imap' or 'pop3'.")
    listener = Attribute("The name of the listener the client connected to (str).")
    clientAddress = Attribute("The client's 'host:port' (str).")
    tls = Attribute("True if the client connection is encrypted.")
    user = Attribute("The local user name (str), or None before login.")
    upstream = Attribute("The upstream's name (str), or None before login.")
    selected = Attribute("The selected mailbox as the client named it (bytes), or None.")


class ICommandFilter(Interface):
    """
    Sees every client command after login.
    """

    def filterCommand(session: ISession, command: Any) -> Any:
        """
        Decide about a parsed command (L{mailproxy.imap.model.IMAPCommand}).

        @return: L{mailproxy.filters.PASS}, a L{mailproxy.filters.Rewrite}
            of the command, a L{mailproxy.filters.Reject} (answered to the
            client, never relayed), or a Deferred of one of these.
        """


class IResponseFilter(Interface):
    """
    Sees every upstream response after login.
    """

    def filterResponse(session: ISession, response: Any) -> Any:
        """
        Decide about a parsed response (L{mailproxy.imap.model.IMAPResponse}).

        @return: L{mailproxy.filters.PASS}, a L{mailproxy.filters.Rewrite},
            L{mailproxy.filters.DROP} (untagged responses only), or a
            Deferred of one of these.
        """


class ISessionObserver(Interface):
    """
    Told about the life of a session; for logging and accounting.
    """

    def sessionEvent(session: ISession, event: str, details: dict[str, Any]) -> None:
        """
        C{event} is one of C{"connected"}, C{"login"} (details: C{ok},
        C{mechanism}), C{"command"} (details: C{command}, C{result},
        C{bytesIn}, C{bytesOut}, C{duration}) and C{"closed"} (details:
        C{bytesIn}, C{bytesOut}, C{duration}).  Never passwords.
        """


class IFilterFactory(Interface):
    """
    A plugin (in the C{mailproxy.plugins} package) that builds a filter from
    its configuration options.
    """

    name = Attribute("The name the configuration uses (str).")
    description = Attribute("One line for humans (str).")

    def build(options: dict[str, Any]) -> Any:
        """
        Build a filter.

        @raise ValueError: naming the option that is wrong.
        """


class IAccountBackend(Interface):
    """
    Where local users, their passwords and their routes come from (the
    users file is the embedded default): an HTTP service, a database, a
    directory.  The proxy asks it once per login that its cache cannot
    answer, with a time limit of its own (C{[auth] lookup_timeout}).
    """

    def authenticate(request: Any) -> Any:
        """
        Verify C{request} (a L{mailproxy.accounts.model.LoginRequest}).

        @return: a L{Deferred} firing with a
            L{mailproxy.accounts.model.Account}, or failing with
            L{mailproxy.accounts.model.AccountRefused} (unknown user, wrong
            password) or L{mailproxy.accounts.model.BackendUnavailable}
            (cannot say now).  It must never block the reactor.
        """

    def close() -> Any:
        """
        Let go of connections and threads (a reload replaced the backend,
        or the proxy stops); may return a L{Deferred}.
        """


class IAccountBackendFactory(Interface):
    """
    A plugin (in the C{mailproxy.plugins} package) that builds an account
    backend from its settings, the C{[auth.NAME]} table.
    """

    name = Attribute("The name C{[auth] backend} uses (str).")
    description = Attribute("One line for humans (str).")

    def build(settings: dict[str, Any], context: Any) -> IAccountBackend:
        """
        Build a backend.  C{context} is a
        L{mailproxy.accounts.registry.BackendContext}: the reactor, the
        configuration, the hashing threads.

        @raise ValueError: naming the setting that is wrong.
        """


class IPOP3Maildrop(Interface):
    """
    A POP3 maildrop for one session (RFC 1939 TRANSACTION state): a
    snapshot of the messages taken at login, numbered from 1.  Messages
    arriving later are not shown until the next session.  Deletions are only
    marks until L{commit} (QUIT); L{abandon} (dropped connection) deletes
    nothing.

    Methods may return values or Deferreds of them.  Message numbers that do
    not exist, or are marked deleted, raise L{mailproxy.pop3.NoSuchMessage}.
    """

    def stat() -> Any:
        """
        C{(count, octets)} of the messages not marked deleted.
        """

    def listing() -> Any:
        """
        C{[(number, octets), ...]} of the messages not marked deleted; octets
        are exact CRLF sizes as RETR will send them (before byte-stuffing).
        """

    def uniqueIds() -> Any:
        """
        C{[(number, uid), ...]} of the messages not marked deleted; C{uid}
        is a str of 1 to 70 printable ASCII characters (0x21-0x7E), stable
        across sessions.
        """

    def retrieve(number: int, write: Any, bodyLines: Any) -> Any:
        """
        Stream message C{number}, CRLF line ends, not byte-stuffed, by
        calling C{write(bytes)} as data arrives; with C{bodyLines} (int), only
        the headers, the blank line and that many body lines (TOP).

        @return: a Deferred that fires when the message is complete.
        """

    def delete(number: int) -> Any:
        """
        Mark message C{number} deleted.
        """

    def reset() -> Any:
        """
        Unmark all messages (RSET).
        """

    def commit() -> Any:
        """
        Apply the deletions (QUIT); a Deferred firing when they are done.
        """

    def abandon() -> None:
        """
        The session ended without QUIT: delete nothing and let go.
        """
