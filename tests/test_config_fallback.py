"""Scope fallback: spec §2.2 worked example and decision D1."""

import ipaddress

import pytest

from impetus.config import Resolved, load_config_string


def cfg(text):
    return load_config_string(text, "t.conf")


# -- spec §2.2 worked example -------------------------------------------------------

WORKED = """\
message_expiration = 86400
binding "b1" { message_expiration = 3600 }
domain "example.com" { message_expiration = 120 }
binding "b2" {
  message_expiration = 7200
  domain "example.com" { message_expiration = 86400 }
}
binding "b3" {
  domain "other.com" { message_expiration = 86400 }
}
"""


@pytest.mark.parametrize("domain,binding,value,scope", [
    ("example.com", "b2", 86400, 'binding "b2" / domain "example.com"'),   # binding::domain
    ("anything.org", "b2", 7200, 'binding "b2"'),                          # binding
    ("example.com", "b3", 120, 'domain "example.com"'),                    # global domain stanza
    ("other.com", "b3", 86400, 'binding "b3" / domain "other.com"'),
    ("elsewhere.net", "b3", 86400, "global"),
    ("example.com", "b1", 3600, 'binding "b1"'),                           # binding beats domain
])
def test_worked_example(domain, binding, value, scope):
    c = cfg(WORKED)
    r = c.explain("Message_Expiration", domain=domain, binding=binding)
    assert (r.value, r.scope) == (value, scope)
    assert c.lookup("Message_Expiration", domain=domain, binding=binding) == value


# -- D1: every row of G::B::D > B::D > G::D > B > G > D > global > default --------------

ROWS = [
    # (tag, line, value, expected scope label)
    ("GBD", '  Binding "b" {\n    Domain "d.com" { Retry_Interval = 1 }\n  }', 1,
     'binding_group "g" / binding "b" / domain "d.com"'),
    ("BD", 'Binding "b" { Domain "d.com" { Retry_Interval = 2 } }', 2,
     'binding "b" / domain "d.com"'),
    ("GD", '  Domain "d.com" { Retry_Interval = 3 }', 3, 'binding_group "g" / domain "d.com"'),
    ("B", '  Binding "b" { Retry_Interval = 4 }', 4, 'binding_group "g" / binding "b"'),
    ("G", "  Retry_Interval = 5", 5, 'binding_group "g"'),
    ("D", 'Domain "d.com" { Retry_Interval = 6 }', 6, 'domain "d.com"'),
    ("global", "Retry_Interval = 7", 7, "global"),
]
IN_GROUP = {"GBD", "GD", "B", "G"}


def d1_config(drop: set[str]) -> str:
    inner = [line for tag, line, *_ in ROWS if tag in IN_GROUP and tag not in drop]
    outer = [line for tag, line, *_ in ROWS if tag not in IN_GROUP and tag not in drop]
    return ('Binding_Group "g" {\n  Binding "b" {}\n' + "\n".join(inner) + "\n}\n"
            + "\n".join(outer) + "\n")


@pytest.mark.parametrize("i", range(len(ROWS) + 1),
                         ids=[r[0] for r in ROWS] + ["default"])
def test_d1_chain_row(i):
    """Remove every more specific value; the next row wins."""
    drop = {tag for tag, *_ in ROWS[:i]}
    c = cfg(d1_config(drop))
    r = c.explain("Retry_Interval", domain="d.com", binding="b")
    if i == len(ROWS):
        assert r == Resolved(1200, "default", None, None)
    else:
        _, _, value, scope = ROWS[i]
        assert (r.value, r.scope, r.file) == (value, scope, "t.conf")


def test_d1_full_chain_listing():
    c = cfg(d1_config(set()))
    assert c.chain(domain="d.com", binding="b") == [
        'binding_group "g" / binding "b" / domain "d.com"',
        'binding "b" / domain "d.com"',
        'binding_group "g" / domain "d.com"',
        'binding_group "g" / binding "b"',
        'binding "b"',
        'binding_group "g"',
        'domain "d.com"',
        "global",
        "default",
    ]


