"""Sans-I/O SMTP/LMTP client pieces for the delivery agent.

* :class:`ReplyParser` -- bytes in, :class:`~impetus.smtp.reply.Reply` out
  (multi-line replies, split anywhere across feeds).  Limits: 4096-byte
  lines, 200 lines per reply; anything that is not a reply raises
  :class:`ProtocolError`.
* :func:`parse_ehlo` -- EHLO/LHLO reply -> ``{"SIZE": "10240000", ...}``.
* command encoders -- :func:`ehlo`, :func:`helo`, :func:`lhlo`,
  :func:`mail_from`, :func:`rcpt_to`, :func:`data`, :func:`rset`,
  :func:`quit`, :func:`noop`, :func:`starttls`, :func:`xclient`.
* :func:`dot_stuff` -- body -> wire form ending with ``.\\r\\n``.
* :class:`Transaction` -- which commands to send (pipelined or not), and
  per-recipient outcomes from the replies.
* :class:`Stage` -- connection stage codes of spec §12.5, and
  :func:`no_response_reply` for the §10.2 internal texts.
"""

from __future__ import annotations

import enum
import re

from .crlf import to_crlf
from .reply import Reply

__all__ = [
    "ProtocolError",
    "ReplyParser",
    "parse_ehlo",
    "ehlo",
    "helo",
    "lhlo",
    "mail_from",
    "rcpt_to",
    "data",
    "rset",
    "quit",
    "noop",
    "starttls",
    "xclient",
    "xtext",
    "dot_stuff",
    "dot_stuff_chunks",
    "Stage",
    "Outcome",
    "Transaction",
    "no_response_reply",
    "CLOSED_BY_REMOTE",
]


class ProtocolError(Exception):
    """The peer sent something that is not an SMTP reply."""


# ---------------------------------------------------------------------------
# Stage codes (spec §12.5)
# ---------------------------------------------------------------------------


class Stage(enum.IntEnum):
    NOT_CONNECTED = 0
    IDLE = 1
    MAIL = 2            # during MAIL FROM
    AFTER_MAIL = 3
    RCPT = 4            # during RCPT TO
    AFTER_RCPT = 5
    DATA = 6            # during DATA
    AFTER_DATA = 7
    BODY = 8            # sending body
    CONFIRMATION = 9    # reading confirmation
    EHLO = 10           # during EHLO
    AFTER_EHLO = 11
    BANNER = 12         # reading banner
    RSET = 13
    AFTER_RSET = 14
    STARTTLS = 15
    AFTER_STARTTLS = 16
    TLS_HANDSHAKE = 17
    TLS_RENEGOTIATION = 18
    XCLIENT = 19
    AFTER_XCLIENT = 20
    OOB_BOUNCE = 21
    UNKNOWN = 22


_NO_RESPONSE = {
    Stage.BANNER: "no banner",
    Stage.EHLO: "no HELO/EHLO response",
    Stage.MAIL: "no MAIL FROM response",
    Stage.RCPT: "no RCPT TO response",
    Stage.DATA: "no DATA response",
    Stage.BODY: "no BODY response",
    Stage.CONFIRMATION: "no BODY response",
    Stage.RSET: "no RSET response",
    Stage.STARTTLS: "no STARTTLS response",
    Stage.XCLIENT: "no XCLIENT response",
}

CLOSED_BY_REMOTE = Reply(451, "4.4.2", "[internal] connection closed by remote host")


def no_response_reply(stage: int) -> Reply:
    """Spec §10.2 internal reply for a timeout while waiting at ``stage``:
    ``451 4.4.2 [internal] no MAIL FROM response`` etc."""
    text = _NO_RESPONSE.get(stage, "no response")
    return Reply(451, "4.4.2", f"[internal] {text}")


# ---------------------------------------------------------------------------
# Reply parsing
# ---------------------------------------------------------------------------

_ENH_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")


# Single-line replies seen before, parsed once (Reply is immutable): a relay
# sees the same "250 2.1.0 Ok" thousands of times a second. Bounded; unique
# texts such as "queued as ..." stop being added once it is full.
_REPLY_CACHE: dict[bytes, Reply] = {}
_REPLY_CACHE_SIZE = 1024


