"""End to end outbound TLS (spec §7, D11): a real ``impetus serve``, the test
DNS, recording sinks with trustme certificates, Dovecot LMTP.

The zone: example.test MX 10 mx1 (127.0.0.2), 20 mx2 (127.0.0.3); amx.test
A 127.0.0.4; lmtp.example.test A 127.0.0.1.  The ``certs`` server
certificate is valid for mx1/mx2/lmtp.example.test.
"""
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration

STARTTLS_NOT_ADVERTISED = "451 4.7.6 [internal] STARTTLS required but not advertised"
HOST_MISMATCH = "451 4.7.5 [internal] SSL certificate subject does not match host"
NEGOTIATION_FAILED = "451 4.7.5 [internal] TLS negotiation failed"


@pytest.fixture(autouse=True)
def quiet_sink_tls_errors():
    logger = logging.getLogger("mail.log")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)


def mta(tmp_path, dns_server, port, extra="", name="mta"):
    return MTA(tmp_path / name, dns_server.resolv_conf,
               body=f"Remote_SMTP_Port = {port}\nRetry_Interval = 1\nMax_Retry_Interval = 2\n{extra}")


def test_required_waits_for_starttls_then_delivers_over_tls(tmp_path, dns_server, smtp_sinks, certs):
    hosts = ("127.0.0.2", "127.0.0.3")
    sink = smtp_sinks(hosts)                       # no STARTTLS
    extra = f'TLS = required\nTLS_Verify = host\nTLS_CA = "{certs.ca_pem}"'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"])
        t = m.mainlog.wait_for("T")[0]
        # time@msgid@batchid@connid@T@domain@bytes@group@binding@stage@retries@secs@ip@response
        assert t[-1] == STARTTLS_NOT_ADVERTISED
        assert t[9] == "15" and t[5] == "example.test"
        assert not sink.messages
        assert all("STARTTLS" not in c and not c.startswith("MAIL")
                   for s in sink.sessions for c in s["commands"])
        # the same hosts and port now offer STARTTLS
        port = sink.port
        sink.close()
        sink = smtp_sinks(hosts, port=port, tls=True)
        [msg] = sink.wait_for(1, timeout=20)
        d = m.mainlog.wait_for("D")[0]
    assert msg["tls"] is not None and msg["rcpt_tos"] == ["bob@example.test"]
    assert int(d[9]) >= 1                          # delivered on a retry
    assert not m.mainlog.records("P")
    assert STARTTLS_NOT_ADVERTISED in "\n".join(m.paniclog.lines())


def test_host_verification_refuses_a_wrong_name(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls="wrongname")
    extra = f'TLS = required\nTLS_Verify = host\nTLS_CA = "{certs.ca_pem}"'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[-1] == HOST_MISMATCH and t[9] == "17"
    assert not sink.messages
    assert "wrong.example.test" in "\n".join(m.paniclog.lines())


def test_host_verification_passes_on_the_right_name(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls=True)
    extra = f'Domain "example.test" {{ TLS = required TLS_Verify = host TLS_CA = "{certs.ca_pem}" }}'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
        m.mainlog.wait_for("D")
    assert msg["tls"] is not None and msg["sockname"][0] == "127.0.0.2"
    assert not m.mainlog.records("T")


def test_host_verification_with_a_wildcard_certificate(tmp_path, dns_server, smtp_sinks, certs):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("*.example.test").configure_cert(ctx)
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls_context=ctx)
    extra = f'TLS = required\nTLS_Verify = host\nTLS_CA = "{certs.ca_pem}"'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["tls"] is not None


def test_ifavailable_falls_back_to_plain_text(tmp_path, dns_server, smtp_sinks, certs):
    ctx = certs.server_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2      # we insist on TLS 1.3: handshake fails
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls_context=ctx)
    extra = 'TLS = ifavailable\nTLS_Protocols = "-ALL:+TLSv1.3"'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
        m.mainlog.wait_for("D")
    assert msg["tls"] is None
    assert not m.mainlog.records("T")
    assert "retrying in plain text" in "\n".join(m.paniclog.lines())
    # TLS_Ifavailable_Fallback = false: a transient failure instead
    sink.clear()
    with mta(tmp_path, dns_server, sink.port, extra + "\nTLS_Ifavailable_Fallback = false",
             name="mta2") as m2:
        m2.send("alice@src.test", ["bob@example.test"])
        t = m2.mainlog.wait_for("T")[0]
    assert t[-1] == NEGOTIATION_FAILED and t[9] == "17"
    assert not sink.messages


def test_client_certificate_is_seen_by_the_sink(tmp_path, dns_server, smtp_sinks, certs):
    leaf = certs.ca.issue_cert("impetus.test")
    combined = tmp_path / "client.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(combined))
    ctx = certs.server_context()
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(certs.ca_pem)
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls_context=ctx)
    peercerts = []
    orig = sink.handler.handle_DATA

    async def handle_data(server, session, envelope):
        peercerts.append(server.transport.get_extra_info("peercert"))
        return await orig(server, session, envelope)
    sink.handler.handle_DATA = handle_data
    extra = (f'TLS = required\nTLS_Verify = host\nTLS_CA = "{certs.ca_pem}"\n'
             f'Binding "b" {{ TLS_Certificate = "{combined}" }}\n'
             f'Domain "amx.test" {{ TLS_Certificate = none }}')
    body = "X-Binding: b\r\nSubject: t\r\n\r\nhi\r\n"
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"], body)
        [msg] = sink.wait_for(1)
    assert msg["tls"] is not None
    [cert] = peercerts
    assert ("DNS", "impetus.test") in cert["subjectAltName"]


