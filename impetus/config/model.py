"""The validated configuration: scopes, typed values and fallback lookup.

:func:`build_config` turns the syntax tree from :mod:`.parser` into a
:class:`Config`.  Validation follows the option table in :mod:`.options`
(decision D19: unknown options, options in the wrong scope and options not
implemented yet are errors) and collects every issue before raising one
:class:`~impetus.config.errors.ConfigError`.

Fallback (decision D1), for an option looked up for binding B (declared in
binding group G, ``default`` when B is not declared in a group) and domain D::

    G::B::D > B::D > G::D > B > G > D > global > built-in default

``B::D`` is a ``Domain`` stanza inside a *top-level* ``Binding B`` stanza; a
binding may be declared both inside its group and at the top level (repeated
stanzas merge).  The ``B`` level tries ``G::B`` first, then the top-level
``B``.  Within one container, the exact-name ``Domain`` stanza is tried
first, then the regex (``/.../``) stanzas that match, in file order; the
first of them that sets the option wins.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

from .errors import Issues, Pos
from .lexer import quote
from .options import (HOST_DEFAULTS, LISTENER_SCOPES, OPTIONS, OUTBOUND_SCOPES, STANZAS,
                      OptionSpec)
from .parser import Assignment, Stanza, Statement, Value
from . import values as V
from .values import BadValue, BadValues

#: Options whose value is a token bucket shared by reference (spec §2.3).
THROTTLE_OPTIONS = frozenset({
    "outbound_throttle_messages", "outbound_throttle_connections",
    "cluster_outbound_throttle_messages", "cluster_outbound_throttle_connections"})
#: Connection caps shared by everything under the stanza that sets them (§6.2).
SCOPE_CAP_OPTIONS = frozenset({"scope_max_outbound_connections",
                               "server_max_outbound_connections"})

#: Entries kept in each lookup cache before it is emptied.
CACHE_LIMIT = 100_000

_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")

_DISPLAY = {
    "control_listen": "control_listener listen",
    "http_listen": "http_listener listen",
}


def scope_phrase(kind: str) -> str:
    """``at global scope`` / ``in a domain stanza`` / ``in an ec_logger stanza``."""
    if kind == "global":
        return "at global scope"
    shown = _DISPLAY.get(kind, kind)
    article = "an" if shown[0] in "aeiou" else "a"
    return f"in {article} {shown} stanza"


class Setting(NamedTuple):
    """One assignment: the typed value and where it was made."""

    value: Any
    pos: Pos
    node: Value


class Resolved(NamedTuple):
    """Result of :meth:`Config.explain`."""

    value: Any
    scope: str            # 'binding_group "g" / binding "b" / domain "d"', 'global', 'default'
    file: str | None
    line: int | None


class ListenAddr(NamedTuple):
    host: str | None
    port: int | None
    path: str | None
    family: int


class Scope:
    """One scope (the global scope or a stanza, merged over repetitions).

    ``values`` maps lower-cased option names to :class:`Setting`.
    """

    __slots__ = ("kind", "name", "parent", "label", "pos", "values", "children",
                 "regexes", "regex", "listen", "network")

    def __init__(self, kind: str, name: str | None, parent: "Scope | None", label: str,
                 pos: Pos | None):
        self.kind = kind
        self.name = name
        self.parent = parent
        self.label = label
        self.pos = pos
        self.values: dict[str, Setting] = {}
        self.children: dict[tuple[str, str | None], Scope] = {}
        self.regexes: dict[str, list[Scope]] = {}   # kind -> regex stanzas in file order
        self.regex: re.Pattern | None = None
        self.listen: ListenAddr | None = None
        self.network = None

    def child(self, kind: str, key: str | None) -> "Scope | None":
        return self.children.get((kind, key))

    def iter_children(self, kind: str | None = None) -> Iterator["Scope"]:
        for (k, _), sc in self.children.items():
            if kind is None or k == kind:
                yield sc

    def get(self, name: str, default: Any = None) -> Any:
        """The value set in this very scope (no fallback), like ``config get``."""
        s = self.values.get(name.lower())
        return default if s is None else s.value

    def __repr__(self) -> str:
        return f"<Scope {self.label}>"


# ---------------------------------------------------------------------------
# names


def normalize_domain(domain: str) -> str:
    """Canonical form of a domain for matching (case-insensitive, no
    trailing dot, IP literals unbracketed for IPv4, ``[ipv6:...]`` for v6)."""
    d = domain.strip().lower()
    if d.endswith(".") and len(d) > 1:
        d = d[:-1]
    if d.startswith("[") and d.endswith("]"):
        inner = d[1:-1]
        if inner.startswith("ipv6:"):
            try:
                return "[ipv6:" + ipaddress.IPv6Address(inner[5:]).compressed + "]"
            except ValueError:
                return d
        try:
            return str(ipaddress.IPv4Address(inner))
        except ValueError:
            return d
    return d


def host_match_key(host: str) -> tuple[str, str]:
    """(stanza key, regex subject) for a host name or address as seen in
    an MX record or route: case-folded, no trailing dot; an IPv6 address
    (bare or ``[IPv6:...]``) keys as ``[ipv6:<compressed>]`` and is matched
    by regex Host stanzas in its bare compressed form."""
    h = host.strip().lower()
    if h.endswith(".") and len(h) > 1:
        h = h[:-1]
    if h.startswith("[") and h.endswith("]"):
        key = normalize_domain(h)
        inner = key[1:-1] if key.startswith("[") else key
        return key, inner[5:] if inner.startswith("ipv6:") else inner
    if ":" in h:
        try:
            a = ipaddress.IPv6Address(h)
        except ValueError:
            return h, h
        return f"[ipv6:{a.compressed}]", a.compressed
    return h, h


def parse_domain_instance(text: str, what: str) -> tuple[str, re.Pattern | None]:
    """Validate a Domain/Host instance name -> (key, compiled regex or None)."""
    t = text.strip()
    if len(t) >= 2 and t.startswith("/") and t.endswith("/"):
        pat = t[1:-1]
        if not pat:
            raise ValueError(f"empty regular expression in {what} name {quote(text)}")
        try:
            rx = re.compile(pat, re.IGNORECASE)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            detail = getattr(exc, "msg", None) or str(exc)
            where = getattr(exc, "pos", None)
            suffix = f" at position {where}" if where is not None else ""
            raise ValueError(f"invalid regular expression {quote(text)} in {what} name: "
                             f"{detail}{suffix}") from None
        return t, rx
    bad = ValueError(f"invalid {what} name {quote(text)}: expected a DNS name, an IP "
                     "literal, [IPv6:...] or /regex/")
    d = t.lower()
    if d.endswith("."):
        d = d[:-1]
    if not d:
        raise bad
    if d.startswith("["):
        if not d.endswith("]"):
            raise bad
        inner = d[1:-1]
        try:
            if inner.startswith("ipv6:"):
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise bad from None
        return normalize_domain(d), None
    try:
        ipaddress.IPv4Address(d)
        return d, None
    except ValueError:
        pass
    if len(d) > 253 or not all(_DNS_LABEL.match(lab) for lab in d.split(".")):
        raise bad
    return d, None


def parse_listen_address(text: str) -> ListenAddr:
    """Parse a ``Listen`` address (spec §1.5); raises ValueError with a message."""
    t = text.strip()
    expected = ('expected ":PORT", "*:PORT", "A.B.C.D:PORT", "[IPv6]:PORT" '
                'or a Unix socket path')
    if not t:
        raise ValueError(f"invalid Listen address {quote(text)}: {expected}")
    if t.startswith("/"):
        if "\x00" in t:
            raise ValueError(f"invalid Listen address {quote(text)}: NUL byte in path")
        return ListenAddr(None, None, t, socket.AF_UNIX)
    if t.startswith("["):
        inner, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"invalid Listen address {quote(text)}: {expected}")
        port_text = rest[1:]
        if inner in ("*", "::"):
            host = "::"
        else:
            try:
                host = ipaddress.IPv6Address(inner).compressed
            except ValueError:
                raise ValueError(f"invalid IPv6 address {quote(inner)} in Listen address "
                                 f"{quote(text)}") from None
        family = socket.AF_INET6
    else:
        host_text, sep, port_text = t.rpartition(":")
        if not sep:
            raise ValueError(f"invalid Listen address {quote(text)}: {expected}")
        if host_text in ("", "*"):
            host = "0.0.0.0"
        else:
            try:
                host = str(ipaddress.IPv4Address(host_text))
            except ValueError:
                if ":" in host_text:
                    raise ValueError(f"invalid Listen address {quote(text)}: IPv6 addresses "
                                     'must be in brackets, e.g. "[::1]:25"') from None
                raise ValueError(f"invalid Listen address {quote(text)}: {expected}") from None
        family = socket.AF_INET
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port {quote(port_text)} in Listen address {quote(text)}: "
                         "expected 1-65535")
    return ListenAddr(host, int(port_text), None, family)


def parse_peer(text: str):
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        if "/" in t:
            addr, _, plen = t.partition("/")
            ipaddress.ip_address(addr)
            if not (plen.isascii() and plen.isdigit()):
                raise ValueError
            return ipaddress.ip_network(f"{addr}/{int(plen)}", strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(t))
    except ValueError:
        raise ValueError(f"invalid Peer address {quote(text)}: expected an IP address or "
                         "CIDR block") from None


def _suggest(name: str, candidates) -> str:
    m = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.75)
    return m[0] if m else ""


# ---------------------------------------------------------------------------
# building


class _Builder:
    def __init__(self, issues: Issues):
        self.issues = issues
        self.root = Scope("global", None, None, "global", None)
        self.group_of: dict[str, tuple[str, Pos]] = {}     # binding -> (group, where)
        self.top_bindings: set[str] = set()
        self.logger_names: dict[str, tuple[str, Pos]] = {}

    def err(self, pos: Pos, msg: str) -> None:
        self.issues.add(pos, msg)

    # -- walking -----------------------------------------------------------
    def block(self, stmts: list[Statement], scope: Scope) -> None:
        for st in stmts:
            if isinstance(st, Assignment):
                self.assign(st, scope)
            else:
                self.stanza(st, scope)

    def assign(self, st: Assignment, scope: Scope) -> None:
        lname = st.name.lower()
        spec = OPTIONS.get(lname)
        if spec is None:
            if lname in STANZAS:
                self.err(st.pos, f"'{st.name}' is a stanza, not an option; "
                                 f"write {STANZAS[lname].name} \"name\" {{ ... }}")
                return
            s = _suggest(lname, OPTIONS)
            hint = f"; did you mean '{OPTIONS[s].name}'?" if s else ""
            self.err(st.pos, f"unknown option '{st.name}'{hint}")
            return
        if scope.kind not in spec.scopes:
            self.err(st.pos, f"option '{spec.name}' is not valid {scope_phrase(scope.kind)}; "
                             f"valid scopes: {spec.scope_list()}")
            return
        supported = spec.supported and scope.kind not in spec.unsupported_scopes
        if not supported:
            if spec.supported:
                self.err(st.pos, f"option '{spec.name}' is not supported yet "
                                 f"{scope_phrase(scope.kind)}")
            else:
                self.err(st.pos, f"option '{spec.name}' is not supported yet")
        value = self.convert(spec, st.value)
        if value is _BAD or not supported:
            return
        scope.values[lname] = Setting(value, st.pos, st.value)

    def convert(self, spec: OptionSpec, node: Value) -> Any:
        base_dir = os.path.dirname(os.path.abspath(node.pos.file)) if node.pos.file else ""
        try:
            return spec.type.convert(node, base_dir)
        except BadValue as exc:
            for problem in (exc.problems if isinstance(exc, BadValues) else (exc,)):
                self.bad_value(spec, node, problem)
            return _BAD

    def bad_value(self, spec: OptionSpec, node: Value, exc: BadValue) -> None:
        if exc.message is not None:
            self.err(exc.pos or node.pos, f"option '{spec.name}' {exc.message}")
            return
        got = exc.got or node.describe()
        detail = exc.detail
        if detail is None and spec.type.shape == "array" and node.kind == "scalar":
            detail = "write an array as ( ... )"
        msg = f"option '{spec.name}' expects {spec.type.expected}, got {got}"
        if detail:
            msg += f" ({detail})"
        self.err(exc.pos or node.pos, msg)

    def stanza(self, st: Stanza, parent: Scope) -> None:
        lname = st.name.lower()
        spec = STANZAS.get(lname)
        if spec is None:
            if lname in OPTIONS:
                self.err(st.pos, f"'{st.name}' is an option, not a stanza; "
                                 f"write {OPTIONS[lname].name} = value")
                return
            s = _suggest(lname, STANZAS)
            hint = f"; did you mean '{STANZAS[s].name}'?" if s else ""
            self.err(st.pos, f"unknown stanza '{st.name}'{hint}")
            return
        if not spec.supported:
            self.err(st.pos, f"stanza '{spec.name}' is not supported yet")
            return
        kind = spec.kinds.get(parent.kind)
        if kind is None:
            where = ", ".join("the top level" if k == "global" else k for k in spec.kinds)
            self.err(st.pos, f"stanza '{spec.name}' is not valid "
                             f"{scope_phrase(parent.kind).replace('at global scope', 'at the top level')}"
                             f"; it may appear in: {where}")
            # Still look inside for more problems, as if it were valid at global.
            kind = next(iter(spec.kinds.values()))
            self.block(st.body, Scope(kind, st.instance, None, spec.name, st.pos))
            return
        instance = st.instance
        if spec.instance == "required" and instance is None:
            self.err(st.pos, f"stanza '{spec.name}' needs a name, "
                             f"e.g. {spec.name} \"name\" {{ ... }}")
            self.block(st.body, Scope(kind, None, None, spec.name, st.pos))
            return
        if spec.instance == "none" and instance is not None:
            self.err(st.instance_pos, f"stanza '{spec.name}' does not take a name")
            instance = None
        handler = getattr(self, "make_" + kind)
        scope = handler(spec, st, parent, instance)
        if scope is None:  # bad name: validate the body anyway
            scope = Scope(kind, instance, None, spec.name, st.pos)
        self.block(st.body, scope)

    def _get(self, parent: Scope, kind: str, key: str | None, name: str | None, label: str,
             pos: Pos) -> Scope:
        sc = parent.children.get((kind, key))
        if sc is None:
            sc = Scope(kind, name, parent, label, pos)
            parent.children[(kind, key)] = sc
        return sc

    @staticmethod
    def _join(parent: Scope, label: str) -> str:
        return label if parent.kind == "global" else f"{parent.label} / {label}"

    # -- stanza kinds --------------------------------------------------------
    def _check_ident(self, st: Stanza, what: str, name: str, no_colon: bool) -> bool:
        if not name:
            self.err(st.instance_pos, f"{what} name must not be empty")
            return False
        if any(c.isspace() for c in name):
            self.err(st.instance_pos, f"{what} name {quote(name)} must not contain spaces")
            return False
        if no_colon and ":" in name:
            self.err(st.instance_pos, f"{what} name {quote(name)} must not contain colons")
            return False
        return True

    def make_binding_group(self, spec, st, parent, name):
        if not self._check_ident(st, "binding_group", name, no_colon=False):
            return None
        return self._get(parent, "binding_group", name, name, f'binding_group "{name}"', st.pos)

    def make_binding(self, spec, st, parent, name):
        if not self._check_ident(st, "binding", name, no_colon=True):
            return None
        if parent.kind == "binding_group":
            group = parent.name
            prev = self.group_of.get(name)
            if prev is not None and prev[0] != group:
                self.err(st.instance_pos, f"binding {quote(name)} is already declared in "
                                          f"binding_group {quote(prev[0])} (at {prev[1]}); "
                                          "a binding belongs to one group")
                return None
            if prev is None:
                self.group_of[name] = (group, st.instance_pos)
        else:
            self.top_bindings.add(name)
        return self._get(parent, "binding", name, name,
                         self._join(parent, f'binding "{name}"'), st.pos)

    def _make_domainish(self, kind, st, parent, name):
        try:
            key, rx = parse_domain_instance(name, kind.capitalize())
        except ValueError as exc:
            self.err(st.instance_pos, str(exc))
            return None
        existed = (kind, key) in parent.children
        sc = self._get(parent, kind, key, name, self._join(parent, f'{kind} {quote(name)}'),
                       st.pos)
        if rx is not None and not existed:
            sc.regex = rx
            parent.regexes.setdefault(kind, []).append(sc)
        return sc

    def make_domain(self, spec, st, parent, name):
        return self._make_domainish("domain", st, parent, name)

    def make_host(self, spec, st, parent, name):
        # A host may also be named by a bare IPv6 address (Host "2001:db8::25").
        try:
            addr = ipaddress.IPv6Address(name.strip())
        except ValueError:
            return self._make_domainish("host", st, parent, name)
        key = f"[ipv6:{addr.compressed}]"
        return self._get(parent, "host", key, name, self._join(parent, f'host {quote(name)}'),
                         st.pos)

    def make_esmtp_listener(self, spec, st, parent, name):
        return self._get(parent, "esmtp_listener", None, None, "esmtp_listener", st.pos)

    def make_control_listener(self, spec, st, parent, name):
        return self._get(parent, "control_listener", None, None, "control_listener", st.pos)

    def _make_listen(self, kind, st, parent, name):
        try:
            addr = parse_listen_address(name)
        except ValueError as exc:
            self.err(st.instance_pos, str(exc))
            return None
        for other in parent.iter_children(kind):
            if other.name != name and other.listen == addr:
                self.err(st.instance_pos, f"Listen {quote(name)} is the same socket as "
                                          f"Listen {quote(other.name)} (at {other.pos})")
                return None
        sc = self._get(parent, kind, name, name, self._join(parent, f'listen {quote(name)}'),
                       st.pos)
        sc.listen = addr
        return sc

    def make_listen(self, spec, st, parent, name):
        return self._make_listen("listen", st, parent, name)

    def make_control_listen(self, spec, st, parent, name):
        return self._make_listen("control_listen", st, parent, name)

    def make_http_listener(self, spec, st, parent, name):
        return self._get(parent, "http_listener", None, None, "http_listener", st.pos)

    def make_http_listen(self, spec, st, parent, name):
        return self._make_listen("http_listen", st, parent, name)

    def make_peer(self, spec, st, parent, name):
        try:
            net = parse_peer(name)
        except ValueError as exc:
            self.err(st.instance_pos, str(exc))
            return None
        sc = self._get(parent, "peer", str(net), name, self._join(parent, f'peer {quote(name)}'),
                       st.pos)
        sc.network = net
        return sc

    def _make_logger(self, kind, st, parent, name):
        name = name if name is not None else kind
        prev = self.logger_names.get(kind)
        if prev is not None and prev[0] != name:
            self.err(st.instance_pos or st.pos,
                     f"only one {kind} instance is supported yet "
                     f"(already have {quote(prev[0])} at {prev[1]})")
            return None
        if prev is None:
            self.logger_names[kind] = (name, st.pos)
        return self._get(parent, kind, name, name, f'{kind} {quote(name)}', st.pos)

    def make_ec_logger(self, spec, st, parent, name):
        return self._make_logger("ec_logger", st, parent, name)

    def make_bounce_logger(self, spec, st, parent, name):
        return self._make_logger("bounce_logger", st, parent, name)

    # -- cross-checks --------------------------------------------------------
    def cross_checks(self) -> None:
        vals = self.root.values
        lo, hi = vals.get("min_dns_ttl"), vals.get("max_dns_ttl")
        lo_v = lo.value if lo else OPTIONS["min_dns_ttl"].default
        hi_v = hi.value if hi else OPTIONS["max_dns_ttl"].default
        if lo_v > hi_v:
            where = (lo or hi).pos
            self.err(where, f"Min_DNS_TTL ({lo_v}) must not be greater than "
                            f"Max_DNS_TTL ({hi_v})")
        rc = vals.get("resolv_conf")
        if rc is not None:
            path = rc.value
            problem = None
            if os.path.isdir(path):
                problem = "is a directory"
            else:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    problem = exc.strerror or str(exc)
                except ValueError as exc:
                    problem = str(exc)
            if problem:
                self.err(rc.node.pos, f"option 'Resolv_Conf' names a file that cannot be "
                                      f"read: {path}: {problem}")
        pm = vals.get("policy_module")
        if pm is not None:
            problem = policy_module_problem(pm.value)
            if problem:
                self.err(pm.node.pos, f"option 'Policy_Module' {problem}")
        self.control_checks()
        self.tls_checks()

    def tls_checks(self) -> None:
        """Outbound TLS files are loaded with ``ssl`` now, so a missing or
        corrupt certificate, key or CA bundle stops the start (and
        ``check-config``) instead of failing deliveries later.  A
        certificate is paired with the ``TLS_Key`` of its own stanza or the
        nearest enclosing one (or its own file when there is none)."""
        def walk(sc: Scope):
            yield sc
            for child in sc.children.values():
                yield from walk(child)
            for regexes in sc.regexes.values():
                for child in regexes:
                    yield from walk(child)

        def inherited(sc: Scope, lname: str):
            p = sc.parent
            while p is not None:
                s = p.values.get(lname)
                if s is not None:
                    return s.value
                p = p.parent
            return None

        checked: dict[tuple, str | None] = {}
        for sc in walk(self.root):
            ca = sc.values.get("tls_ca")
            if ca is not None:
                key = ("ca", ca.value)
                if key not in checked:
                    checked[key] = V.tls_ca_problem(ca.value)
                if checked[key]:
                    self.err(ca.node.pos, f"option 'TLS_CA' {checked[key]}")
            cert = sc.values.get("tls_certificate")
            tkey = sc.values.get("tls_key")
            key_value = tkey.value if tkey is not None else inherited(sc, "tls_key")
            key_value = None if key_value == "none" else key_value
            if cert is not None and cert.value != "none":
                key = ("cert", cert.value, key_value)
                if key not in checked:
                    checked[key] = V.tls_cert_problem(cert.value, key_value)
                if checked[key]:
                    self.err(cert.node.pos, f"option 'TLS_Certificate' {checked[key]}")
            elif tkey is not None and tkey.value != "none":
                cert_value = cert.value if cert is not None else inherited(sc, "tls_certificate")
                if cert_value in (None, "none"):
                    key = ("key", tkey.value)
                    if key not in checked:
                        checked[key] = V.tls_key_problem(tkey.value)
                else:
                    key = ("cert", cert_value, tkey.value)
                    if key not in checked:
                        checked[key] = V.tls_cert_problem(cert_value, tkey.value)
                if checked[key]:
                    self.err(tkey.node.pos, f"option 'TLS_Key' {checked[key]}")


    def control_checks(self) -> None:
        """A TCP control socket must authenticate (issue 7), and
        authentication needs a readable ``Control_Password_File``."""
        cl = self.root.child("control_listener", None)
        if cl is None:
            return
        for sc in cl.iter_children("control_listen"):
            def setting(lname):
                return sc.values.get(lname) or cl.values.get(lname)
            auth = setting("enable_authentication")
            pwfile = setting("control_password_file")
            if sc.listen is not None and sc.listen.path is None and not (auth and auth.value):
                self.err(sc.pos, f"control Listen {quote(sc.name)} is a TCP socket: it needs "
                                 "Enable_Authentication = true and a Control_Password_File")
            elif auth and auth.value and pwfile is None:
                self.err(auth.pos, f"option 'Enable_Authentication' needs "
                                   f"Control_Password_File (control Listen {quote(sc.name)})")
            elif auth and auth.value and pwfile is not None:
                try:
                    with open(pwfile.value, "rb"):
                        pass
                except OSError as exc:
                    self.err(pwfile.node.pos, "option 'Control_Password_File' names a file "
                                              f"that cannot be read: {pwfile.value}: "
                                              f"{exc.strerror or exc}")


_BAD = object()


def _defines(body: list, name: str) -> bool:
    """Whether top-level statements (looking into if/try/with blocks) bind
    ``name``: a def, an assignment, an import, or a ``*`` import."""
    import ast
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id == name:
                        return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                if alias.name == "*" or bound == name:
                    return True
        elif isinstance(node, ast.If):
            if _defines(node.body, name) or _defines(node.orelse, name):
                return True
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            blocks = [node.body, node.orelse, node.finalbody] + [h.body for h in node.handlers]
            if any(_defines(b, name) for b in blocks):
                return True
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            if _defines(node.body, name):
                return True
    return False


def policy_module_problem(path: str) -> str | None:
    """Why ``Policy_Module`` cannot be used (None if it can): the file must
    be a readable regular file holding valid Python that defines
    ``set_binding``.  The file is parsed, never run."""
    import ast
    if os.path.isdir(path):
        return f"names a file that cannot be read: {path}: is a directory"
    try:
        with open(path, "rb") as fh:
            data = fh.read(16 * 1024 * 1024)
    except OSError as exc:
        return f"names a file that cannot be read: {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return f"names a file that cannot be read: {path}: {exc}"
    try:
        tree = ast.parse(data, filename=path)
    except SyntaxError as exc:
        where = f" at line {exc.lineno}" if exc.lineno else ""
        return f"file {path} is not valid Python{where}: {exc.msg}"
    except (ValueError, RecursionError, MemoryError) as exc:
        return f"file {path} is not valid Python: {exc}"
    if not _defines(tree.body, "set_binding"):
        return f"file {path} does not define set_binding(message)"
    return None


# ---------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class LoggerConfig:
    """Settings of the ``ec_logger`` and ``bounce_logger`` modules.

    Paths are None when the module stanza is absent; when the stanza is
    present, unset options take their documented defaults.
    """

    mainlog: str | None = None
    rejectlog: str | None = None
    paniclog: str | None = None
    acctlog: str | None = None
    bouncelog: str | None = None
    mainlog_mode: int = 0o644
    rejectlog_mode: int = 0o644
    paniclog_mode: int = 0o644
    acctlog_mode: int = 0o644
    bouncelog_mode: int = 0o644
    heartbeat: int = 60
    bounce_heartbeat: int = 60
    log_receptions: bool = True
    log_deliveries: bool = True
    log_transient_failures: bool = True
    log_permanent_failures: bool = True
    log_rejections: bool = True
    log_errors: bool = True
    log_inband_bounces: bool = True
    log_outofband_bounces: bool = True
    bounce_log_transient_failures: bool = True
    log_hires_timestamp: bool = False
    ec_logger: str | None = None        # instance name, None when not configured
    bounce_logger: str | None = None


def _resolved(scope: Scope, lname: str) -> Resolved | None:
    s = scope.values.get(lname)
    if s is None:
        return None
    return Resolved(s.value, scope.label, s.pos.file, s.pos.line)


def _default(spec: OptionSpec) -> Resolved:
    v = spec.default
    if isinstance(v, (list, dict)):
        v = copy.copy(v)
    return Resolved(v, "default", None, None)


class ListenerConfig:
    """One enabled ``Listen`` stanza.

    ``lookup(name, peer=None)`` falls back ``Peer -> Listen -> listener ->
    global -> default``; with ``peer`` (an IP address) the most specific
    matching ``Peer`` of this ``Listen`` is used, else the most specific one
    of the listener.
    """

    def __init__(self, scope: Scope, listener: Scope, root: Scope, allowed: frozenset[str]):
        self.scope = scope
        self.listener_scope = listener
        self._root = root
        self._allowed = allowed
        self.address: str = scope.name
        addr = scope.listen
        self.host: str | None = addr.host
        self.port: int | None = addr.port
        self.path: str | None = addr.path
        self.family: int = addr.family
        self._cache: dict[str, Resolved] = {}
        self._peers = sorted(scope.iter_children("peer"), key=lambda s: -s.network.prefixlen)
        self._listener_peers = sorted(listener.iter_children("peer"),
                                      key=lambda s: -s.network.prefixlen)
        # (name, client address text) -> Resolved: clients repeat, and the
        # listener asks the same few options for every session.
        self._peer_cache: dict[tuple[str, str], Resolved] = {}

    def __repr__(self) -> str:
        return f"<ListenerConfig {self.address!r}>"

    def peer_scope(self, peer) -> Scope | None:
        try:
            ip = ipaddress.ip_address(peer) if not isinstance(
                peer, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else peer
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for group in (self._peers, self._listener_peers):
            for sc in group:
                if ip.version == sc.network.version and ip in sc.network:
                    return sc
        return None

    def explain(self, name: str, *, peer=None) -> Resolved:
        if peer is None:
            r = self._cache.get(name)
            if r is not None:
                return r
        elif isinstance(peer, str):
            r = self._peer_cache.get((name, peer))
            if r is not None:
                return r
        spec = OPTIONS.get(name.lower())
        if spec is None:
            raise KeyError(f"unknown option {name!r}")
        if not (set(spec.scopes) & self._allowed):
            raise KeyError(f"option {spec.name!r} is not valid in a listener "
                           f"(valid scopes: {spec.scope_list()})")
        chain = [self.scope, self.listener_scope, self._root]
        if peer is not None:
            ps = self.peer_scope(peer)
            if ps is not None:
                chain.insert(0, ps)
        for sc in chain:
            r = _resolved(sc, spec.lname)
            if r is not None:
                break
        else:
            r = _default(spec)
        if peer is None:
            self._cache[name] = r
        elif isinstance(peer, str):
            if len(self._peer_cache) > 20000:
                self._peer_cache.clear()
            self._peer_cache[(name, peer)] = r
        return r

    def lookup(self, name: str, *, peer=None) -> Any:
        return self.explain(name, peer=peer).value


class Config:
    """A loaded, validated configuration.  Treat returned values as read-only."""

    def __init__(self, root: Scope, statements: list[Statement], source_files: list[str],
                 readonly_files: set[str], group_of: dict[str, str]):
        self.root = root
        #: the parsed syntax tree (includes spliced in), for ``config show``
        self.tree = statements
        self.source_files = list(source_files)
        self.readonly_files = set(readonly_files)
        self._group_of = dict(group_of)
        self._values: dict[tuple, Resolved] = {}
        self._chains: dict[tuple, tuple[Scope, ...]] = {}
        self._host_values: dict[tuple, tuple[Resolved | None, str | None]] = {}
        self._host_chains: dict[tuple, tuple[Scope, ...]] = {}
        # bindings and groups
        bindings: dict[str, str] = {"default": self._group_of.get("default", "default")}
        for sc in root.iter_children("binding"):
            bindings.setdefault(sc.name, self._group_of.get(sc.name, "default"))
        for g in root.iter_children("binding_group"):
            for b in g.iter_children("binding"):
                bindings[b.name] = g.name
        #: binding name -> group name (``default`` included)
        self.bindings: dict[str, str] = bindings
        # Members in declaration order (D2 round-robin): a group's bindings
        # in the order they are declared inside it; the default group holds
        # the ``default`` binding first, then the ungrouped top-level
        # bindings in file order.
        groups: dict[str, list[str]] = {"default": []}
        if bindings["default"] == "default":
            groups["default"].append("default")
        for sc in root.iter_children("binding"):
            if bindings[sc.name] == "default" and sc.name != "default":
                groups["default"].append(sc.name)
        for g in root.iter_children("binding_group"):
            members = groups.setdefault(g.name, [])
            for b in g.iter_children("binding"):
                if b.name not in members:
                    members.append(b.name)
        #: group name -> member bindings in declaration order (``default`` included)
        self.groups: dict[str, list[str]] = groups
        self.listeners = self._listeners("esmtp_listener", "listen", LISTENER_SCOPES)
        self.control_listeners = self._listeners(
            "control_listener", "control_listen",
            frozenset({"control_listener", "control_listen"}))
        self.http_listeners = self._listeners(
            "http_listener", "http_listen", frozenset({"http_listener", "http_listen"}))
        self.loggers = self._loggers()

    # -- bindings --------------------------------------------------------------
    def group_of(self, binding: str) -> str:
        """The binding group of ``binding`` (``default`` if it is in none)."""
        return self._group_of.get(binding, "default")

    def is_binding(self, name: str) -> bool:
        """True for a declared binding or the implicit ``default`` binding
        (names are case-sensitive)."""
        return name in self.bindings

    def is_group(self, name: str) -> bool:
        """True for a declared binding group or the implicit ``default`` group."""
        return name in self.groups

    def group_members(self, group: str) -> list[str]:
        """Bindings of ``group`` in declaration order (a new list; empty for
        an unknown or empty group).  The ``default`` group holds the
        ``default`` binding and every binding declared outside a group."""
        return list(self.groups.get(group, ()))

    # -- shared buckets (spec §2.3, §6.2, §6.3) ------------------------------------
    def throttle_bucket(self, name: str, *, domain: str | None = None,
                        binding: str = "default") -> tuple[str, tuple[int, int]] | None:
        """The token bucket a throttle option draws from for (binding, domain):
        ``(identity, (n, s))``, or None when unlimited (unset or ``N = 0``).

        ``name`` is ``Outbound_Throttle_Messages``, ``Outbound_Throttle_Connections``
        or their ``Cluster_`` variants.  Throttles are shared by reference:
        the identity names the option and the stanza that sets it, e.g.
        ``'outbound_throttle_messages@binding_group "g"'`` or
        ``'outbound_throttle_connections@global'``, so every lookup that falls
        back to the same stanza gets the same bucket (a group value is one
        bucket for all its bindings and domains, a regex ``Domain`` stanza one
        for every domain it matches, a global value one for the system).
        Identities derive from the configuration only (stable across nodes
        and restarts for the same file)."""
        spec = self._bucket_spec(name, THROTTLE_OPTIONS)
        r = self.explain(spec.name, domain=domain, binding=binding)
        if r.value is None or r.value[0] <= 0:
            return None
        return f"{spec.lname}@{r.scope}", r.value

    def host_throttle_bucket(self, name: str, host: str, *,
                             binding: str = "default") -> tuple[str, tuple[int, int]] | None:
        """Like :meth:`throttle_bucket` for the ``Host`` stanza chain (spec
        §6.4; D18: no fallback to the domain/binding/global chain): None
        when no Host stanza matching ``host`` sets the throttle.  A regex
        Host stanza is one bucket for every host it matches.  (Throttles are
        not accepted in Host stanzas yet, so this is None for now.)"""
        spec = self._bucket_spec(name, THROTTLE_OPTIONS)
        r, key = self._host_resolve(spec.name, host, binding)
        if r is None or r.value is None or r.value[0] <= 0:
            return None
        return f"{spec.lname}@{key}", r.value

    def scope_bucket(self, name: str, *, domain: str | None = None,
                     binding: str = "default") -> tuple[str, int] | None:
        """The shared connection cap for (binding, domain): ``(identity, cap)``
        or None when there is no cap (unset or 0).

        ``name`` is ``Scope_Max_Outbound_Connections`` or
        ``Server_Max_Outbound_Connections``.  The identity names the option
        and the stanza that sets it, as for :meth:`throttle_bucket`; everything
        that falls back to that stanza shares one count (spec §6.2): global =
        all connections; ``domain "d"`` = d over all bindings;
        ``binding_group "g" / domain "d"`` = d over g's bindings;
        ``binding "b" / domain "d"`` = d on b; ``binding "b"`` = everything
        through b; ``binding_group "g"`` = everything through g's bindings;
        a regex domain = all matching domains together.  The built-in
        default of ``Server_Max_Outbound_Connections`` (20000) is the global
        bucket."""
        spec = self._bucket_spec(name, SCOPE_CAP_OPTIONS)
        r = self.explain(spec.name, domain=domain, binding=binding)
        if r.value is None or r.value <= 0:
            return None
        scope = "global" if r.scope == "default" else r.scope
        return f"{spec.lname}@{scope}", r.value

    @staticmethod
    def _bucket_spec(name: str, allowed: frozenset[str]) -> OptionSpec:
        spec = OPTIONS.get(name.lower()) if isinstance(name, str) else None
        if spec is None or spec.lname not in allowed:
            names = ", ".join(sorted(OPTIONS[n].name for n in allowed))
            raise KeyError(f"{name!r} is not a shared-bucket option (expected one of {names})")
        return spec

    # -- outbound lookup -------------------------------------------------------
    def lookup(self, name: str, *, domain: str | None = None, binding: str = "default") -> Any:
        """Typed value of option ``name`` for (binding, domain) per decision D1."""
        r = self._values.get((name, domain, binding))
        if r is None:
            r = self.explain(name, domain=domain, binding=binding)
        return r.value

    def explain(self, name: str, *, domain: str | None = None,
                binding: str = "default") -> Resolved:
        """Like :meth:`lookup` but says where the value came from."""
        key = (name, domain, binding)
        r = self._values.get(key)
        if r is not None:
            return r
        spec = OPTIONS.get(name.lower()) if isinstance(name, str) else None
        if spec is None:
            raise KeyError(f"unknown option {name!r}")
        if not (set(spec.scopes) & OUTBOUND_SCOPES):
            raise KeyError(f"option {spec.name!r} cannot be looked up for a binding/domain "
                           f"(valid scopes: {spec.scope_list()})")
        lname = spec.lname
        for sc in self._chain(domain, binding):
            s = sc.values.get(lname)
            if s is not None:
                r = Resolved(s.value, sc.label, s.pos.file, s.pos.line)
                break
        else:
            r = _default(spec)
        if len(self._values) >= CACHE_LIMIT:
            self._values.clear()
        self._values[key] = r
        return r

    def chain(self, *, domain: str | None = None, binding: str = "default") -> list[str]:
        """Labels of the scopes consulted, most specific first (for debugging)."""
        return [sc.label for sc in self._chain(domain, binding)] + ["default"]

    def _chain(self, domain: str | None, binding: str) -> tuple[Scope, ...]:
        key = (domain, binding)
        c = self._chains.get(key)
        if c is None:
            c = self._build_chain(domain, binding)
            if len(self._chains) >= CACHE_LIMIT:
                self._chains.clear()
            self._chains[key] = c
        return c

    def _build_chain(self, domain: str | None, binding: str) -> tuple[Scope, ...]:
        root = self.root
        group = root.child("binding_group", self.group_of(binding))
        gb = group.child("binding", binding) if group is not None else None
        b = root.child("binding", binding)
        d = normalize_domain(domain) if domain else None
        out: list[Scope] = []

        def domains(container: Scope | None) -> None:
            if container is None or d is None:
                return
            exact = container.child("domain", d)
            if exact is not None:
                out.append(exact)
            for sc in container.regexes.get("domain", ()):
                if sc.regex.search(d):
                    out.append(sc)

        domains(gb)       # G::B::D
        domains(b)        # B::D
        domains(group)    # G::D
        if gb is not None:
            out.append(gb)    # B (in its group)
        if b is not None:
            out.append(b)     # B (top level)
        if group is not None:
            out.append(group)  # G
        domains(root)     # D
        out.append(root)  # global
        return tuple(out)

    # -- host stanzas (D18, spec §2.3/§2.4) ----------------------------------------
    def host_lookup(self, name: str, host: str, *, binding: str = "default") -> Any:
        """Value of option ``name`` from the ``Host`` stanzas matching ``host``
        (an MX host name or an IP address) for ``binding``, or None when no
        Host stanza matches.

        Only Host stanzas count, along
        ``binding_group::binding::host > binding_group::host > binding::host > host``;
        in each container the exact-name stanza comes before the matching
        ``/regex/`` stanzas (file order), and the first stanza that sets the
        option wins.  When stanzas match but none sets it, the value is the
        host-scope default (``Max_Outbound_Connections``: -1, unlimited);
        there is never a fallback to the domain/binding/global chain.
        """
        r = self.host_explain(name, host, binding=binding)
        return None if r is None else r.value

    def host_explain(self, name: str, host: str, *,
                     binding: str = "default") -> Resolved | None:
        """Like :meth:`host_lookup` but says where the value came from."""
        return self._host_resolve(name, host, binding)[0]

    def host_stanza_key(self, host: str, binding: str = "default", *,
                        name: str | None = None) -> str | None:
        """Stable identity (the scope label, e.g. ``'binding "b" / host "/^mx/"'``)
        of the Host stanza that applies to ``host`` for ``binding``, or None
        if no Host stanza matches.  Every host matched by one regex stanza
        gets the same key (one shared bucket).  Without ``name`` it is the
        most specific matching stanza; with ``name``, the stanza that sets
        that option (the most specific matching one if none sets it)."""
        if name is None:
            chain = self._host_chain(host, binding)
            return chain[0].label if chain else None
        return self._host_resolve(name, host, binding)[1]

    def host_chain(self, host: str, *, binding: str = "default") -> list[str]:
        """Labels of the Host stanzas matching ``host``, most specific first."""
        return [sc.label for sc in self._host_chain(host, binding)]

    def _host_resolve(self, name: str, host: str,
                      binding: str) -> tuple[Resolved | None, str | None]:
        key = (name, host, binding)
        hit = self._host_values.get(key)
        if hit is not None:
            return hit
        spec = OPTIONS.get(name.lower()) if isinstance(name, str) else None
        if spec is None:
            raise KeyError(f"unknown option {name!r}")
        if "host" not in spec.scopes:
            raise KeyError(f"option {spec.name!r} is not valid in a host stanza "
                           f"(valid scopes: {spec.scope_list()})")
        chain = self._host_chain(host, binding)
        if not chain:
            hit = (None, None)
        else:
            for sc in chain:
                s = sc.values.get(spec.lname)
                if s is not None:
                    hit = (Resolved(s.value, sc.label, s.pos.file, s.pos.line), sc.label)
                    break
            else:
                first = chain[0]
                v = HOST_DEFAULTS.get(spec.lname, spec.default)
                if isinstance(v, (list, dict)):
                    v = copy.copy(v)
                hit = (Resolved(v, f"{first.label} (not set there: host default)",
                                first.pos.file if first.pos else None,
                                first.pos.line if first.pos else None), first.label)
        if len(self._host_values) >= CACHE_LIMIT:
            self._host_values.clear()
        self._host_values[key] = hit
        return hit

    def _host_chain(self, host: str, binding: str) -> tuple[Scope, ...]:
        ckey = (host, binding)
        c = self._host_chains.get(ckey)
        if c is not None:
            return c
        hkey, subject = host_match_key(host)
        root = self.root
        group = root.child("binding_group", self.group_of(binding))
        gb = group.child("binding", binding) if group is not None else None
        b = root.child("binding", binding)
        out: list[Scope] = []
        for container in (gb, group, b, root):
            if container is None:
                continue
            exact = container.child("host", hkey)
            if exact is not None:
                out.append(exact)
            for sc in container.regexes.get("host", ()):
                if sc.regex.search(subject):
                    out.append(sc)
        c = tuple(out)
        if len(self._host_chains) >= CACHE_LIMIT:
            self._host_chains.clear()
        self._host_chains[ckey] = c
        return c

    def global_value(self, name: str) -> Any:
        """Value of a global option (global scope, else default)."""
        spec = OPTIONS.get(name.lower())
        if spec is None or "global" not in spec.scopes:
            raise KeyError(name)
        r = _resolved(self.root, spec.lname)
        return (r or _default(spec)).value

    # -- listeners and loggers ---------------------------------------------------
    def _listeners(self, lkind: str, kind: str, allowed: frozenset[str]) -> list[ListenerConfig]:
        out = []
        listener = self.root.child(lkind, None)
        if listener is None:
            return out
        enable = listener.get("enable", True)
        if not enable:
            return out
        for sc in listener.iter_children(kind):
            if sc.get("enable", True):
                out.append(ListenerConfig(sc, listener, self.root, allowed))
        return out

    def _loggers(self) -> LoggerConfig:
        kw: dict[str, Any] = {"log_hires_timestamp": self.global_value("log_hires_timestamp")}
        ec = next(self.root.iter_children("ec_logger"), None)
        if ec is not None:
            kw["ec_logger"] = ec.name
            for opt in ("mainlog", "rejectlog", "paniclog", "acctlog", "mainlog_mode",
                        "rejectlog_mode", "paniclog_mode", "acctlog_mode", "heartbeat",
                        "log_receptions", "log_deliveries", "log_transient_failures",
                        "log_permanent_failures", "log_rejections", "log_errors"):
                kw[opt] = ec.get(opt, OPTIONS[opt].default)
        bl = next(self.root.iter_children("bounce_logger"), None)
        if bl is not None:
            kw["bounce_logger"] = bl.name
            for opt in ("bouncelog", "bouncelog_mode", "log_inband_bounces",
                        "log_outofband_bounces"):
                kw[opt] = bl.get(opt, OPTIONS[opt].default)
            kw["bounce_heartbeat"] = bl.get("heartbeat", OPTIONS["heartbeat"].default)
            kw["bounce_log_transient_failures"] = bl.get(
                "log_transient_failures", OPTIONS["log_transient_failures"].default)
        return LoggerConfig(**kw)

    # -- introspection -------------------------------------------------------------
    def scopes(self) -> Iterator[Scope]:
        """Every scope, depth first (global first)."""
        stack = [self.root]
        while stack:
            sc = stack.pop()
            yield sc
            stack.extend(reversed(list(sc.children.values())))


def build_config(statements: list[Statement], source_files: list[str],
                 readonly_files: set[str], issues: Issues) -> Config | None:
    b = _Builder(issues)
    b.block(statements, b.root)
    b.cross_checks()
    if issues:
        return None
    group_of = {name: g for name, (g, _) in b.group_of.items()}
    return Config(b.root, statements, source_files, readonly_files, group_of)
