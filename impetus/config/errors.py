"""Configuration errors.

Every problem found in a configuration is a :class:`ConfigIssue` carrying
the file, 1-based line and column, and a message; ``str(issue)`` is
``FILE:LINE:COL: message``.  Loading collects as many issues as it can and
raises one :class:`ConfigError` holding all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

#: Stop collecting after this many issues (a binary file fed to the parser
#: would otherwise produce one issue per stray byte).
MAX_ISSUES = 200


@dataclass(frozen=True, slots=True)
class Pos:
    """A position in a config file (line and column are 1-based)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """Raised by :func:`impetus.config.load_config`; ``.issues`` lists every problem."""

    def __init__(self, issues: Iterable[ConfigIssue]):
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)


class Issues:
    """Collector used while lexing, parsing and validating."""

    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []
        self.truncated = False

    def add(self, pos: Pos, message: str) -> None:
        if len(self.items) >= MAX_ISSUES:
            if not self.truncated:
                self.truncated = True
                self.items.append(
                    ConfigIssue(pos.file, pos.line, pos.col,
                                f"too many errors (more than {MAX_ISSUES}); giving up"))
            return
        self.items.append(ConfigIssue(pos.file, pos.line, pos.col, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)
