"""MTA-STS (RFC 8461): policy discovery, fetching, caching and MX matching.

``Use_MTA_STS`` makes the scheduler ask :meth:`MtaSts.policy` for the
recipient domain of mail routed by the domain's own MX records; with
``Enable_MTA_STS`` the answer tightens the connection's TLS settings
(``enforce``: TLS required, ``TLS_Verify = host`` against the MX name only,
MX hosts outside the policy's ``mx:`` patterns are not used; ``testing``:
at least ``ifavailable`` + ``optional``, mismatches noted only).

Discovery: the ``_mta-sts.<domain>`` TXT record through
:class:`impetus.dns.Resolver` (never the system resolver); exactly one
record starting ``v=STSv1`` with an ``id``. Fetch:
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` over stdlib ``ssl``
and asyncio streams, the host name resolved through the same resolver,
the certificate verified for ``mta-sts.<domain>`` against the system CAs
plus ``TLS_CA``; no redirects, 64 KiB at most, ``text/plain``.

Cache: a policy is kept for its ``max_age``; a TXT record with the same
``id`` reuses it, a new ``id`` refetches.  When discovery or the fetch
fails, a still valid cached policy is used (RFC 8461 §5.1), else the domain
is treated as having no policy; a failed fetch is not retried for
:data:`FETCH_FAILURE_TTL` seconds.
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass, field

log = logging.getLogger("impetus.mta_sts")

MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_LIMIT = 31557600
FETCH_TIMEOUT = 30.0
FETCH_FAILURE_TTL = 300.0
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")


class PolicyError(ValueError):
    """A TXT record or policy text that does not follow RFC 8461."""


@dataclass
class Policy:
    domain: str
    mode: str                    # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched_at: float = field(default_factory=time.time)

    @property
    def expires(self) -> float:
        return self.fetched_at + self.max_age

    def valid(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.expires

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: the MX host name matches one of the ``mx`` patterns."""
        return any(mx_matches(p, host) for p in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """``mail.example.com`` matches itself; ``*.example.com`` matches exactly
    one more label on the left (``a.example.com``, not ``example.com`` nor
    ``a.b.example.com``). Case-insensitive, trailing dots ignored."""
    p = pattern.strip().rstrip(".").lower()
    h = host.strip().rstrip(".").lower()
    if not p or not h:
        return False
    if p.startswith("*."):
        first, _, rest = h.partition(".")
        return bool(first) and rest == p[2:]
    return p == h


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the one ``v=STSv1`` TXT record; None when there is
    none. Raises PolicyError for several records or a malformed one."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if not sts:
        return None
    if len(sts) > 1:
        raise PolicyError(f"{len(sts)} v=STSv1 TXT records")
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise PolicyError(f"malformed TXT field {part!r}")
        fields.setdefault(k.strip().lower(), v.strip())
    if fields.get("v") != "STSv1":
        raise PolicyError("the TXT record does not start with v=STSv1")
    pid = fields.get("id", "")
    if not _ID.match(pid):
        raise PolicyError(f"bad policy id {pid!r}")
    return pid


def parse_policy(text: str, domain: str = "", pid: str = "") -> Policy:
    """RFC 8461 §3.2 policy text -> Policy; raises PolicyError."""
    version = mode = max_age = None
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"malformed policy line {line[:80]!r}")
        key, value = key.strip().lower(), value.strip()
        if key == "version":
            version = version or value
        elif key == "mode":
            mode = mode or value
        elif key == "max_age":
            if max_age is None:
                if not value.isdigit() or len(value) > 10:
                    raise PolicyError(f"bad max_age {value!r}")
                max_age = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            if value:
                mx.append(value.lower())
        # other keys are extensions: ignored (§3.2)
    if version != "STSv1":
        raise PolicyError(f"version is {version!r}, not STSv1")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    if max_age is None:
        raise PolicyError("max_age is missing")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(domain, mode, tuple(mx), max_age, pid)


class FetchError(Exception):
    pass


