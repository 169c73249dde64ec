"""Reception process <-> scheduler process channel (issue 5: use every core).

A reception process commits a transaction to its own spool shard and then
tells the scheduler about it over a Unix stream socket, so the scheduler
stays the single owner of queue state. The body rides along so the
scheduler does not have to read it back from SQLite.

The other direction carries finished deliveries back to the shard's owner:
the reception process applies them in its own group commits, so one process
writes each shard and the two never wait for each other's SQLite lock.
Until the owner confirms a finish, the scheduler keeps it; if the owner
dies first, the scheduler applies the rest to the shard itself before it
adopts the shard's mail (otherwise delivered mail would be adopted again).

Frames: 4-byte big-endian length + a pickled tuple whose first item is the
kind. Reception -> scheduler: ``("hello", shard)`` once, ``("msgs", rows,
body)`` per transaction, ``("finished", seq, ok)``. Scheduler -> reception:
``("finish", seq, [(msgid, batch_id), ...])``. Both ends are the same
program (the scheduler spawns its reception processes), so the format has
no version. The socket lives in the spool directory with mode 0600.

Nothing here is needed for durability: a notification lost in a crash is
recovered from the shard (the scheduler rescans a shard whose reception
process died, and everything is recovered at start); a finish lost in a
crash means that message is delivered again (at-least-once).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import struct

from .spool import QueuedMessage

log = logging.getLogger("impetus.ipc")

_LEN = struct.Struct(">I")
MAX_FRAME = 256 << 20


def frame(obj) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(payload)) + payload


def encode(msgs: list[QueuedMessage], body: bytes) -> bytes:
    # QueuedMessage's argument order (decode_msgs), spelled out: this runs
    # for every received transaction.
    rows = [(m.msgid, m.batch_id, m.sender, m.rcpt, m.domain, m.binding, m.group, m.received_at,
             m.retries, m.next_attempt, m.size, m.peer_ip, m.proto, m.helo) for m in msgs]
    return frame(("msgs", rows, body))


def decode_msgs(rows) -> list[QueuedMessage]:
    return [QueuedMessage(*row) for row in rows]


async def read_frame(reader: asyncio.StreamReader):
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"IPC frame of {n} bytes")
    return pickle.loads(await reader.readexactly(n))


class Notifier:
    """Reception side: the connection to the scheduler. ``on_finish(items)``
    (a coroutine function) commits finished deliveries to this process's
    shard."""

    def __init__(self, path: str, shard: int = 0, on_finish=None):
        self.path = path
        self.shard = shard
        self.on_finish = on_finish
        self.writer: asyncio.StreamWriter | None = None
        self.lost = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._outbox: list[bytes] = []

    async def connect(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(self.path)
        self.writer.write(frame(("hello", self.shard)))
        asyncio.get_running_loop().create_task(self._watch(reader))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, *rest = await read_frame(reader)
                if kind == "finish":
                    seq, items = rest
                    task = asyncio.get_running_loop().create_task(self._finish(seq, items))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    log.warning("unexpected frame %r from the scheduler", kind)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass   # EOF: the scheduler is gone
        except Exception:
            log.exception("bad frame from the scheduler")
        self.lost.set()

    async def _finish(self, seq: int, items) -> None:
        ok = False
        try:
            if self.on_finish is not None:
                await self.on_finish(items)
                ok = True
        except Exception as exc:  # the scheduler applies them itself then
            log.warning("could not record %d finished deliveries: %s", len(items), exc)
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(frame(("finished", seq, ok)))

    def notify(self, msgs: list[QueuedMessage], body: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            log.warning("scheduler unreachable; %d message(s) wait in the spool for the next "
                        "start", len(msgs))
            return
        # One group commit acknowledges many transactions in the same loop
        # turn: send their frames in one write.
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(encode(msgs, body))

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and self.writer is not None and not self.writer.is_closing():
            self.writer.write(b"".join(frames))

    async def close(self) -> None:
        if self._tasks:   # finishes being committed: let them end (bounded)
            await asyncio.wait(list(self._tasks), timeout=10)
        self._flush()
        if self.writer is not None:
            self.writer.close()


class ReceptionChannel:
    """Scheduler side of one reception process's connection: forwards
    finished deliveries to the shard's owner and remembers them until it
    confirms."""

    def __init__(self, shard: int, writer: asyncio.StreamWriter):
        self.shard = shard
        self.writer = writer
        self.pending: dict[int, list] = {}
        self._seq = itertools.count(1)
        self.alive = True

    def finish(self, items: list) -> bool:
        """Forward ``[(msgid, batch_id), ...]``; False when the channel is gone."""
        if not self.alive or self.writer.is_closing():
            return False
        seq = next(self._seq)
        self.pending[seq] = items
        self.writer.write(frame(("finish", seq, items)))
        return True

    def confirmed(self, seq: int, ok: bool) -> list:
        """The owner committed (ok) or could not commit ``seq``: what is
        still to be applied by the scheduler itself ([] when ok)."""
        items = self.pending.pop(seq, [])
        return [] if ok else items

    def detach(self) -> list:
        """Stop forwarding; everything unconfirmed, for the scheduler to apply."""
        self.alive = False
        left = [it for seq in sorted(self.pending) for it in self.pending[seq]]
        self.pending.clear()
        return left


async def serve_notifications(path: str, on_message, on_disconnect, channels: dict | None = None,
                              on_unfinished=None) -> asyncio.AbstractServer:
    """Scheduler side: accept reception processes' connections.

    ``on_message(msgs, body)`` for each transaction; ``channels`` (shard ->
    ReceptionChannel) is kept up to date for forwarding finishes;
    ``on_unfinished(shard, items)`` gets finishes the owner could not commit
    or never confirmed before its connection ended."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    channels = channels if channels is not None else {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel: ReceptionChannel | None = None
        try:
            while True:
                kind, *rest = await read_frame(reader)
                if kind == "msgs":
                    rows, body = rest
                    on_message(decode_msgs(rows), body)
                elif kind == "finished":
                    seq, ok = rest
                    if channel is not None:
                        left = channel.confirmed(seq, ok)
                        if left and on_unfinished is not None:
                            on_unfinished(channel.shard, left)
                elif kind == "hello":
                    (shard,) = rest
                    old = channels.get(shard)
                    if old is not None and on_unfinished is not None:
                        left = old.detach()
                        if left:
                            on_unfinished(shard, left)
                    channel = channels[shard] = ReceptionChannel(shard, writer)
                else:
                    log.warning("unexpected frame %r from a reception process", kind)
        except asyncio.IncompleteReadError:
            pass
        except Exception:  # a broken frame must not take the scheduler down
            log.exception("bad notification from a reception process")
        finally:
            writer.close()
            if channel is not None:
                if channels.get(channel.shard) is channel:
                    del channels[channel.shard]
                left = channel.detach()
                if left and on_unfinished is not None:
                    on_unfinished(channel.shard, left)
            on_disconnect()

    server = await asyncio.start_unix_server(handle, path)
    os.chmod(path, 0o600)
    return server
