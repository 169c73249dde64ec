"""`impetus sink`: argument handling, and the real program on 127.0.0.1."""
import argparse
import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from impetus.sink import add_sink_parser, parse_listen

HOST = "127.0.0.1"


def test_parse_listen():
    assert parse_listen("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_listen("[::1]:25") == ("::1", 25)
    assert parse_listen("localhost:0") == ("localhost", 0)
    assert parse_listen(":25") == ("0.0.0.0", 25)
    for bad in ("::1:25", "host", "host:x", "[::1]25", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_add_sink_parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_sink_parser(sub)
    a = p.parse_args(["sink", "--listen", "[::1]:2525", "--lmtp", "--maildir", "/tmp/x",
                      "--count-file", "/tmp/c", "--reply", "451 4.3.0 try later"])
    assert (a.listen, a.lmtp, a.maildir, a.count_file, a.reply) == (
        "[::1]:2525", True, "/tmp/x", "/tmp/c", "451 4.3.0 try later")
    a = p.parse_args(["sink"])
    assert a.listen == "127.0.0.1:2525" and not a.lmtp and a.maildir is None


class Sink:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "impetus.sink", "--listen", f"{HOST}:0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready, "sink did not start"
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"impetus sink listening on 127\.0\.0\.1:(\d+) \((smtp|lmtp)\)\n", line)
        assert m, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.port = int(m.group(1))
        self.proto = m.group(2)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def sink_factory():
    sinks = []

    def make(*args):
        s = Sink(*args)
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        s.kill()


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def read_count(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return -1


@pytest.mark.integration
def test_sink_smtp_maildir_and_count(sink_factory, tmp_path):
    maildir = tmp_path / "Maildir"
    count = tmp_path / "count"
    s = sink_factory("--maildir", str(maildir), "--count-file", str(count))
    assert s.proto == "smtp"
    assert wait_for(lambda: read_count(count) == 0)
    with smtplib.SMTP(HOST, s.port, timeout=10) as c:
        for i in range(3):
            c.sendmail("from@example.com", ["a@example.org", "b@example.org"],
                       b"Subject: %d\r\n\r\n.dot\r\nbody %d\r\n" % (i, i))
    assert wait_for(lambda: read_count(count) == 3)
    files = sorted(os.listdir(maildir / "new"))
    assert len(files) == 3 and os.listdir(maildir / "tmp") == []
    contents = sorted((maildir / "new" / f).read_bytes() for f in files)
    assert contents[0] == (b"Return-Path: <from@example.com>\r\nDelivered-To: a@example.org\r\n"
                           b"Delivered-To: b@example.org\r\nSubject: 0\r\n\r\n.dot\r\nbody 0\r\n")
    rc, out, err = s.stop()
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == "received 3 messages"
    assert read_count(count) == 3


@pytest.mark.integration
def test_sink_lmtp_forced_reply(sink_factory):
    s = sink_factory("--lmtp", "--reply", "451 4.3.0 try later")
    assert s.proto == "lmtp"
    with socket.create_connection((HOST, s.port), timeout=10) as sock:
        sock.sendall(b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\n"
                     b"RCPT TO:<y@d.example>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n")
        data = b""
        while not data.endswith(b"221 2.0.0 Bye\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"220 ")
    assert b"354 End data with <CR><LF>.<CR><LF>\r\n451 4.3.0 try later\r\n451 4.3.0 try later\r\n221" in data
    rc, out, _ = s.stop()
    assert rc == 0 and "received 1 messages" in out


@pytest.mark.integration
def test_sink_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "impetus.sink", "--listen", "::1:25"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "IPv6" in r.stderr
    r = subprocess.run([sys.executable, "-m", "impetus.sink", "--reply", "hello"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--reply" in r.stderr
    r = subprocess.run([sys.executable, "-m", "impetus.sink", "--listen", f"{HOST}:0",
                        "--count-file", "/nonexistent-dir/count"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "nonexistent-dir" in r.stderr


@pytest.mark.integration
def test_sink_ipv6_loopback(sink_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1")
    proc = subprocess.Popen([sys.executable, "-m", "impetus.sink", "--listen", "[::1]:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready
        line = proc.stdout.readline()
        m = re.fullmatch(r"impetus sink listening on \[::1\]:(\d+) \(smtp\)\n", line)
        assert m, line
        with smtplib.SMTP("::1", int(m.group(1)), timeout=10) as c:
            c.sendmail("a@b.example", ["c@d.example"], b"x\r\n")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "received 1 messages" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
