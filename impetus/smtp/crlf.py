"""Line endings of message content.

SMTP content has CRLF line ends only. Reception turns bare CR and bare LF
into CRLF once (the protocol core, the HTTP injection API and the bounce
renderer all do), and the spool keeps bodies in that form, so delivery can
send a spooled body without scanning it again.

The check is two C-level passes over the body (no copy when it is clean):
every CRLF pair holds one CR and one LF, so the body has no bare CR or LF
exactly when ``#CR + #LF == 2 * #CRLF``. At 50 KB that is about half the
time of counting CR, LF and CRLF separately.
"""
from __future__ import annotations

__all__ = ["is_crlf", "to_crlf"]


def is_crlf(data: bytes) -> bool:
    """True when every CR and LF in ``data`` is part of a CRLF pair."""
    return len(data) - len(data.translate(None, b"\r\n")) == 2 * data.count(b"\r\n")


def to_crlf(data: bytes) -> bytes:
    """``data`` with bare CR and bare LF turned into CRLF (``data`` itself
    when there are none)."""
    if is_crlf(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
