"""`Routes` (spec §3.3, D4-D6) and the other routing options flipped to supported
(§3.4-§3.6, §4)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impetus.config import ConfigError, Resolved, load_config_string
from impetus.config.values import RouteItem


def cfg(text):
    return load_config_string(text, "t.conf")


def routes(text):
    return cfg(f"Routes = ( {text} )").lookup("Routes")


def errors(text):
    with pytest.raises(ConfigError) as ei:
        load_config_string(text, "t.conf")
    return [str(i) for i in ei.value.issues]


# -- forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, item", [
    # bare host names and IP literals (D4: no type, no pref)
    ('"my.local.smart.host"', RouteItem("host", "my.local.smart.host", text="my.local.smart.host")),
    ('"Smart.Host."', RouteItem("host", "smart.host", text="Smart.Host.")),
    ("10.0.0.1", RouteItem("host", "10.0.0.1", text="10.0.0.1")),
    ('"[2001:DB8:0::1]"', RouteItem("host", "2001:db8::1", text="[2001:DB8:0::1]")),
    ('"relay.test:2525"', RouteItem("host", "relay.test", 2525, text="relay.test:2525")),
    ('"[::1]:26"', RouteItem("host", "::1", 26, text="[::1]:26")),
    # __mx__
    ('"__mx__"', RouteItem("mx", None, text="__mx__")),
    # smtp:// URIs
    ('"smtp://1.2.3.4?pref=10&ttl=300&type=mx"',
     RouteItem("smtp", "1.2.3.4", None, 10, 300, "mx", "smtp://1.2.3.4?pref=10&ttl=300&type=mx")),
    ('"smtp://my.local.smart.host?pref=1"',
     RouteItem("smtp", "my.local.smart.host", pref=1, text="smtp://my.local.smart.host?pref=1")),
    ('"smtp://Relay.Test"', RouteItem("smtp", "relay.test", text="smtp://Relay.Test")),
    ('"smtp://relay.test/"', RouteItem("smtp", "relay.test", text="smtp://relay.test/")),
    ('"smtp://relay.test:2526"', RouteItem("smtp", "relay.test", 2526, text="smtp://relay.test:2526")),
    ('"smtp://relay.test?port=2526"',
     RouteItem("smtp", "relay.test", 2526, text="smtp://relay.test?port=2526")),
    ('"smtp://relay.test:2526?port=2526"',
     RouteItem("smtp", "relay.test", 2526, text="smtp://relay.test:2526?port=2526")),
    ('"smtp://relay.test?type=A&pref=0&ttl=0"',
     RouteItem("smtp", "relay.test", None, 0, 0, "a", "smtp://relay.test?type=A&pref=0&ttl=0")),
    ('"smtp://[2001:db8::1]?pref=10"',
     RouteItem("smtp", "2001:db8::1", pref=10, text="smtp://[2001:db8::1]?pref=10")),
    ('"smtp://[::1]:2525"', RouteItem("smtp", "::1", 2525, text="smtp://[::1]:2525")),
    ('"SMTP://relay.test"', RouteItem("smtp", "relay.test", text="SMTP://relay.test")),
    # lmtp:// (D6, our extension)
    ('"lmtp://store.test?port=24"', RouteItem("lmtp", "store.test", 24, text="lmtp://store.test?port=24")),
    ('"lmtp://store.test"', RouteItem("lmtp", "store.test", text="lmtp://store.test")),
    ('"lmtp://10.1.1.1:2003?pref=5"',
     RouteItem("lmtp", "10.1.1.1", 2003, 5, text="lmtp://10.1.1.1:2003?pref=5")),
])
def test_route_forms(raw, item):
    assert routes(raw) == (item,)


def test_positions_and_mixed_list():
    r = routes('"smtp://a.test?pref=1" "__mx__" b.test "lmtp://c.test"')
    assert [x.pos for x in r] == [0, 1, 2, 3]
    assert [x.kind for x in r] == ["smtp", "mx", "host", "lmtp"]
    assert [x.pref for x in r] == [1, None, None, None]     # explicit pref= only
    assert [x.type for x in r] == [None, None, None, None]  # explicit type= only


def test_route_item_is_frozen_and_hashable():
    (r,) = routes('"smtp://a.test?pref=1"')
    with pytest.raises(AttributeError):
        r.pref = 2
    assert len({r, r}) == 1
    assert not r.is_ip and routes("10.0.0.1")[0].is_ip and routes('"[::1]"')[0].is_ip
    assert not routes('"__mx__"')[0].is_ip


def test_routes_in_domain_and_explain():
    c = cfg('Routes = ( "__mx__" )\n'
            'Domain "d.test" {\n  Routes = ( "smtp://relay.test?pref=10" "__mx__" )\n}\n'
            'Binding "b" { Domain "e.test" { Routes = ( "10.0.0.9" ) } }')
    assert c.explain("Routes") == Resolved((RouteItem("mx", None, text="__mx__"),), "global",
                                           "t.conf", 1)
    r = c.explain("Routes", domain="d.test", binding="b")
    assert (r.scope, r.file, r.line) == ('domain "d.test"', "t.conf", 3)
    assert [x.text for x in r.value] == ["smtp://relay.test?pref=10", "__mx__"]
    r = c.explain("Routes", domain="e.test", binding="b")
    assert r.value[0].host == "10.0.0.9" and r.scope == 'binding "b" / domain "e.test"'
    assert c.lookup("Routes", domain="x.test") == c.lookup("Routes")


def test_routes_default_and_format():
    from impetus.config.options import get_option
    assert cfg("").lookup("Routes") is None
    spec = get_option("Routes")
    assert spec.type.format(None) == "-"
    assert spec.type.format(routes('"__mx__" "smtp://a?pref=1"')) == '( "__mx__" "smtp://a?pref=1" )'


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, reason", [
    ('"smtp://a?preference=1"', 'unknown parameter "preference" (expected pref, ttl, port or '
                                "type); the preference parameter is spelled 'pref'"),
    ('"smtp://a?weight=1"', 'unknown parameter "weight"'),
    ('"smtp://a?Pref=1"', "parameter names are lower case ('pref')"),
    ('"smtp://a?pref=x"', 'pref must be a non-negative integer, got "x"'),
    ('"smtp://a?pref=-1"', 'pref must be a non-negative integer, got "-1"'),
    ('"smtp://a?ttl=1h"', 'ttl must be a non-negative integer (seconds), got "1h"'),
    ('"smtp://a?port=0"', 'port must be an integer 1-65535, got "0"'),
    ('"smtp://a?port=65536"', 'port must be an integer 1-65535, got "65536"'),
    ('"smtp://a:99999"', 'port must be an integer 1-65535, got "99999"'),
    ('"a.test:0"', 'port must be an integer 1-65535, got "0"'),
    ('"smtp://a:25?port=26"', "two different ports (:25 and port=26)"),
    ('"smtp://a?type=cname"', 'type must be mx or a, got "cname"'),
    ('"smtp://a?pref"', "parameter 'pref' needs a value (pref=...)"),
    ('"smtp://a?pref=1&pref=2"', "parameter 'pref' is given twice"),
    ('"smtp://a?pref=1&"', "empty parameter"),
    ('"smtp://fe80::1"', 'an IPv6 address must be bracketed, e.g. "smtp://[fe80::1]"'),
    ('"fe80::1"', 'an IPv6 address must be bracketed, e.g. "[fe80::1]"'),
    ('"smtp://[fe80::1"', "missing ']' after the IPv6 address"),
    ('"smtp://[1.2.3.4]"', '"1.2.3.4" is not an IPv6 address'),
    ('"smtp://"', "the host is missing"),
    ('"smtp://?pref=1"', "the host is missing"),
    ('"smtp://bad_host!"', '"bad_host!" is not a host name or IP address'),
    ('"1.2.3"', '"1.2.3" is not a host name or IP address'),
    ('"smtp://__mx__"', "__mx__ takes no scheme"),
    ('"smtp://a/path"', "a path ('/path') is not allowed in an smtp:// route"),
    ('"smtp://user@a"', "'user@' is not allowed"),
    ('"smtp://a#frag"', "'#fragment' is not allowed"),
    ('"a.test?pref=1"', 'parameters need a scheme, e.g. "smtp://host?pref=10"'),
    ('"smtp:/a.test"', "expected 'smtp://host'"),
    ('"apn://x"', "the apn:// scheme is not supported yet"),
    ('"gcm://host?port=443"', "the gcm:// scheme is not supported yet"),
    ('"mm7://host/path?port=8080"', "the mm7:// scheme is not supported yet"),
    ('"http://host/path"', "the http:// scheme is not supported yet"),
    ('"gopher://x"', 'unknown scheme "gopher://"'),
    ('""', "the route is empty"),
])
def test_route_errors(raw, reason):
    shown = raw[1:-1] if raw.startswith('"') else raw
    [err] = errors(f"Routes = ( {raw} )")
    prefix = f't.conf:1:12: option \'Routes\' item 1 "{shown}": '
    assert err.startswith(prefix) and reason in err[len(prefix):], err


def test_route_error_names_the_item_and_its_position():
    assert errors('Domain "d.test" {\n  Routes = ( "__mx__"\n     "smtp://a?pref=x" )\n}') == [
        't.conf:3:6: option \'Routes\' item 2 "smtp://a?pref=x": pref must be a non-negative '
        'integer, got "x"']


def test_every_bad_item_is_reported():
    assert errors('Routes = ( "smtp://a?pref=x" ok.test "smtp://a?port=0" )') == [
        't.conf:1:12: option \'Routes\' item 1 "smtp://a?pref=x": pref must be a non-negative '
        'integer, got "x"',
        't.conf:1:38: option \'Routes\' item 3 "smtp://a?port=0": port must be an integer '
        '1-65535, got "0"']


def test_mx_listed_twice():
    assert errors('Routes = ( "__mx__" a.test "__MX__" )') == [
        't.conf:1:28: option \'Routes\' item 3 "__MX__": __mx__ is listed twice (also item 1)']


def test_empty_routes():
    assert errors("Routes = ( )") == [
        "t.conf:1:10: option 'Routes' needs at least one route, got an empty array ()"]
    assert errors("Routes = ()") == [
        "t.conf:1:10: option 'Routes' needs at least one route, got an empty array ()"]


def test_routes_needs_an_array():
    assert errors('Routes = "__mx__"') == [
        "t.conf:1:10: option 'Routes' expects an array of routes, e.g. "
        '( "smtp://host?pref=10" "__mx__" ), got "__mx__" (write an array as ( ... ))']


@pytest.mark.parametrize("stanza, phrase", [
    ('Binding "b" { Routes = ( "__mx__" ) }', "in a binding stanza"),
    ('Binding_Group "g" { Routes = ( "__mx__" ) }', "in a binding_group stanza"),
    ('Host "mx.test" { Routes = ( "__mx__" ) }', "in a host stanza"),
])
def test_routes_wrong_scope(stanza, phrase):
    [err] = errors(stanza)
    assert err.endswith(f"option 'Routes' is not valid {phrase}; valid scopes: global, domain")


# -- Delivery_Method, ports, DNS failure options ---------------------------------------------

@pytest.mark.parametrize("raw, value", [("ESMTP", "esmtp"), ("smtp", "smtp"), ("LMTP", "lmtp"),
                                        ('"Lmtp"', "lmtp")])
def test_delivery_method(raw, value):
    c = cfg(f'Domain "d.test" {{ Delivery_Method = {raw} }}')
    assert c.lookup("Delivery_Method", domain="d.test") == value
    assert c.lookup("Delivery_Method") == "esmtp"


@pytest.mark.parametrize("raw", ["ECStream", "apn", "GCM", "mm7"])
def test_delivery_method_unsupported_values(raw):
    assert errors(f"Delivery_Method = {raw}") == [
        f't.conf:1:19: option \'Delivery_Method\' value "{raw}" is not supported yet '
        "(supported: esmtp, smtp, lmtp)"]


def test_delivery_method_unknown_value():
    assert errors("Delivery_Method = carrier_pigeon") == [
        "t.conf:1:19: option 'Delivery_Method' expects one of esmtp, smtp, lmtp, "
        'got "carrier_pigeon"']


def test_lmtp_port():
    c = cfg('LMTP_Port = 24\nBinding "b" { LMTP_Port = "2004" }')
    assert c.lookup("LMTP_Port") == 24 and c.lookup("LMTP_Port", binding="b") == 2004
    assert cfg("").lookup("LMTP_Port") == 2003
    for bad in ("0", "65536", "lmtp"):
        assert errors(f"LMTP_Port = {bad}") == [
            f"t.conf:1:13: option 'LMTP_Port' expects a port number (1-65535), got \"{bad}\""]


def test_dns_and_delay_options():
    c = cfg("")
    assert c.lookup("Fully_Resolve_Before_SMTP") is True
    assert c.lookup("MX_Failures_Fallback_To_A") == 3
    assert c.lookup("DNS_Failures_To_Purge") == 10
    assert c.lookup("MX_Failures_To_Delay") == 50
    assert c.lookup("Connect_Timeout_To_Delay") == 900
    c = cfg('Fully_Resolve_Before_SMTP = off\nMX_Failures_Fallback_To_A = -1\n'
            'Domain "d.test" { DNS_Failures_To_Purge = 2  MX_Failures_To_Delay = 0 }\n'
            'Binding "b" { Connect_Timeout_To_Delay = 60  Fully_Resolve_Before_SMTP = true }')
    assert c.lookup("Fully_Resolve_Before_SMTP") is False
    assert c.lookup("Fully_Resolve_Before_SMTP", binding="b") is True
    assert c.lookup("MX_Failures_Fallback_To_A") == -1
    assert c.lookup("DNS_Failures_To_Purge", domain="d.test") == 2
    assert c.lookup("MX_Failures_To_Delay", domain="d.test") == 0
    assert c.lookup("Connect_Timeout_To_Delay", binding="b") == 60


@pytest.mark.parametrize("text, err", [
    ("MX_Failures_Fallback_To_A = -2",
     "t.conf:1:29: option 'MX_Failures_Fallback_To_A' expects an integer >= -1, got \"-2\""),
    ("DNS_Failures_To_Purge = -1",
     "t.conf:1:25: option 'DNS_Failures_To_Purge' expects a non-negative integer, got \"-1\""),
    ("MX_Failures_To_Delay = lots",
     "t.conf:1:24: option 'MX_Failures_To_Delay' expects a non-negative integer, got \"lots\""),
    ("Connect_Timeout_To_Delay = 15m",
     "t.conf:1:28: option 'Connect_Timeout_To_Delay' expects a non-negative integer (seconds), "
     'got "15m"'),
    ("Fully_Resolve_Before_SMTP = maybe",
     "t.conf:1:29: option 'Fully_Resolve_Before_SMTP' expects a boolean"),
    ('Binding "b" { MX_Failures_To_Delay = 5 }',
     "t.conf:1:15: option 'MX_Failures_To_Delay' is not valid in a binding stanza; "
     "valid scopes: global, domain"),
])
def test_dns_and_delay_option_errors(text, err):
    [got] = errors(text)
    assert got.startswith(err)


# -- Prohibited_Hosts / Skip_Hosts (§4, D9) ----------------------------------------------------

@pytest.mark.parametrize("name", ["Prohibited_Hosts", "Skip_Hosts"])
def test_address_lists(name):
    c = cfg(f'{name} = ( "127.0.0.0/8" 0.0.0.0 "::1" "fe80::/10" "[2001:db8::5]" )')
    assert c.lookup(name) == [ipaddress.ip_network(n) for n in
                              ("127.0.0.0/8", "0.0.0.0/32", "::1/128", "fe80::/10",
                               "2001:db8::5/128")]
    assert cfg("").lookup(name) == []


@pytest.mark.parametrize("name", ["Prohibited_Hosts", "Skip_Hosts"])
def test_address_lists_refuse_host_names(name):
    col = len(name) + 6
    assert errors(f'{name} = ( "127.0.0.1" "localhost" )') == [
        f"t.conf:1:{col + 12}: option '{name}' expects an array of IP addresses or CIDR blocks, "
        'got "localhost" (host names are not allowed)']


@pytest.mark.parametrize("name", ["Prohibited_Hosts", "Skip_Hosts"])
def test_address_lists_are_global_only(name):
    assert errors(f'Domain "d.test" {{ {name} = ( "::1" ) }}') == [
        f"t.conf:1:19: option '{name}' is not valid in a domain stanza; valid scopes: global"]


# -- the route parser never fails with anything but a route error ---------------------------

_ROUTE_BITS = ["smtp", "lmtp", "apn", "://", ":", "?", "&", "=", "/", "[", "]", "#", "@", ".",
               "pref", "ttl", "port", "type", "mx", "a", "0", "25", "65536", "-1", "::1",
               "fe80::", "1.2.3.4", "host", "__mx__", " ", "\u0663", "\x00"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(_ROUTE_BITS), max_size=12).map("".join),
                 st.text(max_size=40)))
def test_parse_route_only_raises_route_errors(text):
    from impetus.config.values import _RouteError, parse_route
    try:
        r = parse_route(text, 0)
    except _RouteError as exc:
        assert str(exc)
    else:
        assert r.kind in ("mx", "host", "smtp", "lmtp")
        assert r.port is None or 1 <= r.port <= 65535
        assert r.type in (None, "mx", "a")
        assert (r.host is None) == (r.kind == "mx")
