"""asyncio glue on 127.0.0.1: STARTTLS, implicit TLS, client certificates,
AUTH, XCLIENT and the session concurrency limit (trustme certificates from
the ``certs`` fixture)."""
import asyncio
import shutil
import smtplib
import ssl
import subprocess

import pytest

from impetus.auth import PasswordFile, set_password
from impetus.smtp import client as smtp_client
from impetus.smtp.reply import Reply
from impetus.smtp.serve import SessionCounter, start_server
from impetus.smtp.server import Policy, ServerSettings

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class Recorder:
    def __init__(self):
        self.envelopes = []
        self.sessions = []

    async def __call__(self, envelope, session):
        self.envelopes.append(envelope)
        self.sessions.append(session)
        return Reply(250, "2.0.0", f"Ok: queued as {len(self.envelopes)}")


class UserPolicy(Policy):
    users = {"alice": "correct horse"}

    def __init__(self):
        self.rejects = []
        self.sessions = []

    def check_connect(self, session):
        self.sessions.append(session)

    def check_auth(self, session, mechanism, username, password):
        return self.users.get(username) == password

    def allow_xclient(self, session):
        return session.peer_ip == "127.0.0.1"

    def on_reject(self, session, reply, phase):
        self.rejects.append((reply.code, phase))


def settings(certs=None, **kw):
    kw.setdefault("hostname", "mx.test")
    if certs is not None:
        kw.setdefault("tls_context", certs.server_context())
    return ServerSettings(**kw)


async def serve(s, on_message=None, policy=UserPolicy, **kw):
    server = await start_server(HOST, 0, s, policy, on_message or Recorder(), **kw)
    return server, server.sockets[0].getsockname()[1]


async def read_until(reader, until: bytes, timeout=10.0) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout):
        while not buf.endswith(until):
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
    return buf


def client_cert_context(certs, with_cert: bool) -> ssl.SSLContext:
    ctx = certs.client_context()
    if with_cert:
        certs.ca.issue_cert("client.example.test", common_name="client.example.test").configure_cert(ctx)
    return ctx


AUTH_ON = {"auth_mechanisms": ("PLAIN", "LOGIN")}


async def test_smtplib_starttls_verified_then_auth(certs):
    rec = Recorder()
    server, port = await serve(settings(certs, **AUTH_ON), rec)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.ehlo("client.test")
                assert s.has_extn("starttls") and not s.has_extn("auth")
                with pytest.raises(smtplib.SMTPNotSupportedError):
                    s.login("alice", "correct horse")
                s.starttls(context=certs.client_context())     # verifies mx cert for 127.0.0.1
                s.ehlo("client.test")
                assert not s.has_extn("starttls") and s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
                with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
                    s.login("alice", "wrong")
                assert exc.value.smtp_code == 535
                code, _ = s.login("alice", "correct horse")
                assert code == 235
                s.sendmail("a@src.example", ["r@dst.example"], b"Subject: t\r\n\r\nhi\r\n")
        await asyncio.to_thread(send)
    sess = rec.sessions[0]
    assert sess.tls and sess.authenticated == "alice" and sess.auth_mechanism == "PLAIN"
    assert sess.tls_info["version"] in ("TLSv1.2", "TLSv1.3") and sess.tls_info["cipher"]
    assert sess.tls_peer_verified is False and sess.tls_info["peer_cert"] is False
    assert rec.envelopes[0].helo == "client.test"


async def test_auth_login_over_tls(certs):
    rec = Recorder()
    server, port = await serve(settings(certs, **AUTH_ON), rec)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.starttls(context=certs.client_context())
                s.ehlo("c")
                s.user, s.password = "alice", "correct horse"
                code, _ = s.auth("LOGIN", s.auth_login)
                assert code == 235
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        await asyncio.to_thread(send)
    assert rec.sessions[0].auth_mechanism == "LOGIN"


