# -*- test-case-name: tests.test_accounts_http -*-
"""
One bounded HTTP exchange with treq, for the services the proxy asks
during a login (an OAuth 2.0 token endpoint, an account backend): the
whole answer, body included, within a timeout and a size, or one error
saying why not.  A stalled body must not hold a login past its timeout,
and a huge one must not be read whole before its size is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers


class HTTPUnavailable(Exception):
    """
    No usable answer: a timeout, a refused connection, a broken or
    oversized answer.
    """


class _QuietFactory(_HTTP11ClientFactory):
    # "Starting factory" for each connection says nothing to an operator.
    noisy = False


def connectionPool(reactor: Any) -> HTTPConnectionPool:
    """
    Persistent connections that log nothing of their own.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory
    return pool


@dataclass(frozen=True)
class Answer:
    code: int
    headers: Headers
    body: bytes


async def exchange(
    reactor: Any,
    method: str,
    url: str,
    *,
    headers: Mapping[bytes, list[bytes]],
    timeout: float,
    maxBody: int,
    data: Any = None,
    pool: HTTPConnectionPool | None = None,
    unavailable: type[Exception] = HTTPUnavailable,
    shownAs: str | None = None,
) -> Answer:
    """
    Send one request; its answer.

    @param shownAs: C{url} as error messages name it (without secrets).
    @raise unavailable: (an L{HTTPUnavailable} by default) if there is no
        whole answer of at most C{maxBody} octets in C{timeout} s, its
        message naming C{url} and why.
    """
    name = shownAs or url

    async def run() -> Answer:
        # Never redirected: a Location would take the request (a password, a
        # shared secret) elsewhere, and its answer would be taken as the
        # service's.
        response = await treq.request(
            method,
            url,
            data=data,
            headers=Headers(dict(headers)),
            reactor=reactor,
            pool=pool,
            allow_redirects=False,
        )
        chunks: list[bytes] = []
        size = 0

        def collect(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > maxBody:
                raise unavailable(f"{name}: an answer of over {maxBody} octets")
            chunks.append(chunk)

        await treq.collect(response, collect)
        return Answer(response.code, response.headers, b"".join(chunks))

    asking = Deferred.fromCoroutine(run())
    asking.addTimeout(timeout, reactor)
    try:
        return await asking
    except unavailable:
        raise
    except (defer.CancelledError, defer.TimeoutError):
        raise unavailable(f"{name}: no answer in {timeout:g} s") from None
    except (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed) as error:
        reasons = getattr(error, "reasons", [])
        for reason in reasons:
            if reason.check(unavailable):
                raise reason.value from None
        if any(reason.check(defer.CancelledError) for reason in reasons):
            raise unavailable(f"{name}: no answer in {timeout:g} s") from None
        raise unavailable(f"{name}: {', '.join(reason.getErrorMessage() for reason in reasons)}") from None
    except (ConnectError, DNSLookupError, OSError) as error:
        raise unavailable(f"{name}: {error}") from None
