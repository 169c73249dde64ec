"""``delivery.Connection`` with STARTTLS (spec §7, D11) and XCLIENT (spec §8,
D10) against real TLS: recording sinks with trustme certificates, and small
scripted servers for refusals, stalls and injection."""
import asyncio
import logging
import ssl

import pytest

from impetus.delivery import ClientFacts, Connection, Timeouts, TlsPolicyError
from impetus.router import NextHop
from impetus.smtp.client import Stage
from impetus.tls import TlsSettings

pytestmark = pytest.mark.integration

BODY = b"Subject: t\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def quiet_sink_tls_errors():
    # aiosmtpd logs a traceback for every failed handshake (negative tests)
    logger = logging.getLogger("mail.log")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)


def hop(port, host="mx1.example.test", ip="127.0.0.2", proto="esmtp"):
    return NextHop(host, ip, port, 10, proto, "mx/a")


def conn(port, *, notes=None, timeout=5, host="mx1.example.test", ip="127.0.0.2", **tls):
    xclient = tls.pop("xclient", "no")
    settings = None
    if tls:
        tls.setdefault("names", (host, "example.test"))
        settings = TlsSettings(**tls)
    return Connection(hop(port, host, ip), Timeouts(connect=timeout, ehlo=timeout, mailfrom=timeout,
                                                    rcptto=timeout, body=timeout),
                      "impetus.test", tls=settings, xclient=xclient,
                      notice=(notes.append if notes is not None else None))


async def deliver(c, client=None):
    await c.open()
    res = await c.send("a@src.test", ["bob@example.test"], BODY, client=client)
    await c.quit()
    return res[0]


def server_ctx(certs, which="server", *, max_version=None, client_ca=False):
    ctx = certs.server_context(which)
    if max_version is not None:
        ctx.maximum_version = max_version
    if client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(certs.ca_pem)
    return ctx


