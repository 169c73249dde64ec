"""Routing plans from the configuration (pure: no network).

``router.plan()`` over a real parsed config (D1 fallback for ``Gateway``, D7
Gateway vs Routes, D4-D6 route items, D8 gateway ports), then
``router.gather()`` with a fake in-memory resolver and ``router.decide()``
(D5 preference levels, D9 Prohibited_Hosts/Skip_Hosts,
``MX_Failures_Fallback_To_A``).
"""
import asyncio
import ipaddress
from dataclasses import dataclass, field

import pytest

from impetus import router
from impetus.config import ConfigError, load_config_string


def cfg(text):
    return load_config_string(text, "t.conf")


def line_of(text, needle):
    """1-based line of the (only) line of ``text`` containing ``needle``."""
    [n] = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return n


# -- fake DNS answers (same shape as impetus.dns.DnsResult) -------------------------------

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


NODATA = Ans("NODATA", ttl=300)


class FakeResolver:
    """``mx()``/``addresses()`` from dicts; counts every call.  A name with
    no entry is NXDOMAIN."""

    def __init__(self, mx=None, addr=None):
        self.mx_answers = dict(mx or {})
        self.addr_answers = dict(addr or {})
        self.calls: list[tuple[str, str]] = []

    async def mx(self, name):
        self.calls.append(("MX", name))
        return self.mx_answers.get(name, Ans("NXDOMAIN"))

    async def addresses(self, name, want_ipv6=False):
        self.calls.append(("ADDR", name))
        return self.addr_answers.get(name, Ans("NXDOMAIN"))


def route(text, domain="d.test", binding="b", *, resolver=None, mx_failures=0):
    """plan + gather(fake resolver) + decide."""
    p = router.plan(binding, domain, cfg(text))
    answers = asyncio.run(router.gather(p, resolver or FakeResolver(), mx_failures))
    return router.decide(p, answers, mx_failures)


def levels(decision):
    return [[(h.host, h.ip, h.port) for h in lvl] for lvl in decision.levels]


def ips(decision):
    return [[h.ip for h in lvl] for lvl in decision.levels]


# -- D1: Gateway fallback, one row at a time ----------------------------------------------
#
# The config package (impetus/config/model.py _build_chain) implements D1 as
#   G::B::D > B::D > G::D > G::B > B(top level) > G > D(top level) > global > none,
# where B::D is a Domain stanza inside a *top-level* Binding "b" and the B level
# tries the binding inside its group first, then the top-level binding.

D1_ROWS = [
    # (tag, gateway, scope label)
    ("G::B::D", "gbd.gw.test", 'binding_group "g" / binding "b" / domain "d.test"'),
    ("B::D", "bd.gw.test", 'binding "b" / domain "d.test"'),
    ("G::D", "gd.gw.test", 'binding_group "g" / domain "d.test"'),
    ("G::B", "gb.gw.test", 'binding_group "g" / binding "b"'),
    ("B", "b.gw.test", 'binding "b"'),
    ("G", "g.gw.test", 'binding_group "g"'),
    ("D", "d.gw.test", 'domain "d.test"'),
    ("global", "global.gw.test", "global"),
]


def d1_config(drop):
    def gw(tag, indent):
        if tag in drop:
            return ""
        name = dict((t, g) for t, g, _ in D1_ROWS)[tag]
        return f'{indent}Gateway = "{name}"\n'
    return (
        'Binding_Group "g" {\n'
        '  Binding "b" {\n'
        '    Domain "d.test" {\n' + gw("G::B::D", "      ") + "    }\n"
        + gw("G::B", "    ") + "  }\n"
        '  Domain "d.test" {\n' + gw("G::D", "    ") + "  }\n"
        + gw("G", "  ") + "}\n"
        'Binding "b" {\n'
        '  Domain "d.test" {\n' + gw("B::D", "    ") + "  }\n"
        + gw("B", "  ") + "}\n"
        'Domain "d.test" {\n' + gw("D", "  ") + "}\n"
        'Domain "other.test" { Gateway = "other.gw.test" }\n'
        + gw("global", ""))


@pytest.mark.parametrize("i", range(len(D1_ROWS) + 1),
                         ids=[r[0] for r in D1_ROWS] + ["none"])
