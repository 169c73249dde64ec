"""Outbound TLS pieces without a network: D11 host matching, TLS_Protocols,
client contexts, the TLS/XCLIENT options and their load-time checks."""
import ssl

import pytest

from impetus.config import ConfigError, load_config_string
from impetus.config.values import parse_tls_protocols
from impetus.delivery import ClientFacts
from impetus.tls import (TlsSettings, certificate_matches, client_context, dnsname_matches,
                         protocol_range)


# -- D11 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, host, ok", [
    ("mx1.example.test", "mx1.example.test", True),
    ("MX1.Example.Test", "mx1.example.test.", True),
    ("*.example.test", "mx1.example.test", True),
    ("*.example.test", "example.test", False),          # the wildcard is one whole label
    ("*.example.test", "a.mx1.example.test", False),    # ... exactly one
    ("*.test", "example.test", False),                  # not right under a TLD-ish label
    ("mx*.example.test", "mx1.example.test", False),    # no partial wildcards
    ("*.*.example.test", "a.b.example.test", False),
    ("a.*.example.test", "a.b.example.test", False),
    ("*.example.test", "xn--bcher-kva.example.test", False),  # not for IDNA A-labels
    ("mx2.example.test", "mx1.example.test", False),
])
def test_dnsname_matches(pattern, host, ok):
    assert dnsname_matches(pattern, host) is ok


def _cert(dns=(), ips=(), cn=None):
    c = {"subjectAltName": tuple(("DNS", d) for d in dns) + tuple(("IP Address", i) for i in ips)}
    if cn:
        c["subject"] = ((("commonName", cn),),)
    return c


def test_host_check_uses_san_then_domain():
    cert = _cert(dns=["mx1.example.test"])
    assert certificate_matches(cert, ("mx1.example.test", "example.test")) == "mx1.example.test"
    cert = _cert(dns=["example.test"])
    assert certificate_matches(cert, ("mx1.example.test", "example.test")) == "example.test"
    assert certificate_matches(cert, ("mx2.other.test", "other.test")) is None


def test_cn_only_without_dnsname():
    # CN ignored when the certificate has a dNSName ...
    assert certificate_matches(_cert(dns=["other.test"], cn="mx1.example.test"),
                               ("mx1.example.test",)) is None
    # ... and used when it has none
    assert certificate_matches(_cert(cn="mx1.example.test"), ("mx1.example.test",)) \
        == "mx1.example.test"
    assert certificate_matches(_cert(cn="*.example.test"), ("mx1.example.test",)) \
        == "mx1.example.test"


def test_ip_names_match_ip_sans_only():
    cert = _cert(dns=["127.0.0.2"], ips=["127.0.0.9"])
    assert certificate_matches(cert, ("127.0.0.9",)) == "127.0.0.9"
    assert certificate_matches(cert, ("127.0.0.2",)) is None


def test_real_trustme_certificates(certs):
    path = certs.dir / "wild.pem"
    certs.ca.issue_cert("*.example.test").cert_chain_pems[0].write_to_path(str(path))
    decoded = ssl._ssl._test_decode_cert(str(path))  # what getpeercert() returns
    assert certificate_matches(decoded, ("mx1.example.test", "example.test")) == "mx1.example.test"
    assert certificate_matches(decoded, ("example.test",)) is None


# -- TLS_Protocols -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("+ALL", ("TLSv1.2", "TLSv1.3")),
    ("+ALL:-TLSv1.0", ("TLSv1.2", "TLSv1.3")),
    ("+ALL:-SSLv3:-TLSv1.0:-TLSv1.1", ("TLSv1.2", "TLSv1.3")),
    ("+ALL:-TLSv1.3", ("TLSv1.2", "TLSv1.2")),
    ("-ALL:+TLSv1.3", ("TLSv1.3", "TLSv1.3")),
    ("+TLSv1.0:+TLSv1.1:+TLSv1.2", ("TLSv1.0", "TLSv1.2")),
    ("+ALL:+TLSv1.1", ("TLSv1.1", "TLSv1.3")),
    ("tlsv1.2", ("TLSv1.2", "TLSv1.2")),
])
def test_tls_protocols(text, expected):
    assert parse_tls_protocols(text) == expected


