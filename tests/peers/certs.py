"""Test PKI with trustme (recipe: test-peers.md §5)."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("mx1.example.test", "mx2.example.test", "lmtp.example.test",
                "localhost", "127.0.0.1", "::1")


@dataclass
class Certs:
    """Files: ``ca_pem`` (trust this), ``server_crt``/``server_key``
    (valid for SERVER_NAMES), ``server_combined`` (key + chain);
    ``wrongname_crt``/``wrongname_key`` (same CA, only wrong.example.test);
    ``untrusted_crt``/``untrusted_key`` (another CA, SERVER_NAMES)."""

    dir: Path
    ca: trustme.CA
    server: trustme.LeafCert
    ca_pem: str
    server_crt: str
    server_key: str
    server_combined: str
    wrongname_crt: str
    wrongname_key: str
    untrusted_crt: str
    untrusted_key: str

    def server_context(self, which: str = "server") -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        crt, key = {"server": (self.server_crt, self.server_key),
                    "wrongname": (self.wrongname_crt, self.wrongname_key),
                    "untrusted": (self.untrusted_crt, self.untrusted_key)}[which]
        ctx.load_cert_chain(crt, key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Verifying client context that trusts only the test CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca_pem)
        return ctx


def make_certs(directory: str | Path) -> Certs:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    ca = trustme.CA(organization_name="Impetus test CA")
    srv = ca.issue_cert(*SERVER_NAMES)
    wrong = ca.issue_cert("wrong.example.test")
    untrusted = trustme.CA(organization_name="Untrusted test CA").issue_cert(*SERVER_NAMES)
    files = {
        "ca_pem": (ca.cert_pem, "ca.pem"),
        "server_crt": (srv.cert_chain_pems[0], "server.crt"),
        "server_key": (srv.private_key_pem, "server.key"),
        "server_combined": (srv.private_key_and_cert_chain_pem, "server-combined.pem"),
        "wrongname_crt": (wrong.cert_chain_pems[0], "wrongname.crt"),
        "wrongname_key": (wrong.private_key_pem, "wrongname.key"),
        "untrusted_crt": (untrusted.cert_chain_pems[0], "untrusted.crt"),
        "untrusted_key": (untrusted.private_key_pem, "untrusted.key"),
    }
    paths = {}
    for attr, (blob, name) in files.items():
        p = d / name
        blob.write_to_path(str(p))
        p.chmod(0o644)   # readable by Dovecot's unprivileged processes too
        paths[attr] = str(p)
    return Certs(dir=d, ca=ca, server=srv, **paths)
