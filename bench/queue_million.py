#!/usr/bin/env python3
"""1,000,000 messages in delayed queues: memory and restart time (issue 5).

Builds a spool holding N delayed messages spread over D domains (next
attempt an hour away) plus K messages due now for one domain routed to a
sink, then starts ``impetus serve`` on it and reports:

* time until the server has recovered the spool (its "started" line),
* time until the first due message is delivered (first ``D`` record),
* RSS after recovery and peak RSS (VmHWM) of the server.

Usage: python3 bench/queue_million.py [-n 1000000] [--domains 10000] [--due 100]
Loopback only; the spool lives in a temp dir that is removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from impetus.spool import SCHEMA, Spool  # noqa: E402
from tests.mta import free_port  # noqa: E402


def build_spool(path: Path, n: int, domains: int, due: int, body_size: int) -> float:
    t0 = time.monotonic()
    path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path / "spool-00.db")
    db.execute(f"PRAGMA page_size={Spool.PAGE_SIZE}")  # as Impetus creates its files
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # building the fixture only
    db.executescript(SCHEMA)
    body = (b"Subject: queued\r\n\r\n" + b"x" * body_size + b"\r\n")
    now = time.time()
    per_batch = 100
    db.execute("BEGIN")
    db.executemany("INSERT INTO bodies(batch_id, data) VALUES (?, ?)",
                   ((f"00/00-00001-{b:08X}", body) for b in range((n + due) // per_batch + 1)))

    def rows():
        for i in range(n):
            d = f"d{i % domains}.bench.test"
            yield (f"00/00-00002-{i:08X}", f"00/00-00001-{i // per_batch:08X}", "s@src.test",
                   f"u{i}@{d}", d, "default", "default", now - 60, 1, now + 3600, len(body),
                   "127.0.0.1", "esmtp", "client.test")
        for j in range(due):
            i = n + j
            yield (f"00/00-00003-{j:08X}", f"00/00-00001-{i // per_batch:08X}", "s@src.test",
                   f"due{j}@sink.bench.test", "sink.bench.test", "default", "default", now - 60,
                   0, 0, len(body), "127.0.0.1", "esmtp", "client.test")
    db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())
    db.execute("COMMIT")
    db.close()
    return time.monotonic() - t0


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--domains", type=int, default=10_000)
    ap.add_argument("--due", type=int, default=100)
    ap.add_argument("--body", type=int, default=1000, help="body bytes (disk only; default 1000)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="impetus-1m-"))
    try:
        built = build_spool(work / "spool", args.n, args.domains, args.due, args.body)
        print(f"built a spool of {args.n + args.due:,} messages in {built:.1f} s "
              f"({(work / 'spool' / 'spool-00.db').stat().st_size / 1e6:.0f} MB)", flush=True)
        sink_port, mta_port = free_port(), free_port()
        count = work / "sink.count"
        (work / "resolv.conf").write_text("nameserver 127.0.0.1#9\n")
        conf = work / "ecelerity.conf"
        conf.write_text(f'''
Spoolbase = "{work / 'spool'}"
Resolv_Conf = "{work / 'resolv.conf'}"
Hostname = "bench.impetus"
Domain "sink.bench.test" {{ Gateway = "127.0.0.1:{sink_port}" }}
ec_logger {{ mainlog = "{work / 'mainlog.ec'}" paniclog = "{work / 'paniclog.ec'}" }}
ESMTP_Listener {{ Relay_Hosts = ( "127.0.0.0/8" ) Listen "127.0.0.1:{mta_port}" {{ }} }}
''')
        sink = subprocess.Popen([sys.executable, "-m", "impetus.cli", "sink", "--listen",
                                 f"127.0.0.1:{sink_port}", "--count-file", str(count)],
                                stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        out = open(work / "serve.out", "w")
        mta = subprocess.Popen([sys.executable, "-m", "impetus.cli", "serve", "-c", str(conf)],
                               stdout=out, stderr=subprocess.STDOUT)
        started = first = None
        rss_after = 0
        deadline = t0 + 300
        while time.monotonic() < deadline and mta.poll() is None:
            if started is None and "started" in (work / "serve.out").read_text():
                started = time.monotonic() - t0
                rss_after = status(mta.pid, "VmRSS")
            if first is None and count.exists() and count.read_text().strip() not in ("", "0"):
                first = time.monotonic() - t0
            if started is not None and first is not None:
                break
            time.sleep(0.05)
        peak = status(mta.pid, "VmHWM") if mta.poll() is None else 0
        mta.send_signal(signal.SIGTERM)
        rc = mta.wait(60)
        sink.terminate()
        sink.wait(10)
        print(f"messages queued           {args.n + args.due:,} ({args.n:,} delayed over "
              f"{args.domains:,} domains, {args.due} due)")
        print(f"recovered and listening   {started:.1f} s" if started else "did not start")
        print(f"first delivery            {first:.1f} s" if first else "no delivery")
        print(f"RSS after recovery        {rss_after} MB")
        print(f"peak RSS (VmHWM)          {peak} MB")
        print(f"exit on SIGTERM           {rc}")
        ok = started is not None and first is not None and first < 60 and peak < 1536 and rc == 0
        print("result                    " + ("OK" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if os.environ.get("KEEP"):
            print("kept", work)
        else:
            subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
