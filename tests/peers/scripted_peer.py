"""A scripted, faulty SMTP peer for the remote-faults matrix (issue 8).

One :class:`ScriptedPeer` listens on one port on several loopback addresses
(127.0.0.x, 127.0.1.x, ...). Each address is a *cell* with its own script:
at one SMTP stage it applies one fault, everywhere else it is a well
behaved, recording SMTP server. Faults can be armed and lifted while the
peer runs (from any thread).

Stages (``STAGES``)::

    banner    instead of the 220 greeting
    ehlo      the reply to EHLO *and* to HELO (so a 5xx also hits the
              RFC 5321 HELO fallback)
    starttls  the reply to STARTTLS (advertised only when ``starttls``)
    mail      the reply to MAIL FROM
    rcpt      the reply to RCPT TO
    data      the reply to DATA (instead of 354)
    body      while the body is being received: after the first chunk of
              the body (see below)
    final     the reply after ``CRLF.CRLF``

Actions (``ACTIONS``)::

    close     close the connection instead of answering
    hang      never answer (keep reading and discarding until the client
              gives up); at ``body``: stop reading altogether, so the
              client's writes block
    4xx       answer ``451 4.3.0 scripted <stage> 4xx`` (banner: ``421``)
    5xx       answer ``554 5.7.1 scripted <stage> 5xx`` (rcpt: ``550 5.1.1``)
    garbage   answer bytes that are no SMTP reply

At ``body``, ``4xx``/``5xx``/``garbage`` are *premature* replies: sent after
the first chunk of the body while the client is still writing; the peer then
keeps reading to the end of the data and sends nothing more for that
message, so the client reads the premature reply when it waits for the
final one. ``close`` at ``body`` closes with unread data (the client sees a
reset while writing).

Every connection's commands are kept in ``cell.sessions``; a message counts
as accepted (``cell.accepted``) only when the peer itself answered ``250``
after the body, so "delivered twice" means two ``250`` replies for it.
With a small ``rcvbuf`` (the default, 32 KiB) a body of a few MB keeps the
client in the "sending body" stage when a body fault strikes.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

STAGES = ("banner", "ehlo", "starttls", "mail", "rcpt", "data", "body", "final")
ACTIONS = ("close", "hang", "4xx", "5xx", "garbage")

GARBAGE = b"\x00\xffGARBAGE-NOT-SMTP \x80\x81 {junk}\r\n"


def fault_reply(stage: str, action: str) -> bytes:
    """The bytes a cell sends for a reply-type fault."""
    if action == "4xx":
        code = "421 4.3.2" if stage == "banner" else "451 4.3.0"
        return f"{code} scripted {stage} 4xx\r\n".encode()
    if action == "5xx":
        code = "550 5.1.1" if stage == "rcpt" else "554 5.7.1"
        return f"{code} scripted {stage} 5xx\r\n".encode()
    if action == "garbage":
        return GARBAGE
    raise ValueError(action)


def fault_text(stage: str, action: str) -> str:
    """How Impetus logs a reply-type fault (``str(Reply)``)."""
    return fault_reply(stage, action).decode().strip()


@dataclass
class Cell:
    host: str
    stage: str | None = None
    action: str | None = None
    pipelining: bool = True
    starttls: bool = False
    fired: int = 0                       # how many times the fault was applied
    fired_at: list = field(default_factory=list)
    sessions: list = field(default_factory=list)
    accepted: list = field(default_factory=list)

    @property
    def armed(self) -> bool:
        return self.stage is not None and self.action is not None


class _Closed(Exception):
    pass


class _Batching:
    """Replies are held back while more pipelined commands are waiting in
    the input buffer and written together (RFC 2920 §3.2 server behaviour),
    so a client sees one chunk with several replies."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    async def flush(self) -> None:
        if self.pending:
            self.writer.write(b"".join(self.pending))
            self.pending = []
        await self.writer.drain()

    def __getattr__(self, name):
        return getattr(self.writer, name)


def _line_waiting(reader: asyncio.StreamReader) -> bool:
    buf = getattr(reader, "_buffer", b"")  # noqa: SLF001 - what the client pipelined
    return b"\n" in buf


