"""Broken configurations and the exact errors they must produce.

See tests/config_corpus/README.md for the layout.
"""

import pathlib

import pytest

from impetus.config import ConfigError, load_config

CORPUS = pathlib.Path(__file__).parent / "config_corpus"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "expected.txt").is_file())


def test_corpus_is_big_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_broken_config(case, monkeypatch):
    d = CORPUS / case
    monkeypatch.chdir(d)
    expected = [line for line in (d / "expected.txt").read_text().splitlines() if line]
    assert expected, "expected.txt is empty"
    with pytest.raises(ConfigError) as ei:
        load_config("main.conf")
    got = [str(i) for i in ei.value.issues]
    # str(issue) is FILE:LINE:COL: message
    for issue in ei.value.issues:
        assert str(issue) == f"{issue.file}:{issue.line}:{issue.col}: {issue.message}"
        assert issue.line >= 1 and issue.col >= 1
    for want in expected:
        assert any(want in g for g in got), f"{want!r} not in:\n" + "\n".join(got)
