"""impetus.dns: resolv.conf parsing and the caching resolver (against dnslib)."""
from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from impetus.dns import (BADANSWER, NODATA, NXDOMAIN, OK, SERVFAIL, TIMEOUT, Nameserver,
                         ResolvConfError, Resolver, ResolverSettings, parse_nameserver,
                         parse_resolv_conf, parse_resolv_conf_text)

ip = ipaddress.ip_address


# ------------------------------------------------------------------ resolv.conf
def test_parse_full_file(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text(
        "# comment\n"
        "; another comment\n"
        "nameserver 127.0.0.1#5353\n"
        "nameserver [::1]#5354   # trailing comment\n"
        "nameserver 127.0.0.2\n"
        "search Example.TEST corp.test.\n"
        "sortlist 127.0.0.0/255.0.0.0 10.1.0.0/16 192.168.1.1\n"
        "lookup fb\n"
        "options ndots:2 timeout:3 attempts:4\n"
        "options rotate edns0\n"
        "frobnicate yes\n")
    s = parse_resolv_conf(p)
    assert s.nameservers == [Nameserver("127.0.0.1", 5353), Nameserver("::1", 5354),
                             Nameserver("127.0.0.2", 53)]
    assert [str(n) for n in s.nameservers] == ["127.0.0.1#5353", "[::1]#5354", "127.0.0.2"]
    assert s.search == ["example.test", "corp.test"]
    assert [str(n) for n in s.sortlist] == ["127.0.0.0/8", "10.1.0.0/16", "192.168.1.0/24"]
    assert s.lookup == "fb"
    assert (s.ndots, s.timeout, s.attempts) == (2, 3.0, 4)
    assert s.path == str(p)
    w = "\n".join(s.warnings)
    assert "rotate" in w and "edns0" in w and "frobnicate" in w
    assert f"{p}:11:" in w


def test_parse_aliases_limits_and_domain():
    s = parse_resolv_conf_text("nameserver 127.0.0.1\nsearch a.test b.test\ndomain c.test\n"
                               "options retrans:2 retry:3\n")
    assert s.search == ["c.test"] and s.domain == "c.test"      # last of search/domain wins
    assert (s.timeout, s.attempts) == (2.0, 3)
    s = parse_resolv_conf_text("nameserver 127.0.0.1\noptions ndots:99 timeout:999 attempts:99 timeout:x\n")
    assert (s.ndots, s.timeout, s.attempts) == (15, 30.0, 5)
    assert any("timeout:x" in w for w in s.warnings)
    s = parse_resolv_conf_text("nameserver 127.0.0.1\n")
    assert (s.ndots, s.timeout, s.attempts, s.lookup, s.search) == (1, 5.0, 2, "bf", [])
    s = parse_resolv_conf_text("nameserver 127.0.0.1\nlookup file bind\nlookup xyz\n")
    assert s.lookup == "fb" and any("lookup" in w for w in s.warnings)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", Nameserver("127.0.0.1", 53)),
    ("127.0.0.1#5353", Nameserver("127.0.0.1", 5353)),
    ("::1", Nameserver("::1", 53)),
    ("::1#5353", Nameserver("::1", 5353)),
    ("[::1]", Nameserver("::1", 53)),
    ("[::1]#5353", Nameserver("::1", 5353)),
    ("[0:0:0:0:0:0:0:1]#53", Nameserver("::1", 53)),
])
def test_parse_nameserver(text, expected):
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("127.0.0.1:5353", "ADDR#PORT"),
    ("127.0.0.1#0", "invalid port"),
    ("127.0.0.1#70000", "invalid port"),
    ("127.0.0.1#x", "invalid port"),
    ("[::1", "unbalanced"),
    ("[::1]:53", "[ADDR]#PORT"),
    ("ns.example.test", "not an IP address"),
])
def test_parse_nameserver_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_nameserver(text)


def test_resolv_conf_errors(tmp_path):
    with pytest.raises(ResolvConfError, match="at least one nameserver"):
        parse_resolv_conf_text("search example.test\n", "f.conf")
    with pytest.raises(ResolvConfError, match=r"^f.conf:2: .*not an IP address"):
        parse_resolv_conf_text("# x\nnameserver bogus\n", "f.conf")
    with pytest.raises(ResolvConfError, match="needs an address"):
        parse_resolv_conf_text("nameserver\n", "f.conf")
    with pytest.raises(ResolvConfError, match="cannot read"):
        parse_resolv_conf(tmp_path / "missing.conf")


