"""Property tests: arbitrary input never raises anything undocumented."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impetus.smtp.address import AddressError, parse_params, parse_path, split_argument
from impetus.smtp.client import ProtocolError, ReplyParser, dot_stuff
from impetus.smtp.reply import Reply
from impetus.smtp.server import Close, MessageReady, Send, ServerConnection, ServerSettings

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that steer random input into interesting states.
FRAGMENTS = [
    b"EHLO x\r\n", b"HELO x\r\n", b"LHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"RCPT TO:<bad\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"..",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"\n.\n", b"\r", b"\n", b"\x00", b"\xff", b"SIZE=99999 ",
    b"MAIL FROM:<x@y.example> SIZE=5\r\n", b"x" * 300,
]
chunks = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(FRAGMENTS)), max_size=40)


def run_server(parts, settings_):
    conn = ServerConnection(settings_)
    out = []
    for part in [None] + list(parts):
        events = conn.start() if part is None else conn.feed(part)
        while events:
            ev = events.pop(0)
            assert isinstance(ev, (Send, MessageReady, Close))
            if isinstance(ev, Send):
                out.append(ev.data)
            elif isinstance(ev, MessageReady):
                body = ev.envelope.body
                assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
                assert not body or body.endswith(b"\r\n")
                events += conn.message_done(Reply(250, "2.0.0", "ok"))
    return b"".join(out)


@FAST
@given(chunks, st.booleans(), st.sampled_from([0, 50]), st.sampled_from([2048, 16]))
def test_server_feed_never_raises(parts, lmtp, maxsize, maxline):
    s = ServerSettings(hostname="h", lmtp=lmtp, max_message_size=maxsize, max_line_length=maxline)
    out = run_server(parts, s)
    # every reply line is well formed
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-", b"")


@FAST
@given(chunks)
def test_server_output_independent_of_chunking(parts):
    s = ServerSettings(hostname="h", max_message_size=100, max_line_length=40)
    data = b"".join(parts)
    whole = run_server([data], s)
    single = run_server([data[i:i + 1] for i in range(len(data))], s)
    assert whole == single


@FAST
@given(st.binary(max_size=300))
def test_reply_parser_only_protocol_error(data):
    p = ReplyParser()
    try:
        for r in p.feed(data):
            assert isinstance(r, Reply)
    except ProtocolError:
        pass


@FAST
@given(st.lists(st.sampled_from([b"250", b"-", b" ", b"2.1.0", b"ok", b"\r\n", b"\n", b"550", b"x"]),
                max_size=30))
def test_reply_parser_structured(parts):
    try:
        ReplyParser().feed(b"".join(parts))
    except ProtocolError:
        pass


@FAST
@given(st.text(max_size=80), st.booleans())
def test_address_parsing_only_address_error(text, utf8):
    for fn in (lambda t: parse_path(t, smtputf8=utf8), lambda t: parse_path("<" + t + ">"),
               lambda t: parse_params(t, smtputf8=utf8), split_argument):
        try:
            fn(text)
        except AddressError:
            pass


@FAST
@given(st.binary(max_size=200))
def test_dot_stuff_never_contains_early_end_marker(body):
    wire = dot_stuff(body)
    assert wire.endswith(b".\r\n")
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3


# -- STARTTLS / AUTH / XCLIENT ------------------------------------------------

from impetus.smtp.server import AuthCheck, Policy, StartTLS  # noqa: E402

EXT_FRAGMENTS = FRAGMENTS + [
    b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH PLAIN AGEAYg==\r\n",
    b"AUTH LOGIN YQ==\r\n", b"AUTH PLAIN =\r\n", b"*\r\n", b"AGEAYg==\r\n", b"YQ==\r\n", b"====\r\n",
    b"AUTH CRAM-MD5\r\n", b"XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]\r\n", b"XCLIENT HELO=a+2\r\n",
    b"XCLIENT ADDR=IPV6:::1 LOGIN=a PORT=70000\r\n", b"XCLIENT PROTO=ESMTP HELO=h+41\r\n", b"+", b"=",
]
ext_chunks = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(EXT_FRAGMENTS)), max_size=40)


class FuzzPolicy(Policy):
    def __init__(self, trusted, async_auth):
        self.trusted = trusted
        self.async_auth = async_auth

    def check_auth(self, session, mechanism, username, password):
        ok = username == "a" and password == "b"
        if self.async_auth:
            async def later():
                return ok
            return later()
        return ok

    def allow_xclient(self, session):
        return self.trusted


@FAST
@given(ext_chunks, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([2048, 24]))
def test_server_with_tls_auth_xclient_never_raises(parts, plaintext_auth, trusted, async_auth, lmtp, maxline):
    s = ServerSettings(hostname="h", lmtp=lmtp, starttls=True, auth_mechanisms=("PLAIN", "LOGIN"),
                       auth_without_tls=plaintext_auth, max_line_length=maxline)
    conn = ServerConnection(s, FuzzPolicy(trusted, async_auth))
    out = []
    for part in [None] + list(parts):
        events = conn.start() if part is None else conn.feed(part)
        while events:
            ev = events.pop(0)
            assert isinstance(ev, (Send, MessageReady, Close, StartTLS, AuthCheck))
            if isinstance(ev, Send):
                out.append(ev.data)
            elif isinstance(ev, MessageReady):
                events += conn.message_done(Reply(250, "2.0.0", "ok"))
            elif isinstance(ev, StartTLS):
                assert conn.state == "starttls"
                events += conn.tls_started({"version": "TLSv1.3"})
                assert conn.session.tls and conn.state in ("greeted", "ready") or conn.closed
            elif isinstance(ev, AuthCheck):
                try:
                    ev.awaitable.send(None)
                except StopIteration as stop:
                    events += conn.auth_done(stop.value)
    data = b"".join(out)
    for line in data.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-", b"")
    assert b"\x00" not in data


@FAST
@given(ext_chunks)
def test_auth_xclient_output_independent_of_chunking(parts):
    s = ServerSettings(hostname="h", auth_mechanisms=("PLAIN", "LOGIN"), auth_without_tls=True,
                       xclient_allowed=True, max_line_length=40)
    data = b"".join(parts)

    def run(pieces):
        conn = ServerConnection(s, FuzzPolicy(True, False))
        out = []
        for part in [None] + pieces:
            events = conn.start() if part is None else conn.feed(part)
            while events:
                ev = events.pop(0)
                if isinstance(ev, Send):
                    out.append(ev.data)
                elif isinstance(ev, MessageReady):
                    events += conn.message_done(Reply(250, "2.0.0", "ok"))
        return b"".join(out)

    assert run([data]) == run([data[i:i + 1] for i in range(len(data))])
