#!/usr/bin/env python3
"""kill -9 during a benchmark run: no message that got a 250 may be lost.

    python3 bench/kill_bench.py [-n 6000] [-s 5120] [-c 20] [--kills K]
                                [--kill-at 0.4] [--reception-processes N]
                                [--snapshot REF | --code DIR] [--keep] [--json]

One run, all on 127.0.0.1, in a fresh temp dir:

1. A recording sink: ``impetus sink --maildir DIR`` (one file per message,
   written before its 250).  Every message carries a unique 8-digit
   ``Message-ID: <NNNNNNNN.bench@source.bench.test>``; the sink's Maildir is
   scanned (incrementally) for those ids, so we know which arrived and how
   many times.
2. ``impetus serve -c CONF`` (``python -m impetus.cli`` with PYTHONPATH set
   to the code under test, as in relay_bench.py), in its own process group:
   listener on a free loopback port, ``Relay_Hosts = ( "127.0.0.0/8" )``,
   ``Gateway = "127.0.0.1:SINKPORT"``, ``Resolv_Conf`` naming only
   ``nameserver 127.0.0.1#9`` (the system resolver is never used), spool and
   logs in the temp dir.  ``--reception-processes N`` is passed through.
3. The load generator (relay_bench.py's asyncio client: C sessions, one
   message per connection, nothing pipelined) injects N messages.  Every
   SMTP session gets its own id; the outcome of each is recorded:
   ``ack`` (250 after the final "."), ``refused`` (an explicit non-2xx reply),
   ``unknown`` (connection lost after the message and its "." were written,
   before the reply: the MTA may or may not have it), ``unsent`` (lost or
   refused before the "." was written).  A message without a 250 is tried
   again in a new session (new id) until it gets one (``--no-retry``: never).
4. When ``--kill-at`` x N messages have been acknowledged (plus a random
   0..``--kill-jitter`` s, so the kill does not always land just after a
   group commit), the sink is frozen (SIGSTOP) for ``--stall-sink`` s so that
   acknowledged messages pile up in the spool, then every process of the
   ``impetus serve`` tree gets SIGKILL (its process group and every
   descendant), it is reaped, the sink is thawed (SIGCONT) and ``impetus
   serve`` is started again on the same config, spool and port (after
   ``--down`` s).  The load generator keeps going meanwhile (refused
   connections are retried every 50 ms).  ``--kills K`` kills K times, evenly
   spaced between ``--kill-at`` and ``--kill-last`` (fractions of N
   acknowledged).  ``--stall-sink 0`` is the plain kill: then only the few
   messages in delivery are queued at the kill.
5. When every message has a 250, wait (bounded, ``--drain-timeout``) until
   every acknowledged id is in the sink, then ``--settle`` s more (late
   duplicates), then SIGTERM the MTA (it must exit 0) and the sink, scan once
   more and report.

Report: acknowledged, delivered, lost (acknowledged but never delivered; must
be 0), duplicates (ids delivered more than once: allowed after a crash, but
counted), delivered without a 250 (``unknown`` outcome: in flight at the
kill), delivered although refused/unsent (a bug), msgs/s, per kill: the
downtime, how many acknowledged messages were not yet at the sink when the
MTA died (what the kill put at risk) and whether any 250 arrived after the
tree was dead (a survivor: a bug); what each restart recovered (paniclog),
mainlog record counts (lines a kill drops are noted, not failed: the sink
decides what was delivered).  ``--selftest-wipe-spool`` deletes the spool at
each kill: the run must then fail and list the lost ids (checks the checker).

Exit status: 0 if no acknowledged message was lost (and nothing refused or
unsent was delivered, and all N got a 250 in time); 1 otherwise (details,
ids and mainlog/paniclog pointers are printed, and the temp dir is kept);
2 on a setup error; 130 on Ctrl-C / SIGTERM.  Everything is bounded by
``--timeout``; everything this script starts is stopped by PID / its own
process group on exit, errors and Ctrl-C included.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import relay_bench as rb  # noqa: E402  (also puts the repository on sys.path)

ID_RE = re.compile(rb"Message-ID: <(\d{8})\.bench@", re.IGNORECASE)


class SetupError(Exception):
    pass


class Incomplete(Exception):
    pass


# ---------------------------------------------------------------- recording sink
class MaildirSink:
    """``impetus sink --maildir``; ``scan()`` reads each new file once."""

    def __init__(self, port, work):
        self.maildir = os.path.join(work, "sink-maildir")
        self.log = os.path.join(work, "sink.out")
        self.cmd = rb.impetus_cmd("sink", "--listen", f"127.0.0.1:{port}", "--maildir", self.maildir,
                                  "--hostname", f"sink.{rb.DOMAIN}")
        self.seen = set()               # file names already read
        self.counts = collections.Counter()   # id -> deliveries
        self.foreign = 0                # files without a bench Message-ID
        self.name_id = {}               # file name -> id
        self.paused = False
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=rb.impetus_env(), cwd=rb.CODE["dir"])

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.paused and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def listing(self):
        try:
            return os.listdir(os.path.join(self.maildir, "new"))
        except FileNotFoundError:
            return []

    def scan(self):
        new = os.path.join(self.maildir, "new")
        try:
            entries = os.listdir(new)
        except FileNotFoundError:
            return
        for name in entries:
            if name in self.seen:
                continue
            self.seen.add(name)
            with open(os.path.join(new, name), "rb") as fh:
                head = fh.read(8192)
            m = ID_RE.search(head)
            if m:
                self.counts[int(m.group(1))] += 1
                self.name_id[name] = int(m.group(1))
            else:
                self.foreign += 1


# ---------------------------------------------------------------- the MTA
class Mta:
    """``impetus serve``, restartable; output of every incarnation in serve.out."""

    def __init__(self, conf, port, work, reception_processes):
        self.cmd = rb.impetus_cmd("serve", "-c", conf,
                                  *(["--reception-processes", str(reception_processes)]
                                    if reception_processes else []))
        self.port = port
        self.spool = os.path.join(work, "spool")
        self.out = os.path.join(work, "serve.out")
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        with open(self.out, "ab") as out:
            out.write(f"=== kill_bench: start #{self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=rb.impetus_env(), cwd=rb.CODE["dir"])

    def wait_ready(self, timeout=30.0):
        end = time.monotonic() + timeout
        while not rb.port_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SetupError("impetus serve did not answer 220:\n"
                                 + Path(self.out).read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def tree(self):
        """The serve process and its descendants (a /proc scan: takes some ms)."""
        return [self.proc.pid] + rb.descendants(self.proc.pid)

    def kill9(self, pids):
        """SIGKILL the process group and every pid of `pids` (the tree, taken just
        before: once the main process is dead its children are re-parented).
        Does not wait."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, wait=30.0):
        return rb.stop_proc(self.proc, signal.SIGTERM, wait=wait)


