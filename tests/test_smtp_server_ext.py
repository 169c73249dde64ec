"""Sans-I/O core: STARTTLS, AUTH PLAIN/LOGIN, XCLIENT (no sockets)."""
import base64

import pytest

from impetus.smtp.reply import Reply
from impetus.smtp.server import (
    AuthCheck,
    Close,
    MessageReady,
    Policy,
    Send,
    ServerConnection,
    ServerSettings,
    StartTLS,
    xtext_decode,
    xtext_encode,
)

OK = Reply(250, "2.0.0", "Ok: queued")
TLS_INFO = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": 256,
            "peer_cert": False, "peer_subject": None, "verified": False}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthPolicy(Policy):
    """alice/secret is valid; records calls and rejects."""

    def __init__(self, trusted=(), users=None):
        self.users = users or {"alice": "s3cret pw"}
        self.calls = []
        self.rejects = []
        self.trusted = set(trusted)
        self.xclient_seen = []

    def check_auth(self, session, mechanism, username, password):
        self.calls.append((mechanism, username))
        return self.users.get(username) == password

    def allow_xclient(self, session):
        return session.peer_ip in self.trusted

    def on_xclient(self, session):
        self.xclient_seen.append((session.peer_ip, session.xclient_name))
        return None

    def on_reject(self, session, reply, phase):
        self.rejects.append((reply.code, phase, str(reply)))


class Driver:
    """Feeds a ServerConnection; answers messages with OK and StartTLS with
    tls_started() (unless ``manual_tls``)."""

    def __init__(self, settings=None, policy=None, peer="192.0.2.1", tls=False, manual_tls=False):
        self.conn = ServerConnection(settings or ServerSettings(hostname="mx.test"), policy)
        self.conn.session.peer_ip = peer
        self.conn.session.peer_port = 40000
        if tls:
            self.conn.session.set_tls(TLS_INFO)
        self.manual_tls = manual_tls
        self.out = b""
        self.messages = []
        self.closed = None
        self.starttls = 0
        self.auth_checks = []
        self._handle(self.conn.start())

    def _handle(self, events):
        while events:
            nxt = []
            assert len([e for e in events if isinstance(e, Send)]) <= 1
            for ev in events:
                if isinstance(ev, Send):
                    self.out += ev.data
                elif isinstance(ev, MessageReady):
                    self.messages.append(ev.envelope)
                    nxt = self.conn.message_done(OK)
                elif isinstance(ev, Close):
                    self.closed = ev.reason
                elif isinstance(ev, StartTLS):
                    self.starttls += 1
                    if not self.manual_tls:
                        nxt = self.conn.tls_started(TLS_INFO)
                elif isinstance(ev, AuthCheck):
                    self.auth_checks.append(ev.awaitable)
            events = nxt

    def feed(self, data):
        start = len(self.out)
        self._handle(self.conn.feed(data))
        return self.out[start:]

    def call(self, events):
        start = len(self.out)
        self._handle(events)
        return self.out[start:]


def codes(data: bytes):
    return [ln[:3] for ln in data.decode().split("\r\n") if len(ln) >= 4 and ln[3] == " "]