def test_d1_gateway_fallback_row(i):
    """Remove every more specific Gateway; the next row's gateway is used."""
    text = d1_config({tag for tag, *_ in D1_ROWS[:i]})
    c = cfg(text)
    assert c.group_of("b") == "g"
    p = router.plan("b", "d.test", c)
    [t] = p.targets
    if i == len(D1_ROWS):
        # none: MX routing of the recipient domain itself
        assert (t.name, t.kind, t.port, t.source) == ("d.test", "domain", 25, "mx")
        assert p.scope == "default (MX of the domain)"
        assert p.routing_domain == ""
        assert router.routing_domain("b", "d.test", c) == "d.test"
        return
    _, gw, label = D1_ROWS[i]
    assert (t.name, t.kind, t.port, t.source) == (gw, "domain", 25, "gateway")
    assert p.scope == f"Gateway {label} (t.conf:{line_of(text, gw)})"
    assert router.routing_domain("b", "d.test", c) == gw


def test_d1_gateway_of_another_binding_or_domain_does_not_apply():
    c = cfg(d1_config(set()))
    # binding "x" (group default): only the top-level domain stanza and global apply
    assert router.plan("x", "d.test", c).targets[0].name == "d.gw.test"
    assert router.plan("x", "e.test", c).targets[0].name == "global.gw.test"
    # binding "b" for another domain: the binding's own gateway (G::B)
    assert router.plan("b", "e.test", c).targets[0].name == "gb.gw.test"


# -- D7: Gateway vs Routes --------------------------------------------------------------

def test_d7_domain_routes_beat_global_gateway():
    text = ('Gateway = "gw.test"\n'
            'Domain "d.test" { Routes = ( "192.0.2.10" ) }\n')
    p = router.plan("default", "d.test", cfg(text))
    assert [(t.name, t.kind, t.source) for t in p.targets] == [("192.0.2.10", "literal", "route")]
    assert p.scope == 'Routes domain "d.test" (t.conf:2)'
    assert p.routing_domain == ""      # routes keep the recipient domain as queue name
    # other domains still go to the global gateway
    assert router.plan("default", "e.test", cfg(text)).targets[0].name == "gw.test"


def test_d7_same_scope_gateway_wins():
    text = 'Domain "d.test" {\n  Routes = ( "192.0.2.10" )\n  Gateway = "gw.test"\n}\n'
    p = router.plan("default", "d.test", cfg(text))
    assert [t.name for t in p.targets] == ["gw.test"]
    assert p.scope == 'Gateway domain "d.test" (t.conf:3)'
    # both global: Gateway too
    p = router.plan("default", "d.test", cfg('Routes = ( "192.0.2.10" )\nGateway = "gw.test"\n'))
    assert [t.name for t in p.targets] == ["gw.test"]
    assert p.scope == "Gateway global (t.conf:2)"


def test_d7_binding_gateway_beats_top_level_domain_routes():
    text = ('Binding "b" { Gateway = "bgw.test" }\n'
            'Domain "d.test" { Routes = ( "192.0.2.10" ) }\n')
    c = cfg(text)
    p = router.plan("b", "d.test", c)
    assert [t.name for t in p.targets] == ["bgw.test"]
    assert p.scope == 'Gateway binding "b" (t.conf:1)'
    # another binding has no gateway: the domain's Routes apply
    assert [t.name for t in router.plan("x", "d.test", c).targets] == ["192.0.2.10"]


def test_d7_group_gateway_beats_top_level_domain_routes():
    text = ('Binding_Group "g" { Binding "b" {}\n  Gateway = "ggw.test" }\n'
            'Domain "d.test" { Routes = ( "192.0.2.10" ) }\n')
    p = router.plan("b", "d.test", cfg(text))
    assert [t.name for t in p.targets] == ["ggw.test"]


def test_d7_binding_domain_routes_beat_binding_gateway():
    """Routes inside Binding "b" { Domain ... } (B::D) is more specific than
    the gateway of the binding (G::B) and of the top-level domain."""
    text = ('Binding_Group "g" { Binding "b" { Gateway = "gb.test" } }\n'
            'Binding "b" { Domain "d.test" { Routes = ( "192.0.2.10" ) } }\n'
            'Domain "d.test" { Gateway = "dgw.test" }\n')
    p = router.plan("b", "d.test", cfg(text))
    assert [t.name for t in p.targets] == ["192.0.2.10"]
    assert p.scope == 'Routes binding "b" / domain "d.test" (t.conf:2)'


