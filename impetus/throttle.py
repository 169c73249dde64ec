"""Traffic-shaping primitives: rate limiters and connection counters (§6).

Rates
-----
A rate is ``(n, s)``: at most ``n`` per ``s`` seconds, as parsed by
:class:`impetus.config.values.Rate` (``"5"`` -> ``(5, 1)``, ``"60/3"`` ->
``(60, 3)``).  ``n == 0`` means unlimited (spec §6.1): every acquisition is
allowed and nothing is stored.

Algorithm: GCRA
---------------
The generic cell rate algorithm keeps one number per key, the *theoretical
arrival time* ``TAT``.  With emission interval ``T = s / n`` and a burst of
``b`` cells (default ``b = n``; burst tolerance ``(b - 1) * T``)::

    tat     = max(TAT, now)
    new_tat = tat + cost * T
    allow_at = new_tat - b * T
    allowed  <=> allow_at <= now          (then TAT := new_tat)
    else wait  = allow_at - now           (nothing consumed)

So with the default burst, ``"5"`` lets 5 go at once after an idle second,
then one every 0.2 s; ``"60/3"`` lets 60 go at once, then one every 0.05 s.
A burst of 1 (``burst=1``) is strict spacing: one every ``T``, never two
together.  Sending ``m`` messages from an idle bucket therefore takes
``(m - b) * T``: 30 at ``"5"`` take 5.0 s with the default burst and
5.8 s with ``burst=1``.

The wait returned on refusal is exact: acquiring again after sleeping it
succeeds (unless someone else took the slot meanwhile), which is what lets a
throttled message wait in the active queue and be retried when the bucket
refills rather than after ``Retry_Interval``.

Keys
----
Keys are opaque strings chosen by the caller.  Throttles are shared *by
reference* (§6.3): one key per defining scope, e.g. the path of the stanza
where the option is set, not per binding/domain that inherits it.  For the
``cluster_*`` variants the key must be the same on every node (derive it
from the configuration, never from ``id()`` or a process-local counter).

Back ends
---------
* :class:`MemoryLimiter`: one node, in process.  ``try_acquire`` is
  synchronous (no await on the hot path); ``acquire`` wraps it.  Idle keys
  (``TAT`` in the past, i.e. idle for longer than their window) are forgotten
  by a periodic sweep, so memory is bounded by the keys active in the last
  ``sweep_interval`` seconds.
* :class:`RedisLimiter`: ``cluster_*`` throttles shared by several nodes
  through Redis (``Cluster_Throttle_Store = "redis://host:port/db"``).  The
  GCRA runs as one Lua script (``EVALSHA``; ``EVAL`` on ``NOSCRIPT``) that
  reads the Redis server's clock (``TIME``), so nodes with skewed clocks agree.
  Keys are ``impetus:throttle:<key>`` with a TTL equal to the time until the
  bucket is full again (never more than the window).

  **Fail open to the local limit.**  When Redis errs (down, refused, or no
  answer within ``timeout`` = 0.5 s) the call does not raise: that key is
  limited by a local :class:`MemoryLimiter` with the same rate instead, and
  Redis is not asked again for ``retry_after`` seconds (1 s), so an
  unreachable Redis costs at most one timeout per second, not one per
  message.  The error is logged at most once per minute.  During an outage
  each node enforces the full limit on its own, so a cluster of N nodes may
  send up to N times the cluster rate; mail keeps flowing, which for an MTA
  is the lesser evil (fail-closed would stop all cluster-throttled mail
  while Redis is down).

Connection caps
---------------
:class:`ConnectionCounter` counts concurrent holders per key against a limit
(``Max_Outbound_Connections`` and friends).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable, Protocol

log = logging.getLogger("impetus.throttle")

Rate = tuple[int, int]

__all__ = [
    "Rate", "Limiter", "MemoryLimiter", "RedisLimiter", "ConnectionCounter",
    "make_limiter", "KEY_PREFIX",
]

KEY_PREFIX = "impetus:throttle:"

# Float slack so that exactly-on-time requests (fake clocks, n * (s/n) != s
# in binary) are allowed.
_EPS = 1e-9


def _check(rate: Rate, cost: int, burst: int | None) -> tuple[float, float] | None:
    """``(interval, limit)`` for a rate, ``None`` if unlimited.  ``limit`` is
    ``burst * interval``: how far ``TAT`` may run ahead of now."""
    n, s = rate
    if n <= 0:
        return None
    if s <= 0:
        raise ValueError(f"bad rate {rate!r}: the period must be > 0")
    b = n if burst is None else burst
    if b < 1:
        raise ValueError(f"bad burst {burst!r}: must be >= 1")
    if cost < 0:
        raise ValueError(f"bad cost {cost!r}: must be >= 0")
    if cost > b:
        raise ValueError(f"cost {cost} exceeds the burst {b} of rate {rate!r}: it could never pass")
    interval = s / n
    return interval, b * interval


class Limiter(Protocol):
    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, burst: int | None = None) -> float:
        """0.0 if allowed (and consumed), else the seconds to wait until it
        would be allowed (nothing consumed)."""
        ...

    async def close(self) -> None:
        ...


class MemoryLimiter:
    """In-process GCRA.  ``clock`` is a monotonic clock in seconds
    (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, sweep_interval: float = 5.0):
        self._clock = clock
        self._tat: dict[str, float] = {}
        self.sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval

    def __len__(self) -> int:
        """Keys currently held (including idle ones not yet swept)."""
        return len(self._tat)

    def try_acquire(self, key: str, rate: Rate, cost: int = 1, *, burst: int | None = None) -> float:
        n, s = rate
        if n <= 0:
            return 0.0
        if burst is None and 0 < cost <= n and s > 0:  # fast path, common case
            interval = s / n
            limit = s
        else:
            r = _check(rate, cost, burst)
            if r is None:
                return 0.0
            interval, limit = r
        now = self._clock()
        if now >= self._next_sweep:
            self.sweep(now)
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + cost * interval
        wait = new_tat - limit - now
        if wait > _EPS:
            return wait
        self._tat[key] = new_tat
        return 0.0

    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, burst: int | None = None) -> float:
        return self.try_acquire(key, rate, cost, burst=burst)

    def peek(self, key: str, rate: Rate, cost: int = 1, *, burst: int | None = None) -> float:
        """The wait ``try_acquire`` would return, without consuming."""
        r = _check(rate, cost, burst)
        if r is None:
            return 0.0
        interval, limit = r
        now = self._clock()
        tat = max(self._tat.get(key, now), now)
        wait = tat + cost * interval - limit - now
        return wait if wait > _EPS else 0.0

    def forget(self, key: str) -> None:
        self._tat.pop(key, None)

    def sweep(self, now: float | None = None) -> int:
        """Drop keys whose bucket is full again (idle for at least their
        window); returns how many were dropped."""
        if now is None:
            now = self._clock()
        self._next_sweep = now + self.sweep_interval
        dead = [k for k, tat in self._tat.items() if tat <= now]
        for k in dead:
            del self._tat[k]
        return len(dead)

    async def close(self) -> None:
        pass