# ---------------------------------------------------------------- load generator
class Client(rb.Client):
    """relay_bench's one-message session, plus: did *this* session get its 250?"""

    __slots__ = ("acked", "t_conn")

    def __init__(self, gen, num, done):
        super().__init__(gen, num, done)
        self.acked = False
        self.t_conn = time.perf_counter()

    def data_received(self, data):
        before = self.step
        super().data_received(data)
        if before == 5 and self.step == 6:
            self.acked = True
            self.gen.on_ack(self.num, self.t_conn)


class KillLoad:
    """N logical messages, C workers, every session a new id; kills and restarts."""

    def __init__(self, args, mta, sink):
        self.args, self.mta, self.sink = args, mta, sink
        self.n, self.conc = args.n, args.concurrency
        self.prefix, self.suffix = rb.build_message(args.size)
        self.ehlo = b"EHLO loadgen.bench.test\r\n"
        self.mail = f"MAIL FROM:<{rb.SENDER}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{rb.RCPT}>\r\n".encode()
        self.data = b"DATA\r\n"
        # relay_bench.Client's bookkeeping
        self.lat, self.errors, self.accepted, self.t_last_250 = [], [], 0, None
        # ours
        self.status = {}                # session id -> ack|refused|unknown|unsent|timeout
        self.todo = collections.deque(range(args.n))
        self.open_msgs = args.n         # logical messages without a final outcome
        self.attempts = [0] * args.n
        self.next_id = 1
        self.connect_refused = 0
        self.gave_up = 0
        k = args.kills
        fracs = ([args.kill_at] if k == 1 else
                 [args.kill_at + i * (args.kill_last - args.kill_at) / (k - 1) for i in range(k)])
        self.kill_points = [max(1, int(args.n * f)) for f in fracs[:k]]
        self.kill_event = asyncio.Event()
        self.killing = False            # between a kill and the restart
        self.rng = random.Random(args.seed)
        self.kills = []                 # dicts: acked_at_kill, t_kill, pids, down_s, ...
        self.mta_died = None
        self.sample = collections.deque(maxlen=5)   # recent connect errors
        self.broke_at = collections.Counter()        # how sessions without a 250 ended
        self.ack_times = []             # (connected, 250 received, id), perf_counter

    # called from Client.data_received
    def on_ack(self, num, t_conn):
        self.status[num] = "ack"
        self.ack_times.append((t_conn, time.perf_counter(), num))
        if self.kill_points and self.accepted >= self.kill_points[0]:
            self.kill_points.pop(0)
            self.kill_event.set()

    async def one_session(self, msg, loop):
        done = loop.create_future()
        holder = {}

        def factory():        # called once connected: only sessions get an id
            sid = self.next_id
            self.next_id += 1
            c = Client(self, sid, done)
            holder["c"] = c
            return c
        try:
            await loop.create_connection(factory, "127.0.0.1", self.mta.port)
        except OSError as exc:
            self.connect_refused += 1
            self.sample.append(f"connect: {exc}")
            return "noconn"
        c = holder["c"]
        sid = c.num
        try:
            await asyncio.wait_for(asyncio.shield(done), self.args.session_timeout)
        except asyncio.TimeoutError:
            if c.tr is not None:
                c.tr.abort()
            if c.acked:                       # stuck at QUIT: the 250 counts
                return "ack"
            st = "timeout" if c.step >= 5 else "unsent"
            self.status[sid] = st
            self.broke_at[f"timeout at {c.STEPS[min(c.step, 6)]}"] += 1
            return st
        if c.acked:
            return "ack"
        err = c.err or ""
        if c.step >= 5:       # the message and its "." were written
            st = "unknown" if err.startswith("connection lost") else "refused"
        else:
            st = "unsent"
        self.status[sid] = st
        self.broke_at[re.sub(r"\d+", "N", err[:60]) or f"step {c.step}"] += 1
        return st

    async def worker(self):
        loop = asyncio.get_running_loop()
        while self.open_msgs > 0:
            if not self.todo:
                await asyncio.sleep(0.01)
                continue
            msg = self.todo.popleft()
            st = await self.one_session(msg, loop)
            if st == "ack":
                self.open_msgs -= 1
                continue
            if st != "noconn":
                self.attempts[msg] += 1
            if self.args.no_retry and st != "noconn" or self.attempts[msg] >= self.args.max_attempts:
                self.open_msgs -= 1
                self.gave_up += 1
                continue
            self.todo.appendleft(msg)
            if st in ("noconn", "unsent", "unknown", "timeout"):
                await asyncio.sleep(0.05)     # the MTA is (probably) down

    async def killer(self):
        while True:
            await self.kill_event.wait()
            self.kill_event.clear()
            self.killing = True
            # a kill right at the ack that crossed the threshold would always land just
            # after a group commit; a random delay puts it anywhere in the commit cycle
            if self.args.kill_jitter > 0:
                await asyncio.sleep(self.rng.uniform(0, self.args.kill_jitter))
            if self.args.stall_sink > 0:       # build a queue: acknowledged, not yet delivered
                self.sink.pause()
                await asyncio.sleep(self.args.stall_sink)
            pids = self.mta.tree()
            t = time.perf_counter()
            k = {"n": len(self.kills) + 1, "acked_at_kill": self.accepted, "t_kill": t - self.t0,
                 "pids": pids}
            self.mta.kill9(pids)
            while self.mta.proc.poll() is None:
                await asyncio.sleep(0.002)
            # all pids of the tree gone (children are reaped by init)
            end = time.monotonic() + 10
            while any(_state(p) not in ("Z", "X") for p in k["pids"][1:]) and time.monotonic() < end:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)          # replies already in our socket buffers
            k["reap_s"] = time.perf_counter() - t
            k["t_dead_abs"], k["t_kill_abs"] = time.perf_counter(), t
            if self.args.selftest_wipe_spool:    # harness self-test: this must be reported as losses
                shutil.rmtree(self.mta.spool, ignore_errors=True)
            if self.args.down:
                await asyncio.sleep(self.args.down)
            # what the killed incarnation had acknowledged, and what the sink had by then
            # (file names only, read later): the difference was queued at the kill
            k["acked_ids"] = [i for i, st in self.status.items() if st == "ack"]
            k["sink_names"] = self.sink.listing()
            self.sink.resume()
            self.mta.start()
            k["t_restart"] = time.perf_counter() - self.t0
            k["acked_before_restart"] = self.accepted
            self.kills.append(k)
            self.killing = False
            print(f"kill #{k['n']} at {k['t_kill']:.2f}s after {k['acked_at_kill']} acks "
                  f"(pids {' '.join(map(str, k['pids']))}); restarted", flush=True)

    async def watch_mta(self):
        """The MTA must not die on its own; note the first ack after each restart."""
        while True:
            p = self.mta.proc
            if p.poll() is not None and not self.killing and not self.kill_event.is_set():
                await asyncio.sleep(0)
                if self.mta.proc is p and not self.killing and not self.kill_event.is_set():
                    self.mta_died = p.returncode
                    return
            for k in self.kills:
                if "first_ack_after_s" not in k and self.accepted > k["acked_before_restart"]:
                    k["first_ack_after_s"] = time.perf_counter() - self.t0 - k["t_kill"]
            await asyncio.sleep(0.01)

    async def run(self, budget):
        self.t0 = time.perf_counter()
        workers = [asyncio.ensure_future(self.worker()) for _ in range(self.conc)]
        helpers = [asyncio.ensure_future(self.killer()), asyncio.ensure_future(self.watch_mta())]
        try:
            load = asyncio.gather(*workers, return_exceptions=True)
            done, _ = await asyncio.wait([load, helpers[1]], timeout=budget,
                                         return_when=asyncio.FIRST_COMPLETED)
            if load.done():
                bugs = [x for x in load.result() if isinstance(x, BaseException)]
                if bugs:
                    raise bugs[0]
            if self.mta_died is not None:
                raise Incomplete(f"impetus serve exited {self.mta_died} on its own")
            if not done:
                raise Incomplete(f"load not finished within {budget:.0f}s: {self.accepted} of "
                                 f"{self.n} acknowledged")
            # a kill scheduled by the very last acks still happens
            await asyncio.sleep(0)
            while self.kill_event.is_set() or self.killing:
                await asyncio.sleep(0.01)
            self.t_load = time.perf_counter() - self.t0
        finally:
            for t in workers + helpers:
                t.cancel()
            await asyncio.gather(*workers, *helpers, return_exceptions=True)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
        return s[s.rindex(")") + 2]
    except (OSError, ValueError):
        return "X"


