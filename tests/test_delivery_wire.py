"""``delivery.Connection``'s socket side (``_Wire``): replies parsed as they
arrive, against small scripted servers on loopback."""
import asyncio

import pytest

from impetus.delivery import Connection, DeliveryError, Timeouts, _Wire
from impetus.router import NextHop
from impetus.smtp.client import CLOSED_BY_REMOTE, Stage
from tests.mta import until

pytestmark = pytest.mark.integration

EHLO_REPLY = b"250-fake\r\n250 PIPELINING\r\n"


def conn(port, timeout=5):
    return Connection(NextHop("mx1.example.test", "127.0.0.2", port, 10, "esmtp", "mx/a"),
                      Timeouts(connect=timeout, ehlo=timeout, mailfrom=timeout,
                               rcptto=timeout, body=timeout), "impetus.test")


async def serve(session):
    server = await asyncio.start_server(session, "127.0.0.2", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_peer_closing_an_idle_session_marks_it_broken():
    # Servers drop idle sessions; the scheduler must see that before it hands
    # the connection a batch (``conn.broken``), not fail the batch on it.
    async def session(reader, writer):
        writer.write(b"220 fake\r\n")
        await reader.readline()                 # EHLO
        writer.write(EHLO_REPLY)
        await writer.drain()
        writer.write(b"421 4.4.2 idle too long\r\n")
        writer.close()
    server, port = await serve(session)
    try:
        c = conn(port)
        await c.open()
        await until(lambda: c.broken, 5, what="the session marked broken")
        # the server's last words are still there for whoever asks
        assert (await c._reply(1, Stage.IDLE)).code == 421
        with pytest.raises(DeliveryError) as exc:
            await c._reply(1, Stage.IDLE)
        assert exc.value.reply is CLOSED_BY_REMOTE
    finally:
        server.close()


async def test_a_flood_of_unsolicited_replies_is_bounded():
    # A peer that sends replies nobody asked for must not fill our memory:
    # past _Wire.MAX_PENDING replies we stop reading, and read again as the
    # replies are taken.
    flood = b"250 ok\r\n" * 200_000             # 1.6 MB

    async def session(reader, writer):
        writer.write(b"220 fake\r\n")
        await reader.readline()
        writer.write(EHLO_REPLY + flood)
        await reader.read()                      # until the client goes
        writer.close()
    server, port = await serve(session)
    try:
        c = conn(port)
        await c.open()
        transport = c.wire.transport
        await until(lambda: not transport.is_reading(), 5, what="reading paused")
        # at most one read's worth past the mark
        most = _Wire.MAX_PENDING + 262144 // len(b"250 ok\r\n")
        paused_at = len(c.pending)
        assert _Wire.MAX_PENDING < paused_at <= most
        for _ in range(5):                       # paused: nothing more comes in
            await asyncio.sleep(0.02)
            assert len(c.pending) == paused_at
        while len(c.pending) > _Wire.MAX_PENDING // 2:
            assert (await c._reply(5, Stage.IDLE)).code == 250
        await until(lambda: len(c.pending) > _Wire.MAX_PENDING // 2, 5, what="reading again")
        await until(lambda: not transport.is_reading(), 5, what="paused again")
        assert len(c.pending) <= most
        c.close()
    finally:
        server.close()


async def test_reply_timeout_names_the_stage():
    async def session(reader, writer):
        writer.write(b"220 fake\r\n")
        await reader.readline()
        writer.write(EHLO_REPLY)
        await reader.read()                      # then silence
        writer.close()
    server, port = await serve(session)
    try:
        c = conn(port)
        await c.open()
        c._write(b"NOOP\r\n")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeliveryError) as exc:
            await c._reply(0.2, Stage.RSET)
        assert loop.time() - t0 >= 0.19
        assert exc.value.stage == Stage.RSET and c.broken
        assert c.wire.waiter is None             # no wait left behind
        c.close()
    finally:
        server.close()
