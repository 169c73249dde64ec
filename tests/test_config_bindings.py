"""Bindings (spec §2.5, §5), traffic-shaping options (§6) and the shared
buckets of throttles and scope caps (§2.3, §6.2, §6.3)."""

import socket

import pytest

from impetus.config import ConfigError, load_config_string
from impetus.config import values as V


def cfg(text, filename="t.conf"):
    return load_config_string(text, filename)


def val(text, name, **kw):
    return cfg(text).lookup(name, **kw)


def errors(text, filename="t.conf"):
    with pytest.raises(ConfigError) as ei:
        load_config_string(text, filename)
    return [str(i) for i in ei.value.issues]


def _bindable(addr: str) -> bool:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((addr, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


BIND_EXPECTS = ("option 'Bind_Address' expects an IP address of this host, \"*\" or a host "
                "name from /etc/hosts")


# -- Bind_Address ------------------------------------------------------------------------------

def test_bind_address_default_is_the_wildcard():
    c = cfg("")
    assert c.lookup("Bind_Address") == "*"
    assert c.lookup("Bind_Address", binding="b") == "*"
    assert c.explain("Bind_Address").scope == "default"


@pytest.mark.parametrize("raw,value", [
    ('"*"', "*"), ("127.0.0.1", "127.0.0.1"), ('"127.0.0.2"', "127.0.0.2"),
    ('"127.255.1.9"', "127.255.1.9"), ('"::1"', "::1"), ('"[::1]"', "::1"),
    ('"0:0:0:0:0:0:0:1"', "::1"), ('" 127.0.0.3 "', "127.0.0.3"), ('"0.0.0.0"', "0.0.0.0"),
])
def test_bind_address_accepted_forms(raw, value):
    assert val(f"Bind_Address = {raw}", "Bind_Address") == value


def test_bind_address_scopes_and_fallback():
    c = cfg('Bind_Address = "127.0.0.1"\n'
            'Binding "b1" { Bind_Address = "127.0.0.2" }\n'
            'Binding "b2" { }\n'
            'Binding_Group "g" { Bind_Address = "127.0.0.4"\n'
            '  Binding "g1" { Bind_Address = "127.0.0.5" }\n'
            '  Binding "g2" { } }')
    assert c.lookup("Bind_Address") == "127.0.0.1"              # the default binding
    assert c.lookup("Bind_Address", binding="b1") == "127.0.0.2"
    assert c.lookup("Bind_Address", binding="b2") == "127.0.0.1"  # global fallback
    assert c.lookup("Bind_Address", binding="g1") == "127.0.0.5"
    assert c.lookup("Bind_Address", binding="g2") == "127.0.0.4"  # group fallback
    assert c.lookup("Bind_Address", binding="g2", domain="x.test") == "127.0.0.4"


def test_bind_address_is_not_valid_in_a_domain():
    assert errors('Domain "d.test" { Bind_Address = "127.0.0.1" }') == [
        "t.conf:1:19: option 'Bind_Address' is not valid in a domain stanza; valid scopes: "
        "global, binding_group, binding"]


def test_non_local_bind_address_is_an_error():
    assert not _bindable("192.0.2.1")  # TEST-NET-1: never configured on a host
    assert not _bindable("2001:db8::25")
    assert errors('Binding "b1" {\n  Bind_Address = "192.0.2.1"\n}') == [
        "t.conf:2:18: option 'Bind_Address' address 192.0.2.1 is not configured on this host"]
    assert errors('Bind_Address = "2001:db8::25"') == [
        "t.conf:1:16: option 'Bind_Address' address 2001:db8::25 is not configured on this host"]
    assert errors('Bind_Address = "[2001:DB8::25]"') == [
        "t.conf:1:16: option 'Bind_Address' address 2001:db8::25 is not configured on this host"]


@pytest.mark.parametrize("raw", ["224.0.0.1", "255.255.255.255", "ff02::1"])
def test_multicast_and_broadcast_bind_addresses_are_refused(raw):
    assert errors(f'Bind_Address = "{raw}"') == [
        f"t.conf:1:16: option 'Bind_Address' address {raw} cannot be a source address "
        "(multicast or broadcast)"]


@pytest.mark.parametrize("raw", ["300.1.1.1", "not an address", "1.2.3", "[127.0.0.1", "",
                                 "127.0.0.1:25", "*:25", "**"])
def test_bad_bind_addresses(raw):
    got = errors(f'Bind_Address = "{raw}"')
    assert len(got) == 1 and got[0].startswith(f"t.conf:1:16: {BIND_EXPECTS}, got \"{raw}\"")


def test_bind_address_array_is_refused():
    assert errors('Bind_Address = ( "127.0.0.1" )') == [
        f"t.conf:1:16: {BIND_EXPECTS}, got an array"]


@pytest.fixture
def hosts_file(tmp_path, monkeypatch):
    """A private hosts file, and DNS made to fail loudly."""
    path = tmp_path / "hosts"
    path.write_text("# comment\n"
                    "127.0.0.7   mta-b1.local mta-b1  # trailing comment\n"
                    "192.0.2.1   mta-remote.local\n"
                    "198.51.100.7   mta-mixed.local\n"
                    "127.0.0.8   MTA-Mixed.Local\n"
                    "::1         mta-v6.local\n")
    monkeypatch.setattr(V, "HOSTS_FILE", str(path))

    def no_dns(*a, **kw):  # pragma: no cover - the point is that it is never called
        raise AssertionError("Bind_Address must never be resolved through DNS")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, no_dns)
    return path


def test_bind_address_host_name_from_the_hosts_file(hosts_file):
    c = cfg('Binding "b1" { Bind_Address = "MTA-B1.local." }\n'
            'Binding "b2" { Bind_Address = "mta-b1" }\n'
            'Binding "b3" { Bind_Address = "mta-mixed.local" }\n'
            'Binding "b4" { Bind_Address = "mta-v6.local" }')
    assert c.lookup("Bind_Address", binding="b1") == "127.0.0.7"
    assert c.lookup("Bind_Address", binding="b2") == "127.0.0.7"
    assert c.lookup("Bind_Address", binding="b3") == "127.0.0.8"   # first *local* address
    assert c.lookup("Bind_Address", binding="b4") == "::1"


def test_bind_address_host_name_errors(hosts_file):
    assert errors('Bind_Address = "mta-remote.local"') == [
        f"t.conf:1:16: option 'Bind_Address' host name \"mta-remote.local\" ({hosts_file}): "
        "address 192.0.2.1 is not configured on this host"]
    assert errors('Bind_Address = "unknown.example"') == [
        f"t.conf:1:16: option 'Bind_Address' host name \"unknown.example\" is not in "
        f"{hosts_file} (Bind_Address host names are never looked up in DNS; write the address)"]


def test_hosts_file_parser(tmp_path):
    p = tmp_path / "hosts"
    p.write_text("127.0.0.1 a a.example\nbogus b\n127.0.0.2 A\nfe80::1%lo a\n127.0.0.1 a\n")
    assert V.hosts_file_addresses("a", str(p)) == ["127.0.0.1", "127.0.0.2", "fe80::1%lo"]
    assert V.hosts_file_addresses("b", str(p)) == []
    assert V.hosts_file_addresses("a", str(tmp_path / "missing")) == []


# -- EHLO_Hostname -------------------------------------------------------------------------------

def test_ehlo_hostname_default():
    assert val("", "EHLO_Hostname") == "__hostname__"


@pytest.mark.parametrize("raw,value", [
    ("__hostname__", "__hostname__"), ('"__HOSTNAME__"', "__hostname__"),
    ("__Message__", "__message__"), ('"mta1.customer1.example"', "mta1.customer1.example"),
    ("MTA1.Example.COM", "MTA1.Example.COM"), ('"localhost"', "localhost"),
    ('"[192.0.2.1]"', "[192.0.2.1]"), ('"[IPv6:2001:db8::1]"', "[IPv6:2001:db8::1]"),
])
def test_ehlo_hostname_accepted_forms(raw, value):
    assert val(f"EHLO_Hostname = {raw}", "EHLO_Hostname") == value


def test_ehlo_hostname_scopes():
    c = cfg('EHLO_Hostname = "g.example"\nBinding "b" { EHLO_Hostname = "b.example"\n'
            '  Domain "d.test" { EHLO_Hostname = __message__ } }\n'
            'Binding_Group "g" { EHLO_Hostname = "grp.example" Binding "g1" {} }\n'
            'Domain "x.test" { EHLO_Hostname = __hostname__ }')
    assert c.lookup("EHLO_Hostname", binding="b", domain="d.test") == "__message__"
    assert c.lookup("EHLO_Hostname", binding="b", domain="x.test") == "b.example"
    assert c.lookup("EHLO_Hostname", binding="g1", domain="y.test") == "grp.example"
    assert c.lookup("EHLO_Hostname", domain="x.test") == "__hostname__"
    assert c.lookup("EHLO_Hostname") == "g.example"


@pytest.mark.parametrize("raw,detail", [
    ("two words", "one word of printable ASCII characters"),
    ("", "empty"),
    ("__hostnme__", "unknown placeholder; expected __hostname__ or __message__"),
    ("192.0.2.1", "write an address as an address literal, [192.0.2.1]"),
    ("2001:db8::1", "write an address as an address literal, [IPv6:2001:db8::1]"),
    ("[1.2.3]", "not an address literal; expected [a.b.c.d] or [IPv6:...]"),
    ("h\u00e9.example", "one word of printable ASCII characters"),
    ("a!b", None),
    ("-bad-.example", None),
])
def test_bad_ehlo_hostnames(raw, detail):
    msg = (f't.conf:1:17: option \'EHLO_Hostname\' expects a host name, "[address]", '
           f'"__hostname__" or "__message__", got "{raw}"')
    if detail:
        msg += f" ({detail})"
    assert errors(f'EHLO_Hostname = "{raw}"') == [msg]


# -- Default_Binding, Suspend_Delivery -----------------------------------------------------------

@pytest.mark.parametrize("raw", ["normal", "none", "suspended", "SUSPENDED"])
def test_default_binding(raw):
    assert val(f"Default_Binding = {raw}", "Default_Binding") == raw.lower()


def test_default_binding_errors():
    assert val("", "Default_Binding") == "normal"
    assert errors("Default_Binding = maybe") == [
        "t.conf:1:19: option 'Default_Binding' expects one of normal, none, suspended, "
        'got "maybe"']
    assert errors('Binding "b" { Default_Binding = none }') == [
        "t.conf:1:15: option 'Default_Binding' is not valid in a binding stanza; valid scopes: "
        "global"]


def test_suspend_delivery_scopes():
    c = cfg('Binding_Group "g" { Suspend_Delivery = on Binding "g1" {}\n'
            '  Binding "g2" { Suspend_Delivery = false } }\n'
            'Domain "held.test" { Suspend_Delivery = true }')
    assert c.lookup("Suspend_Delivery") is False
    assert c.lookup("Suspend_Delivery", binding="g1") is True
    assert c.lookup("Suspend_Delivery", binding="g2") is False
    assert c.lookup("Suspend_Delivery", domain="held.test") is True
    assert c.lookup("Suspend_Delivery", binding="g2", domain="held.test") is False  # D1: B > D
    assert errors("Suspend_Delivery = sometimes") == [
        "t.conf:1:20: option 'Suspend_Delivery' expects a boolean (true/false, on/off, "
        'enabled/disabled, 1/0), got "sometimes"']


# -- rates ---------------------------------------------------------------------------------------

THROTTLES = ["Outbound_Throttle_Messages", "Outbound_Throttle_Connections",
             "Cluster_Outbound_Throttle_Messages", "Cluster_Outbound_Throttle_Connections"]


@pytest.mark.parametrize("name", THROTTLES)
@pytest.mark.parametrize("raw,value", [("10", (10, 1)), ('"60/3"', (60, 3)), ('"1/60"', (1, 60)),
                                       ('" 5 / 2 "', (5, 2)), ("0", (0, 1)), ('"0/5"', (0, 5))])
def test_throttle_rates(name, raw, value):
    c = cfg(f'Binding "b" {{ Domain "d.test" {{ {name} = {raw} }} }}')
    assert c.lookup(name, binding="b", domain="d.test") == value
    assert c.lookup(name) is None


@pytest.mark.parametrize("name", THROTTLES)
def test_throttle_scopes(name):
    cfg(f'{name} = 1\nBinding_Group "g" {{ {name} = 2 Binding "b" {{ {name} = 3\n'
        f'  Domain "d" {{ {name} = 4 }} }} Domain "e" {{ {name} = 5 }} }}\n'
        f'Domain "/x/" {{ {name} = 6 }}')
    assert errors(f'Host "mx.test" {{ {name} = "10/5" }}') == [
        f"t.conf:1:18: option '{name}' is not supported yet in a host stanza"]


def test_zero_period_rate_is_a_clear_error():
    assert errors('Outbound_Throttle_Messages = "5/0"') == [
        "t.conf:1:30: option 'Outbound_Throttle_Messages' expects a rate \"N\" or \"N/S\" "
        '(N >= 0, S > 0), got "5/0" (the period S must be at least 1 second)']


# -- Cluster_Throttle_Store ----------------------------------------------------------------------

@pytest.mark.parametrize("raw,value", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://127.0.0.1", "redis://127.0.0.1:6379/0"),
    ("redis://127.0.0.1/", "redis://127.0.0.1:6379/0"),
    ("redis://Redis.Example.:6380/15", "redis://redis.example:6380/15"),
    ("REDIS://localhost:1/3", "redis://localhost:1/3"),
    ("redis://[::1]:7000/2", "redis://[::1]:7000/2"),
    ("redis://[::1]", "redis://[::1]:6379/0"),
    ("rediss://cache.example:6390/1", "rediss://cache.example:6390/1"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:s3cret@127.0.0.1:6379/0"),
])
def test_cluster_throttle_store(raw, value):
    assert val(f'Cluster_Throttle_Store = "{raw}"', "Cluster_Throttle_Store") == value


def test_cluster_throttle_store_default_and_scope():
    assert val("", "Cluster_Throttle_Store") is None
    assert errors('Binding "b" { Cluster_Throttle_Store = "redis://h" }') == [
        "t.conf:1:15: option 'Cluster_Throttle_Store' is not valid in a binding stanza; "
        "valid scopes: global"]


@pytest.mark.parametrize("raw,detail", [
    ("http://127.0.0.1:6379/0", 'the scheme must be redis:// or rediss://, not "http://"'),
    ("127.0.0.1:6379", "the redis:// scheme is missing"),
    ("redis:127.0.0.1", "expected 'redis://' before the host"),
    ("redis://", "the host is missing"),
    ("redis://:6379/0", "the host is missing"),
    ("redis://h:0/0", 'port "0" is not 1-65535'),
    ("redis://h:65536", 'port "65536" is not 1-65535'),
    ("redis://h:port/0", 'port "port" is not 1-65535'),
    ("redis://h:/0", 'port "" is not 1-65535'),
    ("redis://h/x", 'the database must be a non-negative integer, got "x"'),
    ("redis://h/-1", 'the database must be a non-negative integer, got "-1"'),
    ("redis://h/0/1", 'the database must be a non-negative integer, got "0/1"'),
    ("redis://bad_host!/0", '"bad_host!" is not a host name or IP address'),
    ("redis://::1/0", 'an IPv6 address must be bracketed, e.g. "redis://[::1]"'),
    ("redis://[::g]/0", '"::g" is not an IPv6 address'),
    ("redis://[::1/0", "missing ']' after the IPv6 address"),
    ("redis://h?db=1", "query parameters are not supported"),
    ("redis://h#x", "a '#fragment' is not allowed"),
])
def test_bad_cluster_throttle_store(raw, detail):
    assert errors(f'Cluster_Throttle_Store = "{raw}"') == [
        "t.conf:1:26: option 'Cluster_Throttle_Store' expects a Redis URL "
        f'"redis://host:port/db", got "{raw}" ({detail})']


def test_parse_redis_url():
    assert V.parse_redis_url("redis://u:p@h.example:1/2") == ("redis", "h.example", 1, 2, "u:p")
    assert V.parse_redis_url("redis://h") == ("redis", "h", 6379, 0, None)


# -- connection caps and per-connection limits -----------------------------------------------------

def test_scope_and_server_max_outbound_connections():
    c = cfg("")
    assert c.lookup("Scope_Max_Outbound_Connections") is None
    assert c.lookup("Server_Max_Outbound_Connections") == 20000   # D15
    c = cfg('Server_Max_Outbound_Connections = 500\nScope_Max_Outbound_Connections = 100\n'
            'Binding "b" { Server_Max_Outbound_Connections = 50\n'
            '  Domain "d.test" { Scope_Max_Outbound_Connections = "5" } }')
    assert c.lookup("Server_Max_Outbound_Connections", binding="b") == 50
    assert c.lookup("Scope_Max_Outbound_Connections", binding="b", domain="d.test") == 5
    assert c.lookup("Scope_Max_Outbound_Connections", binding="b") == 100
    assert errors("Scope_Max_Outbound_Connections = -1") == [
        "t.conf:1:34: option 'Scope_Max_Outbound_Connections' expects a non-negative integer, "
        'got "-1"']
    assert errors('Domain "d" { Server_Max_Outbound_Connections = 5 }') == [
        "t.conf:1:14: option 'Server_Max_Outbound_Connections' is not valid in a domain stanza; "
        "valid scopes: global, binding_group, binding"]
    assert errors('Host "mx.test" { Scope_Max_Outbound_Connections = 3 }') == [
        "t.conf:1:18: option 'Scope_Max_Outbound_Connections' is not supported yet in a "
        "host stanza"]


@pytest.mark.parametrize("name", ["Max_Deliveries_Per_Connection",
                                  "Max_Recipients_Per_Connection"])
def test_per_connection_limits(name):
    assert val("", name) == 0
    c = cfg(f'{name} = 100\nBinding_Group "g" {{ Domain "d.test" {{ {name} = 7 }}\n'
            f'  Binding "g1" {{}} }}')
    assert c.lookup(name, binding="g1", domain="d.test") == 7
    assert c.lookup(name, binding="g1", domain="e.test") == 100
    got = errors(f"{name} = -1")
    assert len(got) == 1 and "expects a non-negative integer" in got[0]


def test_max_recipients_per_connection_not_yet_on_listeners():
    assert errors("ESMTP_Listener {\n  Max_Recipients_Per_Connection = 5\n}") == [
        "t.conf:2:3: option 'Max_Recipients_Per_Connection' is not supported yet in an "
        "esmtp_listener stanza"]


@pytest.mark.parametrize("raw,value", [("normal", "normal"), ("high", "high"),
                                       ('"HIGH"', "high")])
def test_connection_allocation_aggressiveness(raw, value):
    c = cfg(f'Domain "d.test" {{ Connection_Allocation_Aggressiveness = {raw} }}')
    assert c.lookup("Connection_Allocation_Aggressiveness", domain="d.test") == value
    assert c.lookup("Connection_Allocation_Aggressiveness") == "normal"


def test_unknown_aggressiveness():
    assert errors("Connection_Allocation_Aggressiveness = low") == [
        "t.conf:1:40: option 'Connection_Allocation_Aggressiveness' expects one of normal, high, "
        'got "low"']


# -- Policy_Module --------------------------------------------------------------------------------

def test_policy_module_relative_to_the_config_file(tmp_path):
    (tmp_path / "hooks").mkdir()
    hook = tmp_path / "hooks" / "policy.py"
    hook.write_text("def set_binding(message):\n    message.binding('b1')\n")
    c = cfg('Policy_Module = "hooks/policy.py"', str(tmp_path / "ecelerity.conf"))
    assert c.lookup("Policy_Module") == str(hook)
    assert cfg(f'Policy_Module = "{hook}"').lookup("Policy_Module") == str(hook)
    assert cfg("").lookup("Policy_Module") is None


@pytest.mark.parametrize("source", [
    "import os\n\ndef set_binding(message):\n    pass\n",
    "async def set_binding(message):\n    pass\n",
    "set_binding = lambda message: None\n",
    "from hooks import set_binding\n",
    "from hooks import pick as set_binding\n",
    "from hooks import *\n",
    "try:\n    from fast import set_binding\nexcept ImportError:\n"
    "    def set_binding(m):\n        pass\n",
    "if True:\n    def set_binding(m):\n        pass\n",
])
def test_policy_module_forms(tmp_path, source):
    hook = tmp_path / "p.py"
    hook.write_text(source)
    assert cfg(f'Policy_Module = "{hook}"').lookup("Policy_Module") == str(hook)


def test_policy_module_is_parsed_not_run(tmp_path):
    hook = tmp_path / "p.py"
    marker = tmp_path / "ran"
    hook.write_text(f"open({str(marker)!r}, 'w').close()\ndef set_binding(m):\n    pass\n")
    cfg(f'Policy_Module = "{hook}"')
    assert not marker.exists()


def test_policy_module_errors(tmp_path):
    missing = tmp_path / "missing.py"
    assert errors(f'\nPolicy_Module = "{missing}"') == [
        f"t.conf:2:17: option 'Policy_Module' names a file that cannot be read: {missing}: "
        "No such file or directory"]
    assert errors(f'Policy_Module = "{tmp_path}"') == [
        f"t.conf:1:17: option 'Policy_Module' names a file that cannot be read: {tmp_path}: "
        "is a directory"]
    bad = tmp_path / "bad.py"
    bad.write_text("def set_binding(message)\n    pass\n")
    got = errors(f'Policy_Module = "{bad}"')
    assert len(got) == 1 and got[0].startswith(
        f"t.conf:1:17: option 'Policy_Module' file {bad} is not valid Python at line 1: ")
    other = tmp_path / "other.py"
    other.write_text("def set_bindings(message):\n    pass\n\nclass X:\n"
                     "    def set_binding(self, m):\n        pass\n")
    assert errors(f'Policy_Module = "{other}"') == [
        f"t.conf:1:17: option 'Policy_Module' file {other} does not define "
        "set_binding(message)"]
    assert errors('Binding "b" { Policy_Module = "p.py" }') == [
        "t.conf:1:15: option 'Policy_Module' is not valid in a binding stanza; valid scopes: "
        "global"]


# -- bindings API ----------------------------------------------------------------------------------

def test_implicit_default_binding_and_group_api():
    c = cfg("")
    assert c.is_binding("default") and c.is_group("default")
    assert c.group_members("default") == ["default"]
    assert not c.is_binding("b") and not c.is_group("g")
    assert c.group_members("g") == []


def test_group_members_in_declaration_order():
    c = cfg('Binding "top2" {}\n'
            'Binding_Group "g" { Binding "z" {} Binding "a" {} }\n'
            'Binding "a" { Retry_Interval = 5 }\n'       # also top level: stays in g
            'Binding "top1" {}\n'
            'Binding_Group "g" { Binding "m" {} Binding "z" {} }\n'   # merged
            'Binding_Group "empty" {}\n'
            'Binding "default" {}')
    assert c.group_members("g") == ["z", "a", "m"]
    assert c.group_members("default") == ["default", "top2", "top1"]
    assert c.group_members("empty") == []
    assert c.is_group("empty") and c.is_group("g") and not c.is_group("G")
    assert all(c.is_binding(b) for b in ("z", "a", "m", "top1", "top2", "default"))
    assert not c.is_binding("Z") and not c.is_binding("empty")
    members = c.group_members("g")
    members.append("x")                  # a copy
    assert c.group_members("g") == ["z", "a", "m"]
    assert c.bindings["a"] == "g" and c.group_of("a") == "g"


def test_default_binding_declared_in_a_group():
    c = cfg('Binding_Group "pool" { Binding "default" {} Binding "b" {} }')
    assert c.group_members("pool") == ["default", "b"]
    assert c.group_members("default") == []
    assert c.group_of("default") == "pool"


@pytest.mark.parametrize("text,msg", [
    ('Binding "my binding" { }', 't.conf:1:9: binding name "my binding" must not contain spaces'),
    ('Binding "b\tx" { }', 't.conf:1:9: binding name "b\\tx" must not contain spaces'),
    ('Binding_Group "g" { Binding "b:1" { } }',
     't.conf:1:29: binding name "b:1" must not contain colons'),
    ('Binding ":b" { }', 't.conf:1:9: binding name ":b" must not contain colons'),
    ('Binding_Group "my group" { }',
     't.conf:1:15: binding_group name "my group" must not contain spaces'),
    ('Binding "" { }', "t.conf:1:9: binding name must not be empty"),
])
def test_binding_name_rules(text, msg):
    assert errors(text) == [msg]


def test_group_names_may_contain_colons_and_names_are_case_sensitive():
    c = cfg('Binding_Group "pool:a" { Binding "B1" {} }\nBinding "b1" {}')
    assert c.group_members("pool:a") == ["B1"]
    assert c.group_of("b1") == "default" and c.group_of("B1") == "pool:a"


# -- throttle buckets (§2.3, §6.3) ----------------------------------------------------------------

SHARED = """
binding_group "g" {
  Outbound_Throttle_Messages = "10"
  binding "b1" {}
  binding "b2" {}
  domain  "d1" {}
}
"""


def test_group_throttle_is_one_bucket_for_its_bindings_and_domains():
    c = cfg(SHARED)
    want = ('outbound_throttle_messages@binding_group "g"', (10, 1))
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="b1") == want
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="b2") == want
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="b1", domain="d1") == want
    assert c.throttle_bucket("outbound_throttle_messages", binding="b2", domain="x.test") == want
    # not for bindings outside the group
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="default") is None
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="undeclared",
                             domain="d1") is None
    assert c.throttle_bucket("Outbound_Throttle_Connections", binding="b1") is None


