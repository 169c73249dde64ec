"""RFC 3464 bounce (DSN) rendering — decision D12.

``render_bounce`` builds the complete message (headers and body, CRLF line
endings, not dot-stuffed) to be queued with the null envelope sender to the
original sender::

    From: <mailerdaemon>
    To: <original sender>
    Subject: Undelivered Mail Returned to Sender
    Date / Message-ID / Auto-Submitted: auto-replied (RFC 3834)
    MIME-Version: 1.0
    Content-Type: multipart/report; report-type=delivery-status; boundary=...

    1. text/plain        one line per recipient: address, response, remote MTA
    2. message/delivery-status
                         Reporting-MTA: dns; <host>
                         Arrival-Date: <date>            (when known)
                         <blank>
                         Final-Recipient: rfc822; <addr>
                         Action: failed
                         Status: 5.1.1
                         Remote-MTA: dns; <host or IP>   (when known)
                         Diagnostic-Code: smtp; 550 5.1.1 user unknown
    3. per ``inline``:   "headers" -> text/rfc822-headers (original header block)
                         "all"     -> message/rfc822 (the whole original)
                         "none"    -> nothing

The message is built by hand, not with the ``email`` package: the original
is only scanned for the end of its header block (a regex over the header
lines) and otherwise copied as bytes, so huge originals cost a few linear
C-level passes.  Line endings of the original are normalised to CRLF (the
result goes over SMTP).  A message without a blank line has as header block
the run of leading header lines (possibly empty).  If the result contains
8-bit bytes (8-bit original, non-ASCII addresses or texts) the affected parts
and the top level are labelled ``Content-Transfer-Encoding: 8bit``; the
caller should then send it with ``BODY=8BITMIME`` (``is_8bit(result)``).
Non-ASCII addresses are written as raw UTF-8.

Never bounce a message whose envelope sender was null: check
``should_bounce(sender)`` first (``render_bounce`` raises ``ValueError`` for
a null sender).
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets
import time
from dataclasses import dataclass
from email.utils import format_datetime

from .smtp.crlf import to_crlf

__all__ = ["Failure", "render_bounce", "should_bounce", "split_original", "is_8bit"]

INLINE_MODES = ("headers", "all", "none")


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed (or delayed) recipient of a bounce.

    ``status`` is an RFC 3463 code (``"5.1.1"``); ``diagnostic`` the full
    response (``"550 5.1.1 user unknown"`` or an ``[internal]`` one);
    ``remote_mta`` the peer host name or IP, None when no peer answered;
    ``action`` ``failed`` (or ``delayed`` for a delay notice).
    """

    recipient: str
    status: str
    diagnostic: str
    remote_mta: str | None = None
    action: str = "failed"


def should_bounce(sender: str | None) -> bool:
    """False for the null sender (``""``, ``"<>"``, None): never bounce those."""
    if sender is None:
        return False
    s = sender.strip()
    return s not in ("", "<>")


def is_8bit(data: bytes) -> bool:
    """True when ``data`` has bytes >= 0x80 (send with ``BODY=8BITMIME``)."""
    return not data.isascii()


# Leading header lines: a field name (printable ASCII but ':'), optional
# obsolete white space, ':', value; followed by continuation lines.  Lines
# end in CRLF, LF or a lone CR; the last one may lack its line ending.  The
# alternatives are disjoint (a header line starts with a non-blank, a
# continuation with SP/HT), so there is no catastrophic backtracking.
_HEADER_BLOCK = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*(?:\r\n|\r|\n|\Z)"
    rb"(?:[ \t][^\r\n]*(?:\r\n|\r|\n|\Z))*)*"
)


def _header_span(data: bytes) -> tuple[int, int, int]:
    """(start, end, body_start) of the header block in the raw original.

    Only the header lines are scanned, so this is cheap for huge messages.
    An mbox ``From `` line in front is skipped.
    """
    start = 0
    if data.startswith(b"From "):
        m = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|\Z)").match(data)
        start = m.end() if m else len(data)
    m = _HEADER_BLOCK.match(data, start)
    end = m.end() if m else start
    body = end
    for eol in (b"\r\n", b"\n", b"\r"):
        if data.startswith(eol, end):
            body = end + len(eol)
            break
    return start, end, body


