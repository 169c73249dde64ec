"""Small socket helpers for tests (loopback only)."""
from __future__ import annotations

import socket
import time


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port on ``host`` where nothing listens right now (bind port 0 and
    close).  Connecting to it is refused -- handy for failover tests."""
    with socket.socket(_family(host), kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 5.0, banner: bytes | None = None) -> bytes:
    """Poll until ``host:port`` accepts TCP connections (and, if ``banner``
    is given, sends a first line starting with it).  Returns what was read
    (b"" without ``banner``).  Raises ``TimeoutError`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)) as s:
                if banner is None:
                    return b""
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(banner):
                    return data
                last = AssertionError(f"unexpected banner {data[:80]!r}")
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not ready within {timeout}s: {last!r}")
        time.sleep(0.02)


def wait_port_closed(host: str, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) != 0:
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} still accepting connections after {timeout}s")
        time.sleep(0.02)
