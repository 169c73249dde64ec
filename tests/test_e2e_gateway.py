"""Gateway routing end to end, and the `impetus route` tool (spec §3.2, D7, D8)."""
import subprocess
import sys

import pytest

from tests.mta import MTA

pytestmark = pytest.mark.integration


def run_mta(tmp_path, dns_server, body):
    return MTA(tmp_path / "mta", dns_server.resolv_conf, body=body)


def test_global_gateway_by_ip_and_port(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    with run_mta(tmp_path, dns_server, f'Gateway = "127.0.0.5:{sink.port}"') as m:
        m.send("a@src.test", ["x@example.test", "y@nx.test"])
        msgs = sink.wait_for(1)
        m.mainlog.wait_for("D", 2)
    assert sorted(r for x in msgs for r in x["rcpt_tos"]) == ["x@example.test", "y@nx.test"]
    assert all(x["sockname"][0] == "127.0.0.5" for x in msgs)
    assert dns_server.query_count("example.test") == 0  # MX of the domain ignored


def test_gateway_name_with_mx(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    body = f'Gateway = "example.test"\nRemote_SMTP_Port = {sink.port}'
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@amx.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2"  # example.test's best MX


def test_gateway_name_without_mx_uses_a(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.4",))
    with run_mta(tmp_path, dns_server, f'Gateway = "amx.test:{sink.port}"') as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.4"


def test_gateway_ipv6_literal_with_port(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("::1",))
    with run_mta(tmp_path, dns_server, f'Gateway = "[::1]:{sink.port}"') as m:
        m.send("a@src.test", ["x@example.test"])
        [msg] = sink.wait_for(1)
        d = m.mainlog.wait_for("D")[0]
    assert msg["sockname"][0] == "::1"
    assert d[11] == "::1"


def test_domain_gateway_overrides_global_while_others_follow_global(tmp_path, dns_server,
                                                                     smtp_sinks):
    smarthost = smtp_sinks(("127.0.0.5",))
    special = smtp_sinks(("127.0.0.6",))
    body = (f'Gateway = "127.0.0.5:{smarthost.port}"\n'
            f'Domain "amx.test" {{ Gateway = "127.0.0.6:{special.port}" }}')
    with run_mta(tmp_path, dns_server, body) as m:
        m.send("a@src.test", ["x@example.test", "y@amx.test"])
        [to_smarthost] = smarthost.wait_for(1)
        [to_special] = special.wait_for(1)
    assert to_smarthost["rcpt_tos"] == ["x@example.test"]
    assert to_special["rcpt_tos"] == ["y@amx.test"]


def test_impetus_route_shows_the_decision(tmp_path, dns_server):
    conf = tmp_path / "r.conf"
    conf.write_text(f'Resolv_Conf = "{dns_server.resolv_conf}"\nRemote_SMTP_Port = 2525\n'
                    f'Domain "amx.test" {{ Gateway = "example.test:26" }}\n')
    out = subprocess.run([sys.executable, "-m", "impetus.cli", "route", "example.test", "-c",
                          str(conf)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "mx1.example.test 127.0.0.2:2525 pref=10 esmtp (mx/a)" in out.stdout
    assert "mx2.example.test 127.0.0.3:2525 pref=20" in out.stdout
    out = subprocess.run([sys.executable, "-m", "impetus.cli", "route", "amx.test", "-c",
                          str(conf)], capture_output=True, text=True, timeout=30)
    assert f'Gateway domain "amx.test" ({conf}:3)' in out.stdout
    assert "mx1.example.test 127.0.0.2:26 pref=10 esmtp (gateway/mx/a)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "impetus.cli", "route", "nullmx.test", "-c",
                          str(conf)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "550 5.4.4 [internal] NULL MX domain does not accept mail" in out.stdout


def test_domains_behind_one_gateway_share_its_queue(tmp_path, dns_server, smtp_sinks):
    """§2.6: queued under the gateway, so recipients of different domains of
    one transaction travel together in one SMTP transaction."""
    sink = smtp_sinks(("127.0.0.5",))
    with run_mta(tmp_path, dns_server, f'Gateway = "127.0.0.5:{sink.port}"') as m:
        m.send("a@src.test", ["x@example.test", "y@amx.test", "z@other.test"])
        [msg] = sink.wait_for(1)
        m.mainlog.wait_for("D", 3)
    assert sorted(msg["rcpt_tos"]) == ["x@example.test", "y@amx.test", "z@other.test"]
    # the D lines still name each recipient's domain
    assert sorted(d[5] for d in m.mainlog.records("D")) == ["amx.test", "example.test", "other.test"]
