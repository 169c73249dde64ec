"""SMTP replies.

A :class:`Reply` is an immutable value: a three-digit code, an optional
RFC 3463 enhanced status code and a (possibly multi-line) text.  Lines of
``text`` are separated by ``"\\n"``.

>>> r = Reply(451, "4.4.2", "try later")
>>> str(r)
'451 4.4.2 try later'
>>> Reply(250, None, "mx.example\\nPIPELINING").to_bytes()
b'250-mx.example\\r\\n250 PIPELINING\\r\\n'
"""

from __future__ import annotations

import re

__all__ = ["Reply"]

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_PARSE_RE = re.compile(r"^\s*([2-5]\d\d)(?:[ -](.*))?$", re.S)


class Reply:
    """An SMTP reply: ``Reply(code, enhanced, text)``.

    ``enhanced`` is the enhanced status code (``"4.4.2"``) or ``None``.
    ``text`` may contain several lines separated by ``"\\n"``; ``to_bytes``
    renders them as a multi-line reply (``250-...`` / ``250 ...``) with the
    enhanced code repeated on every line, as RFC 2034 asks.
    """

    __slots__ = ("code", "enhanced", "text", "_bytes")

    def __init__(self, code: int, enhanced: str | None = None, text: str = "") -> None:
        code = int(code)
        if not 200 <= code <= 599:
            raise ValueError(f"reply code out of range: {code}")
        if enhanced is not None and not _ENHANCED_RE.match(enhanced):
            raise ValueError(f"bad enhanced status code: {enhanced!r}")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced or None)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "_bytes", None)

    def __setattr__(self, name, value):  # pragma: no cover - immutability guard
        raise AttributeError("Reply is immutable")

    # -- classification -------------------------------------------------
    @property
    def is_success(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx (354 after DATA)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: give up."""
        return self.code >= 500

    @property
    def lines(self) -> list[str]:
        return [ln.rstrip("\r") for ln in self.text.split("\n")]

    # -- rendering ------------------------------------------------------
    def to_bytes(self, include_enhanced: bool = True) -> bytes:
        """Wire form, every line CRLF-terminated.

        Text is encoded as UTF-8; CR and LF inside the text can never break
        out of the reply (LF separates lines, stray CRs are dropped).
        """
        if include_enhanced and self._bytes is not None:
            return self._bytes
        code = str(self.code)
        enh = self.enhanced if include_enhanced else None
        text = self.text
        if "\n" not in text and "\r" not in text:  # fast path: one line
            if enh:
                line = f"{code} {enh} {text}\r\n" if text else f"{code} {enh}\r\n"
            else:
                line = f"{code} {text}\r\n" if text else f"{code}\r\n"
            data = line.encode("utf-8", "replace")
            if include_enhanced:
                object.__setattr__(self, "_bytes", data)
            return data
        lines = self.lines
        out = []
        last = len(lines) - 1
        for i, ln in enumerate(lines):
            ln = ln.replace("\r", "")
            content = f"{enh} {ln}" if (enh and ln) else (enh or ln)
            if i == last:
                out.append(f"{code} {content}\r\n" if content else f"{code}\r\n")
            else:
                out.append(f"{code}-{content}\r\n")
        data = "".join(out).encode("utf-8", "replace")
        if include_enhanced:
            object.__setattr__(self, "_bytes", data)
        return data

    def __str__(self) -> str:
        """One line: ``451 4.4.2 text`` (lines of a multi-line text joined by a space)."""
        text = " ".join(ln for ln in self.lines if ln)
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if text:
            parts.append(text)
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"Reply({self.code!r}, {self.enhanced!r}, {self.text!r})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __reduce__(self):
        return (Reply, (self.code, self.enhanced, self.text))

    # -- construction ---------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Reply":
        """Parse ``"451 4.3.0 try later"`` (as written in configs and on
        command lines) into a Reply.  Raises ``ValueError`` on garbage."""
        m = _PARSE_RE.match(text)
        if not m:
            raise ValueError(f"not an SMTP reply: {text!r}")
        code = int(m.group(1))
        rest = (m.group(2) or "").strip()
        enhanced = None
        head, _, tail = rest.partition(" ")
        if _ENHANCED_RE.match(head) and head[0] == str(code)[0]:
            enhanced, rest = head, tail.strip()
        return cls(code, enhanced, rest)