TLS = ServerSettings(hostname="mx.test", starttls=True)
AUTH = ServerSettings(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN"))


# ---------------------------------------------------------------------------
# STARTTLS
# ---------------------------------------------------------------------------


def test_defaults_unchanged_no_starttls_auth_xclient():
    d = Driver()
    ehlo = d.feed(b"EHLO c\r\n")
    assert b"STARTTLS" not in ehlo and b"AUTH" not in ehlo and b"XCLIENT" not in ehlo
    assert d.feed(b"STARTTLS\r\n") == b"502 5.5.1 command not implemented\r\n"
    assert d.feed(b"AUTH PLAIN AGEAYg==\r\n") == b"502 5.5.1 command not implemented\r\n"
    assert d.feed(b"XCLIENT ADDR=1.2.3.4\r\n") == b"502 5.5.1 command not implemented\r\n"
    assert d.starttls == 0


def test_starttls_advertised_only_before_tls():
    d = Driver(TLS)
    assert d.feed(b"EHLO c\r\n").endswith(b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
    d = Driver(ServerSettings(hostname="mx.test", tls_context=object()))
    assert b"250 STARTTLS\r\n" in d.feed(b"EHLO c\r\n")
    d = Driver(TLS, tls=True)   # implicit TLS
    assert b"STARTTLS" not in d.feed(b"EHLO c\r\n")
    assert d.feed(b"STARTTLS\r\n") == b"503 5.5.1 TLS already active\r\n"


def test_starttls_event_and_session_reset():
    d = Driver(AUTH, manual_tls=True)
    d.feed(b"EHLO client.example\r\n")
    events = d.conn.feed(b"STARTTLS\r\n")
    assert events == [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert d.conn.state == "starttls"
    assert d.conn.tls_started(TLS_INFO) == []
    sess = d.conn.session
    assert sess.tls and sess.tls_info["version"] == "TLSv1.3" and not sess.tls_peer_verified
    assert sess.helo == "" and d.conn.state == "greeted"
    # the client must EHLO again; now STARTTLS is gone and AUTH is offered
    ehlo = d.feed(b"EHLO client.example\r\n")
    assert b"STARTTLS" not in ehlo and b"250-AUTH PLAIN LOGIN\r\n" in ehlo.replace(b"250 AUTH", b"250-AUTH")
    assert d.feed(b"STARTTLS\r\n") == b"503 5.5.1 TLS already active\r\n"


def test_starttls_injection_is_discarded():
    """CVE-2011-0411 style: commands pipelined behind STARTTLS in the same
    packet (or arriving before the handshake) must never run."""
    d = Driver(ServerSettings(hostname="mx.test", starttls=True, require_helo=True), manual_tls=True)
    out = d.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n")
    assert codes(out) == ["250", "220"]
    assert d.feed(b"DATA\r\nmore plaintext\r\n") == b""     # before the handshake
    sess = d.conn.session
    assert sess.starttls_discarded == len(b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n") + \
        len(b"DATA\r\nmore plaintext\r\n")
    assert d.call(d.conn.tls_started(TLS_INFO)) == b""
    # nothing of the injected transaction survived
    assert d.feed(b"RCPT TO:<v@y.example>\r\n") == b"503 5.5.1 need MAIL command\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == b"503 5.5.1 send HELO/EHLO first\r\n"
    assert codes(d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")) == ["250", "250"]
    assert sess.transactions == 1


def test_starttls_partial_line_before_upgrade_discarded():
    d = Driver(TLS, manual_tls=True)
    d.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil")
    d.call(d.conn.tls_started(TLS_INFO))
    # the half line is gone: this is a fresh command, not "MAIL FROM:<evilNOOP"
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_starttls_errors():
    d = Driver(TLS)
    assert d.feed(b"STARTTLS now\r\n") == b"501 5.5.4 Syntax: STARTTLS\r\n"
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"STARTTLS\r\n") == b"503 5.5.1 MAIL transaction in progress\r\n"
    d.feed(b"RSET\r\n")
    d.conn.tls_available = False
    p = AuthPolicy()
    d2 = Driver(TLS, p)
    d2.conn.tls_available = False
    assert d2.feed(b"STARTTLS\r\n") == b"454 4.7.0 TLS not available due to temporary reason\r\n"
    assert p.rejects == [(454, "tls", "454 4.7.0 TLS not available due to temporary reason")]
    with pytest.raises(RuntimeError):
        d2.conn.tls_started(TLS_INFO)


def test_starttls_forgets_auth():
    s = ServerSettings(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",), auth_without_tls=True)
    p = AuthPolicy()
    d = Driver(s, p)
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0s3cret pw") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    d.feed(b"STARTTLS\r\n")
    assert d.conn.session.authenticated is None


def test_timeout_while_waiting_for_tls():
    d = Driver(TLS, manual_tls=True)
    d.feed(b"STARTTLS\r\n")
    assert d.conn.timeout()[-1] == Close("timeout")


# ---------------------------------------------------------------------------
# AUTH
# ---------------------------------------------------------------------------


def authed_driver(settings=AUTH, policy=None, **kw):
    d = Driver(settings, policy or AuthPolicy(), tls=True, **kw)
    d.feed(b"EHLO c\r\n")
    return d


def test_auth_advertised_only_after_tls():
    d = Driver(AUTH, AuthPolicy())
    assert b"AUTH" not in d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0s3cret pw") + b"\r\n") == \
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    d.feed(b"STARTTLS\r\n")
    assert b"250 AUTH PLAIN LOGIN\r\n" in d.feed(b"EHLO c\r\n")
    for s in (ServerSettings(hostname="h", auth_mechanisms=("LOGIN",), auth_without_tls=True),
              ServerSettings(hostname="h", auth_mechanisms=("LOGIN",), require_tls_for_auth=False)):
        assert b"250 AUTH LOGIN\r\n" in Driver(s).feed(b"EHLO c\r\n")


def test_auth_plain_initial_response():
    p = AuthPolicy()
    d = authed_driver(policy=p)
    out = d.feed(b"AUTH PLAIN " + b64(b"\0alice\0s3cret pw") + b"\r\n")
    assert out == b"235 2.7.0 Authentication successful\r\n"
    sess = d.conn.session
    assert sess.authenticated == "alice" and sess.auth_mechanism == "PLAIN"
    assert p.calls == [("PLAIN", "alice")]
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0s3cret pw") + b"\r\n") == b"503 5.5.1 Already authenticated\r\n"
    # the AUTH= MAIL parameter is accepted once AUTH is on
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=<>\r\n") == b"250 2.1.0 Ok\r\n"


def test_auth_plain_challenge_and_authzid():
    d = authed_driver()
    assert d.feed(b"AUTH plain\r\n") == b"334 \r\n"
    assert d.conn.state == "auth"
    assert d.feed(b64(b"alice\0alice\0s3cret pw") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    d = authed_driver()
    # authorization identity different from the login: refused
    assert d.feed(b"AUTH PLAIN " + b64(b"bob\0alice\0s3cret pw") + b"\r\n") == \
        b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.conn.session.authenticated is None


def test_auth_login_dance():
    p = AuthPolicy()
    d = authed_driver(policy=p)
    assert d.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert d.feed(b64(b"alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert d.feed(b64(b"s3cret pw") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert p.calls == [("LOGIN", "alice")]
    # LOGIN with the user name as initial response (what smtplib sends)
    d = authed_driver()
    assert d.feed(b"AUTH LOGIN " + b64(b"alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert d.feed(b64(b"wrong") + b"\r\n") == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.conn.session.auth_failures == 1


def test_auth_pipelined_in_one_feed():
    d = authed_driver()
    out = d.feed(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"s3cret pw") + b"\r\nNOOP\r\n")
    assert out == b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("script", [
    [b"AUTH PLAIN *"],
    [b"AUTH PLAIN", b"*"],
    [b"AUTH LOGIN", b"*"],
    [b"AUTH LOGIN", b64(b"alice"), b"*"],
])
def test_auth_cancel(script):
    p = AuthPolicy()
    d = authed_driver(policy=p)
    out = b""
    for line in script:
        out = d.feed(line + b"\r\n")
    assert out == b"501 5.7.0 Authentication aborted\r\n"
    assert p.calls == [] and d.conn.session.authenticated is None
    assert d.conn.state == "ready" and d.conn.session.auth_failures == 0
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("script", [
    [b"AUTH PLAIN AGFsaWNl!"],
    [b"AUTH PLAIN", b"not base64"],
    [b"AUTH LOGIN", b"YWxpY2U"],        # bad padding
    [b"AUTH LOGIN", b64(b"alice"), b"\xff\xfe"],
])
def test_auth_bad_base64(script):
    d = authed_driver()
    for line in script:
        out = d.feed(line + b"\r\n")
    assert out == b"501 5.5.2 Cannot decode response\r\n"
    assert d.conn.state == "ready"


def test_auth_sequence_errors():
    d = Driver(AUTH, AuthPolicy(), tls=True)
    assert d.feed(b"AUTH PLAIN\r\n") == b"503 5.5.1 send EHLO first\r\n"
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH\r\n") == b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
    assert d.feed(b"AUTH CRAM-MD5\r\n") == b"504 5.5.4 Unrecognized authentication type\r\n"
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"AUTH PLAIN =\r\n") == b"503 5.5.1 MAIL transaction in progress\r\n"


def test_auth_failure_limit_closes():
    p = AuthPolicy()
    d = authed_driver(policy=p)
    bad = b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n"
    assert d.feed(bad) == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.feed(bad) == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.feed(bad + b"NOOP\r\n") == (b"535 5.7.8 Authentication credentials invalid\r\n"
                                         b"421 4.7.0 mx.test too many authentication failures\r\n")
    assert d.closed == "too many auth failures"
    assert [r[:2] for r in p.rejects] == [(535, "auth")] * 3 + [(421, "auth")]
    # the password never shows up anywhere
    assert not any("nope" in r[2] for r in p.rejects)
    assert b"nope" not in d.out


def test_auth_empty_or_malformed_credentials_fail_without_policy_call():
    p = AuthPolicy()
    d = authed_driver(policy=p)
    assert d.feed(b"AUTH PLAIN =\r\n") == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.feed(b"AUTH PLAIN " + b64(b"no-nuls") + b"\r\n") == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert p.calls == []


def test_auth_policy_exception_and_reply():
    class P(Policy):
        def __init__(self):
            self.n = 0

        def check_auth(self, session, mechanism, username, password):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("backend down")
            return Reply(454, "4.7.0", "Temporary authentication failure")

    d = authed_driver(policy=P())
    cmd = b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n"
    assert d.feed(cmd) == b"454 4.7.0 Temporary authentication failure\r\n"
    assert d.feed(cmd) == b"454 4.7.0 Temporary authentication failure\r\n"
    assert d.conn.session.auth_failures == 0  # temporary failures do not count


def test_auth_default_policy_denies():
    d = Driver(AUTH, None, tls=True)
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0s3cret pw") + b"\r\n") == \
        b"535 5.7.8 Authentication credentials invalid\r\n"


def test_auth_async_check():
    class P(Policy):
        async def check_auth(self, session, mechanism, username, password):
            return password == "pw"

    d = authed_driver(policy=P())
    out = d.feed(b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\nNOOP\r\n")
    assert out == b"" and d.conn.state == "auth_wait" and len(d.auth_checks) == 1
    assert d.feed(b"NOOP\r\n") == b""      # buffered meanwhile
    d.auth_checks[0].close()                 # (never awaited in this test)
    assert d.call(d.conn.auth_done(True)) == (b"235 2.7.0 Authentication successful\r\n"
                                              b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")
    assert d.conn.session.authenticated == "alice"
    with pytest.raises(RuntimeError):
        d.conn.auth_done(True)


def test_auth_unknown_mechanism_setting():
    with pytest.raises(ValueError):
        ServerConnection(ServerSettings(hostname="x", auth_mechanisms=("CRAM-MD5",)))


def test_auth_line_too_long_cancels_exchange():
    s = ServerSettings(hostname="mx.test", auth_mechanisms=("PLAIN",), max_line_length=64)
    d = Driver(s, AuthPolicy(), tls=True)
    d.feed(b"EHLO c\r\nAUTH PLAIN\r\n")
    assert d.feed(b"A" * 200 + b"\r\n") == b"500 5.5.2 line too long\r\n"
    assert d.conn.state == "ready"


# ---------------------------------------------------------------------------
# XCLIENT
# ---------------------------------------------------------------------------

XC = ServerSettings(hostname="mx.test", xclient_allowed=True)


def test_xclient_advertised_and_applied():
    d = Driver(XC)
    assert d.feed(b"EHLO proxy\r\n").endswith(b"250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n")
    d.conn.session.extra["can_relay"] = True
    out = d.feed(b"XCLIENT NAME=client.example.net ADDR=203.0.113.7 PORT=4242 HELO=orig+2Ehelo"
                 b" PROTO=ESMTP LOGIN=bob\r\n")
    assert out == b"220 mx.test ESMTP Impetus\r\n"
    s = d.conn.session
    assert (s.peer_ip, s.peer_port, s.xclient_name, s.helo, s.protocol) == (
        "203.0.113.7", 4242, "client.example.net", "orig.helo", "esmtp")
    assert s.authenticated == "bob" and s.auth_mechanism == "XCLIENT"
    assert (s.proxy_ip, s.proxy_port) == ("192.0.2.1", 40000)
    assert s.xclient == {"NAME": "client.example.net", "ADDR": "203.0.113.7", "PORT": "4242",
                         "HELO": "orig.helo", "PROTO": "ESMTP", "LOGIN": "bob"}
    assert s.extra == {}                                   # derived facts are forgotten
    assert d.conn.state == "greeted"
    # The proxy's EHLO does not replace the original client's HELO name.
    d.feed(b"EHLO proxy\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n")
    assert d.messages[0].helo == "orig.helo" and s.helo == "orig.helo"


def test_xclient_requires_new_ehlo_with_require_helo():
    s = ServerSettings(hostname="mx.test", xclient_allowed=True, require_helo=True)
    d = Driver(s)
    d.feed(b"EHLO proxy\r\n")
    out = d.feed(b"XCLIENT ADDR=198.51.100.1\r\nMAIL FROM:<a@b.example>\r\n")
    assert out == b"220 mx.test ESMTP Impetus\r\n503 5.5.1 send HELO/EHLO first\r\n"
    assert d.conn.session.helo == ""
    d.feed(b"EHLO real\r\n")
    assert d.conn.session.helo == "real"


def test_xclient_attribute_decoding():
    d = Driver(XC)
    d.feed(b"XCLIENT ADDR=IPV6:2001:DB8::1 NAME=[TEMPUNAVAIL] PORT=[UNAVAILABLE] HELO=[UNAVAILABLE]"
           b" LOGIN=[UNAVAILABLE] PROTO=smtp\r\n")
    s = d.conn.session
    assert (s.peer_ip, s.peer_port, s.xclient_name, s.helo, s.authenticated, s.protocol) == (
        "2001:db8::1", 0, None, "", None, "smtp")
    assert d.feed(b"XCLIENT ADDR=[UNAVAILABLE] NAME=mail.example LOGIN=j+C3+B6rg+2Bx+3Dy\r\n") == \
        b"220 mx.test ESMTP Impetus\r\n"
    assert (s.peer_ip, s.xclient_name, s.authenticated) == ("", "mail.example", "j\u00f6rg+x=y")
    assert s.xclient["NAME"] == "mail.example" and s.xclient["ADDR"] == "[UNAVAILABLE]"
    d.feed(b"XCLIENT ADDR=2001:db8::2\r\n")       # bare IPv6 is tolerated
    assert s.peer_ip == "2001:db8::2"


@pytest.mark.parametrize("arg,reply", [
    (b"", b"501 5.5.4 Syntax: XCLIENT attribute=value ...\r\n"),
    (b"ADDR", b"501 5.5.4 Syntax: XCLIENT attribute=value ...\r\n"),
    (b"ADDR=", b"501 5.5.4 Syntax: XCLIENT attribute=value ...\r\n"),
    (b"FOO=1", b"501 5.5.4 Bad XCLIENT attribute name: FOO\r\n"),
    (b"ADDR=999.1.1.1", b"501 5.5.4 Bad ADDR syntax\r\n"),
    (b"ADDR=IPV6:1.2.3.4", b"501 5.5.4 Bad ADDR syntax\r\n"),
    (b"PORT=65536", b"501 5.5.4 Bad PORT syntax\r\n"),
    (b"PORT=-1", b"501 5.5.4 Bad PORT syntax\r\n"),
    (b"PROTO=LMTP", b"501 5.5.4 Bad PROTO syntax\r\n"),
    (b"NAME=bad_host+0A", b"501 5.5.4 Bad NAME syntax\r\n"),
    (b"HELO=a+2", b"501 5.5.4 Bad HELO syntax\r\n"),
    (b"HELO=a+0D+0Ab", b"501 5.5.4 Bad HELO syntax\r\n"),
    (b"LOGIN=x+00y", b"501 5.5.4 Bad LOGIN syntax\r\n"),
    (b"NAME=" + b"a" * 256, b"501 5.5.4 Bad NAME syntax\r\n"),
])
def test_xclient_bad_syntax(arg, reply):
    d = Driver(XC)
    before = (d.conn.session.peer_ip, d.conn.session.xclient)
    assert d.feed(b"XCLIENT " + arg + b"\r\n") == reply
    assert (d.conn.session.peer_ip, d.conn.session.xclient) == before


def test_xclient_untrusted_and_in_transaction():
    p = AuthPolicy(trusted={"10.0.0.9"})
    d = Driver(ServerSettings(hostname="mx.test"), p, peer="192.0.2.1")
    assert b"XCLIENT" not in d.feed(b"EHLO c\r\n")
    assert d.feed(b"XCLIENT ADDR=127.0.0.1\r\n") == b"550 5.7.0 Insufficient authorization\r\n"
    assert p.rejects == [(550, "xclient", "550 5.7.0 Insufficient authorization")]
    assert d.conn.session.peer_ip == "192.0.2.1"
    d = Driver(ServerSettings(hostname="mx.test"), p, peer="10.0.0.9")
    assert b"250 XCLIENT NAME" in d.feed(b"EHLO c\r\n")
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"XCLIENT ADDR=127.0.0.1\r\n") == b"503 5.5.1 MAIL transaction in progress\r\n"
    d.feed(b"RSET\r\n")
    assert d.feed(b"XCLIENT ADDR=198.51.100.5 NAME=n.example\r\n") == b"220 mx.test ESMTP Impetus\r\n"
    assert p.xclient_seen == [("198.51.100.5", "n.example")]
    # Trust is the real peer's: a second XCLIENT (next message) is still allowed.
    assert d.feed(b"XCLIENT ADDR=198.51.100.6\r\n") == b"220 mx.test ESMTP Impetus\r\n"
    assert d.conn.session.proxy_ip == "10.0.0.9" and d.conn.session.peer_ip == "198.51.100.6"


def test_xclient_on_xclient_refusal_closes():
    class P(Policy):
        def allow_xclient(self, session):
            return True

        def on_xclient(self, session):
            return Reply(554, "5.7.1", "you are blocked") if session.peer_ip == "192.0.2.66" else None

    d = Driver(ServerSettings(hostname="mx.test"), P())
    assert d.feed(b"XCLIENT ADDR=192.0.2.66\r\nNOOP\r\n") == b"554 5.7.1 you are blocked\r\n"
    assert d.closed == "rejected"


def test_xclient_policy_without_hook_is_not_enabled():
    class P(Policy):
        pass

    d = Driver(ServerSettings(hostname="mx.test"), P())
    assert d.feed(b"XCLIENT ADDR=1.2.3.4\r\n") == b"502 5.5.1 command not implemented\r\n"


def test_xtext_roundtrip():
    for text in ("plain", "a+b=c", "sp ace", "h\u00e9", "[UNAVAILABLE]"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_decode("a+2") is None and xtext_decode("a+zz") is None and xtext_decode("a=b") is None
    assert xtext_decode("a+3d") is None  # hex digits are upper case


# ---------------------------------------------------------------------------
# Limits and refusal
# ---------------------------------------------------------------------------


def test_refuse_instead_of_banner():
    p = AuthPolicy()
    conn = ServerConnection(ServerSettings(hostname="mx.test"), p)
    r = Reply(421, "4.4.5", "Service unavailable, concurrency limit reached")
    assert conn.refuse(r, "concurrency limit") == [
        Send(b"421 4.4.5 Service unavailable, concurrency limit reached\r\n"), Close("concurrency limit")]
    assert p.rejects == [(421, "connect", str(r))]
    with pytest.raises(RuntimeError):
        conn.refuse(r)


def test_max_recipients_per_message_452():
    d = Driver(ServerSettings(hostname="h", max_recipients=1))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\n")
    assert out.endswith(b"452 4.5.3 too many recipients\r\n")
