"""Outbound SMTP/LMTP connections: thin asyncio glue over ``smtp.client``.

A ``Connection`` knows nothing of queues: the scheduler hands it a
transaction (sender, recipients, wire-ready body) and gets one reply per
recipient back. Every wait has its own timeout (spec §10.5, D14) and every
failure becomes a ``DeliveryError`` carrying the reply to log and the
connection stage (spec §12.5).
"""
from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from .smtp.client import (CLOSED_BY_REMOTE, ProtocolError, ReplyParser, Stage, Transaction,
                          dot_stuff, no_response_reply, parse_ehlo)
from .smtp.reply import Reply

NOT_CONNECTED = Stage.NOT_CONNECTED
CONNECT_TIMED_OUT = Reply(450, "4.4.1", "[internal] Connection Timed Out")
NO_MXS_REACHABLE = Reply(421, "4.4.0", "[internal] no MXs for this domain could be reached at this time")


def no_response(stage: int) -> Reply:
    return no_response_reply(stage)


class DeliveryError(Exception):
    """A connection-level failure: applies to every recipient in flight."""

    def __init__(self, reply: Reply, stage: int, connected: bool):
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage
        self.connected = connected


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


class Connection:
    """One outbound SMTP or LMTP session to one next hop."""

    def __init__(self, hop, timeouts: Timeouts, helo_name: str, *, source_ip: str | None = None,
                 lmtp: bool = False, esmtp: bool = True):
        self.hop = hop
        self.timeouts = timeouts
        self.helo_name = helo_name
        self.source_ip = source_ip
        self.lmtp = lmtp or hop.proto == "lmtp"
        self.esmtp = esmtp and hop.proto != "smtp"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.parser = ReplyParser()
        self.pending: list[Reply] = []
        self.extensions: dict[str, str] = {}
        self.bytes_sent = 0
        self.deliveries = 0
        self.broken = False
        self.opened_at = time.monotonic()
        self.cap_keys: list = []  # the scheduler's connection caps this connection holds
        self.rcpts_sent = 0

    @property
    def remote_ip(self) -> str:
        return self.hop.ip

    # -- low level ---------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self.writer.write(data)
        self.bytes_sent += len(data)

    async def _drain(self, timeout: float, stage: int) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            self.broken = True
            raise DeliveryError(no_response(stage), stage, True) from None
        except (ConnectionError, OSError):
            self.broken = True
            raise DeliveryError(CLOSED_BY_REMOTE, stage, True) from None

    async def _reply(self, timeout: float, stage: int) -> Reply:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.broken = True
                raise DeliveryError(no_response(stage), stage, True)
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except asyncio.TimeoutError:
                self.broken = True
                raise DeliveryError(no_response(stage), stage, True) from None
            except (ConnectionError, OSError):
                self.broken = True
                raise DeliveryError(CLOSED_BY_REMOTE, stage, True) from None
            if not data:
                self.broken = True
                raise DeliveryError(CLOSED_BY_REMOTE, stage, True)
            try:
                self.pending.extend(self.parser.feed(data))
            except ProtocolError as exc:
                self.broken = True
                raise DeliveryError(Reply(451, "4.4.2", f"[internal] garbled response: {exc}"),
                                    stage, True) from None
        return self.pending.pop(0)

    # -- session -----------------------------------------------------------
    async def open(self) -> None:
        """Connect, read the banner, EHLO (HELO fallback) / LHLO."""
        family = socket.AF_INET6 if ":" in self.hop.ip else socket.AF_INET
        local = (self.source_ip, 0) if self.source_ip else None
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.hop.ip, self.hop.port, family=family,
                                        local_addr=local, limit=1 << 20),
                self.timeouts.connect)
        except asyncio.TimeoutError:
            raise DeliveryError(CONNECT_TIMED_OUT, NOT_CONNECTED, False) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise DeliveryError(Reply(421, "4.4.0", f"[internal] connect to {self.hop.ip}:"
                                                    f"{self.hop.port} failed: {reason}"),
                                NOT_CONNECTED, False) from None
        sock = self.writer.get_extra_info("socket")
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

    async def send(self, sender: str, rcpts: list[str], body: bytes, *, body_8bit: bool = False,
                   smtputf8: bool = False) -> list[RcptResult]:
        """One transaction, driven by the sans-I/O ``Transaction``.

        Returns one result per recipient, in order. A connection failure in
        the middle gives every recipient without an outcome the internal
        reply for that stage, and marks the connection broken.
        """
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
                    self._write(dot_stuff(body))
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

    async def _rset_quietly(self) -> None:
        """RSET so the session can carry the next batch (spec §10.2)."""
        try:
            self._write(b"RSET\r\n")
            await self._drain(self.timeouts.rset, Stage.RSET)
            reply = await self._reply(self.timeouts.rset, Stage.RSET)
            if reply.code != 250:
                self.broken = True
        except DeliveryError:
            self.broken = True

    async def quit(self) -> None:
        if self.writer is None:
            return
        try:
            if not self.broken:
                self._write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 5)
                await asyncio.wait_for(self._reply(5, Stage.IDLE), 5)
        except (DeliveryError, asyncio.TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        if self.writer is not None:
            self.writer.close()
            self.writer = None
