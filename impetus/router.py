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
PROHIBITED = Reply(551, "5.4.6", "[internal] Private/Loopback Address")


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
    ttl: int | None = None


@dataclass(frozen=True)
class RoutePlan:
    binding: str
    domain: str
    targets: tuple[Target, ...]
    want_ipv6: bool
    prefer_ipv6: bool
    scope: str = "default (MX of the domain)"
    routing_domain: str = ""      # the queue name (§2.6): the gateway for gateway routes
    prohibited: tuple = ()        # Prohibited_Hosts networks (D9)
    skip: tuple = ()              # Skip_Hosts networks (D9)
    mx_fallback_to_a: int = 3     # MX_Failures_Fallback_To_A


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
        pref = f"{self.pref >> 16}.{self.pref & 0xFFFF}" if self.pref >= 65536 else str(self.pref)
        return f"{self.host} {ip}:{self.port} pref={pref} {self.proto} ({self.source})"


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


def _scope_rank(config, resolved, domain, binding) -> int:
    """Position of a resolved value's scope in the D1 chain (0 = most specific)."""
    if resolved.value is None or resolved.scope == "default":
        return 1 << 20
    chain = config.chain(domain=domain, binding=binding)
    try:
        return chain.index(resolved.scope)
    except ValueError:
        return len(chain)


def _route_targets(items, smtp_port: int, lmtp_port: int, method: str) -> list[Target]:
    """D4/D5/D6: ``Routes`` items to targets with preferences.

    Explicit ``pref=`` values are kept; unranked items take an implied
    preference after every explicit one, in list order, so unranked lists are
    strict failover and equal explicit preferences share load. ``__mx__``
    keeps the domain's own MX order inside its slot.
    """
    explicit = [it.pref for it in items if it.pref is not None]
    next_implicit = (max(explicit) + 1) if explicit else 0
    out = []
    for it in items:
        if it.pref is not None:
            pref = it.pref
        else:
            pref = next_implicit
            next_implicit += 1
        if it.kind == "lmtp":
            proto = "lmtp"
        elif it.kind == "smtp":  # an explicit smtp:// item speaks SMTP whatever the method
            proto = method if method in ("esmtp", "smtp") else "esmtp"
        else:
            proto = method
        port = it.port or (lmtp_port if proto == "lmtp" else smtp_port)
        if it.kind == "mx":
            out.append(Target("", "domain", port, pref, proto, "route/__mx__", it.ttl))
            continue
        if _is_ip(it.host):
            kind = "literal"
        else:
            kind = "host" if it.type == "a" else "domain"
        out.append(Target(it.host, kind, port, pref, proto, "route", it.ttl))
    return out


def routing_domain(binding: str, domain: str, config) -> str:
    """The name a recipient domain's mail is queued under (spec §2.6)."""
    return plan(binding, domain, config).routing_domain or domain


def plan(binding: str, domain: str, config) -> RoutePlan:
    look = lambda name: config.lookup(name, domain=domain, binding=binding)  # noqa: E731
    method = look("Delivery_Method")
    lmtp_port = look("LMTP_Port")
    port = lmtp_port if method == "lmtp" else look("Remote_SMTP_Port")
    common = dict(want_ipv6=bool(config.lookup("Use_IPv6")),
                  prefer_ipv6=bool(config.lookup("Prefer_IPv6_MXs")),
                  prohibited=tuple(config.lookup("Prohibited_Hosts") or ()),
                  skip=tuple(config.lookup("Skip_Hosts") or ()),
                  mx_fallback_to_a=look("MX_Failures_Fallback_To_A"))
    gateway = config.explain("Gateway", domain=domain, binding=binding)
    routes = config.explain("Routes", domain=domain, binding=binding)
    # D7: the more specific scope wins; at equal specificity Gateway wins.
    use_routes = routes.value and (gateway.value is None or
                                   _scope_rank(config, routes, domain, binding)
                                   < _scope_rank(config, gateway, domain, binding))
    if use_routes:
        targets = _route_targets(routes.value, look("Remote_SMTP_Port"), lmtp_port, method)
        targets = [Target(domain, t.kind, t.port, t.pref, t.proto, t.source, t.ttl)
                   if t.source == "route/__mx__" else t for t in targets]
        where = f"Routes {routes.scope} ({routes.file}:{routes.line})"
        return RoutePlan(binding, domain, tuple(targets), scope=where, **common)
    if gateway.value is not None:
        # Spec §3.2: a gateway replaces MX routing; a name is resolved MX
        # first, then A/AAAA; an IP literal is used as is (D8 for the port).
        host, gw_port = gateway.value
        kind = "literal" if _is_ip(host) else "domain"
        target = Target(host, kind, gw_port or port, proto=method, source="gateway")
        where = f"Gateway {gateway.scope} ({gateway.file}:{gateway.line})"
        # §2.6: mail for a domain with a gateway is queued under the gateway.
        rd = host if ":" not in host else f"[{host}]"
        if target.port != look("Remote_SMTP_Port") or method != "esmtp":
            rd = f"{rd}:{target.port}" + ("" if method == "esmtp" else f"/{method}")
        return RoutePlan(binding, domain, (target,), scope=where, routing_domain=rd, **common)
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        target = Target(literal, "literal", port, proto=method, source="literal")
    elif _is_ip(domain):
        target = Target(domain, "literal", port, proto=method, source="literal")
    else:
        target = Target(domain, "domain", port, proto=method)
    return RoutePlan(binding, domain, (target,), **common)


def fall_back_to_a(plan_: RoutePlan, mx_failures: int) -> bool:
    """``MX_Failures_Fallback_To_A``: after N failed MX lookups, look up A
    instead; ``-1``: after the first failed one. ``0`` never falls back."""
    n = plan_.mx_fallback_to_a
    return (n > 0 and mx_failures >= n) or (n == -1 and mx_failures >= 1)