def test_d7_top_level_domain_gateway_beats_global_routes():
    text = 'Routes = ( "192.0.2.10" )\nDomain "d.test" { Gateway = "dgw.test" }\n'
    c = cfg(text)
    assert [t.name for t in router.plan("default", "d.test", c).targets] == ["dgw.test"]
    assert [t.name for t in router.plan("default", "e.test", c).targets] == ["192.0.2.10"]


# -- D4/D5/D6: Routes items and preference levels --------------------------------------

def test_d5_unranked_items_are_strict_failover_in_list_order():
    d = route('Domain "d.test" { Routes = ( "192.0.2.3" "192.0.2.1" "192.0.2.2" ) }')
    assert d.failure is None
    assert ips(d) == [["192.0.2.3"], ["192.0.2.1"], ["192.0.2.2"]]
    assert [h.source for h in d.hops] == ["route"] * 3


def test_d5_unranked_host_names_are_strict_failover():
    res = FakeResolver(mx={"r1.test": NODATA, "r2.test": NODATA},
                       addr={"r1.test": addrs("192.0.2.1", "192.0.2.11"),
                             "r2.test": addrs("192.0.2.2")})
    d = route('Domain "d.test" { Routes = ( "r1.test" "r2.test" ) }', resolver=res)
    # both addresses of r1 share the first level; r2 is the fallback
    assert ips(d) == [["192.0.2.1", "192.0.2.11"], ["192.0.2.2"]]
    # D4: a name without type= is looked up MX first, then A
    assert ("MX", "r1.test") in res.calls and ("ADDR", "r1.test") in res.calls


def test_d5_equal_explicit_pref_shares_one_level():
    d = route('Domain "d.test" { Routes = ( "smtp://192.0.2.1?pref=10" "smtp://192.0.2.3?pref=20"'
              ' "smtp://192.0.2.2?pref=10" ) }')
    assert ips(d) == [["192.0.2.1", "192.0.2.2"], ["192.0.2.3"]]


def test_d5_unranked_items_come_after_every_ranked_item():
    d = route('Domain "d.test" { Routes = ( "192.0.2.9" "smtp://192.0.2.5?pref=50"'
              ' "smtp://192.0.2.1?pref=1" ) }')
    assert ips(d) == [["192.0.2.1"], ["192.0.2.5"], ["192.0.2.9"]]


def test_d5_ranked_route_then_mx_in_its_own_order_then_unranked():
    res = FakeResolver(
        mx={"a.test": NODATA, "c.test": NODATA,
            "d.test": mx((20, "mx2.d.test"), (10, "mx1.d.test"), (10, "mx1b.d.test"))},
        addr={"a.test": addrs("192.0.2.1"), "c.test": addrs("192.0.2.3"),
              "mx1.d.test": addrs("192.0.2.11"), "mx1b.d.test": addrs("192.0.2.12"),
              "mx2.d.test": addrs("192.0.2.20")})
    d = route('Domain "d.test" { Routes = ( "smtp://a.test?pref=1" "__mx__" "c.test" ) }',
              resolver=res)
    assert d.failure is None
    assert [[h.host for h in lvl] for lvl in d.levels] == [
        ["a.test"], ["mx1.d.test", "mx1b.d.test"], ["mx2.d.test"], ["c.test"]]
    assert [lvl[0].source for lvl in d.levels] == ["route/a", "route/mx/a", "route/mx/a", "route/a"]


def test_d5_mx_slot_keeps_its_list_position():
    res = FakeResolver(mx={"d.test": mx((5, "mx.d.test"))},
                       addr={"mx.d.test": addrs("192.0.2.50")})
    d = route('Domain "d.test" { Routes = ( "192.0.2.1" "__mx__" "192.0.2.3" ) }', resolver=res)
    assert ips(d) == [["192.0.2.1"], ["192.0.2.50"], ["192.0.2.3"]]


