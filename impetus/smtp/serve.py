"""asyncio glue around :class:`impetus.smtp.server.ServerConnection`.

``await start_server(host, port, settings, policy_factory, on_message)``
returns an ``asyncio.Server``.  For each connection:

* ``policy_factory()`` (no arguments; ``None`` = accept everything) makes the
  policy object for the core; the :class:`~impetus.smtp.server.Session` is
  passed to each of its calls.
* bytes are fed to the core and its ``Send`` events written (one write per
  received chunk);
* on ``MessageReady`` reading is paused and ``on_message(envelope, session)``
  is called.  It may be a coroutine function (awaited in a task) or a plain
  function (called inline, no task: the fast path used by the sink).  It
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
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os

from .reply import Reply
from .server import Close, MessageReady, Send, ServerConnection, ServerSettings, Session

__all__ = ["start_server", "start_unix_server", "SMTPServerProtocol", "INTERNAL_ERROR"]

log = logging.getLogger("impetus.smtp")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")

_conn_ids = itertools.count(1)
_pid_tag = f"{os.getpid():x}"


class SMTPServerProtocol(asyncio.Protocol):
    """One SMTP/LMTP server connection."""

    def __init__(self, settings: ServerSettings, policy_factory, on_message, *,
                 idle_timeout: float | None = 300, connections: set | None = None) -> None:
        self.settings = settings
        self.policy_factory = policy_factory
        self.on_message = on_message
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.connections = connections
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
        self.session = sess
        try:
            policy = self.policy_factory() if self.policy_factory is not None else None
        except Exception:
            log.exception("policy factory failed")
            transport.write(Reply(421, "4.3.0", f"{self.settings.hostname} internal error").to_bytes())
            transport.close()
            return
        self.conn = ServerConnection(self.settings, policy, sess)
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
        self._last = self._loop.time()
        self._handle(conn.feed(data))

    def eof_received(self):
        self._eof = True
        if self._processing:
            # Answer the message in flight (and any QUIT behind it) first.
            return True
        return None

    def connection_lost(self, exc) -> None:
        if self.conn is not None:
            self.conn.connection_lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connections is not None:
            self.connections.discard(self)
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
        if self._processing:
            self._pending_shutdown = reply or SHUTDOWN
            return
        self._handle(self.conn.abort(reply or SHUTDOWN, "shutdown"))

    # -- internals ---------------------------------------------------------
    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
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
        if self._processing:
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
            events = nxt
        if self._eof and not self._processing and self.transport is not None:
            self.transport.close()

    def _message(self, envelope):
        """Run on_message; returns the core's next events when it finished
        synchronously, else None (a task will carry on)."""
        self._processing = True
        try:
            result = self.on_message(envelope, self.session)
        except Exception:
            log.exception("on_message failed (session %s)", self.session.conn_id)
            result = INTERNAL_ERROR
        if inspect.isawaitable(result):
            self._update_reading()   # pause until the reply is known
            self.task = self._loop.create_task(self._await_message(result))
            return None
        return self._done(result)

    async def _await_message(self, awaitable) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if self.transport is not None:
                self.transport.abort()
            raise
        except Exception:
            log.exception("on_message failed (session %s)", self.session.conn_id)
            result = INTERNAL_ERROR
        self.task = None
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


async def start_server(host, port, settings: ServerSettings, policy_factory, on_message, *,
                       sock=None, idle_timeout: float | None = 300, backlog: int = 500,
                       reuse_port: bool | None = None, connections: set | None = None,
                       ssl=None) -> asyncio.AbstractServer:
    """Listen on ``host:port`` (or an already bound ``sock``) and serve SMTP
    or LMTP (``settings.lmtp``)."""
    loop = asyncio.get_running_loop()

    def factory():
        return SMTPServerProtocol(settings, policy_factory, on_message,
                                  idle_timeout=idle_timeout, connections=connections)

    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog, ssl=ssl)
    return await loop.create_server(factory, host, port, backlog=backlog,
                                    reuse_port=reuse_port, ssl=ssl)


async def start_unix_server(path: str, settings: ServerSettings, policy_factory, on_message, *,
                            idle_timeout: float | None = 300, backlog: int = 500,
                            connections: set | None = None) -> asyncio.AbstractServer:
    """Same over a Unix-domain socket at ``path``."""
    loop = asyncio.get_running_loop()

    def factory():
        return SMTPServerProtocol(settings, policy_factory, on_message,
                                  idle_timeout=idle_timeout, connections=connections)

    return await loop.create_unix_server(factory, path, backlog=backlog)