class ScriptedPeer:
    """See module docstring. ``start()``/``close()``; use from any thread."""

    def __init__(self, hosts, port: int = 0, *, hostname: str = "scripted.test",
                 tls_context: ssl.SSLContext | None = None, rcvbuf: int = 32768,
                 hang_limit: float = 60.0, body_close_delay: float = 0.3):
        self.hosts = tuple(hosts)
        self.port = port
        self.hostname = hostname
        self.tls_context = tls_context
        self.rcvbuf = rcvbuf
        self.hang_limit = hang_limit
        self.body_close_delay = body_close_delay
        self.cells: dict[str, Cell] = {h: Cell(h) for h in self.hosts}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list = []
        self._writers: set = set()
        self._stopping = None

    # ------------------------------------------------------------- control
    def arm(self, host: str, stage: str | None, action: str | None, *,
            pipelining: bool | None = None, starttls: bool | None = None) -> Cell:
        if stage is not None and stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        if action is not None and action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        with self._lock:
            cell = self.cells[host]
            cell.stage, cell.action = stage, action
            if pipelining is not None:
                cell.pipelining = pipelining
            if starttls is not None:
                cell.starttls = starttls
            return cell

    def lift(self, host: str) -> None:
        """Remove the fault: the cell behaves from its next reply on."""
        with self._lock:
            c = self.cells[host]
            c.stage = c.action = None

    def accepted(self, host: str) -> list[dict]:
        with self._lock:
            return list(self.cells[host].accepted)

    def sessions(self, host: str) -> list[dict]:
        with self._lock:
            return [dict(s, commands=list(s["commands"])) for s in self.cells[host].sessions]

    def fired(self, host: str) -> int:
        with self._lock:
            return self.cells[host].fired

    # ----------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> "ScriptedPeer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()
        self._thread = threading.Thread(target=run, name="scripted-peer", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("scripted peer loop did not start")
        asyncio.run_coroutine_threadsafe(self._bind_all(), self._loop).result(timeout)
        return self

    def _socket(self, host: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            # inherited by accepted sockets: a big body cannot disappear into
            # kernel buffers, so "body" faults strike while the client writes
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.bind((host, port))
        s.listen(128)
        s.setblocking(False)
        return s

    async def _bind_all(self):
        self._stopping = asyncio.Event()
        last = None
        for _ in range(20 if self.port == 0 else 1):
            socks = []
            try:
                first = self._socket(self.hosts[0], self.port)
                socks.append(first)
                port = first.getsockname()[1]
                for h in self.hosts[1:]:
                    socks.append(self._socket(h, port))
            except OSError as e:
                last = e
                for s in socks:
                    s.close()
                continue
            self.port = port
            for s in socks:
                self._servers.append(await asyncio.start_server(self._session, sock=s,
                                                                limit=1 << 16))
            return
        raise RuntimeError(f"could not bind {self.hosts} on one port: {last}")

    def close(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown():
            self._stopping.set()
            for s in self._servers:
                s.close()
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.sleep(0.05)
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        if not loop.is_running():
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def __enter__(self):
        return self.start() if not self._servers else self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- session
    def _fault_for(self, cell: Cell, stage: str) -> str | None:
        with self._lock:
            if cell.stage == stage and cell.action is not None:
                cell.fired += 1
                cell.fired_at.append(time.time())
                return cell.action
        return None

    async def _hang(self, reader, *, read: bool = True) -> None:
        """Never answer: read and discard (or not read at all) until the
        client goes away, the peer closes, or ``hang_limit``."""
        deadline = time.monotonic() + self.hang_limit
        while time.monotonic() < deadline and not self._stopping.is_set():
            if read:
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.2)
                except asyncio.TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    return
                if not data:
                    return
            else:
                await asyncio.sleep(0.1)
        raise _Closed()

    async def _apply(self, cell, stage, action, reader, writer, *, read_on_hang=True) -> None:
        """Carry out a fault; raises _Closed when the session is over. The
        replies to the commands before this one go out first (a reply-type
        fault in the same write, as a pipelining server batches them)."""
        if action == "close":
            await writer.flush()
            raise _Closed()
        if action == "hang":
            await writer.flush()
            await self._hang(reader, read=read_on_hang)
            raise _Closed()
        writer.write(fault_reply(stage, action))
        await writer.flush()
        if action == "garbage" or (stage == "banner"):
            # after garbage (or a refused greeting) there is no sane way on
            raise _Closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        host = writer.get_extra_info("sockname")[0]
        cell = self.cells.get(host)
        rec = {"peer": writer.get_extra_info("peername"), "commands": [], "opened": time.time(),
               "closed": None, "tls": False}
        with self._lock:
            cell.sessions.append(rec)
        self._writers.add(writer)
        try:
            await self._converse(cell, rec, reader, _Batching(writer))
        except (_Closed, ConnectionError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._writers.discard(writer)
            rec["closed"] = time.time()
            try:
                writer.close()   # unread data in the kernel buffer makes it a reset
            except Exception:
                pass

    async def _converse(self, cell: Cell, rec: dict, reader, writer) -> None:
        w = writer.write
        action = self._fault_for(cell, "banner")
        if action:
            await self._apply(cell, "banner", action, reader, writer)
        w(f"220 {self.hostname} ESMTP scripted\r\n".encode())
        mail, rcpts = None, []
        while True:
            if not _line_waiting(reader):
                await writer.flush()
            line = await reader.readline()
            if not line:
                raise _Closed()
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            with self._lock:
                rec["commands"].append(text)
            verb = text[:4].upper()
            if verb in ("EHLO", "HELO"):
                action = self._fault_for(cell, "ehlo")
                if action:
                    await self._apply(cell, "ehlo", action, reader, writer)
                    continue
                mail, rcpts = None, []
                if verb == "HELO":
                    w(f"250 {self.hostname}\r\n".encode())
                    continue
                exts = ["8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 104857600"]
                if cell.pipelining:
                    exts.append("PIPELINING")
                if cell.starttls and not rec["tls"]:
                    exts.append("STARTTLS")
                lines = [self.hostname] + exts
                w("".join(f"250{'-' if i < len(lines) - 1 else ' '}{ln}\r\n"
                          for i, ln in enumerate(lines)).encode())
            elif verb == "STAR":
                action = self._fault_for(cell, "starttls")
                if action:
                    await self._apply(cell, "starttls", action, reader, writer)
                    continue
                if self.tls_context is None or rec["tls"]:
                    w(b"454 4.7.0 TLS not available\r\n")
                    continue
                w(b"220 2.0.0 go ahead\r\n")
                await writer.flush()
                await writer.writer.start_tls(self.tls_context)
                rec["tls"] = True
                mail, rcpts = None, []
            elif verb == "MAIL":
                action = self._fault_for(cell, "mail")
                if action:
                    await self._apply(cell, "mail", action, reader, writer)
                    continue
                mail, rcpts = text[10:].split(" ")[0].strip("<>"), []
                w(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                if mail is None:
                    w(b"503 5.5.1 need MAIL command\r\n")
                    continue
                action = self._fault_for(cell, "rcpt")
                if action:
                    await self._apply(cell, "rcpt", action, reader, writer)
                    continue
                rcpts.append(text[8:].split(" ")[0].strip("<>"))
                w(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                if mail is None:
                    w(b"503 5.5.1 need MAIL command\r\n")
                    continue
                if not rcpts:
                    w(b"554 5.5.1 no valid recipients\r\n")
                    continue
                action = self._fault_for(cell, "data")
                if action:
                    await self._apply(cell, "data", action, reader, writer)
                    mail, rcpts = None, []
                    continue
                w(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.flush()
                await self._body(cell, rec, reader, writer, mail, rcpts)
                mail, rcpts = None, []
            elif verb == "RSET":
                mail, rcpts = None, []
                w(b"250 2.0.0 Ok\r\n")
            elif verb == "NOOP":
                w(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                w(b"221 2.0.0 Bye\r\n")
                await writer.flush()
                raise _Closed()
            else:
                w(b"500 5.5.1 command not recognized\r\n")

    async def _body(self, cell, rec, reader, writer, mail, rcpts) -> None:
        data = bytearray()
        premature = False
        action = None
        # the first chunk (up to 64 KiB): a "body" fault strikes after it
        first = await reader.read(65536)
        if not first:
            raise _Closed()
        data += first
        if not _complete(data):
            # (a body that fits in the first chunk never meets a "body" fault)
            action = self._fault_for(cell, "body")
        if action == "close":
            # Stop reading until the client is blocked in a write, then close
            # with unread data behind: a TCP reset hits a writer waiting for
            # buffer space (deterministic: no race with the client's writes).
            await asyncio.sleep(self.body_close_delay)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Closed()
        if action == "hang":
            await self._hang(reader, read=False)
            raise _Closed()
        if action is not None:
            writer.write(fault_reply("body", action))
            await writer.flush()
            premature = True
        while not _complete(data):
            chunk = await reader.read(1 << 20)
            if not chunk:
                raise _Closed()
            data += chunk
            if premature and len(data) > 1 << 16:
                del data[:-8]        # no need to keep what we will refuse
        if premature:
            if action == "garbage":
                raise _Closed()
            return
        action = self._fault_for(cell, "final")
        if action:
            await self._apply(cell, "final", action, reader, writer)
            return
        body = bytes(data[:-3]) if data != b".\r\n" else b""
        body = body.replace(b"\r\n..", b"\r\n.")
        if body.startswith(b".."):
            body = body[1:]
        with self._lock:
            cell.accepted.append({"mail_from": mail, "rcpt_tos": list(rcpts), "data": body,
                                  "received_at": time.time(), "tls": rec["tls"]})
        writer.write(b"250 2.0.0 Ok: queued\r\n")
        await writer.flush()


def _complete(data: bytearray) -> bool:
    return data == b".\r\n" or data.endswith(b"\r\n.\r\n")


__all__ = ["ScriptedPeer", "Cell", "STAGES", "ACTIONS", "fault_reply", "fault_text", "GARBAGE"]
