"""Host stanzas (D18, spec §2.3/§2.4): Config.host_lookup / host_stanza_key.

Only Host stanzas count, along
binding_group::binding::host > binding_group::host > binding::host > host;
a matching Host stanza that does not set Max_Outbound_Connections means -1
(unlimited), never the domain/binding/global value; no matching Host
stanza means None.
"""

import pytest

from impetus.config import ConfigError, Resolved, load_config_string

MOC = "Max_Outbound_Connections"

FULL = '''
Max_Outbound_Connections = 30
Domain "d.test" { Max_Outbound_Connections = 8 }
Host "mx.test" { Max_Outbound_Connections = 1 }
Binding "b" { Host "mx.test" { Max_Outbound_Connections = 2 } }
Binding_Group "g" {
  Max_Outbound_Connections = 11
  Host "mx.test" { Max_Outbound_Connections = 3 }
  Binding "b" { Host "mx.test" { Max_Outbound_Connections = 4 } }
  Binding "c" { }
  Binding "e" { Host "mx.test" { } }
}
Binding "c" { Host "mx.test" { Max_Outbound_Connections = 5 } }
Binding "x" { }
'''


def cfg(text):
    return load_config_string(text, "t.conf")


@pytest.mark.parametrize("binding, value, scope", [
    # binding_group::binding::host
    ("b", 4, 'binding_group "g" / binding "b" / host "mx.test"'),
    # binding_group::host beats binding::host (c has both)
    ("c", 3, 'binding_group "g" / host "mx.test"'),
    # a declared binding without host stanzas of its own -> global host
    ("x", 1, 'host "mx.test"'),
    # an undeclared binding -> global host
    ("nobody", 1, 'host "mx.test"'),
    ("default", 1, 'host "mx.test"'),
    # G::B::H exists but is empty: fall back along the host chain to G::H
    ("e", 3, 'binding_group "g" / host "mx.test"'),
])
def test_host_chain_levels(binding, value, scope):
    c = cfg(FULL)
    assert c.host_lookup(MOC, "mx.test", binding=binding) == value
    r = c.host_explain(MOC, "mx.test", binding=binding)
    assert r.scope == scope and r.file == "t.conf"


def test_binding_host_level():
    c = cfg('Host "mx.test" { Max_Outbound_Connections = 1 }\n'
            'Binding "b" { Host "mx.test" { Max_Outbound_Connections = 2 } }')
    assert c.host_lookup(MOC, "mx.test", binding="b") == 2
    assert c.host_lookup(MOC, "mx.test") == 1
    assert c.host_explain(MOC, "mx.test", binding="b") == Resolved(
        2, 'binding "b" / host "mx.test"', "t.conf", 2)


def test_binding_group_host_level_applies_to_every_binding_of_the_group():
    c = cfg('Binding_Group "g" { Host "mx.test" { Max_Outbound_Connections = 3 }\n'
            '  Binding "b1" {} Binding "b2" {} }\nBinding "b3" {}')
    assert c.host_lookup(MOC, "mx.test", binding="b1") == 3
    assert c.host_lookup(MOC, "mx.test", binding="b2") == 3
    assert c.host_lookup(MOC, "mx.test", binding="b3") is None
    assert c.host_stanza_key("mx.test", binding="b1") == c.host_stanza_key("mx.test", "b2")


def test_binding_group_binding_host_level():
    c = cfg('Binding_Group "g" { Binding "b" { Host "mx.test" { Max_Outbound_Connections = 4 } } }')
    assert c.host_lookup(MOC, "mx.test", binding="b") == 4
    assert c.host_lookup(MOC, "mx.test") is None


