"""Property tests: DNS answer handling never raises (issue 8, fuzzing).

``impetus.dns.Resolver`` promises never to raise for DNS trouble: whatever
comes back from the nameserver, ``mx()``, ``addresses()`` and ``txt()``
return a :class:`DnsResult` whose status is one of ``OK``, ``NODATA``,
``NXDOMAIN``, ``SERVFAIL``, ``TIMEOUT``, ``BADANSWER``.  ``router.gather()``
and ``router.decide()`` turn those results into preference levels of next
hops or one failure ``Reply``, never an exception.

Three layers:

* raw: a tiny UDP+TCP server on 127.0.0.1 answers each query with fuzzed
  bytes -- pure garbage, the query id followed by garbage, a valid answer
  with random mutations (flipped bytes, cut, inserted and deleted runs,
  rewritten section counts), several datagrams, a TC answer followed by a
  fuzzed TCP answer (with a right or wrong length prefix), or silence;
* structured: random but well-formed zones (MX with random preferences and
  exchanges, null MX, A/AAAA, CNAME chains and loops, SOA or not, rcodes,
  TTLs over the whole 32-bit range, names with arbitrary label bytes) served
  by the same server, then resolved through ``router.gather()`` and
  ``router.decide()`` with random plans;
* pure: ``gather()``/``decide()`` over random ``DnsResult`` values that keep
  the resolver's documented contract (no network, many more examples).

The default (CI) example counts keep this file under ~30 s; the long run
(``python -m tests.fuzz.run_long``) raises them for a time budget.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from impetus import router
from impetus.dns import (OK, STATUSES, TRANSIENT_STATUSES, DnsResult, Resolver,
                         ResolverSettings)
from impetus.router import RoutePlan, Target
from impetus.smtp.reply import Reply

NET = settings(max_examples=150, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
RAW = settings(NET, max_examples=300)
PURE = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RESOLVER_TIMEOUT = 0.2   # per query, one attempt: a silent server costs 0.2 s
# generous wall-clock bound for one call (a UDP try, a TCP fallback, CNAME hops)
CALL_BOUND = 5.0


# ---------------------------------------------------------------------------
# the fuzzing nameserver
# ---------------------------------------------------------------------------

class FuzzDnsServer:
    """UDP and TCP on the same loopback port.  ``responder(query, proto)``
    returns the datagrams (UDP) or messages (TCP, each sent with a 2-byte
    length prefix unless it is a ``RawTcp``) to answer with; it may be
    swapped at any time."""

    def __init__(self):
        self.responder = lambda query, proto: []
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            break
        else:
            raise RuntimeError("no free UDP+TCP port pair")
        tcp.listen(64)
        self.port, self.udp, self.tcp = port, udp, tcp
        threading.Thread(target=self._udp_loop, name=f"fuzzdns-udp-{port}", daemon=True).start()
        threading.Thread(target=self._tcp_loop, name=f"fuzzdns-tcp-{port}", daemon=True).start()

    def _answer(self, query: bytes, proto: str) -> list:
        try:
            return list(self.responder(query, proto))
        except Exception:       # a bug in the test's responder: say nothing
            return []

    def _udp_loop(self):
        while True:
            try:
                query, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            for d in self._answer(query, "udp"):
                try:
                    self.udp.sendto(bytes(d)[:65507], peer)
                except OSError:
                    pass

    def _tcp_loop(self):
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn):
        try:
            conn.settimeout(2)
            head = _recv_exactly(conn, 2)
            query = _recv_exactly(conn, struct.unpack("!H", head)[0])
            for d in self._answer(query, "tcp"):
                if isinstance(d, RawTcp):
                    conn.sendall(d.data)
                else:
                    d = bytes(d)[:65535]
                    conn.sendall(struct.pack("!H", len(d)) + d)
        except (OSError, struct.error):
            pass
        finally:
            conn.close()

    def resolver(self, tcp_fallback: bool = True) -> Resolver:
        s = ResolverSettings.local(self.port, timeout=RESOLVER_TIMEOUT, attempts=1)
        return Resolver(s, hosts_path=None, tcp_fallback=tcp_fallback)


class RawTcp:
    """Bytes written to a TCP client as they are (no length prefix)."""

    def __init__(self, data: bytes):
        self.data = data


def _recv_exactly(conn, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("short read")
        buf += chunk
    return buf


_SERVER: FuzzDnsServer | None = None
_SERVER_LOCK = threading.Lock()


def fuzz_server() -> FuzzDnsServer:
    """One server per process (daemon threads), shared by every example."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            _SERVER = FuzzDnsServer()
        return _SERVER


