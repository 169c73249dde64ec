"""Outbound SMTP/LMTP connections: thin asyncio glue over ``smtp.client``.

A ``Connection`` knows nothing of queues: the scheduler hands it a
transaction (sender, recipients, wire-ready body) and gets one reply per
recipient back. Every wait has its own timeout (spec §10.5, D14) and every
failure becomes a ``DeliveryError`` carrying the reply to log and the
connection stage (spec §12.5).

TLS (spec §7): with ``TLS = ifavailable|required`` ``open()`` runs EHLO,
STARTTLS (stage 15), the handshake (stage 17, bounded by ``EHLO_Timeout``)
and EHLO again.  A TLS policy that cannot be met raises
:class:`TlsPolicyError` (all 4xx, so the mail is retried): the scheduler
tries the next MX and, when none meets the policy, logs that reply for the
queue's mail.  ``ifavailable`` with ``TLS_Ifavailable_Fallback`` reconnects
in plain text at once after a failed STARTTLS or handshake.  The TLS state
of a session is in ``Connection.tls_info``.

XCLIENT (spec §8, D10): with ``XCLIENT = ifavailable|required`` every
transaction is preceded by ``XCLIENT`` carrying the injecting client's
attributes (those the peer advertises), a 2xx reply, and EHLO again.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass

from .smtp.client import (CLOSED_BY_REMOTE, ProtocolError, ReplyParser, Stage, Transaction,
                          dot_stuff, no_response_reply, parse_ehlo, xclient)
from .smtp.reply import Reply
from .tls import TlsSettings, certificate_matches, describe_certificate

log = logging.getLogger("impetus.delivery")

NOT_CONNECTED = Stage.NOT_CONNECTED
CONNECT_TIMED_OUT = Reply(450, "4.4.1", "[internal] Connection Timed Out")
NO_MXS_REACHABLE = Reply(421, "4.4.0", "[internal] no MXs for this domain could be reached at this time")

# spec §7 (all transient: the message is delayed and retried)
STARTTLS_NOT_ADVERTISED = Reply(451, "4.7.6", "[internal] STARTTLS required but not advertised")
SEND_STARTTLS_FAILED = Reply(451, "4.7.5", "[internal] send STARTTLS failed")
NO_TLS_GO_AHEAD = Reply(451, "4.7.5", "[internal] no tls go-ahead")
TLS_NEGOTIATION_FAILED = Reply(451, "4.7.5", "[internal] TLS negotiation failed")
CERT_UNTRUSTED = Reply(451, "4.7.5", "[internal] remote node SSL certificate not signed by a valid CA")
CERT_HOST_MISMATCH = Reply(451, "4.7.5", "[internal] SSL certificate subject does not match host")
CERT_EXPIRED = Reply(454, "4.7.5", "[internal] certificate expired")
CERT_NOT_YET_VALID = Reply(454, "4.7.5", "[internal] certificate not yet valid: possible clock skew")
# spec §8
XCLIENT_NOT_ADVERTISED = Reply(451, "4.7.6", "[internal] XCLIENT required but not advertised")
SEND_XCLIENT_FAILED = Reply(451, "4.4.2", "[internal] send XCLIENT failed")
#: XCLIENT attributes we can send, in the order sent (D10)
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN")

# OpenSSL X509_V_ERR_* codes with their own §7 replies
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9


def no_response(stage: int) -> Reply:
    return no_response_reply(stage)


class DeliveryError(Exception):
    """A connection-level failure: applies to every recipient in flight."""

    def __init__(self, reply: Reply, stage: int, connected: bool):
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage
        self.connected = connected


class TlsPolicyError(DeliveryError):
    """The TLS policy (``TLS``, ``TLS_Verify``, MTA-STS) cannot be met on
    this connection, which is closed.  Not a host failure: another MX may
    meet it, and if none does the reply is the outcome of the queue's mail."""


class _HandshakeFailed(Exception):
    def __init__(self, reply: Reply, stage: int, detail: str, cert_failure: bool = False,
                 alive: bool = False):
        super().__init__(detail)
        self.reply = reply
        self.stage = stage
        self.detail = detail
        self.cert_failure = cert_failure
        self.alive = alive  # the plain-text session can go on