# ------------------------------------------------------------------ resolver
@pytest.fixture
def resolver(dns_server):
    return dns_server.make_resolver()


async def test_mx_order(resolver, dns_server):
    r = await resolver.mx("Example.TEST.")
    assert r.status == OK and r.ok and not r.null_mx
    assert r.records == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert r.ttl == 300 and r.canonical_name == "example.test" and r.error is None
    r = await resolver.mx("mixed.test")
    assert [p for p, _ in r.records] == [10, 20, 30]


async def test_nodata_nxdomain_and_negative_cache(resolver, dns_server):
    r = await resolver.mx("amx.test")
    assert r.status == NODATA and r.records == [] and r.ttl == 60   # SOA minimum
    assert r.permanent_failure and not r.transient
    r = await resolver.mx("nope.test")
    assert r.status == NXDOMAIN and r.ttl == 60 and "NXDOMAIN" in r.error
    # negative answers are cached: no new queries
    before = dns_server.query_count()
    assert (await resolver.mx("amx.test")).status == NODATA
    r = await resolver.mx("nope.test")
    assert r.status == NXDOMAIN and r.from_cache
    assert dns_server.query_count() == before
    stats = resolver.cache_stats()
    assert stats["negative"] == 2 and stats["hits"] >= 2


async def test_servfail_is_transient_and_not_cached_long(dns_server):
    res = dns_server.make_resolver(failure_ttl=0.2)
    r = await res.mx("servfail.test")
    assert r.status == SERVFAIL and r.transient and r.ttl == 0
    assert "SERVFAIL" in r.error and f"127.0.0.1#{dns_server.port}" in r.error
    n = dns_server.query_count("servfail.test")
    await res.mx("servfail.test")                   # absorbed by the short failure cache
    assert dns_server.query_count("servfail.test") == n
    await asyncio.sleep(0.25)
    dns_server.set_servfail("servfail.test", False)
    dns_server.add("servfail.test. 300 IN MX 10 mx1.example.test.")
    r = await res.mx("servfail.test")
    assert r.status == OK and dns_server.query_count("servfail.test") == n + 1


async def test_refused_maps_to_servfail(resolver, dns_server):
    dns_server.set_rcode("example.test", "REFUSED")
    r = await resolver.mx("example.test")
    assert r.status == SERVFAIL and "REFUSED" in r.error


async def test_timeout_is_bounded(resolver):
    t = time.monotonic()
    r = await resolver.mx("timeout.test")
    elapsed = time.monotonic() - t
    assert r.status == TIMEOUT and r.transient
    assert 1.5 < elapsed < 3.0, elapsed          # timeout:1 x attempts:2
    assert "no answer" in r.error


async def test_garbage_answer_is_badanswer(resolver, dns_server):
    t = time.monotonic()
    r = await resolver.mx("garbage.test")
    assert r.status == BADANSWER and "malformed" in r.error
    assert time.monotonic() - t < 1.0                # no waiting for a timeout
    r = await resolver.addresses("garbage.test", want_ipv6=True)
    assert r.status == BADANSWER and r.records == []


async def test_truncated_answer_retries_over_tcp(resolver, dns_server):
    r = await resolver.mx("truncated.test")
    assert r.status == OK and r.records == [(10, "mx1.example.test")]
    assert dns_server.query_count("truncated.test", "MX", proto="udp") == 1
    assert dns_server.query_count("truncated.test", "MX", proto="tcp") == 1


async def test_truncated_without_tcp_fallback(dns_server):
    r = await dns_server.make_resolver(tcp_fallback=False).mx("truncated.test")
    assert r.status == BADANSWER and "truncated" in r.error
    assert dns_server.query_count("truncated.test", proto="tcp") == 0


async def test_null_mx(resolver):
    r = await resolver.mx("nullmx.test")
    assert r.status == OK and r.null_mx and r.records == [(0, ".")]


