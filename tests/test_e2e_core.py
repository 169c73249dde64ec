"""End to end: real ``impetus serve`` process, real DNS server, real SMTP sinks.

The zone (tests/peers/zones/test.zone): example.test MX 10 mx1 (127.0.0.2),
20 mx2 (127.0.0.3); amx.test has only A 127.0.0.4; nullmx.test is a null MX.
"""
import email
import email.policy
import signal
import smtplib
import time

import pytest

from tests.mta import MTA, wait_until
from tests.peers.net import free_port

pytestmark = pytest.mark.integration

NULL_SENDER = ("", "<>")  # aiosmtpd records MAIL FROM:<> as "<>"


def mta(tmp_path, dns_server, port, extra=""):
    return MTA(tmp_path / "mta", dns_server.resolv_conf,
               body=f"Remote_SMTP_Port = {port}\n{extra}")


def parse(msg):
    return email.message_from_bytes(msg["data"], policy=email.policy.default)


def test_mx_preference_delivers_to_best_mx(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
        d = m.mainlog.wait_for("D")[0]
    assert msg["sockname"][0] == "127.0.0.2"
    assert msg["rcpt_tos"] == ["bob@example.test"]
    assert msg["mail_from"] == "alice@src.test"
    assert b"Hello from the test suite." in msg["data"]
    assert b"Received: from client.test" in msg["data"]
    r = m.mainlog.records("R")[0]
    # time@msgid@batchid@connid@R@rcpt_local@rcpt_domain@sender_local@sender_domain@peer_ip@size@proto@group@binding
    assert r[5:10] == ["bob", "example.test", "alice", "src.test", "127.0.0.1"]
    assert r[11:] == ["esmtp", "default", "default"]
    # time@msgid@batchid@connid@D@domain@size@group@binding@retries@secs@remote_ip
    assert d[1] == r[1] and d[2] == r[2]
    assert d[5] == "example.test" and d[7:10] == ["default", "default", "0"]
    assert d[11] == "127.0.0.2"


def test_failover_to_second_mx_when_first_refuses(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.3",))  # nothing listens on 127.0.0.2:port
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
        d = m.mainlog.wait_for("D")[0]
    assert msg["sockname"][0] == "127.0.0.3"
    assert d[11] == "127.0.0.3"
    assert not m.mainlog.records("T")


def test_failover_when_first_mx_greets_with_421(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.3",))
    import socket
    import threading
    bad = socket.socket()
    bad.bind(("127.0.0.2", sink.port))
    bad.listen(5)

    def greeter():
        while True:
            try:
                c, _ = bad.accept()
            except OSError:
                return
            c.sendall(b"421 4.3.2 mx1 is busy, go away\r\n")
            c.close()
    threading.Thread(target=greeter, daemon=True).start()
    try:
        with mta(tmp_path, dns_server, sink.port) as m:
            m.send("alice@src.test", ["bob@example.test"])
            [msg] = sink.wait_for(1)
        assert msg["sockname"][0] == "127.0.0.3"
    finally:
        bad.close()


def test_implicit_mx_uses_a_record(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.4",))
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@src.test", ["carol@amx.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.4"


def _assert_bounced(sink, m, rcpt, status, text):
    p = m.mainlog.wait_for("P")[0]
    assert p[-1] == text
    b = m.bouncelog.wait_for("B")[0]
    assert b[5:7] == rcpt.split("@")
    [bounce] = sink.wait_for(1)
    assert bounce["mail_from"] in NULL_SENDER
    assert bounce["rcpt_tos"] == ["alice@example.test"]
    msg = parse(bounce)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    status_part = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    raw = status_part.as_bytes().decode(errors="replace")
    assert f"Status: {status}" in raw
    assert rcpt in raw
    return p


def test_null_mx_fails_permanently_and_bounces(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@example.test", ["dave@nullmx.test"])
        _assert_bounced(sink, m, "dave@nullmx.test", "5.4.4",
                        "550 5.4.4 [internal] NULL MX domain does not accept mail")
        # The bounce itself is logged as received with protocol "internal".
        internal = [r for r in m.mainlog.records("R") if r[11] == "internal"]
        assert internal and internal[0][5:7] == ["alice", "example.test"]


def test_nxdomain_fails_permanently_and_bounces(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@example.test", ["erin@nx.test"])
        _assert_bounced(sink, m, "erin@nx.test", "5.4.4",
                        "554 5.4.4 [internal] Domain Lookup Failed")


def test_5xx_from_peer_bounces(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"),
                      rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("alice@example.test", ["nobody@example.test", "bob@example.test"])
        p = m.mainlog.wait_for("P")[0]
        assert p[-1] == "550 5.1.1 no such user"
        assert p[9] == "4"  # stage: during RCPT TO
        msgs = sink.wait_for(2)
    delivered = [x for x in msgs if x["mail_from"] == "alice@example.test"]
    bounces = [x for x in msgs if x["mail_from"] in NULL_SENDER]
    assert delivered[0]["rcpt_tos"] == ["bob@example.test"]
    assert len(bounces) == 1
    assert "Status: 5.1.1" in parse(bounces[0]).as_string()


def test_4xx_is_retried_then_delivered(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"),
                      rcpt_replies={"bob@example.test": "451 4.3.0 try again later"})
    with mta(tmp_path, dns_server, sink.port, "Retry_Interval = 1") as m:
        m.send("alice@src.test", ["bob@example.test"])
        t = m.mainlog.wait_for("T")[0]
        # ...@T@domain@bytes_sent@group@binding@stage@retries@secs@remote_ip@response
        assert t[5] == "example.test"
        assert int(t[6]) > 0
        assert t[9:11] == ["4", "0"]
        assert t[12] == "127.0.0.2"
        assert t[13] == "451 4.3.0 try again later"
        sink.set_rcpt_reply("bob@example.test", None)
        d = m.mainlog.wait_for("D")[0]
        assert d[9] == "1"  # one retry before success
        [msg] = sink.wait_for(1)
    assert msg["rcpt_tos"] == ["bob@example.test"]


def test_message_expiration_expires(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"),
                      rcpt_replies={"bob@example.test": "451 4.3.0 try again later"})
    with mta(tmp_path, dns_server, sink.port,
             "Retry_Interval = 1\nMessage_Expiration = 3\nMax_Retries = none") as m:
        m.send("alice@example.test", ["bob@example.test"])
        p = m.mainlog.wait_for("P", timeout=20)[0]
        assert p[-1] == "554 5.4.7 [internal] exceeded max time without delivery"
        assert len(m.mainlog.records("T")) >= 2
        bounce = [x for x in sink.wait_for(1) if x["mail_from"] in NULL_SENDER]
    assert bounce and "exceeded max time" in parse(bounce[0]).as_string()


def test_max_retries_fails_after_n_retries(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"),
                      rcpt_replies={"bob@example.test": "451 4.3.0 try again later"})
    with mta(tmp_path, dns_server, sink.port,
             "Retry_Interval = 1\nMax_Retries = 2\nGenerate_Bounces = false") as m:
        m.send("alice@example.test", ["bob@example.test"])
        p = m.mainlog.wait_for("P", timeout=20)[0]
        assert p[-1] == "554 5.4.7 [internal] exceeded max retries without delivery"
        # first attempt + 2 retries = 3 attempts, the last one logged before the P
        assert [t[10] for t in m.mainlog.records("T")] == ["0", "1", "2"]
        time.sleep(0.5)
    assert sink.messages == []  # Generate_Bounces = false: no bounce


def test_never_bounce_a_null_sender(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"),
                      rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    with mta(tmp_path, dns_server, sink.port) as m:
        m.send("", ["nobody@example.test"])
        m.mainlog.wait_for("P")
        m.send("alice@src.test", ["bob@example.test"])  # a marker after the failure
        sink.wait_for(1)
    assert [x["mail_from"] for x in sink.messages] == ["alice@src.test"]


def test_acknowledged_message_survives_kill9_and_is_delivered_once(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.set_timeout("example.test")  # delivery stalls in DNS: the message is queued only
    m = mta(tmp_path, dns_server, sink.port).start()
    try:
        m.send("alice@src.test", ["bob@example.test"])
        m.mainlog.wait_for("R")
        m.kill()
        assert sink.messages == []
        dns_server.set_timeout("example.test", False)
        m.start()
        [msg] = sink.wait_for(1)
        m.mainlog.wait_for("D")
        assert msg["rcpt_tos"] == ["bob@example.test"]
        time.sleep(1.0)  # nothing more may arrive
        assert len(sink.messages) == 1
    finally:
        m.stop()


def test_relay_denied_outside_relay_hosts_and_nothing_queued(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = MTA(tmp_path / "mta", dns_server.resolv_conf, body=f"Remote_SMTP_Port = {sink.port}",
            relay_hosts='"127.0.0.2/32"')
    with m:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            m.send("mallory@evil.test", ["victim@example.test"], source="127.0.0.1")
        code, text = exc.value.recipients["victim@example.test"]
        assert code == 550 and b"5.7.1" in text and b"relaying denied" in text
        # the same mail from a relay host is fine
        m.send("alice@src.test", ["bob@example.test"], source="127.0.0.2")
        sink.wait_for(1)
        assert len(m.mainlog.records("R")) == 1
        assert wait_until(lambda: any("relaying denied" in line for line in m.rejectlog.lines()))


def test_sigterm_exits_zero_and_keeps_queued_mail(tmp_path, dns_server, smtp_sinks):
    dead = free_port("127.0.0.2")
    m = mta(tmp_path, dns_server, dead, "Retry_Interval = 3600").start()
    m.send("alice@src.test", ["bob@example.test"])
    m.mainlog.wait_for("T")
    assert m.stop(signal.SIGTERM) == 0
    from impetus.spool import Spool
    s = Spool(str(m.spool))
    s.open()
    try:
        assert [x.rcpt for x in s.recover()] == ["bob@example.test"]
    finally:
        s.close()


def test_recipients_are_batched_per_transaction(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port, "Max_Recipients_Per_Batch = 2") as m:
        m.send("alice@src.test", ["a@example.test", "b@example.test", "c@example.test",
                                  "d@amx.test"])
        msgs = sink.wait_for(2)
        m.mainlog.wait_for("D", 3)
    # example.test: 3 recipients, at most 2 per transaction; amx.test goes elsewhere
    assert sorted(len(x["rcpt_tos"]) for x in msgs) == [1, 2]
    assert sorted(r for x in msgs for r in x["rcpt_tos"]) == ["a@example.test", "b@example.test",
                                                              "c@example.test"]


def test_pipelining_and_connection_reuse(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port, "Idle_Timeout = 30") as m:
        m.send("alice@src.test", ["a@example.test"])
        sink.wait_for(1)
        m.send("alice@src.test", ["b@example.test"])
        sink.wait_for(2)
    sessions = [s for s in sink.sessions if any(c.startswith("MAIL") for c in s["commands"])]
    assert len(sessions) == 1, "the second message must reuse the cached connection"
    cmds = sessions[0]["commands"]
    assert cmds[0].startswith("EHLO impetus.test")
    assert sum(c.startswith("MAIL FROM") for c in cmds) == 2


def test_rcpt_timeout_is_transient_with_internal_text(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), delays={"RCPT": 3})
    with mta(tmp_path, dns_server, sink.port, "RcptTo_Timeout = 1\nRetry_Interval = 600") as m:
        m.send("alice@src.test", ["a@example.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[9] == "4"  # during RCPT TO
    assert t[-1] == "451 4.4.2 [internal] no RCPT TO response"


def test_ehlo_refused_falls_back_to_helo(tmp_path, dns_server):
    """A peer that only speaks RFC 821: EHLO gets 502, HELO works."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    seen = []

    def serve():
        c, _ = srv.accept()
        f = c.makefile("rwb")
        f.write(b"220 old.test SMTP\r\n"); f.flush()
        in_data = False
        for line in f:
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    f.write(b"250 ok\r\n"); f.flush()
                continue
            seen.append(line.strip().decode())
            verb = line[:4].upper()
            if verb == b"EHLO":
                f.write(b"502 command not implemented\r\n")
            elif verb == b"DATA":
                in_data = True
                f.write(b"354 go\r\n")
            elif verb == b"QUIT":
                f.write(b"221 bye\r\n"); f.flush()
                break
            else:
                f.write(b"250 ok\r\n")
            f.flush()
        c.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        with mta(tmp_path, dns_server, port, "Idle_Timeout = 1") as m:
            m.send("alice@src.test", ["a@example.test"])
            m.mainlog.wait_for("D")
        assert seen[0].startswith("EHLO") and seen[1] == "HELO impetus.test"
        assert seen[2] == "MAIL FROM:<alice@src.test>"  # no ESMTP parameters after HELO
    finally:
        srv.close()
