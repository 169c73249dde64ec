#!/usr/bin/env bash
# Install Impetus, start a local sink and the MTA on examples/quickstart.conf,
# send one message with swaks (if installed), and keep running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
mkdir -p var/log var/spool var/maildir
impetus check-config -c examples/quickstart.conf
impetus sink --listen 127.0.0.1:2526 --maildir var/maildir &
SINK=$!
impetus serve -c examples/quickstart.conf &
MTA=$!
trap 'kill $MTA $SINK 2>/dev/null; wait $MTA $SINK 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break; sleep 0.1; done
if command -v swaks >/dev/null; then
  swaks --server 127.0.0.1 --port 2525 --helo quickstart.test \
        --from me@quickstart.test --to you@example.com --body "Hello from Impetus"
  for _ in $(seq 50); do grep -q '@D@' var/log/mainlog.ec 2>/dev/null && break; sleep 0.1; done
  echo "--- mainlog:"; cat var/log/mainlog.ec
  echo "--- delivered into var/maildir/new:"; ls var/maildir/new
fi
echo "Impetus is running on 127.0.0.1:2525 (sink on 2526). Ctrl-C to stop."
wait $MTA
