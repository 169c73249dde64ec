"""Typed values and validation (spec §1.4)."""

import ipaddress

import pytest

from impetus.config import ConfigError, load_config_string


def val(text, name, **kw):
    return load_config_string(text, "t.conf").lookup(name, **kw)


def errors(text):
    with pytest.raises(ConfigError) as ei:
        load_config_string(text, "t.conf")
    return [str(i) for i in ei.value.issues]


# -- integers -----------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [("0", 0), ("1200", 1200), ('"1200"', 1200),
                                       ("'30'", 30), ("007", 7), ('" 5 "', 5)])
def test_durations(raw, value):
    assert val(f"Retry_Interval = {raw}", "Retry_Interval") == value


@pytest.mark.parametrize("raw", ["soon", "-1", "1.5", "1e3", "0x10", '""', "5s", "1_000"])
def test_bad_durations(raw):
    shown = raw.strip('"')
    assert errors(f"Retry_Interval = {raw}") == [
        f"t.conf:1:18: option 'Retry_Interval' expects a non-negative integer (seconds), "
        f'got "{shown}"']


def test_negative_allowed_where_documented():
    assert val("Max_Outbound_Connections = -1", "Max_Outbound_Connections") == -1
    assert errors("Max_Outbound_Connections = -2") == [
        "t.conf:1:28: option 'Max_Outbound_Connections' expects an integer >= -1, got \"-2\""]


@pytest.mark.parametrize("raw,value", [("1", 1), ("25", 25), ('"587"', 587), ("65535", 65535)])
def test_ports(raw, value):
    assert val(f"Remote_SMTP_Port = {raw}", "Remote_SMTP_Port") == value


@pytest.mark.parametrize("raw", ["0", "70000", "65536", "-25", "smtp"])
def test_bad_ports(raw):
    assert errors(f"Remote_SMTP_Port = {raw}") == [
        f"t.conf:1:20: option 'Remote_SMTP_Port' expects a port number (1-65535), got \"{raw}\""]


def test_dns_ttls():
    assert val("Max_DNS_TTL = 4294967295", "Max_DNS_TTL") == 4294967295
    assert errors("Max_DNS_TTL = 4294967296") == [
        "t.conf:1:15: option 'Max_DNS_TTL' expects an integer 0-4294967295 (seconds), "
        'got "4294967296"']


def test_min_dns_ttl_greater_than_max():
    assert errors("Min_DNS_TTL = 600\nMax_DNS_TTL = 300") == [
        "t.conf:1:1: Min_DNS_TTL (600) must not be greater than Max_DNS_TTL (300)"]
    assert val("Min_DNS_TTL = 300\nMax_DNS_TTL = 300", "Min_DNS_TTL") == 300


# -- modes (octal) -------------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [("0644", 0o644), ("0600", 0o600), ('"0640"', 0o640),
                                       ("0", 0), ("420", 420)])
def test_modes(raw, value):
    c = load_config_string(f"ec_logger {{ mainlog_mode = {raw} }}", "t.conf")
    assert c.loggers.mainlog_mode == value


@pytest.mark.parametrize("raw", ["0899", "rw-r--r--", "-0644", "077777"])
def test_bad_modes(raw):
    assert errors(f"ec_logger {{ mainlog_mode = {raw} }}") == [
        f"t.conf:1:28: option 'Mainlog_Mode' expects a file mode (octal with a leading 0, "
        f'e.g. 0644), got "{raw}"']


# -- booleans -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [
    ("true", True), ("false", False), ("on", True), ("off", False), ("enabled", True),
    ("disabled", False), ("1", True), ("0", False), ("TRUE", True), ('"Off"', False),
    ("Enabled", True),
])
def test_booleans(raw, value):
    assert val(f"Use_IPv6 = {raw}", "Use_IPv6") is value


@pytest.mark.parametrize("raw", ["yes", "no", "2", "maybe", "t"])
def test_bad_booleans(raw):
    assert errors(f"Use_IPv6 = {raw}") == [
        "t.conf:1:12: option 'Use_IPv6' expects a boolean (true/false, on/off, "
        f'enabled/disabled, 1/0), got "{raw}"']


