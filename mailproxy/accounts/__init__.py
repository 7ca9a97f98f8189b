"""
Account backends: where local users, their passwords and their routes come
from when the users file is not enough (an HTTP service as nginx's
C{auth_http} asks one, a database, a directory).

A backend (L{mailproxy.interfaces.IAccountBackend}) answers one question
per login: does this password verify for this user, and if so where does
the session go.  L{mailproxy.accounts.checker.AccountChecker} puts it
behind twisted.cred with a time limit and a cache.
"""
