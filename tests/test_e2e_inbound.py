"""Who may relay, end to end (spec §9, §11.1; issue 6): STARTTLS + AUTH over
a real TLS session, implicit TLS, Peer ACLs, sender-domain relaying, XCLIENT
from trusted peers. The injecting client is 127.0.0.1; Relay_Hosts only
holds 127.0.0.2, so nothing here relays by address."""
import smtplib
import ssl

import pytest

from impetus.auth import set_password
from tests.mta import MTA

pytestmark = pytest.mark.integration


def mta(tmp_path, dns_server, sink_port, listener="", certs=None, extra=""):
    tls = ""
    if certs is not None:
        tls = f'TLS_Certificate = "{certs.server_crt}"\n  TLS_Key = "{certs.server_key}"\n'
    m = MTA(tmp_path / "mta", dns_server.resolv_conf, relay_hosts='"127.0.0.2/32"',
            body=f'Gateway = "127.0.0.9:{sink_port}"\n{extra}')
    text = m.config_path.read_text()
    # put listener-level options inside ESMTP_Listener
    text = text.replace("ESMTP_Listener {", "ESMTP_Listener {\n  " + tls + listener, 1)
    m.config_path.write_text(text)
    return m


def client_ctx(certs):
    return ssl.create_default_context(cafile=str(certs.ca_pem))


def test_auth_over_starttls_allows_relaying(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.9",))
    pw = tmp_path / "passwd"
    set_password(str(pw), "alice", "s3cret")
    listener = f'Auth_Password_File = "{pw}"\n  SMTP_Extensions = ( "AUTH PLAIN" "AUTH LOGIN" )\n'
    with mta(tmp_path, dns_server, sink.port, listener, certs) as m:
        with smtplib.SMTP("127.0.0.1", m.port, timeout=15, local_hostname="client.test") as s:
            s.ehlo()
            assert "auth" not in s.esmtp_features          # not offered before TLS
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail("a@src.test", ["v@elsewhere.test"], "Subject: x\r\n\r\nno\r\n")
            s.starttls(context=client_ctx(certs))
            s.ehlo()
            assert "auth" in s.esmtp_features
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "wrong")
            s.login("alice", "s3cret")
            s.sendmail("a@src.test", ["v@elsewhere.test"], "Subject: y\r\n\r\nyes\r\n")
        [msg] = sink.wait_for(1)
    assert msg["rcpt_tos"] == ["v@elsewhere.test"]
    assert b"s3cret" not in (m.workdir / "mainlog.ec").read_bytes()