def run_load(gen, budget):
    factory = None
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as r:
        r.run(gen.run(budget))


# ---------------------------------------------------------------- one run
def run(args):
    res = {"n": args.n, "size": args.size, "concurrency": args.concurrency, "kills_planned": args.kills,
           "kill_at": args.kill_at, "kill_last": args.kill_last, "stall_sink": args.stall_sink,
           "kill_jitter": args.kill_jitter, "down": args.down,
           "reception_processes": args.reception_processes,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="impetus-kill-")
    res["workdir"] = work
    res["code_dir"] = rb.CODE["dir"]
    res["code_commit"], res["code_dirty"] = rb.code_identity()
    errors, notes = [], []
    sink = mta = gen = None
    keep = args.keep
    try:
        imp = subprocess.run([sys.executable, "-c", "import impetus; print(impetus.__file__)"],
                             capture_output=True, text=True, env=rb.impetus_env(),
                             cwd=rb.CODE["dir"]).stdout.strip()
        if not imp.startswith(rb.CODE["dir"] + os.sep):
            raise SetupError(f"impetus imports from {imp!r}, not from {rb.CODE['dir']!r}")
        mta_port = rb.free_port()
        sink_port = rb.free_port()
        while sink_port == mta_port:
            sink_port = rb.free_port()
        resolv = os.path.join(work, "resolv.conf")
        Path(resolv).write_text("nameserver 127.0.0.1#9\n")   # Gateway needs no DNS
        conf = os.path.join(work, "ecelerity.conf")
        route = f'Resolv_Conf = "{resolv}"\nGateway = "127.0.0.1:{sink_port}"'
        Path(conf).write_text(rb.CONF.format(work=work, route=route, port=mta_port,
                                             maxout=args.max_outbound))
        chk = subprocess.run(rb.impetus_cmd("check-config", "-c", conf), capture_output=True,
                             text=True, env=rb.impetus_env(), cwd=rb.CODE["dir"])
        if chk.returncode != 0:
            raise SetupError(f"impetus check-config failed:\n{chk.stdout}{chk.stderr}")

        sink = MaildirSink(sink_port, work)
        end = time.monotonic() + 15
        while not rb.port_answers(sink_port):
            if sink.proc.poll() is not None or time.monotonic() > end:
                raise SetupError(f"sink did not start: {Path(sink.log).read_text(errors='replace')}")
            time.sleep(0.05)
        res["sink_cmd"] = " ".join(sink.cmd)
        mta = Mta(conf, mta_port, work, args.reception_processes)
        res["mta_cmd"] = f"PYTHONPATH={rb.CODE['dir']} " + " ".join(mta.cmd)
        mta.start()
        mta.wait_ready()
        time.sleep(0.3)

        # ------------------------------------------------ load, kills, restarts
        gen = KillLoad(args, mta, sink)
        budget = max(10.0, args.timeout - (time.monotonic() - t_start) - args.drain_timeout - 30)
        try:
            run_load(gen, budget)
        except Incomplete as exc:
            errors.append(str(exc))
        res["load_s"] = getattr(gen, "t_load", None)
        res["kills"] = gen.kills
        acked = {i for i, s in gen.status.items() if s == "ack"}
        res["acknowledged"] = len(acked)
        res["sessions"] = len(gen.status)
        res["connect_refused"] = gen.connect_refused
        res["gave_up"] = gen.gave_up
        for st in ("refused", "unknown", "unsent", "timeout"):
            res[st] = sum(1 for s in gen.status.values() if s == st)
        if len(acked) < args.n and not errors:
            errors.append(f"only {len(acked)} of {args.n} messages got a 250 "
                          f"({gen.gave_up} given up after --max-attempts)")
        if gen.sample:
            res["connect_error_sample"] = list(gen.sample)
        res["no250_sessions_ended"] = dict(gen.broke_at)

        # ------------------------------------------------ drain: every acked id at the sink
        t_drain = time.perf_counter()
        drain_end = time.monotonic() + min(args.drain_timeout,
                                           max(5.0, args.timeout - (time.monotonic() - t_start) - 20))
        while True:
            sink.scan()
            missing = [i for i in acked if i not in sink.counts]
            if not missing:
                res["e2e_s"] = time.perf_counter() - gen.t0
                break
            if time.monotonic() > drain_end:
                break
            if mta.proc.poll() is not None:
                errors.append(f"impetus serve exited {mta.proc.returncode} while draining")
                break
            time.sleep(0.25)
        res["drain_s"] = time.perf_counter() - t_drain
        time.sleep(args.settle)                     # late duplicates would show up here
        t_stop = time.monotonic()
        res["mta_exit"] = mta.stop(wait=30.0)
        res["mta_stop_s"] = time.monotonic() - t_stop
        if res["mta_exit"] != 0:
            errors.append(f"impetus serve exited {res['mta_exit']} on SIGTERM")
        res["sink_exit"] = rb.stop_proc(sink.proc, signal.SIGTERM, wait=10.0)
        sink.scan()

        # ------------------------------------------------ verdict
        delivered = set(sink.counts)
        lost = sorted(acked - delivered)
        res["delivered"] = len(delivered)
        res["deliveries"] = sum(sink.counts.values())
        res["lost"] = len(lost)
        res["lost_ids"] = lost[:50]
        dups = {i: c for i, c in sink.counts.items() if c > 1}
        res["duplicates"] = len(dups)
        res["duplicate_copies"] = sum(c - 1 for c in dups.values())
        res["duplicate_ids"] = sorted(dups)[:20]
        no250 = delivered - acked
        by = collections.Counter(gen.status.get(i, "never-sent") for i in no250)
        res["delivered_without_250"] = len(no250)
        res["delivered_without_250_by_outcome"] = dict(by)
        bad = sorted(i for i in no250 if gen.status.get(i) not in ("unknown", "timeout"))
        res["delivered_refused_or_unsent"] = len(bad)
        res["delivered_refused_or_unsent_ids"] = bad[:20]
        res["sink_foreign_files"] = sink.foreign
        if lost:
            errors.append(f"LOST: {len(lost)} acknowledged message(s) never reached the sink, "
                          f"ids {' '.join('%08d' % i for i in lost[:20])}")
        if bad:
            errors.append(f"{len(bad)} message(s) delivered although refused / never fully sent: "
                          + " ".join(f"{i:08d}({gen.status.get(i, 'never-sent')})" for i in bad[:20]))
        if res.get("load_s"):
            res["accept_rate"] = len(acked) / res["load_s"]
        if res.get("e2e_s"):
            res["e2e_rate"] = len(acked) / res["e2e_s"]
        for k in gen.kills:
            # a 250 on a connection opened before the kill, read after the whole tree was
            # dead: something of the killed incarnation survived the SIGKILL
            k["acks_after_death"] = [i for tc, ta, i in gen.ack_times
                                     if tc < k["t_kill_abs"] and ta > k["t_dead_abs"]]
            if k["acks_after_death"]:
                errors.append(f"kill #{k['n']}: {len(k['acks_after_death'])} 250 replies arrived "
                              f"after the killed MTA tree was dead, on connections opened before the "
                              f"kill (ids {k['acks_after_death'][:10]})")
            del k["t_kill_abs"], k["t_dead_abs"]
            at_sink = {sink.name_id.get(nm) for nm in k.pop("sink_names")}
            queued = [i for i in k.pop("acked_ids") if i not in at_sink]
            k["queued_acked_at_kill"] = len(queued)
            k["queued_acked_lost"] = sum(1 for i in queued if i not in sink.counts)
        res["downtime_s"] = sum(k.get("first_ack_after_s", 0.0) for k in gen.kills)
        inspect_logs(work, res, notes)
        if lost:
            keep = True
            notes.append(f"mainlog/paniclog/spool kept in {work}; a message's Message-ID is "
                         f"<NNNNNNNN.bench@source.{rb.DOMAIN}> (see serve.out for every start)")
    except SetupError as exc:
        errors.append(str(exc))
        res["setup_error"] = True
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        if mta is not None and mta.proc is not None and mta.proc.poll() is None:
            mta.stop(wait=10.0)
        if sink is not None and sink.proc.poll() is None:
            sink.paused = True
            sink.resume()
            rb.stop_proc(sink.proc, signal.SIGTERM, wait=5.0)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    res["kept"] = keep
    res["errors"] = errors
    res["notes"] = notes
    res["ok"] = not errors
    return res


