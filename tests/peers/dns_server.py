"""In-process authoritative test DNS server (dnslib), per-test controllable.

Recipe: /work/shared/testing/test-peers.md §1a, with its gotchas handled:
NODATA answered as NOERROR + SOA (dnslib's ZoneResolver says NXDOMAIN),
TCP bound first on port 0 then UDP on the same port without SO_REUSEADDR,
no-reply names raise ``DNSError`` (no traceback), sockets really closed on
``stop()``.  Fault injection per name: SERVFAIL (or any rcode), no reply
(timeout), garbage bytes, truncated (TC) UDP answers, delays.

Serves on 127.0.0.1 (or ``host``) only; runs in background threads, so it can
be used from sync tests, async tests and by ``impetus serve`` subprocesses
(through :attr:`DnsServer.resolv_conf`).
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections import Counter
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.server import DNSHandler, DNSLogger

ZONE_DIR = Path(__file__).with_name("zones")
TEST_ZONE = ZONE_DIR / "test.zone"

DEFAULT_SERVFAIL = ("servfail.test",)
DEFAULT_TIMEOUT = ("timeout.test",)
DEFAULT_GARBAGE = ("garbage.test",)
DEFAULT_TRUNCATED = ("truncated.test",)


def _fq(name: str) -> str:
    """'Example.Test' / 'example.test.' -> 'example.test.'"""
    n = str(name).strip().lower()
    return n if n.endswith(".") else n + "."


def _key(name: str) -> str:
    n = str(name).strip().lower()
    return n[:-1] if n.endswith(".") and len(n) > 1 else n


def _quiet_logger() -> DNSLogger:
    return DNSLogger("-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)


class TestZoneResolver:
    """Zone-based resolver with correct NODATA/NXDOMAIN and fault injection.

    Thread safe: the zone can be changed while the server runs."""

    __test__ = False  # not a pytest test class

    def __init__(self, zone_text: str, origin: str = "test."):
        self.origin = origin
        self.lock = threading.Lock()
        self.zone: list[tuple[str, str, RR]] = []
        self.rcodes: dict[str, str] = {}       # name. -> 'SERVFAIL' | 'REFUSED' | ...
        self.timeout: set[str] = set()
        self.garbage: set[str] = set()
        self.truncated: set[str] = set()
        self.delays: dict[str, float] = {}
        self.chase_cnames = False               # dnslib-like default: CNAME only
        self.add(zone_text)
        soa = [rr for _, t, rr in self.zone if t == "SOA"]
        if not soa:
            raise ValueError("test zone needs an SOA record")
        self.soa = soa[0]

    # ---------------------------------------------------------- mutation
    def add(self, text: str, ttl: int = 300) -> list[RR]:
        rrs = RR.fromZone(text, origin=self.origin, ttl=ttl)
        with self.lock:
            for rr in rrs:
                self.zone.append((_fq(str(rr.rname)), QTYPE[rr.rtype], rr))
        return rrs

    def remove(self, name: str, rtype: str | None = None) -> int:
        n = _fq(name)
        with self.lock:
            before = len(self.zone)
            self.zone = [z for z in self.zone
                         if not (z[0] == n and (rtype is None or z[1] == rtype.upper()))]
            return before - len(self.zone)

    # ---------------------------------------------------------- answering
    def _exists(self, qn: str, zone) -> bool:
        suffix = "." + qn
        return any(name == qn or name.endswith(suffix) for name, _, _ in zone)

    def resolve(self, request: DNSRecord, handler) -> DNSRecord:
        qname = request.q.qname
        qn = _fq(str(qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        delay = self.delays.get(qn)
        if delay:
            time.sleep(delay)
        if qn in self.timeout:
            # dnslib's handler logs DNSError and sends nothing: the client times out
            raise DNSError("deliberate no-answer for " + qn)
        reply = request.reply()
        reply.header.aa = 1
        rc = self.rcodes.get(qn)
        if rc:
            reply.header.aa = 0
            reply.header.rcode = getattr(RCODE, rc)
            return reply
        with self.lock:
            zone = list(self.zone)
        target, seen = qn, set()
        while True:
            seen.add(target)
            cname_to = None
            for name, rtype, rr in zone:
                if name != target:
                    continue
                if rtype == qtype or qtype == "ANY":
                    reply.add_answer(rr)
                    if rtype in ("MX", "NS", "CNAME", "PTR"):
                        glue = _fq(str(rr.rdata.label))
                        for n2, t2, rr2 in zone:
                            if n2 == glue and t2 in ("A", "AAAA"):
                                reply.add_ar(rr2)
                elif rtype == "CNAME":
                    reply.add_answer(rr)
                    cname_to = _fq(str(rr.rdata.label))
            if cname_to and self.chase_cnames and cname_to not in seen:
                target = cname_to
                continue
            break
        if not any(QTYPE[rr.rtype] == qtype or qtype == "ANY" for rr in reply.rr):
            if not reply.rr or self.chase_cnames:
                # NODATA vs NXDOMAIN (dnslib's ZoneResolver would say NXDOMAIN)
                exists = self._exists(target, zone)
                reply.header.rcode = RCODE.NOERROR if exists else RCODE.NXDOMAIN
                reply.add_auth(self.soa)
        return reply


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        srv: DnsServer = self.server.owner
        try:
            request = DNSRecord.parse(data)
        except Exception as e:  # unparsable query: no answer
            raise DNSError(f"bad request: {e}")
        qn = _fq(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        srv._count(qn, qtype, self.protocol)
        res = srv.resolver
        if qn in res.garbage:
            # echo the id, claim one question and one answer, then a
            # compression pointer that points at itself: unparsable.
            return data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\xc0\x0c\xde\xad\xbe\xef"
        reply = res.resolve(request, self)
        if self.protocol == "udp" and qn in res.truncated:
            reply = reply.truncate()
        return reply.pack()


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = False     # a duplicate UDP bind must fail loudly
    daemon_threads = True

    def __init__(self, addr, family):
        self.address_family = family
        super().__init__(addr, _Handler)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, family):
        self.address_family = family
        super().__init__(addr, _Handler)


class DnsServer:
    """A running test DNS server.

    Attributes: ``host``, ``port``, ``resolv_conf`` (path of a resolv.conf
    with ``nameserver HOST#PORT`` and ``options timeout:1 attempts:2``),
    ``resolver`` (the :class:`TestZoneResolver`)."""

    def __init__(self, workdir: str | os.PathLike, zone_text: str | None = None,
                 host: str = "127.0.0.1", *, timeout: int = 1, attempts: int = 2,
                 servfail=DEFAULT_SERVFAIL, no_reply=DEFAULT_TIMEOUT,
                 garbage=DEFAULT_GARBAGE, truncated=DEFAULT_TRUNCATED):
        self.host = host
        self.workdir = Path(workdir)
        self.resolver = TestZoneResolver(zone_text if zone_text is not None else TEST_ZONE.read_text())
        for n in servfail:
            self.set_servfail(n)
        for n in no_reply:
            self.set_timeout(n)
        for n in garbage:
            self.set_garbage(n)
        for n in truncated:
            self.set_truncated(n)
        self._counts: Counter = Counter()
        self._counts_lock = threading.Lock()
        self._servers: list = []
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.timeout = timeout
        self.attempts = attempts
        self.resolv_conf = ""

    # ---------------------------------------------------------- lifecycle
    def start(self) -> "DnsServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last = None
        for _ in range(20):
            tcp = _TCPServer((self.host, 0), family)
            port = tcp.server_address[1]
            try:
                udp = _UDPServer((self.host, port), family)
            except OSError as e:       # UDP port taken by someone else: try another
                tcp.server_close()
                last = e
                continue
            break
        else:
            raise RuntimeError(f"could not bind TCP+UDP on the same port: {last}")
        for s in (tcp, udp):
            s.owner = self
            s.logger = _quiet_logger()
            s.resolver = self.resolver
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"dns-{s.socket_type}-{port}", daemon=True)
            t.start()
            self._servers.append(s)
            self._threads.append(t)
        self.port = port
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "resolv.conf"
        path.write_text(self.resolv_conf_text())
        self.resolv_conf = str(path)
        return self

    def resolv_conf_text(self, **options) -> str:
        ns = f"[{self.host}]#{self.port}" if ":" in self.host else f"{self.host}#{self.port}"
        opts = {"timeout": self.timeout, "attempts": self.attempts, **options}
        return (f"nameserver {ns}\n"
                f"options {' '.join(f'{k}:{v}' for k, v in opts.items())}\n")

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "DnsServer":
        return self.start() if not self._servers else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------- records
    def add(self, zone_text: str, ttl: int = 300) -> list[RR]:
        """Add record(s) in zone-file syntax.  Names without a trailing dot
        are relative to ``test.`` (like the zone file); default TTL 300."""
        return self.resolver.add(zone_text, ttl=ttl)

    def remove(self, name: str, rtype: str | None = None) -> int:
        """Remove all records of ``name`` (absolute, dot optional), or only
        those of ``rtype``.  Returns how many were removed."""
        return self.resolver.remove(name, rtype)

    def set_records(self, name: str, rtype: str, *values: str, ttl: int = 300) -> None:
        """Replace ``name``'s ``rtype`` records: ``set_records('x.test', 'A', '127.0.0.2')``."""
        self.remove(name, rtype)
        for v in values:
            self.add(f"{_fq(name)} {ttl} IN {rtype.upper()} {v}", ttl=ttl)

    def chase_cnames(self, on: bool = True) -> None:
        """Answer with the whole in-zone CNAME chain (like NSD) instead of
        the CNAME alone (like dnslib)."""
        self.resolver.chase_cnames = on

    # ---------------------------------------------------------- faults
    def set_rcode(self, name: str, rcode: str | None) -> None:
        """Answer every query for ``name`` with ``rcode`` ('SERVFAIL',
        'REFUSED', ...); ``None`` clears."""
        n = _fq(name)
        if rcode is None:
            self.resolver.rcodes.pop(n, None)
        else:
            getattr(RCODE, rcode.upper())      # validate
            self.resolver.rcodes[n] = rcode.upper()

    def set_servfail(self, name: str, on: bool = True) -> None:
        self.set_rcode(name, "SERVFAIL" if on else None)

    def _toggle(self, which: set, name: str, on: bool) -> None:
        (which.add if on else which.discard)(_fq(name))

    def set_timeout(self, name: str, on: bool = True) -> None:
        """Never answer queries for ``name`` (the client times out)."""
        self._toggle(self.resolver.timeout, name, on)

    def set_garbage(self, name: str, on: bool = True) -> None:
        """Answer queries for ``name`` (UDP and TCP) with unparsable bytes."""
        self._toggle(self.resolver.garbage, name, on)

    def set_truncated(self, name: str, on: bool = True) -> None:
        """Answer UDP queries for ``name`` with TC=1 and no records; TCP
        queries get the real answer."""
        self._toggle(self.resolver.truncated, name, on)

    def set_delay(self, name: str, seconds: float | None) -> None:
        """Delay answers for ``name`` (each query is served in its own thread)."""
        if seconds:
            self.resolver.delays[_fq(name)] = float(seconds)
        else:
            self.resolver.delays.pop(_fq(name), None)

    def clear_faults(self, name: str | None = None) -> None:
        r = self.resolver
        if name is None:
            r.rcodes.clear(); r.timeout.clear(); r.garbage.clear()
            r.truncated.clear(); r.delays.clear()
            return
        n = _fq(name)
        r.rcodes.pop(n, None); r.delays.pop(n, None)
        for s in (r.timeout, r.garbage, r.truncated):
            s.discard(n)

    # ---------------------------------------------------------- counters
    def _count(self, qname: str, qtype: str, proto: str) -> None:
        with self._counts_lock:
            self._counts[(_key(qname), qtype, proto)] += 1

    def query_count(self, name: str | None = None, rtype: str | None = None,
                    proto: str | None = None) -> int:
        """Queries received, filtered by name (dot optional), type and
        protocol ('udp' / 'tcp')."""
        k = _key(name) if name is not None else None
        with self._counts_lock:
            return sum(c for (n, t, p), c in self._counts.items()
                       if (k is None or n == k)
                       and (rtype is None or t == rtype.upper())
                       and (proto is None or p == proto))

    @property
    def queries(self) -> dict[tuple[str, str], int]:
        """{(name, type): count} over both protocols (a snapshot)."""
        out: Counter = Counter()
        with self._counts_lock:
            for (n, t, _p), c in self._counts.items():
                out[(n, t)] += c
        return dict(out)

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    def make_settings(self):
        """``impetus.dns.ResolverSettings`` pointing at this server."""
        from impetus.dns import parse_resolv_conf
        return parse_resolv_conf(self.resolv_conf)

    def make_resolver(self, **kw):
        """An ``impetus.dns.Resolver`` using this server (``hosts_path=None``
        unless given, so /etc/hosts never masks test answers)."""
        from impetus.dns import Resolver
        kw.setdefault("hosts_path", None)
        return Resolver(self.make_settings(), **kw)


def raw_query(host: str, port: int, name: str, rtype: str = "A", tcp: bool = False,
              timeout: float = 2.0) -> DNSRecord:
    """Blocking query with dnslib (for smoke tests)."""
    q = DNSRecord.question(name, rtype)
    return DNSRecord.parse(q.send(host, port, tcp=tcp, timeout=timeout))


__all__ = ["DnsServer", "TestZoneResolver", "TEST_ZONE", "raw_query"]
