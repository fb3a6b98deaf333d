"""A real Linux guest (QEMU/TCG) doing I/O on a raw image served by our backend.

Every guest script ends with ``check_dmesg_clean``, and ``assert_vm_ok`` also scans the console,
so any request the kernel saw fail ("I/O error", "blk_update_request") fails the test.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from deploy.vm import BackendKind
from tests.integration.helpers import (
    DEFAULT_BACKEND,
    Harness,
    MiB,
    assert_backend_clean,
    assert_vm_ok,
    random_bytes,
)

pytestmark = pytest.mark.integration

DISK = 64 * MiB

# (offset, length, dd options): sector-aligned direct I/O of several request sizes, a buffered
# write at an offset that is not 4 KiB-aligned (the page cache read-modify-writes around it),
# and the last bytes of the disk.
WRITES = [
    (0, 64 * 1024, "bs=4096 oflag=direct"),
    (7 * 512, 3 * 512, "bs=512 oflag=direct,seek_bytes"),
    (5 * MiB + 512, 1 * MiB, "bs=65536 oflag=seek_bytes"),
    (33 * MiB - 2048, 260 * 1024, "bs=4096 oflag=direct,seek_bytes"),
    (DISK - 128 * 1024, 128 * 1024, "bs=131072 oflag=direct,seek_bytes"),
]
ZERO_PROBE = (40 * MiB, 1 * MiB)
PROBES = [(off, length) for off, length, _opts in WRITES] + [ZERO_PROBE]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pattern_script() -> str:
    lines = ["info size $(blockdev --getsize64 /dev/vda)"]
    for i, (off, _length, opts) in enumerate(WRITES):
        seek = off if "seek_bytes" in opts else off // int(opts.split()[0][3:])
        lines.append(
            f"check write{i} dd if=/data/p{i} of=/dev/vda {opts} seek={seek} conv=notrunc,fsync"
        )
    lines += ["sync", "echo 3 > /proc/sys/vm/drop_caches"]
    for i, (off, length) in enumerate(PROBES):
        lines.append(f"info read{i} $(sha_range bs=512 skip={off // 512} count={length // 512})")
    lines.append("check_dmesg_clean dmesg")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", sorted({DEFAULT_BACKEND, "qsd"}))
def test_pattern_writes_reach_image_and_read_back(harness: Harness, kind: BackendKind) -> None:
    """Differential: the same writes through our server and qemu-storage-daemon give the
    same, expected image bytes."""
    image = harness.image("disk.img", DISK)
    payloads = [random_bytes(i, length) for i, (_o, length, _f) in enumerate(WRITES)]
    backend = harness.serve(image, kind=kind)
    result = harness.run(
        _pattern_script(), backend, files={f"/data/p{i}": p for i, p in enumerate(payloads)}
    )
    assert_vm_ok(result, backend)
    assert result.info["size"] == str(DISK)

    expected = bytearray(DISK)
    for (off, length, _f), payload in zip(WRITES, payloads, strict=True):
        expected[off : off + length] = payload
    for i, (off, length) in enumerate(PROBES):
        assert result.info[f"read{i}"] == _sha(bytes(expected[off : off + length])), (
            f"guest read back different data at {off:#x}+{length:#x}\n" + result.report(backend)
        )
    backend.stop()
    actual = image.read_bytes()
    assert len(actual) == DISK
    for off, length, _f in WRITES:
        assert actual[off : off + length] == expected[off : off + length], (
            f"image differs at {off:#x}"
        )
    assert actual == bytes(expected), "image has bytes the guest did not write"
    assert_backend_clean(backend)


def test_fio_verify(harness: Harness) -> None:
    image = harness.image("disk.img", DISK)
    # qemu-storage-daemon has no serial option: check the serial with our server only.
    ours = DEFAULT_BACKEND == "ours"
    backend = harness.serve(image, serial="vub-fio-serial" if ours else None)
    fio = (
        "fio --name={n} --filename=/dev/vda --direct=1 --ioengine={e} --iodepth={d} "
        "--rw={rw} --bs{bs} --size=32M --offset={off} --verify=crc32c --verify_fatal=1 "
        "--randrepeat=0"
    )
    script = (
        "\n".join(
            [
                'expect_eq serial "$(cat /sys/block/vda/serial)" vub-fio-serial' if ours else "",
                "check fio_libaio_4k "
                + fio.format(n="a", e="libaio", d=8, rw="randwrite", bs="=4k", off="0"),
                "check fio_libaio_mixed "
                + fio.format(
                    n="b", e="libaio", d=8, rw="randwrite", bs="range=512-128k", off="32M"
                ),
                "check fio_psync "
                + fio.format(n="c", e="psync", d=1, rw="write", bs="=1M", off="0"),
                "check_dmesg_clean dmesg",
            ]
        )
        + "\n"
    )
    result = harness.run(script, backend)
    assert_vm_ok(result, backend)
    assert_backend_clean(backend)


def test_ext4_roundtrip(harness: Harness) -> None:
    image = harness.image("disk.img", DISK)
    backend = harness.serve(image)
    blob = random_bytes(7, 3 * MiB + 123)
    script = """
