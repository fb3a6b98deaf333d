"""``vhost-user-blk bench``: drive any vhost-user-blk backend with no VM and measure it.

The driver speaks vhost-user as QEMU does (``vhost_user.frontend``: memfd guest RAM, split
rings, with or without EVENT_IDX) and then plays the guest's virtio-blk driver on each queue:
``iodepth`` requests in flight, each one header, one data buffer and one status byte, refilled
as they complete. Every queue runs on its own thread. The hot loop is C
(``vhost_user/native/bench_driver.c``, through cffi, without the GIL) so that the driver is not
what is measured; its Python twin (:func:`_python_loop`, same algorithm, same single-store rule)
runs where the C module is not built, and always with ``--verify``: every block written carries
its offset and a generation, and after the timed run every block written is read back and
checked.

The report: IOPS, bandwidth, latency percentiles (from a histogram of 8 steps per power of two
of nanoseconds: a percentile is exact to within 12.5%), and, given the backend's pid, the CPU
time the backend spent per I/O (utime + stime of the whole process, every thread).
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from vhost_user import native
from vhost_user.frontend import (
    DEVICE_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Frontend,
)

RW: Final = ("randread", "randwrite", "read", "write")
MAX_DEPTH: Final = 256
LAT_BUCKETS: Final = 512
SECTOR: Final = 512
_HDR: Final = struct.Struct("<IIQ")
_PATTERN: Final = struct.Struct("<QQ")


@dataclass(frozen=True)
class Options:
    socket: str
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    queues: int = 1
    seconds: float = 5.0
    event_idx: bool = True
    verify: bool = False
    pid: int | None = None
    queue_size: int = 256
    python: bool = False
    """Use the Python loop even where the C one is built."""

    def check(self) -> None:
        if self.rw not in RW:
            raise ValueError(f"--rw must be one of {', '.join(RW)}")
        if self.bs <= 0 or self.bs % SECTOR or self.bs > 1 << 20:
            raise ValueError(f"--bs must be a multiple of {SECTOR} up to 1 MiB, not {self.bs}")
        if not 1 <= self.iodepth <= min(MAX_DEPTH, self.queue_size // 3):
            raise ValueError(f"--iodepth must be 1..{min(MAX_DEPTH, self.queue_size // 3)}")
        if not 1 <= self.queues <= 64:
            raise ValueError("--queues must be 1..64")
        if self.seconds <= 0:
            raise ValueError("--seconds must be positive")
        if self.verify and self.rw not in ("randwrite", "write"):
            raise ValueError("--verify checks what the run writes: use --rw randwrite or write")


@dataclass
class QueueResult:
    ops: int = 0
    errors: int = 0
    bytes: int = 0
    kicks: int = 0
    elapsed_ns: int = 0
    lat_sum_ns: int = 0
    hist: list[int] = dataclasses.field(default_factory=lambda: [0] * LAT_BUCKETS)
    verified: int = 0
    mismatches: int = 0


@dataclass(frozen=True)
class Report:
    rw: str
    bs: int
    iodepth: int
    queues: int
    loop: str
    iops: float
    mib_per_s: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    errors: int
    backend_cpu_us_per_io: float | None
    verified: int
    mismatches: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        cpu = (
            "n/a (no --pid)"
            if self.backend_cpu_us_per_io is None
            else f"{self.backend_cpu_us_per_io:.1f} us"
        )
        lines = [
            f"{self.rw} bs={self.bs} iodepth={self.iodepth} queues={self.queues} "
            f"({self.loop} loop)",
            f"  {self.iops:,.0f} IOPS, {self.mib_per_s:,.1f} MiB/s, {self.errors} errors",
            f"  latency us: mean {self.lat_mean_us:.1f}  p50 {self.lat_p50_us:.1f}  "
            f"p99 {self.lat_p99_us:.1f}  p99.9 {self.lat_p999_us:.1f}",
            f"  backend CPU per I/O: {cpu}",
        ]
        if self.verified or self.mismatches:
            lines.append(f"  verify: {self.verified} blocks read back, {self.mismatches} wrong")
        return "\n".join(lines)


def bucket_floor_ns(b: int) -> int:
    """The smallest latency that lands in bucket ``b`` (the inverse of bench_driver.c's
    bucket_of: 8 linear steps per power of two)."""
    if b < 8:
        return b
    log, sub = b // 8 + 2, b % 8
    return (8 + sub) << (log - 3)


def bucket_of(ns: int) -> int:
    if ns < 8:
        return ns
    log = ns.bit_length() - 1
    sub = (ns >> (log - 3)) & 7
    return min((log - 2) * 8 + sub, LAT_BUCKETS - 1)


def percentile_us(hist: list[int], q: float) -> float:
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for b, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return bucket_floor_ns(b) / 1000
    return bucket_floor_ns(len(hist) - 1) / 1000


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- guest RAM layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueLayout:
    desc: int
    avail: int
    used: int
    hdr: int
    status: int
    data: int
    end: int

    @classmethod
    def at(cls, base: int, qsize: int, depth: int, bs: int) -> QueueLayout:
        def up(x: int, a: int) -> int:
            return (x + a - 1) // a * a

        desc = base
        avail = desc + 16 * qsize
        used = up(avail + 6 + 2 * qsize, 4096)
        hdr = up(used + 6 + 8 * qsize, 4096)
        status = hdr + 16 * depth
        data = up(status + depth, 4096)
        return cls(desc, avail, used, hdr, status, data, up(data + bs * depth, 4096))


# -- the loops -------------------------------------------------------------------------------


def _c_loop(
    fe: Frontend, lay: QueueLayout, kick: int, opts: Options, capacity: int, seed: int, q: int
) -> QueueResult:
    mod = native.bench_driver()
    assert mod is not None
    ffi, lib = mod.ffi, mod.lib
    b = ffi.new("struct vub_bench *")
    mem = ffi.from_buffer("uint8_t[]", fe.mem)
    b.mem = mem
    b.mem_size = fe.mem_size
    b.qsize = opts.queue_size
    b.iodepth = opts.iodepth
    b.desc_gpa, b.avail_gpa, b.used_gpa = lay.desc, lay.avail, lay.used
    b.hdr_gpa, b.status_gpa, b.data_gpa = lay.hdr, lay.status, lay.data
    b.kick_fd = kick
    b.event_idx = int(opts.event_idx)
    b.bs = opts.bs
    b.rw = RW.index(opts.rw)
    b.capacity = capacity
    b.seconds = opts.seconds
    b.seed = seed
    rc = lib.vub_bench_run(b)  # the GIL is released while it runs
    if rc:
        why = {
            -1: "bad parameters",
            -2: "rings outside guest RAM",
            -3: "kick failed",
            -4: "the backend stopped answering (requests out 10 s past the end)",
            -5: "the backend returned a head that was never made available",
        }.get(rc, f"error {rc}")
        raise RuntimeError(f"bench driver: {why}")
    return QueueResult(
        ops=b.ops,
        errors=b.errors,
        bytes=b.bytes,
        kicks=b.kicks,
        elapsed_ns=b.elapsed_ns,
        lat_sum_ns=b.lat_sum_ns,
        hist=list(b.lat_hist),
    )


def _pattern(block: int, generation: int, bs: int) -> bytes:
    """A block's content: its number and generation, then bytes derived from both."""
    head = _PATTERN.pack(block, generation)
    body = random.Random(block * 1_000_003 + generation).randbytes(bs - len(head))
    return head + body


