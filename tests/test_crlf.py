"""Line endings: the two-pass CRLF check, and the spool's promise that every
spooled body is CRLF-clean (delivery relies on it and does not re-scan)."""
from hypothesis import given
from hypothesis import strategies as st

from impetus.smtp.client import dot_stuff
from impetus.smtp.crlf import is_crlf, to_crlf
from impetus.spool import Spool, Submission

bodies = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\n\r", b"x y"]),
                  max_size=30).map(b"".join)


def three_counts(data: bytes) -> bool:
    return data.count(b"\n") == data.count(b"\r") == data.count(b"\r\n")


@given(bodies)
def test_is_crlf_agrees_with_counting_cr_lf_and_crlf(data):
    assert is_crlf(data) == three_counts(data)


@given(bodies)
def test_to_crlf_leaves_no_bare_cr_or_lf_and_keeps_clean_bodies(data):
    out = to_crlf(data)
    assert is_crlf(out)
    assert out.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if is_crlf(data):
        assert out is data


def test_bare_cr_and_lf_examples():
    assert not is_crlf(b"a\rb\r\n") and not is_crlf(b"a\nb\r\n") and not is_crlf(b"\r\r\n")
    assert to_crlf(b"a\rb\nc\r\n") == b"a\r\nb\r\nc\r\n"


async def test_spool_normalises_a_submission_not_marked_clean(tmp_path):
    s = Spool(str(tmp_path / "sp"))
    s.open()
    try:
        [m] = await s.accept(Submission("s@a.test", ["r@b.test"], b"Subject: x\n\nbare\rcr\n"))
        assert s.body(m.batch_id) == b"Subject: x\r\n\r\nbare\r\ncr\r\n"
        assert m.size == len(b"Subject: x\r\n\r\nbare\r\ncr\r\n")
        # A body its submitter vouches for is stored as it is (no second scan).
        [m2] = await s.accept(Submission("s@a.test", ["r@b.test"], b"ok\r\n", crlf_clean=True))
        assert s.body(m2.batch_id) == b"ok\r\n"
    finally:
        s.close()


def test_dot_stuff_of_a_clean_body_skips_only_the_line_end_scan():
    body = b".lead\r\nmid\r\n.dot\r\nend"
    assert dot_stuff(body, crlf_clean=True) == b"..lead\r\nmid\r\n..dot\r\nend\r\n.\r\n"
    assert dot_stuff(b"a\nb", crlf_clean=False) == b"a\r\nb\r\n.\r\n"
