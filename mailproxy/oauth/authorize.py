# -*- test-case-name: tests.test_oauth -*-
"""
C{mailproxy-oauth}: make the token store's key, and obtain a user's grant:
with the device authorization grant (RFC 8628), which needs no browser on
the proxy's host (the command prints a link and a code, the user signs in
at the provider from any device), or with the authorization code grant,
PKCE and a loopback redirect (RFC 7636, RFC 8252) for providers whose
device flow cannot grant mail access (Google's).  The refresh token is
stored encrypted.

    mailproxy-oauth new-key /etc/mailproxy/token.key
    mailproxy-oauth --config /etc/mailproxy/mailproxy.toml authorize alice microsoft
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import sys
import time
import urllib.parse
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.task import deferLater, react
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailproxy.config import ConfigError, loadConfig
from mailproxy.oauth.client import ProviderUnavailable, TokenError, clientFields, postForm, tokenRequest
from mailproxy.oauth.settings import OAuthConfig, OAuthProvider
from mailproxy.oauth.store import StoredGrant, TokenStore, TokenStoreError, loadKeys, newKey

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 3.5: without "interval", poll every 5 s; "slow_down" adds 5.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN = 5.0
# Microsoft's names for RFC 8628's access_denied and invalid_grant.
DENIED = {"access_denied", "authorization_declined"}


class AuthorizeError(Exception):
    """
    The grant was not obtained; the message says why.
    """


def writeKey(path: str) -> None:
    """
    Write a new key to C{path} (mode 0600), refusing to replace one: the
    grants sealed with it would be lost.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuthorizeError(
            f"{path} exists: add a new key as its first line to rotate (old keys still decrypt)"
        ) from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(newKey() + b"\n")


async def deviceGrant(reactor: Any, provider: OAuthProvider, timeout: float) -> dict[str, Any]:
    """
    Run the device authorization grant with C{provider}; its tokens.

    @raise AuthorizeError: if the user declines, the code expires or the
        provider refuses.
    """
    if provider.deviceAuthorizationEndpoint is None:
        raise AuthorizeError(f"provider {provider.name} has no device_authorization_endpoint")
    if not provider.deviceFlowAllowed:
        raise AuthorizeError(
            f"provider {provider.name}: its device flow does not grant mail scopes (Google's does not)"
        )
    fields = {**clientFields(provider), "scope": " ".join(provider.scopes)}
    code, started = await postForm(reactor, provider.deviceAuthorizationEndpoint, fields, timeout)
    if code != 200 or not isinstance(started.get("device_code"), str):
        raise AuthorizeError(f"device authorization refused: HTTP {code} {started.get('error', '')}".rstrip())
    # Google names it verification_url.
    link = (
        started.get("verification_uri_complete") or started.get("verification_uri") or started.get("verification_url")
    )
    print(f"To let the proxy read mail for this user, open {link}", flush=True)
    print(f"and enter the code {started.get('user_code')} (valid {started.get('expires_in', '?')} s).", flush=True)
    interval = _seconds(started.get("interval"), DEFAULT_INTERVAL, 1.0, 60.0)
    deadline = reactor.seconds() + _seconds(started.get("expires_in"), 900.0, 1.0, 3600.0)
    while reactor.seconds() < deadline:
        await deferLater(reactor, interval, lambda: None)
        try:
            issued = await tokenRequest(
                reactor, provider, {"grant_type": DEVICE_GRANT, "device_code": started["device_code"]}, timeout
            )
        except ProviderUnavailable as error:
            # A passing failure; the user may have signed in meanwhile.
            print(f"(the provider did not answer: {error}; trying again)", flush=True)
            interval = min(interval * 2, 60.0)
            continue
        except TokenError as error:
            if error.error == "authorization_pending":
                continue
            if error.error == "slow_down":
                interval += SLOW_DOWN
                continue
            if error.error in DENIED:
                raise AuthorizeError("the user declined") from None
            if error.error == "expired_token":
                raise AuthorizeError("the code expired before the user signed in; run the command again") from None
            raise AuthorizeError(f"the provider refused: {error}") from None
        if issued.refreshToken is None:
            raise AuthorizeError("the provider gave no refresh token (Microsoft: add the offline_access scope)")
        return {"refresh_token": issued.refreshToken, "scope": issued.scope}
    raise AuthorizeError("the code expired before the user signed in; run the command again")


class _Redirect(Resource):
    """
    The loopback redirect target: the first visit with C{code} or C{error}
    ends the wait.
    """

    isLeaf = True

    def __init__(self, arrived: Deferred[dict[str, str]], state: str) -> None:
        super().__init__()
        self.arrived = arrived
        self.state = state

    def render_GET(self, request: Any) -> bytes:
        query = {key.decode(): values[0].decode("utf-8", "replace") for key, values in request.args.items()}
        if "code" not in query and "error" not in query:
            request.setResponseCode(404)
            return b"Not the authorization's answer.\n"
        if not secrets.compare_digest(query.get("state", "").encode(), self.state.encode()):
            # Not the answer to this request (another page, a local
            # process): refused, and the real one is still awaited.
            request.setResponseCode(400)
            return b"Not the answer to this authorization request.\n"
        if not self.arrived.called:
            self.arrived.callback(query)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"mailproxy-oauth got the answer; you may close this window.\n"


