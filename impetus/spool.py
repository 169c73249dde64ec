"""Durable queue storage under ``Spoolbase``.

One SQLite database in WAL mode per spool shard. An SMTP transaction's body
is stored once (``bodies``); each recipient is its own queued message
(``messages``) sharing the transaction's batch id, as Momentum logs them.

Durability: every write goes through one writer thread that drains all
pending operations into a single transaction and commits it with
``synchronous=FULL`` (WAL fsync). Concurrent sessions therefore share one
fsync (group commit), and ``accept`` returns only after its commit. SQLite's
WAL gives crash atomicity: after SIGKILL a transaction is either wholly there
or not at all.

Several processes can later own one shard each (reception in its own process,
as Postfix's smtpd); the scheduler reads every shard on recovery.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass

from .smtp.crlf import to_crlf

log = logging.getLogger("impetus.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS bodies (
    batch_id TEXT PRIMARY KEY,
    data     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    msgid        TEXT PRIMARY KEY,
    batch_id     TEXT NOT NULL,
    sender       TEXT NOT NULL,
    rcpt         TEXT NOT NULL,
    domain       TEXT NOT NULL,
    binding      TEXT NOT NULL,
    grp          TEXT NOT NULL,
    received_at  REAL NOT NULL,
    retries      INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    size         INTEGER NOT NULL,
    peer_ip      TEXT NOT NULL,
    proto        TEXT NOT NULL,
    helo         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_batch ON messages(batch_id);
-- The writer commits a whole group (new mail, finishes, reschedules) as one
-- INSERT into this empty view: its triggers do the real work, so a group
-- commit is a single statement step (see Spool._apply).
CREATE VIEW IF NOT EXISTS spool_ops(kind, msgid, batch_id, data, sender, rcpt, domain,
    binding, grp, received_at, retries, next_attempt, size, peer_ip, proto, helo)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL WHERE 0;
CREATE TRIGGER IF NOT EXISTS spool_ops_body INSTEAD OF INSERT ON spool_ops
    WHEN NEW.kind = 'b'
BEGIN
    INSERT INTO bodies(batch_id, data) VALUES (NEW.batch_id, NEW.data);
END;
CREATE TRIGGER IF NOT EXISTS spool_ops_message INSTEAD OF INSERT ON spool_ops
    WHEN NEW.kind = 'm'
BEGIN
    INSERT INTO messages(msgid, batch_id, sender, rcpt, domain, binding, grp, received_at,
                         retries, next_attempt, size, peer_ip, proto, helo)
    VALUES (NEW.msgid, NEW.batch_id, NEW.sender, NEW.rcpt, NEW.domain, NEW.binding, NEW.grp,
            NEW.received_at, NEW.retries, NEW.next_attempt, NEW.size, NEW.peer_ip,
            NEW.proto, NEW.helo);
END;
CREATE TRIGGER IF NOT EXISTS spool_ops_reschedule INSTEAD OF INSERT ON spool_ops
    WHEN NEW.kind = 'r'
BEGIN
    UPDATE messages SET retries = NEW.retries, next_attempt = NEW.next_attempt
        WHERE msgid = NEW.msgid;
END;
CREATE TRIGGER IF NOT EXISTS spool_ops_finish INSTEAD OF INSERT ON spool_ops
    WHEN NEW.kind = 'f'
BEGIN
    DELETE FROM messages WHERE msgid = NEW.msgid;
    DELETE FROM bodies WHERE batch_id = NEW.batch_id
        AND NOT EXISTS (SELECT 1 FROM messages WHERE batch_id = NEW.batch_id);
END;
"""


