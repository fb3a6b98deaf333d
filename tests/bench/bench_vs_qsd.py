"""Our server versus qemu-storage-daemon: the same fio jobs in the same guest, A/B rounds.

    python tests/bench/bench_vs_qsd.py [--quick] [--format raw|qcow2|both] [--jobs 1,2]
                                       [--rounds N] [--runtime S] [--size-mib N] [--profile]

One guest boot per queue setting (``--jobs``: 1 = ``-smp 1``, ``num-queues=1``, ``numjobs=1``;
2 = ``-smp 2``, ``num-queues=2``, ``numjobs=2``). That guest has one vhost-user-blk disk per
(format, backend), each served by its own backend process from its own copy of the same image,
so both backends see the same guest, kernel and fio at the same moment. Every fio run goes to
one disk at a time; within a round each workload runs on ours and on qsd back to back, and the
order flips from run to run (ABBA), so drift on this noisy 2-core host hits both sides alike.
The table reports the median over rounds and ours/qsd, the figure that matters: the guest runs
under TCG, so absolute numbers are low.

Images are filled with random data (qcow2: ``qemu-img convert`` of that raw file, so every
cluster is allocated and writes overwrite in place) and sit in the host page cache; both
backends use it (ours: ``--cache writeback``; qsd: ``driver=file`` with ``cache.direct=off``).

``--profile`` samples our server with py-spy (``pip install py-spy``; must be on PATH) and
prints where its threads spend their time. Host-side figures without a guest (the Python
request path alone): ``python tests/bench/bench_raw.py`` and ``tests/bench/bench_qcow.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy import guest as guest_mod
from deploy.vm import Backend, BackendKind, VmResult, parse_markers, start_backend, terminate

BACKENDS: tuple[BackendKind, ...] = ("ours", "qsd")
FORMATS = ("raw", "qcow2")
FIRST_PCI_SLOT = 0x10


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    block_size: int
    iodepth: int

    @property
    def is_write(self) -> bool:
        return "write" in self.rw


WORKLOADS = (
    Workload("4k-randread", "randread", 4096, 16),
    Workload("4k-randwrite", "randwrite", 4096, 16),
    Workload("128k-seqread", "read", 128 << 10, 4),
    Workload("128k-seqwrite", "write", 128 << 10, 4),
)


@dataclasses.dataclass(frozen=True)
class Disk:
    """One guest disk: a backend serving one format, at a fixed PCI slot."""

    fmt: str
    kind: BackendKind
    slot: int

    @property
    def label(self) -> str:
        return f"{self.fmt}.{self.kind}"


@dataclasses.dataclass(frozen=True)
class Settings:
    formats: tuple[str, ...]
    jobs: tuple[int, ...]
    rounds: int
    runtime: float
    size_mib: int
    profile: bool
    keep: bool


def fio_command(w: Workload, device: str, jobs: int, size: int, s: Settings) -> list[str]:
    """The fio command run in the guest. With several jobs each covers its own slice of the
    disk (``offset_increment``), so sequential jobs do not read the same blocks."""
    part = size // jobs // w.block_size * w.block_size
    return [
        "fio",
        "--name=bench",
        f"--filename={device}",
        "--direct=1",
        "--ioengine=libaio",
        f"--rw={w.rw}",
        f"--bs={w.block_size // 1024}k",
        f"--iodepth={w.iodepth}",
        f"--numjobs={jobs}",
        f"--size={part}",
        *([f"--offset_increment={part}"] if jobs > 1 else []),
        "--group_reporting",
        "--time_based",
        f"--runtime={int(s.runtime * 1000)}ms",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=terse",
        "--terse-version=3",
    ]


# fio terse v3, 1-based: 5 error, 6 read KiB, 7 read KiB/s, 8 read IOPS,
# 47 write KiB, 48 write KiB/s, 49 write IOPS.
_TERSE_FIELDS = "$5, $6, $7, $8, $47, $48, $49"

GUEST_PRELUDE = r"""
# Disks by PCI slot: the host put each (format, backend) at a known slot.
disk_at() {
    for b in /sys/block/vd*; do
        case "$(readlink -f "$b")" in */0000:00:$1.0/*) echo "/dev/${b##*/}"; return;; esac
    done
}
i=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt NDISKS ] && [ $i -lt 100 ]; do
    usleep 100000; i=$((i + 1))
