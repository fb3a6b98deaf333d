"""Stress under a real guest: concurrent writes, verify and discards on two queues from two
vCPUs against qcow2 overlays (64k, 4k and 512-byte clusters) and raw; and a server killed
(SIGKILL) or stopped (SIGTERM) in the middle of checkpointed qcow2 writes.

Each run ends with a host-side check of what the guest saw: the guest prints the sha256 of
every MiB it reads back with O_DIRECT, the host computes the same from the image after the
server has exited (``qemu-img convert`` for qcow2), and ``qemu-img check`` must find the qcow2
image clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from deploy.vm import run_vm
from tests.integration.helpers import (
    Harness,
    MiB,
    assert_backend_clean,
    assert_vm_ok,
    random_bytes,
)

pytestmark = pytest.mark.integration

DISK = 40 * MiB
KiB = 1 << 10

# Regions of the workload (bytes). The two fio jobs meet at 8M+2k: with 4k or 64k clusters
# the cluster holding the boundary is written from both queues at once, and every job-A
# block straddles two 4k clusters. [0, 2k) and [16M-2k, 16M) are never written.
A_OFF, A_LEN = 2 * KiB, 8 * MiB
B_OFF, B_LEN = 8 * MiB + 2 * KiB, 8 * MiB - 4 * KiB
# [16M, 24M): dd writes, unaligned discards and write-zeroes (blkdiscard [-z]) in a loop;
# [24M, 32M): fio randtrim then trimwrite. [32M, 36M): one 2k block in two from each vCPU
# (fio strided zones), so both queues allocate, copy-on-write and fill the same clusters at
# the same time.
# [36M, 40M): untouched (must still read as the base / initial data).
C_KIB = (16 * 1024, 24 * 1024)
D_OFF, D_LEN = 24 * MiB, 8 * MiB
E_OFF, E_IO = 32 * MiB, 2 * MiB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _qemu_img(*args: str, ok_codes: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode in ok_codes, f"qemu-img {' '.join(args)}: rc={proc.returncode}\n" + (
        proc.stdout + proc.stderr
    )
    return proc.stdout


def _check(image: Path, *, leaks_ok: bool) -> dict[str, object]:
    """``qemu-img check``: rc 0 clean, 3 leaks only, 2 corruption, 1 could not check."""
    out = _qemu_img("check", "--output=json", str(image), ok_codes=(0, 3) if leaks_ok else (0,))
    result: dict[str, object] = json.loads(out)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    if not leaks_ok:
        assert result.get("leaks", 0) == 0, result
    return result


def _flatten(harness: Harness, image: Path, fmt: str) -> bytes:
    if fmt == "raw":
        return image.read_bytes()
    flat = harness.workdir / f"{image.stem}-flat.raw"
    _qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(flat))
    data = flat.read_bytes()
    flat.unlink()
    return data


def _workload_script() -> str:
    fio = (
        "fio --direct=1 --ioengine=libaio --iodepth=8 --filename=/dev/vda --randrepeat=0 "
        "--verify=crc32c --verify_fatal=1"
    )
    # --fsync: a FLUSH every 32 writes, so metadata write-back races the other queue's
    # allocations.
    rand = "--rw=randwrite --bssplit=4k/50:16k/20:64k/20:128k/10 --fsync=32"
    trim = (
        "fio --direct=1 --ioengine=libaio --iodepth=8 --filename=/dev/vda --randrepeat=0 "
        f"--bsrange=4k-192k --offset={D_OFF} --size={D_LEN}"
    )
    # Strided zones: 2k written, 2k skipped, sequentially; fio's --size counts bytes written.
    strided = f"--rw=write --bs=2k --zonemode=strided --zonesize=2k --zoneskip=2k --size={E_IO}"
    c_lo, c_hi = C_KIB
    return f"""
