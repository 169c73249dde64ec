"""``impetus console`` in batch mode against a running ``impetus serve`` (issue 7).

Every test drives the real server through the real console client
(``python -m impetus.cli console -s SOCKET COMMAND``) and checks what the
sinks, logs and the console itself report.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.mta import MTA, free_port, wait_until

pytestmark = pytest.mark.integration


def short_socket_dir() -> str:
    """Unix socket paths must stay under ~100 bytes: not inside tmp_path."""
    return tempfile.mkdtemp(prefix="ictl", dir="/tmp")


class ConsoleMTA(MTA):
    """An MTA with a Control_Listener on a Unix socket (and optionally TCP)."""

    def __init__(self, workdir, resolv_conf, body: str = "", *, control_tcp: str | None = None,
                 password_file: str | None = None, **kw):
        self.sockdir = short_socket_dir()
        atexit.register(shutil.rmtree, self.sockdir, True)
        self.control_socket = os.path.join(self.sockdir, "ctl")
        tcp = ""
        if control_tcp:
            tcp = (f'  Listen "{control_tcp}" {{ Enable_Authentication = true '
                   f'Control_Password_File = "{password_file}" }}\n')
        control = f'Control_Listener {{\n  Listen "{self.control_socket}" {{ }}\n{tcp}}}\n'
        super().__init__(workdir, resolv_conf, body=control + body, **kw)

    def console(self, *command: str, target: str | None = None, env=None,
                check: bool | None = None) -> subprocess.CompletedProcess:
        """Run ``impetus console -s SOCKET COMMAND...`` (batch mode)."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "impetus.cli", "console", "-s",
             target or self.control_socket, *command],
            capture_output=True, text=True, timeout=60, env=full_env)
        if check is True:
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    def summary(self) -> dict[str, int]:
        out = self.console("summary", check=True).stdout
        values = {}
        for line in out.splitlines():
            key, _, value = line.partition(": ")
            m = re.match(r"(\d+)", value)
            if m:
                values[key] = int(m.group(1))
        return values



def passwd_line(user: str, password: str) -> str:
    """A password file line (``impetus passwd`` format: salted scrypt)."""
    import base64
    import hashlib
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=2 ** 14, r=8, p=1, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")  # noqa: E731
    return f"{user}:scrypt$n=16384,r=8,p=1${b64(salt)}${b64(key)}\n"


def rewrite_config(m: MTA, old: str, new: str) -> None:
    text = m.config_path.read_text()
    assert old in text
    m.config_path.write_text(text.replace(old, new))


# ---------------------------------------------------------------------------


def test_summary_counts_match_the_mail_injected(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    sink.set_rcpt_reply("later@slow.test", "451 4.2.0 try again later")
    body = (f'Gateway = "127.0.0.5:{sink.port}"\nRetry_Interval = 600\n')
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["x@example.test", "y@example.test"])
        m.send("b@src.test", ["z@other.test"])
        m.send("c@src.test", ["later@slow.test"])
        m.mainlog.wait_for("D", 3)
        m.mainlog.wait_for("T", 1)
        s = m.summary()
        assert s["Received"] == 4
        assert s["Delivered"] == 3
        assert s["Transient failures"] == 1
        assert s["Permanent failures"] == 0
        assert s["Delayed queue size"] == 1
        assert s["Active queue size"] == 0
        assert s["Total queue size"] == 1
        # per binding
        out = m.console("binding", "summary", check=True).stdout.splitlines()
        assert out[0].split()[:4] == ["BINDING", "GROUP", "CONNS", "ACTIVE"]
        row = next(ln.split() for ln in out[1:] if ln.startswith("default"))
        # BINDING GROUP CONNS ACTIVE DELAYED TOTAL RECEIVED DELIVERED TRANSIENT FAILED
        assert row[4:] == ["1", "1", "4", "3", "1", "0"]
        # mailq / delayed / showqueue agree
        mailq = m.console("mailq", check=True).stdout
        assert re.search(rf"default\s+default\s+127\.0\.0\.5:{sink.port}\s+0\s+1", mailq)
        delayed = m.console("delayed", check=True).stdout
        assert "total (1 queues)" in delayed
        shown = m.console("showqueue", "slow.test", check=True).stdout
        assert "[delayed/default]" in shown and "To: <later@slow.test>" in shown
        # reset
        assert "statistics reset" in m.console("summary", "reset", check=True).stdout
        assert m.summary()["Received"] == 0


