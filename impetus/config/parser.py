"""Parser for ``ecelerity.conf`` (spec §1.3) with ``include`` handling.

Grammar::

    config      := statement*
    statement   := include | assignment | stanza
    include     := ("include" | "readonly_include") STRING
    assignment  := NAME "=" value
    stanza      := NAME [INSTANCE] "{" statement* "}"
    value       := scalar | "(" scalar* ")" | "[" (KEY "=" scalar)* "]"

The parser produces a syntax tree (:class:`Assignment`, :class:`Stanza`,
:class:`Value`) with includes already spliced in: an ``include`` inside a
stanza contributes its statements to that stanza.  Names are kept as
written; the model layer folds case.

Include rules (spec §1.1): a relative path is relative to the directory of
the including file; a directory includes its non-hidden regular files in
lexical order without recursing; a cycle or a missing file is an error at
the include's position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Union

from .errors import Issues, Pos
from .lexer import EOF, STRING, WORD, Token, decode_source, quote, tokenize

#: Largest config file we read (anything bigger is surely not a config).
MAX_FILE_SIZE = 16 * 1024 * 1024
#: Deepest include nesting.
MAX_INCLUDE_DEPTH = 32
#: Deepest stanza nesting.
MAX_NESTING = 32
#: Most files one configuration may read.
MAX_FILES = 2000

INCLUDE_KEYWORDS = ("include", "readonly_include")


@dataclass(slots=True)
class Value:
    """A value in the syntax tree.

    ``kind`` is ``"scalar"`` (``text``, ``quoted``), ``"array"`` (``items``:
    scalar Values) or ``"hash"`` (``pairs``: ``(key, key_pos, Value)``).
    """

    kind: str
    pos: Pos
    text: str = ""
    quoted: bool = False
    items: list["Value"] = field(default_factory=list)
    pairs: list[tuple[str, Pos, "Value"]] = field(default_factory=list)

    def describe(self) -> str:
        """How the value is shown after "got" in an error message."""
        if self.kind == "scalar":
            return quote(self.text)
        if self.kind == "array":
            return "an array"
        return "a hash"

    def to_python(self):
        if self.kind == "scalar":
            return self.text
        if self.kind == "array":
            return [v.text for v in self.items]
        return {k: v.to_python() for k, _, v in self.pairs}


@dataclass(slots=True)
class Assignment:
    name: str
    pos: Pos
    value: Value


@dataclass(slots=True)
class Stanza:
    name: str
    pos: Pos
    instance: str | None
    instance_pos: Pos | None
    body: list["Statement"]


Statement = Union[Assignment, Stanza]


@dataclass
class ParseResult:
    statements: list[Statement]
    source_files: list[str]
    readonly_files: set[str]


class _Parser:
    def __init__(self, tokens: list[Token], issues: Issues, loader: "Loader",
                 file: str, include_depth: int):
        self.toks = tokens
        self.i = 0
        self.issues = issues
        self.loader = loader
        self.file = file
        self.include_depth = include_depth

    # -- helpers -----------------------------------------------------------
    def peek(self, k: int = 0) -> Token:
        j = self.i + k
        if j >= len(self.toks):
            return self.toks[-1]
        return self.toks[j]

    def next(self) -> Token:
        t = self.toks[self.i]
        if t.kind != EOF:
            self.i += 1
        return t

    def err(self, pos: Pos, msg: str) -> None:
        self.issues.add(pos, msg)

    # -- statements --------------------------------------------------------
    def parse_file(self) -> list[Statement]:
        out: list[Statement] = []
        while True:
            t = self.peek()
            if t.kind == EOF:
                return out
            if t.kind == "}":
                self.err(t.pos, "unexpected '}' (no open stanza to close)")
                self.next()
                continue
            self.statement(out, depth=0)

    def block(self, depth: int, stanza_tok: Token, label: str) -> list[Statement]:
        """Parse statements up to the matching '}' (already past '{')."""
        out: list[Statement] = []
        while True:
            t = self.peek()
            if t.kind == "}":
                self.next()
                return out
            if t.kind == EOF:
                self.err(stanza_tok.pos, f"unterminated stanza {label}: missing '}}'")
                return out
            self.statement(out, depth)

    def skip_block(self) -> None:
        """Skip tokens up to the '}' matching an already consumed '{'."""
        level = 1
        while True:
            t = self.next()
            if t.kind == EOF:
                return
            if t.kind == "{":
                level += 1
            elif t.kind == "}":
                level -= 1
                if level == 0:
                    return

    def statement(self, out: list[Statement], depth: int) -> None:
        t = self.peek()
        if t.kind != WORD:
            if t.kind == STRING:
                self.err(t.pos, f"expected an option or stanza name, got {t.describe()} "
                                "(names must not be quoted)")
            else:
                self.err(t.pos, f"expected an option or stanza name, got {t.describe()}")
            self.next()
            if t.kind == "{":
                self.skip_block()
            elif t.kind in "([":
                self.skip_value_rest(t.kind)
            elif t.kind == STRING and self.peek().kind == "=":
                # '"Name" = value': skip the whole assignment
                self.next()
                if self.peek().kind not in (EOF, "{", "}"):
                    self.value(t)
            elif t.kind == STRING and self.peek().kind == "{":
                self.next()
                self.skip_block()
            return
        name = self.next()
        t1 = self.peek()
        lname = name.value.lower()
        if lname in INCLUDE_KEYWORDS:
            if t1.kind in (WORD, STRING):
                self.next()
                out.extend(self.loader.include(t1.value, t1.pos, self.file,
                                               readonly=(lname == "readonly_include"),
                                               depth=self.include_depth + 1))
                return
            self.err(t1.pos, f"expected a file or directory name after '{name.value}', "
                             f"got {t1.describe()}")
            if t1.kind == "=":
                self.next()
                if self.peek().kind in (WORD, STRING):
                    self.next()
            return
        if t1.kind == "=":
            self.next()
            value = self.value(name)
            if value is not None:
                out.append(Assignment(name.value, name.pos, value))
            return
        if t1.kind == "{":
            self.next()
            out.append(self.stanza_body(name, None, None, depth))
            return
        if t1.kind in (WORD, STRING) and self.peek(1).kind == "{":
            self.next()
            self.next()
            out.append(self.stanza_body(name, t1.value, t1.pos, depth))
            return
        # Missing '=' (D16: '=' is required in files).
        self.err(t1.pos, f"expected '=' after '{name.value}', got {t1.describe()}")
        if t1.kind in (WORD, STRING):
            self.next()
        elif t1.kind in "([":
            self.next()
            self.skip_value_rest(t1.kind)

    def stanza_body(self, name: Token, instance: str | None, ipos: Pos | None,
                    depth: int) -> Stanza:
        label = f"'{name.value}'" if instance is None else f"'{name.value} {quote(instance)}'"
        if depth + 1 > MAX_NESTING:
            self.err(name.pos, f"stanzas nested too deeply (limit {MAX_NESTING})")
            self.skip_block()
            return Stanza(name.value, name.pos, instance, ipos, [])
        body = self.block(depth + 1, name, label)
        return Stanza(name.value, name.pos, instance, ipos, body)

    def skip_value_rest(self, opener: str) -> None:
        closer = ")" if opener == "(" else "]"
        while True:
            t = self.peek()
            if t.kind in (EOF, "{", "}"):
                return
            self.next()
            if t.kind == closer:
                return

    # -- values ------------------------------------------------------------
    def value(self, name: Token) -> Value | None:
        t = self.peek()
        if t.kind in (WORD, STRING):
            self.next()
            return Value("scalar", t.pos, text=t.value, quoted=t.kind == STRING)
        if t.kind == "(":
            self.next()
            return self.array(t)
        if t.kind == "[":
            self.next()
            return self.hash(t)
        self.err(t.pos, f"expected a value after '{name.value} =', got {t.describe()}")
        if t.kind in (")", "]", "="):
            self.next()
        return None

    def array(self, open_tok: Token) -> Value:
        items: list[Value] = []
        while True:
            t = self.peek()
            if t.kind == ")":
                self.next()
                return Value("array", open_tok.pos, items=items)
            if t.kind in (WORD, STRING):
                self.next()
                items.append(Value("scalar", t.pos, text=t.value, quoted=t.kind == STRING))
                continue
            if t.kind == "=" and items and not items[-1].quoted:
                # "( a b" followed by "Name = ...": the array was never closed.
                self.err(open_tok.pos, "unterminated array: missing ')'")
                items.pop()
                self.i -= 1
                return Value("array", open_tok.pos, items=items)
            if t.kind in (EOF, "{", "}", "="):
                self.err(open_tok.pos, "unterminated array: missing ')'")
                return Value("array", open_tok.pos, items=items)
            # nested '(' or '[' or a stray ']'
            self.err(t.pos, f"unexpected {t.describe()} inside an array "
                            "(arrays hold only strings and bare words, without commas)")
            self.next()
            if t.kind in "([":
                self.skip_value_rest(t.kind)

    def hash(self, open_tok: Token) -> Value:
        pairs: list[tuple[str, Pos, Value]] = []
        while True:
            t = self.peek()
            if t.kind == "]":
                self.next()
                return Value("hash", open_tok.pos, pairs=pairs)
            if t.kind in (EOF, "{", "}"):
                self.err(open_tok.pos, "unterminated hash: missing ']'")
                return Value("hash", open_tok.pos, pairs=pairs)
            if t.kind not in (WORD, STRING):
                self.err(t.pos, f"expected a key inside a hash, got {t.describe()}")
                self.next()
                if t.kind in "([":
                    self.skip_value_rest(t.kind)
                continue
            key = self.next()
            eq = self.peek()
            if eq.kind != "=":
                self.err(eq.pos, f"expected '=' after hash key {quote(key.value)}, "
                                 f"got {eq.describe()}")
                continue
            self.next()
            v = self.peek()
            if v.kind in (WORD, STRING):
                self.next()
                pairs.append((key.value, key.pos,
                              Value("scalar", v.pos, text=v.value, quoted=v.kind == STRING)))
            elif v.kind == "(":
                self.next()
                pairs.append((key.value, key.pos, self.array(v)))
            else:
                self.err(v.pos, f"expected a value for hash key {quote(key.value)}, "
                                f"got {v.describe()}")
                if v.kind not in (EOF, "{", "}", "]"):
                    self.next()


class Loader:
    """Reads files, follows includes and records what was read."""

    def __init__(self, issues: Issues):
        self.issues = issues
        self.source_files: list[str] = []
        self.readonly_files: set[str] = set()
        self._stack: list[tuple[str, str]] = []  # (realpath, shown path)

    # -- public ------------------------------------------------------------
    def load_top(self, path: str) -> list[Statement]:
        top = Pos(path, 1, 1)
        try:
            is_dir = os.path.isdir(path)
        except (OSError, ValueError):
            is_dir = False
        if is_dir:
            return self._include_dir(path, top, readonly=False, depth=0)
        return self._load_file(path, top, readonly=False, depth=0, top=True)

    def load_text(self, text: str, file: str) -> list[Statement]:
        self.source_files.append(file)
        self._stack.append((file, file))
        try:
            return self._parse_text(text, file, depth=0)
        finally:
            self._stack.pop()

    def include(self, target: str, pos: Pos, including: str, *, readonly: bool,
                depth: int) -> list[Statement]:
        if not target:
            self.issues.add(pos, "empty include path")
            return []
        if "\x00" in target:
            self.issues.add(pos, "include path contains a NUL byte")
            return []
        if depth > MAX_INCLUDE_DEPTH:
            self.issues.add(pos, f"includes nested too deeply (limit {MAX_INCLUDE_DEPTH})")
            return []
        path = target
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(including), path)
        path = os.path.normpath(path)
        try:
            is_dir = os.path.isdir(path)
        except (OSError, ValueError):
            is_dir = False
        if is_dir:
            return self._include_dir(path, pos, readonly=readonly, depth=depth)
        return self._load_file(path, pos, readonly=readonly, depth=depth, target=target)

    # -- internals ---------------------------------------------------------
    def _include_dir(self, path: str, pos: Pos, *, readonly: bool, depth: int) -> list[Statement]:
        try:
            with os.scandir(path) as it:
                names = []
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_file():
                            names.append(entry.name)
                    except OSError:
                        continue
        except OSError as exc:
            self.issues.add(pos, f"cannot read directory '{path}': {exc.strerror or exc}")
            return []
        out: list[Statement] = []
        for name in sorted(names):
            out.extend(self._load_file(os.path.join(path, name), pos,
                                       readonly=readonly, depth=depth))
        return out

    def _load_file(self, path: str, pos: Pos, *, readonly: bool, depth: int,
                   top: bool = False, target: str | None = None) -> list[Statement]:
        shown = target if target is not None else path
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            real = path
        for r, p in self._stack:
            if r == real:
                chain = " -> ".join([q for _, q in self._stack] + [path])
                self.issues.add(pos, f"include cycle: {chain}")
                return []
        if len(self.source_files) >= MAX_FILES:
            self.issues.add(pos, f"too many config files (limit {MAX_FILES})")
            return []
        what = "cannot read config file" if top else f"cannot include '{shown}'"
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_FILE_SIZE:
                    self.issues.add(pos, f"{what}: file is too large ({size} bytes; "
                                         f"limit {MAX_FILE_SIZE})")
                    return []
                data = fh.read(MAX_FILE_SIZE + 1)
        except OSError as exc:
            self.issues.add(pos, f"{what}: {exc.strerror or exc}")
            return []
        except ValueError as exc:  # e.g. embedded NUL in the path
            self.issues.add(pos, f"{what}: {exc}")
            return []
        if len(data) > MAX_FILE_SIZE:
            self.issues.add(pos, f"{what}: file is too large (limit {MAX_FILE_SIZE} bytes)")
            return []
        if path not in self.source_files:
            self.source_files.append(path)
        elif not top:
            # spec §1.1: a file included more than once becomes read-only
            self.readonly_files.add(path)
        if readonly:
            self.readonly_files.add(path)
        text = decode_source(data, path, self.issues)
        self._stack.append((real, path))
        try:
            return self._parse_text(text, path, depth)
        finally:
            self._stack.pop()

    def _parse_text(self, text: str, file: str, depth: int) -> list[Statement]:
        tokens = tokenize(text, file, self.issues)
        return _Parser(tokens, self.issues, self, file, depth).parse_file()


def parse_file(path: str, issues: Issues) -> ParseResult:
    loader = Loader(issues)
    stmts = loader.load_top(os.fspath(path))
    return ParseResult(stmts, loader.source_files, loader.readonly_files)


def parse_text(text: str, file: str, issues: Issues) -> ParseResult:
    loader = Loader(issues)
    stmts = loader.load_text(text, file)
    return ParseResult(stmts, loader.source_files, loader.readonly_files)
