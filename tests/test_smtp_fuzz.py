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
