"""The pure routing decision over DNS answers (no network)."""
import ipaddress
from dataclasses import dataclass, field

from impetus import router
from impetus.router import RoutePlan, Target


@dataclass
class Ans:
    status: str = "OK"
    records: list = field(default_factory=list)
    ttl: float = 300
    null_mx: bool = False
    error: str = ""


def mx(*pairs, ttl=300):
    return Ans("OK", list(pairs), ttl)


def addrs(*ips, ttl=300):
    return Ans("OK", [ipaddress.ip_address(i) for i in ips], ttl)


def plan(domain="example.test", v6=False, prefer_v6=False):
    return RoutePlan("default", domain, (Target(domain, "domain", 25),), v6, prefer_v6)


def test_mx_preference_order_and_equal_preference_level():
    p = plan()
    d = router.decide(p, {
        ("MX", "example.test"): mx((20, "mx2.t"), (10, "mx1.t"), (10, "mx1b.t")),
        ("ADDR", "mx1.t"): addrs("127.0.0.2"),
        ("ADDR", "mx1b.t"): addrs("127.0.0.5"),
        ("ADDR", "mx2.t"): addrs("127.0.0.3"),
    })
    assert d.failure is None
    assert [[h.ip for h in lvl] for lvl in d.levels] == [["127.0.0.2", "127.0.0.5"], ["127.0.0.3"]]
    assert d.levels[0][0].source == "mx/a"


def test_implicit_mx_on_nodata():
    d = router.decide(plan("amx.test"), {("MX", "amx.test"): Ans("NODATA", ttl=60),
                                         ("ADDR", "amx.test"): addrs("127.0.0.4")})
    assert [h.ip for h in d.hops] == ["127.0.0.4"]
    assert d.hops[0].source == "implicit-mx/a"


def test_null_mx_is_permanent_550():
    d = router.decide(plan("nullmx.test"), {("MX", "nullmx.test"): Ans("OK", [(0, "")], null_mx=True)})
    assert str(d.failure) == "550 5.4.4 [internal] NULL MX domain does not accept mail"


def test_nxdomain_is_permanent_lookup_failed():
    d = router.decide(plan("nx.test"), {("MX", "nx.test"): Ans("NXDOMAIN")})
    assert str(d.failure) == "554 5.4.4 [internal] Domain Lookup Failed"


def test_servfail_is_transient():
    d = router.decide(plan("sf.test"), {("MX", "sf.test"): Ans("SERVFAIL", error="boom")})
    assert d.failure.code == 451 and d.failure.enhanced.startswith("4.")


def test_dangling_mx_is_permanent_but_transient_address_failure_is_not():
    d = router.decide(plan("d.test"), {("MX", "d.test"): mx((10, "nothere.test")),
                                       ("ADDR", "nothere.test"): Ans("NXDOMAIN")})
    assert d.failure.code == 554
    d = router.decide(plan("d.test"), {("MX", "d.test"): mx((10, "slow.test")),
                                       ("ADDR", "slow.test"): Ans("TIMEOUT")})
    assert d.failure.code == 451


def test_ipv6_only_used_when_enabled_and_preferred_when_asked():
    answers = {("MX", "e.test"): mx((10, "mx.t")), ("ADDR", "mx.t"): addrs("127.0.0.3", "::1")}
    assert [h.ip for h in router.decide(plan("e.test"), answers).hops] == ["127.0.0.3"]
    assert [h.ip for h in router.decide(plan("e.test", v6=True), answers).hops] == ["127.0.0.3", "::1"]
    assert [h.ip for h in router.decide(plan("e.test", v6=True, prefer_v6=True), answers).hops] == ["::1", "127.0.0.3"]
    only6 = {("MX", "e.test"): mx((10, "mx.t")), ("ADDR", "mx.t"): addrs("::1")}
    assert router.decide(plan("e.test"), only6).failure is not None


def test_ttl_is_the_smallest_answer_ttl():
    d = router.decide(plan(), {("MX", "example.test"): mx((10, "a.t"), ttl=100),
                               ("ADDR", "a.t"): addrs("127.0.0.2", ttl=30)})
    assert d.ttl == 30


def test_a_host_that_does_not_resolve_is_left_out():
    d = router.decide(plan(), {("MX", "example.test"): mx((10, "bad.t"), (20, "good.t")),
                               ("ADDR", "bad.t"): Ans("NXDOMAIN"),
                               ("ADDR", "good.t"): addrs("127.0.0.3")})
    assert [h.host for h in d.hops] == ["good.t"]


def test_smtp_uri_route_speaks_smtp_even_under_lmtp_method():
    from types import SimpleNamespace as NS
    items = [NS(kind="smtp", host="127.0.0.9", port=None, pref=None, ttl=None, type=None),
             NS(kind="host", host="127.0.0.8", port=None, pref=None, ttl=None, type=None)]
    targets = router._route_targets(items, 25, 2003, "lmtp")
    assert [(t.proto, t.port) for t in targets] == [("esmtp", 25), ("lmtp", 2003)]
