#!/usr/bin/env bash
# User-space instructions the node spends per task of bench_pipeline, counted by
# callgrind: steady on this noisy machine where tasks/s and CPU time move by ±15 % between
# runs of one binary. Runs the node under valgrind twice (SMALL and LARGE throughput
# tasks, the same startup) and prints (I_large − I_small) / (LARGE − SMALL).
#
#   ops/scripts/instructions-per-task.sh [CADRE_BINARY] [SMALL] [LARGE]
#
# Two figures: all instructions, and without sha2's software compress. valgrind hides
# SHA-NI, so sha256 (the audit chain, args hashes) runs its portable path: about 15 % of
# the count here against under 1 % of the real CPU. Kernel work (syscalls, fsync) is not
# counted at all, and valgrind runs one thread at a time (commits group differently):
# compare builds with it, do not read it as CPU time.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/cadre-target}"
bin="$(realpath "${1:-$target/debug/cadre}")"
small="${2:-100}"
large="${3:-600}"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cat >"$out/cadre" <<WRAP
#!/usr/bin/env bash
exec valgrind --tool=callgrind --callgrind-out-file="$out/run.\$CG_RUN.%p" "$bin" "\$@"
WRAP
chmod +x "$out/cadre"
for n in "$small" "$large"; do
  CG_RUN="$n" CADRE_BIN="$out/cadre" BENCH_FILES_DIR=/dev/shm \
    "$target/debug/bench_pipeline" 20 "$n" 16 >"$out/bench.$n.log" 2>&1 \
    || { cat "$out/bench.$n.log" >&2; exit 1; }
done
total() { grep -h '^summary' "$out"/run."$1".* | awk '{print $2}'; }
soft_sha() {
  callgrind_annotate "$out"/run."$1".* 2>/dev/null \
    | awk '/sha2::sha256::soft::compress/ {gsub(",", "", $1); print $1; exit}'
}
python3 - "$(total "$small")" "$(total "$large")" "$(soft_sha "$small")" "$(soft_sha "$large")" \
  "$small" "$large" "$bin" <<'PY'
import sys
a, b, sa, sb = (int(x or 0) for x in sys.argv[1:5])
n = int(sys.argv[6]) - int(sys.argv[5])
print(f"{sys.argv[7]}: {(b - a) / n / 1e6:.3f} M instructions per task; "
      f"{((b - sb) - (a - sa)) / n / 1e6:.3f} M without sha256's software path")
PY
