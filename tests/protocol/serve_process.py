"""The real ``vhost-user-blk serve`` process, a shadow of its image, and a virtio-blk session.

Used by the hostile end-to-end suites (``test_hostile_guest.py``, ``test_hostile_e2e.py``):
each hostile front-end or guest runs against what users run (``python -m blkdev.cli serve`` in
a subprocess), then :meth:`ServeProcess.check_healthy` proves the process survived: it is
alive, logged no crash, holds no leaked fds, serves a fresh well-behaved session on every
queue, and the image equals the :class:`Shadow` (the known initial pattern plus exactly the
bytes valid requests wrote).

:class:`BlkSession` is a QEMU-like front-end with memfd guest RAM (``FrontendMemory``: two
regions with a hole between them) and one ``DriverRing`` per queue that the test controls,
down to raw descriptors. Waiting is polling the used ring, woken by the call eventfd, with
generous timeouts: a missed interrupt cannot hang a test, a lost request still fails it.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from tests.protocol.frontend import (
    DEFAULT_LAYOUT,
    INDIRECT_AREA,
    Frontend,
    FrontendMemory,
    MiB,
    RegionSpec,
    ring_layout,
)
from tests.support.driver_ring import DriverRing

REPO: Final = Path(__file__).resolve().parents[2]

VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_RING_F_EVENT_IDX: Final = 1 << 29
VIRTIO_RING_F_INDIRECT_DESC: Final = 1 << 28

SECTOR: Final = 512
REQ_HDR: Final = struct.Struct("<IIQ")
DWZ_SEG: Final = struct.Struct("<QII")
STATUS_SENTINEL: Final = 0xFF
"""Written into every status byte before a request: still there means "never written"."""

IMAGE_SIZE: Final = 4 * MiB
CAPACITY: Final = IMAGE_SIZE // SECTOR
SERIAL: Final = "hostile-serial-0042"
HEALTH_SECTORS: Final = range(CAPACITY - 64, CAPACITY)
"""Where :meth:`ServeProcess.check_healthy` writes; tests leave these sectors alone."""

QUEUE_AREA: Final = 0x5F000
"""Each queue's data buffers: ``[0x1000 + q * QUEUE_AREA, +QUEUE_AREA)`` in the first region."""
BIG_AREA: Final = (2 * MiB + 0x40000, 2 * MiB - 0x40000)
"""Large buffers: the second region above the rings."""
RESERVED_DESCRIPTORS: Final = 32
"""Descriptor indices 0..31 of every ring are the test's, for raw (hostile) chains."""

_CRASH_MARKERS: Final = (
    "Traceback",
    '"exception"',
    "queue worker crashed",
    "internal error",
    "device failed a request",
    "device raised",
    '"level": "critical"',
)


