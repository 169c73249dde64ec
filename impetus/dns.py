"""Asynchronous stub resolver for outbound delivery (spec §3.6-§3.10, D17).

* :func:`parse_resolv_conf` reads a resolv.conf-style file (``Resolv_Conf``)
  supporting exactly the directives of spec §3.10 plus the D17 port extension
  ``nameserver 127.0.0.1#5353`` / ``nameserver [::1]#5353``.
* :class:`Resolver` answers the two questions the router asks -- ``mx(domain)``
  and ``addresses(name, want_ipv6)`` -- as :class:`DnsResult` values.  It never
  raises for DNS problems: garbage, truncated or malformed answers, timeouts
  and server failures are all mapped to a status with an ``error`` text.

Statuses: ``OK``, ``NODATA``, ``NXDOMAIN`` (permanent answers, cached for
their TTL / the SOA negative TTL, clamped by ``Min_DNS_TTL``/``Max_DNS_TTL``)
and ``SERVFAIL``, ``TIMEOUT``, ``BADANSWER`` (transient, cached for at most
``failure_ttl`` seconds, default 1 s, only to absorb bursts).

The resolver never reads ``/etc/resolv.conf`` by itself: it is built from a
:class:`ResolverSettings` (``dns.asyncresolver.Resolver(configure=False)``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

log = logging.getLogger("impetus.dns")

__all__ = [
    "OK", "NODATA", "NXDOMAIN", "SERVFAIL", "TIMEOUT", "BADANSWER",
    "STATUSES", "TRANSIENT_STATUSES",
    "ResolvConfError", "Nameserver", "ResolverSettings", "parse_resolv_conf",
    "parse_resolv_conf_text", "parse_nameserver", "DnsResult", "Resolver",
]

OK = "OK"
NODATA = "NODATA"
NXDOMAIN = "NXDOMAIN"
SERVFAIL = "SERVFAIL"
TIMEOUT = "TIMEOUT"
BADANSWER = "BADANSWER"
STATUSES = frozenset({OK, NODATA, NXDOMAIN, SERVFAIL, TIMEOUT, BADANSWER})
TRANSIENT_STATUSES = frozenset({SERVFAIL, TIMEOUT, BADANSWER})

DEFAULT_MAX_TTL = 4294967295
# glibc limits (resolv.h): RES_MAXNDOTS, RES_MAXRETRANS, RES_MAXRETRY, MAXRESOLVSORT
_MAX_NDOTS = 15
_MAX_TIMEOUT = 30
_MAX_ATTEMPTS = 5
_MAX_SORTLIST = 10
_MAX_CNAME_HOPS = 8
_HOSTS_TTL = 60
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


# --------------------------------------------------------------------------
# resolv.conf
# --------------------------------------------------------------------------

class ResolvConfError(ValueError):
    """The resolver configuration file is unusable (unreadable, no nameserver,
    or a malformed ``nameserver`` line).  ``str()`` is ``FILE:LINE: message``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Nameserver:
    address: str          # normalised IP address text (IPv6 without brackets)
    port: int = 53

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return host if self.port == 53 else f"{host}#{self.port}"


