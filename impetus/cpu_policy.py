"""How Impetus's processes use the CPUs: their Linux scheduling policy
(``Scheduling_Policy``) and which cores reception processes run on
(``CPU_Affinity``).

An MTA is a throughput workload: no one waits on a single reply from it the
way a user waits on a keystroke. sched(7) made ``SCHED_BATCH`` for such work:
a thread of this process that wakes up (a client's command arrived, the spool
writer's commit finished) does not preempt the thread running on its core; it
runs when that one blocks or its slice ends. Under load that turns many
wake-up preemptions into few, and each one avoided is a context switch and a
cold cache saved (bench/RESULTS.md: 5.9 -> 4.2 switches and 1.23 -> 1.10 ms of
CPU per message in a reception process). Nice values and CPU shares are
unchanged: the policy only changes *when* a woken thread gets the core, not
how much of it.

The policy is per thread on Linux, so :func:`apply` sets every thread that
exists; threads and child processes started later inherit it. A policy the
operator chose (``chrt -f``, ``SCHED_IDLE``...) is left alone.

Affinity: with ``--reception-processes N`` reception process k and all its
threads are bound to one core, the k-th of those the server may use (round
robin), as nginx's ``worker_cpu_affinity auto``. Its event loop and its spool
writer thread wake each other several times per message; on one core such a
wake-up is a local run-queue insert, across cores it is an inter-processor
interrupt, which a virtual machine pays for with an exit to the hypervisor. A
process that stays on its core also keeps its caches warm. The main process
(scheduler and delivery) stays free to run wherever there is room. Measured
on 2 vCPUs in 20 alternating pairs (bench/RESULTS.md): 16 won, median 6 %
more messages per second and 3 % less CPU per message; function-call IPIs
per message 0.7-0.9 -> 0.25-0.45.
"""

from __future__ import annotations

import os

#: option value -> name of the ``os`` constant
POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}


def _constant(name: str) -> int | None:
    if not hasattr(os, "sched_setscheduler"):
        return None
    return getattr(os, name, None)


def _name(policy: int) -> str:
    for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR"):
        if getattr(os, name, None) == policy:
            return name
    return f"policy {policy}"


def thread_ids(pid: int | str = "self") -> list[int]:
    """Thread ids of process *pid*, [] if it is gone. For this process
    without /proc: [0], the calling thread (later threads inherit from it)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [0] if pid == "self" else []


def apply(policy: str) -> str | None:
    """Give every thread of this process *policy* (a ``Scheduling_Policy``
    value); return why it was not applied, or None."""
    target = _constant(POLICIES[policy])
    if target is None:
        return f"Scheduling_Policy {policy}: not supported on this platform, left unchanged"
    ours = {c for c in (_constant(n) for n in POLICIES.values()) if c is not None}
    param = os.sched_param(0)
    for tid in thread_ids():
        try:
            now = os.sched_getscheduler(tid)
            if now == target:
                continue
            if now not in ours:
                return (f"Scheduling_Policy {policy}: left unchanged, the process runs under "
                        f"another policy ({_name(now)}) that whoever started it chose")
            os.sched_setscheduler(tid, target, param)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            return f"Scheduling_Policy {policy}: sched_setscheduler failed: {exc.strerror}"
    return None


def current(tid: int = 0) -> str | None:
    """The option value naming the policy of thread *tid* (0: the caller), or
    None if it runs under another one."""
    now = os.sched_getscheduler(tid)
    for value, name in POLICIES.items():
        if _constant(name) == now:
            return value
    return None


def allowed_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask, which a
    cgroup cpuset or ``taskset`` may have narrowed), sorted; [] where the
    platform has no affinity calls."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def reception_cpus(mode: str, shard: int, allowed: list[int]) -> list[int]:
    """The cores reception process *shard* (1..N) should run on under
    ``CPU_Affinity`` *mode*: one core, round robin over *allowed*, for
    ``auto``; all of *allowed* for ``off``."""
    if mode == "auto" and allowed:
        return [allowed[(shard - 1) % len(allowed)]]
    return list(allowed)


def pin(cpus: list[int]) -> str | None:
    """Bind every thread of this process to *cpus* (threads started later
    inherit the mask); return why it was not done, or None."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    for tid in thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            return f"CPU_Affinity: sched_setaffinity({cpus}) failed: {exc.strerror}"
    return None
