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
    (999 in SQLite before 3.32, set here; 16 per ``spool_ops`` row): a
    2 500-recipient transaction is stored and finished whole."""
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


def _statements(into: set):
    """A trace callback collecting statements (a set: the sqlite3 module
    reports the top statement's text again for each trigger program run)."""
    return into.add


async def test_a_group_commit_is_one_statement(spool):
    """New mail, finishes and reschedules submitted together are one group,
    written by one ``INSERT INTO spool_ops`` in autocommit mode (no BEGIN /
    COMMIT): each extra statement costs GIL hand-offs (issue 5)."""
    old = await spool.accept(Submission("s@a.test", ["x@b.test", "y@b.test", "z@b.test"], b"old"))
    seen = set()
    spool._db.set_trace_callback(_statements(seen))
    # Submitted back to back without yielding to the loop (and with a long
    # GIL switch interval, so the writer cannot start between them): one group.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        new, committed = spool.accept_nowait(Submission("s@a.test", ["n1@c.test", "n2@c.test"],
                                                        b"new body"))
        finished = spool._submit("finish", [(m.msgid, m.batch_id) for m in old[:2]])
        rescheduled = spool._submit("reschedule", [(4, 999.0, old[2].msgid)])
    finally:
        sys.setswitchinterval(interval)
    await asyncio.gather(committed, finished, rescheduled)
    spool._db.set_trace_callback(None)
    [statement] = seen
    assert statement.startswith("INSERT INTO spool_ops VALUES"), seen
    assert spool.commits == 2
    by_id = {m.msgid: m for m in spool.recover()}
    assert sorted(by_id) == sorted([old[2].msgid] + [m.msgid for m in new])
    assert (by_id[old[2].msgid].retries, by_id[old[2].msgid].next_attempt) == (4, 999.0)
    assert spool.body(old[0].batch_id) == b"old"  # z still needs it
    assert spool.body(new[0].batch_id) == b"new body"


async def test_groups_without_new_mail_skip_the_fsync(spool):
    """Finishes and reschedules are committed with synchronous=NORMAL (no
    fsync: losing one in an OS crash means redelivery, not loss), new mail
    with synchronous=FULL; the writer switches only when the kind changes."""
    seen = []
    spool._db.set_trace_callback(seen.append)
    msgs = await spool.accept(Submission("s@a.test", ["x@b.test", "y@b.test"], b"body"))
    await spool.finish(msgs[:1])
    await spool.finish(msgs[1:])
    await spool.accept(Submission("s@a.test", ["z@b.test"], b"body"))
    spool._db.set_trace_callback(None)
    pragmas = [sql for sql in seen if sql.startswith("PRAGMA")]
    assert pragmas == ["PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL"]
    assert spool.count() == 1


async def test_finishes_wait_for_new_mail_and_commit_with_it(spool):
    """A group of only finishes is held (up to DEFER_NONDURABLE) for new
    mail: the next accept takes it along in its own commit, so the pages
    both touch are written once (issue 5). The accept wakes the wait."""
    old = await spool.accept(Submission("s@a.test", ["x@b.test"], b"old"))
    spool.DEFER_NONDURABLE = 30.0  # only new mail can end this wait in time
    commits = spool.commits
    seen = []
    spool._db.set_trace_callback(seen.append)
    t0 = asyncio.get_running_loop().time()
    finished = asyncio.ensure_future(spool.finish(old))
    await asyncio.sleep(0)  # the task submits the finish
    # Poll until the writer holds it (taken off the queue, not yet committed).
    while not spool._ops.empty():
        await asyncio.sleep(0.001)
    new = await spool.accept(Submission("s@a.test", ["n@c.test"], b"new"))
    await finished
    spool._db.set_trace_callback(None)
    assert asyncio.get_running_loop().time() - t0 < 10
    assert spool.commits == commits + 1
    assert [sql for sql in seen if sql.startswith("PRAGMA")] == []  # stayed FULL (fsync)
    assert [m.msgid for m in spool.recover()] == [new[0].msgid]


