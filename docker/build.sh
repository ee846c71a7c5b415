#!/usr/bin/env bash
# Build the CPU serving image (make docker-build).
#   IMAGE=esc50-serve:cpu          tag to build
#   BASE_IMAGE=python:3.11-slim    base (docker/local/base.sh makes local/python:3.11 offline)
#   MODEL_DIR=models MODEL_STEM=esc50-resnet34   bakes <dir>/<stem>.int8.onnx + .verify.json
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt  optional pip CA secret ('' to skip)
set -euo pipefail
cd "$(dirname "$0")/.."
source docker/lib.sh
pick_docker
IMAGE=${IMAGE:-esc50-serve:cpu}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
MODEL_DIR=${MODEL_DIR:-models}
MODEL_STEM=${MODEL_STEM:-esc50-resnet34}
for f in "$MODEL_DIR/$MODEL_STEM.int8.onnx" "$MODEL_DIR/$MODEL_STEM.verify.json"; do
    if [ ! -f "$f" ]; then
        echo "missing $f: run 'make export verify', or set MODEL_DIR/MODEL_STEM" >&2
        exit 1
    fi
done
step "build $IMAGE (base $BASE_IMAGE, model $MODEL_DIR/$MODEL_STEM.int8.onnx)"
# shellcheck disable=SC2046  # ca_secret_args is empty or one flag with its value
DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build -f docker/Dockerfile -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg MODEL_DIR="$MODEL_DIR" --build-arg MODEL_STEM="$MODEL_STEM" \
    $(ca_secret_args) "$@" .
"$DOCKER" image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
