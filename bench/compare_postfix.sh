#!/usr/bin/env bash
# Impetus vs Postfix on this machine, same load, interleaved (issue 5).
#
#   bash bench/compare_postfix.sh                 # 3 rounds, 20 000 x 5 KB, 20 sessions
#   REPS=5 SIZE=51200 bash bench/compare_postfix.sh
#   RECEPTION_PROCESSES=1 bash bench/compare_postfix.sh   # impetus serve --reception-processes 1
#
# Uses the shared baseline harness (../shared/bench/postfix_baseline.sh): it
# installs Postfix (private instance under /tmp/pfbench, nothing in
# /etc/postfix), starts smtp-sink on 127.0.0.1:12526 as the relay target, and
# runs smtp-source against the harness ceiling (source -> sink), Postfix and
# Impetus in turn, REPS times, with the same checks (every message at the
# sink, fsync before 250 in both MTAs). Impetus runs with an equivalent relay
# config: listen on 127.0.0.1:12525, Gateway = 127.0.0.1:12526.
# Prints the harness's table, then the Impetus/Postfix ratios.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED="${SHARED:-$ROOT/../shared/bench}"
WORK=${WORK:-/tmp/pfbench}
export WORK REPS=${REPS:-3} N=${N:-20000} SIZE=${SIZE:-5120} SESSIONS=${SESSIONS:-20}
IMP=$WORK/impetus
rm -rf "$IMP" && mkdir -p "$IMP"
cat > "$IMP/ecelerity.conf" <<CONF
Spoolbase = "$IMP/spool"
Hostname = "impetus.bench"
Resolv_Conf = "$IMP/resolv.conf"
Gateway = "127.0.0.1:12526"
Max_Outbound_Connections = 50
ec_logger { mainlog = "$IMP/mainlog.ec" rejectlog = "$IMP/rejectlog.ec" paniclog = "$IMP/paniclog.ec" }
bounce_logger { bouncelog = "$IMP/bouncelog.ec" }
ESMTP_Listener {
  Relay_Hosts = ( "127.0.0.0/8" )
  Listen "127.0.0.1:12525" { }
}
CONF
echo "nameserver 127.0.0.1#9" > "$IMP/resolv.conf"   # Gateway needs no DNS; never the system resolver
python3 -m pip install -q -e "$ROOT" >/dev/null
EXTRA=""
if [ "${RECEPTION_PROCESSES:-0}" != 0 ]; then EXTRA="--reception-processes $RECEPTION_PROCESSES"; fi
# The spool is cleared before each Impetus run: every run starts empty, like Postfix's.
export MTA_CMD="bash -c 'rm -rf $IMP/spool; exec $(command -v python3) -m impetus.cli serve -c $IMP/ecelerity.conf $EXTRA'"
bash "$SHARED/postfix_baseline.sh" setup
bash "$SHARED/postfix_baseline.sh" compare
python3 - "$WORK/compare.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(scenario, key):
    xs = [r[key] for r in runs if r.get("scenario") == scenario and isinstance(r.get(key), (int, float))]
    return statistics.median(xs) if xs else None
keys = [k for k in ("e2e_rate", "inject_rate", "server_cpu_ms_per_msg")
        if med("mta", k) is not None or med("postfix", k) is not None]
print("\nImpetus / Postfix (medians):")
for k in keys:
    a, b = med("mta", k), med("postfix", k)
    if a is not None and b:
        print(f"  {k:28} impetus {a:10.2f}   postfix {b:10.2f}   ratio {a / b:5.2f}")
if not keys:
    print("  (field names not recognised; see the table above)", sorted(runs[0]) if runs else [])
PY
echo
echo "Latency percentiles and peak RSS for Impetus: python3 bench/relay_bench.py -n $N -s $SIZE -c $SESSIONS"
