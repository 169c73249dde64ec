"""Reception process -> scheduler process notifications (issue 5: use every core).

A reception process commits a transaction to its own spool shard and then
tells the scheduler about it over a Unix stream socket, so the scheduler
stays the single owner of queue state. One frame per transaction:
4-byte big-endian length + a pickled ``(message rows, body)``; the body rides
along so the scheduler does not have to read it back from SQLite. The socket
lives in the spool directory with mode 0600 (only the MTA's own processes
talk on it).

Nothing here is needed for durability: a notification lost in a crash is
recovered from the shard (the scheduler rescans a shard whose reception
process died, and everything is recovered at start).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct

from .spool import QueuedMessage

log = logging.getLogger("impetus.ipc")

_LEN = struct.Struct(">I")
MAX_FRAME = 256 << 20

_FIELDS = ("msgid", "batch_id", "sender", "rcpt", "domain", "binding", "group", "received_at",
           "retries", "next_attempt", "size", "peer_ip", "proto", "helo")


def encode(msgs: list[QueuedMessage], body: bytes) -> bytes:
    rows = [tuple(getattr(m, f) for f in _FIELDS) for m in msgs]
    payload = pickle.dumps((rows, body), protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(payload)) + payload


def decode(payload: bytes) -> tuple[list[QueuedMessage], bytes]:
    rows, body = pickle.loads(payload)
    return [QueuedMessage(*row) for row in rows], body


class Notifier:
    """Reception side: a connection to the scheduler's socket."""

    def __init__(self, path: str):
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        self.lost = asyncio.Event()

    async def connect(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(self.path)
        asyncio.get_running_loop().create_task(self._watch(reader))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        # The scheduler never writes; EOF means it is gone.
        await reader.read()
        self.lost.set()

    def notify(self, msgs: list[QueuedMessage], body: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            log.warning("scheduler unreachable; %d message(s) wait in the spool for the next "
                        "start", len(msgs))
            return
        self.writer.write(encode(msgs, body))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def serve_notifications(path: str, on_message, on_disconnect) -> asyncio.AbstractServer:
    """Scheduler side: accept reception processes' notifications."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_FRAME:
                    raise ValueError(f"notification frame of {n} bytes")
                msgs, body = decode(await reader.readexactly(n))
                on_message(msgs, body)
        except asyncio.IncompleteReadError:
            pass
        except Exception:  # a broken frame must not take the scheduler down
            log.exception("bad notification from a reception process")
        finally:
            writer.close()
            on_disconnect()

    server = await asyncio.start_unix_server(handle, path)
    os.chmod(path, 0o600)
    return server
