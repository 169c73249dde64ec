"""Refuse non-loopback network traffic from the pytest process.

The machine's /etc/resolv.conf points off loopback (test-peers.md); a test
that accidentally uses the system resolver or connects to a real address
must fail loudly instead of leaking packets.  Installed by tests/conftest.py;
set IMPETUS_TEST_ALLOW_NETWORK=1 to disable.  Subprocesses (``impetus
serve``) are not covered: they must be given a loopback ``Resolv_Conf``.
"""
from __future__ import annotations

import errno
import ipaddress
import socket

_installed = False
_ALLOWED_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _hosts_names() -> set[str]:
    names = set()
    try:
        with open("/etc/hosts") as f:
            for line in f:
                parts = line.split("#", 1)[0].split()
                if len(parts) < 2:
                    continue
                try:
                    if not ipaddress.ip_address(parts[0].split("%")[0]).is_loopback:
                        continue
                except ValueError:
                    continue
                names.update(p.lower() for p in parts[1:])
    except OSError:
        pass
    return names


def _ip_ok(host) -> bool | None:
    """True: loopback/unspecified literal; False: other literal; None: a name."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    h = str(host).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    allowed = _ALLOWED_NAMES | _hosts_names()

    def check(address, what):
        if not isinstance(address, tuple) or not address:
            return                      # AF_UNIX paths etc.
        host = address[0]
        ok = _ip_ok(host)
        if ok is None:
            ok = str(host).lower().rstrip(".") in allowed
        if not ok:
            raise OSError(errno.ENETUNREACH,
                          f"test network guard: {what} to non-loopback address {address!r} refused "
                          "(tests must only talk to 127.0.0.0/8 and ::1)")

    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_sendto = socket.socket.sendto
    orig_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        check(address, "connect")
        return orig_connect(self, address)

    def connect_ex(self, address):
        check(address, "connect")
        return orig_connect_ex(self, address)

    def sendto(self, data, *args):
        check(args[-1], "sendto")
        return orig_sendto(self, data, *args)

    def getaddrinfo(host, *args, **kw):
        if host is not None and _ip_ok(host) is None and str(host).lower().rstrip(".") not in allowed:
            raise socket.gaierror(socket.EAI_NONAME,
                                  f"test network guard: refusing to resolve {host!r} through the "
                                  "system resolver (use the dns_server fixture)")
        return orig_getaddrinfo(host, *args, **kw)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo
