"""The declarative option table, `impetus options` output and docs/OPTIONS.md."""

import pathlib
import subprocess
import sys

import pytest

from impetus.config import ConfigError, load_config_string
from impetus.config.options import (OPTIONS, SCOPE_ORDER, STANZAS, all_options, get_option,
                                    option_rows, render_options_markdown, render_options_table)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lookup_by_any_case():
    assert get_option("retry_interval") is get_option("RETRY_INTERVAL") is OPTIONS["retry_interval"]
    assert get_option("nope") is None


def test_every_option_is_consistent():
    for spec in all_options():
        assert spec.scopes, spec.name
        assert set(spec.scopes) <= set(SCOPE_ORDER), spec.name
        assert list(spec.scopes) == [s for s in SCOPE_ORDER if s in spec.scopes]
        assert spec.doc, spec.name
        assert spec.unsupported_scopes <= set(spec.scopes), spec.name
        assert spec.lname not in STANZAS, spec.name


@pytest.mark.parametrize("name,default,scopes", [
    ("Spoolbase", "/var/spool/impetus", ("global",)),
    ("Retry_Interval", 1200, ("global", "binding_group", "binding", "domain")),
    ("Message_Expiration", 86400, ("global", "binding_group", "binding", "domain")),
    ("Server_Max_Outbound_Connections", 20000, ("global", "binding_group", "binding")),
    ("Only_Use_Best_MX_For_Relay_Domains", False, ("global",)),
    ("Idle_Time", 300, ("esmtp_listener", "listen", "peer")),
    ("Delay_DSN_Max_Retry_Interval", 43200, ("global", "binding_group", "binding", "domain")),
    ("Max_Outbound_Connections", 32, ("global", "binding_group", "binding", "domain", "host")),
    ("Relay_Hosts", [], ("global", "esmtp_listener", "listen", "peer")),
    ("Routes", None, ("global", "domain")),
    ("Host_Failure_Retry", 120, ("global", "domain")),
    ("LMTP_Port", 2003, ("global", "binding_group", "binding", "domain")),
    ("Min_DNS_TTL", 0, ("global",)),
    ("Max_DNS_TTL", 4294967295, ("global",)),
    ("Bind_Address", "*", ("global", "binding_group", "binding")),
    ("EHLO_Hostname", "__hostname__", ("global", "binding_group", "binding", "domain")),
    ("Default_Binding", "normal", ("global",)),
    ("Suspend_Delivery", False, ("global", "binding_group", "binding", "domain")),
    ("Outbound_Throttle_Messages", None,
     ("global", "binding_group", "binding", "domain", "host")),
    ("Outbound_Throttle_Connections", None,
     ("global", "binding_group", "binding", "domain", "host")),
    ("Cluster_Outbound_Throttle_Messages", None,
     ("global", "binding_group", "binding", "domain", "host")),
    ("Cluster_Outbound_Throttle_Connections", None,
     ("global", "binding_group", "binding", "domain", "host")),
    ("Cluster_Throttle_Store", None, ("global",)),
    ("Scope_Max_Outbound_Connections", None,
     ("global", "binding_group", "binding", "domain", "host")),
    ("Max_Deliveries_Per_Connection", 0, ("global", "binding_group", "binding", "domain")),
    ("Max_Recipients_Per_Connection", 0, ("global", "binding_group", "binding", "domain",
                                          "esmtp_listener", "listen", "peer")),
    ("Connection_Allocation_Aggressiveness", "normal",
     ("global", "binding_group", "binding", "domain")),
    ("Policy_Module", None, ("global",)),
    ("Rollup_MX", False, ("host",)),
    ("Delivery_Method", "esmtp", ("global", "binding_group", "binding", "domain")),
    ("Fully_Resolve_Before_SMTP", True, ("global", "binding_group", "binding", "domain")),
    ("MX_Failures_Fallback_To_A", 3, ("global", "domain")),
    ("DNS_Failures_To_Purge", 10, ("global", "domain")),
    ("MX_Failures_To_Delay", 50, ("global", "domain")),
    ("Connect_Timeout_To_Delay", 900, ("global", "binding_group", "binding", "domain")),
    ("Prohibited_Hosts", [], ("global",)),
    ("Skip_Hosts", [], ("global",)),
])
def test_documented_defaults_and_scopes(name, default, scopes):
    spec = get_option(name)
    assert (spec.default, spec.scopes) == (default, scopes)


def test_flipping_supported_is_enough_to_enable_an_option(monkeypatch):
    import dataclasses
    spec = OPTIONS["ecstream_port"]
    monkeypatch.setitem(OPTIONS, "ecstream_port", dataclasses.replace(spec, supported=True))
    c = load_config_string('Binding "b" { ECStream_Port = 1826 }', "t.conf")
    assert c.lookup("ECStream_Port", binding="b") == 1826
    monkeypatch.setitem(OPTIONS, "ecstream_port", spec)
    with pytest.raises(ConfigError):
        load_config_string('ECStream_Port = 1826', "t.conf")


def test_option_rows():
    rows = option_rows()
    assert len(rows) == len(OPTIONS)
    by_name = {r.name: r for r in rows}
    r = by_name["Retry_Interval"]
    assert (r.type, r.default, r.scopes, r.supported) == (
        "duration", "1200", "global, binding_group, binding, domain", True)
    assert by_name["Max_Outbound_Connections"].scopes.endswith("domain, host")
    assert by_name["Mainlog_Mode"].default == "0644"
    assert by_name["Use_IPv6"].default == "false"
    assert by_name["Hostname"].default == "-"
    assert not by_name["ECStream_Port"].supported
    assert all(r.supported for r in option_rows(include_unsupported=False))
    assert [r.name.lower() for r in rows] == sorted(r.name.lower() for r in rows)


def test_render_options_table():
    text = render_options_table()
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "DEFAULT", "SCOPES", "STATUS"]
    assert len(lines) == len(OPTIONS) + 1
    line = next(ln for ln in lines if ln.startswith("Retry_Interval "))
    assert "1200" in line and "global, binding_group, binding, domain" in line
    assert line.endswith("supported")
    assert next(ln for ln in lines if ln.startswith("ECStream_Port ")).endswith("not yet")


def test_docs_options_md_is_up_to_date():
    assert (ROOT / "docs" / "OPTIONS.md").read_text() == render_options_markdown(), \
        "regenerate with: python -m impetus.config.options > docs/OPTIONS.md"


def test_module_main_prints_markdown():
    out = subprocess.run([sys.executable, "-m", "impetus.config.options"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == render_options_markdown()


def test_str_of_issue():
    with pytest.raises(ConfigError) as ei:
        load_config_string("\n  Bogus = 1", "x.conf")
    (issue,) = ei.value.issues
    assert (issue.file, issue.line, issue.col) == ("x.conf", 2, 3)
    assert str(issue) == "x.conf:2:3: unknown option 'Bogus'"
    assert str(ei.value) == "x.conf:2:3: unknown option 'Bogus'"
