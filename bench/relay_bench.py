#!/usr/bin/env python3
"""Relay benchmark for Impetus: load generator -> ``impetus serve`` -> sink.

    python3 bench/relay_bench.py -n 2000 -s 5120 -c 20 [--sink impetus|smtp-sink]
                                 [--route dns|gateway] [--json] [--keep]

One run, all on 127.0.0.1:

1. A temp dir gets a spool, logs and an ``ecelerity.conf`` for ``impetus
   serve`` (listener on a free port, ``Relay_Hosts = ( "127.0.0.0/8" )``).
   Routing (default ``--route dns``): an in-process dnslib server
   (``tests.peers.dns_server.DnsServer``) answers ``bench.test MX 10
   sink.bench.test`` and ``sink.bench.test A 127.0.0.1``; the config points
   ``Resolv_Conf`` at it and ``Remote_SMTP_Port`` at the sink.
   ``--route gateway`` uses ``Gateway = "127.0.0.1:PORT"`` instead (only
   when ``impetus check-config`` accepts it).
2. The sink: ``impetus sink --count-file F`` (running total in F, rewritten
   at most every 50 ms) or Postfix's ``smtp-sink -c`` (running counter
   ``mesg=N`` on its stdout).  Then ``impetus serve -c CONF``; we wait for
   its 220 greeting.  Both run as ``python -m impetus.cli`` with PYTHONPATH
   set to the code under test (this repository, ``--code DIR`` or
   ``--snapshot REF``), never through the console script, which another
   ``pip install -e`` can re-point at a different checkout.
3. The load generator is in this process: asyncio (uvloop when available),
   C concurrent sessions, one message per connection like smtp-source's
   default: connect, 220, EHLO, MAIL, RCPT, DATA, headers + SIZE bytes of
   body + ".", QUIT.  One command per write, nothing pipelined; the message
   bytes are pre-built (only the Message-ID digits change).  Injection
   latency = time from the write that carries the message and its final
   "." to the arrival of the 250 reply.  ``--loadgen smtp-source`` uses Postfix's
   smtp-source instead (as in the Postfix baseline; no latencies);
   ``--direct`` leaves the MTA out (load generator -> sink: the ceiling).
4. Figures: accepted msgs/s = N / (time from start until the last 250);
   end-to-end msgs/s = N / (time from start until the sink counted N);
   latency percentiles; CPU of the ``impetus serve`` process tree and of the
   sink (from /proc/<pid>/stat, only the interval of the run); the MTA's
   peak RSS (VmHWM); machine busy CPU and the part of it that belongs to
   none of the three ("other CPU", i.e. the machine was not idle).
   Checks: the sink got exactly N (more = duplicates, reported), mainlog has
   N ``R`` and N ``D`` and no ``T``/``P`` records, rejectlog and bouncelog are
   empty, ``impetus serve`` exits 0 on SIGTERM.  Paniclog crash lines and
   tracebacks on the MTA's output are reported as warnings.
   Several runs: ``--reps``, ``--jsonl FILE``, ``--summarize FILE``.

Exit status 0 if every check passed, 1 otherwise, 2 on a usage/setup error.
Everything this script starts is stopped by PID (the MTA by its own
process group, which this script created), also on timeout or Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLK = os.sysconf("SC_CLK_TCK")
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
DOMAIN = "bench.test"
SENDER = "sender@source.bench.test"
RCPT = f"rcpt@{DOMAIN}"


# ---------------------------------------------------------------- /proc helpers
def pstat(pid):
    """(ppid, utime+stime, cutime+cstime) in clock ticks, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14])


