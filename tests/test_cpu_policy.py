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


# -- CPU_Affinity ------------------------------------------------------------

def test_reception_cpus_round_robin_over_the_allowed_cores():
    assert cpu_policy.reception_cpus("auto", 1, [0, 1]) == [0]
    assert cpu_policy.reception_cpus("auto", 2, [0, 1]) == [1]
    assert cpu_policy.reception_cpus("auto", 3, [0, 1]) == [0]
    # a cpuset that left cores 2, 5 and 7: those, in order
    assert [cpu_policy.reception_cpus("auto", k, [2, 5, 7])[0] for k in (1, 2, 3, 4)] == [2, 5, 7, 2]
    assert cpu_policy.reception_cpus("off", 2, [0, 1]) == [0, 1]
    assert cpu_policy.reception_cpus("auto", 1, []) == []


PIN_PROBE = r"""
import json, os, sys, threading
from impetus import cpu_policy
cpu = int(sys.argv[1])
release = threading.Event()
early = threading.Thread(target=release.wait)
early.start()
out = {"pin": cpu_policy.pin([cpu]),
       "main": sorted(os.sched_getaffinity(0)),
       "early": sorted(os.sched_getaffinity(early.native_id))}
late = threading.Thread(target=lambda: out.__setitem__("late", sorted(os.sched_getaffinity(0))))
late.start(); late.join()
out["bad"] = cpu_policy.pin([4096])  # no such core
release.set(); early.join()
print(json.dumps(out))
"""


def cores() -> list[int]:
    """The cores this test may use. With one core, binding to it changes
    nothing and the tests below still say so; with two or more (CI) they
    tell a bound thread from a free one."""
    allowed = cpu_policy.allowed_cpus()
    assert allowed, "no affinity mask on this platform"
    return allowed


def test_pin_binds_every_thread_and_later_threads_inherit_it():
    last = cores()[-1]
    done = subprocess.run([sys.executable, "-c", PIN_PROBE, str(last)], capture_output=True,
                          text=True, timeout=30, check=True)
    out = json.loads(done.stdout)
    assert out["pin"] is None
    assert out["main"] == out["early"] == out["late"] == [last]
    assert "CPU_Affinity: sched_setaffinity([4096]) failed" in out["bad"]


def affinities(pid: int) -> dict[int, list[list[int]]]:
    """Shard (0: the main process) -> the affinity mask of each of its threads."""
    out = {}
    for p in [pid] + children_of(pid):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        shard = int(argv[argv.index(b"--shard") + 1]) if b"--shard" in argv else 0
        masks = []
        for tid in cpu_policy.thread_ids(p):
            try:
                masks.append(sorted(os.sched_getaffinity(tid)))
            except ProcessLookupError:
                pass
        out[shard] = masks
    return out


def receiving(m: MTA, n: int) -> None:
    """Wait for *n* reception processes, each up to its spool writer thread
    (started after the mask is set, so a mask seen then is the one it keeps)."""
    def up():
        seen = affinities(m.proc.pid)
        return sorted(seen) == list(range(n + 1)) and all(len(seen[k]) >= 2 for k in seen)
    wait_until(up, 20, what=f"{n} reception processes")


@pytest.mark.integration
def test_each_reception_process_runs_on_its_own_core_by_default(tmp_path, dns_server):
    allowed = cores()
    with MTA(tmp_path / "mta", dns_server.resolv_conf,
             serve_args=("--reception-processes", "3")) as m:
        receiving(m, 3)
        m.send("a@src.test", ["x@example.test"])
        seen = affinities(m.proc.pid)
        for shard in (1, 2, 3):
            core = allowed[(shard - 1) % len(allowed)]
            assert all(mask == [core] for mask in seen[shard]), seen
        assert all(mask == allowed for mask in seen[0]), seen  # the scheduler is not bound
    assert "CPU_Affinity" not in m.paniclog.path.read_text()


@pytest.mark.integration
def test_affinity_off_and_a_reload_switching_it_on_and_off_again(tmp_path, dns_server):
    allowed = cores()
    with MTA(tmp_path / "mta", dns_server.resolv_conf, extra_global='CPU_Affinity = "off"',
             serve_args=("--reception-processes", "2")) as m:
        receiving(m, 2)
        m.send("a@src.test", ["x@example.test"])
        assert all(mask == allowed for masks in affinities(m.proc.pid).values() for mask in masks)

        def bound() -> bool:
            seen = affinities(m.proc.pid)
            return all(mask == [allowed[(k - 1) % len(allowed)]]
                       for k in (1, 2) for mask in seen.get(k, [None]))

        rewrite_config(m, 'CPU_Affinity = "off"', 'CPU_Affinity = "auto"')
        m.proc.send_signal(signal.SIGHUP)
        wait_until(bound, 15, what="each reception process bound to its core after the reload")
        rewrite_config(m, 'CPU_Affinity = "auto"', 'CPU_Affinity = "off"')
        m.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: all(mask == allowed for masks in affinities(m.proc.pid).values()
                               for mask in masks), 15,
                   what="every thread free to use every core again")


@pytest.mark.integration
def test_a_core_set_narrowed_from_outside_is_respected(tmp_path, dns_server):
    allowed = cores()
    outside = allowed[-1:]  # taskset gave the server one core: everything stays on it
    with MTA(tmp_path / "mta", dns_server.resolv_conf,
             wrapper=("taskset", "-c", str(outside[0])),
             serve_args=("--reception-processes", "2")) as m:
        receiving(m, 2)
        m.send("a@src.test", ["x@example.test"])
        seen = affinities(m.proc.pid)
        assert all(mask == outside for masks in seen.values() for mask in masks), seen
    assert "CPU_Affinity" not in m.paniclog.path.read_text()
