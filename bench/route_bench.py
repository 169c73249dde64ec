#!/usr/bin/env python3
"""Routing-decision benchmark for Impetus (``impetus.router``).

    python3 bench/route_bench.py [--iterations 50000] [--domains 10000]
                                 [--concurrency 200] [--indexed-zone]
                                 [--no-uvloop] [--json]

Three measurements, all in this process except the DNS server, all on
127.0.0.1:

(a) one cached domain: ``plan()`` + ``gather()`` + ``decide()`` in a loop
    (``--iterations`` times, one after the other) for ``example.test``
    (2 MX hosts, one A each), with the resolver's cache warm, so ``gather``
    never leaves the process.
(b) ``--domains`` distinct domains ``d<i>.rb.test``, each ``MX 10
    mx.rb.test``, and one ``mx.rb.test A 127.0.0.1``, served by the test DNS
    server (``tests.peers.dns_server.DnsServer``, dnslib) with the records
    added to its zone before the run.  First with a cold resolver cache (every
    domain's MX goes over UDP to the server; the A of the MX host is looked up
    once and coalesced), then again with the cache warm.  At most
    ``--concurrency`` decisions are in flight (an asyncio semaphore).  Per
    decision latency = from the start of its ``plan()`` to the end of its
    ``decide()`` (after it got its semaphore slot), so it includes the time
    the other in-flight decisions ran on the same event loop.  Every decision
    is checked: exactly one hop, 127.0.0.1:25, no failure.  A transient
    ``451 4.4.3`` DNS failure (the test server did not answer in time) is
    counted apart: it is the router doing the right thing on a timeout.
    ``--indexed-zone`` replaces the test server's zone scan (a linear walk
    over every record per query, twice for MX because of the glue) by a
    per-name index, so the cold pass measures the resolver + router rather
    than the test server's lookup.
(c) ``decide()`` alone over precomputed answers (example.test).

Full Python garbage collections (generation 2) during each pass of (b) are
counted and timed: every decision in flight during one sees the pause in
its latency.

The DNS server runs in a child process (fork) so its threads do not compete
for this process's GIL; it is stopped through a pipe, then joined (killed by
its PID if it does not exit).  The resolver is ``impetus.dns.Resolver`` from
the server's resolv.conf (``nameserver 127.0.0.1#PORT``, timeout 1 s,
2 attempts), ``hosts_path=None``.  The event loop is uvloop (as in ``impetus
serve``) unless ``--no-uvloop``.

Exit status 0 if no decision was wrong (transient DNS failures are reported,
not counted as wrong), 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from impetus import router  # noqa: E402
from impetus.config import load_config_string  # noqa: E402
from impetus.dns import Resolver, parse_resolv_conf  # noqa: E402

CACHED_DOMAIN = "example.test"          # in tests/peers/zones/test.zone
MX_HOST = "mx.rb.test"
MX_IP = "127.0.0.1"
CONFIG = """\
Binding_Group "g" { Binding "b1" {} Binding "b2" {} }
Domain "other.test" { Gateway = "192.0.2.1" }
Prohibited_Hosts = ( "0.0.0.0/8" )
"""


def domain_name(i: int) -> str:
    return f"d{i}.rb.test"


# ---------------------------------------------------------------- DNS server child
class _IndexedZone(list):
    """The zone list, but iterating it inside ``resolve`` yields only the
    records prepared for the current thread's query (see ``_indexed``)."""

    def __init__(self, records, local):
        super().__init__(records)
        self._local = local

    def __iter__(self):
        view = getattr(self._local, "view", None)
        return iter(view) if view is not None else super().__iter__()


def _indexed(resolver) -> None:
    """Make a TestZoneResolver's ``resolve`` walk only the records of the
    queried name and the glue it needs instead of the whole zone: the same
    answers, without the O(zone) scan per query.  The zone must not change
    afterwards."""
    import threading
    import types

    from tests.peers.dns_server import _fq
    local = threading.local()
    by_name: dict[str, list] = {}
    for z in resolver.zone:
        by_name.setdefault(z[0], []).append(z)
    resolver.zone = _IndexedZone(resolver.zone, local)
    orig = type(resolver).resolve

    def resolve(self, request, handler):
        own = by_name.get(_fq(str(request.q.qname)))
        if own is None:
            # unknown name: NODATA vs NXDOMAIN needs the whole zone
            return orig(self, request, handler)
        glue = [g for _, t, rr in own if t in ("MX", "NS", "CNAME", "PTR")
                for g in by_name.get(_fq(str(rr.rdata.label)), ())]
        local.view = own + glue
        try:
            return orig(self, request, handler)
        finally:
            local.view = None
    resolver.resolve = types.MethodType(resolve, resolver)


