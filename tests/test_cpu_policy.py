"""Scheduling_Policy (our extension): every thread of every Impetus process
runs under SCHED_BATCH by default, SCHED_OTHER on request, a policy chosen
from outside is left alone, and a reload applies a change."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from impetus import cpu_policy
from tests.mta import MTA, children_of, wait_until
from tests.test_control_console import rewrite_config

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")

# Run in a child: the policy would otherwise stick to the test runner.
PROBE = r"""
import json, os, sys, threading
from impetus import cpu_policy
if sys.argv[1] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
release = threading.Event()
early = threading.Thread(target=release.wait)
early.start()
out = {"before": [cpu_policy.current(), cpu_policy.current(early.native_id)],
       "apply_batch": cpu_policy.apply("batch"),
       "after_batch": [cpu_policy.current(), cpu_policy.current(early.native_id)],
       "raw": os.sched_getscheduler(0)}
late = threading.Thread(target=lambda: out.__setitem__("late", cpu_policy.current()))
late.start(); late.join()
out["apply_normal"] = cpu_policy.apply("normal")
out["after_normal"] = [cpu_policy.current(), cpu_policy.current(early.native_id)]
release.set(); early.join()
print(json.dumps(out))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=30, check=True)
    return json.loads(done.stdout)


def test_apply_sets_every_thread_and_later_threads_inherit_it():
    out = probe("plain")
    assert out["before"] == ["normal", "normal"]
    assert out["apply_batch"] is None
    # the thread that existed before apply() is switched too, not only the caller
    assert out["after_batch"] == ["batch", "batch"]
    assert out["raw"] == os.SCHED_BATCH
    assert out["late"] == "batch"
    assert out["apply_normal"] is None
    assert out["after_normal"] == ["normal", "normal"]


def test_a_policy_chosen_from_outside_is_left_alone():
    out = probe("idle")
    assert out["before"] == [None, None]
    assert "left unchanged" in out["apply_batch"] and "another policy (SCHED_IDLE)" in out["apply_batch"]
    assert out["raw"] == os.SCHED_IDLE
    assert out["after_batch"] == [None, None]


def policies(pid: int) -> dict[int, str | None]:
    """Policy of every thread of *pid* and of its children's threads."""
    out = {}
    for p in [pid] + children_of(pid):
        for tid in cpu_policy.thread_ids(p):
            try:
                out[tid] = cpu_policy.current(tid)
            except ProcessLookupError:
                pass
    return out


def processes(pid: int) -> int:
    return 1 + len(children_of(pid))


@pytest.mark.integration
def test_serve_runs_every_process_under_batch_by_default(tmp_path, dns_server):
    with MTA(tmp_path / "mta", dns_server.resolv_conf,
             serve_args=("--reception-processes", "2")) as m:
        wait_until(lambda: processes(m.proc.pid) == 3, what="2 reception processes")
        m.send("a@src.test", ["x@example.test"])  # every thread has started by now
        seen = policies(m.proc.pid)
        assert len(seen) >= 6  # 3 processes, each with its loop and spool writer thread
        assert set(seen.values()) == {"batch"}, seen
    assert "Scheduling_Policy" not in m.paniclog.path.read_text()


@pytest.mark.integration
def test_normal_policy_and_a_reload_switching_it(tmp_path, dns_server):
    with MTA(tmp_path / "mta", dns_server.resolv_conf, extra_global='Scheduling_Policy = "normal"',
             serve_args=("--reception-processes", "2")) as m:
        wait_until(lambda: processes(m.proc.pid) == 3, what="2 reception processes")
        m.send("a@src.test", ["x@example.test"])
        assert set(policies(m.proc.pid).values()) == {"normal"}
        rewrite_config(m, 'Scheduling_Policy = "normal"', 'Scheduling_Policy = "batch"')
        m.proc.send_signal(signal.SIGHUP)  # the main process tells its children
        wait_until(lambda: set(policies(m.proc.pid).values()) == {"batch"}, 15,
                   what="every thread under SCHED_BATCH after the reload")


@pytest.mark.integration
def test_serve_started_under_another_policy_keeps_it_and_says_so(tmp_path, dns_server):
    with MTA(tmp_path / "mta", dns_server.resolv_conf, wrapper=("chrt", "-i", "0"),
             serve_args=("--reception-processes", "1")) as m:
        wait_until(lambda: processes(m.proc.pid) == 2, what="the reception process")
        m.send("a@src.test", ["x@example.test"])
        seen = policies(m.proc.pid)
        assert seen and set(seen.values()) == {None}, seen  # still SCHED_IDLE, not batch
        assert os.sched_getscheduler(m.proc.pid) == os.SCHED_IDLE
        wait_until(lambda: m.paniclog.path.read_text().count("another policy (SCHED_IDLE)") >= 2,
                   what="the main and the reception process to say why")
    text = m.paniclog.path.read_text()
    assert "Scheduling_Policy batch: left unchanged" in text
    assert "reception process 1: Scheduling_Policy batch: left unchanged" in text


def test_config_rejects_an_unknown_policy(tmp_path):
    conf = tmp_path / "ecelerity.conf"
    conf.write_text('Spoolbase = "/tmp/x"\nScheduling_Policy = "fifo"\n')
    done = subprocess.run([sys.executable, "-m", "impetus.cli", "check-config", "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    err = done.stdout + done.stderr
    assert f"{conf}:2:" in err and "Scheduling_Policy" in err and "batch" in err, err
