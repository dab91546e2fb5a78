#!/usr/bin/env bash
# Interleaved rounds of bench_pipeline for several `cadre` binaries, then each one's
# medians: on this noisy machine two builds are compared only side by side, in one run.
#
#   ops/scripts/bench-compare.sh ROUNDS "SEQUENTIAL THROUGHPUT IN_FLIGHT" BIN...
#   ops/scripts/bench-compare.sh 5 "300 20000 256" /tmp/bins/before /tmp/bins/after
#
# Copy each build's `$CARGO_TARGET_DIR/debug/cadre` aside first (a wrapper script that
# sets an environment variable and `exec`s a binary works too). Step files go to tmpfs
# (`BENCH_FILES_DIR=/dev/shm`, override it to use a disk). Prints per run: sequential
# p50, tasks/s and node CPU per task of the throughput phase, and the load average.
set -euo pipefail
rounds="$1"
args="$2"
shift 2
target="${CARGO_TARGET_DIR:-$HOME/.cache/cadre-target}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for round in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    # shellcheck disable=SC2086 # the three numbers are separate arguments
    res="$(CADRE_BIN="$bin" BENCH_FILES_DIR="${BENCH_FILES_DIR:-/dev/shm}" \
      "$target/debug/bench_pipeline" $args 2>/dev/null)"
    p50="$(sed -n 's/^sequential.*p50 \([0-9.]*\) ms.*/\1/p' <<<"$res")"
    tps="$(sed -n 's/^throughput.*in flight): \([0-9]*\) tasks.*/\1/p' <<<"$res")"
    cpu="$(sed -n 's/.*node CPU per task \([0-9.]*\) ms.*/\1/p' <<<"$res")"
    printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$bin" "${p50:-?}" "${tps:-?}" "${cpu:-?}" >>"$out"
    echo "round $round $(basename "$bin"): p50 ${p50:-?} ms, ${tps:-?} tasks/s, ${cpu:-?} ms CPU/task, load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
python3 - "$out" "$@" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
for binary in sys.argv[2:]:
    mine = [r for r in rows if r[1] == binary]
    def median(col):
        values = [float(r[col]) for r in mine if r[col].strip() != "?"]
        return f"{statistics.median(values):g}" if values else "?"
    print(f"{binary}: median p50 {median(2)} ms, {median(3)} tasks/s, {median(4)} ms CPU/task ({len(mine)} runs)")
PY