def _dns_child(workdir: str, n_domains: int, indexed: bool, conn) -> None:
    from tests.peers.dns_server import DnsServer
    srv = DnsServer(workdir)
    srv.add("\n".join(f"d{i}.rb IN MX 10 {MX_HOST}." for i in range(n_domains)))
    srv.add(f"{MX_HOST}. IN A {MX_IP}")
    if indexed:
        _indexed(srv.resolver)
    srv.start()
    conn.send((srv.port, srv.resolv_conf))
    try:
        conn.recv()                     # any message (or EOF) = stop
    except EOFError:
        pass
    counts = {"queries": srv.query_count(), "mx": srv.query_count(rtype="MX"),
              "a": srv.query_count(rtype="A"), "tcp": srv.query_count(proto="tcp")}
    srv.stop()
    try:
        conn.send(counts)
    except OSError:
        pass
    conn.close()


class DnsChild:
    def __init__(self, workdir: str, n_domains: int, indexed: bool = False):
        ctx = mp.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_dns_child, args=(workdir, n_domains, indexed, child_conn),
                                daemon=True)
        self.proc.start()
        child_conn.close()
        if not self.conn.poll(60):
            self.stop()
            raise RuntimeError("DNS server did not start")
        self.port, self.resolv_conf = self.conn.recv()

    def stop(self) -> dict:
        counts: dict = {}
        try:
            self.conn.send("stop")
            if self.conn.poll(10):
                counts = self.conn.recv()
        except (OSError, EOFError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            os.kill(self.proc.pid, 9)
            self.proc.join(5)
        self.conn.close()
        return counts


# ---------------------------------------------------------------- measurements
def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def check_cached(d) -> bool:
    return d.failure is None and len(d.hops) == 2


async def bench_one_domain(config, resolver, iterations: int) -> dict:
    # warm the cache (and the config lookup cache)
    p = router.plan("b1", CACHED_DOMAIN, config)
    d = router.decide(p, await router.gather(p, resolver))
    if not check_cached(d):
        raise RuntimeError(f"unexpected decision for {CACHED_DOMAIN}: {router.format_decision(d)}")
    hits0 = resolver.cache_stats()["hits"]
    misses0 = resolver.cache_stats()["misses"]
    bad = 0
    t0 = time.perf_counter()
    for _ in range(iterations):
        p = router.plan("b1", CACHED_DOMAIN, config)
        d = router.decide(p, await router.gather(p, resolver))
        if d.failure is not None:
            bad += 1
    dt = time.perf_counter() - t0
    st = resolver.cache_stats()
    return {"iterations": iterations, "seconds": dt, "per_s": iterations / dt,
            "us_per_decision": dt / iterations * 1e6, "bad": bad,
            "cache_hits": st["hits"] - hits0, "cache_misses": st["misses"] - misses0}


CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+system) of process ``pid`` so far, 0.0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK


