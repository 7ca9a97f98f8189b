"""
The IMAP commands the proxy knows the arguments of.

Servers reject a command they do not know before reading its arguments, so
they read no literal in it: for the proxy too, a C{{n}} at the end of such
a command's line is text, and the next line is a new command.  A policy
can refuse these commands (L{mailproxy.filters.policy}).
"""

from __future__ import annotations

KNOWN_COMMANDS = frozenset(
    {
        # RFC 9051 and 3501
        b"CAPABILITY",
        b"NOOP",
        b"LOGOUT",
        b"STARTTLS",
        b"AUTHENTICATE",
        b"LOGIN",
        b"ENABLE",
        b"SELECT",
        b"EXAMINE",
        b"CREATE",
        b"DELETE",
        b"RENAME",
        b"SUBSCRIBE",
        b"UNSUBSCRIBE",
        b"LIST",
        b"LSUB",
        b"NAMESPACE",
        b"STATUS",
        b"APPEND",
        b"IDLE",
        b"CHECK",
        b"CLOSE",
        b"UNSELECT",
        b"EXPUNGE",
        b"SEARCH",
        b"FETCH",
        b"STORE",
        b"COPY",
        b"MOVE",
        # extensions the proxy relays
        b"ID",
        b"SORT",
        b"THREAD",
        b"ESEARCH",
        b"NOTIFY",
        b"REPLACE",
        b"GETQUOTA",
        b"GETQUOTAROOT",
        b"SETQUOTA",
        b"GETACL",
        b"SETACL",
        b"DELETEACL",
        b"LISTRIGHTS",
        b"MYRIGHTS",
        b"GETMETADATA",
        b"SETMETADATA",
        b"URLFETCH",
        b"GENURLAUTH",
        b"RESETKEY",
        b"CANCELUPDATE",
        b"COMPRESS",
        b"UNAUTHENTICATE",
        b"XLIST",
    }
)
"""Every command name the proxy knows (upper case, without C{UID})."""

LITERAL_COMMANDS = KNOWN_COMMANDS - {b"IDLE"}
"""
The commands in which the proxy reads literals: IDLE takes no arguments,
and servers that ignore them answer it with a "+" that must not pass for a
literal's (the proxy refuses IDLE with arguments).
"""
