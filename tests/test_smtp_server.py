"""Unit tests of the sans-I/O server core (no sockets)."""
import pytest

from impetus.smtp.reply import Reply
from impetus.smtp.server import (
    Close,
    MessageReady,
    Policy,
    Send,
    ServerConnection,
    ServerSettings,
)

OK = Reply(250, "2.0.0", "Ok: queued")


class Driver:
    """Feeds a ServerConnection, answers every message with ``reply``."""

    def __init__(self, settings=None, policy=None, reply=OK):
        self.conn = ServerConnection(settings or ServerSettings(hostname="mx.test"), policy)
        self.reply = reply
        self.out = b""
        self.messages = []
        self.closed = None
        self._handle(self.conn.start())

    def _handle(self, events):
        while events:
            nxt = []
            sends = [e for e in events if isinstance(e, Send)]
            assert len(sends) <= 1, "replies of one call must be coalesced"
            for ev in events:
                if isinstance(ev, Send):
                    self.out += ev.data
                elif isinstance(ev, MessageReady):
                    self.messages.append(ev.envelope)
                    r = self.reply(ev.envelope) if callable(self.reply) else self.reply
                    nxt = self.conn.message_done(r)
                elif isinstance(ev, Close):
                    self.closed = ev.reason
            events = nxt

    def feed(self, data):
        start = len(self.out)
        self._handle(self.conn.feed(data))
        return self.out[start:]

    def lines(self):
        return self.out.decode().split("\r\n")[:-1]


def codes(data: bytes):
    """Final reply lines' codes of a reply stream."""
    return [ln[:3] for ln in data.decode().split("\r\n") if len(ln) >= 4 and ln[3] == " "]


SESSION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@example.com> SIZE=100 BODY=8BITMIME\r\n"
    b"RCPT TO:<a@dest.example>\r\n"
    b"RCPT TO:<b@Dest.Example>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<c@dest.example>\r\n"
    b"DATA\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


def test_banner():
    d = Driver()
    assert d.out == b"220 mx.test ESMTP Impetus\r\n"
    assert Driver(ServerSettings(hostname="h", lmtp=True)).out == b"220 h LMTP Impetus\r\n"
    assert Driver(ServerSettings(hostname="h", banner="h Static")).out == b"220 h Static\r\n"