@pytest.mark.parametrize("text, message", [
    ("+ALL:-TLSv1.2:-TLSv1.3", "no TLS version is left enabled"),
    ("+SSLv3", "no TLS version is left enabled"),
    ("+TLSv1.1:+TLSv1.3", "must be contiguous"),
    ("+ALL:+TLSv9", "unknown protocol"),
    ("", "no protocol is named"),
])
def test_tls_protocols_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tls_protocols(text)


def test_protocol_range_to_ssl():
    assert protocol_range("-ALL:+TLSv1.3") == (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)


# -- contexts ----------------------------------------------------------------------------------
def test_client_context_settings(certs):
    s = TlsSettings(mode="required", verify="host", ca=certs.ca_pem, protocols="-ALL:+TLSv1.3")
    ctx = client_context(s, True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert client_context(s, True) is ctx                       # cached
    assert client_context(s, False).verify_mode == ssl.CERT_NONE
    assert ctx.cert_store_stats()["x509_ca"] == 1               # TLS_CA only, no system CAs
    sts = TlsSettings(mode="required", verify="host", ca=certs.ca_pem, system_cas=True)
    assert client_context(sts, True).cert_store_stats()["x509_ca"] >= 1


def test_client_context_with_client_certificate(certs, tmp_path):
    leaf = certs.ca.issue_cert("impetus.test")
    crt, key = tmp_path / "c.crt", tmp_path / "c.key"
    leaf.cert_chain_pems[0].write_to_path(str(crt))
    leaf.private_key_pem.write_to_path(str(key))
    client_context(TlsSettings(mode="required", cert=str(crt), key=str(key)), False)
    with pytest.raises(ssl.SSLError):
        client_context(TlsSettings(mode="required", cert=str(crt)), False)  # no key anywhere


# -- options and their checks ------------------------------------------------------------------
def errors(text):
    with pytest.raises(ConfigError) as ei:
        load_config_string(text, "t.conf")
    return [str(i) for i in ei.value.issues]


def test_tls_and_xclient_options_resolve():
    c = load_config_string(
        'TLS = ifavailable\nXCLIENT = ifavailable\n'
        'Binding "b" { TLS = required  TLS_Verify = host\n'
        '  Domain "relay.test" { XCLIENT = required TLS_Ifavailable_Fallback = false } }',
        "t.conf")
    assert c.lookup("TLS") == "ifavailable" and c.lookup("TLS", binding="b") == "required"
    assert c.lookup("TLS_Verify") == "no" and c.lookup("TLS_Verify", binding="b") == "host"
    assert c.lookup("XCLIENT", binding="b", domain="relay.test") == "required"
    assert c.lookup("XCLIENT", binding="b", domain="other.test") == "ifavailable"
    assert c.lookup("TLS_Ifavailable_Fallback") is True
    assert c.lookup("TLS_Ifavailable_Fallback", binding="b", domain="relay.test") is False
    assert c.lookup("TLS_Protocols") == "+ALL"
    assert c.lookup("Use_MTA_STS", domain="x.test") is False
    assert c.lookup("Enable_MTA_STS", binding="b") is True


def test_defaults():
    c = load_config_string("", "t.conf")
    assert (c.lookup("TLS"), c.lookup("TLS_Verify"), c.lookup("XCLIENT")) == ("no", "no", "no")
    assert c.lookup("TLS_Certificate") is None and c.lookup("TLS_CA") is None
    assert c.lookup("TLS_Ciphers") == "DEFAULT" and c.lookup("MTA_STS_Port") == 443


def test_certificate_none_cancels_inherited(certs):
    c = load_config_string(
        f'TLS_Certificate = "{certs.server_combined}"\nDomain "x.test" {{ TLS_Certificate = none }}',
        "t.conf")
    assert c.lookup("TLS_Certificate") == certs.server_combined
    assert c.lookup("TLS_Certificate", domain="x.test") == "none"


def test_certificate_and_key_pairs_are_loaded(certs):
    load_config_string(f'TLS_Certificate = "{certs.server_crt}"\nTLS_Key = "{certs.server_key}"',
                       "t.conf")
    load_config_string(f'TLS_Certificate = "{certs.server_combined}"', "t.conf")
    # key at global, certificate in a binding
    load_config_string(f'TLS_Key = "{certs.server_key}"\n'
                       f'Binding "b" {{ TLS_Certificate = "{certs.server_crt}" }}', "t.conf")


def test_missing_certificate_is_a_config_error(tmp_path):
    [err] = errors(f'Binding "b" {{ TLS_Certificate = "{tmp_path}/nope.pem" }}')
    assert err.startswith("t.conf:1:33: option 'TLS_Certificate' names a file that cannot be read")
    assert "No such file or directory" in err


def test_corrupt_certificate_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    [err] = errors(f'TLS_Certificate = "{bad}"')
    assert "option 'TLS_Certificate' file" in err and "not a usable PEM certificate" in err


def test_certificate_without_its_key_is_a_config_error(certs):
    [err] = errors(f'TLS_Certificate = "{certs.server_crt}"')
    assert "no TLS_Key: the key must be in the same file" in err


def test_mismatched_key_is_a_config_error(certs):
    [err] = errors(f'TLS_Certificate = "{certs.server_crt}"\nTLS_Key = "{certs.wrongname_key}"')
    assert "option 'TLS_Certificate'" in err and "not a usable PEM certificate" in err


def test_key_alone_must_be_a_key(tmp_path, certs):
    load_config_string(f'TLS_Key = "{certs.server_key}"', "t.conf")
    notkey = tmp_path / "k.pem"
    notkey.write_text("hello\n")
    [err] = errors(f'TLS_Key = "{notkey}"')
    assert "holds no PEM private key" in err


def test_bad_ca_is_a_config_error(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("junk\n")
    [err] = errors(f'Domain "d.test" {{ TLS_CA = "{junk}" }}')
    assert "option 'TLS_CA' file" in err and "no usable PEM CA certificate" in err
    [err] = errors(f'TLS_CA = "{tmp_path}/missing.pem"')
    assert "option 'TLS_CA' names a file that cannot be read" in err


@pytest.mark.parametrize("line, fragment", [
    ('TLS = maybe', "option 'TLS' expects one of no, ifavailable, required"),
    ('TLS_Verify = always', "option 'TLS_Verify' expects one of no, ca, host, optional"),
    ('XCLIENT = yes', "option 'XCLIENT' expects one of no, ifavailable, required"),
    ('TLS_Protocols = "+ALL:-TLSv1.2:-TLSv1.3"', "no TLS version is left enabled"),
    ('TLS_Protocols = "+TLSv1.1:+TLSv1.3"', "must be contiguous"),
    ('TLS_Ciphers = "NO-SUCH-CIPHER"', "OpenSSL accepts no cipher from this list"),
    ('TLSv13_Ciphersuites = "TLS_FOO"', "unknown suite"),
])
def test_bad_values(line, fragment):
    [err] = errors(line)
    assert fragment in err


def test_listener_scopes_not_yet(certs):
    [err] = errors('ESMTP_Listener { TLS_Ciphers = "HIGH" }')
    assert "not supported yet" in err


def test_ciphers_and_suites_accepted():
    c = load_config_string('TLS_Ciphers = "HIGH:!aNULL"\nTLSv13_Ciphersuites = '
                           '"TLS_AES_128_GCM_SHA256:tls_aes_256_gcm_sha384"\nTLS_Ciphers = NORMAL',
                           "t.conf")
    assert c.lookup("TLS_Ciphers") == "DEFAULT"
    assert c.lookup("TLSv13_Ciphersuites") == "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"


# -- XCLIENT facts -----------------------------------------------------------------------------
def test_client_facts_from_reception():
    f = ClientFacts.from_reception("127.0.0.7", "client.test", "esmtp")
    assert (f.addr, f.helo, f.proto, f.name, f.port, f.login) == \
        ("127.0.0.7", "client.test", "ESMTP", None, None, None)
    assert ClientFacts.from_reception("2001:db8::0:1").addr == "IPV6:2001:db8::1"
    assert ClientFacts.from_reception("unknown", "", "internal") == ClientFacts()
    assert list(f.attributes(["HELO", "ADDR", "DESTADDR"])) == ["ADDR", "HELO"]