expect_eq cpus "$(nproc)" 2
expect_eq hw_queues "$(ls /sys/block/vda/mq | wc -l)" 2
# The third job, on whichever CPU is free: in [16M, 24M), small direct writes, discards and
# write-zeroes of any 512-byte-aligned range, interleaved; then fio trims and trim+writes
# [24M, 32M).
# util-linux's, by path: the shell would pick busybox's applet, which has no -z.
BLKDISCARD=/usr/sbin/blkdiscard
discards() {{
    i=0
    while [ $i -lt 24 ]; do
        o=$(( {c_lo} + RANDOM % {c_hi - c_lo - 320} ))
        n=$(( RANDOM % 256 + 1 ))
        dd if=/dev/urandom of=/dev/vda bs=1k seek=$o count=$n oflag=direct conv=notrunc \
            2>/dev/null || {{ echo "dd $o $n failed"; return 1; }}
        s=$(( {c_lo * 2} + RANDOM % {(c_hi - c_lo) * 2 - 600} ))
        n=$(( RANDOM % 512 + 1 ))
        $BLKDISCARD -o $(( s * 512 )) -l $(( n * 512 )) /dev/vda \
            || {{ echo "blkdiscard $s $n failed"; return 1; }}
        s=$(( {c_lo * 2} + RANDOM % {(c_hi - c_lo) * 2 - 600} ))
        n=$(( RANDOM % 512 + 1 ))
        $BLKDISCARD -z -o $(( s * 512 )) -l $(( n * 512 )) /dev/vda \
            || {{ echo "blkdiscard -z $s $n failed"; return 1; }}
        # Zeroed (unlike discarded) sectors must read as zeros, not as the backing file.
        [ "$(sha_range bs=512 skip=$s count=$n)" = \
          "$(head -c $(( n * 512 )) /dev/zero | sha256sum | cut -d' ' -f1)" ] \
            || {{ echo "write-zeroes $s $n reads back non-zero"; return 1; }}
        i=$((i + 1))
    done
    {trim} --name=trim --rw=randtrim || return 1
    {trim} --name=trimwrite --rw=trimwrite || return 1
}}
( taskset -c 0 {fio} --name=a {rand} --offset={A_OFF} --size={A_LEN} \
    --name=a2 {strided} --offset={E_OFF} > /tmp/a.log 2>&1
  echo $? > /tmp/rc_a ) &
( taskset -c 1 {fio} --name=b {rand} --offset={B_OFF} --size={B_LEN} \
    --name=b2 {strided} --offset={E_OFF + 2 * KiB} > /tmp/b.log 2>&1
  echo $? > /tmp/rc_b ) &
( discards > /tmp/c.log 2>&1; echo $? > /tmp/rc_c ) &
wait
for j in a b c; do
    if [ "$(cat /tmp/rc_$j)" = 0 ]; then tail -n 4 /tmp/$j.log; else cat /tmp/$j.log; fi