# KEYS[1]: bucket key.  ARGV[1]: emission interval (us, may be fractional),
# ARGV[2]: limit = burst * interval (us), ARGV[3]: cost.
# Returns 0 if allowed (TAT stored), else the wait in microseconds (>= 1).
# Numbers are written with string.format: tostring() would print 14 digits.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = now
local v = redis.call('GET', KEYS[1])
if v then
  v = tonumber(v)
  if v and v > now then tat = v end
end
local new_tat = tat + cost * interval
local wait = new_tat - limit - now
if wait > 0.5 then
  return math.ceil(wait)
end
local ttl = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', math.ceil(new_tat)), 'PX', string.format('%d', ttl))
return 0
"""
GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest()


class RedisLimiter:
    """GCRA shared through Redis (``cluster_*`` throttles).  See the module
    docstring for the failure policy (fail open to the local limit)."""

    def __init__(self, url: str, *, timeout: float = 0.5, retry_after: float = 1.0,
                 prefix: str = KEY_PREFIX, log_every: float = 60.0,
                 fallback: MemoryLimiter | None = None, clock: Callable[[], float] = time.monotonic):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import NoScriptError, RedisError

        self.url = url
        self.timeout = timeout
        self.retry_after = retry_after
        self.prefix = prefix
        self.log_every = log_every
        self.fallback = fallback if fallback is not None else MemoryLimiter(clock)
        self._clock = clock
        self._NoScriptError = NoScriptError
        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        # No client-side retries: one attempt bounded by ``timeout``; the
        # circuit breaker below decides when to try again.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_error=[], health_check_interval=0)
        self._down_until = float("-inf")
        self._last_log = float("-inf")
        # counters, for metrics/tests
        self.redis_calls = 0
        self.fallback_calls = 0
        self.errors = 0
        self.script_loads = 0

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down (local fallback in use)."""
        return self._clock() < self._down_until

    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, burst: int | None = None) -> float:
        r = _check(rate, cost, burst)
        if r is None:
            return 0.0
        if self._clock() < self._down_until:
            self.fallback_calls += 1
            return self.fallback.try_acquire(key, rate, cost, burst=burst)
        interval, limit = r
        args = (repr(interval * 1e6), repr(limit * 1e6), str(cost))
        k = self.prefix + key
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    wait_us = await self._client.evalsha(GCRA_SHA, 1, k, *args)
                except self._NoScriptError:
                    self.script_loads += 1
                    wait_us = await self._client.eval(GCRA_LUA, 1, k, *args)
        except self._errors as e:
            self._failed(e)
            self.fallback_calls += 1
            return self.fallback.try_acquire(key, rate, cost, burst=burst)
        self.redis_calls += 1
        return int(wait_us) / 1e6

    def _failed(self, e: BaseException) -> None:
        self.errors += 1
        now = self._clock()
        self._down_until = now + self.retry_after
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.warning("cluster throttle store %s unavailable (%s: %s); using local limits "
                        "(fail open), retrying every %.1fs",
                        self.url, type(e).__name__, e or "timeout", self.retry_after)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self._client.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except self._errors:  # pragma: no cover
            pass


