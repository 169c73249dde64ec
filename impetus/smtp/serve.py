"""asyncio glue around :class:`impetus.smtp.server.ServerConnection`.

``await start_server(host, port, settings, policy_factory, on_message)``
returns an ``asyncio.Server``.  For each connection:

* ``policy_factory()`` (no arguments; ``None`` = accept everything) makes the
  policy object for the core; the :class:`~impetus.smtp.server.Session` is
  passed to each of its calls.
* bytes are fed to the core and its ``Send`` events written (one write per
  received chunk);
* on ``MessageReady`` reading is paused and ``on_message(envelope, session)``
  is called.  It may be a coroutine function (awaited in a task), a plain
  function (called inline, no task: the fast path used by the sink), or a
  plain function returning an ``asyncio.Future`` (a done-callback, no task:
  the listener's path, answered when the spool commit is done).  It
  returns a ``Reply`` (SMTP) or a list of Replies (LMTP, one per recipient;
  a single Reply is repeated).  An exception, or a result of the wrong
  shape, is logged and answered ``451 4.3.0 Internal error``;
* reading is also paused while the transport's write buffer is above its
  high-water mark;
* an idle connection (no input for ``idle_timeout`` seconds while we are not
  processing a message) gets ``421 4.4.2 <hostname> Error: timeout exceeded``
  and is closed.

Pass a set as ``connections`` to track live :class:`SMTPServerProtocol`
objects, e.g. to ``shutdown()`` them all on exit.

TLS:

* STARTTLS is offered when ``settings.tls_context`` is set: on the core's
  ``StartTLS`` event reading stops at once (the next bytes are the client's
  handshake), the transport is upgraded with ``loop.start_tls(...,
  server_side=True)`` and :meth:`ServerConnection.tls_started` is called
  with :func:`tls_info`.  A failed handshake closes the connection.
* Implicit TLS (``Use_SSL``): ``start_server(..., ssl=context)``; the
  session is marked TLS (``session.tls``, ``tls_info``) before the banner.
* Client certificates are the context's business (``verify_mode`` =
  ``CERT_OPTIONAL``/``CERT_REQUIRED`` plus the client CAs);
  ``session.tls_peer_verified`` tells whether one was presented and verified.

Concurrency: ``start_server(..., max_sessions=N)`` caps this server's live
sessions; ``sessions_counter=SessionCounter(limit=M)`` shared by several
servers caps their total (``Service_Sessions``).  When either is full the
new connection gets ``421 4.4.5 Service unavailable, concurrency limit
reached`` (reported to ``policy.on_reject``, phase ``connect``) and is
closed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os

from .reply import Reply
from .server import (AuthCheck, Close, MessageReady, Send, ServerConnection, ServerSettings, Session,
                     StartTLS)

__all__ = ["start_server", "start_unix_server", "SMTPServerProtocol", "SessionCounter",
           "tls_info", "INTERNAL_ERROR", "CONCURRENCY_LIMIT"]

log = logging.getLogger("impetus.smtp")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")
CONCURRENCY_LIMIT = Reply(421, "4.4.5", "Service unavailable, concurrency limit reached")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")

_conn_ids = itertools.count(1)
_pid_tag = f"{os.getpid():x}"


class SessionCounter:
    """Live sessions of one or several servers, with an optional cap
    (``limit``; 0 = none).  Pass the same object to several
    ``start_server`` calls to share it."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int = 0) -> None:
        self.active = 0
        self.limit = limit

    @property
    def full(self) -> bool:
        return bool(self.limit) and self.active >= self.limit

    def __repr__(self):
        return f"SessionCounter(active={self.active}, limit={self.limit})"


_RDN_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
              "domainComponent": "DC", "emailAddress": "emailAddress"}


