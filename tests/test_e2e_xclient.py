"""End to end outbound XCLIENT (spec §8, D10): the next hop learns who
injected each message into a real ``impetus serve``."""
import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration

NOT_ADVERTISED = "451 4.7.6 [internal] XCLIENT required but not advertised"


def mta(tmp_path, dns_server, port, extra="", name="mta"):
    return MTA(tmp_path / name, dns_server.resolv_conf,
               body=f"Remote_SMTP_Port = {port}\nRetry_Interval = 1\nMax_Retry_Interval = 2\n{extra}")


def test_sink_learns_the_injecting_client(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with mta(tmp_path, dns_server, sink.port, "XCLIENT = ifavailable") as m:
        m.send("alice@src.test", ["bob@example.test"], source="127.0.0.7")
        [msg] = sink.wait_for(1)
    x = msg["xclient"]
    assert x["ADDR"] == "127.0.0.7"
    assert x["HELO"] == "client.test"            # MTA.send's local_hostname
    assert x["NAME"] == "[UNAVAILABLE]"
    assert x["PROTO"] == "ESMTP"
    assert x["LOGIN"] == "[UNAVAILABLE]" and x["PORT"] == "[UNAVAILABLE]"
    cmds = sink.sessions[0]["commands"]
    verbs = [c.split(" ")[0] for c in cmds]
    assert verbs[:4] == ["EHLO", "XCLIENT", "EHLO", "MAIL"]


def test_each_message_carries_its_own_client(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    extra = 'XCLIENT = required\nIdle_Timeout = 30\nMax_Outbound_Connections = 1'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"], source="127.0.0.7")
        sink.wait_for(1)
        m.send("alice@src.test", ["carol@example.test"], source="127.0.0.8")
        msgs = sink.wait_for(2)
    assert [(x["rcpt_tos"][0], x["xclient"]["ADDR"]) for x in msgs] == \
        [("bob@example.test", "127.0.0.7"), ("carol@example.test", "127.0.0.8")]
    assert sink.connections_total == 1           # one session, XCLIENT before each message


def test_required_without_xclient_is_a_transient_failure(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), ehlo_extra=("PIPELINING", "ENHANCEDSTATUSCODES"))
    extra = 'Domain "example.test" { XCLIENT = required }\nXCLIENT = ifavailable'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"], source="127.0.0.7")
        m.send("alice@src.test", ["carol@multi.test"], source="127.0.0.7")
        [msg] = sink.wait_for(1)                 # ifavailable: sent without XCLIENT
        t = m.mainlog.wait_for("T")[0]
    assert msg["rcpt_tos"] == ["carol@multi.test"] and msg["xclient"] is None
    # time@msgid@batchid@connid@T@domain@bytes@group@binding@stage@retries@secs@ip@response
    assert t[5] == "example.test" and t[-1] == NOT_ADVERTISED and t[9] == "19"
    assert t[12] in ("127.0.0.2", "127.0.0.3")
    assert not m.mainlog.records("P")


def test_xclient_after_starttls(tmp_path, dns_server, smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls=True)
    extra = f'XCLIENT = required\nTLS = required\nTLS_Verify = host\nTLS_CA = "{certs.ca_pem}"'
    with mta(tmp_path, dns_server, sink.port, extra) as m:
        m.send("alice@src.test", ["bob@example.test"], source="127.0.0.9")
        [msg] = sink.wait_for(1)
    assert msg["tls"] is not None and msg["xclient"]["ADDR"] == "127.0.0.9"
    verbs = [c.split(" ")[0] for c in sink.sessions[0]["commands"]]
    assert verbs[:6] == ["EHLO", "STARTTLS", "EHLO", "XCLIENT", "EHLO", "MAIL"]


def test_xclient_to_dovecot_lmtp(tmp_path, dns_server, dovecot_lmtp):
    extra = (f'Domain "lmtp.test" {{ Routes = ( "lmtp://127.0.0.1?port={dovecot_lmtp.port}" )\n'
             f'  XCLIENT = required }}')
    with mta(tmp_path, dns_server, 25, extra) as m:
        m.send("alice@src.test", ["bob@lmtp.test"], source="127.0.0.7")
        [data] = dovecot_lmtp.wait_for_messages("bob@lmtp.test", 1)
    head = data.split(b"\n\n", 1)[0].replace(b"\r", b"").decode(errors="replace")
    assert "127.0.0.7" in head.split("Received:", 2)[1], head   # Dovecot's Received: names the client
