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
import time

from .smtp import serve as smtp_serve
from .smtp.reply import Reply
from .smtp.server import Policy, ServerSettings
from .spool import IdGenerator, Spool, SpoolError, Submission

log = logging.getLogger("impetus.listener")

RELAYING_DENIED = Reply(550, "5.7.1", "relaying denied")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
SPOOL_FAILED = Reply(451, "4.3.0", "Temporary failure writing the message to the spool")
NO_BINDING = Reply(451, "4.3.2", "No binding assigned to this message (Default_Binding = none)")


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
    """Who may relay through this listener (spec §9)."""

    def __init__(self, relay_hosts, relay_domains, rejectlog, connids: IdGenerator):
        self.connids = connids
        self.relay_hosts = list(relay_hosts or [])
        self.relay_domains = list(relay_domains or [])
        self.rejectlog = rejectlog

    def check_connect(self, session):
        session.conn_id = self.connids.next()  # Momentum-shaped id for R lines and rejectlog
        return None

    def can_relay(self, session) -> bool:
        cached = session.extra.get("can_relay")
        if cached is None:
            try:
                ip = ipaddress.ip_address(session.peer_ip)
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                cached = any(ip in net for net in self.relay_hosts)
            except ValueError:
                cached = False
            session.extra["can_relay"] = cached
        return cached

    def check_rcpt(self, session, addr, params):
        if self.can_relay(session):
            return None
        if addr.domain and any(domain_matches(addr.domain, p) for p in self.relay_domains):
            return None
        return RELAYING_DENIED

    def on_reject(self, session, reply, phase):
        self.rejectlog.reject(remote=(session.peer_ip, session.peer_port),
                              local=(session.local_ip, session.local_port),
                              connid=session.conn_id, code=reply.code, text=str(reply),
                              phase=phase, module="esmtp_listener")


class Listener:
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
        self.policy = RelayPolicy(lc.lookup("Relay_Hosts"), config.lookup("Relay_Domains"),
                                  logs.rejectlog, self.connids)
        self.settings = ServerSettings(hostname=hostname,
                                       max_message_size=lc.lookup("Max_Message_Size") or 0)
        self.assigner = assigner  # binding.BindingAssigner, shared by all listeners (D2 state)

    async def start(self) -> None:
        self.server = await smtp_serve.start_server(
            self.lc.host, self.lc.port, self.settings, self._policy_for, self._on_message,
            idle_timeout=300, connections=self.connections, reuse_port=self.reuse_port or None)

    def _policy_for(self, *args):
        return self.policy

    async def _on_message(self, envelope, session):
        batch_id = self.spool.ids.next()
        proto = "esmtp"
        for_clause = f"\r\n\tfor <{envelope.rcpt_to[0]}>" if len(envelope.rcpt_to) == 1 else ""
        with_proto = {"esmtp": "ESMTP", "lmtp": "LMTP"}.get(session.protocol, "SMTP")
        received = (f"Received: from {envelope.helo or 'unknown'} ([{session.peer_ip}])\r\n"
                    f"\tby {self.hostname} (Impetus) with {with_proto} id {batch_id}{for_clause};"
                    f" {email.utils.formatdate(time.time())}\r\n")
        body, binding = self.assigner.assign(envelope.body, envelope.mail_from, envelope.rcpt_to,
                                             session.peer_ip, envelope.helo)
        if binding == "default" and self.config.lookup("Default_Binding") == "none":
            return NO_BINDING  # spec §2.5: refused at reception, never queued
        body = received.encode("utf-8", "surrogateescape") + body
        sub = Submission(sender=envelope.mail_from, recipients=list(envelope.rcpt_to), body=body,
                         peer_ip=session.peer_ip or "unknown", proto=proto, helo=envelope.helo,
                         binding=binding, group=self.config.group_of(binding), batch_id=batch_id)
        self.committing += 1
        try:
            msgs = await self.spool.accept(sub)
        except SpoolError as exc:
            self.logs.paniclog.panic(f"reception from {session.peer_ip} failed: {exc}")
            # The protocol core reports this refused message to on_reject (rejectlog).
            return NO_STORAGE if exc.disk_full else SPOOL_FAILED
        finally:
            self.committing -= 1
        mainlog = self.logs.mainlog
        for m in msgs:
            mainlog.reception(m.msgid, m.batch_id, session.conn_id, m.rcpt, m.sender, m.peer_ip,
                              m.size, proto, m.group, m.binding)
        self.on_spooled(msgs, body)
        return Reply(250, "2.0.0", f"Ok: queued as {batch_id}")

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