def test_fail_domain_bounces_queued_mail(tmp_path, dns_server, smtp_sinks):
    bounces = smtp_sinks(("127.0.0.6",))
    dead = free_port("127.0.0.7")  # nothing listens there: mail is delayed
    body = (f'Retry_Interval = 600\n'
            f'Domain "dead.test" {{ Gateway = "127.0.0.7:{dead}" }}\n'
            f'Domain "src.test" {{ Gateway = "127.0.0.6:{bounces.port}" }}\n')
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("sender@src.test", ["a@dead.test", "b@dead.test"])
        m.send("quiet@src.test", ["c@dead.test"])
        m.mainlog.wait_for("T", 3)
        assert m.summary()["Delayed queue size"] == 3
        # one message, quietly: no bounce
        shown = m.console("showqueue", "dead.test", check=True).stdout
        ids = re.findall(r"\] (\S+) Created: \d+\n  From: <quiet@src\.test>", shown)
        assert len(ids) == 1
        details = m.console("message", "details", ids[0], check=True).stdout
        assert "to: <c@dead.test>" in details and "delayed" in details
        out = m.console("message", "fail", "quiet", ids[0], check=True).stdout
        assert "failed (no bounce)" in out
        # the rest of the domain: bounced
        out = m.console("fail", "domain", "dead.test", check=True).stdout
        assert "2 message(s) failed" in out
        panic = "\n".join(m.paniclog.lines())
        assert "control command by local@unix socket: fail domain dead.test -> ok " \
               "(2 message(s) failed)" in panic
        [bounce] = bounces.wait_for(1)
        perms = m.mainlog.wait_for("P", 3)
        assert all("554 5.7.0 [internal] Message manually" in p[-1] for p in perms)
        assert sum("manually purged" in p[-1] for p in perms) == 2
        assert bounce["mail_from"] == "<>" or bounce["mail_from"] == ""
        assert bounce["rcpt_tos"] == ["sender@src.test"]
        assert b"manually purged" in bounce["data"]
        assert b"a@dead.test" in bounce["data"] and b"b@dead.test" in bounce["data"]
        wait_until(lambda: m.summary()["Total queue size"] == 0, 10, what="empty queue")
        time.sleep(0.3)
        assert len(bounces.messages) == 1  # nothing for the quiet one
        # unknown ids and domains
        r = m.console("message", "fail", ids[0])
        assert r.returncode == 1 and "no queued message" in r.stderr
        assert "0 message(s) failed" in m.console("fail", "domain", "none.test").stdout


def test_flush_domain_delivers_delayed_mail_at_once(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    sink.set_rcpt_reply("x@later.test", "451 4.2.0 not now")
    body = f'Gateway = "127.0.0.5:{sink.port}"\nRetry_Interval = 3600\n'
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["x@later.test"])
        m.mainlog.wait_for("T", 1)
        sink.set_rcpt_reply("x@later.test", None)
        time.sleep(0.5)
        assert sink.messages == []          # the retry is an hour away
        out = m.console("flush", "domain", "later.test", check=True).stdout
        assert "1 delayed message(s) made due now" in out
        [msg] = sink.wait_for(1, timeout=10)
        assert msg["rcpt_tos"] == ["x@later.test"]
        m.mainlog.wait_for("D", 1)
        # message retry on one id
        sink.set_rcpt_reply("y@later.test", "451 4.2.0 not now")
        m.send("a@src.test", ["y@later.test"])
        m.mainlog.wait_for("T", 2)
        sink.set_rcpt_reply("y@later.test", None)
        shown = m.console("showqueue", "later.test", check=True).stdout
        [msgid] = re.findall(r"\[delayed/default\] (\S+) ", shown)
        assert "made due now" in m.console("message", "retry", msgid, check=True).stdout
        sink.wait_for(2, timeout=10)
        # binding flush of a binding with nothing delayed
        out = m.console("binding", "flush", "domain", "default", "all", check=True).stdout
        assert "0 delayed message(s)" in out
        r = m.console("binding", "flush", "domain", "nosuch", "all")
        assert r.returncode == 1 and "no binding named 'nosuch'" in r.stderr


