"""SMTP AUTH password file (salted scrypt hashes) and ``impetus passwd``.

File format
-----------

UTF-8 text, one account per line; blank lines and lines starting with ``#``
are ignored::

    # user:scheme$params$salt$hash
    alice:scrypt$n=16384,r=8,p=1$q5pBzY1k9kq0F7bF3Hc3Xw$0bXq...Z9w

* ``user`` -- the login name: no ``:``, no whitespace or control characters,
  at most 255 characters, compared exactly (case-sensitive);
* ``scheme`` -- ``scrypt`` (the only one so far);
* ``params`` -- ``n=<cost>,r=<block size>,p=<parallelism>`` for
  :func:`hashlib.scrypt` (new hashes use n=2**14, r=8, p=1);
* ``salt`` and ``hash`` -- unpadded standard base64 of the random salt (16
  bytes) and of the derived key (32 bytes) of the UTF-8 password.

Malformed lines are skipped (a warning with the line number, never its
content, is logged).  The file should be mode 0600; ``impetus passwd``
writes it so.

API
---

* :func:`hash_password` -- ``password -> "scrypt$...$...$..."``;
* :func:`verify_hash` -- check a password against such a string;
* :class:`PasswordFile` -- ``PasswordFile(path).verify(user, password) ->
  bool`` (``await ....averify(...)`` runs it in a thread); re-reads the file
  when it changes (mtime, size or inode), compares in constant time and
  spends the same scrypt work on unknown users;
* ``impetus passwd FILE USER`` -- :func:`add_passwd_parser` /
  :func:`run_passwd`: reads the password from stdin (one line) when stdin is
  not a terminal or ``--stdin`` is given, else asks twice with getpass;
  creates or replaces the user's line atomically (temporary file, fsync,
  rename) with mode 0600.  ``--delete`` removes the user.

Hashing costs about 16 MiB and ~0.1 s of CPU per check: that is the point
(offline guessing), but a check blocks its caller -- from an SMTP server use
``averify`` in an ``async def check_auth`` so the event loop goes on.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import logging
import os
import secrets
import sys
import tempfile
import threading

__all__ = ["hash_password", "verify_hash", "PasswordFile", "set_password", "delete_user",
           "valid_username", "add_passwd_parser", "run_passwd", "SCRYPT_N", "SCRYPT_R", "SCRYPT_P"]

log = logging.getLogger("impetus.auth")

SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
_MAX_N = 2 ** 20          # refuse absurd parameters from a tampered file
_MAX_RP = 64


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * (n + p + 2) + (1 << 20), dklen=dklen)


def hash_password(password: str) -> str:
    """A new ``scrypt$n=..,r=..,p=..$salt$hash`` string for ``password``."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64e(salt)}${_b64e(key)}"


def _parse_hash(text: str):
    """-> (n, r, p, salt, key); ValueError when malformed."""
    scheme, params, salt, key = text.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown scheme {scheme!r}")
    kv = {}
    for item in params.split(","):
        k, sep, v = item.partition("=")
        if not sep or k in kv or not v.isdigit() or not v.isascii():
            raise ValueError("bad parameters")
        kv[k] = int(v)
    if set(kv) != {"n", "r", "p"}:
        raise ValueError("bad parameters")
    n, r, p = kv["n"], kv["r"], kv["p"]
    if n < 2 or n > _MAX_N or n & (n - 1) or not 1 <= r <= _MAX_RP or not 1 <= p <= _MAX_RP:
        raise ValueError("parameters out of range")
    salt_b, key_b = _b64d(salt), _b64d(key)
    if not salt_b or not 16 <= len(key_b) <= 64:
        raise ValueError("bad salt or hash")
    return n, r, p, salt_b, key_b


def verify_hash(password: str, hashed: str) -> bool:
    """Does ``password`` match ``hashed`` (from :func:`hash_password`)?
    False for a malformed ``hashed``."""
    try:
        n, r, p, salt, key = _parse_hash(hashed)
    except ValueError:
        return False
    try:
        got = _scrypt(password, salt, n, r, p, len(key))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, key)


def valid_username(user: str) -> bool:
    return (bool(user) and len(user) <= 255 and ":" not in user and user.isprintable()
            and not any(c.isspace() for c in user))


