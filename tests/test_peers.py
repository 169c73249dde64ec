"""Smoke tests for the test peers themselves (tests/peers/)."""
from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE

from tests.peers import free_port, wait_port
from tests.peers.dns_server import raw_query

MSG = b"From: <s@src.test>\r\nTo: <a@example.test>\r\nSubject: hi\r\n\r\nhello\r\n"


# ------------------------------------------------------------------ DNS
def test_dns_server_answers(dns_server):
    r = raw_query("127.0.0.1", dns_server.port, "example.test", "MX")
    assert sorted(str(rr.rdata) for rr in r.rr) == ["10 mx1.example.test.", "20 mx2.example.test."]
    r = raw_query("127.0.0.1", dns_server.port, "mx2.example.test", "AAAA", tcp=True)
    assert [str(rr.rdata) for rr in r.rr] == ["::1"]
    # NODATA is NOERROR + SOA (the dnslib gotcha), NXDOMAIN stays NXDOMAIN
    r = raw_query("127.0.0.1", dns_server.port, "amx.test", "MX")
    assert r.header.rcode == RCODE.NOERROR and not r.rr and QTYPE[r.auth[0].rtype] == "SOA"
    r = raw_query("127.0.0.1", dns_server.port, "nope.test", "A")
    assert r.header.rcode == RCODE.NXDOMAIN
    r = raw_query("127.0.0.1", dns_server.port, "servfail.test", "MX")
    assert r.header.rcode == RCODE.SERVFAIL
    assert dns_server.query_count("example.test", "MX") == 1
    assert dns_server.query_count("mx2.example.test", "AAAA", proto="tcp") == 1
    assert Path(dns_server.resolv_conf).read_text().startswith(f"nameserver 127.0.0.1#{dns_server.port}\n")


def test_dns_server_runtime_changes(dns_server):
    dns_server.add("late.test. 60 IN MX 5 mx1.example.test.")
    assert [str(rr.rdata) for rr in raw_query("127.0.0.1", dns_server.port, "late.test", "MX").rr] \
        == ["5 mx1.example.test."]
    assert dns_server.remove("late.test", "MX") == 1
    assert raw_query("127.0.0.1", dns_server.port, "late.test", "MX").header.rcode == RCODE.NXDOMAIN
    dns_server.set_servfail("example.test")
    assert raw_query("127.0.0.1", dns_server.port, "example.test", "MX").header.rcode == RCODE.SERVFAIL
    dns_server.set_servfail("example.test", False)
    assert raw_query("127.0.0.1", dns_server.port, "example.test", "MX").header.rcode == RCODE.NOERROR
    dns_server.set_truncated("example.test")
    r = raw_query("127.0.0.1", dns_server.port, "example.test", "MX")
    assert r.header.tc == 1 and not r.rr
    assert len(raw_query("127.0.0.1", dns_server.port, "example.test", "MX", tcp=True).rr) == 2


