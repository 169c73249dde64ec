"""Lexer: comments, strings, bare words, positions (spec §1.2, D16)."""

import pytest

from impetus.config.errors import Issues
from impetus.config.lexer import EOF, STRING, WORD, decode_source, tokenize


def lex(text):
    issues = Issues()
    toks = tokenize(text, "t.conf", issues)
    return toks, [str(i) for i in issues.items]


def kinds_values(text):
    toks, issues = lex(text)
    assert issues == []
    return [(t.kind, t.value) for t in toks if t.kind != EOF]


def test_punctuation_and_words():
    assert kinds_values('a = ( b "c" ) [ k = v ] { }') == [
        (WORD, "a"), ("=", "="), ("(", "("), (WORD, "b"), (STRING, "c"), (")", ")"),
        ("[", "["), (WORD, "k"), ("=", "="), (WORD, "v"), ("]", "]"), ("{", "{"), ("}", "}"),
    ]


def test_hash_comment_runs_to_end_of_line():
    assert kinds_values("a = 1 # comment = ( {\nb = 2") == [
        (WORD, "a"), ("=", "="), (WORD, "1"), (WORD, "b"), ("=", "="), (WORD, "2")]


def test_block_comments_do_not_nest():
    # the first */ closes the comment; "c */" is then ordinary text
    assert kinds_values("a /* x /* y */ c */") == [(WORD, "a"), (WORD, "c"), (WORD, "*/")]


def test_block_comment_spanning_lines_keeps_line_numbers():
    toks, _ = lex("/* one\ntwo\nthree */ x")
    assert toks[0].value == "x" and (toks[0].pos.line, toks[0].pos.col) == (3, 10)


def test_slash_is_ordinary_in_bare_words():
    assert kinds_values("R = ( 127.0.0.0/8 10.0.0.0/24 /var/x )") == [
        (WORD, "R"), ("=", "="), ("(", "("), (WORD, "127.0.0.0/8"), (WORD, "10.0.0.0/24"),
        (WORD, "/var/x"), (")", ")")]


def test_slash_star_always_opens_a_comment():
    assert kinds_values("a = b/*c*/d") == [(WORD, "a"), ("=", "="), (WORD, "b"), (WORD, "d")]


def test_hash_inside_a_bare_word_starts_a_comment():
    assert kinds_values("a = b#c\n") == [(WORD, "a"), ("=", "="), (WORD, "b")]


@pytest.mark.parametrize("src,value", [
    (r'"plain"', "plain"),
    (r"'single'", "single"),
    (r'"with \"quote\""', 'with "quote"'),
    (r'"back\\slash"', "back\\slash"),
    (r'"\r\n"', "rn"),               # D16: backslash escapes the next character
    (r"'it\'s'", "it's"),
    (r'"has # and /* and = { }"', "has # and /* and = { }"),
    (r'''"mixed 'quotes'"''', "mixed 'quotes'"),
    ('"multi\nline"', "multi\nline"),
    ('""', ""),
])
def test_strings(src, value):
    assert kinds_values(src) == [(STRING, value)]


def test_positions_are_one_based_line_and_column():
    toks, _ = lex('a = 1\n  Binding "b" {\n\tx = "y"\n}')
    got = [(t.value, t.pos.line, t.pos.col) for t in toks if t.kind != EOF]
    assert got == [("a", 1, 1), ("=", 1, 3), ("1", 1, 5), ("Binding", 2, 3), ("b", 2, 11),
                   ("{", 2, 15), ("x", 3, 2), ("=", 3, 4), ("y", 3, 6), ("}", 4, 1)]
    assert all(t.pos.file == "t.conf" for t in toks)


def test_unterminated_string():
    _, issues = lex('a = 1\nb = "oops\nc = 2\n')
    assert issues == ["t.conf:2:5: unterminated string: missing closing \""]


def test_unterminated_single_quoted_string():
    _, issues = lex("b = 'oops")
    assert issues == ["t.conf:1:5: unterminated string: missing closing '"]


def test_unterminated_comment():
    _, issues = lex("a = 1\n  /* never closed\n")
    assert issues == ["t.conf:2:3: unterminated comment: '/*' without '*/'"]


def test_nul_byte_reported_once():
    _, issues = lex("a = 1\x00\x00\nb = 2")
    assert issues == ["t.conf:1:6: NUL byte in config file"]


def test_invalid_utf8_reported_with_position():
    issues = Issues()
    text = decode_source(b"a = 1\nb = \xff\xfe\n", "t.conf", issues)
    assert [str(i) for i in issues.items] == [
        "t.conf:2:5: invalid UTF-8 byte 0xff (config files must be UTF-8)"]
    assert text.startswith("a = 1\nb = ")


def test_utf8_bom_is_ignored():
    issues = Issues()
    assert decode_source("\ufeffa = 1".encode(), "t.conf", issues) == "a = 1"
    assert not issues
