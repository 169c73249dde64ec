"""Unit tests of the sans-I/O client pieces."""
import pytest

from impetus.smtp import client
from impetus.smtp.client import (
    Outcome,
    ProtocolError,
    ReplyParser,
    Stage,
    Transaction,
    dot_stuff,
    dot_stuff_chunks,
    no_response_reply,
    parse_ehlo,
)
from impetus.smtp.reply import Reply

EHLO = b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8bitmime\r\n250 AUTH LOGIN PLAIN\r\n"


def test_multiline_split_across_feeds():
    p = ReplyParser()
    out = []
    for i in range(len(EHLO)):
        out += p.feed(EHLO[i:i + 1])
        if i < len(EHLO) - 1:
            assert out == []
            assert p.pending
    assert len(out) == 1 and not p.pending
    r = out[0]
    assert r.code == 250 and r.enhanced is None
    assert r.lines[0] == "mx.example Hello"
    assert parse_ehlo(r) == {"PIPELINING": "", "SIZE": "10240000", "8BITMIME": "", "AUTH": "LOGIN PLAIN"}


def test_several_replies_in_one_feed_and_enhanced_codes():
    p = ReplyParser()
    rs = p.feed(b"250 2.1.0 Ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n354 go ahead\r\n250\r\n451 4.3.0\r\n")
    assert rs == [Reply(250, "2.1.0", "Ok"), Reply(550, "5.1.1", "no such\nuser"),
                  Reply(354, None, "go ahead"), Reply(250, None, ""), Reply(451, "4.3.0", "")]


def test_enhanced_code_class_mismatch_kept_in_text():
    assert ReplyParser().feed(b"550 2.0.0 odd\r\n") == [Reply(550, None, "2.0.0 odd")]


def test_bare_lf_tolerated():
    assert ReplyParser().feed(b"220 hi\n") == [Reply(220, None, "hi")]


@pytest.mark.parametrize("garbage", [
    b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"250x\r\n", b"650 x\r\n", b"\r\n",
    b"250-a\r\n251 b\r\n", b"HTTP/1.1 400 Bad Request\r\n",
])
def test_garbage(garbage):
    p = ReplyParser()
    with pytest.raises(ProtocolError):
        p.feed(garbage)
    with pytest.raises(ProtocolError):  # stays broken
        p.feed(b"250 ok\r\n")


def test_limits():
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250 " + b"x" * 5000)  # no newline yet, already too long
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250 " + b"x" * 5000 + b"\r\n")
    assert ReplyParser().feed(b"250 " + b"x" * 4000 + b"\r\n")[0].code == 250
    # exactly 4096 bytes, fed byte by byte with the CR and LF arriving separately
    p = ReplyParser()
    line = b"250 " + b"y" * 4092 + b"\r\n"
    got = []
    for i in range(len(line)):
        got += p.feed(line[i:i + 1])
    assert len(got) == 1 and len(got[0].text) == 4092
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-x\r\n" * 201)
    assert len(ReplyParser().feed(b"250-x\r\n" * 199 + b"250 y\r\n")[0].lines) == 200


def test_parse_ehlo_edge_cases():
    assert parse_ehlo(Reply(250, None, "mx")) == {}
    assert parse_ehlo(Reply(500, None, "mx\nSIZE")) == {}


def test_encoders():
    assert client.ehlo("me.example") == b"EHLO me.example\r\n"
    assert client.helo("me") == b"HELO me\r\n"
    assert client.lhlo("me") == b"LHLO me\r\n"
    assert client.mail_from("") == b"MAIL FROM:<>\r\n"
    assert client.mail_from("a@b", size=10, body_8bit=True, smtputf8=True) == \
        b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n"
    assert client.mail_from("a@b", params={"RET": "HDRS"}) == b"MAIL FROM:<a@b> RET=HDRS\r\n"
    assert client.rcpt_to("ü@x") == "RCPT TO:<ü@x>\r\n".encode()
    assert client.rcpt_to("a@b", {"NOTIFY": "NEVER"}) == b"RCPT TO:<a@b> NOTIFY=NEVER\r\n"
    assert client.data() == b"DATA\r\n"
    assert client.rset() == b"RSET\r\n"
    assert client.quit() == b"QUIT\r\n"
    assert client.starttls() == b"STARTTLS\r\n"
    assert client.noop() == b"NOOP\r\n"
    with pytest.raises(ValueError):
        client.rcpt_to("a@b>\r\nRCPT TO:<evil@x")
    with pytest.raises(ValueError):
        client.ehlo("x\ry")