def test_config_reload_changes_the_gateway_and_refuses_a_broken_file(tmp_path, dns_server,
                                                                     smtp_sinks):
    first = smtp_sinks(("127.0.0.5",))
    second = smtp_sinks(("127.0.0.6",))
    body = f'Gateway = "127.0.0.5:{first.port}"\n'
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["one@example.test"])
        first.wait_for(1)
        rewrite_config(m, f'Gateway = "127.0.0.5:{first.port}"',
                       f'Gateway = "127.0.0.6:{second.port}"')
        r = m.console("config", "reload", check=True)
        assert "reloaded" in r.stdout
        m.send("a@src.test", ["two@example.test"])
        [msg] = second.wait_for(1)
        assert msg["rcpt_tos"] == ["two@example.test"]
        assert len(first.messages) == 1
        ev = m.console("config", "eval", "domain", "example.test", "Gateway", check=True).stdout
        assert f"127.0.0.6:{second.port}" in ev
        # a broken file is refused, with FILE:LINE:COL errors, and nothing changes
        good = m.config_path.read_text()
        m.config_path.write_text(good + "\nNo_Such_Option = 1\nRetry_Interval = soon\n")
        r = m.console("config", "reload")
        assert r.returncode == 1
        assert "configuration refused" in r.stderr
        lines = r.stdout.splitlines()
        assert any(re.match(rf"{re.escape(str(m.config_path))}:\d+:1: unknown option "
                            r"'No_Such_Option'", ln) for ln in lines), r.stdout
        assert any("Retry_Interval" in ln for ln in lines), r.stdout
        assert "2 configuration errors" in r.stdout
        m.send("a@src.test", ["three@example.test"])
        second.wait_for(2)
        assert "config reload refused" in "\n".join(m.paniclog.lines())
        assert m.console("summary").returncode == 0
        # and SIGHUP reloads too (with the fixed file)
        m.config_path.write_text(good.replace(f'Gateway = "127.0.0.6:{second.port}"',
                                              f'Gateway = "127.0.0.5:{first.port}"'))
        m.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: sum("configuration reloaded" in ln for ln in m.paniclog.lines()) >= 2,
                   10, what="SIGHUP reload")
        m.send("a@src.test", ["four@example.test"])
        first.wait_for(2)


def test_config_reload_lifts_suspend_delivery_and_warns_about_bind_address(tmp_path,
                                                                          dns_server,
                                                                          smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    body = (f'Gateway = "127.0.0.5:{sink.port}"\nSuspend_Delivery = true\n'
            f'Binding "b1" {{ Bind_Address = "127.0.0.1" }}\n')
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["x@example.test"])
        wait_until(lambda: m.summary()["Active queue size"] == 1, 10, what="held mail")
        time.sleep(0.3)
        assert sink.messages == []
        rewrite_config(m, "Suspend_Delivery = true", "Suspend_Delivery = false")
        rewrite_config(m, 'Bind_Address = "127.0.0.1"', 'Bind_Address = "127.0.0.2"')
        r = m.console("config", "reload", check=True)
        assert "Bind_Address of binding 'b1' changed" in r.stdout
        assert "restart" in r.stdout
        sink.wait_for(1)
        got = m.console("config", "get", "binding", "b1", "Bind_Address", check=True).stdout
        assert "127.0.0.2" in got


