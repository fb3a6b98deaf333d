"""Live migration for real: QEMU A on backend A, QEMU B (``-incoming``) on backend B
(``serve --incoming``), the same raw or qcow2 image. The guest runs fio with crc32c
verification (reads checked as they land in guest memory, which is what dirty logging protects)
while A migrates to B and B migrates back to a third QEMU on backend A; the guest finishes
there, the verify passes, the image changed hands each time (handed over when the rings stopped
under dirty logging, taken when they started), and qemu-img check finds the qcow2 clean.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from deploy.vm import (
    Qmp,
    VmResult,
    console_lines,
    parse_markers,
    qemu_command,
    spawn_qemu,
    terminate,
)
from tests.integration.helpers import Harness, MiB, assert_backend_clean

pytestmark = pytest.mark.integration

DISK = 64 * MiB
MIGRATE_TIMEOUT = 180.0
RUN_TIMEOUT = 300.0

FIO = (
    "fio --name=mig --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 "
    "--rw=randwrite --bs=4k --size=24M --verify=crc32c --verify_fatal=1 --verify_backlog=16 "
    "--randrepeat=0 --loops=12"
)


def _script() -> str:
    return (
        "\n".join(
            [
                f"{FIO} > /tmp/fio.log 2>&1 &",
                "pid=$!",
                "sleep 3",
                "echo MIGRATE-NOW",
                'if wait "$pid"; then result fio_verify PASS; '
                'else tail -n 20 /tmp/fio.log; result fio_verify FAIL "fio failed"; fi',
                "grep -E 'verify|err=' /tmp/fio.log | head -n 5",
                "check_dmesg_clean dmesg",
            ]
        )
        + "\n"
    )


def _wait_for(what: str, predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _migrate(source: Qmp, destination: Qmp, uri: str) -> None:
    source.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    source.execute("migrate", uri=uri)

    def completed() -> bool:
        info = source.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        assert status not in ("failed", "cancelled"), info
        return status == "completed"

    _wait_for("the migration", completed, MIGRATE_TIMEOUT)
    running = destination.execute("query-status")
    assert isinstance(running, dict) and running.get("running"), running
    source.execute("quit")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_migrate_a_verifying_guest_there_and_back(harness: Harness, fmt: str) -> None:
    """A -> B -> C, where C is a third QEMU on backend A again (``--incoming`` is only for a
    backend that starts as a destination: A, released, takes the image back when C's rings
    start)."""
    image = harness.image("disk.img", DISK)
    if fmt == "qcow2":
        qcow = harness.workdir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(image), str(qcow)], check=True, timeout=60
        )
        image = qcow
    source = harness.serve(image, kind="ours", fmt=fmt)
    destination = harness.serve(image, kind="ours", fmt=fmt, extra_args=["--incoming"])
    work = harness.workdir
    sock = harness.sockdir
    initrd = harness.guest.with_script(_script(), work / "initrd.cpio")
    migration = sock / "mig.sock"

    def qemu(name: str, backend_socket: Path, extra: list[str]) -> list[str]:
        return qemu_command(
            harness.guest,
            initrd,
            socket=backend_socket,
            console_path=work / f"{name}-console.log",
            markers_path=work / f"{name}-markers.log",
            extra=["-qmp", f"unix:{sock / (name + '.qmp')},server=on,wait=off", *extra],
        )

    qemu_a = spawn_qemu(qemu("a", source.socket, []), work / "a-qemu.log")
    qemu_b = spawn_qemu(
        qemu("b", destination.socket, ["-incoming", f"unix:{migration}"]), work / "b-qemu.log"
    )
    qemu_c: subprocess.Popen[bytes] | None = None
    qmps: list[Qmp] = []
    try:
        qmp_a = Qmp(sock / "a.qmp")
        qmp_b = Qmp(sock / "b.qmp")
        qmps += [qmp_a, qmp_b]
        read_a = console_lines(work / "a-console.log")
        _wait_for(
            "the guest to start fio",
            lambda: any("MIGRATE-NOW" in ln for ln in read_a()),
            RUN_TIMEOUT,
        )
        _migrate(qmp_a, qmp_b, f"unix:{migration}")
        back = sock / "back.sock"
        qemu_c = spawn_qemu(
            qemu("c", source.socket, ["-incoming", f"unix:{back}"]), work / "c-qemu.log"
        )
        qmp_c = Qmp(sock / "c.qmp")
        qmps.append(qmp_c)
        _migrate(qmp_b, qmp_c, f"unix:{back}")
        # The guest finishes its script on C and powers off, which ends QEMU C.
        proc_c = qemu_c
        _wait_for("the guest to finish on C", lambda: proc_c.poll() is not None, RUN_TIMEOUT)
    finally:
        for qmp in qmps:
            qmp.close()
        for proc in (qemu_a, qemu_b, qemu_c):
            if proc is not None:
                terminate(proc, 5)
    assert qemu_c is not None
    result = VmResult(
        qemu_returncode=qemu_c.returncode,
        timed_out=False,
        backend_died=False,
        duration=0.0,
        console_path=work / "c-console.log",
        qemu_log_path=work / "c-qemu.log",
    )
    markers = "".join((work / f"{name}-markers.log").read_text(errors="replace") for name in "abc")
    parse_markers(markers, result)
    assert result.ok, (
        result.report(destination)
        + "\n--- source console ---\n"
        + (work / "a-console.log").read_text(errors="replace")[-3000:]
    )
    source.stop()
    destination.stop()
    assert_backend_clean(source)
    assert_backend_clean(destination)
    events_a = {r.get("event") for r in source.log_records()}
    events_b = {r.get("event") for r in destination.log_records()}
    for events in (events_a, events_b):
        assert "dirty logging on" in events
        assert "image handed over: closed until a ring starts again" in events
        assert "image taken over" in events
    if fmt == "qcow2":
        check = subprocess.run(
            ["qemu-img", "check", str(image)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