class ReplyParser:
    """Incremental reply parser.  ``feed(bytes) -> list[Reply]``.

    Lines end with CRLF (a bare LF is tolerated).  A line of just the code
    (``250``) is accepted.  The enhanced status code is taken from the first
    line when its class matches the reply code, and stripped from the other
    lines.  After a :class:`ProtocolError` the parser stays broken.
    """

    __slots__ = ("_buf", "_lines", "_code", "_broken", "max_line", "max_lines")

    def __init__(self, max_line: int = 4096, max_lines: int = 200) -> None:
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._code = b""
        self._broken: str | None = None
        self.max_line = max_line
        self.max_lines = max_lines

    @property
    def pending(self) -> bool:
        """True when part of a reply has been received."""
        return bool(self._buf or self._lines)

    def _fail(self, msg: str):
        self._broken = msg
        self._buf = bytearray()
        self._lines = []
        raise ProtocolError(msg)

    def feed(self, data: bytes) -> list[Reply]:
        """Complete replies in ``data`` (plus what was buffered).

        On garbage it raises ``ProtocolError`` whose ``replies`` holds the
        valid replies parsed from the same chunk before the garbage, so a
        pipelining client can still attribute them to their commands.
        """
        if self._broken is not None:
            raise ProtocolError(self._broken)
        out: list[Reply] = []
        try:
            return self._feed(data, out)
        except ProtocolError as exc:
            exc.replies = out
            raise

    def _feed(self, data: bytes, out: list) -> list[Reply]:
        buf = self._buf
        buf += data
        start = 0
        n = len(buf)
        while start < n:
            i = buf.find(b"\n", start)
            if i < 0:
                if n - start > self.max_line + 1:  # + a CR waiting for its LF
                    self._fail("reply line too long")
                break
            end = i - 1 if (i > start and buf[i - 1] == 13) else i
            if end - start > self.max_line:
                self._fail("reply line too long")
            line = bytes(buf[start:end])
            start = i + 1
            if not self._lines:
                known = _REPLY_CACHE.get(line)
                if known is not None:
                    out.append(known)
                    continue
            code = line[:3]
            if len(code) != 3 or not code.isdigit() or code[0] not in b"2345":
                self._fail(f"malformed reply line {line[:64]!r}")
            sep = line[3:4]
            if sep not in (b"", b" ", b"-"):
                self._fail(f"malformed reply line {line[:64]!r}")
            if self._lines and code != self._code:
                self._fail("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(line[4:])
            if sep == b"-":
                if len(self._lines) >= self.max_lines:
                    self._fail("too many lines in one reply")
                continue
            reply = self._make(int(code), self._lines)
            if len(self._lines) == 1 and len(_REPLY_CACHE) < _REPLY_CACHE_SIZE:
                _REPLY_CACHE[line] = reply
            out.append(reply)
            self._lines = []
        if start:
            del buf[:start]
        return out

    @staticmethod
    def _make(code: int, raw_lines: list[bytes]) -> Reply:
        lines = [ln.decode("utf-8", "replace") for ln in raw_lines]
        enhanced = None
        cls = str(code)[0]
        m = _ENH_RE.match(lines[0])
        if m and m.group(1) == cls:
            enhanced = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
            raw = m.group(0).rstrip(" ")
            for k, ln in enumerate(lines):
                if ln.startswith(raw) and (len(ln) == len(raw) or ln[len(raw)] == " "):
                    lines[k] = ln[len(raw):].lstrip(" ")
        return Reply(code, enhanced, "\n".join(lines))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """Extensions advertised in an EHLO/LHLO reply: keyword (upper-case) ->
    parameters ('' when none).  The first line (the greeting) is skipped."""
    out: dict[str, str] = {}
    if not reply.is_success:
        return out
    lines = reply.lines
    for ln in lines[1:]:
        ln = ln.strip()
        if not ln:
            continue
        kw, _, params = ln.partition(" ")
        out.setdefault(kw.upper(), params.strip())
    return out


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _arg(value: str, what: str) -> str:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"CR, LF or NUL in {what}: {value!r}")
    return value


def ehlo(name: str) -> bytes:
    return f"EHLO {_arg(name, 'EHLO name')}\r\n".encode("utf-8")


def helo(name: str) -> bytes:
    return f"HELO {_arg(name, 'HELO name')}\r\n".encode("utf-8")


