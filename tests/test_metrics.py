"""``/metrics`` on the HTTP_Listener, scraped and parsed with the Prometheus
text parser (issue 7)."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.mta import MTA, free_port, wait_until

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict:
    """{family name: [(sample name, labels, value), ...]} and the content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        ctype = r.headers["Content-Type"]
        text = r.read().decode()
    fams = {}
    for fam in text_string_to_metric_families(text):
        fams[fam.name] = (fam.type, [(s.name, s.labels, s.value) for s in fam.samples])
    fams["_content_type"] = ctype
    return fams


def value(fams, family, sample=None, **labels):
    _, samples = fams[family]
    for name, lab, val in samples:
        if (sample is None or name == sample) and all(lab.get(k) == v for k, v in labels.items()):
            return val
    return None


def test_metrics_scraped_and_parsed(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    sink.set_rcpt_reply("later@example.test", "451 4.2.0 try later")
    sink.set_rcpt_reply("nobody@example.test", "550 5.1.1 no such user")
    hport = free_port()
    body = (f'Remote_SMTP_Port = {sink.port}\nRetry_Interval = 600\nGenerate_Bounces = false\n'
            f'Binding "b1" {{ }}\n'
            f'HTTP_Listener {{ Listen "127.0.0.1:{hport}" {{ }} }}\n')
    with MTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["x@example.test", "y@example.test", "later@example.test",
                              "nobody@example.test"])
        m.send("a@src.test", ["z@example.test"],
               "X-Binding: b1\r\nSubject: b1\r\n\r\nvia b1\r\n")
        m.mainlog.wait_for("D", 3)
        m.mainlog.wait_for("T", 1)
        m.mainlog.wait_for("P", 1)
        fams = scrape(hport)
    assert fams["_content_type"].startswith("text/plain; version=0.0.4")
    assert fams["impetus_messages_received"][0] == "counter"
    assert value(fams, "impetus_messages_received", "impetus_messages_received_total",
                 binding="default", domain="example.test") == 4
    assert value(fams, "impetus_messages_received", binding="b1", domain="example.test") == 1
    assert value(fams, "impetus_messages_delivered", binding="default",
                 domain="example.test") == 2
    assert value(fams, "impetus_messages_delivered", binding="b1", domain="example.test") == 1
    assert value(fams, "impetus_messages_transient_failures", binding="default",
                 domain="example.test") == 1
    assert value(fams, "impetus_messages_permanent_failures", binding="default",
                 domain="example.test") == 1
    assert value(fams, "impetus_queue_messages", binding="default", domain="example.test",
                 state="delayed") == 1
    assert value(fams, "impetus_queue_messages", binding="default", domain="example.test",
                 state="active") == 0
    assert fams["impetus_outbound_connections"][0] == "gauge"
    assert value(fams, "impetus_outbound_connections", binding="default",
                 domain="example.test") is not None
    # DNS latency: the MX and the hosts' addresses went to the network
    assert fams["impetus_dns_lookup_seconds"][0] == "histogram"
    assert value(fams, "impetus_dns_lookup_seconds", "impetus_dns_lookup_seconds_count",
                 type="MX") >= 1
    assert value(fams, "impetus_dns_lookup_seconds", "impetus_dns_lookup_seconds_count",
                 type="A") >= 1
    assert value(fams, "impetus_dns_lookup_seconds", "impetus_dns_lookup_seconds_bucket",
                 type="MX", le="+Inf") >= 1
    # spool commit latency (count and sum)
    assert fams["impetus_spool_commit_seconds"][0] == "summary"
    assert value(fams, "impetus_spool_commit_seconds",
                 "impetus_spool_commit_seconds_count") >= 2
    assert value(fams, "impetus_spool_commit_seconds", "impetus_spool_commit_seconds_sum") > 0
    assert value(fams, "impetus_info", version="0.1.0") == 1
    assert value(fams, "impetus_inbound_sessions") is not None
    assert value(fams, "impetus_uptime_seconds") > 0


def test_metrics_with_reception_processes(tmp_path, dns_server, smtp_sinks):
    """Reception in child processes: the scheduler still counts what they received."""
    sink = smtp_sinks(("127.0.0.5",))
    hport = free_port()
    body = (f'Gateway = "127.0.0.5:{sink.port}"\n'
            f'HTTP_Listener {{ Listen "127.0.0.1:{hport}" {{ }} }}\n')
    m = MTA(tmp_path / "mta", dns_server.resolv_conf, body, serve_args=("--reception-processes",
                                                                       "2"))
    with m:
        for i in range(3):
            m.send("a@src.test", [f"u{i}@example.test"])
        sink.wait_for(3)

        def delivered():
            fams = scrape(hport)
            return value(fams, "impetus_messages_delivered", binding="default",
                         domain="example.test") == 3 and fams
        fams = wait_until(delivered, 10, what="3 deliveries in /metrics")
    assert value(fams, "impetus_messages_received", binding="default",
                 domain="example.test") == 3
    assert "impetus_inbound_sessions" not in fams  # sessions live in the children
