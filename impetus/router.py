"""Next-hop resolution (Postfix's trivial-rewrite, Momentum's route cache).

The decision is pure: ``plan()`` says what must be looked up for a
(binding, domain) under a config, and ``decide()`` turns the DNS answers into
preference levels of next hops, or a failure reply. ``gather()`` is the only
part that does I/O: it asks the resolver for exactly what the plan needs.

Outcomes follow spec §3.6 and RFC 5321 §5.1:
* MX answers sorted by preference; equal preference = one level, spread by
  the delivery layer;
* NODATA for MX -> implicit MX (the domain's own A/AAAA);
* null MX (``0 .``) -> ``550 5.4.4 [internal] NULL MX domain does not accept mail``;
* NXDOMAIN -> ``554 5.4.4 [internal] Domain Lookup Failed`` (permanent);
* SERVFAIL/timeout/garbage -> transient ``451 4.4.3 [internal] DNS lookup failed: ...``;
* MX hosts whose names do not resolve are left out; if none resolves and
  every failure was definitive, the domain fails permanently (EOP-92),
  otherwise transiently.
"""
from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from .smtp.reply import Reply

# Internal responses (spec §10.2).
NULL_MX = Reply(550, "5.4.4", "[internal] NULL MX domain does not accept mail")
LOOKUP_FAILED = Reply(554, "5.4.4", "[internal] Domain Lookup Failed")
NO_VALID_HOSTS = Reply(451, "4.4.1", "[internal] No valid hosts")


def dns_transient(detail: str) -> Reply:
    return Reply(451, "4.4.3", f"[internal] DNS lookup failed: {detail}")


@dataclass(frozen=True)
class Target:
    """Something to resolve into addresses.

    kind: ``domain`` (MX with implicit-MX fallback), ``host`` (a name's
    A/AAAA), ``literal`` (an IP address used as is).
    """

    name: str
    kind: str
    port: int
    pref: int = 0
    proto: str = "esmtp"
    source: str = "mx"


@dataclass(frozen=True)
class RoutePlan:
    binding: str
    domain: str
    targets: tuple[Target, ...]
    want_ipv6: bool
    prefer_ipv6: bool
    scope: str = "default (MX of the domain)"


@dataclass(frozen=True)
class NextHop:
    host: str        # MX host name (or the domain/literal)
    ip: str
    port: int
    pref: int
    proto: str
    source: str      # mx, a, aaaa, implicit-mx, route, gateway, literal

    def __str__(self) -> str:
        ip = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.host} {ip}:{self.port} pref={self.pref} {self.proto} ({self.source})"


@dataclass
class RouteDecision:
    plan: RoutePlan
    levels: list[list[NextHop]] = field(default_factory=list)
    failure: Reply | None = None
    ttl: float = 300.0
    notes: list[str] = field(default_factory=list)

    @property
    def hops(self) -> list[NextHop]:
        return [h for level in self.levels for h in level]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def plan(binding: str, domain: str, config) -> RoutePlan:
    port = config.lookup("Remote_SMTP_Port", domain=domain, binding=binding)
    want_v6 = bool(config.lookup("Use_IPv6"))
    prefer_v6 = bool(config.lookup("Prefer_IPv6_MXs"))
    gateway = config.explain("Gateway", domain=domain, binding=binding)
    if gateway.value is not None:
        # Spec §3.2: a gateway replaces MX routing; a name is resolved MX
        # first, then A/AAAA; an IP literal is used as is (D8 for the port).
        host, gw_port = gateway.value
        kind = "literal" if _is_ip(host) else "domain"
        target = Target(host, kind, gw_port or port, source="gateway")
        where = f"Gateway {gateway.scope} ({gateway.file}:{gateway.line})"
        return RoutePlan(binding, domain, (target,), want_v6, prefer_v6, scope=where)
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        target = Target(literal, "literal", port, source="literal")
    elif _is_ip(domain):
        target = Target(domain, "literal", port, source="literal")
    else:
        target = Target(domain, "domain", port)
    return RoutePlan(binding, domain, (target,), want_v6, prefer_v6)


