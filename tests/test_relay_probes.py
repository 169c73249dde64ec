"""Open-relay probe suite (issue 6): classic tricks from a client outside
Relay_Hosts must all be refused, and nothing may be queued."""
import smtplib

import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration

# (MAIL FROM, RCPT TO) as sent on the wire; the client is 127.0.0.1 and
# Relay_Hosts only has 127.0.0.2.
PROBES = [
    ("<a@src.test>", "<victim@evil.test>"),
    ("<a@src.test>", "<victim%evil.test@impetus.test>"),           # percent hack
    ("<a@src.test>", "<@impetus.test:victim@evil.test>"),          # source route
    ("<a@src.test>", "<@a.test,@b.test:victim@evil.test>"),        # multi-hop source route
    ("<a@src.test>", '<"victim@evil.test"@impetus.test>'),         # quoted local part with @
    ("<a@src.test>", "<evil.test!victim@impetus.test>"),           # bang path
    ("<a@src.test>", "<evil.test!victim>"),                        # unqualified bang path
    ("<a@src.test>", "<victim@evil.test.>"),                       # trailing dot
    ("<a@src.test>", "<victim@[192.0.2.1]>"),                      # IP literal
    ("<a@src.test>", "<victim@[127.0.0.1]>"),                      # our own address literal
    ("<a@src.test>", "<VICTIM@EVIL.TEST>"),                        # upper case
    ("<>", "<victim@evil.test>"),                                  # null sender
    ("<postmaster@impetus.test>", "<victim@evil.test>"),           # our own domain as sender
    ("<a@src.test>", "<victim@localhost>"),
    ("<a@src.test>", "<victim@evil.test> NOTIFY=NEVER"),           # ESMTP parameters
    ("<a@src.test>", "victim@evil.test"),                          # no brackets
]


@pytest.fixture
def mta(tmp_path, dns_server):
    m = MTA(tmp_path / "mta", dns_server.resolv_conf, relay_hosts='"127.0.0.2/32"')
    with m:
        yield m


def _session(m):
    s = smtplib.SMTP("127.0.0.1", m.port, source_address=("127.0.0.1", 0), timeout=10,
                     local_hostname="prober.test")
    s.ehlo()
    return s


@pytest.mark.parametrize("mail, rcpt", PROBES, ids=[f"{i:02d}" for i in range(len(PROBES))])
def test_relay_trick_is_refused(mta, mail, rcpt):
    s = _session(mta)
    try:
        code, _ = s.docmd(f"MAIL FROM:{mail}")
        if code == 250:
            code, text = s.docmd(f"RCPT TO:{rcpt}")
            assert code >= 500, f"RCPT TO:{rcpt} from outside Relay_Hosts got {code} {text!r}"
            code, _ = s.docmd("DATA")
            assert code >= 500  # no valid recipients
    finally:
        s.close()
    assert mta.mainlog.records("R") == []


def test_auth_attempt_without_tls_does_not_open_relaying(mta):
    s = _session(mta)
    try:
        code, _ = s.docmd("AUTH PLAIN AGFkbWluAGFkbWlu")  # admin/admin, no TLS
        assert code >= 500
        s.docmd("MAIL FROM:<a@src.test>")
        code, _ = s.docmd("RCPT TO:<victim@evil.test>")
        assert code == 550
    finally:
        s.close()
    assert mta.mainlog.records("R") == []


def test_xclient_from_an_untrusted_peer_does_not_open_relaying(mta):
    s = _session(mta)
    try:
        code, _ = s.docmd("XCLIENT ADDR=127.0.0.2 NAME=trusted.test")
        assert code >= 500
        s.ehlo()
        s.docmd("MAIL FROM:<a@src.test>")
        code, _ = s.docmd("RCPT TO:<victim@evil.test>")
        assert code == 550
    finally:
        s.close()
    assert mta.mainlog.records("R") == []


def test_rejections_are_in_the_rejectlog(mta):
    s = _session(mta)
    try:
        s.docmd("MAIL FROM:<a@src.test>")
        s.docmd("RCPT TO:<victim@evil.test>")
    finally:
        s.close()
    mta.stop()
    lines = [line for line in mta.rejectlog.lines() if "relaying denied" in line]
    assert lines
    # §12.3: <time>: R="ip:port" L="ip:port" C="connid" ... P="..." E=550 ...
    line = lines[0]
    assert 'R="127.0.0.1:' in line and f'L="127.0.0.1:{mta.port}"' in line
    assert "E=550" in line and 'P="rcpt' in line