def test_no_fallback_to_domain_binding_or_global():
    c = cfg('Max_Outbound_Connections = 30\nDomain "mx.test" { Max_Outbound_Connections = 8 }\n'
            'Binding "b" { Max_Outbound_Connections = 9 }\nHost "mx.test" { }')
    assert c.host_lookup(MOC, "mx.test") == -1
    assert c.host_lookup(MOC, "mx.test", binding="b") == -1
    r = c.host_explain(MOC, "mx.test")
    assert (r.value, r.file, r.line) == (-1, "t.conf", 4)
    assert "host default" in r.scope
    # the ordinary chain is untouched by host stanzas
    assert c.lookup(MOC) == 30 and c.lookup(MOC, domain="mx.test") == 8


def test_binding_level_empty_host_stanza_means_unlimited():
    c = cfg('Max_Outbound_Connections = 30\nBinding "b" { Host "mx.test" { } }')
    assert c.host_lookup(MOC, "mx.test", binding="b") == -1
    assert c.host_lookup(MOC, "mx.test") is None


def test_no_matching_host_stanza_is_none():
    c = cfg('Max_Outbound_Connections = 30\nHost "mx.test" { Max_Outbound_Connections = 2 }')
    assert c.host_lookup(MOC, "other.test") is None
    assert c.host_explain(MOC, "other.test") is None
    assert c.host_stanza_key("other.test") is None
    assert c.host_chain("other.test") == []
    assert cfg("").host_lookup(MOC, "mx.test") is None


def test_host_names_fold_case_and_trailing_dot():
    c = cfg('Host "MX.Example.Test." { Max_Outbound_Connections = 2 }')
    for h in ("mx.example.test", "MX.EXAMPLE.TEST", "mx.example.test."):
        assert c.host_lookup(MOC, h) == 2
    assert c.host_lookup(MOC, "example.test") is None       # exact, not a suffix match
    assert c.host_lookup(MOC, "a.mx.example.test") is None


@pytest.mark.parametrize("stanza, host", [
    ('"192.0.2.25"', "192.0.2.25"),
    ('"[192.0.2.25]"', "192.0.2.25"),
    ('"2001:db8::25"', "2001:DB8:0:0::25"),
    ('"[IPv6:2001:db8::25]"', "2001:db8::25"),
    ('"2001:db8::25"', "[IPv6:2001:db8::25]"),
])
def test_ip_host_stanzas(stanza, host):
    c = cfg(f"Host {stanza} {{ Max_Outbound_Connections = 6 }}")
    assert c.host_lookup(MOC, host) == 6


# -- regex Host stanzas --------------------------------------------------------------------

def test_regex_host_matches_and_is_one_bucket():
    c = cfg('Host "/^mx[0-9]+[.]pool[.]test$/" { Max_Outbound_Connections = 7 }')
    assert c.host_lookup(MOC, "mx1.pool.test") == 7
    assert c.host_lookup(MOC, "MX22.pool.test.") == 7
    assert c.host_lookup(MOC, "mx.pool.test") is None
    k1, k2 = c.host_stanza_key("mx1.pool.test"), c.host_stanza_key("mx2.pool.test")
    assert k1 == k2 == 'host "/^mx[0-9]+[.]pool[.]test$/"'


def test_exact_host_before_regex():
    c = cfg('Host "/pool/" { Max_Outbound_Connections = 7 }\n'
            'Host "mx1.pool.test" { Max_Outbound_Connections = 2 }')
    assert c.host_lookup(MOC, "mx1.pool.test") == 2
    assert c.host_lookup(MOC, "mx2.pool.test") == 7
    assert c.host_stanza_key("mx1.pool.test") != c.host_stanza_key("mx2.pool.test")


def test_first_regex_in_file_order_wins():
    c = cfg('Host "/^mx1/" { Max_Outbound_Connections = 1 }\n'
            'Host "/pool/" { Max_Outbound_Connections = 2 }')
    assert c.host_lookup(MOC, "mx1.pool.test") == 1
    assert c.host_lookup(MOC, "mx2.pool.test") == 2
    assert c.host_chain("mx1.pool.test") == ['host "/^mx1/"', 'host "/pool/"']


