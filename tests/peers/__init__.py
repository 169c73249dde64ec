"""Test peers: DNS (dnslib), recording SMTP sink (aiosmtpd), Dovecot LMTP,
trustme certificates, and socket helpers.  Fixtures live in tests/conftest.py;
recipes and gotchas in /work/shared/testing/test-peers.md."""
from .net import free_port, wait_port, wait_port_closed

__all__ = ["free_port", "wait_port", "wait_port_closed"]
