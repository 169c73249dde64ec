"""Tests for impetus.bounce: RFC 3464 bounces (decision D12)."""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impetus.bounce import Failure, is_8bit, render_bounce, should_bounce, split_original

ORIGINAL = (
    b"Received: from client.example.com (client [192.0.2.7])\r\n"
    b"\tby mta.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.net\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <abc@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)

FAILURES = [
    Failure("bob@example.net", "5.1.1", "550 5.1.1 <bob@example.net>: user unknown",
            "mx1.example.net"),
    Failure("carol@example.net", "5.4.7",
            "554 5.4.7 [internal] exceeded max time without delivery", None),
]


def render(**kw):
    args = dict(
        original=ORIGINAL,
        original_sender="alice@example.com",
        failures=FAILURES,
        reporting_mta="mta.example.org",
        mailerdaemon="mailer-daemon@mta.example.org",
        arrival_date=1700000000.0,
        now=1700000100.0,
    )
    args.update(kw)
    return render_bounce(**args)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(msg):
    return list(msg.iter_parts())


def status_blocks(msg):
    ds = parts(msg)[1]
    assert ds.get_content_type() == "message/delivery-status"
    return ds.get_payload()


def test_structure_and_headers():
    data = render()
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "mailer-daemon@mta.example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime.timestamp() == 1700000100
    assert re.fullmatch(r"<[^<>@\s]+@mta\.example\.org>", msg["Message-ID"])
    types = [p.get_content_type() for p in parts(msg)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not msg.defects
    for p in msg.walk():
        assert not p.defects


def test_crlf_only():
    data = render(inline="all", original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def test_human_readable_part():
    text = parts(parse(render()))[0].get_content()
    assert "mta.example.org" in text
    lines = text.splitlines()
    bob = [ln for ln in lines if "bob@example.net" in ln]
    carol = [ln for ln in lines if "carol@example.net" in ln]
    assert len(bob) == 1 and "550 5.1.1" in bob[0] and "user unknown" in bob[0]
    assert "mx1.example.net" in bob[0]
    assert len(carol) == 1 and "exceeded max time" in carol[0]


def test_delivery_status_fields():
    blocks = status_blocks(parse(render()))
    assert len(blocks) == 3
    per_msg, bob, carol = blocks
    assert per_msg["Reporting-MTA"] == "dns; mta.example.org"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == 1700000000
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: user unknown"
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "5.4.7"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == (
        "smtp; 554 5.4.7 [internal] exceeded max time without delivery")


def test_no_arrival_date():
    per_msg = status_blocks(parse(render(arrival_date=None)))[0]
    assert per_msg["Arrival-Date"] is None


def test_status_derived_when_missing():
    f = [Failure("x@y.example", "", "552 5.2.2 mailbox full", "1.2.3.4"),
         Failure("z@y.example", "bogus", "554 transaction failed", None)]
    blocks = status_blocks(parse(render(failures=f)))
    assert blocks[1]["Status"] == "5.2.2"
    assert blocks[1]["Remote-MTA"] == "dns; 1.2.3.4"
    assert blocks[2]["Status"] == "5.0.0"


def test_multiline_diagnostic_is_folded():
    diag = "550-5.1.1 first line\r\n550 5.1.1 second line"
    data = render(failures=[Failure("x@y.example", "5.1.1", diag, "mx")])
    blk = status_blocks(parse(data))[1]
    value = " ".join(blk["Diagnostic-Code"].split())
    assert value == "smtp; 550-5.1.1 first line 550 5.1.1 second line"
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_long_diagnostic_line_limit():
    diag = "550 5.7.1 " + "x" * 5000
    data = render(failures=[Failure("x@y.example", "5.7.1", diag, "mx")])
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    blk = status_blocks(parse(data))[1]
    assert "".join(blk["Diagnostic-Code"].split()) == "smtp;" + diag.replace(" ", "")


def test_header_injection_in_addresses_is_neutralised():
    data = render(original_sender="alice@example.com\r\nBcc: evil@example.org",
                  failures=[Failure("bob@example.net\r\nX-Evil: 1", "5.1.1", "550 no", None)])
    msg = parse(data)
    assert msg["Bcc"] is None
    assert status_blocks(msg)[1]["X-Evil"] is None


def test_inline_headers():
    msg = parse(render(inline="headers"))
    part = parts(msg)[2]
    assert part.get_content_type() == "text/rfc822-headers"
    hdrs = part.get_payload(decode=True)
    assert hdrs.replace(b"\r\n", b"\n") == ORIGINAL.split(b"\r\n\r\n")[0].replace(
        b"\r\n", b"\n") + b"\n"
    assert b"Hello Bob" not in render(inline="headers")


def test_inline_all():
    data = render(inline="all")
    msg = parse(data)
    part = parts(msg)[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "quarterly numbers"
    assert inner["Message-ID"] == "<abc@example.com>"
    assert "the numbers are attached." in inner.get_content()
    assert ORIGINAL in data  # copied verbatim


def test_inline_none():
    data = render(inline="none")
    msg = parse(data)
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status"]
    assert b"quarterly numbers" not in data


def test_inline_mode_case_and_validation():
    assert len(parts(parse(render(inline="ALL")))) == 3
    with pytest.raises(ValueError):
        render(inline="body")


def test_8bit_original():
    orig = ("Subject: Gr\u00fc\u00dfe\r\nFrom: a@example.com\r\n\r\n".encode("utf-8")
            + b"Latin-1 body: \xe9t\xe9\r\n\xff\xfe\x00raw\r\n")
    for mode in ("headers", "all"):
        data = render(original=orig, inline=mode)
        assert is_8bit(data)
        msg = parse(data)
        assert msg["Content-Transfer-Encoding"] == "8bit"
        part = parts(msg)[2]
        assert part["Content-Transfer-Encoding"] == "8bit"
        assert "Gr\u00fc\u00dfe".encode() in data
    data = render(original=orig, inline="all")
    assert orig in data
    data = render(original=orig, inline="none")
    assert not is_8bit(data)
    assert parse(data)["Content-Transfer-Encoding"] is None


def test_original_without_blank_line():
    orig = b"From: a@example.com\r\nSubject: no body"
    for mode in ("headers", "all"):
        msg = parse(render(original=orig, inline=mode))
        part = parts(msg)[2]
        if mode == "headers":
            assert part.get_payload(decode=True) == (
                b"From: a@example.com\r\nSubject: no body\r\n")
        else:
            assert part.get_payload()[0]["Subject"] == "no body"


def test_original_garbage_without_headers():
    orig = b"this is not a header line\nnor is this\n"
    msg = parse(render(original=orig, inline="headers"))
    assert parts(msg)[2].get_payload(decode=True) == b""
    msg = parse(render(original=orig, inline="all"))
    assert parts(msg)[2].get_content_type() == "message/rfc822"


def test_split_original():
    assert split_original(b"A: 1\nB: 2\n cont\n\nbody\n") == (
        b"A: 1\r\nB: 2\r\n cont\r\n", b"body\r\n")
    assert split_original(b"A: 1\r\nB: 2") == (b"A: 1\r\nB: 2\r\n", b"")
    assert split_original(b"\r\nbody") == (b"", b"body")
    assert split_original(b"") == (b"", b"")
    assert split_original(b"From alice Tue Nov 14\nA: 1\n\nb") == (b"A: 1\r\n", b"b")
    # a non-header line ends the header block
    assert split_original(b"A: 1\nnot a header\nB: 2\n") == (
        b"A: 1\r\n", b"not a header\r\nB: 2\r\n")


def test_huge_original_headers_only_fast():
    body = (b"x" * 998 + b"\r\n") * 50_000  # ~50 MB
    orig = b"Subject: big\r\n\r\n" + body
    data = render(original=orig, inline="headers")
    assert len(data) < 10_000
    data = render(original=orig, inline="all")
    assert len(data) > len(orig)


def test_boundary_not_in_original():
    data = render(inline="all")
    boundary = parse(data).get_boundary()
    assert boundary.encode() not in ORIGINAL
    assert data.endswith(b"--" + boundary.encode() + b"--\r\n")


def test_message_id_domain():
    msg = parse(render(message_id_domain="bounces.example.org"))
    assert msg["Message-ID"].endswith("@bounces.example.org>")


def test_delayed_notice():
    f = [Failure("x@y.example", "4.4.1", "450 4.4.1 [internal] Connection Timed Out",
                 None, action="delayed")]
    msg = parse(render(failures=f))
    assert msg["Subject"].startswith("Delayed Mail")
    blk = status_blocks(msg)[1]
    assert blk["Action"] == "delayed" and blk["Status"] == "4.4.1"


def test_non_ascii_recipient():
    f = [Failure("j\u00f6rg@b\u00fccher.example", "5.1.1", "550 5.1.1 unknown", None)]
    data = render(failures=f)
    msg = parse(data)
    assert status_blocks(msg)[1]["Final-Recipient"] == "rfc822; j\u00f6rg@b\u00fccher.example"


def test_null_sender_never_bounced():
    assert should_bounce("") is False
    assert should_bounce("<>") is False
    assert should_bounce(" <> ") is False
    assert should_bounce(None) is False
    assert should_bounce("alice@example.com") is True
    for s in ("", "<>"):
        with pytest.raises(ValueError):
            render(original_sender=s)


def test_no_failures_rejected():
    with pytest.raises(ValueError):
        render(failures=[])


@settings(max_examples=300, deadline=None)
@given(original=st.binary(max_size=2000),
       inline=st.sampled_from(["headers", "all", "none"]))
def test_arbitrary_original_never_raises(original, inline):
    data = render(original=original, inline=inline)
    assert b"\n" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    ps = parts(msg)
    assert len(ps) == (2 if inline == "none" else 3)
    assert len(status_blocks(msg)) == 3


@settings(max_examples=100, deadline=None)
@given(original=st.lists(st.sampled_from(
    [b"A: 1", b" cont", b"", b"From x", b"\r", b"\n", b"--", b"\xff", b":"]),
    max_size=20).map(b"\n".join))
def test_headerish_originals_never_raise(original):
    for inline in ("headers", "all"):
        parse(render(original=original, inline=inline))