class _PyRing:
    """The driver side of one split ring in our mapping of guest RAM: the Python twin of
    bench_driver.c, storing every field another process reads in one store of its width."""

    def __init__(self, fe: Frontend, lay: QueueLayout, qsize: int, kick: int, event_idx: bool):
        self.mem = memoryview(fe.mem)
        self.lay = lay
        self.qsize = qsize
        self.kick_fd = kick
        self.event_idx = event_idx
        self.avail16 = self.mem[lay.avail : lay.avail + 6 + 2 * qsize].cast("H")
        self.used_bytes = self.mem[lay.used : lay.used + 6 + 8 * qsize]
        self.used16 = self.used_bytes.cast("H")
        self.used32 = self.used_bytes[4 : 4 + 8 * qsize].cast("I")
        self.avail_idx = self.avail16[1]
        self.last_used = self.used16[1]
        self.kicked_at = self.avail_idx
        self.kicks = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.mem, self.lay.desc + 16 * i, addr, length, flags, nxt)

    def push(self, heads: list[int]) -> None:
        for h in heads:
            self.avail16[2 + self.avail_idx % self.qsize] = h
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # One 2-byte store publishes them (CPython's stores are ordered on x86, and the GIL's
        # own barriers order them elsewhere, as 2.7.13 needs: entries before the index).
        self.avail16[1] = self.avail_idx
        if self.event_idx:
            event = self.used16[2 + 4 * self.qsize]  # avail_event, after the used elements
            kick = ((self.avail_idx - event - 1) & 0xFFFF) < (
                (self.avail_idx - self.kicked_at) & 0xFFFF
            )
        else:
            kick = not self.used16[0] & 1
        if kick:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
        self.kicked_at = self.avail_idx

    def used(self) -> list[int]:
        now = self.used16[1]
        heads = []
        while self.last_used != now:
            heads.append(self.used32[2 * (self.last_used % self.qsize)])
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.avail16[2 + self.qsize] = (self.last_used + 0x7FFF) & 0xFFFF  # used_event
        return heads

    def release(self) -> None:
        self.used32.release()
        self.used16.release()
        self.used_bytes.release()
        self.avail16.release()
        self.mem.release()


