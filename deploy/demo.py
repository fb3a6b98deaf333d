"""End-to-end demo: a Linux guest in QEMU doing real I/O on a disk served by ``vhost-user-blk``.

    python -m deploy.demo [--backend ours|qsd] [--verbose] [--keep]

Steps: build (or reuse) the guest, make a sparse raw image, start the server, boot QEMU (TCG),
run fio randrw with verification on /dev/vda, then mkfs.ext4 + mount + write files + umount +
fsck, shut down, check the image on the host, and summarise the server's log. Exit 0 on success.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy import guest as guest_mod
from deploy.vm import Backend, BackendError, BackendKind, run_vm, start_backend

WORKLOAD = r"""
echo "disk: /dev/vda $(blockdev --getsize64 /dev/vda) bytes, ro=$(blockdev --getro /dev/vda), \
queues=$(ls /sys/block/vda/mq | wc -l), serial=$(cat /sys/block/vda/serial 2>/dev/null)"
check fio_randrw fio --name=demo --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randrw --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --group_reporting
check mkfs mkfs.ext4 -q -F /dev/vda
check mount mount -t ext4 /dev/vda /mnt
i=0; while [ $i -lt 50 ]; do seq 1 $((i * 100)) > /mnt/file$i; i=$((i + 1)); done
check write_big dd if=/dev/urandom of=/mnt/big bs=1M count=8
sha=$(sha256sum /mnt/big | cut -d' ' -f1)
echo "files written: $(ls /mnt | wc -l), big sha256 $sha"
check umount umount /mnt
echo 3 > /proc/sys/vm/drop_caches
check remount mount -t ext4 -o ro /dev/vda /mnt
expect_eq readback "$(sha256sum /mnt/big | cut -d' ' -f1)" "$sha"
check umount_ro umount /mnt
check fsck e2fsck -fn /dev/vda
check_dmesg_clean no_io_errors
"""

_SHOW = ("+ ", "@@", "disk:", "files written", "READ:", "WRITE:", "EXT4-fs", "I/O error")


class Demo:
    def __init__(self, verbose: bool) -> None:
        self.start = time.monotonic()
        self.verbose = verbose
        self.step_start = self.start

    def step(self, msg: str) -> None:
        now = time.monotonic()
        self.step_start = now
        print(f"\n[{now - self.start:6.1f}s] == {msg}", flush=True)

    def note(self, msg: str) -> None:
        print(f"          {msg}", flush=True)

    def done(self, msg: str = "done") -> None:
        print(f"          {msg} ({time.monotonic() - self.step_start:.1f}s)", flush=True)

    def console_line(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        if text.startswith("@@RESULT"):
            _, name, status, *rest = [*text.split(" ", 3), ""]
            mark = "ok  " if status == "PASS" else "FAIL"
            print(f"   guest {mark} {name} {' '.join(rest).strip()}", flush=True)
        elif self.verbose or text.startswith(_SHOW):
            print(f"   guest | {text}", flush=True)


def summarise_log(backend: Backend, demo: Demo) -> None:
    records = backend.log_records()
    if not records:
        demo.note(f"log: {backend.log_path} ({backend.log_path.stat().st_size} bytes, not JSON)")
        for line in backend.log_tail(10).splitlines():
            demo.note(f"  {line}")
        return
    levels = collections.Counter(str(r.get("level", "?")) for r in records)
    events = collections.Counter(str(r.get("event", "?")) for r in records)
    demo.note(f"{len(records)} log lines: " + ", ".join(f"{n} {lv}" for lv, n in levels.items()))
    for event, n in events.most_common(8):
        demo.note(f"  {n:4d} x {event}")
    for r in records:
        if str(r.get("level")) in ("warning", "error", "critical"):
            demo.note(
                f"  {r.get('level')}: {r.get('event')} "
                + " ".join(
                    f"{k}={v}" for k, v in r.items() if k not in ("level", "event", "timestamp")
                )
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__)
    parser.add_argument(
        "--backend",
        choices=("ours", "qsd"),
        default="ours",
        help="ours (vhost-user-blk serve) or qsd (qemu-storage-daemon reference)",
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument("--num-queues", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=420.0, help="VM hard timeout (s)")
    parser.add_argument(
        "--accel", default="tcg", help="QEMU accelerator (tcg; kvm only where it works)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show every console line")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    kind: BackendKind = args.backend
    demo = Demo(args.verbose)

    demo.step("guest: Debian kernel + busybox initramfs")
    try:
        g = guest_mod.ensure_built(progress=demo.note)
    except guest_mod.GuestBuildError as e:
        print(f"cannot build the guest: {e}", file=sys.stderr)
        return 1
    demo.done(f"kernel {g.kernel_version}")

    work = Path(tempfile.mkdtemp(prefix="vub-demo-", dir="/tmp"))
    ok = False
    try:
        demo.step(f"image: {args.size_mib} MiB sparse raw file")
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(args.size_mib << 20)
        demo.done(str(image))

        name = "vhost-user-blk serve" if kind == "ours" else "qemu-storage-daemon"
        demo.step(f"backend: {name}")
        socket = work / "vhost.sock"
        try:
            backend = start_backend(
                kind,
                socket=socket,
                image=image,
                log_path=work / "server.log",
                fmt="raw",
                num_queues=args.num_queues,
                serial="demo-disk",
            )
        except BackendError as e:
            print(str(e), file=sys.stderr)
            return 1
        with backend:
            demo.note(" ".join(backend.argv))
            demo.done(f"listening on {socket} (pid {backend.proc.pid})")

            demo.step(
                f"QEMU ({args.accel.upper()}, {args.smp} vCPUs, vhost-user-blk-pci num-queues="
                f"{args.num_queues}) running the workload"
            )
            result = run_vm(
                g,
                WORKLOAD,
                socket=socket,
                workdir=work,
                backend=backend,
                smp=args.smp,
                num_queues=args.num_queues,
                timeout=args.timeout,
                accel=args.accel,
                on_console_line=demo.console_line,
            )
            demo.done(result.summary())

            demo.step("server shutdown (SIGTERM)")
            rc = backend.stop()
            demo.done(f"exit code {rc}" if rc is not None else "had to be killed")
            summarise_log(backend, demo)

        demo.step("host-side check of the image (e2fsck -fn)")
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        for line in fsck.stdout.strip().splitlines()[-1:]:
            demo.note(line)
        demo.done("clean" if fsck.returncode == 0 else f"e2fsck exit {fsck.returncode}")

        ok = result.ok and fsck.returncode == 0
        if not result.ok:
            print("\n" + result.report(backend), file=sys.stderr)
        print(
            f"\n[{time.monotonic() - demo.start:6.1f}s] demo {'PASSED' if ok else 'FAILED'}"
            + (f" (files kept in {work})" if args.keep or not ok else "")
        )
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