# -- I/O: fetch what the plan needs --------------------------------------
async def gather(plan_: RoutePlan, resolver, mx_failures: int = 0) -> dict:
    """Ask the resolver for everything ``decide`` will need.

    Returns {("MX", name): DnsResult, ("ADDR", name): DnsResult}.
    """
    answers: dict = {}
    skip_mx = fall_back_to_a(plan_, mx_failures)
    mx_names = list(dict.fromkeys(t.name for t in plan_.targets if t.kind == "domain"))
    if not skip_mx:
        results = await asyncio.gather(*(resolver.mx(n) for n in mx_names))
        answers.update({("MX", n): r for n, r in zip(mx_names, results)})
    hosts: list[str] = [t.name for t in plan_.targets if t.kind == "host"]
    for name in mx_names:
        mx = answers.get(("MX", name))
        if mx is None or mx.status == "NODATA":
            hosts.append(name)
        elif mx.status == "OK" and not mx.null_mx:
            hosts.extend(exchange for _, exchange in mx.records)
    hosts = list(dict.fromkeys(h for h in hosts if h and not _is_ip(h)))
    results = await asyncio.gather(*(resolver.addresses(h, plan_.want_ipv6) for h in hosts))
    answers.update({("ADDR", h): r for h, r in zip(hosts, results)})
    return answers


# -- the pure decision ----------------------------------------------------
def _addresses(result, want_v6: bool, prefer_v6: bool) -> list[str]:
    addrs = [a for a in result.records if want_v6 or a.version == 4]
    addrs.sort(key=lambda a: (a.version != 6) if prefer_v6 else (a.version == 6))
    return [str(a) for a in addrs]


def _in(ip: str, networks) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == net.version and addr in net for net in networks)


def decide(plan_: RoutePlan, answers: dict, mx_failures: int = 0) -> RouteDecision:
    decision = RouteDecision(plan_)
    # (pref, host, source, port, proto) before address resolution; a target's
    # preference is scaled so that MX preferences order hosts inside it.
    candidates: list[tuple[int, str, str, int, str]] = []
    ttls: list[float] = [t.ttl for t in plan_.targets if t.ttl]
    transient: list[str] = []
    definitive_misses = 0
    skip_mx = fall_back_to_a(plan_, mx_failures)
    for t in plan_.targets:
        base = t.pref * 65536
        if t.kind in ("literal", "host"):
            candidates.append((base, t.name, t.source, t.port, t.proto))
            continue
        if skip_mx:
            decision.notes.append(f"{t.name}: {mx_failures} failed MX lookups, using A "
                                  f"(MX_Failures_Fallback_To_A)")
            candidates.append((base, t.name, "mx-fallback", t.port, t.proto))
            continue
        mx = answers[("MX", t.name)]
        via = "gateway" if t.source == "gateway" else ("route" if t.source.startswith("route") else "")
        if mx.status == "OK":
            ttls.append(mx.ttl)
            if mx.null_mx:
                decision.failure = NULL_MX
                decision.ttl = max(1.0, min(ttls))
                return decision
            src = f"{via}/mx" if via else "mx"
            for pref, exchange in sorted(mx.records):
                candidates.append((base + pref, exchange, src, t.port, t.proto))
        elif mx.status == "NODATA":
            ttls.append(mx.ttl)
            decision.notes.append(f"{t.name}: no MX records, using its A/AAAA (implicit MX)")
            candidates.append((base, t.name, via or "implicit-mx", t.port, t.proto))
        elif mx.status == "NXDOMAIN":
            # Left out like an MX host without an address: with several
            # routes the next one is used; alone, the domain fails for good.
            ttls.append(mx.ttl)
            definitive_misses += 1
            decision.notes.append(f"{t.name}: NXDOMAIN")
        else:
            transient.append(f"MX {t.name}: {mx.status} {mx.error or ''}".strip())

    levels: dict[int, list[NextHop]] = {}
    skipped = 0
    for pref, host, source, port, proto in candidates:
        if _is_ip(host):
            hop_ips = [host]
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
        for ip in hop_ips:
            if plan_.prohibited and _in(ip, plan_.prohibited):
                # D9: one prohibited address condemns the whole domain.
                decision.notes.append(f"{host} [{ip}] is in Prohibited_Hosts")
                decision.failure = PROHIBITED
                decision.levels = []
                return decision
            if plan_.skip and _in(ip, plan_.skip):
                decision.notes.append(f"{host} [{ip}] skipped (Skip_Hosts)")
                skipped += 1
                continue
            s = source
            if source in ("mx", "gateway/mx", "route/mx", "gateway", "route", "implicit-mx",
                          "mx-fallback") and not _is_ip(host):
                s = f"{source}/{'aaaa' if ':' in ip else 'a'}"
            levels.setdefault(pref, []).append(NextHop(host, ip, port, pref, proto, s))
    decision.levels = [levels[p] for p in sorted(levels)]
    if ttls:
        decision.ttl = max(1.0, min(ttls))
    if not decision.levels:
        if skipped and not transient:
            decision.failure = NO_VALID_HOSTS
        elif transient:
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
    lines = [f"domain {p.domain} (binding {p.binding})", f"route source: {p.scope}",
             f"queued under: {p.routing_domain or p.domain}"]
    for note in decision.notes:
        lines.append(f"note: {note}")
    if decision.failure is not None:
        lines.append(f"result: {decision.failure}")
    for i, level in enumerate(decision.levels, 1):
        for hop in level:
            lines.append(f"  {i}. {hop}")
    lines.append(f"cache ttl: {decision.ttl:.0f}s")
    return "\n".join(lines)