# -- I/O: fetch what the plan needs --------------------------------------
async def gather(plan_: RoutePlan, resolver) -> dict:
    """Ask the resolver for everything ``decide`` will need.

    Returns {("MX", name): DnsResult, ("ADDR", name): DnsResult}.
    """
    answers: dict = {}
    mx_names = [t.name for t in plan_.targets if t.kind == "domain"]
    results = await asyncio.gather(*(resolver.mx(n) for n in mx_names))
    answers.update({("MX", n): r for n, r in zip(mx_names, results)})
    hosts: list[str] = [t.name for t in plan_.targets if t.kind == "host"]
    for t in plan_.targets:
        if t.kind != "domain":
            continue
        mx = answers[("MX", t.name)]
        if mx.status == "OK" and not getattr(mx, "null_mx", False):
            hosts.extend(exchange for _, exchange in mx.records)
        elif mx.status == "NODATA":
            hosts.append(t.name)
    hosts = list(dict.fromkeys(h for h in hosts if not _is_ip(h)))
    results = await asyncio.gather(*(resolver.addresses(h, plan_.want_ipv6) for h in hosts))
    answers.update({("ADDR", h): r for h, r in zip(hosts, results)})
    return answers


# -- the pure decision ----------------------------------------------------
def _addresses(result, want_v6: bool, prefer_v6: bool) -> list[str]:
    addrs = [a for a in result.records if want_v6 or a.version == 4]
    addrs.sort(key=lambda a: (a.version != 6) if prefer_v6 else (a.version == 6))
    return [str(a) for a in addrs]


def decide(plan_: RoutePlan, answers: dict) -> RouteDecision:
    decision = RouteDecision(plan_)
    # (pref, host, source, port, proto) before address resolution
    candidates: list[tuple[int, str, str, int, str]] = []
    ttls: list[float] = []
    transient: list[str] = []
    for t in plan_.targets:
        if t.kind == "literal":
            candidates.append((t.pref, t.name, t.source, t.port, t.proto))
            continue
        if t.kind == "host":
            candidates.append((t.pref, t.name, t.source, t.port, t.proto))
            continue
        mx = answers[("MX", t.name)]
        if mx.status == "OK":
            ttls.append(mx.ttl)
            if getattr(mx, "null_mx", False):
                decision.failure = NULL_MX
                return decision
            src = "gateway/mx" if t.source == "gateway" else "mx"
            for pref, exchange in sorted(mx.records):
                candidates.append((t.pref * 65536 + pref, exchange, src, t.port, t.proto))
        elif mx.status == "NODATA":
            ttls.append(mx.ttl)
            decision.notes.append(f"{t.name}: no MX records, using its A/AAAA (implicit MX)")
            src = "gateway" if t.source == "gateway" else "implicit-mx"
            candidates.append((t.pref * 65536, t.name, src, t.port, t.proto))
        elif mx.status == "NXDOMAIN":
            decision.failure = LOOKUP_FAILED
            decision.notes.append(f"{t.name}: NXDOMAIN")
            return decision
        else:
            transient.append(f"MX {t.name}: {mx.status} {mx.error or ''}".strip())

    levels: dict[int, list[NextHop]] = {}
    definitive_misses = 0
    for pref, host, source, port, proto in candidates:
        if _is_ip(host):
            hop_ips = [host]
            src = source
        else:
            res = answers.get(("ADDR", host))
            if res is None or res.status != "OK":
                status = res.status if res is not None else "MISSING"
                if status in ("NXDOMAIN", "NODATA"):
                    definitive_misses += 1
                else:
                    transient.append(f"address of {host}: {status}")
                decision.notes.append(f"{host}: no usable address ({status})")
                continue
            ttls.append(res.ttl)
            hop_ips = _addresses(res, plan_.want_ipv6, plan_.prefer_ipv6)
            if not hop_ips:
                decision.notes.append(f"{host}: only IPv6 addresses and Use_IPv6 is false")
                definitive_misses += 1
                continue
            src = source
        for ip in hop_ips:
            s = src
            if src in ("mx", "gateway/mx", "gateway", "implicit-mx"):
                s = f"{src}/{'aaaa' if ':' in ip else 'a'}"
            levels.setdefault(pref, []).append(NextHop(host, ip, port, pref, proto, s))
    decision.levels = [levels[p] for p in sorted(levels)]
    if ttls:
        decision.ttl = max(1.0, min(ttls))
    if not decision.levels:
        if transient:
            decision.failure = dns_transient("; ".join(transient))
            decision.ttl = 5.0
        elif definitive_misses:
            decision.failure = LOOKUP_FAILED
        else:
            decision.failure = NO_VALID_HOSTS
    return decision


def format_decision(decision: RouteDecision) -> str:
    """Human-readable decision for ``impetus route``."""
    p = decision.plan
    lines = [f"domain {p.domain} (binding {p.binding})", f"route source: {p.scope}"]
    for note in decision.notes:
        lines.append(f"note: {note}")
    if decision.failure is not None:
        lines.append(f"result: {decision.failure}")
    for i, level in enumerate(decision.levels, 1):
        for hop in level:
            lines.append(f"  {i}. {hop}")
    lines.append(f"cache ttl: {decision.ttl:.0f}s")
    return "\n".join(lines)
