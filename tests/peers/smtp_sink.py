"""Recording SMTP sink (aiosmtpd) running in a background thread.

Recipe: /work/shared/testing/test-peers.md §3b (XCLIENT with Postfix
semantics, PIPELINING/ENHANCEDSTATUSCODES advertised, per-recipient replies,
MAIL/DATA replies, delays, optional STARTTLS), started with
``loop.create_server`` on its own event loop in its own thread so it serves
sync tests, async tests and ``impetus serve`` subprocesses alike.

One :class:`SmtpSink` listens on several loopback addresses with the same
port (the first host binds port 0, the others reuse that port), so the MTA
needs a single ``Remote_SMTP_Port`` for MX hosts on 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time

from aiosmtpd.smtp import SMTP, syntax

log = logging.getLogger("tests.peers.smtp_sink")


def xtext_decode(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "+" and i + 3 <= len(s):
            try:
                out.append(chr(int(s[i + 1:i + 3], 16)))
                i += 3
                continue
            except ValueError:
                pass
        out.append(s[i])
        i += 1
    return "".join(out)


DEFAULT_EHLO_EXTRA = ("PIPELINING", "ENHANCEDSTATUSCODES", "XCLIENT ADDR NAME HELO PROTO LOGIN PORT")


class RecordingSMTP(SMTP):
    """aiosmtpd SMTP + XCLIENT (Postfix semantics: new 220 greeting, the
    client must EHLO again) + connection accounting + command log."""

    def __init__(self, handler, sink: "SmtpSink", **kw):
        super().__init__(handler, **kw)
        self._sink = sink
        self._counted = False
        self._in_data = False
        self._record: dict | None = None

    # --------------------------------------------------- connection tracking
    def connection_made(self, transport):
        first = not self._counted
        super().connection_made(transport)
        if first:
            self._counted = True
            self._record = {
                "peer": transport.get_extra_info("peername"),
                "sockname": transport.get_extra_info("sockname"),
                "commands": [], "helo": None, "tls": None, "xclient": None,
                "opened": time.time(), "closed": None,
            }
            self._sink._connection_opened(self, self._record)
            reader = self._reader
            orig = reader.readuntil

            async def readuntil(separator=b"\n"):
                line = await orig(separator)
                self._log_line(line)
                return line
            reader.readuntil = readuntil   # see every client line (commands only)

    def connection_lost(self, error):
        if self._counted and self._record is not None and self._record["closed"] is None:
            self._record["closed"] = time.time()
            self._sink._connection_closed(self)
        super().connection_lost(error)

    def _log_line(self, line: bytes) -> None:
        if self._in_data:
            if line in (b".\r\n", b".\n"):
                self._in_data = False
            return
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        self._sink._append_command(self._record, text)

    async def push(self, status):
        s = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if s.startswith("354"):
            self._in_data = True
        await super().push(status)
        if s.startswith("421") and self._sink.close_on_421 and self.transport is not None:
            self.transport.close()

    # --------------------------------------------------------------- XCLIENT
    @syntax("XCLIENT attribute=value ...")
    async def smtp_XCLIENT(self, arg):
        if not arg:
            await self.push("501 5.5.4 Syntax: XCLIENT attribute=value ...")
            return
        attrs = {}
        for item in arg.split():
            k, _, v = item.partition("=")
            attrs[k.upper()] = xtext_decode(v)
        self.session.xclient = attrs
        if self._record is not None:
            self._record["xclient"] = attrs
        self._set_rset_state()
        self.session.host_name = None
        self.session.extended_smtp = False
        await self.push(f"220 {self.hostname} ESMTP (after XCLIENT)")


class RecordingHandler:
    def __init__(self, sink: "SmtpSink", rcpt_replies=None, mail_reply=None, data_reply=None,
                 delays=None, ehlo_extra=DEFAULT_EHLO_EXTRA):
        self.sink = sink
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.delays = dict(delays or {})          # {"MAIL"|"RCPT"|"DATA"|"EHLO": seconds}
        self.ehlo_extra = tuple(ehlo_extra)

    async def _delay(self, cmd):
        d = self.delays.get(cmd)
        if d:
            await asyncio.sleep(d)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        await self._delay("EHLO")
        session.host_name = hostname
        if server._record is not None:
            server._record["helo"] = hostname
            server._record["tls"] = server.transport.get_extra_info("cipher") if server.transport else None
        last = responses.pop()              # '250 HELP'
        responses += [f"250-{kw}" for kw in self.ehlo_extra] + [last]
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        await self._delay("HELO")
        session.host_name = hostname
        if server._record is not None:
            server._record["helo"] = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        await self._delay("MAIL")
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rejected_rcpts = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        await self._delay("RCPT")
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            if not hasattr(envelope, "rejected_rcpts"):
                envelope.rejected_rcpts = []
            envelope.rejected_rcpts.append((address, reply))
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        await self._delay("DATA")
        transport = server.transport
        msg = {
            "peer": session.peer,                 # (client_ip, client_port)
            "sockname": transport.get_extra_info("sockname") if transport else None,
            "helo": session.host_name,
            "tls": transport.get_extra_info("cipher") if transport else None,
            "xclient": getattr(session, "xclient", None),
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "rcpt_options": list(envelope.rcpt_options),
            "rejected_rcpts": list(getattr(envelope, "rejected_rcpts", [])),
            "data": envelope.original_content,
            "received_at": time.time(),
        }
        reply = self.data_reply
        msg["reply"] = reply or "250 2.0.0 Ok: queued"
        if reply is None or reply.startswith("2"):
            self.sink._append_message(msg)
        else:
            self.sink._append_rejected(msg)
        return msg["reply"]


class SmtpSink:
    """A running recording sink.  See module docstring.

    ``messages``: snapshot list of accepted messages (dicts with ``peer``,
    ``sockname``, ``helo``, ``mail_from``, ``mail_options``, ``rcpt_tos``,
    ``rcpt_options``, ``rejected_rcpts``, ``data`` (bytes), ``tls``,
    ``xclient``, ``received_at``).  ``rejected_messages``: same for messages
    whose DATA was refused.  ``sessions``: one dict per connection (``peer``,
    ``sockname``, ``commands`` (client lines outside DATA), ``helo``, ``tls``,
    ``xclient``, ``opened``, ``closed``)."""

    def __init__(self, hosts=("127.0.0.2",), port: int = 0, *, tls_context: ssl.SSLContext | None = None,
                 hostname: str = "mx1.example.test", require_starttls: bool = False,
                 close_on_421: bool = True, rcpt_replies=None, mail_reply=None, data_reply=None,
                 delays=None, ehlo_extra=DEFAULT_EHLO_EXTRA, smtp_kwargs=None):
        if isinstance(hosts, str):
            hosts = (hosts,)
        self.hosts = tuple(hosts)
        self.port = port
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.close_on_421 = close_on_421
        self.smtp_kwargs = dict(smtp_kwargs or {})
        self.handler = RecordingHandler(self, rcpt_replies, mail_reply, data_reply, delays, ehlo_extra)
        self._lock = threading.Lock()
        self._messages: list[dict] = []
        self._rejected: list[dict] = []
        self._sessions: list[dict] = []
        self._protocols: set = set()
        self.connections_now = 0
        self.max_concurrent_connections = 0
        self.connections_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list = []

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> "SmtpSink":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()
        self._thread = threading.Thread(target=run, name=f"smtp-sink-{self.hosts[0]}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("sink event loop did not start")
        try:
            fut = asyncio.run_coroutine_threadsafe(self._bind_all(), self._loop)
            fut.result(timeout)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def _factory(self):
        kw = dict(hostname=self.hostname, tls_context=self.tls_context,
                  require_starttls=self.require_starttls, ident="impetus test sink",
                  loop=self._loop)
        kw.update(self.smtp_kwargs)
        return RecordingSMTP(self.handler, self, **kw)

    async def _bind_all(self):
        loop = asyncio.get_running_loop()
        last = None
        for _ in range(20 if self.port == 0 else 1):
            servers = []
            try:
                first = await loop.create_server(self._factory, host=self.hosts[0], port=self.port)
                servers.append(first)
                port = first.sockets[0].getsockname()[1]
                for h in self.hosts[1:]:
                    servers.append(await loop.create_server(self._factory, host=h, port=port))
            except OSError as e:
                last = e
                for s in servers:
                    s.close()
                continue
            self._servers = servers
            self.port = port
            return
        raise RuntimeError(f"could not bind {self.hosts} on one port: {last}")

    def close(self, timeout: float = 5.0) -> None:
        if self._loop is None or self._loop.is_closed():
            return

        async def shutdown():
            for s in self._servers:
                s.close()
            for p in list(self._protocols):
                if p.transport is not None:
                    p.transport.abort() if hasattr(p.transport, "abort") else p.transport.close()
            for s in self._servers:
                try:
                    await asyncio.wait_for(s.wait_closed(), 2)
                except (asyncio.TimeoutError, Exception):
                    pass
            await asyncio.sleep(0)
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        except Exception as e:   # never hang a test teardown
            log.warning("sink shutdown: %r", e)
        self._stop_loop()

    def _stop_loop(self):
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            # cancel leftovers (handler coroutines of aborted connections)
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            except Exception:
                pass
            loop.close()

    def __enter__(self):
        return self.start() if not self._servers else self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ recording
    def _connection_opened(self, proto, record):
        with self._lock:
            self._protocols.add(proto)
            self._sessions.append(record)
            self.connections_total += 1
            self.connections_now += 1
            self.max_concurrent_connections = max(self.max_concurrent_connections, self.connections_now)

    def _connection_closed(self, proto):
        with self._lock:
            self._protocols.discard(proto)
            self.connections_now -= 1

    def _append_command(self, record, text):
        if record is not None:
            with self._lock:
                record["commands"].append(text)

    def _append_message(self, msg):
        with self._lock:
            self._messages.append(msg)

    def _append_rejected(self, msg):
        with self._lock:
            self._rejected.append(msg)

    @property
    def messages(self) -> list[dict]:
        with self._lock:
            return list(self._messages)

    @property
    def rejected_messages(self) -> list[dict]:
        with self._lock:
            return list(self._rejected)

    @property
    def sessions(self) -> list[dict]:
        with self._lock:
            return [dict(s, commands=list(s["commands"])) for s in self._sessions]

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._rejected.clear()
            self._sessions = [s for s in self._sessions if s["closed"] is None]
            self.max_concurrent_connections = self.connections_now

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[dict]:
        """Wait until at least ``n`` messages were accepted; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                rcpts = [m["rcpt_tos"] for m in msgs]
                sess = self.sessions[-5:]
                raise AssertionError(
                    f"sink on {self.hosts} port {self.port}: expected {n} message(s) within "
                    f"{timeout}s, got {len(msgs)} (recipients {rcpts}); "
                    f"{self.connections_total} connection(s) so far; last sessions: "
                    + "; ".join(f"{s['peer']} {s['commands']}" for s in sess))
            time.sleep(0.02)

    def wait_for_sessions(self, n: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(s := self.sessions) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(f"sink on {self.hosts}:{self.port}: expected {n} connection(s) "
                                     f"within {timeout}s, got {len(s)}")
            time.sleep(0.02)
        return s

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no client connection is open."""
        deadline = time.monotonic() + timeout
        while self.connections_now:
            if time.monotonic() >= deadline:
                raise AssertionError(f"sink on {self.hosts}:{self.port}: still "
                                     f"{self.connections_now} open connection(s) after {timeout}s")
            time.sleep(0.01)

    def rcpts(self) -> list[str]:
        """All accepted recipients, over all messages."""
        return [r for m in self.messages for r in m["rcpt_tos"]]

    # ------------------------------------------------------------ behaviour
    def set_rcpt_reply(self, addr: str, reply: str | None) -> None:
        """``reply`` like ``"550 5.1.1 No such user"``; None restores 250."""
        if reply is None:
            self.handler.rcpt_replies.pop(addr.lower(), None)
        else:
            self.handler.rcpt_replies[addr.lower()] = reply

    def set_mail_reply(self, reply: str | None) -> None:
        self.handler.mail_reply = reply

    def set_data_reply(self, reply: str | None) -> None:
        self.handler.data_reply = reply

    def set_delay(self, command: str, seconds: float | None) -> None:
        """Delay the reply to EHLO/HELO/MAIL/RCPT/DATA (end of data)."""
        if seconds:
            self.handler.delays[command.upper()] = seconds
        else:
            self.handler.delays.pop(command.upper(), None)

    def address(self, i: int = 0) -> tuple[str, int]:
        return self.hosts[i], self.port


def make_server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def is_listening(host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


__all__ = ["SmtpSink", "RecordingSMTP", "RecordingHandler", "make_server_tls_context", "xtext_decode"]
