"""
Logins per second: new connections doing greeting, LOGIN and LOGOUT, one
at a time or several in parallel, until a count or a time limit is reached
(whichever comes first).
"""

from __future__ import annotations

import asyncio
import time

from bench.common import HOST

LOGIN_TIMEOUT = 30.0


async def _readTagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError(f"connection closed before the {tag.decode()} reply")
        if line.startswith(tag + b" "):
            return line


async def loginOnce(port: int, user: str, password: str) -> None:
    """
    One connection: greeting, LOGIN (must be OK), LOGOUT.
    """
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"greeting {greeting!r}")
        writer.write(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
        reply = await _readTagged(reader, b"a")
        if not reply.startswith(b"a OK"):
            raise RuntimeError(f"LOGIN refused: {reply.decode(errors='replace').strip()}")
        writer.write(b"b LOGOUT\r\n")
        await _readTagged(reader, b"b")
    finally:
        writer.close()


async def loginRate(port: int, user: str, password: str, parallel: int, maxLogins: int, seconds: float) -> float:
    """
    Logins per second with C{parallel} connections at a time, over at most
    C{maxLogins} logins or C{seconds} seconds.
    """
    done = 0
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        # at most parallel - 1 logins beyond maxLogins are in flight at the end
        while done < maxLogins and time.perf_counter() - started < seconds:
            await asyncio.wait_for(loginOnce(port, user, password), LOGIN_TIMEOUT)
            done += 1

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return done / (time.perf_counter() - started)
