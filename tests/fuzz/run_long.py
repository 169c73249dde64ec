"""Long fuzz run over every property test (issue 8).

    python -m tests.fuzz.run_long --minutes 8 [--only dns-raw,config] [--json out.json]
    python -m tests.fuzz.run_long --atheris --minutes 4      # coverage-guided, if installed

The CI run is the ordinary ``python -m pytest`` with each test's own
``max_examples``.  This driver takes the same Hypothesis tests and runs them
again and again with a large ``max_examples`` (fresh random seed each batch,
no example database) until each target's share of the time budget is used
up, counting every input the test body saw (shrinking included) and every
failure (distinct by exception type and place).  Nothing here changes the
tests: the budget is applied by overriding the settings of the wrapped test
and counting through ``test.hypothesis.inner_test`` (reassignable by design).

With ``--atheris`` each test runs in a child process under libFuzzer
(atheris, coverage of ``impetus`` instrumented) through the documented
``test.hypothesis.fuzz_one_input``; the figures are the inputs that reached
the test body and libFuzzer's ``number_of_executed_units`` (which also
counts inputs Hypothesis rejected).  A crash is replayed without
instrumentation before it counts (see ``NO_INSTRUMENT``).

Exit status 1 if any target failed.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# target -> [(module, test function)]; every Hypothesis test of these
# modules that is not listed lands in "other" so none is forgotten.
TARGETS: dict[str, list[tuple[str, str]]] = {
    "smtp-server": [
        ("tests.test_smtp_fuzz", "test_server_feed_never_raises"),
        ("tests.test_smtp_fuzz", "test_server_output_independent_of_chunking"),
        ("tests.test_smtp_fuzz", "test_server_with_tls_auth_xclient_never_raises"),
        ("tests.test_smtp_fuzz", "test_auth_xclient_output_independent_of_chunking"),
    ],
    "reply-parser": [
        ("tests.test_smtp_fuzz", "test_reply_parser_only_protocol_error"),
        ("tests.test_smtp_fuzz", "test_reply_parser_structured"),
        ("tests.test_smtp_fuzz", "test_dot_stuff_never_contains_early_end_marker"),
    ],
    "address-parser": [
        ("tests.test_smtp_fuzz", "test_address_parsing_only_address_error"),
    ],
    "config": [
        ("tests.test_config_fuzz", "test_token_soup_raises_only_config_error"),
        ("tests.test_config_fuzz", "test_random_text_raises_only_config_error"),
        ("tests.test_config_fuzz", "test_random_bytes_raise_only_config_error"),
    ],
    "route-parser": [
        ("tests.test_config_routes", "test_parse_route_only_raises_route_errors"),
    ],
    "dns-raw": [
        ("tests.test_fuzz_dns", "test_resolver_survives_fuzzed_answers"),
    ],
    "dns-zones": [
        ("tests.test_fuzz_dns", "test_well_formed_zones_through_resolver_and_router"),
    ],
    "dns-decide": [
        ("tests.test_fuzz_dns", "test_decide_over_random_results"),
    ],
}
FUZZ_MODULES = ("tests.test_smtp_fuzz", "tests.test_config_fuzz", "tests.test_config_routes",
                "tests.test_fuzz_dns")
# Per-target share of the budget (network-bound DNS targets get more time).
WEIGHTS = {"dns-raw": 1.5, "dns-zones": 1.5}


def _is_hypothesis_test(obj) -> bool:
    return callable(obj) and getattr(obj, "is_hypothesis_test", False)


def discover() -> dict[str, list[tuple[str, str]]]:
    targets = {k: list(v) for k, v in TARGETS.items()}
    listed = {t for v in TARGETS.values() for t in v}
    for modname in FUZZ_MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(vars(mod)):
            if name.startswith("test") and _is_hypothesis_test(getattr(mod, name)) \
                    and (modname, name) not in listed:
                targets.setdefault("other", []).append((modname, name))
    return targets


def _load(modname: str, fname: str):
    return getattr(importlib.import_module(modname), fname)


def _signature(exc: BaseException) -> str:
    """Distinct-failure key: exception type and the innermost project frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if ("/impetus/" in f.filename or "/tests/" in f.filename)
              and not f.filename.endswith("run_long.py")] or tb
    where = f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


class _OutOfTime(BaseException):
    """Raised from inside the test once the budget is spent: Hypothesis lets
    a BaseException through at once (no shrinking, no failure report)."""


class Stats:
    def __init__(self):
        self.inputs = 0             # inputs that reached the test body
        self.executions = 0         # atheris: libFuzzer executions (all inputs)
        self.batches = 0
        self.seconds = 0.0
        self.failures: dict[str, str] = {}    # signature -> falsifying example + message
        self.artifacts: list[str] = []        # atheris crashes that pass uninstrumented


