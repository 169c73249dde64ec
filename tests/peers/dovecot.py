"""Private Dovecot LMTP server (root), recipe test-peers.md §2.

Per-recipient behaviour built in (see dovecot-lmtp.sh):
``unknown@example.test`` -> 550 at RCPT, ``tempfail@example.test`` -> 451 at
RCPT, ``full@example.test`` -> 452 after DATA, ``full5xx@example.test`` -> 552
after DATA, everyone else delivered into ``DIR/mail/<domain>/<user>/Maildir``.
More such users can be added at runtime (``deny()``, ``tempfail()``,
``full()``, ``full5xx()``): Dovecot re-reads the passwd-files on change.
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

SCRIPT = Path(__file__).with_name("dovecot-lmtp.sh")


def dovecot_available() -> str | None:
    """None if usable, else the reason why not."""
    if not shutil.which("dovecot"):
        return "dovecot is not installed (apt-get install dovecot-core dovecot-lmtpd)"
    if not Path("/usr/lib/dovecot/lmtp").exists():
        return "dovecot-lmtpd is not installed (no /usr/lib/dovecot/lmtp)"
    if os.geteuid() != 0:
        return "the Dovecot LMTP peer needs root (CI runs as root)"
    return None


class DovecotLmtp:
    host = "127.0.0.1"

    def __init__(self, cert: str, key: str):
        self.cert = cert
        self.key = key
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def maildir_root(self) -> Path:
        assert self.dir is not None
        return self.dir / "mail"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "dovecot.log"

    def log(self) -> str:
        out = []
        for p in (self.dir / "dovecot.out", self.log_path):
            try:
                out.append(p.read_text(errors="replace"))
            except (OSError, TypeError):
                pass
        return "\n".join(out)

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> "DovecotLmtp":
        deadline = time.monotonic() + timeout
        last = ""
        for _ in range(3):
            # short path: base_dir holds unix sockets (108-char limit)
            self.dir = Path(tempfile.mkdtemp(prefix="dv", dir="/tmp"))
            self.dir.chmod(0o755)
            self.port = free_port(self.host)
            with open(self.dir / "dovecot.out", "wb") as out:
                self.proc = subprocess.Popen(
                    ["/bin/sh", str(SCRIPT), str(self.dir), str(self.port), self.cert, self.key],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_ready(deadline)
                return self
            except RuntimeError as e:
                last = str(e)
                self.stop()
                self.cleanup()
                if "in use" not in last or time.monotonic() >= deadline:
                    break
        raise RuntimeError(f"Dovecot LMTP did not start: {last}")

    def _wait_ready(self, deadline: float) -> None:
        last: object = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    f = s.makefile("rwb")
                    banner = f.readline()
                    if banner.startswith(b"220"):
                        f.write(b"LHLO probe.test\r\n")
                        f.flush()
                        while True:
                            line = f.readline()
                            if not line or line[:4] != b"250-":
                                break
                        f.write(b"QUIT\r\n")
                        f.flush()
                        if line.startswith(b"250 "):
                            return
                    last = banner
            except OSError as e:
                last = e
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no LMTP greeting on {self.host}:{self.port}: {last!r}\n{self.log()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
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
            # children (lmtp, auth, log, ...) follow the master; give them a moment
            for _ in range(15):
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ mail
    @staticmethod
    def _split(addr: str) -> tuple[str, str]:
        local, _, domain = addr.strip("<>").rpartition("@")
        local = local.split("+", 1)[0]          # recipient_delimiter = +
        return local.lower(), domain.lower()

    def maildir(self, addr: str) -> Path:
        local, domain = self._split(addr)
        return self.maildir_root / domain / local / "Maildir"

    def messages_for(self, addr: str) -> list[bytes]:
        """Delivered messages of ``addr`` (INBOX; new/ and cur/), oldest first."""
        md = self.maildir(addr)
        files = []
        for sub in ("new", "cur"):
            d = md / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_messages(self, addr: str, n: int = 1, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(msgs := self.messages_for(addr)) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{addr}: expected {n} delivered message(s), have {len(msgs)}\n"
                                     f"{self.log()[-2000:]}")
            time.sleep(0.02)
        return msgs

    def _add_user(self, file: str, addr: str) -> None:
        assert self.dir is not None
        with open(self.dir / file, "a") as f:
            f.write(f"{addr.lower()}:::::::\n")

    def deny(self, addr: str) -> None:
        """``addr`` gets 550 5.1.1 at RCPT from now on."""
        self._add_user("deny-users", addr)

    def tempfail(self, addr: str) -> None:
        """``addr`` gets 451 4.3.0 at RCPT from now on."""
        self._add_user("tempfail-users", addr)

    def full(self, addr: str) -> None:
        """``addr``'s mailbox is over quota: 452 4.2.2 (after DATA, or at RCPT once it holds mail)."""
        self._add_user("full-users", addr)

    def full5xx(self, addr: str) -> None:
        self._add_user("full5xx-users", addr)