# -- STARTTLS policy -----------------------------------------------------------------------
async def test_required_without_starttls_is_transient_and_sends_no_mail(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",))
    c = conn(sink.port, mode="required")
    with pytest.raises(TlsPolicyError) as ei:
        await c.open()
    assert str(ei.value.reply) == "451 4.7.6 [internal] STARTTLS required but not advertised"
    assert ei.value.stage == Stage.STARTTLS
    [s] = sink.wait_for_sessions(1)
    assert s["commands"] == ["EHLO impetus.test", "QUIT"]


async def test_ifavailable_without_starttls_is_plain(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",))
    c = conn(sink.port, mode="ifavailable")
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info is None and sink.messages[0]["tls"] is None


async def test_required_with_starttls_delivers_over_tls(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls=True)
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem)
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["version"] in ("TLSv1.2", "TLSv1.3") and c.tls_info["verified"]
    assert c.tls_info["matched"] == "mx1.example.test"
    [msg] = sink.messages
    assert msg["tls"] is not None
    cmds = sink.sessions[0]["commands"]
    assert cmds[:3] == ["EHLO impetus.test", "STARTTLS", "EHLO impetus.test"]


async def test_host_verification_fails_on_wrong_name(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls="wrongname")
    notes = []
    c = conn(sink.port, notes=notes, mode="required", verify="host", ca=certs.ca_pem)
    with pytest.raises(TlsPolicyError) as ei:
        await c.open()
    assert str(ei.value.reply) == "451 4.7.5 [internal] SSL certificate subject does not match host"
    assert ei.value.stage == Stage.TLS_HANDSHAKE
    assert "wrong.example.test" in notes[-1]
    assert not sink.messages


async def test_host_verification_accepts_the_domain_name(smtp_sinks, certs, tmp_path):
    # certificate for the domain itself (D11: the MX host name or the domain)
    leaf = certs.ca.issue_cert("example.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    sink = smtp_sinks(("127.0.0.2",), tls_context=ctx)
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem)
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["matched"] == "example.test"


async def test_host_verification_wildcard_certificate(smtp_sinks, certs):
    leaf = certs.ca.issue_cert("*.example.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    sink = smtp_sinks(("127.0.0.2",), tls_context=ctx)
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem, names=("mx1.example.test",))
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["matched"] == "mx1.example.test"


async def test_untrusted_ca_fails_ca_and_host(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls="untrusted")
    for verify in ("ca", "host"):
        c = conn(sink.port, mode="ifavailable", verify=verify, ca=certs.ca_pem)
        with pytest.raises(TlsPolicyError) as ei:
            await c.open()
        # never a plain-text fallback after a failed certificate check
        assert str(ei.value.reply) == \
            "451 4.7.5 [internal] remote node SSL certificate not signed by a valid CA"
    assert not sink.messages


async def test_verify_ca_ignores_the_name(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls="wrongname")
    c = conn(sink.port, mode="required", verify="ca", ca=certs.ca_pem)
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["verified"]


async def test_verify_no_accepts_anything(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls="untrusted")
    c = conn(sink.port, mode="required", verify="no")
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["verified"] is False


@pytest.mark.parametrize("which", ["wrongname", "untrusted"])
async def test_verify_optional_delivers_anyway(smtp_sinks, certs, which):
    sink = smtp_sinks(("127.0.0.2",), tls=which)
    notes = []
    c = conn(sink.port, notes=notes, mode="required", verify="optional", ca=certs.ca_pem)
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info["verified"] is False
    assert sink.messages[0]["tls"] is not None
    assert any("TLS_Verify = optional" in n for n in notes)


async def test_ifavailable_handshake_failure_falls_back_to_plain(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls_context=server_ctx(certs, max_version=ssl.TLSVersion.TLSv1_2))
    notes = []
    c = conn(sink.port, notes=notes, mode="ifavailable", protocols="-ALL:+TLSv1.3")
    assert (await deliver(c)).reply.code == 250
    assert c.tls_info is None
    assert sink.messages[0]["tls"] is None
    assert sink.connections_total == 2        # the failed handshake, then plain text
    assert any("retrying in plain text" in n for n in notes)


async def test_ifavailable_handshake_failure_without_fallback(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls_context=server_ctx(certs, max_version=ssl.TLSVersion.TLSv1_2))
    c = conn(sink.port, mode="ifavailable", fallback=False, protocols="-ALL:+TLSv1.3")
    with pytest.raises(TlsPolicyError) as ei:
        await c.open()
    assert str(ei.value.reply) == "451 4.7.5 [internal] TLS negotiation failed"
    assert ei.value.stage == Stage.TLS_HANDSHAKE
    assert not sink.messages


async def test_client_certificate_is_presented(smtp_sinks, certs, tmp_path):
    leaf = certs.ca.issue_cert("impetus.test")
    crt, key = tmp_path / "client.crt", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(crt))
    leaf.private_key_pem.write_to_path(str(key))
    sink = smtp_sinks(("127.0.0.2",), tls_context=server_ctx(certs, client_ca=True))
    seen = []
    orig = sink.handler.handle_EHLO

    async def handle_ehlo(server, session, envelope, hostname, responses):
        seen.append(server.transport.get_extra_info("peercert"))
        return await orig(server, session, envelope, hostname, responses)
    sink.handler.handle_EHLO = handle_ehlo
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem, cert=str(crt), key=str(key))
    assert (await deliver(c)).reply.code == 250
    assert seen[0] is None                       # before STARTTLS
    subject = dict(x for rdn in seen[-1]["subject"] for x in rdn)
    assert ("DNS", "impetus.test") in seen[-1]["subjectAltName"] or subject
    # without TLS_Certificate nothing is presented
    seen.clear()
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem)
    assert (await deliver(c)).reply.code == 250
    assert seen[-1] is None