def _header_block(original: bytes) -> bytes:
    data = bytes(original)
    start, end, _ = _header_span(data)
    headers = to_crlf(data[start:end])
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    return headers


def split_original(original: bytes) -> tuple[bytes, bytes]:
    """Split an original message into (header block, rest), both CRLF.

    The header block is the run of leading header lines (continuations
    included), ends with CRLF unless empty, and excludes the blank separator
    line; ``rest`` is everything after the separator (or, when the header
    lines are not followed by a blank line, everything after them).
    """
    data = bytes(original)
    start, end, body = _header_span(data)
    headers = to_crlf(data[start:end])
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    return headers, to_crlf(data[body:])


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_STATUS_IN_TEXT = re.compile(r"^\s*(?:[245]\d\d[ -])?\s*([245]\.\d{1,3}\.\d{1,3})\b")
_CTRL = re.compile("[\x00-\x1f\x7f]+")


def _oneline(s: str) -> str:
    """Header-safe single line: controls (CR, LF, ...) become a space."""
    s = s.strip()
    return _CTRL.sub(" ", s) if not s.isprintable() else s


def _status_of(f: Failure) -> str:
    st = (f.status or "").strip()
    if _STATUS.fullmatch(st):
        return st
    m = _STATUS_IN_TEXT.match(f.diagnostic or "")
    if m:
        return m.group(1)
    code = (f.diagnostic or "").lstrip()[:1]
    return f"{code}.0.0" if code in ("4", "5") else "5.0.0"


def _addr(a: str) -> str:
    a = _oneline(a)
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    return a


def _fold(value: str, limit: int = 900) -> str:
    """Keep field lines under the SMTP line limit.

    Multi-line values (multi-line SMTP replies) continue on folded lines;
    very long lines are cut every ``limit`` characters into continuation
    lines (RFC 5322 folding, with 4 spaces of indentation).
    """
    out: list[str] = []
    for line in value.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = _CTRL.sub(" ", line).strip()
        if not line:
            continue
        while len(line) > limit:
            out.append(line[:limit])
            line = line[limit:]
        out.append(line)
    return "\r\n    ".join(out)


def _date(t: float) -> str:
    return format_datetime(_dt.datetime.fromtimestamp(t, _dt.timezone.utc))


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "replace")


