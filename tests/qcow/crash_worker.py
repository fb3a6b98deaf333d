"""Crash-test worker: writes through QcowDisk forever, reporting progress on stdout.

``python -m tests.qcow.crash_worker IMAGE SEED [JOURNAL_FD]`` prints ``BEGIN i`` before
operation i, ``END i`` once it returned and ``FLUSHED i`` once a flush after operation i
returned. The operations are a pure function of the seed (:func:`operations`), so the parent can
rebuild what must be on disk after a kill -9. With JOURNAL_FD (a memfd of ``journal.SIZE``
bytes, inherited) the disk keeps its metadata journal there, replaying first what the previous
worker left: then every *completed* operation survives the kill, flushed or not.
"""

from __future__ import annotations

import mmap
import random
import sys
from collections.abc import Iterator

from blkdev.disks.qcow import QcowDisk
from blkdev.disks.qcow import journal as jnl
from memory import GuestMemory, request_buffers_from_buffers

MEM = 1 << 20


def operations(seed: int, size: int) -> Iterator[tuple[str, int, int, bytes]]:
    rnd = random.Random(seed)
    while True:
        off = rnd.randrange(0, size // 512) * 512
        n = min(rnd.randrange(1, 40) * 512, size - off)
        r = rnd.random()
        if r < 0.6:
            yield "write", off, n, rnd.randbytes(n)
        elif r < 0.7:
            yield "discard", off, n, b""
        elif r < 0.8:
            yield "zeroes", off, n, b""
        else:
            yield "flush", 0, 0, b""


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    disk = QcowDisk.open(path, read_only=False)
    if len(sys.argv) > 3:
        area = mmap.mmap(int(sys.argv[3]), jnl.SIZE)
        disk.attach_journal(memoryview(area))
    out = sys.stdout
    with GuestMemory.allocate(MEM) as mem:
        for i, (kind, off, n, data) in enumerate(operations(seed, disk.size)):
            out.write(f"BEGIN {i}\n")
            out.flush()
            if kind == "write":
                mem.write_at(0, data)
                disk.write(off, request_buffers_from_buffers(mem, [(0, n)], False))
            elif kind == "discard":
                disk.discard(off, n)
            elif kind == "zeroes":
                disk.write_zeroes(off, n, unmap=bool(i % 2))
            else:
                disk.flush()
                out.write(f"FLUSHED {i}\n")
                out.flush()
            out.write(f"END {i}\n")
            out.flush()


if __name__ == "__main__":
    main()