# -- scripted servers: refusal, stall, injection ------------------------------------------------
async def scripted(handler, host="127.0.0.2"):
    """Line-based fake SMTP server: ``handler(line) -> reply bytes | None``;
    the special reply ``"STALL"`` stops answering (and reading TLS)."""
    async def session(reader, writer):
        writer.write(b"220 fake ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = handler(line.rstrip(b"\r\n").decode())
                if reply == "STALL":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await asyncio.sleep(3600)
                if reply:
                    writer.write(reply)
                    await writer.drain()
                if line.upper().startswith(b"QUIT"):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(session, host, 0)
    return server, server.sockets[0].getsockname()[1]


def ehlo_reply(*ext):
    lines = ["fake"] + list(ext)
    return "".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n" for i, x in enumerate(lines)).encode()


def basic(line, ext=("STARTTLS",), starttls=b"454 4.7.0 TLS not available\r\n", xclient=None):
    cmd = line.split(" ")[0].upper()
    if cmd in ("EHLO", "LHLO"):
        return ehlo_reply(*ext)
    if cmd == "STARTTLS":
        return starttls
    if cmd == "XCLIENT":
        return xclient
    if cmd in ("MAIL", "RCPT", "RSET", "NOOP"):
        return b"250 2.0.0 ok\r\n"
    if cmd == "DATA":
        return b"354 go\r\n"
    if cmd == "QUIT":
        return b"221 bye\r\n"
    if line == ".":
        return b"250 2.0.0 queued\r\n"
    return None


async def test_starttls_refused(certs):
    server, port = await scripted(basic)
    try:
        c = conn(port, mode="required")
        with pytest.raises(TlsPolicyError) as ei:
            await c.open()
        assert str(ei.value.reply) == "451 4.7.5 [internal] no tls go-ahead"
        assert ei.value.stage == Stage.STARTTLS
        # ifavailable + fallback: the same session goes on in plain text
        c = conn(port, mode="ifavailable")
        assert (await deliver(c)).reply.code == 250 and c.tls_info is None
        c = conn(port, mode="ifavailable", fallback=False)
        with pytest.raises(TlsPolicyError):
            await c.open()
    finally:
        server.close()


async def test_stalled_handshake_times_out(certs):
    server, port = await scripted(lambda line: "STALL" if line.upper() == "STARTTLS"
                                  else basic(line))
    try:
        c = conn(port, timeout=1, mode="required")
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(TlsPolicyError) as ei:
            await c.open()
        assert asyncio.get_running_loop().time() - t0 < 5
        assert str(ei.value.reply) == "451 4.7.5 [internal] TLS negotiation failed"
        assert ei.value.stage == Stage.TLS_HANDSHAKE
    finally:
        server.close()


async def test_stalled_starttls_reply_times_out(certs):
    server, port = await scripted(lambda line: None if line.upper() == "STARTTLS" else basic(line))
    try:
        c = conn(port, timeout=1, mode="required")
        with pytest.raises(TlsPolicyError) as ei:
            await c.open()
        assert str(ei.value.reply) == "451 4.7.5 [internal] send STARTTLS failed"
        assert ei.value.stage == Stage.STARTTLS
    finally:
        server.close()


async def test_plaintext_injected_after_go_ahead_is_refused(certs):
    server, port = await scripted(lambda line: b"220 go ahead\r\n250 injected\r\n"
                                  if line.upper() == "STARTTLS" else basic(line))
    try:
        c = conn(port, mode="required", verify="no")
        with pytest.raises(TlsPolicyError) as ei:
            await c.open()
        assert str(ei.value.reply) == "451 4.7.5 [internal] TLS negotiation failed"
    finally:
        server.close()


# -- XCLIENT ------------------------------------------------------------------------------------
CLIENT = ClientFacts.from_reception("127.0.0.7", "client.test", "esmtp")


async def test_xclient_sends_advertised_attributes_then_ehlo(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",), ehlo_extra=("PIPELINING", "XCLIENT ADDR HELO NAME"))
    c = conn(sink.port, xclient="ifavailable")
    assert (await deliver(c, CLIENT)).reply.code == 250
    [msg] = sink.messages
    assert msg["xclient"] == {"NAME": "[UNAVAILABLE]", "ADDR": "127.0.0.7", "HELO": "client.test"}
    cmds = sink.sessions[0]["commands"]
    assert cmds[:4] == ["EHLO impetus.test", "XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.7 HELO=client.test",
                        "EHLO impetus.test", "MAIL FROM:<a@src.test> SIZE=21"]


async def test_xclient_after_starttls(smtp_sinks, certs):
    sink = smtp_sinks(("127.0.0.2",), tls=True)
    c = conn(sink.port, mode="required", verify="host", ca=certs.ca_pem, xclient="required")
    assert (await deliver(c, CLIENT)).reply.code == 250
    cmds = sink.sessions[0]["commands"]
    assert [x.split(" ")[0] for x in cmds[:6]] == ["EHLO", "STARTTLS", "EHLO", "XCLIENT", "EHLO", "MAIL"]
    assert sink.messages[0]["xclient"]["ADDR"] == "127.0.0.7"
    assert sink.messages[0]["tls"] is not None


async def test_xclient_before_each_message(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",))
    c = conn(sink.port, xclient="ifavailable")
    await c.open()
    other = ClientFacts.from_reception("::1", "v6.client.test", "esmtp")
    for client in (CLIENT, other, CLIENT):
        [r] = await c.send("a@src.test", ["bob@example.test"], BODY, client=client)
        assert r.reply.code == 250
    await c.quit()
    assert [m["xclient"]["ADDR"] for m in sink.messages] == ["127.0.0.7", "IPV6:::1", "127.0.0.7"]
    assert [m["xclient"]["HELO"] for m in sink.messages][1] == "v6.client.test"
    assert sink.connections_total == 1
    assert sum(x.startswith("XCLIENT") for x in sink.sessions[0]["commands"]) == 3


async def test_xclient_required_but_not_advertised(smtp_sinks):
    sink = smtp_sinks(("127.0.0.2",), ehlo_extra=("PIPELINING", "ENHANCEDSTATUSCODES"))
    c = conn(sink.port, xclient="required")
    r = await deliver(c, CLIENT)
    assert str(r.reply) == "451 4.7.6 [internal] XCLIENT required but not advertised"
    assert r.stage == Stage.XCLIENT
    assert not sink.messages
    c = conn(sink.port, xclient="ifavailable")
    assert (await deliver(c, CLIENT)).reply.code == 250
    assert sink.messages[0]["xclient"] is None


async def test_xclient_refused():
    server, port = await scripted(lambda line: basic(line, ext=("XCLIENT ADDR HELO",),
                                                     xclient=b"550 5.7.0 not authorized\r\n"))
    try:
        r = await deliver(conn(port, xclient="required"), CLIENT)
        assert str(r.reply) == "451 4.4.2 [internal] send XCLIENT failed"
        assert r.stage == Stage.XCLIENT
        r = await deliver(conn(port, xclient="ifavailable"), CLIENT)
        assert r.reply.code == 250          # sent without XCLIENT
    finally:
        server.close()


async def test_xclient_no_response():
    server, port = await scripted(lambda line: basic(line, ext=("XCLIENT ADDR",), xclient=None))
    try:
        c = conn(port, timeout=1, xclient="ifavailable")
        await c.open()
        [r] = await c.send("a@src.test", ["bob@example.test"], BODY, client=CLIENT)
        assert str(r.reply) == "451 4.4.2 [internal] no XCLIENT response"
        assert r.stage == Stage.XCLIENT and c.broken
        c.close()
    finally:
        server.close()


async def test_xclient_ehlo_failure_is_stage_20():
    state = {"xclient": False}

    def handler(line):
        if line.upper().startswith("XCLIENT"):
            state["xclient"] = True
            return b"220 again\r\n"
        if line.upper().startswith("EHLO") and state["xclient"]:
            return b"421 4.3.0 going away\r\n"
        return basic(line, ext=("XCLIENT ADDR",))
    server, port = await scripted(handler)
    try:
        c = conn(port, xclient="required")
        await c.open()
        [r] = await c.send("a@src.test", ["bob@example.test"], BODY, client=CLIENT)
        assert r.reply.code == 421 and r.stage == Stage.AFTER_XCLIENT
        c.close()
    finally:
        server.close()


async def test_session_that_stops_offering_xclient_is_reopened():
    # After the first XCLIENT the (impersonated) session no longer offers
    # XCLIENT: a message from another client needs a fresh session.
    sessions = []

    async def session(reader, writer):
        sessions.append([])
        xclient_done = in_data = False
        writer.write(b"220 fake\r\n")
        while raw := await reader.readline():
            line = raw.rstrip(b"\r\n").decode()
            if in_data:
                if line == ".":
                    in_data = False
                    writer.write(b"250 2.0.0 queued\r\n")
                continue
            sessions[-1].append(line)
            cmd = line.split(" ")[0].upper()
            if cmd == "DATA":
                in_data = True
                writer.write(b"354 go\r\n")
            elif cmd == "EHLO":
                writer.write(ehlo_reply() if xclient_done else ehlo_reply("XCLIENT ADDR HELO"))
            elif cmd == "XCLIENT":
                xclient_done = True
                writer.write(b"220 fake again\r\n")
            elif cmd == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(basic(line) or b"")
        writer.close()
    server = await asyncio.start_server(session, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = conn(port, xclient="required")
        await c.open()
        other = ClientFacts.from_reception("127.0.0.8", "other.test", "esmtp")
        for client in (CLIENT, CLIENT, other):
            [r] = await c.send("a@src.test", ["bob@example.test"], BODY, client=client)
            assert r.reply.code == 250, r.reply
        await c.quit()
        assert len(sessions) == 2
        assert sum(x.startswith("XCLIENT") for x in sessions[0]) == 1   # same client: kept
        assert "XCLIENT ADDR=127.0.0.8 HELO=other.test" in sessions[1]
    finally:
        server.close()


async def test_failed_reopen_leaves_the_connection_broken():
    # as above, but the host accepts no new connection when a fresh session is needed
    async def session(reader, writer):
        xclient_done = False
        writer.write(b"220 fake\r\n")
        while raw := await reader.readline():
            cmd = raw.split(b" ")[0].strip().upper()
            if cmd == b"EHLO":
                writer.write(ehlo_reply() if xclient_done else ehlo_reply("XCLIENT ADDR"))
            elif cmd == b"XCLIENT":
                xclient_done = True
                server.close()          # no more sessions
                writer.write(b"220 again\r\n")
            elif cmd == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
        writer.close()
    server = await asyncio.start_server(session, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = conn(port, xclient="ifavailable")
        await c.open()
        await c._xclient(CLIENT)                          # XCLIENT accepted, no longer offered
        other = ClientFacts.from_reception("127.0.0.8")
        [r] = await c.send("a@src.test", ["bob@example.test"], BODY, client=other)
        assert r.reply.code == 421 and "connect to 127.0.0.2" in r.reply.text
        assert c.broken
    finally:
        server.close()
