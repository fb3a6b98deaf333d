"""Multi-queue, read-only export, and several guests in turn on one server process."""

from __future__ import annotations

import hashlib

import pytest

from tests.integration.helpers import (
    Harness,
    MiB,
    assert_backend_clean,
    assert_vm_ok,
    random_bytes,
)

pytestmark = pytest.mark.integration

DISK = 64 * MiB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_two_queues_two_vcpus(harness: Harness) -> None:
    image = harness.image("disk.img", DISK)
    backend = harness.serve(image, num_queues=2)
    fio = (
        "fio --name=q{cpu} --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 "
        "--rw=randwrite --bs=4k --size=16M --offset={off} --verify=crc32c --verify_fatal=1"
    )
    script = f"""
expect_eq cpus "$(nproc)" 2
expect_eq hw_queues "$(ls /sys/block/vda/mq | wc -l)" 2
# Interrupt count of request queue $1, summed over both CPUs' columns.
irqs() {{
    grep -E 'virtio[0-9]+-req\\.'$1 /proc/interrupts | awk '{{print $2 + $3}}'
}}
info irq0_before "$(irqs 0)"
info irq1_before "$(irqs 1)"
( taskset -c 0 {fio.format(cpu=0, off="0")} > /tmp/fio0.log 2>&1; echo $? > /tmp/rc0 ) &
( taskset -c 1 {fio.format(cpu=1, off="16M")} > /tmp/fio1.log 2>&1; echo $? > /tmp/rc1 ) &
wait
tail -n 3 /tmp/fio0.log /tmp/fio1.log
expect_eq fio_cpu0 "$(cat /tmp/rc0)" 0
expect_eq fio_cpu1 "$(cat /tmp/rc1)" 0
grep -E 'virtio[0-9]+-req' /proc/interrupts
info irq0 "$(irqs 0)"
info irq1 "$(irqs 1)"
check_dmesg_clean dmesg
"""
    result = harness.run(script, backend, smp=2, num_queues=2)
    assert_vm_ok(result, backend)
    for q in (0, 1):
        used = int(result.info[f"irq{q}"] or 0) - int(result.info[f"irq{q}_before"] or 0)
        assert used > 0, f"queue {q} completed no request\n" + result.report(backend)
    assert_backend_clean(backend)


def test_read_only_export(harness: Harness) -> None:
    content = random_bytes(11, 1 * MiB)
    image = harness.image("disk.img", DISK, {0: content})
    before = _sha(image.read_bytes())
    backend = harness.serve(image, read_only=True)
    script = """
expect_eq getro "$(blockdev --getro /dev/vda)" 1
check_fails dd_direct dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc
check_fails dd_buffered dd if=/dev/zero of=/dev/vda bs=4096 seek=100 count=1 conv=notrunc,fsync
info head $(sha_range bs=1M count=1)
check_fails mkfs mkfs.ext4 -q -F /dev/vda
"""
    result = harness.run(script, backend)
    assert_vm_ok(result, backend)
    assert result.info["head"] == _sha(content)
    backend.stop()
    assert _sha(image.read_bytes()) == before, "read-only image changed"
    assert_backend_clean(backend)


def test_second_vm_after_first_quits(harness: Harness) -> None:
    """One server process, two QEMUs in turn: the second sees what the first wrote."""
    image = harness.image("disk.img", DISK)
    backend = harness.serve(image)
    first = random_bytes(21, 2 * MiB)
    second = random_bytes(22, 2 * MiB)
    write = """
check write dd if=/data/x of=/dev/vda bs=1M seek={seek} oflag=direct conv=notrunc
check_dmesg_clean dmesg
"""
    r1 = harness.run(write.format(seek=4), backend, name="vm1", files={"/data/x": first})
    assert_vm_ok(r1, backend)
    assert backend.alive(), "server exited after the first VM quit\n" + backend.log_tail()
    script2 = (
        """
info first $(sha_range bs=1M skip=4 count=2)
check write dd if=/data/x of=/dev/vda bs=1M seek=8 oflag=direct conv=notrunc
check mkfs mkfs.ext4 -q -F -E offset="""
        + str(16 * MiB)
        + """ /dev/vda 16M
check_dmesg_clean dmesg
"""
    )
    r2 = harness.run(script2, backend, name="vm2", files={"/data/x": second})
    assert_vm_ok(r2, backend)
    assert r2.info["first"] == _sha(first), "second VM did not see the first VM's write"
    assert backend.alive(), "server exited after the second VM quit\n" + backend.log_tail()
    rc = backend.stop()
    assert rc is not None, "server did not exit on SIGTERM (had to be killed)"
    data = image.read_bytes()
    assert data[4 * MiB : 6 * MiB] == first
    assert data[8 * MiB : 10 * MiB] == second
    assert data[16 * MiB + 1080 : 16 * MiB + 1082] == b"\x53\xef", "no ext4 superblock at 16M"
    assert_backend_clean(backend)