def test_implicit_tls_listener(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.9",))
    m = mta(tmp_path, dns_server, sink.port, "Use_SSL = true\n", certs,
            extra="")
    # Use_SSL listener: the readiness probe of tests.mta expects a plain 220,
    # so start it and poll with a TLS client instead.
    m.config_path.write_text(m.config_path.read_text().replace(
        'Relay_Hosts = ( "127.0.0.2/32" )', 'Relay_Hosts = ( "127.0.0.0/8" )'))
    import subprocess
    import sys
    from tests.mta import wait_until
    out = open(m.output, "ab")
    m.proc = subprocess.Popen([sys.executable, "-m", "impetus.cli", "serve", "-c",
                               str(m.config_path)], stdout=out, stderr=subprocess.STDOUT)

    def ready():
        try:
            with smtplib.SMTP_SSL("127.0.0.1", m.port, context=client_ctx(certs), timeout=2,
                                  local_hostname="client.test") as s:
                return s.noop()[0] == 250
        except (OSError, smtplib.SMTPException):
            return False
    try:
        wait_until(ready, 15, what="implicit-TLS listener")
        with smtplib.SMTP_SSL("127.0.0.1", m.port, context=client_ctx(certs), timeout=15,
                              local_hostname="client.test") as s:
            s.sendmail("a@src.test", ["v@example.test"], "Subject: tls\r\n\r\nover TLS\r\n")
        [msg] = sink.wait_for(1)
        assert msg["rcpt_tos"] == ["v@example.test"]
    finally:
        m.stop()


def test_peer_open_relay(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    listener = 'Peer "127.0.0.1/32" { Open_Relay = true }\n'
    with mta(tmp_path, dns_server, sink.port, listener) as m:
        m.send("a@src.test", ["v@anywhere.test"], source="127.0.0.1")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            m.send("a@src.test", ["v@anywhere.test"], source="127.0.0.3")  # no matching Peer
        [msg] = sink.wait_for(1)
    assert msg["rcpt_tos"] == ["v@anywhere.test"]


def test_most_specific_peer_wins(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    listener = ('Peer "127.0.0.0/8" { Open_Relay = true }\n'
                '  Peer "127.0.0.3/32" { Open_Relay = false }\n')
    with mta(tmp_path, dns_server, sink.port, listener) as m:
        m.send("a@src.test", ["v@anywhere.test"], source="127.0.0.1")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            m.send("a@src.test", ["v@anywhere.test"], source="127.0.0.3")
        sink.wait_for(1)


def test_relay_for_sending_domains(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    listener = 'Peer "127.0.0.1" { Relay_For_Sending_Domains = ( "*.good.test" ) }\n'
    with mta(tmp_path, dns_server, sink.port, listener) as m:
        m.send("a@mail.good.test", ["v@anywhere.test"])
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            m.send("a@good.test", ["v@anywhere.test"])   # *.good.test does not match good.test
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            m.send("a@bad.test", ["v@anywhere.test"])
        [msg] = sink.wait_for(1)
    assert msg["mail_from"] == "a@mail.good.test"


def test_xclient_from_a_trusted_peer_sets_the_client(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    listener = ('Peer "127.0.0.1" { SMTP_Extensions = ( "XCLIENT" ) }\n'
                '  Peer "10.9.8.0/24" { Open_Relay = true }\n')
    with mta(tmp_path, dns_server, sink.port, listener) as m:
        with smtplib.SMTP("127.0.0.1", m.port, timeout=15, local_hostname="proxy.test") as s:
            s.ehlo()
            assert "xclient" in s.esmtp_features
            code, _ = s.docmd("XCLIENT ADDR=10.9.8.7 NAME=orig.test HELO=orig.helo")
            assert code == 220
            s.ehlo()
            s.sendmail("a@src.test", ["v@anywhere.test"], "Subject: x\r\n\r\nvia proxy\r\n")
        [msg] = sink.wait_for(1)
        r = m.mainlog.wait_for("R")[0]
    assert r[9] == "10.9.8.7"          # the original client, as XCLIENT announced it
    assert b"10.9.8.7" in msg["data"]  # in our Received: header too


def test_xclient_from_an_untrusted_peer_is_refused(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    listener = 'Peer "127.0.0.5" { SMTP_Extensions = ( "XCLIENT" ) }\n'
    with mta(tmp_path, dns_server, sink.port, listener) as m:
        with smtplib.SMTP("127.0.0.1", m.port, timeout=15, local_hostname="c.test") as s:
            s.ehlo()
            assert "xclient" not in s.esmtp_features
            code, _ = s.docmd("XCLIENT ADDR=127.0.0.2")
            assert code >= 500


def test_tls_verified_peer_can_relay(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.9",))
    listener = (f'TLS_Client_CA = "{certs.ca_pem}"\n  TLS_Verified_Peer_Can_Relay = true\n')
    with mta(tmp_path, dns_server, sink.port, listener, certs) as m:
        def attempt(cert, key):
            ctx = client_ctx(certs)
            if cert:
                ctx.load_cert_chain(cert, key)
            with smtplib.SMTP("127.0.0.1", m.port, timeout=15, local_hostname="c.test") as s:
                s.starttls(context=ctx)
                s.sendmail("a@src.test", ["v@elsewhere.test"], "Subject: c\r\n\r\ncert\r\n")
        attempt(certs.wrongname_crt, certs.wrongname_key)   # signed by the trusted test CA
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            attempt(None, None)                              # TLS but no certificate
        with pytest.raises((smtplib.SMTPRecipientsRefused, smtplib.SMTPServerDisconnected,
                            ssl.SSLError)):
            attempt(certs.untrusted_crt, certs.untrusted_key)  # certificate from another CA
        [msg] = sink.wait_for(1)
    assert msg["rcpt_tos"] == ["v@elsewhere.test"]