def test_repeated_values_are_distinct_buckets():
    c = cfg('binding_group "g" {\n'
            '  binding "b1" { Outbound_Throttle_Messages = "10" }\n'
            '  binding "b2" { Outbound_Throttle_Messages = "10" }\n'
            '  domain "d1" { Outbound_Throttle_Messages = "10" }\n'
            '}\n'
            'binding "b3" { Outbound_Throttle_Messages = "10" }')
    b1 = c.throttle_bucket("Outbound_Throttle_Messages", binding="b1")
    b2 = c.throttle_bucket("Outbound_Throttle_Messages", binding="b2")
    d1 = c.throttle_bucket("Outbound_Throttle_Messages", binding="b1", domain="d1")
    b3 = c.throttle_bucket("Outbound_Throttle_Messages", binding="b3")
    assert b1 == ('outbound_throttle_messages@binding_group "g" / binding "b1"', (10, 1))
    assert b2 == ('outbound_throttle_messages@binding_group "g" / binding "b2"', (10, 1))
    assert d1 == ('outbound_throttle_messages@binding_group "g" / domain "d1"', (10, 1))
    assert b3 == ('outbound_throttle_messages@binding "b3"', (10, 1))
    assert len({b1[0], b2[0], d1[0], b3[0]}) == 4
    # the group's domain stanza beats the binding (D1: G::D > B)
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="b2", domain="d1") == d1