def lhlo(name: str) -> bytes:
    return f"LHLO {_arg(name, 'LHLO name')}\r\n".encode("utf-8")


def _params(params) -> str:
    if not params:
        return ""
    parts = []
    for k, v in params.items():
        _arg(k, "parameter")
        if " " in k or (v is not None and (" " in v)):
            raise ValueError(f"space in ESMTP parameter {k}={v}")
        parts.append(k if v is None else f"{k}={_arg(v, 'parameter')}")
    return " " + " ".join(parts)


def mail_from(addr: str, size: int | None = None, body_8bit: bool = False,
              smtputf8: bool = False, params: dict | None = None) -> bytes:
    """``MAIL FROM:<addr> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8] [params]``.
    ``addr`` '' is the null sender."""
    extra = ""
    if size is not None:
        extra += f" SIZE={int(size)}"
    if body_8bit:
        extra += " BODY=8BITMIME"
    if smtputf8:
        extra += " SMTPUTF8"
    extra += _params(params)
    return f"MAIL FROM:<{_arg(addr, 'address')}>{extra}\r\n".encode("utf-8")


def rcpt_to(addr: str, params: dict | None = None) -> bytes:
    return f"RCPT TO:<{_arg(addr, 'address')}>{_params(params)}\r\n".encode("utf-8")


def data() -> bytes:
    return b"DATA\r\n"


def rset() -> bytes:
    return b"RSET\r\n"


def quit() -> bytes:  # noqa: A001 - SMTP verb
    return b"QUIT\r\n"


def noop() -> bytes:
    return b"NOOP\r\n"


