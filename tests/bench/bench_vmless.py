"""Ours against qemu-storage-daemon with no VM, side by side in one run (issue 10's table).

    python tests/bench/bench_vmless.py [--seconds 3] [--size-mib 1024] [--json]

Both backends serve a copy of the same raw image (warm in the page cache, or O_DIRECT rows:
``--cache none`` against ``cache.direct=on``), both started fresh per cache mode; each profile
runs A B B A (ours, qsd, qsd, ours) through ``vhost-user-blk bench`` (the C loop, busy-polling
one core), and the table shows the mean of each pair, the ratio, and each backend's CPU per I/O
(utime + stime of its whole process). The host is shared and noisy: only figures of one run
compare. The last row drives two queues at QD32, for the scaling target (ours: one thread per
queue; qemu-storage-daemon serves every queue of an export from one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blkdev import bench

REPO = Path(__file__).resolve().parents[2]
PROFILES = [
    # (label, rw, bs, iodepth, queues, direct)
    ("4k randread QD1, page cache", "randread", 4096, 1, 1, False),
    ("4k randread QD32, page cache", "randread", 4096, 32, 1, False),
    ("4k randwrite QD32, page cache", "randwrite", 4096, 32, 1, False),
    ("128k randread QD8, page cache", "randread", 128 << 10, 8, 1, False),
    ("4k randread QD32, O_DIRECT", "randread", 4096, 32, 1, True),
    ("4k randread QD32 x2 queues, page cache", "randread", 4096, 32, 2, False),
]


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"backend for {path} did not start")
        time.sleep(0.05)


def start_ours(image: Path, sock: Path, direct: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "blkdev.cli", "serve", "--socket", str(sock), "--image"]
    argv += [str(image), "--format", "raw", "--num-queues", "2", "--log-level", "warning"]
    argv += ["--cache", "none" if direct else "writeback"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(sock, proc)
    return proc


def start_qsd(image: Path, sock: Path, direct: bool) -> subprocess.Popen[bytes]:
    direct_opt = "on" if direct else "off"
    argv = [
        shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=f,filename={image},cache.direct={direct_opt},aio=io_uring",
        "--export",
        f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on,"
        "num-queues=2",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(sock, proc)
    return proc


def measure(sock: Path, pid: int, profile: tuple[object, ...], seconds: float) -> bench.Report:
    _, rw, bs, depth, queues, _ = profile
    assert isinstance(rw, str) and isinstance(bs, int) and isinstance(depth, int)
    assert isinstance(queues, int)
    opts = bench.Options(
        str(sock), rw=rw, bs=bs, iodepth=depth, queues=queues, seconds=seconds, pid=pid
    )
    return bench.run(opts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        ours_img, qsd_img = work / "ours.img", work / "qsd.img"
        with open(ours_img, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        shutil.copyfile(ours_img, qsd_img)
        # Written back before anything is measured: a write to a page still under writeback
        # waits for it (stable pages), which would charge the setup to whoever runs first.
        for img in (ours_img, qsd_img):
            fd = os.open(img, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        for direct in (False, True):
            profiles = [p for p in PROFILES if p[5] == direct]
            ours = start_ours(ours_img, work / f"ours{int(direct)}.sock", direct)
            qsd = start_qsd(qsd_img, work / f"qsd{int(direct)}.sock", direct)
            try:
                ours_sock = work / f"ours{int(direct)}.sock"
                qsd_sock = work / f"qsd{int(direct)}.sock"
                for p in profiles:
                    o1 = measure(ours_sock, ours.pid, p, args.seconds)
                    q1 = measure(qsd_sock, qsd.pid, p, args.seconds)
                    q2 = measure(qsd_sock, qsd.pid, p, args.seconds)
                    o2 = measure(ours_sock, ours.pid, p, args.seconds)
                    rows.append((p[0], (o1, o2), (q1, q2)))
            finally:
                for proc in (ours, qsd):
                    proc.terminate()
                    proc.wait(10)
    table = []
    for label, o, q in rows:
        oi = (o[0].iops + o[1].iops) / 2
        qi = (q[0].iops + q[1].iops) / 2
        oc = [r.backend_cpu_us_per_io or 0.0 for r in o]
        qc = [r.backend_cpu_us_per_io or 0.0 for r in q]
        table.append(
            {
                "profile": label,
                "qsd_iops": qi,
                "ours_iops": oi,
                "ratio": oi / qi if qi else 0.0,
                "qsd_cpu_us": sum(qc) / 2,
                "ours_cpu_us": sum(oc) / 2,
            }
        )
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print("| profile | qemu-storage-daemon | ours | ours / qsd | CPU/IO qsd | CPU/IO ours |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(
            f"| {r['profile']} | {r['qsd_iops']:,.0f} IOPS | {r['ours_iops']:,.0f} | "
            f"{r['ratio']:.2f}x | {r['qsd_cpu_us']:.1f} us | {r['ours_cpu_us']:.1f} us |"
        )


if __name__ == "__main__":
    main()