def test_d6_lmtp_uri_gives_proto_lmtp_and_its_port():
    c = cfg('Domain "d.test" { Routes = ( "lmtp://192.0.2.7?port=24" "lmtp://192.0.2.8" '
            '"smtp://192.0.2.9" ) }\nLMTP_Port = 2424\nRemote_SMTP_Port = 2525\n')
    p = router.plan("default", "d.test", c)
    assert [(t.name, t.proto, t.port) for t in p.targets] == [
        ("192.0.2.7", "lmtp", 24), ("192.0.2.8", "lmtp", 2424), ("192.0.2.9", "esmtp", 2525)]
    d = router.decide(p, {})
    assert [(h.ip, h.proto, h.port) for h in d.hops] == [
        ("192.0.2.7", "lmtp", 24), ("192.0.2.8", "lmtp", 2424), ("192.0.2.9", "esmtp", 2525)]


def test_delivery_method_lmtp_uses_lmtp_port():
    text = ('LMTP_Port = 2424\n'
            'Domain "d.test" { Delivery_Method = LMTP }\n'
            'Domain "r.test" { Delivery_Method = LMTP\n  Routes = ( "192.0.2.7" "192.0.2.8:26" ) }\n')
    c = cfg(text)
    [t] = router.plan("default", "d.test", c).targets       # plain MX routing
    assert (t.name, t.kind, t.proto, t.port) == ("d.test", "domain", "lmtp", 2424)
    res = FakeResolver(mx={"d.test": mx((10, "mx.d.test"))}, addr={"mx.d.test": addrs("192.0.2.1")})
    d = route(text, "d.test", "default", resolver=res)
    assert [(h.ip, h.proto, h.port) for h in d.hops] == [("192.0.2.1", "lmtp", 2424)]
    p = router.plan("default", "r.test", c)
    assert [(t.proto, t.port) for t in p.targets] == [("lmtp", 2424), ("lmtp", 26)]
    # other domains keep ESMTP on Remote_SMTP_Port
    [t] = router.plan("default", "e.test", c).targets
    assert (t.proto, t.port) == ("esmtp", 25)


def test_route_ttl_caps_the_decision_ttl():
    res = FakeResolver(mx={"r.test": NODATA}, addr={"r.test": addrs("192.0.2.1", ttl=3600)})
    d = route('Domain "d.test" { Routes = ( "smtp://r.test?ttl=30" ) }', resolver=res)
    assert d.failure is None and d.ttl == 30
    # literal only: the route ttl is the only TTL
    assert route('Domain "d.test" { Routes = ( "smtp://192.0.2.1?ttl=45" "192.0.2.2" ) }').ttl == 45
    # a smaller DNS TTL still wins over a larger route ttl
    res = FakeResolver(mx={"r.test": NODATA}, addr={"r.test": addrs("192.0.2.1", ttl=20)})
    assert route('Domain "d.test" { Routes = ( "smtp://r.test?ttl=600" ) }', resolver=res).ttl == 20


def test_type_a_skips_mx():
    res = FakeResolver(mx={"r.test": mx((10, "elsewhere.test"))},
                       addr={"r.test": addrs("192.0.2.1"), "elsewhere.test": addrs("192.0.2.99")})
    text = 'Domain "d.test" { Routes = ( "smtp://r.test?type=a" ) }'
    [t] = router.plan("b", "d.test", cfg(text)).targets
    assert t.kind == "host"
    d = route(text, resolver=res)
    assert ips(d) == [["192.0.2.1"]]
    assert res.calls == [("ADDR", "r.test")]
    # type=mx (and the default) follow the MX
    res.calls.clear()
    d = route('Domain "d.test" { Routes = ( "smtp://r.test?type=mx" ) }', resolver=res)
    assert ips(d) == [["192.0.2.99"]] and ("MX", "r.test") in res.calls


def test_route_name_that_does_not_exist_is_left_out_and_the_next_route_used():
    res = FakeResolver(mx={"good.test": NODATA}, addr={"good.test": addrs("192.0.2.2")})
    d = route('Domain "d.test" { Routes = ( "gone.test" "good.test" ) }', resolver=res)
    assert d.failure is None
    assert ips(d) == [["192.0.2.2"]]


# -- D8: Gateway ports -------------------------------------------------------------------