def test_top_level_binding_stanza_counts_as_binding_level():
    c = cfg('Binding_Group "g" { Binding "b" {} Retry_Interval = 5 }\n'
            'Binding "b" { Retry_Interval = 4 }\nDomain "d.com" { Retry_Interval = 6 }')
    assert c.explain("Retry_Interval", domain="d.com", binding="b").scope == 'binding "b"'


def test_group_binding_beats_top_level_binding():
    c = cfg('Binding_Group "g" { Binding "b" { Retry_Interval = 1 } }\n'
            'Binding "b" { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", binding="b") == 1


def test_group_level_applies_to_its_bindings_only():
    c = cfg('Binding_Group "g" { Max_Outbound_Connections = 5 Binding "a" {} }\n'
            'Binding "other" {}\nMax_Outbound_Connections = 30')
    assert c.lookup("Max_Outbound_Connections", domain="x.com", binding="a") == 5
    assert c.lookup("Max_Outbound_Connections", domain="x.com", binding="other") == 30
    assert c.lookup("Max_Outbound_Connections", domain="x.com") == 30


def test_default_group_stanza_applies_to_ungrouped_bindings():
    c = cfg('Binding_Group "default" { Retry_Interval = 9 }\nBinding "b" {}')
    assert c.lookup("Retry_Interval", binding="b") == 9
    assert c.lookup("Retry_Interval") == 9


def test_default_binding_stanza():
    c = cfg('Binding "default" { Retry_Interval = 8 }')
    assert c.lookup("Retry_Interval") == 8
    assert c.explain("Retry_Interval").scope == 'binding "default"'


def test_unknown_binding_falls_back_like_an_undeclared_one():
    c = cfg("Retry_Interval = 3")
    assert c.lookup("Retry_Interval", binding="nosuch", domain="x.com") == 3


def test_spec_binding_group_example():
    # spec §2.2 ambiguity note: remove it from the binding and the group's 5 wins over
    # the global 30
    c = cfg('max_outbound_connections = 30\nbinding_group "g" {\n  max_outbound_connections = 5\n'
            '  binding "example" { }\n}')
    assert c.lookup("Max_Outbound_Connections", domain="d.com", binding="example") == 5


# -- regex domains -------------------------------------------------------------------------

def test_exact_domain_before_regex_in_same_container():
    c = cfg('Domain "/example[.]com$/" { Retry_Interval = 1 }\n'
            'Domain "example.com" { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", domain="example.com") == 2
    assert c.lookup("Retry_Interval", domain="sub.example.com") == 1


def test_first_regex_in_file_order_wins():
    c = cfg('Domain "/^a/" { Retry_Interval = 1 }\nDomain "/b$/" { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", domain="ab") == 1
    assert c.lookup("Retry_Interval", domain="xb") == 2
    assert c.explain("Retry_Interval", domain="ab").scope == 'domain "/^a/"'


def test_regex_stanza_that_does_not_set_option_is_passed_over():
    c = cfg('Domain "/^a/" { Max_Retries = 4 }\nDomain "/b$/" { Retry_Interval = 2 }\n'
            'Domain "ab" { Max_Retries = 1 }')
    assert c.lookup("Retry_Interval", domain="ab") == 2
    assert c.lookup("Max_Retries", domain="ab") == 1


def test_exact_domain_does_not_match_subdomains():
    c = cfg('Domain "example.com" { Retry_Interval = 2 }')
    assert c.lookup("Retry_Interval", domain="mail.example.com") == 1200


def test_regex_domain_is_case_insensitive_and_unanchored_unless_anchored():
    c = cfg('Domain "/(?:^|[.])example[.](?:com|co[.]uk)$/" { Retry_Interval = 3 }')
    assert c.lookup("Retry_Interval", domain="MAIL.Example.CO.UK") == 3
    assert c.lookup("Retry_Interval", domain="example.com") == 3
    assert c.lookup("Retry_Interval", domain="badexample.com") == 1200


def test_regex_domains_inside_bindings():
    c = cfg('Binding "b" { Domain "/^x/" { Retry_Interval = 5 } }\n'
            'Domain "xyz.com" { Retry_Interval = 6 }')
    assert c.lookup("Retry_Interval", domain="xyz.com", binding="b") == 5
    assert c.lookup("Retry_Interval", domain="xyz.com") == 6


def test_ip_literal_domain():
    c = cfg('Domain "192.0.43.10" { Retry_Interval = 5 }')
    assert c.lookup("Retry_Interval", domain="[192.0.43.10]") == 5


# -- lookup contract ---------------------------------------------------------------------------

def test_defaults_and_types():
    c = cfg("")
    assert c.lookup("Retry_Interval") == 1200
    assert c.lookup("Max_Retry_Interval") == 43200
    assert c.lookup("Max_Retries") == "auto"
    assert c.lookup("Message_Expiration") == 86400
    assert c.lookup("Spoolbase") == "/var/spool/impetus"
    assert c.lookup("Remote_SMTP_Port") == 25
    assert c.lookup("Generate_Bounces") is True
    assert c.lookup("Bounces_Inline_Original") == "headers"
    assert c.lookup("Relay_Hosts") == []
    assert c.lookup("Hostname") is None
    assert c.lookup("Max_DNS_TTL") == 4294967295
    assert c.lookup("Server_Max_Outbound_Connections") == 20000   # D15
    assert c.lookup("Idle_Timeout") == 5
    # unsupported options can still be asked for: their default
    assert c.lookup("Gateway") is None
    assert c.lookup("ECStream_Port") == 1825


def test_global_only_options_fall_through_for_any_binding_and_domain():
    c = cfg("Use_IPv6 = true\nBinding \"b\" {}")
    assert c.lookup("Use_IPv6", domain="x.com", binding="b") is True


def test_lookup_errors_are_key_errors():
    c = cfg("")
    with pytest.raises(KeyError):
        c.lookup("No_Such_Option")
    with pytest.raises(KeyError):
        c.lookup("Mainlog")          # module-only option
    with pytest.raises(KeyError):
        c.lookup("Listen_Backlog")   # listener-only option
    with pytest.raises(KeyError):
        c.explain("Rollup_MX")       # host-only option


def test_explain_for_default_and_set_values():
    c = cfg("\n\nRelay_Hosts = ( 10.0.0.0/8 )")
    assert c.explain("Retry_Interval") == Resolved(1200, "default", None, None)
    assert c.explain("Relay_Hosts") == Resolved([ipaddress.ip_network("10.0.0.0/8")], "global",
                                                "t.conf", 3)


def test_default_lists_are_not_shared():
    c = cfg("")
    c.lookup("Relay_Hosts").append("junk")
    assert cfg("").lookup("Relay_Hosts") == []


def test_lookup_is_memoised():
    c = cfg('Domain "/^a/" { Retry_Interval = 1 }')
    assert c.lookup("Retry_Interval", domain="abc") == 1
    assert ("Retry_Interval", "abc", "default") in c._values
    assert c.explain("Retry_Interval", domain="abc") is c.explain("Retry_Interval", domain="abc")


def test_lookup_is_cheap():
    import time
    c = cfg('Binding_Group "g" { Binding "b" { Domain "/x/" { Retry_Interval = 1 } } }')
    c.lookup("Retry_Interval", domain="d.com", binding="b")
    t0 = time.perf_counter()
    for _ in range(100_000):
        c.lookup("Retry_Interval", domain="d.com", binding="b")
    assert time.perf_counter() - t0 < 1.0


def test_bounded_caches():
    from impetus.config import model
    c = cfg("")
    old = model.CACHE_LIMIT
    model.CACHE_LIMIT = 10
    try:
        for i in range(50):
            c.lookup("Retry_Interval", domain=f"d{i}.com")
        assert len(c._values) <= 10 and len(c._chains) <= 10
    finally:
        model.CACHE_LIMIT = old
