"""Reception in separate processes (issue 5): shared port, one spool shard
each, the main process the single owner of queue state."""
import os
import signal
import subprocess
import threading

import pytest

from tests.mta import MTA, children_of, wait_until

pytestmark = pytest.mark.integration


def listening_sockets(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return len(out.stdout.splitlines())


def run_mta(tmp_path, dns_server, port, n=2):
    return MTA(tmp_path / "mta", dns_server.resolv_conf, body=f"Remote_SMTP_Port = {port}",
               serve_args=("--reception-processes", str(n)))


def send_parallel(m, count, prefix="r"):
    acked, errors = [], []

    def one(i):
        try:
            m.send("a@src.test", [f"{prefix}{i}@example.test"])
            acked.append(i)
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return acked, errors


def test_two_reception_processes_share_the_port_and_deliver(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with run_mta(tmp_path, dns_server, sink.port) as m:
        wait_until(lambda: listening_sockets(m.port) == 2, what="2 reception processes listening")
        acked, errors = send_parallel(m, 40)
        assert not errors and len(acked) == 40
        sink.wait_for(40, timeout=30)
        records = m.mainlog.wait_for("D", 40)
    assert len({r[1] for r in records}) == 40
    shards = {r[1][3:5] for r in m.mainlog.records("R")}
    assert shards <= {"01", "02"} and len(shards) == 2, shards  # both processes received mail
    assert sorted(x["rcpt_tos"][0] for x in sink.messages) == sorted(
        f"r{i}@example.test" for i in range(40))


def test_killed_reception_process_is_restarted_and_nothing_acknowledged_is_lost(
        tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    with run_mta(tmp_path, dns_server, sink.port) as m:
        kids = wait_until(lambda: (k := children_of(m.proc.pid)) and len(k) == 2 and k,
                          what="2 reception processes")
        stop = threading.Event()
        acked = []

        def inject():
            i = 0
            while not stop.is_set():
                try:
                    m.send("a@src.test", [f"k{i}@example.test"])
                    acked.append(f"k{i}@example.test")
                except Exception:  # noqa: BLE001 - refused or cut: not acknowledged
                    pass
                i += 1
        t = threading.Thread(target=inject)
        t.start()
        wait_until(lambda: len(acked) >= 20, what="some traffic")
        os.kill(kids[0], signal.SIGKILL)
        wait_until(lambda: len(children_of(m.proc.pid)) == 2 and
                   kids[0] not in children_of(m.proc.pid), timeout=15,
                   what="the reception process to be restarted")
        n = len(acked)
        wait_until(lambda: len(acked) >= n + 20, timeout=20, what="traffic after the restart")
        stop.set()
        t.join(30)
        got = lambda: {x["rcpt_tos"][0] for x in sink.messages}  # noqa: E731
        wait_until(lambda: set(acked) <= got(), timeout=30,
                   what=f"every acknowledged message delivered; missing "
                        f"{sorted(set(acked) - got())[:5]}")
    assert any("exited with" in line for line in m.paniclog.lines())


def test_sigterm_stops_children_and_exits_zero(tmp_path, dns_server, smtp_sinks):
    sink = smtp_sinks(("127.0.0.2", "127.0.0.3"))
    m = run_mta(tmp_path, dns_server, sink.port).start()
    kids = wait_until(lambda: (k := children_of(m.proc.pid)) and len(k) == 2 and k,
                      what="2 reception processes")
    m.send("a@src.test", ["x@example.test"])
    sink.wait_for(1)
    assert m.stop() == 0
    for pid in kids:
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split()[2] == "Z", timeout=10,
                   what=f"child {pid} to exit")
