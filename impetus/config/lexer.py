"""Lexer for the ``ecelerity.conf`` language (spec §1.2, decision D16).

* ``#`` starts a comment running to the end of the line.
* ``/* ... */`` is a block comment; block comments do not nest.
* ``"..."`` and ``'...'`` are strings; inside them a backslash escapes the
  next character (the backslash is dropped, the character kept as is).
  Strings may span lines.
* A bare word is a run of characters other than whitespace and
  ``# " ' = { } [ ] ( )``.  ``/`` is an ordinary character in a bare word,
  except that ``/*`` always opens a comment.
* Punctuation tokens: ``= { } [ ] ( )``.

Every token carries a :class:`~impetus.config.errors.Pos` (file, 1-based
line and column; columns count characters, a tab is one column).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .errors import Issues, Pos

# Token kinds
WORD = "word"
STRING = "string"
EOF = "eof"
PUNCT = frozenset("={}[]()")

_WS = re.compile(r"[ \t\r\n\f\v]+")
_BARE = re.compile(r"(?:[^\s#\"'=\{\}\[\]\(\)/\x00]|/(?!\*))+")
_NL = re.compile(r"\n")
_STRBODY = {'"': re.compile(r'[^"\\]*'), "'": re.compile(r"[^'\\]*")}


@dataclass(slots=True)
class Token:
    kind: str          # WORD, STRING, EOF, or one of "={}[]()"
    value: str         # the text (for strings: unescaped contents)
    pos: Pos

    @property
    def quoted(self) -> bool:
        return self.kind == STRING

    def describe(self) -> str:
        if self.kind == EOF:
            return "end of file"
        if self.kind == STRING:
            return f"string {quote(self.value)}"
        if self.kind == WORD:
            return f"'{self.value}'"
        return f"'{self.kind}'"


def quote(text: str) -> str:
    """Render a value for an error message: ``"text"`` with escapes."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    if len(out) > 80:
        out = out[:77] + "..."
    return f'"{out}"'


def decode_source(data: bytes, file: str, issues: Issues) -> str:
    """Decode a config file as UTF-8, reporting the first bad byte.

    Undecodable bytes are replaced (U+FFFD) so lexing can go on and find
    further problems.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8", errors="replace")
        line = good.count("\n") + 1
        col = len(good) - (good.rfind("\n") + 1) + 1
        issues.add(Pos(file, line, col),
                   f"invalid UTF-8 byte 0x{data[exc.start]:02x} "
                   "(config files must be UTF-8)")
        return data.decode("utf-8", errors="replace")


class _Positions:
    """Maps character offsets to (line, column)."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.starts = [0] + [m.end() for m in _NL.finditer(text)]

    def pos(self, offset: int) -> Pos:
        i = bisect.bisect_right(self.starts, offset) - 1
        return Pos(self.file, i + 1, offset - self.starts[i] + 1)


def tokenize(text: str, file: str, issues: Issues) -> list[Token]:
    """Split ``text`` into tokens; problems go to ``issues``.

    The returned list always ends with an EOF token.
    """
    positions = _Positions(text, file)
    tokens: list[Token] = []
    n = len(text)
    i = 0
    nul_reported = False
    while i < n:
        c = text[i]
        if c in " \t\r\n\f\v":
            m = _WS.match(text, i)
            i = m.end()
            continue
        if c == "\x00":
            if not nul_reported:
                issues.add(positions.pos(i), "NUL byte in config file")
                nul_reported = True
            i += 1
            continue
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                issues.add(positions.pos(i), "unterminated comment: '/*' without '*/'")
                i = n
            else:
                i = j + 2
            continue
        if c in PUNCT:
            tokens.append(Token(c, c, positions.pos(i)))
            i += 1
            continue
        if c == '"' or c == "'":
            start = i
            i += 1
            parts: list[str] = []
            closed = False
            while i < n:
                # scan to the next quote or backslash
                j = _STRBODY[c].match(text, i).end()
                parts.append(text[i:j])
                if j >= n:
                    i = n
                    break
                if text[j] == "\\":
                    if j + 1 < n:
                        parts.append(text[j + 1])
                        i = j + 2
                        continue
                    i = n
                    break
                i = j + 1
                closed = True
                break
            value = "".join(parts)
            if not closed:
                issues.add(positions.pos(start),
                           f"unterminated string: missing closing {c}")
            elif "\x00" in value:
                issues.add(positions.pos(start), "NUL byte in string")
                value = value.replace("\x00", "")
            tokens.append(Token(STRING, value, positions.pos(start)))
            continue
        m = _BARE.match(text, i)
        if m is None or m.end() == i:  # pragma: no cover - every char is covered above
            issues.add(positions.pos(i), f"unexpected character {quote(c)}")
            i += 1
            continue
        tokens.append(Token(WORD, m.group(), positions.pos(i)))
        i = m.end()
    tokens.append(Token(EOF, "", positions.pos(n)))
    return tokens