async def test_cname_chain_followed(resolver, dns_server):
    r = await resolver.mx("cname-mx.test")
    assert r.records == [(10, "alias.test")]
    r = await resolver.addresses("alias.test")
    assert r.status == OK and r.records == [ip("127.0.0.2")]
    assert r.canonical_name == "mx1.example.test"
    r = await resolver.addresses("chain1.test")
    assert r.records == [ip("127.0.0.2")] and r.canonical_name == "mx1.example.test"
    r = await resolver.mx("cname-domain.test")
    assert r.records == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert r.canonical_name == "example.test"
    r = await resolver.addresses("alias-nx.test")      # CNAME target does not exist
    assert r.status == NXDOMAIN and r.canonical_name == "nothere.test"


async def test_cname_chain_chased_by_server(dns_server):
    dns_server.chase_cnames()
    res = dns_server.make_resolver()
    r = await res.addresses("chain1.test")
    assert r.records == [ip("127.0.0.2")] and r.canonical_name == "mx1.example.test"
    assert dns_server.query_count("mx1.example.test") == 0
    assert (await res.addresses("alias-nx.test")).status == NXDOMAIN


async def test_cname_loop_is_badanswer(resolver, dns_server):
    dns_server.add("loop1.test. 60 IN CNAME loop2.test.\nloop2.test. 60 IN CNAME loop1.test.")
    r = await resolver.addresses("loop1.test")
    assert r.status == BADANSWER and "CNAME" in r.error


async def test_addresses_v4_and_v6(resolver, dns_server):
    r = await resolver.addresses("mx2.example.test", want_ipv6=True)
    assert r.status == OK and r.records == [ip("127.0.0.3"), ip("::1")]
    r = await resolver.addresses("mx2.example.test")
    assert r.records == [ip("127.0.0.3")]
    assert dns_server.query_count("mx2.example.test", "AAAA") == 1
    r = await resolver.addresses("v6only.example.test", want_ipv6=True)
    assert r.records == [ip("::1")]
    r = await resolver.addresses("v6only.example.test")
    assert r.status == NODATA
    r = await resolver.addresses("nothere.test", want_ipv6=True)
    assert r.status == NXDOMAIN
    r = await resolver.addresses("example.test", want_ipv6=True)
    assert r.status == NODATA
    r = await resolver.addresses("multi-a.test")
    assert r.records == [ip("127.0.0.2"), ip("127.0.0.3")]


async def test_ip_literal_needs_no_query(resolver, dns_server):
    r = await resolver.addresses("[127.0.0.9]")
    assert r.status == OK and r.records == [ip("127.0.0.9")]
    assert dns_server.query_count() == 0


async def test_a_and_aaaa_are_concurrent(dns_server, resolver):
    dns_server.set_delay("mx2.example.test", 0.4)
    t = time.monotonic()
    r = await resolver.addresses("mx2.example.test", want_ipv6=True)
    assert r.records == [ip("127.0.0.3"), ip("::1")]
    assert time.monotonic() - t < 0.75


async def test_partial_failure_keeps_good_addresses(dns_server, resolver):
    dns_server.add("half.test. 300 IN A 127.0.0.2")
    dns_server.set_garbage("half.test")                # both types garbage ...
    r = await resolver.addresses("half.test", want_ipv6=True)
    assert r.status == BADANSWER
    resolver.flush()
    dns_server.set_garbage("half.test", False)
    r = await resolver.addresses("half.test", want_ipv6=True)
    assert r.status == OK and r.records == [ip("127.0.0.2")]


async def test_ttl_clamping(dns_server):
    res = dns_server.make_resolver(min_ttl=60, max_ttl=3600)
    assert (await res.addresses("lowttl.test")).ttl == 60
    assert (await res.addresses("highttl.test")).ttl == 3600
    assert (await res.mx("example.test")).ttl == 300
    assert (await res.mx("amx.test")).ttl == 60             # negative TTL clamped too
    res = dns_server.make_resolver(max_ttl=10)
    assert (await res.mx("nope.test")).ttl == 10


async def test_cache_hit_and_ttl_expiry(dns_server, resolver):
    r1 = await resolver.mx("example.test")
    assert not r1.from_cache
    r2 = await resolver.mx("EXAMPLE.test.")
    assert r2.from_cache and r2.records == r1.records and 0 < r2.ttl <= 300
    r2.records.append((99, "mutated"))                       # callers cannot poison the cache
    assert (await resolver.mx("example.test")).records == r1.records
    assert dns_server.query_count("example.test", "MX") == 1
    # a TTL-1 record expires
    dns_server.add("short.test. 1 IN A 127.0.0.8")
    await resolver.addresses("short.test")
    await resolver.addresses("short.test")
    assert dns_server.query_count("short.test", "A") == 1
    await asyncio.sleep(1.05)
    await resolver.addresses("short.test")
    assert dns_server.query_count("short.test", "A") == 2


