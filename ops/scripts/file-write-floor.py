#!/usr/bin/env python3
"""What the file system alone costs for what `file.write` does, with no Cadre at all.

Each write is the tool's sequence: create a temp file beside the target, write it, fsync
it, rename it over the target, fsync the directory. All threads write into ONE directory,
as `bench_pipeline` does (its four steps write under one root), or with `--spread` each
thread into a directory of its own. Prints writes/s and the system CPU each write cost the
process; the kernel spends this on any caller's behalf.

    ops/scripts/file-write-floor.py [--spread] DIR [WRITES] [THREADS...]
    ops/scripts/file-write-floor.py /tmp/floor 12000 2 16 64      # ext4 here
    ops/scripts/file-write-floor.py --spread /tmp/floor 12000 16  # a directory per thread
    ops/scripts/file-write-floor.py /dev/shm/floor 12000 2 16     # tmpfs

A 4-step `file.write` task makes four such writes: 2,500 tasks/s is 10,000 writes/s.
DIR is created, and each run's files are removed after it.
"""
import os
import shutil
import sys
import threading
import time


def run(base, writes, threads, spread):
    os.makedirs(base)
    body = b"# a client folder's README\n" * 4

    def writer(t):
        path = os.path.join(base, f"t{t}") if spread else base
        os.makedirs(path, exist_ok=True)
        directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        for i in range(writes // threads):
            name = f"f{t}-{i}"
            temp = f".{name}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=directory)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)
        os.close(directory)

    before, started = os.times(), time.perf_counter()
    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    took, after = time.perf_counter() - started, os.times()
    done = writes // threads * threads
    shutil.rmtree(base)
    system_us = (after.system - before.system) / done * 1e6
    where = "a directory each" if spread else "one directory"
    print(f"{threads:3} threads, {where}: {done / took:7.0f} writes/s, system CPU {system_us:4.0f} µs a write")


def main():
    args = sys.argv[1:]
    spread = "--spread" in args
    args = [a for a in args if a != "--spread"]
    if not args:
        sys.exit(__doc__)
    base = args[0]
    writes = int(args[1]) if len(args) > 1 else 12000
    counts = [int(a) for a in args[2:]] or [2, 16, 64]
    if os.path.exists(base):
        sys.exit(f"{base} exists: name a directory to create")
    for threads in counts:
        run(base, writes, threads, spread)


if __name__ == "__main__":
    main()
