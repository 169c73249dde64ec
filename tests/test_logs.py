"""Tests for impetus.logs: exact §12 line formats, buffering, rotation."""

from __future__ import annotations

import asyncio
import os
import re
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impetus import logs as L
from impetus.logs import (
    BounceLog,
    Logs,
    MainLog,
    PanicLog,
    RejectLog,
    classify_bounce,
    escape_field,
    split_address,
    unescape_field,
)

T = 1700000000.75  # integer part is written


def clock() -> float:
    return T


def lines(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


# --------------------------------------------------------------------------
# escaping
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, escaped",
    [
        ("plain text", "plain text"),
        ("a@b", "a\\@b"),
        ("back\\slash", "back\\\\slash"),
        ("l1\nl2", "l1\\nl2"),
        ("l1\r\nl2", "l1\\r\\nl2"),
        ("tab\there", "tab\\there"),
        ("nul\x00bel\x07del\x7f", "nul\\x00bel\\x07del\\x7f"),
        ("caf\u00e9", "caf\u00e9"),
        ("c1\x85", "c1\\u0085"),
        ("ls\u2028", "ls\\u2028"),
        (b"raw\xff", "raw\\xff"),
        (None, ""),
        (42, "42"),
    ],
)
def test_escape_field(raw, escaped):
    assert escape_field(raw) == escaped


@given(st.text())
def test_escape_roundtrip_and_single_line(s):
    e = escape_field(s)
    assert "\n" not in e and "\r" not in e
    assert "@" not in re.sub(r"\\.", "", e)  # every '@' is escaped
    e.encode("utf-8")  # always encodable
    assert unescape_field(e) == s


@given(st.binary())
def test_escape_bytes_roundtrip(b):
    e = escape_field(b)
    e.encode("utf-8")
    assert unescape_field(e).encode("utf-8", "surrogateescape") == b


@given(st.lists(st.one_of(st.text(), st.integers(), st.none(), st.binary()), max_size=8))
def test_join_fast_path_matches_escape(fields):
    assert L._join(tuple(fields)) == "@".join(escape_field(f) for f in fields)


def test_split_address():
    assert split_address("user@example.com") == ("user", "example.com")
    assert split_address("<user@example.com>") == ("user", "example.com")
    assert split_address('"a@b"@example.com') == ('"a@b"', "example.com")
    assert split_address("") == ("", "")
    assert split_address("<>") == ("", "")
    assert split_address(None) == ("", "")
    assert split_address("postmaster") == ("postmaster", "")


# --------------------------------------------------------------------------
# exact lines
# --------------------------------------------------------------------------


def test_mainlog_records(tmp_path):
    p = tmp_path / "mainlog.ec"
    ml = MainLog(p, clock=clock)
    ml.reception("20/00-25593-945A87F3", "20/00-25593-945A87F3",
                 "21/00-25593-845A87F3", "bob@example.net", "alice@example.com",
                 "192.0.2.7", 1234, "esmtp", "default", "default")
    ml.reception("m2", "b1", "c1", "bob@example.net", "", "192.0.2.7", 1234,
                 "internal", "g1", "b1")
    ml.delivery("m1", "b1", "c9", "example.net", 1234, "default", "default",
                0, 18.5312, "10.0.0.1")
    ml.delivery("m1", "b1", "c9", "example.net", 1234, "g", "b", 2, 3,
                "10.0.0.1", record_type="X")
    ml.transient("m1", "b1", "c9", "example.net", 0, "default", "default",
                 15, 0, 18.53, "10.0.0.1", "421 no adequate servers")
    ml.permanent("m1", "b1", "c9", "example.net", 512, "default", "default",
                 4, 3, 100, "10.0.0.1", "550 5.1.1 <bob@example.net>: user\r\nunknown")
    ml.transient("m1", "b1", "c9", "example.net", 0, "default", "default",
                 0, 1, 7.0, None, "451 4.4.1 [internal] No valid hosts")
    ml.heartbeat()
    ml.close()
    assert lines(p) == [
        "1700000000@20/00-25593-945A87F3@20/00-25593-945A87F3@21/00-25593-845A87F3"
        "@R@bob@example.net@alice@example.com@192.0.2.7@1234@esmtp@default@default",
        "1700000000@m2@b1@c1@R@bob@example.net@@@192.0.2.7@1234@internal@g1@b1",
        "1700000000@m1@b1@c9@D@example.net@1234@default@default@0@18.53@10.0.0.1",
        "1700000000@m1@b1@c9@X@example.net@1234@g@b@2@3.00@10.0.0.1",
        "1700000000@m1@b1@c9@T@example.net@0@default@default@15@0@18.53@10.0.0.1"
        "@421 no adequate servers",
        "1700000000@m1@b1@c9@P@example.net@512@default@default@4@3@100.00@10.0.0.1"
        "@550 5.1.1 <bob\\@example.net>: user\\r\\nunknown",
        "1700000000@m1@b1@c9@T@example.net@0@default@default@0@1@7.00@"
        "@451 4.4.1 [internal] No valid hosts",
        "1700000000@@@@M",
    ]