# ---------------------------------------------------------------------------
# checking results
# ---------------------------------------------------------------------------

def check_result(r, kind: str, want_ipv6: bool = False) -> None:
    assert isinstance(r, DnsResult), r
    assert r.status in STATUSES, r
    assert isinstance(r.ttl, int) and r.ttl >= 0, r
    assert isinstance(r.records, list), r
    assert isinstance(r.canonical_name, str), r
    if r.status != OK:
        assert r.records == [], r
        assert isinstance(r.error, str) and r.error, r
    if r.status in TRANSIENT_STATUSES:
        assert r.ttl == 0 and r.transient, r
    if kind == "MX":
        assert r.records == sorted(r.records), r
        for pref, exchange in r.records:
            assert isinstance(pref, int) and 0 <= pref <= 65535, r
            assert isinstance(exchange, str) and exchange == exchange.lower(), r
        assert r.null_mx == (r.status == OK and all(ex == "." for _, ex in r.records)), r
    elif kind == "ADDR":
        versions = [a.version for a in r.records]
        assert all(isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                   for a in r.records), r
        assert versions == sorted(versions), r         # IPv4 first
        assert len(set(r.records)) == len(r.records), r
        if not want_ipv6:
            assert set(versions) <= {4}, r
    elif kind == "TXT":
        assert all(isinstance(t, str) for t in r.records), r
    str(r)


def run(coro):
    return asyncio.run(coro)


async def timed(coro):
    t0 = time.monotonic()
    r = await coro
    assert time.monotonic() - t0 < CALL_BOUND, ("call took too long", r)
    return r


# ---------------------------------------------------------------------------
# (a) raw bytes
# ---------------------------------------------------------------------------

def _valid_reply(query: bytes, answers, tc: bool = False, rcode: int = 0) -> bytes:
    """A well-formed reply to ``query`` with ``answers`` [(type, ttl, text)]."""
    q = dns.message.from_wire(query)
    resp = dns.message.make_response(q)
    resp.set_rcode(rcode)
    qname = q.question[0].name if q.question else dns.name.from_text("fuzz.test.")
    for rdtype, ttl, text in answers:
        try:
            resp.answer.append(dns.rrset.from_text(qname, ttl, "IN", rdtype, text))
        except Exception:
            pass
    if tc:
        resp.flags |= dns.flags.TC
        resp.answer = []
    return resp.to_wire()


def _mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for op, pos, blob in mutations:
        n = len(b)
        p = pos % (n + 1)
        if op == "set" and n:
            b[p % n] = blob[0] if blob else 0
        elif op == "cut":
            del b[p:]
        elif op == "insert":
            b[p:p] = blob
        elif op == "delete":
            del b[p:p + 1 + len(blob)]
        elif op == "counts" and n >= 12:
            b[4 + (p % 4) * 2:6 + (p % 4) * 2] = struct.pack("!H", pos & 0xFFFF)
        elif op == "pointer" and n >= 2:
            # a compression pointer to a random place (loops, forward jumps)
            b[p % (n - 1):p % (n - 1) + 2] = struct.pack("!H", 0xC000 | (pos & 0x3FFF))
    return bytes(b)


RDATA = st.one_of(
    st.tuples(st.just("MX"), st.integers(0, 65535),
              st.sampled_from(["mx1.fuzz.test.", ".", "Mx2.FUZZ.test.", "a.b.", "\\000.x."])
              ).map(lambda t: (t[0], f"{t[1]} {t[2]}")),
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.just("CNAME"), st.sampled_from(["fuzz.test.", "other.test.", "."])),
    st.tuples(st.just("TXT"),
              st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"')),
    st.tuples(st.sampled_from(["NS", "PTR", "DNAME"]), st.just("x.test.")),
)
ANSWERS = st.lists(st.tuples(RDATA, st.integers(0, 2**32 - 1)).map(lambda t: (t[0][0], t[1], t[0][1])),
                   max_size=5)
