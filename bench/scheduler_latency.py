#!/usr/bin/env python3
"""Scheduler cost with many busy domains (issue 5).

"One domain among 10,000 busy ones gets its next message routed and handed
to a connection in under 1 ms (scheduler cost must not grow with the number
of domains)."

In one process: a real ``Scheduler`` and a real on-disk ``Spool``, a resolver
that answers instantly, and a stand-in connection class whose ``send`` records
the moment a transaction is handed to it (the network is not what is measured
here). D domains each get an open, idle connection; then, round after round,
every domain gets a message and we time, for one probe domain, ``submit()`` →
its connection's ``send()``. Printed: p50/p99/max in µs, for D = 10 and
D = 10,000, so growth with D is visible.

Usage: python3 bench/scheduler_latency.py [--domains 10000] [--rounds 200]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from impetus import scheduler as sched_mod  # noqa: E402
from impetus.config import load_config_string  # noqa: E402
from impetus.delivery import RcptResult  # noqa: E402
from impetus.logs import Logs  # noqa: E402
from impetus.smtp.reply import Reply  # noqa: E402
from impetus.spool import Spool, Submission  # noqa: E402

OK = Reply(250, "2.0.0", "ok")
handed: dict[str, float] = {}


class Answer:
    def __init__(self, status, records, ttl=3600):
        self.status, self.records, self.ttl = status, records, ttl
        self.null_mx, self.error = False, ""


class InstantResolver:
    async def mx(self, name):
        return Answer("OK", [(10, "mx." + name)])

    async def addresses(self, name, want_ipv6=False):
        return Answer("OK", [ipaddress.ip_address("127.0.0.1")])


class FakeConnection:
    def __init__(self, hop, timeouts, helo, **kw):
        self.hop, self.broken, self.deliveries, self.rcpts_sent = hop, False, 0, 0
        self.bytes_sent, self.cap_keys = 0, []
        self.remote_ip = hop.ip

    async def open(self):
        pass

    async def send(self, sender, rcpts, body, **kw):
        now = time.perf_counter()
        for r in rcpts:
            handed.setdefault(r, now)
        self.deliveries += len(rcpts)
        self.rcpts_sent += len(rcpts)
        return [RcptResult(OK, 9) for _ in rcpts]

    async def quit(self):
        self.broken = True

    def close(self):
        self.broken = True


async def run(domains: int, rounds: int, workdir: str) -> list[float]:
    sched_mod.Connection = FakeConnection
    config = load_config_string("Idle_Timeout = 3600\nMax_Outbound_Connections = 1\n")
    spool = Spool(workdir)
    spool.open()
    logs = Logs()
    s = sched_mod.Scheduler(config, spool, InstantResolver(), logs, hostname="bench")
    await s.start()
    names = [f"d{i}.test" for i in range(domains)]
    probe = names[domains // 2]

    async def deliver_all(tag: str) -> None:
        for name in names:
            msgs = await spool.accept(Submission("s@src.test", [f"{tag}@{name}"], b"x\r\n"))
            s.submit(msgs, b"x\r\n")
        while sum(1 for k in handed if k.startswith(tag + "@")) < domains:
            await asyncio.sleep(0.01)

    await deliver_all("warm")  # one open, idle connection per domain
    # Every queue also holds delayed mail (never due during the run).
    now = time.time()
    for i, name in enumerate(names):
        for j in range(10):
            m = sched_mod.QueuedMessage(f"99/99-1-{i:06d}{j}", "99/99-1-x", "s@src.test",
                                        f"late{j}@{name}", name, "default", "default", now, 1,
                                        now + 86400, 3, "127.0.0.1", "esmtp")
            s._delay(m)

    stop = asyncio.Event()

    async def background() -> None:  # steady traffic to the other domains
        i = 0
        while not stop.is_set():
            name = names[(i * 7919) % domains]
            if name != probe:
                msgs = await spool.accept(Submission("s@src.test", [f"bg{i}@{name}"], b"x\r\n"))
                s.submit(msgs, b"x\r\n")
            i += 1
            await asyncio.sleep(0.002)

    bg = asyncio.create_task(background())
    samples = []
    for r in range(rounds):
        key = f"p{r}@{probe}"
        msgs = await spool.accept(Submission("s@src.test", [key], b"x\r\n"))
        t0 = time.perf_counter()
        s.submit(msgs, b"x\r\n")
        while key not in handed:
            await asyncio.sleep(0)
        samples.append((handed[key] - t0) * 1e6)
        await asyncio.sleep(0.005)
    stop.set()
    await bg
    await s.stop(grace=1)
    spool.close()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"{'domains':>8} {'rounds':>6} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8}")
    for d in (10, args.domains):
        handed.clear()
        with tempfile.TemporaryDirectory() as tmp:
            xs = sorted(asyncio.run(run(d, args.rounds, tmp)))
        p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
        print(f"{d:>8} {len(xs):>6} {statistics.median(xs):>8.0f} {p99:>8.0f} {xs[-1]:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
