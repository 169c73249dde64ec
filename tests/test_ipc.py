"""Reception <-> scheduler channel: transactions one way, finished
deliveries the other way to the shard's owner (one writer per shard), and
the scheduler applying what the owner never confirmed before it adopts."""
import asyncio
import sqlite3

import pytest

from impetus import ipc
from impetus.spool import Spool, SpoolSet, Submission


def rows(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("select count(*) from messages").fetchone()[0]
    finally:
        db.close()


async def wait_for(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def shard_owner(tmp_path):
    """A reception process's spool (shard 1) and the scheduler's SpoolSet."""
    base = str(tmp_path / "spool")
    child = Spool(base, 1)
    child.open()
    main = SpoolSet(base, own=0, shards=[1])
    main.open()
    yield base, child, main
    main.close()
    child.close()


async def test_finishes_go_to_the_owner_and_are_confirmed(shard_owner, tmp_path):
    base, child, main = shard_owner
    got = []
    path = str(tmp_path / "notify.sock")
    server = await ipc.serve_notifications(path, lambda msgs, body: got.append((msgs, body)),
                                           lambda: None, channels=main.channels,
                                           on_unfinished=main.unfinished)
    notifier = ipc.Notifier(path, 1, on_finish=child.finish_items)
    await notifier.connect()
    msgs = await child.accept(Submission("s@a.test", ["x@b.test", "y@b.test"], b"body\r\n"))
    notifier.notify(msgs, b"body\r\n")
    await wait_for(lambda: got and 1 in main.channels)
    assert [m.msgid for m in got[0][0]] == [m.msgid for m in msgs]
    assert got[0][1] == b"body\r\n"
    assert rows(child.path) == 2

    await main.finish(got[0][0])          # forwarded, not written by the scheduler
    await wait_for(lambda: rows(child.path) == 0)
    await wait_for(lambda: not main.channels[1].pending)   # the owner confirmed
    assert child.committed_ops >= 2 and main.shards[1].committed_ops == 0
    await notifier.close()
    server.close()


async def test_unconfirmed_finishes_are_applied_before_adoption(shard_owner):
    """The owner died after the scheduler forwarded a finish: ``settle``
    writes it into the shard, so recovering the shard does not bring the
    delivered message back."""
    base, child, main = shard_owner
    msgs = await child.accept(Submission("s@a.test", ["x@b.test", "y@b.test"], b"b\r\n"))

    class DeadOwner:   # accepts a forward, never confirms (killed before committing)
        def __init__(self):
            self.pending = {}

        def finish(self, items):
            self.pending[1] = items
            return True

        def detach(self):
            return self.pending.pop(1, [])

    main.channels[1] = DeadOwner()
    await main.finish([msgs[0]])
    assert rows(child.path) == 2           # forwarded only
    await main.settle(1)
    assert 1 not in main.channels
    assert [m.msgid for m in main.recover_shard(1)] == [msgs[1].msgid]
    await main.finish([msgs[1]])           # no channel any more: written directly
    assert rows(child.path) == 0


async def test_owner_that_cannot_commit_hands_finishes_back(shard_owner, tmp_path):
    base, child, main = shard_owner
    path = str(tmp_path / "notify.sock")
    server = await ipc.serve_notifications(path, lambda msgs, body: None, lambda: None,
                                           channels=main.channels, on_unfinished=main.unfinished)

    async def broken(items):
        raise OSError("disk full")

    notifier = ipc.Notifier(path, 1, on_finish=broken)
    await notifier.connect()
    msgs = await child.accept(Submission("s@a.test", ["x@b.test"], b"b\r\n"))
    await wait_for(lambda: 1 in main.channels)
    await main.finish(msgs)
    await wait_for(lambda: rows(child.path) == 0)   # the scheduler applied it itself
    await notifier.close()
    server.close()


async def test_lost_connection_hands_unconfirmed_finishes_back(shard_owner, tmp_path):
    base, child, main = shard_owner
    path = str(tmp_path / "notify.sock")
    server = await ipc.serve_notifications(path, lambda msgs, body: None, lambda: None,
                                           channels=main.channels, on_unfinished=main.unfinished)
    never = asyncio.Event()

    async def hangs(items):
        await never.wait()

    notifier = ipc.Notifier(path, 1, on_finish=hangs)
    await notifier.connect()
    msgs = await child.accept(Submission("s@a.test", ["x@b.test"], b"b\r\n"))
    await wait_for(lambda: 1 in main.channels)
    await main.finish(msgs)
    await wait_for(lambda: main.channels[1].pending)
    notifier.writer.transport.abort()          # the reception process is gone
    await wait_for(lambda: 1 not in main.channels)
    await main.settle(1)
    assert rows(child.path) == 0
    for t in list(notifier._tasks):
        t.cancel()
    server.close()