def test_regex_domain_is_one_bucket():
    c = cfg('Domain "/^(wanadoo|orange)[.]fr$/" { Outbound_Throttle_Connections = "3/60" }\n'
            'Domain "orange.fr" { Retry_Interval = 5 }')
    want = ('outbound_throttle_connections@domain "/^(wanadoo|orange)[.]fr$/"', (3, 60))
    for d in ("wanadoo.fr", "orange.fr", "ORANGE.FR."):
        for b in ("default", "b1", "b2"):
            assert c.throttle_bucket("Outbound_Throttle_Connections", domain=d, binding=b) == want
    assert c.throttle_bucket("Outbound_Throttle_Connections", domain="free.fr") is None


def test_global_throttle_is_one_system_wide_bucket():
    c = cfg('Outbound_Throttle_Connections = 100\nBinding "b" {}\n'
            'Binding_Group "g" { Binding "g1" {} }\nDomain "d.test" {}')
    want = ("outbound_throttle_connections@global", (100, 1))
    assert c.throttle_bucket("Outbound_Throttle_Connections") == want
    for b, d in (("b", None), ("g1", "d.test"), ("default", "x.test"), ("nope", None)):
        assert c.throttle_bucket("Outbound_Throttle_Connections", binding=b, domain=d) == want


def test_unset_or_zero_throttle_is_unlimited():
    c = cfg('Outbound_Throttle_Messages = 50\nBinding "free" { Outbound_Throttle_Messages = 0 }\n'
            'Domain "slow.test" { Outbound_Throttle_Messages = "0/10" }')
    assert cfg("").throttle_bucket("Outbound_Throttle_Messages") is None
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="free") is None  # overrides
    assert c.throttle_bucket("Outbound_Throttle_Messages", domain="slow.test") is None
    assert c.throttle_bucket("Outbound_Throttle_Messages", domain="x.test") == (
        "outbound_throttle_messages@global", (50, 1))


