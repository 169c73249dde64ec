"""Integration tests of the asyncio glue on 127.0.0.1 (port 0)."""
import asyncio
import shutil
import smtplib
import subprocess

import pytest

from impetus.smtp.reply import Reply
from impetus.smtp.serve import start_server
from impetus.smtp.server import Policy, ServerSettings

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class Recorder:
    def __init__(self, reply=None, delay=0.0):
        self.envelopes = []
        self.sessions = []
        self.reply = reply
        self.delay = delay

    async def __call__(self, envelope, session):
        if self.delay:
            await asyncio.sleep(self.delay)
        self.envelopes.append(envelope)
        self.sessions.append(session)
        if self.reply is not None:
            return self.reply(envelope) if callable(self.reply) else self.reply
        return Reply(250, "2.0.0", f"Ok: queued as {len(self.envelopes)}")


async def serve(settings=None, on_message=None, policy_factory=None, **kw):
    settings = settings or ServerSettings(hostname="mx.test")
    server = await start_server(HOST, 0, settings, policy_factory, on_message or Recorder(), **kw)
    port = server.sockets[0].getsockname()[1]
    return server, port


async def talk(port, data: bytes, until: bytes, timeout=10.0):
    """Send data, read until the reply stream ends with ``until``."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        buf = b""
        async with asyncio.timeout(timeout):
            while not buf.endswith(until):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
        return buf
    finally:
        writer.close()


async def test_smtplib_send():
    rec = Recorder()
    server, port = await serve(on_message=rec)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.ehlo("client.test")
                assert s.has_extn("pipelining") and s.has_extn("8bitmime")
                refused = s.sendmail("from@example.com", ["a@example.org", "b@example.org"],
                                     b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n")
                assert refused == {}
                s.sendmail("", ["c@example.org"], b"second\r\n")
        await asyncio.to_thread(send)
    assert len(rec.envelopes) == 2
    env = rec.envelopes[0]
    assert env.mail_from == "from@example.com"
    assert env.rcpt_to == ["a@example.org", "b@example.org"]
    assert env.body == b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n"
    assert rec.envelopes[1].mail_from == ""
    sess = rec.sessions[0]
    assert sess.peer_ip == "127.0.0.1" and sess.local_port == port and sess.helo == "client.test"


async def test_pipelined_session_one_write_with_async_handler():
    rec = Recorder(delay=0.01)
    server, port = await serve(on_message=rec)
    async with server:
        msg = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhello\r\n.\r\n"
        out = await talk(port, b"EHLO x\r\n" + msg * 3 + b"QUIT\r\n", b"221 2.0.0 Bye\r\n")
    lines = out.decode().split("\r\n")
    finals = [ln for ln in lines if ln.startswith("250 2.0.0 Ok: queued")]
    assert finals == ["250 2.0.0 Ok: queued as 1", "250 2.0.0 Ok: queued as 2", "250 2.0.0 Ok: queued as 3"]
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert len(rec.envelopes) == 3


async def test_sync_handler_fast_path():
    seen = []

    def on_message(env, session):
        seen.append(env.body)
        return Reply(250, "2.0.0", "sync ok")

    server, port = await serve(on_message=on_message)
    async with server:
        out = await talk(port, b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                               b"x\r\n.\r\nQUIT\r\n", b"221 2.0.0 Bye\r\n")
    assert b"250 2.0.0 sync ok\r\n" in out and seen == [b"x\r\n"]


async def test_handler_exception_gives_451_and_server_survives():
    calls = []

    async def boom(env, session):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("spool on fire")
        return Reply(250, "2.0.0", "fine")

    server, port = await serve(on_message=boom)
    async with server:
        msg = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
        out = await talk(port, b"EHLO x\r\n" + msg + msg + b"QUIT\r\n", b"221 2.0.0 Bye\r\n")
    assert b"451 4.3.0 Internal error\r\n" in out
    assert b"250 2.0.0 fine\r\n" in out


async def test_bad_handler_result_gives_451():
    async def wrong(env, session):
        return "not a reply"

    server, port = await serve(on_message=wrong)
    async with server:
        out = await talk(port, b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                               b"x\r\n.\r\nQUIT\r\n", b"221 2.0.0 Bye\r\n")
    assert b"451 4.3.0 Internal error\r\n" in out


async def test_idle_timeout():
    server, port = await serve(idle_timeout=0.2)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        async with asyncio.timeout(10):
            data = b""
            while True:
                chunk = await reader.read(1024)
                if not chunk:
                    break
                data += chunk
        writer.close()
    assert data == b"220 mx.test ESMTP Impetus\r\n421 4.4.2 mx.test Error: timeout exceeded\r\n"


async def test_lmtp_per_recipient_replies():
    def per_rcpt(env):
        return [Reply(250, "2.1.5", f"<{r}> delivered") if "ok" in r else
                Reply(550, "5.1.1", f"<{r}> unknown") for r in env.rcpt_to]

    rec = Recorder(reply=per_rcpt)
    server, port = await serve(ServerSettings(hostname="lmtp.test", lmtp=True), rec)
    async with server:
        out = await talk(port, b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<ok1@d.example>\r\n"
                               b"RCPT TO:<no@d.example>\r\nRCPT TO:<ok2@d.example>\r\nDATA\r\nhi\r\n.\r\n"
                               b"QUIT\r\n", b"221 2.0.0 Bye\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        b"250 2.1.5 <ok1@d.example> delivered\r\n"
                        b"550 5.1.1 <no@d.example> unknown\r\n"
                        b"250 2.1.5 <ok2@d.example> delivered\r\n221 2.0.0 Bye\r\n")


async def test_policy_factory_and_big_body_flow_control():
    class P(Policy):
        def check_rcpt(self, session, addr, params):
            return None if addr.domain == "ok.example" else Reply(554, "5.7.1", "Relay access denied")

    rec = Recorder()
    server, port = await serve(on_message=rec, policy_factory=P)
    body = b"".join(b"%08d " % i + b"y" * 90 + b"\r\n" for i in range(30000))  # ~3 MB
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=20) as s:
                refused = s.sendmail("a@b.example", ["x@ok.example", "x@bad.example"], body)
                assert list(refused) == ["x@bad.example"]
        await asyncio.to_thread(send)
    assert rec.envelopes[0].body == body
    assert rec.envelopes[0].rcpt_to == ["x@ok.example"]


async def test_client_eof_after_pipelined_quit_still_answers():
    rec = Recorder(delay=0.05)
    server, port = await serve(on_message=rec)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
        writer.write_eof()
        async with asyncio.timeout(10):
            data = await reader.read()  # until EOF
        writer.close()
    assert data.endswith(b"250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n")


async def test_connections_tracking_and_shutdown():
    conns = set()
    server, port = await serve(connections=conns)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        await reader.readline()
        assert len(conns) == 1
        for proto in list(conns):
            proto.shutdown()
        async with asyncio.timeout(10):
            rest = await reader.read()
        writer.close()
    assert rest == b"421 4.3.2 Service shutting down\r\n"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.parametrize("lmtp", [False, True])
async def test_swaks_pipeline(lmtp):
    rec = Recorder()
    server, port = await serve(ServerSettings(hostname="mx.test", lmtp=lmtp), rec)
    async with server:
        cmd = ["swaks", "--server", f"{HOST}:{port}", "--helo", "swaks.test", "--pipeline",
               "--from", "s@src.example", "--to", "r1@dst.example,r2@dst.example",
               "--body", "line one\n.dot line\n", "--timeout", "10"]
        if lmtp:
            cmd += ["--protocol", "LMTP"]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")
    assert len(rec.envelopes) == 1
    env = rec.envelopes[0]
    assert env.rcpt_to == ["r1@dst.example", "r2@dst.example"]
    assert b"\r\n.dot line\r\n" in env.body
    assert env.helo == "swaks.test"


async def test_unix_socket_server(tmp_path):
    from impetus.smtp.serve import start_unix_server

    rec = Recorder()
    path = str(tmp_path / "lmtp.sock")
    server = await start_unix_server(path, ServerSettings(hostname="u.test", lmtp=True), None, rec)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"LHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
        async with asyncio.timeout(10):
            data = await reader.read()
        writer.close()
    assert data.startswith(b"220 u.test LMTP Impetus\r\n")
    assert data.endswith(b"250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n")
    assert rec.sessions[0].peer_ip == ""
