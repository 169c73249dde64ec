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
  ``"too many messages"``, ``"too many auth failures"``, ``"shutdown"``,
  ``"lost"``, or the ``reason`` given to :meth:`ServerConnection.refuse`).
* :class:`StartTLS` -- (only with STARTTLS enabled) upgrade the transport
  after writing the preceding ``Send``, then call ``tls_started(info)``.
* :class:`AuthCheck` ``(awaitable)`` -- (only when ``policy.check_auth``
  returns an awaitable) await it, then call ``auth_done(result)``.

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
    check_auth(session, mechanism: str, username: str, password: str) -> bool | Reply
    allow_xclient(session) -> bool
    on_xclient(session) -> Reply | None

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

Optional extensions (all off by default; see :class:`ServerSettings`):

* **STARTTLS** (RFC 3207) when ``settings.tls_context`` is set (or
  ``settings.starttls``): advertised while the session is not TLS yet.
  ``STARTTLS`` is answered ``220 2.0.0 Ready to start TLS`` followed by a
  :class:`StartTLS` event; the driver upgrades the transport and calls
  :meth:`ServerConnection.tls_started` (the handshake failing is just the
  connection going away).  Everything received between the STARTTLS line
  and ``tls_started`` -- including commands pipelined in the same packet --
  is discarded, never executed (counted in ``session.starttls_discarded``),
  and the session starts afresh: no HELO, no transaction, no AUTH (RFC 3207
  section 4.2).  ``454 4.7.0`` when ``conn.tls_available`` is false, ``503``
  when already in TLS or inside a transaction.  For implicit TLS the driver
  calls ``session.set_tls(info)`` before :meth:`~ServerConnection.start`.
* **AUTH PLAIN / LOGIN** (RFC 4954) when ``settings.auth_mechanisms`` is
  set: offered only under TLS unless ``require_tls_for_auth`` is false or
  ``auth_without_tls`` is true (otherwise ``530 5.7.0 Must issue a
  STARTTLS command first``).  Credentials go to
  ``policy.check_auth(session, mechanism, username, password)``; success
  sets ``session.authenticated`` (``235 2.7.0``), failure answers ``535
  5.7.8 Authentication credentials invalid`` and after
  ``max_auth_failures`` failures ``421 4.7.0`` and Close.  ``*`` cancels
  (``501 5.7.0``), bad base64 is ``501 5.5.2``.  Passwords are never kept,
  logged or put into a reply.
* **XCLIENT** (Postfix XCLIENT_README; attributes ``NAME ADDR PORT PROTO
  HELO LOGIN``, xtext, ``[UNAVAILABLE]``, IPv6 as ``IPV6:...``) when
  ``settings.xclient_allowed`` or the policy defines
  ``allow_xclient(session)`` (asked about the real TCP peer; once XCLIENT
  was accepted the connection stays trusted).  A trusted client replaces
  the session's client identity -- ``peer_ip``, ``peer_port``,
  ``xclient_name``, ``helo``, ``protocol``, ``authenticated`` (LOGIN);
  attributes not given keep their values, except HELO which is forgotten
  -- the real peer goes to ``proxy_ip``/``proxy_port``, ``session.extra``
  is cleared (cached decisions about the old identity),
  ``policy.on_xclient(session)`` is called and the ``220`` greeting is sent
  again: the client must EHLO anew.  A HELO (or PROTO) given in XCLIENT
  sticks: the following EHLO does not replace ``session.helo`` /
  ``envelope.helo``.  Untrusted: ``550 5.7.0 Insufficient authorization``;
  inside a transaction: ``503``; bad syntax: ``501``.

Phases reported to ``on_reject`` therefore also include ``tls``, ``auth``
and ``xclient``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .address import Address, AddressError, parse_params, parse_path, split_argument
from .crlf import to_crlf
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
    "StartTLS",
    "AuthCheck",
    "DEFAULT_EXTENSIONS",
    "AUTH_MECHANISMS",
    "XCLIENT_ATTRIBUTES",
    "xtext_decode",
    "xtext_encode",
]

log = logging.getLogger("impetus.smtp")

DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")          # what the core implements
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN")


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
    # STARTTLS (RFC 3207): offered when tls_context is set (the asyncio glue
    # upgrades with it) or starttls is true (a sans-I/O driver does TLS itself).
    tls_context: Any = None            # ssl.SSLContext (server side) or None
    starttls: bool = False
    # AUTH (RFC 4954): () = no AUTH (today's behaviour); e.g. ("PLAIN", "LOGIN").
    auth_mechanisms: tuple[str, ...] | list[str] = ()
    require_tls_for_auth: bool = True  # AUTH only after STARTTLS / on implicit TLS ...
    auth_without_tls: bool = False     # ... unless this is true (or the above false)
    max_auth_failures: int = 3         # then 421 and close; 0 = no limit
    # XCLIENT (Postfix): every client may use it (trusted listeners only!);
    # otherwise policy.allow_xclient(session) decides per session.
    xclient_allowed: bool = False


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
    extra: dict = field(default_factory=dict)   # free for the listener (cleared by XCLIENT)
    # TLS (STARTTLS or implicit): see set_tls()
    tls_info: dict | None = None  # version, cipher, bits, peer_cert, peer_subject, verified
    tls_peer_verified: bool = False   # the client presented a certificate that verified
    starttls_discarded: int = 0   # bytes received after STARTTLS before TLS (injection), dropped
    # AUTH
    authenticated: str | None = None  # the login name once AUTH (or XCLIENT LOGIN) succeeded
    auth_mechanism: str | None = None  # "PLAIN", "LOGIN" or "XCLIENT"
    auth_failures: int = 0
    # XCLIENT: peer_ip/peer_port/helo/protocol/authenticated are replaced;
    # proxy_ip/proxy_port keep the real TCP peer.
    xclient: dict | None = None   # decoded attributes received so far (None = no XCLIENT)
    xclient_name: str | None = None   # NAME (None = unknown / [UNAVAILABLE])
    proxy_ip: str = ""
    proxy_port: int = 0

    def set_tls(self, info: dict | None = None) -> None:
        """Mark the session as TLS-protected; ``info`` as made by
        :func:`impetus.smtp.serve.tls_info` (``verified`` sets
        ``tls_peer_verified``)."""
        self.tls = True
        self.tls_info = dict(info) if info else {}
        self.tls_peer_verified = bool(self.tls_info.get("verified"))


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


class StartTLS(Event):
    """Upgrade the transport to TLS now (after writing the preceding Send),
    then call :meth:`ServerConnection.tls_started`."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, StartTLS)

    def __hash__(self):
        return hash(StartTLS)

    def __repr__(self):
        return "StartTLS()"


class AuthCheck(Event):
    """``check_auth`` returned an awaitable: await it (e.g. a password hash
    computed in a thread) and pass its result to
    :meth:`ServerConnection.auth_done` (an exception: pass a 454 Reply).
    Input is buffered, not interpreted, meanwhile."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable) -> None:
        self.awaitable = awaitable

    def __repr__(self):
        return "AuthCheck(...)"


class Policy:
    """Accept-everything policy; subclass and override what you need.

    The AUTH and XCLIENT hooks deny by default: ``check_auth`` returns
    False (every login fails), ``allow_xclient`` False (nobody is trusted).
    """

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

    def check_auth(self, session: Session, mechanism: str, username: str, password: str):
        """True accepts the credentials; False/None refuses (535); a Reply
        (e.g. ``454 4.7.0 Temporary authentication failure``) is sent as is.
        May instead return an awaitable of one of those (``async def``):
        the core then emits :class:`AuthCheck`.  Never log ``password``."""
        return False

    def allow_xclient(self, session: Session) -> bool:
        """May this (real, pre-XCLIENT) client use XCLIENT?"""
        return False

    def on_xclient(self, session: Session) -> Reply | None:
        """Called after XCLIENT replaced the client identity (like a new
        connection: re-derive what depended on the old one).  A Reply
        refuses the new identity: it is sent instead of the 220 greeting and
        the connection is closed."""
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
R_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
R_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
R_TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
R_SYNTAX_STARTTLS = Reply(501, "5.5.4", "Syntax: STARTTLS")
R_TXN_IN_PROGRESS = Reply(503, "5.5.1", "MAIL transaction in progress")
R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R_AUTH_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R_AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
R_AUTH_NEED_EHLO = Reply(503, "5.5.1", "send EHLO first")
R_AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
R_AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
R_AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
R_AUTH_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
R_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
R_XCLIENT_DENIED = Reply(550, "5.7.0", "Insufficient authorization")
R_XCLIENT_SYNTAX = Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value ...")
_B64_USERNAME = b"334 VXNlcm5hbWU6\r\n"     # "Username:"
_B64_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"     # "Password:"
_EMPTY_CHALLENGE = b"334 \r\n"

