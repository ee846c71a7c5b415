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