# -- enums ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [("headers", "headers"), ('"ALL"', "all"),
                                       ("None", "none")])
def test_enums_are_lower_cased(raw, value):
    assert val(f"Bounces_Inline_Original = {raw}", "Bounces_Inline_Original") == value


def test_bad_enum():
    assert errors("Bounces_Inline_Original = some") == [
        "t.conf:1:27: option 'Bounces_Inline_Original' expects one of headers, none, all, "
        'got "some"']


# -- Max_Retries -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [("5", 5), ("0", 0), ("auto", "auto"), ('"NONE"', "none"),
                                       ("Auto", "auto")])
def test_max_retries(raw, value):
    assert val(f"Max_Retries = {raw}", "Max_Retries") == value


@pytest.mark.parametrize("raw", ["-1", "never", "3.5"])
def test_bad_max_retries(raw):
    assert errors(f"Max_Retries = {raw}") == [
        "t.conf:1:15: option 'Max_Retries' expects a non-negative integer, \"auto\" or "
        f'"none", got "{raw}"']


# -- address lists ------------------------------------------------------------------------------

def test_address_lists():
    nets = val('Relay_Hosts = ( 127.0.0.0/8 "10.10.10.0/24" "::1" 2001:db8::/32 192.0.2.7 '
               '"[fd00::1]" 10.1.2.3/16 )', "Relay_Hosts")
    assert nets == [ipaddress.ip_network(n) for n in (
        "127.0.0.0/8", "10.10.10.0/24", "::1/128", "2001:db8::/32", "192.0.2.7/32",
        "fd00::1/128", "10.1.0.0/16")]


def test_empty_address_list():
    assert val("Relay_Hosts = ( )", "Relay_Hosts") == []


def test_host_name_in_relay_hosts():
    assert errors('Relay_Hosts = ( 127.0.0.1\n  "mail.example.com" )') == [
        "t.conf:2:3: option 'Relay_Hosts' expects an array of IP addresses or CIDR blocks, "
        'got "mail.example.com" (host names are not allowed)']


@pytest.mark.parametrize("raw", ["10.0.0.0/33", "1.2.3.4/x", "300.1.1.1", "::1::2", "1.2.3.4/"])
def test_bad_cidrs(raw):
    assert errors(f'Relay_Hosts = ( "{raw}" )') == [
        "t.conf:1:17: option 'Relay_Hosts' expects an array of IP addresses or CIDR blocks, "
        f'got "{raw}"']


def test_scalar_where_array_expected():
    assert errors("Relay_Hosts = 127.0.0.1") == [
        "t.conf:1:15: option 'Relay_Hosts' expects an array of IP addresses or CIDR blocks, "
        'got "127.0.0.1" (write an array as ( ... ))']


def test_array_where_scalar_expected():
    assert errors("Retry_Interval = ( 1200 )") == [
        "t.conf:1:18: option 'Retry_Interval' expects a non-negative integer (seconds), "
        "got an array"]


def test_hash_where_scalar_expected():
    assert errors("Retry_Interval = [ a = b ]") == [
        "t.conf:1:18: option 'Retry_Interval' expects a non-negative integer (seconds), "
        "got a hash"]


# -- Relay_Domains -----------------------------------------------------------------------------

def test_relay_domains():
    assert val('Relay_Domains = ( Example.COM "*.example.net" *example.org )', "Relay_Domains") \
        == ["example.com", "*.example.net", "*example.org"]


def test_bad_relay_domain():
    assert errors('Relay_Domains = ( "exa mple.com" )') == [
        "t.conf:1:19: option 'Relay_Domains' expects an array of domain names or '*.domain' "
        'patterns, got "exa mple.com"']


# -- rates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [("60", (60, 1)), ('"60/3"', (60, 3)), ('"1/60"', (1, 60)),
                                       ("0", (0, 1))])
def test_rate_type(raw, value):
    from impetus.config.parser import Value
    from impetus.config.values import RATE
    from impetus.config.errors import Pos
    assert RATE.convert(Value("scalar", Pos("t", 1, 1), text=raw.strip('"')), "") == value


