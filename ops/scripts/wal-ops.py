#!/usr/bin/env python3
"""What a node's RocksDB write-ahead log holds, by column family and operation.

    ops/scripts/wal-ops.py STORE/000004.log                 # the whole log
    ops/scripts/wal-ops.py BEFORE.log AFTER.log N           # per task: (AFTER - BEFORE) / N

Copy the live log (`<data_dir>/store/*.log`) before and after running N tasks one at a
time, and the second form prints what one task wrote: batches, bytes, and for each
family and operation the count and the key and value bytes. The column family ids are
the order of `Cf::ALL` in storage/src/store.rs (0 is RocksDB's `default`); keep
`FAMILIES` in step with it.
"""
import collections
import struct
import sys

FAMILIES = ["default", "tasks", "active", "outbox", "effects", "intake_keys", "episodes",
            "meta", "audit", "audit_index", "spend", "context", "facts",
            "knowledge_outbox", "secrets"]
BLOCK = 32768


def records(data):
    """The log's records (each one WriteBatch), reassembled from its fragments."""
    out, partial, pos = [], b"", 0
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        header = 11 if kind >= 5 else 7  # recyclable records carry a log number
        payload = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:
            break  # preallocated zeros: the end of what was written
        kind = kind - 4 if kind >= 5 else kind
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            partial = payload
        elif kind == 3:
            partial += payload
        elif kind == 4:
            out.append(partial + payload)
            partial = b""
    return out


def varint(b, i):
    value, shift = 0, 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i


def sized(b, i):
    n, i = varint(b, i)
    return b[i:i + n], i + n


# RocksDB's ValueType tags: (operation, has a column family id, has a value).
TAGS = {0x0: ("delete", False, False), 0x1: ("put", False, True), 0x2: ("merge", False, True),
        0x4: ("delete", True, False), 0x5: ("put", True, True), 0x6: ("merge", True, True),
        0x7: ("single_delete", False, False), 0x8: ("single_delete", True, False),
        0xE: ("range_delete", True, True), 0xF: ("range_delete", False, True)}


def tally(path):
    ops = collections.defaultdict(lambda: [0, 0, 0])
    recs = records(open(path, "rb").read())
    for r in recs:
        _seq, count = struct.unpack("<QI", r[:12])
        i = 12
        for _ in range(count):
            tag = r[i]
            i += 1
            if tag not in TAGS:
                sys.exit(f"{path}: unknown record tag {tag:#x}")
            op, has_cf, has_value = TAGS[tag]
            cf = 0
            if has_cf:
                cf, i = varint(r, i)
            key, i = sized(r, i)
            value = b""
            if has_value:
                value, i = sized(r, i)
            name = FAMILIES[cf] if cf < len(FAMILIES) else str(cf)
            row = ops[(name, op)]
            row[0] += 1
            row[1] += len(key)
            row[2] += len(value)
    return len(recs), sum(len(r) for r in recs), ops


def main():
    if len(sys.argv) == 2:
        batches, size, ops = tally(sys.argv[1])
        per = 1
    elif len(sys.argv) == 4:
        b0, s0, o0 = tally(sys.argv[1])
        b1, s1, o1 = tally(sys.argv[2])
        per = int(sys.argv[3])
        batches, size = b1 - b0, s1 - s0
        ops = {k: [v[j] - o0.get(k, [0, 0, 0])[j] for j in range(3)] for k, v in o1.items()}
    else:
        sys.exit(__doc__)
    print(f"batches {batches / per:.1f}, bytes {size / per:,.0f}")
    for (name, op), (n, kb, vb) in sorted(ops.items(), key=lambda kv: -kv[1][1] - kv[1][2]):
        if n:
            print(f"  {name:<16} {op:<13} {n / per:5.1f} × · key bytes {kb / per:6,.0f} · value bytes {vb / per:7,.0f}")


if __name__ == "__main__":
    main()