@dataclass(frozen=True)
class ClientFacts:
    """The client that injected a message, as XCLIENT attributes (D10).
    None is sent as ``[UNAVAILABLE]``."""

    name: str | None = None
    addr: str | None = None
    port: str | None = None
    proto: str | None = None
    helo: str | None = None
    login: str | None = None

    @classmethod
    def from_reception(cls, peer_ip: str | None, helo: str | None = None,
                       proto: str | None = None) -> "ClientFacts":
        """From what the spool keeps of a reception: the peer address (IPv6
        as ``IPV6:...``), the HELO/EHLO argument and our protocol name
        (``esmtp``/``smtp``/``lmtp``; anything else is unknown)."""
        addr = None
        try:
            ip = ipaddress.ip_address((peer_ip or "").strip("[]"))
            addr = f"IPV6:{ip.compressed}" if ip.version == 6 else str(ip)
        except ValueError:
            pass
        p = {"esmtp": "ESMTP", "smtp": "SMTP", "lmtp": "LMTP"}.get((proto or "").lower())
        return cls(addr=addr, helo=helo or None, proto=p)

    def attributes(self, advertised) -> dict[str, str | None]:
        return {k: getattr(self, k.lower()) for k in XCLIENT_ATTRIBUTES if k in advertised}


@dataclass
class Timeouts:
    connect: float = 300
    ehlo: float = 300
    mailfrom: float = 300
    rcptto: float = 300
    body: float = 600
    rset: float = 30

    @classmethod
    def from_config(cls, config, domain: str, binding: str) -> "Timeouts":
        g = lambda name: config.lookup(name, domain=domain, binding=binding)  # noqa: E731
        return cls(g("Connect_Timeout"), g("EHLO_Timeout"), g("MailFrom_Timeout"),
                   g("RcptTo_Timeout"), g("Body_Timeout"), g("Rset_Timeout"))


@dataclass
class RcptResult:
    reply: Reply
    stage: int


