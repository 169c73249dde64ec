"""The spool: durable accept, group commit, recovery, finish, reschedule."""
import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from impetus.spool import Spool, SpoolError, Submission


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"))
    s.open()
    yield s
    s.close()


async def test_accept_stores_body_once_and_one_message_per_recipient(spool):
    msgs = await spool.accept(Submission("s@a.test", ["x@b.test", "y@B.TEST", "z@c.test"],
                                         b"Subject: hi\r\n\r\nbody\r\n", peer_ip="127.0.0.9"))
    assert len({m.msgid for m in msgs}) == 3
    assert len({m.batch_id for m in msgs}) == 1
    assert [m.domain for m in msgs] == ["b.test", "b.test", "c.test"]
    assert spool.body(msgs[0].batch_id) == b"Subject: hi\r\n\r\nbody\r\n"
    db = sqlite3.connect(spool.path)
    assert db.execute("select count(*) from bodies").fetchone()[0] == 1
    assert db.execute("select count(*) from messages").fetchone()[0] == 3


async def test_concurrent_accepts_share_commits(spool):
    subs = [Submission("s@a.test", [f"r{i}@b.test"], b"x" * 5000) for i in range(200)]
    await asyncio.gather(*(spool.accept(s) for s in subs))
    assert spool.count() == 200
    # Group commit: far fewer commits (fsyncs) than messages.
    assert spool.commits < 200


async def test_finish_removes_messages_and_unreferenced_body(spool):
    msgs = await spool.accept(Submission("s@a.test", ["x@b.test", "y@b.test"], b"body"))
    await spool.finish(msgs[:1])
    assert spool.body(msgs[0].batch_id) == b"body"  # still referenced by y
    await spool.finish(msgs[1:])
    with pytest.raises(SpoolError):
        spool.body(msgs[0].batch_id)
    assert spool.recover() == []


async def test_reschedule_is_recovered(tmp_path):
    s = Spool(str(tmp_path / "sp"))
    s.open()
    msgs = await s.accept(Submission("s@a.test", ["x@b.test"], b"body"))
    msgs[0].retries = 3
    msgs[0].next_attempt = 12345.5
    await s.reschedule(msgs)
    s.close()
    s2 = Spool(str(tmp_path / "sp"))
    s2.open()
    [m] = s2.recover()
    assert (m.msgid, m.retries, m.next_attempt, m.rcpt) == (msgs[0].msgid, 3, 12345.5, "x@b.test")
    s2.close()


def test_acknowledged_messages_survive_sigkill(tmp_path):
    """A child process accepts messages, prints each id once accept() returned,
    and is SIGKILLed mid-stream: every printed id must be in the spool."""
    base = tmp_path / "sp"
    script = textwrap.dedent(f"""
        import asyncio, sys
        from impetus.spool import Spool, Submission
        async def main():
            s = Spool({str(base)!r}); s.open()
            async def one(i):
                [m] = await s.accept(Submission("s@a.test", [f"r{{i}}@b.test"], b"x" * 2000))
                print(m.msgid, flush=True)
            i = 0
            while True:
                await asyncio.gather(*(one(i + k) for k in range(10)))
                i += 10
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    acked = []
    while len(acked) < 300:
        line = proc.stdout.readline()
        assert line, "child died"
        acked.append(line.decode().strip())
    proc.kill()
    proc.wait()
    rest = proc.stdout.read().decode().split()
    acked.extend(rest)
    s = Spool(str(base))
    s.open()
    stored = {m.msgid for m in s.recover()}
    s.close()
    missing = [a for a in acked if a not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost"


def test_unwritable_spool_is_a_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises((SpoolError, OSError)):
        Spool(str(target / "sub")).open()


async def test_more_rows_than_one_statement_takes(spool):
    """Multi-row statements are split to fit SQLite's bound-parameter limit
    (999 in SQLite before 3.32, set here; 14 per message row): a 2 500-recipient
    transaction is stored and finished whole."""
    spool._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    rcpts = [f"r{i}@b.test" for i in range(2500)]
    msgs = await spool.accept(Submission("s@a.test", rcpts, b"body\r\n"))
    assert spool.count() == 2500
    await spool.finish(msgs[:2000])
    assert spool.count() == 500 and spool.body(msgs[0].batch_id) == b"body\r\n"
    await spool.finish(msgs[2000:])
    assert spool.count() == 0
    with pytest.raises(SpoolError):
        spool.body(msgs[0].batch_id)
