#!/usr/bin/env python3
"""A loaded node's CPU samples, by the role or thread they were spent for.

Record the node under load with DWARF call graphs (frame pointers are not kept), then
read the recording:

    $CARGO_TARGET_DIR/debug/bench_pipeline 10 60000 256 &     # BENCH_FILES_DIR=/dev/shm
    sleep 10; perf record -F 999 --call-graph dwarf,16384 -o /tmp/node.perf \\
        -p "$(pgrep -f 'cadre node run' | head -1)" -- sleep 4
    ops/scripts/cpu-by-role.py /tmp/node.perf                 # shares by role
    ops/scripts/cpu-by-role.py /tmp/node.perf executor        # inside one role

A sample counts for the first role (in ROLES' order) whose code is on its stack, else for
its thread as `other`. With a role named, its samples are split by the innermost frame
of Cadre's own code (or of a library it calls) under it.
"""
import collections
import re
import subprocess
import sys

# (role, what on the stack marks it); the first match wins.
ROLES = [
    ("nats connection", "async_nats::connect_with_options"),
    ("task actor", "roles::task::TaskActor"),
    ("task hops", "roles::task::hop"),
    ("executor", "roles::executor"),
    ("verifier", "roles::verifier"),
    ("archivist", "roles::archivist"),
    ("intake", "roles::intake"),
    ("relay", "roles::relay"),
    ("audit publisher", "roles::audit"),
    ("planner", "roles::planner"),
    ("task supervisor", "task_supervisor"),
    ("role pumps", "bus::spawn_pump"),
    ("knowledge", "knowledge"),
    ("commit writer", "GroupWriter"),
    ("syncer", "Syncer"),
]
FRAME = re.compile(r"(actors|storage|async_nats|tokio|ractor|serde_json|postcard|rocksdb)::[A-Za-z_:<>]+")


def samples(path):
    """(thread name, frames innermost first) per sample of `perf script`."""
    text = subprocess.run(["perf", "script", "-i", path], capture_output=True, text=True,
                          check=True).stdout
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) < 2:
            continue
        frames = [line.strip().split(" ", 1)[-1] for line in lines[1:]]
        yield lines[0].split()[0], frames


def role_of(thread, frames):
    stack = "\n".join(frames)
    for role, mark in ROLES:
        if mark in stack:
            return role
    return f"{thread}: other"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    inside = sys.argv[2] if len(sys.argv) > 2 else None
    counts, total = collections.Counter(), 0
    for thread, frames in samples(sys.argv[1]):
        role = role_of(thread, frames)
        if inside is None:
            counts[role] += 1
            total += 1
        elif role == inside:
            total += 1
            found = next((m.group(0) for f in frames if (m := FRAME.search(f))), frames[0])
            counts[found[:100]] += 1
    for what, n in counts.most_common(30):
        print(f"{100 * n / max(total, 1):5.1f} %  {what}")
    print(f"({total} samples)")


if __name__ == "__main__":
    main()