async def test_starttls_injection_over_socket(certs):
    rec = Recorder()
    server, port = await serve(settings(certs), rec)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        await reader.readline()
        # One packet: STARTTLS plus a plaintext transaction behind it.
        writer.write(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n")
        out = await read_until(reader, b"220 2.0.0 Ready to start TLS\r\n")
        assert b"250-STARTTLS\r\n" in out and out.endswith(b"\r\n220 2.0.0 Ready to start TLS\r\n")
        await writer.start_tls(certs.client_context(), server_hostname="localhost")
        writer.write(b"DATA\r\n")
        assert await reader.readline() == b"503 5.5.1 need MAIL command\r\n"
        writer.write(b"QUIT\r\n")
        assert await reader.readline() == b"221 2.0.0 Bye\r\n"
        writer.close()
    assert rec.envelopes == []


async def test_implicit_tls(certs):
    rec = Recorder()
    server, port = await serve(settings(None, **AUTH_ON), rec, ssl=certs.server_context())
    async with server:
        def send():
            with smtplib.SMTP_SSL(HOST, port, timeout=10, context=certs.client_context()) as s:
                s.ehlo("c")
                assert not s.has_extn("starttls") and s.has_extn("auth")
                s.login("alice", "correct horse")
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        await asyncio.to_thread(send)
    sess = rec.sessions[0]
    assert sess.tls and sess.tls_info["version"] and sess.authenticated == "alice"


@pytest.mark.parametrize("with_cert", [True, False])
async def test_client_certificate_verified_or_not(certs, with_cert):
    server_ctx = certs.server_context()
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    certs.ca.configure_trust(server_ctx)
    rec = Recorder()
    server, port = await serve(ServerSettings(hostname="mx.test", tls_context=server_ctx), rec)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.starttls(context=client_cert_context(certs, with_cert))
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        await asyncio.to_thread(send)
    sess = rec.sessions[0]
    assert sess.tls_peer_verified is with_cert
    assert sess.tls_info["peer_cert"] is with_cert
    if with_cert:
        subject = sess.tls_info["peer_subject"]
        assert "CN=client.example.test" in subject.split(",") and "O=trustme" in subject
    else:
        assert sess.tls_info["peer_subject"] is None


async def test_client_certificate_required_handshake_fails(certs):
    server_ctx = certs.server_context()
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    certs.ca.configure_trust(server_ctx)
    rec = Recorder()
    conns = set()
    counter = SessionCounter()
    server, port = await serve(ServerSettings(hostname="mx.test", tls_context=server_ctx), rec,
                               connections=conns, sessions_counter=counter)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                try:
                    s.starttls(context=client_cert_context(certs, False))
                    s.ehlo("c")   # TLS 1.3: the refusal shows on the first read
                except (smtplib.SMTPServerDisconnected, ssl.SSLError, ConnectionError):
                    return "refused"
                return "accepted"
        assert await asyncio.to_thread(send) == "refused"
        async with asyncio.timeout(10):
            while conns or counter.active:
                await asyncio.sleep(0.02)
        # the server still works for a client with a certificate
        def send_ok():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.starttls(context=client_cert_context(certs, True))
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        await asyncio.to_thread(send_ok)
    assert len(rec.envelopes) == 1 and rec.sessions[0].tls_peer_verified


async def test_starttls_without_context_is_454():
    server, port = await serve(ServerSettings(hostname="mx.test", starttls=True))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        await reader.readline()
        writer.write(b"STARTTLS\r\nQUIT\r\n")
        out = await read_until(reader, b"221 2.0.0 Bye\r\n")
        writer.close()
    assert out == b"454 4.7.0 TLS not available due to temporary reason\r\n221 2.0.0 Bye\r\n"


async def test_xclient_over_socket():
    rec = Recorder()
    server, port = await serve(ServerSettings(hostname="mx.test"), rec)
    async with server:
        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.ehlo("proxy.test")
                assert s.esmtp_features["xclient"].split() == ["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"]
                code, msg = s.docmd("XCLIENT", "ADDR=IPV6:2001:db8::25 NAME=orig.example.net PORT=2525 "
                                               "HELO=orig+2Ehelo")
                assert (code, msg) == (220, b"mx.test ESMTP Impetus")
                s.ehlo("proxy.test")
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        await asyncio.to_thread(send)
    sess, env = rec.sessions[0], rec.envelopes[0]
    assert (sess.peer_ip, sess.peer_port, sess.xclient_name) == ("2001:db8::25", 2525, "orig.example.net")
    assert sess.proxy_ip == "127.0.0.1" and env.helo == "orig.helo"


async def test_xclient_from_our_outbound_encoder_and_untrusted():
    class Untrusted(UserPolicy):
        def allow_xclient(self, session):
            return False

    policies = []

    def factory():
        policies.append(Untrusted())
        return policies[-1]

    server, port = await serve(ServerSettings(hostname="mx.test"), policy=factory)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        await reader.readline()
        writer.write(b"EHLO x\r\n" + smtp_client.xclient({"ADDR": "192.0.2.1", "NAME": None}))
        out = await read_until(reader, b"Insufficient authorization\r\n")
        writer.close()
    assert b"XCLIENT" not in out.split(b"\r\n550")[0]
    assert out.endswith(b"550 5.7.0 Insufficient authorization\r\n")
    assert policies[0].rejects == [(550, "xclient")]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
async def test_swaks_xclient_and_auth_plaintext_when_allowed():
    rec = Recorder()
    s = ServerSettings(hostname="mx.test", auth_mechanisms=("PLAIN", "LOGIN"), auth_without_tls=True)
    server, port = await serve(s, rec)
    async with server:
        cmd = ["swaks", "--server", f"{HOST}:{port}", "--helo", "proxy.test",
               "--from", "s@src.example", "--to", "r@dst.example",
               "--xclient-addr", "192.0.2.44", "--xclient-name", "orig.example.net",
               "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "correct horse",
               "--timeout", "10"]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")
    sess = rec.sessions[0]
    assert sess.peer_ip == "192.0.2.44" and sess.xclient_name == "orig.example.net"
    assert sess.authenticated == "alice"


async def test_async_check_auth_with_password_file(tmp_path, certs):
    path = tmp_path / "passwd"
    set_password(str(path), "carol", "p4ss word")
    pw = PasswordFile(path)

    class P(Policy):
        async def check_auth(self, session, mechanism, username, password):
            return await pw.averify(username, password)

    rec = Recorder()
    server, port = await serve(settings(certs, **AUTH_ON), rec, policy=P)
    async with server:
        # while the hash runs in a thread, the loop keeps serving others
        reader, writer = await asyncio.open_connection(HOST, port)
        await reader.readline()

        def send():
            with smtplib.SMTP(HOST, port, timeout=10) as s:
                s.starttls(context=certs.client_context())
                s.ehlo("c")
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    s.login("carol", "bad")
                s.login("carol", "p4ss word")
                s.sendmail("a@src.example", ["r@dst.example"], b"x\r\n")
        task = asyncio.create_task(asyncio.to_thread(send))
        writer.write(b"NOOP\r\n")
        assert await reader.readline() == b"250 2.0.0 Ok\r\n"
        await task
        writer.close()
    assert rec.sessions[0].authenticated == "carol"


async def test_session_limit_421():
    counter = SessionCounter()
    server, port = await serve(ServerSettings(hostname="mx.test"), max_sessions=2,
                               sessions_counter=counter)
    async with server:
        held = []
        for _ in range(2):
            r, w = await asyncio.open_connection(HOST, port)
            assert (await r.readline()).startswith(b"220 ")
            held.append((r, w))
        assert counter.active == 2
        r3, w3 = await asyncio.open_connection(HOST, port)
        async with asyncio.timeout(10):
            data = await r3.read()
        w3.close()
        assert data == b"421 4.4.5 Service unavailable, concurrency limit reached\r\n"
        # one leaves, a new one gets in
        held[0][1].write(b"QUIT\r\n")
        assert await held[0][0].readline() == b"221 2.0.0 Bye\r\n"
        held[0][1].close()
        async with asyncio.timeout(10):
            while counter.active != 1:
                await asyncio.sleep(0.01)
        r4, w4 = await asyncio.open_connection(HOST, port)
        assert (await r4.readline()).startswith(b"220 ")
        for _, w in held[1:] + [(r4, w4)]:
            w.close()


async def test_shared_counter_across_servers():
    shared = SessionCounter(limit=1)
    policies = []

    def factory():
        policies.append(UserPolicy())
        return policies[-1]

    s1, p1 = await serve(ServerSettings(hostname="a.test"), sessions_counter=shared, policy=factory)
    s2, p2 = await serve(ServerSettings(hostname="b.test"), sessions_counter=shared, policy=factory)
    async with s1, s2:
        r1, w1 = await asyncio.open_connection(HOST, p1)
        assert (await r1.readline()) == b"220 a.test ESMTP Impetus\r\n"
        r2, w2 = await asyncio.open_connection(HOST, p2)
        async with asyncio.timeout(10):
            data = await r2.read()
        assert data.startswith(b"421 4.4.5 ")
        w1.close()
        w2.close()
    assert (421, "connect") in policies[-1].rejects
