"""Typed option values (spec §1.4).

Each value type turns a syntax-tree :class:`~impetus.config.parser.Value`
into a Python value or raises :class:`BadValue`.  The option name and the
"got ..." part of the message are added by the caller, giving messages such
as ``option 'Retry_Interval' expects a non-negative integer (seconds), got
"soon"``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import Pos
from .parser import Value

BOOL_TRUE = frozenset({"true", "on", "enabled", "1"})
BOOL_FALSE = frozenset({"false", "off", "disabled", "0"})

_INT = re.compile(r"[+-]?[0-9]+\Z")
_OCTAL = re.compile(r"0[0-7]*\Z")
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_DOMAIN_PATTERN = re.compile(r"\*?[a-z0-9_.-]*\Z")


class BadValue(Exception):
    """A value did not fit its type.

    ``got`` overrides what is shown after "got" (default: the value as
    written), ``detail`` is appended in parentheses, ``pos`` points at the
    offending array element when there is one.

    ``message``, when given, replaces the whole "expects ..., got ..."
    phrase: the error then reads ``option 'Name' <message>``.
    """

    def __init__(self, got: str | None = None, detail: str | None = None,
                 pos: Pos | None = None, message: str | None = None):
        super().__init__(message or detail or got or "bad value")
        self.got = got
        self.detail = detail
        self.pos = pos
        self.message = message


class BadValues(BadValue):
    """Several independent problems in one value (e.g. several bad array
    items); each is reported as its own issue."""

    def __init__(self, problems: list[BadValue]):
        super().__init__(message=problems[0].message, pos=problems[0].pos)
        self.problems = problems


class ValueType:
    #: short name for the options table
    name = "string"
    #: phrase used after "expects"
    expected = "a string"
    #: "scalar", "array" or "hash"
    shape = "scalar"

    def convert(self, node: Value, base_dir: str) -> Any:
        if node.kind != self.shape:
            raise BadValue()
        return self.convert_scalar(node.text, node) if self.shape == "scalar" else node.to_python()

    def convert_scalar(self, text: str, node: Value) -> Any:
        return text

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        return str(value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Str(ValueType):
    name = "string"
    expected = "a string"


class Path(ValueType):
    """A file or directory path.  Relative paths are taken relative to the
    directory of the config file that sets them."""

    name = "path"
    expected = "a path"

    def convert(self, node: Value, base_dir: str) -> Any:
        if node.kind != "scalar":
            raise BadValue()
        if not node.text:
            raise BadValue(detail="the path is empty")
        if "\x00" in node.text:
            raise BadValue(detail="the path contains a NUL byte")
        path = node.text
        if not os.path.isabs(path) and base_dir:
            path = os.path.normpath(os.path.join(base_dir, path))
        return path


class Int(ValueType):
    def __init__(self, minimum: int | None = 0, maximum: int | None = None,
                 unit: str | None = None):
        self.minimum = minimum
        self.maximum = maximum
        self.unit = unit
        if minimum == 0 and maximum is None:
            phrase = "a non-negative integer"
        elif minimum is not None and maximum is not None:
            phrase = f"an integer {minimum}-{maximum}"
        elif minimum is not None:
            phrase = f"an integer >= {minimum}"
        else:
            phrase = "an integer"
        if unit:
            phrase += f" ({unit})"
        self.expected = phrase
        self.name = "duration" if unit == "seconds" else "int"
        if unit and unit != "seconds":
            self.name = f"int ({unit})"

    def convert_scalar(self, text: str, node: Value) -> int:
        t = text.strip()
        if not _INT.match(t):
            raise BadValue()
        v = int(t, 10)
        if self.minimum is not None and v < self.minimum:
            raise BadValue()
        if self.maximum is not None and v > self.maximum:
            raise BadValue()
        if abs(v) > 2**63:
            raise BadValue(detail="too large")
        return v


class Port(Int):
    def __init__(self) -> None:
        super().__init__(1, 65535)
        self.name = "port"
        self.expected = "a port number (1-65535)"


class Mode(ValueType):
    """A file mode: octal with a leading 0 (``0644``), decimal otherwise."""

    name = "mode"
    expected = "a file mode (octal with a leading 0, e.g. 0644)"

    def convert_scalar(self, text: str, node: Value) -> int:
        t = text.strip()
        if _OCTAL.match(t):
            v = int(t, 8)
        elif _INT.match(t) and not t.startswith(("-", "+", "0")):
            v = int(t, 10)
        else:
            raise BadValue()
        if v > 0o7777:
            raise BadValue()
        return v

    def format(self, value: Any) -> str:
        return "-" if value is None else f"0{value:o}"


class Bool(ValueType):
    name = "bool"
    expected = "a boolean (true/false, on/off, enabled/disabled, 1/0)"

    def convert_scalar(self, text: str, node: Value) -> bool:
        t = text.strip().lower()
        if t in BOOL_TRUE:
            return True
        if t in BOOL_FALSE:
            return False
        raise BadValue()

    def format(self, value: Any) -> str:
        return "-" if value is None else ("true" if value else "false")


class Enum(ValueType):
    def __init__(self, *choices: str):
        self.choices = tuple(c.lower() for c in choices)
        self.name = "enum(" + "|".join(self.choices) + ")"
        self.expected = "one of " + ", ".join(self.choices)

    def convert_scalar(self, text: str, node: Value) -> str:
        t = text.strip().lower()
        if t not in self.choices:
            raise BadValue()
        return t


class Array(ValueType):
    name = "array"
    expected = "an array of strings, e.g. ( \"a\" \"b\" )"
    shape = "array"

    def convert(self, node: Value, base_dir: str) -> list[str]:
        if node.kind != "array":
            raise BadValue()
        return [v.text for v in node.items]

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        return "( " + " ".join(f'"{v}"' for v in value) + " )" if value else "()"


class Hash(ValueType):
    name = "hash"
    expected = "a hash, e.g. [ key = \"value\" ]"
    shape = "hash"

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        return "[ " + " ".join(f'{k} = "{v}"' for k, v in value.items()) + " ]" if value else "[]"


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP address or CIDR block, v4 or v6 (bare or bracketed IPv6)."""
    t = text.strip()
    if t.startswith("[") and "]" in t:
        inner, _, rest = t[1:].partition("]")
        t = inner + rest
    if t.lower().startswith("ipv6:"):
        t = t[5:]
    if "/" in t:
        addr, _, plen = t.partition("/")
        if not plen.isdigit():
            raise ValueError(t)
        ipaddress.ip_address(addr)  # host names fail here
        return ipaddress.ip_network(f"{addr}/{int(plen)}", strict=False)
    return ipaddress.ip_network(ipaddress.ip_address(t))