def test_ehlo_advertises_extensions():
    d = Driver(ServerSettings(hostname="mx.test", max_message_size=1000))
    out = d.feed(b"EHLO c\r\n")
    assert out == (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
                   b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n")
    assert d.conn.session.helo == "c" and d.conn.session.protocol == "esmtp"
    assert d.feed(b"HELO c2\r\n") == b"250 mx.test\r\n"
    assert d.conn.session.protocol == "smtp"


def test_full_pipelined_session_in_one_feed():
    d = Driver()
    events = d.conn.feed(SESSION)
    # one Send with all replies up to the first message, then MessageReady
    assert [type(e) for e in events] == [Send, MessageReady]
    env = events[1].envelope
    assert env.mail_from == "sender@example.com"
    assert env.rcpt_to == ["a@dest.example", "b@dest.example"]
    assert env.mail_params == {"SIZE": "100", "BODY": "8BITMIME"}
    assert env.helo == "client.example"
    assert env.body == b"Subject: hi\r\n\r\n.dotted\r\nbody\r\n"
    assert env.size == len(env.body)
    assert env.body_8bit and not env.smtputf8
    # nothing after the end of data is interpreted until message_done
    assert d.conn.feed(b"") == []
    ev2 = d.conn.message_done(OK)
    assert [type(e) for e in ev2] == [Send, MessageReady]
    assert ev2[0].data.startswith(b"250 2.0.0 Ok: queued\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 ")
    env2 = ev2[1].envelope
    assert env2.mail_from == "" and env2.body == b"" and env2.rcpt_to == ["c@dest.example"]
    ev3 = d.conn.message_done(OK)
    assert ev3 == [Send(b"250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"), Close("quit")]
    assert d.conn.close_reason == "quit"


def test_byte_at_a_time_gives_identical_output():
    whole = Driver()
    whole.feed(SESSION)
    single = Driver()
    for i in range(len(SESSION)):
        single.feed(SESSION[i:i + 1])
    assert single.out == whole.out
    assert [m.body for m in single.messages] == [m.body for m in whole.messages]
    assert single.closed == whole.closed == "quit"
    assert codes(whole.out) == ["220", "250", "250", "250", "250", "354", "250",
                                "250", "250", "354", "250", "221"]


def test_chunked_at_every_split_point():
    ref = Driver()
    ref.feed(SESSION)
    for cut in range(1, len(SESSION)):
        d = Driver()
        d.feed(SESSION[:cut])
        d.feed(SESSION[cut:])
        assert d.out == ref.out, cut


def transact(d, body: bytes, rcpts=(b"a@b.example",)):
    d.feed(b"EHLO c\r\nMAIL FROM:<s@x.example>\r\n")
    for r in rcpts:
        d.feed(b"RCPT TO:<" + r + b">\r\n")
    d.feed(b"DATA\r\n")
    return d.feed(body)


def test_dot_unstuffing():
    d = Driver()
    transact(d, b"..a\r\n...b\r\n.c\r\nd.\r\n.\r\n")
    assert d.messages[0].body == b".a\r\n..b\r\nc\r\nd.\r\n"


def test_bare_lf_dot_is_not_end_of_data():
    d = Driver()
    out = transact(d, b"line1\n.\nMAIL FROM:<evil@x>\nRCPT TO:<v@y>\nDATA\nsmuggled\n.\nend\r\n.\r\n")
    assert len(d.messages) == 1
    body = d.messages[0].body
    # bare LFs became CRLF; the smuggled lines are content of the one message
    assert body == (b"line1\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n"
                    b"smuggled\r\n.\r\nend\r\n")
    assert codes(out) == ["250"]


def test_bare_cr_and_mixed_endings_normalised():
    d = Driver()
    transact(d, b"a\rb\r\r\nc\n\rd\r\n.\r\n")
    assert d.messages[0].body == b"a\r\nb\r\n\r\nc\r\n\r\nd\r\n"
    for variant in (b"x\n.\r\n", b"x\r\n.\n", b"x\r.\r", b"x\n.\n", b"x\r\n.\rx"):
        d = Driver()
        transact(d, variant)
        assert len(d.messages) == 0, variant  # none of these are end markers
        d.feed(b"\r\n.\r\n")
        assert len(d.messages) == 1
        body = d.messages[0].body
        assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


def test_empty_body_and_first_line_dot():
    d = Driver()
    transact(d, b".\r\n")
    assert d.messages[0].body == b""
    d = Driver()
    transact(d, b"\r\n.\r\n")
    assert d.messages[0].body == b"\r\n"
    d = Driver()
    transact(d, b".x\r\n.\r\n")
    assert d.messages[0].body == b"x\r\n"


def test_size_limit_at_mail():
    d = Driver(ServerSettings(hostname="mx.test", max_message_size=1000))
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> SIZE=1001\r\n") == b"552 5.3.4 message size limit exceeded\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> SIZE=1000\r\n") == b"250 2.1.0 Ok\r\n"


def test_size_limit_in_body_not_buffered():
    limit = 10_000
    d = Driver(ServerSettings(hostname="mx.test", max_message_size=limit))
    transact(d, b"")
    chunk = b"x" * 999 + b"\r\n"
    for _ in range(1000):  # ~1 MB
        assert d.feed(chunk) == b""
        assert len(d.conn._buf) <= limit + len(chunk)
    out = d.feed(b".\r\nNOOP\r\n")
    assert out == b"552 5.3.4 message size limit exceeded\r\n250 2.0.0 Ok\r\n"
    assert d.messages == []
    assert d.conn.state == "ready"  # transaction reset
    # exactly at the limit is fine
    d2 = Driver(ServerSettings(hostname="mx.test", max_message_size=limit))
    transact(d2, b"y" * (limit - 2) + b"\r\n.\r\n")
    assert len(d2.messages) == 1 and d2.messages[0].size == limit


def test_size_limit_marker_split_across_feeds_while_discarding():
    d = Driver(ServerSettings(hostname="mx.test", max_message_size=100))
    transact(d, b"")
    d.feed(b"z" * 500 + b"\r")
    d.feed(b"\n")
    d.feed(b".")
    d.feed(b"\r")
    assert d.feed(b"\n") == b"552 5.3.4 message size limit exceeded\r\n"


def test_long_command_line_discarded():
    d = Driver()
    d.feed(b"EHLO c\r\n")
    out = d.feed(b"MAIL FROM:<" + b"a" * (1 << 20))
    assert out == b"500 5.5.2 line too long\r\n"
    assert len(d.conn._buf) == 0
    assert d.feed(b"a" * 100000) == b""
    assert len(d.conn._buf) == 0
    assert d.feed(b"@b>\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n"
    # same result byte at a time and in one piece
    d2 = Driver()
    d2.feed(b"EHLO c\r\n")
    assert d2.feed(b"NOOP " + b"b" * 5000 + b"\r\nNOOP\r\n") == b"500 5.5.2 line too long\r\n250 2.0.0 Ok\r\n"


def test_line_length_boundary():
    s = ServerSettings(hostname="h", max_line_length=20)
    line = b"NOOP " + b"x" * 15  # exactly 20
    for feeder in ("whole", "bytes"):
        d = Driver(s)
        data = line + b"\r\n" + line + b"y\r\n"
        if feeder == "whole":
            d.feed(data)
        else:
            for i in range(len(data)):
                d.feed(data[i:i + 1])
        assert codes(d.out) == ["220", "250", "500"], feeder


def test_nul_in_command():
    d = Driver()
    assert d.feed(b"EHLO c\x00d\r\n") == b"500 5.5.2 NUL character not allowed\r\n"
    assert d.feed(b"\xff\xfe\r\n") == b"500 5.5.2 bad UTF-8 syntax\r\n"


def test_nul_in_body_rejected():
    d = Driver()
    out = transact(d, b"a\x00b\r\n.\r\n")
    assert out == b"554 5.6.0 message content rejected: NUL characters\r\n"
    assert d.messages == []


def test_bad_sequences():
    d = Driver()
    assert d.feed(b"RCPT TO:<a@b.example>\r\n") == b"503 5.5.1 need MAIL command\r\n"
    assert d.feed(b"DATA\r\n") == b"503 5.5.1 need MAIL command\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == b"503 5.5.1 nested MAIL command\r\n"
    assert d.feed(b"DATA\r\n") == b"503 5.5.1 need RCPT command\r\n"
    assert d.feed(b"RCPT TO:<bad>\r\n") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert d.feed(b"DATA\r\n") == b"554 5.5.1 no valid recipients\r\n"
    assert d.feed(b"FOO\r\n") == b"500 5.5.1 command not recognized\r\n"
    assert d.feed(b"EXPN x\r\n") == b"502 5.5.1 command not implemented\r\n"
    assert d.conn.session.errors == 7


def test_syntax_errors():
    d = Driver()
    assert d.feed(b"EHLO\r\n") == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert d.feed(b"MAIL TO:<a@b>\r\n") == b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
    assert d.feed(b"MAIL FROM:<a@>\r\n") == b"501 5.1.7 Bad sender address syntax\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> FOO=1\r\n") == b"555 5.5.4 Unsupported option: FOO\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> SIZE=x\r\n") == b"501 5.5.4 Bad SIZE parameter\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n") == b"501 5.5.4 Bad BODY parameter\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> SIZE\r\n") == b"501 5.5.4 Bad SIZE parameter\r\n"
    assert d.feed(b"mail from: <A@B.example>\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.feed(b"RCPT <x@y>\r\n") == b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
    assert d.feed(b"RCPT TO:<>\r\n") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert d.feed(b"RCPT TO:<x@y.example> NOTIFY=NEVER\r\n") == b"555 5.5.4 Unsupported option: NOTIFY\r\n"
    assert d.feed(b"RCPT TO:<Postmaster>\r\n") == b"250 2.1.5 Ok\r\n"
    assert d.feed(b"DATA x\r\n") == b"501 5.5.4 Syntax: DATA\r\n"
    assert d.feed(b"RSET x\r\n") == b"501 5.5.4 Syntax: RSET\r\n"


def test_smtputf8():
    d = Driver()
    d.feed(b"EHLO c\r\n")
    assert d.feed("MAIL FROM:<ü@bücher.example>\r\n".encode()) == b"501 5.1.7 Bad sender address syntax\r\n"
    assert d.feed("MAIL FROM:<ü@bücher.example> SMTPUTF8\r\n".encode()) == b"250 2.1.0 Ok\r\n"
    assert d.feed("RCPT TO:<用户@例子.example>\r\n".encode()) == b"250 2.1.5 Ok\r\n"
    d.feed(b"DATA\r\n")
    d.feed(".\r\n".encode())
    env = d.messages[0]
    assert env.smtputf8 and env.mail_from == "ü@bücher.example"
    assert env.rcpt_to == ["用户@例子.example"]


def test_vrfy_help_noop():
    d = Driver()
    assert d.feed(b"VRFY bob\r\n") == b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    assert d.feed(b"VRFY\r\n") == b"501 5.5.4 Syntax: VRFY address\r\n"
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    assert d.feed(b"HELP\r\n").startswith(b"214 2.0.0 ")


def test_too_many_errors():
    d = Driver(ServerSettings(hostname="mx.test", max_errors=3))
    out = d.feed(b"X\r\nY\r\nZ\r\nNOOP\r\n")
    assert out == (b"500 5.5.1 command not recognized\r\n" * 3
                   + b"421 4.7.0 mx.test too many errors\r\n")
    assert d.closed == "too many errors"
    assert d.feed(b"NOOP\r\n") == b""


def test_rset_clears_transaction():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n")
    assert d.conn.state == "rcpt"
    assert d.feed(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert d.conn.state == "ready"
    assert d.feed(b"RCPT TO:<x@y.example>\r\n") == b"503 5.5.1 need MAIL command\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == b"250 2.1.0 Ok\r\n"
    # EHLO also resets
    d.feed(b"RCPT TO:<x@y.example>\r\nEHLO again\r\n")
    assert d.conn.state == "ready"


def test_quit_ignores_rest():
    d = Driver()
    out = d.feed(b"QUIT\r\nNOOP\r\n")
    assert out == b"221 2.0.0 Bye\r\n"
    assert d.closed == "quit" and d.conn.closed


def test_lmtp_per_recipient_replies():
    s = ServerSettings(hostname="lmtp.test", lmtp=True)

    def per_rcpt(env):
        return [Reply(250, "2.1.5", f"{r} Ok") if r.startswith("ok") else
                Reply(452, "4.2.2", f"{r} mailbox full") for r in env.rcpt_to]

    d = Driver(s, reply=per_rcpt)
    assert d.feed(b"EHLO x\r\n") == b"500 5.5.1 command not recognized\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == b"503 5.5.1 send LHLO first\r\n"
    assert d.feed(b"LHLO x\r\n").startswith(b"250-lmtp.test\r\n")
    out = d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<ok1@d.example>\r\nRCPT TO:<bad@d.example>\r\n"
                 b"RCPT TO:<ok2@d.example>\r\nDATA\r\nhello\r\n.\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        b"250 2.1.5 ok1@d.example Ok\r\n"
                        b"452 4.2.2 bad@d.example mailbox full\r\n"
                        b"250 2.1.5 ok2@d.example Ok\r\n")
    assert d.conn.session.protocol == "lmtp"
    assert d.conn.session.messages == 1


def test_lmtp_single_reply_repeated_and_wrong_length():
    s = ServerSettings(hostname="l", lmtp=True)
    conn = ServerConnection(s)
    conn.start()
    ev = conn.feed(b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n"
                   b"RCPT TO:<y@d.example>\r\nDATA\r\nhi\r\n.\r\n")
    assert isinstance(ev[-1], MessageReady)
    with pytest.raises(ValueError):
        conn.message_done([OK])
    ev = conn.message_done(Reply(451, "4.3.0", "later"))
    assert ev == [Send(b"451 4.3.0 later\r\n451 4.3.0 later\r\n")]
    with pytest.raises(RuntimeError):
        conn.message_done(OK)


def test_lmtp_size_reject_per_recipient():
    s = ServerSettings(hostname="l", lmtp=True, max_message_size=10)
    d = Driver(s)
    out = d.feed(b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n"
                 b"RCPT TO:<y@d.example>\r\nDATA\r\n" + b"x" * 50 + b"\r\n.\r\n")
    assert out.endswith(b"552 5.3.4 message size limit exceeded\r\n" * 2)


class RecordingPolicy(Policy):
    def __init__(self):
        self.rejects = []

    def check_helo(self, session, name):
        return Reply(550, "5.7.1", "go away") if name == "bad" else None

    def check_mail(self, session, addr, params):
        return Reply(553, "5.7.1", "sender refused") if addr.domain == "spam.example" else None

    def check_rcpt(self, session, addr, params):
        if addr.domain != "ours.example":
            return Reply(554, "5.7.1", f"<{addr}>: Relay access denied")
        return None

    def on_reject(self, session, reply, phase):
        self.rejects.append((reply.code, phase))


def test_policy_hooks():
    p = RecordingPolicy()
    d = Driver(policy=p)
    assert d.feed(b"EHLO bad\r\n") == b"550 5.7.1 go away\r\n"
    assert d.feed(b"EHLO good\r\n").startswith(b"250-")
    assert d.feed(b"MAIL FROM:<x@spam.example>\r\n") == b"553 5.7.1 sender refused\r\n"
    d.feed(b"MAIL FROM:<x@ok.example>\r\n")
    out = d.feed(b"RCPT TO:<a@elsewhere.example>\r\nRCPT TO:<b@ours.example>\r\nDATA\r\nx\r\n.\r\n")
    assert codes(out) == ["554", "250", "354", "250"]
    assert d.messages[0].rcpt_to == ["b@ours.example"]
    assert p.rejects == [(550, "helo"), (553, "mail"), (554, "rcpt")]
    sess = d.conn.session
    assert (sess.recipients, sess.rejected_recipients, sess.messages, sess.transactions) == (1, 1, 1, 1)


def test_connect_refused_by_policy():
    class P:
        def check_connect(self, session):
            return Reply(421, "4.4.5", "Service unavailable, concurrency limit reached")

    conn = ServerConnection(ServerSettings(), P())
    assert conn.start() == [Send(b"421 4.4.5 Service unavailable, concurrency limit reached\r\n"),
                            Close("rejected")]


def test_max_recipients():
    d = Driver(ServerSettings(hostname="h", max_recipients=2))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<x@y.example>\r\n" * 3)
    assert codes(out)[-3:] == ["250", "250", "452"]


def test_max_messages_per_connection():
    d = Driver(ServerSettings(hostname="h", max_messages_per_connection=1))
    transact(d, b"x\r\n.\r\n")
    out = d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert out.startswith(b"421 4.7.0 ")
    assert d.closed == "too many messages"


def test_no_enhanced_codes_when_not_advertised():
    d = Driver(ServerSettings(hostname="h", extensions=("PIPELINING", "8BITMIME")))
    assert d.feed(b"EHLO c\r\n") == b"250-h\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    assert d.feed(b"NOOP\r\n") == b"250 Ok\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n") == b"555 Unsupported option: SMTPUTF8\r\n"


def test_dsn_params_when_advertised():
    d = Driver(ServerSettings(hostname="h", extensions=("PIPELINING", "DSN")))
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> RET=HDRS ENVID=x\r\n") == b"250 Ok\r\n"
    assert d.feed(b"RCPT TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;a@b.example\r\n") == b"250 Ok\r\n"


def test_timeout_and_abort():
    conn = ServerConnection(ServerSettings(hostname="mx.test"))
    conn.start()
    assert conn.timeout() == [Send(b"421 4.4.2 mx.test Error: timeout exceeded\r\n"), Close("timeout")]
    assert conn.timeout() == []
    assert conn.feed(b"NOOP\r\n") == []


def test_feed_before_start_is_processed_after_banner():
    conn = ServerConnection(ServerSettings(hostname="h"))
    assert conn.feed(b"NOOP\r\n") == []
    assert conn.start() == [Send(b"220 h ESMTP Impetus\r\n250 2.0.0 Ok\r\n")]


def test_bare_lf_commands_accepted():
    d = Driver()
    assert codes(d.feed(b"EHLO c\nNOOP\n")) == ["250", "250"]


def test_unqualified_sender_setting():
    d = Driver(ServerSettings(hostname="h", allow_unqualified=True))
    assert d.feed(b"MAIL FROM:<root>\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.feed(b"RCPT TO:<bob>\r\n") == b"250 2.1.5 Ok\r\n"


def test_big_body_in_many_chunks_is_exact():
    body = b"".join(b"line %06d %s\r\n" % (i, b"." * (i % 3)) for i in range(20000))
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    data = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n" + stuffed + b".\r\n"
    d = Driver()
    for i in range(0, len(data), 1371):
        d.feed(data[i:i + 1371])
    assert d.messages[0].body == body
