#!/usr/bin/env bash
# Headless, bounded Locust run against a running service (make loadtest), with the SLO gate.
#   PORT=8000 (the service's, as `make serve PORT=...`) or HOST=http://127.0.0.1:8000 (any URL)
#   USERS=4  SPAWN_RATE=2  RUN_TIME=60s
#   LOCUST_SLO_P95_MS=2000  LOCUST_SLO_MAX_FAIL_RATIO=0.01   (see loadtests/locustfile.py)
#   REPORT_DIR=reports/loadtest/<time>   CSV + HTML reports (reports/ is git-ignored)
# Extra arguments go to locust. Start the service first: make serve (or docker compose up).
# Locust shares the machine with the service: its own CPU use is printed next to the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-http://127.0.0.1:${PORT:-8000}}
USERS=${USERS:-4}
SPAWN_RATE=${SPAWN_RATE:-2}
RUN_TIME=${RUN_TIME:-60s}
REPORT_DIR=${REPORT_DIR:-reports/loadtest/$(date +%Y%m%d-%H%M%S)}
LOCUST=${LOCUST:-.venv/bin/locust}
PY=${PY:-.venv/bin/python}

# Service CPU seconds from its own /metrics (empty when unreachable).
service_cpu() { "$PY" -c "import sys, urllib.request as u
for line in u.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode().splitlines():
    if line.startswith('process_cpu_seconds_total '): print(line.split()[1])" "$HOST" 2>/dev/null || true; }

# Wait up to 60 s for readiness: a run against a cold or absent service measures nothing.
for _ in $(seq 60); do
    "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/readyz', timeout=2)" \
        "$HOST" 2>/dev/null && break
    sleep 1
done || true
if ! "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/readyz', timeout=2)" \
    "$HOST" 2>/dev/null; then
    echo "no ready service at $HOST: start one with 'make serve' (or 'docker compose up'), or" \
        "point at yours: make loadtest PORT=... (or HOST=http://...)" >&2
    exit 1
fi

mkdir -p "$REPORT_DIR"
echo "locust: $USERS users for $RUN_TIME against $HOST; reports in $REPORT_DIR"
cpu0=$(service_cpu)
TIMEFORMAT='locust process: %U s user + %S s sys CPU over %R s wall (%P%% of one core)'
status=0
time "$LOCUST" -f loadtests/locustfile.py --headless --host "$HOST" \
    --users "$USERS" --spawn-rate "$SPAWN_RATE" --run-time "$RUN_TIME" --stop-timeout 10 \
    --csv "$REPORT_DIR/locust" --html "$REPORT_DIR/locust.html" --only-summary "$@" \
    2>&1 | tee "$REPORT_DIR/locust.log" || status=$?
cpu1=$(service_cpu)
if [ -n "$cpu0" ] && [ -n "$cpu1" ]; then
    "$PY" -c "import sys; print(f'service process: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s CPU during the run')" "$cpu0" "$cpu1"
fi
echo "cores on this machine: $(nproc --all); reports: $REPORT_DIR/locust_stats.csv, $REPORT_DIR/locust.html"
exit "$status"
