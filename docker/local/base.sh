#!/usr/bin/env bash
# Local stand-ins for registry images, for machines that reach Debian's archive but no registry.
#   local/debian:bookworm   debootstrap minbase, imported as an image
#   local/python:3.11       Debian's python3 (3.11) + venv: a BASE_IMAGE for docker/Dockerfile
#   local/prometheus:2      Debian's prometheus package, laid out like prom/prometheus
#   local/haproxy:2         Debian's haproxy package, laid out like the official haproxy image
#   local/locust:2          Locust from PyPI, like locustio/locust (only with LOCUST=1)
# Each is built only when missing (FORCE=1 rebuilds). Needs root, debootstrap and a running dockerd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/lib.sh
source "$here/../lib.sh"
pick_docker
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=1

have() { [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if have local/debian:bookworm; then
    echo "local/debian:bookworm: present"
else
    root=$(mktemp -d /tmp/debootstrap.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "local/debian:bookworm: debootstrap from $MIRROR (a few minutes)"
    nice -n 10 debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" \
        >/tmp/debootstrap.log 2>&1 || { tail -20 /tmp/debootstrap.log; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - local/debian:bookworm >/dev/null
fi

images=(python:3.11 prometheus:2 haproxy:2)
if [ "${LOCUST:-0}" = 1 ]; then images+=(locust:2); fi
for img in "${images[@]}"; do
    if have "local/$img"; then
        echo "local/$img: present"
    else
        echo "local/$img: building"
        # shellcheck disable=SC2046  # ca_secret_args is empty or one flag with its value
        nice -n 10 "$DOCKER" build -q -t "local/$img" -f "$here/Dockerfile.${img%%:*}" \
            $(ca_secret_args) "$here" >/dev/null
    fi
done
