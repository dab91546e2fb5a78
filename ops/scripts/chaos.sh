#!/usr/bin/env bash
# The chaos suite's long mode: a seeded fault schedule for as long as asked, then the
# same invariants. A failure prints the seed; pass it back to replay the schedule.
#   ops/scripts/chaos.sh --minutes 30 [--seed 1234]             one node (chaos.rs):
#       SIGKILL, SIGSTOP, nats-server restarts, each over tasks in flight
#   ops/scripts/chaos.sh --cluster --minutes 30 [--seed 1234]   three nodes in cluster
#       mode (cluster_chaos.rs): also partitions and slow links, panics all along
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes= seed= cluster=
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=${2:?--minutes needs a number}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --cluster) cluster=1; shift ;;
    *) echo "usage: $0 [--cluster] --minutes N [--seed S]" >&2; exit 2 ;;
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
if [ -n "$cluster" ]; then
  exec cargo test --locked --workspace --test cluster_chaos -- --nocapture
fi
exec cargo test --locked --workspace --test chaos mixed_faults -- --nocapture