def inspect_logs(work, res, notes):
    from impetus.logs import split_record
    counts, r_ids, d_ids = collections.Counter(), set(), set()
    try:
        with open(os.path.join(work, "mainlog.ec"), errors="replace") as fh:
            for line in fh:
                f = split_record(line.rstrip("\n"))
                if len(f) >= 5:
                    counts[f[4]] += 1
                    (r_ids if f[4] == "R" else d_ids if f[4] == "D" else set()).add(f[1])
    except FileNotFoundError:
        pass
    res["mainlog"] = dict(counts)
    # a kill loses the log lines still in the MTA's buffer: informational only (the
    # sink, not the log, decides what was delivered)
    res["mainlog_msgids_D_without_R"] = len(d_ids - r_ids)
    res["mainlog_msgids_R_without_D"] = len(r_ids - d_ids)
    if d_ids - r_ids:
        notes.append(f"mainlog: {len(d_ids - r_ids)} message(s) have a D but no R record (R lines "
                     f"not yet written at a kill), e.g. {sorted(d_ids - r_ids)[0]}")
    if r_ids - d_ids:
        notes.append(f"mainlog: {len(r_ids - d_ids)} message(s) have an R but no D record, "
                     f"e.g. {sorted(r_ids - d_ids)[0]}")
    pan = Path(work, "paniclog.ec")
    panic = pan.read_text(errors="replace").splitlines() if pan.exists() else []
    res["recovered_per_start"] = [int(m.group(1)) for l in panic
                                  for m in [re.search(r"recovered (\d+) queued messages", l)] if m]
    other = [l for l in panic if "impetus starting" not in l and "impetus stopped" not in l]
    res["paniclog_other"] = other[:10]
    if other:
        notes.append(f"paniclog: {len(other)} other lines, e.g. {other[0]!r}")
    out = Path(work, "serve.out")
    lines = out.read_text(errors="replace").splitlines() if out.exists() else []
    tb = [l for l in lines if l.startswith("Traceback")]
    if tb:
        last = [l for l in lines if l and not l.startswith((" ", "==="))][-1]
        notes.append(f"serve output: {len(tb)} tracebacks, e.g. {last!r}")


