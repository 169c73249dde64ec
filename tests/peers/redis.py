"""Private ``redis-server`` on loopback (fixture ``redis_server``).

Started as a subprocess on 127.0.0.1 with persistence off (``--save ''
--appendonly no``), in its own temporary directory.  Redis cannot listen on
port 0, so a free port is picked and the start is retried on a collision.
Readiness is a ``PING`` answered with ``+PONG`` (polled, 5 s at most).

``stop()`` sends SIGTERM and waits; ``start()`` may be called again
afterwards and reuses the same port when it can (so a client configured with
``.url`` reconnects to the "same" server, now empty).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .net import free_port


def redis_available() -> str | None:
    """None if usable, else the reason why not."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)"
    return None


def _encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisServer:
    host = "127.0.0.1"

    def __init__(self):
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return (self.dir / "redis.out").read_text(errors="replace")  # type: ignore[operator]
        except (OSError, TypeError):
            return ""

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 5.0) -> "RedisServer":
        if self.running:
            return self
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="redis", dir="/tmp"))
        deadline = time.monotonic() + timeout
        last = ""
        for attempt in range(5):
            if not self.port or attempt:
                self.port = free_port(self.host)
            with open(self.dir / "redis.out", "wb") as out:
                self.proc = subprocess.Popen(
                    ["redis-server", "--port", str(self.port), "--bind", self.host,
                     "--save", "", "--appendonly", "no", "--protected-mode", "no",
                     "--daemonize", "no", "--dir", str(self.dir), "--logfile", "",
                     "--loglevel", "warning"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_ready(deadline)
                return self
            except RuntimeError as e:
                last = str(e)
                self.stop()
                if "in use" not in last or time.monotonic() >= deadline:
                    break
        raise RuntimeError(f"redis-server did not start: {last}")

    def _wait_ready(self, deadline: float) -> None:
        last: object = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError as e:
                last = e
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no PONG from {self.host}:{self.port}: {last!r}\n{self.log()}")
            time.sleep(0.02)

    def command(self, *args, timeout: float = 2.0) -> bytes:
        """Send one command, return the first reply line (without CRLF).
        Enough for ``PING``, ``SCRIPT FLUSH``, ``FLUSHALL``, ``DBSIZE``."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(_encode(*args))
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.split(b"\r\n", 1)[0]

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