def test_cluster_throttle_buckets_are_separate_from_local_ones():
    c = cfg('Outbound_Throttle_Messages = 10\nCluster_Outbound_Throttle_Messages = "100/60"\n'
            'Binding_Group "g" { Cluster_Outbound_Throttle_Connections = 5 Binding "b" {} }')
    assert c.throttle_bucket("Outbound_Throttle_Messages", binding="b") == (
        "outbound_throttle_messages@global", (10, 1))
    assert c.throttle_bucket("Cluster_Outbound_Throttle_Messages", binding="b") == (
        "cluster_outbound_throttle_messages@global", (100, 60))
    assert c.throttle_bucket("Cluster_Outbound_Throttle_Connections", binding="b") == (
        'cluster_outbound_throttle_connections@binding_group "g"', (5, 1))


def test_bucket_identities_are_stable_across_loads():
    text = SHARED + 'Domain "/x/" { Outbound_Throttle_Messages = 1 }'
    a, b = cfg(text), cfg(text)
    for kw in ({"binding": "b1"}, {"domain": "ax.test"}):
        assert a.throttle_bucket("Outbound_Throttle_Messages", **kw) == \
            b.throttle_bucket("Outbound_Throttle_Messages", **kw)


def test_bucket_names_must_be_bucket_options():
    c = cfg("")
    for name in ("Retry_Interval", "Max_Outbound_Connections", "No_Such"):
        with pytest.raises(KeyError):
            c.throttle_bucket(name)
        with pytest.raises(KeyError):
            c.scope_bucket(name)
    with pytest.raises(KeyError):
        c.throttle_bucket("Scope_Max_Outbound_Connections")
    with pytest.raises(KeyError):
        c.scope_bucket("Outbound_Throttle_Messages")