MUTATIONS = st.lists(st.tuples(st.sampled_from(["set", "cut", "insert", "delete", "counts", "pointer"]),
                               st.integers(0, 2**16), st.binary(max_size=12)), max_size=6)


@st.composite
def raw_responders(draw):
    """A responder (query, proto) -> list of replies, and a label for it."""
    mode = draw(st.sampled_from(["keep_id", "mutated", "raw", "tc", "multi", "rcode", "silent"]))
    if mode == "silent" and draw(st.integers(0, 15)) != 7:
        mode = "keep_id"        # silence costs a timeout per query: keep it rare
    garbage = draw(st.binary(max_size=600))
    answers = draw(ANSWERS)
    mutations = draw(MUTATIONS)
    rcode = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 9, 11, 15]))
    tcp_kind = draw(st.sampled_from(["valid", "mutated", "garbage", "bad_length", "nothing"]))

    def respond(query: bytes, proto: str):
        if proto == "tcp":
            if tcp_kind == "valid":
                return [_valid_reply(query, answers)]
            if tcp_kind == "mutated":
                return [_mutate(_valid_reply(query, answers), mutations)]
            if tcp_kind == "garbage":
                return [query[:2] + garbage]
            if tcp_kind == "bad_length":
                return [RawTcp(struct.pack("!H", len(garbage) + 40) + query[:2] + garbage)]
            return []
        if mode == "keep_id":
            return [query[:2] + garbage]
        if mode == "raw":
            return [garbage]
        if mode == "mutated":
            return [_mutate(_valid_reply(query, answers), mutations)]
        if mode == "tc":
            return [_mutate(_valid_reply(query, answers, tc=True), mutations[:1])]
        if mode == "multi":
            return [query[:2] + garbage, garbage, _valid_reply(query, answers)]
        if mode == "rcode":
            return [_valid_reply(query, answers, rcode=rcode)]
        return []

    return mode, respond


@RAW
@given(raw_responders(), st.booleans(), st.booleans(),
       st.one_of(st.sampled_from(["fuzz.test", "FUZZ.test.", "a\\.b.fuzz.test", "x" * 63 + ".test",
                                  "b\\195\\169.fuzz.test", "\u00e9t\u00e9.fuzz.test"]),
                 st.text(max_size=80)))
def test_resolver_survives_fuzzed_answers(responder, want_ipv6, tcp_fallback, name):
    mode, respond = responder
    server = fuzz_server()
    server.responder = respond

    async def go():
        res = server.resolver(tcp_fallback)
        r = await timed(res.mx(name))
        check_result(r, "MX")
        event(f"{mode}: MX {r.status}")
        check_result(await timed(res.addresses(name, want_ipv6)), "ADDR", want_ipv6)
        check_result(await timed(res.txt(name)), "TXT")
        # a second ask is answered (from the cache or the network) just as safely
        check_result(await timed(res.mx(name)), "MX")

    run(go())


# ---------------------------------------------------------------------------
# (b) structured zones, through the resolver and the router
# ---------------------------------------------------------------------------

FIXED_NAMES = ["d.test.", "mx1.d.test.", "mx2.d.test.", "alias.d.test.", "other.test.",
               "loop.d.test."]
labels = st.binary(min_size=1, max_size=20)
odd_names = st.lists(labels, min_size=1, max_size=3).map(
    lambda ls: dns.name.Name(tuple(ls) + (b"d", b"test", b"")))
