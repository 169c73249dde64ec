"""Parser and scope structure (spec §1.3, §1.5, §2.1)."""

import ipaddress
import socket

import pytest

from impetus.config import ConfigError, load_config_string
from impetus.config.errors import Issues
from impetus.config.parser import Assignment, Stanza, parse_text


def cfg(text):
    return load_config_string(text, "t.conf")


def errors(text):
    with pytest.raises(ConfigError) as ei:
        load_config_string(text, "t.conf")
    return [str(i) for i in ei.value.issues]


def tree(text):
    issues = Issues()
    res = parse_text(text, "t.conf", issues)
    assert not issues, [str(i) for i in issues.items]
    return res.statements


# -- syntax tree ---------------------------------------------------------------

def test_tree_shapes():
    st = tree('a = 1\nb = "two"\nc = ( x "y z" )\nd = [ k = v "k2" = "v2" ]\n'
              'S { }\nT "inst" { e = 5 }\nU bare { }')
    a, b, c, d, s, t, u = st
    assert isinstance(a, Assignment) and a.value.kind == "scalar" and a.value.text == "1"
    assert not a.value.quoted and b.value.quoted and b.value.text == "two"
    assert c.value.kind == "array" and [v.text for v in c.value.items] == ["x", "y z"]
    assert d.value.kind == "hash" and d.value.to_python() == {"k": "v", "k2": "v2"}
    assert isinstance(s, Stanza) and s.instance is None and s.body == []
    assert t.instance == "inst" and t.body[0].name == "e"
    assert u.instance == "bare"
    assert (t.pos.line, t.pos.col, t.instance_pos.col) == (6, 1, 3)


def test_statements_may_span_lines_and_hash_is_newline_separated():
    st = tree('Context\n=\n[\n  my_key = "v1"\n  other_key = "v2"\n  yahoo.net = "yahoo.com"\n'
              '  0.0.0.1 = "list1"\n  "0" = "250 ok"\n]')
    assert st[0].value.to_python() == {"my_key": "v1", "other_key": "v2",
                                       "yahoo.net": "yahoo.com", "0.0.0.1": "list1",
                                       "0": "250 ok"}


def test_config_exposes_parsed_tree():
    c = cfg('Retry_Interval = 60\nBinding "b" { Retry_Interval = 5 }')
    assert [type(s).__name__ for s in c.tree] == ["Assignment", "Stanza"]
    assert c.root.get("retry_interval") == 60
    assert c.root.child("binding", "b").get("Retry_Interval") == 5
    assert [s.label for s in c.scopes()] == ["global", 'binding "b"']


# -- assignments ---------------------------------------------------------------

def test_quoted_and_bare_values_are_the_same():
    assert cfg("Retry_Interval = 1200").lookup("Retry_Interval") == 1200
    assert cfg('Retry_Interval = "1200"').lookup("Retry_Interval") == 1200


def test_option_names_are_case_insensitive():
    c = cfg("RETRY_INTERVAL = 7\nmax_retries = 3")
    assert c.lookup("retry_interval") == 7
    assert c.lookup("Retry_Interval") == 7
    assert c.lookup("MAX_RETRIES") == 3