class PasswordFile:
    """The accounts of a password file (see the module docstring).

    ``verify(user, password)`` re-reads the file when its mtime, size or
    inode changed since the last read.  A missing or unreadable file means
    no accounts (every check fails; the error is logged once per change).
    Thread-safe.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._users: dict[str, str] = {}
        self._stamp = None
        self._lock = threading.Lock()
        # Unknown users cost the same scrypt work as known ones.
        self._dummy = hash_password(secrets.token_hex(16))

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        except OSError as exc:
            stamp = ("missing", exc.errno)
        if stamp == self._stamp:
            return
        users: dict[str, str] = {}
        if stamp[0] != "missing":
            try:
                with open(self.path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                log.error("password file %s: cannot read: %s", self.path, type(exc).__name__)
                lines = []
            for no, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, hashed = line.partition(":")
                try:
                    if not sep or not valid_username(user):
                        raise ValueError("bad user name")
                    _parse_hash(hashed)
                except ValueError as exc:
                    log.warning("password file %s line %d ignored: %s", self.path, no, exc)
                    continue
                users[user] = hashed
        else:
            log.error("password file %s: missing or unreadable", self.path)
        self._users = users
        self._stamp = stamp

    def users(self) -> list[str]:
        with self._lock:
            self._load()
            return sorted(self._users)

    def verify(self, user: str, password: str) -> bool:
        """True when ``user`` exists and ``password`` matches."""
        with self._lock:
            self._load()
            hashed = self._users.get(user) if isinstance(user, str) else None
        if hashed is None:
            verify_hash(password if isinstance(password, str) else "", self._dummy)
            return False
        return verify_hash(password, hashed)

    async def averify(self, user: str, password: str) -> bool:
        """:meth:`verify` in a worker thread, for an ``async def check_auth``
        (the scrypt work then does not stall the event loop)."""
        import asyncio

        return await asyncio.to_thread(self.verify, user, password)


# ---------------------------------------------------------------------------
# Updating the file
# ---------------------------------------------------------------------------


def _rewrite(path: str, user: str, hashed: str | None) -> bool:
    """Replace (or with ``hashed=None`` delete) ``user``'s line; returns
    whether the user was there before."""
    import fcntl

    path = os.path.abspath(path)
    d = os.path.dirname(path)
    # Serialise concurrent writers on the directory (no lock file left behind).
    lock_fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        out, found = [], False
        for line in lines:
            name, sep, _ = line.strip().partition(":")
            if sep and name == user and not line.lstrip().startswith("#"):
                if not found and hashed is not None:
                    out.append(f"{user}:{hashed}")
                found = True
                continue
            out.append(line)
        if not found:
            if hashed is None:
                return False
            out.append(f"{user}:{hashed}")
        fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=d)   # created 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(ln + "\n" for ln in out))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            os.fsync(lock_fd)   # the directory entry
        except OSError:  # pragma: no cover - some filesystems refuse
            pass
        return found
    finally:
        os.close(lock_fd)


def set_password(path: str, user: str, password: str) -> bool:
    """Create or replace ``user``'s line; True when it replaced one."""
    if not valid_username(user):
        raise ValueError("bad user name (no ':', whitespace or control characters; 1-255 characters)")
    if not password:
        raise ValueError("empty password")
    return _rewrite(path, user, hash_password(password))


def delete_user(path: str, user: str) -> bool:
    """Remove ``user``'s line; True when it was there."""
    return _rewrite(path, user, None)


# ---------------------------------------------------------------------------
# CLI: impetus passwd FILE USER
# ---------------------------------------------------------------------------


def add_passwd_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``passwd`` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "passwd",
        help="set a password in an SMTP AUTH password file",
        description="Create or replace USER's line in the password file FILE "
                    "(salted scrypt hash; the file is written atomically, mode 0600).",
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the password file (created if missing)")
    p.add_argument("user", metavar="USER", help="the login name")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from the first line of stdin "
                        "(the default when stdin is not a terminal)")
    p.add_argument("-d", "--delete", action="store_true", help="remove USER instead")


def _read_password(args) -> str | None:
    if args.stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(f"New password for {args.user}: ")
    second = getpass.getpass("Retype password: ")
    if first != second:
        print("impetus passwd: passwords do not match", file=sys.stderr)
        return None
    return first


def run_passwd(args) -> int:
    """Exit status: 0 done, 1 failure (I/O, user not found for --delete),
    2 bad input."""
    if not valid_username(args.user):
        print("impetus passwd: bad user name (no ':', whitespace or control characters)",
              file=sys.stderr)
        return 2
    try:
        if args.delete:
            if not delete_user(args.file, args.user):
                print(f"impetus passwd: no user {args.user!r} in {args.file}", file=sys.stderr)
                return 1
            print(f"removed {args.user}")
            return 0
        password = _read_password(args)
        if password is None:
            return 2
        if password.endswith("\r"):
            password = password[:-1]
        if not password:
            print("impetus passwd: empty password refused", file=sys.stderr)
            return 2
        replaced = set_password(args.file, args.user, password)
    except (OSError, ValueError) as exc:
        print(f"impetus passwd: {args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if replaced else 'added'} {args.user}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m impetus.auth FILE USER``."""
    p = argparse.ArgumentParser(prog="impetus passwd", description="Set an SMTP AUTH password.")
    _add_arguments(p)
    return run_passwd(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
