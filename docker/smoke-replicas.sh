#!/usr/bin/env bash
# Replicas behind the load balancer, and a replica killed under load (make docker-smoke-replicas):
#   compose up 2 api replicas + lb + prometheus -> both ready -> real clips through the LB on
#   127.0.0.1 -> Prometheus shows that each replica served -> under continuous load:
#     1. `kill -9` of replica 1's process: the restart policy brings it back healthy;
#     2. `docker kill` of replica 2: Docker disables the restart policy for a container it was
#        told to kill (documented `docker kill` behaviour), so it stays down and the LB carries
#        on with one; `compose up --scale api=2` brings it back;
#   -> no request failed beyond SMOKE_MAX_FAILED (the LB retries what a dead replica dropped)
#   -> compose down (always).
# Same prerequisites and images as docker/smoke.sh (which CI runs first, so images are cached).
set -euo pipefail
cd "$(dirname "$0")/.."
source docker/lib.sh
t_start=$(date +%s)
smoke_images
export API_PORT=${SMOKE_API_PORT:-18100} PROMETHEUS_PORT=${SMOKE_PROMETHEUS_PORT:-19190}
export COMPOSE_PROJECT_NAME=esc50-replicas
API=http://127.0.0.1:$API_PORT
PROM=http://127.0.0.1:$PROMETHEUS_PORT
REPLICAS=2
CONCURRENCY=${SMOKE_CONCURRENCY:-4}  # clients; each has at most one request in flight
MAX_FAILED=${SMOKE_MAX_FAILED:-0}  # failures allowed (ones the LB could not retry)
CLIPS=${SMOKE_CLIPS:-../shared/esc50/audio}
[ -d "$CLIPS" ] || CLIPS=loadtests/clips
WORK=$(mktemp -d /tmp/esc50-replicas.XXXXXX)
BUILD_LOG=$WORK/build.log

step "prerequisites, compose client, images"
ensure_engine
pick_compose
prepare_images "$BUILD_LOG"

load_pid=
cleanup() {
    local rc=$?
    if [ -n "$load_pid" ]; then touch "$WORK/stop"; wait "$load_pid" || true; fi
    step "compose down"
    if [ "$rc" -ne 0 ]; then "${COMPOSE[@]}" logs --no-color --tail 30 || true; fi
    "${COMPOSE[@]}" down -v --remove-orphans --timeout 30 || true
    echo "replica smoke $([ "$rc" -eq 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - t_start))s"
    rm -rf "$WORK"
    stop_started_engine
}
trap cleanup EXIT

# PromQL instant query -> "instance value" lines.
prom() {
    curl -fsS -G "$PROM/api/v1/query" --data-urlencode "query=$1" | python3 -c \
        'import json, sys
for r in json.load(sys.stdin)["data"]["result"]: print(r["metric"].get("instance", "-"), r["value"][1])'
}
replicas() { "${COMPOSE[@]}" ps -q api; }
healthy() { [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$1")" = healthy ]; }
all_healthy() {
    local ids
    mapfile -t ids < <(replicas)
    [ "${#ids[@]}" -eq "$REPLICAS" ] || return 1
    for c in "${ids[@]}"; do healthy "$c" || return 1; done
}
ready_in_prometheus() { [ "$(prom 'sum(esc50_ready{job="esc50"})' | awk '{print $2}')" = "$REPLICAS" ]; }
served_by_each() {  # every replica Prometheus knows has answered classify requests
    local rows
    rows=$(prom 'sum by (instance) (esc50_http_requests_total{route="/classify",status="200"})')
    [ "$(echo "$rows" | awk '$2 > 0' | wc -l)" -ge "$REPLICAS" ]
}

step "compose up: $REPLICAS api replicas + lb + prometheus"
"${COMPOSE[@]}" up -d --no-build --scale "api=$REPLICAS" api lb prometheus
wait_for 180 "$REPLICAS api containers healthy" all_healthy
wait_for 120 "Prometheus finds $REPLICAS ready replicas (DNS discovery)" ready_in_prometheus
wait_for 60 "the load balancer answers ($API/readyz)" curl -fsS "$API/readyz"

step "load: $CONCURRENCY clients sending real clips from $CLIPS through $API"
python3 docker/lbload.py --url "$API" --clips "$CLIPS" --concurrency "$CONCURRENCY" \
    --stop "$WORK/stop" --out "$WORK/load.json" &
load_pid=$!
wait_for 90 "Prometheus: each replica served classify requests" served_by_each
prom 'sum by (instance) (esc50_http_requests_total{route="/classify",status="200"})' \
    | sed 's/^/  classify 200s: /'

mapfile -t ids < <(replicas)
first=${ids[0]} second=${ids[1]}

step "kill -9 of replica ${first:0:12}'s process under load (a crash: the restart policy applies)"
pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$first")
kill -KILL "$pid"
restarted() { [ "$("$DOCKER" inspect -f '{{.RestartCount}}' "$first")" -ge 1 ]; }
wait_for 60 "restart policy restarted ${first:0:12}" restarted
wait_for 180 "${first:0:12} healthy again" healthy "$first"
wait_for 120 "Prometheus: $REPLICAS replicas ready" ready_in_prometheus

step "docker kill of replica ${second:0:12} under load"
"$DOCKER" kill "$second" >/dev/null
sleep 10  # load continues on the survivor; Docker leaves a `docker kill`ed container down
state=$("$DOCKER" inspect -f '{{.State.Status}} restarts={{.RestartCount}}' "$second")
echo "after docker kill: $state (Docker disables the restart policy until the next start)"
"${COMPOSE[@]}" up -d --no-build --no-recreate --scale "api=$REPLICAS" api
wait_for 180 "${second:0:12} healthy again after compose up" healthy "$second"
wait_for 120 "Prometheus: $REPLICAS replicas ready" ready_in_prometheus
sleep 5

step "results"
touch "$WORK/stop"
wait "$load_pid"
load_pid=
python3 - "$WORK/load.json" "$MAX_FAILED" <<'EOF'
import json, sys
summary, max_failed = json.load(open(sys.argv[1])), int(sys.argv[2])
failed = summary["failed"]
for f in failed:
    print(f"  failed: {f['outcome']} ({f['clip']}, {f['end'] - f['start']:.2f} s)")
print(f"{summary['requests']} requests through the load balancer, {len(failed)} failed "
      f"(allowed {max_failed})")
assert summary["requests"] > 0 and len(failed) <= max_failed, summary["outcomes"]
EOF
prom 'sum by (instance) (esc50_http_requests_total{route="/classify",status="200"})' \
    | sed 's/^/  classify 200s: /'
prom 'sum(haproxy_backend_retry_warnings_total{proxy="api"})' | sed 's/^- /  LB retries: /'
prom 'sum(haproxy_backend_redispatch_warnings_total{proxy="api"})' | sed 's/^- /  LB redispatches: /'