async def test_flush(dns_server, resolver):
    await resolver.mx("example.test")
    await resolver.addresses("mx1.example.test", want_ipv6=True)
    assert resolver.flush("mx1.example.test") == 2
    assert resolver.cache_stats()["entries"] == 1
    await resolver.mx("example.test")
    assert dns_server.query_count("example.test", "MX") == 1
    assert resolver.flush() == 1
    await resolver.mx("example.test")
    assert dns_server.query_count("example.test", "MX") == 2


async def test_cache_hit_is_fast_and_does_not_suspend(resolver):
    await resolver.mx("example.test")
    await resolver.addresses("mx2.example.test", want_ipv6=True)
    coro = resolver.mx("example.test")
    with pytest.raises(StopIteration):       # completes without yielding to the loop
        coro.send(None)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await resolver.mx("example.test")
        await resolver.addresses("mx2.example.test", want_ipv6=True)
    per_call = (time.perf_counter() - t) / (2 * n)
    assert per_call < 50e-6, per_call


async def test_concurrent_queries_are_coalesced(dns_server, resolver):
    dns_server.set_delay("example.test", 0.1)
    results = await asyncio.gather(*(resolver.mx("example.test") for _ in range(20)))
    assert {r.status for r in results} == {OK}
    assert dns_server.query_count("example.test", "MX") == 1


async def test_search_list_and_ndots(dns_server):
    settings = dns_server.make_settings()
    settings.search = ["example.test"]
    res = Resolver(settings, hosts_path=None)
    r = await res.addresses("mx1")                     # 0 dots < ndots:1 -> search first
    assert r.status == OK and r.canonical_name == "mx1.example.test"


async def test_sortlist(dns_server):
    settings = dns_server.make_settings()
    settings.sortlist = [ipaddress.ip_network("127.0.0.3/32")]
    r = await Resolver(settings, hosts_path=None).addresses("multi-a.test")
    assert r.records == [ip("127.0.0.3"), ip("127.0.0.2")]


async def test_hosts_file_lookup_order(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.9 onlyinhosts.test\n127.0.0.10 mx1.example.test\n")
    settings = dns_server.make_settings()
    res = Resolver(settings, hosts_path=str(hosts))       # default lookup bf: DNS first
    assert (await res.addresses("onlyinhosts.test")).records == [ip("127.0.0.9")]
    assert (await res.addresses("mx1.example.test")).records == [ip("127.0.0.2")]
    settings.lookup = "fb"
    res = Resolver(settings, hosts_path=str(hosts))
    assert (await res.addresses("mx1.example.test")).records == [ip("127.0.0.10")]
    settings.lookup = "b"
    res = Resolver(settings, hosts_path=str(hosts))
    assert (await res.addresses("onlyinhosts.test")).status == NXDOMAIN


async def test_invalid_names_never_raise(resolver):
    for bad in ("", "a..b", "x" * 64 + ".test", ".".join(["abcdefghij"] * 30)):
        r = await resolver.mx(bad)
        assert r.status in (NXDOMAIN, BADANSWER), (bad, r)
        assert r.error


async def test_dead_nameserver_times_out(tmp_path):
    from tests.peers import free_port
    port = free_port(kind=__import__("socket").SOCK_DGRAM)
    res = Resolver(ResolverSettings.local(port, timeout=1, attempts=1), hosts_path=None)
    t = time.monotonic()
    r = await res.mx("example.test")
    assert r.status in (TIMEOUT, SERVFAIL, BADANSWER) and r.transient
    assert time.monotonic() - t < 2.0


def test_from_config_uses_resolv_conf(dns_server):
    class Cfg:
        values = {"resolv_conf": dns_server.resolv_conf, "min_dns_ttl": 30, "max_dns_ttl": 600}

        def lookup(self, name):
            return self.values[name.lower()]

    res = Resolver.from_config(Cfg())
    assert res.settings.nameservers == [Nameserver("127.0.0.1", dns_server.port)]
    assert (res.min_ttl, res.max_ttl, res.tcp_fallback) == (30, 600, True)