def descendants(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = pstat(int(d))
            if st:
                kids.setdefault(st[0], []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_ticks(root):
    """CPU ticks of a process tree: root own + reaped children, plus own +
    reaped of every live descendant (threads are inside their process)."""
    st = pstat(root)
    if st is None:
        return None
    tot = st[1] + st[2]
    for pid in descendants(root):
        d = pstat(pid)
        if d:
            tot += d[1] + d[2]
    return tot


def status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tree_hwm_kb(root):
    """Peak RSS (VmHWM) of the root plus that of its live descendants."""
    vals = [status_kb(p, "VmHWM") for p in [root] + descendants(root)]
    vals = [v for v in vals if v is not None]
    return sum(vals) if vals else None


def sys_cpu():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


def wait_quiet(max_wait, threshold_pct):
    """Wait (up to max_wait s) until the machine is busy below threshold_pct
    of ONE core over a 1 s window; returns the last reading."""
    end = time.monotonic() + max_wait
    while True:
        b0, t0 = sys_cpu()
        time.sleep(1.0)
        b1, t1 = sys_cpu()
        pct = 100.0 * (b1 - b0) / max(1, t1 - t0) * os.cpu_count()
        if pct <= threshold_pct or time.monotonic() > end:
            return pct


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mainlog_counts(path):
    from impetus.logs import split_record  # REPO is on sys.path by now
    counts = {}
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                f = split_record(line.rstrip("\n"))
                if len(f) >= 5:
                    counts[f[4]] = counts.get(f[4], 0) + 1
    except FileNotFoundError:
        pass
    return counts


# ---------------------------------------------------------------- code under test
CODE = {"dir": str(REPO)}       # set by main(): where the impetus package is imported from


def impetus_cmd(*args):
    """``impetus ARGS`` run from CODE["dir"] (python -m impetus.cli with
    PYTHONPATH), never through the console script: an editable install can be
    re-pointed at another checkout by anyone running ``pip install -e``."""
    return [sys.executable, "-m", "impetus.cli", *args]


def impetus_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = CODE["dir"] + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def snapshot(ref, into):
    """Extract the impetus package of git REF (e.g. HEAD) into `into`;
    returns the full commit id."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref + "^{commit}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    arch = subprocess.run(["git", "-C", str(REPO), "archive", sha, "impetus"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=arch, check=True)
    return sha


def code_identity():
    """(commit, dirty files under impetus/) of CODE["dir"], best effort."""
    d = CODE["dir"]
    if CODE.get("commit"):
        return CODE["commit"], False
    try:
        sha = subprocess.run(["git", "-C", d, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", "impetus"],
                               capture_output=True, text=True).stdout.strip()
        return sha, bool(dirty)
    except (subprocess.CalledProcessError, OSError):
        return None, None


# ---------------------------------------------------------------- sinks
class ImpetusSink:
    name = "impetus"

    def __init__(self, port, workdir):
        self.count_file = os.path.join(workdir, "sink.count")
        self.log = os.path.join(workdir, "sink.out")
        self.cmd = impetus_cmd("sink", "--listen", f"127.0.0.1:{port}",
                               "--count-file", self.count_file, "--hostname", f"sink.{DOMAIN}")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=impetus_env(), cwd=CODE["dir"])

    def count(self):
        try:
            with open(self.count_file) as fh:
                return int(fh.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def ready(self):
        return os.path.exists(self.count_file)

    def final_count(self):
        m = re.findall(r"received (\d+) messages", Path(self.log).read_text(errors="replace"))
        return int(m[-1]) if m else self.count()


class PostfixSink:
    """smtp-sink -c: writes "sess=A quit=B mesg=C\\r" records to stdout."""
    name = "smtp-sink"

    def __init__(self, port, workdir):
        self.log = os.path.join(workdir, "sink.out")
        self.cmd = [SMTP_SINK, "-c", f"127.0.0.1:{port}", "1024"]
        if os.geteuid() == 0:
            self.cmd[1:1] = ["-u", "nobody"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.fd = None

    def count(self):
        if self.fd is None:
            self.fd = os.open(self.log, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, 256, max(0, size - 256)).decode("ascii", "replace")
        recs = data.split("\r")
        for rec in reversed(recs if data.endswith("\r") else recs[:-1]):
            m = re.search(r"mesg=(\d+)", rec)
            if m:
                return int(m.group(1))
        return 0

    def ready(self):
        return True

    def final_count(self):
        found = re.findall(r"mesg=(\d+)", Path(self.log).read_text(errors="replace"))
        return int(found[-1]) if found else 0


class PostfixUnderTest:
    """``--mta postfix``: the shared baseline's private Postfix instance
    (``postfix_baseline.sh setup`` wrote it), with an empty queue, its
    relayhost pointed at this run's sink. Started and stopped through the
    shared harness's ``Postfix`` class, so both benchmarks treat it alike.
    ``pid``/``poll()`` stand for the master, whose tree (master + daemons,
    reaped ones included through its cutime) is the MTA's CPU and RSS."""

    def __init__(self, conf, port, sink_port):
        # $SHARED (set by compare_postfix.sh) lets a checkout elsewhere find it.
        shared = Path(os.environ.get("SHARED") or REPO.parent / "shared" / "bench")
        if str(shared) not in sys.path:
            sys.path.insert(0, str(shared))
        import bench_harness                       # the shared Postfix baseline harness
        if not os.path.exists(os.path.join(conf, "main.cf")):
            raise SetupError(f"no Postfix instance in {conf}: run "
                             f"bash {shared}/postfix_baseline.sh setup")
        self.conf = conf
        self.relayhost = subprocess.run(["postconf", "-c", conf, "-h", "relayhost"],
                                        capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["postconf", "-c", conf, "-e", f"relayhost = [127.0.0.1]:{sink_port}"],
                       check=True)
        self.pf = bench_harness.Postfix(conf)
        self.port = port
        self.pid = None

    def start(self, policy="normal"):
        self.pid = self.pf.start(self.port)
        if policy == "batch":
            batch_tree(self.pid)
        return self

    def poll(self):
        return None if self.pid and pstat(self.pid) else 0

    def log_counts(self):
        return self.pf.log_counts()

    def stop(self):
        self.pf.stop()
        # leave the shared instance as postfix_baseline.sh wrote it
        subprocess.run(["postconf", "-c", self.conf, "-e", f"relayhost = {self.relayhost}"])


def batch_tree(pid):
    """``--postfix-policy batch``: put Postfix under the scheduling policy
    Impetus uses by default (SCHED_BATCH), for a like-for-like comparison.
    Every thread of the master and of its children now; daemons the master
    forks later inherit it."""
    from impetus.cpu_policy import thread_ids  # REPO is on sys.path by now
    for p in [pid] + descendants(pid):
        for tid in thread_ids(p):
            try:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            except OSError:
                pass


def port_answers(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def stop_proc(proc, sig=signal.SIGTERM, wait=30.0):
    """Signal our child (and its process group, which we created), wait,
    SIGKILL if needed.  Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


# ---------------------------------------------------------------- load generator
def build_message(size):
    """(prefix, suffix) bytes: the message is prefix + 8 digits + suffix, with
    headers, `size` bytes of body in 78-char lines, and the final '.'."""
    hdr1 = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: impetus relay bench\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <").encode()
    hdr2 = f".bench@source.{DOMAIN}>\r\n\r\n".encode()
    line = b"X" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest >= 3:
        body += b"Y" * (rest - 2) + b"\r\n"
    elif rest:
        body += b"Y" * rest + b"\r\n"
    return hdr1, hdr2 + body + b".\r\n"


class Client(asyncio.Protocol):
    """One SMTP session, one message.  Sends a command, waits for its
    complete reply, sends the next; no pipelining."""

    __slots__ = ("gen", "num", "t", "buf", "step", "done", "tr", "err")
    STEPS = ("banner", "ehlo", "mail", "rcpt", "data", "dot", "quit")
    WANT = (b"220", b"250", b"250", b"250", b"354", b"250", b"221")

    def __init__(self, gen, num, done):
        self.gen, self.num, self.done = gen, num, done
        self.buf = b""
        self.step = 0
        self.tr = None
        self.t = 0.0
        self.err = None

    def connection_made(self, tr):
        self.tr = tr

    def data_received(self, data):
        buf = self.buf + data
        # a reply is complete when its last line "NNN text\r\n" (no '-') is in
        if not buf.endswith(b"\r\n"):
            self.buf = buf
            return
        i = buf.rfind(b"\r\n", 0, len(buf) - 2)
        start = i + 2 if i >= 0 else 0          # start of the last line
        if buf[start + 3:start + 4] == b"-":
            self.buf = buf
            return
        self.buf = b""
        step = self.step
        if buf[:3] != self.WANT[step]:
            self.fail(f"{self.STEPS[step]}: {buf[:200]!r}")
            return
        g = self.gen
        if step == 5:
            g.lat.append(time.perf_counter() - self.t)
            g.accepted += 1
            g.t_last_250 = time.perf_counter()
        self.step = step = step + 1
        w = self.tr.write
        if step == 1:
            w(g.ehlo)
        elif step == 2:
            w(g.mail)
        elif step == 3:
            w(g.rcpt)
        elif step == 4:
            w(g.data)
        elif step == 5:
            self.t = time.perf_counter()
            w(g.prefix + b"%08d" % self.num + g.suffix)
        elif step == 6:
            w(b"QUIT\r\n")
        else:
            self.tr.close()

    def fail(self, why):
        if self.err is None:
            self.err = why
        if self.tr is not None:
            self.tr.close()

    def connection_lost(self, exc):
        if self.step < 7 and self.err is None:
            self.err = f"connection lost at {self.STEPS[self.step]}: {exc}"
        if self.err is not None:
            self.gen.errors.append(self.err)
        if not self.done.done():
            self.done.set_result(None)


class LoadGen:
    def __init__(self, port, n, size, conc, counter, timeout, rate=0.0):
        self.port, self.n, self.conc = port, n, conc
        # rate > 0: paced (open loop up to conc sessions): message k starts
        # its connection no earlier than k / rate seconds after the start, so
        # latency is measured at a chosen load instead of at saturation.
        self.rate = rate
        self.counter = counter
        self.timeout = timeout
        self.prefix, self.suffix = build_message(size)
        self.msg_bytes = len(self.prefix) + 8 + len(self.suffix) - 3  # without ".\r\n"
        self.ehlo = b"EHLO loadgen.bench.test\r\n"
        self.mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{RCPT}>\r\n".encode()
        self.data = b"DATA\r\n"
        self.lat = []
        self.accepted = 0
        self.errors = []
        self.next = 0
        self.t_last_250 = None
        self.t_e2e = None

    async def session_worker(self):
        loop = asyncio.get_running_loop()
        while self.next < self.n:
            num = self.next
            self.next += 1
            if self.rate:
                due = self.t0 + num / self.rate - time.perf_counter()
                if due > 0:
                    await asyncio.sleep(due)
            done = loop.create_future()
            try:
                await loop.create_connection(lambda: Client(self, num, done), "127.0.0.1", self.port)
            except OSError as exc:
                self.errors.append(f"connect: {exc}")
                continue
            await done

    async def watch_sink(self):
        while True:
            if self.counter() >= self.n:
                self.t_e2e = time.perf_counter()
                return
            await asyncio.sleep(0.01)

    async def run(self):
        self.t0 = time.perf_counter()
        workers = [asyncio.ensure_future(self.session_worker()) for _ in range(self.conc)]
        watcher = asyncio.ensure_future(self.watch_sink())
        try:
            await asyncio.wait_for(asyncio.gather(*workers), self.timeout)
            remaining = self.timeout - (time.perf_counter() - self.t0)
            await asyncio.wait_for(watcher, max(1.0, remaining))
        except asyncio.TimeoutError:
            self.errors.append(f"timeout after {self.timeout:.0f}s (accepted {self.accepted}, "
                               f"sink counted {self.counter()})")
        finally:
            for t in workers + [watcher]:
                t.cancel()


def run_load(port, n, size, conc, counter, timeout, rate=0.0):
    gen = LoadGen(port, n, size, conc, counter, timeout, rate)
    factory = None
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as r:
        r.run(gen.run())
    return gen, factory is not None


# ---------------------------------------------------------------- one run
CONF = """\
Spoolbase = "{work}/spool"
Hostname = "bench.impetus"
{route}
Max_Outbound_Connections = {maxout}
ec_logger {{ mainlog = "{work}/mainlog.ec" rejectlog = "{work}/rejectlog.ec" paniclog = "{work}/paniclog.ec" }}
bounce_logger {{ bouncelog = "{work}/bouncelog.ec" }}
ESMTP_Listener {{ Relay_Hosts = ( "127.0.0.0/8" ) Listen "127.0.0.1:{port}" {{ }} }}
"""

ZONE = f"""\
test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
{DOMAIN}. 300 IN MX 10 sink.{DOMAIN}.
sink.{DOMAIN}. 300 IN A 127.0.0.1
"""


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    # nearest rank
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


class SmtpSourceLoad:
    """--loadgen smtp-source: Postfix's smtp-source as the load generator
    (the tool of the Postfix baseline).  Accepted = its exit (it exits after
    the last 250); no per-message latency; CPU from wait4()."""

    def __init__(self, port, n, size, conc, counter, timeout, workdir):
        self.cmd = [SMTP_SOURCE, "-s", str(conc), "-m", str(n), "-l", str(size),
                    "-M", f"source.{DOMAIN}", "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
        self.n, self.counter, self.timeout = n, counter, timeout
        self.log = os.path.join(workdir, "smtp-source.out")
        self.lat, self.errors = [], []
        self.accepted = 0
        self.msg_bytes = None
        self.t_last_250 = self.t_e2e = None
        self.cpu_s = 0.0

    def run(self):
        import threading
        out = open(self.log, "wb")
        self.t0 = time.perf_counter()
        proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        out.close()
        done = {}

        def reap():
            _pid, status, ru = os.wait4(proc.pid, 0)
            done["t"] = time.perf_counter()
            done["rc"] = os.waitstatus_to_exitcode(status)
            done["cpu"] = ru.ru_utime + ru.ru_stime
        th = threading.Thread(target=reap, daemon=True)
        th.start()
        deadline = self.t0 + self.timeout
        while True:
            now = time.perf_counter()
            if self.t_e2e is None and self.counter() >= self.n:
                self.t_e2e = now
            if "t" in done and self.t_e2e is not None:
                break
            if now > deadline:
                self.errors.append(f"timeout after {self.timeout:.0f}s (sink counted {self.counter()})")
                if "t" not in done:
                    os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        th.join(10)
        proc.returncode = done.get("rc")
        if "t" in done:
            self.t_last_250 = done["t"]
            self.cpu_s = done["cpu"]
            if done["rc"] == 0:
                self.accepted = self.n
            else:
                self.errors.append(f"smtp-source exited {done['rc']}: "
                                   + Path(self.log).read_text(errors="replace")[-300:])


def run(args):
    direct = args.direct
    res = {"n": args.n, "size": args.size, "concurrency": args.concurrency, "sink": args.sink,
           "route": "direct" if direct else ("relayhost" if args.mta == "postfix" else args.route),
           "loadgen": args.loadgen, "rate": args.rate,
           "max_outbound": args.max_outbound, "ok": False,
           "mta": None if args.direct else args.mta,
           "reception_processes": args.reception_processes,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    work = tempfile.mkdtemp(prefix="impetus-bench-")
    res["workdir"] = work
    errors = []
    res["code_dir"] = CODE["dir"]
    res["code_commit"], res["code_dirty"] = code_identity()
    if "file" not in CODE:      # where `python -m impetus.cli` really imports from
        CODE["file"] = subprocess.run([sys.executable, "-c", "import impetus; print(impetus.__file__)"],
                                      capture_output=True, text=True, env=impetus_env(),
                                      cwd=CODE["dir"]).stdout.strip()
    res["code_file"] = CODE["file"]
    if not CODE["file"].startswith(CODE["dir"] + os.sep):
        errors.append(f"impetus imports from {CODE['file']!r}, not from {CODE['dir']!r}")
    dns = sink = mta = prof = postfix = None
    try:
        if args.quiet_wait > 0:
            res["pre_run_busy_pct_of_core"] = round(wait_quiet(args.quiet_wait, args.quiet_pct), 1)
        t_start = time.monotonic()
        mta_port, sink_port = free_port(), free_port()
        while sink_port == mta_port:
            sink_port = free_port()
        conf = os.path.join(work, "ecelerity.conf")
        postfix = None
        if not direct and args.mta == "postfix":
            postfix = PostfixUnderTest(args.pf_conf, args.pf_port, sink_port)
            mta_port = args.pf_port
        elif not direct:
            if args.route == "dns":
                from tests.peers.dns_server import DnsServer
                dns = DnsServer(work, ZONE, servfail=(), no_reply=(), garbage=(), truncated=()).start()
                route = f'Resolv_Conf = "{dns.resolv_conf}"\nRemote_SMTP_Port = {sink_port}'
            else:
                route = f'Gateway = "127.0.0.1:{sink_port}"'
            Path(conf).write_text(CONF.format(work=work, route=route, port=mta_port,
                                              maxout=args.max_outbound))
            chk = subprocess.run(impetus_cmd("check-config", "-c", conf), capture_output=True,
                                 text=True, env=impetus_env(), cwd=CODE["dir"])
            if chk.returncode != 0:
                raise SetupError(f"impetus check-config failed:\n{chk.stdout}{chk.stderr}")

        sink = (ImpetusSink if args.sink == "impetus" else PostfixSink)(sink_port, work)
        res["sink_cmd"] = " ".join(sink.cmd)
        end = time.monotonic() + 15
        while not (sink.ready() and port_answers(sink_port)):
            if sink.proc.poll() is not None or time.monotonic() > end:
                raise SetupError(f"sink did not start: {Path(sink.log).read_text(errors='replace')}")
            time.sleep(0.05)
        target = sink_port
        if postfix is not None:
            mta = postfix.start(args.postfix_policy)
            res["mta_cmd"] = f"postfix -c {args.pf_conf} start (relayhost [127.0.0.1]:{sink_port})"
            res["postfix_policy"] = args.postfix_policy
            target = mta_port
        elif not direct:
            mta_cmd = impetus_cmd("serve", "-c", conf,
                                  *(["--reception-processes", str(args.reception_processes)]
                                    if args.reception_processes else []))
            res["mta_cmd"] = f"PYTHONPATH={CODE['dir']} " + " ".join(mta_cmd)
            with open(os.path.join(work, "serve.out"), "wb") as out:
                mta = subprocess.Popen(mta_cmd, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env=impetus_env(), cwd=CODE["dir"])
            end = time.monotonic() + 30
            while not port_answers(mta_port):
                if mta.poll() is not None or time.monotonic() > end:
                    raise SetupError("impetus serve did not answer 220:\n"
                                     + Path(work, "serve.out").read_text(errors="replace"))
                time.sleep(0.05)
            target = mta_port
            if args.profile:
                prof = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--format", "raw",
                                         "-r", "200", "--nonblocking", "-o", args.profile,
                                         *(["--subprocesses"] if args.reception_processes else []),
                                         "-p", str(mta.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL)
                res["profiled"] = True
        time.sleep(0.5 if not prof else 1.5)
        base = sink.count()          # smtp-sink's probe sessions carry no message, but be safe

        def counter():
            return sink.count() - base

        # ------------------------------------------------ measure
        mta0 = tree_ticks(mta.pid) if mta else None
        sink0 = tree_ticks(sink.proc.pid)
        self0 = os.times()
        busy0, tot0 = sys_cpu()
        budget = max(10.0, args.timeout - (time.monotonic() - t_start) - 20)
        if args.loadgen == "smtp-source":
            gen = SmtpSourceLoad(target, args.n, args.size, args.concurrency, counter, budget, work)
            res["loadgen_cmd"] = " ".join(gen.cmd)
            gen.run()
            res["uvloop"] = None
        else:
            gen, res["uvloop"] = run_load(target, args.n, args.size, args.concurrency, counter, budget,
                                          args.rate)
        busy1, tot1 = sys_cpu()
        self1 = os.times()
        mta1 = tree_ticks(mta.pid) if mta else None
        sink1 = tree_ticks(sink.proc.pid)
        if mta:
            res["mta_peak_rss_mb"] = round((tree_hwm_kb(mta.pid) or 0) / 1024.0, 1)
            res["mta_threads"] = (sum(1 for _ in os.scandir(f"/proc/{mta.pid}/task"))
                                  if mta.poll() is None else None)
        errors += gen.errors[:20]
        res["client_errors"] = len(gen.errors)
        res["message_bytes"] = gen.msg_bytes
        res["accepted"] = gen.accepted
        if gen.t_last_250 is not None and gen.accepted:
            res["accept_s"] = gen.t_last_250 - gen.t0
            res["accept_rate"] = gen.accepted / res["accept_s"]
        if gen.t_e2e is not None:
            # the sink count is polled (and impetus sink rewrites its count file
            # at most every 50 ms): never report end-to-end before accepted
            e2e = gen.t_e2e if gen.t_last_250 is None else max(gen.t_e2e, gen.t_last_250)
            res["e2e_s"] = e2e - gen.t0
            res["e2e_rate"] = args.n / res["e2e_s"]
        lat = sorted(gen.lat)
        for p in (50, 90, 99):
            v = pct(lat, p)
            res[f"lat_p{p}_ms"] = None if v is None else v * 1000.0
        res["lat_max_ms"] = lat[-1] * 1000.0 if lat else None
        res["lat_mean_ms"] = statistics.fmean(lat) * 1000.0 if lat else None
        window = (res.get("e2e_s") or (time.perf_counter() - gen.t0))
        if mta0 is not None and mta1 is not None:
            res["mta_cpu_s"] = (mta1 - mta0) / CLK
            res["mta_cpu_ms_per_msg"] = 1000.0 * res["mta_cpu_s"] / args.n
            res["mta_cores"] = res["mta_cpu_s"] / window
        if sink0 is not None and sink1 is not None:
            res["sink_cpu_s"] = (sink1 - sink0) / CLK
            res["sink_cpu_ms_per_msg"] = 1000.0 * res["sink_cpu_s"] / args.n
        res["loadgen_cpu_s"] = ((self1.user + self1.system) - (self0.user + self0.system)
                                + getattr(gen, "cpu_s", 0.0))
        res["loadgen_cpu_ms_per_msg"] = 1000.0 * res["loadgen_cpu_s"] / args.n
        res["machine_busy_cpu_s"] = (busy1 - busy0) / CLK
        res["machine_util_pct"] = 100.0 * (busy1 - busy0) / max(1, tot1 - tot0) * os.cpu_count()
        other = (res["machine_busy_cpu_s"] - res.get("mta_cpu_s", 0) - res.get("sink_cpu_s", 0)
                 - res["loadgen_cpu_s"])
        res["other_cpu_s"] = other
        res["other_pct_of_capacity"] = 100.0 * other / (os.cpu_count() * window)
        res["disturbed"] = res["other_pct_of_capacity"] > args.disturbed_pct

        # ------------------------------------------------ stop and verify
        time.sleep(args.settle)              # late duplicates would show up here
        if postfix is not None:
            res["postfix_log"] = postfix.log_counts()
            postfix.stop()
            mta = None
        if mta:
            t_stop = time.monotonic()
            res["mta_exit"] = stop_proc(mta, signal.SIGTERM, wait=30.0)
            res["mta_stop_s"] = time.monotonic() - t_stop
            mta = None
            if res["mta_exit"] != 0:
                errors.append(f"impetus serve exited {res['mta_exit']} on SIGTERM")
        if prof:
            try:
                prof.wait(15)       # py-spy writes its output when the MTA exits
            except subprocess.TimeoutExpired:
                prof.send_signal(signal.SIGINT)
                prof.wait(10)
            prof = None
        res["sink_exit"] = stop_proc(sink.proc, signal.SIGTERM, wait=10.0)
        res["sink_received"] = sink.final_count() - base
        res["duplicates"] = max(0, res["sink_received"] - args.n)
        if res["sink_received"] < args.n:
            errors.append(f"sink received {res['sink_received']} < {args.n}")
        elif res["duplicates"]:
            errors.append(f"sink received {res['sink_received']} > {args.n}: "
                          f"{res['duplicates']} duplicates")
        if not direct and postfix is None:
            verify_logs(work, args.n, res, errors)
        if dns is not None:
            res["dns_queries"] = dns.query_count()
    except SetupError as exc:
        errors.append(str(exc))
        res["setup_error"] = True
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        if postfix is not None and mta is not None:
            postfix.stop()
            mta = None
        if mta is not None:
            stop_proc(mta, signal.SIGTERM, wait=10.0)
        if sink is not None and sink.proc.poll() is None:
            stop_proc(sink.proc, signal.SIGTERM, wait=5.0)
        if prof is not None and prof.poll() is None:
            prof.send_signal(signal.SIGINT)
            try:
                prof.wait(10)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()
        if dns is not None:
            dns.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["errors"] = errors
    res["ok"] = not errors
    return res


def verify_logs(work, n, res, errors):
    """mainlog: N R and N D records, no T/P; reject/bounce logs empty;
    paniclog and serve output: anything but start/stop notices is reported."""
    counts = mainlog_counts(os.path.join(work, "mainlog.ec"))
    res["mainlog"] = counts
    for t in ("R", "D"):
        if counts.get(t, 0) != n:
            errors.append(f"mainlog has {counts.get(t, 0)} {t} records, expected {n}")
    for t in ("T", "P"):
        if counts.get(t):
            errors.append(f"mainlog has {counts[t]} {t} records")
    for name in ("rejectlog.ec", "bouncelog.ec"):
        p = Path(work, name)
        k = len(p.read_text(errors="replace").splitlines()) if p.exists() else 0
        res[name.split(".")[0] + "_lines"] = k
        if k:
            errors.append(f"{name} has {k} lines")
    pan = Path(work, "paniclog.ec")
    panic = pan.read_text(errors="replace").splitlines() if pan.exists() else []
    res["paniclog_other"] = [l for l in panic if "impetus starting" not in l
                             and "impetus stopped" not in l][:10]
    out = Path(work, "serve.out")
    lines = out.read_text(errors="replace").splitlines() if out.exists() else []
    other = [l for l in lines if not l.startswith(
        ("impetus: listening", "impetus: started", "impetus: shutting down"))]
    res["serve_output_other"] = other[:12]
    # not a failed delivery, but a bug worth seeing: crashes, tracebacks, panics
    warn = []
    crashes = sum(1 for l in panic if "crashed" in l)
    if crashes:
        warn.append(f"paniclog: {crashes} crash lines, e.g. {next(l for l in panic if 'crashed' in l)!r}")
    elif res["paniclog_other"]:
        warn.append(f"paniclog: {res['paniclog_other'][0]!r}")
    tb = sum(1 for l in other if l.startswith("Traceback"))
    if tb:
        last = [l for l in other if l and not l.startswith(" ")][-1]
        warn.append(f"serve output: {tb} tracebacks, e.g. {last!r}")
    res["warnings"] = warn


class SetupError(Exception):
    pass


def fmt(v, prec=0):
    if v is None:
        return "-"
    return f"{v:,.{prec}f}".replace(",", " ")


def table(r):
    rows = [
        ("messages", fmt(r["n"])),
        ("body size (B) / message bytes sent", f"{r['size']} / {r.get('message_bytes', '-')}"),
        ("concurrency (1 msg/conn)", str(r["concurrency"])),
        ("load generator / sink / route", f"{r.get('loadgen', 'asyncio')}"
                                          f"{' paced at %g msg/s' % r['rate'] if r.get('rate') else ''}"
                                          f" / {r['sink']} / {r['route']}"),
        ("accepted msgs/s (N / time to last 250)", fmt(r.get("accept_rate"), 0)),
        ("end-to-end msgs/s (N / time to sink count N)", fmt(r.get("e2e_rate"), 0)),
        ("injection latency p50 / p90 / p99 / max (ms)",
         " / ".join(fmt(r.get(k), 1) for k in ("lat_p50_ms", "lat_p90_ms", "lat_p99_ms", "lat_max_ms"))),
        ("MTA CPU s (ms/msg, cores)", f"{fmt(r.get('mta_cpu_s'), 2)} ({fmt(r.get('mta_cpu_ms_per_msg'), 2)}, "
                                      f"{fmt(r.get('mta_cores'), 2)})"),
        ("MTA peak RSS (MB, VmHWM)", fmt(r.get("mta_peak_rss_mb"), 1)),
        ("sink CPU s (ms/msg)", f"{fmt(r.get('sink_cpu_s'), 2)} ({fmt(r.get('sink_cpu_ms_per_msg'), 3)})"),
        ("load generator CPU s (ms/msg)", f"{fmt(r.get('loadgen_cpu_s'), 2)} "
                                          f"({fmt(r.get('loadgen_cpu_ms_per_msg'), 3)})"),
        ("machine CPU % of 200 / other CPU % of capacity",
         f"{fmt(r.get('machine_util_pct'), 0)} / {fmt(r.get('other_pct_of_capacity'), 1)}"
         + (" (disturbed)" if r.get("disturbed") else "")),
        ("sink received / duplicates", f"{r.get('sink_received', '-')} / {r.get('duplicates', '-')}"),
        ("mainlog records", " ".join(f"{k}={v}" for k, v in sorted(r.get("mainlog", {}).items())) or "-"),
        ("MTA exit on SIGTERM (s to stop)", f"{r.get('mta_exit', '-')} ({fmt(r.get('mta_stop_s'), 1)})"),
        ("code", f"{r.get('code_dir')} @ {(r.get('code_commit') or '?')[:10]}"
                 + (" + uncommitted changes" if r.get("code_dirty") else "")),
        ("result", ("OK" if r["ok"] else "FAIL: " + "; ".join(r["errors"]))
         + ("; WARNINGS: " + "; ".join(r["warnings"]) if r.get("warnings") else "")),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def profile_report(path, top=25):
    """Top functions of a py-spy collapsed-stack file by own and by
    inclusive samples (percent of all samples)."""
    own, incl, total = {}, {}, 0
    with open(path) as fh:
        for line in fh:
            stack, _, cnt = line.rstrip("\n").rpartition(" ")
            if not stack or not cnt.isdigit():
                continue
            c = int(cnt)
            total += c
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + c
            for f in set(frames):
                incl[f] = incl.get(f, 0) + c
    out = [f"{total} samples"]
    for title, d in (("own", own), ("inclusive", incl)):
        out.append(f"\n| % {title} | function (file) |\n|---|---|")
        for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"| {100.0 * c / max(1, total):.1f} | `{f}` |")
    return "\n".join(out)


SUMMARY_FIELDS = [
    ("accepted msg/s", "accept_rate", 0), ("end-to-end msg/s", "e2e_rate", 0),
    ("p50 ms", "lat_p50_ms", 1), ("p90 ms", "lat_p90_ms", 1), ("p99 ms", "lat_p99_ms", 1),
    ("max ms", "lat_max_ms", 1), ("MTA CPU ms/msg", "mta_cpu_ms_per_msg", 2),
    ("MTA cores", "mta_cores", 2), ("MTA peak RSS MB", "mta_peak_rss_mb", 0),
    ("sink CPU ms/msg", "sink_cpu_ms_per_msg", 3), ("loadgen CPU ms/msg", "loadgen_cpu_ms_per_msg", 3),
    ("machine CPU %", "machine_util_pct", 0), ("other CPU %", "other_pct_of_capacity", 1),
]


def summarize(rows, include_disturbed=False):
    """Markdown: median (min-max) per (n, size, concurrency, sink, route) over
    successful runs (undisturbed ones only, unless there are none: '*')."""
    groups = {}
    for r in rows:
        key = (r["n"], r["size"], r["concurrency"], r.get("loadgen", "asyncio"), r["route"], r["sink"],
               r.get("mta") or "impetus", r.get("reception_processes") or 0, r.get("rate") or 0)
        groups.setdefault(key, []).append(r)

    def mm(vals, prec):
        if not vals:
            return "-"
        med = statistics.median(vals)
        if len(vals) == 1:
            return fmt(med, prec)
        return f"{fmt(med, prec)} ({fmt(min(vals), prec)}–{fmt(max(vals), prec)})"

    head = ["n", "size", "c", "load → route → sink", "runs used/ok/all"] + [h for h, _, _ in SUMMARY_FIELDS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups):
        rs = groups[key]
        ok = [r for r in rs if r.get("ok")]
        clean = ok if include_disturbed else [r for r in ok if not r.get("disturbed")]
        used, star = (clean, "") if clean else (ok, "*")
        mta = "(no MTA)" if key[4] == "direct" else (
            "postfix" if key[6] == "postfix" else
            f"impetus/{key[4]}" + (f" rp={key[7]}" if key[7] else ""))
        load = key[3] + (f" @{key[8]:g}/s" if key[8] else "")
        path = f"{load} → {mta} → {key[5]}"
        cells = [str(key[0]), str(key[1]), str(key[2]), path, f"{len(used)}{star}/{len(ok)}/{len(rs)}"]
        cells += [mm([r[f] for r in used if r.get(f) is not None], p) for _, f, p in SUMMARY_FIELDS]
        out.append("| " + " | ".join(cells) + " |")
    bad = [r for r in rows if not r.get("ok")]
    for r in bad:
        out.append(f"\nFAILED n={r['n']} s={r['size']} c={r['concurrency']} {r['time']}: "
                   + "; ".join(r.get("errors", [])))
    for r in rows:
        if r.get("warnings"):
            out.append(f"\nWARNING n={r['n']} s={r['size']} c={r['concurrency']} {r['time']}: "
                       + "; ".join(r["warnings"]))
    commits = sorted({(r.get("code_commit") or "?")[:10] + ("+dirty" if r.get("code_dirty") else "")
                      for r in rows if r.get("route") != "direct"})
    out.append(f"\ncode: {', '.join(commits)}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="messages (default %(default)s)")
    ap.add_argument("-s", "--size", type=int, default=5120, help="body bytes per message (default %(default)s)")
    ap.add_argument("-c", "--concurrency", type=int, default=20, help="parallel sessions (default %(default)s)")
    ap.add_argument("--sink", choices=["impetus", "smtp-sink"], default="impetus")
    ap.add_argument("--route", choices=["dns", "gateway"], default="dns",
                    help="dns (default): MX via an in-process DNS server; gateway: Gateway option")
    ap.add_argument("--loadgen", choices=["asyncio", "smtp-source"], default="asyncio",
                    help="asyncio (default): this script's client, with latencies; "
                         "smtp-source: Postfix's, as in the Postfix baseline (no latencies)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="--loadgen asyncio: start at most this many messages per second "
                         "(paced; latency at a chosen load, e.g. 2x Postfix's rate); "
                         "default 0: as fast as the sessions go")
    ap.add_argument("--mta", choices=["impetus", "postfix"], default="impetus",
                    help="the MTA under test; postfix: the private instance of "
                         "../shared/bench/postfix_baseline.sh (run its 'setup' first), "
                         "relayhost pointed at this run's sink")
    ap.add_argument("--pf-conf", default="/tmp/pfbench/etc", help="--mta postfix: config directory")
    ap.add_argument("--pf-port", type=int, default=12525, help="--mta postfix: its smtpd port")
    ap.add_argument("--postfix-policy", choices=["normal", "batch"], default="normal",
                    help="--mta postfix: CPU scheduling policy of its processes (batch: "
                         "SCHED_BATCH, Impetus's default Scheduling_Policy)")
    ap.add_argument("--direct", action="store_true",
                    help="no MTA: load generator -> sink (the harness ceiling)")
    ap.add_argument("--reception-processes", type=int, default=0, metavar="N",
                    help="impetus serve --reception-processes N (default 0: one process)")
    ap.add_argument("--max-outbound", type=int, default=20, help="Max_Outbound_Connections (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=180, help="whole-run limit in s (default %(default)s)")
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="wait up to this long for an idle machine first (0: don't; default %(default)s)")
    ap.add_argument("--quiet-pct", type=float, default=15, help="'idle' = busy below this %% of one core")
    ap.add_argument("--disturbed-pct", type=float, default=5.0,
                    help="flag the run if other processes used more than this %% of the machine")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait after the sink counted N before stopping (duplicate check)")
    ap.add_argument("--profile", metavar="FILE",
                    help="sample the MTA with py-spy (collapsed stacks to FILE; perturbs the figures)")
    ap.add_argument("--retry-disturbed", type=int, default=0, metavar="K",
                    help="re-run a disturbed run up to K times (every attempt is recorded)")
    ap.add_argument("--code", metavar="DIR", help="import impetus from DIR (default: this repository)")
    ap.add_argument("--snapshot", metavar="REF",
                    help="benchmark git REF's committed impetus/ (extracted to a temp dir), "
                         "immune to concurrent edits of the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (spool, logs, config)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    ap.add_argument("--reps", type=int, default=1, help="repeat the run (default %(default)s)")
    ap.add_argument("--jsonl", metavar="FILE", help="append each run's JSON to FILE")
    ap.add_argument("--summarize", metavar="JSONL", help="print a Markdown summary of FILE and exit")
    ap.add_argument("--all", action="store_true", help="with --summarize: include disturbed runs")
    ap.add_argument("--profile-report", metavar="FILE", help="print the top functions of a --profile file")
    args = ap.parse_args(argv)
    if args.profile_report:
        print(profile_report(args.profile_report))
        return 0
    if args.summarize:
        with open(args.summarize) as fh:
            print(summarize([json.loads(l) for l in fh if l.strip()], args.all))
        return 0
    if args.n <= 0 or args.concurrency <= 0 or args.size < 0:
        ap.error("-n and -c must be positive, -s non-negative")
    if args.rate < 0 or (args.rate and args.loadgen != "asyncio"):
        ap.error("--rate must be positive and needs --loadgen asyncio")
    if args.sink == "smtp-sink" and not os.access(SMTP_SINK, os.X_OK):
        ap.error(f"{SMTP_SINK} not found")
    snapdir = None
    if args.snapshot:
        snapdir = tempfile.mkdtemp(prefix="impetus-snap-")
        CODE["commit"] = snapshot(args.snapshot, snapdir)
        CODE["dir"] = snapdir
    elif args.code:
        CODE["dir"] = os.path.abspath(args.code)
    try:
        return _main_runs(args)
    finally:
        if snapdir:
            shutil.rmtree(snapdir, ignore_errors=True)


def _main_runs(args):
    def on_term(signum, frame):          # timeout(1)/kill: clean up our children first
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    results = []
    attempts = [(rep, a) for rep in range(args.reps) for a in range(args.retry_disturbed + 1)]
    skip = set()
    for rep, attempt in attempts:
        if rep in skip:
            continue
        res = run(args)
        res["rep"], res["attempt"] = rep + 1, attempt + 1
        results.append(res)
        if not res.get("disturbed"):
            skip.add(rep)
        line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(line + "\n")
        if not args.json_only:
            print(table(res), flush=True)
            if args.keep:
                print(f"kept: {res['workdir']}")
        if args.json or args.json_only:
            print(line, flush=True)
        if res.get("setup_error"):
            return 2
        if "interrupted" in res["errors"]:
            return 130
    if args.reps > 1 and not args.json_only:
        print()
        print(summarize(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
