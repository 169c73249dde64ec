"""include / readonly_include (spec §1.1)."""

import os

import pytest

from impetus.config import ConfigError, load_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors(path):
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    return [str(i) for i in ei.value.issues]


def test_include_file(tmp_path):
    write(tmp_path / "inc.conf", "Retry_Interval = 77\n")
    main = write(tmp_path / "main.conf", 'include "inc.conf"\nMax_Retries = 2\n')
    c = load_config(main)
    assert c.lookup("Retry_Interval") == 77
    assert c.explain("Retry_Interval").file == str(tmp_path / "inc.conf")
    assert c.source_files == [str(main), str(tmp_path / "inc.conf")]


def test_include_inside_a_stanza_joins_that_scope(tmp_path):
    write(tmp_path / "b.conf", "Retry_Interval = 5\nDomain \"d.com\" { Max_Retries = 1 }\n")
    main = write(tmp_path / "main.conf", 'Binding "b" {\n  include "b.conf"\n}\n')
    c = load_config(main)
    assert c.explain("Retry_Interval", binding="b").scope == 'binding "b"'
    assert c.lookup("Max_Retries", binding="b", domain="d.com") == 1
    assert c.lookup("Retry_Interval") == 1200


def test_include_position_order_later_wins(tmp_path):
    write(tmp_path / "inc.conf", "Retry_Interval = 2\n")
    main = write(tmp_path / "main.conf",
                 'Retry_Interval = 1\ninclude "inc.conf"\nMax_Retries = 3\n')
    assert load_config(main).lookup("Retry_Interval") == 2
    main.write_text('include "inc.conf"\nRetry_Interval = 1\n')
    assert load_config(main).lookup("Retry_Interval") == 1


def test_relative_include_is_relative_to_including_file(tmp_path):
    write(tmp_path / "conf" / "sub" / "leaf.conf", "Retry_Interval = 9\n")
    write(tmp_path / "conf" / "mid.conf", 'include "sub/leaf.conf"\n')
    main = write(tmp_path / "main.conf", 'include "conf/mid.conf"\n')
    cwd = os.getcwd()
    os.chdir("/")
    try:
        assert load_config(main).lookup("Retry_Interval") == 9
    finally:
        os.chdir(cwd)


def test_absolute_include(tmp_path):
    inc = write(tmp_path / "elsewhere" / "x.conf", "Retry_Interval = 4\n")
    main = write(tmp_path / "main.conf", f'include "{inc}"\n')
    assert load_config(main).lookup("Retry_Interval") == 4


def test_include_directory_in_lexical_order_skipping_hidden_and_subdirs(tmp_path):
    d = tmp_path / "conf.d"
    write(d / "20-b.conf", "Retry_Interval = 20\nMax_Retries = 20\n")
    write(d / "10-a.conf", "Retry_Interval = 10\nMax_Retries = 10\nMax_Retry_Interval = 10\n")
    write(d / "30-c.conf", "Max_Retries = 30\n")
    write(d / ".hidden.conf", "Retry_Interval = 999\nThis is not valid\n")
    write(d / "sub" / "99.conf", "Retry_Interval = 999\n")
    main = write(tmp_path / "main.conf", 'include "conf.d"\n')
    c = load_config(main)
    assert c.lookup("Retry_Interval") == 20
    assert c.lookup("Max_Retries") == 30
    assert c.lookup("Max_Retry_Interval") == 10
    assert c.source_files == [str(main)] + [str(d / n) for n in
                                            ("10-a.conf", "20-b.conf", "30-c.conf")]


def test_readonly_include(tmp_path):
    write(tmp_path / "ro.conf", "Retry_Interval = 3\n")
    write(tmp_path / "twice.conf", "Max_Retries = 3\n")
    main = write(tmp_path / "main.conf", 'readonly_include "ro.conf"\ninclude "twice.conf"\n'
                                         'Binding "b" { include "twice.conf" }\n')
    c = load_config(main)
    assert c.lookup("Retry_Interval") == 3
    assert c.lookup("Max_Retries", binding="b") == 3
    # a file included more than once also becomes read-only
    assert c.readonly_files == {str(tmp_path / "ro.conf"), str(tmp_path / "twice.conf")}


