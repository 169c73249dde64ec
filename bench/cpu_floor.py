#!/usr/bin/env python3
"""Where the CPU of one relayed message goes, against two floors.

    python3 bench/cpu_floor.py [-n 10000] [-s 5120] [-c 20] [--reps 2]

The same smtp-source load (one message per connection, nothing pipelined,
as in the Postfix comparison) against three servers, alternating, each
server's CPU per message from /proc:

* ``canned``: a few lines of uvloop ``asyncio.Protocol`` that answer
  smtp-source's dialogue with fixed replies: no parsing, no disk, no logs.
  The floor of accept, 7 replies, ~6 reads and a close in Python + uvloop.
* ``sink``: ``impetus sink`` (discard): Impetus's SMTP server core and its
  asyncio glue, no spool, no relaying.
* ``relay``: ``impetus serve --reception-processes R`` relaying to
  Postfix's smtp-sink (``Gateway``), with the split per thread: the main
  process (scheduler + delivery), each reception process's event loop and
  its other threads (the spool writer). Figures per relayed message (a
  reception process receives 1/R of them), end to end (until smtp-sink
  counted N).

The difference between the rows is what the MTA's own work costs: the
SMTP core (sink - canned), the spool, logs and hand-off to the scheduler
(reception - sink), and outbound delivery (main).  bench/RESULTS.md,
"Where the time goes now", has the figures and what they mean.
"""
from __future__ import annotations

import argparse
import resource
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay_bench as rb  # noqa: E402  (the helpers of the relay benchmark)

CANNED = r'''
import asyncio, sys, uvloop
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.data = t, False
        t.write(b"220 canned ESMTP\r\n")
    def data_received(self, d):
        t = self.t
        if self.data:
            if d.endswith(b"\r\n.\r\n"):
                self.data = False
                t.write(b"250 2.0.0 Ok\r\n")
            return
        for line in d.split(b"\r\n"):
            c = line[:4].upper()
            if not c:
                continue
            if c == b"EHLO":
                t.write(b"250-canned\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif c == b"DATA":
                self.data = True
                t.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif c == b"QUIT":
                t.write(b"221 2.0.0 Bye\r\n")
                t.close()
            else:
                t.write(b"250 2.0.0 Ok\r\n")
async def main():
    await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await asyncio.Event().wait()
uvloop.install()
asyncio.run(main())
'''


def thread_ticks(root):
    """{(role, tid): ticks} for every thread of root and its children.
    role: main/reception-K, and 'loop' for the thread whose tid is the pid."""
    out = {}
    for k, pid in enumerate([root] + rb.descendants(root)):
        role = "main" if k == 0 else f"reception-{k}"
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kind = "loop" if tid == str(pid) else "other threads"
            out[(role, kind, tid)] = int(f[11]) + int(f[12])
    return out


def wait_answer(proc, port, what, limit=30.0):
    end = time.monotonic() + limit
    while not rb.port_answers(port):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


def run_one(kind, args, work):
    port = rb.free_port()
    sink = None
    env = rb.impetus_env()
    if kind == "canned":
        cmd = [sys.executable, "-c", CANNED, str(port)]
    elif kind == "sink":
        cmd = rb.impetus_cmd("sink", "--listen", f"127.0.0.1:{port}")
    else:
        sport = rb.free_port()
        sink = rb.PostfixSink(sport, work)
        wait_answer(sink.proc, sport, "smtp-sink")
        conf = os.path.join(work, "ecelerity.conf")
        Path(conf).write_text(rb.CONF.format(work=work, route=f'Gateway = "127.0.0.1:{sport}"',
                                             port=port, maxout=20))
        cmd = rb.impetus_cmd("serve", "-c", conf, "--reception-processes",
                             str(args.reception_processes))
    with open(os.path.join(work, f"{kind}.out"), "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=rb.CODE["dir"], start_new_session=True)
    lg = None
    try:
        wait_answer(proc, port, kind)
        time.sleep(0.5)
        base = sink.count() if sink else 0
        t0, m0 = thread_ticks(proc.pid), rb.sys_cpu()
        s0 = rb.tree_ticks(sink.proc.pid) if sink else 0
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        # relay_bench's smtp-source command line: the load of the Postfix comparison
        lg = subprocess.Popen(rb.SmtpSourceLoad(port, args.n, args.size, args.concurrency, None,
                                                args.timeout, work).cmd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while sink and sink.count() - base < args.n and time.monotonic() - start < args.timeout:
            time.sleep(0.02)   # end to end: until smtp-sink counted them all
        lg.wait(args.timeout)
        secs = time.monotonic() - start
        t1, m1 = thread_ticks(proc.pid), rb.sys_cpu()
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # smtp-source: the only child reaped
        s1 = rb.tree_ticks(sink.proc.pid) if sink else 0
        got = (sink.count() - base) if sink else args.n
    finally:
        if lg is not None and lg.poll() is None:
            lg.kill()
            lg.wait()
        rb.stop_proc(proc)
        if sink:
            rb.stop_proc(sink.proc)
    ms = 1000.0 / rb.CLK / max(1, got)
    parts = {}
    for key, ticks in t1.items():
        role, kind_, _ = key
        parts[f"{role} {kind_}"] = parts.get(f"{role} {kind_}", 0) + (ticks - t0.get(key, 0)) * ms
    harness = {"smtp-source": round((c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
                                    * 1000.0 / max(1, got), 3)}
    if sink:
        harness["smtp-sink"] = round((s1 - s0) * ms, 3)
    busy = 100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    return {"server": kind, "n": got, "msg_s": round(got / secs), "cpu_ms_per_msg":
            round(sum(parts.values()), 3), "parts": {k: round(v, 3) for k, v in sorted(parts.items())},
            "harness_cpu_ms_per_msg": harness,
            "machine_busy_pct": round(busy, 1), "ok": lg.returncode == 0 and got == args.n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("-s", "--size", type=int, default=5120)
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--reception-processes", type=int, default=2)
    ap.add_argument("--servers", default="canned,sink,relay")
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--jsonl", help="append each run's figures to this file")
    args = ap.parse_args(argv)
    for tool in (rb.SMTP_SOURCE, rb.SMTP_SINK):
        if not os.access(tool, os.X_OK):
            ap.error(f"{tool} is needed (apt install postfix)")
    rows = []
    for rep in range(args.reps):
        for kind in args.servers.split(","):
            rb.wait_quiet(20, 10)
            with tempfile.TemporaryDirectory(prefix="impetus-floor-") as work:
                r = run_one(kind, args, work)
            r["rep"] = rep + 1
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
    print(f"\n{args.n} x {args.size} B, smtp-source -s {args.concurrency}; CPU ms per message "
          f"(median of {args.reps})")
    for kind in args.servers.split(","):
        mine = [r for r in rows if r["server"] == kind]
        print(f"  {kind:7s} {statistics.median(r['msg_s'] for r in mine):7.0f} msg/s  "
              f"{statistics.median(r['cpu_ms_per_msg'] for r in mine):.3f} ms/msg"
              + "   harness: " + ", ".join(
                  f"{k} {statistics.median(r['harness_cpu_ms_per_msg'][k] for r in mine):.3f}"
                  for k in mine[0]["harness_cpu_ms_per_msg"])
              + ("" if all(r["ok"] for r in mine) else "  (a run was incomplete)"))
        keys = sorted({k for r in mine for k in r["parts"]})
        if kind == "relay":
            for k in keys:
                print(f"      {k:28s} {statistics.median(r['parts'].get(k, 0) for r in mine):.3f}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
