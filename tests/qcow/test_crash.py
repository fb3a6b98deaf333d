"""kill -9 a process writing through QcowDisk at random points: qemu-img check finds no
corruption (leaks are allowed) and every write completed before a FLUSH reads back; with the
metadata journal in memory that outlives the process (``journal``), every completed write does,
once the next process replayed it."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blkdev.disks.qcow import QcowDisk, create_image
from blkdev.disks.qcow import journal as jnl
from tests.qcow.crash_worker import operations
from tests.qcow.helpers import MiB, qemu_check, qemu_img, read_all

SIZE = 2 * MiB
CS = 4096
ROOT = Path(__file__).resolve().parents[2]


def _expected(seed: int, base: bytes, flushed: int, begun: int) -> tuple[bytes, bytearray]:
    """The image's content after the operations up to ``flushed``, and a mask of the bytes
    that later operations (up to ``begun``) may have changed."""
    shadow = bytearray(base)
    mask = bytearray(SIZE)
    for i, (kind, off, n, data) in enumerate(operations(seed, SIZE)):
        if i > begun:
            break
        if i > flushed:
            mask[off : off + n] = b"\x01" * n
            continue
        if kind == "write":
            shadow[off : off + n] = data
        elif kind == "zeroes":
            shadow[off : off + n] = bytes(n)
        elif kind == "discard":
            a, b = -(-off // CS) * CS, (off + n) // CS * CS
            if b > a:
                shadow[a:b] = bytes(b - a)
    return bytes(shadow), mask


@pytest.mark.parametrize("backing", [False, True])
def test_kill9_leaves_consistent_image(tmp_path: Path, backing: bool) -> None:
    rnd = random.Random(int(backing))
    img = tmp_path / "c.qcow2"
    base = bytes(SIZE)
    if backing:
        base = random.Random(7).randbytes(SIZE)
        (tmp_path / "base.raw").write_bytes(base)
        create_image(str(img), SIZE, cluster_size=CS, backing_file="base.raw", backing_format="raw")
    else:
        create_image(str(img), SIZE, cluster_size=CS)
    for round_ in range(6):
        # Every round starts from what the previous crash left, leaks and all.
        seed = rnd.randrange(1 << 30)
        flat = tmp_path / "before.raw"
        qemu_img("convert", "-O", "raw", img, flat)
        before = flat.read_bytes()
        events = _run_and_kill(img, seed, rnd, None)
        flushed = max((int(e[1]) for e in events if e[0] == "FLUSHED"), default=-1)
        begun = max((int(e[1]) for e in events if e[0] == "BEGIN"), default=-1)
        assert begun > 5, f"round {round_}: the worker barely started ({events[-4:]})"
        report = qemu_check(img)
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
        expected, mask = _expected(seed, before, flushed, begun)
        disk = QcowDisk.open(str(img), read_only=True)
        try:
            got = read_all(disk)
        finally:
            disk.close()
        bad = [
            i
            for i in range(0, SIZE, 512)
            if not mask[i] and got[i : i + 512] != expected[i : i + 512]
        ]
        assert not bad, f"round {round_}: flushed data lost at {bad[:5]} (flushed op {flushed})"


def _run_and_kill(
    img: Path, seed: int, rnd: random.Random, journal_fd: int | None
) -> list[list[str]]:
    argv = [sys.executable, "-m", "tests.qcow.crash_worker", str(img), str(seed)]
    if journal_fd is not None:
        argv.append(str(journal_fd))
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        pass_fds=() if journal_fd is None else (journal_fd,),
    )
    # Kill at a random point of the workload, not of Python's start-up: on a loaded host the
    # interpreter alone can take longer than any fixed sleep.
    assert proc.stdout is not None
    started = b""
    while not started.endswith(b"BEGIN 5\n"):
        line = proc.stdout.readline()
        if not line:
            break
        started += line
    time.sleep(rnd.random() * 0.6)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return [line.split() for line in (started + out).decode().splitlines()]


@pytest.mark.parametrize("backing", [False, True])
def test_kill9_loses_no_completed_write_with_the_journal(tmp_path: Path, backing: bool) -> None:
    """The restart case (``vhost_user.ring.inflight`` keeps the memfd): each worker replays the
    journal its killed predecessor left, and every operation that returned reads back, flushed
    or not. The image is checked before the replay (consistent, as without a journal) and
    after it (consistent again: the replay wrote back what it recovered)."""
    rnd = random.Random(10 + int(backing))
    img = tmp_path / "j.qcow2"
    base = bytes(SIZE)
    if backing:
        base = random.Random(9).randbytes(SIZE)
        (tmp_path / "base.raw").write_bytes(base)
        create_image(str(img), SIZE, cluster_size=CS, backing_file="base.raw", backing_format="raw")
    else:
        create_image(str(img), SIZE, cluster_size=CS)
    fd = os.memfd_create("journal")
    os.ftruncate(fd, jnl.SIZE)
    unflushed_recovered = 0
    try:
        for round_ in range(6):
            seed = rnd.randrange(1 << 30)
            flat = tmp_path / "before.raw"
            qemu_img("convert", "-O", "raw", img, flat)
            before = flat.read_bytes()
            events = _run_and_kill(img, seed, rnd, fd)
            ended = max((int(e[1]) for e in events if e[0] == "END"), default=-1)
            flushed = max((int(e[1]) for e in events if e[0] == "FLUSHED"), default=-1)
            begun = max((int(e[1]) for e in events if e[0] == "BEGIN"), default=-1)
            assert begun > 5, f"round {round_}: the worker barely started ({events[-4:]})"
            report = qemu_check(img)
            assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
            expected, mask = _expected(seed, before, ended, begun)
            area = mmap.mmap(fd, jnl.SIZE)
            view = memoryview(area)
            disk = QcowDisk.open(str(img), read_only=False)
            try:
                disk.attach_journal(view)  # the replay
                got = read_all(disk)
            finally:
                disk.close()
                view.release()
                area.close()
            bad = [
                i
                for i in range(0, SIZE, 512)
                if not mask[i] and got[i : i + 512] != expected[i : i + 512]
            ]
            assert not bad, (
                f"round {round_}: completed data lost at {bad[:5]} (op {ended} ended, "
                f"{flushed} flushed)"
            )
            unflushed_recovered += ended > flushed
            report = qemu_check(img)
            assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
            flat.unlink()
    finally:
        os.close(fd)
    # Not vacuous: kills landed after writes that no flush covered, and those came back.
    assert unflushed_recovered >= 3, unflushed_recovered
