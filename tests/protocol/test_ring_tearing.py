"""Ring indices are never torn: a second process watches them while the real serve process works.

A driver on another CPU loads used->idx (and, with EVENT_IDX, avail_event) at any instant. If
the device writes such a field with two stores, the driver can see the value between them: a
Linux guest then consumes a stale used entry ("id N is not a head!", or the wrong request
completed). CPython's ``struct.pack_into`` is such a pair (it zeroes the field, then stores it),
which is why every shared field goes through ``memory.shared``. The mirror direction is covered
too: the test's own driver stores avail->idx and used_event the same way, so the server never
sees a torn avail->idx (it would refuse the ring as more than a queue's worth ahead), and the
watcher checks those stores as well.

Each case pushes 100k requests through ``python -m blkdev.cli serve`` while
``tests.support.ring_watch`` polls from its own process; no invariant may break even once.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Final

import pytest

from tests.protocol.frontend import ring_layout
from tests.protocol.serve_process import (
    REPO,
    REQ_HDR,
    SECTOR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    BlkSession,
    ServeProcess,
)

REQUESTS: Final = 100_000
RING_SIZE: Final = 256
SLOT_BYTES: Final = 1024
"""Each in-flight request's header, data and status live in their own slot of the queue area."""

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    sp = ServeProcess(tmp_path_factory.mktemp("ring-tearing"), num_queues=1)
    yield sp
    assert sp.stop() == 0, sp.log_text()
    assert not sp.crash_lines(), "\n".join(sp.crash_lines())


def _file_offset(session: BlkSession, gpa: int) -> tuple[int, int]:
    """(memfd, offset in it) of guest address ``gpa``."""
    for fd, spec in zip(session.memory.fds, session.memory.specs, strict=True):
        if spec.guest_phys_addr <= gpa < spec.guest_phys_addr + spec.size:
            return fd, spec.mmap_offset + gpa - spec.guest_phys_addr
    raise AssertionError(f"{gpa:#x} is not guest memory")


def _start_watcher(session: BlkSession, event_idx: bool) -> subprocess.Popen[str]:
    lay = ring_layout(0, RING_SIZE)
    fd, avail_off = _file_offset(session, lay.avail)
    fd_used, used_off = _file_offset(session, lay.used)
    assert fd_used == fd, "the test layout keeps a ring in one region"
    return _watcher(fd, RING_SIZE, avail_off, used_off, event_idx, seconds=200)


def _watcher(
    fd: int, size: int, avail_off: int, used_off: int, event_idx: bool, *, seconds: float
) -> subprocess.Popen[str]:
    """``tests.support.ring_watch`` on ``fd``; EOF on its stdin stops it."""
    argv = [str(v) for v in (fd, size, avail_off, used_off, int(event_idx), seconds)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.ring_watch", *argv],
        cwd=REPO,
        pass_fds=(fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _drive(session: BlkSession, depth: int, total: int, timeout: float) -> None:
    """``total`` 512-byte reads, ``depth`` in flight, each completion's status checked."""
    ring = session.rings[0]
    mem = session.memory.mem
    base = session.area(0)
    slots = list(range(depth))
    status_of: dict[int, tuple[int, int]] = {}  # head -> (slot, status gpa)
    submitted = completed = 0
    deadline = time.monotonic() + timeout
    while completed < total:
        added = False
        while slots and submitted < total:
            slot = slots.pop()
            at = base + slot * SLOT_BYTES
            mem.write_at(at, REQ_HDR.pack(VIRTIO_BLK_T_IN, 0, slot))
            mem.write_at(at + 16 + SECTOR, b"\xff")
            head = ring.add_chain(
                [(at, 16, False), (at + 16, SECTOR, True), (at + 16 + SECTOR, 1, True)],
                publish=False,
            )
            status_of[head] = (slot, at + 16 + SECTOR)
            submitted += 1
            added = True
        if added:
            ring.publish()
            session.kick(0)
        used = ring.used_entries()
        if session.event_idx:
            ring.set_used_event(ring.last_used)
        if not used:
            assert time.monotonic() < deadline, (
                f"{completed} of {total} requests completed in {timeout}s"
            )
            session.fe.wait_call(0, 0.05)
            continue
        for head, length in used:
            slot, status = status_of.pop(head)
            assert length == SECTOR + 1, (head, length)
            assert mem.read_u16(status) & 0xFF == VIRTIO_BLK_S_OK
            slots.append(slot)
            completed += 1


@pytest.mark.parametrize(
    ("depth", "event_idx"),
    [(1, True), (32, True), (32, False)],
    ids=["qd1-event-idx", "qd32-event-idx", "qd32-flags"],
)
def test_ring_indices_never_torn_across_processes(
    server: ServeProcess, depth: int, event_idx: bool
) -> None:
    with BlkSession.open(server.socket, size=RING_SIZE, event_idx=event_idx) as session:
        watcher = _start_watcher(session, event_idx)
        try:
            # The watcher is polling once it has mapped the file; give it a moment to start.
            time.sleep(0.5)
            assert watcher.poll() is None, "the watcher exited early"
            _drive(session, depth, REQUESTS, timeout=180)
        finally:
            out, _ = watcher.communicate(timeout=30)  # EOF on its stdin stops it
        stats = json.loads(out)
    assert stats["used_moves"] > 1000, f"the watcher saw too little to judge: {stats}"
    broken = {k: v for k, v in stats.items() if k not in ("samples", "used_moves") and v}
    assert not broken, f"torn or impossible ring indices seen from another process: {stats}"


def test_watcher_catches_a_torn_store() -> None:
    """The check can fail: ``struct.pack_into`` stores, as the ring code once used, are seen
    torn by the same watcher within seconds."""
    size = RING_SIZE
    lay = ring_layout(0, size)
    fd = os.memfd_create("torn", os.MFD_CLOEXEC)
    try:
        length = lay.used + 6 + 8 * size
        os.ftruncate(fd, length)
        mm = mmap.mmap(fd, length)
        watcher = _watcher(fd, size, lay.avail, lay.used, False, seconds=60)
        try:
            time.sleep(0.5)
            u16 = struct.Struct("<H")
            avail = memoryview(mm).cast("H")
            deadline = time.monotonic() + 5
            idx = 0
            while time.monotonic() < deadline:
                for _ in range(10000):
                    idx = (idx + 1) & 0xFFFF
                    avail[lay.avail // 2 + 1] = idx  # avail->idx first, one store
                    u16.pack_into(mm, lay.used + 2, idx)  # used->idx: zeroed, then stored
                if watcher.poll() is not None:
                    break
            avail.release()
        finally:
            out, _ = watcher.communicate(timeout=30)
        mm.close()
    finally:
        os.close(fd)
    stats = json.loads(out)
    assert stats["used_back"] > 0, f"the watcher saw no torn store: {stats}"