def _python_loop(
    fe: Frontend, lay: QueueLayout, kick: int, opts: Options, capacity: int, seed: int, q: int
) -> QueueResult:
    ring = _PyRing(fe, lay, opts.queue_size, kick, opts.event_idx)
    mem = ring.mem
    res = QueueResult()
    depth, bs = opts.iodepth, opts.bs
    write = opts.rw in ("randwrite", "write")
    rnd = random.Random(seed)
    blocks = capacity // bs
    seq = 0
    generation: dict[int, int] = {}
    slot_block = [0] * depth
    started = [0] * depth
    try:
        for i in range(depth):
            ring.set_desc(3 * i, lay.hdr + 16 * i, 16, 1, 3 * i + 1)
            ring.set_desc(3 * i + 1, lay.data + bs * i, bs, 1 | (0 if write else 2), 3 * i + 2)
            ring.set_desc(3 * i + 2, lay.status + i, 1, 2, 0)
        if opts.event_idx:
            ring.avail16[2 + opts.queue_size] = (ring.last_used + 0x7FFF) & 0xFFFF
        else:
            ring.avail16[0] = 1  # VRING_AVAIL_F_NO_INTERRUPT

        def fill(i: int, block: int, kind_write: bool) -> None:
            _HDR.pack_into(mem, lay.hdr + 16 * i, 1 if kind_write else 0, 0, block * bs // SECTOR)
            if kind_write and opts.verify:
                gen = generation.get(block, 0) + 1
                generation[block] = gen
                mem[lay.data + bs * i : lay.data + bs * (i + 1)] = _pattern(block, gen, bs)
            mem[lay.status + i] = 0xFF
            slot_block[i] = block
            started[i] = time.perf_counter_ns()

        # With --verify, what a block must read back is only defined if its writes never
        # overlap: two in flight at once may land in either order (virtio orders nothing), on
        # one queue or across queues. So each queue owns the blocks b with b % queues == q,
        # and a block in flight is not written again until it completes.
        stripe = opts.queues if opts.verify else 1
        owned = max(1, (blocks - q + stripe - 1) // stripe) if stripe > 1 else blocks
        busy: set[int] = set()
        if opts.verify and blocks // stripe <= depth:
            raise RuntimeError(
                f"the disk is too small to verify {depth} blocks in flight per queue"
            )

        def next_block() -> int:
            nonlocal seq
            while True:
                if opts.rw.startswith("rand"):
                    n = rnd.randrange(owned)
                else:
                    seq += 1
                    n = (seq - 1) % owned
                block = n * stripe + (q if stripe > 1 else 0)
                if not opts.verify or (block < blocks and block not in busy):
                    busy.add(block)
                    return block

        deadline = time.monotonic() + opts.seconds
        t0 = time.perf_counter_ns()
        outstanding = 0
        free = list(range(depth))
        while True:
            if free and time.monotonic() < deadline:
                for i in free:
                    fill(i, next_block(), write)
                ring.push([3 * i for i in free])
                outstanding += len(free)
                free = []
            if not outstanding:
                break
            heads = _wait_used(ring, deadline + 10)
            now = time.perf_counter_ns()
            for h in heads:
                i = h // 3
                if h % 3 or i >= depth:
                    raise RuntimeError("bench driver: a head that was never made available")
                outstanding -= 1
                busy.discard(slot_block[i])
                res.errors += mem[lay.status + i] != 0
                lat = now - started[i]
                res.hist[bucket_of(lat)] += 1
                res.lat_sum_ns += lat
                res.ops += 1
                res.bytes += bs
                free.append(i)
        res.elapsed_ns = time.perf_counter_ns() - t0
        if opts.verify:
            _verify(ring, lay, opts, generation, res)
        res.kicks = ring.kicks
        return res
    finally:
        ring.release()


def _wait_used(ring: _PyRing, give_up: float) -> list[int]:
    spins = 0
    while True:
        heads = ring.used()
        if heads:
            return heads
        spins += 1
        if spins % 1024 == 0 and time.monotonic() > give_up:
            raise RuntimeError("bench driver: the backend stopped answering")


def _verify(
    ring: _PyRing, lay: QueueLayout, opts: Options, generation: dict[int, int], res: QueueResult
) -> None:
    """Read back every block written (reads through the same descriptors, now writable)."""
    mem = ring.mem
    depth, bs = opts.iodepth, opts.bs
    for i in range(depth):
        ring.set_desc(3 * i + 1, lay.data + bs * i, bs, 1 | 2, 3 * i + 2)
    todo = sorted(generation)
    for start in range(0, len(todo), depth):
        batch = todo[start : start + depth]
        for i, block in enumerate(batch):
            _HDR.pack_into(mem, lay.hdr + 16 * i, 0, 0, block * bs // SECTOR)
            mem[lay.status + i] = 0xFF
        ring.push([3 * i for i in range(len(batch))])
        got = 0
        while got < len(batch):
            got += len(_wait_used(ring, time.monotonic() + 10))
        for i, block in enumerate(batch):
            data = bytes(mem[lay.data + bs * i : lay.data + bs * (i + 1)])
            ok = mem[lay.status + i] == 0 and data == _pattern(block, generation[block], bs)
            res.verified += 1
            res.mismatches += not ok


# -- the run ---------------------------------------------------------------------------------


def run(opts: Options, *, progress: Callable[[str], None] | None = None) -> Report:
    opts.check()
    c_built = native.bench_driver() is not None
    use_c = c_built and not opts.python and not opts.verify
    loop_name = "C" if use_c else "Python"
    if progress is not None and not c_built and not opts.python:
        progress("the C bench loop is not built (python -m vhost_user.native.build): Python loop")
    layouts = []
    base = 0
    for _ in range(opts.queues):
        lay = QueueLayout.at(base, opts.queue_size, opts.iodepth, opts.bs)
        layouts.append(lay)
        base = lay.end
    want = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | DEVICE_FEATURES
    want |= VIRTIO_RING_F_EVENT_IDX if opts.event_idx else 0
    with Frontend(opts.socket, base) as fe:
        config = fe.start(want)
        if len(config) < 8:
            raise RuntimeError("the backend has no config space (CONFIG protocol feature)")
        capacity = struct.unpack_from("<Q", config)[0] * SECTOR
        if capacity < opts.bs:
            raise RuntimeError(f"the disk ({capacity} bytes) is smaller than one block")
        if opts.queues > fe.queue_num:
            raise RuntimeError(f"the backend has {fe.queue_num} queues, not {opts.queues}")
        if not fe.features & VIRTIO_RING_F_EVENT_IDX and opts.event_idx:
            opts = dataclasses.replace(opts, event_idx=False)
        kicks = [
            fe.setup_vring(q, opts.queue_size, lay.desc, lay.avail, lay.used).kick
            for q, lay in enumerate(layouts)
        ]
        loop = _c_loop if use_c else _python_loop
        results: list[QueueResult | BaseException] = [QueueResult()] * opts.queues
        cpu0 = cpu_seconds(opts.pid) if opts.pid else 0.0

        def one(q: int) -> None:
            try:
                results[q] = loop(fe, layouts[q], kicks[q], opts, capacity, 1 + q * 7919, q)
            except BaseException as exc:  # reported below, with the others
                results[q] = exc

        threads = [threading.Thread(target=one, args=(q,)) for q in range(opts.queues)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu = cpu_seconds(opts.pid) - cpu0 if opts.pid else None
        for q in range(opts.queues):
            fe.stop_vring(q)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    done = [r for r in results if isinstance(r, QueueResult)]
    ops = sum(r.ops for r in done)
    elapsed = max(r.elapsed_ns for r in done) / 1e9 or 1e-9
    hist = [sum(col) for col in zip(*(r.hist for r in done), strict=True)]
    return Report(
        rw=opts.rw,
        bs=opts.bs,
        iodepth=opts.iodepth,
        queues=opts.queues,
        loop=loop_name,
        iops=ops / elapsed,
        mib_per_s=sum(r.bytes for r in done) / elapsed / (1 << 20),
        lat_mean_us=sum(r.lat_sum_ns for r in done) / max(ops, 1) / 1000,
        lat_p50_us=percentile_us(hist, 0.5),
        lat_p99_us=percentile_us(hist, 0.99),
        lat_p999_us=percentile_us(hist, 0.999),
        errors=sum(r.errors for r in done),
        backend_cpu_us_per_io=None if cpu is None else cpu / max(ops, 1) * 1e6,
        verified=sum(r.verified for r in done),
        mismatches=sum(r.mismatches for r in done),
    )
