"""``impetus top`` (and ``top`` in the console): a live view of the queues.

Every ``--interval`` seconds it asks the control listener for ``top json``
and redraws: totals, per-binding rates (received, delivered, failed per
second over the last interval), and the busiest queues (connections,
active, delayed, delivery and failure rates). ``q`` (or Ctrl-C) quits.
``--once`` prints one frame (rates over a one-second sample) and exits.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import sys
import time

from .console import ConsoleError, ControlClient


def fetch(client: ControlClient) -> dict:
    ok, text, lines = client.command("top json")
    if not ok or not lines:
        raise ConsoleError(f"top json: {text}")
    return json.loads(lines[0])


def _fmt_rate(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ago(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _table(rows, header) -> list[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    allrows = [header] + rows
    widths = [max(len(r[i]) for r in allrows) for i in range(len(header))]
    out = []
    for r in allrows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def render(frame: dict, prev: dict | None, target: str, interval: float,
           width: int = 100, height: int = 40) -> list[str]:
    dt = (frame["time"] - prev["time"]) if prev else 0.0

    def rate(now, before):
        if prev is None or dt <= 0:
            return None
        return max(0.0, (now - before) / dt)

    sm = frame["summary"]
    psm = prev["summary"] if prev else {}
    lines = [
        f"impetus top - {target}  up {_ago(frame['uptime'])}  "
        f"{time.strftime('%H:%M:%S', time.localtime(frame['time']))}  "
        f"(every {interval:g}s, q quits)",
        f"queues: active {sm['active']}  delayed {sm['delayed']}  "
        f"connections {sm['connections']}  domains {sm['domains']}",
        "rates/s: " + "  ".join(
            f"{label} {_fmt_rate(rate(sm.get(k, 0), psm.get(k, 0)))}"
            for label, k in (("received", "received"), ("delivered", "delivered"),
                             ("transient", "transient"), ("failed", "permanent"))),
        "",
    ]
    pb = prev["bindings"] if prev else {}
    queues = frame["queues"]
    brow = []
    for b in sorted(set(frame["bindings"]) | {q["binding"] for q in queues}):
        c = frame["bindings"].get(b, {})
        p = pb.get(b, {})
        qs = [q for q in queues if q["binding"] == b]
        brow.append((b, _fmt_rate(rate(c.get("received", 0), p.get("received", 0))),
                     _fmt_rate(rate(c.get("delivered", 0), p.get("delivered", 0))),
                     _fmt_rate(rate(c.get("permanent", 0), p.get("permanent", 0))),
                     sum(q["conns"] for q in qs), sum(q["active"] for q in qs),
                     sum(q["delayed"] for q in qs)))
    lines += _table(brow, ("BINDING", "RECV/s", "DELIV/s", "FAIL/s", "CONNS", "ACTIVE",
                           "DELAYED"))
    lines.append("")
    pq = {(q["binding"], q["domain"]): q for q in (prev["queues"] if prev else [])}
    qrows = []
    for q in sorted(queues, key=lambda q: (-(q["active"] + q["delayed"] + q["conns"]),
                                           q["domain"])):
        p = pq.get((q["binding"], q["domain"]), q if prev is None else
                   {"delivered": 0, "failed": 0})
        qrows.append((f"{q['domain']} ({q['binding']})", q["conns"], q["active"], q["delayed"],
                      _fmt_rate(rate(q["delivered"], p["delivered"])),
                      _fmt_rate(rate(q["failed"], p["failed"])), q["delivered"], q["failed"]))
    room = max(1, height - len(lines) - 2)
    table = _table(qrows[:room], ("DOMAIN (BINDING)", "CONNS", "ACTIVE", "DELAYED", "DELIV/s",
                                  "FAIL/s", "DELIVERED", "FAILED"))
    lines += table
    if len(qrows) > room:
        lines.append(f"... {len(qrows) - room} more queues")
    return [ln[:width] for ln in lines]


def run_top(client: ControlClient, interval: float = 2.0, once: bool = False,
            out=None) -> int:
    out = out or sys.stdout
    if once:
        prev = fetch(client)
        time.sleep(min(interval, 1.0))
        frame = fetch(client)
        size = shutil.get_terminal_size((100, 40))
        out.write("\n".join(render(frame, prev, client.target, min(interval, 1.0),
                                   size.columns, 1000)) + "\n")
        out.flush()
        return 0
    tty = sys.stdin.isatty()
    old = None
    if tty:
        import termios
        import tty as ttymod
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
        ttymod.setcbreak(fd)
    out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
    prev = None
    try:
        while True:
            frame = fetch(client)
            size = shutil.get_terminal_size((100, 40))
            body = render(frame, prev, client.target, interval, size.columns, size.lines)
            out.write("\x1b[H\x1b[2J" + "\r\n".join(body) + "\r\n")
            out.flush()
            prev = frame
            deadline = time.monotonic() + interval
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if tty:
                    ready, _, _ = select.select([sys.stdin], [], [], left)
                    if ready:
                        ch = os.read(sys.stdin.fileno(), 1)
                        if ch in (b"q", b"Q", b"\x03", b"\x04", b""):
                            return 0
                else:
                    time.sleep(left)
    except KeyboardInterrupt:
        return 0
    except ConsoleError as exc:
        out.write("\x1b[?1049l\x1b[?25h")
        print(f"impetus top: {exc}", file=sys.stderr)
        out = None
        return 2
    finally:
        if out is not None:
            out.write("\x1b[?1049l\x1b[?25h")
            out.flush()
        if old is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old)


def cmd_top(args) -> int:
    from .console import make_client
    try:
        client = make_client(args)
        client.connect()
        return run_top(client, interval=args.interval, once=args.once)
    except (ConsoleError, OSError) as exc:
        print(f"impetus top: {exc}", file=sys.stderr)
        return 2
