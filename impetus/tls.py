"""Outbound TLS pieces (spec §7, decision D11): client contexts and the
certificate host check.

* :class:`TlsSettings` -- the TLS policy of one connection, as looked up
  for its (binding, domain) and possibly tightened by MTA-STS.
* :func:`client_context` -- a cached ``ssl.SSLContext`` for settings
  (protocol range, ciphers, CA bundle, client certificate).
* :func:`certificate_matches` -- D11: the MX host name (or the domain)
  against the subjectAltName dNSName entries with RFC 6125 wildcards, the
  CN only when the certificate has no dNSName.

Hostname checking is never left to OpenSSL (``check_hostname`` is off):
the check runs after the handshake so that ``TLS_Verify = optional`` can
deliver anyway and so that several names (host and domain) may match.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass

from .config.values import parse_tls_protocols

_SSL_VERSIONS = {
    "TLSv1.0": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True)
class TlsSettings:
    """What one outbound connection does about TLS.

    ``mode``: ``no`` | ``ifavailable`` | ``required``; ``verify``: ``no`` |
    ``ca`` | ``host`` | ``optional``; ``names``: names the certificate may
    match for ``host``/``optional`` (the MX host name first, then the
    domain); ``system_cas``: trust the system CAs besides ``ca`` (MTA-STS);
    ``sts``: the MTA-STS mode that shaped these settings, for messages.
    """

    mode: str = "no"
    verify: str = "no"
    fallback: bool = True
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    protocols: str = "+ALL"
    ciphers: str = "DEFAULT"
    names: tuple[str, ...] = ()
    system_cas: bool = False
    sts: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode in ("ifavailable", "required")

    def context(self, verify_chain: bool) -> ssl.SSLContext:
        return client_context(self, verify_chain)


_CONTEXTS: dict[tuple, ssl.SSLContext] = {}


def _mtime(path: str | None):
    if not path:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def protocol_range(text: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    lo, hi = parse_tls_protocols(text)
    return _SSL_VERSIONS[lo], _SSL_VERSIONS[hi]


def client_context(s: TlsSettings, verify_chain: bool) -> ssl.SSLContext:
    """An SSL client context for ``s``; ``verify_chain`` turns chain
    verification on (``CERT_REQUIRED`` against ``s.ca``, else -- or also,
    with ``system_cas`` -- the system CAs).  Contexts are cached by their
    inputs, files by modification time, so a replaced certificate is
    picked up.  Raises ``ssl.SSLError``/``OSError``/``ValueError`` when a
    file or value is unusable."""
    key = (verify_chain, s.ca if verify_chain else None, s.system_cas and verify_chain,
           s.cert, s.key, s.protocols, s.ciphers,
           _mtime(s.ca) if verify_chain else None, _mtime(s.cert), _mtime(s.key))
    ctx = _CONTEXTS.get(key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False          # D11 check of our own, after the handshake
    if verify_chain:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if s.ca:
            if os.path.isdir(s.ca):
                ctx.load_verify_locations(capath=s.ca)
            else:
                ctx.load_verify_locations(cafile=s.ca)
        if not s.ca or s.system_cas:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    lo, hi = protocol_range(s.protocols)
    ciphers = s.ciphers or "DEFAULT"
    if lo < ssl.TLSVersion.TLSv1_2:
        # OpenSSL's security level refuses TLS < 1.2 unless lowered (the
        # operator named the old version explicitly).
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    elif ciphers != "DEFAULT":
        ctx.set_ciphers(ciphers)
    ctx.minimum_version = lo
    ctx.maximum_version = hi
    if s.cert:
        ctx.load_cert_chain(s.cert, s.key or None)
    if len(_CONTEXTS) > 256:
        _CONTEXTS.clear()
    _CONTEXTS[key] = ctx
    return ctx


# ---------------------------------------------------------------------------
# D11 host check


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def dnsname_matches(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4: case-insensitive; a ``*`` only as the whole left-most
    label, matching exactly one label, with at least two labels after it
    (``*.example.com`` matches ``a.example.com``, not ``example.com`` nor
    ``a.b.example.com``; ``*.com`` and ``f*o.example.com`` match nothing)."""
    p, h = _norm(pattern), _norm(host)
    if not p or not h:
        return False
    if "*" not in p:
        return p == h
    first, _, rest = p.partition(".")
    if first != "*" or "*" in rest or rest.count(".") < 1:
        return False
    hfirst, _, hrest = h.partition(".")
    if not hfirst or not hrest:
        return False
    # never let a wildcard stand for an IDNA A-label
    if hfirst.startswith("xn--"):
        return False
    return hrest == rest


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def certificate_names(cert: dict) -> tuple[list[str], list[str], list[str]]:
    """(dNSName SANs, iPAddress SANs, subject CNs) of ``getpeercert()``."""
    dns_names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    ips = [v for k, v in cert.get("subjectAltName", ()) if k == "IP Address"]
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return dns_names, ips, cns


def certificate_matches(cert: dict, names) -> str | None:
    """D11: the first of ``names`` the certificate is valid for, or None.

    A name that is an IP address matches an iPAddress SAN. Other names
    match dNSName SANs (RFC 6125 wildcards); the subject CN is used only
    when the certificate has no dNSName at all."""
    dns_names, ips, cns = certificate_names(cert)
    patterns = dns_names if dns_names else cns
    for name in names:
        if not name:
            continue
        addr = _ip(name)
        if addr is not None:
            if any(_ip(v) == addr for v in ips):
                return name
            continue
        if any(dnsname_matches(p, name) for p in patterns):
            return name
    return None


def describe_certificate(cert: dict) -> str:
    dns_names, ips, cns = certificate_names(cert)
    parts = []
    if dns_names or ips:
        parts.append("SAN " + ", ".join(dns_names + ips))
    if cns:
        parts.append("CN " + ", ".join(cns))
    return "; ".join(parts) or "no names"
