"""Throughput of BlkDevice.handle_chain on a raw file, no QEMU: the Python request path's cost.

    python tests/bench/bench_raw.py [--seconds 2] [--size-mib 256] [--cache writeback|none]

Each request is built like a Linux guest's: a 16-byte header, one descriptor per 4 KiB data
page (pages scattered, every other page, so nothing merges), and a status byte. Reads hit the
host page cache after the first pass (writeback mode), so the figures measure our overhead.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blkdev import virtio_blk as vb
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from memory import GuestMemory
from vhost_user.ring.chain import Descriptor, DescriptorChain

PAGE = 4096
HEADER_GPA = 0
STATUS_GPA = 0x800
DATA_GPA = 0x100000


def make_chain(memory: GuestMemory, kind: int, sector: int, length: int) -> DescriptorChain:
    memory.write_at(HEADER_GPA, vb.RequestHeader(kind, 0, sector).pack())
    writable = kind == vb.VIRTIO_BLK_T_IN
    pages = tuple(
        Descriptor(DATA_GPA + 2 * PAGE * i, min(PAGE, length - PAGE * i), writable)
        for i in range(-(-length // PAGE))
    )
    return DescriptorChain(
        0, (Descriptor(HEADER_GPA, 16, False), *pages, Descriptor(STATUS_GPA, 1, True))
    )


def run(
    name: str,
    device: BlkDevice,
    memory: GuestMemory,
    seconds: float,
    length: int,
    next_request: Callable[[], tuple[int, int]],
) -> None:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(64):
            kind, sector = next_request()
            device.handle_chain(0, memory, make_chain(memory, kind, sector, length))
            if memory.read_at(STATUS_GPA, 1) != b"\0":
                raise SystemExit(f"{name}: request failed")
            count += 1
    elapsed = time.perf_counter() - start
    mib = count * length / elapsed / (1 << 20)
    print(f"{name:<28} {count / elapsed:10.0f} IOPS {mib:10.1f} MiB/s  ({count} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    args = parser.parse_args()
    size = args.size_mib << 20
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = Path(tmp) / "bench.raw"
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        disk = RawDisk.open(str(path), cache=args.cache)
        try:
            with GuestMemory.allocate(DATA_GPA + 2 * (128 << 10) + PAGE) as memory:
                device = BlkDevice(disk)
                sectors = size // 512
                print(f"raw file {args.size_mib} MiB, cache={args.cache}, {args.seconds}s each")

                def random_4k() -> tuple[int, int]:
                    return vb.VIRTIO_BLK_T_IN, rng.randrange(sectors // 8) * 8

                run("4K random read", device, memory, args.seconds, PAGE, random_4k)
                for kind, label in ((vb.VIRTIO_BLK_T_IN, "read"), (vb.VIRTIO_BLK_T_OUT, "write")):
                    position = [0]

                    def sequential(
                        kind: int = kind, position: list[int] = position
                    ) -> tuple[int, int]:
                        sector = position[0]
                        position[0] = (sector + 256) % sectors
                        return kind, sector

                    run(
                        f"128K sequential {label}",
                        device,
                        memory,
                        args.seconds,
                        128 << 10,
                        sequential,
                    )
                disk.flush()
        finally:
            disk.close()


if __name__ == "__main__":
    main()
