"""The ESMTP listener (Postfix's smtpd): relay policy, Received:, spool commit.

The protocol itself lives in ``smtp.server`` (sans-I/O) and ``smtp.serve``
(asyncio glue). This module decides who may relay (spec §9) and turns a
received message into a durable spool entry before the 250 goes out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import ipaddress
import logging
import ssl
import time

from .smtp import serve as smtp_serve
from .smtp.crlf import is_crlf
from .smtp.reply import Reply
from .smtp.server import Policy, ServerSettings
from .auth import PasswordFile
from .spool import IdGenerator, Spool, SpoolError, Submission

log = logging.getLogger("impetus.listener")

RELAYING_DENIED = Reply(550, "5.7.1", "relaying denied")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
SPOOL_FAILED = Reply(451, "4.3.0", "Temporary failure writing the message to the spool")
NO_BINDING = Reply(451, "4.3.2", "No binding assigned to this message (Default_Binding = none)")


_date_cache = [0, ""]


def _rfc2822_now() -> str:
    """``email.utils.formatdate()`` for Received:, computed once a second."""
    now = time.time()
    sec = int(now)
    if _date_cache[0] != sec:
        _date_cache[0], _date_cache[1] = sec, email.utils.formatdate(sec)
    return _date_cache[1]


def domain_matches(domain: str, pattern: str) -> bool:
    """``Relay_Domains`` matching (spec §9): exact, or left-globbed ``*suffix``.

    ``*.example.com`` does not match ``example.com``; ``*example.com`` matches
    ``badexample.com`` as documented.
    """
    domain = domain.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return domain.endswith(suffix) and len(domain) > len(suffix)
    return domain == pattern


class RelayPolicy(Policy):
    """Who may relay through this listener (spec §9), and the trusted
    extensions (AUTH, XCLIENT). Options are looked up for the client's
    address, so the most specific ``Peer "cidr"`` stanza applies."""

    def __init__(self, lc, config, rejectlog, connids: IdGenerator, passwords=None):
        self.lc = lc
        self.connids = connids
        self.relay_domains = list(config.lookup("Relay_Domains") or [])
        self.rejectlog = rejectlog
        self.passwords = passwords  # auth.PasswordFile or None
        self._relay_cache: dict = {}  # client address -> may relay by address

    def _opt(self, session, name, *, real_peer: bool = False):
        """An option for this client's most specific ``Peer``. Relay rules
        use the client as announced by a trusted XCLIENT (that is what XCLIENT
        is for); trusting XCLIENT itself uses the real TCP peer."""
        ip = session.peer_ip
        if real_peer:
            ip = getattr(session, "proxy_ip", None) or ip
        try:
            return self.lc.lookup(name, peer=ip)   # cached per address by the config
        except ValueError:  # an unparsable announced address matches no Peer
            return self.lc.lookup(name)

    def check_connect(self, session):
        session.conn_id = self.connids.next()  # Momentum-shaped id for R lines and rejectlog
        return None

    def _ip_can_relay(self, session) -> bool:
        """``Relay_Hosts`` (listener value replaces the global one) or a
        matching ``Peer`` with ``Open_Relay = true``. Cached per session."""
        cached = session.extra.get("can_relay")
        if cached is None:
            cached = self._relay_cache.get(session.peer_ip)
            if cached is not None:
                session.extra["can_relay"] = cached
                return cached
            try:
                ip = ipaddress.ip_address(session.peer_ip)
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                nets = self._opt(session, "Relay_Hosts") or []
                cached = any(ip.version == n.version and ip in n for n in nets)
            except ValueError:
                cached = False
            cached = cached or bool(self._opt(session, "Open_Relay"))
            session.extra["can_relay"] = cached
            if len(self._relay_cache) > 20000:
                self._relay_cache.clear()
            self._relay_cache[session.peer_ip] = cached
        return cached

    def check_mail(self, session, addr, params):
        session.extra["mail_domain"] = addr.domain
        return None

    def check_rcpt(self, session, addr, params):
        # Order of spec §9: relay hosts / open relay, AUTH, verified client
        # certificate, sender domain, then recipient domain.
        if self._ip_can_relay(session) or getattr(session, "authenticated", None):
            return None
        if self._opt(session, "TLS_Verified_Peer_Can_Relay", real_peer=True) and getattr(
                session, "tls_peer_verified", False):
            return None
        sending = self._opt(session, "Relay_For_Sending_Domains")
        if sending is not None:
            mail_domain = session.extra.get("mail_domain") or ""
            if not sending or (mail_domain and any(domain_matches(mail_domain, p)
                                                   for p in sending)):
                return None  # given with no arguments it means open relay
        if addr.domain and any(domain_matches(addr.domain, p) for p in self.relay_domains):
            return None
        return RELAYING_DENIED

    async def check_auth(self, session, mechanism, username, password):
        if self.passwords is None:
            return False
        return await self.passwords.averify(username, password)

    def allow_xclient(self, session) -> bool:
        exts = self._opt(session, "SMTP_Extensions", real_peer=True) or []
        return any(e.strip().upper() == "XCLIENT" for e in exts)

    def on_reject(self, session, reply, phase):
        self.rejectlog.reject(remote=(session.peer_ip, session.peer_port),
                              local=(session.local_ip, session.local_port),
                              connid=session.conn_id, code=reply.code, text=str(reply),
                              phase=phase, module="esmtp_listener")


def make_server_tls_context(lc):
    """Inbound TLS from ``TLS_Certificate``/``TLS_Key``/``TLS_Client_CA``/
    ``TLS_Verify_Mode`` (None when no certificate is configured)."""
    cert = lc.lookup("TLS_Certificate")
    if not cert or cert == "none":
        return None
    key = lc.lookup("TLS_Key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, None if not key or key == "none" else key)
    client_ca = lc.lookup("TLS_Client_CA")
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = (ssl.CERT_REQUIRED if lc.lookup("TLS_Verify_Mode") == "require"
                           else ssl.CERT_OPTIONAL)
    return ctx


class Listener:
    service_sessions = None  # smtp_serve.SessionCounter shared by all ESMTP listeners

    def __init__(self, lc, config, spool: Spool, logs, on_spooled, *, hostname: str,
                 assigner, reuse_port: bool = False):
        self.lc = lc
        self.config = config
        self.spool = spool
        self.logs = logs
        self.on_spooled = on_spooled
        self.hostname = hostname
        self.connids = IdGenerator(shard=98)
        self.server = None
        self.reuse_port = reuse_port  # several reception processes share the port
        self.connections: set = set()
        self.committing = 0
        pwfile = lc.lookup("Auth_Password_File")
        exts = [e.strip().upper() for e in (lc.lookup("SMTP_Extensions") or [])]
        mechanisms = tuple(dict.fromkeys(m for e in exts if e.startswith("AUTH ")
                                         for m in e.split()[1:] if m in ("PLAIN", "LOGIN")))
        if pwfile and not mechanisms:
            mechanisms = ("PLAIN", "LOGIN")
        self.policy = RelayPolicy(lc, config, logs.rejectlog, self.connids,
                                  PasswordFile(pwfile) if pwfile else None)
        self.tls_context = make_server_tls_context(lc)
        self.implicit_tls = bool(lc.lookup("Use_SSL")) and self.tls_context is not None
        self.settings = ServerSettings(
            hostname=hostname,
            max_message_size=lc.lookup("Max_Message_Size") or 0,
            max_recipients=lc.lookup("Max_Recipients_Per_Message") or 0,
            max_messages_per_connection=lc.lookup("Max_Receptions_Per_Connection") or 0,
            tls_context=None if self.implicit_tls else self.tls_context,
            auth_mechanisms=mechanisms if pwfile else (),
        )
        self.assigner = assigner  # binding.BindingAssigner, shared by all listeners (D2 state)

    async def start(self) -> None:
        if Listener.service_sessions is None:
            Listener.service_sessions = smtp_serve.SessionCounter(
                self.lc.lookup("Service_Sessions") or 0)
        self.server = await smtp_serve.start_server(
            self.lc.host, self.lc.port, self.settings, self._policy_for, self._on_message,
            idle_timeout=self.lc.lookup("Idle_Time") or None, connections=self.connections,
            reuse_port=self.reuse_port or None,
            ssl=self.tls_context if self.implicit_tls else None,
            max_sessions=self.lc.lookup("Listener_Sessions") or 0,
            sessions_counter=Listener.service_sessions)

    def _policy_for(self, *args):
        return self.policy

    def _on_message(self, envelope, session):
        """Spool the message; returns a future of the reply (no Task per
        message: the reply is computed in the commit's done-callback)."""
        batch_id = self.spool.ids.next()
        for_clause = f"\r\n\tfor <{envelope.rcpt_to[0]}>" if len(envelope.rcpt_to) == 1 else ""
        with_proto = {"esmtp": "ESMTP", "lmtp": "LMTP"}.get(session.protocol, "SMTP")
        received = (f"Received: from {envelope.helo or 'unknown'} ([{session.peer_ip}])\r\n"
                    f"\tby {self.hostname} (Impetus) with {with_proto} id {batch_id}{for_clause};"
                    f" {_rfc2822_now()}\r\n")
        body, binding = self.assigner.assign(envelope.body, envelope.mail_from, envelope.rcpt_to,
                                             session.peer_ip, envelope.helo)
        if binding == "default" and self.config.lookup("Default_Binding") == "none":
            return NO_BINDING  # spec §2.5: refused at reception, never queued
        header = received.encode("utf-8", "surrogateescape")
        body = header + body
        sub = Submission(sender=envelope.mail_from, recipients=list(envelope.rcpt_to), body=body,
                         peer_ip=session.peer_ip or "unknown", proto="esmtp", helo=envelope.helo,
                         binding=binding, group=self.config.group_of(binding), batch_id=batch_id,
                         # The core normalised the body; the header has the
                         # client's HELO in it, which may hold a bare CR.
                         crlf_clean=is_crlf(header))
        try:
            msgs, committed = self.spool.accept_nowait(sub)
        except SpoolError as exc:
            return self._spool_failed(session, exc)
        self.committing += 1
        reply = committed.get_loop().create_future()

        def on_commit(fut):
            self.committing -= 1
            if reply.done():
                return
            if fut.cancelled():
                reply.cancel()
                return
            exc = fut.exception()
            if exc is not None:
                if isinstance(exc, SpoolError):
                    reply.set_result(self._spool_failed(session, exc))
                else:
                    reply.set_exception(exc)
                return
            try:
                mainlog = self.logs.mainlog
                for m in msgs:
                    mainlog.reception(m.msgid, m.batch_id, session.conn_id, m.rcpt, m.sender,
                                      m.peer_ip, m.size, "esmtp", m.group, m.binding)
                self.on_spooled(msgs, body)
            except Exception as err:  # the mail is safe on disk; still say 250
                log.exception("after spooling %s: %s", batch_id, err)
            reply.set_result(Reply(250, "2.0.0", f"Ok: queued as {batch_id}"))

        committed.add_done_callback(on_commit)
        return reply

    def _spool_failed(self, session, exc: SpoolError) -> Reply:
        self.logs.paniclog.panic(f"reception from {session.peer_ip} failed: {exc}")
        # The protocol core reports this refused message to on_reject (rejectlog).
        return NO_STORAGE if exc.disk_full else SPOOL_FAILED

    def reload(self, lc, config, assigner) -> None:
        """``config reload`` (D20): sessions opened from now on get the relay
        policy, limits and settings of the new configuration (the listening
        address itself needs a restart). Built by a fresh ``Listener`` so
        whatever ``__init__`` derives from the config is re-derived."""
        fresh = Listener(lc, config, self.spool, self.logs, self.on_spooled,
                         hostname=self.hostname, assigner=assigner, reuse_port=self.reuse_port)
        runtime = {"server", "connections", "committing", "settings", "spool", "logs",
                   "on_spooled", "reuse_port"}
        for name, value in vars(fresh).items():
            if name not in runtime:
                setattr(self, name, value)
        # The running server holds this settings object: update it in place.
        for f in dataclasses.fields(self.settings):
            setattr(self.settings, f.name, getattr(fresh.settings, f.name))

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        # Idle sessions get 421 now; one in the middle of a commit gets its
        # reply first (serve.SMTPServerProtocol.shutdown).
        for proto in list(self.connections):
            proto.shutdown()

    async def drain(self, grace: float) -> None:
        """Wait (bounded) for sessions that are committing a message."""
        deadline = time.monotonic() + grace
        while (self.committing or self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
