"""Hot reload (D20) beyond routing: relay settings of the listeners, also in
reception processes; idle control sessions; a config whose new file cannot
be read (issue 7)."""
from __future__ import annotations

import select
import smtplib

import pytest

from impetus.console import ControlClient
from tests.mta import wait_until
from tests.test_control_console import ConsoleMTA, rewrite_config

pytestmark = pytest.mark.integration


def relay_ok(m) -> bool:
    try:
        m.send("a@src.test", ["x@example.test"])
        return True
    except smtplib.SMTPRecipientsRefused:
        return False


@pytest.mark.parametrize("children", [0, 2])
def test_reload_applies_relay_hosts_to_new_sessions(tmp_path, dns_server, smtp_sinks, children):
    sink = smtp_sinks(("127.0.0.5",))
    args = ("--reception-processes", str(children)) if children else ()
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf,
                    f'Gateway = "127.0.0.5:{sink.port}"', relay_hosts='"192.0.2.0/24"',
                    serve_args=args) as m:
        assert not relay_ok(m)
        rewrite_config(m, 'Relay_Hosts = ( "192.0.2.0/24" )', 'Relay_Hosts = ( "127.0.0.0/8" )')
        out = m.console("config", "reload", check=True).stdout
        if children:
            assert f"told {children} reception process(es) to reload (SIGHUP)" in out
        # children reload on their own after the signal: poll
        wait_until(lambda: relay_ok(m), 15, what="relaying allowed after the reload")
        sink.wait_for(1)
        # and back: refused again
        rewrite_config(m, 'Relay_Hosts = ( "127.0.0.0/8" )', 'Relay_Hosts = ( "192.0.2.0/24" )')
        m.console("config", "reload", check=True)
        wait_until(lambda: not relay_ok(m), 15, what="relaying refused after the reload")


def test_reload_of_an_unreadable_path_is_refused(tmp_path, dns_server):
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf) as m:
        r = m.console("config", "reload", str(tmp_path / "missing.conf"))
        assert r.returncode == 1
        assert "configuration refused" in r.stderr
        assert "missing.conf" in r.stdout
        assert m.console("config", "reload", check=True).returncode == 0


def test_idle_control_session_is_closed_and_the_console_reconnects(tmp_path, dns_server):
    with ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf) as m:
        rewrite_config(m, f'Listen "{m.control_socket}" {{ }}',
                       f'Listen "{m.control_socket}" {{ Timeout = 1 }}')
        m.stop()
        m.start()
        client = ControlClient(m.control_socket)
        client.connect()
        ok, _, lines = client.command("pid")
        assert ok and lines == [str(m.proc.pid)]
        # the server closes the idle session after Timeout seconds (EOF)
        wait_until(lambda: select.select([client.sock], [], [], 0)[0], 5,
                   what="the idle session to be closed")
        ok, _, lines = client.command("version")
        assert ok and lines[0].startswith("impetus ")
        client.close()
