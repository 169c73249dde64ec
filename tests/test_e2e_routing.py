"""Routing overrides end to end (spec §3, §4; D4-D9): Routes, LMTP, ports,
prohibited and skipped hosts, IPv6."""
import email
import email.policy

import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration
NULL_SENDER = ("", "<>")


def run_mta(tmp_path, dns_server, body):
    return MTA(tmp_path / "mta", dns_server.resolv_conf, body=body)


def test_routes_unranked_items_are_strict_failover(tmp_path, dns_server, smtp_sinks):
    second = smtp_sinks(("127.0.0.6",))
    port = second.port  # nothing listens on 127.0.0.5:port
    body = (f'Routes = ( "smtp://127.0.0.5?port={port}" "smtp://127.0.0.6?port={port}" )\n'
            f'Host_Failure_Retry = 0')
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = second.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.6"


def test_routes_first_item_is_used_exclusively_while_up(tmp_path, dns_server, smtp_sinks):
    first = smtp_sinks(("127.0.0.5",))
    second = smtp_sinks(("127.0.0.6",), port=first.port)
    body = (f'Routes = ( "smtp://127.0.0.5?port={first.port}" "127.0.0.6" )\n'
            f'Remote_SMTP_Port = {first.port}\nIdle_Timeout = 0')
    with run_mta(tmp_path, dns_server, body) as m:
        for i in range(4):
            m.send("a@src.test", [f"x{i}@example.test"])
        first.wait_for(4)
    assert second.messages == []


def test_routes_equal_preference_spreads_load(tmp_path, dns_server, smtp_sinks):
    a = smtp_sinks(("127.0.0.5",))
    b = smtp_sinks(("127.0.0.6",), port=a.port)
    body = (f'Routes = ( "smtp://127.0.0.5?pref=10" "smtp://127.0.0.6?pref=10" )\n'
            f'Remote_SMTP_Port = {a.port}\nIdle_Timeout = 0')
    with run_mta(tmp_path, dns_server, body) as m:
        for i in range(6):
            m.send("a@src.test", [f"x{i}@example.test"])
            m.mainlog.wait_for("D", i + 1)
    assert len(a.messages) >= 1 and len(b.messages) >= 1
    assert len(a.messages) + len(b.messages) == 6


def test_routes_mx_after_a_preferred_route(tmp_path, dns_server, smtp_sinks):
    mx = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = (f'Routes = ( "smtp://127.0.0.5?pref=1" "__mx__" )\n'
            f'Remote_SMTP_Port = {mx.port}')  # 127.0.0.5 is down
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = mx.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2"


def test_domain_routes_lmtp_uri_into_dovecot(tmp_path, dns_server, smtp_sinks, dovecot_lmtp):
    body = f'Domain "lmtp.test" {{ Routes = ( "lmtp://127.0.0.1?port={dovecot_lmtp.port}" ) }}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["bob@lmtp.test"])
        [data] = dovecot_lmtp.wait_for_messages("bob@lmtp.test", 1)
    assert b"Hello from the test suite." in data


def test_seed_example_smarthost_plus_lmtp_domain(tmp_path, dns_server, smtp_sinks, dovecot_lmtp):
    """Spec §3.1: everything to a smarthost, one domain to another gateway over LMTP."""
    smarthost = smtp_sinks(("127.0.0.5",))
    body = (f'Gateway = "127.0.0.5:{smarthost.port}"\n'
            f'Domain "local.example.test" {{\n'
            f'  Gateway = "127.0.0.1"\n  Delivery_Method = LMTP\n  LMTP_Port = {dovecot_lmtp.port}\n}}')
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["alice@local.example.test", "bob@example.test"])
        [data] = dovecot_lmtp.wait_for_messages("alice@local.example.test", 1)
        [relayed] = smarthost.wait_for(1)
        m.mainlog.wait_for("D", 2)
    assert relayed["rcpt_tos"] == ["bob@example.test"]
    assert b"Received: from client.test" in data


def test_lmtp_per_recipient_replies(tmp_path, dns_server, dovecot_lmtp):
    dovecot_lmtp.full("full@lmtp.test")          # 452 after DATA: transient for that one only
    body = (f'Domain "lmtp.test" {{ Gateway = "127.0.0.1" Delivery_Method = LMTP '
            f'LMTP_Port = {dovecot_lmtp.port} }}\nRetry_Interval = 600')
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["ok@lmtp.test", "full@lmtp.test"])
        dovecot_lmtp.wait_for_messages("ok@lmtp.test", 1)
        t = m.mainlog.wait_for("T")[0]
        d = m.mainlog.wait_for("D")[0]
    assert t[-1].startswith("452 4.2.2")
    assert t[9] == "9"  # reading confirmation
    assert d[5] == "lmtp.test"