def test_missing_include_is_an_error_at_the_include(tmp_path):
    main = write(tmp_path / "main.conf", 'Retry_Interval = 1\n  include "nope.conf"\n')
    assert errors(main) == [f"{main}:2:11: cannot include 'nope.conf': No such file or directory"]


def test_include_cycle(tmp_path):
    a = tmp_path / "a.conf"
    b = tmp_path / "b.conf"
    write(a, 'include "b.conf"\n')
    write(b, 'Retry_Interval = 1\ninclude "a.conf"\n')
    assert errors(a) == [f"{b}:2:9: include cycle: {a} -> {b} -> {a}"]


def test_self_include_via_directory_is_a_cycle(tmp_path):
    d = tmp_path / "d"
    write(d / "x.conf", 'include "."\n')
    main = write(tmp_path / "main.conf", 'include "d"\n')
    errs = errors(main)
    assert len(errs) == 1 and "include cycle" in errs[0] and errs[0].startswith(f"{d}/x.conf:1:9:")


def test_errors_in_included_files_name_that_file(tmp_path):
    inc = write(tmp_path / "inc.conf", "\nRetry_Interval = soon\n")
    main = write(tmp_path / "main.conf", 'include "inc.conf"\nBogus = 1\n')
    assert errors(main) == [
        f"{main}:2:1: unknown option 'Bogus'",
        f"{inc}:2:18: option 'Retry_Interval' expects a non-negative integer (seconds), "
        'got "soon"']


def test_include_needs_a_path(tmp_path):
    main = write(tmp_path / "main.conf", "include = x\n")
    assert errors(main) == [f"{main}:1:9: expected a file or directory name after 'include', "
                            "got '='"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_directory(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        main = write(tmp_path / "main.conf", 'include "locked"\n')
        assert errors(main) == [f"{main}:1:9: cannot read directory '{d}': Permission denied"]
    finally:
        d.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    f = write(tmp_path / "secret.conf", "Retry_Interval = 1\n")
    f.chmod(0)
    try:
        main = write(tmp_path / "main.conf", 'include "secret.conf"\n')
        assert errors(main) == [f"{main}:1:9: cannot include 'secret.conf': Permission denied"]
    finally:
        f.chmod(0o644)


def test_missing_top_level_file(tmp_path):
    assert errors(tmp_path / "none.conf") == [
        f"{tmp_path}/none.conf:1:1: cannot read config file: No such file or directory"]


def test_huge_file_is_refused(tmp_path, monkeypatch):
    from impetus.config import parser
    monkeypatch.setattr(parser, "MAX_FILE_SIZE", 1000)
    main = write(tmp_path / "main.conf", "# " + "x" * 2000 + "\n")
    errs = errors(main)
    assert len(errs) == 1 and "file is too large" in errs[0]


def test_top_level_directory(tmp_path):
    write(tmp_path / "d" / "a.conf", "Retry_Interval = 1\n")
    write(tmp_path / "d" / "b.conf", "Max_Retries = 2\n")
    c = load_config(tmp_path / "d")
    assert (c.lookup("Retry_Interval"), c.lookup("Max_Retries")) == (1, 2)


def test_directory_that_cannot_be_read(tmp_path, monkeypatch):
    """Same as test_unreadable_directory, but also works as root."""
    d = tmp_path / "locked"
    d.mkdir()
    real_scandir = os.scandir

    def fake_scandir(path):
        if os.fspath(path) == str(d):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    main = write(tmp_path / "main.conf", 'include "locked"\n')
    assert errors(main) == [f"{main}:1:9: cannot read directory '{d}': Permission denied"]


def test_include_of_a_non_utf8_binary_file(tmp_path):
    write(tmp_path / "bin.conf", "")
    (tmp_path / "bin.conf").write_bytes(b"Retry_Interval = 5\n\x00\xff\xfe garbage")
    main = write(tmp_path / "main.conf", 'include "bin.conf"\n')
    errs = errors(main)
    f = f"{tmp_path}/bin.conf"
    assert errs[:2] == [f"{f}:2:1: NUL byte in config file",
                        f"{f}:2:2: invalid UTF-8 byte 0xff (config files must be UTF-8)"]