@pytest.mark.parametrize("value, method, host, kind, port, rd", [
    ("gw.test:2526", "", "gw.test", "domain", 2526, "gw.test:2526"),
    ("192.0.2.7:2527", "", "192.0.2.7", "literal", 2527, "192.0.2.7:2527"),
    ("[2001:db8::7]:2528", "", "2001:db8::7", "literal", 2528, "[2001:db8::7]:2528"),
    ("[2001:db8::7]", "", "2001:db8::7", "literal", 2500, "[2001:db8::7]"),
    ("gw.test", "", "gw.test", "domain", 2500, "gw.test"),
    ("192.0.2.7", "", "192.0.2.7", "literal", 2500, "192.0.2.7"),
    ("gw.test", "LMTP", "gw.test", "domain", 2424, "gw.test:2424/lmtp"),
    ("gw.test:2529", "LMTP", "gw.test", "domain", 2529, "gw.test:2529/lmtp"),
])
def test_d8_gateway_port(value, method, host, kind, port, rd):
    text = (f'Remote_SMTP_Port = 2500\nLMTP_Port = 2424\n'
            f'Domain "d.test" {{ Gateway = "{value}"'
            + (f"\n  Delivery_Method = {method}" if method else "") + " }\n")
    c = cfg(text)
    p = router.plan("default", "d.test", c)
    [t] = p.targets
    assert (t.name, t.kind, t.port, t.proto) == (host, kind, port, "lmtp" if method else "esmtp")
    assert p.routing_domain == rd == router.routing_domain("default", "d.test", c)
    if kind == "literal":
        d = router.decide(p, {})
        assert [(h.ip, h.port, h.source) for h in d.hops] == [(host, port, "gateway")]


def test_d8_gateway_name_is_resolved_mx_first_then_a():
    text = 'Gateway = "gw.test:2526"'
    res = FakeResolver(mx={"gw.test": mx((10, "relay.gw.test"))},
                       addr={"relay.gw.test": addrs("192.0.2.1")})
    d = route(text, resolver=res)
    assert [(h.host, h.ip, h.port, h.source) for h in d.hops] == [
        ("relay.gw.test", "192.0.2.1", 2526, "gateway/mx/a")]
    assert ("MX", "d.test") not in res.calls       # the recipient domain's MX is not used
    res = FakeResolver(mx={"gw.test": NODATA}, addr={"gw.test": addrs("192.0.2.2")})
    d = route(text, resolver=res)
    assert [(h.host, h.ip, h.port, h.source) for h in d.hops] == [
        ("gw.test", "192.0.2.2", 2526, "gateway/a")]


def test_d8_bare_ipv6_gateway_is_a_config_error():
    with pytest.raises(ConfigError, match="IPv6 address must be bracketed"):
        cfg('Gateway = "2001:db8::1"')


# -- D9: Prohibited_Hosts / Skip_Hosts ---------------------------------------------------

D9_MX = {"d.test": mx((10, "mx1.d.test"), (20, "mx2.d.test"), (30, "mx3.d.test"))}


@pytest.mark.parametrize("bad_host", ["mx1.d.test", "mx2.d.test", "mx3.d.test"])
def test_d9_prohibited_address_anywhere_fails_the_domain(bad_host):
    good = {"mx1.d.test": addrs("192.0.2.1"), "mx2.d.test": addrs("192.0.2.2"),
            "mx3.d.test": addrs("192.0.2.3")}
    good[bad_host] = addrs("192.0.2.200", "127.0.0.5")
    res = FakeResolver(mx=D9_MX, addr=good)
    d = route('Prohibited_Hosts = ( "127.0.0.0/8" "::1" )', resolver=res)
    assert str(d.failure) == "551 5.4.6 [internal] Private/Loopback Address"
    assert d.levels == [] and d.hops == []
    assert any("Prohibited_Hosts" in n for n in d.notes)


def test_d9_prohibited_gateway_literal():
    d = route('Prohibited_Hosts = ( "10.0.0.0/8" )\nGateway = "10.1.2.3"')
    assert str(d.failure) == "551 5.4.6 [internal] Private/Loopback Address" and d.hops == []


def test_d9_skip_hosts_removes_only_those_addresses():
    res = FakeResolver(mx=D9_MX, addr={"mx1.d.test": addrs("192.0.2.1", "192.0.2.11"),
                                       "mx2.d.test": addrs("192.0.2.2"),
                                       "mx3.d.test": addrs("192.0.2.3")})
    d = route('Skip_Hosts = ( "192.0.2.1" "192.0.2.2" )', resolver=res)
    assert d.failure is None
    assert ips(d) == [["192.0.2.11"], ["192.0.2.3"]]