def test_regex_that_does_not_set_falls_to_next_matching_stanza():
    c = cfg('Host "/^mx1/" { }\nHost "/pool/" { Max_Outbound_Connections = 2 }')
    assert c.host_lookup(MOC, "mx1.pool.test") == 2
    assert c.host_stanza_key("mx1.pool.test") == 'host "/^mx1/"'
    assert c.host_stanza_key("mx1.pool.test", name=MOC) == 'host "/pool/"'


def test_more_specific_container_beats_exact_name():
    c = cfg('Host "mx1.pool.test" { Max_Outbound_Connections = 2 }\n'
            'Binding "b" { Host "/pool/" { Max_Outbound_Connections = 9 } }')
    assert c.host_lookup(MOC, "mx1.pool.test", binding="b") == 9
    assert c.host_lookup(MOC, "mx1.pool.test") == 2


# -- host_stanza_key, memoisation, errors ------------------------------------------------------

def test_host_stanza_key_is_stable_across_loads():
    a, b = cfg(FULL), cfg(FULL)
    for binding in ("b", "c", "x", "e"):
        assert a.host_stanza_key("mx.test", binding=binding) == \
            b.host_stanza_key("mx.test", binding=binding)
    assert a.host_stanza_key("mx.test", "b") == 'binding_group "g" / binding "b" / host "mx.test"'
    assert a.host_stanza_key("MX.test.", "b") == a.host_stanza_key("mx.test", "b")
    # the empty G::B::H stanza is the most specific; G::H is the one that sets the cap
    assert a.host_stanza_key("mx.test", "e") == 'binding_group "g" / binding "e" / host "mx.test"'
    assert a.host_stanza_key("mx.test", "e", name=MOC) == 'binding_group "g" / host "mx.test"'


def test_host_lookup_is_memoised():
    c = cfg('Host "/pool/" { Max_Outbound_Connections = 7 }')
    r = c.host_explain(MOC, "mx1.pool.test", binding="b")
    assert (MOC, "mx1.pool.test", "b") in c._host_values
    assert c.host_explain(MOC, "mx1.pool.test", binding="b") is r
    assert c.host_lookup(MOC, "none.test") is None
    assert (MOC, "none.test", "default") in c._host_values


def test_host_caches_are_bounded():
    from impetus.config import model
    c = cfg('Host "/x/" { Max_Outbound_Connections = 7 }')
    old = model.CACHE_LIMIT
    model.CACHE_LIMIT = 10
    try:
        for i in range(50):
            c.host_lookup(MOC, f"mx{i}.test")
        assert len(c._host_values) <= 10 and len(c._host_chains) <= 10
    finally:
        model.CACHE_LIMIT = old


def test_host_lookup_errors_are_key_errors():
    c = cfg("")
    with pytest.raises(KeyError):
        c.host_lookup("No_Such_Option", "mx.test")
    with pytest.raises(KeyError):
        c.host_lookup("Retry_Interval", "mx.test")     # not a host-scope option


def test_other_host_options_default_when_a_stanza_matches():
    c = cfg('Host "mx.test" { Max_Outbound_Connections = 2 }')
    assert c.host_lookup("Rollup_MX", "mx.test") is False
    assert c.host_lookup("Outbound_Throttle_Messages", "mx.test") is None
    assert c.host_lookup("Rollup_MX", "other.test") is None


def test_host_stanza_errors():
    with pytest.raises(ConfigError) as ei:
        cfg('Host "/mx(/" { }\nHost "bad host" { }\n'
            'Host "mx.test" { Max_Outbound_Connections = -2  Retry_Interval = 5 }')
    got = [str(i) for i in ei.value.issues]
    assert got[0].startswith('t.conf:1:6: invalid regular expression "/mx(/" in Host name')
    assert got[1].startswith('t.conf:2:6: invalid Host name "bad host"')
    assert got[2] == ("t.conf:3:45: option 'Max_Outbound_Connections' expects an integer >= -1, "
                      'got "-2"')
    assert got[3] == ("t.conf:3:49: option 'Retry_Interval' is not valid in a host stanza; "
                      "valid scopes: global, binding_group, binding, domain")
