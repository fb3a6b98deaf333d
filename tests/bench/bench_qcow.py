"""qcow2 versus raw throughput on the same workload, through the Disk interface.

Run: ``python tests/bench/bench_qcow.py [--size-mib 256] [--seconds 2]``. The images live in a
temporary directory and are read warm (page cache), so the figures compare the per-request
cost of each format's read path (the goal: allocated qcow2 clusters within 10% of raw) rather
than the storage. Writes are shown too: in-place overwrites of allocated clusters, and
allocating writes into a fresh image.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blkdev.disks.disk import Disk
from blkdev.disks.qcow import QcowDisk, create_image
from blkdev.disks.raw import RawDisk
from memory import GuestMemory, request_buffers_from_buffers

MiB = 1 << 20
ROUNDS = 5


def _run(seconds: float, op: Callable[[int], None], offsets: list[int]) -> float:
    """Operations per second of ``op`` cycling through ``offsets`` for ``seconds``."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for off in offsets:
            op(off)
        n += len(offsets)
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def _bench(disk: Disk, mem: GuestMemory, bs: int, pattern: str, write: bool, secs: float) -> float:
    count = disk.size // bs
    offsets = [i * bs for i in range(count)]
    if pattern == "random":
        random.Random(1).shuffle(offsets)
    offsets = offsets[:4096]
    bufs = request_buffers_from_buffers(mem, [(0, bs)], not write)
    if write:
        return _run(secs, lambda off: disk.write(off, bufs), offsets)
    return _run(secs, lambda off: disk.read(off, bufs), offsets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as d, GuestMemory.allocate(2 * MiB) as mem:
        raw = Path(d, "img.raw")
        with open(raw, "wb") as f:
            chunk = os.urandom(MiB)
            for _ in range(args.size_mib):
                f.write(chunk)
        qcow = Path(d, "img.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
        print(
            f"{args.size_mib} MiB images, warm page cache, one thread, "
            f"best of {ROUNDS} rounds in {args.seconds}s"
        )
        print(f"{'workload':<28}{'raw':>14}{'qcow2':>14}{'qcow2/raw':>11}")
        for write in (False, True):
            for bs, pattern in ((4096, "random"), (65536, "random"), (MiB, "sequential")):
                r = RawDisk.open(str(raw), read_only=not write)
                q = QcowDisk.open(str(qcow), read_only=not write)
                try:
                    # Alternate short rounds and keep each format's best: other load on the
                    # machine then skews both alike.
                    raw_ops = qcow_ops = 0.0
                    for _ in range(ROUNDS):
                        secs = args.seconds / ROUNDS
                        raw_ops = max(raw_ops, _bench(r, mem, bs, pattern, write, secs))
                        qcow_ops = max(qcow_ops, _bench(q, mem, bs, pattern, write, secs))
                finally:
                    r.close()
                    q.close()
                name = f"{'write' if write else 'read'} {bs // 1024}k {pattern}"
                unit = bs / MiB
                print(
                    f"{name:<28}{raw_ops * unit:>10.0f}MB/s{qcow_ops * unit:>10.0f}MB/s"
                    f"{qcow_ops / raw_ops:>10.0%}"
                )
        fresh = Path(d, "fresh.qcow2")
        create_image(str(fresh), size)
        q = QcowDisk.open(str(fresh), read_only=False)
        try:
            bufs = request_buffers_from_buffers(mem, [(0, 65536)], False)
            start = time.perf_counter()
            for off in range(0, min(size, 64 * MiB), 65536):
                q.write(off, bufs)
            q.flush()
            secs = time.perf_counter() - start
        finally:
            q.close()
        print(
            f"{'allocating write 64k seq':<28}{'':>14}{min(size, 64 * MiB) / MiB / secs:>10.0f}MB/s"
        )


if __name__ == "__main__":
    main()