def test_d9_everything_skipped_is_451_no_valid_hosts():
    res = FakeResolver(mx=D9_MX, addr={"mx1.d.test": addrs("192.0.2.1"),
                                       "mx2.d.test": addrs("192.0.2.2"),
                                       "mx3.d.test": addrs("192.0.2.3")})
    d = route('Skip_Hosts = ( "192.0.2.0/24" )', resolver=res)
    assert str(d.failure) == "451 4.4.1 [internal] No valid hosts"
    assert d.hops == []


def test_d9_prohibited_beats_skip():
    res = FakeResolver(mx=D9_MX, addr={"mx1.d.test": addrs("192.0.2.1"),
                                       "mx2.d.test": addrs("127.0.0.1"),
                                       "mx3.d.test": addrs("192.0.2.3")})
    d = route('Skip_Hosts = ( "192.0.2.0/24" )\nProhibited_Hosts = ( "127.0.0.0/8" )',
              resolver=res)
    assert d.failure.code == 551


# -- MX_Failures_Fallback_To_A -----------------------------------------------------------

def fallback_resolver():
    return FakeResolver(mx={"d.test": mx((10, "mx.d.test"))},
                        addr={"mx.d.test": addrs("192.0.2.1"), "d.test": addrs("192.0.2.77")})


def test_mx_failures_fallback_to_a_default_3():
    c = cfg("")
    p = router.plan("default", "d.test", c)
    assert p.mx_fallback_to_a == 3
    for failures in (0, 2):
        res = fallback_resolver()
        answers = asyncio.run(router.gather(p, res, mx_failures=failures))
        assert ("MX", "d.test") in res.calls
        assert ips(router.decide(p, answers, mx_failures=failures)) == [["192.0.2.1"]]
    res = fallback_resolver()
    answers = asyncio.run(router.gather(p, res, mx_failures=3))
    assert res.calls == [("ADDR", "d.test")]          # no MX query at all
    d = router.decide(p, answers, mx_failures=3)
    assert d.failure is None
    assert [(h.host, h.ip, h.source) for h in d.hops] == [("d.test", "192.0.2.77", "mx-fallback/a")]
    assert any("MX_Failures_Fallback_To_A" in n for n in d.notes)


@pytest.mark.parametrize("setting, failures, uses_a", [
    ("-1", 0, False), ("-1", 1, True),
    ("0", 100, False),
    ("1", 1, True), ("5", 4, False), ("5", 5, True),
])
def test_mx_failures_fallback_to_a_setting(setting, failures, uses_a):
    p = router.plan("default", "d.test",
                    cfg(f'Domain "d.test" {{ MX_Failures_Fallback_To_A = {setting} }}'))
    res = fallback_resolver()
    d = router.decide(p, asyncio.run(router.gather(p, res, failures)), failures)
    assert (("MX", "d.test") not in res.calls) == uses_a
    assert ips(d) == ([["192.0.2.77"]] if uses_a else [["192.0.2.1"]])


# -- routing_domain() -------------------------------------------------------------------

def test_routing_domain():
    c = cfg('Remote_SMTP_Port = 2500\n'
            'Domain "gw.test" { Gateway = "Relay.Example.Test" }\n'
            'Domain "port.test" { Gateway = "relay.example.test:2600" }\n'
            'Domain "lit.test" { Gateway = "192.0.2.9" }\n'
            'Domain "routes.test" { Routes = ( "192.0.2.10" ) }\n')
    assert router.routing_domain("default", "gw.test", c) == "relay.example.test"
    assert router.routing_domain("default", "port.test", c) == "relay.example.test:2600"
    assert router.routing_domain("default", "lit.test", c) == "192.0.2.9"
    assert router.routing_domain("default", "routes.test", c) == "routes.test"
    assert router.routing_domain("default", "plain.test", c) == "plain.test"


# -- decision TTL on failures -------------------------------------------------------------

def test_failure_decision_ttl_follows_the_answer():
    d = route("", resolver=FakeResolver(mx={"d.test": Ans("NXDOMAIN", ttl=30)}))
    assert d.failure.code == 554
    assert d.ttl == 30