def make_limiter(store_url: str | None, **kw) -> Limiter:
    """``Cluster_Throttle_Store``: unset/empty -> :class:`MemoryLimiter`;
    ``redis://``, ``rediss://`` or ``unix://`` -> :class:`RedisLimiter`."""
    if not store_url:
        return MemoryLimiter(**kw)
    scheme = store_url.split(":", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisLimiter(store_url, **kw)
    raise ValueError(f"unsupported throttle store {store_url!r} (expected redis://host:port/db)")


class ConnectionCounter:
    """Concurrent-connection caps: ``try_take(key, limit)`` takes a slot if
    fewer than ``limit`` are held (``limit < 0`` or ``None``: unlimited),
    ``release(key)`` gives it back.  Keys at zero are dropped."""

    __slots__ = ("_n",)

    def __init__(self):
        self._n: dict[str, int] = {}

    def try_take(self, key: str, limit: int | None) -> bool:
        c = self._n.get(key, 0)
        if limit is not None and limit >= 0 and c >= limit:
            return False
        self._n[key] = c + 1
        return True

    def release(self, key: str) -> None:
        c = self._n.get(key, 0)
        if c <= 1:
            if c <= 0:
                raise ValueError(f"release({key!r}) without a matching take")
            del self._n[key]
        else:
            self._n[key] = c - 1

    def count(self, key: str) -> int:
        return self._n.get(key, 0)

    def __len__(self) -> int:
        return len(self._n)