def run_hypothesis(fn, budget: float, stats: Stats, batch_seconds: float = 45.0) -> None:
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.reporting import with_reporter

    def reporter(text):       # drop the "@seed" hint the budget stop causes
        if "@seed(" not in str(text):
            print(text, flush=True)

    handle = fn.hypothesis
    orig_inner = handle.inner_test
    orig_settings = fn._hypothesis_internal_use_settings

    @functools.wraps(orig_inner)
    def counting(*a, **kw):
        if time.monotonic() > deadline:
            raise _OutOfTime()
        stats.inputs += 1
        return orig_inner(*a, **kw)

    handle.inner_test = counting
    deadline = time.monotonic() + budget
    rate = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left < 1.0:
                break
            if rate is None:
                n = 100
            else:
                n = max(50, int(rate * batch_seconds))
            fn._hypothesis_internal_use_settings = settings(
                parent=orig_settings, max_examples=n, deadline=None, database=None,
                derandomize=False, print_blob=False,
                phases=(Phase.generate, Phase.target, Phase.shrink),
                suppress_health_check=list(HealthCheck))
            before, t0 = stats.inputs, time.monotonic()
            try:
                with with_reporter(reporter):
                    fn()
            except _OutOfTime:
                pass
            except KeyboardInterrupt:
                raise
            except BaseException as exc:        # a property failed: record it, go on
                for leaf in _leaves(exc):
                    sig = _signature(leaf)
                    if sig not in stats.failures:
                        notes = "\n".join(getattr(leaf, "__notes__", []) or [])
                        stats.failures[sig] = f"{type(leaf).__name__}: {leaf}\n{notes}".strip()
                        print(f"    FAILURE {sig}\n      " +
                              stats.failures[sig].replace("\n", "\n      "), flush=True)
            dt = time.monotonic() - t0
            stats.batches += 1
            stats.seconds += dt
            done = stats.inputs - before
            if done and dt > 0:
                rate = done / dt
    finally:
        handle.inner_test = orig_inner
        fn._hypothesis_internal_use_settings = orig_settings


# ------------------------------------------------------------------ atheris

# Modules atheris 2.3.0 miscompiles on CPython 3.11: instrumented,
# ``_Parser.statement`` calls ``skip_block`` with a Token as ``self``
# (AttributeError: 'Token' object has no attribute 'next') on inputs that
# pass uninstrumented.  They run uninstrumented (no coverage feedback).
NO_INSTRUMENT = ["impetus.config.parser"]


def _quiet_settings(fn):
    from hypothesis import HealthCheck, settings
    fn._hypothesis_internal_use_settings = settings(
        parent=fn._hypothesis_internal_use_settings, database=None, deadline=None,
        suppress_health_check=list(HealthCheck))
    return fn


def atheris_child(test_id: str, seconds: int, artifacts: str) -> None:
    import atheris
    modname, fname = test_id.split("::")
    with atheris.instrument_imports(include=["impetus"], exclude=NO_INSTRUMENT):
        import impetus  # noqa: F401
        fn = _load(modname, fname)
    _quiet_settings(fn)
    # libFuzzer counts every execution, also inputs Hypothesis rejects (too
    # short for the strategy); count the ones that reached the test body.
    inner, count_file = fn.hypothesis.inner_test, os.path.join(artifacts, "..body-count")
    state = {"n": 0, "written": 0.0}

    @functools.wraps(inner)
    def counting(*a, **kw):
        state["n"] += 1
        now = time.monotonic()
        if now - state["written"] > 0.2:
            state["written"] = now
            with open(count_file, "w") as f:
                f.write(str(state["n"]))
        return inner(*a, **kw)

    fn.hypothesis.inner_test = counting
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-print_final_stats=1",
                   f"-artifact_prefix={artifacts}/", "-max_len=4096", "-rss_limit_mb=4096"],
                  fn.hypothesis.fuzz_one_input)
    atheris.Fuzz()


def replay_child(test_id: str, path: str) -> int:
    """Run one atheris artifact through the test, uninstrumented."""
    modname, fname = test_id.split("::")
    fn = _quiet_settings(_load(modname, fname))
    with open(path, "rb") as f:
        data = f.read()
    try:
        fn.hypothesis.fuzz_one_input(data)
    except BaseException:
        traceback.print_exc()
        return 1
    print("passes uninstrumented")
    return 0