# -- the process -------------------------------------------------------------------------------


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Shadow:
    """What the image must contain: the initial pattern plus every valid write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray(path.read_bytes())

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= len(self.data)
        self.data[offset : offset + len(data)] = data

    def check(self) -> None:
        actual = self.path.read_bytes()
        assert len(actual) == len(self.data), "the image changed size"
        if actual != self.data:
            bad = [
                s
                for s in range(len(actual) // SECTOR)
                if actual[s * SECTOR : (s + 1) * SECTOR] != self.data[s * SECTOR : (s + 1) * SECTOR]
            ]
            raise AssertionError(f"image differs from its shadow in sectors {bad[:20]}")


class ServeProcess:
    """``python -m blkdev.cli serve`` on a fresh patterned image in ``workdir``."""

    def __init__(self, workdir: Path, *, num_queues: int = 2, queue_size: int = 1024) -> None:
        self.workdir = workdir
        self.image = workdir / "disk.raw"
        self.socket = str(workdir / "blk.sock")
        self.log_path = workdir / "serve.log"
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.image.write_bytes(_pattern(IMAGE_SIZE, 42))
        self.shadow = Shadow(self.image)
        self.proc: subprocess.Popen[bytes] | None = None
        self.baseline_fds = 0
        self.restarts = 0
        self._log_seen = 0
        self.start()

    def start(self) -> None:
        # A restart appends to the same log: only what this process writes says it listens.
        start_at = len(self.log_text()) if self.log_path.exists() else 0
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "blkdev.cli",
                    "serve",
                    "--socket",
                    self.socket,
                    "--image",
                    str(self.image),
                    "--format",
                    "raw",
                    "--num-queues",
                    str(self.num_queues),
                    "--queue-size",
                    str(self.queue_size),
                    "--serial",
                    SERIAL,
                    "--log-format",
                    "json",
                    "--log-level",
                    "info",
                ],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while '"event": "listening"' not in self.log_text()[start_at:]:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.log_text()}"
            time.sleep(0.02)
        self.baseline_fds = fd_count(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        """Restart after a test killed the process (that test has failed already)."""
        if not self.alive():
            self.restarts += 1
            self.shadow = Shadow(self.image)
            self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def crash_lines(self) -> list[str]:
        return [
            line for line in self.log_text().splitlines() if any(m in line for m in _CRASH_MARKERS)
        ]

    def new_log(self) -> str:
        """Log lines written since the last call."""
        text = self.log_text()
        new, self._log_seen = text[self._log_seen :], len(text)
        return new

    def wait_fds(self, timeout: float = 10.0) -> None:
        """The connection's fds (socket, memfds, eventfds) are closed once it ended."""
        deadline = time.monotonic() + timeout
        while (n := fd_count(self.pid)) != self.baseline_fds:
            assert time.monotonic() < deadline, (
                f"serve holds {n} fds, {self.baseline_fds} when idle: {self.open_files()}"
            )
            time.sleep(0.02)

    def open_files(self) -> list[str]:
        fd_dir = f"/proc/{self.pid}/fd"
        out = []
        for fd in os.listdir(fd_dir):
            try:
                out.append(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                pass
        return sorted(out)

    def check_healthy(self) -> None:
        """Alive, no crash logged, no fd leaked, a fresh session works on every queue, and the
        image is exactly its shadow."""
        assert self.alive(), f"serve died (rc={self.proc and self.proc.poll()}):\n{self.log_text()}"
        assert not self.crash_lines(), "\n".join(self.crash_lines())
        self.wait_fds()
        rng = random.Random(time.monotonic_ns())
        with BlkSession.open(self.socket, queues=range(self.num_queues)) as s:
            for q in range(self.num_queues):
                sector = rng.choice(HEALTH_SECTORS[:-8])
                data = rng.randbytes(4096)
                assert s.request(q, VIRTIO_BLK_T_OUT, sector, data=data).ok
                self.shadow.write(sector * SECTOR, data)
                got = s.request(q, VIRTIO_BLK_T_IN, sector, read_len=4096)
                assert got.ok and got.data == data
            assert s.request(0, VIRTIO_BLK_T_FLUSH, 0).ok
        self.wait_fds()
        self.shadow.check()
        assert self.alive()

    def stop(self) -> int:
        """SIGTERM, as a user would; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("serve did not stop on SIGTERM") from None


# -- a virtio-blk session ----------------------------------------------------------------------


class Result:
    """One completed request: used element and what the guest sees."""

    def __init__(self, head: int, used_len: int, status: int, data: bytes) -> None:
        self.head = head
        self.used_len = used_len
        self.status = status
        self.data = data

    @property
    def ok(self) -> bool:
        return self.status == VIRTIO_BLK_S_OK

    def __repr__(self) -> str:
        return f"Result(head={self.head}, len={self.used_len}, status={self.status:#x})"


class BlkSession:
    """A QEMU-like front-end plus guest driver for ``queues`` (rings of ``size``)."""

    def __init__(
        self,
        fe: Frontend,
        memory: FrontendMemory,
        rings: dict[int, DriverRing],
        features: int,
    ) -> None:
        self.fe = fe
        self.memory = memory
        self.rings = rings
        self.features = features
        self.event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)

    @classmethod
    def connect(
        cls, path: str, *, event_idx: bool = True, layout: tuple[RegionSpec, ...] = DEFAULT_LAYOUT
    ) -> tuple[Frontend, FrontendMemory, int]:
        memory = FrontendMemory(layout)
        fe = Frontend.connect(path, timeout=10.0)
        try:
            features = fe.handshake()
            if not event_idx:
                features &= ~VIRTIO_RING_F_EVENT_IDX
            fe.set_features(features)
            fe.set_mem_table(memory)
        except BaseException:
            fe.close()
            memory.close()
            raise
        return fe, memory, features

    @classmethod
    @contextmanager
    def open(
        cls,
        path: str,
        *,
        queues: Sequence[int] | range = (0,),
        size: int = 256,
        event_idx: bool = True,
        layout: tuple[RegionSpec, ...] = DEFAULT_LAYOUT,
    ) -> Iterator[BlkSession]:
        fe, memory, features = cls.connect(path, event_idx=event_idx, layout=layout)
        try:
            session = cls(fe, memory, {}, features)
            for q in queues:
                session.add_ring(q, size)
            yield session
        finally:
            fe.close()
            memory.close()

    def add_ring(self, q: int, size: int, *, base: int = 0) -> DriverRing:
        """Set up queue ``q``; ``base`` is where both free-running indices start (as after
        a migration or a backend reconnect, where they need not be 0)."""
        lay = ring_layout(q, size)
        ring = DriverRing(
            self.memory.mem,
            size,
            lay.desc,
            lay.avail,
            lay.used,
            indirect_area=(INDIRECT_AREA[0] + q * 0x8000, 0x8000),
        )
        if base:
            ring.avail_idx = base
            ring.set_avail_idx(base)
            self.memory.mem.write_u16(lay.used + 2, base)
            ring.last_used = base
        # Keep the low indices out of the driver's hands: raw chains own them.
        ring._take(min(RESERVED_DESCRIPTORS, size // 2))
        self.fe.setup_vring(
            q, self.memory, size=size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
        )
        self.rings[q] = ring
        return ring

    # -- memory ---------------------------------------------------------------------------

    def area(self, q: int) -> int:
        """Start of queue ``q``'s buffer area."""
        return 0x1000 + q * QUEUE_AREA

    def _pieces(self, gpa: int, n: int) -> list[tuple[int, int]]:
        """``[gpa, gpa+n)`` cut at region boundaries (adjacent regions are legal)."""
        out = []
        while n:
            spec = next(
                (
                    r
                    for r in self.memory.specs
                    if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.size
                ),
                None,
            )
            if spec is None:
                raise ValueError(f"{gpa:#x} is not guest memory")
            k = min(n, spec.guest_phys_addr + spec.size - gpa)
            out.append((gpa, k))
            gpa, n = gpa + k, n - k
        return out

    def put(self, gpa: int, data: bytes) -> int:
        pos = 0
        for at, k in self._pieces(gpa, len(data)):
            self.memory.mem.write_at(at, data[pos : pos + k])
            pos += k
        return gpa

    def get(self, gpa: int, n: int) -> bytes:
        return b"".join(self.memory.mem.read_at(at, k) for at, k in self._pieces(gpa, n))

    def header(self, gpa: int, kind: int, sector: int, reserved: int = 0) -> int:
        return self.put(gpa, REQ_HDR.pack(kind, reserved, sector))

    def status_at(self, gpa: int) -> int:
        """Arm a status byte with the sentinel; returns ``gpa``."""
        return self.put(gpa, bytes([STATUS_SENTINEL]))

    # -- the ring -------------------------------------------------------------------------

    def desc(self, q: int, index: int, gpa: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.rings[q].write_desc(index, gpa, length, flags, nxt)

    def push(self, q: int, head: int, *, kick: bool = True) -> None:
        self.rings[q].push_head(head)
        if kick:
            self.fe.kick(q)

    def kick(self, q: int) -> None:
        self.fe.kick(q)

    def wait_used(self, q: int, n: int = 1, timeout: float = 15.0) -> list[tuple[int, int]]:
        ring = self.rings[q]
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while True:
            out += ring.used_entries()
            if self.event_idx:
                ring.set_used_event(ring.last_used)
            if len(out) >= n:
                return out
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"queue {q}: {len(out)} of {n} used entries in {timeout}s"
            self.fe.wait_call(q, min(remaining, 0.25))

    def assert_no_used(self, q: int, wait: float = 0.5) -> None:
        ring = self.rings[q]
        before = ring.used_idx
        time.sleep(wait)
        assert ring.used_idx == before, "the device used entries of a broken queue"

    def request(
        self,
        q: int,
        kind: int,
        sector: int,
        data: bytes = b"",
        read_len: int = 0,
        *,
        indirect: bool = False,
        big: bool = False,
    ) -> Result:
        """A well-formed virtio-blk request: header, data, status; waits for its completion."""
        gpa = BIG_AREA[0] if big else self.area(q)
        hdr = self.header(gpa, kind, sector)
        bufs: list[tuple[int, int, bool]] = [(hdr, 16, False)]
        gpa += 16
        if data:
            bufs.append((self.put(gpa, data), len(data), False))
            gpa += len(data)
        rd = gpa
        if read_len:
            self.put(rd, b"\xee" * read_len)
            bufs.append((rd, read_len, True))
            gpa += read_len
        status = self.status_at(gpa)
        bufs.append((status, 1, True))
        head = self.rings[q].add_chain(bufs, indirect)
        self.fe.kick(q)
        used = self.wait_used(q)
        assert [h for h, _ in used] == [head], f"queue {q}: used {used}, expected head {head}"
        return Result(head, used[0][1], self.get(status, 1)[0], self.get(rd, read_len))

    def raw(self, q: int, head: int) -> tuple[int, int]:
        """Make ``head`` available, kick, and return its used element."""
        self.push(q, head)
        used = self.wait_used(q)
        assert len(used) == 1, used
        return used[0]