def fmt(v, prec=0):
    return rb.fmt(v, prec)


def report(r):
    kills = r.get("kills") or []
    rows = [
        ("messages / body size / sessions (1 msg/conn)", f"{r['n']} / {r['size']} B / {r['concurrency']}"),
        ("reception processes", str(r["reception_processes"])),
        ("kills (SIGKILL to the serve tree)", f"{len(kills)} of {r['kills_planned']} planned"),
    ]
    for k in kills:
        rows.append((f"  kill #{k['n']}",
                     f"at {k['t_kill']:.2f} s after {k['acked_at_kill']} acks; "
                     f"{len(k['pids'])} pids, reaped in {k['reap_s'] * 1000:.0f} ms; "
                     f"first 250 again after {fmt(k.get('first_ack_after_s'), 2)} s; "
                     f"{k.get('queued_acked_at_kill', '-')} acknowledged but not yet delivered "
                     f"at the kill ({k.get('queued_acked_lost', '-')} of them lost)"))
    rows += [
        ("SMTP sessions (with a connection) / connects refused", f"{r.get('sessions', '-')} / "
                                                                  f"{r.get('connect_refused', '-')}"),
        ("acknowledged (250 after DATA)", fmt(r.get("acknowledged"))),
        ("no 250: refused / unknown (lost after '.') / unsent / timeout",
         " / ".join(str(r.get(k, "-")) for k in ("refused", "unknown", "unsent", "timeout"))),
        ("  how those sessions ended", json.dumps(r.get("no250_sessions_ended", {}))),
        ("delivered (distinct ids at the sink) / deliveries", f"{r.get('delivered', '-')} / "
                                                              f"{r.get('deliveries', '-')}"),
        ("LOST (acknowledged, never delivered)", str(r.get("lost", "-"))),
        ("duplicates (ids delivered > once) / extra copies", f"{r.get('duplicates', '-')} / "
                                                            f"{r.get('duplicate_copies', '-')}"),
        ("delivered without 250 (in flight at a kill)",
         f"{r.get('delivered_without_250', '-')} "
         + json.dumps(r.get("delivered_without_250_by_outcome", {}))),
        ("delivered although refused / unsent (bug)", str(r.get("delivered_refused_or_unsent", "-"))),
        ("accepted msgs/s (acks / load time, kills included)",
         f"{fmt(r.get('accept_rate'))} ({fmt(r.get('load_s'), 1)} s)"),
        ("end-to-end msgs/s (acks / time until all at the sink)",
         f"{fmt(r.get('e2e_rate'))} ({fmt(r.get('e2e_s'), 1)} s)"),
        ("downtime per run (kill -> first 250 again, sum)", f"{fmt(r.get('downtime_s'), 2)} s"),
        ("recovered from the spool at each start", " ".join(map(str, r.get("recovered_per_start", []))) or "-"),
        ("mainlog records", " ".join(f"{k}={v}" for k, v in sorted(r.get("mainlog", {}).items())) or "-"),
        ("MTA exit on SIGTERM at the end (s)", f"{r.get('mta_exit', '-')} ({fmt(r.get('mta_stop_s'), 1)})"),
        ("code", f"{r.get('code_dir')} @ {(r.get('code_commit') or '?')[:10]}"
                 + (" + uncommitted changes" if r.get("code_dirty") else "")),
        ("result", "OK: no acknowledged message lost" if r["ok"] else "FAIL: " + "; ".join(r["errors"])),
    ]
    w = max(len(a) for a, _ in rows)
    out = [f"{a:<{w}}  {b}" for a, b in rows]
    out += [f"note: {n}" for n in r.get("notes", [])]
    if r.get("kept"):
        out.append(f"kept: {r['workdir']}")
    return "\n".join(out)