def test_stanza_names_are_case_insensitive():
    c = cfg('BINDING "b" { retry_interval = 1 }\nbinding_group "g" { BINDING "c" {} }\n'
            'domain EXAMPLE.com { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", binding="b") == 1
    assert c.group_of("c") == "g"
    assert c.lookup("Retry_Interval", domain="example.COM") == 2


def test_repeated_assignment_later_wins():
    c = cfg("Retry_Interval = 1\nRetry_Interval = 2\nBinding b { Retry_Interval = 3\n"
            "Retry_Interval = 4 }")
    assert c.lookup("Retry_Interval") == 2
    assert c.lookup("Retry_Interval", binding="b") == 4
    assert c.explain("Retry_Interval").line == 2


def test_repeated_named_stanzas_merge():
    c = cfg('Binding_Group "g" { Retry_Interval = 5 Binding "a" {} }\n'
            'Binding_Group "g" { Binding "b" {} Max_Retries = 2 }\n'
            'Binding "x" { Retry_Interval = 1 }\nBinding "x" { Max_Retries = 9 }\n'
            'Domain "d.com" { Retry_Interval = 1 }\ndomain "D.COM" { Retry_Interval = 2 }')
    assert c.groups["g"] == ["a", "b"]
    assert c.lookup("Retry_Interval", binding="a") == 5
    assert c.lookup("Max_Retries", binding="b") == 2
    assert (c.lookup("Retry_Interval", binding="x"), c.lookup("Max_Retries", binding="x")) \
        == (1, 9)
    assert c.lookup("Retry_Interval", domain="d.com") == 2
    assert len(list(c.root.iter_children("domain"))) == 1


def test_empty_body_is_legal():
    c = cfg('Binding "b" {}\nESMTP_Listener {}\nec_logger {}')
    assert "b" in c.bindings


def test_equals_is_required():
    assert errors("Retry_Interval 1200\nMax_Retries = 3") == [
        "t.conf:1:16: expected '=' after 'Retry_Interval', got '1200'"]


def test_value_missing():
    assert errors('Binding "b" {\nRetry_Interval =\n}') == [
        "t.conf:3:1: expected a value after 'Retry_Interval =', got '}'"]


# -- bindings and groups ---------------------------------------------------------

def test_implicit_default_binding_and_group():
    c = cfg("")
    assert c.bindings == {"default": "default"}
    assert c.groups == {"default": ["default"]}
    assert c.group_of("default") == "default"
    assert c.group_of("nonexistent") == "default"


def test_bindings_and_groups():
    c = cfg('Binding "top" {}\nBinding_Group "g1" { Binding "a" {} Binding "b" {} }\n'
            'Binding_Group "empty" {}\nBinding "a" {}')
    assert c.bindings == {"default": "default", "top": "default", "a": "g1", "b": "g1"}
    assert c.groups == {"default": ["default", "top"], "g1": ["a", "b"], "empty": []}
    assert c.group_of("a") == "g1"


def test_binding_names_are_case_sensitive():
    c = cfg('Binding "B1" { Retry_Interval = 1 }\nBinding "b1" { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", binding="B1") == 1
    assert c.lookup("Retry_Interval", binding="b1") == 2


def test_binding_in_two_groups_is_an_error():
    assert errors('Binding_Group "g1" { Binding "a" {} }\nBinding_Group "g2" { Binding "a" {} }'
                  ) == ['t.conf:2:30: binding "a" is already declared in binding_group "g1" '
                        '(at t.conf:1:30); a binding belongs to one group']


# -- placement -------------------------------------------------------------------

@pytest.mark.parametrize("text,msg", [
    ('Listen ":25" {}', "t.conf:1:1: stanza 'Listen' is not valid at the top level; "
                        "it may appear in: esmtp_listener, control_listener"),
    ('Domain "d.com" { Binding "b" {} }', "t.conf:1:18: stanza 'Binding' is not valid in a "
                                          "domain stanza; it may appear in: the top level, "
                                          "binding_group"),
    ('Binding "b" { Binding_Group "g" {} }', "t.conf:1:15: stanza 'Binding_Group' is not valid "
                                             "in a binding stanza; it may appear in: the top "
                                             "level"),
    ('Binding_Group "g" { Binding "b" { Domain "d" { Domain "e" {} } } }',
     "t.conf:1:48: stanza 'Domain' is not valid in a domain stanza"),
    ('ESMTP_Listener { Domain "d" {} }', "t.conf:1:18: stanza 'Domain' is not valid in an "
                                         "esmtp_listener stanza"),
    ('Binding {}', "t.conf:1:1: stanza 'Binding' needs a name"),
    ('ESMTP_Listener "x" {}', "t.conf:1:16: stanza 'ESMTP_Listener' does not take a name"),
    ('Control_Listener { Peer "1.2.3.4" {} }', "stanza 'Peer' is not valid in a "
                                               "control_listener stanza"),
])
def test_stanza_placement(text, msg):
    errs = errors(text)
    assert any(msg in e for e in errs), errs


def test_domain_in_every_documented_container():
    c = cfg('Domain "a.com" { Retry_Interval = 1 }\n'
            'Binding "b" { Domain "a.com" { Retry_Interval = 2 } }\n'
            'Binding_Group "g" { Domain "a.com" { Retry_Interval = 3 }\n'
            '  Binding "c" { Domain "a.com" { Retry_Interval = 4 } } }')
    assert c.lookup("Retry_Interval", domain="a.com") == 1
    assert c.lookup("Retry_Interval", domain="a.com", binding="b") == 2
    assert c.lookup("Retry_Interval", domain="a.com", binding="c") == 4


def test_host_stanzas_allowed_in_global_binding_and_group():
    c = cfg('Host "mx1.example.com" {}\nBinding "b" { Host "/mx[0-9]+/" {} }\n'
            'Binding_Group "g" { Host "mx.example.net" {} }')
    assert c.root.child("host", "mx1.example.com") is not None


def test_host_max_outbound_connections_is_supported():
    c = cfg('Host "mx.example.com" { Max_Outbound_Connections = 5 }')
    assert c.host_lookup("Max_Outbound_Connections", "mx.example.com") == 5


def test_other_host_options_not_supported_yet():
    assert errors('Host "mx.example.com" { Rollup_MX = true }') == [
        "t.conf:1:25: option 'Rollup_MX' is not supported yet"]
    assert errors('Host "mx.example.com" { Outbound_Throttle_Messages = "10/5" }') == [
        "t.conf:1:25: option 'Outbound_Throttle_Messages' is not supported yet in a host stanza"]


def test_option_supported_except_in_some_scopes(monkeypatch):
    import dataclasses
    from impetus.config.options import OPTIONS
    spec = OPTIONS["max_outbound_connections"]
    monkeypatch.setitem(OPTIONS, "max_outbound_connections",
                        dataclasses.replace(spec, unsupported_scopes=frozenset({"host"})))
    assert errors('Host "mx.example.com" { Max_Outbound_Connections = 5 }') == [
        "t.conf:1:25: option 'Max_Outbound_Connections' is not supported yet in a host stanza"]


# -- domain instance names ---------------------------------------------------------

@pytest.mark.parametrize("name,lookup", [
    ("example.com", "EXAMPLE.com"),
    ("Example.COM.", "example.com"),
    ("192.0.43.10", "[192.0.43.10]"),
    ("[IPv6:fd82:7796:815b:be0::1]", "[ipv6:FD82:7796:815B:0BE0:0:0:0:1]"),
    ("_dmarc.example.com", "_dmarc.example.com"),
])
def test_domain_names(name, lookup):
    c = cfg(f'Domain "{name}" {{ Retry_Interval = 42 }}')
    assert c.lookup("Retry_Interval", domain=lookup) == 42


@pytest.mark.parametrize("name", ["exa mple.com", "a..b", "-x.com", "[IPv6:zz::1]",
                                  "[1.2.3]", "foo@bar", ""])
def test_bad_domain_names(name):
    errs = errors(f'Domain "{name}" {{ }}')
    assert errs == [f't.conf:1:8: invalid Domain name "{name}": expected a DNS name, an IP '
                    "literal, [IPv6:...] or /regex/"]


def test_bad_regex_domain():
    assert errors('\nDomain "/(foo/" { }') == [
        't.conf:2:8: invalid regular expression "/(foo/" in Domain name: missing ), '
        "unterminated subpattern at position 0"]


# -- listeners ---------------------------------------------------------------------------

@pytest.mark.parametrize("addr,host,port,family", [
    (":25", "0.0.0.0", 25, socket.AF_INET),
    ("*:25", "0.0.0.0", 25, socket.AF_INET),
    ("[*]:25", "::", 25, socket.AF_INET6),
    ("[::]:587", "::", 587, socket.AF_INET6),
    ("10.10.10.1:25", "10.10.10.1", 25, socket.AF_INET),
    ("[fd82:7796::1]:587", "fd82:7796::1", 587, socket.AF_INET6),
])
def test_listen_addresses(addr, host, port, family):
    c = cfg(f'ESMTP_Listener {{ Listen "{addr}" {{ }} }}')
    (lc,) = c.listeners
    assert (lc.address, lc.host, lc.port, lc.path, lc.family) == (addr, host, port, None, family)


def test_listen_unix_socket():
    c = cfg('ESMTP_Listener { Listen "/tmp/2025" { } }')
    (lc,) = c.listeners
    assert (lc.path, lc.host, lc.port) == ("/tmp/2025", None, None)


@pytest.mark.parametrize("addr,msg", [
    (":0", 'invalid port "0" in Listen address ":0": expected 1-65535'),
    (":70000", 'invalid port "70000" in Listen address ":70000": expected 1-65535'),
    ("1.2.3.4:smtp", 'invalid port "smtp" in Listen address "1.2.3.4:smtp"'),
    ("25", 'invalid Listen address "25"'),
    ("localhost:25", 'invalid Listen address "localhost:25"'),
    ("::1:25", 'IPv6 addresses must be in brackets'),
    ("[::1]25", 'invalid Listen address "[::1]25"'),
    ("[nope]:25", 'invalid IPv6 address "nope"'),
    ("300.1.1.1:25", 'invalid Listen address "300.1.1.1:25"'),
])
def test_bad_listen_addresses(addr, msg):
    errs = errors(f'ESMTP_Listener {{\n  Listen "{addr}" {{ }} }}')
    assert len(errs) == 1 and errs[0].startswith("t.conf:2:10: ") and msg in errs[0], errs


def test_same_socket_twice_is_an_error():
    errs = errors('ESMTP_Listener { Listen ":25" {}\n Listen "*:25" {} }')
    assert errs == ['t.conf:2:9: Listen "*:25" is the same socket as Listen ":25" '
                    "(at t.conf:1:18)"]


def test_listener_nesting_and_fallback():
    c = cfg('Relay_Hosts = ( "127.0.0.0/8" )\nMax_Message_Size = 1000\n'
            'ESMTP_Listener {\n  Max_Message_Size = 2000\n'
            '  Peer "10.0.0.0/8" { Relay_Hosts = ( "10.0.0.0/8" ) }\n'
            '  Listen ":25" {\n    Peer "10.1.0.0/16" { Max_Message_Size = 5 }\n  }\n'
            '  Listen "127.0.0.1:587" { Relay_Hosts = ( ::1 ) Max_Message_Size = 3000 }\n'
            '  Listen ":2525" { Enable = false }\n}')
    assert [lc.address for lc in c.listeners] == [":25", "127.0.0.1:587"]
    l25, l587 = c.listeners
    assert l25.lookup("Relay_Hosts") == [ipaddress.ip_network("127.0.0.0/8")]
    assert l25.lookup("Max_Message_Size") == 2000
    assert l25.explain("Max_Message_Size").scope == "esmtp_listener"
    assert l587.lookup("Relay_Hosts") == [ipaddress.ip_network("::1/128")]
    assert l587.lookup("Max_Message_Size") == 3000
    assert l25.lookup("Enable") is True
    # Peer matching: listen-level peers first, most specific CIDR
    assert l25.lookup("Max_Message_Size", peer="10.1.2.3") == 5
    assert l25.lookup("Relay_Hosts", peer="10.9.9.9") == [ipaddress.ip_network("10.0.0.0/8")]
    assert l25.lookup("Max_Message_Size", peer="10.9.9.9") == 2000
    assert l25.lookup("Max_Message_Size", peer="192.0.2.1") == 2000
    assert c.lookup("Max_Message_Size") == 1000
    with pytest.raises(KeyError):
        l25.lookup("Retry_Interval")
    with pytest.raises(KeyError):
        l25.lookup("No_Such_Option")


def test_listener_defaults():
    c = cfg('ESMTP_Listener { Listen ":25" {} }')
    assert c.listeners[0].explain("Max_Message_Size") == (0, "default", None, None)
    assert c.listeners[0].lookup("Relay_Hosts") == []


def test_disabled_listener_has_no_sockets():
    c = cfg('ESMTP_Listener { Enable = off Listen ":25" {} }')
    assert c.listeners == []


def test_peer_addresses():
    cfg('ESMTP_Listener { Peer "10.0.0.0/16" {} Peer "::1" {} Peer "2001:db8::/32" {}\n'
        ' Listen ":25" { Peer "10.0.0.1" {} } }')
    assert errors('ESMTP_Listener { Peer "mail.example.com" {} }') == [
        't.conf:1:23: invalid Peer address "mail.example.com": expected an IP address or '
        "CIDR block"]


def test_control_listener():
    c = cfg('Control_Listener {\n  Listen "/tmp/2025" { }\n  Listen "127.0.0.1:2025" {'
            ' Enable_Authentication = true Control_Password_File = "/dev/null" }\n}')
    assert [lc.address for lc in c.control_listeners] == ["/tmp/2025", "127.0.0.1:2025"]
    assert c.listeners == []
    # TCP control sockets must authenticate (issue 7)
    assert errors('Control_Listener { Listen "127.0.0.1:2025" { } }') == [
        't.conf:1:20: control Listen "127.0.0.1:2025" is a TCP socket: it needs '
        'Enable_Authentication = true and a Control_Password_File']
    errs = errors('Control_Listener { Listen "/x/2025" { Relay_Hosts = ( 1.2.3.4 ) } }')
    assert errs == ["t.conf:1:39: option 'Relay_Hosts' is not valid in a control_listener "
                    "listen stanza; valid scopes: global, esmtp_listener, listen, peer"]


# -- modules -------------------------------------------------------------------------------

def test_loggers_absent():
    lg = cfg("").loggers
    assert (lg.mainlog, lg.rejectlog, lg.paniclog, lg.bouncelog) == (None, None, None, None)


def test_loggers_configured(tmp_path):
    c = load_config_string(
        'ec_logger "ec_logger" {\n  mainlog = "/l/mainlog.ec"\n  rejectlog = "/l/reject.ec"\n'
        '  paniclog = "/l/panic.ec"\n  heartbeat = 30\n  mainlog_mode = 0600\n'
        '  log_receptions = false\n}\n'
        'bounce_logger { bouncelog = "bounce.ec"  bouncelog_mode = 0640 heartbeat = 10\n'
        '  log_transient_failures = off }', str(tmp_path / "e.conf"))
    lg = c.loggers
    assert (lg.mainlog, lg.rejectlog, lg.paniclog) == ("/l/mainlog.ec", "/l/reject.ec",
                                                       "/l/panic.ec")
    assert lg.bouncelog == str(tmp_path / "bounce.ec")   # relative to the config file
    assert lg.acctlog == "/var/log/impetus/acctlog.ec"   # default once the module is loaded
    assert (lg.mainlog_mode, lg.rejectlog_mode, lg.bouncelog_mode) == (0o600, 0o644, 0o640)
    assert (lg.heartbeat, lg.bounce_heartbeat) == (30, 10)
    assert lg.log_receptions is False and lg.log_deliveries is True
    assert lg.log_transient_failures is True and lg.bounce_log_transient_failures is False
    assert (lg.ec_logger, lg.bounce_logger) == ("ec_logger", "bounce_logger")


def test_logger_options_only_in_their_module():
    assert errors('mainlog = "/x"') == [
        "t.conf:1:1: option 'Mainlog' is not valid at global scope; valid scopes: ec_logger"]
    assert errors('bounce_logger { mainlog = "/x" }') == [
        "t.conf:1:17: option 'Mainlog' is not valid in a bounce_logger stanza; valid scopes: "
        "ec_logger"]


def test_second_logger_instance_rejected():
    errs = errors('ec_logger "a" {}\nec_logger "b" {}')
    assert errs == ['t.conf:2:11: only one ec_logger instance is supported yet '
                    '(already have "a" at t.conf:1:1)']
    cfg('ec_logger {}\nec_logger "ec_logger" {}')  # same instance: merges


@pytest.mark.parametrize("name", ["mxip", "static_routes", "adaptive", "delay_dsn",
                                  "outbound_smtp_auth", "Pathway"])
def test_known_modules_not_supported_yet(name):
    assert errors(f"{name} {{ target = \"1.2.3.4:25\" }}") == [
        f"t.conf:1:1: stanza '{name}' is not supported yet"]


def test_unknown_stanza_with_suggestion():
    assert errors('Bindng "b" {}') == ["t.conf:1:1: unknown stanza 'Bindng'; did you mean "
                                       "'Binding'?"]
    assert errors("Frobnicate {}") == ["t.conf:1:1: unknown stanza 'Frobnicate'"]


def test_option_used_as_stanza_and_vice_versa():
    assert errors("Retry_Interval { }") == [
        "t.conf:1:1: 'Retry_Interval' is an option, not a stanza; write Retry_Interval = value"]
    assert errors("Binding = 5") == [
        "t.conf:1:1: 'Binding' is a stanza, not an option; write Binding \"name\" { ... }"]


# -- error collection ----------------------------------------------------------------------

def test_many_errors_reported_in_one_pass():
    errs = errors('Retry_Interval = soon\nBogus = 1\nBinding "a b" { Max_Retries = x }\n'
                  'Domain "d" { Relay_Hosts = () }\nUse_IPv6 = maybe\n')
    assert [e.split(":")[1] for e in errs] == ["1", "2", "3", "3", "4", "5"]


def test_unbalanced_braces():
    assert errors('Binding "b" {\n  Retry_Interval = 5\n') == [
        "t.conf:1:1: unterminated stanza 'Binding \"b\"': missing '}'"]
    assert errors("Retry_Interval = 5\n}\n") == [
        "t.conf:2:1: unexpected '}' (no open stanza to close)"]


def test_unterminated_array_recovers_at_next_assignment():
    assert errors('Relay_Domains = ( a.com b.com\nRetry_Interval = soon\n') == [
        "t.conf:1:17: unterminated array: missing ')'",
        "t.conf:2:18: option 'Retry_Interval' expects a non-negative integer (seconds), "
        'got "soon"']


def test_deep_nesting_is_an_error_not_a_crash():
    text = 'Binding_Group "g" {' * 200 + "}" * 200
    errs = errors(text)
    assert any("nested too deeply" in e for e in errs)
