"""Impetus configuration: Momentum's ``ecelerity.conf`` language.

    from impetus.config import load_config, Config, ConfigError

    cfg = load_config("/etc/impetus/ecelerity.conf")
    cfg.lookup("Retry_Interval", domain="example.com", binding="b1")

See :mod:`impetus.config.model` for the fallback rules and
:mod:`impetus.config.options` for the option table.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Names are imported lazily so that ``python -m impetus.config.options`` does not
# import the options module twice (runpy warns about that).
_LAZY = {
    "ConfigError": ".errors", "ConfigIssue": ".errors", "Issues": ".errors", "Pos": ".errors",
    "Config": ".model", "ListenerConfig": ".model", "LoggerConfig": ".model",
    "Resolved": ".model", "Scope": ".model", "build_config": ".model",
    "normalize_domain": ".model",
    "OPTIONS": ".options", "OptionSpec": ".options", "get_option": ".options",
    "option_rows": ".options", "render_options_markdown": ".options",
    "render_options_table": ".options",
    "parse_file": ".parser", "parse_text": ".parser",
}

if TYPE_CHECKING:  # pragma: no cover
    from .errors import ConfigError, ConfigIssue, Issues, Pos  # noqa: F401
    from .model import (Config, ListenerConfig, LoggerConfig, Resolved, Scope,  # noqa: F401
                        build_config, normalize_domain)
    from .options import (OPTIONS, OptionSpec, get_option, option_rows,  # noqa: F401
                          render_options_markdown, render_options_table)
    from .parser import parse_file, parse_text  # noqa: F401

__all__ = [
    "Config", "ConfigError", "ConfigIssue", "ListenerConfig", "LoggerConfig", "OPTIONS",
    "OptionSpec", "Pos", "Resolved", "Scope", "get_option", "load_config",
    "load_config_string", "normalize_domain", "option_rows", "render_options_markdown",
    "render_options_table",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _finish(result, issues) -> "Config":
    from .errors import Pos
    from .model import build_config
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


def load_config(path: str | os.PathLike) -> "Config":
    """Read, validate and return the configuration rooted at ``path``.

    Raises :class:`ConfigError` listing every problem found.
    """
    from .errors import Issues
    from .parser import parse_file
    issues = Issues()
    result = parse_file(os.fspath(path), issues)
    return _finish(result, issues)


def load_config_string(text: str, filename: str = "<string>") -> "Config":
    """Like :func:`load_config` for text in memory.  Relative includes are
    resolved against the directory of ``filename`` (the current directory
    for ``<string>``)."""
    from .errors import Issues
    from .parser import parse_text
    issues = Issues()
    result = parse_text(text, filename, issues)
    return _finish(result, issues)