def test_remote_smtp_port_per_domain(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.4",))
    body = f'Domain "amx.test" {{ Remote_SMTP_Port = {sink.port} }}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@amx.test"])
        sink.wait_for(1)


def test_prohibited_mx_address_fails_domain_with_551_and_bounces(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    body = f'Prohibited_Hosts = ( "127.0.0.3" )\nRemote_SMTP_Port = {sink.port}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("alice@amx.test", ["x@example.test"])
        p = m.mainlog.wait_for("P")[0]
        [bounce] = sink.wait_for(1)
    assert p[-1] == "551 5.4.6 [internal] Private/Loopback Address"
    assert bounce["mail_from"] in NULL_SENDER and bounce["rcpt_tos"] == ["alice@amx.test"]
    msg = email.message_from_bytes(bounce["data"], policy=email.policy.default)
    assert "5.4.6" in msg.as_string()


def test_skipped_address_is_passed_over(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = f'Skip_Hosts = ( "127.0.0.2/32" )\nRemote_SMTP_Port = {sink.port}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.3"


def test_all_hosts_skipped_is_transient_no_valid_hosts(tmp_path, dns_server, smtp_sinks):
    body = 'Skip_Hosts = ( "127.0.0.0/8" )\nRetry_Interval = 600'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[-1] == "451 4.4.1 [internal] No valid hosts"


def test_ipv6_delivery_only_when_use_ipv6(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("::1",))
    with run_mta(tmp_path, dns_server,
                 f"Use_IPv6 = true\nRemote_SMTP_Port = {sink.port}") as m:
        m.send("a@src.test", ["x@v6.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "::1"
    sink2 = smtp_sinks(("::1",))
    m = MTA(tmp_path / "mta2", dns_server.resolv_conf,
            body=f"Remote_SMTP_Port = {sink2.port}\nGenerate_Bounces = false")
    with m:
        m.send("a@src.test", ["x@v6.test"])
        p = m.mainlog.wait_for("P")[0]
    assert sink2.messages == []
    assert p[-1] == "554 5.4.4 [internal] Domain Lookup Failed"


@pytest.mark.parametrize("fault", ["garbage", "timeout", "servfail"])
def test_bad_dns_is_transient_never_a_crash(tmp_path, dns_server, smtp_sinks, fault):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    getattr(dns_server, f"set_{fault}")("example.test")
    body = f"Remote_SMTP_Port = {sink.port}\nRetry_Interval = 1\nHost_Failure_Retry = 0"
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        t = m.mainlog.wait_for("T", timeout=20)[0]
        assert t[-1].startswith("451 4.4.3 [internal] DNS lookup failed")
        assert t[9] == "0" and t[6] == "0"  # not connected, no bytes sent
        dns_server.clear_faults("example.test")
        [msg] = sink.wait_for(1, timeout=20)  # recovers once DNS answers again
        assert m.proc.poll() is None
    assert msg["rcpt_tos"] == ["x@example.test"]


def test_truncated_dns_answer_retries_over_tcp(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.set_truncated("example.test")
    with run_mta(tmp_path, dns_server, f"Remote_SMTP_Port = {sink.port}") as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2"
    assert dns_server.query_count("example.test", proto="tcp") >= 1


def test_dns_failures_to_purge_fails_permanently(tmp_path, dns_server, smtp_sinks):
    dns_server.set_servfail("example.test")
    body = ("Retry_Interval = 1\nDNS_Failures_To_Purge = 2\nGenerate_Bounces = false\n"
            "Max_Retries = none")
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        p = m.mainlog.wait_for("P", timeout=30)[0]
    assert p[-1] == "554 5.4.4 [internal] Domain Lookup Failed"


def test_host_stanza_caps_connections_without_fallback(tmp_path, dns_server, smtp_sinks):
    """D18: Host "amx.test" { Max_Outbound_Connections = 1 } caps that host even
    though the domain allows 10; mail waits for the one connection, none fails."""
    import threading
    sink = smtp_sinks(("127.0.0.4",), delays={"DATA": 0.3})
    body = (f'Remote_SMTP_Port = {sink.port}\nMax_Outbound_Connections = 10\nIdle_Timeout = 0\n'
            f'Host "amx.test" {{ Max_Outbound_Connections = 1 }}')
    with run_mta(tmp_path, dns_server, body) as m:
        threads = [threading.Thread(target=m.send, args=("a@src.test", [f"x{i}@amx.test"]))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        sink.wait_for(6, timeout=30)
    assert sink.max_concurrent_connections == 1
    assert not m.mainlog.records("T")


def test_cname_chain_in_mx_is_followed(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with run_mta(tmp_path, dns_server, f"Remote_SMTP_Port = {sink.port}") as m:
        m.send("a@src.test", ["x@cname-mx.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2"


def test_binding_level_gateway_for_the_default_binding(tmp_path, dns_server, smtp_sinks):
    gw = smtp_sinks(("127.0.0.7",))
    body = f'Binding "default" {{ Gateway = "127.0.0.7:{gw.port}" }}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = gw.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.7"


def test_delivery_method_smtp_uses_helo_only(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = f'Remote_SMTP_Port = {sink.port}\nDomain "example.test" {{ Delivery_Method = SMTP }}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"])
        sink.wait_for(1)
    cmds = [s["commands"] for s in sink.sessions if s["commands"]][0]
    assert cmds[0] == "HELO impetus.test"
    assert not any(c.startswith("EHLO") for c in cmds)
    assert "SIZE=" not in next(c for c in cmds if c.startswith("MAIL FROM"))