class SpoolError(Exception):
    """The spool could not store or read something (disk full, I/O error)."""

    def __init__(self, message: str, *, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


class QueuedMessage:
    """One recipient of one accepted transaction; the scheduler's unit of work.

    Slotted: a million of these sit in memory for big delayed queues.
    """

    __slots__ = ("msgid", "batch_id", "sender", "rcpt", "domain", "binding",
                 "group", "received_at", "retries", "next_attempt", "size",
                 "peer_ip", "proto", "helo", "state")

    def __init__(self, msgid, batch_id, sender, rcpt, domain, binding, group,
                 received_at, retries, next_attempt, size, peer_ip, proto, helo=""):
        self.msgid = msgid
        self.batch_id = batch_id
        self.sender = sender
        self.rcpt = rcpt
        self.domain = domain
        self.binding = binding
        self.group = group
        self.received_at = received_at
        self.retries = retries
        self.next_attempt = next_attempt
        self.size = size
        self.peer_ip = peer_ip
        self.proto = proto
        self.helo = helo
        self.state = "new"  # new | active | delayed | inflight | done

    def __repr__(self) -> str:
        return f"<QueuedMessage {self.msgid} {self.rcpt} {self.state}>"


@dataclass
class Submission:
    """What reception hands the spool: one transaction, many recipients."""

    sender: str
    recipients: list[str]
    body: bytes
    peer_ip: str = "unknown"
    proto: str = "esmtp"
    helo: str = ""
    binding: str = "default"
    group: str = "default"
    batch_id: str | None = None  # pre-allocated by reception (for Received:)
    # The body has no bare CR or LF (reception normalised it): the spool
    # skips its own check. Spooled bodies are always CRLF-clean, so that
    # delivery can send them without scanning (impetus.smtp.crlf).
    crlf_clean: bool = False


def _domain_of(addr: str) -> str:
    at = addr.rfind("@")
    return addr[at + 1:].lower() if at >= 0 else ""


class IdGenerator:
    """Momentum-style ids (``20/00-25593-945A87F3``): node/shard-pid-counter."""

    def __init__(self, shard: int = 0, node: int = 0):
        self.prefix = f"{node:02d}/{shard:02d}-{os.getpid():05d}-"
        self._counter = itertools.count(random.getrandbits(31))

    def next(self) -> str:
        return f"{self.prefix}{next(self._counter) & 0xFFFFFFFF:08X}"


_STOP = object()


class _Op:
    __slots__ = ("kind", "args", "future", "loop")

    def __init__(self, kind, args, future, loop):
        self.kind = kind
        self.args = args
        self.future = future
        self.loop = loop


class Spool:
    # Page size of a new spool file. SQLite writes each changed page to the
    # WAL with two pwrite calls (frame header, page): 16 KiB pages hold a
    # 5 KB body in its table leaf (no overflow page) and a 50 KB one in 4
    # pages instead of 13.
    PAGE_SIZE = 16384

    # A group of only finishes/reschedules waits this long (s) for new mail
    # to commit with. Under load new mail comes within a millisecond or two,
    # so each commit writes the b-tree pages both touch (table and index
    # leaves, the header page) once instead of twice, and there is one commit
    # (one statement, one wake-up) fewer. The cost: a SIGKILL in the wait
    # undoes those finishes, i.e. mail delivered in the last few ms is
    # delivered again (at-least-once); nothing acknowledged is lost.
    DEFER_NONDURABLE = 0.02
    GROUP_MAX = 2000
    # Finishes and reschedules that a full disk refused are held and tried
    # again this often (s) until they fit; whoever awaits them keeps waiting.
    # Without this, mail delivered while the disk was full stayed queued in
    # the file and went out again after the next restart. New mail is never
    # held: its client gets 452 at once.
    FULL_RETRY = 5.0

    def __init__(self, spoolbase: str, shard: int = 0, warn=None):
        self.warn = warn or log.warning  # the server points this at the paniclog
        self.spoolbase = spoolbase
        self.shard = shard
        self.path = os.path.join(spoolbase, f"spool-{shard:02d}.db")
        self.ids = IdGenerator(shard)
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self.commits = 0
        self._synchronous_full = True  # the writer connection's PRAGMA synchronous
        self.commit_seconds = 0.0
        self.committed_ops = 0
        self._held: list[_Op] = []     # writer thread only: refused by a full disk
        self._held_reported = False

    # -- lifecycle -------------------------------------------------------
    def open(self) -> None:
        os.makedirs(self.spoolbase, exist_ok=True)
        try:
            self._open_db()
            problem = self._check()
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if problem:
            self._quarantine_and_salvage(problem)
        self._thread = threading.Thread(target=self._writer, name=f"spool-writer-{self.shard}",
                                        daemon=True)
        self._thread.start()

    def _open_db(self) -> None:
        self._db = self._connect()
        self._db.executescript(SCHEMA)
        self._db.commit()
        self._read_db = self._connect()

    def _check(self) -> str | None:
        """SQLite's own structural check of the file: None when sound."""
        rows = self._read_db.execute("PRAGMA quick_check(5)").fetchall()
        problems = [r[0] for r in rows if r[0] != "ok"]
        return "; ".join(problems) or None

    def _quarantine_and_salvage(self, problem: str) -> None:
        """Move a corrupt spool file aside (never delete mail we might still
        read by hand), start a fresh one, and copy into it every message whose
        row and body can still be read."""
        salvaged = []
        for db in (self._read_db, self._db):
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
        self._db = self._read_db = None
        try:
            src = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            cur = src.execute("SELECT * FROM messages")
            while True:
                try:
                    row = cur.fetchone()
                except sqlite3.DatabaseError:
                    break
                if row is None:
                    break
                try:
                    body = src.execute("SELECT data FROM bodies WHERE batch_id=?",
                                       (row[1],)).fetchone()
                except sqlite3.DatabaseError:
                    body = None
                if body is not None:
                    salvaged.append((row, body[0]))
            src.close()
        except sqlite3.DatabaseError:
            pass
        qdir = os.path.join(self.spoolbase, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = os.path.basename(self.path)
        dest = os.path.join(qdir, f"{name}.{stamp}")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, dest + suffix)
        try:
            self._open_db()
            with self._db:
                for row, body in salvaged:
                    self._db.execute("INSERT OR IGNORE INTO bodies(batch_id, data) VALUES (?, ?)",
                                     (row[1], body))
                    self._db.execute("INSERT OR IGNORE INTO messages VALUES "
                                     "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"cannot create a new spool file {self.path}: {exc}") from exc
        self.warn(f"spool file {self.path} is corrupt ({problem}); quarantined as {dest}; "
                  f"{len(salvaged)} readable message(s) copied into a new spool file")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Only takes effect on a new file (before WAL mode writes the header).
        db.execute(f"PRAGMA page_size={self.PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def close(self) -> None:
        if self._thread is not None:
            self._ops.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None
        for db in (self._db, self._read_db):
            if db is not None:
                db.close()
        self._db = self._read_db = None

    # -- reads -----------------------------------------------------------
    def recover(self) -> list[QueuedMessage]:
        """Every unfinished message, oldest first.

        Streams the rows and interns the strings that repeat across messages
        (domains, bindings, senders, peers), so a million queued messages fit
        in a few hundred MB.
        """
        intern = sys.intern
        out = []
        with self._read_lock:
            cur = self._read_db.execute(
                "SELECT msgid, batch_id, sender, rcpt, domain, binding, grp, received_at,"
                " retries, next_attempt, size, peer_ip, proto, helo FROM messages"
                " ORDER BY received_at")
            while True:
                try:
                    rows = cur.fetchmany(10000)
                except sqlite3.DatabaseError as exc:
                    self.warn(f"spool file {self.path}: stopped reading queued messages after "
                              f"{len(out)}: {exc}")
                    break
                if not rows:
                    break
                for row in rows:
                    (msgid, batch_id, sender, rcpt, domain, binding, grp, received_at, retries,
                     next_attempt, size, peer_ip, proto, helo) = row
                    try:
                        received_at, next_attempt = float(received_at), float(next_attempt)
                        retries, size = int(retries), int(size)
                        if not all(isinstance(v, str) for v in (msgid, batch_id, sender, rcpt,
                                                                domain, binding, grp)):
                            raise TypeError("text field is not text")
                    except (TypeError, ValueError) as exc:
                        self.warn(f"spool file {self.path}: corrupt record {msgid!r} skipped "
                                  f"(left in the file for inspection): {exc}")
                        continue
                    out.append(QueuedMessage(msgid, intern(batch_id), intern(sender), rcpt,
                                             intern(domain), intern(binding), intern(grp),
                                             received_at, retries, next_attempt, size,
                                             intern(str(peer_ip)), intern(str(proto)),
                                             intern(str(helo or ""))))
        return out

    def body(self, batch_id: str) -> bytes:
        with self._read_lock:
            row = self._read_db.execute("SELECT data FROM bodies WHERE batch_id=?",
                                        (batch_id,)).fetchone()
        if row is None:
            raise SpoolError(f"body of batch {batch_id} is missing from the spool")
        return row[0]

    def count(self) -> int:
        with self._read_lock:
            return self._read_db.execute("SELECT count(*) FROM messages").fetchone()[0]

    # -- writes (all through the writer thread) -------------------------
    async def accept(self, sub: Submission) -> list[QueuedMessage]:
        """Store a transaction durably; returns its queued messages."""
        msgs, committed = self.accept_nowait(sub)
        await committed
        return msgs

    def accept_nowait(self, sub: Submission) -> tuple[list[QueuedMessage], asyncio.Future]:
        """``accept`` without a coroutine: the messages, and a future that
        is done (or failed with ``SpoolError``) once they are durable."""
        now = time.time()
        batch_id = sub.batch_id or self.ids.next()
        body = sub.body if sub.crlf_clean else to_crlf(sub.body)
        msgs = [QueuedMessage(self.ids.next(), batch_id, sub.sender, rcpt, _domain_of(rcpt),
                              sub.binding, sub.group, now, 0, now, len(body),
                              sub.peer_ip, sub.proto, sub.helo)
                for rcpt in sub.recipients]
        return msgs, self._submit("accept", (batch_id, body, msgs))

    async def finish(self, msgs: list[QueuedMessage]) -> None:
        """Delivered or failed for good: forget them (and unreferenced bodies)."""
        await self.finish_items([(m.msgid, m.batch_id) for m in msgs])

    async def finish_items(self, items: list[tuple[str, str]]) -> None:
        """``finish`` by ``(msgid, batch_id)`` pairs (finishes forwarded by
        the scheduler process to the shard's owner)."""
        if items:
            await self._submit("finish", list(items))

    async def reschedule(self, msgs: list[QueuedMessage]) -> None:
        """Persist retries/next_attempt (after a transient failure)."""
        if msgs:
            await self._submit("reschedule", [(m.retries, m.next_attempt, m.msgid) for m in msgs])

    def _submit(self, kind, args) -> asyncio.Future:
        if self._thread is None:
            raise SpoolError("spool is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.put(_Op(kind, args, fut, loop))
        return fut

    def _writer(self) -> None:
        db = self._db
        while True:
            if self._held:
                try:
                    op = self._ops.get(timeout=self.FULL_RETRY)
                except queue.Empty:
                    op = None   # time to try the held ops again
            else:
                op = self._ops.get()
            if op is _STOP:
                self._give_up_held(db)
                return
            batch, self._held = self._held, []
            if op is not None:
                batch.append(op)
            # Drain whatever else is waiting: one commit (one fsync) for all.
            stop = self._drain(batch)
            if not stop and self.DEFER_NONDURABLE > 0 and not self._has_accept(batch):
                stop = self._wait_for_accept(batch)
            self._commit(db, batch)
            if self._held_reported and not self._held:
                self._held_reported = False
                self.warn(f"spool file {self.path}: the finished deliveries and retry times "
                          "a full disk held back are recorded now")
            if stop:
                self._give_up_held(db)
                return

    def _hold(self, ops: list[_Op], error: Exception) -> None:
        """Keep non-durable ops a full disk refused, to try them again."""
        self._held.extend(ops)
        if not self._held_reported:
            self._held_reported = True
            n = sum(len(op.args) for op in self._held)
            self.warn(f"spool file {self.path}: cannot record {n} finished deliveries or retry "
                      f"times ({error}); trying again every {self.FULL_RETRY:g} s. Mail "
                      "delivered meanwhile is delivered again if Impetus stops before they fit")

    def _give_up_held(self, db: sqlite3.Connection) -> None:
        """At stop: a last try for the held ops, then fail what is left."""
        if not self._held:
            return
        batch, self._held = self._held, []
        self._commit(db, batch)
        left, self._held = self._held, []
        if left:
            n = sum(len(op.args) for op in left)
            self.warn(f"spool file {self.path}: stopping with {n} finished deliveries or retry "
                      "times unrecorded (disk full): that mail is delivered again after the "
                      "restart")
            self._resolve(left, SpoolError("spool write failed: disk full", disk_full=True))

    def _drain(self, batch: list) -> bool:
        """Move every queued op into ``batch``; True when told to stop."""
        while len(batch) < self.GROUP_MAX:
            try:
                nxt = self._ops.get_nowait()
            except queue.Empty:
                return False
            if nxt is _STOP:
                return True
            batch.append(nxt)
        return False

    @staticmethod
    def _has_accept(batch: list) -> bool:
        for op in batch:
            if op.kind == "accept":
                return True
        return False

    def _wait_for_accept(self, batch: list) -> bool:
        """Hold a non-durable group for up to DEFER_NONDURABLE for new mail
        to ride along with; True when told to stop."""
        deadline = time.monotonic() + self.DEFER_NONDURABLE
        while len(batch) < self.GROUP_MAX:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                nxt = self._ops.get(timeout=remaining)
            except queue.Empty:
                return False
            if nxt is _STOP:
                return True
            batch.append(nxt)
            if nxt.kind == "accept":
                return self._drain(batch)
        return False

    def _commit(self, db: sqlite3.Connection, batch: list[_Op]) -> None:
        t0 = time.monotonic()
        error: Exception | None = None
        # Only new mail needs its fsync before the reply (the 250). A batch
        # of finish/reschedule ops is committed without one: SIGKILL cannot
        # lose it (it is in the WAL, in the page cache), and the next
        # fsyncing commit syncs it too; only an OS crash in between can undo
        # it, which means redelivery (at-least-once), never loss.
        durable = self._has_accept(batch)
        if durable != self._synchronous_full:
            try:
                db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            except sqlite3.Error:
                pass
        try:
            self._apply(db, batch)
        except sqlite3.Error as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = exc
        full = error is not None and _disk_full(error)
        if full and not durable:
            self._hold(batch, error)
            return
        if error is not None and len(batch) > 1:
            if full:
                # Each new message gets its own answer (most get 452); the
                # finishes and reschedules may still fit without them.
                rest = [op for op in batch if op.kind != "accept"]
                for op in batch:
                    if op.kind == "accept":
                        self._commit(db, [op])
                if rest:
                    self._commit(db, rest)
            else:
                # One bad op must not fail its neighbours: retry them one by one.
                for op in batch:
                    self._commit(db, [op])
            return
        self.commits += 1
        self.committed_ops += len(batch)
        self.commit_seconds += time.monotonic() - t0
        outcome = None
        if error is not None:
            outcome = SpoolError(f"spool write failed: {error}", disk_full=full)
        self._resolve(batch, outcome)

    @staticmethod
    def _resolve(batch: list[_Op], outcome: Exception | None) -> None:
        # One wake-up of each waiting event loop per commit, not one per op.
        by_loop: dict = {}
        for op in batch:
            by_loop.setdefault(op.loop, []).append(op.future)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, futures, outcome)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    # Rows per multi-row statement, at most (fewer when the SQLite build's
    # bound-parameter limit asks for it: 999 before 3.32, 32766 after).
    ROWS_PER_STATEMENT = 500
    # spool_ops's columns (SCHEMA): kind, msgid, batch_id, data, then the
    # message's sender ... helo; one bound parameter each.
    _OP_WIDTH = 16
    _OP_ROW = "(" + ",".join("?" * _OP_WIDTH) + ")"

    @classmethod
    def _apply(cls, db: sqlite3.Connection, batch: list[_Op]) -> None:
        """Commit every op of a group as rows of one ``INSERT INTO spool_ops``
        (the view's triggers store bodies and messages, finish, reschedule).

        Why one statement: the sqlite3 module releases and re-takes the GIL
        around every statement step and reset. With the event loop holding
        the GIL most of the time, each of those is a futex wait and a context
        switch; strace showed ~30 per commit with BEGIN, one INSERT per table
        and COMMIT. A single statement in autocommit mode is its own
        transaction, committed (and fsynced) inside its one step. Groups too
        big for one statement fall back to BEGIN ... COMMIT around several.
        """
        rows = []
        add = rows.append
        for op in batch:
            kind = op.kind
            if kind == "accept":
                batch_id, body, msgs = op.args
                add(("b", None, batch_id, body) + (None,) * 12)
                for m in msgs:
                    add(("m", m.msgid, m.batch_id, None, m.sender, m.rcpt, m.domain, m.binding,
                         m.group, m.received_at, m.retries, m.next_attempt, m.size, m.peer_ip,
                         m.proto, m.helo))
            elif kind == "finish":
                for msgid, batch_id in op.args:
                    add(("f", msgid, batch_id) + (None,) * 13)
            elif kind == "reschedule":
                for retries, next_attempt, msgid in op.args:
                    add(("r", msgid) + (None,) * 8 + (retries, next_attempt) + (None,) * 4)
            else:  # pragma: no cover - programming error
                raise ValueError(kind)
        limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        parts = cls._parts(rows, limit // cls._OP_WIDTH)
        if len(parts) == 1:
            cls._insert_ops(db, parts[0])
            return
        db.execute("BEGIN IMMEDIATE")
        for part in parts:
            cls._insert_ops(db, part)
        db.execute("COMMIT")

    @classmethod
    def _insert_ops(cls, db: sqlite3.Connection, rows: list[tuple]) -> None:
        db.execute("INSERT INTO spool_ops VALUES " + ",".join([cls._OP_ROW] * len(rows)),
                   [v for r in rows for v in r])

    @classmethod
    def _parts(cls, rows: list, most: int) -> list[list]:
        """``rows`` in slices of at most ``most`` and ``ROWS_PER_STATEMENT``."""
        n = max(1, min(most, cls.ROWS_PER_STATEMENT))
        return [rows[i:i + n] for i in range(0, len(rows), n)]


def _disk_full(error: Exception) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or SQLITE_IOERR
    ("disk I/O error", which some filesystems give when out of space): the
    errors worth a 452 and a later retry."""
    text = str(error).lower()
    return "full" in text or "disk" in text


def _resolve_all(futures, error: Exception | None) -> None:
    for fut in futures:
        _resolve(fut, error)


def _resolve(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def shard_of(msg_or_batch_id: str) -> int:
    """The shard encoded in an id (``NN/SS-PID-COUNTER``)."""
    try:
        return int(msg_or_batch_id[3:5])
    except ValueError:
        return 0


class SpoolSet:
    """Several shards behind the ``Spool`` interface, for the scheduler.

    Reception processes each own one shard (they insert); the scheduler
    process finishes and reschedules messages in whichever shard holds them
    (SQLite serialises the two writers per file). New mail written by the
    scheduler itself (bounces) goes to ``own``.
    """

    def __init__(self, spoolbase: str, own: int = 0, shards=(), warn=None):
        self.spoolbase = spoolbase
        self.own = own
        self.shards: dict[int, Spool] = {}
        for n in sorted({own, *shards, *self.existing_shards(spoolbase)}):
            self.shards[n] = Spool(spoolbase, n, warn=warn)
        self.ids = self.shards[own].ids
        self.path = self.shards[own].path
        # shard -> the owning reception process's channel (ipc.ReceptionChannel):
        # finishes go there, so each shard has one writing process.
        self.channels: dict = {}
        self._direct: dict[int, set] = {}  # shard -> finishes applied here, in progress

    @staticmethod
    def existing_shards(spoolbase: str) -> list[int]:
        try:
            names = os.listdir(spoolbase)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith("spool-") and name.endswith(".db"):
                try:
                    out.append(int(name[6:-3]))
                except ValueError:
                    pass
        return out

    def open(self) -> None:
        for s in self.shards.values():
            s.open()

    def close(self) -> None:
        for s in self.shards.values():
            s.close()

    def _shard(self, some_id: str) -> "Spool":
        return self.shards.get(shard_of(some_id)) or self.shards[self.own]

    def recover(self) -> list[QueuedMessage]:
        msgs = [m for s in self.shards.values() for m in s.recover()]
        msgs.sort(key=lambda m: m.received_at)
        return msgs

    def recover_shard(self, shard: int) -> list[QueuedMessage]:
        return self.shards[shard].recover() if shard in self.shards else []

    def body(self, batch_id: str) -> bytes:
        return self._shard(batch_id).body(batch_id)

    def count(self) -> int:
        return sum(s.count() for s in self.shards.values())

    async def accept(self, sub: Submission) -> list[QueuedMessage]:
        return await self.shards[self.own].accept(sub)

    def accept_nowait(self, sub: Submission):
        return self.shards[self.own].accept_nowait(sub)

    async def _by_shard(self, method: str, msgs) -> None:
        groups: dict[int, list] = {}
        for m in msgs:
            groups.setdefault(shard_of(m.msgid), []).append(m)
        for n, group in groups.items():
            spool = self.shards.get(n) or self.shards[self.own]
            await getattr(spool, method)(group)

    async def finish(self, msgs) -> None:
        groups: dict[int, list] = {}
        for m in msgs:
            groups.setdefault(shard_of(m.msgid), []).append((m.msgid, m.batch_id))
        for n, items in groups.items():
            ch = self.channels.get(n)
            if ch is not None and ch.finish(items):
                continue
            spool = self.shards.get(n) or self.shards[self.own]
            await spool.finish_items(items)

    def unfinished(self, shard: int, items: list) -> None:
        """Forwarded finishes the owner did not confirm: apply them here."""
        spool = self.shards.get(shard) or self.shards[self.own]
        task = asyncio.get_running_loop().create_task(spool.finish_items(items))
        pending = self._direct.setdefault(shard, set())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def settle(self, shard: int | None = None) -> None:
        """Before a shard's mail is recovered or adopted: every finish
        forwarded to its (dead or stopping) owner is in the file."""
        for n in ([shard] if shard is not None else list(self.shards)):
            ch = self.channels.pop(n, None)
            if ch is not None:
                left = ch.detach()
                if left:
                    self.unfinished(n, left)
            tasks = list(self._direct.get(n, ()))
            if tasks:
                done, _ = await asyncio.wait(tasks, timeout=30)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        self.shards[self.own].warn(
                            f"spool shard {n}: could not record finished deliveries: "
                            f"{t.exception()}")

    async def reschedule(self, msgs) -> None:
        await self._by_shard("reschedule", msgs)

    @property
    def commits(self) -> int:
        return sum(s.commits for s in self.shards.values())
