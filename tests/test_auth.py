"""impetus.auth: scrypt password file and ``impetus passwd``."""
import argparse
import asyncio
import io
import os
import stat
import subprocess
import sys
import threading

import pytest

from impetus import auth
from impetus.auth import (
    PasswordFile,
    add_passwd_parser,
    delete_user,
    hash_password,
    run_passwd,
    set_password,
    verify_hash,
)


def test_hash_format_and_verify():
    h = hash_password("correct horse")
    scheme, params, salt, key = h.split("$")
    assert scheme == "scrypt" and params == "n=16384,r=8,p=1"
    assert len(auth._b64d(salt)) == 16 and len(auth._b64d(key)) == 32
    assert "=" not in salt + key and ":" not in h
    assert verify_hash("correct horse", h)
    assert not verify_hash("correct horsE", h)
    assert hash_password("correct horse") != h          # salted
    assert verify_hash("p\u00e4ss", hash_password("p\u00e4ss"))


@pytest.mark.parametrize("bad", [
    "", "scrypt", "md5$x$y$z", "scrypt$n=16384,r=8$c2FsdA$a2V5",
    "scrypt$n=16385,r=8,p=1$c2FsdA$" + "A" * 43,            # n not a power of two
    "scrypt$n=4194304,r=8,p=1$c2FsdA$" + "A" * 43,          # absurd cost
    "scrypt$n=16384,r=8,p=1$!!$" + "A" * 43,
    "scrypt$n=16384,r=8,p=1$c2FsdA$YQ",                     # hash too short
])
def test_verify_malformed_hash_is_false(bad):
    assert verify_hash("x", bad) is False


def write(path, text):
    path.write_text(text)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))


def test_password_file_verify_and_reload(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"# comment\n\nalice:{hash_password('a-pw')}\nbroken line\nbob:md5$x\n"
                    f"bad user:{hash_password('x')}\n")
    pw = PasswordFile(path)
    assert pw.users() == ["alice"]
    assert pw.verify("alice", "a-pw")
    assert not pw.verify("alice", "wrong")
    assert not pw.verify("carol", "a-pw")
    assert not pw.verify("Alice", "a-pw")                 # exact match
    # the file changes: picked up without restarting
    write(path, f"carol:{hash_password('c-pw')}\n")
    assert pw.verify("carol", "c-pw") and not pw.verify("alice", "a-pw")
    # set_password replaces the file (new inode): also picked up
    set_password(str(path), "alice", "new-pw")
    assert pw.verify("alice", "new-pw") and pw.verify("carol", "c-pw")


def test_password_file_missing_is_no_accounts(tmp_path, caplog):
    pw = PasswordFile(tmp_path / "nope")
    assert not pw.verify("alice", "x")
    assert pw.users() == []
    set_password(str(tmp_path / "nope"), "alice", "x")
    assert pw.verify("alice", "x")


def test_password_never_logged(tmp_path, caplog):
    path = tmp_path / "passwd"
    path.write_text("alice:garbage-with-secret\n")
    pw = PasswordFile(path)
    with caplog.at_level("DEBUG"):
        assert not pw.verify("alice", "the-secret-password")
    assert "secret" not in caplog.text
    assert "line 1" in caplog.text


def test_averify(tmp_path):
    path = tmp_path / "passwd"
    set_password(str(path), "alice", "pw")
    pw = PasswordFile(path)

    async def main():
        return await pw.averify("alice", "pw"), await pw.averify("alice", "no")

    assert asyncio.run(main()) == (True, False)


def test_set_password_atomic_0600_and_preserves_other_lines(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# keep me\nbob:" + hash_password("b") + "\n")
    os.chmod(path, 0o644)
    assert set_password(str(path), "alice", "a") is False        # added
    assert set_password(str(path), "alice", "a2") is True        # replaced
    lines = path.read_text().splitlines()
    assert lines[0] == "# keep me" and lines[1].startswith("bob:scrypt$")
    assert [ln.split(":")[0] for ln in lines[1:]] == ["bob", "alice"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["passwd"]             # no temp or lock files left
    pw = PasswordFile(path)
    assert pw.verify("alice", "a2") and pw.verify("bob", "b") and not pw.verify("alice", "a")
    assert delete_user(str(path), "alice") is True
    assert delete_user(str(path), "alice") is False
    assert not PasswordFile(path).verify("alice", "a2")
    with pytest.raises(ValueError):
        set_password(str(path), "a:b", "x")
    with pytest.raises(ValueError):
        set_password(str(path), "alice", "")


def test_concurrent_writers_do_not_lose_updates(tmp_path):
    path = str(tmp_path / "passwd")
    threads = [threading.Thread(target=set_password, args=(path, f"u{i}", "pw")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert PasswordFile(path).users() == sorted(f"u{i}" for i in range(8))


def parse(argv):
    p = argparse.ArgumentParser(prog="impetus")
    sub = p.add_subparsers(dest="command", required=True)
    add_passwd_parser(sub)
    return p.parse_args(argv)


def test_cli_stdin(tmp_path, monkeypatch, capsys):
    path = tmp_path / "passwd"
    args = parse(["passwd", str(path), "alice"])
    assert args.command == "passwd" and args.file == str(path) and args.user == "alice"
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret pw\nignored\n"))
    assert run_passwd(args) == 0
    assert capsys.readouterr().out == "added alice\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("other\r\n"))
    assert run_passwd(args) == 0
    assert capsys.readouterr().out == "updated alice\n"
    assert PasswordFile(path).verify("alice", "other")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_cli_prompt(tmp_path, monkeypatch, capsys):
    path = tmp_path / "passwd"

    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", TTY(""))
    answers = iter(["pw1", "pw1", "a", "b"])
    monkeypatch.setattr(auth.getpass, "getpass", lambda prompt="": next(answers))
    assert run_passwd(parse(["passwd", str(path), "bob"])) == 0
    assert PasswordFile(path).verify("bob", "pw1")
    assert run_passwd(parse(["passwd", str(path), "bob"])) == 2          # mismatch
    assert "do not match" in capsys.readouterr().err
    assert PasswordFile(path).verify("bob", "pw1")


def test_cli_errors_and_delete(tmp_path, monkeypatch, capsys):
    path = tmp_path / "passwd"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert run_passwd(parse(["passwd", str(path), "alice"])) == 2        # empty password
    assert run_passwd(parse(["passwd", str(path), "al:ice"])) == 2       # bad name
    assert run_passwd(parse(["passwd", str(path), "-d", "alice"])) == 1  # not there
    set_password(str(path), "alice", "x")
    assert run_passwd(parse(["passwd", str(path), "--delete", "alice"])) == 0
    assert PasswordFile(path).users() == []
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert run_passwd(parse(["passwd", str(tmp_path / "no" / "dir" / "passwd"), "alice"])) == 1
    assert "impetus passwd:" in capsys.readouterr().err


def test_module_main_subprocess(tmp_path):
    path = tmp_path / "passwd"
    proc = subprocess.run([sys.executable, "-m", "impetus.auth", str(path), "dave"],
                          input=b"pw from pipe\n", capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert PasswordFile(path).verify("dave", "pw from pipe")
