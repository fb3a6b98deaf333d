"""A backend killed with requests popped and not completed (issue 11's protocol test): a real
process serving a device that holds some requests on purpose, out of order with the ones it
completes, is SIGKILLed; the next process, handed the same inflight area, resubmits exactly the
held ones, once each, in the order they were popped, and the ring goes on from the right avail
index. The front-end is the tests' Python one, doing what QEMU does on reconnection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.protocol.frontend import (
    BUFFERS_GPA,
    Driver,
    Frontend,
    FrontendMemory,
    make_driver,
    ring_layout,
)
from tests.protocol.serve_process import REPO
from vhost_user.protocol import codec

QSIZE = 64


def _start(sock: Path, hold: str | None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.protocol.hold_server", str(sock)]
    if hold is not None:
        argv.append(hold)
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening", "hold_server did not start"
    return proc


def _connect(sock: Path, memory: FrontendMemory, area: tuple[int, int], base: int) -> Frontend:
    """QEMU's sequence with an inflight area it already holds: SET_INFLIGHT_FD, then the ring
    from ``base`` (after a crash QEMU can only give the used index)."""
    fe = Frontend.connect(str(sock))
    features = fe.handshake()
    assert fe.protocol_features & codec.ProtocolFeature.INFLIGHT_SHMFD
    fe.call(codec.SetInflightFd(area[1], 0, 1, QSIZE, area[0]))
    fe.set_features(features)
    fe.set_mem_table(memory)
    lay = ring_layout(0, QSIZE)
    fe.setup_vring(
        0, memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
    )
    return fe


def _wait_used(driver: Driver, n: int, timeout: float = 10.0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {got} of {n} came back"
        got += driver.used()
        time.sleep(0.01)
    return got


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    running: list[subprocess.Popen[str]] = []
    yield running
    for p in running:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_requests_held_at_a_kill_are_resubmitted_exactly_once(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    sock = tmp_path / "hold.sock"
    memory = FrontendMemory()
    procs.append(_start(sock, "HOLD"))
    fe = Frontend.connect(str(sock))
    fe.handshake()
    reply = fe.request(codec.GetInflightFd(0, 0, 1, QSIZE))
    assert isinstance(reply, codec.InflightReply)
    area = (reply.fd, reply.mmap_size)
    fe.close()
    try:
        fe = _connect(sock, memory, area, 0)
        driver = make_driver(memory.mem, ring_layout(0, QSIZE), event_idx=True)
        texts = [b"HOLD0", b"ok1", b"HOLD2", b"ok3", b"ok4", b"HOLD5"]
        heads = []
        for i, text in enumerate(texts):
            rd, wr = BUFFERS_GPA + 0x200 * i, BUFFERS_GPA + 0x200 * i + 0x100
            memory.mem.write_at(rd, text)
            heads.append(driver.add([(rd, len(text), False), (wr, 0x100, True)]))
        fe.kick(0)
        done = _wait_used(driver, 3)
        assert sorted(done) == sorted((heads[i], len(texts[i])) for i in (1, 3, 4))
        time.sleep(0.2)
        assert driver.used() == [], "a held request completed"
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        fe.close()

        procs.append(_start(sock, None))
        used_idx = 3  # what QEMU reads from the used ring and sends as the base
        fe = _connect(sock, memory, area, used_idx)
        resubmitted = _wait_used(driver, 3)
        assert resubmitted == [(heads[i], len(texts[i])) for i in (0, 2, 5)]  # pop order, once
        for i in (0, 2, 5):
            assert memory.mem.read_at(BUFFERS_GPA + 0x200 * i + 0x100, 5) == texts[i].upper()
        time.sleep(0.2)
        assert driver.used() == [], "a request came back twice"
        # The ring goes on from the right place: avail index 6, not the base QEMU sent.
        rd, wr = BUFFERS_GPA + 0x200 * 7, BUFFERS_GPA + 0x200 * 7 + 0x100
        memory.mem.write_at(rd, b"after")
        head = driver.add([(rd, 5, False), (wr, 0x100, True)])
        fe.kick(0)
        assert _wait_used(driver, 1) == [(head, 5)]
        assert fe.get_vring_base(0) == 7
        fe.close()
    finally:
        os.close(area[0])
        memory.close()
