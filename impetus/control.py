"""The control listener (Momentum's ``Control_Listener``) and its commands.

``impetus console`` (see :mod:`impetus.console`) talks to it; so can
anything that can write a line to a socket.

Wire protocol
-------------

Line based, UTF-8, ``\\n`` (``\\r\\n`` accepted) line ends, one request line
per command. Every reply has the same shape, the server's greeting
included::

    +OK <short text>          (or  -ERR <short text>)
    <body line>               zero or more, dot-stuffed: a line starting
    <body line>               with "." is sent with one more "."
    .                         the terminator

Authentication (mandatory on TCP sockets, optional on Unix sockets with
``Enable_Authentication = true``) is a challenge-response against
``Control_Password_File`` (the ``impetus passwd`` file format: salted
scrypt), so no password crosses the wire:

1. the greeting's body has ``auth: scrypt`` and ``nonce: <hex>``;
2. client ``auth <user>``; reply body ``scrypt n=N,r=R,p=P <salt base64>``
   (an unknown user gets a made-up but stable salt);
3. the client derives ``key = scrypt(password, salt, n, r, p, dklen=32)``
   (the hash stored in the file) and sends
   ``proof <hex HMAC-SHA256(key, nonce + ":" + user)>``;
4. ``+OK authenticated as <user>`` or ``-ERR authentication failed``
   (three failures close the session).

Until then every other command gets ``-ERR authentication required``. The
stored hash is what proves knowledge of the password (as with DIGEST-MD5),
so keep the password file mode 0600. A session idle for ``Timeout`` seconds
(default 60) is closed. ``quit`` ends a session.
"""
from __future__ import annotations

import asyncio
import base64
import difflib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shlex
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("impetus.control")

MAX_LINE = 8192
MAX_AUTH_FAILURES = 3

#: (command words, arguments, help) -- the grammar for `help`, completion and dispatch
COMMANDS: list[tuple[str, str, str]] = [
    ("summary", "[reset]", "global counters: queues, connections, DNS, received/delivered/failed, uptime"),
    ("binding summary", "[BINDING|group:GROUP]", "per-binding connections, queues and counters"),
    ("domain", "DOMAIN|all", "route cache entry, MX list (* failed, => next), connections, queue counts"),
    ("active", "[N]", "queues with more than N active messages (C A D S columns)"),
    ("delayed", "[N]", "queues with more than N delayed messages"),
    ("mailq", "[-d DOMAIN] [-b BINDING] [-l LIMIT]", "active/delayed counts per group, binding, domain"),
    ("showqueue", "[binding B|all] DOMAIN [LIMIT,OFFSET]", "list queued messages of a domain"),
    ("refresh domain", "DOMAIN|all", "drop the route cache entry and re-resolve now"),
    ("dig", "DOMAIN", "MX (and address) lookup through the MTA's resolver and cache"),
    ("dns_cache", "stats|lookup NAME TYPE|submit NAME TYPE|flush [NAME]",
     "inspect, seed or flush the DNS cache (types MX, A, AAAA)"),
    ("flush domain", "DOMAIN|all", "make delayed mail due now"),
    ("binding flush domain", "BINDING DOMAIN|all", "make a binding's delayed mail due now"),
    ("message retry", "ID", "make one delayed message due now"),
    ("message fail", "[quiet] ID", "fail one message (554 5.7.0; bounce unless quiet)"),
    ("message details", "ID", "everything known about one queued message"),
    ("fail domain", "[quiet] DOMAIN", "fail all queued mail of a domain (bounce unless quiet)"),
    ("binding fail domain", "[quiet] BINDING DOMAIN|all [TEXT]",
     "fail a binding's queued mail of a domain, optionally with your own reply text"),
    ("reroute queue", "FROM_DOMAIN TO_DOMAIN", "move queued mail to another domain's queue and route"),
    ("rebind", "BINDING [DOMAIN] [to NEW_BINDING]",
     "re-run binding assignment (Policy_Module) for queued mail, or move it to NEW_BINDING"),
    ("route", "DOMAIN [BINDING]", "the routing decision for a domain now (as `impetus route`)"),
    ("config reload", "[PATH]", "re-read the configuration (a broken file is refused)"),
    ("config get", "[binding_group G] [binding B] [domain D] OPTION",
     "the value set in exactly that scope"),
    ("config eval", "[binding B] [domain D] OPTION", "the effective value and where it comes from"),
    ("config show", "", "every value set, scope by scope, with file and line"),
    ("show outbound", "", "open outbound connections"),
    ("reopen logs", "", "reopen the log files (after rotation)"),
    ("shutdown", "", "stop the MTA (as SIGTERM)"),
    ("version", "", "the Impetus version"),
    ("pid", "", "the main process id"),
    ("top", "[json]", "live view (console); `top json`: one frame of data as JSON"),
    ("help", "[COMMAND]", "this list"),
    ("quit", "", "end the session"),
]


# ---------------------------------------------------------------------------
# wire helpers (used by impetus.console too)


def encode_reply(ok: bool, text: str, lines=()) -> bytes:
    out = [("+OK" if ok else "-ERR") + (f" {text}" if text else "")]
    for line in lines:
        for part in str(line).split("\n"):
            part = part.rstrip("\r")
            out.append("." + part if part.startswith(".") else part)
    out.append(".")
    return ("\n".join(out) + "\n").encode("utf-8", "replace")


