import pytest

from impetus.smtp.reply import Reply


def test_single_line():
    r = Reply(250, "2.0.0", "Ok")
    assert r.to_bytes() == b"250 2.0.0 Ok\r\n"
    assert str(r) == "250 2.0.0 Ok"
    assert r.is_success and not r.is_transient and not r.is_permanent


def test_multi_line_repeats_enhanced_code():
    r = Reply(550, "5.1.1", "no such user\nhere")
    assert r.to_bytes() == b"550-5.1.1 no such user\r\n550 5.1.1 here\r\n"
    assert r.to_bytes(include_enhanced=False) == b"550-no such user\r\n550 here\r\n"
    assert str(r) == "550 5.1.1 no such user here"
    assert r.is_permanent


def test_no_enhanced_and_empty_text():
    assert Reply(250, None, "mx\nPIPELINING").to_bytes() == b"250-mx\r\n250 PIPELINING\r\n"
    assert Reply(250).to_bytes() == b"250\r\n"
    assert Reply(250, "2.0.0").to_bytes() == b"250 2.0.0\r\n"


def test_classification():
    assert Reply(451, "4.4.2", "x").is_transient
    assert Reply(354, None, "go").is_intermediate
    assert str(Reply(451, "4.4.2", "text")) == "451 4.4.2 text"


def test_cr_cannot_break_out():
    r = Reply(250, None, "a\r\n250 injected\rx")
    assert r.to_bytes() == b"250-a\r\n250 250 injectedx\r\n"


def test_equality_and_hash():
    assert Reply(250, "2.0.0", "Ok") == Reply(250, "2.0.0", "Ok")
    assert len({Reply(250, "2.0.0", "Ok"), Reply(250, "2.0.0", "Ok")}) == 1
    assert Reply(250, "2.0.0", "Ok") != Reply(251, "2.0.0", "Ok")


def test_parse():
    assert Reply.parse("451 4.3.0 try later") == Reply(451, "4.3.0", "try later")
    assert Reply.parse("250 ok") == Reply(250, None, "ok")
    assert Reply.parse("550") == Reply(550, None, "")
    # enhanced code of the wrong class stays in the text
    assert Reply.parse("550 2.0.0 odd") == Reply(550, None, "2.0.0 odd")
    for bad in ("", "abc", "99 x", "650 x", "2500 x"):
        with pytest.raises(ValueError):
            Reply.parse(bad)


def test_validation():
    with pytest.raises(ValueError):
        Reply(99)
    with pytest.raises(ValueError):
        Reply(250, "2.0", "x")
