#!/usr/bin/env bash
# End-to-end smoke of the container stack (make docker-smoke), for a root Debian machine that
# reaches Debian's archive and PyPI but no container registry:
#   docker engine -> local base images (debootstrap) -> CPU image -> compose up api + lb +
#   prometheus -> healthy + ready -> classify a real clip via 127.0.0.1 (through the load
#   balancer) -> the request counted in Prometheus -> compose down (always).
# Where a registry is reachable: BASE_IMAGE=python:3.11-slim PROMETHEUS_IMAGE=prom/prometheus:v2.53.0
# LB_IMAGE=haproxy:2.8
# Grafana runs only when GRAFANA_IMAGE is already present locally (it has no Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
source docker/lib.sh
t_start=$(date +%s)
smoke_images
export GRAFANA_IMAGE=${GRAFANA_IMAGE:-grafana/grafana:11.1.0}
# Ports of their own, so the smoke never meets a `make serve` or a user's stack.
export API_PORT=${SMOKE_API_PORT:-18000} PROMETHEUS_PORT=${SMOKE_PROMETHEUS_PORT:-19090}
export API_GRPC_PORT=${SMOKE_API_GRPC_PORT:-18002}
export GRAFANA_PORT=${SMOKE_GRAFANA_PORT:-13000}
export COMPOSE_PROJECT_NAME=esc50-smoke
API=http://127.0.0.1:$API_PORT
PROM=http://127.0.0.1:$PROMETHEUS_PORT
# A real ESC-50 clip when ../shared is there, else a bundled one.
CLIP=${SMOKE_CLIP:-}
for c in ../shared/esc50/audio/*.ogg loadtests/clips/tone-3s-22k.flac; do
    if [ -z "$CLIP" ] && [ -f "$c" ]; then CLIP=$c; fi
done
BUILD_LOG=${TMPDIR:-/tmp}/esc50-smoke-build.log

step "prerequisites: docker engine, debootstrap, curl"
ensure_engine

step "compose client"
pick_compose

step "base images ($BASE_IMAGE, $PROMETHEUS_IMAGE, $LB_IMAGE)"
prepare_images "$BUILD_LOG"

services=(api lb prometheus)
if "$DOCKER" image inspect "$GRAFANA_IMAGE" >/dev/null 2>&1; then
    services+=(grafana)
else
    echo "SKIP grafana: $GRAFANA_IMAGE is not present locally and no registry is reachable;" \
        "its provisioning and dashboard are checked by tests/test_docker.py"
fi

cleanup() {
    local rc=$?
    step "compose down"
    if [ "$rc" -ne 0 ]; then "${COMPOSE[@]}" logs --no-color --tail 40 || true; fi
    "${COMPOSE[@]}" down -v --remove-orphans --timeout 30 || true
    echo "smoke $([ "$rc" -eq 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - t_start))s"
    stop_started_engine
}
trap cleanup EXIT

step "compose up: ${services[*]}"
"${COMPOSE[@]}" up -d --no-build "${services[@]}"

step "wait until the api container is healthy and the model is warmed"
api_health() { [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$("${COMPOSE[@]}" ps -q api)")" = healthy ]; }
wait_for 120 "api container healthy (HEALTHCHECK on /healthz)" api_health
wait_for 120 "api ready ($API/readyz)" curl -fsS "$API/readyz"

step "classify $CLIP through $API"
case $CLIP in *.ogg) type=audio/ogg ;; *.flac) type=audio/flac ;; *) type=audio/wav ;; esac
answer=$(curl -fsS -X POST -H "Content-Type: $type" --data-binary "@$CLIP" "$API/classify?top_k=3") \
    || fail "classify request"
echo "$answer"
echo "$answer" | python3 -c 'import json, sys; d = json.load(sys.stdin); p = d["predictions"]
assert len(p) == 3 and all(0 <= x["probability"] <= 1 for x in p), d
print("ok: top label", p[0]["label"], round(p[0]["probability"], 3), "model", d["model"])' \
    || fail "classify answer has the wrong shape"

step "the same clip over the Open Inference Protocol's gRPC, through the LB (:$API_GRPC_PORT)"
if .venv/bin/python -c "import tritonclient.grpc" 2>/dev/null; then
    .venv/bin/python - "$CLIP" "$API_GRPC_PORT" "$answer" <<'PY' || fail "gRPC infer through the LB"
import json, sys

import numpy as np
import tritonclient.grpc as g

clip, port, v1 = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = g.InferenceServerClient(f"127.0.0.1:{port}")
assert client.is_server_ready()
audio = g.InferInput("audio", [1], "BYTES")
audio.set_data_from_numpy(np.array([open(clip, "rb").read()], dtype=object))
wanted = [g.InferRequestedOutput("probabilities")]
p = client.infer("esc50-resnet34", [audio], outputs=wanted).as_numpy("probabilities")[0]
top = v1["predictions"][0]
assert int(p.argmax()) == top["index"] and abs(p[top["index"]] - top["probability"]) < 1e-6, (p, top)
print("ok: gRPC through the LB answers as /classify:", top["label"], round(float(p.max()), 3))
PY
else
    echo "SKIP gRPC: tritonclient is not in .venv (make install brings it)"
fi

step "the classify request, scraped from /metrics by Prometheus ($PROM)"
query='sum(esc50_http_requests_total{route="/classify",status="200"})'
prom_count() {
    curl -fsS -G "$PROM/api/v1/query" --data-urlencode "query=$query" | python3 -c \
        'import json, sys; r = json.load(sys.stdin)["data"]["result"]; v = float(r[0]["value"][1])
assert v >= 1, v; print(v)'
}
wait_for 90 "Prometheus has $query >= 1" prom_count
echo "Prometheus: $query = $(prom_count)"
curl -fsS -G "$PROM/api/v1/query" --data-urlencode 'query=up{job="esc50"}' | python3 -c \
    'import json, sys; [print("target", r["metric"]["instance"], "up =", r["value"][1]) for r in json.load(sys.stdin)["data"]["result"]]'
