"""``impetus console``: Momentum's ``ec_console`` for Impetus.

::

    impetus console [-s SOCKET|HOST:PORT] [-c CONFIG] [-u USER] [COMMAND ...]

With a COMMAND it runs that one command (batch mode): the reply goes to
stdout, an error to stderr, and the exit status is 0 (ok), 1 (the command
failed) or 2 (cannot connect or authenticate). Without one it is
interactive: a prompt with line editing, history
(``~/.impetus_console_history``) and tab completion of command words.

The socket is ``-s``; else the first ``Listen`` of ``Control_Listener`` in
the configuration (``-c``, default /etc/impetus/ecelerity.conf), a Unix
socket first; else ``/tmp/2025``. Over TCP (and on sockets with
``Enable_Authentication``) the console authenticates as ``-u`` (default
``$IMPETUS_CONSOLE_USER``, else the login name) with the password from
``--password-file``, ``$IMPETUS_CONSOLE_PASSWORD`` or a prompt. See
:mod:`impetus.control` for the protocol.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import os
import shlex
import socket
import sys

from .control import COMMANDS, auth_proof, scrypt_key

DEFAULT_SOCKET = "/tmp/2025"
PROMPT = "impetus> "


class ConsoleError(Exception):
    """Cannot connect or authenticate."""


def parse_target(target: str):
    """``/path`` -> (AF_UNIX, path); ``host:port``, ``[v6]:port``, ``port`` -> TCP."""
    if "/" in target:
        return socket.AF_UNIX, target
    if target.isdigit():
        return socket.AF_INET, ("127.0.0.1", int(target))
    if target.startswith("["):
        host, _, port = target[1:].partition("]:")
        return socket.AF_INET6, (host, int(port))
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConsoleError(f"bad control address {target!r}: expected a socket path or HOST:PORT")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class ControlClient:
    """A blocking client of the control protocol."""

    def __init__(self, target: str, *, user: str | None = None, password=None,
                 timeout: float = 120.0):
        self.target = target
        self.user = user
        self._password = password  # str, or a callable returning one
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.rfile = None
        self.greeting: list[str] = []

    # -- connection ----------------------------------------------------------
    def connect(self) -> None:
        family, addr = parse_target(self.target)
        if family != socket.AF_UNIX:
            infos = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise ConsoleError(f"cannot connect to {self.target}: {exc.strerror or exc}") from None
        self.sock = sock
        self.rfile = sock.makefile("rb")
        ok, text, lines = self._read_reply()
        if not ok:
            raise ConsoleError(f"{self.target}: {text}")
        self.greeting = lines
        info = dict(ln.split(": ", 1) for ln in lines if ": " in ln)
        if info.get("auth", "none") != "none":
            self._authenticate(info.get("nonce", ""))

    def _password_text(self) -> str:
        pw = self._password
        if callable(pw):
            pw = pw()
            self._password = pw
        if pw is None:
            raise ConsoleError(f"{self.target} requires authentication: give a password "
                               "(--password-file or IMPETUS_CONSOLE_PASSWORD)")
        return pw

    def _authenticate(self, nonce: str) -> None:
        user = self.user or os.environ.get("IMPETUS_CONSOLE_USER") or getpass.getuser()
        ok, text, lines = self._exchange(f"auth {user}")
        if not ok or not lines:
            raise ConsoleError(f"authentication refused: {text}")
        try:
            scheme, params, salt = lines[0].split()
            kv = dict(p.split("=", 1) for p in params.split(","))
            salt_b = base64.b64decode(salt + "=" * (-len(salt) % 4))
            key = scrypt_key(self._password_text(), salt_b, int(kv["n"]), int(kv["r"]),
                             int(kv["p"]))
        except ConsoleError:
            raise
        except (ValueError, KeyError) as exc:
            raise ConsoleError(f"unexpected authentication challenge: {exc}") from None
        ok, text, _ = self._exchange(f"proof {auth_proof(key, nonce, user)}")
        if not ok:
            raise ConsoleError(f"authentication failed for {user}")

    def _closed_by_server(self) -> bool:
        """Between commands the server never writes: anything readable (EOF
        after the idle ``Timeout``) means the session is over."""
        import select
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.rfile.close()
                self.sock.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    # -- requests ------------------------------------------------------------
    def _read_reply(self) -> tuple[bool, str, list[str]]:
        first = self.rfile.readline()
        if not first:
            raise ConnectionError("connection closed by the server")
        status = first.decode("utf-8", "replace").rstrip("\r\n")
        lines = []
        while True:
            raw = self.rfile.readline()
            if not raw:
                raise ConnectionError("connection closed in the middle of a reply")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line == ".":
                break
            lines.append(line[1:] if line.startswith(".") else line)
        ok = status.startswith("+OK")
        text = status[3:].strip() if ok else status[4:].strip()
        return ok, text, lines

    def _exchange(self, line: str) -> tuple[bool, str, list[str]]:
        self.sock.sendall(line.encode("utf-8") + b"\n")
        return self._read_reply()

    def command(self, line: str) -> tuple[bool, str, list[str]]:
        """Run one command; reconnects once when the server had closed an
        idle session."""
        line = line.replace("\n", " ").strip()
        for attempt in (1, 2):
            if self.sock is not None and self._closed_by_server():
                self.close()
            if self.sock is None:
                self.connect()
            try:
                return self._exchange(line)
            except (ConnectionError, BrokenPipeError, socket.timeout) as exc:
                self.close()
                if attempt == 2 or isinstance(exc, socket.timeout):
                    raise ConsoleError(f"{self.target}: {exc}") from None
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# completion


def completions(buffer: str) -> list[str]:
    """Candidates for the word being typed at the end of ``buffer``."""
    words = buffer.split()
    if buffer.endswith(" ") or not buffer:
        before, cur = words, ""
    else:
        before, cur = words[:-1], words[-1]
    low = [w.lower() for w in before]
    out: list[str] = []
    for phrase, args, _ in COMMANDS:
        pw = phrase.split()
        if pw[:len(low)] == low and len(pw) > len(low):
            nxt = pw[len(low)]
        elif low[:len(pw)] == pw:
            # inside the arguments: offer the literal keywords of the usage
            keywords = [a.strip("[]") for a in args.replace("|", " ").split()]
            keywords = [k for k in keywords if k and k.islower() and k.isidentifier()]
            pos = len(low) - len(pw)
            nxt = None
            for k in keywords if pos <= 1 else []:
                if k.startswith(cur.lower()) and k + " " not in out:
                    out.append(k + " ")
            continue
        else:
            continue
        if nxt.startswith(cur.lower()) and nxt + " " not in out:
            out.append(nxt + " ")
    return sorted(out)


def _setup_readline():
    try:
        import readline
    except ImportError:  # pragma: no cover - readline is in the stdlib on Linux
        return None
    history = os.environ.get("IMPETUS_CONSOLE_HISTORY") or os.path.expanduser(
        "~/.impetus_console_history")
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    state = {"matches": []}

    def complete(text, n):
        if n == 0:
            buf = readline.get_line_buffer()[:readline.get_endidx()]
            state["matches"] = completions(buf)
        try:
            return state["matches"][n]
        except IndexError:
            return None

    readline.set_completer_delims(" \t")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    return readline, history


def _print_reply(ok: bool, text: str, lines: list[str], *, batch: bool) -> None:
    for line in lines:
        print(line)
    if not ok:
        print(f"error: {text}", file=sys.stderr if batch else sys.stdout)
    elif not lines and text and not batch:
        print(text)
    sys.stdout.flush()


def interactive(client: ControlClient) -> int:
    rl = _setup_readline()
    from . import __version__
    print(f"impetus console {__version__} connected to {client.target}; "
          "'help' lists the commands, TAB completes, 'quit' leaves")
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.lower() in ("quit", "exit"):
                break
            if line.lower().split()[0] == "top" and line.lower().split()[1:] != ["json"]:
                from .top import run_top
                run_top(client)
                continue
            try:
                ok, text, lines = client.command(line)
            except ConsoleError as exc:
                print(f"error: {exc}")
                continue
            _print_reply(ok, text, lines, batch=False)
            if line.lower() == "shutdown" and ok:
                break
    finally:
        if rl is not None:
            readline, history = rl
            try:
                readline.write_history_file(history)
            except OSError:
                pass
        client.close()
    return 0


def default_target(config_path: str | None) -> str:
    if config_path and os.path.exists(config_path):
        try:
            from .config import load_config
            cfg = load_config(config_path)
        except Exception:
            cfg = None
        if cfg is not None and cfg.control_listeners:
            unix = [lc for lc in cfg.control_listeners if lc.path]
            lc = (unix or cfg.control_listeners)[0]
            return lc.path or f"{lc.host}:{lc.port}"
    return DEFAULT_SOCKET


def make_client(args) -> ControlClient:
    target = args.socket or default_target(args.config)
    password = None
    if getattr(args, "password_file", None):
        with open(args.password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    elif os.environ.get("IMPETUS_CONSOLE_PASSWORD") is not None:
        password = os.environ["IMPETUS_CONSOLE_PASSWORD"]
    elif sys.stdin.isatty():
        password = lambda: getpass.getpass(f"password for {target}: ")  # noqa: E731
    return ControlClient(target, user=args.user, password=password, timeout=args.timeout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--socket", metavar="SOCKET|HOST:PORT",
                   help="control socket (default: the first Control_Listener Listen of the "
                        f"config, else {DEFAULT_SOCKET})")
    p.add_argument("-c", "--config", default="/etc/impetus/ecelerity.conf",
                   help="configuration used to find the control socket")
    p.add_argument("-u", "--user", help="user for authentication "
                                        "(default $IMPETUS_CONSOLE_USER or the login name)")
    p.add_argument("--password-file", metavar="FILE",
                   help="read the password from the first line of FILE "
                        "(else $IMPETUS_CONSOLE_PASSWORD, else a prompt)")
    p.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)


def run_console(args) -> int:
    try:
        client = make_client(args)
        if not args.command:
            client.connect()
            return interactive(client)
        line = shlex.join(args.command) if len(args.command) > 1 else args.command[0]
        ok, text, lines = client.command(line)
    except ConsoleError as exc:
        print(f"impetus console: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"impetus console: {exc}", file=sys.stderr)
        return 2
    _print_reply(ok, text, lines, batch=True)
    client.close()
    return 0 if ok else 1
