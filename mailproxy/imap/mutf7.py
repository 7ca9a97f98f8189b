# -*- test-case-name: tests.test_folders_filter -*-
"""
Modified UTF-7, the encoding of IMAP mailbox names (RFC 3501, section
5.1.3).

Printable US-ASCII (0x20-0x7e) stands for itself, except C{"&"}, which is
written C{"&-"}; every run of other characters is written as C{"&"}, the
modified BASE64 of its UTF-16BE form (C{","} instead of C{"/"}, no
padding) and C{"-"}.
"""

from __future__ import annotations

import base64
import binascii
import re

_RUN = re.compile(rb"[A-Za-z0-9+,]+")


def encode(name: str) -> bytes:
    """
    Encode a mailbox name.

    @param name: any Unicode text.
    @return: the modified UTF-7 bytes, printable US-ASCII only.
    @raise ValueError: C{name} holds a lone surrogate, which UTF-16 cannot
        represent.
    """
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be"))
            out.extend(b"&" + encoded.rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.extend(b"&-" if char == "&" else char.encode("ascii"))
        else:
            pending.append(char)
    flush()
    return bytes(out)


def decode(data: bytes) -> str:
    """
    Decode a mailbox name.

    Only the canonical encoding is accepted (the one L{encode} writes), so
    C{encode(decode(data)) == data} whenever C{decode} succeeds: no
    printable US-ASCII in BASE64, no padding bits set, no two BASE64 runs in
    a row.

    @param data: modified UTF-7 bytes.
    @raise ValueError: C{data} is not valid modified UTF-7.
    """
    out: list[str] = []
    position = 0
    while position < len(data):
        byte = data[position]
        if not 0x20 <= byte <= 0x7E:
            raise ValueError(f"byte 0x{byte:02x} at offset {position} is not printable US-ASCII")
        if byte != 0x26:  # &
            out.append(chr(byte))
            position += 1
            continue
        end = data.find(b"-", position + 1)
        if end < 0:
            raise ValueError(f'"&" at offset {position} is not closed by "-"')
        run = data[position + 1 : end]
        if not run:
            out.append("&")
        else:
            out.append(_decodeRun(run, position))
        position = end + 1
    result = "".join(out)
    if encode(result) != data:
        raise ValueError("not the canonical modified UTF-7 form")
    return result


def _decodeRun(run: bytes, position: int) -> str:
    """
    Decode the modified BASE64 between C{"&"} and C{"-"}.
    """
    if _RUN.fullmatch(run) is None:
        raise ValueError(f"invalid modified BASE64 after offset {position}")
    try:
        raw = base64.b64decode(run.replace(b",", b"/") + b"=" * (-len(run) % 4), validate=True)
        return raw.decode("utf-16-be")
    except (binascii.Error, UnicodeDecodeError) as error:
        raise ValueError(f"invalid modified BASE64 after offset {position}: {error}") from None


__all__ = ["decode", "encode"]