def starttls() -> bytes:
    return b"STARTTLS\r\n"


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding (used by XCLIENT)."""
    out = []
    for b in value.encode("utf-8"):
        if b < 33 or b > 126 or b in (43, 61):  # '+', '='
            out.append(f"+{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def xclient(attrs: dict[str, str | None]) -> bytes:
    """``XCLIENT NAME=... ADDR=...``; None values become ``[UNAVAILABLE]``."""
    parts = []
    for k, v in attrs.items():
        if not k.isalpha():
            raise ValueError(f"bad XCLIENT attribute {k!r}")
        parts.append(f"{k.upper()}={'[UNAVAILABLE]' if v is None else xtext(v)}")
    return ("XCLIENT " + " ".join(parts) + "\r\n").encode("ascii")


# ---------------------------------------------------------------------------
# Dot-stuffing
# ---------------------------------------------------------------------------


def dot_stuff_chunks(body: bytes, crlf_clean: bool = False) -> list[bytes]:
    """Like :func:`dot_stuff` but returns pieces for ``writelines`` (no copy
    of a clean body). ``crlf_clean``: the caller knows ``body`` has no bare
    CR or LF (a spooled body, see :mod:`impetus.smtp.crlf`): no scan for them."""
    if not crlf_clean:
        body = to_crlf(body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body[:1] == b".":
        body = b"." + body
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    return [body, b".\r\n"]


def dot_stuff(body: bytes, crlf_clean: bool = False) -> bytes:
    """Wire form of a message body for after ``354``: bare CR/LF become CRLF,
    a final CRLF is added if missing, lines starting with ``.`` get another
    ``.``, and the ``.\\r\\n`` terminator is appended."""
    a, b = dot_stuff_chunks(body, crlf_clean)
    return a + b


# ---------------------------------------------------------------------------
# Transaction bookkeeping
# ---------------------------------------------------------------------------


class Outcome:
    """Fate of one recipient: the reply that decided it and the stage it
    was received in (``Stage.MAIL``, ``Stage.RCPT``, ``Stage.DATA``,
    ``Stage.CONFIRMATION``, or the stage of an abort)."""

    __slots__ = ("reply", "stage")

    def __init__(self, reply: Reply, stage: int) -> None:
        self.reply = reply
        self.stage = stage

    @property
    def delivered(self) -> bool:
        return self.reply.is_success

    def __eq__(self, other):
        return isinstance(other, Outcome) and (self.reply, self.stage) == (other.reply, other.stage)

    def __repr__(self):
        return f"Outcome({str(self.reply)!r}, stage={int(self.stage)})"


# expected-reply kinds
_K_MAIL, _K_RCPT, _K_DATA, _K_FINAL, _K_DUMMY, _K_RSET = range(6)
_KIND_STAGE = {
    _K_MAIL: Stage.MAIL,
    _K_RCPT: Stage.RCPT,
    _K_DATA: Stage.DATA,
    _K_FINAL: Stage.CONFIRMATION,
    _K_DUMMY: Stage.CONFIRMATION,
    _K_RSET: Stage.RSET,
}


class Transaction:
    """Bookkeeping for one MAIL/RCPT/DATA transaction.

    Usage (the delivery glue does the I/O)::

        tx = Transaction(sender, rcpts, pipelining=True, lmtp=False, size=n)
        send(tx.begin())                      # MAIL [+ RCPTs + DATA]
        while not tx.done:
            if tx.wants_body:
                send(dot_stuff(body)); tx.body_sent()
                continue
            reply = read_reply()              # stage for logs: tx.stage
            send(tx.feed(reply))              # b"" or the next command(s)
        tx.outcomes  # one Outcome per recipient, same order as rcpts

    Rules: a failed MAIL gives every recipient MAIL's reply; a refused RCPT
    gives that recipient its reply; a failed DATA gives the accepted
    recipients DATA's reply; after the body SMTP's single reply applies to
    every accepted recipient, LMTP's replies apply one each in order.  When
    no recipient was accepted no body is sent (if a pipelined DATA still got
    ``354``, a lone ``.`` is sent and its reply ignored) and ``RSET`` is
    sent; ``RSET`` also follows a failed DATA.  A ``421`` ends everything:
    recipients without an outcome get it, and ``connection_usable`` turns
    False.  ``abort(reply)`` fills the remaining outcomes on a timeout or
    lost connection (use :func:`no_response_reply(tx.stage)`).
    """

    def __init__(self, mail_from: str, rcpts: list[str], *, pipelining: bool = False,
                 lmtp: bool = False, size: int | None = None, body_8bit: bool = False,
                 smtputf8: bool = False, mail_params: dict | None = None,
                 rcpt_params: list[dict | None] | None = None) -> None:
        if not rcpts:
            raise ValueError("a transaction needs at least one recipient")
        self.mail_from = mail_from
        self.rcpts = list(rcpts)
        self.pipelining = pipelining
        self.lmtp = lmtp
        self._mail_cmd = _mail_from_cmd(mail_from, size, body_8bit, smtputf8, mail_params)
        rp = rcpt_params or [None] * len(self.rcpts)
        if len(rp) != len(self.rcpts):
            raise ValueError("rcpt_params must match rcpts")
        self._rcpt_cmds = [rcpt_to(r, p) for r, p in zip(self.rcpts, rp)]
        self.outcomes: list[Outcome | None] = [None] * len(self.rcpts)
        self.mail_reply: Reply | None = None
        self.rcpt_replies: list[Reply | None] = [None] * len(self.rcpts)
        self.data_reply: Reply | None = None
        self.final_replies: list[Reply] = []
        self.rset_reply: Reply | None = None
        self.accepted: list[int] = []      # indices of rcpts accepted at RCPT
        self.connection_usable = True
        self.done = False
        self.wants_body = False
        self._expect: list[tuple[int, int]] = []   # (kind, rcpt index)
        self._next_rcpt = 0
        self._started = False
        self._stage = Stage.IDLE

    # -- state ---------------------------------------------------------
    @property
    def stage(self) -> Stage:
        """What we are waiting for (spec §12.5)."""
        if self.done:
            return Stage.IDLE
        if self.wants_body:
            return Stage.BODY
        if self._expect:
            return _KIND_STAGE[self._expect[0][0]]
        return self._stage

    @property
    def expected_replies(self) -> int:
        """How many replies are due for what has been sent."""
        return len(self._expect)

    @property
    def data_accepted(self) -> bool:
        return self.data_reply is not None and self.data_reply.code == 354

    @property
    def delivered(self) -> list[str]:
        return [r for r, o in zip(self.rcpts, self.outcomes) if o is not None and o.reply.is_success]

    # -- driving -------------------------------------------------------
    def begin(self) -> bytes:
        """First command group: MAIL+RCPTs+DATA with PIPELINING, else MAIL."""
        if self._started:
            raise RuntimeError("begin() called twice")
        self._started = True
        if self.pipelining:
            self._expect = [(_K_MAIL, -1)] + [(_K_RCPT, i) for i in range(len(self.rcpts))] + [(_K_DATA, -1)]
            self._next_rcpt = len(self.rcpts)
            return self._mail_cmd + b"".join(self._rcpt_cmds) + b"DATA\r\n"
        self._expect = [(_K_MAIL, -1)]
        return self._mail_cmd

    def body_sent(self) -> None:
        """The dot-stuffed body (with its final ``.``) has been written."""
        if not self.wants_body:
            raise RuntimeError("no body is wanted now")
        self.wants_body = False
        n = len(self.accepted) if self.lmtp else 1
        self._expect = [(_K_FINAL, i) for i in range(n)]

    def feed(self, reply: Reply) -> bytes:
        """Consume the next reply; returns what to send next (maybe b"")."""
        if self.done or not self._expect:
            raise RuntimeError("no reply is expected now")
        kind, idx = self._expect.pop(0)
        if reply.code == 421 and kind != _K_RSET:
            self._record(kind, idx, reply)
            self.abort(reply, _KIND_STAGE[kind])
            return b""
        return self._record(kind, idx, reply)

    def abort(self, reply: Reply, stage: int | None = None) -> None:
        """The connection failed (timeout, closed, 421): every recipient
        without an outcome gets ``reply`` at ``stage`` (default: now)."""
        st = self.stage if stage is None else stage
        for i, o in enumerate(self.outcomes):
            if o is None:
                self.outcomes[i] = Outcome(reply, st)
        self._expect = []
        self.wants_body = False
        self.connection_usable = False
        self.done = True

    # -- internals -----------------------------------------------------
    def _rset(self) -> bytes:
        self._expect = [(_K_RSET, -1)]
        return b"RSET\r\n"

    def _finish(self) -> bytes:
        self.done = True
        return b""

    def _fill(self, reply: Reply, stage: int, indices) -> None:
        for i in indices:
            if self.outcomes[i] is None:
                self.outcomes[i] = Outcome(reply, stage)

    def _record(self, kind: int, idx: int, reply: Reply) -> bytes:
        n = len(self.rcpts)
        mail_ok = self.mail_reply is not None and self.mail_reply.is_success
        if kind == _K_MAIL:
            self.mail_reply = reply
            if not reply.is_success:
                self._fill(reply, Stage.MAIL, range(n))
                # Pipelined: the RCPT and DATA replies are still to come.
                return b"" if self.pipelining else self._finish()
            if self.pipelining:
                return b""
            self._next_rcpt = 1
            self._expect = [(_K_RCPT, 0)]
            return self._rcpt_cmds[0]
        if kind == _K_RCPT:
            self.rcpt_replies[idx] = reply
            if mail_ok:
                if reply.is_success:
                    self.accepted.append(idx)
                else:
                    self._fill(reply, Stage.RCPT, (idx,))
            if self.pipelining:
                return b""
            if self._next_rcpt < n:
                i = self._next_rcpt
                self._next_rcpt += 1
                self._expect = [(_K_RCPT, i)]
                return self._rcpt_cmds[i]
            if not self.accepted:
                return self._rset()
            self._expect = [(_K_DATA, -1)]
            return b"DATA\r\n"
        if kind == _K_DATA:
            self.data_reply = reply
            if reply.code == 354:
                if mail_ok and self.accepted:
                    self.wants_body = True
                    return b""
                # Nobody to deliver to, yet the server wants data (pipelined
                # race): end an empty message and ignore its reply.
                self._expect = [(_K_DUMMY, -1)]
                return b".\r\n"
            self._fill(reply, Stage.DATA, self.accepted)
            return self._rset() if mail_ok else self._finish()
        if kind == _K_DUMMY:
            return self._rset() if mail_ok else self._finish()
        if kind == _K_FINAL:
            self.final_replies.append(reply)
            if self.lmtp:
                self._fill(reply, Stage.CONFIRMATION, (self.accepted[idx],))
            else:
                self._fill(reply, Stage.CONFIRMATION, self.accepted)
            return b"" if self._expect else self._finish()
        if kind == _K_RSET:
            self.rset_reply = reply
            if not reply.is_success:
                self.connection_usable = False
            return self._finish()
        raise AssertionError(kind)  # pragma: no cover


_mail_from_cmd = mail_from