def test_refresh_domain_picks_up_a_changed_mx_at_once(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    dns_server.add("moving IN MX 10 old-mx.moving.test.", ttl=3600)
    dns_server.add("old-mx.moving IN A 127.0.0.2", ttl=3600)
    dns_server.add("new-mx.moving IN A 127.0.0.3", ttl=3600)
    body = f"Remote_SMTP_Port = {sink.port}\nIdle_Timeout = 30\n"
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        m.send("a@src.test", ["one@moving.test"])
        [msg] = sink.wait_for(1)
        assert msg["sockname"][0] == "127.0.0.2"
        out = m.console("domain", "moving.test", check=True).stdout
        assert "=> 1. old-mx.moving.test 127.0.0.2" in out
        assert "connections: 1" in out and "127.0.0.2:" in out  # kept open (Idle_Timeout)
        dns_server.set_records("moving.test", "MX", "10 new-mx.moving.test.", ttl=3600)
        # the cached route (TTL 3600) still points at the old MX
        m.send("a@src.test", ["two@moving.test"])
        msgs = sink.wait_for(2)
        assert msgs[1]["sockname"][0] == "127.0.0.2"
        out = m.console("refresh", "domain", "moving.test", check=True).stdout
        assert "new-mx.moving.test 127.0.0.3" in out
        m.send("a@src.test", ["three@moving.test"])
        msgs = sink.wait_for(3)
        assert msgs[2]["sockname"][0] == "127.0.0.3"
        out = m.console("domain", "moving.test", check=True).stdout
        assert "new-mx.moving.test 127.0.0.3" in out and "old-mx" not in out
        dig = m.console("dig", "moving.test", check=True).stdout
        assert "10 new-mx.moving.test" in dig and "127.0.0.3" in dig
        stats = m.console("dns_cache", "stats", check=True).stdout
        assert re.search(r"entries: [1-9]", stats)


def test_unknown_command_reroute_rebind_and_housekeeping(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.5",))
    dead = free_port("127.0.0.7")
    body = (f'Retry_Interval = 600\nBinding "b2" {{ }}\n'
            f'Domain "dead.test" {{ Gateway = "127.0.0.7:{dead}" }}\n'
            f'Domain "alive.test" {{ Gateway = "127.0.0.5:{sink.port}" }}\n')
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, body) as m:
        r = m.console("sumary")
        assert r.returncode == 1
        assert "unknown command 'sumary'" in r.stderr
        assert "did you mean: summary?" in r.stdout
        r = m.console("binding")
        assert "binding summary" in r.stdout
        assert m.console("version", check=True).stdout.startswith("impetus ")
        assert m.console("pid", check=True).stdout.strip() == str(m.proc.pid)
        assert "summary [reset]" in m.console("help", check=True).stdout
        assert "log files reopened" in m.console("reopen", "logs", check=True).stdout
        route = m.console("route", "alive.test", check=True).stdout
        assert f"127.0.0.5:{sink.port}" in route
        # rebind, then reroute the delayed mail to a domain that works
        m.send("a@src.test", ["x@dead.test", "y@dead.test"])
        m.mainlog.wait_for("T", 2)
        out = m.console("rebind", "default", "dead.test", "to", "b2", check=True).stdout
        assert "2 message(s) now on binding b2" in out
        mailq = m.console("mailq", "-b", "b2", check=True).stdout
        assert re.search(r"default\s+b2\s+127\.0\.0\.7:\d+\s+0\s+2", mailq), mailq
        out = m.console("reroute", "queue", "dead.test", "alive.test", check=True).stdout
        assert "2 message(s) moved" in out
        m.console("flush", "domain", "alive.test", check=True)
        msgs = sink.wait_for(1)
        assert sorted(r for x in msgs for r in x["rcpt_tos"]) == ["x@dead.test", "y@dead.test"]
        d = m.mainlog.wait_for("D", 2)
        assert all(rec[-1] == "b2" or "b2" in rec for rec in d)
        # config get / eval / show
        assert "is not set in global" in m.console("config", "get", "Gateway").stdout
        r = m.console("config", "eval", "Retyr_Interval")
        assert r.returncode == 1 and "Retry_Interval" in r.stdout
        show = m.console("config", "show", check=True).stdout
        assert 'domain "dead.test":' in show and "Gateway = 127.0.0.7:" in show
        assert "no outbound connections" in m.console("show", "outbound").stdout or True
        # shutdown
        r = m.console("shutdown", check=True)
        assert "shutting down" in r.stdout
        assert m.proc.wait(30) == 0


def test_control_over_tcp_requires_authentication(tmp_path, dns_server):
    pwfile = tmp_path / "console.passwd"
    pwfile.write_text("# console accounts\n" + passwd_line("admin", "s3cret"))
    port = free_port()
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf, control_tcp=f"127.0.0.1:{port}",
                    password_file=str(pwfile)) as m:
        target = f"127.0.0.1:{port}"
        good = {"IMPETUS_CONSOLE_USER": "admin", "IMPETUS_CONSOLE_PASSWORD": "s3cret"}
        r = m.console("version", target=target, env=good, check=True)
        assert r.stdout.startswith("impetus ")
        r = m.console("version", target=target,
                      env={**good, "IMPETUS_CONSOLE_PASSWORD": "wrong"})
        assert r.returncode == 2 and "authentication failed" in r.stderr
        r = m.console("version", target=target, env={**good, "IMPETUS_CONSOLE_USER": "nobody"})
        assert r.returncode == 2 and "authentication failed" in r.stderr
        env = {k: v for k, v in os.environ.items() if k != "IMPETUS_CONSOLE_PASSWORD"}
        proc = subprocess.run([sys.executable, "-m", "impetus.cli", "console", "-s", target,
                               "version"], capture_output=True, text=True, timeout=30, env=env,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and "requires authentication" in proc.stderr
        # a raw client cannot skip the handshake
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rwb")
            greeting = [f.readline() for _ in range(4)]
            assert greeting[0].startswith(b"+OK impetus")
            assert b"auth: scrypt\n" in greeting
            f.write(b"summary\n")
            f.flush()
            assert f.readline().startswith(b"-ERR authentication required")
        # the password file is read again on every login
        pwfile.write_text(passwd_line("admin", "n3w"))
        r = m.console("pid", target=target, env={**good, "IMPETUS_CONSOLE_PASSWORD": "n3w"},
                      check=True)
        assert r.stdout.strip() == str(m.proc.pid)
        assert "authentication failed for 'admin'" in "\n".join(m.paniclog.lines())


def test_console_cannot_connect(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "impetus.cli", "console", "-s",
                           str(tmp_path / "nothing"), "summary"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "cannot connect" in proc.stderr
