"""The `impetus` command line: check-config over the broken-config corpus, options."""
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "config_corpus"
CASES = sorted(p for p in CORPUS.iterdir() if (p / "main.conf").exists())


def impetus(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "impetus.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_corpus_has_at_least_20_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_config_reports_file_line_col_and_fails(case):
    out = impetus("check-config", "-c", "main.conf", cwd=case)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    for expected in (case / "expected.txt").read_text().splitlines():
        if expected.strip():
            assert expected in out.stderr, out.stderr


def test_check_config_ok(tmp_path):
    conf = tmp_path / "ok.conf"
    conf.write_text('Spoolbase = "/tmp/x"\nRetry_Interval = 60\n')
    out = impetus("check-config", "-c", str(conf))
    assert out.returncode == 0 and "configuration OK" in out.stdout


def test_options_lists_the_table():
    out = impetus("options")
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("Retry_Interval "))
    assert "1200" in line and "binding" in line


def test_serve_with_broken_config_exits_nonzero_without_traceback(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("Retry_Interval = soon\n")
    out = impetus("serve", "-c", str(conf))
    assert out.returncode == 1
    assert f"{conf}:1:18: option 'Retry_Interval' expects" in out.stderr
    assert "Traceback" not in out.stderr
