"""The declarative option table.

One :class:`OptionSpec` per option drives parsing/validation, scope checks,
the fallback lookup, ``impetus options`` and ``docs/OPTIONS.md``::

    python -m impetus.config.options > docs/OPTIONS.md

Enabling an option once it is implemented is a one-word change: flip its
``supported`` flag from ``False`` to ``True``.  ``unsupported_scopes`` lists
scopes where a supported option is still rejected as "not supported yet"
(e.g. ``Max_Outbound_Connections`` in ``host``).

Scope names used here and in messages:

``global``, ``binding_group``, ``binding``, ``domain``, ``host`` (outbound);
``esmtp_listener``, ``listen``, ``peer`` (inbound, spec §11.1);
``control_listener``, ``control_listen`` (a ``Listen`` inside
``Control_Listener``); ``http_listener``, ``http_listen`` (our
``HTTP_Listener``: metrics and the injection API); ``ec_logger``,
``bounce_logger`` (module stanzas).
A ``domain`` option is valid in every ``Domain`` stanza, whatever contains
it (``binding::domain``, ``binding_group::domain``, ...).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import values as V
from .values import ValueType

SCOPE_ORDER = (
    "global", "binding_group", "binding", "domain", "host",
    "esmtp_listener", "listen", "peer", "control_listener", "control_listen",
    "http_listener", "http_listen",
    "ec_logger", "bounce_logger",
)

#: scopes of the outbound fallback chain (Config.lookup)
OUTBOUND_SCOPES = frozenset({"global", "binding_group", "binding", "domain"})
#: scopes of the listener fallback chain (ListenerConfig.lookup)
#: (an option must be valid in one of these to be looked up on a listener;
#: the global value is still part of the chain)
LISTENER_SCOPES = frozenset({"esmtp_listener", "listen", "peer"})


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: ValueType
    default: Any
    scopes: tuple[str, ...]
    doc: str
    supported: bool = False
    unsupported_scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def lname(self) -> str:
        return self.name.lower()

    def scope_list(self) -> str:
        return ", ".join(self.scopes)


def _sorted_scopes(scopes) -> tuple[str, ...]:
    bad = set(scopes) - set(SCOPE_ORDER)
    if bad:  # pragma: no cover - table typo
        raise ValueError(f"unknown scopes {bad}")
    return tuple(s for s in SCOPE_ORDER if s in scopes)


_TABLE: list[OptionSpec] = []

#: Value of a host-scope option when a Host stanza matches but does not set
#: it (no fallback to the outbound chain, spec §2.3, D18).  Options not
#: listed here take their ordinary default.
HOST_DEFAULTS: dict[str, Any] = {"max_outbound_connections": -1}


def opt(name: str, type: ValueType, default: Any, scopes, doc: str,
        supported: bool = False, unsupported_scopes=()) -> None:
    _TABLE.append(OptionSpec(name, type, default, _sorted_scopes(scopes), doc,
                             supported, frozenset(unsupported_scopes)))


# Common scope sets
G = ("global",)
OUT = ("global", "binding_group", "binding", "domain")
OUTH = OUT + ("host",)
BGB = ("global", "binding_group", "binding")
DG = ("global", "domain")
BDG = ("global", "binding", "domain")
L = ("esmtp_listener", "listen", "peer")
GL = G + L
LL = ("esmtp_listener", "listen")
OUTL = OUT + L
HOST = ("host",)
ECL = ("ec_logger",)
BCL = ("bounce_logger",)
LOGGERS = ("ec_logger", "bounce_logger")

# ---------------------------------------------------------------------------
# §1.1 files, §2 scopes and bindings
opt("Local_Changes_File", V.PATH, None, G,
    "Writable file loaded after everything else (console writeback).", supported=False)
opt("Local_Changes_Only", V.BOOL, False, G, "Send every console edit to Local_Changes_File.", supported=False)
opt("Default_Binding", V.Enum("normal", "none", "suspended"), "normal", G,
    "Mail left on the implicit default binding: normal (delivered), none (refused at "
    "reception with 451), suspended (held, as with Suspend_Delivery) (§2.5).", supported=True)
opt("Policy_Module", V.PATH, None, G,
    "Python file defining set_binding(message), run at reception after the X-Binding "
    "headers (our extension, D3); checked at load: must be readable, valid Python and "
    "define set_binding.", supported=True)
opt("Match_Cache_Size", V.INT, 16384, G, "Cache size for regex Domain/Host matches.", supported=False)
opt("Match_Cache_Life", V.DURATION, 0, G, "Lifetime of regex match cache entries.", supported=False)

# §3 routing
opt("Gateway", V.HOSTPORT, None, OUT,
    "Static smarthost: host, host:port, a.b.c.d:port or [v6]:port (D8).", supported=True)
opt("Routes", V.ROUTES, None, DG,
    "Routing table (§3.3, D4-D6): host names or IP literals ([v6] bracketed, optional :port), "
    "\"__mx__\" (the domain's MX set), smtp://host[:port]?pref=P&ttl=T&port=O&type=mx|a, "
    "lmtp://host?port=N (extension). Unranked items rank by list position after ranked ones.",
    supported=True)
opt("Delivery_Method", V.SomeEnum(("esmtp", "smtp", "lmtp"), ("ecstream", "apn", "gcm", "mm7")),
    "esmtp", OUT, "Delivery protocol (ecstream, apn, gcm, mm7: not supported yet).",
    supported=True)
opt("Remote_SMTP_Port", V.PORT, 25, OUT, "Port for outbound SMTP.", supported=True)
opt("LMTP_Port", V.PORT, 2003, OUT, "Port for LMTP deliveries.", supported=True)
opt("ECStream_Port", V.PORT, 1825, OUT, "Port for ECStream deliveries.", supported=False)
opt("Fully_Resolve_Before_SMTP", V.BOOL, True, OUT,
    "Wait for all MX and A records before connecting.", supported=True)
opt("Only_Use_Best_MX_For_Relay_Domains", V.BOOL, False, G,
    "Relay domains use only the lowest MX preference (D15).", supported=False)
opt("MX_Failures_Fallback_To_A", V.INT_M1, 3, DG,
    "Failed MX lookups before falling back to A (-1: MX once, then A).", supported=True)
opt("DNS_Failures_To_Purge", V.INT, 10, DG, "Failed DNS lookups before failing permanently.",
    supported=True)
opt("MX_Failures_To_Delay", V.INT, 50, DG,
    "Consecutive failures of every MX before the domain is delayed (0 = off).", supported=True)
opt("Connect_Timeout_To_Delay", V.DURATION, 900, OUT,
    "Time failing to reach a domain before its active queue is delayed.", supported=True)
opt("Host_Failure_Retry", V.DURATION, 120, DG,
    "Do not retry an IP for this long after a connect or protocol failure.", supported=True)
opt("Rollup_MX", V.BOOL, False, HOST, "Queue domains using this MX under Rollup_MX_Name.", supported=False)
opt("Rollup_MX_Name", V.STR, None, HOST, "Routing domain used by Rollup_MX.", supported=False)
opt("Use_IPv6", V.BOOL, False, G, "Deliver over IPv6 (use AAAA records).", supported=True)
opt("Prefer_IPv6_MXs", V.BOOL, False, G,
    "At one MX preference, try IPv6 addresses first.", supported=True)
opt("Min_DNS_TTL", V.TTL, 0, G, "Lower clamp for DNS TTLs of delivery lookups.",
    supported=True)
opt("Max_DNS_TTL", V.TTL, 4294967295, G, "Upper clamp for DNS TTLs of delivery lookups.",
    supported=True)
opt("DNS_Expire_Interval", V.DURATION, 10, G, "How often expired domain DNS data is re-looked up.", supported=False)
opt("DNS_Cache_Purge_Interval", V.DURATION, 60, G, "How often the DNS cache is purged.", supported=False)
opt("Resolv_Conf", V.PATH, None, G,
    "resolv.conf-style file for the resolver (default /etc/resolv.conf; "
    "'nameserver ip#port' allowed, D17).", supported=True)
opt("DNS_Fallback_To_TCP", V.BOOL, False, G, "Retry truncated UDP answers over TCP.", supported=False)
opt("DNS_Max_UDP_Queries_Per_Port", V.INT, 0, G, "UDP queries per source port (0 = no limit).", supported=False)
opt("DNS_UDP_Rcvbuf_Size", V.INT, 0, G, "Resolver UDP receive buffer (0 = OS default).", supported=False)
opt("DNS_UDP_Sndbuf_Size", V.INT, 0, G, "Resolver UDP send buffer (0 = OS default).", supported=False)
opt("DNS_Rate_Limit_Enabled", V.BOOL, False, G, "Rate-limit MX lookups.", supported=False)
opt("DNS_Rate_Limit_MX_Queries", V.INT, 100, G, "MX queries per rate-limit period.", supported=False)
opt("DNS_Rate_Limit_Period", V.DURATION, 1, G, "Rate-limit period.", supported=False)
opt("DNS_Rate_Limit_Max_Queue", V.INT, 100000, G, "Domains waiting for a rate-limited lookup.", supported=False)

# §4 prohibited / skipped destinations
opt("Prohibited_Hosts", V.ADDRLIST, [], G,
    "Destination IPs/CIDRs never delivered to (IPv6 unbracketed); a hit fails the domain (D9).",
    supported=True)
opt("Skip_Hosts", V.ADDRLIST, [], G,
    "Destination IPs/CIDRs skipped; none left = 451 4.4.1 No valid hosts (D9).", supported=True)

# §5 bindings
opt("Bind_Address", V.BIND_ADDRESS, "*", BGB,
    "Source IP of a binding (global: of the default binding and the fallback); * lets the "
    "kernel choose. An IPv4/IPv6 address configured on this host, or a host name from "
    "/etc/hosts (never DNS). Needs a restart to change (D20).", supported=True)
opt("EHLO_Hostname", V.EHLO_HOSTNAME, "__hostname__", OUT,
    "EHLO argument: a literal host name or [address], __hostname__ (Hostname, else the "
    "system name) or __message__ (the envelope sender's domain).", supported=True)
opt("Hostname", V.STR, None, G, "Overrides the system host name.", supported=True)
opt("Suspend_Delivery", V.BOOL, False, OUT,
    "No delivery attempts in this scope; mail waits until it is set back to false. "
    "Suspended bindings are not chosen from a group while others are not (D2).",
    supported=True)

# §6 throttling and connections
opt("Max_Outbound_Connections", V.INT_M1, 32, OUTH,
    "Concurrent connections per (binding, domain); per host/IP in a host stanza "
    "(no fallback there: a matching Host stanza without it means -1, unlimited; D18).",
    supported=True)
opt("Scope_Max_Outbound_Connections", V.INT, None, OUTH,
    "Connection cap shared by everything that falls back to the stanza setting it (global: "
    "all; domain: that domain over all bindings; binding_group::domain: over the group; "
    "regex domain: all matching domains together); 0 or unset = no cap.",
    supported=True, unsupported_scopes=("host",))
opt("Server_Max_Outbound_Connections", V.INT, 20000, BGB,
    "Ceiling on all outbound connections; in a binding: through that binding; in a "
    "binding group: through its bindings together (D15). 0 = no cap.", supported=True)
opt("Server_Reserve_Outbound_Connections", V.INT, 200, G,
    "Reserve added to Server_Max_Outbound_Connections.", supported=False)
opt("Outbound_Throttle_Messages", V.RATE, None, OUTH,
    "Message delivery rate \"N\" (per second) or \"N/S\" (per S seconds); 0 = unlimited. "
    "One bucket per defining stanza, shared by reference (§2.3, §6.3).",
    supported=True, unsupported_scopes=("host",))
opt("Outbound_Throttle_Connections", V.RATE, None, OUTH,
    "New-connection rate \"N\" or \"N/S\"; 0 = unlimited. One bucket per defining stanza, "
    "shared by reference (§2.3, §6.3).", supported=True, unsupported_scopes=("host",))
opt("Max_Deliveries_Per_Connection", V.INT, 0, OUT,
    "Close a connection after N successful deliveries (0 = no limit).", supported=True)
opt("Max_Recipients_Per_Connection", V.INT, 0, OUTL,
    "RCPT TO commands per outbound connection (0 = no limit).", supported=True,
    unsupported_scopes=L)
opt("Max_Recipients_Per_Batch", V.INT, 100, OUT,
    "RCPT TO commands per outbound transaction.", supported=True)
opt("Idle_Timeout", V.DURATION, 5, OUT,
    "Keep an idle outbound connection open this long.", supported=True)
opt("Migrate_Connections_Between_Sibling_Domains", V.BOOL, True, G,
    "Hand idle connections to domains sharing an MX.", supported=False)
opt("Connection_Allocation_Aggressiveness", V.Enum("normal", "high"), "normal", OUT,
    "How fast connections ramp up toward Max_Outbound_Connections: normal (gradually, "
    "with the active queue) or high (at once).", supported=True)
opt("Cluster_Max_Outbound_Connections", V.INT, None, OUTH, "Cluster-wide connection cap.", supported=False)
opt("Cluster_Scope_Max_Outbound_Connections", V.INT, None, OUTH,
    "Cluster-wide shared connection cap.", supported=False)
opt("Cluster_Server_Max_Outbound_Connections", V.INT, None, BGB,
    "Cluster-wide ceiling on connections.", supported=False)
opt("Cluster_Outbound_Throttle_Messages", V.RATE, None, OUTH,
    "Cluster-wide message rate (as Outbound_Throttle_Messages), shared through "
    "Cluster_Throttle_Store (node-local without one).", supported=True,
    unsupported_scopes=("host",))
opt("Cluster_Outbound_Throttle_Connections", V.RATE, None, OUTH,
    "Cluster-wide new-connection rate (as Outbound_Throttle_Connections), shared through "
    "Cluster_Throttle_Store (node-local without one).", supported=True,
    unsupported_scopes=("host",))
opt("Cluster_Throttle_Store", V.REDIS_URL, None, G,
    "Redis server holding the Cluster_Outbound_Throttle_* buckets: redis://host:port/db "
    "(our extension; port defaults to 6379, db to 0).", supported=True)

# §7 TLS
opt("TLS", V.Enum("no", "ifavailable", "required"), "no", OUT,
    "Outbound STARTTLS: no; ifavailable (when the peer advertises STARTTLS); required "
    "(else 451 4.7.6 STARTTLS required but not advertised, transient).", supported=True)
opt("TLS_Ifavailable_Fallback", V.BOOL, True, OUT,
    "With TLS = ifavailable: after a failed STARTTLS or handshake, reconnect at once in plain "
    "text (false: 451 4.7.5 TLS negotiation failed, transient). A failed certificate check "
    "never falls back.", supported=True)
opt("TLS_Verify", V.Enum("no", "ca", "host", "optional"), "no", OUT,
    "Server certificate check: no; ca (chain against TLS_CA, else the system CAs); host (ca + "
    "the MX host name or the domain in a subjectAltName dNSName, RFC 6125 wildcards, CN only "
    "without dNSName: D11); optional (as host, but deliver anyway and note it in the paniclog).",
    supported=True)
opt("TLS_CA", V.PATH, None, OUT,
    "PEM CA bundle for TLS_Verify (unset: the system CAs); also trusted, with the system CAs, "
    "for MTA-STS policy fetches and MTA-STS enforced deliveries. Checked at load.",
    supported=True)
opt("TLS_Certificate", V.TLS_FILE, None, OUTL + ("http_listener", "http_listen"),
    "PEM client certificate presented to the next hop (may also hold the key); 'none' cancels "
    "an inherited one. Loaded at start: a missing or unusable file is a config error. In a "
    "listener (ESMTP or HTTP): the server certificate (HTTP_Listener: HTTPS).",
    supported=True)
opt("TLS_Key", V.TLS_FILE, None, OUTL + ("http_listener", "http_listen"),
    "PEM key for TLS_Certificate when it is not in the certificate file; 'none' cancels an "
    "inherited one.", supported=True)
opt("TLS_Protocols", V.TLS_PROTOCOLS, "+ALL", OUTL,
    "Enabled versions, e.g. \"+ALL:-TLSv1.2\": +/- ALL, SSLv2, SSLv3, TLSv1.0-TLSv1.3 joined by "
    "':'. ALL means TLSv1.2 and TLSv1.3 (older versions only when named); SSLv2/3 are never "
    "enabled; the enabled versions must be contiguous.", supported=True, unsupported_scopes=L)
opt("TLS_Ciphers", V.TLS_CIPHERS, "DEFAULT", OUTL,
    "OpenSSL cipher list for TLS <= 1.2 (GnuTLS 'NORMAL' = DEFAULT); checked at load.",
    supported=True, unsupported_scopes=L)
opt("TLSv13_Ciphersuites", V.TLS13_SUITES_TYPE,
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256", OUT,
    "TLS 1.3 cipher suites: checked and accepted, but Python's ssl cannot choose TLS 1.3 "
    "suites, so OpenSSL's defaults (the same three as this default) always apply.",
    supported=True)
opt("TLS_EC_Curve_Names", V.STR, None, G, "ECDHE groups (colon list).", supported=False)
opt("TLS_Engine", V.Enum("openssl", "gnutls"), "openssl", G, "TLS library.", supported=False)
opt("TLS_DHParams_File", V.PATH, None, G, "DH parameters file.", supported=False)
opt("TLS_Enable_DHE_Ciphers", V.BOOL, True, G, "Allow DHE ciphers.", supported=False)
opt("Crypto_Engine", V.STR, None, G, "OpenSSL engine.", supported=False)
opt("TLS_Allow_Renegotiation", V.BOOL, False, G, "Allow TLS renegotiation.", supported=False)
opt("Use_MTA_STS", V.BOOL, False, DG,
    "Discover the recipient domain's MTA-STS policy (RFC 8461: _mta-sts TXT record, then "
    "https://mta-sts.<domain>/.well-known/mta-sts.txt, cached for max_age) for mail routed "
    "by the domain's own MX records.", supported=True)
opt("Enable_MTA_STS", V.BOOL, True, OUT,
    "Apply a discovered MTA-STS policy: enforce = TLS required + TLS_Verify host + MX names "
    "must match the policy's mx patterns; testing = at least TLS ifavailable + TLS_Verify "
    "optional, mismatches only noted in the paniclog. Effective only with Use_MTA_STS.",
    supported=True)
opt("MTA_STS_Port", V.PORT, 443, G,
    "HTTPS port of MTA-STS policy hosts (our extension, for tests and private PKIs).",
    supported=True)
opt("MTA_STS_Policy_Store", V.STR, None, G, "Where MTA-STS policies are cached.", supported=False)
opt("MTA_STS_DNS_CNAME_Max_Depth", V.INT, 5, G, "CNAME depth for MTA-STS lookups.", supported=False)
opt("Use_DANE", V.BOOL, False, OUT, "Apply DANE TLSA records.", supported=False)
opt("Enable_DANE", V.BOOL, False, G, "Enable DANE support.", supported=False)
opt("TLSA_Expire_Interval", V.DURATION, 3600, G, "Lifetime of cached TLSA records.", supported=False)

# §8 XCLIENT
opt("XCLIENT", V.Enum("no", "ifavailable", "required"), "no", OUT,
    "Before each message send XCLIENT with the injecting client's NAME ADDR PORT PROTO HELO "
    "LOGIN (those the peer advertises; [UNAVAILABLE] when unknown), then EHLO again (D10). "
    "required: 451 4.7.6 XCLIENT required but not advertised when the peer lacks it.",
    supported=True)

# §9 relay control
opt("Relay_Hosts", V.ADDRLIST, [], GL,
    "Client IPs/CIDRs allowed to relay anywhere (a listener value replaces the global one).",
    supported=True)
opt("Open_Relay", V.BOOL, False, L, "Matching clients may relay anywhere.", supported=True)
opt("Relay_For_Sending_Domains", V.ARRAY, None, L,
    "Allow relaying when the envelope sender's domain matches.", supported=True)
opt("Relay_Domains", V.DOMAINLIST, [], G,
    "Recipient domains accepted from anyone (exact or *.domain).", supported=True)
opt("TLS_Verified_Peer_Can_Relay", V.BOOL, False, L,
    "Clients with a verified certificate may relay.", supported=True)
opt("Bounce_Domains", V.DOMAINLIST, [], G, "Domains accepted for bounce processing.", supported=False)
opt("Bounce_Pattern", V.STR, None, G, "Pattern recognising bounce addresses.", supported=False)
opt("Bounce_Behavior", V.Enum("pass", "blackhole"), "pass", G,
    "What happens to processed inbound bounces.", supported=False)
opt("Bounce_Suppress_List", V.STR, None, G, "Suppression list for inbound bounces.", supported=False)

# §10 queues, retries, bounces
opt("Spoolbase", V.PATH, "/var/spool/impetus", G, "Spool directory.", supported=True)
opt("Scheduling_Policy", V.Enum("batch", "normal"), "batch", G,
    "Our extension: Linux CPU scheduling policy of every Impetus process. batch "
    "(SCHED_BATCH): a woken thread waits for the running one instead of preempting it, "
    "fewer context switches under load; normal (SCHED_OTHER): the system default. A "
    "policy set from outside (chrt -f, SCHED_IDLE) is left alone. Applied at start and "
    "on reload.", supported=True)
opt("CPU_Affinity", V.Enum("auto", "off"), "auto", G,
    "Our extension: with --reception-processes N, auto binds reception process k and all "
    "its threads (its spool writer) to one core, the k-th the server may use, round robin "
    "(a cpuset or taskset narrowing them is respected); the main process (scheduler, "
    "delivery) is not bound. Fewer cross-core wake-ups and warm caches: more throughput "
    "for less CPU. off: no binding. Applied at start and on reload.", supported=True)
opt("Delayed_Queue_Scan_Interval", V.DURATION, 15, G,
    "How often due delayed mail is moved to the active queue.", supported=False)
opt("Reserve_Maintenance_Interval", V.DURATION, 15, G, "Reserve maintainer interval.", supported=False)
opt("Expensive_Batch_Assessment", V.BOOL, False, G,
    "Compare rendered headers when batching recipients.", supported=False)
opt("Retry_Interval", V.DURATION, 1200, OUT,
    "Base retry interval, doubled after each failure.", supported=True)
opt("Max_Retry_Interval", V.DURATION, 43200, OUT,
    "Upper bound on one retry interval.", supported=True)
opt("Max_Retries", V.MAXRETRIES, "auto", OUT,
    "Retry count limit: N, auto (fits in Message_Expiration, D13) or none.", supported=True)
opt("Message_Expiration", V.DURATION, 86400, OUT,
    "Longest time a message may stay undelivered (D15).", supported=True)
opt("Never_Retry", V.BOOL, False, OUT,
    "Fail at once on a transient failure.", supported=True)
opt("Never_Attempt_Expired_Messages", V.BOOL, False, OUT,
    "Fail expired messages without a last attempt.", supported=False)
opt("Drop_Body_After_Trans_Fail", V.INT, 3, OUT,
    "Stop caching the body in memory after N transient failures.", supported=False)
opt("Delayed_Binding_Domain_Fuzz", V.DURATION, 0, BGB, "Spread bulk requeues over this window.", supported=False)
opt("Generate_Bounces", V.BOOL, True, OUT,
    "Send a bounce (RFC 3464, D12) when a message fails permanently.", supported=True)
opt("Mailerdaemon", V.STR, None, OUT,
    "From: address of bounces (default mailer-daemon@Hostname).", supported=True)
opt("MDN_Failures_Notify", V.STR, None, OUT, "Mailbox told about failed null-sender mail.", supported=False)
opt("Bounces_Inline_Original", V.Enum("headers", "none", "all"), "headers", OUT,
    "How much of the original message a bounce carries.", supported=True)
opt("Generate_Delay_DSN", V.BOOL, False, OUT, "Send delay warnings (delay_dsn module).", supported=False)
opt("Delay_DSN_Retry_Interval", V.DURATION, 3600, OUT, "Base interval of delay warnings.", supported=False)
opt("Delay_DSN_Max_Retry_Interval", V.DURATION, 43200, OUT,
    "Upper bound on the delay-warning interval (D15).", supported=False)
opt("Blackhole", V.Enum("false", "true", "inline", "internal"), "false", OUT,
    "Drop mail: true/inline at RCPT time, internal after acceptance.", supported=False)

# §10.5 timeouts
opt("Connect_Timeout", V.DURATION, 300, OUT, "Timeout on connect().", supported=True)
opt("EHLO_Timeout", V.DURATION, 300, OUT,
    "Wait for the EHLO reply (and the banner, D14).", supported=True)
opt("MailFrom_Timeout", V.DURATION, 300, OUT,
    "Wait for the MAIL FROM reply (and the DATA 354, D14).", supported=True)
opt("RcptTo_Timeout", V.DURATION, 300, OUT, "Wait for an RCPT TO reply.", supported=True)
opt("Body_Timeout", V.DURATION, 600, OUT,
    "Wait for the final reply after the message body.", supported=True)
opt("Rset_Timeout", V.DURATION, 30, OUT, "Wait for the RSET reply.", supported=True)

# §10.6 memory and residency
opt("Max_Resident_Active_Queue", V.INT_M1, 250, G,
    "Messages per domain kept in memory (-1 off, 0 none).", supported=False)
opt("Max_Resident_Messages", V.INT, 32768, G, "Messages kept in memory (0 = no limit).", supported=False)
opt("Max_Resident_Transfails", V.INT, 100, G, "Transiently failed messages kept in memory.", supported=False)
opt("Inline_Transfail_Processing", V.INT, 1, G, "Process transient failures inline.", supported=False)
opt("Transfail_Drain_Rate", V.INT, 100, G, "Transient-failure drain rate.", supported=False)
opt("Soft_Bounce_Drain_Rate", V.INT, 100, G, "Soft-bounce drain rate.", supported=False)
opt("Keep_Message_Dicts_In_Memory", V.BOOL, False, G, "Keep message metadata in memory.", supported=False)
opt("Swap_Out_Meta_After_Each_Tempfail", V.BOOL, True, G,
    "Write retry metadata to disk after every transient failure.", supported=False)
opt("Disk_Queue_Drain_Rate", V.INT, 100, G, "Spool-in rate at start-up.", supported=False)

# §11.1 ESMTP listener
opt("Enable", V.BOOL, True, ("esmtp_listener", "listen", "control_listener", "control_listen",
                            "http_listener", "http_listen"),
    "false skips this listener or socket without deleting the stanza.", supported=True)
opt("Listener_Sessions", V.INT, 0, L, "Concurrent sessions on this listener (0 = no limit).", supported=True)
opt("Service_Sessions", V.INT, 0, ("esmtp_listener",),
    "Concurrent sessions over all ESMTP listeners (0 = no limit).", supported=True)
opt("Idle_Time", V.DURATION, 300, L, "Idle inbound session timeout (D15).", supported=True)
opt("Max_Receptions_Per_Connection", V.INT, 0, L, "Messages per inbound connection.", supported=True)
opt("Max_Recipients_Per_Message", V.INT, 0, L, "Recipients per inbound message.", supported=True)
opt("Max_Message_Size", V.INT, 0, GL,
    "Largest accepted message in bytes (0 = no limit).", supported=True)
opt("Banner_Hostname", V.STR, None, GL, "Host name in the SMTP banner.", supported=False)
opt("Static_Banner", V.STR, None, GL, "Fixed SMTP banner (must begin with 220).", supported=False)
opt("Received_Hostname", V.STR, None, GL, "Host name in our Received: header.", supported=False)
opt("Auth_Password_File", V.PATH, None, L,
    "Our extension: password file for SMTP AUTH (scrypt hashes; `impetus passwd FILE USER`). "
    "AUTH is offered only after STARTTLS; a successful AUTH may relay.", supported=True)
opt("SMTP_Extensions", V.ARRAY, None, L, "Extra ESMTP extensions offered.", supported=True)
opt("Context", V.HASH, None, L, "Connection context variables.", supported=False)
opt("TLS_Client_CA", V.PATH, None, L, "CA bundle for verifying client certificates.", supported=True)
opt("TLS_Verify_Mode", V.Enum("none", "require"), "none", L, "Client certificate policy.", supported=True)
opt("Use_SSL", V.BOOL, False, L, "Implicit TLS on connect.", supported=True)
opt("STARTTLS_Injection_Policy", V.Enum("reject", "allow"), "reject", L,
    "What to do with commands pipelined after STARTTLS.", supported=False)
opt("Require_EHLO", V.BOOL, False, L, "Reject MAIL before EHLO/HELO.", supported=False)
opt("Allow_Null_Envelope_Sender", V.BOOL, True, L, "Accept MAIL FROM:<>.", supported=False)
opt("Allow_IP_Literal", V.BOOL, True, L, "Accept IP literal domains.", supported=False)
opt("Domain_For_Unqualified_Sender_Address", V.STR, None, L,
    "Domain appended to unqualified senders.", supported=False)
opt("Domain_For_Unqualified_Recipient_Addresses", V.STR, None, L,
    "Domain appended to unqualified recipients.", supported=False)
opt("Reconfig_Message", V.STR, "4.3.2 Reconfiguration in progress", GL,
    "Reply text when the config changed under a session.", supported=False)
opt("Listen_Backlog", V.INT, 500, LL, "listen() backlog.", supported=False)
opt("TCP_Recv_Buffer_Size", V.INT, 4096, L, "Socket receive buffer (0 = OS).", supported=False)
opt("TCP_Send_Buffer_Size", V.INT, 4096, L, "Socket send buffer (0 = OS).", supported=False)
opt("Concurrency", V.INT, None, LL, "Listener worker threads.", supported=False)
opt("Pool_Name", V.STR, None, LL, "Thread pool name.", supported=False)
opt("Events_Per_Iter", V.INT, None, LL, "Events handled per loop iteration.", supported=False)
opt("Accept_Queue_Backlog", V.INT, None, LL, "Accept queue backlog.", supported=False)
opt("Proxy_Protocol", V.BOOL, False, L, "Require a HAProxy PROXY header.", supported=False)
opt("Proxy_Protocol_Timeout", V.DURATION, 60, L, "Wait for the PROXY header.", supported=False)
opt("File_Mode", V.MODE, None, ("listen", "control_listen", "http_listen"),
    "Mode of a Unix-domain control or HTTP socket (control default 0600, HTTP 0660).",
    supported=True, unsupported_scopes=("listen",))

# §11.2 control listener (impetus console) and our HTTP listener
opt("Timeout", V.DURATION, 60, ("control_listener", "control_listen"),
    "Idle control session timeout (the session is closed; the console reconnects).",
    supported=True)
opt("Enable_Authentication", V.BOOL, False, ("control_listener", "control_listen"),
    "Require console authentication (challenge-response against Control_Password_File). "
    "Mandatory on TCP control sockets: a TCP Listen without it is a config error.",
    supported=True)
opt("Control_Password_File", V.PATH, None, ("control_listener", "control_listen"),
    "Console accounts, in the `impetus passwd` file format (user:scrypt$...); needed by "
    "Enable_Authentication (our extension; replaces AuthDigestMD5Parameters).", supported=True)
opt("AuthDigestMD5Parameters", V.HASH, None, ("control_listener", "control_listen"),
    "DIGEST-MD5 console authentication parameters (use Control_Password_File).", supported=False)

# §12 logging (ec_logger and bounce_logger modules)
opt("Mainlog", V.PATH, "/var/log/impetus/mainlog.ec", ECL, "Main log file.", supported=True)
opt("Rejectlog", V.PATH, "/var/log/impetus/rejectlog.ec", ECL,
    "Inbound rejection log file.", supported=True)
opt("Paniclog", V.PATH, "/var/log/impetus/paniclog.ec", ECL,
    "Panic/debug log file.", supported=True)
opt("Acctlog", V.PATH, "/var/log/impetus/acctlog.ec", ECL,
    "Authentication accounting log file.", supported=True)
opt("Mainlog_Mode", V.MODE, 0o644, ECL, "Mode of the main log.", supported=True)
opt("Rejectlog_Mode", V.MODE, 0o644, ECL, "Mode of the reject log.", supported=True)
opt("Paniclog_Mode", V.MODE, 0o644, ECL, "Mode of the panic log.", supported=True)
opt("Acctlog_Mode", V.MODE, 0o644, ECL, "Mode of the accounting log.", supported=True)
opt("Heartbeat", V.DURATION, 60, LOGGERS, "Seconds between heartbeat lines.", supported=True)
opt("Log_Receptions", V.BOOL, True, ECL, "Log R records.", supported=True)
opt("Log_Deliveries", V.BOOL, True, ECL, "Log D records.", supported=True)
opt("Log_Transient_Failures", V.BOOL, True, LOGGERS,
    "Log T records (mainlog) / transient failures (bouncelog).", supported=True)
opt("Log_Permanent_Failures", V.BOOL, True, ECL, "Log P records.", supported=True)
opt("Log_Rejections", V.BOOL, True, ECL, "Log inbound rejections.", supported=True)
opt("Log_Errors", V.BOOL, True, ECL, "Log errors to the panic log.", supported=True)
opt("Bouncelog", V.PATH, "/var/log/impetus/bouncelog.ec", BCL, "Bounce log file.",
    supported=True)
opt("Bouncelog_Mode", V.MODE, 0o644, BCL, "Mode of the bounce log.", supported=True)
opt("Log_Inband_Bounces", V.BOOL, True, BCL, "Log in-band bounces.", supported=True)
opt("Log_Outofband_Bounces", V.BOOL, True, BCL, "Log out-of-band bounces.", supported=True)
opt("Log_Hires_Timestamp", V.BOOL, False, G, "Microsecond log timestamps (5.3+).", supported=False)

# §13 other outbound options
opt("Send_8BitMime", V.Enum("no", "ifavailable"), "no", OUT,
    "Add BODY=8BITMIME when the peer supports it.", supported=False)
opt("Transform_8BitMime_Content", V.Enum("ifneeded", "no", "strict", "strip"), "ifneeded", OUT,
    "What to do with 8-bit data for peers without 8BITMIME.", supported=False)
opt("Delivery_Response_Timeout", V.MILLIS, 5000, BDG,
    "Response wait for HTTP-style delivery methods.", supported=False)
opt("Hot_Domains", V.ARRAY, None, G, "Busy domains given their own maintainer.", supported=False)
opt("Exclude_Vctx_Conn", V.ARRAY, None, G, "Connection context keys not spooled.", supported=False)
opt("Exclude_Vctx_Mess", V.ARRAY, None, G, "Message context keys not spooled.", supported=False)
opt("Enable_FBL_Header_Insertion", V.BOOL, False, OUT, "Insert feedback-loop headers.", supported=False)
opt("Opendkim_Sign", V.BOOL, True, OUT, "DKIM-sign on delivery.", supported=False)
opt("DomainKeys", V.BOOL, False, OUT, "DomainKeys-sign on delivery.", supported=False)
opt("Use_Sendfile", V.BOOL, False, G, "Use sendfile() for bodies.", supported=False)
opt("Disable_Nagle_Algorithm", V.BOOL, False, G, "Set TCP_NODELAY.", supported=False)
opt("TCP_Buffer_Size", V.INT, None, G, "Socket buffer size.", supported=False)
opt("Async_Bounce_Rendering", V.BOOL, True, G, "Render bounces off the scheduler.", supported=False)
opt("Debug_Flags", V.ARRAY, None, G, "Paniclog verbosity flags.", supported=False)
opt("Outbound_SMTP_Auth_User", V.STR, None, OUT, "SMTP AUTH user for the next hop.", supported=False)
opt("Outbound_SMTP_Auth_Pass", V.STR, None, OUT, "SMTP AUTH password for the next hop.", supported=False)
opt("Outbound_SMTP_Auth_Type", V.Enum("plain", "login", "xoauth2"), None, OUT,
    "SMTP AUTH mechanism for the next hop.", supported=False)

OPTIONS: dict[str, OptionSpec] = {}
for _spec in _TABLE:
    if _spec.lname in OPTIONS:  # pragma: no cover - table typo
        raise ValueError(f"duplicate option {_spec.name}")
    OPTIONS[_spec.lname] = _spec


def get_option(name: str) -> OptionSpec | None:
    """The spec for ``name`` (case-insensitive), or None."""
    return OPTIONS.get(name.lower())


def all_options() -> list[OptionSpec]:
    return list(_TABLE)


# ---------------------------------------------------------------------------
# Stanzas


@dataclass(frozen=True)
class StanzaSpec:
    name: str
    #: scope kind of the stanza's body, by the kind of the enclosing scope
    kinds: dict[str, str]
    #: "required", "optional" or "none"
    instance: str
    supported: bool = True
    doc: str = ""

    @property
    def lname(self) -> str:
        return self.name.lower()


STANZAS: dict[str, StanzaSpec] = {}


def _stanza(name: str, parents, instance: str, supported: bool = True, doc: str = "",
            kinds: dict[str, str] | None = None) -> None:
    if kinds is None:
        kinds = {p: name.lower() for p in parents}
    STANZAS[name.lower()] = StanzaSpec(name, kinds, instance, supported, doc)


_stanza("Binding_Group", ("global",), "required", doc="a group of bindings")
_stanza("Binding", ("global", "binding_group"), "required", doc="a virtual MTA")
_stanza("Domain", ("global", "binding_group", "binding"), "required",
        doc="per-destination-domain settings")
_stanza("Host", ("global", "binding_group", "binding"), "required", doc="per-MX-host settings")
_stanza("ESMTP_Listener", ("global",), "none", doc="inbound SMTP listener")
_stanza("Control_Listener", ("global",), "none", doc="console listener")
_stanza("HTTP_Listener", ("global",), "none",
        doc="HTTP listener: /metrics and the injection API (our extension)")
_stanza("Listen", (), "required", doc="one listening socket",
        kinds={"esmtp_listener": "listen", "control_listener": "control_listen",
               "http_listener": "http_listen"})
_stanza("Peer", ("esmtp_listener", "listen"), "required", doc="client ACL by CIDR")
_stanza("ec_logger", ("global",), "optional", doc="the logging module")
_stanza("bounce_logger", ("global",), "optional", doc="the bounce logging module")
# Known, not implemented yet: rejected with "not supported yet" (D19).
for _name in ("mxip", "static_routes", "adaptive", "delay_dsn", "outbound_smtp_auth",
              "bind_address_secondary", "ha_proxy_client", "dane", "curfew",
              "response_transcode", "Pathway", "Pathway_Group",
              "ECStream_Listener", "Security", "opendkim", "sieve", "scriptlet",
              "msgc_server", "cluster", "fbl", "inbound_audit", "outbound_audit",
              "spf", "dkim_validate", "alias", "custom_logger"):
    _stanza(_name, ("global",), "optional", supported=False)


# ---------------------------------------------------------------------------
# Rendering: `impetus options` and docs/OPTIONS.md


class OptionRow(NamedTuple):
    name: str
    type: str
    default: str
    scopes: str
    supported: bool


def option_rows(include_unsupported: bool = True) -> list[OptionRow]:
    """One row per option, sorted by name (case-insensitive)."""
    rows = []
    for spec in sorted(_TABLE, key=lambda s: s.lname):
        if not include_unsupported and not spec.supported:
            continue
        scopes = list(spec.scopes)
        if spec.unsupported_scopes:
            scopes = [s + " (not yet)" if s in spec.unsupported_scopes else s for s in scopes]
        rows.append(OptionRow(spec.name, spec.type.name, spec.type.format(spec.default),
                              ", ".join(scopes), spec.supported))
    return rows


def render_options_table(include_unsupported: bool = True) -> str:
    """The option table as aligned plain text (for ``impetus options``)."""
    header = ("NAME", "TYPE", "DEFAULT", "SCOPES", "STATUS")
    rows = [header] + [
        (r.name, r.type, r.default, r.scopes, "supported" if r.supported else "not yet")
        for r in option_rows(include_unsupported)
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_options_markdown() -> str:
    """docs/OPTIONS.md."""
    out = [
        "# Impetus configuration options",
        "",
        "Generated from the option table in `impetus/config/options.py` by",
        "`python -m impetus.config.options > docs/OPTIONS.md`; do not edit by hand.",
        "",
        "Option and stanza names are case-insensitive. Options marked *not yet* are",
        "recognised but rejected with \"option 'X' is not supported yet\" (decision D19).",
        "A `domain` option is valid in every `Domain` stanza (global, inside a",
        "binding, a binding group, or a binding inside a group).",
        "",
        "Outbound lookups fall back `binding_group::binding::domain > binding::domain >",
        "binding_group::domain > binding > binding_group > domain > global > default`",
        "(decision D1). Listener lookups fall back `peer > listen > esmtp_listener >",
        "global > default`. Relative paths in path-typed options are relative to the",
        "directory of the file that sets them.",
        "",
        "## Notes on the language",
        "",
        "* Strings are `\"...\"` or `'...'`; inside them a backslash escapes the next",
        "  character (`\\\"`, `\\\\`; `\\n` is just `n`) (decision D16). `/` is an ordinary",
        "  character in a bare word, so `( 127.0.0.0/8 )` works; `/*` always opens a",
        "  comment. `=` is required between an option and its value.",
        "* Repeated named stanzas merge; a repeated option in one scope: the later wins.",
        "* `include`/`readonly_include` paths are relative to the including file's",
        "  directory (there is no search path). A directory includes its non-hidden",
        "  regular files in lexical order, without recursing.",
        "* Within one container the exact `Domain` stanza is tried first, then the",
        "  matching `/regex/` stanzas in file order; the first that sets the option wins.",
        "  Regexes are Python `re` patterns, matched case-insensitively with `search`",
        "  (anchor them with `^...$`).",
        "* A binding may be declared both inside its group and at the top level; the",
        "  `binding` level tries the group's stanza first. A binding may belong to one",
        "  group only. Bindings not declared in a group belong to the `default` group.",
        "* Option lookups for a binding that is not declared fall back as for an",
        "  empty binding in the `default` group.",
        "* `ec_logger`/`bounce_logger`: log paths are unset when the module stanza is",
        "  absent; with the stanza present, unset paths take the defaults below.",
        "* `Host \"<name>\"` stanzas (top level, in a binding or a binding group) match",
        "  the MX host name (the domain itself when it has no MX) or an IP address",
        "  (`Host \"192.0.2.1\"`, `Host \"2001:db8::1\"`); `/regex/` names work as for",
        "  `Domain`. Host options are looked up only along `binding_group::binding::host >",
        "  binding_group::host > binding::host > host` and never fall back to the",
        "  domain/binding/global chain: a matching Host stanza that does not set",
        "  `Max_Outbound_Connections` means `-1` (unlimited) (decision D18). A regex",
        "  Host stanza is one shared bucket for every host it matches.",
        "* `Routes` items: a host name or IP literal (IPv6 in brackets, optional",
        "  `:port`), `\"__mx__\"`, `smtp://host[:port]?pref=P&ttl=T&port=O&type=mx|a` or",
        "  `lmtp://host?port=N` (our extension, D6). Parameter names are exactly `pref`,",
        "  `ttl`, `port`, `type`. Items without `pref` rank by list position after the",
        "  ranked ones; `__mx__` keeps the MX order at its position (D5). Names without",
        "  `type=` are looked up MX first, then A/AAAA; IP literals are used as is (D4).",
        "* Bindings: names are case-sensitive, without spaces; binding names also without",
        "  colons. The `default` binding and the `default` group always exist. A group's",
        "  members are its bindings in declaration order (D2 round-robin).",
        "* `Bind_Address` must be an address configured on this host (checked at load",
        "  with a test `bind()`; 127.0.0.0/8 and ::1 always count), `*`, or a host name",
        "  listed in /etc/hosts (never looked up in DNS).",
        "* Throttles (`Outbound_Throttle_*`, `Cluster_Outbound_Throttle_*`) are shared by",
        "  reference (spec §2.3, §6.3): one bucket per stanza that sets the option, drawn",
        "  on by every binding and domain that falls back to it. A group value is one",
        "  bucket for all of the group's bindings and domains, a regex `Domain` stanza one",
        "  for every domain it matches, a global value one for the whole system; repeat",
        "  the option in each scope to give each its own bucket. Rates are `\"N\"` per",
        "  second or `\"N/S\"` per S seconds (S >= 1); `0` means unlimited and, set in a",
        "  narrower scope, lifts a broader throttle. `Scope_Max_Outbound_Connections`",
        "  and `Server_Max_Outbound_Connections` are shared the same way (0 = no cap).",
        "  Cluster throttles are shared through `Cluster_Throttle_Store`; without it",
        "  they are enforced on this node only.",
        "* Integers may be quoted. `*_Mode` options are octal with a leading 0.",
        "  Booleans: `true/false`, `on/off`, `enabled/disabled`, `1/0`, any case.",
        "",
        "## Options",
        "",
        "| Option | Type | Default | Scopes | Status | Description |",
        "|---|---|---|---|---|---|",
    ]
    for spec in sorted(_TABLE, key=lambda s: s.lname):
        scopes = ", ".join(s + " (not yet)" if s in spec.unsupported_scopes else s
                           for s in spec.scopes)
        status = "supported" if spec.supported else "not yet"
        out.append(f"| `{spec.name}` | {_md(spec.type.name)} | "
                   f"`{_md(spec.type.format(spec.default))}` | {scopes} | {status} | "
                   f"{_md(spec.doc)} |")
    out += ["", "## Stanzas", "", "| Stanza | May appear in | Name | Status |",
            "|---|---|---|---|"]
    for st in sorted(STANZAS.values(), key=lambda s: (not s.supported, s.lname)):
        where = ", ".join(st.kinds)
        name = {"required": "required", "optional": "optional", "none": "none"}[st.instance]
        status = "supported" if st.supported else "not yet"
        out.append(f"| `{st.name}` | {where} | {name} | {status} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--text", "-t"):
        sys.stdout.write(render_options_table())
    else:
        sys.stdout.write(render_options_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
