"""Shared fixtures: test peers on loopback (see tests/peers/ and
/work/shared/testing/test-peers.md).

Every peer runs in a background thread with its own event loop (or in its
own process), so these plain fixtures work from sync tests, async tests and
for ``impetus serve`` subprocesses.

* ``certs`` (session): trustme CA + server certificate files.
* ``dns_server``: dnslib authoritative server with tests/peers/zones/test.zone;
  ``.port``, ``.resolv_conf``, ``.add()``, ``.remove()``, ``.set_servfail()``,
  ``.set_timeout()``, ``.set_garbage()``, ``.set_truncated()``, ``.query_count()``.
* ``smtp_sinks``: factory ``make(hosts=("127.0.0.2",), port=0, tls=False, **kw)``
  returning a running :class:`tests.peers.smtp_sink.SmtpSink`.
* ``smtp_sink``: one sink on 127.0.0.2 and 127.0.0.3 (mx1/mx2.example.test).
* ``dovecot_lmtp``: private Dovecot LMTP server (root).
"""
from __future__ import annotations

import os

import pytest

from tests.peers import guard
from tests.peers.certs import make_certs
from tests.peers.dns_server import DnsServer
from tests.peers.dovecot import DovecotLmtp, dovecot_available
from tests.peers.net import free_port, wait_port  # noqa: F401  (re-exported for tests)
from tests.peers.smtp_sink import SmtpSink


def pytest_configure(config):
    if os.environ.get("IMPETUS_TEST_ALLOW_NETWORK") != "1":
        guard.install()


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def dns_server(tmp_path):
    server = DnsServer(tmp_path / "dns").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_sinks(request):
    """Factory: ``make(hosts=("127.0.0.2",), port=0, *, tls=False, **kw)``.

    ``tls=True`` enables STARTTLS with the ``certs`` server certificate
    (``tls="wrongname"``/``"untrusted"`` for negative tests).  Other keywords
    go to :class:`SmtpSink` (``rcpt_replies``, ``mail_reply``,
    ``data_reply``, ``delays``, ``hostname``, ``require_starttls``,
    ``ehlo_extra``, ...).  All sinks are closed at teardown."""
    made: list[SmtpSink] = []

    def make(hosts=("127.0.0.2",), port=0, *, tls=False, **kw):
        if tls:
            certs = request.getfixturevalue("certs")
            kw["tls_context"] = certs.server_context("server" if tls is True else tls)
        sink = SmtpSink(hosts, port, **kw).start()
        made.append(sink)
        return sink

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def smtp_sink(smtp_sinks):
    return smtp_sinks(("127.0.0.2", "127.0.0.3"))


@pytest.fixture
def dovecot_lmtp(certs):
    reason = dovecot_available()
    if reason:
        pytest.skip(reason)
    server = DovecotLmtp(certs.server_crt, certs.server_key).start(timeout=10)
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture
def redis_server():
    """Private ``redis-server`` on 127.0.0.1 (tests/peers/redis.py):
    ``.url`` (``redis://127.0.0.1:PORT/0``), ``.port``, ``.stop()``,
    ``.start()`` (same port when free), ``.command(*args)``.  Skips when
    redis-server is not installed (CI installs it)."""
    from tests.peers.redis import RedisServer, redis_available

    reason = redis_available()
    if reason:
        pytest.skip(reason)
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()