@pytest.mark.parametrize("raw", ["x", "5/", "/5", "-1", "1.5/2", "5/-1", "5 per second"])
def test_bad_rates(raw):
    errs = errors(f'Outbound_Throttle_Messages = "{raw}"')
    assert errs == [
        "t.conf:1:30: option 'Outbound_Throttle_Messages' expects a rate \"N\" or \"N/S\" "
        f'(N >= 0, S > 0), got "{raw}"']


@pytest.mark.parametrize("raw", ["5/0", "0/0", "5/00"])
def test_rate_with_a_zero_period_is_a_clear_error(raw):
    assert errors(f'Binding_Group "g" {{ Outbound_Throttle_Connections = "{raw}" }}') == [
        "t.conf:1:53: option 'Outbound_Throttle_Connections' expects a rate \"N\" or \"N/S\" "
        f'(N >= 0, S > 0), got "{raw}" (the period S must be at least 1 second)']


# -- strings and paths ------------------------------------------------------------------------

def test_strings():
    assert val('Hostname = "mta1.example.com"', "Hostname") == "mta1.example.com"
    assert val("Mailerdaemon = postmaster@example.com", "Mailerdaemon") == "postmaster@example.com"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    c = load_config_string('Spoolbase = "spool"', str(tmp_path / "x.conf"))
    assert c.lookup("Spoolbase") == str(tmp_path / "spool")
    assert val('Spoolbase = "/var/spool/x"', "Spoolbase") == "/var/spool/x"


def test_empty_path():
    assert errors('Spoolbase = ""') == [
        "t.conf:1:13: option 'Spoolbase' expects a path, got \"\" (the path is empty)"]


def test_resolv_conf_must_be_readable(tmp_path):
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 127.0.0.1#5353\n")
    c = load_config_string(f'Resolv_Conf = "{rc}"', "t.conf")
    assert c.lookup("Resolv_Conf") == str(rc)
    missing = tmp_path / "missing.conf"
    assert errors(f'\nResolv_Conf = "{missing}"') == [
        f"t.conf:2:15: option 'Resolv_Conf' names a file that cannot be read: {missing}: "
        "No such file or directory"]
    assert errors(f'Resolv_Conf = "{tmp_path}"') == [
        f"t.conf:1:15: option 'Resolv_Conf' names a file that cannot be read: {tmp_path}: "
        "is a directory"]


# -- scope and support checks ---------------------------------------------------------------------

def test_option_in_wrong_scope_names_valid_scopes():
    assert errors('Domain "d.com" {\n  Relay_Hosts = ( 10.0.0.0/8 )\n}') == [
        "t.conf:2:3: option 'Relay_Hosts' is not valid in a domain stanza; valid scopes: global, "
        "esmtp_listener, listen, peer"]
    assert errors('Binding "b" { Use_IPv6 = true }') == [
        "t.conf:1:15: option 'Use_IPv6' is not valid in a binding stanza; valid scopes: global"]
    assert errors('Binding "b" { Host_Failure_Retry = 5 }') == [
        "t.conf:1:15: option 'Host_Failure_Retry' is not valid in a binding stanza; "
        "valid scopes: global, domain"]
    assert errors("Enable = false") == [
        "t.conf:1:1: option 'Enable' is not valid at global scope; valid scopes: esmtp_listener, "
        "listen, control_listener, control_listen, http_listener, http_listen"]


def test_domain_option_valid_in_nested_domain():
    c = load_config_string('Binding "b" { Domain "d.com" { Host_Failure_Retry = 5 } }', "t.conf")
    assert c.lookup("Host_Failure_Retry", binding="b", domain="d.com") == 5


def test_unsupported_option():
    assert errors('ECStream_Port = 1826') == ["t.conf:1:1: option 'ECStream_Port' is not supported yet"]
    assert errors('TLS_Engine = openssl') == [
        "t.conf:1:1: option 'TLS_Engine' is not supported yet"]


def test_unknown_option_suggests_close_match():
    assert errors("Retry_Intervals = 5") == [
        "t.conf:1:1: unknown option 'Retry_Intervals'; did you mean 'Retry_Interval'?"]
    assert errors("Zorglub = 5") == ["t.conf:1:1: unknown option 'Zorglub'"]