def test_mainlog_field_counts(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    ml.reception("m", "b", "c", "x@y", "s@t", "1.2.3.4", 1, "esmtp", "g", "b")
    ml.delivery("m", "b", "c", "y", 1, "g", "b", 0, 1, "1.2.3.4")
    ml.transient("m", "b", "c", "y", 1, "g", "b", 9, 0, 1, "1.2.3.4", "4@@2\n")
    ml.close()
    r, d, t = lines(p)
    # count only unescaped separators
    split = lambda s: s.replace("\\@", "").split("@")  # noqa: E731
    assert len(split(r)) == 14 and split(r)[4] == "R"
    assert len(split(d)) == 12 and split(d)[4] == "D"
    assert len(split(t)) == 14 and split(t)[4] == "T"
    assert unescape_field(t.split("@", 13)[13].replace("\\@", "\x00")).replace(
        "\x00", "@") == "4@@2\n"


def test_mainlog_hires(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock, hires=True)
    ml.heartbeat()
    ml.close()
    assert lines(p) == ["1700000000750000@@@@M"]


def test_mainlog_toggles(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock, log_receptions=False, log_transient_failures=False)
    ml.reception("m", "b", "c", "x@y", "s@t", "1.2.3.4", 1, "esmtp", "g", "b")
    ml.transient("m", "b", "c", "y", 1, "g", "b", 9, 0, 1, "1.2.3.4", "421 x")
    ml.permanent("m", "b", "c", "y", 1, "g", "b", 9, 0, 1, "1.2.3.4", "550 x")
    ml.close()
    assert [ln.split("@")[4] for ln in lines(p)] == ["P"]


def test_bouncelog(tmp_path):
    p = tmp_path / "bouncelog.ec"
    bl = BounceLog(p, clock=clock)
    bl.bounce("m1", "b1", "c1", "bob@example.net", "alice@example.com",
              "default", "default", 4, 10, 2048, "10.0.0.1",
              "550 5.1.1 <bob@example.net> unknown\n")
    bl.bounce("m2", "b1", "c2", "bob@example.net", "alice@example.com",
              "g", "b", 21, 24, 2048, None,
              "554 5.4.7 [internal] exceeded max time without delivery")
    bl.bounce("m3", "b1", "c3", "bob@example.net", "alice@example.com",
              "g", "b", 0, 70, 10, "", "421 busy", record_type="T")
    bl.heartbeat()
    bl.close()
    assert lines(p) == [
        "1700000000@m1@b1@c1@B@bob@example.net@alice@example.com@default@default"
        "@4@10@2048@10.0.0.1@550 5.1.1 <bob\\@example.net> unknown\\n",
        "1700000000@m2@b1@c2@B@bob@example.net@alice@example.com@g@b@21@24@2048@"
        "@554 5.4.7 [internal] exceeded max time without delivery",
        "1700000000@m3@b1@c3@T@bob@example.net@alice@example.com@g@b@0@70@10@@421 busy",
        "1700000000@@@@M1",
    ]


def test_bouncelog_transient_toggle(tmp_path):
    p = tmp_path / "b"
    bl = BounceLog(p, clock=clock, log_transient_failures=False)
    bl.bounce("m", "b", "c", "x@y", "s@t", "g", "b", 0, 70, 1, "", "421", record_type="T")
    bl.close()
    assert lines(p) == []


def test_rejectlog(tmp_path):
    p = tmp_path / "rejectlog.ec"
    rl = RejectLog(p, clock=clock)
    rl.reject(remote="192.0.2.9:34123", local=("10.0.0.1", 25), connid="c1",
              path="default", path_group="default", phase="awaiting rcptto",
              code=550, module="ec_relay",
              ctxconn={"mail_from": "a@b", "weird": "x,y=z]"},
              ctxmess=None, text="5.7.1 relaying denied")
    rl.reject(remote="192.0.2.9:1", local="10.0.0.1:25", connid='c"2', code=421,
              text="bye\r\n")
    rl.heartbeat()
    rl.close()
    assert lines(p) == [
        '1700000000: R="192.0.2.9:34123" L="10.0.0.1:25" C="c1" PATH="default"'
        ' PATH_GRP="default" P="awaiting rcptto" E=550 M=ec_relay'
        " CTXCONN=[mail_from=a@b,weird=x\\,y\\=z\\]] CTXMESS=[] 5.7.1 relaying denied",
        '1700000000: R="192.0.2.9:1" L="10.0.0.1:25" C="c\\"2" PATH="" PATH_GRP=""'
        " P=\"\" E=421 M= CTXCONN=[] CTXMESS=[] bye\\r\\n",
        "1700000000: Marker 1",
    ]


def test_paniclog(tmp_path):
    p = tmp_path / "paniclog.ec"
    pl = PanicLog(p, clock=clock)
    pl.panic("something @ broke\nbadly")
    pl.log("again")
    pl.heartbeat()  # no heartbeat in the paniclog
    pl.close()
    assert lines(p) == ["1700000000: something @ broke\\nbadly", "1700000000: again"]


# --------------------------------------------------------------------------
# buffering
# --------------------------------------------------------------------------


class CountingWrites:
    def __init__(self, lf):
        self.calls = []
        orig = lf._write_all

        def wrapper(data):
            self.calls.append(len(data))
            orig(data)

        lf._write_all = wrapper


def test_no_loop_writes_immediately(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    w = CountingWrites(ml)
    ml.heartbeat()
    assert len(w.calls) == 1
    assert lines(p) == ["1700000000@@@@M"]
    ml.close()


async def test_burst_in_one_iteration_is_one_write(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    w = CountingWrites(ml)
    for i in range(200):
        ml.delivery(f"m{i}", "b", "c", "example.net", 10, "g", "b", 0, 1.0, "10.0.0.1")
    assert w.calls == []  # nothing written yet: buffered
    assert lines(p) == []
    await asyncio.sleep(0)
    assert len(w.calls) == 1
    assert len(lines(p)) == 200
    # next burst schedules a new flush
    ml.heartbeat()
    ml.heartbeat()
    await asyncio.sleep(0)
    assert len(w.calls) == 2
    assert len(lines(p)) == 202
    ml.close()


async def test_flush_over_64k_is_immediate(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    w = CountingWrites(ml)
    big = "x" * 1000
    n = 0
    while not w.calls:
        ml.transient("m", "b", "c", "d", 0, "g", "b", 0, 0, 0, "", big)
        n += 1
        assert n < 100
    assert w.calls[0] > L.FLUSH_THRESHOLD
    assert os.path.getsize(p) == w.calls[0]
    ml.transient("m", "b", "c", "d", 0, "g", "b", 0, 0, 0, "", "tail")
    await asyncio.sleep(0)
    assert len(w.calls) == 2
    assert len(lines(p)) == n + 1
    ml.close()


async def test_explicit_flush_and_close(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    w = CountingWrites(ml)
    ml.heartbeat()
    ml.flush()
    assert len(w.calls) == 1
    ml.heartbeat()
    ml.close()  # flushes
    assert len(w.calls) == 2
    assert len(lines(p)) == 2
    ml.heartbeat()  # after close: dropped, no error
    await asyncio.sleep(0)
    assert len(lines(p)) == 2


def test_new_loop_after_old_loop_closed(tmp_path):
    """A flush scheduled on a loop that closed must not block later loops."""
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)

    async def one():
        ml.heartbeat()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(one())
    loop.close()  # the scheduled flush may not have run
    ml.flush()
    assert len(lines(p)) == 1

    async def two():
        ml.heartbeat()
        await asyncio.sleep(0)
        return len(lines(p))

    assert asyncio.run(two()) == 2
    ml.close()


def test_reopen_after_rename(tmp_path):
    p = tmp_path / "mainlog.ec"
    ml = MainLog(p, clock=clock)
    ml.heartbeat()
    os.rename(p, tmp_path / "mainlog.ec.1")
    ml.heartbeat()  # still goes to the renamed file
    assert ml.reopen() is True
    ml.heartbeat()
    ml.close()
    assert lines(tmp_path / "mainlog.ec.1") == ["1700000000@@@@M"] * 2
    assert lines(p) == ["1700000000@@@@M"]


def test_reopen_failure_keeps_old_file(tmp_path, caplog):
    d = tmp_path / "dir"
    d.mkdir()
    p = d / "m"
    ml = MainLog(p, clock=clock)
    os.rename(d, tmp_path / "moved")
    (tmp_path / "dir").write_text("a file where the log directory was")
    assert ml.reopen() is False
    assert "cannot reopen" in caplog.text
    ml.heartbeat()
    ml.close()
    assert lines(tmp_path / "moved" / "m") == ["1700000000@@@@M"]


async def test_reopen_flushes_buffer_to_old_file(tmp_path):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)
    ml.heartbeat()  # buffered (inside a loop)
    os.rename(p, tmp_path / "m.1")
    ml.reopen()
    ml.close()
    assert lines(tmp_path / "m.1") == ["1700000000@@@@M"]
    assert lines(p) == []


def test_append_and_mode(tmp_path):
    p = tmp_path / "m"
    p.write_text("existing\n")
    ml = MainLog(p, clock=clock)
    ml.heartbeat()
    ml.close()
    assert lines(p) == ["existing", "1700000000@@@@M"]

    old = os.umask(0o077)
    try:
        q = tmp_path / "new"
        MainLog(q, clock=clock).close()
        r = tmp_path / "new640"
        MainLog(r, clock=clock, mode="0640").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(q).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(r).st_mode) == 0o640


def test_write_error_is_swallowed(tmp_path, caplog):
    p = tmp_path / "m"
    ml = MainLog(p, clock=clock)

    def boom(data):
        raise OSError(28, "No space left on device")

    ml._write_all = boom
    ml.heartbeat()
    ml.heartbeat()
    assert ml.write_errors == 2
    assert "No space left" in caplog.text
    ml.close()


# --------------------------------------------------------------------------
# Logs container
# --------------------------------------------------------------------------


def test_disabled_logs_are_noops(tmp_path):
    logs = Logs(clock=clock)
    assert not logs.mainlog.enabled
    logs.mainlog.reception("m", "b", "c", "x@y", "", "1.2.3.4", 1, "esmtp", "g", "b")
    logs.mainlog.delivery("m", "b", "c", "y", 1, "g", "b", 0, 1, "1.2.3.4")
    logs.mainlog.transient("m", "b", "c", "y", 1, "g", "b", 0, 0, 1, "", "4")
    logs.mainlog.permanent("m", "b", "c", "y", 1, "g", "b", 0, 0, 1, "", "5")
    logs.bouncelog.bounce("m", "b", "c", "x@y", "s@t", "g", "b", 0, 1, 1, "", "5")
    logs.rejectlog.reject(remote="a:1", local="b:2", connid="c", code=550, text="no")
    logs.paniclog.panic("x")
    logs.heartbeat_all()
    logs.flush_all()
    logs.reopen_all()
    logs.close()
    assert os.listdir(tmp_path) == []


def test_logs_container(tmp_path):
    logs = Logs(mainlog=tmp_path / "main", bouncelog=tmp_path / "bounce",
                rejectlog=tmp_path / "reject", clock=clock)
    assert logs.mainlog.enabled and not logs.paniclog.enabled
    logs.heartbeat_all()
    logs.flush_all()
    assert lines(tmp_path / "main") == ["1700000000@@@@M"]
    assert lines(tmp_path / "bounce") == ["1700000000@@@@M1"]
    assert lines(tmp_path / "reject") == ["1700000000: Marker 1"]
    for n in ("main", "bounce", "reject"):
        os.rename(tmp_path / n, tmp_path / (n + ".old"))
    logs.reopen_all()
    logs.heartbeat_all()
    logs.close()
    for n in ("main", "bounce", "reject"):
        assert len(lines(tmp_path / n)) == 1
    assert not (tmp_path / "panic").exists()


def test_logs_from_config(tmp_path):
    class Loggers:
        mainlog = str(tmp_path / "main")
        rejectlog = None
        paniclog = str(tmp_path / "panic")
        bouncelog = None

    class Config:
        loggers = Loggers()

    logs = Logs.from_config(Config(), clock=clock)
    assert logs.mainlog.enabled and logs.paniclog.enabled
    assert not logs.rejectlog.enabled and not logs.bouncelog.enabled
    logs.close()


def test_logs_from_real_config_model(tmp_path):
    from impetus.config.model import LoggerConfig

    class Config:
        loggers = LoggerConfig(mainlog=str(tmp_path / "main"), rejectlog=str(tmp_path / "rej"),
                               bouncelog=str(tmp_path / "bounce"), mainlog_mode=0o600,
                               log_receptions=False, log_rejections=False,
                               log_outofband_bounces=False, heartbeat=30,
                               bounce_heartbeat=90)

    logs = Logs.from_config(Config(), clock=clock)
    assert not logs.rejectlog.enabled
    assert logs.mainlog.mode == 0o600 and not logs.mainlog.log_receptions
    assert logs.heartbeat_interval == 30 and logs.bounce_heartbeat_interval == 90
    logs.bouncelog.bounce("m", "b", "c", "x@y", "s@t", "g", "b", 21, 24, 1, "", "5 oob")
    logs.bouncelog.bounce("m", "b", "c", "x@y", "s@t", "g", "b", 4, 10, 1, "", "5 inband")
    logs.close()
    assert [ln.rsplit("@", 1)[1] for ln in lines(tmp_path / "bounce")] == ["5 inband"]
    assert stat.S_IMODE(os.stat(tmp_path / "main").st_mode) == 0o600


async def test_start_heartbeat(tmp_path):
    logs = Logs(mainlog=tmp_path / "main", bouncelog=tmp_path / "bounce", clock=clock)
    tasks = logs.start_heartbeat(0.01)
    assert len(tasks) == 2
    await asyncio.sleep(0.055)
    logs.close()
    await asyncio.sleep(0)
    assert all(t.cancelled() or t.done() for t in tasks)
    n = len(lines(tmp_path / "main"))
    assert n >= 2 and set(lines(tmp_path / "main")) == {"1700000000@@@@M"}
    assert set(lines(tmp_path / "bounce")) == {"1700000000@@@@M1"}


# --------------------------------------------------------------------------
# classify_bounce
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, enhanced, text, expected",
    [
        # enhanced codes first
        (550, "5.1.1", "550 5.1.1 <bob@example.net>: Recipient address rejected", 10),
        (550, None, "550 5.1.1 user unknown", 10),
        (0, None, "5.1.10 RESOLVER.ADR.RecipientNotFound", 10),
        (550, "5.2.1", "mailbox disabled", 10),
        (552, "5.2.2", "mailbox full", 22),
        (452, "4.2.2", "over quota", 22),
        (552, "5.3.4", "message too big for system", 23),
        (552, "5.2.3", "message length exceeds limit", 23),
        (554, "5.7.1", "Relay access denied", 54),
        (550, "5.7.1", "Service unavailable; client host blocked using Spamhaus", 51),
        (550, "5.7.1", "message content rejected as spam content", 52),
        (550, "5.7.1", "virus found in attachment", 53),
        (550, "5.7.1", "Message rejected due to local policy", 50),
        (554, "5.7.0", "554 5.7.0 [internal] rejected by policy", 50),
        # transient
        (450, "4.7.1", "greylisted, try again later", 20),
        (452, "4.1.1", "mailbox temporarily unavailable", 20),
        (421, "4.3.2", "Service not available, closing channel", 70),
        (421, None, "421 4.4.0 [internal] no MXs for this domain could be reached at this time", 70),
        (451, None, "451 4.4.1 [internal] No valid hosts", 70),
        (451, None, "451 4.4.2 [internal] connection closed by remote host", 70),
        (421, None, "421 no adequate servers", 70),
        # timeouts
        (450, None, "450 4.4.1 [internal] Connection Timed Out", 24),
        (451, None, "451 4.4.2 [internal] no banner", 24),
        (451, None, "451 4.4.2 [internal] no HELO/EHLO response", 24),
        (451, None, "451 4.4.2 [internal] no MAIL FROM response", 24),
        (451, None, "451 4.4.2 [internal] no BODY response", 24),
        (421, "4.4.7", "queue too long", 24),
        # DNS
        (554, None, "554 5.4.4 [internal] Domain Lookup Failed", 21),
        (550, None, "550 5.4.4 [internal] NULL MX domain does not accept mail", 21),
        (550, "5.1.2", "bad destination system", 21),
        (550, None, "550 Host not found", 21),
        # admin
        (554, None, "554 5.7.0 [internal] Message manually purged", 25),
        (554, None, "554 Message manually purged", 25),
        (554, None, "554 5.7.0 [internal] Blackholed", 25),
        # expiry
        (554, None, "554 5.4.7 [internal] exceeded max time without delivery", 24),
        (554, None, "554 5.4.7 [internal] exceeded max retries without delivery", 1),
        (554, None, "554 5.4.5 [internal] Delivery not attempted (message expired)", 24),
        # text fallback without enhanced codes
        (550, None, "550 No such user here", 10),
        (550, None, "550 User unknown in relay recipient table", 10),
        (554, None, "554 Relay access denied", 54),
        (552, None, "552 Mailbox full", 22),
        (552, None, "552 Message size exceeds fixed maximum message size", 23),
        (554, None, "554 Your IP is listed on a blacklist", 51),
        # defaults
        (554, "5.0.0", "554 transaction failed", 1),
        (551, None, "551 5.4.6 [internal] Private/Loopback Address", 1),
        (0, None, "", 1),
        (250, None, "250 ok", 1),
    ],
)
def test_classify_bounce(code, enhanced, text, expected):
    assert classify_bounce(code, enhanced, text) == expected


@settings(max_examples=200)
@given(st.integers(0, 699), st.one_of(st.none(), st.text(max_size=12)), st.text())
def test_classify_bounce_total(code, enhanced, text):
    assert classify_bounce(code, enhanced, text) in L.BOUNCE_CLASSES


def test_missing_log_directory_is_created(tmp_path):
    from impetus.logs import MainLog
    path = tmp_path / "var" / "log" / "impetus" / "mainlog.ec"
    log = MainLog(str(path))
    log.heartbeat()
    log.close()
    assert path.read_text().endswith("@@@@M\n")


def test_split_record_inverts_escaping():
    from impetus.logs import escape_field, split_record
    fields = ["1", "id@x", "b\\c", "T", "resp\nline", ""]
    line = "@".join(escape_field(f) for f in fields)
    assert split_record(line) == fields
