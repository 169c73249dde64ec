"""Prometheus metrics, served at ``/metrics`` on the ``HTTP_Listener``.

One registry per server (never the process-global default registry):

* counters, by ``binding`` and recipient ``domain``:
  ``impetus_messages_received_total``, ``impetus_messages_delivered_total``,
  ``impetus_messages_transient_failures_total``,
  ``impetus_messages_permanent_failures_total`` (fed by the scheduler's
  ``_count`` hook; bounces the MTA generates count as received);
* gauges read at scrape time, by ``binding`` and queue ``domain`` (the
  routing domain: the gateway's name for gateway-routed mail):
  ``impetus_queue_messages{state="active|delayed"}``,
  ``impetus_outbound_connections``; plus ``impetus_inflight_messages``,
  ``impetus_inbound_sessions``, ``impetus_dns_cache_entries``,
  ``impetus_uptime_seconds``, ``impetus_info{version}``;
* ``impetus_dns_lookup_seconds{type="MX|A"}`` histogram: lookups that went
  to the network (cache hits are not observed);
* ``impetus_spool_commit_seconds`` summary (count and sum: the average
  commit latency is ``rate(sum) / rate(count)``) of the spool shards this
  process writes; ``impetus_spool_commits_total`` is its count. With
  ``--reception-processes N`` inbound commits happen in the children and are
  not included.
* ``impetus_bounces_generated_total``, ``impetus_dns_queries_total``.

Label values for domains are capped at ``MAX_DOMAIN_LABELS`` distinct
domains per counter; further domains are counted under ``domain="_other"``
so a flood of random domains cannot blow up the scrape.
"""
from __future__ import annotations

import ipaddress
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE  # noqa: F401
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    SummaryMetricFamily)

MAX_DOMAIN_LABELS = 5000
OTHER = "_other"

_EVENTS = {
    "received": ("impetus_messages_received", "Messages accepted into the queue (one per recipient)."),
    "delivered": ("impetus_messages_delivered", "Messages delivered (2xx from the next hop)."),
    "transient": ("impetus_messages_transient_failures",
                  "Transient delivery failures (message delayed for a retry)."),
    "permanent": ("impetus_messages_permanent_failures",
                  "Permanent failures (5xx, expiry, manual purge)."),
}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _ScrapeCollector:
    """Gauges and totals read from the running server at scrape time."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from . import __version__
        server = self.server
        sched = server.scheduler
        info = GaugeMetricFamily("impetus_info", "Impetus build information.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if sched is None:
            return
        up = GaugeMetricFamily("impetus_uptime_seconds", "Seconds since the scheduler started.")
        up.add_metric([], time.time() - sched.started_at)
        yield up
        qm = GaugeMetricFamily("impetus_queue_messages", "Queued messages by queue and state.",
                               labels=["binding", "domain", "state"])
        oc = GaugeMetricFamily("impetus_outbound_connections",
                               "Open outbound connections by queue.", labels=["binding", "domain"])
        for q in list(sched.queues.values()):
            qm.add_metric([q.binding, q.domain, "active"], len(q.active))
            qm.add_metric([q.binding, q.domain, "delayed"], q.delayed)
            oc.add_metric([q.binding, q.domain], q.conns)
        yield qm
        yield oc
        inflight = GaugeMetricFamily("impetus_inflight_messages",
                                     "Messages in an SMTP transaction right now.")
        inflight.add_metric([], sum(1 for m in sched.index.values() if m.state == "inflight"))
        yield inflight
        sessions = server.inbound_sessions()
        if sessions is not None:
            g = GaugeMetricFamily("impetus_inbound_sessions", "Open inbound SMTP sessions.")
            g.add_metric([], sessions)
            yield g
        dns = sched.resolver.cache_stats()
        g = GaugeMetricFamily("impetus_dns_cache_entries", "Answers in the DNS cache.")
        g.add_metric([], dns.get("entries", 0))
        yield g
        c = CounterMetricFamily("impetus_dns_queries", "DNS queries sent to the nameservers.")
        c.add_metric([], dns.get("queries", 0))
        yield c
        c = CounterMetricFamily("impetus_bounces_generated", "Bounces (DSNs) generated.")
        c.add_metric([], server.metrics.bounces_total())
        yield c
        shards = getattr(server.spool, "shards", None)
        spools = list(shards.values()) if shards else [server.spool]
        count = sum(getattr(s, "commits", 0) for s in spools)
        total = sum(getattr(s, "commit_seconds", 0.0) for s in spools)
        sm = SummaryMetricFamily("impetus_spool_commit_seconds",
                                 "Spool commit (fsync) latency: count and sum of seconds.")
        sm.add_metric([], count_value=count, sum_value=total)
        yield sm
        c = CounterMetricFamily("impetus_spool_commits", "Spool commits (group commits).")
        c.add_metric([], count)
        yield c


class Metrics:
    def __init__(self, server):
        self.server = server
        disable_created_metrics()  # no *_created series: this process owns its registry
        self.registry = CollectorRegistry(auto_describe=False)
        self.counters = {
            ev: Counter(name, doc, ["binding", "domain"], registry=self.registry)
            for ev, (name, doc) in _EVENTS.items()}
        self.domains: dict[str, set[str]] = {ev: set() for ev in _EVENTS}
        self.dns_latency = Histogram(
            "impetus_dns_lookup_seconds", "DNS lookups that went to the network, by type.",
            ["type"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self._bounces_base = 0
        self._children: dict = {}  # (event, binding, domain) -> labelled counter
        self.registry.register(_ScrapeCollector(server))
        if getattr(server, "resolver", None) is not None:
            self.instrument_resolver(server.resolver)

    # -- feeding -------------------------------------------------------------
    def count(self, event: str, binding: str, domain: str, n: int = 1) -> None:
        child = self._children.get((event, binding, domain))
        if child is not None:   # the hot path: labels() parses its arguments each time
            child.inc(n)
            return
        counter = self.counters.get(event)
        if counter is None:
            return
        seen = self.domains[event]
        if domain not in seen:
            if len(seen) >= MAX_DOMAIN_LABELS:
                domain = OTHER
            else:
                seen.add(domain)
        child = counter.labels(binding, domain or "-")
        if len(self._children) < 4 * MAX_DOMAIN_LABELS:
            self._children[(event, binding, domain)] = child
        child.inc(n)

    def bounces_total(self) -> int:
        sched = self.server.scheduler
        if sched is None:
            return 0
        return sched.stats.get("bounces", 0) + sched.bounces_before_reset

    def instrument_resolver(self, resolver) -> None:
        """Time the resolver's lookups that are not answered from its cache."""
        if getattr(resolver, "_impetus_timed", False):
            return
        hist = self.dns_latency
        orig_mx, orig_addr = resolver.mx, resolver.addresses

        async def mx(domain, *a, **kw):
            t0 = time.perf_counter()
            res = await orig_mx(domain, *a, **kw)
            if not res.from_cache:
                hist.labels("MX").observe(time.perf_counter() - t0)
            return res

        async def addresses(name, *a, **kw):
            t0 = time.perf_counter()
            res = await orig_addr(name, *a, **kw)
            if not res.from_cache and not _is_ip(name):
                hist.labels("A").observe(time.perf_counter() - t0)
            return res

        resolver.mx = mx
        resolver.addresses = addresses
        resolver._impetus_timed = True

    # -- output ---------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
