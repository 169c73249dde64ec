"""The interactive console and ``impetus top``, used as a person would: in a
real terminal (tmux), typing keys and reading the screen (issue 7)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.mta import free_port, wait_until
from tests.test_control_console import ConsoleMTA

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


class Terminal:
    """One tmux session on a private tmux server."""

    count = 0

    def __init__(self, workdir, command: str, width: int = 150, height: int = 45):
        Terminal.count += 1
        self.sock = str(workdir / f"tmux{Terminal.count}.sock")
        self.name = "t"
        self.tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                  command)

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-t", self.name, "-p", "-S", "-200")

    def wait_for(self, text: str, timeout: float = 15.0, count: int = 1) -> str:
        return wait_until(lambda: (s := self.screen()).count(text) >= count and s, timeout,
                          what=f"{text!r} x{count} on the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=10)


def python_cmd(*args: str) -> str:
    import shlex
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "impetus.cli", *args))


@pytest.fixture
def mta(tmp_path, dns_server):
    dead = free_port("127.0.0.7")
    m = ConsoleMTA(tmp_path / "mta", dns_server.resolv_conf,
                   f'Gateway = "127.0.0.7:{dead}"\nRetry_Interval = 600\n')
    m.start()
    m.send("a@src.test", ["x@example.test", "y@example.test"])
    m.mainlog.wait_for("T", 2)
    yield m
    m.stop()


def test_interactive_console_prompt_completion_history_errors(tmp_path, mta):
    history = tmp_path / "history"
    env = f"IMPETUS_CONSOLE_HISTORY={history} TERM=xterm"
    term = Terminal(tmp_path, f"env {env} {python_cmd('console', '-s', mta.control_socket)}; "
                              "echo CONSOLE-EXITED $?; sleep 60")
    try:
        term.wait_for("impetus>")
        assert "'help' lists the commands" in term.screen()
        # completion of a command word
        term.type("summ")
        term.keys("Tab")
        term.wait_for("impetus> summary")
        term.keys("Enter")
        screen = term.wait_for("Received: 2")
        assert "Delayed queue size: 2" in screen
        # completion offers the choices after "binding "
        term.type("binding ")
        term.keys("Tab", "Tab")
        screen = term.wait_for("summary", count=2)
        last = [ln for ln in screen.splitlines() if ln.strip()][-2]
        assert last.split() == ["fail", "flush", "summary"], screen
        term.keys("C-u")
        # an unknown command gets a clear message with a suggestion
        term.type("sumary")
        term.keys("Enter")
        screen = term.wait_for("error: unknown command 'sumary'")
        assert "did you mean: summary?" in screen
        assert "type 'help' for the list of commands" in screen
        # history: Up twice brings back "summary"
        term.keys("Up")
        term.wait_for("impetus> sumary", count=2)
        term.keys("Up")
        term.wait_for("impetus> summary", count=2)
        term.keys("Enter")
        term.wait_for("Received: 2", count=2)
        # a command with arguments and an error from the server
        term.type("message details 00/00-1-NOPE")
        term.keys("Enter")
        term.wait_for("error: no queued message 00/00-1-NOPE")
        term.type("quit")
        term.keys("Enter")
        term.wait_for("CONSOLE-EXITED 0")
    finally:
        term.close()
    saved = history.read_text().splitlines()
    assert "sumary" in saved and any(ln.strip() == "summary" for ln in saved)

    # a new console session starts with that history
    term = Terminal(tmp_path, f"env {env} {python_cmd('console', '-s', mta.control_socket)}; "
                              "echo CONSOLE-EXITED $?; sleep 60")
    try:
        term.wait_for("impetus>")
        term.keys("Up")
        term.wait_for("impetus> quit")
        term.keys("C-u", "C-d")
        term.wait_for("CONSOLE-EXITED 0")
    finally:
        term.close()


def test_top_shows_queues_and_quits_on_q(tmp_path, mta):
    term = Terminal(tmp_path, f"env TERM=xterm {python_cmd('top', '-s', mta.control_socket, '-i', '0.5')}; "
                              "echo TOP-EXITED $?; sleep 60")
    try:
        screen = term.wait_for("impetus top - ")
        screen = term.wait_for("(default)")
        assert "queues: active 0  delayed 2" in screen
        assert "DOMAIN (BINDING)" in screen and "BINDING" in screen
        row = next(ln for ln in screen.splitlines() if "(default)" in ln)
        assert row.split()[2:5] == ["0", "0", "2"], row   # CONNS ACTIVE DELAYED
        assert "rates/s: received " in screen
        # it refreshes: new mail shows up without a key press
        mta.send("a@src.test", ["z@example.test"])
        screen = term.wait_for("queues: active 0  delayed 3", timeout=10)
        row = next(ln for ln in screen.splitlines() if "(default)" in ln and "." in ln)
        assert row.split()[2:5] == ["0", "0", "3"], row
        term.type("q")
        screen = term.wait_for("TOP-EXITED 0")
        assert "impetus top - " not in screen  # the alternate screen is gone
    finally:
        term.close()
    # and once, for scripts
    out = subprocess.run([sys.executable, "-m", "impetus.cli", "top", "-s", mta.control_socket,
                          "--once", "-i", "0.2"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "impetus top - " in out.stdout and "(default)" in out.stdout


def test_console_top_command(tmp_path, mta):
    term = Terminal(tmp_path, f"env TERM=xterm IMPETUS_CONSOLE_HISTORY={tmp_path / 'h'} "
                              f"{python_cmd('console', '-s', mta.control_socket)}; "
                              "echo CONSOLE-EXITED $?; sleep 60")
    try:
        term.wait_for("impetus>")
        term.type("top")
        term.keys("Enter")
        term.wait_for("impetus top - ")
        time.sleep(0.3)
        term.type("q")
        term.wait_for("impetus>", count=2)
        term.type("version")
        term.keys("Enter")
        term.wait_for("impetus 0.1.0")
    finally:
        term.close()
