"""Disk trouble (issue 8): a spool that fills up, and spool files that are
corrupt or truncated when ``impetus serve`` starts.

The full-disk test mounts a 2 MB tmpfs on the spool directory (needs root;
skipped with the reason otherwise). Delivery is held back by making the
destination's DNS time out, so accepted mail stays in the spool.
"""
from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from impetus.spool import Spool, SpoolError, Submission
from tests.mta import MTA, until, wait_until

pytestmark = pytest.mark.integration

NO_STORAGE = "452 4.3.1 Insufficient system storage"


def mta(tmp_path, dns_server, sink_port, extra="") -> MTA:
    return MTA(tmp_path / "mta", dns_server.resolv_conf,
               body=f"Remote_SMTP_Port = {sink_port}\nRetry_Interval = 1\nMax_Retry_Interval = 1\n"
                    f"{extra}")


def message(tag: str, size: int = 0) -> bytes:
    pad = (b"z" * 76 + b"\r\n") * (size // 78)
    return (f"From: <alice@src.test>\r\nTo: <bob@example.test>\r\nSubject: {tag}\r\n"
            f"X-Test-Id: {tag}\r\n\r\n").encode() + pad


def send(m: MTA, tag: str, size: int = 0) -> tuple[int, str]:
    """(code, text) of the final reply; 250 when accepted."""
    try:
        m.send("alice@src.test", ["bob@example.test"], message(tag, size))
        return 250, "ok"
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")


def delivered_ids(sink) -> list[str]:
    out = []
    for msg in sink.messages:
        for line in msg["data"].split(b"\r\n"):
            if line.startswith(b"X-Test-Id: "):
                out.append(line[11:].decode())
    return out


# ------------------------------------------------------------------ disk full
@pytest.fixture
def small_tmpfs(tmp_path):
    where = tmp_path / "mta" / "spool"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool (needs root): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on the tmpfs."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    filler = where / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_full_spool_answers_452_and_recovers(tmp_path, dns_server, smtp_sinks, small_tmpfs):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.set_timeout("example.test")       # hold delivery: mail stays in the spool
    m = mta(tmp_path, dns_server, sink.port)
    try:
        m.start()
        filler = fill(small_tmpfs, 600 * 1024)
        acked, refused = [], []
        for i in range(40):
            code, text = send(m, f"full-{i}", 60 * 1024)
            if code == 250:
                acked.append(f"full-{i}")
                continue
            refused.append((f"full-{i}", code, text))
            break
        assert refused, f"the spool never filled up ({len(acked)} messages accepted)"
        tag, code, text = refused[0]
        assert f"{code} {text}" == NO_STORAGE, (code, text)
        # nothing crashed, the refusal is logged, and the listener still talks
        assert m.proc.poll() is None
        assert any("reception" in ln and "full" in ln for ln in m.paniclog.lines())
        code, _ = send(m, "still-full", 60 * 1024)
        assert code == 452
        assert len(m.mainlog.records("R")) == len(acked)
        # space comes back: reception and delivery resume
        filler.unlink()
        code, text = send(m, "after", 60 * 1024)
        assert code == 250, text
        acked.append("after")
        dns_server.set_timeout("example.test", False)
        wait_until(lambda: set(acked) <= set(delivered_ids(sink)), 30,
                   what=f"{len(acked)} acknowledged messages delivered")
        m.mainlog.wait_for("D", len(acked))
        time.sleep(1.0)
        ids = delivered_ids(sink)
        assert sorted(ids) == sorted(acked), "refused mail delivered, or a duplicate"
        assert m.proc.poll() is None
    finally:
        m.stop()


# ----------------------------------------------------------- corrupt spool files
def queue_messages(tmp_path, dns_server, sink_port, n: int, prefix: str) -> MTA:
    """An MTA that accepted ``n`` messages it could not deliver, stopped
    cleanly (SIGTERM: the WAL is checkpointed into spool-00.db)."""
    dns_server.set_timeout("example.test")
    m = mta(tmp_path, dns_server, sink_port)
    try:
        m.start()
        for i in range(n):
            assert send(m, f"{prefix}-{i}", 2000)[0] == 250
    except BaseException:
        m.stop()
        raise
    assert m.stop(signal.SIGTERM) == 0
    dns_server.set_timeout("example.test", False)
    return m


def take_the_rest(where: Path) -> Path:
    """A second filler that takes every block the first one left."""
    last = where / "filler2"
    with open(last, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return last


def fill_up(where: Path) -> list[Path]:
    """Files that take every last block of the tmpfs."""
    return [fill(where, 0), take_the_rest(where)]


async def queued_spool(where: Path, tag: str, notes: list) -> tuple[Spool, list]:
    """A spool with six 20 KB messages in its WAL: a "done" record has to
    append WAL frames, not overwrite them."""
    spool = Spool(str(where), warn=notes.append)
    spool.open()
    msgs = []
    for i in range(6):
        msgs += await spool.accept(Submission("alice@src.test", ["bob@example.test"],
                                              message(f"{tag}-{i}", 20000)))
    return spool, msgs


def noted(notes: list, text: str):
    """Wait (in the event loop) until the spool's warnings include ``text``;
    its writer thread writes them."""
    return until(lambda: any(text in n for n in notes), 5, what=repr(text))


async def test_finishes_a_full_disk_refused_are_recorded_once_there_is_room(small_tmpfs,
                                                                           monkeypatch):
    """The spool holds "done" records the disk had no room for and writes
    them when it has: no restart needed, nothing delivered twice. New mail
    is not held: its submitter hears of the full disk at once."""
    monkeypatch.setattr(Spool, "FULL_RETRY", 0.1)
    notes: list[str] = []
    spool, msgs = await queued_spool(small_tmpfs, "held", notes)
    try:
        fillers = fill_up(small_tmpfs)
        finishing = asyncio.ensure_future(spool.finish(msgs))
        await noted(notes, "cannot record 6 finished deliveries")
        assert not finishing.done()              # held, not failed
        with pytest.raises(SpoolError) as exc:   # new mail: refused at once
            await asyncio.wait_for(spool.accept(Submission(
                "alice@src.test", ["bob@example.test"], message("new", 20000))), 5)
        assert exc.value.disk_full
        assert not finishing.done()
        assert spool.count() == 6
        for f in fillers:
            f.unlink()
        await asyncio.wait_for(finishing, 5)     # retried within FULL_RETRY
        assert spool.count() == 0
        await noted(notes, "recorded now")       # the writer thread says so right after
        assert len(notes) == 2, notes            # one report per full-disk episode
    finally:
        spool.close()


async def test_finishes_still_held_at_stop_are_failed_and_logged(small_tmpfs, monkeypatch):
    monkeypatch.setattr(Spool, "FULL_RETRY", 0.1)
    notes: list[str] = []
    spool, msgs = await queued_spool(small_tmpfs, "stop", notes)
    try:
        fill_up(small_tmpfs)
        finishing = asyncio.ensure_future(spool.finish(msgs))
        await noted(notes, "cannot record 6 finished deliveries")
    finally:
        await asyncio.get_running_loop().run_in_executor(None, spool.close)
    with pytest.raises(SpoolError):
        await asyncio.wait_for(finishing, 5)
    assert "stopping with 6 finished deliveries or retry times unrecorded" in notes[-1]


def write_shard(spoolbase: Path, shard: int, n: int, prefix: str) -> Path:
    async def go():
        s = Spool(str(spoolbase), shard)
        s.open()
        try:
            for i in range(n):
                await s.accept(Submission(sender="alice@src.test", recipients=["bob@example.test"],
                                          body=message(f"{prefix}-{i}", 20000)))
        finally:
            s.close()
    asyncio.run(go())
    return spoolbase / f"spool-{shard:02d}.db"


def quarantined_copies(spoolbase: Path, name: str) -> list[Path]:
    out = []
    for root, _dirs, files in os.walk(spoolbase.parent):
        for f in files:
            p = Path(root) / f
            if name in f and p != spoolbase / name and ("quarantin" in str(p).lower()
                                                        or "corrupt" in str(p).lower()):
                out.append(p)
    return out


def logged_quarantine(m: MTA, name: str) -> bool:
    text = "\n".join(m.paniclog.lines()) + m.output.read_text(errors="replace")
    return any(name in ln and "quarantin" in ln.lower() for ln in text.splitlines())


def test_garbage_spool_shard_is_quarantined_and_the_rest_loads(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = queue_messages(tmp_path, dns_server, sink.port, 5, "good")
    bad = m.spool / "spool-03.db"
    junk = os.urandom(64 * 1024)
    bad.write_bytes(junk)
    try:
        m.start()
        sink.wait_for(5)
        assert sorted(delivered_ids(sink)) == sorted(f"good-{i}" for i in range(5))
        assert logged_quarantine(m, "spool-03.db")
        copies = quarantined_copies(m.spool, "spool-03.db")
        assert copies and copies[0].read_bytes() == junk
        assert send(m, "new")[0] == 250
    finally:
        m.stop()


def test_truncated_spool_shard_is_quarantined_and_the_rest_loads(tmp_path, dns_server,
                                                                 smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = queue_messages(tmp_path, dns_server, sink.port, 5, "good")
    bad = write_shard(m.spool, 4, 30, "cut")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    try:
        m.start()
        wait_until(lambda: {f"good-{i}" for i in range(5)} <= set(delivered_ids(sink)), 15,
                   what="the intact shard's mail")
        assert logged_quarantine(m, "spool-04.db")
        assert quarantined_copies(m.spool, "spool-04.db")
        time.sleep(1.0)
        ids = delivered_ids(sink)
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        assert all(i.startswith(("good-", "cut-")) for i in ids)
    finally:
        m.stop()


def test_truncated_main_spool_is_quarantined_and_mta_starts(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = queue_messages(tmp_path, dns_server, sink.port, 30, "cut")
    db = m.spool / "spool-00.db"
    with open(db, "r+b") as f:
        f.truncate(os.path.getsize(db) // 2)
    try:
        m.start()
        assert logged_quarantine(m, "spool-00.db")
        assert quarantined_copies(m.spool, "spool-00.db")
        assert send(m, "new")[0] == 250
        wait_until(lambda: "new" in delivered_ids(sink), 15, what="new mail delivered")
    finally:
        m.stop()


def test_corrupt_record_is_quarantined_and_the_rest_loads(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = queue_messages(tmp_path, dns_server, sink.port, 5, "rec")
    db = sqlite3.connect(m.spool / "spool-00.db")
    with db:
        bad = db.execute("SELECT msgid FROM messages ORDER BY received_at LIMIT 1").fetchone()[0]
        db.execute("UPDATE messages SET next_attempt='garbage' WHERE msgid=?", (bad,))
    db.close()
    try:
        m.start()
        wait_until(lambda: len(delivered_ids(sink)) >= 4, 15, what="the four intact messages")
        time.sleep(0.5)
        assert sorted(delivered_ids(sink)) == [f"rec-{i}" for i in range(1, 5)]
        assert any(bad in ln for ln in m.paniclog.lines()), "the bad record is not logged"
    finally:
        m.stop()


def lose_a_body(m: MTA) -> str:
    """Delete the body row of the third queued message; returns its msgid."""
    db = sqlite3.connect(m.spool / "spool-00.db")
    with db:
        batch, msgid = db.execute("SELECT batch_id, msgid FROM messages ORDER BY received_at "
                                  "LIMIT 1 OFFSET 2").fetchone()
        db.execute("DELETE FROM bodies WHERE batch_id=?", (batch,))
    db.close()
    return msgid


def test_missing_body_fails_that_message_only(tmp_path, dns_server, smtp_sinks):
    """A message whose body row is gone: ``P`` ``554 5.3.0 [internal] message
    body lost from spool`` and a bounce for it; every other message is
    delivered."""
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = queue_messages(tmp_path, dns_server, sink.port, 5, "body")
    msgid = lose_a_body(m)
    try:
        m.start()
        p = m.mainlog.wait_for("P")[0]
        assert p[1] == msgid and p[-1] == "554 5.3.0 [internal] message body lost from spool"
        wait_until(lambda: len(delivered_ids(sink)) >= 4, 15, what="the other four messages")
        assert m.bouncelog.wait_for("B")
        time.sleep(0.5)
        assert sorted(delivered_ids(sink)) == ["body-0", "body-1", "body-3", "body-4"]
        assert m.proc.poll() is None
    finally:
        m.stop()


def test_missing_body_still_bounces(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.add("src IN MX 10 mx1.example.test.\n")   # bounces to alice@src.test reach the sink
    m = queue_messages(tmp_path, dns_server, sink.port, 3, "nb")
    lose_a_body(m)
    try:
        m.start()
        m.mainlog.wait_for("P")
        wait_until(lambda: [x for x in sink.messages if x["mail_from"] in ("", "<>")], 6,
                   what="a bounce to alice@src.test")
    finally:
        m.stop()


def test_delivery_while_the_spool_is_full_loses_nothing(tmp_path, dns_server, smtp_sinks,
                                                        small_tmpfs):
    """Delivery resumes while the disk is still full: the spool may be unable
    to record that messages are done (paniclog ``cannot record``), nothing
    crashes, every acknowledged message is delivered, and once space returns
    the held "done" records are written without a restart, so nothing is
    delivered twice."""
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.set_timeout("example.test")
    m = mta(tmp_path, dns_server, sink.port)
    try:
        m.start()
        filler = fill(small_tmpfs, 400 * 1024)
        acked = []
        for i in range(40):
            if send(m, f"df-{i}", 60 * 1024)[0] != 250:
                break
            acked.append(f"df-{i}")
        assert acked and len(acked) < 40
        last = take_the_rest(small_tmpfs)
        dns_server.set_timeout("example.test", False)
        wait_until(lambda: set(acked) <= set(delivered_ids(sink)), 20,
                   what="delivery while the spool is full")
        assert m.proc.poll() is None
        filler.unlink()
        last.unlink()

        def queued() -> int:
            db = sqlite3.connect(f"file:{small_tmpfs / 'spool-00.db'}?mode=ro", uri=True)
            try:
                return db.execute("SELECT count(*) FROM messages").fetchone()[0]
            finally:
                db.close()
        # Whether the "done" records fitted at once depends on the room the
        # WAL file already had; either way they are in the file soon after.
        wait_until(lambda: queued() == 0, 15, what="the done records, once there is room")
        held = any("cannot record" in ln for ln in m.paniclog.lines())
        assert m.stop(signal.SIGTERM) == 0
        m.start()
        assert send(m, "after")[0] == 250
        wait_until(lambda: "after" in delivered_ids(sink), 15, what="new mail after the restart")
        ids = delivered_ids(sink)
        print(f"disk full during delivery: {len(acked)} acked, {len(ids)} deliveries, "
              f"done records held back: {held}")
        assert set(acked) <= set(ids)
        assert len(ids) == len(set(ids)), "delivered twice"
    finally:
        m.stop()


def test_done_records_a_full_disk_held_back_are_written_when_room_returns(
        tmp_path, dns_server, smtp_sinks, small_tmpfs):
    """Mail queued before the disk filled up is delivered while it is full:
    the spool cannot record that (paniclog ``cannot record``), holds the
    "done" records, and writes them once there is room, without a restart:
    after one, nothing is delivered twice."""
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.set_timeout("example.test")
    m = mta(tmp_path, dns_server, sink.port)
    try:
        m.start()
        acked = [f"held-{i}" for i in range(8)]
        for tag in acked:
            assert send(m, tag, 20 * 1024)[0] == 250
        # A clean stop checkpoints the WAL away: after the restart every
        # commit has to append to an empty WAL file, which a full disk refuses.
        assert m.stop(signal.SIGTERM) == 0
        fillers = [fill(small_tmpfs, 96 * 1024)]
        m.start()
        fillers.append(take_the_rest(small_tmpfs))
        dns_server.set_timeout("example.test", False)
        wait_until(lambda: set(acked) <= set(delivered_ids(sink)), 20,
                   what="delivery while the spool is full")
        wait_until(lambda: any("cannot record" in ln for ln in m.paniclog.lines()), 10,
                   what="the paniclog line on held done records")
        for f in fillers:
            f.unlink()
        wait_until(lambda: any("recorded now" in ln for ln in m.paniclog.lines()), 15,
                   what="the held done records written")
        db = sqlite3.connect(f"file:{small_tmpfs / 'spool-00.db'}?mode=ro", uri=True)
        try:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        finally:
            db.close()
        assert m.stop(signal.SIGTERM) == 0
        m.start()
        assert send(m, "after")[0] == 250
        wait_until(lambda: "after" in delivered_ids(sink), 15, what="new mail after the restart")
        ids = delivered_ids(sink)
        assert sorted(ids) == sorted(acked + ["after"]), "delivered twice"
    finally:
        m.stop()