done
expect_eq fio_a "$(cat /tmp/rc_a)" 0
expect_eq fio_b "$(cat /tmp/rc_b)" 0
expect_eq discards "$(cat /tmp/rc_c)" 0
check sync sync
i=0
while [ $i -lt {DISK // MiB} ]; do
    info m$i "$(sha_range bs=1M skip=$i count=1)"
    i=$((i + 1))
done
check_dmesg_clean dmesg
"""


def _compare_mibs(guest_info: dict[str, str], data: bytes, initial: bytes) -> None:
    assert len(data) == DISK
    bad = [
        i
        for i in range(DISK // MiB)
        if guest_info.get(f"m{i}") != _sha(data[i * MiB : (i + 1) * MiB])
    ]
    assert not bad, f"image MiBs {bad} differ from what the guest read back"
    # What no job touched is still the initial content.
    for lo, hi in ((0, A_OFF), (B_OFF + B_LEN, 16 * MiB), (E_OFF + 2 * E_IO, DISK)):
        assert data[lo:hi] == initial[lo:hi], f"untouched [{lo}, {hi}) changed"
    # fio verified its own regions in the guest; they were really written.
    for off in (A_OFF, B_OFF, E_OFF, E_OFF + 2 * E_IO - 4 * KiB):
        assert data[off : off + 4 * KiB] != initial[off : off + 4 * KiB], f"{off} not written"


def _run_workload(harness: Harness, image: Path, fmt: str, initial: bytes) -> None:
    backend = harness.serve(image, fmt=fmt, num_queues=2)
    result = harness.run(_workload_script(), backend, smp=2, num_queues=2)
    assert_vm_ok(result, backend)
    rc = backend.stop()
    assert rc == 0, f"server exit code {rc} on SIGTERM\n{backend.log_tail()}"
    if fmt == "qcow2":
        _check(image, leaks_ok=False)
    _compare_mibs(result.info, _flatten(harness, image, fmt), initial)
    assert_backend_clean(backend)


@pytest.mark.parametrize("cluster_size", [65536, 4096, 512])
def test_qcow2_overlay_two_queues_write_verify_discard(harness: Harness, cluster_size: int) -> None:
    initial = random_bytes(41, DISK)
    raw = harness.image("base.raw", DISK, {0: initial})
    base = harness.workdir / "base.qcow2"
    overlay = harness.workdir / "overlay.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    _qemu_img(
        "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
        "-b", str(base), "-F", "qcow2", str(overlay),
    )  # fmt: skip
    base_sha = _sha(base.read_bytes())
    _run_workload(harness, overlay, "qcow2", initial)
    assert _sha(base.read_bytes()) == base_sha, "the backing file was modified"


def test_raw_two_queues_write_verify_discard(harness: Harness) -> None:
    initial = random_bytes(42, DISK)
    image = harness.image("disk.img", DISK, {0: initial})
    _run_workload(harness, image, "raw", initial)


# --- SIGKILL in the middle of checkpointed writes ----------------------------------------------

CHUNK = 41 * 512  # not a multiple of any cluster size: every chunk is a partial-cluster write
SLOT0 = 50  # chunk slots start at 50 * CHUNK (about 1M) ...
N_SLOTS = 700  # ... and end below 16M, where the background writer works
N_CHUNKS = 400
KILL_AFTER = 12  # checkpoints seen on the console before the server is killed


def _slot_offset(i: int) -> int:
    """Where chunk ``i`` (from 1) goes: scattered, so that chunks need new L2 tables too."""
    return (SLOT0 + (i * 97) % N_SLOTS) * CHUNK


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_qcow2_server_killed_keeps_synced_data(harness: Harness, sig: signal.Signals) -> None:
    """SIGKILL: no corruption (leaks allowed), every checkpointed chunk present, and a new
    server carries on. SIGTERM (stop gracefully while the guest writes): also no leak."""
    size = 24 * MiB
    initial = random_bytes(43, size)
    raw = harness.image("base.raw", size, {0: initial})
    base = harness.workdir / "base.qcow2"
    overlay = harness.workdir / "overlay.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    _qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=4096",
        "-b", str(base), "-F", "qcow2", str(overlay),
    )  # fmt: skip
    chunks = random_bytes(44, N_CHUNKS * CHUNK)
    backend = harness.serve(overlay, fmt="qcow2", num_queues=2)
    # `conv=fsync` is an fsync of /dev/vda, which the guest turns into a FLUSH; the marker is
    # printed only after it returned. Meanwhile fio keeps the other queue busy allocating,
    # freeing and reallocating clusters in [16M, 24M) (random writes and discards); the
    # chunks start once it has written something.
    script = f"""
( taskset -c 1 fio --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --offset={16 * MiB} --size={8 * MiB} --time_based --runtime=600 \
    --name=bg --rw=randwrite --bssplit=4k/60:64k/40 \
    --name=bgtrim --rw=randtrim --bsrange=4k-64k > /tmp/bg.log 2>&1 ) &
info write_cache "$(cat /sys/block/vda/queue/write_cache)"
writes() {{ awk '{{print $5}}' /sys/block/vda/stat; }}
w0=$(writes); n=0
while [ $(( $(writes) - w0 )) -lt 100 ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
info bg_writes $(( $(writes) - w0 ))
i=1
while [ $i -le {N_CHUNKS} ]; do
    taskset -c 0 dd if=/data/chunks of=/dev/vda bs={CHUNK} skip=$((i - 1)) \
        seek=$(( {SLOT0} + (i * 97) % {N_SLOTS} )) count=1 oflag=direct conv=notrunc,fsync \
        2>/dev/null || break
    info ckpt $i
    info flushes "$(awk '{{print $16}}' /sys/block/vda/stat)"
    i=$((i + 1))
done
"""
    seen: list[int] = []

    def on_line(line: str) -> None:
        if "@@INFO ckpt " in line and backend.alive():
            seen.append(int(line.rsplit(" ", 1)[1]))
            if len(seen) >= KILL_AFTER:
                os.killpg(backend.proc.pid, sig)

    result = run_vm(
        harness.guest,
        script,
        socket=backend.socket,
        workdir=harness.workdir,
        backend=backend,
        smp=2,
        num_queues=2,
        files={"/data/chunks": chunks},
        timeout=90,
        on_console_line=on_line,
    )
    assert result.booted, result.report(backend)
    assert len(seen) >= KILL_AFTER, "server was never killed\n" + result.report(backend)
    rc = backend.proc.wait(10)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), backend.log_tail()
    # A write-through device would owe durability per write, not per FLUSH: this test is
    # about the write-back contract.
    assert result.info.get("write_cache") == "write back", result.info
    last = int(result.info["ckpt"])  # the last marker that made it out
    assert last >= KILL_AFTER
    assert int(result.info["flushes"]) >= last, "the guest sent no FLUSH per checkpoint"
    assert int(result.info["bg_writes"]) >= 100, "the background writer never started"
    _check(overlay, leaks_ok=sig == signal.SIGKILL)
    data = _flatten(harness, overlay, "qcow2")
    lost = [
        i
        for i in range(1, last + 1)
        if data[_slot_offset(i) : _slot_offset(i) + CHUNK] != chunks[(i - 1) * CHUNK : i * CHUNK]
    ]
    assert not lost, f"chunks {lost} were synced (checkpoint {last} printed) but are lost"
    # Outside the chunks and the background writer's region, the base shows through.
    written = bytearray(16 * MiB)
    for i in range(1, N_CHUNKS + 1):
        written[_slot_offset(i) : _slot_offset(i) + CHUNK] = b"\1" * CHUNK
    untouched = [o for o in range(0, 16 * MiB, 512) if not written[o]]
    assert all(data[o : o + 512] == initial[o : o + 512] for o in untouched)
    if sig == signal.SIGTERM:
        assert_backend_clean(backend)
        return

    # A new server opens the killed image: the guest reads the synced chunks back, and new
    # allocating writes (over whatever the kill leaked) leave the image consistent.
    backend2 = harness.serve(overlay, fmt="qcow2")
    script2 = f"""
i=1
while [ $i -le {last} ]; do
    info c$i "$(sha_range bs={CHUNK} skip=$(( {SLOT0} + (i * 97) % {N_SLOTS} )) count=1)"
    i=$((i + 1))
done
check fio fio --name=again --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randwrite --bssplit=4k/60:64k/40 --offset={16 * MiB} --size={8 * MiB} \
    --verify=crc32c --verify_fatal=1 --fsync=16
check_dmesg_clean dmesg
"""
    result2 = harness.run(script2, backend2, name="vm2")
    assert_vm_ok(result2, backend2)
    bad = [
        i
        for i in range(1, last + 1)
        if result2.info.get(f"c{i}") != _sha(chunks[(i - 1) * CHUNK : i * CHUNK])
    ]
    assert not bad, f"after a restart the guest read chunks {bad} wrong"
    assert backend2.stop() == 0, backend2.log_tail()
    _check(overlay, leaks_ok=True)
    assert_backend_clean(backend2)
