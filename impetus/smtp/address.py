"""RFC 5321 envelope address parsing.

Entry points:

* :func:`parse_path` -- the ``<...>`` path of ``MAIL FROM:`` / ``RCPT TO:``
  (``<local@domain>``, ``<>``, quoted local parts, source routes
  ``<@a,@b:user@c>`` whose route is dropped, IP literals ``[1.2.3.4]`` /
  ``[IPv6:...]``, UTF-8 addresses when ``smtputf8=True``).
* :func:`parse_address` -- the same without angle brackets.
* :func:`split_argument` -- split ``<path> PARAMS...`` (the part after
  ``FROM:``/``TO:``) into the path text and the parameter text.
* :func:`parse_params` -- ESMTP parameters ``SIZE=123 BODY=8BITMIME SMTPUTF8``
  into ``{"SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None}``.

Every syntax problem raises :class:`AddressError` (a ``ValueError``) and
nothing else.

Normalisation: the domain is lower-cased; IPv6 literals are written
``[IPv6:<compressed form>]``; a quoted local part whose content is a valid
dot-atom is unquoted (``"john.doe"@x`` -> ``john.doe@x``), otherwise it is
re-quoted minimally.  The local part keeps its case.

Leniency (like Postfix with ``strict_rfc821_envelopes = no``): a path without
angle brackets is accepted by :func:`split_argument`; a dot-string local part
may have leading, trailing or doubled dots; labels may contain ``_``.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "Address",
    "AddressError",
    "NULL_ADDRESS",
    "parse_path",
    "parse_address",
    "split_argument",
    "parse_params",
    "domain_of",
]


class AddressError(ValueError):
    """An envelope address or ESMTP parameter list is malformed."""


class Address:
    """A parsed envelope address.

    ``address`` is the normalised ``local@domain`` ('' for the null sender
    ``<>``); ``local`` and ``domain`` are its parts (``domain`` lower-case,
    '' for the null sender or an unqualified address such as ``<postmaster>``).
    ``str(addr)`` is ``addr.address``.
    """

    __slots__ = ("address", "local", "domain")

    def __init__(self, address: str, local: str, domain: str) -> None:
        self.address = address
        self.local = local
        self.domain = domain

    @property
    def is_null(self) -> bool:
        return not self.address

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"Address({self.address!r})"

    def __eq__(self, other) -> bool:
        if isinstance(other, Address):
            return self.address == other.address
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.address)


NULL_ADDRESS = Address("", "", "")

# RFC 5322 atext, minus ALPHA/DIGIT which are checked with str methods.
_ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
) | _ATEXT_SPECIALS
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")

# Fast path for the common plain-ASCII case; anything else takes the slow,
# exact path (which also produces the error messages).
_FAST_RE = re.compile(r"([A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]{1,512})@([A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9_])?)")

MAX_DOMAIN = 255
MAX_LOCAL = 512  # RFC says 64; real-world VERP addresses are longer.


def domain_of(address: str) -> str:
    """Lower-cased domain of a normalised address string ('' if none)."""
    at = address.rfind("@")
    return address[at + 1:].lower() if at >= 0 else ""


def _bad_char(ch: str, smtputf8: bool) -> bool:
    o = ord(ch)
    if o < 0x21 or o == 0x7F:
        return True
    if o >= 0x80:
        return not smtputf8 or 0x80 <= o < 0xA0 or 0xD800 <= o < 0xE000
    return False


def _check_domain(dom: str, smtputf8: bool, what: str = "domain") -> str:
    """Validate a domain (hostname or address literal); return it normalised."""
    if not dom:
        raise AddressError(f"empty {what}")
    if dom[0] == "[":
        if dom[-1] != "]":
            raise AddressError(f"unterminated address literal in {what}")
        inner = dom[1:-1]
        if inner[:5].lower() == "ipv6:":
            try:
                ip6 = ipaddress.IPv6Address(inner[5:])
            except ValueError:
                raise AddressError(f"bad IPv6 address literal: {dom!r}") from None
            return f"[IPv6:{ip6.compressed}]"
        try:
            ip4 = ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError(f"bad address literal: {dom!r}") from None
        return f"[{ip4}]"
    if len(dom) > MAX_DOMAIN:
        raise AddressError(f"{what} too long")
    for label in dom.split("."):
        if not label:
            raise AddressError(f"empty label in {what} {dom!r}")
        if len(label) > 63:
            raise AddressError(f"label too long in {what}")
        if label[0] == "-" or label[-1] == "-":
            raise AddressError(f"label starts or ends with '-' in {what} {dom!r}")
        for ch in label:
            if ch in _LDH:
                continue
            if ord(ch) >= 0x80 and not _bad_char(ch, smtputf8) and not ch.isspace():
                continue
            raise AddressError(f"bad character {ch!r} in {what}")
    return dom.lower()


def _is_dot_atom(s: str) -> bool:
    if not s or s[0] == "." or s[-1] == "." or ".." in s:
        return False
    return all(ch in _ATEXT or ch == "." or ord(ch) >= 0x80 for ch in s)


def _parse_local(text: str, smtputf8: bool) -> tuple[str, str]:
    """Parse a local part at the start of ``text``; return (normalised local, rest)."""
    if text[:1] == '"':
        i = 1
        n = len(text)
        chars = []
        while True:
            if i >= n:
                raise AddressError("unterminated quoted local part")
            ch = text[i]
            if ch == '"':
                break
            if ch == "\\":
                i += 1
                if i >= n:
                    raise AddressError("unterminated quoted local part")
                ch = text[i]
                if (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
                    raise AddressError("control character in quoted local part")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                raise AddressError("control character in quoted local part")
            if ord(ch) >= 0x80 and _bad_char(ch, smtputf8):
                raise AddressError("non-ASCII character in address without SMTPUTF8")
            chars.append(ch)
            i += 1
        content = "".join(chars)
        rest = text[i + 1:]
        if _is_dot_atom(content) and all(ord(c) < 0x80 or smtputf8 for c in content):
            local = content
        else:
            local = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return local, rest
    at = text.find("@")
    local = text if at < 0 else text[:at]
    rest = "" if at < 0 else text[at:]
    if not local:
        raise AddressError("empty local part")
    for ch in local:
        if ch in _ATEXT or ch == ".":
            continue
        if ord(ch) >= 0x80:
            if _bad_char(ch, smtputf8):
                raise AddressError(
                    "non-ASCII character in address without SMTPUTF8"
                    if not smtputf8 else f"bad character {ch!r} in local part")
            if ch.isspace():
                raise AddressError("space in local part")
            continue
        raise AddressError(f"bad character {ch!r} in local part")
    return local, rest


def parse_address(
    text: str, *, smtputf8: bool = False, allow_unqualified: bool = False
) -> Address:
    """Parse a bare mailbox ``local@domain`` (no angle brackets, no route)."""
    if not isinstance(text, str):
        raise AddressError("address must be a str")
    if not text:
        raise AddressError("empty address")
    if len(text) > MAX_LOCAL + MAX_DOMAIN + 2:
        raise AddressError("address too long")
    m = _FAST_RE.fullmatch(text)
    if m is not None:
        local, dom = m.group(1), m.group(2)
        if ".." not in dom and all(
            len(lb) <= 63 and lb[0] != "-" and lb[-1] != "-" for lb in dom.split(".")
        ):
            dom = dom.lower()
            return Address(f"{local}@{dom}", local, dom)
    local, rest = _parse_local(text, smtputf8)
    if len(local) > MAX_LOCAL:
        raise AddressError("local part too long")
    if not rest:
        if allow_unqualified:
            return Address(local, local, "")
        raise AddressError("address has no domain")
    if rest[0] != "@":
        raise AddressError("junk after quoted local part")
    domain = _check_domain(rest[1:], smtputf8)
    return Address(f"{local}@{domain}", local, domain)


def parse_path(
    text: str,
    *,
    smtputf8: bool = False,
    allow_null: bool = True,
    allow_unqualified: bool = False,
    require_brackets: bool = False,
) -> Address:
    """Parse a reverse/forward path: ``<a@b>``, ``<>``, ``<@r1,@r2:a@b>``.

    Without ``require_brackets`` a bare ``a@b`` is accepted too.  The null
    path ``<>`` gives :data:`NULL_ADDRESS` when ``allow_null``.
    """
    if not isinstance(text, str):
        raise AddressError("path must be a str")
    if text[:1] == "<":
        if text[-1:] != ">" or len(text) < 2:
            raise AddressError("unterminated '<' in path")
        inner = text[1:-1]
    elif require_brackets:
        raise AddressError("path must be enclosed in <>")
    else:
        inner = text
    if not inner:
        if allow_null and text == "<>":
            return NULL_ADDRESS
        raise AddressError("empty path" if text == "<>" else "empty address")
    if inner[0] == "@":
        # Source route: A-d-l ":" Mailbox.  Domains in the route cannot
        # contain ':' so the first ':' ends it.
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without ':'")
        for hop in inner[:colon].split(","):
            if hop[:1] != "@":
                raise AddressError("bad source route")
            _check_domain(hop[1:], smtputf8, "source route")
        inner = inner[colon + 1:]
        if not inner:
            raise AddressError("source route without mailbox")
    return parse_address(inner, smtputf8=smtputf8, allow_unqualified=allow_unqualified)


def split_argument(arg: str) -> tuple[str, str]:
    """Split ``<path> SIZE=1 ...`` into (``<path>``, ``SIZE=1 ...``).

    Leading spaces are skipped (``MAIL FROM: <a@b>``).  A ``>`` inside a
    quoted local part does not end the path.
    """
    arg = arg.lstrip(" ")
    if not arg:
        raise AddressError("missing address")
    if arg[0] != "<":
        sp = arg.find(" ")
        if sp < 0:
            return arg, ""
        return arg[:sp], arg[sp + 1:]
    if '"' not in arg:
        i = arg.find(">")
        if i < 0:
            raise AddressError("unterminated '<' in path")
        if i + 1 < len(arg) and arg[i + 1] != " ":
            raise AddressError("junk after '>'")
        return arg[: i + 1], arg[i + 2:]
    i = 1
    n = len(arg)
    quoted = False
    while i < n:
        ch = arg[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ">":
            rest = arg[i + 1:]
            if rest and rest[0] != " ":
                raise AddressError("junk after '>'")
            return arg[: i + 1], rest[1:]
        i += 1
    raise AddressError("unterminated '<' in path")


def _valid_keyword(k: str) -> bool:
    if not k or not k.isascii() or not k[0].isalnum():
        return False
    return all(c.isalnum() or c == "-" for c in k)


def parse_params(text: str, *, smtputf8: bool = False) -> dict[str, str | None]:
    """Parse ESMTP parameters.  Keywords are upper-cased; a keyword without
    ``=value`` maps to ``None``.  Duplicates, empty values and bad
    characters raise :class:`AddressError`."""
    out: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _valid_keyword(key):
            raise AddressError(f"bad ESMTP parameter keyword {key!r}")
        key = key.upper()
        if key in out:
            raise AddressError(f"duplicate ESMTP parameter {key}")
        if eq:
            if not value:
                raise AddressError(f"empty value for ESMTP parameter {key}")
            for ch in value:
                o = ord(ch)
                if o < 0x21 or o == 0x3D or o == 0x7F or (o >= 0x80 and _bad_char(ch, smtputf8)):
                    raise AddressError(f"bad character in value of ESMTP parameter {key}")
            out[key] = value
        else:
            out[key] = None
    return out
