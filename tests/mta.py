"""Run ``impetus serve`` as a real subprocess and talk to it (KumoMTA-style harness).

Tests write a config, start the MTA, inject with smtplib, and assert on what
the recording sinks received and on the mainlog/bouncelog lines.
"""
from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from impetus.logs import split_record


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(predicate, timeout: float = 10.0, interval: float = 0.02,
                what: str = "condition"):
    """``wait_until`` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class LogFile:
    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def records(self, rtype: str | None = None) -> list[list[str]]:
        """mainlog/bouncelog records split on unescaped ``@``."""
        out = []
        for line in self.lines():
            fields = split_at(line)
            if len(fields) >= 5 and (rtype is None or fields[4] == rtype):
                out.append(fields)
        return out

    def wait_for(self, rtype: str, count: int = 1, timeout: float = 15.0) -> list[list[str]]:
        return wait_until(lambda: (r := self.records(rtype)) and len(r) >= count and r,
                          timeout, what=f"{count} {rtype} record(s) in {self.path.name}; "
                                        f"have: {self.lines()[-10:]}")


split_at = split_record  # kept for the tests that import it from here


class MTA:
    """An ``impetus serve`` process with its own spool and logs under ``workdir``."""

    def __init__(self, workdir: Path, resolv_conf: str, body: str = "", *, port: int | None = None,
                 relay_hosts: str = '"127.0.0.0/8"', extra_global: str = "",
                 serve_args: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.wrapper = tuple(wrapper)  # e.g. ("chrt", "-i", "0"): execs serve, same pid
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serve_args = tuple(serve_args)
        self.port = port or free_port()
        self.spool = self.workdir / "spool"
        self.mainlog = LogFile(self.workdir / "mainlog.ec")
        self.bouncelog = LogFile(self.workdir / "bouncelog.ec")
        self.rejectlog = LogFile(self.workdir / "rejectlog.ec")
        self.paniclog = LogFile(self.workdir / "paniclog.ec")
        self.config_path = self.workdir / "ecelerity.conf"
        self.config_path.write_text(f"""
Spoolbase = "{self.spool}"
Hostname = "impetus.test"
Resolv_Conf = "{resolv_conf}"
{extra_global}
ec_logger {{
  mainlog = "{self.mainlog.path}"
  rejectlog = "{self.rejectlog.path}"
  paniclog = "{self.paniclog.path}"
}}
bounce_logger {{
  bouncelog = "{self.bouncelog.path}"
}}
ESMTP_Listener {{
  Relay_Hosts = ( {relay_hosts} )
  Listen "127.0.0.1:{self.port}" {{ }}
}}
{body}
""")
        self.proc: subprocess.Popen | None = None
        self.output = self.workdir / "serve.out"

    def start(self, timeout: float = 15.0) -> "MTA":
        out = open(self.output, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "impetus.cli", "serve", "-c", str(self.config_path),
             *self.serve_args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"impetus serve exited {self.proc.returncode}:\n"
                                     f"{self.output.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    return s.recv(512).startswith(b"220")
            except OSError:
                return False
        wait_until(ready, timeout, what="impetus serve to accept connections")
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def send(self, sender: str, rcpts: list[str] | str, body: bytes | str | None = None,
             *, source: str = "127.0.0.1", subject: str = "test") -> dict:
        """Inject one message; returns smtplib's refused-recipients dict."""
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        if body is None:
            body = (f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
                    f"Message-ID: <{time.time_ns()}@test>\r\n\r\nHello from the test suite.\r\n")
        with smtplib.SMTP("127.0.0.1", self.port, source_address=(source, 0), timeout=15,
                          local_hostname="client.test") as s:
            return s.sendmail(sender, rcpts, body)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
