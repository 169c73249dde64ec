"""Remote faults matrix (issue 8): a scripted peer misbehaves at one SMTP
stage with one action; every cell must end in the documented outcome and the
message must be neither lost nor delivered twice.

Stages: banner, EHLO, STARTTLS, MAIL, RCPT, DATA, body, final reply.
Actions: close, hang, 4xx, 5xx, garbage (tests/peers/scripted_peer.py).

Expected outcomes (spec §10.2 responses, §12.5 stage codes, docs/DECISIONS.md):

* STARTTLS (``TLS = required``, spec §7: required TLS that cannot be had
  is a temp-fail): ``T`` stage 15, ``451 4.7.5 [internal] send STARTTLS
  failed`` (close, hang, garbage) or ``451 4.7.5 [internal] no tls
  go-ahead`` (4xx, 5xx); after the fault is lifted the message goes out over
  TLS. With ``TLS = ifavailable`` (``TLS_Ifavailable_Fallback = true``) every
  STARTTLS fault ends in a plain-text delivery at once, without a ``T``.
* banner / EHLO (any action, the 5xx to EHLO after the HELO fallback too):
  a connection-set-up failure; the host is marked failed and the next MX is
  tried. With no other MX: ``T`` stage 0
  ``421 4.4.0 [internal] no MXs for this domain could be reached at this time``
  (the per-host reason in the paniclog); with a second MX: delivered there,
  no ``T`` at all.
* MAIL (2), RCPT (4), DATA (6), body (8), final reply (9):
  close -> ``T`` ``451 4.4.2 [internal] connection closed by remote host``;
  hang -> ``T`` ``451 4.4.2 [internal] no MAIL FROM|RCPT TO|DATA|BODY response``
  after the stage's timeout; 4xx -> ``T`` with the peer's reply; garbage ->
  ``T`` ``451 4.4.2 [internal] garbled response: ...``; 5xx -> ``P`` with the
  peer's reply and one RFC 3464 bounce.
  A premature 4xx/5xx/garbage *during* the body is read when the client
  waits for the final reply, so it is logged at stage 9.
* after a ``T`` the fault is lifted; the retry (``Retry_Interval = 1``)
  delivers the message exactly once.

All cells run at once against one ``impetus serve`` (one module fixture);
each cell is a separate test that checks its own results.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mta import MTA, wait_until
from tests.peers.dns_server import DnsServer
from tests.peers.scripted_peer import ACTIONS, ScriptedPeer, fault_text

pytestmark = pytest.mark.integration

NO_MXS = "421 4.4.0 [internal] no MXs for this domain could be reached at this time"
CLOSED = "451 4.4.2 [internal] connection closed by remote host"
GARBLED = "451 4.4.2 [internal] garbled response"
NO_RESPONSE = {"mail": "451 4.4.2 [internal] no MAIL FROM response",
               "rcpt": "451 4.4.2 [internal] no RCPT TO response",
               "data": "451 4.4.2 [internal] no DATA response",
               "body": "451 4.4.2 [internal] no BODY response",
               "final": "451 4.4.2 [internal] no BODY response"}
STAGE_CODE = {"mail": "2", "rcpt": "4", "data": "6", "body": "8", "final": "9"}
PANIC_DETAIL = {"close": "connection closed by remote host", "garbage": "garbled response"}
SETUP_HANG = {"banner": "no banner", "ehlo": "no HELO/EHLO response"}

MATRIX_STAGES = ("banner", "ehlo", "starttls", "mail", "rcpt", "data", "body", "final")
STARTTLS_FAILED = "451 4.7.5 [internal] send STARTTLS failed"
NO_GO_AHEAD = "451 4.7.5 [internal] no tls go-ahead"
BIG_BODY = 6 << 20   # > the client's socket send buffer: "body" faults strike mid-write
SENDER = "sender@bounces.test"
TIMEOUT = 2          # every SMTP timeout in the MTA config

CONFIG = f"""
Connect_Timeout = {TIMEOUT}
EHLO_Timeout = {TIMEOUT}
MailFrom_Timeout = {TIMEOUT}
RcptTo_Timeout = {TIMEOUT}
Body_Timeout = {TIMEOUT}
Rset_Timeout = {TIMEOUT}
Retry_Interval = 1
Max_Retry_Interval = 1
Host_Failure_Retry = 0
Idle_Timeout = 2
"""


@dataclass
class Cell:
    label: str
    stage: str
    action: str
    host: str
    domain: str
    pipelining: bool = True
    kind: str = "matrix"      # matrix | failover (second MX) | fallback (TLS = ifavailable)
    tls: str | None = None    # the domain's TLS option
    state: str = "armed"      # armed -> lifted|failed -> done
    first: list | None = None  # first T/P mainlog record
    lifted_at: float | None = None
    done_at: float | None = None

    @property
    def rcpt(self) -> str:
        return f"user@{self.domain}"

    @property
    def key(self) -> str:
        return self.label if self.kind == "matrix" else f"{self.label}/{self.kind}"


@dataclass
class MatrixRun:
    mta: MTA
    peer: ScriptedPeer
    cells: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    bounces: list = field(default_factory=list)
    paniclog: list = field(default_factory=list)
    bouncelog: list = field(default_factory=list)
    elapsed: float = 0.0
    backup_host: str = "127.0.3.1"
    bounce_host: str = "127.0.3.2"

    def recs(self, cell: Cell, rtype: str | None = None) -> list[list[str]]:
        return [r for r in self.records if r[5:6] == [cell.domain]
                and (rtype is None or r[4] == rtype)]


def _cells() -> list[Cell]:
    out, i = [], 0
    for stage in MATRIX_STAGES:
        for action in ACTIONS:
            for pipelining in (True, False):
                i += 1
                label = f"{stage}-{action}-{'p' if pipelining else 'n'}"
                out.append(Cell(label, stage, action, f"127.0.1.{i}", f"{label}.faults.test",
                                pipelining, tls="required" if stage == "starttls" else None))
    for j, stage in enumerate(("banner", "ehlo")):
        for k, action in enumerate(ACTIONS):
            label = f"{stage}-{action}"
            out.append(Cell(label, stage, action, f"127.0.2.{j * 10 + k + 1}",
                            f"{label}.failover.test", kind="failover"))
    for k, action in enumerate(ACTIONS):
        label = f"starttls-{action}"
        out.append(Cell(label, "starttls", action, f"127.0.2.{30 + k + 1}",
                        f"{label}.fallback.test", kind="fallback", tls="ifavailable"))
    return out


def _domain_stanzas(cells: list[Cell]) -> str:
    return "".join(f'Domain "{c.domain}" {{\n  TLS = {c.tls}\n  TLS_Verify = no\n}}\n'
                   for c in cells if c.tls)


CELLS = _cells()


def _zone(cells: list[Cell]) -> str:
    lines = ["bounces IN A 127.0.3.2", "backup.failover IN A 127.0.3.1"]
    for c in cells:
        name = c.domain[:-len(".test")]
        if c.kind == "failover":
            lines += [f"{name} IN MX 10 mx-{name}.test.", f"{name} IN MX 20 backup.failover.test.",
                      f"mx-{name} IN A {c.host}"]
        else:
            lines.append(f"{name} IN A {c.host}")
    return "\n".join(lines) + "\n"


def _message(cell: Cell) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{cell.rcpt}>\r\nSubject: cell {cell.label}\r\n"
            f"Message-ID: <{cell.label}@faults.test>\r\n\r\n").encode()
    if cell.stage == "body":
        line = b"0123456789" * 7 + b"\r\n"
        return head + line * (BIG_BODY // len(line))
    return head + f"cell {cell.label}\r\n".encode()


def _first_failure(run: MatrixRun, cell: Cell):
    for r in run.records:
        if r[5:6] == [cell.domain] and r[4] in ("T", "P"):
            return r
    return None


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, certs) -> MatrixRun:
    work: Path = tmp_path_factory.mktemp("faults")
    dns = DnsServer(work / "dns").start()
    hosts = [c.host for c in CELLS] + ["127.0.3.1", "127.0.3.2"]
    peer = ScriptedPeer(hosts, tls_context=certs.server_context("server")).start()
    mta = None
    try:
        dns.add(_zone(CELLS))
        config = f"Remote_SMTP_Port = {peer.port}\n{CONFIG}\n{_domain_stanzas(CELLS)}"
        mta = MTA(work / "mta", dns.resolv_conf, body=config)
        mta.start()
        run = MatrixRun(mta, peer, {c.key: c for c in CELLS})
        for c in CELLS:
            peer.arm(c.host, c.stage, c.action, pipelining=c.pipelining,
                     starttls=c.stage == "starttls")
        t0 = time.monotonic()
        for c in CELLS:
            mta.send(SENDER, [c.rcpt], _message(c))
        deadline = time.monotonic() + 60
        pending = list(CELLS)
        while pending and time.monotonic() < deadline:
            run.records = mta.mainlog.records()
            bounces = peer.accepted(run.bounce_host)
            for c in list(pending):
                if c.state == "armed":
                    if c.kind != "matrix":
                        if run.recs(c, "D"):
                            c.state, c.done_at = "done", time.monotonic()
                            pending.remove(c)
                        continue
                    first = _first_failure(run, c)
                    if first is None:
                        continue
                    c.first = first
                    if first[4] == "T":
                        peer.lift(c.host)
                        c.state, c.lifted_at = "lifted", time.monotonic()
                    else:
                        c.state = "failed"
                if c.state == "lifted" and run.recs(c, "D"):
                    c.state, c.done_at = "done", time.monotonic()
                    pending.remove(c)
                elif c.state == "failed" and any(c.rcpt.encode() in b["data"] for b in bounces):
                    c.state, c.done_at = "done", time.monotonic()
                    pending.remove(c)
            time.sleep(0.05)
        # Quiet period: anything delivered twice would show up now (retries
        # run every second, so two retry rounds).
        time.sleep(2.5)
        run.elapsed = time.monotonic() - t0
        run.records = mta.mainlog.records()
        run.bounces = peer.accepted(run.bounce_host)
        run.paniclog = mta.paniclog.lines()
        run.bouncelog = mta.bouncelog.records("B")
        yield run
    finally:
        if mta is not None:
            mta.stop()
        peer.close()
        dns.stop()


XFAIL_CELLS: dict[str, str] = {}  # cells with a known bug (none left)


def _matrix_params():
    params = []
    for c in CELLS:
        if c.kind != "matrix":
            continue
        marks = ()
        if c.label in XFAIL_CELLS:
            marks = pytest.mark.xfail(strict=True, reason=XFAIL_CELLS[c.label])
        params.append(pytest.param(c.label, id=c.label, marks=marks))
    return params


def _params(kind: str):
    return [pytest.param(c.key, id=c.label) for c in CELLS if c.kind == kind]


def _delivered_copies(run: MatrixRun, host: str, rcpt: str) -> list[dict]:
    return [m for m in run.peer.accepted(host) if rcpt in m["rcpt_tos"]]


@pytest.mark.parametrize("label", _matrix_params())
def test_fault_cell(matrix: MatrixRun, label: str):
    c: Cell = matrix.cells[label]
    assert matrix.peer.fired(c.host) >= 1, f"the fault of {label} never struck"
    assert c.first is not None, (f"{label}: no T/P record for {c.domain}; state {c.state}; "
                                 f"records {matrix.recs(c)}")
    rtype, stage, response = c.first[4], c.first[9], c.first[-1]
    if c.stage in ("banner", "ehlo"):
        # connection set-up failure: failover, then "no MXs" (DECISIONS.md)
        assert (rtype, stage, response) == ("T", "0", NO_MXS)
        detail = {"hang": SETUP_HANG[c.stage]}.get(c.action) or PANIC_DETAIL.get(c.action) \
            or fault_text(c.stage, c.action)
        assert any(c.host in ln and detail in ln for ln in matrix.paniclog), \
            f"paniclog has no '{detail}' for {c.host}"
        if c.stage == "ehlo" and c.action == "5xx":
            cmds = [cmd.split()[0] for s in matrix.peer.sessions(c.host) for cmd in s["commands"]]
            assert cmds[:2] == ["EHLO", "HELO"], "a 5xx to EHLO must be followed by HELO"
    elif c.stage == "starttls":
        want = NO_GO_AHEAD if c.action in ("4xx", "5xx") else STARTTLS_FAILED
        assert (rtype, stage, response) == ("T", "15", want)
    else:
        want_stage = STAGE_CODE[c.stage]
        if c.stage == "body" and c.action in ("4xx", "5xx", "garbage"):
            want_stage = "9"   # the premature reply is read as the confirmation
        assert stage == want_stage, f"{label}: stage {stage}, expected {want_stage} ({c.first})"
        if c.action == "close":
            assert (rtype, response) == ("T", CLOSED)
        elif c.action == "hang":
            assert (rtype, response) == ("T", NO_RESPONSE[c.stage])
        elif c.action == "garbage":
            assert rtype == "T" and response.startswith(GARBLED), response
        elif c.action == "4xx":
            assert (rtype, response) == ("T", fault_text(c.stage, c.action))
        else:
            assert (rtype, response) == ("P", fault_text(c.stage, c.action))
    copies = _delivered_copies(matrix, c.host, c.rcpt)
    ds = matrix.recs(c, "D")
    if rtype == "T":
        assert not matrix.recs(c, "P"), f"{label}: transient fault failed permanently"
        assert c.state == "done", f"{label}: not delivered after the fault was lifted"
        assert len(ds) == 1, f"{label}: {len(ds)} D records"
        assert ds[0][11] == c.host
        assert len(copies) == 1, f"{label}: the peer accepted {len(copies)} copies"
        assert copies[0]["data"].count(f"Message-ID: <{c.label}@faults.test>".encode()) == 1
        if c.tls == "required":
            assert copies[0]["tls"] is True, "delivered without the required TLS"
    else:
        assert not ds and not copies, f"{label}: permanently failed message was delivered"
        assert [b for b in matrix.bouncelog if b[5:7] == ["user", c.domain]], "no bouncelog B line"
        bounces = [b for b in matrix.bounces if c.rcpt.encode() in b["data"]]
        assert len(bounces) == 1, f"{label}: {len(bounces)} bounces"
        assert bounces[0]["mail_from"] == ""
        assert fault_text(c.stage, c.action).encode() in bounces[0]["data"]


@pytest.mark.parametrize("label", _params("failover"))
def test_setup_fault_fails_over_to_next_mx(matrix: MatrixRun, label: str):
    c: Cell = matrix.cells[label]
    assert matrix.peer.fired(c.host) >= 1
    assert not matrix.recs(c, "T") and not matrix.recs(c, "P"), matrix.recs(c)
    ds = matrix.recs(c, "D")
    assert len(ds) == 1 and ds[0][11] == matrix.backup_host and ds[0][9] == "0", ds
    assert len(_delivered_copies(matrix, matrix.backup_host, c.rcpt)) == 1
    assert not _delivered_copies(matrix, c.host, c.rcpt)


@pytest.mark.parametrize("label", _params("fallback"))
def test_starttls_fault_falls_back_to_plain_text(matrix: MatrixRun, label: str):
    """``TLS = ifavailable``: a refused or failed STARTTLS is followed by a
    plain-text delivery at once (on the same session after a 4xx/5xx, on a
    new one after close/hang/garbage); no ``T``, one copy."""
    c: Cell = matrix.cells[label]
    assert matrix.peer.fired(c.host) >= 1
    assert not matrix.recs(c, "T") and not matrix.recs(c, "P"), matrix.recs(c)
    ds = matrix.recs(c, "D")
    assert len(ds) == 1 and ds[0][11] == c.host and ds[0][9] == "0", ds
    [copy] = _delivered_copies(matrix, c.host, c.rcpt)
    assert copy["tls"] is False


def test_matrix_runs_in_bounded_time(matrix: MatrixRun):
    # every cell resolved (the per-cell tests say which did not) and the
    # whole matrix, quiet period included, stays well under the CI budget
    assert matrix.elapsed < 75, f"matrix took {matrix.elapsed:.1f}s"
    assert not [r for r in matrix.records if r[4] == "P" and r[5].endswith(".failover.test")]


# ------------------------------------------------- reset while sending the body
def test_body_reset_does_not_kill_the_mta(tmp_path, dns_server):
    """The peer closes with unread body data (a TCP reset) while Impetus is
    still writing a 6 MB body: ``T`` stage 8 ``connection closed by remote
    host``, the MTA lives on, and the retry after the fault is lifted
    delivers once."""
    hosts = [f"127.0.5.{i}" for i in range(1, 5)]
    peer = ScriptedPeer(hosts).start()
    cells = [Cell(f"body-close-{i}", "body", "close", h, f"reset{i}.test", pipelining=i % 2 == 0)
             for i, h in enumerate(hosts)]
    m = MTA(tmp_path / "mta", dns_server.resolv_conf,
            body=f"Remote_SMTP_Port = {peer.port}\n{CONFIG}")
    try:
        dns_server.add("".join(f"reset{i} IN A {h}\n" for i, h in enumerate(hosts)))
        for c in cells:
            peer.arm(c.host, c.stage, c.action, pipelining=c.pipelining)
        m.start()
        for c in cells:
            try:
                m.send(SENDER, [c.rcpt], _message(c))
            except OSError as exc:  # smtplib errors are OSErrors
                assert m.proc.poll() is None, f"impetus serve died ({m.proc.returncode}): {exc!r}"
                raise

        def settled():
            if m.proc.poll() is not None:
                return True
            ts = m.mainlog.records("T")
            return all(sum(t[5] == c.domain for t in ts) >= 2 for c in cells)
        wait_until(settled, 20, what="two failed attempts per cell")
        assert m.proc.poll() is None, f"impetus serve died with {m.proc.returncode}"
        for c in cells:
            ts = [t for t in m.mainlog.records("T") if t[5] == c.domain]
            assert (ts[0][9], ts[0][-1]) == ("8", CLOSED)
            peer.lift(c.host)
        m.mainlog.wait_for("D", len(cells), timeout=15)
        for c in cells:
            assert len(_delivered_copies_at(peer, c.host, c.rcpt)) == 1
    finally:
        m.stop()
        peer.close()


def _delivered_copies_at(peer: ScriptedPeer, host: str, rcpt: str) -> list[dict]:
    return [x for x in peer.accepted(host) if rcpt in x["rcpt_tos"]]