@pytest.mark.parametrize("name", [
    "Spoolbase", "Hostname", "Resolv_Conf", "Relay_Hosts", "Relay_Domains", "Max_Message_Size",
    "Remote_SMTP_Port", "Retry_Interval", "Max_Retry_Interval", "Max_Retries",
    "Message_Expiration", "Never_Retry", "Generate_Bounces", "Mailerdaemon",
    "Bounces_Inline_Original", "Max_Recipients_Per_Batch", "Max_Outbound_Connections",
    "Connect_Timeout", "EHLO_Timeout", "MailFrom_Timeout", "RcptTo_Timeout", "Body_Timeout",
    "Rset_Timeout", "Idle_Timeout", "Use_IPv6", "Prefer_IPv6_MXs", "Host_Failure_Retry",
    "Min_DNS_TTL", "Max_DNS_TTL", "Enable", "Mainlog", "Rejectlog", "Paniclog", "Acctlog",
    "Heartbeat", "Mainlog_Mode", "Bouncelog", "Bouncelog_Mode", "Log_Transient_Failures",
    "Log_Inband_Bounces", "Log_Outofband_Bounces", "Log_Receptions", "Gateway",
    "Routes", "Delivery_Method", "LMTP_Port", "Fully_Resolve_Before_SMTP",
    "MX_Failures_Fallback_To_A", "DNS_Failures_To_Purge", "MX_Failures_To_Delay",
    "Connect_Timeout_To_Delay", "Prohibited_Hosts", "Skip_Hosts",
    "Bind_Address", "EHLO_Hostname", "Default_Binding", "Suspend_Delivery",
    "Outbound_Throttle_Messages", "Outbound_Throttle_Connections",
    "Cluster_Outbound_Throttle_Messages", "Cluster_Outbound_Throttle_Connections",
    "Cluster_Throttle_Store", "Scope_Max_Outbound_Connections", "Server_Max_Outbound_Connections",
    "Max_Deliveries_Per_Connection", "Max_Recipients_Per_Connection",
    "Connection_Allocation_Aggressiveness", "Policy_Module",
])
def test_supported_options(name):
    from impetus.config import get_option
    spec = get_option(name)
    assert spec is not None and spec.supported


@pytest.mark.parametrize("name", ["ECStream_Port", "TLS_Engine", "Use_DANE", "Rollup_MX",
                                  "Server_Reserve_Outbound_Connections",
                                  "Cluster_Max_Outbound_Connections",
                                  "Migrate_Connections_Between_Sibling_Domains"])
def test_not_yet_supported_options_are_in_the_table(name):
    from impetus.config import get_option
    spec = get_option(name)
    assert spec is not None and not spec.supported


def test_max_outbound_connections_scopes():
    c = load_config_string(
        'Max_Outbound_Connections = 30\nBinding_Group "g" { Max_Outbound_Connections = 5\n'
        '  Binding "b" { Domain "d.com" { Max_Outbound_Connections = 2 } } }', "t.conf")
    assert c.lookup("Max_Outbound_Connections", binding="b", domain="d.com") == 2
    assert c.lookup("Max_Outbound_Connections", binding="b", domain="x.com") == 5


@pytest.mark.parametrize("value, message", [
    ("fe80::1", "an IPv6 address must be bracketed"),
    ('"[fe80::1"', "missing ']'"),
    ('"host:0"', "port '0' is not 1-65535"),
    ('"host:70000"', "port '70000' is not 1-65535"),
    ('"bad_host!"', "is not a host name or IPv4 address"),
])
def test_gateway_bad_values(value, message):
    [err] = errors(f"Gateway = {value}")
    assert err.startswith("t.conf:1:11: option 'Gateway' expects") and message in err


@pytest.mark.parametrize("value, expected", [
    ("10.0.0.1", ("10.0.0.1", None)), ("my.smart.host", ("my.smart.host", None)),
    ('"[fe80::a00]:1"', ("fe80::a00", 1)), ('"10.0.0.1:2526"', ("10.0.0.1", 2526)),
    ('"Smart.Host:26"', ("smart.host", 26)), ('"[::1]"', ("::1", None)),
])
def test_gateway_forms(value, expected):
    assert load_config_string(f"Gateway = {value}", "t.conf").lookup("Gateway") == expected