def test_dns_server_timeout_and_garbage(dns_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        from dnslib import DNSRecord
        s.sendto(DNSRecord.question("timeout.test", "A").pack(), ("127.0.0.1", dns_server.port))
        with pytest.raises(socket.timeout):
            s.recvfrom(4096)
        s.settimeout(2)
        q = DNSRecord.question("garbage.test", "A")
        s.sendto(q.pack(), ("127.0.0.1", dns_server.port))
        data, _ = s.recvfrom(4096)
        assert data[:2] == q.pack()[:2]
        with pytest.raises(Exception):
            DNSRecord.parse(data)


def test_dns_server_stop_frees_port(tmp_path):
    from tests.peers.dns_server import DnsServer
    srv = DnsServer(tmp_path).start()
    port = srv.port
    t = time.monotonic()
    srv.stop()
    assert time.monotonic() - t < 1.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ SMTP sink
class _NamedSMTP(smtplib.SMTP):
    """smtplib verifies the certificate against the connect host; use a name."""
    def __init__(self, tls_name, *a, **kw):
        self._tls_name = tls_name
        super().__init__(*a, **kw)

    def starttls(self, *a, **kw):
        self._host = self._tls_name
        return super().starttls(*a, **kw)


def _send(host, port, rcpts, source="127.0.0.5", helo="client.test", starttls=None):
    with smtplib.SMTP(host, port, source_address=(source, 0), timeout=10,
                      local_hostname=helo) as s:
        if starttls is not None:
            s.starttls(context=starttls)
            s.ehlo(helo)
        return s.sendmail("s@src.test", rcpts, MSG)


def test_sink_records_peer_helo_rcpts(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",), rcpt_replies={"reject@example.test": "550 5.1.1 No such user"})
    refused = _send("127.0.0.2", sink.port, ["a@example.test", "reject@example.test", "b@example.test"])
    assert refused == {"reject@example.test": (550, b"5.1.1 No such user")}
    [m] = sink.wait_for(1)
    assert m["peer"][0] == "127.0.0.5"
    assert m["sockname"] == ("127.0.0.2", sink.port)
    assert m["helo"] == "client.test"
    assert m["mail_from"] == "s@src.test"
    assert m["rcpt_tos"] == ["a@example.test", "b@example.test"]
    assert m["rejected_rcpts"] == [("reject@example.test", "550 5.1.1 No such user")]
    assert m["data"].endswith(b"hello\r\n")
    assert m["tls"] is None and m["xclient"] is None
    [sess] = sink.sessions
    assert sess["commands"][0] == "ehlo client.test"
    assert "rcpt TO:<reject@example.test>" in sess["commands"], sess["commands"]
    sink.wait_idle()
    assert sink.connections_now == 0 and sink.max_concurrent_connections == 1


def test_sink_two_hosts_share_a_port(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    assert sink.hosts == ("127.0.0.2", "127.0.0.3")
    _send("127.0.0.2", sink.port, ["a@example.test"])
    _send("127.0.0.3", sink.port, ["b@example.test"])
    msgs = sink.wait_for(2)
    assert sorted(m["sockname"][0] for m in msgs) == ["127.0.0.2", "127.0.0.3"]
    assert {m["sockname"][1] for m in msgs} == {sink.port}


def test_sink_runtime_replies_and_timeout_message(smtp_sinks):
    sink = smtp_sinks()
    sink.set_mail_reply("451 4.3.0 Try later")
    with pytest.raises(smtplib.SMTPSenderRefused):
        _send("127.0.0.2", sink.port, ["a@example.test"])
    sink.set_mail_reply(None)
    sink.set_data_reply("554 5.7.1 Rejected by policy")
    with pytest.raises(smtplib.SMTPDataError):
        _send("127.0.0.2", sink.port, ["a@example.test"])
    assert sink.messages == [] and len(sink.rejected_messages) == 1
    sink.set_data_reply(None)
    sink.set_rcpt_reply("x@example.test", "452 4.2.2 Mailbox full")
    assert _send("127.0.0.2", sink.port, ["x@example.test", "a@example.test"]) == \
        {"x@example.test": (452, b"4.2.2 Mailbox full")}
    assert sink.wait_for(1)[0]["rcpt_tos"] == ["a@example.test"]
    with pytest.raises(AssertionError, match="expected 2 message"):
        sink.wait_for(2, timeout=0.2)


def test_sink_starttls_and_xclient(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls=True)
    ctx = certs.client_context()
    with _NamedSMTP("mx1.example.test", "127.0.0.2", sink.port, source_address=("127.0.0.5", 0),
                    timeout=10, local_hostname="client.test") as s:
        s.ehlo()
        assert s.has_extn("starttls") and s.has_extn("pipelining") and s.has_extn("xclient")
        s.starttls(context=ctx)
        s.ehlo("client.test")
        code, msg = s.docmd("XCLIENT", "ADDR=127.0.0.99 NAME=orig.example.net HELO=orig+2Ehelo")
        assert code == 220 and b"after XCLIENT" in msg
        s.ehlo("client.test")
        s.sendmail("s@src.test", ["a@example.test"], MSG)
    [m] = sink.wait_for(1)
    assert m["tls"] is not None and m["tls"][1].startswith("TLS")
    assert m["xclient"] == {"ADDR": "127.0.0.99", "NAME": "orig.example.net", "HELO": "orig.helo"}
    # a client that does not trust the test CA fails verification
    bad = ssl.create_default_context()
    with smtplib.SMTP("127.0.0.2", sink.port, timeout=10, local_hostname="client.test") as s:
        with pytest.raises(ssl.SSLError):
            s.starttls(context=bad)


def test_sink_counts_concurrent_connections(smtp_sinks):
    sink = smtp_sinks(delays={"EHLO": 0.3})
    threads = [threading.Thread(target=_send, args=("127.0.0.2", sink.port, ["a@example.test"]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(sink.wait_for(3)) == 3
    assert sink.max_concurrent_connections == 3
    sink.wait_idle()


def test_free_port_refuses_and_wait_port(smtp_sinks):
    port = free_port("127.0.0.2")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()
    with pytest.raises(TimeoutError):
        wait_port("127.0.0.2", port, timeout=0.2)
    sink = smtp_sinks()
    assert wait_port("127.0.0.2", sink.port, banner=b"220").startswith(b"220 mx1.example.test")


def test_network_guard_blocks_non_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError, match="network guard"):
            s.sendto(b"x", ("10.255.255.53", 53))
    with pytest.raises(socket.gaierror, match="network guard"):
        socket.getaddrinfo("example.com", 25)


# ------------------------------------------------------------------ certs
def test_certs_files(certs):
    ctx = certs.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    for f in (certs.ca_pem, certs.server_crt, certs.server_key):
        assert Path(f).read_text().startswith("-----BEGIN")


# ------------------------------------------------------------------ Dovecot LMTP
def test_dovecot_lmtp_delivers(dovecot_lmtp, certs):
    with smtplib.LMTP("127.0.0.1", dovecot_lmtp.port, source_address=("127.0.0.3", 0),
                      timeout=10) as s:
        s.ehlo("client.test")
        s.starttls(context=certs.client_context())
        s.ehlo("client.test")
        s.mail("s@src.test")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.rcpt("bob+tag@example.test")[0] == 250
        assert s.rcpt("unknown@example.test")[0] == 550
        code, _ = s.docmd("DATA")
        assert code == 354
        s.send(MSG + b".\r\n")
        replies = [s.getreply() for _ in range(2)]
        assert [c for c, _ in replies] == [250, 250], replies
    [alice] = dovecot_lmtp.messages_for("alice@example.test")
    assert b"hello" in alice and b"[127.0.0.3]" in alice
    assert len(dovecot_lmtp.messages_for("bob+tag@example.test")) == 1
    assert dovecot_lmtp.messages_for("unknown@example.test") == []
