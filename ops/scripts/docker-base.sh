#!/usr/bin/env bash
# Makes the base image the cadre image is built on, `cadre-base:bookworm`, from Debian's
# packages alone (no image registry is needed): debootstrap a minimal bookworm into a
# directory and `docker import` it. Skipped if the image exists. Needs root (debootstrap)
# and installs debootstrap if missing.
set -euo pipefail
IMAGE=${CADRE_BASE_IMAGE:-cadre-base:bookworm}
MIRROR=${CADRE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE exists"
  exit 0
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
command -v debootstrap >/dev/null || { as_root apt-get update -qq && as_root apt-get install -y -qq debootstrap >/dev/null; }
root=$(mktemp -d)
trap 'as_root rm -rf "$root"' EXIT
# ca-certificates: the HTTP tool and TLS to NATS trust the system roots.
as_root debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >/dev/null
# Smaller and reproducible enough: no apt lists or caches in the image.
as_root sh -c "rm -rf '$root'/var/lib/apt/lists/* '$root'/var/cache/apt/*.bin"
as_root tar -C "$root" -c . | docker import - "$IMAGE" >/dev/null
echo "built $IMAGE"