done
# bench KEY FIO-ARGS...: one fio run; its figures go to the host as @@INFO KEY. @@START
# KEY tells the host when it begins, so that it can charge its backend's CPU time to it.
bench() {
    _key=$1; shift
    echo "@@START $_key" > /dev/ttyS1
    _out=$("$@" 2>&1)
    _vals=$(echo "$_out" | awk -F';' 'NF > 100 { print FIELDS }')
    if [ -n "$_vals" ]; then
        info "$_key" "$_vals"
    else
        echo "$_out" | tail -n 5
        result "$_key" FAIL "$(echo "$_out" | tail -n 1)"
    fi
}
"""


def guest_script(disks: Sequence[Disk], jobs: int, size: int, s: Settings) -> str:
    lines = [
        GUEST_PRELUDE.replace("NDISKS", str(len(disks))).replace("FIELDS", _TERSE_FIELDS),
    ]
    for d in disks:
        lines.append(f"DEV_{d.fmt}_{d.kind}=$(disk_at {d.slot:02x})")
        lines.append(
            f'if [ -b "$DEV_{d.fmt}_{d.kind}" ]; then result disk.{d.label} PASS '
            f'"$DEV_{d.fmt}_{d.kind}"; else result disk.{d.label} FAIL missing; fi'
        )
    for r in range(s.rounds):
        for wi, w in enumerate(WORKLOADS):
            for fi, fmt in enumerate(s.formats):
                pair = [d for d in disks if d.fmt == fmt]
                # Who goes first alternates from round to round for each workload (ABBA), so
                # neither side always inherits the other's dirty page cache or warm state.
                if (r + wi + fi) % 2:
                    pair.reverse()
                for d in pair:
                    cmd = fio_command(w, f"$DEV_{d.fmt}_{d.kind}", jobs, size, s)
                    lines.append(f"bench r{r}.{d.label}.{w.name} {' '.join(cmd)}")
    lines.append("result bench PASS")
    return "\n".join(lines) + "\n"


# --- images and processes -------------------------------------------------------------------


def make_images(work: Path, size_mib: int, formats: Sequence[str]) -> dict[str, Path]:
    """A raw file of random data, and a fully allocated qcow2 copy of it (``qemu-img
    convert``) if wanted. Returns format -> master image; each backend gets its own copy."""
    raw = work / "master.raw"
    with open(raw, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    masters = {"raw": raw}
    if "qcow2" in formats:
        qcow = work / "master.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
        )
        masters["qcow2"] = qcow
    return masters


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # prctl(2): QEMU gets SIGKILL if this script dies, so no guest outlives a killed bench.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def qemu_argv(
    guest: guest_mod.Guest,
    initrd: Path,
    disks: Sequence[tuple[Disk, Path]],
    *,
    smp: int,
    num_queues: int,
    console: Path,
    markers: Path,
    memory_mib: int = 512,
) -> list[str]:
    """Like :func:`deploy.vm.qemu_command`, with several vhost-user-blk disks at fixed slots."""
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot",
        "-accel", os.environ.get("VUB_ACCEL", "tcg"), "-display", "none",
        "-smp", str(smp), "-m", f"{memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-numa", "node,memdev=mem",
        "-kernel", str(guest.kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 mitigations=off "
        "random.trust_cpu=on",
        "-serial", f"file:{console}", "-serial", f"file:{markers}",
    ]  # fmt: skip
    for i, (disk, sock) in enumerate(disks):
        argv += [
            "-chardev",
            f"socket,id=vub{i},path={sock}",
            "-device",
            f"vhost-user-blk-pci,chardev=vub{i},num-queues={num_queues},addr=0x{disk.slot:x}",
        ]
    return argv


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far (proc(5) stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_guest(
    argv: list[str],
    backends: Mapping[str, Backend],
    console: Path,
    markers: Path,
    qemu_log: Path,
    timeout: float,
    expected: int,
) -> tuple[VmResult, dict[str, float]]:
    """Run QEMU to completion (or ``timeout``), printing progress as fio results arrive.

    Also returns, per fio run, the CPU seconds its backend (``backends[label]``, the label
    being the run's key without round and workload) used between ``@@START key`` and the
    run's ``@@INFO key``: only one disk is busy at a time, so that is the run's cost.
    """
    start = time.monotonic()
    with open(qemu_log, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    timed_out = backend_died = False
    done = 0
    tty = sys.stdout.isatty()
    pos = 0
    pending = b""
    started: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def on_line(line: str) -> None:
        nonlocal done
        kind, _, rest = line.strip().partition(" ")
        key = rest.split(" ", 1)[0]
        if kind not in ("@@START", "@@INFO") or key.count(".") != 3:
            return
        backend = backends[".".join(key.split(".")[1:3])]
        if kind == "@@START":
            started[key] = cpu_seconds(backend.proc.pid)
            return
        if key in started:
            cpu[key] = cpu_seconds(backend.proc.pid) - started[key]
        done += 1
        if tty or done == expected or done % 8 == 0:
            print(
                ("\r" if tty else "") + f"    {done}/{expected} fio runs, "
                f"{time.monotonic() - start:4.0f}s",
                end="" if tty else "\n",
                flush=True,
            )

    def follow() -> None:
        nonlocal pos, pending
        with contextlib.suppress(FileNotFoundError), open(markers, "rb") as f:
            f.seek(pos)
            data = f.read()
            pos += len(data)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace"))

    try:
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                timed_out = True
                break
            if any(not b.alive() for b in backends.values()):
                backend_died = True
                break
            follow()
            time.sleep(0.05)
        follow()
    finally:
        terminate(proc, grace=2.0)
    if tty:
        print()
    result = VmResult(
        qemu_returncode=None if timed_out or backend_died else proc.returncode,
        timed_out=timed_out,
        backend_died=backend_died,
        duration=time.monotonic() - start,
        console_path=console,
        qemu_log_path=qemu_log,
    )
    with contextlib.suppress(FileNotFoundError):
        parse_markers(markers.read_text(errors="replace"), result)
    return result, cpu


# --- py-spy ---------------------------------------------------------------------------------


@contextlib.contextmanager
def py_spy(pid: int, out: Path) -> Iterator[None]:
    """Sample ``pid`` (all threads, idle samples dropped) into collapsed stacks at ``out``."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
         "--output", str(out), "--threads", "--nonblocking"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield
    finally:
        # py-spy writes its output when interrupted.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def summarise_profile(path: Path, top: int = 15) -> None:
    """Self and inclusive sample counts per function, from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        print(f"    (no profile written to {path})")
        return
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        names = []
        for frame in stack.split(";")[1:]:  # the first entry names the thread
            m = _FRAME.match(frame)
            if m is None:
                names.append(frame)
                continue
            file = m.group("file")
            short = "/".join(Path(file).parts[-2:]) if file else ""
            names.append(f"{m.group('func')} ({short})")
        if not names:
            continue
        total += count
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
    if not total:
        print("    (no busy samples)")
        return
    # py-spy counts a thread as busy when the kernel says it is runnable: on a host with
    # more runnable threads than cores that includes waiting for a core, which inflates
    # calls that wake another process (eventfd_write to QEMU). The CPU column of the table,
    # from the kernel's accounting, is the cost figure; this says where, roughly.
    print(f"    {total} busy samples (200 Hz, all threads, runnable incl. waiting for a core)")
    print(f"    {'self %':>7} {'incl %':>7}  function")
    for name, n in self_counts.most_common(top):
        print(f"    {100 * n / total:7.1f} {100 * incl_counts[name] / total:7.1f}  {name}")
    print("    top inclusive:")
    shown = [(name, n) for name, n in incl_counts.most_common() if "threading.py" not in name]
    for name, n in shown[:top]:
        print(f"    {'':7} {100 * n / total:7.1f}  {name}")


# --- one queue setting ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One fio run's figures; ``cpu_us`` is the backend's CPU time per request (µs)."""

    iops: float
    mib_s: float
    cpu_us: float | None


Samples = dict[tuple[str, int, str, BackendKind], dict[int, Run]]
"""(format, queues, workload, backend) -> round -> figures."""


def run_setting(
    guest: guest_mod.Guest,
    masters: dict[str, Path],
    jobs: int,
    s: Settings,
    work: Path,
    samples: Samples,
) -> bool:
    disks = [
        Disk(fmt, kind, FIRST_PCI_SLOT + i)
        for i, (fmt, kind) in enumerate((f, k) for f in s.formats for k in BACKENDS)
    ]
    size = s.size_mib << 20
    script = guest_script(disks, jobs, size, s)
    expected = s.rounds * len(WORKLOADS) * len(disks)
    d = work / f"jobs{jobs}"
    d.mkdir()
    (d / "test.sh").write_text(script)
    backends: dict[str, Backend] = {}
    with contextlib.ExitStack() as stack:
        socks: list[tuple[Disk, Path]] = []
        for disk in disks:
            image = d / f"{disk.label}.img"
            shutil.copyfile(masters[disk.fmt], image)
            sock = d / f"{disk.label}.sock"
            backend = stack.enter_context(
                start_backend(
                    disk.kind,
                    socket=sock,
                    image=image,
                    log_path=d / f"{disk.label}.log",
                    fmt=disk.fmt,
                    num_queues=jobs,
                    serial=disk.label,
                )
            )
            backends[disk.label] = backend
            socks.append((disk, sock))
            print(f"    {disk.label:<10} {' '.join(backend.argv)}")
        if s.profile:
            for disk in disks:
                if disk.kind == "ours":
                    pid = backends[disk.label].proc.pid
                    stack.enter_context(py_spy(pid, d / f"{disk.label}.pyspy"))
        initrd = guest.with_script(script, d / "initrd.cpio")
        console, markers = d / "console.log", d / "markers.log"
        argv = qemu_argv(
            guest, initrd, socks, smp=jobs, num_queues=jobs, console=console, markers=markers
        )
        timeout = 120 + 3 * expected * (s.runtime + 2.0 * jobs)
        result, cpu = run_guest(argv, backends, console, markers, d / "qemu.log", timeout, expected)
        initrd.unlink()
        for b in backends.values():
            b.stop()
    ok = result.booted and result.done_rc == 0 and not result.failures()
    if not ok:
        print(result.report(), file=sys.stderr)
        for label, b in backends.items():
            print(f"--- {label} log ---\n{b.log_tail(10)}", file=sys.stderr)
    for key, value in result.info.items():
        round_text, fmt, kind_text, wname = key.split(".")
        kind: BackendKind = "ours" if kind_text == "ours" else "qsd"
        fields = value.split()
        if len(fields) != 7 or fields[0] != "0":
            print(f"    {key}: fio error: {value}", file=sys.stderr)
            ok = False
            continue
        rkib, rbw, riops, wkib, wbw, wiops = (float(x) for x in fields[1:])
        w = next(w for w in WORKLOADS if w.name == wname)
        io_kib, iops, bw = (wkib, wiops, wbw) if w.is_write else (rkib, riops, rbw)
        requests = io_kib * 1024 / w.block_size
        cpu_us = 1e6 * cpu[key] / requests if key in cpu and requests else None
        per_round = samples.setdefault((fmt, jobs, wname, kind), {})
        per_round[int(round_text[1:])] = Run(iops, bw / 1024, cpu_us)
    if s.profile:
        for disk in disks:
            if disk.kind == "ours":
                print(f"\n  py-spy, our server, {disk.fmt}, {jobs} queue(s):")
                summarise_profile(d / f"{disk.label}.pyspy")
    return ok


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(samples: Samples, s: Settings) -> None:
    print(
        f"\nmedian of {s.rounds} round(s) of {s.runtime:g}s fio runs. ratio = ours/qsd IOPS "
        "(>1: ours faster), with the min..max of the per-round ratios.\n"
        "CPU = backend process CPU time (all threads) per request, µs; CPU ratio = ours/qsd."
    )
    header = (
        f"{'format':<6} {'q':>1} {'workload':<13} {'ours IOPS':>9} {'qsd IOPS':>9} "
        f"{'ours MiB/s':>10} {'qsd MiB/s':>9} {'ratio':>5} {'(range)':>11} "
        f"{'ours CPU':>8} {'qsd CPU':>7} {'CPU ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for fmt in s.formats:
        for jobs in s.jobs:
            for w in WORKLOADS:
                ours = samples.get((fmt, jobs, w.name, "ours"), {})
                qsd = samples.get((fmt, jobs, w.name, "qsd"), {})
                if not ours or not qsd:
                    print(f"{fmt:<6} {jobs:>1} {w.name:<13} (missing)")
                    continue
                oi = statistics.median(r.iops for r in ours.values())
                qi = statistics.median(r.iops for r in qsd.values())
                om = statistics.median(r.mib_s for r in ours.values())
                qm = statistics.median(r.mib_s for r in qsd.values())
                oc = _median([r.cpu_us for r in ours.values()])
                qc = _median([r.cpu_us for r in qsd.values()])
                # The two runs of one round are adjacent in time, so per-round ratios cancel
                # most of the host's drift; their spread says how far to trust the median.
                ratios = [ours[i].iops / qsd[i].iops for i in ours if i in qsd and qsd[i].iops]
                spread = f"{min(ratios):.2f}..{max(ratios):.2f}" if ratios else "-"
                cpu_ratio = oc / qc if oc is not None and qc else None
                print(
                    f"{fmt:<6} {jobs:>1} {w.name:<13} {oi:9.0f} {qi:9.0f} {om:10.1f} {qm:9.1f} "
                    f"{oi / qi if qi else float('nan'):5.2f} {spread:>11} "
                    f"{_fmt(oc, '8.1f')} {_fmt(qc, '7.1f')} {_fmt(cpu_ratio, '9.2f')}"
                )


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--format", choices=("raw", "qcow2", "both"), default="both")
    parser.add_argument(
        "--jobs", default="1,2", help="queue settings, comma separated (default 1,2)"
    )
    parser.add_argument("--rounds", type=int, help="A/B rounds (default 5; --quick 2)")
    parser.add_argument("--runtime", type=float, help="seconds per fio run (default 5; quick 1)")
    parser.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--profile", action="store_true", help="py-spy our server")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    try:
        jobs = tuple(int(j) for j in args.jobs.split(","))
    except ValueError:
        parser.error(f"--jobs {args.jobs!r}: give numbers such as 1,2")
    if not jobs or any(not 1 <= j <= 8 for j in jobs):
        parser.error("--jobs: each between 1 and 8")
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    runtime = args.runtime if args.runtime is not None else (1.0 if args.quick else 5.0)
    if rounds < 1 or runtime <= 0:
        parser.error("--rounds and --runtime must be positive")
    return Settings(
        formats=FORMATS if args.format == "both" else (args.format,),
        jobs=jobs,
        rounds=rounds,
        runtime=runtime,
        size_mib=args.size_mib,
        profile=args.profile,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    start = time.monotonic()
    guest = guest_mod.ensure_built()
    work = Path(tempfile.mkdtemp(prefix="vub-bench-", dir="/tmp"))
    ok = True
    samples: Samples = {}
    try:
        masters = make_images(work, s.size_mib, s.formats)
        print(
            f"{s.size_mib} MiB images of random data ({', '.join(s.formats)}), "
            f"{s.rounds} round(s) x {len(WORKLOADS)} workloads, queue settings {s.jobs}"
        )
        for jobs in s.jobs:
            print(f"\n== {jobs} queue(s): -smp {jobs}, num-queues={jobs}, numjobs={jobs}")
            print("  fio in the guest (DEV = the disk under test):")
            for w in WORKLOADS:
                cmd = fio_command(w, "DEV", jobs, s.size_mib << 20, s)
                print(f"    {w.name:<14} {' '.join(cmd)}")
            print("  backends:")
            ok = run_setting(guest, masters, jobs, s, work, samples) and ok
        print_table(samples, s)
        print(
            "\nhost-side, no guest: python tests/bench/bench_raw.py (BlkDevice.handle_chain), "
            "tests/bench/bench_qcow.py (Disk layer)"
        )
        print(f"total {time.monotonic() - start:.0f}s" + ("" if ok else ", WITH ERRORS"))
    finally:
        if s.keep or not ok:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