def test_xclient():
    assert client.xclient({"NAME": "mail.example", "ADDR": "192.0.2.1", "HELO": None}) == \
        b"XCLIENT NAME=mail.example ADDR=192.0.2.1 HELO=[UNAVAILABLE]\r\n"
    assert client.xtext("a b+c=") == "a+20b+2Bc+3D"


def test_dot_stuff():
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"
    assert dot_stuff(b"a") == b"a\r\n.\r\n"
    assert dot_stuff(b".a\r\n.\r\nb.\r\n..\r\n") == b"..a\r\n..\r\nb.\r\n...\r\n.\r\n"
    # bare LF / CR can never become an end-of-data marker on the wire
    assert dot_stuff(b"x\n.\ny\r.\r") == b"x\r\n..\r\ny\r\n..\r\n.\r\n"
    assert b"".join(dot_stuff_chunks(b"abc\r\n")) == b"abc\r\n.\r\n"


def test_dot_stuff_roundtrip_through_server():
    from impetus.smtp.server import MessageReady, ServerConnection

    body = b".leading\r\nmiddle\r\n.\r\n..\r\nend"
    conn = ServerConnection()
    conn.start()
    ev = conn.feed(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + dot_stuff(body))
    assert isinstance(ev[-1], MessageReady)
    assert ev[-1].envelope.body == body + b"\r\n"


def test_no_response_reply():
    assert str(no_response_reply(Stage.MAIL)) == "451 4.4.2 [internal] no MAIL FROM response"
    assert str(no_response_reply(Stage.BANNER)) == "451 4.4.2 [internal] no banner"
    assert str(no_response_reply(Stage.CONFIRMATION)) == "451 4.4.2 [internal] no BODY response"
    assert int(Stage.EHLO) == 10 and f"{Stage.CONFIRMATION}" == "9"


# -- Transaction ---------------------------------------------------------

R250 = Reply(250, "2.0.0", "Ok")
R354 = Reply(354, None, "go")
R550 = Reply(550, "5.1.1", "no such user")
R451 = Reply(451, "4.3.0", "later")
R554 = Reply(554, "5.5.1", "no valid recipients")
R503 = Reply(503, "5.5.1", "need MAIL")


def drive(tx, replies, body=b"hello\r\n"):
    """Run a transaction against scripted replies; returns all bytes sent."""
    sent = [tx.begin()]
    replies = list(replies)
    stages = []
    while not tx.done:
        if tx.wants_body:
            sent.append(dot_stuff(body))
            tx.body_sent()
            continue
        stages.append(int(tx.stage))
        sent.append(tx.feed(replies.pop(0)))
    assert replies == [], "unused replies"
    return b"".join(sent), stages


@pytest.mark.parametrize("pipelining", [True, False])
def test_all_accepted(pipelining):
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=pipelining, size=7)
    sent, stages = drive(tx, [R250, R250, R250, R354, Reply(250, "2.0.0", "queued")])
    assert sent == (b"MAIL FROM:<s@x> SIZE=7\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
                    b"hello\r\n.\r\n")
    assert stages == [2, 4, 4, 6, 9]
    assert tx.outcomes == [Outcome(Reply(250, "2.0.0", "queued"), Stage.CONFIRMATION)] * 2
    assert tx.accepted == [0, 1] and tx.data_accepted and tx.connection_usable
    assert tx.delivered == ["a@y", "b@y"]


def test_pipelined_group_is_one_write():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    assert tx.begin() == b"MAIL FROM:<s@x>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    assert tx.expected_replies == 4
    tx2 = Transaction("s@x", ["a@y", "b@y"], pipelining=False)
    assert tx2.begin() == b"MAIL FROM:<s@x>\r\n"
    assert tx2.feed(R250) == b"RCPT TO:<a@y>\r\n"
    assert tx2.feed(R250) == b"RCPT TO:<b@y>\r\n"
    assert tx2.feed(R250) == b"DATA\r\n"


@pytest.mark.parametrize("pipelining", [True, False])
def test_some_rejected(pipelining):
    tx = Transaction("s@x", ["a@y", "b@y", "c@y"], pipelining=pipelining)
    final = Reply(250, "2.0.0", "queued")
    sent, stages = drive(tx, [R250, R550, R250, R451, R354, final])
    assert stages == [2, 4, 4, 4, 6, 9]
    assert tx.outcomes == [Outcome(R550, Stage.RCPT), Outcome(final, Stage.CONFIRMATION),
                           Outcome(R451, Stage.RCPT)]
    assert tx.accepted == [1]
    assert tx.delivered == ["b@y"]