def looks_like_hostname(text: str) -> bool:
    t = text.strip().lower().rstrip(".")
    if not t or not any(c.isalpha() for c in t):
        return False
    return all(_DNS_LABEL.match(lab) for lab in t.split("."))


class AddrList(ValueType):
    name = "address list"
    expected = "an array of IP addresses or CIDR blocks"
    shape = "array"

    def convert(self, node: Value, base_dir: str) -> list:
        if node.kind != "array":
            raise BadValue()
        out = []
        for item in node.items:
            try:
                out.append(parse_network(item.text))
            except ValueError:
                detail = "host names are not allowed" if looks_like_hostname(item.text) else None
                raise BadValue(got=_q(item.text), detail=detail, pos=item.pos) from None
        return out

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        return "( " + " ".join(f'"{v}"' for v in value) + " )" if value else "()"


class DomainList(Array):
    """Relay_Domains-style list: exact domains or left-globbed ``*.example.com``."""

    name = "domain list"
    expected = "an array of domain names or '*.domain' patterns"

    def convert(self, node: Value, base_dir: str) -> list[str]:
        if node.kind != "array":
            raise BadValue()
        out = []
        for item in node.items:
            t = item.text.strip().lower().rstrip(".")
            if not t or not _DOMAIN_PATTERN.match(t):
                raise BadValue(got=_q(item.text), pos=item.pos)
            out.append(t)
        return out


class Rate(ValueType):
    """``"N"`` (per second) or ``"N/S"`` (per S seconds, S > 0) -> ``(N, S)``.

    ``N == 0`` means unlimited (spec §6.1); it is kept as ``(0, S)`` so that
    a narrower scope can switch off a broader throttle."""

    name = "rate"
    expected = 'a rate "N" or "N/S" (N >= 0, S > 0)'

    def convert_scalar(self, text: str, node: Value) -> tuple[int, int]:
        t = text.strip()
        n, sep, s = t.partition("/")
        n, s = n.strip(), s.strip()
        if not n.isdigit() or not n.isascii() or len(n) > 18:
            raise BadValue()
        if sep:
            if not s.isdigit() or not s.isascii() or len(s) > 18:
                raise BadValue()
            if int(s) <= 0:
                raise BadValue(detail="the period S must be at least 1 second")
            return (int(n), int(s))
        return (int(n), 1)

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        n, s = value
        return f"{n}" if s == 1 else f"{n}/{s}"