async def browserGrant(reactor: Any, provider: OAuthProvider, timeout: float, wait: float) -> dict[str, Any]:
    """
    Run the authorization code grant with PKCE (RFC 7636) and a loopback
    redirect (RFC 8252): the user opens the printed link in a browser on
    this machine (or with the port forwarded), signs in, and the provider
    sends the browser back here with the code.

    @raise AuthorizeError: if the user declines, the answer does not come
        within C{wait} seconds or does not match.
    """
    if provider.authorizationEndpoint is None:
        raise AuthorizeError(f"provider {provider.name} has no authorization_endpoint")
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    arrived: Deferred[dict[str, str]] = Deferred()
    port = reactor.listenTCP(0, Site(_Redirect(arrived, state)), interface="127.0.0.1")
    try:
        redirect = f"http://127.0.0.1:{port.getHost().port}/"
        query = {
            "response_type": "code",
            "client_id": provider.clientId,
            "redirect_uri": redirect,
            "scope": " ".join(provider.scopes),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
            # Google gives a refresh token only with these.
            "access_type": "offline",
            "prompt": "consent",
        }
        separator = "&" if "?" in provider.authorizationEndpoint else "?"
        print("To let the proxy read mail for this user, open in a browser on this machine:", flush=True)
        print(provider.authorizationEndpoint + separator + urllib.parse.urlencode(query), flush=True)
        arrived.addTimeout(wait, reactor)
        try:
            answer = await arrived
        except TimeoutError:
            raise AuthorizeError(f"no answer from the browser within {wait:g} s; run the command again") from None
        # Let the page for the browser go out before anything can end the process.
        await deferLater(reactor, 0.2, lambda: None)
    finally:
        await port.stopListening()
    if "error" in answer:
        if answer["error"] in DENIED:
            raise AuthorizeError("the user declined")
        raise AuthorizeError(f"the provider refused: {answer['error']}")
    fields = {
        "grant_type": "authorization_code",
        "code": answer["code"],
        "redirect_uri": redirect,
        "code_verifier": verifier,
    }
    try:
        issued = await tokenRequest(reactor, provider, fields, timeout)
    except TokenError as error:
        raise AuthorizeError(f"the provider refused the code: {error}") from None
    if issued.refreshToken is None:
        raise AuthorizeError("the provider gave no refresh token")
    return {"refresh_token": issued.refreshToken, "scope": issued.scope}


def _seconds(value: Any, default: float, least: float, most: float) -> float:
    """
    A number of seconds from the provider, within bounds.
    """
    try:
        seconds = float(value) if value is not None else default
    except (TypeError, ValueError, OverflowError):
        seconds = default
    return min(max(seconds, least), most) if seconds == seconds else default


async def authorize(
    reactor: Any, oauth: OAuthConfig, user: str, providerName: str, browser: bool = False, wait: float = 300.0
) -> str:
    """
    Obtain and store C{user}'s grant from C{providerName}; the file.  The
    device flow unless C{browser} is asked for or the provider's device
    flow cannot grant mail scopes (Google's).
    """
    provider = oauth.providers.get(providerName)
    if provider is None:
        known = ", ".join(sorted(oauth.providers)) or "none"
        raise AuthorizeError(f"no provider [oauth2.{providerName}] (configured: {known})")
    store = TokenStore(oauth.tokenStore, loadKeys(oauth.keyFile))
    if browser or not provider.deviceFlowAllowed or provider.deviceAuthorizationEndpoint is None:
        tokens = await browserGrant(reactor, provider, oauth.timeout, wait)
    else:
        tokens = await deviceGrant(reactor, provider, oauth.timeout)
    store.save(user, StoredGrant(provider.name, tokens["refresh_token"], time.time(), tokens["scope"]))
    return store.path(user)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailproxy-oauth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="/etc/mailproxy/mailproxy.toml", help="the proxy's configuration")
    commands = parser.add_subparsers(dest="command", required=True)
    newKeyCommand = commands.add_parser("new-key", help="write a new token store key (mode 0600)")
    newKeyCommand.add_argument("file")
    authorizeCommand = commands.add_parser("authorize", help="obtain USER's grant from PROVIDER (device flow)")
    authorizeCommand.add_argument("user", help="the local user name")
    authorizeCommand.add_argument("provider", help="the provider's name, [oauth2.PROVIDER]")
    authorizeCommand.add_argument(
        "--browser",
        action="store_true",
        help="sign in with a browser on this machine (authorization code, PKCE, loopback redirect); "
        "the default for providers whose device flow cannot grant mail access (Google)",
    )
    authorizeCommand.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the browser")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "new-key":
            writeKey(arguments.file)
            print(f"wrote a new key to {arguments.file}")
            return 0
        config = loadConfig(arguments.config)
        if config.oauth2 is None:
            raise AuthorizeError(f"{arguments.config} has no [oauth2] table")
        oauth = config.oauth2
    except (AuthorizeError, ConfigError) as error:
        print(f"mailproxy-oauth: {error}", file=sys.stderr)
        return 1
    outcome: list[str] = []

    def run(reactor: Any) -> Deferred[None]:
        async def work() -> None:
            try:
                path = await authorize(
                    reactor, oauth, arguments.user, arguments.provider, arguments.browser, arguments.wait
                )
            except (AuthorizeError, ProviderUnavailable, TokenStoreError, OSError) as error:
                outcome.append(f"mailproxy-oauth: {error}")
                return
            print(f"stored the grant of {arguments.user} from {arguments.provider} in {path}")

        return ensureDeferred(work())

    try:
        react(run)
    except SystemExit as exit:
        if exit.code:
            return int(exit.code)
    if outcome:
        print(outcome[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