def test_all_rejected_pipelined_expects_data_error_then_rset():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    sent, stages = drive(tx, [R250, R550, R550, R554, R250])
    assert sent.endswith(b"DATA\r\nRSET\r\n")  # no body
    assert b"hello" not in sent
    assert stages == [2, 4, 4, 6, 13]
    assert tx.outcomes == [Outcome(R550, Stage.RCPT)] * 2
    assert tx.data_reply == R554 and tx.rset_reply == R250
    assert tx.connection_usable


def test_all_rejected_unpipelined_sends_no_data():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=False)
    sent, stages = drive(tx, [R250, R550, R550, R250])
    assert b"DATA" not in sent and sent.endswith(b"RSET\r\n")
    assert stages == [2, 4, 4, 13]
    assert tx.outcomes == [Outcome(R550, Stage.RCPT)] * 2


def test_all_rejected_but_server_says_354():
    tx = Transaction("s@x", ["a@y"], pipelining=True)
    sent, stages = drive(tx, [R250, R550, R354, R554, R250])
    assert sent.endswith(b"DATA\r\n.\r\nRSET\r\n")
    assert b"hello" not in sent
    assert tx.outcomes == [Outcome(R550, Stage.RCPT)]


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_rejected(pipelining):
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=pipelining)
    replies = [R451, R503, R503, R503] if pipelining else [R451]
    sent, stages = drive(tx, replies)
    assert tx.outcomes == [Outcome(R451, Stage.MAIL)] * 2
    assert b"RSET" not in sent and b"hello" not in sent
    if not pipelining:
        assert sent == b"MAIL FROM:<s@x>\r\n"


def test_data_rejected_then_rset():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    sent, _ = drive(tx, [R250, R250, R550, R451, R250])
    assert sent.endswith(b"DATA\r\nRSET\r\n")
    assert tx.outcomes == [Outcome(R451, Stage.DATA), Outcome(R550, Stage.RCPT)]


def test_final_reply_failure_applies_to_all_accepted():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    bad = Reply(552, "5.3.4", "too big")
    drive(tx, [R250, R250, R250, R354, bad])
    assert tx.outcomes == [Outcome(bad, Stage.CONFIRMATION)] * 2


def test_lmtp_mixed():
    tx = Transaction("s@x", ["a@y", "b@y", "c@y", "d@y"], pipelining=True, lmtp=True)
    ra, rc = Reply(250, "2.1.5", "a ok"), Reply(452, "4.2.2", "c full")
    sent, stages = drive(tx, [R250, R250, R550, R250, R250, R354, ra, rc, Reply(250, "2.1.5", "d ok")])
    assert stages == [2, 4, 4, 4, 4, 6, 9, 9, 9]
    assert tx.outcomes == [Outcome(ra, 9), Outcome(R550, 4), Outcome(rc, 9),
                           Outcome(Reply(250, "2.1.5", "d ok"), 9)]
    assert tx.delivered == ["a@y", "d@y"]
    assert len(tx.final_replies) == 3


def test_421_ends_everything():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    tx.begin()
    tx.feed(R250)
    bye = Reply(421, "4.4.2", "closing")
    assert tx.feed(bye) == b""
    assert tx.done and not tx.connection_usable
    assert tx.outcomes == [Outcome(bye, Stage.RCPT), Outcome(bye, Stage.RCPT)]


def test_abort_on_timeout_uses_current_stage():
    tx = Transaction("s@x", ["a@y", "b@y"], pipelining=True)
    tx.begin()
    tx.feed(R250)
    tx.feed(R550)
    tx.feed(R250)
    tx.feed(R354)
    assert tx.wants_body and tx.stage == Stage.BODY
    tx.body_sent()
    assert tx.stage == Stage.CONFIRMATION
    tx.abort(no_response_reply(tx.stage))
    assert tx.done and not tx.connection_usable
    assert tx.outcomes == [Outcome(R550, Stage.RCPT),
                           Outcome(Reply(451, "4.4.2", "[internal] no BODY response"), Stage.CONFIRMATION)]


def test_misuse():
    tx = Transaction("s@x", ["a@y"])
    with pytest.raises(RuntimeError):
        tx.body_sent()
    tx.begin()
    with pytest.raises(RuntimeError):
        tx.begin()
    with pytest.raises(ValueError):
        Transaction("s@x", [])