class MaxRetries(ValueType):
    """``Max_Retries``: a non-negative integer, ``auto`` or ``none``."""

    name = "int|auto|none"
    expected = "a non-negative integer, \"auto\" or \"none\""

    def convert_scalar(self, text: str, node: Value) -> int | str:
        t = text.strip().lower()
        if t in ("auto", "none"):
            return t
        if _INT.match(t) and not t.startswith("-"):
            return int(t)
        raise BadValue()


def _q(text: str) -> str:
    from .lexer import quote
    return quote(text)


# Shared instances used by the option table.
class HostPort(ValueType):
    """A next hop (D8): ``host``, ``host:port``, ``a.b.c.d[:port]`` or
    ``[v6]`` / ``[v6]:port``. A bare IPv6 address is refused: it is
    ambiguous with a port. Converts to ``(host, port or None)``; IPv6 hosts
    are returned without brackets."""

    name = "host[:port]"
    expected = "a host name or address with an optional port (host, host:port, [v6]:port)"

    def convert_scalar(self, text: str, node: Value):
        t = text.strip()
        if not t:
            raise BadValue(detail="empty")
        port = None
        if t.startswith("["):
            end = t.find("]")
            if end < 0:
                raise BadValue(detail="missing ']' after the IPv6 address")
            host, rest = t[1:end], t[end + 1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise BadValue(detail=f"{host!r} is not an IPv6 address") from None
            if rest:
                if not rest.startswith(":"):
                    raise BadValue(detail="expected ':port' after ']'")
                port = rest[1:]
        elif t.count(":") > 1:
            raise BadValue(detail=f"an IPv6 address must be bracketed, e.g. \"[{t}]\" or "
                                  f"\"[{t}]:25\"")
        else:
            host, _, port = t.partition(":")
            port = port if ":" in t else None
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                if not looks_like_hostname(host):
                    raise BadValue(detail=f"{host!r} is not a host name or IPv4 address") from None
        if port is not None:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise BadValue(detail=f"port {port!r} is not 1-65535")
            port = int(port)
        return (host.lower().rstrip("."), port)

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        host, port = value
        h = f"[{host}]" if ":" in host else host
        return f"{h}:{port}" if port else h


class SomeEnum(Enum):
    """An enum where some documented values are not implemented yet: those
    give "value X is not supported yet" instead of being accepted (D19)."""

    def __init__(self, choices: tuple[str, ...], unsupported: tuple[str, ...]):
        super().__init__(*choices)
        self.unsupported = tuple(u.lower() for u in unsupported)

    def convert_scalar(self, text: str, node: Value) -> str:
        t = text.strip().lower()
        if t in self.unsupported:
            raise BadValue(message=f"value {_q(text)} is not supported yet "
                                   f"(supported: {', '.join(self.choices)})")
        return super().convert_scalar(text, node)


# ---------------------------------------------------------------------------
# Routes (spec §3.3, decisions D4-D6)

ROUTE_KINDS = ("mx", "host", "smtp", "lmtp")
ROUTE_PARAMS = ("pref", "ttl", "port", "type")
ROUTE_TYPES = ("mx", "a")
#: schemes of delivery methods we do not implement
UNSUPPORTED_ROUTE_SCHEMES = ("apn", "gcm", "mm7", "http", "https", "ecstream")
_ROUTE_INT_MAX = 4294967295
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")


@dataclass(frozen=True, slots=True)
class RouteItem:
    """One item of a ``Routes`` array.

    ``kind``: ``"mx"`` (``__mx__``: the domain's own MX set), ``"host"`` (a
    bare host name or IP literal), ``"smtp"`` or ``"lmtp"`` (a URI).
    ``host``: lower-case name or address (IPv6 without brackets, compressed);
    None for ``__mx__``.  ``port``: from ``:port`` or ``port=``, else None
    (``Remote_SMTP_Port``/``LMTP_Port`` apply).  ``pref``, ``ttl``, ``type``:
    only when given explicitly (``type`` is ``"mx"`` or ``"a"``).  ``text``:
    the item as written; ``pos``: its 0-based index in the array.
    """

    kind: str
    host: str | None
    port: int | None = None
    pref: int | None = None
    ttl: int | None = None
    type: str | None = None
    text: str = ""
    pos: int = 0

    @property
    def is_ip(self) -> bool:
        """True when ``host`` is an IP literal (used as is, D4)."""
        if self.host is None:
            return False
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


class _RouteError(Exception):
    pass


def _route_int(name: str, value: str, lo: int, hi: int, phrase: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise _RouteError(f"{name} must be {phrase}, got {_q(value)}")
    v = int(value)
    if not lo <= v <= hi:
        raise _RouteError(f"{name} must be {phrase}, got {_q(value)}")
    return v


def _route_port(value: str) -> int:
    return _route_int("port", value, 1, 65535, "an integer 1-65535")


def _route_host(text: str, scheme: str | None) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``a.b.c.d[:port]``, ``[v6][:port]`` ->
    (host, port text or None)."""
    if not text:
        raise _RouteError("the host is missing")
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _RouteError("missing ']' after the IPv6 address")
        inner, rest = text[1:end], text[end + 1:]
        try:
            host = ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise _RouteError(f"{_q(inner)} is not an IPv6 address") from None
        if rest:
            if not rest.startswith(":"):
                raise _RouteError("expected ':port' after ']'")
            port = rest[1:]
        return host, port
    if text.count(":") > 1:
        prefix = f"{scheme}://" if scheme else ""
        raise _RouteError(f"an IPv6 address must be bracketed, e.g. "
                          f"\"{prefix}[{text}]\"")
    host, sep, rest = text.partition(":")
    if sep:
        port = rest
    if not host:
        raise _RouteError("the host is missing")
    try:
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        pass
    h = host.lower().rstrip(".")
    if h == "__mx__":
        raise _RouteError('__mx__ takes no scheme, port or parameters; write "__mx__" alone')
    if len(h) > 253 or not looks_like_hostname(h):
        raise _RouteError(f"{_q(host)} is not a host name or IP address")
    return h, port


def parse_route(text: str, index: int) -> RouteItem:
    """One ``Routes`` item; raises :class:`_RouteError` with the reason."""
    t = text.strip()
    if not t:
        raise _RouteError("the route is empty")
    if t.lower() == "__mx__":
        return RouteItem("mx", None, text=text, pos=index)
    scheme, sep, rest = t.partition("://")
    if not sep:
        head, colon, tail = t.partition(":")
        if colon and tail.startswith("/") and _SCHEME.match(head):
            raise _RouteError(f"expected '{head}://host'")
        if "?" in t or "/" in t:
            raise _RouteError("parameters need a scheme, e.g. \"smtp://host?pref=10\"")
        host, port = _route_host(t, None)
        return RouteItem("host", host, _route_port(port) if port is not None else None,
                         text=text, pos=index)
    s = scheme.lower()
    if s in UNSUPPORTED_ROUTE_SCHEMES:
        raise _RouteError(f"the {s}:// scheme is not supported yet "
                          "(supported: smtp://, lmtp://, a host name or IP address, __mx__)")
    if s not in ("smtp", "lmtp"):
        raise _RouteError(f"unknown scheme {_q(scheme + '://')} (expected smtp://, lmtp://, "
                          "a host name or IP address, or __mx__)")
    if "#" in rest:
        raise _RouteError("a '#fragment' is not allowed")
    authority, qmark, query = rest.partition("?")
    authority, slash, path = authority.partition("/")
    if path:
        raise _RouteError(f"a path ('/{path}') is not allowed in an {s}:// route")
    if "@" in authority:
        raise _RouteError("'user@' is not allowed in a route")
    host, port_text = _route_host(authority, s)
    port = _route_port(port_text) if port_text is not None else None
    params: dict[str, str] = {}
    if qmark:
        for seg in query.split("&"):
            if not seg:
                raise _RouteError("empty parameter (a stray '?' or '&')")
            name, eq, value = seg.partition("=")
            if name not in ROUTE_PARAMS:
                hint = ""
                if name.lower() in ("preference", "priority", "prio"):
                    hint = "; the preference parameter is spelled 'pref'"
                elif name.lower() in ROUTE_PARAMS:
                    hint = f"; parameter names are lower case ('{name.lower()}')"
                raise _RouteError(f"unknown parameter {_q(name)} (expected pref, ttl, port "
                                  f"or type){hint}")
            if name in params:
                raise _RouteError(f"parameter '{name}' is given twice")
            if not eq:
                raise _RouteError(f"parameter '{name}' needs a value ({name}=...)")
            params[name] = value
    pref = ttl = rtype = None
    if "pref" in params:
        pref = _route_int("pref", params["pref"], 0, _ROUTE_INT_MAX,
                          "a non-negative integer")
    if "ttl" in params:
        ttl = _route_int("ttl", params["ttl"], 0, _ROUTE_INT_MAX,
                         "a non-negative integer (seconds)")
    if "port" in params:
        p = _route_port(params["port"])
        if port is not None and p != port:
            raise _RouteError(f"two different ports (:{port} and port={p})")
        port = p
    if "type" in params:
        rtype = params["type"].lower()
        if rtype not in ROUTE_TYPES:
            raise _RouteError(f"type must be mx or a, got {_q(params['type'])}")
    return RouteItem(s, host, port, pref, ttl, rtype, text, index)


class Routes(ValueType):
    """``Routes``: an array of ``__mx__``, host names / IP literals and
    ``smtp://`` / ``lmtp://`` URIs -> a tuple of :class:`RouteItem`."""

    name = "routes"
    expected = 'an array of routes, e.g. ( "smtp://host?pref=10" "__mx__" )'
    shape = "array"

    def convert(self, node: Value, base_dir: str) -> tuple[RouteItem, ...]:
        if node.kind != "array":
            raise BadValue()
        if not node.items:
            raise BadValue(message="needs at least one route, got an empty array ()")
        out: list[RouteItem] = []
        problems: list[BadValue] = []
        mx_at: int | None = None
        for i, item in enumerate(node.items):
            where = f"item {i + 1} {_q(item.text)}"
            try:
                r = parse_route(item.text, i)
            except _RouteError as exc:
                problems.append(BadValue(message=f"{where}: {exc}", pos=item.pos))
                continue
            if r.kind == "mx":
                if mx_at is not None:
                    problems.append(BadValue(
                        message=f"{where}: __mx__ is listed twice (also item {mx_at + 1})",
                        pos=item.pos))
                    continue
                mx_at = i
            out.append(r)
        if problems:
            raise BadValues(problems)
        return tuple(out)

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        return "( " + " ".join(_q(r.text) for r in value) + " )"


# ---------------------------------------------------------------------------
# Bindings (spec §5) and the cluster throttle store (§6)

#: Where ``Bind_Address`` host names are looked up (never DNS); tests may
#: point it elsewhere.
HOSTS_FILE = "/etc/hosts"


def hosts_file_addresses(name: str, path: str | None = None) -> list[str]:
    """Addresses listed for ``name`` in the hosts file, in file order
    (case-insensitive, no trailing dot).  Never asks DNS."""
    want = name.strip().lower().rstrip(".")
    out: list[str] = []
    try:
        with open(path or HOSTS_FILE, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.partition("#")[0].split()
                if len(fields) < 2:
                    continue
                if want in (f.lower().rstrip(".") for f in fields[1:]):
                    try:
                        addr = ipaddress.ip_address(fields[0].partition("%")[0])
                    except ValueError:
                        continue
                    text = fields[0] if "%" in fields[0] else addr.compressed
                    if text not in out:
                        out.append(text)
    except OSError:
        pass
    return out


def local_address_problem(addr: str) -> str | None:
    """None if ``addr`` can be the source address of an outbound connection
    on this host, else why not.  127.0.0.0/8, ::1 and the wildcard
    addresses always count as local; anything else is tried with
    ``bind((addr, 0))`` on a throwaway TCP socket."""
    import socket
    ip = ipaddress.ip_address(addr.partition("%")[0])
    if ip.is_loopback or ip.is_unspecified:
        return None
    if ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
        return f"address {addr} cannot be a source address (multicast or broadcast)"
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return f"address {addr} cannot be used: IPv{ip.version} sockets are not available " \
               f"({exc.strerror or exc})"
    try:
        sock.bind((addr, 0))
    except OSError as exc:
        import errno
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"address {addr} is not configured on this host"
        return f"address {addr} cannot be bound on this host ({exc.strerror or exc})"
    except (ValueError, TypeError) as exc:  # pragma: no cover - validated above
        return f"address {addr} cannot be bound on this host ({exc})"
    finally:
        sock.close()
    return None


class BindAddress(ValueType):
    """``Bind_Address``: ``*`` (the kernel chooses), an IPv4 or IPv6 address
    (``[v6]`` also accepted) or a host name from the hosts file (never DNS).
    The address must be local (configured on this host).  Converts to
    ``"*"`` or the address as text (IPv6 compressed, no brackets); a host
    name converts to its first local address in the hosts file."""

    name = "address|*"
    expected = 'an IP address of this host, "*" or a host name from /etc/hosts'

    def convert_scalar(self, text: str, node: Value) -> str:
        t = text.strip()
        if t == "*":
            return "*"
        if not t:
            raise BadValue(detail="empty")
        inner = t[1:-1] if t.startswith("[") and t.endswith("]") else t
        try:
            ip = ipaddress.ip_address(inner.partition("%")[0])
        except ValueError:
            ip = None
        if ip is not None:
            addr = ip.compressed + (inner[inner.index("%"):] if "%" in inner else "")
            problem = local_address_problem(addr)
            if problem:
                raise BadValue(message=problem)
            return addr
        if not looks_like_hostname(t):
            raise BadValue()
        addrs = hosts_file_addresses(t)
        if not addrs:
            raise BadValue(message=f"host name {_q(t)} is not in {HOSTS_FILE} (Bind_Address "
                                   "host names are never looked up in DNS; write the address)")
        problems = []
        for addr in addrs:
            problem = local_address_problem(addr)
            if problem is None:
                return addr
            problems.append(problem)
        raise BadValue(message=f"host name {_q(t)} ({HOSTS_FILE}): {problems[0]}")


#: ``EHLO_Hostname`` placeholders (spec §5)
EHLO_PLACEHOLDERS = ("__hostname__", "__message__")


class EhloHostname(ValueType):
    """``EHLO_Hostname``: ``__hostname__`` (the ``Hostname`` option, else
    ``gethostname()``), ``__message__`` (the envelope sender's domain) or a
    literal host name / address literal (``[192.0.2.1]``) sent as is.
    Placeholders are returned lower-cased, literals as written."""

    name = "ehlo name"
    expected = 'a host name, "[address]", "__hostname__" or "__message__"'

    def convert_scalar(self, text: str, node: Value) -> str:
        t = text.strip()
        if t.lower() in EHLO_PLACEHOLDERS:
            return t.lower()
        if not t:
            raise BadValue(detail="empty")
        if t.startswith("__") and t.endswith("__"):
            raise BadValue(detail="unknown placeholder; expected __hostname__ or __message__")
        if not t.isascii() or any(c.isspace() or not c.isprintable() for c in t):
            raise BadValue(detail="one word of printable ASCII characters")
        if t.startswith("[") and t.endswith("]"):
            inner = t[1:-1]
            try:
                if inner.lower().startswith("ipv6:"):
                    ipaddress.IPv6Address(inner[5:])
                else:
                    ipaddress.IPv4Address(inner)
            except ValueError:
                raise BadValue(detail="not an address literal; expected [a.b.c.d] or "
                                      "[IPv6:...]") from None
            return t
        try:
            ipaddress.ip_address(t)
        except ValueError:
            pass
        else:
            shown = f"[IPv6:{t}]" if ":" in t else f"[{t}]"
            raise BadValue(detail=f"write an address as an address literal, {shown}")
        if len(t) > 255 or not looks_like_hostname(t):
            raise BadValue()
        return t


REDIS_SCHEMES = ("redis", "rediss")
REDIS_DEFAULT_PORT = 6379


def parse_redis_url(text: str) -> tuple[str, str, int, int, str | None]:
    """``redis://[user:password@]host[:port][/db]`` (or ``rediss://``) ->
    ``(scheme, host, port, db, userinfo or None)``; raises ValueError with
    the reason.  ``host`` is a host name or an IP address (IPv6 in
    brackets); ``port`` 1-65535 (default 6379); ``db`` >= 0 (default 0)."""
    t = text.strip()
    scheme, sep, rest = t.partition("://")
    if not sep:
        head = t.partition(":")[0]
        if head.lower() in REDIS_SCHEMES:
            raise ValueError(f"expected '{head}://' before the host")
        raise ValueError("the redis:// scheme is missing")
    s = scheme.lower()
    if s not in REDIS_SCHEMES:
        raise ValueError(f"the scheme must be redis:// or rediss://, not {_q(scheme + '://')}")
    if "#" in rest:
        raise ValueError("a '#fragment' is not allowed")
    if "?" in rest:
        raise ValueError("query parameters are not supported")
    authority, slash, path = rest.partition("/")
    userinfo = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
    if not authority:
        raise ValueError("the host is missing")
    port_text = None
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("missing ']' after the IPv6 address")
        inner, after = authority[1:end], authority[end + 1:]
        try:
            host = ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise ValueError(f"{_q(inner)} is not an IPv6 address") from None
        if after:
            if not after.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port_text = after[1:]
    elif authority.count(":") > 1:
        raise ValueError(f"an IPv6 address must be bracketed, e.g. \"{s}://[{authority}]\"")
    else:
        host, colon, after = authority.partition(":")
        if colon:
            port_text = after
        if not host:
            raise ValueError("the host is missing")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if len(host) > 253 or not looks_like_hostname(host):
                raise ValueError(f"{_q(host)} is not a host name or IP address") from None
            host = host.lower().rstrip(".")
    port = REDIS_DEFAULT_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 \
                or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {_q(port_text)} is not 1-65535")
        port = int(port_text)
    db = 0
    if path:
        if not (path.isascii() and path.isdigit()) or len(path) > 9:
            raise ValueError(f"the database must be a non-negative integer, got {_q(path)}")
        db = int(path)
    return s, host, port, db, userinfo


class RedisURL(ValueType):
    """``Cluster_Throttle_Store``: ``redis://host[:port][/db]`` (also
    ``rediss://`` and ``user:password@``).  Converts to the normalised URL
    ``redis://host:port/db`` (port and db filled in, IPv6 bracketed)."""

    name = "redis url"
    expected = 'a Redis URL "redis://host:port/db"'

    def convert_scalar(self, text: str, node: Value) -> str:
        try:
            scheme, host, port, db, userinfo = parse_redis_url(text)
        except ValueError as exc:
            raise BadValue(detail=str(exc)) from None
        h = f"[{host}]" if ":" in host else host
        user = f"{userinfo}@" if userinfo is not None else ""
        return f"{scheme}://{user}{h}:{port}/{db}"


# ---------------------------------------------------------------------------
# Outbound TLS (spec §7)

#: TLS_Protocols version tokens, oldest first (SSLv2/SSLv3 are accepted and
#: never enabled: no supported OpenSSL build offers them)
TLS_VERSIONS = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_TLS_TOKENS = {"all": None, "sslv2": (), "sslv3": (), "tlsv1": ("TLSv1.0",),
               "tlsv1.0": ("TLSv1.0",), "tlsv1.1": ("TLSv1.1",), "tlsv1.2": ("TLSv1.2",),
               "tlsv1.3": ("TLSv1.3",)}
#: what ``ALL`` enables: "+ALL" means TLS 1.2 and 1.3 on modern OpenSSL (spec
#: §7); TLS 1.0/1.1 only when named explicitly (``+TLSv1.0``)
TLS_ALL = ("TLSv1.2", "TLSv1.3")
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                "TLS_AES_128_GCM_SHA256", "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256")


def parse_tls_protocols(text: str) -> tuple[str, str]:
    """``"+ALL:-TLSv1.0"`` -> (lowest, highest) enabled version name.

    Tokens ``ALL SSLv2 SSLv3 TLSv1.0 TLSv1.1 TLSv1.2 TLSv1.3`` (any case,
    ``TLSv1`` = ``TLSv1.0``), each prefixed ``+`` (default) or ``-``, joined
    by ``:`` (spaces and ``,`` also separate), applied left to right.
    Python's ``ssl`` sets a minimum and a maximum version only, so the
    enabled versions must be contiguous.  Raises ValueError with the reason.
    """
    enabled: set[str] = set()
    tokens = [t for t in re.split(r"[:,\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("no protocol is named")
    for tok in tokens:
        sign, name = ("+", tok)
        if tok[0] in "+-!":
            sign, name = ("+" if tok[0] == "+" else "-"), tok[1:]
        key = name.lower()
        if key not in _TLS_TOKENS:
            raise ValueError(f"unknown protocol {_q(name)} (expected ALL, SSLv3, TLSv1.0, "
                             "TLSv1.1, TLSv1.2 or TLSv1.3)")
        versions = _TLS_TOKENS[key]
        if versions is None:
            versions = TLS_ALL if sign == "+" else TLS_VERSIONS
        if sign == "+":
            enabled |= set(versions)
        else:
            enabled -= set(versions)
    if not enabled:
        raise ValueError("no TLS version is left enabled")
    idx = sorted(TLS_VERSIONS.index(v) for v in enabled)
    if idx[-1] - idx[0] + 1 != len(idx):
        gap = [TLS_VERSIONS[i] for i in range(idx[0], idx[-1]) if i not in idx]
        raise ValueError(f"the enabled versions must be contiguous ({', '.join(gap)} is "
                         "disabled between enabled ones; Python's ssl sets only a minimum and "
                         "a maximum version)")
    return TLS_VERSIONS[idx[0]], TLS_VERSIONS[idx[-1]]


class TlsProtocols(ValueType):
    """``TLS_Protocols``: validated with :func:`parse_tls_protocols`; the
    value is kept as written (``impetus.tls`` turns it into a version range)."""

    name = "protocols"
    expected = 'a protocol list such as "+ALL:-TLSv1.0"'

    def convert_scalar(self, text: str, node: Value) -> str:
        try:
            parse_tls_protocols(text)
        except ValueError as exc:
            raise BadValue(detail=str(exc)) from None
        return text.strip()


class TlsCiphers(ValueType):
    """``TLS_Ciphers``: an OpenSSL cipher list, checked with OpenSSL at load.
    GnuTLS priority strings other than ``NORMAL`` (= ``DEFAULT``) are refused."""

    name = "cipher list"
    expected = "an OpenSSL cipher list"

    def convert_scalar(self, text: str, node: Value) -> str:
        t = text.strip()
        if not t:
            raise BadValue(detail="empty")
        if t.upper() in ("DEFAULT", "NORMAL"):
            return "DEFAULT"
        import ssl
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(t)
        except ssl.SSLError:
            raise BadValue(detail="OpenSSL accepts no cipher from this list") from None
        return t


class Tls13Suites(ValueType):
    """``TLSv13_Ciphersuites``: a colon list of TLS 1.3 suite names.  Python's
    ``ssl`` cannot choose TLS 1.3 suites: the value is checked and accepted,
    and OpenSSL's defaults (the same three suites as Momentum's default) apply."""

    name = "suite list"
    expected = "a colon-separated list of TLS 1.3 cipher suites"

    def convert_scalar(self, text: str, node: Value) -> str:
        names = [n for n in re.split(r"[:\s]+", text.strip()) if n]
        if not names:
            raise BadValue(detail="empty")
        bad = [n for n in names if n.upper() not in TLS13_SUITES]
        if bad:
            raise BadValue(detail=f"unknown suite {_q(bad[0])}; known: {', '.join(TLS13_SUITES)}")
        return ":".join(n.upper() for n in names)


class TlsFile(Path):
    """``TLS_Certificate`` / ``TLS_Key``: a path (relative to the config
    file's directory) or ``none``, which cancels a value inherited from a
    broader scope (converts to the string ``"none"``)."""

    name = "path|none"
    expected = 'a path or "none"'

    def convert(self, node: Value, base_dir: str) -> Any:
        if node.kind == "scalar" and node.text.strip().lower() == "none":
            return "none"
        return super().convert(node, base_dir)


def _unreadable(path: str, what: str = "a file") -> str | None:
    if os.path.isdir(path):
        return f"names {what} that cannot be read: {path}: is a directory"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"names {what} that cannot be read: {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return f"names {what} that cannot be read: {path}: {exc}"
    return None


def tls_ca_problem(path: str) -> str | None:
    """Why ``TLS_CA`` cannot be used (None if it can): loaded with ``ssl``."""
    import ssl
    problem = _unreadable(path)
    if problem:
        return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return f"file {path} holds no usable PEM CA certificate ({exc.reason or exc})"
    except OSError as exc:
        return f"names a file that cannot be read: {path}: {exc.strerror or exc}"
    return None


def tls_cert_problem(cert: str, key: str | None) -> str | None:
    """Why a client certificate cannot be presented (None if it can): the
    certificate and its key (``key`` None: in the certificate file) are
    loaded with ``ssl`` as delivery will load them."""
    import ssl
    problem = _unreadable(cert)
    if problem:
        return problem
    if key is not None:
        problem = _unreadable(key, "a key file")
        if problem:
            return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        where = f"key {key}" if key else "no TLS_Key: the key must be in the same file"
        return (f"file {cert} is not a usable PEM certificate with its private key "
                f"({where}): {exc.reason or exc}")
    except OSError as exc:
        return f"names a file that cannot be read: {cert}: {exc.strerror or exc}"
    return None


def tls_key_problem(key: str) -> str | None:
    """A ``TLS_Key`` without any certificate to pair it with: readable and
    holding a PEM private key."""
    problem = _unreadable(key, "a key file")
    if problem:
        return problem
    try:
        with open(key, "rb") as fh:
            data = fh.read(1 << 20)
    except OSError as exc:
        return f"names a key file that cannot be read: {key}: {exc.strerror or exc}"
    if b"PRIVATE KEY-----" not in data:
        return f"file {key} holds no PEM private key"
    return None


STR = Str()
HOSTPORT = HostPort()
PATH = Path()
BOOL = Bool()
INT = Int()
SIGNED = Int(minimum=None)
INT_M1 = Int(minimum=-1)
DURATION = Int(unit="seconds")
MILLIS = Int(unit="milliseconds")
TTL = Int(0, 4294967295, unit="seconds")
PORT = Port()
MODE = Mode()
ARRAY = Array()
HASH = Hash()
ADDRLIST = AddrList()
DOMAINLIST = DomainList()
RATE = Rate()
BIND_ADDRESS = BindAddress()
EHLO_HOSTNAME = EhloHostname()
REDIS_URL = RedisURL()
ROUTES = Routes()
TLS_PROTOCOLS = TlsProtocols()
TLS_CIPHERS = TlsCiphers()
TLS13_SUITES_TYPE = Tls13Suites()
TLS_FILE = TlsFile()
MAXRETRIES = MaxRetries()
