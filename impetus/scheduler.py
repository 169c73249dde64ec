"""The queue manager: single owner of queue state (Postfix's qmgr).

Queues are keyed by (binding, routing domain) (spec §10.1). Each has an
active deque (ready now) and a count of delayed messages; delayed messages
wait in one global heap ordered by next attempt, so the cost of waking a
queue does not grow with the number of domains.

Delivery follows Momentum's model: a queue with active mail gets connection
workers (up to ``Max_Outbound_Connections``); each worker resolves the route
(cached for its TTL), opens a connection, and delivers batches of messages
that share a body (up to ``Max_Recipients_Per_Batch``), keeping the
connection for ``Idle_Timeout`` seconds when the queue runs dry.

Outcomes (spec §10.2-§10.4): 2xx -> ``D``; 4xx -> ``T`` and the doubling
retry schedule, or ``P`` when retries/expiry are exhausted; 5xx -> ``P`` and
an RFC 3464 bounce (never for a null sender).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import time
from collections import OrderedDict, deque

from . import router, throttle
from .bounce import Failure, render_bounce, should_bounce
from . import mta_sts, tls
from .delivery import (ClientFacts, DeliveryError, Connection, NO_MXS_REACHABLE, NOT_CONNECTED,
                       Timeouts, TlsPolicyError)
from .logs import classify_bounce
from .smtp.reply import Reply
from .spool import IdGenerator, QueuedMessage, Spool, SpoolError, Submission

log = logging.getLogger("impetus.scheduler")

EXPIRED_TIME = Reply(554, "5.4.7", "[internal] exceeded max time without delivery")
EXPIRED_RETRIES = Reply(554, "5.4.7", "[internal] exceeded max retries without delivery")
SHUTDOWN = Reply(451, "4.3.2", "[internal] delivery interrupted by shutdown")
STS_NO_MX = Reply(451, "4.7.5", "[internal] no MX host is allowed by the MTA-STS policy")


class DomainQueue:
    __slots__ = ("binding", "domain", "plan_domain", "active", "delayed", "conns", "starting", "idle",
                 "decision", "decision_expires", "rr", "delivered", "failed", "dns_failures")

    def __init__(self, binding: str, domain: str, plan_domain: str | None = None):
        self.binding = binding
        self.domain = domain                          # routing domain (§2.6): option scope
        self.plan_domain = plan_domain or domain      # recipient domain the route plan uses
        self.active: deque[QueuedMessage] = deque()
        self.delayed = 0
        self.conns = 0
        self.starting = 0
        self.idle: deque[asyncio.Future] = deque()
        self.decision: router.RouteDecision | None = None
        self.decision_expires = 0.0
        self.rr = 0
        self.delivered = 0
        self.failed = 0
        self.dns_failures = 0  # consecutive transient DNS failures (MX_Failures_Fallback_To_A, DNS_Failures_To_Purge)


def should_open_connection(active: int, conns: int, starting: int, limit, aggressiveness: str) -> bool:
    """Whether a queue with ``active`` waiting messages and no idle
    connection gets one more connection (``Connection_Allocation_Aggressiveness``).

    ``normal`` ramps up one connection at a time: a new one only once the
    previous one is established and busy. ``high`` opens one per waiting
    message at once. Both stop at ``Max_Outbound_Connections``.
    """
    if active <= 0 or (limit is not None and 0 < limit <= conns):
        return False
    if aggressiveness == "high":
        return active > starting
    return starting == 0


def _resolve_false(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


def max_retries_auto(retry_interval: int, max_retry_interval: int, expiration: int) -> int:
    """D13: how many doubling retry intervals fit inside the expiration."""
    total, count, interval = 0, 0, max(1, retry_interval)
    while count < 10000:
        step = min(interval, max_retry_interval) if max_retry_interval > 0 else interval
        if total + step > expiration:
            break
        total += step
        count += 1
        interval *= 2
    return count


class BodyCache:
    """Bodies of recently accepted mail, so delivery need not re-read the spool."""

    def __init__(self, limit_bytes: int = 64 << 20):
        self.limit = limit_bytes
        self.size = 0
        self.items: OrderedDict[str, bytes] = OrderedDict()

    def put(self, batch_id: str, body: bytes) -> None:
        if len(body) > self.limit // 4:
            return
        self.items[batch_id] = body
        self.size += len(body)
        while self.size > self.limit:
            _, old = self.items.popitem(last=False)
            self.size -= len(old)

    def get(self, batch_id: str) -> bytes | None:
        return self.items.get(batch_id)

    def drop(self, batch_id: str) -> None:
        body = self.items.pop(batch_id, None)
        if body is not None:
            self.size -= len(body)


class Scheduler:
    def __init__(self, config, spool: Spool, resolver, logs, *, hostname: str | None = None):
        self.config = config
        self.spool = spool
        self.resolver = resolver
        self.logs = logs
        self.hostname = hostname or config.lookup("Hostname") or socket.gethostname()
        self.queues: dict[tuple[str, str], DomainQueue] = {}
        self.delayed: list[tuple[float, int, QueuedMessage]] = []
        self._seq = itertools.count()
        self._timer_wake = asyncio.Event()
        self._timer_task: asyncio.Task | None = None
        self._workers: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        self._finishing: list[QueuedMessage] = []  # done, not yet handed to the spool
        self.failed_hosts: dict[tuple[str, int], float] = {}
        self.connids = IdGenerator(shard=99)
        self.bodies = BodyCache()
        self.stopping = False
        self._routing: dict[tuple[str, str], str] = {}
        self.index: dict[str, QueuedMessage] = {}  # every message the scheduler owns
        self.cap_counts: dict[tuple, int] = {}   # cap key -> open connections
        self.cap_waiters: dict[tuple, list] = {}
        self.limiter = throttle.MemoryLimiter()
        self.cluster_limiter = throttle.make_limiter(config.lookup("Cluster_Throttle_Store"))
        self.stats = {"delivered": 0, "transient": 0, "permanent": 0, "bounces": 0}
        self._control_init()  # console counters, open connections, metrics (see the end)

    # -- entry points --------------------------------------------------------
    async def start(self) -> int:
        """Recover the spool and start the delayed-queue timer."""
        recovered = self.spool.recover()
        now = time.time()
        for msg in recovered:
            if msg.next_attempt > now:
                self._delay(msg)
            else:
                self._activate(msg)
        self._timer_task = asyncio.create_task(self._timer_loop(), name="delayed-timer")
        return len(recovered)

    def submit(self, msgs: list[QueuedMessage], body: bytes | None = None) -> None:
        """Freshly spooled messages (already durable)."""
        if body is not None and msgs:
            self.bodies.put(msgs[0].batch_id, body)
        for msg in msgs:
            if msg.msgid not in self.index:
                self._count("received", msg)
                self._activate(msg)

    def adopt(self, msgs: list[QueuedMessage]) -> int:
        """Spooled messages the scheduler may not know (a reception process
        died between its commit and its notification): take the unknown ones."""
        now = time.time()
        n = 0
        for msg in msgs:
            if msg.msgid in self.index:
                continue
            n += 1
            self._count("received", msg)
            if msg.next_attempt > now:
                self._delay(msg)
            else:
                self._activate(msg)
        return n

    async def stop(self, grace: float = 10.0) -> None:
        """Stop starting work; let in-flight transactions finish within ``grace``."""
        self.stopping = True
        if self._timer_task:
            self._timer_task.cancel()
        for q in self.queues.values():
            while q.idle:
                fut = q.idle.popleft()
                if not fut.done():
                    fut.set_result(False)
        if self._workers:
            done, pending = await asyncio.wait(list(self._workers), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self._flush_finished()
        if self._background:
            await asyncio.wait(list(self._background), timeout=grace)

    # -- queue bookkeeping ---------------------------------------------------
    def queue_for(self, binding: str, domain: str) -> DomainQueue:
        """The queue a recipient domain's mail waits in on ``binding``."""
        rkey = (binding, domain)
        rd = self._routing.get(rkey)
        if rd is None:
            if len(self._routing) > 200_000:
                self._routing.clear()
            rd = self._routing[rkey] = router.routing_domain(binding, domain, self.config)
        key = (binding, rd)
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = DomainQueue(binding, rd, domain)
        return q

    def _activate(self, msg: QueuedMessage) -> None:
        self.index[msg.msgid] = msg
        q = self.queue_for(msg.binding, msg.domain)
        if msg.state == "delayed":
            q.delayed -= 1
        msg.state = "active"
        q.active.append(msg)
        self._kick(q)

    def _delay(self, msg: QueuedMessage) -> None:
        self.index[msg.msgid] = msg
        q = self.queue_for(msg.binding, msg.domain)
        msg.state = "delayed"
        q.delayed += 1
        heapq.heappush(self.delayed, (msg.next_attempt, next(self._seq), msg))
        if self.delayed[0][2] is msg:
            self._timer_wake.set()

    async def _timer_loop(self) -> None:
        while True:
            now = time.time()
            while self.delayed and self.delayed[0][0] <= now:
                _, _, msg = heapq.heappop(self.delayed)
                if msg.state == "delayed":
                    self._activate(msg)
            self._timer_wake.clear()
            timeout = (self.delayed[0][0] - now) if self.delayed else 3600
            try:
                await asyncio.wait_for(self._timer_wake.wait(), max(0.001, timeout))
            except asyncio.TimeoutError:
                pass

    def _lookup(self, name: str, q: DomainQueue):
        return self.config.lookup(name, domain=q.domain, binding=q.binding)

    def _kick(self, q: DomainQueue) -> None:
        if self.stopping or not q.active or self.suspended(q):
            return
        while q.idle:
            fut = q.idle.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        if should_open_connection(len(q.active), q.conns, q.starting,
                                  self._lookup("Max_Outbound_Connections", q),
                                  self._lookup("Connection_Allocation_Aggressiveness", q)):
            q.conns += 1
            q.starting += 1
            task = asyncio.create_task(self._worker(q))
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    def _background_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("spool update failed: %s", task.exception())
            self.logs.paniclog.panic(f"spool update failed: {task.exception()}")

    # -- routing -------------------------------------------------------------
    async def route(self, q: DomainQueue) -> router.RouteDecision:
        now = time.monotonic()
        if q.decision is not None and now < q.decision_expires:
            return q.decision
        plan = router.plan(q.binding, q.plan_domain, self.config)
        answers = await router.gather(plan, self.resolver, q.dns_failures)
        decision = router.decide(plan, answers, q.dns_failures)
        if decision.failure is not None and decision.failure.enhanced == "4.4.3":
            q.dns_failures += 1
            purge = self._lookup("DNS_Failures_To_Purge", q)
            if purge and q.dns_failures >= purge:
                decision.notes.append(f"{q.dns_failures} failed DNS lookups (DNS_Failures_To_Purge)")
                decision.failure = router.LOOKUP_FAILED
        elif decision.failure is None:
            q.dns_failures = 0
        q.decision = decision
        q.decision_expires = time.monotonic() + decision.ttl
        return decision

    # -- connection caps and throttles (spec §6) ----------------------------------
    def _host_limit(self, q: DomainQueue, host: str) -> int:
        """``Host`` stanza ``Max_Outbound_Connections`` (D18: no fallback;
        -1 or no stanza = unlimited)."""
        limit = self.config.host_lookup("Max_Outbound_Connections", host, binding=q.binding)
        return -1 if limit is None else limit

    def _queue_caps(self, q: DomainQueue) -> list[tuple[tuple, int]]:
        """Connection caps that apply whatever the next hop: the server-wide
        and per-binding ``Server_Max_Outbound_Connections`` and the shared
        ``Scope_Max_Outbound_Connections`` bucket."""
        caps = [(("server",), self.config.lookup("Server_Max_Outbound_Connections"))]
        per_binding = self.config.explain("Server_Max_Outbound_Connections", binding=q.binding)
        if per_binding.scope not in ("global", "default"):
            caps.append((("server", per_binding.scope), per_binding.value))
        scope = self.config.scope_bucket("Scope_Max_Outbound_Connections", domain=q.domain,
                                         binding=q.binding)
        if scope is not None:
            caps.append((("scope", scope[0]), scope[1]))
        return [(k, lim) for k, lim in caps if lim is not None and lim > 0]

    def _at_cap(self, key, limit: int) -> bool:
        return 0 <= limit <= self.cap_counts.get(key, 0)

    def _candidate_hops(self, q: DomainQueue, decision: router.RouteDecision):
        """Hops in trying order: by preference, round-robin within a level,
        skipping hosts that failed less than ``Host_Failure_Retry`` ago and
        hosts at their ``Host`` connection cap. Returns (hops, capped keys)."""
        retry = self._lookup("Host_Failure_Retry", q)
        now = time.monotonic()
        q.rr += 1
        out, capped = [], []
        for level in decision.levels:
            n = len(level)
            rotated = [level[(q.rr + i) % n] for i in range(n)] if n > 1 else level
            for hop in rotated:
                failed_at = self.failed_hosts.get((hop.ip, hop.port))
                if failed_at is not None and now - failed_at < retry:
                    continue
                key = ("host", q.binding, hop.host)
                if self._at_cap(key, self._host_limit(q, hop.host)):
                    capped.append(key)
                    continue
                out.append(hop)
        return out, capped

    async def _throttle_wait(self, q: DomainQueue, name: str, cost: int = 1) -> float:
        """Seconds to wait before ``cost`` more units of ``name`` may go, for
        the node-local bucket and its ``Cluster_`` twin (one bucket per
        defining scope, shared by reference: spec §2.3, §6.3). 0 = go now."""
        for option, limiter in ((name, self.limiter), ("Cluster_" + name, self.cluster_limiter)):
            bucket = self.config.throttle_bucket(option, domain=q.domain, binding=q.binding)
            if bucket is None:
                continue
            identity, rate = bucket
            # Strict spacing (one unit every s/n seconds; a batch of c units
            # may go together and the next waits c intervals): 30 messages at
            # "5" take ~6 s, as operators read "5 per second".
            c = max(1, min(cost, rate[0]))
            wait = await limiter.acquire(identity, rate, c, burst=c)
            if wait > 0:
                return wait
        return 0.0

    async def _connect(self, q: DomainQueue, decision: router.RouteDecision):
        """Try hops in order; a failure during connect/banner/EHLO moves on.

        Returns (connection, capped): ``capped`` lists cap keys that stopped
        us (host, server or scope caps), to wait on when nothing connected.
        """
        queue_caps = self._queue_caps(q)
        blocked = [k for k, lim in queue_caps if self._at_cap(k, lim)]
        if blocked:
            return None, blocked
        wait = await self._throttle_wait(q, "Outbound_Throttle_Connections")
        if wait > 0:
            await asyncio.sleep(wait)  # mail stays active (§6): retried when the bucket refills
            return None, []
        timeouts = Timeouts.from_config(self.config, q.domain, q.binding)
        errors = []
        hops, capped = self._candidate_hops(q, decision)
        policy = await self._mta_sts_policy(q, hops)
        if policy is not None:
            hops = self._mta_sts_hops(q, policy, hops)
            if not hops and policy.mode == "enforce" and not capped:
                self._fail_active(q, STS_NO_MX, NOT_CONNECTED, self.connids.next(), 0, "")
                return None, []
        ehlo = self._ehlo_name(q)
        bind = self.config.lookup("Bind_Address", binding=q.binding)
        tls_failure = None
        for hop in hops:
            keys = [k for k, _ in queue_caps] + [("host", q.binding, hop.host)]
            for k in keys:  # reserve before awaiting
                self.cap_counts[k] = self.cap_counts.get(k, 0) + 1
            source = None
            if bind and bind != "*" and (":" in bind) == (":" in hop.ip):
                source = bind  # a v4 source cannot reach a v6 next hop (and vice versa)
            conn = Connection(hop, timeouts, ehlo, source_ip=source,
                              **self._connection_policy(q, hop, policy))
            try:
                await conn.open()
                conn.cap_keys = keys
                return conn, capped
            except TlsPolicyError as exc:
                # Not a host failure: the next MX may meet the TLS policy (§7).
                conn.close()
                self._release_caps(keys)
                errors.append(f"{hop.host}[{hop.ip}]:{hop.port}: {exc.reply}")
                if tls_failure is None:
                    tls_failure = (exc, conn)
            except DeliveryError as exc:
                conn.close()
                self._release_caps(keys)
                self.failed_hosts[(hop.ip, hop.port)] = time.monotonic()
                errors.append(f"{hop.host}[{hop.ip}]:{hop.port}: {exc.reply}")
        if tls_failure is not None:
            # No host met the TLS policy: that is the outcome of the queue's
            # mail (transient, retried), logged with its stage (15-17).
            exc, conn = tls_failure
            self.logs.paniclog.panic(f"{q.binding}/{q.domain}: TLS policy not met: "
                                     + "; ".join(errors))
            self._fail_active(q, exc.reply, exc.stage, self.connids.next(), conn.bytes_sent,
                              conn.remote_ip)
            return None, []
        if errors or not capped:
            detail = "; ".join(errors) if errors else "every host is within Host_Failure_Retry"
            self.logs.paniclog.panic(f"{q.binding}/{q.domain}: no host reachable: {detail}")
            return None, None
        return None, capped

    def _connection_policy(self, q: DomainQueue, hop, policy) -> dict:
        """TLS (§7, D11), XCLIENT (§8) and MTA-STS settings of a new
        connection to ``hop``, as ``Connection`` keyword arguments."""
        look = lambda name: self.config.lookup(name, domain=q.domain, binding=q.binding)  # noqa: E731
        mode, verify = look("TLS"), look("TLS_Verify")
        cert, key = look("TLS_Certificate"), look("TLS_Key")
        if cert in (None, "none"):
            cert = key = None
        elif key == "none":
            key = None
        names = tuple(dict.fromkeys(n for n in (hop.host, q.plan_domain, q.domain) if n))
        sts, system_cas = None, False
        if policy is not None and policy.mode == "enforce":
            # RFC 8461 §4.2: authenticated TLS to the MX name, WebPKI + TLS_CA
            mode, verify, names, system_cas, sts = "required", "host", (hop.host,), True, "enforce"
        elif policy is not None and policy.mode == "testing":
            mode = "required" if mode == "required" else "ifavailable"
            verify = "host" if verify == "host" else "optional"
            system_cas, sts = True, "testing"
        settings = tls.TlsSettings(mode=mode, verify=verify, fallback=look("TLS_Ifavailable_Fallback"),
                                   ca=look("TLS_CA"), cert=cert, key=key,
                                   protocols=look("TLS_Protocols"), ciphers=look("TLS_Ciphers"),
                                   names=names, system_cas=system_cas, sts=sts)
        prefix = f"{q.binding}/{q.domain}: "
        return {"tls": settings, "xclient": look("XCLIENT"),
                "notice": lambda text: self.logs.paniclog.panic(prefix + text)}

    async def _mta_sts_policy(self, q: DomainQueue, hops):
        """The recipient domain's MTA-STS policy (RFC 8461) when
        ``Use_MTA_STS`` and ``Enable_MTA_STS`` are on and the hops are the
        domain's own MX hosts (not a Gateway or Routes); else None."""
        if not hops or not self._lookup("Use_MTA_STS", q) or not self._lookup("Enable_MTA_STS", q):
            return None
        if not all(h.source.split("/")[0] in ("mx", "implicit-mx", "mx-fallback") for h in hops):
            return None
        sts = getattr(self, "_sts", None)
        if sts is None:
            sts = self._sts = mta_sts.MtaSts(
                self.resolver, port=self.config.lookup("MTA_STS_Port"),
                want_ipv6=bool(self.config.lookup("Use_IPv6")),
                notice=self.logs.paniclog.panic)
        return await sts.policy(q.plan_domain, ca_file=self._lookup("TLS_CA", q))

    def _mta_sts_hops(self, q: DomainQueue, policy, hops) -> list:
        """Hops whose MX name the policy allows (``enforce``); ``testing``
        keeps them all and notes the mismatches."""
        outside = sorted({h.host for h in hops if not policy.allows(h.host)})
        if not outside:
            return hops
        self.logs.paniclog.panic(
            f"{q.binding}/{q.domain}: MTA-STS {policy.mode} policy of {policy.domain} "
            f"(mx {' '.join(policy.mx)}) does not allow {', '.join(outside)}"
            + ("; not used" if policy.mode == "enforce" else "; used anyway (testing)"))
        if policy.mode != "enforce":
            return hops
        return [h for h in hops if policy.allows(h.host)]

    def _ehlo_name(self, q: DomainQueue) -> str:
        """``EHLO_Hostname`` (spec §5): a literal, ``__hostname__`` or
        ``__message__`` (the envelope sender's domain of the mail at hand)."""
        value = self._lookup("EHLO_Hostname", q) or "__hostname__"
        if value.lower() == "__hostname__":
            return self.hostname
        if value.lower() == "__message__":
            sender = q.active[0].sender if q.active else ""
            return sender.rpartition("@")[2] or self.hostname
        return value

    def suspended(self, q: DomainQueue) -> bool:
        """``Suspend_Delivery`` in the queue's scope chain, or the default
        binding held by ``Default_Binding = suspended``."""
        if self._lookup("Suspend_Delivery", q):
            return True
        return q.binding == "default" and self.config.lookup("Default_Binding") == "suspended"

    def _release_caps(self, keys) -> None:
        for key in keys:
            n = self.cap_counts.get(key, 0) - 1
            if n > 0:
                self.cap_counts[key] = n
            else:
                self.cap_counts.pop(key, None)
            for fut in self.cap_waiters.pop(key, []):
                if not fut.done():
                    fut.set_result(True)

    async def _close_conn(self, conn: Connection | None) -> None:
        if conn is None:
            return
        self.open_conns.pop(conn, None)
        await conn.quit()
        keys, conn.cap_keys = conn.cap_keys, []
        self._release_caps(keys)

    async def _wait_for_slot(self, capped) -> None:
        """Every usable host or a shared cap is full: wait until one frees up."""
        fut = asyncio.get_running_loop().create_future()
        for key in capped:
            self.cap_waiters.setdefault(key, []).append(fut)
        try:
            await asyncio.wait_for(fut, 5.0)
        except asyncio.TimeoutError:
            pass

    # -- the connection worker -------------------------------------------------
    async def _worker(self, q: DomainQueue) -> None:
        conn: Connection | None = None
        starting = True
        try:
            while not self.stopping:
                if q.active and self.suspended(q):
                    return  # held in the active queue until the suspension is lifted
                if not q.active:
                    if conn is None or conn.broken:
                        return
                    if starting:
                        starting = False
                        q.starting -= 1
                    if not await self._idle_wait(q):
                        return
                    continue
                decision = await self.route(q)
                if decision.failure is not None:
                    self._fail_active(q, decision.failure, NOT_CONNECTED, "", 0, "")
                    return
                if conn is None or conn.broken:
                    await self._close_conn(conn)
                    conn, capped = await self._connect(q, decision)
                    if conn is not None:
                        self.open_conns[conn] = q  # for the console's `domain` view
                    if conn is None:
                        if capped:
                            await self._wait_for_slot(capped)
                            continue
                        if capped is not None:
                            continue  # throttled: we waited for the bucket; try again
                        self._fail_active(q, NO_MXS_REACHABLE, NOT_CONNECTED, "", 0, "")
                        return
                if starting:
                    starting = False
                    q.starting -= 1
                    if len(q.active) > 1:
                        self._kick(q)  # ramp up: the next connection may start now
                limit = max(1, self._lookup("Max_Recipients_Per_Batch", q))
                per_conn = self._lookup("Max_Recipients_Per_Connection", q)
                if per_conn:
                    limit = min(limit, max(1, per_conn - conn.rcpts_sent))
                rate = self.config.throttle_bucket("Outbound_Throttle_Messages", domain=q.domain,
                                                   binding=q.binding)
                if rate is not None:
                    limit = min(limit, rate[1][0])  # one batch never costs more than the burst
                batch = self._take_batch(q, limit)
                if not batch:
                    continue  # another worker emptied the queue while we routed/connected
                wait = await self._throttle_wait(q, "Outbound_Throttle_Messages", len(batch))
                if wait > 0:
                    # Throttled: the batch goes back to the head of the active
                    # queue and is retried when the bucket refills (spec §6).
                    for m in reversed(batch):
                        m.state = "active"
                        q.active.appendleft(m)
                    if wait > self._lookup("Idle_Timeout", q):
                        await self._close_conn(conn)
                        conn = None
                    await asyncio.sleep(wait)
                    continue
                await self._deliver_batch(q, conn, batch)
                max_deliveries = self._lookup("Max_Deliveries_Per_Connection", q)
                if ((max_deliveries and conn.deliveries >= max_deliveries)
                        or (per_conn and conn.rcpts_sent >= per_conn)):
                    await self._close_conn(conn)
                    conn = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one queue's bug stop the others
            log.exception("worker for %s/%s crashed", q.binding, q.domain)
            self.logs.paniclog.panic(f"worker for {q.binding}/{q.domain} crashed: {exc!r}")
        finally:
            if starting:
                q.starting -= 1
            q.conns -= 1
            await self._close_conn(conn)
            if q.active and not self.stopping:
                self._kick(q)

    async def _idle_wait(self, q: DomainQueue) -> bool:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        q.idle.append(fut)
        # A timer that resolves the future, not wait_for: no Task per wait
        # (this runs after nearly every delivery).
        timer = loop.call_later(self._lookup("Idle_Timeout", q), _resolve_false, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            # Usually a new message took it off the deque already. Look
            # before removing: deque.remove's "not in deque" error formats
            # the future's repr, ~2 % of this process's CPU when it was caught.
            if fut in q.idle:
                q.idle.remove(fut)

    def _take_batch(self, q: DomainQueue, limit: int) -> list[QueuedMessage]:
        """Messages sharing one body, at most ``limit`` of them."""
        if not q.active:
            return []
        first = q.active.popleft()
        batch = [first]
        while q.active and len(batch) < limit and q.active[0].batch_id == first.batch_id:
            batch.append(q.active.popleft())
        for m in batch:
            m.state = "inflight"
        return batch

    def _body(self, batch_id: str) -> bytes:
        body = self.bodies.get(batch_id)
        if body is None:
            body = self.spool.body(batch_id)
        return body

    async def _deliver_batch(self, q: DomainQueue, conn: Connection, batch: list[QueuedMessage]) -> None:
        connid = self.connids.next()
        first = batch[0]
        try:
            body = self._body(first.batch_id)
        except SpoolError as exc:
            self.logs.paniclog.panic(f"{first.msgid}: {exc}")
            self._permanent_many([(m, Reply(554, "5.3.0", "[internal] message body lost from spool"),
                                   NOT_CONNECTED, connid, 0, "") for m in batch])
            return
        try:
            # The client's facts are only for XCLIENT: no address parsing otherwise.
            client = (ClientFacts.from_reception(first.peer_ip, first.helo, first.proto)
                      if conn.uses_xclient else None)
            results = await conn.send(first.sender, [m.rcpt for m in batch], body,
                                      body_8bit=not body.isascii(), client=client,
                                      crlf_clean=True)  # spooled bodies are (spool.Submission)
        except DeliveryError as exc:
            conn.close()
            for m in batch:
                self._transient(m, exc.reply, exc.stage, connid, conn.bytes_sent, conn.remote_ip)
            return
        permanent = []
        delivered = []
        now = time.time()
        for m, res in zip(batch, results):
            code = res.reply.code
            if 200 <= code < 300:
                delivered.append(m)
                self.logs.mainlog.delivery(m.msgid, m.batch_id, connid, m.domain, m.size, m.group,
                                           m.binding, m.retries, now - m.received_at, conn.remote_ip)
            elif 400 <= code < 500:
                self._transient(m, res.reply, res.stage, connid, conn.bytes_sent, conn.remote_ip)
            else:
                permanent.append((m, res.reply, res.stage, connid, conn.bytes_sent, conn.remote_ip))
        if delivered:
            q.delivered += len(delivered)
            self.stats["delivered"] += len(delivered)
            for m in delivered:
                self._count("delivered", m)
            self._finish(delivered)
        if permanent:
            self._permanent_many(permanent)

    # -- outcomes --------------------------------------------------------------
    def _finish(self, msgs: list[QueuedMessage]) -> None:
        for m in msgs:
            m.state = "done"
            self.index.pop(m.msgid, None)
        # Deliveries finished in the same loop iteration share one spool op.
        if not self._finishing:
            asyncio.get_running_loop().call_soon(self._flush_finished)
        self._finishing.extend(msgs)

    def _flush_finished(self) -> None:
        msgs, self._finishing = self._finishing, []
        if msgs:
            self._background_task(self.spool.finish(msgs))

    def _fail_active(self, q: DomainQueue, reply: Reply, stage: int, connid: str,
                     bytes_sent: int, remote_ip: str) -> None:
        """A domain-level outcome (route failure, nothing reachable) for all active mail."""
        msgs = list(q.active)
        q.active.clear()
        if reply.code >= 500:
            self._permanent_many([(m, reply, stage, connid, bytes_sent, remote_ip) for m in msgs])
        else:
            for m in msgs:
                self._transient(m, reply, stage, connid, bytes_sent, remote_ip)

    def _transient(self, m: QueuedMessage, reply: Reply, stage: int, connid: str,
                   bytes_sent: int, remote_ip: str) -> None:
        cfg = lambda name: self.config.lookup(name, domain=m.domain, binding=m.binding)  # noqa: E731
        now = time.time()
        expiration = cfg("Message_Expiration")
        retry_interval = cfg("Retry_Interval")
        max_interval = cfg("Max_Retry_Interval")
        max_retries = cfg("Max_Retries")
        if max_retries == "auto":
            max_retries = max_retries_auto(retry_interval, max_interval, expiration)
        if cfg("Never_Retry"):
            final = EXPIRED_RETRIES
        elif now >= m.received_at + expiration:
            final = EXPIRED_TIME
        elif max_retries != "none" and m.retries >= max_retries:
            final = EXPIRED_RETRIES
        else:
            final = None
        if final is not None:
            # Log the attempt's own response, then the permanent verdict.
            self.logs.mainlog.transient(m.msgid, m.batch_id, connid, m.domain, bytes_sent, m.group,
                                        m.binding, stage, m.retries, now - m.received_at,
                                        remote_ip, str(reply))
            self._permanent_many([(m, final, stage, connid, bytes_sent, remote_ip)],
                                 last_response=reply)
            return
        self.stats["transient"] += 1
        self._count("transient", m)
        self.logs.mainlog.transient(m.msgid, m.batch_id, connid, m.domain, bytes_sent, m.group,
                                    m.binding, stage, m.retries, now - m.received_at,
                                    remote_ip, str(reply))
        m.retries += 1
        interval = retry_interval * (2 ** min(m.retries - 1, 40))
        if max_interval > 0:
            interval = min(interval, max_interval)
        # Never sleep past the expiry: the message gets its last attempt then.
        m.next_attempt = min(now + interval, m.received_at + expiration)
        self._delay(m)
        self._background_task(self.spool.reschedule([m]))

    def _permanent_many(self, failures, last_response: Reply | None = None,
                        bounce: bool = True) -> None:
        """Log ``P`` + bouncelog ``B`` lines, bounce per original transaction, forget."""
        now = time.time()
        by_batch: dict[str, list] = {}
        for m, reply, stage, connid, bytes_sent, remote_ip in failures:
            self.stats["permanent"] += 1
            self._count("permanent", m)
            q = self.queue_for(m.binding, m.domain)
            if q is not None:
                q.failed += 1
            self.logs.mainlog.permanent(m.msgid, m.batch_id, connid, m.domain, bytes_sent, m.group,
                                        m.binding, stage, m.retries, now - m.received_at,
                                        remote_ip, str(reply))
            self.logs.bouncelog.bounce(m.msgid, m.batch_id, connid, m.rcpt, m.sender, m.group,
                                       m.binding, stage,
                                       classify_bounce(reply.code, reply.enhanced, reply.text),
                                       m.size, remote_ip, str(reply))
            by_batch.setdefault(m.batch_id, []).append((m, reply, remote_ip))
        for batch_id, items in by_batch.items():
            first = items[0][0]
            if bounce and should_bounce(first.sender) and self.config.lookup(
                    "Generate_Bounces", domain=first.domain, binding=first.binding):
                try:
                    self._bounce(items, last_response)
                except Exception as exc:  # a bounce must never lose the failure record
                    log.exception("bounce generation failed")
                    self.logs.paniclog.panic(f"bounce for batch {batch_id} failed: {exc!r}")
        self._finish([m for m, *_ in failures])

    def _bounce(self, items, last_response: Reply | None) -> None:
        first = items[0][0]
        inline = self.config.lookup("Bounces_Inline_Original", domain=first.domain,
                                    binding=first.binding)
        try:
            original = self._body(first.batch_id)
        except SpoolError:
            original, inline = b"", "none"  # the body is gone; the DSN still goes out
        failures = []
        for m, reply, remote_ip in items:
            diag = str(reply)
            if last_response is not None:
                diag += f" (last response: {last_response})"
            failures.append(Failure(recipient=m.rcpt, status=reply.enhanced or
                                    f"{reply.code // 100}.0.0", diagnostic=diag,
                                    remote_mta=remote_ip or None))
        mailerdaemon = self.config.lookup("Mailerdaemon", domain=first.domain,
                                          binding=first.binding) or f"mailer-daemon@{self.hostname}"
        data = render_bounce(original=original, original_sender=first.sender, failures=failures,
                             reporting_mta=self.hostname, mailerdaemon=mailerdaemon,
                             inline=inline, arrival_date=first.received_at)
        self.stats["bounces"] += 1
        self._background_task(self._inject_bounce(first.sender, data))

    async def _inject_bounce(self, rcpt: str, data: bytes) -> None:
        group = self.config.group_of("default")
        sub = Submission(sender="", recipients=[rcpt], body=data, peer_ip="127.0.0.1",
                         proto="internal", helo=self.hostname, binding="default", group=group)
        msgs = await self.spool.accept(sub)
        for m in msgs:
            self.logs.mainlog.reception(m.msgid, m.batch_id, "", m.rcpt, "", "127.0.0.1", m.size,
                                        "internal", m.group, m.binding)
        self.submit(msgs, data)

    # -- views for the CLI / console --------------------------------------------
    def summary(self) -> dict:
        active = sum(len(q.active) for q in self.queues.values())
        delayed = sum(q.delayed for q in self.queues.values())
        conns = sum(q.conns for q in self.queues.values())
        return {"active": active, "delayed": delayed, "connections": conns,
                "domains": len(self.queues), **self.stats}

    # -- control surface (console) ----------------------------------------------
    # Queries and commands for ``impetus.control`` (issue 7): counters, flush,
    # fail, retry, reroute, rebind, refresh, and the views behind `summary`,
    # `domain`, `active`, `mailq`, `showqueue`. Everything here runs on the
    # event loop, like the rest of the scheduler. The code above feeds it
    # through one-line hooks: ``_count`` and ``open_conns``.
    def _control_init(self) -> None:
        from collections import Counter
        self.started_at = time.time()
        self.stats_reset_at = self.started_at
        self.stats["received"] = 0
        self.bounces_before_reset = 0
        #: (event, binding, recipient domain) -> count since the last `summary reset`
        self.counters: Counter = Counter()
        #: open outbound connections -> their queue (the `domain` view)
        self.open_conns: dict = {}
        #: impetus.metrics.Metrics when the server exports metrics
        self.metrics = None

    def _count(self, event: str, m: QueuedMessage, n: int = 1) -> None:
        """``received``/``delivered``/``transient``/``permanent`` of one message."""
        self.counters[(event, m.binding, m.domain)] += n
        if event == "received":
            self.stats["received"] += n
        if self.metrics is not None:
            self.metrics.count(event, m.binding, m.domain, n)

    def reset_stats(self) -> None:
        self.bounces_before_reset += self.stats["bounces"]  # metrics stay monotonic
        for k in self.stats:
            self.stats[k] = 0
        self.counters.clear()
        self.stats_reset_at = time.time()

    def domain_matches(self, q: DomainQueue, m: QueuedMessage | None, domain: str) -> bool:
        """``all``, the queue name (routing domain) or the recipient domain."""
        if domain == "all":
            return True
        if q.domain == domain:
            return True
        return m.domain == domain if m is not None else q.plan_domain == domain

    def select(self, *, domain: str = "all", binding: str | None = None,
               states=("active", "delayed")) -> list[tuple[DomainQueue, QueuedMessage]]:
        """Queued messages of ``domain`` (and ``binding``), with their queue.
        Messages in flight are never selected for a command."""
        domain = domain.lower().rstrip(".") if domain != "all" else domain
        out = []
        if "active" in states:
            for q in list(self.queues.values()):
                if binding is not None and q.binding != binding:
                    continue
                for m in q.active:
                    if self.domain_matches(q, m, domain):
                        out.append((q, m))
        if "delayed" in states:
            for _, _, m in self.delayed:
                if m.state != "delayed" or (binding is not None and m.binding != binding):
                    continue
                q = self.queue_for(m.binding, m.domain)
                if self.domain_matches(q, m, domain):
                    out.append((q, m))
        return out

    def _unqueue(self, picked: list[tuple[DomainQueue, QueuedMessage]]) -> list[QueuedMessage]:
        """Take messages out of their active deque / the delayed heap."""
        active_ids = {id(m) for q, m in picked if m.state == "active"}
        delayed_ids = {id(m) for q, m in picked if m.state == "delayed"}
        if active_ids:
            for q in {q for q, m in picked if m.state == "active"}:
                q.active = deque(m for m in q.active if id(m) not in active_ids)
        if delayed_ids:
            self.delayed = [e for e in self.delayed if id(e[2]) not in delayed_ids]
            heapq.heapify(self.delayed)
            self._timer_wake.set()
        out = []
        for q, m in picked:
            if m.state == "delayed":
                q.delayed -= 1
            m.state = "new"
            out.append(m)
        return out

    def flush(self, domain: str = "all", binding: str | None = None) -> int:
        """Make delayed mail due now (`flush domain`, `binding flush domain`)."""
        msgs = self._unqueue(self.select(domain=domain, binding=binding, states=("delayed",)))
        now = time.time()
        for m in msgs:
            m.next_attempt = now
            self._activate(m)
        return len(msgs)

    def fail(self, picked, reply: Reply, *, quiet: bool = False) -> int:
        """Fail queued messages permanently (P + bouncelog; a bounce per
        ``Generate_Bounces`` unless ``quiet``)."""
        msgs = self._unqueue(picked)
        if msgs:
            self._permanent_many([(m, reply, NOT_CONNECTED, "", 0, "") for m in msgs],
                                 bounce=not quiet)
        return len(msgs)

    def find(self, msgid: str) -> QueuedMessage | None:
        return self.index.get(msgid)

    def retry(self, msgid: str) -> str:
        """`message retry`: a delayed message becomes due now."""
        m = self.index.get(msgid)
        if m is None:
            return "unknown"
        if m.state != "delayed":
            return m.state
        [m] = self._unqueue([(self.queue_for(m.binding, m.domain), m)])
        m.next_attempt = time.time()
        self._activate(m)
        return "retried"

    def reroute(self, src: str, dst: str, binding: str | None = None) -> int:
        """`reroute queue`: queued mail of recipient domain ``src`` goes to
        ``dst``'s queue (and route); recipients are unchanged."""
        dst = dst.lower().rstrip(".")
        picked = [(q, m) for q, m in self.select(domain=src, binding=binding)
                  if m.domain == src.lower().rstrip(".")]
        states = {id(m): m.state for _, m in picked}
        for m in self._unqueue(picked):
            m.domain = dst
            if states[id(m)] == "delayed":
                self._delay(m)
            else:
                self._activate(m)
        return len(picked)

    def rebind(self, binding: str, choose, domain: str = "all") -> dict[str, int]:
        """`rebind`: ``choose(msg) -> new binding`` for queued mail on ``binding``."""
        moved: dict[str, int] = {}
        picked = self.select(domain=domain, binding=binding)
        changes = [(q, m, choose(m)) for q, m in picked]
        changes = [(q, m, b) for q, m, b in changes if b and b != m.binding]
        states = {id(m): m.state for _, m, _ in changes}
        self._unqueue([(q, m) for q, m, _ in changes])
        for _, m, new in changes:
            m.binding = new
            m.group = self.config.group_of(new)
            moved[new] = moved.get(new, 0) + 1
            if states[id(m)] == "delayed":
                self._delay(m)
            else:
                self._activate(m)
        return moved

    def recount_delayed(self) -> None:
        """Recompute each queue's delayed count from the heap (after a reload
        changed routing domains: a delayed message wakes up in its new queue)."""
        for q in self.queues.values():
            q.delayed = 0
        for _, _, m in self.delayed:
            if m.state == "delayed":
                self.queue_for(m.binding, m.domain).delayed += 1

    def apply_config(self, config) -> None:
        """Hot reload (D20): new values apply to new decisions. Routing
        domains are recomputed for new mail; cached routes live out their
        TTL (`refresh domain` drops them); held queues are kicked in case
        ``Suspend_Delivery`` was lifted."""
        self.config = config
        self._routing.clear()
        self.recount_delayed()
        for q in list(self.queues.values()):
            if q.active:
                self._kick(q)

    def _idle_close(self, q: DomainQueue) -> None:
        while q.idle:
            fut = q.idle.popleft()
            if not fut.done():
                fut.set_result(False)

    async def refresh(self, domain: str = "all") -> list[DomainQueue]:
        """`refresh domain`: drop the route-cache entry (and the DNS answers
        it was built from), close idle connections, and re-resolve now."""
        domain = domain.lower().rstrip(".") if domain != "all" else domain
        qs = [q for q in self.queues.values() if self.domain_matches(q, None, domain)]
        names = set() if domain == "all" else {domain}
        for q in qs:
            names.add(q.plan_domain)
            if q.decision is not None:
                names.update(h.host for h in q.decision.hops)
                names.update(t.name for t in q.decision.plan.targets)
            q.decision = None
            q.decision_expires = 0.0
            q.dns_failures = 0
            self._idle_close(q)
        if domain == "all":
            self.resolver.flush()
        else:
            for name in names:
                self.resolver.flush(name)
        if qs:
            await asyncio.gather(*(self.route(q) for q in qs), return_exceptions=True)
        for q in qs:
            self._kick(q)
        return qs

    def next_hop(self, q: DomainQueue):
        """The hop the next connection would try first (`=>` in `domain`),
        without advancing the round-robin."""
        if q.decision is None:
            return None
        retry = self._lookup("Host_Failure_Retry", q)
        now = time.monotonic()
        rr = q.rr + 1
        for level in q.decision.levels:
            n = len(level)
            for i in range(n):
                hop = level[(rr + i) % n] if n > 1 else level[0]
                failed_at = self.failed_hosts.get((hop.ip, hop.port))
                if failed_at is None or now - failed_at >= retry:
                    return hop
        return None

    def host_failed(self, q: DomainQueue, hop) -> float | None:
        """Seconds since ``hop`` failed, while within ``Host_Failure_Retry``."""
        failed_at = self.failed_hosts.get((hop.ip, hop.port))
        if failed_at is None:
            return None
        age = time.monotonic() - failed_at
        return age if age < self._lookup("Host_Failure_Retry", q) else None

    def connections_of(self, q: DomainQueue) -> list:
        return [c for c, cq in self.open_conns.items() if cq is q]

    def inflight_by_queue(self) -> dict:
        """Messages in an SMTP transaction, per queue (one pass over the index)."""
        out: dict = {}
        for m in self.index.values():
            if m.state == "inflight":
                q = self.queue_for(m.binding, m.domain)
                out[q] = out.get(q, 0) + 1
        return out
