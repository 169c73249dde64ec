"""MTA-STS (RFC 8461): parsing, MX patterns, discovery through the test DNS,
the HTTPS fetch from a local server with a trustme certificate, caching,
and ``enforce`` end to end (an MX outside the policy is not used)."""
import http.server
import ssl
import threading

import pytest

from impetus.dns import Resolver, ResolverSettings
from impetus.mta_sts import (FetchError, MtaSts, PolicyError, mx_matches, parse_http_response,
                             parse_policy, parse_txt)
from tests.mta import MTA

POLICY = "version: STSv1\nmode: enforce\nmx: mx2.example.test\nmax_age: 86400\n"


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, host, ok", [
    ("mx1.example.test", "MX1.example.test.", True),
    ("*.example.test", "mx1.example.test", True),
    ("*.example.test", "example.test", False),
    ("*.example.test", "a.mx1.example.test", False),
    ("mx1.example.test", "mx2.example.test", False),
])
def test_mx_matches(pattern, host, ok):
    assert mx_matches(pattern, host) is ok


def test_parse_txt():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=spf1 -all"]) is None
    with pytest.raises(PolicyError, match="2 v=STSv1"):
        parse_txt(["v=STSv1; id=1", "v=STSv1; id=2"])
    with pytest.raises(PolicyError, match="bad policy id"):
        parse_txt(["v=STSv1; id=not-alnum!"])
    with pytest.raises(PolicyError):
        parse_txt(["v=STSv1"])


def test_parse_policy():
    p = parse_policy("version: STSv1\r\nmode: testing\r\nmx: mx1.example.test\r\n"
                     "mx: *.backup.test\r\nmax_age: 604800\r\nextension: x\r\n", "example.test", "1")
    assert (p.mode, p.mx, p.max_age, p.id) == ("testing", ("mx1.example.test", "*.backup.test"),
                                               604800, "1")
    assert p.allows("a.backup.test") and not p.allows("backup.test")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").mode == "none"
    assert parse_policy("version: STSv1\nmode: enforce\nmx: a\nmax_age: 9999999999\n").max_age \
        == 31557600                                      # clamped to a year
    with pytest.raises(PolicyError, match="bad max_age"):
        parse_policy("version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n")


