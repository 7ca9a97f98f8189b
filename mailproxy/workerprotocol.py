# -*- test-case-name: tests.test_workers -*-
"""
What the supervisor and its worker processes say to each other (AMP over
one UNIX socket pair per worker).

Workers ask the supervisor, which holds the one set of counters and the
one credentials cache for the whole proxy: admit a connection, count a
session, take a login turn and check a password.  The
supervisor asks workers to reload and for their metrics; workers
ask it for the configuration.  (Log lines take a pipe of their own: see
L{mailproxy.worker.LogForwarder}.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from mailproxy.ampcodec import LeanAMP, encodeBox
from mailproxy.imap.upstream import OAuthRefused, OAuthUnavailable
from mailproxy.writenow import writeNow

# AMP values are at most 65,535 bytes: longer texts travel in pages.
PAGE = 60_000


class Admit(amp.Command):
    """
    Count a new connection from C{network}; the answer says why it is
    refused, if it is.
    """

    arguments = [(b"network", amp.Unicode())]
    response = [(b"refusal", amp.Unicode(optional=True))]


class Release(amp.Command):
    """
    A connection admitted before has ended.
    """

    arguments = [(b"network", amp.Unicode())]
    requiresAnswer = False


class StartSession(amp.Command):
    arguments = [(b"user", amp.Unicode())]
    response = [(b"started", amp.Boolean())]


class EndSession(amp.Command):
    arguments = [(b"user", amp.Unicode())]
    requiresAnswer = False


class BeginLogin(amp.Command):
    """
    Queue a login attempt; when its turn comes, check the password (none:
    refuse without a check) and settle the attempt.  Answered with the
    L{Turn}'s name, the delay before answering a refusal, and after a
    C{CHECK} turn the avatar ID if the password was right (and the account
    an account backend gave, as JSON), whether the user's session was
    counted (L{StartSession} done with the check), or that the account
    backend was unavailable.  C{client}, C{tls} and C{loginAttempt} (the
    attempt's number on its connection) are for the backend.
    """

    arguments = [
        (b"attempt", amp.Integer()),
        (b"network", amp.Unicode()),
        (b"user", amp.Unicode()),
        (b"protocol", amp.Unicode()),
        (b"password", amp.String(optional=True)),
        (b"client", amp.Unicode(optional=True)),
        (b"tls", amp.Boolean(optional=True)),
        (b"loginAttempt", amp.Integer(optional=True)),
    ]
    response = [
        (b"turn", amp.Unicode()),
        (b"delay", amp.Float()),
        (b"avatar", amp.Unicode(optional=True)),
        (b"account", amp.Unicode(optional=True)),
        (b"unavailable", amp.Boolean(optional=True)),
        (b"session", amp.Boolean(optional=True)),
    ]


class LoginFailed(amp.Command):
    """
    A login whose password checked failed after all (the upstream refused
    the password passed on, or there is no route): count it; the answer
    is how long to wait before saying so.
    """

    arguments = [(b"network", amp.Unicode()), (b"user", amp.Unicode()), (b"protocol", amp.Unicode())]
    response = [(b"delay", amp.Float())]


class AbandonLogin(amp.Command):
    """
    The client left while its attempt waited for its turn.
    """

    arguments = [(b"attempt", amp.Integer())]
    requiresAnswer = False


class AccessToken(amp.Command):
    """
    A current OAuth 2.0 access token of a local user from a provider (by
    name): the supervisor keeps them, so that one refresh serves every
    worker.
    """

    arguments = [(b"user", amp.Unicode()), (b"provider", amp.Unicode())]
    response = [(b"token", amp.Unicode()), (b"mechanism", amp.Unicode())]
    errors = {OAuthRefused: b"OAUTH_REFUSED", OAuthUnavailable: b"OAUTH_UNAVAILABLE"}


class ForgetAccessToken(amp.Command):
    """
    The upstream refused this access token: the next ask refreshes.
    """

    arguments = [(b"user", amp.Unicode()), (b"token", amp.Unicode())]
    requiresAnswer = False


class Ready(amp.Command):
    """
    The worker listens and serves.
    """

    arguments = [(b"pid", amp.Integer())]
    requiresAnswer = False


class Reload(amp.Command):
    """
    Re-read the configuration (and certificates), as SIGHUP does.
    """

    response = [(b"reloaded", amp.Boolean())]


class GetConfig(amp.Command):
    """
    Page C{page} of the configuration file as the supervisor last loaded
    it (a worker never reads a file an admin is still editing).
    """

    arguments = [(b"page", amp.Integer())]
    response = [(b"text", amp.String()), (b"more", amp.Boolean())]


class CollectMetrics(amp.Command):
    """
    Page C{page} of the worker's metrics in Prometheus's text format.
    """

    arguments = [(b"page", amp.Integer())]
    response = [(b"text", amp.String()), (b"more", amp.Boolean())]


class Channel(LeanAMP):
    """
    AMP between the supervisor and a worker (L{LeanAMP}: a login makes
    four calls).  A question or an answer is sent to the socket at once
    (L{writeNow}) rather than on the reactor's next turn: a login waits for
    two round trips.  A command that wants no answer waits for the turn's
    end, so that what a closing connection gives back (its session and its
    place) goes in one write and wakes the supervisor once.
    """

    def sendFields(self, fields: dict[bytes, bytes]) -> None:
        if self._locked or self.transport is None or self._startingTLSBuffer is not None:
            # AMP's own checks and errors.
            super().sendFields(fields)
        elif amp.COMMAND in fields and amp.ASK not in fields:
            # A worker that exits before the turn ends loses it: harmless,
            # the supervisor gives back all a gone worker held.
            self.transport.write(encodeBox(fields))
        else:
            writeNow(self.transport, encodeBox(fields))


class OneProtocolFactory(Factory):
    """
    The factory of a channel whose protocol is already made (to adopt one
    end of a socket pair).
    """

    def __init__(self, protocol: amp.AMP) -> None:
        self.channel = protocol

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self.channel


def pageOf(text: bytes, page: int) -> dict[str, Any]:
    """
    The answer to a paged command (L{GetConfig}, L{CollectMetrics}): page
    C{page} of C{text}.
    """
    return {"text": text[page * PAGE : (page + 1) * PAGE], "more": len(text) > (page + 1) * PAGE}


# A paged text longer than this many pages is refused (16 MB).
MAX_PAGES = 280


def fetchPages(channel: amp.AMP, command: type[amp.Command]) -> Deferred[bytes]:
    """
    The whole text a paged C{command} answers, page by page.
    """
    pages: list[bytes] = []
    fetched: Deferred[bytes] = Deferred()

    def ask(page: int) -> None:
        asking = channel.callRemote(command, page=page)
        asking.addCallbacks(lambda answer: got(page, answer), fetched.errback)

    def got(page: int, answer: dict[str, Any]) -> None:
        pages.append(answer["text"])
        if not answer["more"]:
            fetched.callback(b"".join(pages))
        elif page + 1 >= MAX_PAGES:
            fetched.errback(ValueError(f"{command.__name__}: more than {MAX_PAGES} pages"))
        else:
            ask(page + 1)

    ask(0)
    return fetched
