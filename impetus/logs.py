"""Momentum-compatible log writers: mainlog, bouncelog, rejectlog, paniclog.

The line formats are those of spec §12 and are a contract, field for field:

* mainlog (§12.1), ``@``-delimited, one record per line::

    time@msgid@batchid@connid@R@rcpt_local@rcpt_domain@sender_local@sender_domain@peer_ip@size@proto@binding_group@binding
    time@msgid@batchid@connid@D@domain@size@binding_group@binding@retries@secs_since_reception@remote_ip
    time@msgid@batchid@connid@T@domain@bytes_sent@binding_group@binding@stage@retries@secs_since_reception@remote_ip@response
    time@msgid@batchid@connid@P@...same fields as T...
    time@@@@M                                              (heartbeat)

* bouncelog (§12.2)::

    time@msgid@batchid@connid@B@rcpt_local@rcpt_domain@sender_local@sender_domain@binding_group@binding@stage@bounce_class@size@remote_ip@raw_response
    time@@@@M1                                             (heartbeat)

* rejectlog (§12.3)::

    <time>: R="ip:port" L="ip:port" C="connid" PATH="p" PATH_GRP="g" P="phase" E=code M=module CTXCONN=[k=v,...] CTXMESS=[k=v,...] text
    <time>: Marker 1                                       (heartbeat)

* paniclog (§12.6): ``<time>: text``.

``time`` is integer Unix epoch seconds, or 16-digit epoch microseconds when
``hires=True`` (Momentum's ``log_hires_timestamp``).  ``secs_since_reception``
is written with two decimals (``18.53``).  ``None`` in any field is written
as the empty string (e.g. no remote IP because no connection was made).

Field escaping (``escape_field``)
---------------------------------
Applied to every text field of the ``@``-delimited logs (documented by
Momentum for acctlog; spec §12 says to do the same everywhere):

=====================  ==========================
character              written as
=====================  ==========================
``@``                  ``\\@``
``\\``                 ``\\\\``
LF, CR, TAB            ``\\n``, ``\\r``, ``\\t``
other C0 controls, DEL ``\\xNN`` (two hex digits)
undecodable byte       ``\\xNN`` (the raw byte; see below)
C1 controls, U+2028,   ``\\uNNNN``
U+2029, lone surrogate
=====================  ==========================

A field given as ``bytes`` is decoded as UTF-8 with ``surrogateescape`` so an
undecodable byte 0xNN (e.g. in a remote server's response) shows as ``\\xNN``.
Everything else (printable ASCII and printable non-ASCII) is written as UTF-8.
A log line therefore never contains a raw newline and the only unescaped
``@`` are field separators.  ``unescape_field`` is the exact inverse.

In the rejectlog the quoted values escape ``"`` and ``\\`` with a backslash,
the ``CTXCONN``/``CTXMESS`` items escape ``,``, ``=``, ``]`` and ``\\``;
control characters everywhere (including the free error text and the
paniclog text) use the table above.

Buffering and durability
------------------------
Each log appends finished lines to an in-memory buffer and writes the buffer
with a single ``write(2)`` on an ``O_APPEND`` descriptor:

* inside a running asyncio loop the first record after a flush schedules a
  flush with ``loop.call_soon``, so a burst of records produced during one
  loop iteration costs one system call;
* outside a running loop (CLI tools, threads without a loop) every record is
  written at once;
* the buffer is flushed at once when it grows past ``FLUSH_THRESHOLD``
  (64 KiB), and on ``flush()``, ``reopen()`` and ``close()``.

Logs are never fsync'd: the spool is the durable record.  A write error is
reported once through the stdlib ``logging`` module (logger
``impetus.logs``), counted in ``write_errors`` and the unwritten lines are
dropped: logging never takes the MTA down.  ``reopen()`` supports rotation
(rename the file, then reopen).  Files are opened in append mode; a file we
create gets ``mode`` (default ``0o644``, applied with ``fchmod`` so the umask
does not interfere); an existing file keeps its permissions.

A log built with ``path=None`` is disabled: all its methods are cheap no-ops.
Records written after ``close()`` are dropped.

The writers take a lock around the buffer, so calling them from a helper
thread is safe, but they are meant for the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FLUSH_THRESHOLD",
    "escape_field",
    "unescape_field",
    "split_address",
    "LogFile",
    "MainLog",
    "BounceLog",
    "RejectLog",
    "PanicLog",
    "Logs",
    "classify_bounce",
    "BOUNCE_CLASSES",
    "STAGES",
]

_log = logging.getLogger("impetus.logs")

FLUSH_THRESHOLD = 64 * 1024

# --------------------------------------------------------------------------
# Escaping
# --------------------------------------------------------------------------

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "@": "\\@"}

# Characters that need a rewrite in @-delimited fields.
_AT_SPECIAL = re.compile("[@\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Control characters only (free text: paniclog, rejectlog tail).
_CTRL_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _esc_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if o < 0x80:  # C0 controls and DEL
        return "\\x%02x" % o
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape'd raw byte
        return "\\x%02x" % (o - 0xDC00)
    return "\\u%04x" % o  # C1 controls, U+2028/2029, other lone surrogates


def _esc_match(m: re.Match[str]) -> str:
    return _esc_char(m.group())


def _to_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def escape_field(value: Any) -> str:
    """Escape one field of an ``@``-delimited log (see module docstring).

    ``None`` becomes ``""``; ``bytes`` are decoded as UTF-8 with
    ``surrogateescape``; other non-strings go through ``str()``.
    """
    s = _to_str(value)
    # Fast path: printable text without '@' or '\' needs nothing (every
    # character we rewrite is either '@', '\' or non-printable).
    if s.isprintable() and "@" not in s and "\\" not in s:
        return s
    return _AT_SPECIAL.sub(_esc_match, s)


def _escape_text(value: Any) -> str:
    """Escape free text: backslash and control characters, not ``@``."""
    s = _to_str(value)
    if s.isprintable() and "\\" not in s:
        return s
    return _CTRL_SPECIAL.sub(_esc_match, s)


_UNESC = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.S)
_UNNAMED = {"n": "\n", "r": "\r", "t": "\t"}


def _unesc_match(m: re.Match[str]) -> str:
    g = m.group(1)
    if len(g) == 1:
        return _UNNAMED.get(g, g)
    o = int(g[1:], 16)
    if g[0] == "x" and o >= 0x80:
        return chr(0xDC00 + o)  # raw byte, as surrogateescape
    return chr(o)


def unescape_field(text: str) -> str:
    """Inverse of :func:`escape_field` (raw bytes come back surrogateescaped)."""
    if "\\" not in text:
        return text
    return _UNESC.sub(_unesc_match, text)



def split_record(line: str) -> list[str]:
    """Fields of one ``@``-delimited log line (mainlog, bouncelog), split on
    unescaped ``@`` and unescaped with :func:`unescape_field`."""
    fields, start, i, n = [], 0, 0, len(line)
    while i < n:
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c == "@":
            fields.append(unescape_field(line[start:i]))
            start = i + 1
        i += 1
    fields.append(unescape_field(line[start:]))
    return fields

def _join(fields: tuple[Any, ...]) -> str:
    """``@``-join escaped fields; one whole-line check in the common case."""
    vals = [v if v.__class__ is str else (str(v) if v.__class__ is int else _to_str(v))
            for v in fields]
    line = "@".join(vals)
    if line.isprintable() and "\\" not in line and line.count("@") == len(vals) - 1:
        return line
    return "@".join([escape_field(v) for v in vals])


def split_address(addr: Any) -> tuple[str, str]:
    """Split ``local@domain`` at the last ``@``.

    Surrounding ``<>`` are removed.  The null sender (``""`` or ``<>``)
    gives ``("", "")``; an address without ``@`` gives ``(addr, "")``.
    """
    s = _to_str(addr).strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if not s:
        return "", ""
    local, sep, domain = s.rpartition("@")
    if not sep:
        return s, ""
    return local, domain


def _fmt_secs(value: Any) -> str:
    if value is None:
        return ""
    return "%.2f" % float(value)


# --------------------------------------------------------------------------
# Buffered append-only file
# --------------------------------------------------------------------------


def _parse_mode(mode: Any) -> int:
    if mode is None:
        return 0o644
    if isinstance(mode, str):
        return int(mode, 8)
    return int(mode)


class LogFile:
    """A buffered, append-only log file (see module docstring).

    ``path=None`` gives a disabled log: ``enabled`` is False and writing is
    a no-op.  ``clock`` returns the current time as float epoch seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        mode: int | str | None = 0o644,
        clock: Callable[[], float] = time.time,
        hires: bool = False,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.mode = _parse_mode(mode)
        self.clock = clock
        self.hires = hires
        self.write_errors = 0
        self.closed = False
        self._buf: list[bytes] = []
        self._size = 0
        self._fd: int | None = None
        self._scheduled_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        if self.path is not None:
            self._fd = self._open()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    # -- file handling -----------------------------------------------------

    def _open(self) -> int:
        assert self.path is not None
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)  # e.g. /var/log/impetus on a new host
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, self.mode)
        except FileExistsError:
            return os.open(self.path, flags)
        try:
            os.fchmod(fd, self.mode)
        except OSError:  # pragma: no cover - e.g. odd filesystems
            pass
        return fd

    def _write_all(self, data: bytes) -> None:
        """Write ``data`` to the descriptor (one syscall unless partial)."""
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def _flush_locked(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        if self._fd is None:
            return
        try:
            self._write_all(data)
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                _log.error(
                    "cannot write log %s (%d errors so far): %s",
                    self.path, self.write_errors, exc,
                )

    def flush(self) -> None:
        """Write out everything buffered (one ``write`` call)."""
        with self._lock:
            self._flush_locked()

    def _scheduled_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._scheduled_loop is loop:
                self._scheduled_loop = None
            self._flush_locked()

    def reopen(self) -> bool:
        """Flush, then reopen ``path`` (after the file was rotated).

        If the new file cannot be opened, the error is logged, the old
        descriptor is kept and False is returned; otherwise True.
        """
        if self.path is None or self.closed:
            return False
        with self._lock:
            self._flush_locked()
            try:
                new = self._open()
            except OSError as exc:
                _log.error("cannot reopen log %s: %s", self.path, exc)
                return False
            old, self._fd = self._fd, new
            if old is not None:
                try:
                    os.close(old)
                except OSError:  # pragma: no cover
                    pass
            return True

    def close(self) -> None:
        """Flush and close; later records are dropped."""
        if self.closed:
            return
        with self._lock:
            self._flush_locked()
            self.closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def fileno(self) -> int | None:
        return self._fd

    # -- writing -----------------------------------------------------------

    def now(self) -> str:
        t = self.clock()
        if self.hires:
            return str(int(t * 1_000_000))
        return str(int(t))

    def write_line(self, line: str) -> None:
        """Queue one line (without its newline) for writing."""
        if self._fd is None:
            return
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._buf.append(data)
            self._size += len(data)
            if loop is None or self._size > FLUSH_THRESHOLD:
                self._flush_locked()
            if loop is not None and self._scheduled_loop is not loop:
                self._scheduled_loop = loop
                loop.call_soon(self._scheduled_flush, loop)

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# The logs
# --------------------------------------------------------------------------


class MainLog(LogFile):
    """mainlog writer (§12.1).  Records: R, D (or X), T, P, heartbeat M."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        mode: int | str | None = 0o644,
        clock: Callable[[], float] = time.time,
        hires: bool = False,
        log_receptions: bool = True,
        log_deliveries: bool = True,
        log_transient_failures: bool = True,
        log_permanent_failures: bool = True,
    ) -> None:
        super().__init__(path, mode=mode, clock=clock, hires=hires)
        self.log_receptions = log_receptions
        self.log_deliveries = log_deliveries
        self.log_transient_failures = log_transient_failures
        self.log_permanent_failures = log_permanent_failures

    def reception(self, msgid, batchid, connid, rcpt, sender, peer_ip, size,
                  proto, group, binding) -> None:
        """``R``: one line per recipient; ``rcpt``/``sender`` are full addresses."""
        if self._fd is None or not self.log_receptions:
            return
        rl, rd = split_address(rcpt)
        sl, sd = split_address(sender)
        self.write_line(self.now() + "@" + _join((
            msgid, batchid, connid, "R", rl, rd, sl, sd, peer_ip, size, proto,
            group, binding)))

    def delivery(self, msgid, batchid, connid, domain, size, group, binding,
                 retries, secs_since_reception, remote_ip, *,
                 record_type: str = "D") -> None:
        """``D`` (or ``record_type="X"`` for a cluster transfer)."""
        if self._fd is None or not self.log_deliveries:
            return
        self.write_line(self.now() + "@" + _join((
            msgid, batchid, connid, record_type, domain, size, group, binding,
            retries, _fmt_secs(secs_since_reception), remote_ip)))

    def _failure(self, rtype, msgid, batchid, connid, domain, bytes_sent, group,
                 binding, stage, retries, secs_since_reception, remote_ip,
                 response) -> None:
        self.write_line(self.now() + "@" + _join((
            msgid, batchid, connid, rtype, domain, bytes_sent, group, binding,
            stage, retries, _fmt_secs(secs_since_reception), remote_ip, response)))

    def transient(self, msgid, batchid, connid, domain, bytes_sent, group,
                  binding, stage, retries, secs_since_reception, remote_ip,
                  response) -> None:
        """``T``: transient failure; ``stage`` is a §12.5 code."""
        if self._fd is None or not self.log_transient_failures:
            return
        self._failure("T", msgid, batchid, connid, domain, bytes_sent, group,
                      binding, stage, retries, secs_since_reception, remote_ip,
                      response)

    def permanent(self, msgid, batchid, connid, domain, bytes_sent, group,
                  binding, stage, retries, secs_since_reception, remote_ip,
                  response) -> None:
        """``P``: permanent failure (same fields as ``T``)."""
        if self._fd is None or not self.log_permanent_failures:
            return
        self._failure("P", msgid, batchid, connid, domain, bytes_sent, group,
                      binding, stage, retries, secs_since_reception, remote_ip,
                      response)

    def heartbeat(self) -> None:
        if self._fd is None:
            return
        self.write_line(f"{self.now()}@@@@M")


class BounceLog(LogFile):
    """bouncelog writer (§12.2).  Records: B (or T), heartbeat M1."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        mode: int | str | None = 0o644,
        clock: Callable[[], float] = time.time,
        hires: bool = False,
        log_transient_failures: bool = True,
        log_inband_bounces: bool = True,
        log_outofband_bounces: bool = True,
    ) -> None:
        super().__init__(path, mode=mode, clock=clock, hires=hires)
        self.log_transient_failures = log_transient_failures
        self.log_inband_bounces = log_inband_bounces
        self.log_outofband_bounces = log_outofband_bounces

    def bounce(self, msgid, batchid, connid, rcpt, sender, group, binding,
               stage, bounce_class, size, remote_ip, raw_response,
               record_type: str = "B") -> None:
        """``B`` (bounce; stage 21 = out-of-band) or ``T`` (transient)."""
        if self._fd is None:
            return
        if record_type == "T":
            if not self.log_transient_failures:
                return
        elif not (self.log_outofband_bounces if stage == 21 else self.log_inband_bounces):
            return
        rl, rd = split_address(rcpt)
        sl, sd = split_address(sender)
        self.write_line(self.now() + "@" + _join((
            msgid, batchid, connid, record_type, rl, rd, sl, sd, group, binding,
            stage, bounce_class, size, remote_ip, raw_response)))

    def heartbeat(self) -> None:
        if self._fd is None:
            return
        self.write_line(f"{self.now()}@@@@M1")