TTLS = st.one_of(st.sampled_from([0, 1, 300, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def zones(draw):
    names = [dns.name.from_text(n) for n in FIXED_NAMES] + draw(st.lists(odd_names, max_size=3))
    pool = names + [dns.name.root, dns.name.from_text("nowhere.test.")] + [
        dns.name.Name((lit.encode(), b"")) for lit in ("1.2.3.4", "::1", "fe80::1%lo", "[10.0.0.1]")]
    zone = {}
    for n in names:
        if draw(st.integers(0, 9)) == 0:
            continue                            # not in the zone: NXDOMAIN (or NODATA)
        node = {
            "rcode": draw(st.sampled_from([0] * 12 + [1, 2, 3, 4, 5])),
            "ttl": draw(TTLS),
            "mx": draw(st.lists(st.tuples(st.integers(0, 65535), st.sampled_from(pool)), max_size=4)),
            "a": draw(st.lists(st.ip_addresses(v=4), max_size=3)),
            "aaaa": draw(st.lists(st.ip_addresses(v=6), max_size=3)),
            "cname": draw(st.one_of(st.none(), st.none(), st.sampled_from(pool))),
            "soa": draw(st.booleans()),
            "txt": draw(st.lists(st.binary(max_size=30), max_size=2)),
        }
        if draw(st.integers(0, 5)) == 0:
            node["mx"] = [(0, dns.name.root)]   # null MX
        zone[n] = node
    chase = draw(st.booleans())
    missing_rcode = draw(st.sampled_from([dns.rcode.NXDOMAIN, dns.rcode.NOERROR]))
    return names, zone, chase, missing_rcode


SOA = dns.rrset.from_text("d.test.", 60, "IN", "SOA", "ns.d.test. h.d.test. 1 2 3 4 30")


def zone_responder(zone, chase, missing_rcode):
    def respond(query: bytes, proto: str):
        q = dns.message.from_wire(query)
        resp = dns.message.make_response(q)
        resp.flags |= dns.flags.AA
        qname, qtype = q.question[0].name, q.question[0].rdtype
        target, seen = qname, set()
        while True:
            seen.add(target)
            node = zone.get(target)
            if node is None:
                if target == qname:
                    resp.set_rcode(missing_rcode)
                    resp.authority.append(SOA)
                break
            if node["rcode"]:
                resp.set_rcode(node["rcode"])
                break
            ttl = node["ttl"]
            if node["cname"] is not None and qtype != dns.rdatatype.CNAME:
                rrs = dns.rrset.from_rdata_list(target, ttl, [
                    dns.rdata.from_text("IN", "CNAME", node["cname"].to_text())])
                resp.answer.append(rrs)
                if chase and node["cname"] not in seen:
                    target = node["cname"]
                    continue
                break
            rdatas = []
            if qtype == dns.rdatatype.MX:
                rdatas = [dns.rdata.from_text("IN", "MX", f"{p} {ex.to_text()}") for p, ex in node["mx"]]
            elif qtype == dns.rdatatype.A:
                rdatas = [dns.rdata.from_text("IN", "A", str(a)) for a in node["a"]]
            elif qtype == dns.rdatatype.AAAA:
                rdatas = [dns.rdata.from_text("IN", "AAAA", str(a)) for a in node["aaaa"]]
            elif qtype == dns.rdatatype.TXT:
                rdatas = [dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [t])
                          for t in node["txt"]]
            if rdatas:
                resp.answer.append(dns.rrset.from_rdata_list(target, ttl, rdatas))
            elif node["soa"]:
                resp.authority.append(SOA)
            break
        return [resp.to_wire()]
    return respond


NETS = st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "0.0.0.0/0", "::/0", "::1/128", "fe80::/10",
                        "192.0.2.0/24"]).map(ipaddress.ip_network)


@st.composite
def plans(draw, names):
    domain = names[0].to_text(omit_final_dot=True)
    kinds = st.sampled_from(["domain", "host", "literal"])
    if draw(st.booleans()):
        targets = (Target(domain, "domain", 25),)
    else:
        targets = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(kinds)
            if kind == "literal":
                name = str(draw(st.ip_addresses()))
            else:
                name = draw(st.sampled_from(names)).to_text(omit_final_dot=True)
            targets.append(Target(name, kind, draw(st.sampled_from([25, 24, 2525])),
                                  draw(st.integers(0, 20)), draw(st.sampled_from(["esmtp", "lmtp"])),
                                  "route", draw(st.one_of(st.none(), st.integers(1, 3600)))))
        targets = tuple(targets)
    return RoutePlan("default", domain, targets, want_ipv6=draw(st.booleans()),
                     prefer_ipv6=draw(st.booleans()),
                     prohibited=tuple(draw(st.lists(NETS, max_size=2))),
                     skip=tuple(draw(st.lists(NETS, max_size=2))),
                     mx_fallback_to_a=draw(st.sampled_from([0, 1, 3, -1])))