def run_atheris(modname: str, fname: str, seconds: int, stats: Stats) -> None:
    with tempfile.TemporaryDirectory(prefix="impetus-atheris-") as artifacts:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "tests.fuzz.run_long", "--atheris-child",
                            f"{modname}::{fname}", "--seconds", str(seconds),
                            "--artifacts", artifacts],
                           capture_output=True, text=True, errors="replace",
                           timeout=seconds + 120)
        stats.seconds += time.monotonic() - t0
        stats.batches += 1
        out = p.stdout + p.stderr
        m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out) or \
            re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)", out)
        if m:
            stats.executions += int(m[-1])
        try:
            with open(os.path.join(artifacts, "..body-count")) as f:
                stats.inputs += int(f.read() or 0)
        except (OSError, ValueError):
            pass
        if p.returncode != 0:
            lines = out.splitlines()
            idx = next((i for i, ln in enumerate(lines) if "Uncaught Python exception" in ln), None)
            what = lines[idx + 1] if idx is not None and idx + 1 < len(lines) else \
                (lines[-1] if lines else "?")
            crashes = [os.path.join(artifacts, n) for n in os.listdir(artifacts)
                       if not n.startswith("..")]
            for path in crashes:
                data = open(path, "rb").read()
                r = subprocess.run([sys.executable, "-m", "tests.fuzz.run_long", "--replay",
                                    f"{modname}::{fname}", path],
                                   capture_output=True, text=True, errors="replace", timeout=120)
                if r.returncode == 0:
                    stats.artifacts.append(f"{what} (input {data[:80]!r}): passes uninstrumented")
                    print(f"    instrumentation artifact, not counted: {what}; "
                          f"input {data[:80]!r} passes uninstrumented", flush=True)
                else:
                    sig = f"{what} (input {data[:80]!r})"
                    stats.failures[sig] = r.stdout[-3000:] + r.stderr[-3000:]
                    print(f"    FAILURE {sig}\n{stats.failures[sig]}", flush=True)
            if not crashes:
                stats.failures[f"exit {p.returncode}: {what}"] = out[-4000:]
                print(f"    FAILURE exit {p.returncode}: {what}\n{out[-4000:]}", flush=True)


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="total time budget (default 8)")
    ap.add_argument("--only", default="", help="comma-separated targets (default: all)")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided with atheris")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--list", action="store_true", help="list targets and tests")
    ap.add_argument("--atheris-child", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=int, default=60, help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", default=".", help=argparse.SUPPRESS)
    ap.add_argument("--replay", nargs=2, metavar=("TEST", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if os.environ.get("IMPETUS_TEST_ALLOW_NETWORK") != "1":
        from tests.peers import guard          # loopback only, like the pytest run
        guard.install()
    if args.replay:
        return replay_child(*args.replay)
    if args.atheris_child:
        atheris_child(args.atheris_child, args.seconds, args.artifacts)
        return 0

    targets = discover()
    if args.list:
        for t, tests in targets.items():
            print(t)
            for m, f in tests:
                print(f"  {m}::{f}")
        return 0
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in targets]
        if unknown:
            ap.error(f"unknown target(s) {', '.join(unknown)}; try --list")
        targets = {t: targets[t] for t in wanted}
    if args.atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            ap.error("atheris is not installed (pip install atheris)")

    total = args.minutes * 60
    weight_sum = sum(WEIGHTS.get(t, 1.0) for t in targets)
    results: dict[str, dict] = {}
    started = time.monotonic()
    mode = "atheris" if args.atheris else "hypothesis"
    print(f"fuzzing {len(targets)} targets for {args.minutes:g} min ({mode})", flush=True)
    for target, tests in targets.items():
        share = total * WEIGHTS.get(target, 1.0) / weight_sum
        per_test = share / len(tests)
        tstats = Stats()
        per = {}
        for modname, fname in tests:
            s = Stats()
            print(f"  {target}: {fname} for {per_test:.0f} s", flush=True)
            if args.atheris:
                run_atheris(modname, fname, max(5, int(per_test)), s)
            else:
                run_hypothesis(_load(modname, fname), per_test, s)
            tstats.executions += s.executions
            per[f"{modname}::{fname}"] = {"inputs": s.inputs, "executions": s.executions,
                                          "seconds": round(s.seconds, 1),
                                          "batches": s.batches, "failures": s.failures,
                                          "instrumentation_artifacts": s.artifacts}
            tstats.inputs += s.inputs
            tstats.seconds += s.seconds
            tstats.failures.update(s.failures)
            execs = f" ({s.executions} libFuzzer executions)" if args.atheris else ""
            print(f"    {s.inputs} inputs{execs} in {s.seconds:.0f} s, "
                  f"{len(s.failures)} distinct failures", flush=True)
        results[target] = {"inputs": tstats.inputs, "executions": tstats.executions,
                           "seconds": round(tstats.seconds, 1),
                           "failures": len(tstats.failures), "tests": per}

    elapsed = time.monotonic() - started
    ex = (lambda v: f" {v:>10}") if args.atheris else (lambda v: "")
    print(f"\n{'target':<16} {'inputs':>10}{ex('executions')} {'seconds':>8} {'inputs/s':>9} "
          f"{'failures':>8}")
    for target, r in results.items():
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0
        print(f"{target:<16} {r['inputs']:>10}{ex(r['executions'])} {r['seconds']:>8.0f} "
              f"{rate:>9.0f} {r['failures']:>8}")
    tot_inputs = sum(r["inputs"] for r in results.values())
    tot_execs = sum(r["executions"] for r in results.values())
    tot_fail = sum(r["failures"] for r in results.values())
    print(f"{'total':<16} {tot_inputs:>10}{ex(tot_execs)} {elapsed:>8.0f} {'':>9} {tot_fail:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "minutes": args.minutes, "elapsed": round(elapsed, 1),
                       "targets": results}, f, indent=2)
    return 1 if tot_fail else 0


if __name__ == "__main__":
    sys.exit(main())