_ERROR_CODES = frozenset((500, 501, 502, 503, 504, 555))

# states
_NEW = "new"
_CMD = "command"
_DATA = "data"
_WAIT = "wait_message"
_TLS = "starttls"
_AUTHWAIT = "auth_wait"
_CLOSED = "closed"


class ServerConnection:
    """One SMTP/LMTP server session; see the module docstring."""

    def __init__(self, settings: ServerSettings | None = None, policy=None, session: Session | None = None) -> None:
        s = self.settings = settings or ServerSettings()
        self.session = session or Session()
        self.session.protocol = "lmtp" if s.lmtp else "esmtp"
        pol = policy if policy is not None else _DEFAULT_POLICY
        self.policy = pol
        d = _DEFAULT_POLICY
        if pol is _DEFAULT_POLICY:
            self._p_connect, self._p_helo, self._p_mail, self._p_rcpt, self._p_reject = (
                d.check_connect, d.check_helo, d.check_mail, d.check_rcpt, d.on_reject)
            self._p_auth, self._p_on_xclient = d.check_auth, d.on_xclient
            self._p_allow_xclient = None
        else:
            self._p_connect = getattr(pol, "check_connect", None) or d.check_connect
            self._p_helo = getattr(pol, "check_helo", None) or d.check_helo
            self._p_mail = getattr(pol, "check_mail", None) or d.check_mail
            self._p_rcpt = getattr(pol, "check_rcpt", None) or d.check_rcpt
            self._p_reject = getattr(pol, "on_reject", None) or d.on_reject
            self._p_auth = getattr(pol, "check_auth", None) or d.check_auth
            self._p_on_xclient = getattr(pol, "on_xclient", None) or d.on_xclient
            ax = getattr(pol, "allow_xclient", None)
            # The inherited deny-all default does not switch XCLIENT on.
            if ax is not None and getattr(ax, "__func__", None) is Policy.allow_xclient:
                ax = None
            self._p_allow_xclient = ax
        t = _template(s)
        self._t = t
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
        self._starttls_on = t.starttls
        self._auth_mechs = t.auth_mechs
        self._auth_plaintext_ok = (not s.require_tls_for_auth) or s.auth_without_tls
        self._xclient_on = s.xclient_allowed or self._p_allow_xclient is not None
        self._dynamic_ehlo = self._starttls_on or bool(self._auth_mechs) or self._xclient_on
        #: Set false by a driver that cannot upgrade this connection (STARTTLS -> 454).
        self.tls_available = True
        self._auth_state: tuple | None = None   # AUTH exchange in progress
        self._auth_wait: tuple | None = None    # (mechanism, user) of a pending AuthCheck
        self._xclient_trusted = False           # a previous XCLIENT was accepted
        self._sticky_helo = False               # session.helo came from XCLIENT HELO
        self._sticky_proto: str | None = None   # session.protocol came from XCLIENT PROTO

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
        MAIL), ``rcpt`` (>= 1 recipient), ``auth`` (inside an AUTH
        exchange), ``auth_wait`` (waiting for :meth:`auth_done`), ``data``,
        ``wait_message``, ``starttls`` (waiting for :meth:`tls_started`) or
        ``closed``."""
        st = self._state
        if st != _CMD:
            return st
        if self._auth_state is not None:
            return "auth"
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
        st = self._state
        if st == _CLOSED:
            return []
        if st == _TLS:
            # Plaintext after STARTTLS and before the handshake: injected, dropped.
            self.session.starttls_discarded += len(data)
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

    def tls_started(self, info: dict | None = None) -> list[Event]:
        """The transport is now TLS (after :class:`StartTLS`).  ``info``:
        see :meth:`Session.set_tls`.  The session starts afresh (RFC 3207
        section 4.2): the client has to EHLO again."""
        if self._state != _TLS:
            raise RuntimeError("no STARTTLS is pending")
        sess = self.session
        sess.set_tls(info)
        self._buf = bytearray()
        self._discard = False
        self._reset_txn()
        self._helo = ""
        self._auth_state = None
        if not self._sticky_helo:
            sess.helo = ""
        sess.protocol = self._sticky_proto or ("lmtp" if self._lmtp else "esmtp")
        if sess.auth_mechanism != "XCLIENT":
            sess.authenticated = None
            sess.auth_mechanism = None
        self._state = _CMD
        return self._run()

    def refuse(self, reply: Reply, reason: str = "rejected") -> list[Event]:
        """Refuse the connection instead of greeting it (e.g. a concurrency
        limit): ``reply`` is reported to ``on_reject`` (phase ``connect``)."""
        if self._state != _NEW:
            raise RuntimeError("refuse() is instead of start()")
        self._reject(reply, "connect")
        self._close(reason)
        return self._events()

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
                    self._auth_state = None
                    self._error(R_LINE_TOO_LONG)
                return
            end = i - 1 if (i and buf[i - 1] == 13) else i
            if end > maxline:
                del buf[: i + 1]
                self._auth_state = None
                self._error(R_LINE_TOO_LONG)
                continue
            raw = bytes(buf[:end])
            del buf[: i + 1]
            if self._auth_state is not None:
                self._auth_response(raw)
                continue
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
            body = to_crlf(body)  # bare CR / bare LF -> CRLF
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
            helo=self.session.helo if self._sticky_helo else self._helo,
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
        if not self._sticky_helo:
            sess.helo = arg
        if verb == "HELO":
            sess.protocol = self._sticky_proto or "smtp"
            self._out.append(self._helo_reply)
        else:
            sess.protocol = self._sticky_proto or ("lmtp" if verb == "LHLO" else "esmtp")
            if self._dynamic_ehlo:
                self._out.append(self._t.ehlo(
                    self._starttls_on and not sess.tls,
                    bool(self._auth_mechs) and (sess.tls or self._auth_plaintext_ok),
                    self._xclient_on and self._xclient_permitted()))
            else:
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
                if (self._auth or self._auth_mechs) and key == "AUTH":
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

    # -- STARTTLS (RFC 3207) ----------------------------------------------
    def _cmd_starttls(self, arg: str) -> None:
        if not self._starttls_on:
            self._error(R_NOT_IMPL)
            return
        if arg:
            self._error(R_SYNTAX_STARTTLS, "tls")
            return
        if self.session.tls:
            self._error(R_TLS_ACTIVE, "tls")
            return
        if self._mail is not None:
            self._error(R_TXN_IN_PROGRESS, "tls")
            return
        if not self.tls_available:
            self._reject(R_TLS_UNAVAILABLE, "tls")
            return
        self._out.append(R_TLS_READY.to_bytes(self._enh))
        self._state = _TLS
        # RFC 3207 section 5 / CVE-2011-0411: whatever was pipelined behind
        # STARTTLS came in plaintext and must never run after the upgrade.
        self.session.starttls_discarded += len(self._buf)
        self._buf.clear()
        self._discard = False
        self._tail = StartTLS()

    # -- AUTH (RFC 4954) ---------------------------------------------------
    def _cmd_auth(self, arg: str) -> None:
        if not self._auth_mechs:
            self._error(R_NOT_IMPL)
            return
        sess = self.session
        if not self._helo:
            self._error(R_AUTH_NEED_EHLO, "auth")
            return
        if not sess.tls and not self._auth_plaintext_ok:
            self._reject(R_AUTH_NEED_TLS, "auth")
            return
        if sess.authenticated is not None:
            self._error(R_AUTH_ALREADY, "auth")
            return
        if self._mail is not None:
            self._error(R_TXN_IN_PROGRESS, "auth")
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(R_AUTH_SYNTAX, "auth")
            return
        mech = parts[0].upper()
        if mech not in self._auth_mechs:
            self._error(R_AUTH_MECH, "auth")
            return
        if len(parts) == 1:
            if mech == "PLAIN":
                self._auth_state = ("PLAIN",)
                self._out.append(_EMPTY_CHALLENGE)
            else:
                self._auth_state = ("LOGIN", None)
                self._out.append(_B64_USERNAME)
            return
        initial = parts[1]
        if initial == "*":
            self._reject(R_AUTH_ABORTED, "auth")
            return
        data = b"" if initial == "=" else _b64decode(initial)
        if data is None:
            self._error(R_AUTH_BASE64, "auth")
            return
        if mech == "PLAIN":
            self._auth_plain(data)
        else:
            self._auth_state = ("LOGIN", data)
            self._out.append(_B64_PASSWORD)

    def _auth_response(self, raw: bytes) -> None:
        """A line answering a 334 challenge."""
        st = self._auth_state
        self._auth_state = None
        line = raw.strip()
        if line == b"*":
            self._reject(R_AUTH_ABORTED, "auth")
            return
        data = _b64decode(line)
        if data is None:
            self._error(R_AUTH_BASE64, "auth")
            return
        if st[0] == "PLAIN":
            self._auth_plain(data)
        elif st[1] is None:
            self._auth_state = ("LOGIN", data)
            self._out.append(_B64_PASSWORD)
        else:
            self._auth_check("LOGIN", st[1], data)

    def _auth_plain(self, data: bytes) -> None:
        # RFC 4616: [authzid] NUL authcid NUL passwd
        parts = data.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            # malformed, or asks to act as somebody else (not supported)
            self._auth_check("PLAIN", b"", b"")
            return
        self._auth_check("PLAIN", parts[1], parts[2])

    def _auth_check(self, mech: str, user_b: bytes, pass_b: bytes) -> None:
        sess = self.session
        result = None
        try:
            user = user_b.decode("utf-8")
            password = pass_b.decode("utf-8")
        except UnicodeDecodeError:
            user = password = ""
        if user and user.isprintable() and len(user) <= 255:
            try:
                result = self._p_auth(sess, mech, user, password)
            except Exception:
                log.error("check_auth failed (session %s)", sess.conn_id, exc_info=True)
                result = R_AUTH_TEMP
        password = pass_b = None  # noqa: F841 - do not keep the secret around
        if hasattr(result, "__await__"):
            # An asynchronous check: the driver awaits it and calls auth_done().
            self._auth_wait = (mech, user)
            self._state = _AUTHWAIT
            self._tail = AuthCheck(result)
            return
        self._auth_result(mech, user, result)

    def auth_done(self, result) -> list[Event]:
        """The outcome of the awaitable of an :class:`AuthCheck` event (what
        ``check_auth`` would have returned: True, False/None or a Reply)."""
        if self._state != _AUTHWAIT:
            raise RuntimeError("no AUTH check is pending")
        mech, user = self._auth_wait
        self._auth_wait = None
        self._state = _CMD
        self._auth_result(mech, user, result)
        return self._run()

    def _auth_result(self, mech: str, user: str, result) -> None:
        sess = self.session
        if result is True:
            sess.authenticated = user
            sess.auth_mechanism = mech
            self._out.append(R_AUTH_OK.to_bytes(self._enh))
            return
        if isinstance(result, Reply) and result.code >= 400:
            self._reject(result, "auth")
            if result.code < 500:
                return
        else:
            self._reject(R_AUTH_FAILED, "auth")
        sess.auth_failures += 1
        lim = self.settings.max_auth_failures
        if lim and sess.auth_failures >= lim:
            self._reject(self._t.too_many_auth, "auth")
            self._close("too many auth failures")

    # -- XCLIENT (Postfix) -------------------------------------------------
    def _xclient_permitted(self) -> bool:
        if self._xclient_trusted or self.settings.xclient_allowed:
            return True
        hook = self._p_allow_xclient
        if hook is None:
            return False
        try:
            return bool(hook(self.session))
        except Exception:
            log.error("allow_xclient failed (session %s)", self.session.conn_id, exc_info=True)
            return False

    def _cmd_xclient(self, arg: str) -> None:
        if not self._xclient_on:
            self._error(R_NOT_IMPL)
            return
        if self._mail is not None:
            self._error(R_TXN_IN_PROGRESS, "xclient")
            return
        if not self._xclient_permitted():
            self._reject(R_XCLIENT_DENIED, "xclient")
            return
        items = arg.split()
        if not items:
            self._error(R_XCLIENT_SYNTAX, "xclient")
            return
        raw: dict[str, str] = {}
        values: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.upper()
            if not sep or not text or not name:
                self._error(R_XCLIENT_SYNTAX, "xclient")
                return
            if name not in XCLIENT_ATTRIBUTES:
                self._error(Reply(501, "5.5.4", f"Bad XCLIENT attribute name: {name[:32]}"), "xclient")
                return
            value = xtext_decode(text)
            ok, parsed = (False, None) if value is None else _xclient_value(name, value)
            if not ok:
                self._error(Reply(501, "5.5.4", f"Bad {name} syntax"), "xclient")
                return
            raw[name] = value
            values[name] = parsed
        sess = self.session
        if sess.xclient is None:
            sess.proxy_ip, sess.proxy_port = sess.peer_ip, sess.peer_port
            sess.xclient = {}
        sess.xclient.update(raw)
        if "ADDR" in values:
            sess.peer_ip = values["ADDR"]
        if "PORT" in values:
            sess.peer_port = values["PORT"]
        if "NAME" in values:
            sess.xclient_name = values["NAME"]
        if "LOGIN" in values:
            sess.authenticated = values["LOGIN"]
            sess.auth_mechanism = "XCLIENT" if values["LOGIN"] is not None else None
        # Back to the greeting stage; HELO/PROTO given here stick (they
        # describe the original client), otherwise the next EHLO sets them.
        self._reset_txn()
        self._helo = ""
        self._auth_state = None
        if "HELO" in values:
            sess.helo = values["HELO"]
            self._sticky_helo = True
        else:
            sess.helo = ""
            self._sticky_helo = False
        self._sticky_proto = values.get("PROTO")
        sess.protocol = self._sticky_proto or ("lmtp" if self._lmtp else "esmtp")
        sess.extra.clear()
        self._xclient_trusted = True
        try:
            r = self._p_on_xclient(sess)
        except Exception:
            log.error("on_xclient failed (session %s)", sess.conn_id, exc_info=True)
            r = Reply(421, "4.3.0", f"{self.settings.hostname} internal error")
        if r is not None:
            self._reject(r, "xclient")
            self._close("rejected")
            return
        self._out.append(self._banner.to_bytes(self._enh))


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
for _v in ("EXPN", "ETRN", "TURN", "BDAT", "XFORWARD", "ATRN"):
    _HANDLERS[_v] = ServerConnection._cmd_not_impl
del _v
_HANDLERS["STARTTLS"] = ServerConnection._cmd_starttls
_HANDLERS["AUTH"] = ServerConnection._cmd_auth
_HANDLERS["XCLIENT"] = ServerConnection._cmd_xclient


# ---------------------------------------------------------------------------
# AUTH / XCLIENT helpers
# ---------------------------------------------------------------------------

_B64_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def _b64decode(text) -> bytes | None:
    """Strict base64 (RFC 4954 responses); None when malformed."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            return None
    if len(text) % 4 or not _B64_RE.fullmatch(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


_XTEXT_HEX = frozenset(b"0123456789ABCDEF")


def xtext_decode(text: str) -> str | None:
    """RFC 3461 xtext (``+XX`` hex escapes) -> str (UTF-8); None if malformed.

    Raw characters must be ``!``..``~`` other than ``+`` and ``=``; raw
    non-ASCII (UTF-8) is tolerated."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x2B:  # '+'
            hx = data[i + 1:i + 3]
            if len(hx) != 2 or not (hx[0] in _XTEXT_HEX and hx[1] in _XTEXT_HEX):
                return None
            out.append(int(hx, 16))
            i += 3
            continue
        if c == 0x3D or c < 33 or c == 127:
            return None
        out.append(c)
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def xtext_encode(text: str) -> str:
    """str -> RFC 3461 xtext (UTF-8 bytes outside ``!``..``~``, ``+`` and ``=`` escaped)."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in text.encode("utf-8"))


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9_.])?")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")


