"""Crash torture, short form for CI (issue 8). The long form is run by hand:
``python -m tests.torture.crash_torture --kills 20`` (figures in
docs/RELIABILITY.md). ``IMPETUS_TORTURE_KILLS`` makes this one longer."""
import os

import pytest

from tests.torture.crash_torture import run

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("IMPETUS_TORTURE_KILLS", "3"))


@pytest.mark.parametrize("reception_processes", [0, 2], ids=["single", "reception-processes"])
def test_crash_torture_short(tmp_path, reception_processes):
    rep = run(KILLS, workdir=tmp_path, seed=1000 + reception_processes, rate=40.0,
              reception_processes=reception_processes, log=lambda *_: None)
    print(rep.summary())
    assert rep.ok, rep.summary()
    assert rep.lost == 0 and rep.delivered_unacked_bad == 0
    assert rep.acked > 50, rep.summary()
