"""
OAuth 2.0 upstream login: the proxy logs users in locally with their own
password, then in upstream with an access token (SASL C{XOAUTH2} or
C{OAUTHBEARER}, RFC 7628) refreshed from a refresh token it keeps
encrypted (see L{mailproxy.oauth.store}).  C{mailproxy-oauth authorize}
(L{mailproxy.oauth.authorize}) obtains that refresh token.
"""
