"""Pieces of the control protocol and console without a server (issue 7)."""
from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from impetus.console import ControlClient, completions, parse_target
from impetus.control import (COMMANDS, _reply_from_text, auth_proof, encode_reply,
                             match_command, parse_scrypt, scrypt_key, suggest)


def roundtrip(ok, text, lines):
    a, b = socket.socketpair()
    try:
        a.sendall(encode_reply(ok, text, lines))
        client = ControlClient("/unused")
        client.sock, client.rfile = b, b.makefile("rb")
        return client._read_reply()
    finally:
        a.close()
        b.close()


@given(st.booleans(), st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
       st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
                max_size=8))
def test_reply_framing_roundtrips_with_dot_stuffing(ok, text, lines):
    got_ok, got_text, got_lines = roundtrip(ok, text, lines)
    assert got_ok == ok
    assert got_text == text.strip()
    assert got_lines == lines


def test_dot_lines_survive():
    assert roundtrip(True, "", [".", "..", ".hidden", "a.b"])[2] == [".", "..", ".hidden", "a.b"]


def test_match_command_prefers_the_longest_phrase():
    assert match_command(["binding", "flush", "domain", "b", "all"]) == (
        "binding flush domain", ["b", "all"])
    assert match_command(["Flush", "DOMAIN", "x.test"]) == ("flush domain", ["x.test"])
    assert match_command(["fail", "domain", "quiet", "x"]) == ("fail domain", ["quiet", "x"])
    assert match_command(["flush"]) is None
    assert match_command(["nonsense"]) is None


def test_suggestions_for_typos_and_partial_commands():
    assert suggest(["sumary"])[0] == "summary"
    assert "refresh domain" in suggest(["refresh", "domian", "x"])
    assert {"binding summary", "binding flush domain", "binding fail domain"} <= set(
        suggest(["binding"]))


def test_every_command_has_a_handler_and_help():
    from impetus.control import Commands
    cmds = Commands.__new__(Commands)
    for phrase, args, text in COMMANDS:
        assert hasattr(cmds, "cmd_" + phrase.replace(" ", "_")), phrase
        assert text


def test_completion():
    assert completions("summ") == ["summary "]
    assert completions("binding ") == ["fail ", "flush ", "summary "]
    assert completions("binding f") == ["fail ", "flush "]
    assert completions("config ") == ["eval ", "get ", "reload ", "show "]
    assert completions("dns_cache ") == ["flush ", "lookup ", "stats ", "submit "]
    assert completions("fail domain ") == ["quiet "]
    assert "refresh " in completions("")
    assert completions("zzz") == []


def test_reply_text_for_manual_failures():
    default = ("554", "5.7.0", "[internal] Message manually purged")
    r = _reply_from_text(None, default)
    assert (r.code, r.enhanced, r.text) == (554, "5.7.0", "[internal] Message manually purged")
    r = _reply_from_text("550 5.7.1 blocked by policy", default)
    assert (r.code, r.enhanced, r.text) == (550, "5.7.1", "blocked by policy")
    r = _reply_from_text("451 try later", default)
    assert (r.code, r.enhanced) == (451, "4.0.0")
    r = _reply_from_text("spam run", default)
    assert (r.code, r.enhanced, r.text) == (554, "5.7.0", "spam run")


def test_scrypt_proof_matches_the_password_file_format():
    import base64
    import hashlib
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"pw", salt=salt, n=16, r=1, p=1, dklen=32)
    e = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    n, r, p, s, k = parse_scrypt(f"scrypt$n=16,r=1,p=1${e(salt)}${e(key)}")
    assert (n, r, p, s, k) == (16, 1, 1, salt, key)
    assert scrypt_key("pw", s, n, r, p) == key
    assert auth_proof(key, "nonce", "u") != auth_proof(key, "nonce2", "u")
    assert auth_proof(key, "nonce", "u") != auth_proof(key, "nonce", "v")


def test_parse_target():
    assert parse_target("/run/x") == (socket.AF_UNIX, "/run/x")
    assert parse_target("127.0.0.1:2025") == (socket.AF_INET, ("127.0.0.1", 2025))
    assert parse_target("2025") == (socket.AF_INET, ("127.0.0.1", 2025))
    assert parse_target("[::1]:2025") == (socket.AF_INET6, ("::1", 2025))