async def test_a_lone_finish_is_committed_after_the_wait(spool):
    msgs = await spool.accept(Submission("s@a.test", ["x@b.test"], b"body"))
    spool.DEFER_NONDURABLE = 0.05
    t0 = asyncio.get_running_loop().time()
    await spool.finish(msgs)
    assert asyncio.get_running_loop().time() - t0 >= 0.04
    assert spool.recover() == []


async def test_close_commits_a_held_finish(tmp_path):
    s = Spool(str(tmp_path / "sp"))
    s.open()
    msgs = await s.accept(Submission("s@a.test", ["x@b.test", "y@b.test"], b"body"))
    s.DEFER_NONDURABLE = 30.0
    finished = asyncio.ensure_future(s.finish(msgs[:1]))
    await asyncio.sleep(0)  # the task submits the finish
    while not s._ops.empty():  # ... and the writer holds it
        await asyncio.sleep(0.001)
    t0 = asyncio.get_running_loop().time()
    s.close()  # must not sit out the 30 s
    assert asyncio.get_running_loop().time() - t0 < 10
    await finished
    s2 = Spool(str(tmp_path / "sp"))
    s2.open()
    try:
        assert [m.rcpt for m in s2.recover()] == ["y@b.test"]
    finally:
        s2.close()


async def test_one_bad_op_does_not_fail_its_group(spool):
    """A group whose statement fails is retried op by op: only the bad op
    fails (here: a second transaction claiming an existing batch id)."""
    first = await spool.accept(Submission("s@a.test", ["x@b.test"], b"one", batch_id="B1"))
    bad = spool.accept(Submission("s@a.test", ["y@b.test"], b"two", batch_id="B1"))
    good = spool.accept(Submission("s@a.test", ["z@b.test"], b"three"))
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], SpoolError)
    assert [m.rcpt for m in results[1]] == ["z@b.test"]
    assert sorted(m.rcpt for m in spool.recover()) == ["x@b.test", "z@b.test"]
    assert spool.body(first[0].batch_id) == b"one"


def test_a_spool_from_before_spool_ops_gains_it_on_open(tmp_path):
    """Spool files written before the ``spool_ops`` view existed are upgraded
    in place when opened (CREATE ... IF NOT EXISTS), keeping their mail."""
    base = str(tmp_path / "sp")
    s = Spool(base)
    s.open()
    asyncio.run(s.accept(Submission("s@a.test", ["x@b.test"], b"kept")))
    s.close()
    db = sqlite3.connect(os.path.join(base, "spool-00.db"))
    for trig in ("body", "message", "reschedule", "finish"):
        db.execute(f"DROP TRIGGER spool_ops_{trig}")
    db.execute("DROP VIEW spool_ops")
    db.commit()
    db.close()
    s = Spool(base)
    s.open()
    try:
        [old] = s.recover()
        asyncio.run(s.finish([old]))
        assert s.count() == 0
    finally:
        s.close()


async def test_new_spool_files_get_16k_pages_and_old_ones_keep_theirs(tmp_path):
    """New files use Spool.PAGE_SIZE (fewer WAL frames per body, issue 5);
    a file created with SQLite's default 4 KiB pages keeps them and works."""
    body = b"x" * 50_000

    async def store_and_inspect(base):
        """Store one 50 KB message in the spool at ``base``; the file's page
        size and message count afterwards."""
        spool = Spool(str(base))
        spool.open()
        try:
            [m] = await spool.accept(Submission("s@a.test", ["x@b.test"], body))
            assert spool.body(m.batch_id) == body
        finally:
            spool.close()
        db = sqlite3.connect(spool.path)
        try:
            return (db.execute("PRAGMA page_size").fetchone()[0],
                    db.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            db.close()

    assert (await store_and_inspect(tmp_path / "new"))[0] == 16384

    old_base = tmp_path / "old"
    old_base.mkdir()
    db = sqlite3.connect(str(old_base / "spool-00.db"))
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert await store_and_inspect(old_base) == (4096, 1)
