"""Impetus configuration: Momentum's ``ecelerity.conf`` language.

    from impetus.config import load_config, Config, ConfigError

    cfg = load_config("/etc/impetus/ecelerity.conf")
    cfg.lookup("Retry_Interval", domain="example.com", binding="b1")

See :mod:`impetus.config.model` for the fallback rules and
:mod:`impetus.config.options` for the option table.
"""

from __future__ import annotations

import os

from .errors import ConfigError, ConfigIssue, Issues, Pos
from .model import (Config, ListenerConfig, LoggerConfig, Resolved, Scope, build_config,
                    normalize_domain)
from .options import (OPTIONS, OptionSpec, get_option, option_rows, render_options_markdown,
                      render_options_table)
from .parser import parse_file, parse_text

__all__ = [
    "Config", "ConfigError", "ConfigIssue", "ListenerConfig", "LoggerConfig", "OPTIONS",
    "OptionSpec", "Pos", "Resolved", "Scope", "get_option", "load_config",
    "load_config_string", "normalize_domain", "option_rows", "render_options_markdown",
    "render_options_table",
]


def _finish(result, issues: Issues) -> Config:
    cfg = None
    try:
        cfg = build_config(result.statements, result.source_files, result.readonly_files,
                           issues)
    except RecursionError:  # pragma: no cover - nesting is limited by the parser
        issues.add(Pos(result.source_files[0] if result.source_files else "?", 1, 1),
                   "configuration nested too deeply")
    if issues:
        order = {f: i for i, f in enumerate(result.source_files)}
        issues.items.sort(key=lambda i: (order.get(i.file, -1), i.line, i.col))
    issues.raise_if_any()
    assert cfg is not None
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Read, validate and return the configuration rooted at ``path``.

    Raises :class:`ConfigError` listing every problem found.
    """
    issues = Issues()
    result = parse_file(os.fspath(path), issues)
    return _finish(result, issues)


def load_config_string(text: str, filename: str = "<string>") -> Config:
    """Like :func:`load_config` for text in memory.  Relative includes are
    resolved against the directory of ``filename`` (the current directory
    for ``<string>``)."""
    issues = Issues()
    result = parse_text(text, filename, issues)
    return _finish(result, issues)