_QUOTED_SPECIAL = re.compile('["\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]')
_CTX_SPECIAL = re.compile("[,=\\]\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _esc_quoted(value: Any) -> str:
    s = _to_str(value)
    if s.isprintable() and '"' not in s and "\\" not in s:
        return s
    return _QUOTED_SPECIAL.sub(
        lambda m: "\\" + m.group() if m.group() in '"\\' else _esc_char(m.group()), s)


def _esc_ctx(value: Any) -> str:
    s = _to_str(value)
    if s.isprintable() and not any(c in s for c in ",=]\\"):
        return s
    return _CTX_SPECIAL.sub(
        lambda m: "\\" + m.group() if m.group() in ",=]\\" else _esc_char(m.group()), s)


def _fmt_ctx(ctx: Mapping[str, Any] | None) -> str:
    if not ctx:
        return "[]"
    return "[" + ",".join(f"{_esc_ctx(k)}={_esc_ctx(v)}" for k, v in ctx.items()) + "]"


def _fmt_hostport(value: Any) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    return _to_str(value)


class RejectLog(LogFile):
    """rejectlog writer (§12.3).  Heartbeat ``<time>: Marker 1``."""

    def reject(self, *, remote: Any, local: Any, connid: Any, code: Any,
               text: Any, phase: str = "", path: str = "", path_group: str = "",
               module: str = "", ctxconn: Mapping[str, Any] | None = None,
               ctxmess: Mapping[str, Any] | None = None) -> None:
        """One rejection.  ``remote``/``local`` are ``"ip:port"`` strings or
        ``(ip, port)`` tuples; ``ctxconn``/``ctxmess`` are mappings written as
        ``[k=v,...]``; ``text`` is the error text sent to the client."""
        if self._fd is None:
            return
        q = _esc_quoted
        self.write_line(
            f'{self.now()}: R="{q(_fmt_hostport(remote))}" L="{q(_fmt_hostport(local))}"'
            f' C="{q(connid)}" PATH="{q(path)}" PATH_GRP="{q(path_group)}"'
            f' P="{q(phase)}" E={_escape_text(code)} M={_escape_text(module)}'
            f" CTXCONN={_fmt_ctx(ctxconn)} CTXMESS={_fmt_ctx(ctxmess)}"
            f" {_escape_text(text)}"
        )

    def heartbeat(self) -> None:
        if self._fd is None:
            return
        self.write_line(f"{self.now()}: Marker 1")


class PanicLog(LogFile):
    """paniclog writer (§12.6): ``<time>: text``; no heartbeat."""

    def panic(self, text: Any) -> None:
        if self._fd is None:
            return
        self.write_line(f"{self.now()}: {_escape_text(text)}")

    log = panic

    def heartbeat(self) -> None:
        """The paniclog has no heartbeat; kept for a uniform interface."""


class Logs:
    """The set of logs of a running server.

    Every attribute (``mainlog``, ``bouncelog``, ``rejectlog``,
    ``paniclog``) is always a log object; a log whose path is None is
    disabled and its methods are no-ops.
    """

    def __init__(
        self,
        *,
        mainlog: str | os.PathLike[str] | None = None,
        rejectlog: str | os.PathLike[str] | None = None,
        paniclog: str | os.PathLike[str] | None = None,
        bouncelog: str | os.PathLike[str] | None = None,
        mode: int | str | None = 0o644,
        modes: Mapping[str, int | str | None] | None = None,
        clock: Callable[[], float] = time.time,
        hires: bool = False,
        mainlog_options: Mapping[str, bool] | None = None,
        bouncelog_options: Mapping[str, bool] | None = None,
    ) -> None:
        modes = dict(modes or {})

        def m(name: str) -> int:
            v = modes.get(name)
            return _parse_mode(mode if v is None else v)

        common = {"clock": clock, "hires": hires}
        self.mainlog = MainLog(mainlog, mode=m("mainlog"), **common,
                               **dict(mainlog_options or {}))
        self.rejectlog = RejectLog(rejectlog, mode=m("rejectlog"), **common)
        self.paniclog = PanicLog(paniclog, mode=m("paniclog"), **common)
        self.bouncelog = BounceLog(bouncelog, mode=m("bouncelog"), **common,
                                   **dict(bouncelog_options or {}))
        self._heartbeat_tasks: list[asyncio.Task[None]] = []
        self.heartbeat_interval: float = 60
        self.bounce_heartbeat_interval: float = 60

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Logs:
        """Build from ``config.loggers`` (``impetus.config.LoggerConfig``).

        Uses the ``mainlog``/``rejectlog``/``paniclog``/``bouncelog`` paths,
        the ``*_mode`` values, the ``log_receptions``, ``log_deliveries``,
        ``log_transient_failures``, ``log_permanent_failures`` toggles
        (mainlog), ``log_rejections`` (false disables the rejectlog),
        ``log_inband_bounces``, ``log_outofband_bounces``,
        ``bounce_log_transient_failures`` (bouncelog), ``heartbeat`` and
        ``bounce_heartbeat`` (defaults of :meth:`start_heartbeat`) and
        ``log_hires_timestamp`` when present.  Missing attributes take the
        documented defaults.
        """
        lg = config.loggers
        g = lambda name, default=None: getattr(lg, name, default)  # noqa: E731
        modes = {n: g(f"{n}_mode") for n in ("mainlog", "rejectlog", "paniclog", "bouncelog")}
        kwargs.setdefault("hires", bool(g("log_hires_timestamp", False)))
        kwargs.setdefault("mainlog_options", {
            n: bool(g(n, True)) for n in (
                "log_receptions", "log_deliveries", "log_transient_failures",
                "log_permanent_failures")})
        kwargs.setdefault("bouncelog_options", {
            "log_transient_failures": bool(g("bounce_log_transient_failures", True)),
            "log_inband_bounces": bool(g("log_inband_bounces", True)),
            "log_outofband_bounces": bool(g("log_outofband_bounces", True)),
        })
        logs = cls(
            mainlog=g("mainlog"),
            rejectlog=g("rejectlog") if g("log_rejections", True) else None,
            paniclog=g("paniclog"),
            bouncelog=g("bouncelog"),
            modes=modes,
            **kwargs,
        )
        logs.heartbeat_interval = g("heartbeat", 60)
        logs.bounce_heartbeat_interval = g("bounce_heartbeat", logs.heartbeat_interval)
        return logs

    @property
    def all(self) -> tuple[LogFile, ...]:
        return (self.mainlog, self.rejectlog, self.paniclog, self.bouncelog)

    def flush_all(self) -> None:
        for lf in self.all:
            lf.flush()

    def reopen_all(self) -> None:
        for lf in self.all:
            lf.reopen()

    def heartbeat_all(self) -> None:
        """Write a heartbeat line in mainlog, bouncelog and rejectlog."""
        self.mainlog.heartbeat()
        self.bouncelog.heartbeat()
        self.rejectlog.heartbeat()

    def start_heartbeat(self, interval: float | None = None,
                        bounce_interval: float | None = None) -> list[asyncio.Task[None]]:
        """Start periodic heartbeats (must be called inside a running loop).

        Every ``interval`` seconds (default ``heartbeat_interval``: 60, or
        the config's ``heartbeat``) the mainlog and rejectlog get a
        heartbeat; every ``bounce_interval`` seconds (default: the config's
        bounce_logger ``heartbeat`` if built with :meth:`from_config`, else
        ``interval``) the bouncelog.  A non-positive interval disables that
        heartbeat.  The tasks stop on :meth:`stop_heartbeat` / :meth:`close`.
        Returns the started tasks.
        """
        self.stop_heartbeat()
        if interval is None:
            interval = self.heartbeat_interval
            if bounce_interval is None:
                bounce_interval = self.bounce_heartbeat_interval
        if bounce_interval is None:
            bounce_interval = interval

        async def beat(period: float, fns: tuple[Callable[[], None], ...]) -> None:
            while True:
                await asyncio.sleep(period)
                for fn in fns:
                    fn()

        if interval and interval > 0:
            self._heartbeat_tasks.append(asyncio.create_task(
                beat(interval, (self.mainlog.heartbeat, self.rejectlog.heartbeat))))
        if bounce_interval and bounce_interval > 0:
            self._heartbeat_tasks.append(asyncio.create_task(
                beat(bounce_interval, (self.bouncelog.heartbeat,))))
        return list(self._heartbeat_tasks)

    def stop_heartbeat(self) -> None:
        for t in self._heartbeat_tasks:
            t.cancel()
        self._heartbeat_tasks.clear()

    def close(self) -> None:
        self.stop_heartbeat()
        for lf in self.all:
            lf.close()


# --------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------

#: §12.5 connection stage codes.
STAGES = {
    "not_connected": 0, "idle": 1, "during_mail_from": 2, "after_mail_from": 3,
    "during_rcpt_to": 4, "after_rcpt_to": 5, "during_data": 6, "after_data": 7,
    "sending_body": 8, "reading_confirmation": 9, "during_ehlo": 10,
    "after_ehlo": 11, "reading_banner": 12, "during_rset": 13, "after_rset": 14,
    "during_starttls": 15, "after_starttls": 16, "tls_handshake": 17,
    "tls_renegotiation": 18, "during_xclient": 19, "after_xclient": 20,
    "out_of_band_bounce": 21, "unknown": 22,
}

#: §12.4 bounce classification codes.
BOUNCE_CLASSES = {
    1: "Undetermined", 10: "Invalid Recipient", 20: "Soft Bounce",
    21: "DNS Failure", 22: "Mailbox Full", 23: "Too Large", 24: "Timeout",
    25: "Admin Failure", 30: "No RCPT", 40: "Generic Bounce", 50: "Mail Block",
    51: "Spam Block", 52: "Spam Content", 53: "Prohibited Attachment",
    54: "Relaying Denied", 60: "Auto-Reply", 70: "Transient Failure",
    80: "Subscribe", 90: "Unsubscribe", 100: "Challenge-Response",
}

_LEAD = re.compile(r"\s*(?:([2-5]\d\d)[ -])?\s*(?:([245])\.(\d{1,3})\.(\d{1,3})\b)?")
_RE = lambda p: re.compile(p, re.I)  # noqa: E731
_ADMIN = _RE(r"manually|\bblackholed\b")
_EXP_TIME = _RE(r"exceeded max time|message expired|delivery time expired")
_EXP_RETRIES = _RE(r"exceeded max retries")
_DNS = _RE(r"domain lookup failed|null mx|host not found|host or domain name not found"
           r"|name service error|domain not found|no such domain|unrouteable|nxdomain")
_TIMEOUT = _RE(r"\btimed? ?out\b|\[internal\] no (?:banner|\S+(?: \S+)? response)")
_FULL = _RE(r"mailbox (?:is )?full|over ?quota|quota exceeded|exceeds? (?:\S+ )?quota"
            r"|insufficient (?:system )?storage|out of storage")
_LARGE = _RE(r"too (?:large|big)|size exceeds|exceeds (?:the )?(?:maximum |max )?"
             r"(?:message )?size|message size")
_INVALID = _RE(r"user unknown|unknown user|no such (?:user|mailbox|recipient)"
               r"|(?:mailbox|user|address|recipient) (?:does not|doesn't) exist"
               r"|invalid (?:recipient|mailbox|address)|mailbox not found"
               r"|recipient not found|mailbox unavailable|unknown recipient")
_RELAY = _RE(r"relay")
_VIRUS = _RE(r"virus|attachment|malware")
_SPAM_CONTENT = _RE(r"spam content|content (?:rejected|filter)|looks like spam"
                    r"|message (?:content )?(?:was )?(?:classified|identified|detected) as spam")
_SPAM = _RE(r"spam|black ?list|block ?list|\b(?:rbl|dnsbl|spamhaus|spamcop)\b"
            r"|listed|reputation")
_BLOCK = _RE(r"block|denied|refused|rejected|policy|prohibited|not allowed|banned")


def classify_bounce(code: int, enhanced: str | None, text: str) -> int:
    """Classify a failure into a §12.4 bounce class code.

    ``code`` is the SMTP reply code (0 if unknown: then it is taken from the
    start of ``text``), ``enhanced`` the enhanced status code ``"c.s.d"``
    (None: taken from the start of ``text`` after the optional reply code),
    ``text`` the response text (with or without the leading codes).

    Rules, first match wins (``X`` = any class, text matches ignore case):

    1.  text ``manually`` (admin purge/fail) or ``Blackholed`` -> 25 Admin.
    2.  Expiry: ``exceeded max time`` / ``message expired`` /
        ``delivery time expired`` (our 5.4.7 and 5.4.5 texts) -> 24 Timeout;
        ``exceeded max retries`` (retry count or ``Never_Retry``: the real
        cause is unknown) -> 1 Undetermined.
    3.  DNS: enhanced X.4.4 or X.1.2 (bad destination system), or text
        ``Domain Lookup Failed``, ``NULL MX``, ``host not found``,
        ``domain not found``, ... -> 21 DNS Failure.
    4.  Timeout: enhanced X.4.7 or text ``timed out``/``timeout`` or our
        ``[internal] no ... response`` / ``no banner`` -> 24 Timeout.
    5.  Enhanced X.2.2 (4.2.2 or 5.2.2) -> 22 Mailbox Full.
    6.  Enhanced X.3.4 or X.2.3 -> 23 Too Large.
    7.  4xx (reply code, or enhanced class 4 without a reply code):
        enhanced 4.1.x / 4.2.x / 4.7.x (recipient, mailbox or policy
        related: greylisting, rate limits, full mailbox wording) or text
        matching the mailbox-full/invalid-user/block words -> 20 Soft Bounce;
        any other 4xx (connection, network, system, protocol) -> 70
        Transient Failure.
    8.  5.1.x (other than 5.1.2) or 5.2.1 (mailbox disabled) -> 10 Invalid
        Recipient.
    9.  5.7.x: text ``relay`` -> 54 Relaying Denied; ``virus`` /
        ``attachment`` -> 53 Prohibited Attachment; spam-content wording
        -> 52 Spam Content; ``spam``/``blacklist``/``blocklist``/``RBL``/
        ``listed``/``reputation`` -> 51 Spam Block; anything else -> 50 Mail
        Block (5.7.x is the security/policy class).
    10. Other 5xx, by text: invalid-user wording -> 10; ``relay`` -> 54;
        mailbox full / quota -> 22; too large / size -> 23; virus /
        attachment -> 53; spam content -> 52; spam / blacklist -> 51.
    11. Any other 5xx -> 1 Undetermined; anything else (no code) -> 1.
    """
    text = text or ""
    m = _LEAD.match(text)
    if not code and m and m.group(1):
        code = int(m.group(1))
    if enhanced is None and m and m.group(2):
        enhanced = f"{m.group(2)}.{m.group(3)}.{m.group(4)}"
    cls_ = subj = det = None
    if enhanced:
        parts = enhanced.strip().split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            cls_, subj, det = (int(p) for p in parts)
    if not code and cls_ in (4, 5):
        code = cls_ * 100
    code = int(code or 0)
    sd = (subj, det)

    # 1-4: administrative, expiry, DNS, timeouts (mostly our own texts).
    if _ADMIN.search(text):
        return 25
    if _EXP_TIME.search(text):
        return 24
    if _EXP_RETRIES.search(text):
        return 1
    if sd in ((4, 4), (1, 2)) or _DNS.search(text):
        return 21
    if sd == (4, 7) or _TIMEOUT.search(text):
        return 24
    # 5-6: unambiguous enhanced codes.
    if sd == (2, 2):
        return 22
    if sd in ((3, 4), (2, 3)):
        return 23
    # 7: transient.
    if 400 <= code < 500:
        if subj in (1, 2, 7) or _FULL.search(text) or _INVALID.search(text) \
                or _BLOCK.search(text):
            return 20
        return 70
    if not 500 <= code < 600:
        return 1
    # 8-9: permanent, by enhanced code.
    if subj == 1 or sd == (2, 1):
        return 10
    if subj == 7:
        if _RELAY.search(text):
            return 54
        if _VIRUS.search(text):
            return 53
        if _SPAM_CONTENT.search(text):
            return 52
        if _SPAM.search(text):
            return 51
        return 50
    # 10: permanent, by text.
    if _INVALID.search(text):
        return 10
    if _RELAY.search(text):
        return 54
    if _FULL.search(text):
        return 22
    if _LARGE.search(text):
        return 23
    if _VIRUS.search(text):
        return 53
    if _SPAM_CONTENT.search(text):
        return 52
    if _SPAM.search(text):
        return 51
    return 1