async def bench_many(config, resolver, n: int, concurrency: int, dns_pid: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    bad: list[str] = []
    transient: list[str] = []
    gc_pauses: list[float] = []
    gc_start: list[float] = []

    def on_gc(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                gc_start[:] = [time.perf_counter()]
            elif gc_start:
                gc_pauses.append(time.perf_counter() - gc_start[0])

    async def one(i: int) -> None:
        dom = domain_name(i)
        async with sem:
            t = time.perf_counter()
            p = router.plan("b1", dom, config)
            d = router.decide(p, await router.gather(p, resolver))
            lat.append(time.perf_counter() - t)
        hops = d.hops
        if d.failure is not None and d.failure.enhanced == "4.4.3" and not hops:
            transient.append(str(d.failure))
        elif d.failure is not None or len(hops) != 1 or hops[0].ip != MX_IP or hops[0].port != 25:
            bad.append(router.format_decision(d))

    st0 = resolver.cache_stats()
    gc.callbacks.append(on_gc)
    cpu0, dns_cpu0 = time.process_time(), proc_cpu(dns_pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    dt = time.perf_counter() - t0
    cpu, dns_cpu = time.process_time() - cpu0, proc_cpu(dns_pid) - dns_cpu0
    gc.callbacks.remove(on_gc)
    st = resolver.cache_stats()
    lat.sort()
    return {"domains": n, "concurrency": concurrency, "seconds": dt, "per_s": n / dt,
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "max_ms": lat[-1] * 1e3 if lat else float("nan"),
            "bad": len(bad), "bad_examples": bad[:3],
            "dns_transient": len(transient), "transient_examples": transient[:2],
            "full_gc": len(gc_pauses), "full_gc_max_ms": max(gc_pauses, default=0) * 1e3,
            "cpu_s": cpu, "dns_server_cpu_s": dns_cpu,
            "cache_hits": st["hits"] - st0["hits"], "cache_misses": st["misses"] - st0["misses"],
            "coalesced": st["coalesced"] - st0["coalesced"]}


async def bench_decide_only(config, resolver, iterations: int) -> dict:
    p = router.plan("b1", CACHED_DOMAIN, config)
    answers = await router.gather(p, resolver)
    decide = router.decide
    t0 = time.perf_counter()
    for _ in range(iterations):
        decide(p, answers)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(iterations):
        router.plan("b1", CACHED_DOMAIN, config)
    dt_plan = time.perf_counter() - t1
    return {"iterations": iterations, "seconds": dt, "per_s": iterations / dt,
            "us_per_decision": dt / iterations * 1e6,
            "plan_per_s": iterations / dt_plan, "plan_us": dt_plan / iterations * 1e6}


async def run(args) -> dict:
    config = load_config_string(CONFIG, "route_bench.conf")
    with tempfile.TemporaryDirectory(prefix="route-bench-") as tmp:
        t_setup = time.perf_counter()
        dns = DnsChild(tmp, args.domains, args.indexed_zone)
        setup_s = time.perf_counter() - t_setup
        try:
            resolver = Resolver(parse_resolv_conf(dns.resolv_conf), hosts_path=None)
            out = {"dns_port": dns.port, "zone_setup_s": setup_s}
            out["one_cached_domain"] = await bench_one_domain(config, resolver, args.iterations)
            out["many_cold"] = await bench_many(config, resolver, args.domains, args.concurrency,
                                            dns.proc.pid)
            out["many_warm"] = await bench_many(config, resolver, args.domains, args.concurrency,
                                            dns.proc.pid)
            out["decide_only"] = await bench_decide_only(config, resolver, args.iterations)
        finally:
            out_counts = dns.stop()
        out["dns_server_counts"] = out_counts
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=50_000)
    ap.add_argument("--domains", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--indexed-zone", action="store_true",
                    help="index the test DNS server's zone by name (see above)")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop
            runner = lambda coro: uvloop.run(coro)  # noqa: E731
            loop_name = f"uvloop {uvloop.__version__}"
        except ImportError:
            runner = asyncio.run
    else:
        runner = asyncio.run
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = runner(run(args))
    res["total_s"] = time.perf_counter() - t0
    res["indexed_zone"] = args.indexed_zone
    res["machine"] = {"nproc": os.cpu_count(), "loadavg_before": load_before, "python": platform.python_version(),
                      "loop": loop_name, "platform": platform.platform()}
    ok = all(res[k]["bad"] == 0 for k in ("one_cached_domain", "many_cold", "many_warm"))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0 if ok else 1

    a, c, w, d = res["one_cached_domain"], res["many_cold"], res["many_warm"], res["decide_only"]
    m = res["machine"]
    print(f"machine: nproc={m['nproc']}, load average before {m['loadavg_before']:.2f}, "
          f"Python {m['python']}, {m['loop']}, {m['platform']}")
    print(f"(a) one cached domain ({CACHED_DOMAIN}, 2 MX), plan+gather+decide x {a['iterations']}: "
          f"{a['per_s']:,.0f} decisions/s ({a['us_per_decision']:.1f} us each; "
          f"resolver cache hits {a['cache_hits']}, misses {a['cache_misses']})")
    for name, r in (("cold", c), ("warm", w)):
        print(f"(b) {r['domains']} domains, {name} cache, {r['concurrency']} in flight: "
              f"{r['seconds']:.2f} s, {r['per_s']:,.0f} decisions/s, "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms "
              f"(resolver cache misses {r['cache_misses']}, coalesced {r['coalesced']}; "
              f"transient DNS failures {r['dns_transient']}; wrong {r['bad']}; "
              f"full GCs {r['full_gc']} (longest {r['full_gc_max_ms']:.0f} ms); CPU: bench {r['cpu_s']:.1f} s, "
              f"DNS server {r['dns_server_cpu_s']:.1f} s)")
        for ex in r["transient_examples"]:
            print(f"    transient: {ex}")
        for ex in r["bad_examples"]:
            print("    wrong decision:\n      " + ex.replace("\n", "\n      "))
    print(f"(c) decide() alone x {d['iterations']}: {d['per_s']:,.0f} /s "
          f"({d['us_per_decision']:.2f} us each); plan() alone {d['plan_per_s']:,.0f} /s "
          f"({d['plan_us']:.2f} us each)")
    zone = "indexed by name" if args.indexed_zone else "stock linear scan"
    print(f"DNS server ({zone}) saw: {res['dns_server_counts']}; "
          f"zone setup {res['zone_setup_s']:.1f} s; "
          f"total {res['total_s']:.1f} s")
    print("OK" if ok else "FAILED: some decisions were wrong")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
