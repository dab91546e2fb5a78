#!/usr/bin/env bash
# The chaos suite's long mode: the seeded fault schedule of chaos-tests/tests/chaos.rs
# (SIGKILL, SIGSTOP past the lease TTL, nats-server restarts, each over tasks in flight)
# for as long as asked, then the same invariants. A failure prints the seed; pass it
# back to replay the schedule.
#   ops/scripts/chaos.sh --minutes 30 [--seed 1234]
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes= seed=
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=${2:?--minutes needs a number}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    *) echo "usage: $0 --minutes N [--seed S]" >&2; exit 2 ;;
  esac
done
[[ "$minutes" =~ ^[0-9]+$ ]] || { echo "usage: $0 --minutes N [--seed S]" >&2; exit 2; }
[ -z "$seed" ] || [[ "$seed" =~ ^[0-9]+$ ]] || { echo "--seed must be a whole number" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cadre-target}"
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export PATH CADRE_CHAOS_MINUTES=$minutes
[ -z "$seed" ] || export CADRE_CHAOS_SEED=$seed
ops/scripts/install-deps.sh
cargo build --locked --workspace --bins
exec cargo test --locked --workspace --test chaos mixed_faults -- --nocapture