class _Wire(asyncio.Protocol):
    """The socket side of a :class:`Connection`: replies are parsed as the
    bytes arrive and one coroutine at a time waits for them.

    Why not ``asyncio.StreamReader``: py-spy put ~15 % of the scheduler
    process's samples in its buffering and in the ``asyncio.timeout`` around
    every read (a Python object, the current task's lookup, a timer). Here a
    wait is one future and one timer handle: 0.48 -> 0.45 ms of that
    process's CPU per relayed message (bench/RESULTS.md).

    Bytes are parsed as they arrive, so a peer that floods us with replies
    nobody asked for is stopped at ``MAX_PENDING`` (reading pauses until the
    replies are taken), and a session the peer closes while idle is marked
    broken at once, before the scheduler hands it a batch.
    """

    __slots__ = ("conn", "transport", "waiter", "closed", "paused")

    #: replies a peer may send ahead of our commands before we stop reading
    MAX_PENDING = 1000

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None   # a reply wait or a drain
        self.closed = False                         # EOF or connection lost
        self.paused = False                         # writing paused (buffer full)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.wire is not self or conn.garbled is not None:
            return  # an abandoned session, or garbage already seen: ignore the rest
        try:
            conn.pending.extend(conn.parser.feed(data))
        except ProtocolError as exc:
            # Valid replies before the garbage still answer their commands;
            # the garbage fails whichever command it was meant to answer.
            conn.broken = True
            conn.pending.extend(getattr(exc, "replies", ()))
            conn.garbled = Reply(451, "4.4.2", f"[internal] garbled response: {exc}")
        if len(conn.pending) > self.MAX_PENDING and self.transport is not None:
            self.transport.pause_reading()  # resumed as the replies are taken
        self._wake()

    def eof_received(self):
        self.closed = True
        self._wake()
        return None  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.conn.wire is self:
            self.conn.broken = True  # never reuse it (e.g. the peer closed an idle session)
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class Connection:
    """One outbound SMTP or LMTP session to one next hop."""

    def __init__(self, hop, timeouts: Timeouts, helo_name: str, *, source_ip: str | None = None,
                 lmtp: bool = False, esmtp: bool = True, tls: TlsSettings | None = None,
                 xclient: str = "no", notice=None):
        self.hop = hop
        self.tls = tls if tls is not None and tls.enabled else None
        self.xclient_mode = xclient or "no"
        self.notice = notice            # callable(text) for the paniclog; None: python logging
        self.tls_info: dict | None = None
        self.xclient_identity: ClientFacts | None = None  # whom the session speaks for
        self.timeouts = timeouts
        self.helo_name = helo_name
        self.source_ip = source_ip
        self.lmtp = lmtp or hop.proto == "lmtp"
        self.esmtp = esmtp and hop.proto != "smtp"
        self.wire: _Wire | None = None  # the session's socket side; None when closed
        self.parser = ReplyParser()
        self.pending: list[Reply] = []
        self.extensions: dict[str, str] = {}
        self.bytes_sent = 0
        self.deliveries = 0
        self.broken = False
        self.opened_at = time.monotonic()
        self.garbled: Reply | None = None  # set once the peer sent an unparsable reply
        self.cap_keys: list = []  # the scheduler's connection caps this connection holds
        self.rcpts_sent = 0

    @property
    def remote_ip(self) -> str:
        return self.hop.ip

    @property
    def uses_xclient(self) -> bool:
        """Whether ``send`` speaks for the injecting client (XCLIENT)."""
        return self.xclient_mode in ("ifavailable", "required")

    @property
    def transport(self) -> asyncio.Transport | None:
        """The session's transport (TLS once STARTTLS is done), None when closed."""
        wire = self.wire
        return wire.transport if wire is not None else None

    # -- low level ---------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self.bytes_sent += len(data)

    async def _wait(self, wire: _Wire, timeout: float) -> None:
        """Until ``wire`` wakes us (data, EOF, writable again) or ``timeout``
        passes (``asyncio.TimeoutError``)."""
        loop = asyncio.get_running_loop()
        fut = wire.waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if wire.waiter is fut:
                wire.waiter = None

    async def _woken_by(self, deadline: float, stage: int) -> None:
        """The wire's next wake-up, or the stage's "no response" failure
        once ``deadline`` (``time.monotonic``) has passed."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                await self._wait(self.wire, remaining)
                return
            except asyncio.TimeoutError:
                pass
        self.broken = True
        raise DeliveryError(no_response(stage), stage, True) from None

    async def _drain(self, timeout: float, stage: int) -> None:
        wire = self.wire
        if not wire.paused and not wire.closed:
            # Below the transport's high-water mark: nothing to wait for (the
            # hot path; a dead peer shows up when we read its reply).
            return
        deadline = time.monotonic() + timeout
        while wire.paused and not wire.closed:
            await self._woken_by(deadline, stage)
        if wire.closed:
            self.broken = True
            raise DeliveryError(CLOSED_BY_REMOTE, stage, True)

    async def _reply(self, timeout: float, stage: int) -> Reply:
        pending = self.pending
        if pending:  # pipelined replies that came in one segment
            return self._take(pending)
        wire = self.wire
        deadline = time.monotonic() + timeout
        while not pending:
            if self.garbled is not None:
                raise DeliveryError(self.garbled, stage, True)
            if wire.closed:
                self.broken = True
                raise DeliveryError(CLOSED_BY_REMOTE, stage, True)
            await self._woken_by(deadline, stage)
        return self._take(pending)

    def _take(self, pending: list[Reply]) -> Reply:
        reply = pending.pop(0)
        if len(pending) == _Wire.MAX_PENDING // 2 and self.transport is not None:
            self.transport.resume_reading()
        return reply

    # -- session -----------------------------------------------------------
    def _note(self, text: str) -> None:
        text = f"{self.hop.host}[{self.hop.ip}]:{self.hop.port}: {text}"
        if self.notice is not None:
            self.notice(text)
        else:
            log.info("%s", text)

    def _reset(self) -> None:
        """Forget a closed session so that the next ``_establish`` starts afresh."""
        self.close()
        self.parser = ReplyParser()
        self.pending = []
        self.garbled = None
        self.extensions = {}
        self.broken = False
        self.tls_info = None
        self.xclient_identity = None

    async def open(self) -> None:
        """Connect, read the banner, EHLO (HELO fallback) / LHLO, and
        STARTTLS + EHLO again when the TLS policy asks for it."""
        await self._establish()
        if self.tls is not None:
            await self._secure()

    async def _establish(self) -> None:
        """Connect, read the banner, EHLO (HELO fallback) / LHLO."""
        family = socket.AF_INET6 if ":" in self.hop.ip else socket.AF_INET
        local = (self.source_ip, 0) if self.source_ip else None
        loop = asyncio.get_running_loop()

        def wire() -> _Wire:
            # ours from the start: the banner may arrive before create_connection returns
            self.wire = _Wire(self)
            return self.wire

        try:
            await asyncio.wait_for(
                loop.create_connection(wire, self.hop.ip, self.hop.port,
                                       family=family, local_addr=local),
                self.timeouts.connect)
        except asyncio.TimeoutError:
            self.wire = None   # asyncio closes a transport made before the timeout
            raise DeliveryError(CONNECT_TIMED_OUT, NOT_CONNECTED, False) from None
        except OSError as exc:
            self.wire = None
            reason = exc.strerror or str(exc)
            raise DeliveryError(Reply(421, "4.4.0", f"[internal] connect to {self.hop.ip}:"
                                                    f"{self.hop.port} failed: {reason}"),
                                NOT_CONNECTED, False) from None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        banner = await self._reply(self.timeouts.ehlo, Stage.BANNER)  # D14
        if banner.code != 220:
            self.broken = True
            raise DeliveryError(banner, Stage.BANNER, True)
        await self._greet()

    # -- STARTTLS (spec §7) ----------------------------------------------------
    async def _abandon(self, reply: Reply, stage: int, detail: str = "") -> None:
        """Give up on a healthy session for a policy reason: QUIT, then raise."""
        self._note(f"{reply}" + (f": {detail}" if detail else ""))
        await self.quit()
        raise TlsPolicyError(reply, stage, True)

    async def _secure(self) -> None:
        pol = self.tls
        verify_chain = pol.verify != "no"
        for _ in range(3):
            if "STARTTLS" not in self.extensions:
                if pol.mode == "required":
                    await self._abandon(STARTTLS_NOT_ADVERTISED, Stage.STARTTLS,
                                        "the peer does not offer STARTTLS"
                                        + (f" (MTA-STS {pol.sts})" if pol.sts else ""))
                return  # ifavailable: plain text
            try:
                await self._starttls(pol.context(verify_chain))
            except (ssl.SSLError, OSError, ValueError) as exc:
                # our own context cannot be built (a file changed since start)
                self._note(f"TLS context: {exc}")
                self.close()
                raise TlsPolicyError(TLS_NEGOTIATION_FAILED, Stage.TLS_HANDSHAKE, True) from None
            except _HandshakeFailed as exc:
                if exc.alive:
                    # refused: the session goes on in plain text
                    if pol.mode == "ifavailable" and pol.fallback:
                        self._note(f"STARTTLS refused ({exc.detail}); continuing in plain text "
                                   "(TLS_Ifavailable_Fallback)")
                        return
                    await self._abandon(exc.reply, exc.stage, exc.detail)
                self.close()
                if exc.cert_failure and pol.verify == "optional" and verify_chain:
                    self._note(f"{exc.reply.text}: {exc.detail}; TLS_Verify = optional: "
                               "delivering over unverified TLS")
                    verify_chain = False
                    self._reset()
                    await self._establish()
                    continue
                if not exc.cert_failure and pol.mode == "ifavailable" and pol.fallback:
                    self._note(f"{exc.reply.text} ({exc.detail}); retrying in plain text "
                               "(TLS_Ifavailable_Fallback)")
                    self._reset()
                    self.tls = None
                    await self._establish()
                    return
                self._note(f"{exc.reply}: {exc.detail}")
                raise TlsPolicyError(exc.reply, exc.stage, True) from None
            break
        else:  # pragma: no cover - the loop always returns, raises or breaks
            raise TlsPolicyError(TLS_NEGOTIATION_FAILED, Stage.TLS_HANDSHAKE, True)
        info = self.tls_info
        if verify_chain and pol.verify in ("host", "optional"):
            sslobj = self.transport.get_extra_info("ssl_object")
            cert = (sslobj.getpeercert() if sslobj is not None else None) or {}
            matched = certificate_matches(cert, pol.names)
            info["matched"] = matched
            if matched is None:
                detail = (f"certificate ({describe_certificate(cert)}) is not valid for "
                          f"{' or '.join(n for n in pol.names if n)}")
                if pol.verify == "host":
                    self._note(f"{CERT_HOST_MISMATCH}: {detail}")
                    self.close()
                    raise TlsPolicyError(CERT_HOST_MISMATCH, Stage.TLS_HANDSHAKE, True)
                self._note(f"{detail}; TLS_Verify = optional: delivering anyway")
                info["verified"] = False
        elif not verify_chain:
            info["verified"] = False
        # RFC 3207: forget what was learnt before TLS, ask again.
        self.extensions = {}
        await self._greet()
        log.debug("%s[%s]: TLS %s %s verified=%s", self.hop.host, self.hop.ip,
                  info.get("version"), info.get("cipher"), info.get("verified"))

    async def _starttls(self, ctx: ssl.SSLContext) -> None:
        t = self.timeouts.ehlo
        try:
            self._write(b"STARTTLS\r\n")
            await self._drain(t, Stage.STARTTLS)
            reply = await self._reply(t, Stage.STARTTLS)
        except DeliveryError as exc:
            raise _HandshakeFailed(SEND_STARTTLS_FAILED, Stage.STARTTLS, str(exc.reply)) from None
        if reply.code != 220:
            # refused: the session stays usable in plain text, unless it is closing
            raise _HandshakeFailed(NO_TLS_GO_AHEAD, Stage.STARTTLS, f"STARTTLS answered {reply}",
                                   alive=reply.code != 421)
        # Anything the server sent after its 220 was sent in the clear and
        # would be taken as TLS-protected: refuse it (STARTTLS injection).
        if self.pending or self.parser.pending or self.garbled is not None:
            self.broken = True
            raise _HandshakeFailed(TLS_NEGOTIATION_FAILED, Stage.STARTTLS,
                                   "plain-text data after the STARTTLS go-ahead")
        sni = None if _is_ip(self.hop.host) else self.hop.host.rstrip(".")
        try:
            loop = asyncio.get_running_loop()
            self.wire.transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self.wire, ctx, server_hostname=sni,
                               ssl_handshake_timeout=t), t + 1)
        except ssl.SSLCertVerificationError as exc:
            code = getattr(exc, "verify_code", None)
            reply = {_X509_EXPIRED: CERT_EXPIRED,
                     _X509_NOT_YET_VALID: CERT_NOT_YET_VALID}.get(code, CERT_UNTRUSTED)
            raise _HandshakeFailed(reply, Stage.TLS_HANDSHAKE,
                                   getattr(exc, "verify_message", None) or str(exc),
                                   cert_failure=True) from None
        except asyncio.TimeoutError:
            raise _HandshakeFailed(TLS_NEGOTIATION_FAILED, Stage.TLS_HANDSHAKE,
                                   f"no TLS handshake within {t:g} s (EHLO_Timeout)") from None
        except (ssl.SSLError, OSError, EOFError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc):
                detail = f"no TLS handshake within {t:g} s (EHLO_Timeout)"
            raise _HandshakeFailed(TLS_NEGOTIATION_FAILED, Stage.TLS_HANDSHAKE, detail) from None
        sslobj = self.transport.get_extra_info("ssl_object")
        cipher = sslobj.cipher() if sslobj is not None else None
        self.tls_info = {"version": sslobj.version() if sslobj is not None else None,
                         "cipher": cipher[0] if cipher else None,
                         "verified": ctx.verify_mode == ssl.CERT_REQUIRED,
                         "client_cert": bool(self.tls.cert), "matched": None,
                         "sts": self.tls.sts}

    async def _greet(self) -> None:
        if self.lmtp:
            verb = "LHLO"
        else:
            verb = "EHLO" if self.esmtp else "HELO"
        self._write(f"{verb} {self.helo_name}\r\n".encode())
        await self._drain(self.timeouts.ehlo, Stage.EHLO)
        reply = await self._reply(self.timeouts.ehlo, Stage.EHLO)
        if reply.code == 250:
            self.extensions = parse_ehlo(reply) if verb != "HELO" else {}
            return
        if verb == "EHLO" and reply.code >= 500:
            # RFC 5321 §4.1.4: fall back to HELO when EHLO is not understood.
            self._write(f"HELO {self.helo_name}\r\n".encode())
            await self._drain(self.timeouts.ehlo, Stage.EHLO)
            reply = await self._reply(self.timeouts.ehlo, Stage.EHLO)
            if reply.code == 250:
                self.extensions = {}
                return
        self.broken = True
        raise DeliveryError(reply, Stage.EHLO, True)

    def _timeout_for(self, stage: int) -> float:
        t = self.timeouts
        if stage == Stage.RCPT:
            return t.rcptto
        if stage in (Stage.BODY, Stage.CONFIRMATION):
            return t.body
        if stage == Stage.RSET:
            return t.rset
        return t.mailfrom  # MAIL, and DATA's 354 per D14

    # -- XCLIENT (spec §8, D10) --------------------------------------------------
    def _xclient_advertised(self) -> list[str]:
        if "XCLIENT" not in self.extensions:
            return []
        offered = {a.upper() for a in self.extensions["XCLIENT"].split()}
        return [a for a in XCLIENT_ATTRIBUTES if a in offered]

    async def _reopen(self) -> None:
        """A fresh session (the peer no longer lets this one change identity)."""
        await self.quit()
        self._reset()
        try:
            await self.open()
        except DeliveryError:
            self.close()   # never hand a half-open session back to the scheduler
            raise

    async def _xclient(self, facts: ClientFacts) -> None:
        """XCLIENT for the client that injected the next message; raises
        DeliveryError when the message cannot go (``required``, or a broken
        session)."""
        for attempt in range(2):
            advertised = self._xclient_advertised()
            if not advertised:
                if self.xclient_identity == facts:
                    return  # the session already speaks for this client
                if self.xclient_identity is not None and attempt == 0:
                    # it speaks for another client and can no longer switch
                    await self._reopen()
                    continue
                if self.xclient_mode == "required":
                    raise DeliveryError(XCLIENT_NOT_ADVERTISED, Stage.XCLIENT, True)
                return  # ifavailable: without XCLIENT
            t = self.timeouts.ehlo
            try:
                self._write(xclient(facts.attributes(advertised)))
                await self._drain(t, Stage.XCLIENT)
                reply = await self._reply(t, Stage.XCLIENT)
            except DeliveryError as exc:
                self.broken = True
                if exc.reply is CLOSED_BY_REMOTE:
                    raise DeliveryError(SEND_XCLIENT_FAILED, Stage.XCLIENT, True) from None
                raise
            if 200 <= reply.code < 300:
                self.xclient_identity = facts
                self.extensions = {}
                try:
                    await self._greet()
                except DeliveryError as exc:
                    raise DeliveryError(exc.reply, Stage.AFTER_XCLIENT, True) from None
                return
            if reply.code == 421:
                self.broken = True
                raise DeliveryError(reply, Stage.XCLIENT, True)
            self._note(f"XCLIENT refused: {reply}")
            if self.xclient_identity is not None and self.xclient_identity != facts:
                if attempt == 0:
                    await self._reopen()
                    continue
                self.broken = True
                raise DeliveryError(SEND_XCLIENT_FAILED, Stage.XCLIENT, True)
            if self.xclient_mode == "required":
                raise DeliveryError(SEND_XCLIENT_FAILED, Stage.XCLIENT, True)
            return  # ifavailable: the refused command changed nothing; send without

    async def send(self, sender: str, rcpts: list[str], body: bytes, *, body_8bit: bool = False,
                   smtputf8: bool = False, client: ClientFacts | None = None,
                   crlf_clean: bool = False) -> list[RcptResult]:
        """One transaction, driven by the sans-I/O ``Transaction``.

        Returns one result per recipient, in order. A connection failure in
        the middle gives every recipient without an outcome the internal
        reply for that stage, and marks the connection broken.  ``client``:
        the injecting client, for XCLIENT. ``crlf_clean``: ``body`` is known
        to have no bare CR/LF (a spooled body): it is not scanned for them.
        """
        if self.uses_xclient:
            try:
                await self._xclient(client or ClientFacts())
            except DeliveryError as exc:
                return [RcptResult(exc.reply, int(exc.stage)) for _ in rcpts]
        ext = self.extensions
        tx = Transaction(sender, rcpts, pipelining="PIPELINING" in ext, lmtp=self.lmtp,
                         size=len(body) if "SIZE" in ext else None,
                         body_8bit=body_8bit and "8BITMIME" in ext,
                         smtputf8=smtputf8 and "SMTPUTF8" in ext)
        out = tx.begin()
        try:
            while True:
                if out:
                    self._write(out)
                    await self._drain(self._timeout_for(tx.stage), tx.stage)
                if tx.done:
                    break
                if tx.wants_body:
                    self._write(dot_stuff(body, crlf_clean))
                    tx.body_sent()
                    await self._drain(self.timeouts.body, Stage.BODY)
                    out = b""
                    continue
                stage = tx.stage
                out = tx.feed(await self._reply(self._timeout_for(stage), stage))
        except DeliveryError as exc:
            tx.abort(exc.reply, exc.stage)
        if not tx.connection_usable:
            self.broken = True
        self.rcpts_sent += len(rcpts)
        self.deliveries += len(tx.delivered)
        return [RcptResult(o.reply, int(o.stage)) for o in tx.outcomes]

    async def quit(self) -> None:
        if self.transport is None:
            return
        try:
            if not self.broken:
                self._write(b"QUIT\r\n")
                await self._drain(5, Stage.IDLE)
                await self._reply(5, Stage.IDLE)
        except (DeliveryError, asyncio.TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()
        self.wire = None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False
