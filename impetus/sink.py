"""``impetus sink``: a small, fast SMTP/LMTP receiver for quickstarts, tests
and benchmarks.

It accepts every message (or answers every message with ``--reply``),
counts them, and optionally writes each one to a Maildir.  Maildir files
hold ``Return-Path:`` and one ``Delivered-To:`` line per recipient followed
by the body exactly as received (dot-unstuffed, CRLF line ends).

Output: ``impetus sink listening on HOST:PORT (smtp|lmtp)`` once the socket
is bound (the real port when ``:0`` was asked), and ``received N messages``
on exit (SIGTERM / SIGINT, exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

from .smtp.reply import Reply
from .smtp.serve import start_server
from .smtp.server import ServerSettings

__all__ = ["add_sink_parser", "run_sink", "parse_listen", "Sink", "main"]

COUNT_INTERVAL = 0.05


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all addresses) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError(f"bad listen address {text!r} (use [v6]:PORT)")
        host, port = text[1:end], text[end + 2:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad listen address {text!r} (use HOST:PORT)")
        if ":" in host:
            raise ValueError(f"bad listen address {text!r}: write IPv6 as [addr]:PORT")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in listen address {text!r}")
    return host, int(port)


def _fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def add_sink_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sink`` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "sink",
        help="run a fast SMTP/LMTP sink (tests, benchmarks)",
        description="Accept (and count, optionally store) every message.",
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT",
                   help="address to listen on; IPv6 as [::1]:PORT; port 0 picks one (default %(default)s)")
    p.add_argument("--lmtp", action="store_true", help="speak LMTP (LHLO, one reply per recipient)")
    p.add_argument("--maildir", metavar="DIR", help="write each message into this Maildir (default: discard)")
    p.add_argument("--count-file", metavar="FILE",
                   help="keep the number of received messages in FILE (atomic replace, at most every 50 ms)")
    p.add_argument("--reply", metavar='"CODE X.Y.Z TEXT"',
                   help='force this final reply for every message, e.g. "451 4.3.0 try later"')
    p.add_argument("--hostname", default=None, help="name for the banner and EHLO (default: this host's name)")
    p.add_argument("--max-size", type=int, default=0, metavar="BYTES", help="message size limit (0 = none)")
    p.add_argument("--idle-timeout", type=float, default=300, metavar="SECONDS",
                   help="close idle connections after this long (default %(default)s)")


class Sink:
    """The sink's message handler and counters."""

    def __init__(self, *, maildir: str | None = None, count_file: str | None = None,
                 reply: Reply | None = None, hostname: str = "localhost") -> None:
        self.count = 0
        self.maildir = maildir
        self.count_file = count_file
        self.forced = reply
        self.hostname = hostname.replace("/", "_").replace(":", "_")
        self._loop = None
        self._count_pending = False
        self._pid = os.getpid()
        if maildir:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    def on_message(self, envelope, session):
        """Synchronous on purpose: the glue then needs no task per message."""
        self.count += 1
        n = self.count
        if self.maildir:
            self._store(envelope, n)
        if self.count_file and not self._count_pending:
            self._count_pending = True
            self._loop.call_later(COUNT_INTERVAL, self._flush_count)
        if self.forced is not None:
            return self.forced
        return Reply(250, "2.0.0", f"Ok: queued as {self._pid:X}.{n:X}")

    def _store(self, envelope, n: int) -> None:
        head = [f"Return-Path: <{envelope.mail_from}>\r\n"]
        head += [f"Delivered-To: {r}\r\n" for r in envelope.rcpt_to]
        name = f"{time.time():.6f}.P{self._pid}Q{n}.{self.hostname}"
        tmp = os.path.join(self.maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write("".join(head).encode("utf-8"))
            f.write(envelope.body)
        os.rename(tmp, os.path.join(self.maildir, "new", name))

    def _flush_count(self) -> None:
        self._count_pending = False
        self.write_count()

    def write_count(self) -> None:
        if not self.count_file:
            return
        tmp = f"{self.count_file}.tmp.{self._pid}"
        with open(tmp, "w") as f:
            f.write(f"{self.count}\n")
        os.replace(tmp, self.count_file)


async def _serve(args, reply: Reply | None) -> int:
    loop = asyncio.get_running_loop()
    host, port = parse_listen(args.listen)
    hostname = args.hostname or socket.gethostname() or "localhost"
    try:
        sink = Sink(maildir=args.maildir, count_file=args.count_file, reply=reply, hostname=hostname)
        sink.write_count()
    except OSError as exc:
        print(f"impetus sink: {exc}", file=sys.stderr)
        return 1
    sink._loop = loop
    settings = ServerSettings(hostname=hostname, lmtp=args.lmtp, max_message_size=max(0, args.max_size))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    connections: set = set()
    try:
        server = await start_server(host, port, settings, None, sink.on_message,
                                    idle_timeout=args.idle_timeout, backlog=4096,
                                    connections=connections)
    except OSError as exc:
        print(f"impetus sink: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    bound = server.sockets[0].getsockname()
    print(f"impetus sink listening on {_fmt_hostport(bound[0], bound[1])} "
          f"({'lmtp' if args.lmtp else 'smtp'})", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for proto in list(connections):
            proto.shutdown()
        sink.write_count()
    print(f"received {sink.count} messages", flush=True)
    return 0


def run_sink(args) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    reply = None
    if args.reply:
        try:
            reply = Reply.parse(args.reply)
        except ValueError as exc:
            print(f"impetus sink: --reply: {exc}", file=sys.stderr)
            return 2
    try:
        parse_listen(args.listen)
    except ValueError as exc:
        print(f"impetus sink: --listen: {exc}", file=sys.stderr)
        return 2
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(args, reply))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the handler is set
        return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m impetus.sink [options]``."""
    p = argparse.ArgumentParser(prog="impetus sink", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run_sink(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