def summarize(rows):
    """Markdown, one row per run of a --jsonl file."""
    head = ["N", "recept. procs", "kills", "sink stall s", "acked", "queued acked at the kills",
            "LOST", "dupl.", "deliv. w/o 250", "refused/unsent deliv.", "acks after death",
            "downtime s per kill", "accepted msg/s", "e2e msg/s", "exit 0", "code"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ks = r.get("kills") or []
        cells = [r["n"], r["reception_processes"], len(ks), r.get("stall_sink", "-"),
                 r.get("acknowledged", "-"),
                 " + ".join(str(k.get("queued_acked_at_kill", "?")) for k in ks) or "-",
                 f"**{r.get('lost', '-')}**", r.get("duplicates", "-"), r.get("delivered_without_250", "-"),
                 r.get("delivered_refused_or_unsent", "-"),
                 sum(len(k.get("acks_after_death", [])) for k in ks),
                 " / ".join(fmt(k.get("first_ack_after_s"), 2) for k in ks) or "-",
                 fmt(r.get("accept_rate")), fmt(r.get("e2e_rate")),
                 "yes" if r.get("mta_exit") == 0 else r.get("mta_exit", "-"),
                 (r.get("code_commit") or "?")[:7] + ("+dirty" if r.get("code_dirty") else "")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    bad = [r for r in rows if not r.get("ok")]
    for r in bad:
        out.append(f"\nFAILED {r['time']}: " + "; ".join(r.get("errors", [])))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=6000, help="messages (default %(default)s)")
    ap.add_argument("-s", "--size", type=int, default=5120, help="body bytes (default %(default)s)")
    ap.add_argument("-c", "--concurrency", type=int, default=20, help="parallel sessions (default %(default)s)")
    ap.add_argument("--kills", type=int, default=1, metavar="K", help="number of kill -9s (default %(default)s)")
    ap.add_argument("--kill-at", type=float, default=0.4, metavar="F",
                    help="first kill when F x N messages are acknowledged (default %(default)s)")
    ap.add_argument("--kill-last", type=float, default=0.8, metavar="F",
                    help="with --kills > 1: last kill at F x N acknowledged, the others evenly "
                         "in between (default %(default)s)")
    ap.add_argument("--kill-jitter", type=float, default=0.2, metavar="S",
                    help="kill a random 0..S seconds after the threshold is crossed, not right at "
                         "an acknowledgement (default %(default)s)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for the kill jitter")
    ap.add_argument("--stall-sink", type=float, default=0.5, metavar="S",
                    help="SIGSTOP the sink S seconds before each kill (SIGCONT once the MTA is dead), "
                         "so that acknowledged messages are queued in the spool at the kill "
                         "(0: plain kill; default %(default)s)")
    ap.add_argument("--down", type=float, default=0.0, metavar="S",
                    help="seconds between the death of the MTA and its restart (default 0)")
    ap.add_argument("--reception-processes", type=int, default=0, metavar="N",
                    help="impetus serve --reception-processes N (default 0: one process)")
    ap.add_argument("--max-outbound", type=int, default=20, help="Max_Outbound_Connections (default %(default)s)")
    ap.add_argument("--no-retry", action="store_true",
                    help="a session without a 250 is not retried (the message is just not acknowledged)")
    ap.add_argument("--max-attempts", type=int, default=50,
                    help="sessions per message before giving up (default %(default)s)")
    ap.add_argument("--session-timeout", type=float, default=30.0, help="per SMTP session (default %(default)s)")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="wait this long for the acknowledged messages to reach the sink (default %(default)s)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after the last acknowledged id arrived (duplicates; default %(default)s)")
    ap.add_argument("--timeout", type=float, default=400.0, help="whole-run limit in s (default %(default)s)")
    ap.add_argument("--selftest-wipe-spool", action="store_true",
                    help="harness self-test: delete the spool at each kill, so acknowledged "
                         "messages ARE lost; the run must then FAIL and list them")
    ap.add_argument("--code", metavar="DIR", help="import impetus from DIR (default: this repository)")
    ap.add_argument("--snapshot", metavar="REF",
                    help="test git REF's committed impetus/ (extracted to a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (always kept on a loss)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    ap.add_argument("--jsonl", metavar="FILE", help="append the result's JSON to FILE")
    ap.add_argument("--summarize", metavar="JSONL", help="print a Markdown table of FILE's runs and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as fh:
            print(summarize([json.loads(l) for l in fh if l.strip()]))
        return 0
    if args.n <= 0 or args.concurrency <= 0 or args.size < 0 or args.kills < 0:
        ap.error("-n and -c must be positive, -s and --kills non-negative")
    if not 0 < args.kill_at < 1 or (args.kills > 1 and not args.kill_at < args.kill_last < 1):
        ap.error("need 0 < --kill-at < --kill-last < 1")

    def on_term(signum, frame):          # timeout(1)/kill: clean up our children first
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    snapdir = None
    try:
        if args.snapshot:
            snapdir = tempfile.mkdtemp(prefix="impetus-snap-")
            rb.CODE["commit"] = rb.snapshot(args.snapshot, snapdir)
            rb.CODE["dir"] = snapdir
        elif args.code:
            rb.CODE["dir"] = os.path.abspath(args.code)
        res = run(args)
    finally:
        if snapdir:
            shutil.rmtree(snapdir, ignore_errors=True)
    print(report(res), flush=True)
    line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})
    if args.json:
        print(line)
    if args.jsonl:
        with open(args.jsonl, "a") as fh:
            fh.write(line + "\n")
    if res.get("setup_error"):
        return 2
    if "interrupted" in res["errors"]:
        return 130
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