def test_host_throttle_bucket_is_none_while_host_throttles_are_not_supported():
    c = cfg('Host "mx.test" { Max_Outbound_Connections = 2 }\nOutbound_Throttle_Messages = 5')
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "mx.test") is None
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "other.test") is None


def test_host_throttle_bucket_when_enabled(monkeypatch):
    import dataclasses
    from impetus.config.options import OPTIONS
    spec = OPTIONS["outbound_throttle_messages"]
    monkeypatch.setitem(OPTIONS, "outbound_throttle_messages",
                        dataclasses.replace(spec, unsupported_scopes=frozenset()))
    c = cfg('Host "/^mx[0-9][.]test$/" { Outbound_Throttle_Messages = "10/5" }\n'
            'Binding "b" { Host "mx1.test" { Outbound_Throttle_Messages = 0 } }')
    want = ('outbound_throttle_messages@host "/^mx[0-9][.]test$/"', (10, 5))
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "mx1.test") == want
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "MX2.test.") == want
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "mx1.test", binding="b") is None
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "mx2.test", binding="b") == want
    assert c.host_throttle_bucket("Outbound_Throttle_Messages", "mail.test") is None


# -- scope buckets (§6.2) --------------------------------------------------------------------------

SCOPES = """
Scope_Max_Outbound_Connections = 1000
Domain "d.test" { Scope_Max_Outbound_Connections = 40 }
Domain "/^(wanadoo|orange)[.]fr$/" { Scope_Max_Outbound_Connections = 3 }
Binding_Group "g" {
  Domain "d.test" { Scope_Max_Outbound_Connections = 20 }
  Binding "g1" { Domain "d.test" { Scope_Max_Outbound_Connections = 5 } }
  Binding "g2" { }
}
Binding "b" { Scope_Max_Outbound_Connections = 200 }
Binding "c" { }
"""