def auth_proof(key: bytes, nonce: str, user: str) -> str:
    return hmac.new(key, f"{nonce}:{user}".encode("utf-8"), hashlib.sha256).hexdigest()


def scrypt_key(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = 32) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * (n + p + 2) + (1 << 20), dklen=dklen)


def _b64d(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def parse_scrypt(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    """``scrypt$n=N,r=R,p=P$salt$key`` (impetus.auth format) -> parts."""
    scheme, params, salt, key = hashed.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown scheme {scheme!r}")
    kv = dict(item.split("=", 1) for item in params.split(","))
    n, r, p = int(kv["n"]), int(kv["r"]), int(kv["p"])
    if n < 2 or n > 2 ** 20 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 64:
        raise ValueError("parameters out of range")
    return n, r, p, _b64d(salt), _b64d(key)


def read_password_file(path: str) -> dict[str, str]:
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if sep and user:
                users[user] = hashed
    return users


# ---------------------------------------------------------------------------
# formatting helpers


def _ago(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d {h}h {m}m {s}s"
    if h:
        return f"{h}h {m}m {s}s"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def _table(rows: list[tuple], header: tuple) -> list[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    allrows = [tuple(header)] + rows
    widths = [max(len(r[i]) for r in allrows) for i in range(len(header))]
    out = []
    for r in allrows:
        out.append("  ".join(c.rjust(w) if c[:1].isdigit() or c == "-" else c.ljust(w)
                             for c, w in zip(r, widths)).rstrip())
    return out


class CommandError(Exception):
    """A usage or lookup error: ``-ERR <message>`` (+ optional body lines)."""

    def __init__(self, message: str, lines=()):
        super().__init__(message)
        self.lines = list(lines)


@dataclass
class Reply:
    ok: bool = True
    text: str = ""
    lines: list[str] = field(default_factory=list)
    close: bool = False
    after: object = None  # callable run after the reply is written (shutdown)


def suggest(words: list[str]) -> list[str]:
    """Close matches for an unknown command line."""
    phrases = [c[0] for c in COMMANDS]
    typed = " ".join(words[:3]).lower()
    out = []
    for n in (3, 2, 1):
        cand = " ".join(words[:n]).lower()
        for m in difflib.get_close_matches(cand, phrases, n=3, cutoff=0.6):
            if m not in out:
                out.append(m)
    for phrase in phrases:  # "binding" alone -> every "binding ..." command
        if phrase.startswith(typed + " ") and phrase not in out:
            out.append(phrase)
    return out[:6]


def match_command(words: list[str]) -> tuple[str, list[str]] | None:
    """Longest command phrase that starts ``words`` -> (phrase, rest)."""
    low = [w.lower() for w in words]
    best = None
    for phrase, _, _ in COMMANDS:
        pw = phrase.split()
        if low[:len(pw)] == pw and (best is None or len(pw) > len(best.split())):
            best = phrase
    if best is None:
        return None
    return best, words[len(best.split()):]


# ---------------------------------------------------------------------------
# the server side


class ControlServer:
    """Listens on every enabled ``Control_Listener`` ``Listen`` socket of the
    running :class:`impetus.server.Server` and runs commands against it."""

    def __init__(self, server):
        self.server = server
        self.servers: list = []
        self.paths: list[str] = []
        self.sessions: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._secret = secrets.token_bytes(32)
        self.commands = Commands(server)

    async def start(self, listeners) -> None:
        for lc in listeners:
            handler = lambda r, w, lc=lc: self._session(r, w, lc)  # noqa: E731
            try:
                if lc.path is not None:
                    self._remove_stale(lc.path)
                    srv = await asyncio.start_unix_server(handler, lc.path, limit=MAX_LINE * 2)
                    mode = lc.lookup("File_Mode")
                    os.chmod(lc.path, 0o600 if mode is None else mode)
                    self.paths.append(lc.path)
                else:
                    srv = await asyncio.start_server(handler, lc.host, lc.port,
                                                     limit=MAX_LINE * 2, reuse_address=True)
            except OSError as exc:
                raise OSError(f"Control_Listener Listen \"{lc.address}\": "
                              f"{exc.strerror or exc}") from None
            self.servers.append(srv)
            print(f"impetus: control listening on {lc.address}", flush=True)

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"control socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of an unclean stop
        else:
            raise OSError(f"control socket {path} is in use by another process")
        finally:
            probe.close()

    async def stop(self) -> None:
        for srv in self.servers:
            srv.close()
        current = asyncio.current_task()
        from .http_api import close_sessions
        await close_sessions({t: w for t, w in self.sessions.items() if t is not current})
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _fake_salt(self, user: str) -> bytes:
        return hmac.new(self._secret, user.encode("utf-8", "replace"), hashlib.sha256).digest()[:16]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lc):
        task = asyncio.current_task()
        self.sessions[task] = writer
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        need_auth = bool(lc.lookup("Enable_Authentication")) or lc.path is None
        timeout = lc.lookup("Timeout") or 60
        nonce = secrets.token_hex(16)
        user = None
        pending_user = None
        failures = 0
        from . import __version__
        greeting = ["auth: scrypt", f"nonce: {nonce}"] if need_auth else ["auth: none"]
        try:
            writer.write(encode_reply(True, f"impetus {__version__} control", greeting))
            await writer.drain()
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readline(), timeout)
                except asyncio.TimeoutError:
                    break  # idle: close quietly (the console reconnects on its next command)
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode_reply(False, f"line too long (max {MAX_LINE} bytes)"))
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                verb = line.split(None, 1)[0].lower()
                if need_auth and user is None:
                    if verb == "quit":
                        writer.write(encode_reply(True, "bye"))
                        break
                    if verb == "auth":
                        parts = line.split()
                        if len(parts) != 2:
                            reply = Reply(False, "usage: auth USER")
                        else:
                            pending_user = parts[1]
                            reply = self._challenge(lc, pending_user)
                    elif verb == "proof" and pending_user is not None:
                        parts = line.split()
                        ok = len(parts) == 2 and await self._check_proof(
                            lc, pending_user, nonce, parts[1])
                        if ok:
                            user = pending_user
                            reply = Reply(True, f"authenticated as {user}")
                        else:
                            failures += 1
                            self.server.logs.paniclog.panic(
                                f"control: authentication failed for {pending_user!r} from "
                                f"{peer_text}")
                            reply = Reply(False, "authentication failed",
                                          close=failures >= MAX_AUTH_FAILURES)
                            pending_user = None
                            await asyncio.sleep(0.2 * failures)
                    else:
                        reply = Reply(False, "authentication required (auth USER, then proof)")
                else:
                    reply = await self.commands.run(line, who=f"{user or 'local'}@{peer_text}")
                writer.write(encode_reply(reply.ok, reply.text, reply.lines))
                await writer.drain()
                if reply.after is not None:
                    reply.after()
                if reply.close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one command must not take the MTA down
            log.exception("control session failed")
        finally:
            self.sessions.pop(task, None)
            try:
                await writer.drain()
            except Exception:
                pass
            writer.close()

    def _password_file(self, lc) -> str | None:
        return lc.lookup("Control_Password_File")

    def _challenge(self, lc, user: str) -> Reply:
        n, r, p, salt = 2 ** 14, 8, 1, self._fake_salt(user)
        path = self._password_file(lc)
        try:
            hashed = read_password_file(path).get(user) if path else None
            if hashed is not None:
                n, r, p, salt, _ = parse_scrypt(hashed)
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            self.server.logs.paniclog.panic(f"control: password file {path}: {exc}")
        salt_text = base64.b64encode(salt).decode("ascii").rstrip("=")
        return Reply(True, "scrypt", [f"scrypt n={n},r={r},p={p} {salt_text}"])

    async def _check_proof(self, lc, user: str, nonce: str, proof: str) -> bool:
        path = self._password_file(lc)
        if not path:
            return False
        try:
            hashed = read_password_file(path).get(user)
            if hashed is None:
                return False
            *_, key = parse_scrypt(hashed)
        except (OSError, ValueError, KeyError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(auth_proof(key, nonce, user), proof.lower())


# ---------------------------------------------------------------------------
# commands


MANUAL_PURGE = ("554", "5.7.0", "[internal] Message manually purged")
MANUAL_FAIL = ("554", "5.7.0", "[internal] Message manually failed")


def _reply_from_text(text: str | None, default):
    from .smtp.reply import Reply as SmtpReply
    if not text:
        return SmtpReply(int(default[0]), default[1], default[2])
    parts = text.split(None, 2)
    if parts and parts[0].isdigit() and len(parts[0]) == 3 and parts[0][0] in "45":
        code = int(parts[0])
        enhanced = None
        rest = parts[1:]
        if rest and rest[0][:1] in "45" and rest[0].count(".") == 2:
            enhanced = rest[0]
            rest = rest[1:]
        return SmtpReply(code, enhanced or f"{code // 100}.0.0", " ".join(rest) or "failed")
    return SmtpReply(int(default[0]), default[1], text)


class Commands:
    def __init__(self, server):
        self.server = server
        self.handlers = {phrase: getattr(self, "cmd_" + phrase.replace(" ", "_"))
                         for phrase, _, _ in COMMANDS}

    @property
    def sched(self):
        return self.server.scheduler

    async def run(self, line: str, who: str = "") -> Reply:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return Reply(False, f"cannot parse the command: {exc}")
        if not words:
            return Reply(True, "")
        reply = await self._run(words)
        if self._changes_state(words):
            # An audit trail of what operators did to the queues.
            outcome = "ok" if reply.ok else f"refused: {reply.text}"
            summary = "; ".join(reply.lines[:2]) if reply.ok else ""
            self.server.logs.paniclog.panic(
                f"control command by {who or 'unknown'}: {' '.join(words)[:300]} -> {outcome}"
                + (f" ({summary[:300]})" if summary else ""))
        return reply

    _MUTATING = ("refresh", "flush", "binding flush", "binding fail", "message retry",
                 "message fail", "fail", "reroute", "rebind", "config reload", "reopen",
                 "shutdown", "summary reset", "dns_cache flush", "dns_cache submit")

    @classmethod
    def _changes_state(cls, words: list[str]) -> bool:
        text = " ".join(w.lower() for w in words)
        return any(text == m or text.startswith(m + " ") for m in cls._MUTATING)

    async def _run(self, words: list[str]) -> Reply:
        found = match_command(words)
        if found is None:
            close = suggest(words)
            text = f"unknown command '{words[0] if len(words) == 1 else ' '.join(words[:2])}'"
            lines = ([f"did you mean: {', '.join(close)}?"] if close else []) + [
                "type 'help' for the list of commands"]
            return Reply(False, text, lines)
        phrase, args = found
        try:
            result = self.handlers[phrase](args)
            if asyncio.iscoroutine(result):
                result = await result
        except CommandError as exc:
            usage = next(f"{p} {a}".strip() for p, a, _ in COMMANDS if p == phrase)
            return Reply(False, str(exc), exc.lines or [f"usage: {usage}"])
        except Exception as exc:  # a bug in one command must not end the session
            log.exception("console command %r failed", phrase)
            self.server.logs.paniclog.panic(f"control: command {phrase!r} failed: {exc!r}")
            return Reply(False, f"internal error in {phrase!r}: {exc!r}")
        if isinstance(result, Reply):
            return result
        return Reply(True, "", list(result or []))

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _usage(args, n_min: int, n_max: int | None = None) -> None:
        if len(args) < n_min or (n_max is not None and len(args) > n_max):
            raise CommandError("wrong number of arguments")

    @staticmethod
    def _domain(text: str) -> str:
        return text if text == "all" else text.lower().rstrip(".")

    def _check_binding(self, name: str) -> str:
        if name not in self.server.config.bindings and not any(
                q.binding == name for q in self.sched.queues.values()):
            raise CommandError(f"no binding named {name!r}")
        return name

    # -- queues and counters -------------------------------------------------------
    def cmd_summary(self, args):
        self._usage(args, 0, 1)
        s = self.sched
        if args:
            if args[0].lower() != "reset":
                raise CommandError(f"unknown argument {args[0]!r}")
            s.reset_stats()
            return ["statistics reset"]
        sm = s.summary()
        inflight = sum(1 for m in s.index.values() if m.state == "inflight")
        now_m = time.monotonic()
        cached = sum(1 for q in s.queues.values()
                     if q.decision is not None and q.decision_expires > now_m)
        dns = s.resolver.cache_stats()
        since = max(1e-9, time.time() - s.stats_reset_at)
        inbound = self.server.inbound_sessions()

        def rate(n):
            return f"{n} ({n / since:.2f}/s)"
        return [
            f"Outbound connections: {sm['connections']}",
            f"Inbound sessions: {inbound if inbound is not None else 'n/a (reception processes)'}",
            f"Active domains (route cache entries): {cached}",
            f"Queues: {sm['domains']}",
            f"Active queue size: {sm['active']}",
            f"Delayed queue size: {sm['delayed']}",
            f"In flight: {inflight}",
            f"Total queue size: {sm['active'] + sm['delayed'] + inflight}",
            f"DNS queries: {dns.get('queries', 0)} (cache hits {dns.get('hits', 0)}, "
            f"misses {dns.get('misses', 0)}, pending {dns.get('inflight', 0)}, "
            f"entries {dns.get('entries', 0)})",
            f"Received: {rate(sm.get('received', 0))}",
            f"Delivered: {rate(sm['delivered'])}",
            f"Transient failures: {rate(sm['transient'])}",
            f"Permanent failures: {rate(sm['permanent'])}",
            f"Bounces generated: {sm['bounces']}",
            f"Seconds since reset: {int(since)}",
            f"Uptime: {_ago(time.time() - s.started_at)}",
        ]

    def _binding_rows(self, only=None):
        s = self.sched
        names = list(self.server.config.bindings)
        for q in s.queues.values():
            if q.binding not in names:
                names.append(q.binding)
        rows = []
        for b in names:
            group = self.server.config.group_of(b)
            if only is not None and not only(b, group):
                continue
            qs = [q for q in s.queues.values() if q.binding == b]
            c = sum(q.conns for q in qs)
            a = sum(len(q.active) for q in qs)
            d = sum(q.delayed for q in qs)
            counts = {ev: sum(n for (e, bb, _), n in s.counters.items() if e == ev and bb == b)
                      for ev in ("received", "delivered", "transient", "permanent")}
            rows.append((b, group, c, a, d, a + d, counts["received"], counts["delivered"],
                         counts["transient"], counts["permanent"]))
        return rows

    def cmd_binding_summary(self, args):
        self._usage(args, 0, 1)
        only = None
        if args:
            want = args[0]
            if want.lower().startswith("group:"):
                g = want[6:]
                if g not in self.server.config.groups:
                    raise CommandError(f"no binding group named {g!r}")
                only = lambda b, grp: grp == g  # noqa: E731
            else:
                self._check_binding(want)
                only = lambda b, grp: b == want  # noqa: E731
        rows = self._binding_rows(only)
        return _table(rows, ("BINDING", "GROUP", "CONNS", "ACTIVE", "DELAYED", "TOTAL",
                             "RECEIVED", "DELIVERED", "TRANSIENT", "FAILED"))

    async def cmd_domain(self, args):
        self._usage(args, 1, 1)
        domain = self._domain(args[0])
        s = self.sched
        qs = [q for q in s.queues.values()
              if domain == "all" or q.domain == domain or q.plan_domain == domain]
        out: list[str] = []
        if not qs:
            if domain == "all":
                return ["no queues"]
            from . import router
            plan = router.plan("default", domain, self.server.config)
            answers = await router.gather(plan, s.resolver)
            decision = router.decide(plan, answers)
            out.append(f"domain {domain}: no queue (no mail queued); a decision now would be:")
            out.extend("  " + ln for ln in router.format_decision(decision).splitlines())
            out.extend(self._domain_stanzas(domain))
            return out
        inflight = s.inflight_by_queue()
        for q in sorted(qs, key=lambda q: (q.domain, q.binding)):
            out.extend(self._queue_view(q, inflight.get(q, 0)))
            out.append("")
        if domain != "all":
            out.extend(self._domain_stanzas(domain))
        return out

    def _queue_view(self, q, inflight: int = 0) -> list[str]:
        s = self.sched
        out = [f"domain {q.domain} (binding {q.binding})"
               + (f", recipient domain {q.plan_domain}" if q.plan_domain != q.domain else "")]
        d = q.decision
        if d is None:
            out.append("route cache: no entry (resolved when mail is next sent)")
        else:
            left = q.decision_expires - time.monotonic()
            state = f"expires in {int(left)}s" if left > 0 else "expired"
            out.append(f"route cache: ttl {d.ttl:.0f}s, {state}; source: {d.plan.scope}")
            for note in d.notes:
                out.append(f"  note: {note}")
            if d.failure is not None:
                out.append(f"  result: {d.failure}")
            nxt = s.next_hop(q)
            out.append("  MX list (* failed, => next):")
            for i, level in enumerate(d.levels, 1):
                for hop in level:
                    failed = s.host_failed(q, hop)
                    mark = "=>" if hop is nxt else (" *" if failed is not None else "  ")
                    extra = f"  failed {failed:.0f}s ago" if failed is not None else ""
                    out.append(f"  {mark} {i}. {hop}{extra}")
        out.append(f"consecutive DNS failures: {q.dns_failures}")
        out.append(f"active: {len(q.active)}  delayed: {q.delayed}  "
                   f"in flight: {inflight}")
        out.append(f"delivered: {q.delivered}  failed: {q.failed}")
        conns = s.connections_of(q)
        out.append(f"connections: {q.conns} ({q.starting} starting)")
        now = time.monotonic()
        for c in conns:
            state = "broken" if c.broken else "open"
            out.append(f"  {c.remote_ip}:{c.hop.port} {c.hop.proto} {state} "
                       f"for {now - c.opened_at:.1f}s, {c.deliveries} deliveries, "
                       f"{c.rcpts_sent} recipients")
        return out

    def _domain_stanzas(self, domain: str) -> list[str]:
        from .config.options import OPTIONS
        out = []
        for sc in self.server.config.scopes():
            if sc.kind == "domain" and sc.name and sc.name.lower() == domain:
                out.append(f"config: {sc.label}")
                for lname, st in sc.values.items():
                    spec = OPTIONS[lname]
                    out.append(f"  {spec.name} = {spec.type.format(st.value)}  ({st.pos})")
        return out

    def _queue_rows(self, key, threshold: int):
        s = self.sched
        rows, tot = [], [0, 0, 0, 0]
        for q in sorted(s.queues.values(), key=lambda q: (-key(q), q.domain)):
            if key(q) <= threshold:
                continue
            vals = (q.conns, len(q.active), q.delayed, q.delivered)
            tot = [a + b for a, b in zip(tot, vals)]
            rows.append((*vals, f"{q.domain} ({q.binding})"))
        lines = _table(rows, ("C", "A", "D", "S", "DOMAIN (BINDING)"))
        lines.append("-" * max(len(ln) for ln in lines))
        lines.append("  ".join(str(v) for v in tot) + f"  total ({len(rows)} queues)")
        return lines

    def _threshold(self, args) -> int:
        self._usage(args, 0, 1)
        try:
            return int(args[0]) if args else 0
        except ValueError:
            raise CommandError(f"not a number: {args[0]!r}") from None

    def cmd_active(self, args):
        return self._queue_rows(lambda q: len(q.active), self._threshold(args))

    def cmd_delayed(self, args):
        return self._queue_rows(lambda q: q.delayed, self._threshold(args))

    def cmd_mailq(self, args):
        dom = binding = None
        limit = 20
        it = iter(args)
        for a in it:
            try:
                if a == "-d":
                    dom = self._domain(next(it))
                elif a == "-b":
                    binding = next(it)
                elif a == "-l":
                    limit = int(next(it))
                else:
                    raise CommandError(f"unknown argument {a!r}")
            except (StopIteration, ValueError):
                raise CommandError(f"option {a} needs a value") from None
        rows = []
        for q in sorted(self.sched.queues.values(),
                        key=lambda q: (-(len(q.active) + q.delayed), q.domain)):
            if dom is not None and dom != "all" and dom not in (q.domain, q.plan_domain):
                continue
            if binding is not None and q.binding != binding:
                continue
            if not (q.active or q.delayed) and dom is None:
                continue
            rows.append((self.server.config.group_of(q.binding), q.binding, q.domain,
                         len(q.active), q.delayed))
        shown = rows[:limit] if limit > 0 else rows
        lines = _table(shown, ("GROUP", "BINDING", "DOMAIN", "AQ", "DQ"))
        if len(rows) > len(shown):
            lines.append(f"... {len(rows) - len(shown)} more (-l N)")
        return lines

    def cmd_showqueue(self, args):
        binding = None
        args = list(args)
        if len(args) >= 2 and args[0].lower() == "binding":
            binding = None if args[1] == "all" else args[1]
            args = args[2:]
        if not args:
            raise CommandError("which domain?")
        domain = self._domain(args[0])
        limit, offset = 100, 0
        if len(args) > 1:
            try:
                parts = args[1].split(",")
                limit = int(parts[0])
                offset = int(parts[1]) if len(parts) > 1 else 0
            except ValueError:
                raise CommandError(f"expected LIMIT,OFFSET, got {args[1]!r}") from None
        if len(args) > 2:
            raise CommandError("too many arguments")
        picked = self.sched.select(domain=domain, binding=binding,
                                   states=("active", "delayed"))
        inflight = [(self.sched.queue_for(m.binding, m.domain), m)
                    for m in self.sched.index.values() if m.state == "inflight"
                    and (binding is None or m.binding == binding)
                    and (domain == "all" or m.domain == domain)]
        picked = sorted(picked + inflight, key=lambda qm: qm[1].received_at)
        out = []
        shown = picked[offset:offset + limit]
        for q, m in shown:
            out.append(f"[{m.state}/{m.binding}] {m.msgid} Created: {int(m.received_at)}")
            out.append(f"  From: <{m.sender}>")
            out.append(f"  To: <{m.rcpt}>")
            if m.state == "delayed":
                out.append(f"  Retries: {m.retries}  Next attempt: {int(m.next_attempt)} "
                           f"(in {_ago(m.next_attempt - time.time())})")
        out.append(f"{len(picked)} message(s) queued for {domain}"
                   + (f"; shown {offset + 1}-{offset + len(shown)}" if len(shown) < len(picked)
                      else ""))
        return out

    # -- DNS and routing -----------------------------------------------------------
    async def cmd_refresh_domain(self, args):
        self._usage(args, 1, 1)
        domain = self._domain(args[0])
        qs = await self.sched.refresh(domain)
        if not qs:
            return [f"{domain}: no queue; DNS cache entries dropped"]
        out = [f"refreshed {len(qs)} queue(s)"]
        for q in qs:
            d = q.decision
            if d is None:
                out.append(f"  {q.domain} ({q.binding}): not resolved")
            elif d.failure is not None:
                out.append(f"  {q.domain} ({q.binding}): {d.failure}")
            else:
                hops = ", ".join(f"{h.host} {h.ip}:{h.port}" for h in d.hops)
                out.append(f"  {q.domain} ({q.binding}): {hops}")
        return out

    async def cmd_dig(self, args):
        self._usage(args, 1, 1)
        domain = self._domain(args[0])
        res = await self.sched.resolver.mx(domain)
        src = "cache" if res.from_cache else "network"
        out = [f"{domain} MX: {res.status} (ttl {res.ttl}s, from {src})"
               + (f" {res.error}" if res.error else "")]
        names = []
        for pref, ex in res.records:
            out.append(f"  {pref} {ex}")
            if ex != ".":
                names.append(ex)
        if not res.records and res.status in ("NODATA", "OK"):
            names.append(domain)
        for name in names[:10]:
            a = await self.sched.resolver.addresses(
                name, bool(self.server.config.lookup("Use_IPv6")))
            addrs = " ".join(str(x) for x in a.records) or a.status
            out.append(f"  {name} A/AAAA: {addrs} (ttl {a.ttl}s)")
        return out

    async def cmd_dns_cache(self, args):
        r = self.sched.resolver
        if not args or args[0].lower() == "stats":
            return [f"{k}: {v}" for k, v in r.cache_stats().items()]
        sub = args[0].lower()
        if sub == "flush":
            self._usage(args, 1, 2)
            n = r.flush(args[1] if len(args) > 1 else None)
            return [f"{n} entries dropped"]
        if sub in ("lookup", "submit"):
            self._usage(args, 3, 3)
            name, rtype = args[1], args[2].upper()
            if sub == "submit":
                r.flush(name)
            if rtype == "MX":
                res = await r.mx(name)
                recs = [f"{p} {e}" for p, e in res.records]
            elif rtype in ("A", "AAAA"):
                res = await r.addresses(name, rtype == "AAAA")
                recs = [str(x) for x in res.records
                        if (":" in str(x)) == (rtype == "AAAA")]
            else:
                raise CommandError(f"type {rtype} is not kept by this resolver (MX, A, AAAA)")
            src = "cache" if res.from_cache else "network"
            return [f"{name} {rtype}: {res.status}, ttl {res.ttl}s, from {src}"
                    + (f": {res.error}" if res.error else "")] + [f"  {x}" for x in recs]
        raise CommandError(f"unknown dns_cache subcommand {args[0]!r}")

    async def cmd_route(self, args):
        self._usage(args, 1, 2)
        from . import router
        domain = self._domain(args[0])
        binding = args[1] if len(args) > 1 else "default"
        plan = router.plan(binding, domain, self.server.config)
        answers = await router.gather(plan, self.sched.resolver)
        decision = router.decide(plan, answers)
        lines = router.format_decision(decision).splitlines()
        return Reply(decision.failure is None, "" if decision.failure is None else
                     str(decision.failure), lines)

    # -- queue commands --------------------------------------------------------------
    def cmd_flush_domain(self, args):
        self._usage(args, 1, 1)
        n = self.sched.flush(self._domain(args[0]))
        return [f"{n} delayed message(s) made due now"]

    def cmd_binding_flush_domain(self, args):
        self._usage(args, 2, 2)
        b = self._check_binding(args[0])
        n = self.sched.flush(self._domain(args[1]), binding=b)
        return [f"{n} delayed message(s) of binding {b} made due now"]

    def cmd_message_retry(self, args):
        self._usage(args, 1, 1)
        state = self.sched.retry(args[0])
        if state == "unknown":
            raise CommandError(f"no queued message {args[0]}", ["(delivered, failed or never here)"])
        if state == "retried":
            return [f"{args[0]} made due now"]
        return [f"{args[0]} is {state}: nothing to do"]

    def cmd_message_fail(self, args):
        self._usage(args, 1, 2)
        quiet = len(args) == 2 and args[0].lower() == "quiet"
        if len(args) == 2 and not quiet:
            raise CommandError(f"unknown argument {args[0]!r}")
        msgid = args[-1]
        m = self.sched.find(msgid)
        if m is None:
            raise CommandError(f"no queued message {msgid}")
        if m.state not in ("active", "delayed"):
            raise CommandError(f"{msgid} is {m.state} (being delivered); try again")
        q = self.sched.queue_for(m.binding, m.domain)
        self.sched.fail([(q, m)], _reply_from_text(None, MANUAL_FAIL), quiet=quiet)
        return [f"{msgid} failed" + (" (no bounce)" if quiet else "")]

    def cmd_message_details(self, args):
        self._usage(args, 1, 1)
        m = self.sched.find(args[0])
        if m is None:
            raise CommandError(f"no queued message {args[0]}")
        q = self.sched.queue_for(m.binding, m.domain)
        now = time.time()
        out = [f"message {m.msgid}: {m.state}",
               f"  queue: {q.binding}/{q.domain}",
               f"  batch: {m.batch_id}",
               f"  from: <{m.sender}>",
               f"  to: <{m.rcpt}>",
               f"  binding: {m.binding} (group {m.group})",
               f"  size: {m.size}",
               f"  received: {int(m.received_at)} ({_ago(now - m.received_at)} ago) via "
               f"{m.proto} from {m.peer_ip}" + (f" (helo {m.helo})" if m.helo else ""),
               f"  retries: {m.retries}"]
        if m.state == "delayed":
            out.append(f"  next attempt: {int(m.next_attempt)} "
                       f"(in {_ago(m.next_attempt - now)})")
        return out

    def _fail(self, binding, domain, quiet, text):
        picked = self.sched.select(domain=self._domain(domain), binding=binding)
        n = self.sched.fail(picked, _reply_from_text(text, MANUAL_PURGE), quiet=quiet)
        inflight = sum(1 for m in self.sched.index.values() if m.state == "inflight"
                       and (binding is None or m.binding == binding)
                       and (domain == "all" or m.domain == self._domain(domain)))
        out = [f"{n} message(s) failed" + (" (no bounces)" if quiet else "")]
        if inflight:
            out.append(f"{inflight} message(s) being delivered were left alone")
        return out

    def cmd_fail_domain(self, args):
        quiet = bool(args) and args[0].lower() == "quiet"
        rest = args[1:] if quiet else args
        self._usage(rest, 1, 1)
        return self._fail(None, rest[0], quiet, None)

    def cmd_binding_fail_domain(self, args):
        quiet = bool(args) and args[0].lower() == "quiet"
        rest = args[1:] if quiet else args
        self._usage(rest, 2)
        b = self._check_binding(rest[0])
        return self._fail(b, rest[1], quiet, " ".join(rest[2:]) or None)

    def cmd_reroute_queue(self, args):
        self._usage(args, 2, 2)
        n = self.sched.reroute(self._domain(args[0]), self._domain(args[1]))
        return [f"{n} message(s) moved from {args[0]} to {args[1]} (until restart)"]

    async def cmd_rebind(self, args):
        args = list(args)
        target = None
        if len(args) >= 2 and args[-2].lower() == "to":
            target = args[-1]
            args = args[:-2]
            if target not in self.server.config.bindings:
                raise CommandError(f"no binding named {target!r}")
        self._usage(args, 1, 2)
        binding = self._check_binding(args[0])
        domain = self._domain(args[1]) if len(args) > 1 else "all"
        if target is not None:
            choose = lambda m: target  # noqa: E731
        else:
            assigner = self.server.assigner

            def choose(m):
                try:
                    body = self.sched._body(m.batch_id)
                except Exception:
                    return None
                _, new = assigner.assign(body, m.sender, [m.rcpt], m.peer_ip, m.helo)
                return new
        moved = self.sched.rebind(binding, choose, domain)
        if not moved:
            return ["no message changed binding"]
        return [f"{n} message(s) now on binding {b}" for b, n in sorted(moved.items())] + [
            "(until restart: the spool keeps the original binding)"]

    def cmd_show_outbound(self, args):
        self._usage(args, 0, 0)
        now = time.monotonic()
        rows = [(f"{q.binding}/{q.domain}", f"{c.remote_ip}:{c.hop.port}", c.hop.proto,
                 "broken" if c.broken else "open", f"{now - c.opened_at:.1f}", c.deliveries)
                for c, q in self.sched.open_conns.items()]
        if not rows:
            return ["no outbound connections"]
        return _table(rows, ("QUEUE", "PEER", "PROTO", "STATE", "AGE", "DELIVERIES"))

    # -- configuration ---------------------------------------------------------------
    async def cmd_config_reload(self, args):
        self._usage(args, 0, 1)
        result = await self.server.reload(args[0] if args else None)
        if not result.ok:
            return Reply(False, "configuration refused; the running configuration is kept",
                         result.lines)
        return Reply(True, "configuration reloaded", result.lines)

    def _scope_args(self, args):
        scope = {}
        rest = []
        it = iter(args)
        for a in it:
            low = a.lower()
            if low in ("binding", "binding_group", "domain"):
                try:
                    scope[low] = next(it)
                except StopIteration:
                    raise CommandError(f"{a} needs a name") from None
            else:
                rest.append(a)
        if len(rest) != 1:
            raise CommandError("name exactly one option")
        from .config.options import get_option
        spec = get_option(rest[0])
        if spec is None:
            from .config.options import OPTIONS
            close = difflib.get_close_matches(rest[0].lower(), list(OPTIONS), n=3)
            raise CommandError(f"unknown option {rest[0]!r}",
                               [f"did you mean: {', '.join(OPTIONS[c].name for c in close)}?"]
                               if close else [])
        return scope, spec

    def cmd_config_get(self, args):
        scope, spec = self._scope_args(args)
        cfg = self.server.config
        sc = cfg.root
        path = "global"
        if "binding_group" in scope:
            sc = sc.child("binding_group", scope["binding_group"])
            path = f'binding_group "{scope["binding_group"]}"'
        if sc is not None and "binding" in scope:
            b = scope["binding"]
            sc = sc.child("binding", b)
            path = (path + " / " if path != "global" else "") + f'binding "{b}"'
        if sc is not None and "domain" in scope:
            d = scope["domain"].lower()
            sc = sc.child("domain", d) or sc.child("domain", scope["domain"])
            path = (path + " / " if path != "global" else "") + f'domain "{scope["domain"]}"'
        if sc is None:
            raise CommandError(f"no such scope: {path}")
        setting = sc.values.get(spec.lname)
        if setting is None:
            return [f"{spec.name} is not set in {path}"]
        return [f"{spec.name} = {spec.type.format(setting.value)}  ({path}, {setting.pos})"]

    def cmd_config_eval(self, args):
        scope, spec = self._scope_args(args)
        try:
            r = self.server.config.explain(spec.name, domain=scope.get("domain"),
                                           binding=scope.get("binding", "default"))
        except KeyError as exc:
            raise CommandError(str(exc).strip("'\"")) from None
        where = f"{r.scope}" + (f" ({r.file}:{r.line})" if r.file else "")
        return [f"{spec.name} = {spec.type.format(r.value)}", f"from: {where}"]

    def cmd_config_show(self, args):
        self._usage(args, 0, 0)
        from .config.options import OPTIONS
        cfg = self.server.config
        out = [f"# {self.server.config_path}"] + [f"# includes {f}" for f in cfg.source_files[1:]]
        for sc in cfg.scopes():
            if not sc.values:
                continue
            out.append(f"{sc.label}:")
            for lname, st in sc.values.items():
                spec = OPTIONS[lname]
                out.append(f"  {spec.name} = {spec.type.format(st.value)}  ({st.pos})")
        return out

    # -- housekeeping ------------------------------------------------------------------
    def cmd_reopen_logs(self, args):
        self._usage(args, 0, 0)
        self.server.reopen_logs()
        return ["log files reopened"]

    def cmd_shutdown(self, args):
        self._usage(args, 0, 0)
        return Reply(True, "shutting down", ["impetus is shutting down"],
                     close=True, after=self.server.stopped.set)

    def cmd_version(self, args):
        from . import __version__
        return [f"impetus {__version__} (Python {sys.version.split()[0]})"]

    def cmd_pid(self, args):
        return [str(os.getpid())]

    def cmd_top(self, args):
        if args and args[0].lower() == "json":
            return [json.dumps(self.top_frame(), separators=(",", ":"))]
        raise CommandError("`top` is a console view: run it from `impetus console` "
                           "or `impetus top`; `top json` gives one frame of data")

    def top_frame(self) -> dict:
        s = self.sched
        by_binding: dict[str, dict[str, int]] = {}
        for (ev, b, _), n in s.counters.items():
            by_binding.setdefault(b, {}).setdefault(ev, 0)
            by_binding[b][ev] += n
        queues = [{"binding": q.binding, "domain": q.domain, "conns": q.conns,
                   "active": len(q.active), "delayed": q.delayed,
                   "delivered": q.delivered, "failed": q.failed}
                  for q in s.queues.values()]
        return {"time": time.time(), "uptime": time.time() - s.started_at,
                "summary": s.summary(), "bindings": by_binding, "queues": queues}

    def cmd_help(self, args):
        if args:
            want = " ".join(args).lower()
            rows = [c for c in COMMANDS if c[0].startswith(want)]
            if not rows:
                raise CommandError(f"no command {want!r}")
        else:
            rows = COMMANDS
        width = max(len(f"{p} {a}".strip()) for p, a, _ in rows)
        return [f"{(p + ' ' + a).strip():<{width}}  {h}" for p, a, h in rows]

    def cmd_quit(self, args):
        return Reply(True, "bye", close=True)