def render_bounce(
    *,
    original: bytes,
    original_sender: str,
    failures: list[Failure],
    reporting_mta: str,
    mailerdaemon: str,
    inline: str = "headers",
    arrival_date: float | None = None,
    now: float | None = None,
    message_id_domain: str | None = None,
) -> bytes:
    """Render an RFC 3464 bounce for ``failures`` (see the module docstring).

    Raises ``ValueError`` for a null ``original_sender``, an empty
    ``failures`` list or an unknown ``inline`` mode
    (``headers`` | ``all`` | ``none``, case-insensitive).
    """
    if not should_bounce(original_sender):
        raise ValueError("never bounce a message with a null sender")
    if not failures:
        raise ValueError("a bounce needs at least one failed recipient")
    mode = (inline or "headers").strip().lower()
    if mode not in INLINE_MODES:
        raise ValueError(f"inline must be one of {INLINE_MODES}, not {inline!r}")
    if now is None:
        now = time.time()
    reporting_mta = _oneline(reporting_mta)
    mid_domain = _oneline(message_id_domain or reporting_mta) or "localhost"

    # -- the original part ------------------------------------------------
    orig_part = b""
    if mode == "headers":
        orig_part = _header_block(original)
    elif mode == "all":
        orig_part = to_crlf(bytes(original))
        if orig_part and not orig_part.endswith(b"\r\n"):
            orig_part += b"\r\n"

    # -- human-readable part ---------------------------------------------------
    delayed = all(f.action.strip().lower() == "delayed" for f in failures)
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if delayed:
        lines += [
            "Your message could not be delivered to one or more recipients",
            "yet. The mail system will keep trying; you do not need to resend",
            "it now.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The problem is listed",
            "below.",
        ]
    lines.append("")
    for f in failures:
        rcpt = _addr(f.recipient)
        why = _fold(f.diagnostic or "") or _status_of(f)
        where = f" (remote host {_oneline(f.remote_mta)})" if f.remote_mta else ""
        lines.append(f"<{rcpt}>: {why}{where}")
    lines.append("")
    if mode == "headers":
        lines.append("The headers of the original message are attached.")
    elif mode == "all":
        lines.append("The original message is attached.")
    text = _enc("\r\n".join(lines) + "\r\n")

    # -- delivery-status part ----------------------------------------------
    msg_fields = [f"Reporting-MTA: dns; {reporting_mta}"]
    if arrival_date is not None:
        msg_fields.append(f"Arrival-Date: {_date(arrival_date)}")
    blocks = ["\r\n".join(msg_fields)]
    for f in failures:
        rf = [
            f"Final-Recipient: rfc822; {_addr(f.recipient)}",
            f"Action: {_oneline(f.action) or 'failed'}",
            f"Status: {_status_of(f)}",
        ]
        if f.remote_mta:
            rf.append(f"Remote-MTA: dns; {_oneline(f.remote_mta)}")
        if f.diagnostic and _fold(f.diagnostic):
            rf.append(f"Diagnostic-Code: smtp; {_fold(f.diagnostic)}")
        if delayed:
            rf.append(f"Last-Attempt-Date: {_date(now)}")
        blocks.append("\r\n".join(rf))
    ds = ["\r\n\r\n".join(blocks)]
    dsn = _enc("\r\n".join(ds) + "\r\n")

    # -- assemble ----------------------------------------------------------
    boundary = ""
    while not boundary or boundary.encode() in orig_part:
        boundary = f"=_impetus_{secrets.token_hex(16)}"
    bb = boundary.encode()

    def cte(data: bytes) -> bytes:
        return b"8bit" if not data.isascii() else b"7bit"

    eight = not (text.isascii() and dsn.isascii() and orig_part.isascii())
    subject = ("Delayed Mail (still being retried)" if delayed
               else "Undelivered Mail Returned to Sender")
    sender = _addr(original_sender)
    msgid = f"<{int(now)}.{secrets.token_hex(8)}@{mid_domain}>"
    head = [
        f"From: {_oneline(mailerdaemon)}",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if eight:
        head.append("Content-Transfer-Encoding: 8bit")
    out = [
        _enc("\r\n".join(head) + "\r\n\r\n"),
        b"This is a MIME-encapsulated message.\r\n\r\n",
        b"--" + bb + b"\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Description: Notification\r\n",
        b"Content-Transfer-Encoding: " + cte(text) + b"\r\n\r\n",
        text,
        b"\r\n--" + bb + b"\r\n",
        b"Content-Type: message/delivery-status\r\n",
        b"Content-Description: Delivery report\r\n",
        b"Content-Transfer-Encoding: " + cte(dsn) + b"\r\n\r\n",
        dsn,
    ]
    if mode == "headers":
        out += [
            b"\r\n--" + bb + b"\r\n",
            b"Content-Type: text/rfc822-headers\r\n",
            b"Content-Description: Undelivered Message Headers\r\n",
            b"Content-Transfer-Encoding: " + cte(orig_part) + b"\r\n\r\n",
            orig_part,
        ]
    elif mode == "all":
        out += [
            b"\r\n--" + bb + b"\r\n",
            b"Content-Type: message/rfc822\r\n",
            b"Content-Description: Undelivered Message\r\n",
            b"Content-Transfer-Encoding: " + cte(orig_part) + b"\r\n\r\n",
            orig_part,
        ]
    out.append(b"\r\n--" + bb + b"--\r\n")
    return b"".join(out)