def _xclient_value(name: str, value: str) -> tuple[bool, Any]:
    """Validate one decoded XCLIENT attribute -> (ok, session value)."""
    unavailable = value.upper() in _UNAVAILABLE
    if len(value) > 255:
        return False, None
    if name == "NAME":
        if unavailable:
            return True, None
        return (True, value) if _HOSTNAME_RE.fullmatch(value) else (False, None)
    if name == "ADDR":
        if value.upper() == "[UNAVAILABLE]":
            return True, ""
        text = value
        if text[:5].upper() == "IPV6:":
            text = text[5:]
            cls = ipaddress.IPv6Address
        elif ":" in text:
            cls = ipaddress.IPv6Address
        else:
            cls = ipaddress.IPv4Address
        try:
            return True, str(cls(text))
        except ValueError:
            return False, None
    if name == "PORT":
        if value.upper() == "[UNAVAILABLE]":
            return True, 0
        if value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535:
            return True, int(value)
        return False, None
    if name == "PROTO":
        if value.upper() == "[UNAVAILABLE]":
            return True, None
        v = value.upper()
        return (True, v.lower()) if v in ("SMTP", "ESMTP") else (False, None)
    if name == "HELO":
        if value.upper() == "[UNAVAILABLE]":
            return True, ""
        return (True, value) if value.isprintable() and " " not in value else (False, None)
    if name == "LOGIN":
        if value.upper() == "[UNAVAILABLE]":
            return True, None
        return (True, value) if value.isprintable() else (False, None)
    return False, None  # pragma: no cover - names are checked before