def tls_info(transport) -> dict:
    """What a TLS transport tells about the session: ``version``,
    ``cipher``, ``bits``, ``peer_cert`` (the client sent a certificate),
    ``peer_subject`` (``"CN=...,O=..."`` of a verified one, else None) and
    ``verified``.  ``{}`` for a plain transport."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return {}
    cipher = sslobj.cipher() or (None, None, None)
    try:
        cert = sslobj.getpeercert()
        der = sslobj.getpeercert(binary_form=True)
    except (ValueError, AttributeError):  # pragma: no cover - handshake not done
        cert = der = None
    subject = None
    if cert:
        subject = ",".join(f"{_RDN_SHORT.get(k, k)}={v}"
                           for rdn in cert.get("subject", ()) for k, v in rdn) or None
    return {"version": sslobj.version(), "cipher": cipher[0], "bits": cipher[2],
            "peer_cert": der is not None, "peer_subject": subject, "verified": bool(cert)}


class SMTPServerProtocol(asyncio.Protocol):
    """One SMTP/LMTP server connection."""

    def __init__(self, settings: ServerSettings, policy_factory, on_message, *,
                 idle_timeout: float | None = 300, connections: set | None = None,
                 counters=(), tls_context=None, tls_handshake_timeout: float = 60.0) -> None:
        self.settings = settings
        self.policy_factory = policy_factory
        self.on_message = on_message
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.connections = connections
        self.counters = tuple(counters)
        self.tls_context = tls_context if tls_context is not None else settings.tls_context
        self.tls_handshake_timeout = tls_handshake_timeout
        self.tls_task: asyncio.Task | None = None
        self._tls_pending = False
        self._tls_early = bytearray()
        self._counted = False
        self._lost = False
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.session: Session | None = None
        self.task: asyncio.Task | None = None
        self._loop = None
        self._reading = True
        self._write_paused = False
        self._processing = False
        self._eof = False
        self._timer = None
        self._last = 0.0
        self._pending_shutdown: Reply | None = None

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        sess = Session(conn_id=f"{_pid_tag}.{next(_conn_ids):x}")
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple) and len(peer) >= 2:
            sess.peer_ip, sess.peer_port = str(peer[0]), int(peer[1])
        if isinstance(local, tuple) and len(local) >= 2:
            sess.local_ip, sess.local_port = str(local[0]), int(local[1])
        if transport.get_extra_info("ssl_object") is not None:   # implicit TLS
            sess.set_tls(tls_info(transport))
        self.session = sess
        full = any(c.full for c in self.counters)
        if not full:
            for c in self.counters:
                c.active += 1
            self._counted = True
        try:
            policy = self.policy_factory() if self.policy_factory is not None else None
        except Exception:
            log.exception("policy factory failed")
            transport.write(Reply(421, "4.3.0", f"{self.settings.hostname} internal error").to_bytes())
            transport.close()
            return
        self.conn = ServerConnection(self.settings, policy, sess)
        if self.tls_context is None:
            self.conn.tls_available = False
        if full:
            self._handle(self.conn.refuse(CONCURRENCY_LIMIT, "concurrency limit"))
            return
        if self.connections is not None:
            self.connections.add(self)
        self._last = self._loop.time()
        if self.idle_timeout:
            self._timer = self._loop.call_later(self.idle_timeout, self._check_idle)
        self._handle(self.conn.start())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self._tls_pending:
            # Only the TLS layer can call us now (the plain transport was
            # paused at STARTTLS): these bytes came over TLS right after the
            # handshake, before start_tls() returned.  Keep them for later.
            self._tls_early += data
            return
        self._last = self._loop.time()
        self._handle(conn.feed(data))

    def eof_received(self):
        self._eof = True
        if self._processing:
            # Answer the message in flight (and any QUIT behind it) first.
            return True
        return None

    def connection_lost(self, exc) -> None:
        if self._lost:
            return
        self._lost = True
        if self.conn is not None:
            self.conn.connection_lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connections is not None:
            self.connections.discard(self)
        if self._counted:
            self._counted = False
            for c in self.counters:
                c.active -= 1
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- public ------------------------------------------------------------
    def shutdown(self, reply: Reply | None = None) -> None:
        """Close with ``reply`` (default ``421 4.3.2``), after the message in
        flight (if any) has been answered."""
        if self.conn is None or self.transport is None:
            return
        if self._tls_pending:
            # Mid-handshake: no way to say anything to the client.
            self.transport.abort()
            return
        if self._processing:
            self._pending_shutdown = reply or SHUTDOWN
            return
        self._handle(self.conn.abort(reply or SHUTDOWN, "shutdown"))

    # -- internals ---------------------------------------------------------
    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._tls_pending:
            return
        want = not (self._write_paused or self._processing)
        if want != self._reading:
            self._reading = want
            if want:
                t.resume_reading()
            else:
                t.pause_reading()

    def _check_idle(self) -> None:
        self._timer = None
        if self.transport is None or self.conn is None or self.conn.closed:
            return
        now = self._loop.time()
        if self._processing or self._tls_pending:   # the handshake has its own timeout
            remaining = self.idle_timeout
        else:
            remaining = self._last + self.idle_timeout - now
            if remaining <= 0:
                self._handle(self.conn.timeout())
                return
        self._timer = self._loop.call_later(remaining, self._check_idle)

    def _handle(self, events) -> None:
        while events:
            nxt = None
            for ev in events:
                t = type(ev)
                if t is Send:
                    if self.transport is not None:
                        self.transport.write(ev.data)
                elif t is MessageReady:
                    nxt = self._message(ev.envelope)
                elif t is Close:
                    if self.transport is not None:
                        self.transport.close()
                elif t is StartTLS:
                    self._start_tls()
                elif t is AuthCheck:
                    self._processing = True
                    self._update_reading()
                    self.task = self._loop.create_task(self._await_auth(ev.awaitable))
            events = nxt
        if self._eof and not self._processing and self.transport is not None:
            self.transport.close()

    def _start_tls(self) -> None:
        raw = self.transport
        if raw is None or raw.is_closing():
            return
        self._tls_pending = True
        # Stop reading now: the next bytes are the client's TLS handshake and
        # belong to the TLS layer (plaintext already read was dropped by the core).
        raw.pause_reading()
        self._reading = False
        self.tls_task = self._loop.create_task(self._upgrade(raw))

    async def _upgrade(self, raw) -> None:
        try:
            new = await self._loop.start_tls(raw, self, self.tls_context, server_side=True,
                                             ssl_handshake_timeout=self.tls_handshake_timeout)
        except asyncio.CancelledError:
            raw.abort()
            self._tls_pending = False
            self.connection_lost(None)
            raise
        except Exception as exc:
            log.info("STARTTLS handshake failed (session %s): %s",
                     self.session.conn_id if self.session else "?", exc or type(exc).__name__)
            new = None
        self.tls_task = None
        self._tls_pending = False
        if new is None or self._lost:
            if not raw.is_closing():
                raw.abort()
            self.connection_lost(None)
            return
        self.transport = new
        self._reading = True
        self._write_paused = False
        self._last = self._loop.time()
        self._handle(self.conn.tls_started(tls_info(new)))
        if self._tls_early:
            early = bytes(self._tls_early)
            self._tls_early.clear()
            self.data_received(early)

    async def _await_auth(self, awaitable) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if self.transport is not None:
                self.transport.abort()
            raise
        except Exception:
            log.error("check_auth failed (session %s)", self.session.conn_id, exc_info=True)
            result = AUTH_TEMPFAIL
        self.task = None
        self._processing = False
        conn = self.conn
        if conn.closed:
            return
        events = conn.auth_done(result)
        self._last = self._loop.time()
        if self._pending_shutdown is not None and not conn.awaiting_message_done:
            events = events + conn.abort(self._pending_shutdown, "shutdown")
            self._pending_shutdown = None
        if not conn.awaiting_message_done:
            self._update_reading()
        self._handle(events)

    def _message(self, envelope):
        """Run on_message; returns the core's next events when it finished
        synchronously, else None (the done-callback carries on)."""
        self._processing = True
        try:
            result = self.on_message(envelope, self.session)
        except Exception:
            log.exception("on_message failed (session %s)", self.session.conn_id)
            result = INTERNAL_ERROR
        if inspect.isawaitable(result):
            self._update_reading()   # pause until the reply is known
            # A plain future (the listener's fast path) gets a callback and
            # no Task; a coroutine is wrapped in one (kept referenced here).
            fut = asyncio.ensure_future(result, loop=self._loop)
            if isinstance(fut, asyncio.Task):
                self.task = fut
            fut.add_done_callback(self._message_done)
            return None
        return self._done(result)

    def _message_done(self, fut: asyncio.Future) -> None:
        self.task = None
        if fut.cancelled():
            if self.transport is not None:
                self.transport.abort()
            return
        exc = fut.exception()
        if exc is not None:
            log.error("on_message failed (session %s)", self.session.conn_id, exc_info=exc)
            result = INTERNAL_ERROR
        else:
            result = fut.result()
        self._handle(self._done(result))

    def _done(self, result):
        self._processing = False
        conn = self.conn
        if conn.closed:
            return None
        try:
            events = conn.message_done(result)
        except (ValueError, TypeError):
            log.error("on_message returned %r; answering 451 (session %s)",
                      result, self.session.conn_id)
            events = conn.message_done(INTERNAL_ERROR)
        self._last = self._loop.time()
        if self._pending_shutdown is not None and not conn.awaiting_message_done:
            events = events + conn.abort(self._pending_shutdown, "shutdown")
            self._pending_shutdown = None
        if not conn.awaiting_message_done:
            self._update_reading()
        return events


def _counters(max_sessions: int, sessions_counter: SessionCounter | None) -> tuple:
    out = []
    if max_sessions and max_sessions > 0:
        out.append(SessionCounter(max_sessions))
    if sessions_counter is not None:
        out.append(sessions_counter)
    return tuple(out)


async def start_server(host, port, settings: ServerSettings, policy_factory, on_message, *,
                       sock=None, idle_timeout: float | None = 300, backlog: int = 500,
                       reuse_port: bool | None = None, connections: set | None = None,
                       ssl=None, max_sessions: int = 0,
                       sessions_counter: SessionCounter | None = None,
                       tls_handshake_timeout: float = 60.0) -> asyncio.AbstractServer:
    """Listen on ``host:port`` (or an already bound ``sock``) and serve SMTP
    or LMTP (``settings.lmtp``).  ``ssl``: implicit TLS; STARTTLS uses
    ``settings.tls_context``.  ``max_sessions``/``sessions_counter``: see
    the module docstring."""
    loop = asyncio.get_running_loop()
    counters = _counters(max_sessions, sessions_counter)

    def factory():
        return SMTPServerProtocol(settings, policy_factory, on_message,
                                  idle_timeout=idle_timeout, connections=connections,
                                  counters=counters, tls_handshake_timeout=tls_handshake_timeout)

    hs = {"ssl_handshake_timeout": tls_handshake_timeout} if ssl is not None else {}
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog, ssl=ssl, **hs)
    return await loop.create_server(factory, host, port, backlog=backlog,
                                    reuse_port=reuse_port, ssl=ssl, **hs)


async def start_unix_server(path: str, settings: ServerSettings, policy_factory, on_message, *,
                            idle_timeout: float | None = 300, backlog: int = 500,
                            connections: set | None = None, max_sessions: int = 0,
                            sessions_counter: SessionCounter | None = None,
                            tls_handshake_timeout: float = 60.0) -> asyncio.AbstractServer:
    """Same over a Unix-domain socket at ``path``."""
    loop = asyncio.get_running_loop()
    counters = _counters(max_sessions, sessions_counter)

    def factory():
        return SMTPServerProtocol(settings, policy_factory, on_message,
                                  idle_timeout=idle_timeout, connections=connections,
                                  counters=counters, tls_handshake_timeout=tls_handshake_timeout)

    return await loop.create_unix_server(factory, path, backlog=backlog)