@pytest.mark.parametrize("text, message", [
    ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "not STSv1"),
    ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "bad mode"),
    ("version: STSv1\nmode: enforce\nmx: a\n", "max_age is missing"),
    ("version: STSv1\nmode: enforce\nmax_age: 10\n", "no mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "bad max_age"),
    ("garbage\n", "malformed"),
])
def test_parse_policy_errors(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_http_responses():
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello"
    assert parse_http_response(ok) == b"hello"
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
    assert parse_http_response(chunked) == b"hello"
    with pytest.raises(FetchError, match="HTTP status 301"):
        parse_http_response(b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n")
    with pytest.raises(FetchError, match="not text/plain"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nx")
    with pytest.raises(FetchError, match="truncated"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")


# -- a policy host ----------------------------------------------------------------------------
class PolicyServer:
    """HTTPS server on 127.0.0.1 serving /.well-known/mta-sts.txt with a
    trustme certificate for mta-sts.<domain>."""

    def __init__(self, certs, domain="example.test", text=POLICY):
        self.text = text
        self.status = 200
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Host")))
                body = server.text.encode()
                if server.status != 200 or self.path != "/.well-known/mta-sts.txt":
                    self.send_response(server.status if server.status != 200 else 404)
                    self.send_header("Location", "https://elsewhere.test/")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certs.ca.issue_cert(f"mta-sts.{domain}").configure_cert(ctx)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def policy_server(certs):
    s = PolicyServer(certs)
    yield s
    s.close()


def publish(dns_server, pid="1", domain="example"):
    dns_server.remove(f"_mta-sts.{domain}.test", "TXT")
    dns_server.add(f'_mta-sts.{domain}.test. 1 IN TXT "v=STSv1; id={pid}"', ttl=1)
    dns_server.remove(f"mta-sts.{domain}.test", "A")
    dns_server.add(f"mta-sts.{domain}.test. 300 IN A 127.0.0.1")


def resolver(dns_server):
    return Resolver(ResolverSettings.local(dns_server.port), hosts_path=None)


async def test_txt_lookup_through_the_resolver(dns_server):
    publish(dns_server)
    r = resolver(dns_server)
    res = await r.txt("_mta-sts.example.test")
    assert res.ok and res.records == ["v=STSv1; id=1"]
    assert (await r.txt("_mta-sts.amx.test")).status == "NXDOMAIN"
    assert (await r.txt("example.test")).status == "NODATA"


async def test_policy_fetch_and_cache(dns_server, policy_server, certs):
    publish(dns_server)
    notes = []
    sts = MtaSts(resolver(dns_server), port=policy_server.port, notice=notes.append)
    p = await sts.policy("example.test", ca_file=certs.ca_pem)
    assert p.mode == "enforce" and p.mx == ("mx2.example.test",) and p.id == "1"
    assert policy_server.requests == [("/.well-known/mta-sts.txt", "mta-sts.example.test")]
    assert (await sts.policy("Example.Test.", ca_file=certs.ca_pem)) is p      # same id: cached
    assert len(policy_server.requests) == 1
    # a new id refetches
    policy_server.text = POLICY.replace("mx2", "mx1")
    dns_server.remove("_mta-sts.example.test", "TXT")
    dns_server.add('_mta-sts.example.test. 0 IN TXT "v=STSv1; id=2"', ttl=0)
    sts.resolver.flush()
    p2 = await sts.policy("example.test", ca_file=certs.ca_pem)
    assert p2.id == "2" and p2.mx == ("mx1.example.test",)
    # the TXT record goes away: the cached policy still applies (RFC 8461 §5.1)
    dns_server.remove("_mta-sts.example.test", "TXT")
    sts.resolver.flush()
    assert (await sts.policy("example.test", ca_file=certs.ca_pem)) is p2


async def test_untrusted_policy_host_means_no_policy(dns_server, policy_server):
    publish(dns_server)
    notes = []
    sts = MtaSts(resolver(dns_server), port=policy_server.port, notice=notes.append)
    assert await sts.policy("example.test") is None       # system CAs only: not trusted
    assert "policy fetch failed" in notes[-1]
    n = len(policy_server.requests)
    assert await sts.policy("example.test") is None       # failure remembered: no refetch
    assert len(policy_server.requests) == n


async def test_redirect_and_bad_policy_mean_no_policy(dns_server, policy_server, certs):
    publish(dns_server)
    policy_server.status = 302
    sts = MtaSts(resolver(dns_server), port=policy_server.port, notice=lambda t: None)
    assert await sts.policy("example.test", ca_file=certs.ca_pem) is None
    assert len(policy_server.requests) == 1               # the redirect is not followed
    policy_server.status = 200
    policy_server.text = "version: STSv1\nmode: enforce\n"
    publish(dns_server, pid="3")
    sts.resolver.flush()
    assert await sts.policy("example.test", ca_file=certs.ca_pem) is None


async def test_no_txt_record_means_no_fetch(dns_server, policy_server, certs):
    sts = MtaSts(resolver(dns_server), port=policy_server.port)
    assert await sts.policy("example.test", ca_file=certs.ca_pem) is None
    assert not policy_server.requests


async def test_mode_none_is_no_policy(dns_server, policy_server, certs):
    publish(dns_server)
    policy_server.text = "version: STSv1\nmode: none\nmax_age: 60\n"
    sts = MtaSts(resolver(dns_server), port=policy_server.port)
    assert await sts.policy("example.test", ca_file=certs.ca_pem) is None


# -- end to end -----------------------------------------------------------------------------------
def sts_mta(tmp_path, dns_server, sink, policy_server, certs, extra=""):
    return MTA(tmp_path / "mta", dns_server.resolv_conf, body=(
        f"Remote_SMTP_Port = {sink.port}\nRetry_Interval = 1\nMax_Retry_Interval = 2\n"
        f'MTA_STS_Port = {policy_server.port}\nTLS_CA = "{certs.ca_pem}"\n'
        f'Domain "example.test" {{ Use_MTA_STS = true }}\n{extra}'))


@pytest.mark.integration
def test_enforce_skips_an_mx_outside_the_policy(tmp_path, dns_server, smtp_sinks, policy_server, certs):
    publish(dns_server)                                   # policy: mx2.example.test only
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls=True)
    with sts_mta(tmp_path, dns_server, sink, policy_server, certs) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
        m.mainlog.wait_for("D")
    assert msg["sockname"][0] == "127.0.0.3"              # mx1 (preferred) is not allowed
    assert msg["tls"] is not None                         # enforce: TLS required + verified
    assert all(s["sockname"][0] == "127.0.0.3" for s in sink.sessions)
    panic = "\n".join(m.paniclog.lines())
    assert "does not allow mx1.example.test; not used" in panic


@pytest.mark.integration
def test_enforce_with_no_allowed_mx_is_transient(tmp_path, dns_server, smtp_sinks, policy_server, certs):
    publish(dns_server)
    policy_server.text = POLICY.replace("mx2.example.test", "*.elsewhere.test")
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"), tls=True)
    with sts_mta(tmp_path, dns_server, sink, policy_server, certs) as m:
        m.send("alice@src.test", ["bob@example.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[-1] == "451 4.7.5 [internal] no MX host is allowed by the MTA-STS policy"
    assert not sink.sessions


@pytest.mark.integration
def test_enforce_requires_starttls(tmp_path, dns_server, smtp_sinks, policy_server, certs):
    publish(dns_server)
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))          # no STARTTLS
    with sts_mta(tmp_path, dns_server, sink, policy_server, certs) as m:
        m.send("alice@src.test", ["bob@example.test"])
        t = m.mainlog.wait_for("T")[0]
    assert t[-1] == "451 4.7.6 [internal] STARTTLS required but not advertised"
    assert not sink.messages


@pytest.mark.integration
def test_testing_mode_only_notes(tmp_path, dns_server, smtp_sinks, policy_server, certs):
    publish(dns_server)
    policy_server.text = POLICY.replace("enforce", "testing")
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))          # no STARTTLS: plain text is fine
    with sts_mta(tmp_path, dns_server, sink, policy_server, certs) as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2" and msg["tls"] is None
    assert "used anyway (testing)" in "\n".join(m.paniclog.lines())


@pytest.mark.integration
def test_enable_mta_sts_false_ignores_the_policy(tmp_path, dns_server, smtp_sinks, policy_server, certs):
    publish(dns_server)
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with sts_mta(tmp_path, dns_server, sink, policy_server, certs, "Enable_MTA_STS = false") as m:
        m.send("alice@src.test", ["bob@example.test"])
        [msg] = sink.wait_for(1)
    assert msg["sockname"][0] == "127.0.0.2"
    assert not policy_server.requests