def parse_nameserver(text: str) -> Nameserver:
    """Parse ``ADDR``, ``ADDR#PORT``, ``[V6]`` or ``[V6]#PORT``.

    Raises ``ValueError`` with a readable message."""
    s = text.strip()
    port = 53
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in nameserver {text!r}")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith("#"):
                raise ValueError(
                    f"unexpected {rest!r} after ']' in nameserver {text!r} "
                    "(write the port as [ADDR]#PORT)")
            port = _parse_port(rest[1:], text)
    else:
        host, sep, p = s.partition("#")
        if sep:
            port = _parse_port(p, text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        hint = ""
        if host.count(":") == 1 and "." in host:
            hint = " (a port is written ADDR#PORT, e.g. 127.0.0.1#5353)"
        raise ValueError(f"nameserver {text!r} is not an IP address{hint}") from None
    return Nameserver(str(ip), port)


def _parse_port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ValueError(f"invalid port {p!r} in nameserver {text!r}")
    return int(p)


@dataclass(slots=True)
class ResolverSettings:
    """What a resolv.conf says (spec §3.10).  Build one directly in code, or
    with :func:`parse_resolv_conf`."""

    nameservers: list[Nameserver]
    search: list[str] = field(default_factory=list)   # effective search list
    domain: str | None = None
    sortlist: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    lookup: str = "bf"        # b = DNS, f = hosts file; order matters
    ndots: int = 1
    timeout: float = 5.0      # seconds per query (options timeout / retrans)
    attempts: int = 2         # rounds over all nameservers (options attempts / retry)
    warnings: list[str] = field(default_factory=list)
    path: str | None = None

    @classmethod
    def local(cls, port: int, host: str = "127.0.0.1", *, timeout: float = 1.0,
              attempts: int = 2) -> "ResolverSettings":
        """Settings for one (test) nameserver on ``host#port``."""
        return cls([parse_nameserver(f"[{host}]#{port}" if ":" in host else f"{host}#{port}")],
                   timeout=timeout, attempts=attempts)


def parse_resolv_conf(path: str | os.PathLike) -> ResolverSettings:
    """Read a resolver configuration file.  Only the file given is read (the
    caller passes ``/etc/resolv.conf`` explicitly when ``Resolv_Conf`` is
    unset).  Raises :class:`ResolvConfError`."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ResolvConfError(p, None, f"cannot read resolver configuration: {e.strerror or e}") from None
    return parse_resolv_conf_text(text, p)


def parse_resolv_conf_text(text: str, path: str = "<resolv.conf>") -> ResolverSettings:
    nameservers: list[Nameserver] = []
    search: list[str] = []
    domain: str | None = None
    sortlist: list = []
    lookup = "bf"
    ndots, timeout, attempts = 1, 5.0, 2
    warnings: list[str] = []

    def warn(lineno: int, msg: str) -> None:
        warnings.append(f"{path}:{lineno}: {msg}")

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        tokens = line.split()
        # a token starting with '#' or ';' begins a trailing comment
        for i, t in enumerate(tokens):
            if t[0] in "#;":
                tokens = tokens[:i]
                break
        key, args = tokens[0], tokens[1:]
        kw = key.lower()
        if kw == "nameserver":
            if not args:
                raise ResolvConfError(path, lineno, "'nameserver' needs an address")
            try:
                nameservers.append(parse_nameserver(args[0]))
            except ValueError as e:
                raise ResolvConfError(path, lineno, str(e)) from None
            if len(args) > 1:
                warn(lineno, f"extra text after nameserver ignored: {' '.join(args[1:])!r}")
        elif kw in ("search", "domain"):
            # mutually exclusive; the last instance wins (resolv.conf(5))
            names = [a.rstrip(".").lower() for a in args if a.rstrip(".")]
            if not names:
                warn(lineno, f"'{kw}' without a domain ignored")
                continue
            if kw == "domain":
                domain = names[0]
                search = [names[0]]
                if len(names) > 1:
                    warn(lineno, "'domain' takes one name; extra names ignored")
            else:
                domain = None
                search = names
        elif kw == "sortlist":
            sortlist = []
            for a in args:
                net = _parse_sortlist_item(a)
                if net is None:
                    warn(lineno, f"invalid sortlist entry {a!r} ignored")
                elif len(sortlist) >= _MAX_SORTLIST:
                    warn(lineno, f"more than {_MAX_SORTLIST} sortlist entries; {a!r} ignored")
                else:
                    sortlist.append(net)
        elif kw == "lookup":
            value = _parse_lookup(args)
            if value is None:
                warn(lineno, f"invalid lookup {' '.join(args)!r} ignored (use 'bf' or 'fb')")
            else:
                lookup = value
        elif kw == "options":
            for opt in args:
                name, sep, val = opt.partition(":")
                name = name.lower()
                if name in ("ndots", "timeout", "retrans", "attempts", "retry"):
                    if not sep or not val.isdigit():
                        warn(lineno, f"option {opt!r} needs a number; ignored")
                        continue
                    n = int(val)
                    if name == "ndots":
                        ndots = min(n, _MAX_NDOTS)
                    elif name in ("timeout", "retrans"):
                        timeout = float(min(max(n, 1), _MAX_TIMEOUT))
                    else:
                        attempts = min(max(n, 1), _MAX_ATTEMPTS)
                elif name == "rotate":
                    warn(lineno, "'options rotate' is not supported; ignored")
                else:
                    warn(lineno, f"unsupported option {opt!r} ignored")
        else:
            warn(lineno, f"unsupported directive {key!r} ignored")

    if not nameservers:
        raise ResolvConfError(path, None, "no 'nameserver' line: at least one nameserver is required")
    return ResolverSettings(nameservers=nameservers, search=search, domain=domain,
                            sortlist=sortlist, lookup=lookup, ndots=ndots,
                            timeout=timeout, attempts=attempts, warnings=warnings,
                            path=path)


def _parse_sortlist_item(item: str):
    addr, sep, mask = item.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if not sep:
        if ip.version == 6:
            return ipaddress.ip_network(f"{ip}/128")
        first = int(str(ip).split(".")[0])   # natural (classful) netmask
        prefix = 8 if first < 128 else 16 if first < 192 else 24
        return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    try:
        return ipaddress.ip_network(f"{ip}/{mask}", strict=False)
    except ValueError:
        return None


def _parse_lookup(args: list[str]) -> str | None:
    words = {"bind": "b", "file": "f", "b": "b", "f": "f"}
    if len(args) == 1 and args[0].lower() in ("bf", "fb"):
        return args[0].lower()
    out = ""
    for a in args:
        c = words.get(a.lower())
        if c is None or c in out:
            return None
        out += c
    return out or None


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------

@dataclass(slots=True)
class DnsResult:
    """Outcome of ``Resolver.mx()`` / ``Resolver.addresses()``.

    ``records``: for MX a list of ``(preference, exchange)`` sorted by
    preference, the exchange lower-case without the trailing dot (the root,
    as in a null MX, is ``"."``); for addresses a list of ``ipaddress``
    objects, IPv4 first, then IPv6.  ``ttl`` is in seconds, clamped by
    ``min_ttl``/``max_ttl`` (0 for transient failures).  ``canonical_name``
    is the end of any CNAME chain (lower-case, no trailing dot)."""

    status: str
    records: list
    ttl: int
    canonical_name: str
    error: str | None = None
    name: str = ""
    rdtype: str = ""
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES

    @property
    def permanent_failure(self) -> bool:
        return self.status in (NXDOMAIN, NODATA)

    @property
    def null_mx(self) -> bool:
        """RFC 7505 null MX: the only MX record(s) point at the root ``.``."""
        return (self.status == OK and self.rdtype == "MX" and bool(self.records)
                and all(ex == "." for _, ex in self.records))


class _Entry:
    """Immutable per-(name, type) answer as kept in the cache."""
    __slots__ = ("status", "records", "ttl", "canonical", "error", "expires")

    def __init__(self, status, records, ttl, canonical, error, expires):
        self.status = status
        self.records = records       # tuple
        self.ttl = ttl               # clamped TTL (0 for transient)
        self.canonical = canonical
        self.error = error
        self.expires = expires       # monotonic deadline; <= stored time = not cached


# --------------------------------------------------------------------------
# the resolver
# --------------------------------------------------------------------------

class _MalformedResponse(dns.exception.FormError):
    """A reply that could not be parsed (garbage bytes, bad labels, ...)."""


class _Do53(dns.nameserver.Do53Nameserver):
    """Do53 nameserver that reports malformed UDP replies (dnspython ignores
    them and waits for the timeout) and can disable the TCP fallback."""

    def __init__(self, address: str, port: int, tcp_fallback: bool):
        super().__init__(address, port)
        self.tcp_fallback = tcp_fallback

    async def async_query(self, request, timeout, source, source_port, max_size,
                          backend, one_rr_per_rrset=False, ignore_trailing=False):
        try:
            if max_size:
                return await dns.asyncquery.tcp(
                    request, self.address, timeout=timeout, port=self.port,
                    source=source, source_port=source_port, backend=backend,
                    one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing)
            return await dns.asyncquery.udp(
                request, self.address, timeout=timeout, port=self.port,
                source=source, source_port=source_port,
                raise_on_truncation=self.tcp_fallback, backend=backend,
                one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                ignore_unexpected=True, ignore_errors=False)
        except (dns.exception.Timeout, dns.message.Truncated, OSError, EOFError,
                dns.exception.FormError):
            raise
        except Exception as e:   # anything from_wire() can throw on garbage
            raise _MalformedResponse(f"{type(e).__name__}: {e}") from e


def _clean(name: dns.name.Name | str) -> str:
    if isinstance(name, dns.name.Name):
        name = name.to_text(omit_final_dot=True)
    return name.lower()


def _normalize(name: str) -> str:
    """Cache key form of a domain name: lower case, no trailing dot."""
    n = name.strip()
    if n.endswith(".") and len(n) > 1:
        n = n[:-1]
    if not n.isascii():
        try:
            n = dns.name.from_unicode(n).to_text(omit_final_dot=True)
        except Exception:  # invalid IDN: caught again when building the query
            pass
    return n.lower()


_LITERAL_RE = re.compile(r"\s*(?:[0-9.]+|\[.*\]|[0-9A-Fa-f.]*:[0-9A-Za-z:.%_-]*)\s*")


def _ip_literal(name: str):
    if _LITERAL_RE.fullmatch(name) is None:    # cheap pre-check: most names are not IPs
        return None
    s = name.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
        if s[:5].lower() == "ipv6:":
            s = s[5:]
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def _soa_negative_ttl(response) -> int | None:
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, min(r.minimum for r in rrset))
    return None


class Resolver:
    """Async resolver with a TTL-respecting cache.

    ``Resolver(settings, min_ttl=0, max_ttl=4294967295)``; see the module
    docstring.  One instance may be shared by any number of coroutines;
    concurrent identical queries are coalesced into one network query."""

    def __init__(self, settings: ResolverSettings, *, min_ttl: int = 0,
                 max_ttl: int = DEFAULT_MAX_TTL, failure_ttl: float = 1.0,
                 tcp_fallback: bool = True, hosts_path: str | None = "/etc/hosts",
                 max_entries: int = 100_000):
        if not settings.nameservers:
            raise ValueError("ResolverSettings has no nameservers")
        self.settings = settings
        self.min_ttl = max(0, int(min_ttl))
        self.max_ttl = max(self.min_ttl, int(max_ttl))
        self.failure_ttl = max(0.0, float(failure_ttl))
        self.tcp_fallback = tcp_fallback
        self.hosts_path = hosts_path
        self.max_entries = max_entries
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [_Do53(ns.address, ns.port, tcp_fallback) for ns in settings.nameservers]
        r.timeout = float(settings.timeout)
        # resolv.conf semantics: `attempts` rounds over every nameserver
        self.lifetime = float(settings.timeout) * settings.attempts * len(settings.nameservers)
        r.lifetime = self.lifetime
        r.search = [dns.name.from_text(d) for d in settings.search]
        r.domain = dns.name.root
        r.ndots = settings.ndots
        r.cache = None
        r.retry_servfail = False
        r.use_edns(0, 0, 1232)
        self._dr = r
        self._cache: dict[tuple[str, int], _Entry] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._hosts: tuple[float, dict[str, list]] | None = None
        self._stats = {"hits": 0, "misses": 0, "queries": 0, "coalesced": 0}

    @classmethod
    def from_resolv_conf(cls, path: str | os.PathLike, **kw) -> "Resolver":
        return cls(parse_resolv_conf(path), **kw)

    @classmethod
    def from_config(cls, config, **kw) -> "Resolver":
        """Build from an ``impetus.config.Config``: ``Resolv_Conf`` (else
        /etc/resolv.conf), ``Min_DNS_TTL``, ``Max_DNS_TTL`` and
        ``DNS_Fallback_To_TCP`` (TCP fallback stays on unless that option is
        explicitly set to false)."""
        def opt(name, default):
            try:
                return config.lookup(name)
            except KeyError:
                return default
        path = opt("Resolv_Conf", None) or "/etc/resolv.conf"
        kw.setdefault("min_ttl", opt("Min_DNS_TTL", 0) or 0)
        max_ttl = opt("Max_DNS_TTL", DEFAULT_MAX_TTL)
        kw.setdefault("max_ttl", DEFAULT_MAX_TTL if max_ttl is None else max_ttl)
        if "tcp_fallback" not in kw:
            try:
                explicit = config.explain("DNS_Fallback_To_TCP").scope != "default"
                if explicit and not config.lookup("DNS_Fallback_To_TCP"):
                    kw["tcp_fallback"] = False
            except (KeyError, AttributeError):
                pass
        return cls(parse_resolv_conf(path), **kw)

    # ------------------------------------------------------------ public API

    async def mx(self, domain: str) -> DnsResult:
        key = _normalize(domain)
        now = time.monotonic()
        e = self._cache_get(key, dns.rdatatype.MX, now)
        if e is None:
            e = await self._fetch(key, dns.rdatatype.MX)
            cached = False
        else:
            cached = True
        return self._result(key, "MX", e, now, cached)

    async def txt(self, name: str) -> DnsResult:
        """TXT records of ``name`` (MTA-STS discovery): ``records`` is a list
        of strings, each record's character-strings joined (RFC 7208 §3.3
        style), decoded as UTF-8 with replacement.  Cached like the others;
        the hosts file is never consulted."""
        key = _normalize(name)
        now = time.monotonic()
        e = self._cache_get(key, dns.rdatatype.TXT, now)
        if e is None:
            e = await self._fetch(key, dns.rdatatype.TXT)
            cached = False
        else:
            cached = True
        return self._result(key, "TXT", e, now, cached)

    async def addresses(self, name: str, want_ipv6: bool = False) -> DnsResult:
        ip = _ip_literal(name)
        if ip is not None:
            return self._literal_result(name, ip, want_ipv6)
        key = _normalize(name)
        now = time.monotonic()
        a = self._cache_get(key, dns.rdatatype.A, now)
        aaaa = self._cache_get(key, dns.rdatatype.AAAA, now) if want_ipv6 else None
        cached = a is not None and (aaaa is not None or not want_ipv6)
        if not cached:
            if want_ipv6:
                a, aaaa = await asyncio.gather(
                    self._maybe_fetch(key, dns.rdatatype.A, a),
                    self._maybe_fetch(key, dns.rdatatype.AAAA, aaaa))
            else:
                a = await self._fetch(key, dns.rdatatype.A)
            now = time.monotonic()
        return self._combine(key, a, aaaa, now, cached)

    def cache_stats(self) -> dict:
        now = time.monotonic()
        pos = neg = trans = expired = 0
        for e in self._cache.values():
            if e.expires <= now:
                expired += 1
            elif e.status == OK:
                pos += 1
            elif e.status in TRANSIENT_STATUSES:
                trans += 1
            else:
                neg += 1
        return {"entries": len(self._cache), "positive": pos, "negative": neg,
                "transient": trans, "expired": expired,
                "inflight": len(self._inflight), **self._stats}

    def flush(self, name: str | None = None) -> int:
        """Drop cached answers for ``name`` (all types), or everything."""
        if name is None:
            n = len(self._cache)
            self._cache.clear()
            return n
        key = _normalize(name)
        victims = [k for k in self._cache if k[0] == key]
        for k in victims:
            del self._cache[k]
        return len(victims)

    def purge_expired(self) -> int:
        now = time.monotonic()
        victims = [k for k, e in self._cache.items() if e.expires <= now]
        for k in victims:
            del self._cache[k]
        return len(victims)

    # ------------------------------------------------------------ internals

    def _clamp(self, ttl: int) -> int:
        return min(max(int(ttl), self.min_ttl), self.max_ttl)

    def _cache_get(self, key: str, rdtype: int, now: float) -> _Entry | None:
        e = self._cache.get((key, rdtype))
        if e is not None:
            if e.expires > now:
                self._stats["hits"] += 1
                return e
            del self._cache[(key, rdtype)]
        return None

    def _store(self, key: str, rdtype: int, e: _Entry) -> None:
        if e.expires <= time.monotonic():
            return
        if len(self._cache) >= self.max_entries:
            self.purge_expired()
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]   # oldest insertion
        self._cache[(key, rdtype)] = e

    async def _maybe_fetch(self, key, rdtype, have):
        return have if have is not None else await self._fetch(key, rdtype)

    async def _fetch(self, key: str, rdtype: int) -> _Entry:
        """Network lookup (coalesced with identical concurrent lookups)."""
        self._stats["misses"] += 1
        k = (key, rdtype)
        fut = self._inflight.get(k)
        if fut is None or fut.get_loop() is not asyncio.get_running_loop():
            fut = asyncio.ensure_future(self._lookup(key, rdtype))
            self._inflight[k] = fut
            fut.add_done_callback(lambda f, k=k: self._inflight.pop(k, None)
                                  if self._inflight.get(k) is f else None)
        else:
            self._stats["coalesced"] += 1
        return await asyncio.shield(fut)

    async def _lookup(self, key: str, rdtype: int) -> _Entry:
        try:
            e = await self._resolve_chain(key, rdtype)
        except Exception as ex:  # never let anything escape
            log.exception("unexpected error resolving %s %s", key, dns.rdatatype.to_text(rdtype))
            e = self._transient(BADANSWER, key, f"internal resolver error: {type(ex).__name__}: {ex}")
        if rdtype in _ADDRESS_TYPES and e.status in (NXDOMAIN, NODATA) and self.settings.lookup == "bf":
            e = self._from_hosts(key, rdtype) or e
        self._store(key, rdtype, e)
        return e

    def _transient(self, status: str, canonical: str, error: str) -> _Entry:
        return _Entry(status, (), 0, canonical, error, time.monotonic() + self.failure_ttl)

    def _positive(self, records, ttl, canonical, error=None) -> _Entry:
        ttl = self._clamp(ttl)
        return _Entry(OK, tuple(records), ttl, canonical, error, time.monotonic() + ttl)

    def _negative(self, status, ttl, canonical, error) -> _Entry:
        ttl = self._clamp(ttl)
        return _Entry(status, (), ttl, canonical, error, time.monotonic() + ttl)

    async def _resolve_chain(self, key: str, rdtype: int) -> _Entry:
        if self.settings.lookup == "fb" and rdtype in _ADDRESS_TYPES:
            hit = self._from_hosts(key, rdtype)
            if hit is not None:
                return hit
        try:
            qname = dns.name.from_text(key, None) if key else None
        except Exception as ex:
            qname = None
            reason = str(ex)
        else:
            reason = "empty name"
        if qname is None:
            return self._negative(NXDOMAIN, 0, key, f"invalid domain name {key!r}: {reason}")
        tname = dns.rdatatype.to_text(rdtype)
        min_ttl_seen: int | None = None
        search = True
        hops = 0
        chain = [key]
        while True:
            self._stats["queries"] += 1
            status, ans, err, neg_ttl, canon = await self._query(qname, rdtype, search)
            if status != OK:
                if status in TRANSIENT_STATUSES:
                    return self._transient(status, canon or _clean(qname), err)
                ttl = neg_ttl if min_ttl_seen is None else min(neg_ttl, min_ttl_seen)
                return self._negative(status, ttl, canon or _clean(qname), err)
            cr = ans.chaining_result
            canon_name = ans.canonical_name
            chain_ttl = cr.minimum_ttl
            if ans.rrset is not None:
                ttl = chain_ttl if min_ttl_seen is None else min(chain_ttl, min_ttl_seen)
                try:
                    records = self._records(ans.rrset, rdtype)
                except Exception as ex:
                    return self._transient(BADANSWER, _clean(canon_name),
                                           f"unusable {tname} data for {_clean(canon_name)}: {ex}")
                return self._positive(records, ttl, _clean(canon_name))
            # no data of the asked type
            resp = ans.response
            if resp.flags & dns.flags.TC:
                return self._transient(BADANSWER, _clean(canon_name),
                                       f"truncated answer for {_clean(qname)} {tname} (TCP fallback disabled)")
            soa_ttl = _soa_negative_ttl(resp)
            if canon_name != ans.qname and soa_ttl is None:
                # the server gave us a CNAME but did not chase it: follow it
                hops += 1
                chain.append(_clean(canon_name))
                if hops > _MAX_CNAME_HOPS or _clean(canon_name) in chain[:-1]:
                    return self._transient(BADANSWER, _clean(canon_name),
                                           f"CNAME chain too long or looping: {' -> '.join(chain)}")
                cname_ttl = min((rr.ttl for rr in resp.answer), default=0)
                min_ttl_seen = cname_ttl if min_ttl_seen is None else min(min_ttl_seen, cname_ttl)
                qname = canon_name
                search = False
                continue
            ttl = soa_ttl if soa_ttl is not None else 0
            if min_ttl_seen is not None:
                ttl = min(ttl, min_ttl_seen)
            return self._negative(NODATA, ttl, _clean(canon_name),
                                  f"{_clean(canon_name)} has no {tname} record")

    async def _query(self, qname, rdtype, search):
        """One logical query through dnspython.  Returns
        (status, answer|None, error|None, negative_ttl, canonical|None)."""
        tname = dns.rdatatype.to_text(rdtype)
        what = f"{_clean(qname)} {tname}"
        try:
            ans = await self._dr.resolve(qname, rdtype, search=search,
                                         raise_on_no_answer=False)
            return OK, ans, None, 0, None
        except dns.resolver.NXDOMAIN as ex:
            responses = ex.kwargs.get("responses") or {}
            ttl = 0
            for resp in responses.values():
                t = _soa_negative_ttl(resp)
                if t is not None:
                    ttl = t
            try:
                canon = _clean(ex.canonical_name)
            except Exception:
                canon = None
            return NXDOMAIN, None, f"{what}: no such domain (NXDOMAIN)", ttl, canon
        except dns.resolver.LifetimeTimeout as ex:
            errors = ex.kwargs.get("errors") or []
            extra = _describe_errors(errors, skip_timeouts=True)
            servers = ", ".join(str(ns) for ns in self.settings.nameservers)
            msg = (f"{what}: no answer from {servers} within {self.lifetime:g} s "
                   f"(timeout {self.settings.timeout:g} s x {self.settings.attempts} attempts)")
            if extra:
                msg += f"; {extra}"
            return TIMEOUT, None, msg, 0, None
        except dns.resolver.NoNameservers as ex:
            errors = ex.kwargs.get("errors") or []
            status = _classify_errors(errors)
            return status, None, f"{what}: {_describe_errors(errors) or 'all nameservers failed'}", 0, None
        except dns.resolver.YXDOMAIN:
            return BADANSWER, None, f"{what}: YXDOMAIN (DNAME substitution too long)", 0, None
        except dns.exception.Timeout as ex:
            return TIMEOUT, None, f"{what}: {ex}", 0, None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel) as ex:
            return NXDOMAIN, None, f"invalid domain name {_clean(qname)!r}: {ex}", 0, None
        except Exception as ex:
            return BADANSWER, None, f"{what}: {type(ex).__name__}: {ex}", 0, None

    @staticmethod
    def _records(rrset, rdtype):
        if rdtype == dns.rdatatype.MX:
            out = [(int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
                   for r in rrset]
            out = sorted(set(out))
            return out
        if rdtype == dns.rdatatype.TXT:
            return [b"".join(r.strings).decode("utf-8", "replace") for r in rrset]
        return list(dict.fromkeys(ipaddress.ip_address(r.address) for r in rrset))

    # -------------------------------------------------- result construction

    def _result(self, key, tname, e: _Entry, now: float, cached: bool) -> DnsResult:
        return DnsResult(e.status, list(e.records), self._ttl_left(e, now, cached),
                         e.canonical, e.error, key, tname, cached)

    @staticmethod
    def _ttl_left(e: _Entry, now: float, cached: bool) -> int:
        if not cached or e.status in TRANSIENT_STATUSES:
            return e.ttl
        left = math.ceil(e.expires - now)
        return left if left < e.ttl else e.ttl

    def _combine(self, key, a: _Entry, aaaa: _Entry | None, now: float, cached: bool) -> DnsResult:
        if aaaa is None:
            recs = list(a.records)
            if self.settings.sortlist and len(recs) > 1:
                recs = self._sort(recs)
            return DnsResult(a.status, recs, self._ttl_left(a, now, cached),
                             a.canonical, a.error, key, "A", cached)
        st_a, st_6 = a.status, aaaa.status
        canonical = a.canonical if st_a in (OK, NODATA) else aaaa.canonical
        if a.records or aaaa.records:
            records = list(a.records) + list(aaaa.records)
            if self.settings.sortlist and len(records) > 1:
                records = self._sort(list(a.records)) + self._sort(list(aaaa.records))
            ttl = min(self._ttl_left(e, now, cached) for e in (a, aaaa) if e.status != NXDOMAIN)
            error = None
            if st_a in TRANSIENT_STATUSES or st_6 in TRANSIENT_STATUSES:
                error = "; ".join(f"{t}: {e.error}" for t, e in (("A", a), ("AAAA", aaaa))
                                  if e.status in TRANSIENT_STATUSES)
            return DnsResult(OK, records, ttl, canonical, error, key, "A+AAAA", cached)
        for e in (a, aaaa):
            if e.status in TRANSIENT_STATUSES:
                return DnsResult(e.status, [], e.ttl, canonical, e.error, key, "A+AAAA", cached)
        if st_a == NXDOMAIN or st_6 == NXDOMAIN:
            nx = a if st_a == NXDOMAIN else aaaa
            return DnsResult(NXDOMAIN, [], self._ttl_left(nx, now, cached), canonical,
                             nx.error, key, "A+AAAA", cached)
        ttl = min(self._ttl_left(a, now, cached), self._ttl_left(aaaa, now, cached))
        return DnsResult(NODATA, [], ttl, canonical, f"{key} has no A or AAAA record",
                         key, "A+AAAA", cached)

    def _sort(self, addrs: list) -> list:
        sl = self.settings.sortlist
        if not sl or len(addrs) < 2:
            return addrs

        def rank(ip):
            for i, net in enumerate(sl):
                if ip.version == net.version and ip in net:
                    return i
            return len(sl)
        return sorted(addrs, key=rank)

    def _literal_result(self, name, ip, want_ipv6) -> DnsResult:
        ttl = self._clamp(86400)
        if ip.version == 6 and not want_ipv6:
            return DnsResult(NODATA, [], ttl, str(ip), f"{name} is an IPv6 literal and IPv6 is not wanted",
                             str(ip), "A", False)
        return DnsResult(OK, [ip], ttl, str(ip), None, str(ip), "A+AAAA" if want_ipv6 else "A", False)

    # ------------------------------------------------------------ hosts file

    def _from_hosts(self, key: str, rdtype: int) -> _Entry | None:
        if not self.hosts_path or "f" not in self.settings.lookup:
            return None
        table = self._load_hosts()
        found = [ip for ip in table.get(key, ())
                 if ip.version == (4 if rdtype == dns.rdatatype.A else 6)]
        if not found:
            return None
        return self._positive(found, _HOSTS_TTL, key)

    def _load_hosts(self) -> dict:
        try:
            mtime = os.stat(self.hosts_path).st_mtime
        except OSError:
            return {}
        if self._hosts is not None and self._hosts[0] == mtime:
            return self._hosts[1]
        table: dict[str, list] = {}
        try:
            with open(self.hosts_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) < 2:
                        continue
                    try:
                        ip = ipaddress.ip_address(parts[0].split("%", 1)[0])
                    except ValueError:
                        continue
                    for h in parts[1:]:
                        table.setdefault(_normalize(h), []).append(ip)
        except OSError:
            return {}
        self._hosts = (mtime, table)
        return table


def _classify_errors(errors: Iterable) -> str:
    saw_rcode = saw_bad = False
    for err in errors:
        what = err[3] if len(err) > 3 else None
        if isinstance(what, str):
            saw_rcode = True
        elif isinstance(what, (dns.exception.Timeout, OSError, EOFError)):
            pass   # no (usable) answer at all: unreachable counts as a timeout
        elif what is not None:
            saw_bad = True
    if saw_rcode:
        return SERVFAIL
    if saw_bad:
        return BADANSWER
    return TIMEOUT


def _describe_errors(errors: Iterable, skip_timeouts: bool = False) -> str:
    out = []
    for err in errors:
        try:
            ns, tcp, port, what = err[0], err[1], err[2], err[3]
        except (TypeError, IndexError):
            continue
        if skip_timeouts and isinstance(what, dns.exception.Timeout):
            continue
        ns = str(ns)
        if ns.startswith("Do53:"):           # dnspython's "Do53:ADDR@PORT"
            ns = ns[5:].rpartition("@")[0] or ns[5:]
        host = f"[{ns}]" if ":" in ns else ns
        proto = "tcp" if tcp else "udp"
        if isinstance(what, str):
            desc = f"answered {what}"
        elif isinstance(what, _MalformedResponse):
            desc = f"malformed response ({what})"
        elif isinstance(what, dns.exception.FormError):
            desc = f"malformed response ({type(what).__name__}: {what})"
        elif isinstance(what, dns.message.Truncated):
            desc = "truncated response"
        else:
            desc = f"{type(what).__name__}: {what}"
        line = f"{host}#{port} ({proto}) {desc}"
        if line not in out:
            out.append(line)
    return "; ".join(out)