def _decode_chunked(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise FetchError("truncated chunked body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise FetchError("bad chunk size") from None
        if size == 0:
            return bytes(out)
        if len(data) < size + 2:
            raise FetchError("truncated chunked body")
        out += data[:size]
        if len(out) > MAX_POLICY_BYTES:
            raise FetchError("policy larger than 64 KiB")
        data = data[size + 2:]


def parse_http_response(raw: bytes) -> bytes:
    """The body of a ``200`` ``text/plain`` HTTP/1.x response; FetchError
    otherwise (redirects are not followed: RFC 8461 §3.3)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError("incomplete HTTP response")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1."):
        raise FetchError(f"not an HTTP response: {lines[0][:80]!r}")
    if status[1] != "200":
        raise FetchError(f"HTTP status {' '.join(status[1:])}")
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "text/plain":
        raise FetchError(f"Content-Type {ctype}, not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _decode_chunked(body)
    elif "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise FetchError("bad Content-Length") from None
        if len(body) < n:
            raise FetchError("truncated body")
        body = body[:n]
    if len(body) > MAX_POLICY_BYTES:
        raise FetchError("policy larger than 64 KiB")
    return body


class MtaSts:
    """Per-process MTA-STS policy cache.

    ``MtaSts(resolver, port=443, want_ipv6=False, notice=None)``;
    ``await policy(domain, ca_file=None)`` -> Policy (mode ``enforce`` or
    ``testing``) or None.
    """

    def __init__(self, resolver, *, port: int = 443, want_ipv6: bool = False,
                 timeout: float = FETCH_TIMEOUT, notice=None):
        self.resolver = resolver
        self.port = port
        self.want_ipv6 = want_ipv6
        self.timeout = timeout
        self.notice = notice
        self.cache: dict[str, Policy] = {}
        self.failures: dict[tuple[str, str], float] = {}   # (domain, id) -> retry after
        self._inflight: dict[str, asyncio.Future] = {}
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self.fetches = 0

    def _note(self, text: str) -> None:
        if self.notice is not None:
            self.notice(text)
        else:
            log.info("%s", text)

    async def policy(self, domain: str, ca_file: str | None = None) -> Policy | None:
        domain = domain.strip().rstrip(".").lower()
        fut = self._inflight.get(domain)
        if fut is None:
            fut = asyncio.ensure_future(self._policy(domain, ca_file))
            self._inflight[domain] = fut
            fut.add_done_callback(lambda f, d=domain: self._inflight.pop(d, None)
                                  if self._inflight.get(d) is f else None)
        p = await asyncio.shield(fut)
        return p if p is not None and p.mode != "none" else None

    async def _policy(self, domain: str, ca_file: str | None) -> Policy | None:
        now = time.time()
        cached = self.cache.get(domain)
        if cached is not None and not cached.valid(now):
            del self.cache[domain]
            cached = None
        res = await self.resolver.txt(f"_mta-sts.{domain}")
        if not res.ok:
            if res.transient:
                self._note(f"MTA-STS {domain}: TXT lookup failed: {res.error}")
            return cached   # no record (or no answer): a valid cached policy still applies
        try:
            pid = parse_txt(res.records)
        except PolicyError as exc:
            self._note(f"MTA-STS {domain}: {exc}")
            return cached
        if pid is None:
            return cached
        if cached is not None and cached.id == pid:
            return cached
        retry_after = self.failures.get((domain, pid))
        if retry_after is not None and now < retry_after:
            return cached
        try:
            text = await self.fetch(domain, ca_file)
            policy = parse_policy(text, domain, pid)
        except (FetchError, PolicyError, OSError, ssl.SSLError, asyncio.TimeoutError,
                UnicodeDecodeError) as exc:
            self._note(f"MTA-STS {domain}: policy fetch failed: {type(exc).__name__}: {exc}")
            self.failures[(domain, pid)] = now + FETCH_FAILURE_TTL
            if len(self.failures) > 10000:
                self.failures.clear()
            return cached
        self.failures.pop((domain, pid), None)
        self.cache[domain] = policy
        if len(self.cache) > 100000:
            self.cache.pop(next(iter(self.cache)))
        self._note(f"MTA-STS {domain}: policy id {pid} mode {policy.mode} "
                   f"mx {' '.join(policy.mx) or '-'} max_age {policy.max_age}")
        return policy

    def _context(self, ca_file: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            self._contexts[ca_file] = ctx
        return ctx

    async def fetch(self, domain: str, ca_file: str | None = None) -> str:
        """GET the policy text; raises FetchError/OSError/ssl errors."""
        host = f"mta-sts.{domain}"
        res = await self.resolver.addresses(host, want_ipv6=self.want_ipv6)
        if not res.ok or not res.records:
            raise FetchError(f"{host}: no address ({res.status}{': ' + res.error if res.error else ''})")
        ctx = self._context(ca_file)
        last: Exception | None = None
        for ip in res.records:
            try:
                return await asyncio.wait_for(self._get(str(ip), host, ctx), self.timeout)
            except asyncio.TimeoutError:
                last = FetchError(f"{host}[{ip}]: no answer within {self.timeout:g} s")
            except (OSError, ssl.SSLError, FetchError) as exc:
                last = exc if isinstance(exc, FetchError) else FetchError(f"{host}[{ip}]: {exc}")
        raise last or FetchError(f"{host}: no address")

    async def _get(self, ip: str, host: str, ctx: ssl.SSLContext) -> str:
        self.fetches += 1
        reader, writer = await asyncio.open_connection(ip, self.port, ssl=ctx,
                                                       server_hostname=host,
                                                       ssl_handshake_timeout=self.timeout)
        try:
            writer.write((f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                          "User-Agent: Impetus MTA-STS\r\nAccept: text/plain\r\n"
                          "Connection: close\r\n\r\n").encode("ascii"))
            await writer.drain()
            data = bytearray()
            limit = MAX_POLICY_BYTES + 16384
            while True:
                try:
                    chunk = await reader.read(65536)
                except (ssl.SSLError, ConnectionResetError):
                    if data:
                        break   # closed without close_notify after the response
                    raise
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise FetchError("response larger than 64 KiB")
        finally:
            writer.close()
        return parse_http_response(bytes(data)).decode("utf-8")