def test_client_certificate_not_sent_without_option(tmp_path, dns_server, smtp_sinks, certs):
    ctx = certs.server_context()
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(certs.ca_pem)
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls_context=ctx)
    peercerts = []
    orig = sink.handler.handle_DATA

    async def handle_data(server, session, envelope):
        peercerts.append(server.transport.get_extra_info("peercert"))
        return await orig(server, session, envelope)
    sink.handler.handle_DATA = handle_data
    with mta(tmp_path, dns_server, sink.port, "TLS = required") as m:
        m.send("alice@src.test", ["bob@example.test"])
        sink.wait_for(1)
    assert peercerts == [None]


def test_tls_to_dovecot_lmtp_with_verification(tmp_path, dns_server, smtp_sinks, dovecot_lmtp, certs):
    extra = (f'Domain "lmtp.test" {{\n  Routes = ( "lmtp://lmtp.example.test?port={dovecot_lmtp.port}" )\n'
             f'  TLS = required\n  TLS_Verify = host\n  TLS_CA = "{certs.ca_pem}"\n}}')
    with mta(tmp_path, dns_server, 25, extra) as m:
        m.send("alice@src.test", ["bob@lmtp.test"])
        [data] = dovecot_lmtp.wait_for_messages("bob@lmtp.test", 1)
        d = m.mainlog.wait_for("D")[0]
    assert d[11] == "127.0.0.1"
    head = data.split(b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n", 1)[0].decode(errors="replace")
    assert "TLS" in head, head                     # Dovecot's Received: notes the TLS session


def test_tls_to_dovecot_lmtp_wrong_name_is_refused(tmp_path, dns_server, dovecot_lmtp, certs):
    # a name for 127.0.0.1 that the Dovecot certificate does not carry
    dns_server.add("wrongname.lmtp.test. 300 IN A 127.0.0.1")
    extra = (f'Domain "lmtp.test" {{\n  Routes = ( "lmtp://wrongname.lmtp.test?port={dovecot_lmtp.port}" )\n'
             f'  TLS = required\n  TLS_Verify = host\n  TLS_CA = "{certs.ca_pem}"\n}}')
    with mta(tmp_path, dns_server, 25, extra) as m:
        m.send("alice@src.test", ["bob@lmtp.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[-1] == HOST_MISMATCH
    assert not dovecot_lmtp.messages_for("bob@lmtp.test")


class StallingServer:
    """Offers STARTTLS, answers it with 220, then never speaks TLS."""

    def __init__(self, host, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.connections = 0
        self.clients = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.clients.append(c)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        try:
            f = c.makefile("rb")
            c.sendall(b"220 stall.test ESMTP\r\n")
            while line := f.readline():
                cmd = line.strip().upper()
                if cmd.startswith(b"EHLO"):
                    c.sendall(b"250-stall.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif cmd == b"STARTTLS":
                    c.sendall(b"220 2.0.0 go ahead\r\n")
                    while c.recv(4096):       # swallow the ClientHello, say nothing
                        pass
                    return
                elif cmd == b"QUIT":
                    c.sendall(b"221 bye\r\n")
                    return
                else:
                    c.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()
        for c in self.clients:
            try:
                c.close()
            except OSError:
                pass


def test_stalled_handshake_times_out_and_does_not_wedge_the_queue(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.4",))            # amx.test: no TLS policy
    stall = StallingServer("127.0.0.2", sink.port)   # mx1.example.test; mx2 refuses
    try:
        extra = 'EHLO_Timeout = 2\nDomain "example.test" { TLS = required }'
        with mta(tmp_path, dns_server, sink.port, extra) as m:
            t0 = time.monotonic()
            m.send("alice@src.test", ["bob@example.test"])
            m.send("alice@src.test", ["carol@amx.test"])
            [msg] = sink.wait_for(1)                  # other mail flows meanwhile
            assert msg["rcpt_tos"] == ["carol@amx.test"]
            ts = m.mainlog.wait_for("T", 2, timeout=30)   # timed out, then retried
            elapsed = time.monotonic() - t0
            m.send("alice@src.test", ["dave@amx.test"])
            sink.wait_for(2)
        assert ts[0][-1] == NEGOTIATION_FAILED and ts[0][9] == "17"
        assert [t[10] for t in ts[:2]] == ["0", "1"]
        assert elapsed < 25
        assert stall.connections >= 2
        assert "no TLS handshake within 2 s" in "\n".join(m.paniclog.lines())
    finally:
        stall.close()


def test_corrupt_client_certificate_is_a_config_error(tmp_path, dns_server):
    bad = tmp_path / "client.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    m = MTA(tmp_path / "mta", dns_server.resolv_conf,
            body=f'TLS = required\nBinding "b" {{ TLS_Certificate = "{bad}" }}')
    r = subprocess.run([sys.executable, "-m", "impetus.cli", "check-config", "-c", str(m.config_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "option 'TLS_Certificate' file" in r.stderr and str(bad) in r.stderr
    r = subprocess.run([sys.executable, "-m", "impetus.cli", "serve", "-c", str(m.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "TLS_Certificate" in r.stderr
    missing = str(tmp_path / "missing.pem")
    m.config_path.write_text(m.config_path.read_text().replace(str(bad), missing))
    r = subprocess.run([sys.executable, "-m", "impetus.cli", "check-config", "-c", str(m.config_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot be read" in r.stderr and missing in r.stderr