class _Template:
    """What a ServerConnection derives from its settings, computed once per
    distinct settings (connections are cheap to create)."""

    def __init__(self, s: ServerSettings) -> None:
        exts = list(DEFAULT_EXTENSIONS if s.extensions is None else s.extensions)
        self.starttls = s.tls_context is not None or bool(s.starttls)
        mechs = []
        for m in s.auth_mechanisms or ():
            m = str(m).upper()
            if m not in AUTH_MECHANISMS:
                raise ValueError(f"unsupported AUTH mechanism {m!r} (supported: {' '.join(AUTH_MECHANISMS)})")
            if m not in mechs:
                mechs.append(m)
        self.auth_mechs = tuple(mechs)
        # Keywords the core now advertises itself (per session) are dropped
        # from the static list when the feature is on.
        managed = set()
        if self.starttls:
            managed.add("STARTTLS")
        if self.auth_mechs:
            managed.add("AUTH")
        if s.xclient_allowed:
            managed.add("XCLIENT")
        if managed:
            exts = [e for e in exts if e.split(" ", 1)[0].upper() not in managed]
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
        self.ehlo_lines = lines
        self._ehlo_cache: dict = {}
        self.ehlo_reply = Reply(250, None, "\n".join(lines)).to_bytes()
        self.too_many_auth = Reply(421, "4.7.0", f"{s.hostname} too many authentication failures")
        self.helo_reply = Reply(250, None, s.hostname).to_bytes()
        self.banner = Reply(220, None, s.banner or f"{s.hostname} {'LMTP' if s.lmtp else 'ESMTP'} Impetus")
        self.too_many_errors = Reply(421, "4.7.0", f"{s.hostname} too many errors")
        self.too_many_msgs = Reply(421, "4.7.0", f"{s.hostname} too many messages in this connection")
        self.timeout = Reply(421, "4.4.2", f"{s.hostname} Error: timeout exceeded")
        verbs = "LHLO" if s.lmtp else "EHLO HELO"
        self.help = Reply(214, "2.0.0", f"Commands: {verbs} MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

    def ehlo(self, starttls: bool, auth: bool, xclient: bool) -> bytes:
        """The EHLO reply with the per-session keywords."""
        key = (starttls, auth, xclient)
        r = self._ehlo_cache.get(key)
        if r is None:
            lines = list(self.ehlo_lines)
            if xclient:
                lines = [ln for ln in lines if ln.split(" ", 1)[0].upper() != "XCLIENT"]
            if starttls:
                lines.append("STARTTLS")
            if auth:
                lines.append("AUTH " + " ".join(self.auth_mechs))
            if xclient:
                lines.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
            r = self._ehlo_cache[key] = Reply(250, None, "\n".join(lines)).to_bytes()
        return r


_templates: dict = {}


def _template(s: ServerSettings) -> _Template:
    ext = s.extensions
    key = (s.hostname, s.lmtp, s.max_message_size, s.banner,
           None if ext is None else tuple(ext),
           s.tls_context is not None or bool(s.starttls),
           tuple(s.auth_mechanisms or ()), bool(s.xclient_allowed))
    t = _templates.get(key)
    if t is None:
        if len(_templates) > 256:
            _templates.clear()
        t = _templates[key] = _Template(s)
    return t
