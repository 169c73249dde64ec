"""Sans-I/O ESMTP / LMTP server core.

No sockets, no clocks: bytes go in, events come out (h11 style).  The
asyncio glue lives in :mod:`impetus.smtp.serve`.

Usage::

    conn = ServerConnection(ServerSettings(hostname="mx.example"), policy)
    conn.session.peer_ip = "192.0.2.1"          # filled in by the glue
    events = conn.start()                        # the banner
    events = conn.feed(data)                     # bytes from the peer
    ...                                          # on MessageReady:
    events = conn.message_done(Reply(250, "2.0.0", "Ok: queued as X"))

Events (in this order within one returned list):

* :class:`Send` ``(data)`` -- at most one per call; every reply produced by
  that call, coalesced, so a PIPELINING group is answered in one write.
* :class:`MessageReady` ``(envelope)`` -- the end of DATA was seen.  The
  core buffers but does not interpret further input until
  :meth:`ServerConnection.message_done` is called with the final reply (SMTP)
  or the list of per-recipient replies (LMTP; a single Reply is repeated for
  every recipient).
* :class:`Close` ``(reason)`` -- the connection must be closed after the
  preceding ``Send`` is written.  ``conn.close_reason`` holds the reason
  (``"quit"``, ``"timeout"``, ``"too many errors"``, ``"rejected"``,
  ``"too many messages"``, ``"shutdown"``, ``"lost"``).

``feed`` never raises (whatever the bytes are).  ``message_done`` raises
``RuntimeError`` when no message is outstanding and ``ValueError`` when an
LMTP reply list has the wrong length.

Policy: any object with some of these synchronous methods (missing ones
accept); see :class:`Policy`::

    check_connect(session) -> Reply | None
    check_helo(session, name: str) -> Reply | None
    check_mail(session, addr: Address, params: dict) -> Reply | None
    check_rcpt(session, addr: Address, params: dict) -> Reply | None
    on_reject(session, reply: Reply, phase: str) -> None

A returned Reply refuses (it is sent as is); None accepts.  ``on_reject`` is
called for every 4xx/5xx reply the core sends, with ``phase`` one of
``connect helo mail rcpt data body command``.

DATA: the end of data is only ``CRLF . CRLF`` (a bare-LF ``\\n.\\n`` is
content, not an end marker).  The body handed over is dot-unstuffed and
every bare CR and bare LF is turned into CRLF, so nothing relayed later can
carry a smuggled end-of-data marker.  A body with NUL bytes is refused
(``554 5.6.0``) unless ``settings.reject_nul = False``.  With a size limit,
an oversized body is read to its end without being buffered and refused
with ``552 5.3.4 message size limit exceeded``; the limit applies to the
body as transmitted (dot-stuffed).

Protocol errors (5xx syntax/sequence/unknown command, over-long lines, NUL
or bad UTF-8 in commands) count towards ``max_errors``; reaching it sends
``421 4.7.0 <hostname> too many errors`` and closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .address import Address, AddressError, parse_params, parse_path, split_argument
from .reply import Reply

__all__ = [
    "ServerSettings",
    "ServerConnection",
    "Session",
    "Envelope",
    "Policy",
    "Event",
    "Send",
    "MessageReady",
    "Close",
    "DEFAULT_EXTENSIONS",
]

DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


# ---------------------------------------------------------------------------
# Settings, session, envelope, events
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class ServerSettings:
    """Listener settings the protocol core needs.

    ``extensions`` lists the EHLO keywords to advertise (``None`` = the
    defaults).  ``SIZE`` is rendered with the limit; ``DSN`` makes the core
    accept RET/ENVID/NOTIFY/ORCPT; other entries are advertised verbatim
    (their commands are answered ``502``).  Without ``ENHANCEDSTATUSCODES``
    replies are sent without enhanced codes.
    """

    hostname: str = "localhost"
    lmtp: bool = False
    max_message_size: int = 0          # 0 = no limit
    max_line_length: int = 2048        # command lines, without CRLF
    max_recipients: int = 0            # per message; 0 = no limit
    max_errors: int = 20               # 0 = no limit
    extensions: tuple[str, ...] | list[str] | None = None
    banner: str | None = None          # text after "220 "; default "<hostname> ESMTP Impetus"
    require_helo: bool = False         # always true for LMTP
    allow_unqualified: bool = False    # RCPT/MAIL without @domain (postmaster is always allowed in RCPT)
    max_messages_per_connection: int = 0    # 0 = no limit; then 421
    max_recipients_per_connection: int = 0  # 0 = no limit; then 452
    reject_nul: bool = True            # refuse bodies containing NUL bytes


@dataclass(slots=True, eq=False)
class Session:
    """Per-connection facts handed to every policy call."""

    peer_ip: str = ""
    peer_port: int = 0
    local_ip: str = ""
    local_port: int = 0
    helo: str = ""
    protocol: str = "esmtp"      # "esmtp" (EHLO), "smtp" (HELO) or "lmtp"
    conn_id: str = ""
    tls: bool = False
    transactions: int = 0        # MAIL commands accepted
    messages: int = 0            # messages accepted (final reply 2xx for >= 1 recipient)
    recipients: int = 0          # RCPT commands accepted
    rejected_recipients: int = 0
    errors: int = 0              # protocol errors (see module docstring)
    extra: dict = field(default_factory=dict)   # free for the listener


@dataclass(slots=True, eq=False)
class Envelope:
    """One received message.

    ``mail_from`` is the normalised sender ('' for ``<>``); ``rcpt_to`` the
    normalised accepted recipients, ``rcpt_params`` their ESMTP parameters
    (same order); ``mail_from_addr``/``rcpt_addrs`` the parsed
    :class:`Address` objects.  ``body`` is dot-unstuffed with CRLF line
    ends; ``size == len(body)``.  ``body_8bit`` is true when BODY=8BITMIME
    was declared or the body has bytes >= 0x80.
    """

    mail_from: str
    rcpt_to: list[str]
    mail_params: dict
    rcpt_params: list[dict]
    helo: str
    body: bytes
    size: int
    smtputf8: bool
    body_8bit: bool
    mail_from_addr: Address | None = None
    rcpt_addrs: list[Address] = field(default_factory=list)


class Event:
    __slots__ = ()


class Send(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other):
        return isinstance(other, Send) and other.data == self.data

    def __repr__(self):
        return f"Send({self.data!r})"


class MessageReady(Event):
    __slots__ = ("envelope",)

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    def __repr__(self):
        return f"MessageReady({self.envelope.mail_from!r} -> {self.envelope.rcpt_to!r}, {self.envelope.size} bytes)"


class Close(Event):
    __slots__ = ("reason",)

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def __eq__(self, other):
        return isinstance(other, Close) and other.reason == self.reason

    def __repr__(self):
        return f"Close({self.reason!r})"


class Policy:
    """Accept-everything policy; subclass and override what you need."""

    def check_connect(self, session: Session) -> Reply | None:
        return None

    def check_helo(self, session: Session, name: str) -> Reply | None:
        return None

    def check_mail(self, session: Session, addr: Address, params: dict) -> Reply | None:
        return None

    def check_rcpt(self, session: Session, addr: Address, params: dict) -> Reply | None:
        return None

    def on_reject(self, session: Session, reply: Reply, phase: str) -> None:
        return None


_DEFAULT_POLICY = Policy()

# ---------------------------------------------------------------------------
# Fixed replies
# ---------------------------------------------------------------------------

R_OK = Reply(250, "2.0.0", "Ok")
R_MAIL_OK = Reply(250, "2.1.0", "Ok")
R_RCPT_OK = Reply(250, "2.1.5", "Ok")
R_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
R_BYE = Reply(221, "2.0.0", "Bye")
R_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "line too long")
R_NUL = Reply(500, "5.5.2", "NUL character not allowed")
R_BAD_UTF8 = Reply(500, "5.5.2", "bad UTF-8 syntax")
R_UNKNOWN = Reply(500, "5.5.1", "command not recognized")
R_NOT_IMPL = Reply(502, "5.5.1", "command not implemented")
R_NEED_HELO = Reply(503, "5.5.1", "send HELO/EHLO first")
R_NEED_LHLO = Reply(503, "5.5.1", "send LHLO first")
R_NESTED_MAIL = Reply(503, "5.5.1", "nested MAIL command")
R_NEED_MAIL = Reply(503, "5.5.1", "need MAIL command")
R_NEED_RCPT = Reply(503, "5.5.1", "need RCPT command")
R_NO_VALID_RCPTS = Reply(554, "5.5.1", "no valid recipients")
R_SIZE = Reply(552, "5.3.4", "message size limit exceeded")
R_NUL_BODY = Reply(554, "5.6.0", "message content rejected: NUL characters")
R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "too many recipients")
R_SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
R_SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
R_SYNTAX_DATA = Reply(501, "5.5.4", "Syntax: DATA")
R_SYNTAX_RSET = Reply(501, "5.5.4", "Syntax: RSET")
R_SYNTAX_QUIT = Reply(501, "5.5.4", "Syntax: QUIT")
R_SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
R_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R_BAD_PARAMS = Reply(501, "5.5.4", "Bad ESMTP parameter syntax")
R_BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
R_BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")
R_INTERNAL = Reply(451, "4.3.0", "Internal error")

_ERROR_CODES = frozenset((500, 501, 502, 503, 504, 555))

# states
_NEW = "new"
_CMD = "command"
_DATA = "data"
_WAIT = "wait_message"
_CLOSED = "closed"


class ServerConnection:
    """One SMTP/LMTP server session; see the module docstring."""

    def __init__(self, settings: ServerSettings | None = None, policy=None, session: Session | None = None) -> None:
        s = self.settings = settings or ServerSettings()
        self.session = session or Session()
        self.session.protocol = "lmtp" if s.lmtp else "esmtp"
        pol = policy if policy is not None else _DEFAULT_POLICY
        self.policy = pol
        if pol is _DEFAULT_POLICY:
            d = _DEFAULT_POLICY
            self._p_connect, self._p_helo, self._p_mail, self._p_rcpt, self._p_reject = (
                d.check_connect, d.check_helo, d.check_mail, d.check_rcpt, d.on_reject)
        else:
            d = _DEFAULT_POLICY
            self._p_connect = getattr(pol, "check_connect", None) or d.check_connect
            self._p_helo = getattr(pol, "check_helo", None) or d.check_helo
            self._p_mail = getattr(pol, "check_mail", None) or d.check_mail
            self._p_rcpt = getattr(pol, "check_rcpt", None) or d.check_rcpt
            self._p_reject = getattr(pol, "on_reject", None) or d.on_reject
        t = _template(s)
        self._enh = t.enh
        self._smtputf8_ok = t.smtputf8_ok
        self._dsn = t.dsn
        self._auth = t.auth
        self._ehlo_reply = t.ehlo_reply
        self._helo_reply = t.helo_reply
        self._banner = t.banner
        self._too_many_errors = t.too_many_errors
        self._too_many_msgs = t.too_many_msgs
        self._timeout = t.timeout
        self._help = t.help
        self._lmtp = s.lmtp
        self._need_helo = s.require_helo or s.lmtp
        self._maxline = max(1, s.max_line_length)
        self._maxsize = max(0, s.max_message_size)

        self._buf = bytearray()
        self._out: list[bytes] = []
        self._tail: Event | None = None
        self._state = _NEW
        self.close_reason: str | None = None
        self._discard = False
        self._helo = ""
        self._reset_txn()

    # -- public API -----------------------------------------------------
    @property
    def state(self) -> str:
        """``new``, ``greeted`` (no HELO yet), ``ready``, ``mail`` (after
        MAIL), ``rcpt`` (>= 1 recipient), ``data``, ``wait_message`` or
        ``closed``."""
        st = self._state
        if st != _CMD:
            return st
        if self._mail is not None:
            return "rcpt" if self._rcpts else "mail"
        return "ready" if self._helo else "greeted"

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def awaiting_message_done(self) -> bool:
        return self._state == _WAIT

    def start(self) -> list[Event]:
        """The greeting (or a connect-time refusal from the policy)."""
        if self._state != _NEW:
            raise RuntimeError("start() called twice")
        r = self._p_connect(self.session)
        if r is not None:
            self._reject(r, "connect")
            self._close("rejected")
            return self._events()
        self._out.append(self._banner.to_bytes(self._enh))
        self._state = _CMD
        return self._run()

    def feed(self, data: bytes) -> list[Event]:
        """Bytes received from the peer."""
        if self._state == _CLOSED:
            return []
        if data:
            self._buf += data
        if self._state != _CMD and self._state != _DATA:
            return []
        return self._run()

    def message_done(self, result) -> list[Event]:
        """Final reply for the message of the last MessageReady: a Reply, or
        (LMTP) one Reply per accepted recipient."""
        if self._state != _WAIT:
            raise RuntimeError("no message is awaiting a reply")
        n = len(self._rcpts)
        if isinstance(result, Reply):
            replies = [result] * n if self._lmtp else [result]
        else:
            replies = list(result)
            if self._lmtp:
                if len(replies) != n:
                    raise ValueError(f"LMTP needs {n} replies, got {len(replies)}")
            elif len(replies) != 1:
                raise ValueError("SMTP takes exactly one final reply")
        ok = False
        for r in replies:
            if not isinstance(r, Reply):
                raise ValueError(f"not a Reply: {r!r}")
            if r.code < 400:
                ok = True
            else:
                self._p_reject(self.session, r, "body")
            self._out.append(r.to_bytes(self._enh))
        if ok:
            self.session.messages += 1
        self._reset_txn()
        self._state = _CMD
        return self._run()

    def timeout(self) -> list[Event]:
        """Idle timeout: ``421 4.4.2 <hostname> Error: timeout exceeded``, Close."""
        return self.abort(self._timeout, "timeout")

    def abort(self, reply: Reply | None = None, reason: str = "shutdown") -> list[Event]:
        """Send ``reply`` (if any) and close, whatever the state."""
        if self._state == _CLOSED:
            return []
        if reply is not None:
            self._out.append(reply.to_bytes(self._enh))
        self._close(reason)
        return self._events()

    def connection_lost(self) -> None:
        """The transport went away."""
        if self._state != _CLOSED:
            self._state = _CLOSED
            self.close_reason = self.close_reason or "lost"
        self._buf = bytearray()

    # -- internals ------------------------------------------------------
    def _reset_txn(self) -> None:
        self._mail: Address | None = None
        self._mail_params: dict = {}
        self._rcpts: list[Address] = []
        self._rcpt_params: list[dict] = []
        self._rcpt_tried = False
        self._smtputf8 = False
        self._8bit = False

    def _events(self) -> list[Event]:
        ev: list[Event] = []
        if self._out:
            ev.append(Send(b"".join(self._out)))
            self._out = []
        if self._tail is not None:
            ev.append(self._tail)
            self._tail = None
        return ev

    def _close(self, reason: str) -> None:
        self._state = _CLOSED
        self.close_reason = reason
        self._tail = Close(reason)
        self._buf = bytearray()

    def _send(self, r: Reply) -> None:
        self._out.append(r.to_bytes(self._enh))

    def _reject(self, r: Reply, phase: str) -> None:
        self._out.append(r.to_bytes(self._enh))
        self._p_reject(self.session, r, phase)

    def _error(self, r: Reply, phase: str = "command") -> None:
        """A protocol error: counts towards max_errors."""
        self._reject(r, phase)
        sess = self.session
        sess.errors += 1
        if self.settings.max_errors and sess.errors >= self.settings.max_errors:
            self._reject(self._too_many_errors, phase)
            self._close("too many errors")

    def _run(self) -> list[Event]:
        try:
            self._loop()
        except Exception:  # pragma: no cover - defensive: a bug must not kill the listener
            import logging

            logging.getLogger(__name__).exception("SMTP server core failure")
            if self._state != _CLOSED:
                self._send(Reply(421, "4.3.0", f"{self.settings.hostname} internal error"))
                self._close("internal error")
        return self._events()

    def _loop(self) -> None:
        buf = self._buf
        maxline = self._maxline
        handlers = _HANDLERS
        while True:
            st = self._state
            if st == _DATA:
                if not self._data():
                    return
                continue
            if st != _CMD:
                return
            if self._discard:
                i = buf.find(b"\n")
                if i < 0:
                    buf.clear()
                    return
                del buf[: i + 1]
                self._discard = False
                continue
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > maxline + 1:
                    buf.clear()
                    self._discard = True
                    self._error(R_LINE_TOO_LONG)
                return
            end = i - 1 if (i and buf[i - 1] == 13) else i
            if end > maxline:
                del buf[: i + 1]
                self._error(R_LINE_TOO_LONG)
                continue
            raw = bytes(buf[:end])
            del buf[: i + 1]
            if b"\0" in raw:
                self._error(R_NUL)
                continue
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._error(R_BAD_UTF8)
                    continue
            sp = line.find(" ")
            if sp < 0:
                verb, arg = line, ""
            else:
                verb, arg = line[:sp], line[sp + 1:]
            h = handlers.get(verb.upper())
            if h is None:
                self._error(R_UNKNOWN)
            else:
                h(self, arg.strip())

    # -- DATA phase -----------------------------------------------------
    def _data(self) -> bool:
        """Scan for the end of data.  Returns True when the state changed."""
        buf = self._buf
        if self._dstart:
            if buf[:3] == b".\r\n":
                del buf[:3]
                self._finish_data(b"")
                return True
            if len(buf) < 3 and b".\r\n".startswith(buf):
                return False
            self._dstart = False
        pos = buf.find(b"\r\n.\r\n", self._dscan)
        if pos < 0:
            n = len(buf)
            if self._maxsize and self._ddropped + n - 3 > self._maxsize:
                # Over the limit: keep reading to the end marker, but only
                # keep the last 4 bytes (a marker may straddle two feeds).
                if n > 4:
                    self._ddropped += n - 4
                    del buf[:-4]
                self._doverflow = True
                self._dscan = 0
            else:
                self._dscan = n - 4 if n > 4 else 0
            return False
        if self._doverflow or (self._maxsize and self._ddropped + pos + 2 > self._maxsize):
            del buf[: pos + 5]
            self._doverflow = True
            self._finish_data(None)
            return True
        with memoryview(buf) as mv:
            body = bytes(mv[: pos + 2])
        del buf[: pos + 5]
        self._finish_data(body)
        return True

    def _finish_data(self, body: bytes | None) -> None:
        n = len(self._rcpts)
        reject = None
        if body is None:
            reject = R_SIZE
        else:
            # dot-unstuffing: a leading '.' of every line goes.
            if body[:1] == b".":
                body = body[1:]
            if b"\r\n." in body:
                body = body.replace(b"\r\n.", b"\r\n")
            # bare CR / bare LF -> CRLF
            nlf = body.count(b"\n")
            if nlf != body.count(b"\r") or nlf != body.count(b"\r\n"):
                body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            if self._maxsize and len(body) > self._maxsize:
                reject = R_SIZE
            elif self.settings.reject_nul and b"\0" in body:
                reject = R_NUL_BODY
        if reject is not None:
            for _ in range(n if self._lmtp else 1):
                self._reject(reject, "body")
            self._reset_txn()
            self._state = _CMD
            return
        mail = self._mail
        env = Envelope(
            mail_from=mail.address,
            rcpt_to=[a.address for a in self._rcpts],
            mail_params=self._mail_params,
            rcpt_params=self._rcpt_params,
            helo=self._helo,
            body=body,
            size=len(body),
            smtputf8=self._smtputf8,
            body_8bit=self._8bit or not body.isascii(),
            mail_from_addr=mail,
            rcpt_addrs=self._rcpts,
        )
        self._state = _WAIT
        self._tail = MessageReady(env)

    # -- commands -------------------------------------------------------
    def _hello(self, verb: str, arg: str) -> None:
        if not arg:
            self._error(Reply(501, "5.5.4", f"Syntax: {verb} hostname"), "helo")
            return
        r = self._p_helo(self.session, arg)
        if r is not None:
            self._reject(r, "helo")
            return
        self._reset_txn()
        self._helo = arg
        sess = self.session
        sess.helo = arg
        if verb == "HELO":
            sess.protocol = "smtp"
            self._out.append(self._helo_reply)
        else:
            sess.protocol = "lmtp" if verb == "LHLO" else "esmtp"
            self._out.append(self._ehlo_reply)

    def _cmd_ehlo(self, arg: str) -> None:
        if self._lmtp:
            self._error(R_UNKNOWN)
        else:
            self._hello("EHLO", arg)

    def _cmd_helo(self, arg: str) -> None:
        if self._lmtp:
            self._error(R_UNKNOWN)
        else:
            self._hello("HELO", arg)

    def _cmd_lhlo(self, arg: str) -> None:
        if not self._lmtp:
            self._error(R_UNKNOWN)
        else:
            self._hello("LHLO", arg)

    def _check_params(self, params: dict, phase: str) -> Reply | None:
        for key, val in params.items():
            if phase == "mail":
                if key == "SIZE":
                    if val is None or not val.isdigit() or not val.isascii() or len(val) > 20:
                        return R_BAD_SIZE
                    if self._maxsize and int(val) > self._maxsize:
                        return R_SIZE
                    continue
                if key == "BODY":
                    if val is None or val.upper() not in ("7BIT", "8BITMIME"):
                        return R_BAD_BODY
                    continue
                if key == "SMTPUTF8" and self._smtputf8_ok:
                    if val is not None:
                        return R_BAD_PARAMS
                    continue
                if self._dsn and key in ("RET", "ENVID"):
                    continue
                if self._auth and key == "AUTH":
                    continue
            elif self._dsn and key in ("NOTIFY", "ORCPT"):
                continue
            return Reply(555, "5.5.4", f"Unsupported option: {key}")
        return None

    def _cmd_mail(self, arg: str) -> None:
        if self._need_helo and not self._helo:
            self._error(R_NEED_LHLO if self._lmtp else R_NEED_HELO, "mail")
            return
        if self._mail is not None:
            self._error(R_NESTED_MAIL, "mail")
            return
        s = self.settings
        if s.max_messages_per_connection and self.session.transactions >= s.max_messages_per_connection:
            self._reject(self._too_many_msgs, "mail")
            self._close("too many messages")
            return
        if arg[:5].upper() != "FROM:":
            self._error(R_SYNTAX_MAIL, "mail")
            return
        try:
            path, ptext = split_argument(arg[5:])
        except AddressError:
            self._error(R_BAD_SENDER, "mail")
            return
        try:
            params = parse_params(ptext, smtputf8=self._smtputf8_ok) if ptext else {}
        except AddressError:
            self._error(R_BAD_PARAMS, "mail")
            return
        bad = self._check_params(params, "mail")
        if bad is not None:
            if bad.code in _ERROR_CODES:
                self._error(bad, "mail")
            else:
                self._reject(bad, "mail")
            return
        utf8 = "SMTPUTF8" in params
        try:
            addr = parse_path(path, smtputf8=utf8, allow_null=True,
                              allow_unqualified=s.allow_unqualified)
        except AddressError:
            self._error(R_BAD_SENDER, "mail")
            return
        r = self._p_mail(self.session, addr, params)
        if r is not None:
            self._reject(r, "mail")
            return
        self._mail = addr
        self._mail_params = params
        self._smtputf8 = utf8
        body = params.get("BODY")
        self._8bit = body is not None and body.upper() == "8BITMIME"
        self.session.transactions += 1
        self._out.append(R_MAIL_OK.to_bytes(self._enh))

    def _cmd_rcpt(self, arg: str) -> None:
        if self._mail is None:
            self._error(R_NEED_MAIL, "rcpt")
            return
        self._rcpt_tried = True
        sess = self.session
        if arg[:3].upper() != "TO:":
            sess.rejected_recipients += 1
            self._error(R_SYNTAX_RCPT, "rcpt")
            return
        try:
            path, ptext = split_argument(arg[3:])
            addr = parse_path(path, smtputf8=self._smtputf8, allow_null=False, allow_unqualified=True)
            if not addr.domain and not self.settings.allow_unqualified and addr.local.lower() != "postmaster":
                raise AddressError("unqualified recipient")
        except AddressError:
            sess.rejected_recipients += 1
            self._error(R_BAD_RCPT, "rcpt")
            return
        try:
            params = parse_params(ptext, smtputf8=self._smtputf8) if ptext else {}
        except AddressError:
            sess.rejected_recipients += 1
            self._error(R_BAD_PARAMS, "rcpt")
            return
        bad = self._check_params(params, "rcpt")
        if bad is not None:
            sess.rejected_recipients += 1
            self._error(bad, "rcpt")
            return
        s = self.settings
        if (s.max_recipients and len(self._rcpts) >= s.max_recipients) or (
            s.max_recipients_per_connection and sess.recipients >= s.max_recipients_per_connection
        ):
            sess.rejected_recipients += 1
            self._reject(R_TOO_MANY_RCPTS, "rcpt")
            return
        r = self._p_rcpt(sess, addr, params)
        if r is not None:
            sess.rejected_recipients += 1
            self._reject(r, "rcpt")
            return
        self._rcpts.append(addr)
        self._rcpt_params.append(params)
        sess.recipients += 1
        self._out.append(R_RCPT_OK.to_bytes(self._enh))

    def _cmd_data(self, arg: str) -> None:
        if arg:
            self._error(R_SYNTAX_DATA, "data")
            return
        if self._mail is None:
            self._error(R_NEED_MAIL, "data")
            return
        if not self._rcpts:
            if self._rcpt_tried:
                self._reject(R_NO_VALID_RCPTS, "data")
            else:
                self._error(R_NEED_RCPT, "data")
            return
        self._out.append(R_DATA.to_bytes(self._enh))
        self._state = _DATA
        self._dstart = True
        self._dscan = 0
        self._ddropped = 0
        self._doverflow = False

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            self._error(R_SYNTAX_RSET)
            return
        self._reset_txn()
        self._out.append(R_OK.to_bytes(self._enh))

    def _cmd_noop(self, arg: str) -> None:
        self._out.append(R_OK.to_bytes(self._enh))

    def _cmd_quit(self, arg: str) -> None:
        self._out.append(R_BYE.to_bytes(self._enh))
        self._close("quit")

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg:
            self._error(R_SYNTAX_VRFY)
        else:
            self._out.append(R_VRFY.to_bytes(self._enh))

    def _cmd_help(self, arg: str) -> None:
        self._out.append(self._help.to_bytes(self._enh))

    def _cmd_not_impl(self, arg: str) -> None:
        self._error(R_NOT_IMPL)


_HANDLERS = {
    "EHLO": ServerConnection._cmd_ehlo,
    "HELO": ServerConnection._cmd_helo,
    "LHLO": ServerConnection._cmd_lhlo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "HELP": ServerConnection._cmd_help,
}
for _v in ("EXPN", "ETRN", "TURN", "AUTH", "STARTTLS", "BDAT", "XCLIENT", "XFORWARD", "ATRN"):
    _HANDLERS[_v] = ServerConnection._cmd_not_impl
del _v


class _Template:
    """What a ServerConnection derives from its settings, computed once per
    distinct settings (connections are cheap to create)."""

    def __init__(self, s: ServerSettings) -> None:
        exts = list(DEFAULT_EXTENSIONS if s.extensions is None else s.extensions)
        keys = {e.split(" ", 1)[0].upper() for e in exts}
        self.enh = "ENHANCEDSTATUSCODES" in keys
        self.smtputf8_ok = "SMTPUTF8" in keys
        self.dsn = "DSN" in keys
        self.auth = "AUTH" in keys
        lines = [s.hostname]
        for e in exts:
            if e.upper() == "SIZE":
                lines.append(f"SIZE {s.max_message_size}" if s.max_message_size > 0 else "SIZE")
            else:
                lines.append(e)
        self.ehlo_reply = Reply(250, None, "\n".join(lines)).to_bytes()
        self.helo_reply = Reply(250, None, s.hostname).to_bytes()
        self.banner = Reply(220, None, s.banner or f"{s.hostname} {'LMTP' if s.lmtp else 'ESMTP'} Impetus")
        self.too_many_errors = Reply(421, "4.7.0", f"{s.hostname} too many errors")
        self.too_many_msgs = Reply(421, "4.7.0", f"{s.hostname} too many messages in this connection")
        self.timeout = Reply(421, "4.4.2", f"{s.hostname} Error: timeout exceeded")
        verbs = "LHLO" if s.lmtp else "EHLO HELO"
        self.help = Reply(214, "2.0.0", f"Commands: {verbs} MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")


_templates: dict = {}


def _template(s: ServerSettings) -> _Template:
    ext = s.extensions
    key = (s.hostname, s.lmtp, s.max_message_size, s.banner,
           None if ext is None else tuple(ext))
    t = _templates.get(key)
    if t is None:
        if len(_templates) > 256:
            _templates.clear()
        t = _templates[key] = _Template(s)
    return t