@pytest.mark.parametrize("binding,domain,identity,cap", [
    ("default", "x.test", "global", 1000),
    ("c", None, "global", 1000),
    ("default", "d.test", 'domain "d.test"', 40),              # d.test over all bindings
    ("c", "d.test", 'domain "d.test"', 40),
    ("g2", "d.test", 'binding_group "g" / domain "d.test"', 20),  # over the group's bindings
    ("g1", "d.test", 'binding_group "g" / binding "g1" / domain "d.test"', 5),
    ("g1", "x.test", "global", 1000),
    ("b", "x.test", 'binding "b"', 200),                        # everything through b
    ("b", "d.test", 'binding "b"', 200),                        # D1: B > D
    ("c", "orange.fr", 'domain "/^(wanadoo|orange)[.]fr$/"', 3),  # matching domains together
    ("g2", "wanadoo.fr", 'domain "/^(wanadoo|orange)[.]fr$/"', 3),
])
def test_scope_bucket(binding, domain, identity, cap):
    c = cfg(SCOPES)
    assert c.scope_bucket("Scope_Max_Outbound_Connections", binding=binding, domain=domain) == (
        f"scope_max_outbound_connections@{identity}", cap)


def test_scope_bucket_unset_or_zero_is_no_cap():
    assert cfg("").scope_bucket("Scope_Max_Outbound_Connections", domain="d.test") is None
    c = cfg('Scope_Max_Outbound_Connections = 10\nDomain "free.test" '
            '{ Scope_Max_Outbound_Connections = 0 }')
    assert c.scope_bucket("Scope_Max_Outbound_Connections", domain="free.test") is None
    assert c.scope_bucket("Scope_Max_Outbound_Connections", domain="x.test") == (
        "scope_max_outbound_connections@global", 10)


def test_server_max_bucket():
    c = cfg('Binding_Group "g" { Server_Max_Outbound_Connections = 300 Binding "g1" {}\n'
            '  Binding "g2" {} }\nBinding "b" { Server_Max_Outbound_Connections = 50 }')
    s = "server_max_outbound_connections@"
    assert c.scope_bucket("Server_Max_Outbound_Connections") == (s + "global", 20000)
    assert c.scope_bucket("Server_Max_Outbound_Connections", binding="c",
                          domain="x.test") == (s + "global", 20000)
    assert c.scope_bucket("Server_Max_Outbound_Connections", binding="g1") == (
        s + 'binding_group "g"', 300)
    assert c.scope_bucket("Server_Max_Outbound_Connections", binding="g2") == (
        s + 'binding_group "g"', 300)
    assert c.scope_bucket("Server_Max_Outbound_Connections", binding="b") == (
        s + 'binding "b"', 50)
    assert cfg("Server_Max_Outbound_Connections = 0").scope_bucket(
        "Server_Max_Outbound_Connections") is None