def check_decision(d, plan_) -> None:
    assert isinstance(d, router.RouteDecision)
    assert (d.failure is None) == bool(d.levels), (d.failure, d.levels)
    if d.failure is not None:
        assert isinstance(d.failure, Reply) and d.failure.code // 100 in (4, 5), d.failure
    assert d.ttl >= 1.0
    prefs = []
    for level in d.levels:
        assert level, "empty preference level"
        assert len({h.pref for h in level}) == 1, level
        prefs.append(level[0].pref)
    assert prefs == sorted(prefs) and len(set(prefs)) == len(prefs), prefs   # non-decreasing
    hops = d.hops
    assert [h.pref for h in hops] == sorted(h.pref for h in hops)
    for h in hops:
        ip = ipaddress.ip_address(h.ip)
        assert not any(ip.version == n.version and ip in n for n in plan_.prohibited), h
        assert not any(ip.version == n.version and ip in n for n in plan_.skip), h
        if not plan_.want_ipv6 and not router._is_ip(h.host):
            assert ip.version == 4, h          # AAAA only when Use_IPv6
    assert isinstance(router.format_decision(d), str)


@NET
@given(zones().flatmap(lambda z: st.tuples(st.just(z), plans(z[0]))), st.integers(0, 4),
       st.booleans())
def test_well_formed_zones_through_resolver_and_router(zone_and_plan, mx_failures, tcp_fallback):
    (names, zone, chase, missing_rcode), plan_ = zone_and_plan
    server = fuzz_server()
    server.responder = zone_responder(zone, chase, missing_rcode)

    async def go():
        res = server.resolver(tcp_fallback)
        answers = await timed(router.gather(plan_, res, mx_failures))
        for (kind, _name), r in answers.items():
            check_result(r, kind, plan_.want_ipv6)
        return answers

    answers = run(go())
    d = router.decide(plan_, answers, mx_failures)
    check_decision(d, plan_)
    event(f"decision: {d.failure.code if d.failure else f'{len(d.hops)} hops'}"
          if d.failure or len(d.hops) < 3 else "decision: 3+ hops")


# ---------------------------------------------------------------------------
# (c) pure: random DnsResults that keep the resolver's contract
# ---------------------------------------------------------------------------

HOSTS = ["d.test", "mx1.d.test", "mx2.d.test", "Mx3.d.test", ".", "1.2.3.4", "::1", "a\\.b.d.test",
         "x" * 70, "fe80::1%lo", "[10.0.0.1]", "[IPv6:::1]", "0x7f.1", ""]


@st.composite
def dns_results(draw, kind: str, name: str, want_ipv6: bool):
    status = draw(st.sampled_from(sorted(STATUSES)))
    ttl = 0 if status in TRANSIENT_STATUSES else draw(st.integers(0, 2**32 - 1))
    records = []
    if status == OK:
        if kind == "MX":
            if draw(st.integers(0, 5)) == 0:
                records = [(0, ".")]
            else:
                records = sorted(set(draw(st.lists(
                    st.tuples(st.integers(0, 65535), st.sampled_from(HOSTS).map(str.lower)),
                    min_size=1, max_size=5))))
        else:
            v4 = draw(st.lists(st.ip_addresses(v=4), min_size=0 if want_ipv6 else 1, max_size=3,
                               unique=True))
            v6 = draw(st.lists(st.ip_addresses(v=6), max_size=3, unique=True)) if want_ipv6 else []
            if not v4 and not v6:
                v4 = [ipaddress.ip_address("192.0.2.1")]
            records = v4 + v6
    error = None if status == OK else f"fuzz {status}"
    return DnsResult(status, records, ttl, name, error, name, kind)


class FakeResolver:
    def __init__(self, data, want_ipv6):
        self.data, self.want_ipv6, self.asked = data, want_ipv6, []

    async def mx(self, name):
        self.asked.append(("MX", name))
        return self.data.draw(dns_results("MX", name, self.want_ipv6))

    async def addresses(self, name, want_ipv6=False):
        self.asked.append(("ADDR", name))
        return self.data.draw(dns_results("A", name, want_ipv6))


@PURE
@given(st.data())
def test_decide_over_random_results(data):
    names = [dns.name.from_text(h) for h in HOSTS if h != "." and not router._is_ip(h) and len(h) < 64]
    plan_ = data.draw(plans(names))
    mx_failures = data.draw(st.integers(0, 4))
    fake = FakeResolver(data, plan_.want_ipv6)
    answers = run(router.gather(plan_, fake, mx_failures))
    check_decision(router.decide(plan_, answers, mx_failures), plan_)
