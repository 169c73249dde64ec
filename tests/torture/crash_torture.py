"""Crash torture: inject mail continuously while ``impetus serve`` is killed
with SIGKILL at random moments, restart it each time, then drain, and check
by message id that nothing acknowledged was lost.

    python -m tests.torture.crash_torture --kills 20 [--seed N] [--json out.json]

Everything runs on loopback: a test DNS server (tests/peers/dns_server.py),
a recording SMTP sink on 127.0.0.2/127.0.0.3 (the MX hosts of
``example.test``), ``impetus serve`` as a subprocess (tests/mta.py), and
injector threads speaking raw SMTP so that every client outcome is known
exactly:

* ``acked``   -- the final reply after the body was 250;
* ``cut``     -- the body and its final dot were sent, then the connection
  died before a reply (the RFC 1047 window: the MTA may have committed it);
* ``refused`` -- an explicit 4xx/5xx reply to the message;
* ``unsent``  -- the connection failed before the final dot was sent.

Every message carries ``X-Torture-Id``. The checks:

1. every ``acked`` id was delivered at least once (``lost == 0``);
2. nothing ``refused`` or ``unsent`` was delivered; delivered ``cut`` ids
   are counted (committed, but the 250 died with the process);
3. an id delivered more than once had a kill between its copies, within
   ``--inflight-window`` seconds after the first copy (it was in flight at
   the kill: delivered, but not yet marked done in the spool);
4. after the drain the spool is empty and ``impetus serve`` exits 0 on
   SIGTERM.

Kills come at a random moment of each up-time: most after
``uniform(--min-up, --max-up)`` seconds of service, one in four within
0.2 s of the restart (during spool recovery).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.mta import MTA
from tests.peers.dns_server import DnsServer
from tests.peers.smtp_sink import SmtpSink

ID_HEADER = b"X-Torture-Id: "


@dataclass
class Report:
    kills: int = 0
    seed: int = 0
    reception_processes: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0
    attempts: int = 0
    acked: int = 0
    cut: int = 0
    refused: int = 0
    unsent: int = 0
    refused_replies: dict = field(default_factory=dict)   # reply code -> count
    delivered_ids: int = 0
    deliveries: int = 0
    duplicates: int = 0              # ids delivered more than once
    extra_copies: int = 0            # deliveries beyond the first
    lost: int = 0                    # acked, never delivered
    delivered_cut: int = 0           # delivered although the 250 was cut off
    delivered_unacked_bad: int = 0   # delivered although refused/unsent: must be 0
    duplicates_not_inflight: int = 0
    max_inflight_gap: float = 0.0    # first copy -> the kill that separated the copies
    spool_left: int = -1
    final_exit: int | None = None
    restart_seconds_max: float = 0.0
    kill_uptimes: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.kills} SIGKILLs in {self.seconds:.0f}s (drain {self.drain_seconds:.1f}s): "
                f"{self.attempts} attempts, {self.acked} acked (250), {self.cut} cut after the "
                f"dot, {self.refused} refused{' ' + str(self.refused_replies) if self.refused else ''}, "
                f"{self.unsent} unsent; "
                f"{self.deliveries} deliveries "
                f"of {self.delivered_ids} ids; lost {self.lost}; duplicates {self.duplicates} "
                f"({self.extra_copies} extra copies, {self.duplicates_not_inflight} not in flight "
                f"at a kill, max gap {self.max_inflight_gap:.2f}s); delivered without a 250: "
                f"{self.delivered_cut} cut + {self.delivered_unacked_bad} refused/unsent; spool "
                f"left {self.spool_left}; final exit {self.final_exit}"
                + ("" if self.ok else "\nPROBLEMS:\n  " + "\n  ".join(self.problems)))


class Injector(threading.Thread):
    """Sends one message per connection, as fast as ``rate`` allows, and
    records each id's outcome."""

    def __init__(self, port: int, ids, outcomes: dict, lock: threading.Lock, stop: threading.Event,
                 rate: float, name: str):
        super().__init__(name=name, daemon=True)
        self.port, self.ids, self.outcomes, self.lock, self.stop = port, ids, outcomes, lock, stop
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.refusals: dict[int, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            with self.lock:
                mid = next(self.ids)
            state = self.one(mid)
            code = None
            if state.startswith("refused:"):
                state, code = "refused", int(state[8:])
            with self.lock:
                self.outcomes[mid] = (state, time.time())
                if code is not None:
                    self.refusals[code] = self.refusals.get(code, 0) + 1
            if state == "unsent":
                self.stop.wait(0.02)    # the MTA is down: do not spin
            else:
                left = self.interval - (time.monotonic() - t0)
                if left > 0:
                    self.stop.wait(left)

    def one(self, mid: int) -> str:
        dot_sent = False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                f = s.makefile("rb")

                def reply() -> int:
                    while True:
                        line = f.readline()
                        if not line:
                            raise ConnectionError("closed")
                        if line[3:4] != b"-":
                            return int(line[:3])
                if reply() != 220:
                    return "unsent"
                for cmd, want in ((b"EHLO torture.test\r\n", 250),
                                  (b"MAIL FROM:<torture@src.test>\r\n", 250),
                                  (f"RCPT TO:<u{mid}@example.test>\r\n".encode(), 250),
                                  (b"DATA\r\n", 354)):
                    s.sendall(cmd)
                    if reply() != want:
                        return "unsent"
                s.sendall(b"From: <torture@src.test>\r\nSubject: torture %d\r\n%s%d\r\n\r\n"
                          b"message %d\r\n.\r\n" % (mid, ID_HEADER, mid, mid))
                dot_sent = True
                code = reply()
                try:
                    s.sendall(b"QUIT\r\n")
                except OSError:
                    pass
                return "acked" if code == 250 else f"refused:{code}"
        except (OSError, ValueError):
            return "cut" if dot_sent else "unsent"


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def kill_all(m: MTA) -> None:
    """SIGKILL ``impetus serve`` and its reception children at once."""
    if m.proc is None:
        return
    pids = [m.proc.pid] + descendants(m.proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    m.proc.wait()
    m.proc = None


def delivered(sink: SmtpSink) -> list[tuple[int, float]]:
    out = []
    for msg in sink.messages:
        data = msg["data"]
        i = data.find(ID_HEADER)
        if i >= 0:
            j = data.find(b"\r\n", i)
            out.append((int(data[i + len(ID_HEADER):j]), msg["received_at"]))
    return out


def spool_count(spool: Path) -> int:
    import sqlite3
    n = 0
    for p in spool.glob("spool-*.db"):
        db = sqlite3.connect(p)
        try:
            n += db.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            db.close()
    return n


def run(kills: int = 20, *, workdir: str | os.PathLike | None = None, seed: int | None = None,
        injectors: int = 4, rate: float = 40.0, min_up: float = 0.4, max_up: float = 1.6,
        drain_timeout: float = 120.0, inflight_window: float = 3.0, reception_processes: int = 0,
        log=print) -> Report:
    seed = random.randrange(1 << 30) if seed is None else seed
    rnd = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="crash-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report(kills=kills, seed=seed, reception_processes=reception_processes)
    dns = DnsServer(work / "dns").start()
    sink = SmtpSink(("127.0.0.2", "127.0.0.3")).start()
    m = MTA(work / "mta", dns.resolv_conf,
            body=f"Remote_SMTP_Port = {sink.port}\nRetry_Interval = 1\nMax_Retry_Interval = 1\n",
            serve_args=("--reception-processes", str(reception_processes))
            if reception_processes else ())
    outcomes: dict[int, tuple[str, float]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    ids = iter(range(1, 1 << 62))
    kill_times: list[float] = []
    threads: list[Injector] = []
    t_start = time.monotonic()
    try:
        m.start()
        threads = [Injector(m.port, ids, outcomes, lock, stop, rate, f"inject-{i}")
                   for i in range(injectors)]
        for t in threads:
            t.start()
        for k in range(kills):
            up = rnd.uniform(0.0, 0.2) if rnd.random() < 0.25 else rnd.uniform(min_up, max_up)
            rep.kill_uptimes.append(round(up, 3))
            time.sleep(up)
            kill_all(m)
            kill_times.append(time.time())
            t0 = time.monotonic()
            m.start(timeout=30)
            rep.restart_seconds_max = max(rep.restart_seconds_max, time.monotonic() - t0)
            log(f"kill {k + 1}/{kills} after {up:.2f}s up; {len(outcomes)} attempts so far")
        stop.set()
        for t in threads:
            t.join(15)
        rep.seconds = time.monotonic() - t_start

        # ---- drain: every acked id delivered, then quiet
        t0 = time.monotonic()
        acked = {i for i, (st, _) in outcomes.items() if st == "acked"}
        deadline = time.monotonic() + drain_timeout
        last_n, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            got = delivered(sink)
            if len(got) != last_n:
                last_n, quiet_since = len(got), time.monotonic()
            if acked <= {i for i, _ in got} and time.monotonic() - quiet_since > 2.0:
                break
            time.sleep(0.1)
        rep.drain_seconds = time.monotonic() - t0
        rep.final_exit = m.stop(signal.SIGTERM)
        m.proc = None
        rep.spool_left = spool_count(m.spool)
    finally:
        stop.set()
        if m.proc is not None:
            kill_all(m)
        sink.close()
        dns.stop()

    # ---- figures and checks
    states = Counter(st for st, _ in outcomes.values())
    rep.attempts = len(outcomes)
    rep.acked, rep.cut = states["acked"], states["cut"]
    rep.refused, rep.unsent = states["refused"], states["unsent"]
    for t in threads:
        for code, n in t.refusals.items():
            rep.refused_replies[code] = rep.refused_replies.get(code, 0) + n
    got = delivered(sink)
    copies: dict[int, list[float]] = {}
    for mid, at in got:
        copies.setdefault(mid, []).append(at)
    rep.deliveries = len(got)
    rep.delivered_ids = len(copies)
    acked = {i for i, (st, _) in outcomes.items() if st == "acked"}
    rep.lost = len(acked - copies.keys())
    for mid in copies:
        st = outcomes.get(mid, ("unknown", 0))[0]
        if st == "cut":
            rep.delivered_cut += 1
        elif st != "acked":
            rep.delivered_unacked_bad += 1
    for mid, times in copies.items():
        if len(times) < 2:
            continue
        rep.duplicates += 1
        rep.extra_copies += len(times) - 1
        times.sort()
        for a, b in zip(times, times[1:]):
            between = [k for k in kill_times if a <= k <= b]
            if not between:
                rep.duplicates_not_inflight += 1
                break
            gap = between[0] - a
            rep.max_inflight_gap = max(rep.max_inflight_gap, gap)
            if gap > inflight_window:
                rep.duplicates_not_inflight += 1
                break
    if rep.lost:
        rep.problems.append(f"{rep.lost} acknowledged message(s) never delivered: "
                            f"{sorted(acked - copies.keys())[:20]}")
    if rep.delivered_unacked_bad:
        rep.problems.append(f"{rep.delivered_unacked_bad} refused/unsent message(s) delivered")
    if rep.duplicates_not_inflight:
        rep.problems.append(f"{rep.duplicates_not_inflight} duplicate(s) not in flight at a kill")
    if rep.spool_left:
        rep.problems.append(f"{rep.spool_left} message(s) left in the spool after the drain")
    if rep.final_exit != 0:
        rep.problems.append(f"impetus serve exited {rep.final_exit} on SIGTERM")
    if rep.acked == 0:
        rep.problems.append("nothing was acknowledged: the drill did not run")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--injectors", type=int, default=4)
    ap.add_argument("--rate", type=float, default=40.0, help="messages/s per injector")
    ap.add_argument("--min-up", type=float, default=0.4)
    ap.add_argument("--max-up", type=float, default=1.6)
    ap.add_argument("--inflight-window", type=float, default=3.0)
    ap.add_argument("--reception-processes", type=int, default=0)
    ap.add_argument("--workdir")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    rep = run(args.kills, workdir=args.workdir, seed=args.seed, injectors=args.injectors,
              rate=args.rate, min_up=args.min_up, max_up=args.max_up,
              inflight_window=args.inflight_window,
              reception_processes=args.reception_processes)
    print(rep.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(rep), indent=2) + "\n")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
