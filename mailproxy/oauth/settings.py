# -*- test-case-name: tests.test_oauth_config -*-
"""
What the configuration says about OAuth 2.0 (C{[oauth2]}): where tokens
are kept and with which key, and the providers (C{[oauth2.NAME]}), with
presets for Google and Microsoft 365 from their documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MECHANISMS = ("xoauth2", "oauthbearer")


@dataclass(frozen=True)
class OAuthProvider:
    """
    An OAuth 2.0 authorization server the proxy gets access tokens from.

    @ivar name: the provider's name in the configuration (C{[oauth2.NAME]}).
    @ivar mechanism: the SASL mechanism the upstream is logged in with.
    @ivar clientSecret: C{None} for a public client (no secret).
    """

    name: str
    tokenEndpoint: str
    clientId: str
    clientSecret: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ()
    deviceAuthorizationEndpoint: str | None = None
    authorizationEndpoint: str | None = None
    mechanism: str = "xoauth2"
    # Google's device flow refuses the mail scope: say so before trying.
    deviceFlowAllowed: bool = True


@dataclass(frozen=True)
class OAuthLogin:
    """
    Log in upstream as local user C{user} with a token from C{provider}.
    """

    user: str
    provider: OAuthProvider


@dataclass(frozen=True)
class OAuthConfig:
    """
    C{[oauth2]}: the token store, its key, and the providers.

    @ivar refreshMargin: an access token is refreshed this many seconds
        before it expires, so none expires between the check and its use.
    """

    tokenStore: str
    keyFile: str
    providers: dict[str, OAuthProvider] = field(default_factory=dict)
    timeout: float = 10.0
    refreshMargin: float = 60.0


MICROSOFT_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"

# What each preset fills in (a provider's own keys win).  Sources: Google's
# "OAuth 2.0 for TV and Limited-Input Device Applications", "Using OAuth
# 2.0 for Web Server Applications" and the Gmail IMAP/SMTP XOAUTH2 page;
# Microsoft's "Authenticate an IMAP, POP or SMTP connection using OAuth" and
# the identity platform's device code flow page.
PRESETS: dict[str, dict[str, Any]] = {
    "google": {
        "authorization_endpoint": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_endpoint": "https://oauth2.googleapis.com/token",
        "device_authorization_endpoint": "https://oauth2.googleapis.com/device/code",
        "scopes": ["https://mail.google.com/"],
        "mechanism": "xoauth2",
        "deviceFlowAllowed": False,
    },
    "microsoft": {
        "authorization_endpoint": MICROSOFT_LOGIN + "/authorize",
        "token_endpoint": MICROSOFT_LOGIN + "/token",
        "device_authorization_endpoint": MICROSOFT_LOGIN + "/devicecode",
        "scopes": [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/POP.AccessAsUser.All",
            "offline_access",
        ],
        "mechanism": "xoauth2",
    },
    "generic": {},
}