check mkfs mkfs.ext4 -q -F /dev/vda
check mount mount -t ext4 /dev/vda /mnt
check copy cp /data/blob /mnt/blob
mkdir -p /mnt/dir
i=0; while [ $i -lt 200 ]; do echo "file $i" > /mnt/dir/f$i; i=$((i + 1)); done
check sync sync
check umount umount /mnt
echo 3 > /proc/sys/vm/drop_caches
check fsck e2fsck -fn /dev/vda
check remount mount -t ext4 -o ro /dev/vda /mnt
info blob $(sha256sum /mnt/blob | cut -d' ' -f1)
expect_eq files "$(ls /mnt/dir | wc -l)" 200
expect_eq f123 "$(cat /mnt/dir/f123)" "file 123"
check umount2 umount /mnt
check_dmesg_clean dmesg
"""
    result = harness.run(script, backend, files={"/data/blob": blob})
    assert_vm_ok(result, backend)
    assert result.info["blob"] == _sha(blob)
    backend.stop()
    # The host agrees the file system is clean.
    fsck = os.system(f"e2fsck -fn {image} >/dev/null 2>&1")
    assert fsck == 0, f"host e2fsck -fn failed: {fsck:#x}"
    assert_backend_clean(backend)


def test_discard_zeroes_and_frees(harness: Harness) -> None:
    image = harness.image("disk.img", DISK)
    backend = harness.serve(image)
    data = random_bytes(3, 8 * MiB)
    script = f"""
info discard_max $(cat /sys/block/vda/queue/discard_max_bytes)
check write dd if=/data/d of=/dev/vda bs=1M seek=16 oflag=direct conv=notrunc
check discard blkdiscard -o {18 * MiB} -l {4 * MiB} /dev/vda
echo 3 > /proc/sys/vm/drop_caches
info hole $(sha_range bs=1M skip=18 count=4)
check_dmesg_clean dmesg
"""
    result = harness.run(script, backend, files={"/data/d": data})
    assert_vm_ok(result, backend)
    assert int(result.info["discard_max"]) > 0, "device does not advertise discard"
    assert result.info["hole"] == _sha(bytes(4 * MiB)), "guest reads non-zero after discard"
    backend.stop()
    with open(image, "rb") as f:
        img = f.read()
        assert img[16 * MiB : 18 * MiB] == data[: 2 * MiB]
        assert img[22 * MiB : 24 * MiB] == data[6 * MiB :]
        assert img[18 * MiB : 22 * MiB] == bytes(4 * MiB), "discarded range does not read zeros"
        # Discard frees the space: the range holds a hole.
        hole = os.lseek(f.fileno(), 18 * MiB, os.SEEK_HOLE)
        assert hole < 22 * MiB, "discarded range is still allocated in the image"
    assert_backend_clean(backend)
