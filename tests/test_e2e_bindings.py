"""Bindings and traffic shaping end to end (spec §2.5, §5, §6; D1-D3)."""
import smtplib
import threading
import time

import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration

BINDINGS = """
Binding "b1" {{ Bind_Address = "127.0.0.2"  EHLO_Hostname = "mta1.b1.test" }}
Binding "b2" {{ Bind_Address = "127.0.0.3"  EHLO_Hostname = "mta2.b2.test" }}
Binding_Group "g" {{
  Binding "g1" {{ Bind_Address = "127.0.0.4" }}
  Binding "g2" {{ Bind_Address = "127.0.0.5" }}
}}
Gateway = "127.0.0.9:{port}"
"""


def message(headers: str = "", subject: str = "t") -> str:
    return (f"From: <a@src.test>\r\nTo: <x@example.test>\r\nSubject: {subject}\r\n{headers}"
            f"\r\nbody\r\n")


def run_mta(tmp_path, dns_server, body, name="mta"):
    return MTA(tmp_path / name, dns_server.resolv_conf, body=body)


def test_bindings_choose_source_address_and_ehlo_name(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    with run_mta(tmp_path, dns_server, BINDINGS.format(port=sink.port)) as m:
        m.send("a@src.test", ["x@example.test"], message("X-Binding: b1\r\n"))
        m.send("a@src.test", ["y@example.test"], message("X-Binding: b2\r\n"))
        msgs = sink.wait_for(2)
        r = m.mainlog.wait_for("R", 2)
    by_rcpt = {x["rcpt_tos"][0]: x for x in msgs}
    assert by_rcpt["x@example.test"]["peer"][0] == "127.0.0.2"
    assert by_rcpt["x@example.test"]["helo"] == "mta1.b1.test"
    assert by_rcpt["y@example.test"]["peer"][0] == "127.0.0.3"
    assert by_rcpt["y@example.test"]["helo"] == "mta2.b2.test"
    for x in msgs:
        assert b"X-Binding" not in x["data"]  # D3: removed before relaying
    # mainlog carries group and binding
    assert sorted((rec[12], rec[13]) for rec in r) == [("default", "b1"), ("default", "b2")]


def test_binding_group_header_spreads_round_robin(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    with run_mta(tmp_path, dns_server, BINDINGS.format(port=sink.port)) as m:
        for i in range(4):
            m.send("a@src.test", [f"r{i}@example.test"], message("X-Binding-Group: g\r\n"))
        msgs = sink.wait_for(4)
        r = m.mainlog.wait_for("R", 4)
    peers = sorted(x["peer"][0] for x in msgs)
    assert peers == ["127.0.0.4", "127.0.0.4", "127.0.0.5", "127.0.0.5"]
    assert [rec[13] for rec in r] == ["g1", "g2", "g1", "g2"]  # D2: deterministic
    assert all(rec[12] == "g" for rec in r)
    assert all(b"X-Binding-Group" not in x["data"] for x in msgs)


def test_unknown_binding_header_stays_on_default_with_warning(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    with run_mta(tmp_path, dns_server, BINDINGS.format(port=sink.port)) as m:
        m.send("a@src.test", ["x@example.test"], message("X-Binding: nosuch\r\n"))
        [msg] = sink.wait_for(1)
        r = m.mainlog.wait_for("R")[0]
    assert r[13] == "default"
    assert any("unknown binding 'nosuch'" in line for line in m.paniclog.lines())
    assert b"X-Binding" not in msg["data"]


def test_default_binding_none_refuses_unassigned_mail_with_451(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    body = BINDINGS.format(port=sink.port) + "\nDefault_Binding = none"
    with run_mta(tmp_path, dns_server, body) as m:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            m.send("a@src.test", ["x@example.test"])
        assert exc.value.smtp_code == 451
        m.send("a@src.test", ["y@example.test"], message("X-Binding: b1\r\n"))
        [msg] = sink.wait_for(1)
    assert msg["rcpt_tos"] == ["y@example.test"]
    assert len(m.mainlog.records("R")) == 1  # the refused one was never queued


def test_policy_hook_assigns_binding(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    hook = tmp_path / "policy.py"
    hook.write_text(
        "def set_binding(message):\n"
        "    if message.headers.get('X-Customer') == 'two':\n"
        "        assert message.binding('b2')\n"
        "    elif message.mail_from.endswith('@grouped.test'):\n"
        "        assert message.binding_group('g')\n")
    body = BINDINGS.format(port=sink.port) + f'\nPolicy_Module = "{hook}"'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test"], message("X-Customer: two\r\n"))
        m.send("a@grouped.test", ["y@example.test"])
        msgs = sink.wait_for(2)
    by_rcpt = {x["rcpt_tos"][0]: x["peer"][0] for x in msgs}
    assert by_rcpt == {"x@example.test": "127.0.0.3", "y@example.test": "127.0.0.4"}


def test_suspend_delivery_holds_then_releases(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    held = BINDINGS.format(port=sink.port).replace(
        'EHLO_Hostname = "mta1.b1.test" }', 'EHLO_Hostname = "mta1.b1.test" Suspend_Delivery = true }')
    m = run_mta(tmp_path, dns_server, held).start()
    try:
        m.send("a@src.test", ["x@example.test"], message("X-Binding: b1\r\n"))
        m.send("a@src.test", ["y@example.test"], message("X-Binding: b2\r\n"))
        [other] = sink.wait_for(1)
        assert other["rcpt_tos"] == ["y@example.test"]  # b2 is not suspended
        time.sleep(1.0)
        assert len(sink.messages) == 1  # b1's mail is held
        assert m.stop() == 0
        m.config_path.write_text(m.config_path.read_text().replace("Suspend_Delivery = true", ""))
        m.start()
        msgs = sink.wait_for(2)
        assert msgs[1]["rcpt_tos"] == ["x@example.test"]
        assert msgs[1]["peer"][0] == "127.0.0.2"
    finally:
        m.stop()


def _send_many(m, n, rcpt_fmt="r{}@example.test"):
    for i in range(n):
        m.send("a@src.test", [rcpt_fmt.format(i)])


def test_domain_message_throttle_paces_delivery(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = (f'Remote_SMTP_Port = {sink.port}\n'
            f'Domain "example.test" {{ Outbound_Throttle_Messages = "5" }}')
    with run_mta(tmp_path, dns_server, body) as m:
        t0 = time.monotonic()
        _send_many(m, 30)
        sink.wait_for(30, timeout=30)
        elapsed = time.monotonic() - t0
    assert 5.4 <= elapsed <= 6.6, elapsed  # 30 messages at 5/s: 6 s within 10 %
    assert not m.mainlog.records("T")  # throttled mail waits in the active queue


def test_group_throttle_is_shared_per_binding_value_is_not(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.9",))
    shared = (f'Gateway = "127.0.0.9:{sink.port}"\n'
              'Binding_Group "g" { Outbound_Throttle_Messages = "4"\n'
              '  Binding "g1" { } Binding "g2" { } }\n')
    with run_mta(tmp_path, dns_server, shared, "shared") as m:
        t0 = time.monotonic()
        for i in range(8):
            m.send("a@src.test", [f"r{i}@example.test"],
                   message(f"X-Binding: g{1 + i % 2}\r\n"))
        sink.wait_for(8, timeout=30)
        shared_elapsed = time.monotonic() - t0
    sink.clear()
    separate = (f'Gateway = "127.0.0.9:{sink.port}"\n'
                'Binding_Group "g" {\n'
                '  Binding "g1" { Outbound_Throttle_Messages = "4" }\n'
                '  Binding "g2" { Outbound_Throttle_Messages = "4" } }\n')
    with run_mta(tmp_path, dns_server, separate, "separate") as m:
        t0 = time.monotonic()
        for i in range(8):
            m.send("a@src.test", [f"r{i}@example.test"],
                   message(f"X-Binding: g{1 + i % 2}\r\n"))
        sink.wait_for(8, timeout=30)
        separate_elapsed = time.monotonic() - t0
    # one bucket of 4/s for 8 messages: ~1.75 s; two buckets: ~0.75 s
    assert shared_elapsed >= 1.5, shared_elapsed
    assert separate_elapsed < shared_elapsed - 0.5, (separate_elapsed, shared_elapsed)


def test_max_outbound_connections_is_never_exceeded(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), delays={"DATA": 0.2})
    body = f'Remote_SMTP_Port = {sink.port}\nMax_Outbound_Connections = 2\nIdle_Timeout = 1'
    with run_mta(tmp_path, dns_server, body) as m:
        threads = [threading.Thread(target=m.send, args=("a@src.test", [f"r{i}@example.test"]))
                   for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        sink.wait_for(12, timeout=30)
    assert sink.max_concurrent_connections == 2


def test_max_deliveries_per_connection_opens_a_new_connection(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = (f'Remote_SMTP_Port = {sink.port}\nMax_Outbound_Connections = 1\nIdle_Timeout = 10\n'
            f'Max_Deliveries_Per_Connection = 3')
    with run_mta(tmp_path, dns_server, body) as m:
        _send_many(m, 9)
        sink.wait_for(9)
    sessions = [s for s in sink.sessions if any(c.startswith("MAIL") for c in s["commands"])]
    assert [sum(c.startswith("MAIL") for c in s["commands"]) for s in sessions] == [3, 3, 3]


def test_idle_timeout_reuses_then_closes(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = f'Remote_SMTP_Port = {sink.port}\nIdle_Timeout = 1'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["r1@example.test"])
        sink.wait_for(1)
        m.send("a@src.test", ["r2@example.test"])  # within Idle_Timeout: same connection
        sink.wait_for(2)
        sink.wait_idle(timeout=5)                    # closed after Idle_Timeout
        m.send("a@src.test", ["r3@example.test"])  # a new connection
        sink.wait_for(3)
    sessions = [s for s in sink.sessions if any(c.startswith("MAIL") for c in s["commands"])]
    assert [sum(c.startswith("MAIL") for c in s["commands"]) for s in sessions] == [2, 1]
    assert "QUIT" in sessions[0]["commands"]


def test_connection_throttle_paces_new_connections(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = (f'Remote_SMTP_Port = {sink.port}\nMax_Deliveries_Per_Connection = 1\n'
            f'Domain "example.test" {{ Outbound_Throttle_Connections = "2" }}')
    with run_mta(tmp_path, dns_server, body) as m:
        t0 = time.monotonic()
        _send_many(m, 6)
        sink.wait_for(6, timeout=30)
        elapsed = time.monotonic() - t0
    assert len([s for s in sink.sessions if s["commands"]]) == 6
    assert elapsed >= 2.2, elapsed  # 6 connections at 2/s, strictly spaced: 2.5 s


def test_two_nodes_share_a_redis_cluster_throttle(tmp_path, dns_server, smtp_sinks, redis_server):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = (f'Remote_SMTP_Port = {sink.port}\nCluster_Throttle_Store = "{redis_server.url}"\n'
            f'Domain "example.test" {{ Cluster_Outbound_Throttle_Messages = "5" }}')
    a = run_mta(tmp_path, dns_server, body, "node-a").start()
    b = run_mta(tmp_path, dns_server, body, "node-b").start()
    try:
        t0 = time.monotonic()
        ta = threading.Thread(target=_send_many, args=(a, 10, "a{}@example.test"))
        tb = threading.Thread(target=_send_many, args=(b, 10, "b{}@example.test"))
        ta.start(); tb.start(); ta.join(30); tb.join(30)
        sink.wait_for(20, timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        a.stop()
        b.stop()
    # one shared bucket of 5/s for 20 messages: ~3.8 s; two separate ones would take ~1.8 s
    assert elapsed >= 3.3, elapsed
