"""Build a tiny Linux guest for integration tests: a Debian kernel plus a busybox initramfs.

The guest is cached under ``${XDG_CACHE_HOME:-~/.cache}/vhost-user-blk/guest/<kernel-version>/``
with a stamp recording what went into it, so a second ``build`` is instant.

Layout of the initramfs (newc cpio, written here in Python so that device nodes such as
``/dev/console`` need no root and the archive is byte-for-byte reproducible):

- ``/bin/busybox`` (static) and a symlink per applet;
- the virtio/ext4 kernel modules, decompressed, loaded by ``/init`` in dependency order;
- fio, mkfs.ext4, e2fsck, blkdiscard with their shared libraries and the dynamic loader;
- ``/init``: mounts proc/sys/dev, loads modules, runs ``/test.sh`` (if present) and powers off.

A per-test script is *appended* as a second cpio archive (the kernel unpacks concatenated
archives in order, later entries overriding earlier ones), see :func:`with_script`.

Guest scripts report results with ``result NAME PASS|FAIL [detail]`` (defined in
``/lib/testlib.sh``), which prints ``@@RESULT ...`` both on the console (``ttyS0``, mixed with
kernel messages, for people) and on ``ttyS1``, a second serial port that carries nothing else,
so the host parses markers that kernel messages can never interleave with.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

BUILDER_VERSION = 4

#: Modules ``/init`` loads; their dependencies (from each module's modinfo) come first.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

#: Host executables copied into the guest (with their ``ldd`` libraries).
GUEST_TOOLS = ("fio", "mkfs.ext4", "e2fsck", "blkdiscard")

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt /dev/pts
mount -t tmpfs tmpfs /tmp
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "@@INIT insmod $mod failed"
done < /etc/guest-modules
stty -F /dev/ttyS1 raw -echo 2>/dev/null
echo "@@BOOTED $(uname -r) cpus=$(nproc)" | tee /dev/ttyS1
rc=127
if [ -f /test.sh ]; then
    # The disk appears asynchronously after virtio_blk probes; give it a moment.
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    sh -c '. /lib/testlib.sh; . /test.sh'
    rc=$?
fi
sync
echo "@@DONE $rc" | tee /dev/ttyS1
poweroff -f
"""

TESTLIB = r"""# Helpers for guest test scripts (sourced before /test.sh).
# result NAME PASS|FAIL [detail...]: one marker line on the console and on ttyS1.
result() {
    _name=$1; _status=$2; shift 2
    _line="@@RESULT $_name $_status $*"
    echo "$_line"
    echo "$_line" > /dev/ttyS1
}
# info KEY VALUE...: a value for the host to read (e.g. a checksum).
info() {
    _key=$1; shift
    _line="@@INFO $_key $*"
    echo "$_line"
    echo "$_line" > /dev/ttyS1
}
# check NAME CMD...: run CMD; PASS if it exits 0, FAIL (with its output's tail) otherwise.
check() {
    _name=$1; shift
    echo "+ $*"
    if _out=$("$@" 2>&1); then
        [ -n "$_out" ] && echo "$_out" | tail -n 5
        result "$_name" PASS
    else
        _rc=$?
        [ -n "$_out" ] && echo "$_out" | tail -n 20
        result "$_name" FAIL "rc=$_rc: $(echo "$_out" | tail -n 1)"
    fi
}
# check_fails NAME CMD...: PASS if CMD exits non-zero.
check_fails() {
    _name=$1; shift
    echo "+ (expect failure) $*"
    if _out=$("$@" 2>&1); then
        [ -n "$_out" ] && echo "$_out" | tail -n 5
        result "$_name" FAIL "unexpectedly succeeded"
    else
        _rc=$?
        [ -n "$_out" ] && echo "$_out" | tail -n 3
        result "$_name" PASS "rc=$_rc"
    fi
}
# sha_range DD-ARGS...: sha256 of what O_DIRECT reads of /dev/vda return (bs=, skip=, count=).
sha_range() {
    dd if=/dev/vda "$@" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
# expect_eq NAME ACTUAL EXPECTED
expect_eq() {
    if [ "$2" = "$3" ]; then result "$1" PASS "$2"; else result "$1" FAIL "got '$2' want '$3'"; fi
}
IO_ERROR_PATTERN='I/O error|blk_update_request|Buffer I/O|critical medium error|EXT4-fs error'
# check_dmesg_clean NAME: no block-layer I/O errors logged by the kernel.
check_dmesg_clean() {
    _bad=$(dmesg | grep -E "$IO_ERROR_PATTERN" | head -n 5)
    if [ -z "$_bad" ]; then
        result "$1" PASS
    else
        echo "$_bad"
        result "$1" FAIL "$(echo "$_bad" | head -n 1)"
    fi
}
"""


class GuestBuildError(RuntimeError):
    """The guest could not be built (missing host tool, apt failure, ...)."""


@dataclasses.dataclass(frozen=True)
class Guest:
    """A built guest: kernel image and base initramfs."""

    kernel: Path
    initrd: Path
    kernel_version: str

    def with_script(
        self, script: str, dest: Path, files: Mapping[str, bytes] | None = None
    ) -> Path:
        """Write ``dest`` = base initramfs + a cpio holding ``/test.sh`` (and ``files``, by
        absolute guest path, e.g. test data); returns ``dest``."""
        return append_script(self.initrd, script, dest, files)


# --- newc cpio writer ---------------------------------------------------------------------

_NEWC_MAGIC = b"070701"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Minimal newc ("SVR4 no CRC") writer, as the kernel's initramfs unpacker reads it."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        # newc header: 13 fields of 8 hex digits, in this order. nlink=1 everywhere, so the
        # unpacker never tries to hard-link entries that happen to share an inode number.
        fields = {
            "ino": self._ino, "mode": mode, "uid": 0, "gid": 0, "nlink": 1, "mtime": 0,
            "filesize": len(data), "devmajor": 0, "devminor": 0,
            "rdevmajor": rdev[0], "rdevminor": rdev[1], "namesize": len(encoded), "check": 0,
        }  # fmt: skip
        self._ino += 1
        header = _NEWC_MAGIC + b"".join(b"%08X" % v for v in fields.values())
        self._chunks += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._chunks + trailer._chunks)


def script_cpio(script: str, files: Mapping[str, bytes] | None = None) -> bytes:
    """A cpio archive holding ``/test.sh`` and ``files`` (guest path -> content)."""
    w = CpioWriter()
    dirs: set[str] = set()
    for path in sorted(files or {}):
        parent = str(Path(path.lstrip("/")).parent)
        parts = parent.split("/") if parent != "." else []
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                w.directory(d)
        w.file(path, (files or {})[path])
    w.file("test.sh", script.encode(), 0o755)
    return w.getvalue()


def append_script(
    base_initrd: Path, script: str, dest: Path, files: Mapping[str, bytes] | None = None
) -> Path:
    """Concatenate ``base_initrd`` and a small cpio with ``script`` as ``/test.sh``."""
    with open(dest, "wb") as out, open(base_initrd, "rb") as base:
        shutil.copyfileobj(base, out, 1 << 20)
        out.write(script_cpio(script, files))
    return dest


# --- building -------------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vhost-user-blk" / "guest"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found: install it (deploy/setup.sh does)") from e
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def resolve_kernel_package() -> str:
    """The versioned package ``linux-image-amd64`` depends on (override: $GUEST_KERNEL_PKG)."""
    override = os.environ.get("GUEST_KERNEL_PKG")
    if override:
        return override
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestBuildError(
        "apt-cache knows no dependency of linux-image-amd64; run `apt-get update` first"
    )


def _find_tool(name: str) -> Path:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    if found is None:
        raise GuestBuildError(f"{name} not found on this host: install it (deploy/setup.sh does)")
    return Path(found)


def _ldd_libs(binary: Path) -> list[Path]:
    """Shared libraries ``binary`` needs (including the dynamic loader), as absolute paths."""
    # ldd exits 1 for a static binary ("not a dynamic executable"): then there is nothing.
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", path.name).replace("-", "_")


def _module_depends(data: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` section (NUL-separated key=value)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if m is None or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def _module_order(modules_dir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """``(name, decompressed .ko)`` for ``wanted`` and their dependencies, dependencies first.

    The package ships no ``modules.dep`` (depmod makes it at install time), so dependencies
    come from each module's own ``.modinfo``; built-in modules need nothing loaded.
    """
    index = {_module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*")}
    builtin = set()
    builtin_list = modules_dir / "modules.builtin"
    if builtin_list.exists():
        builtin = {_module_name(Path(line)) for line in builtin_list.read_text().split()}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise GuestBuildError(f"kernel module {name} not found under {modules_dir}")
        data = _read_module(path)
        for dep in _module_depends(data):
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        import zstandard

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(data)
    return data


def _tool_fingerprint(paths: Iterable[Path]) -> list[str]:
    out = []
    for p in sorted(set(paths)):
        st = p.stat()
        out.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
    return out


def _inputs_digest(pkg: str, tool_paths: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "builder": BUILDER_VERSION,
                "pkg": pkg,
                "modules": GUEST_MODULES,
                "tools": _tool_fingerprint([*tool_paths, Path("/bin/busybox")]),
                "init": INIT_SCRIPT,
                "testlib": TESTLIB,
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.exists():
            return p
    raise GuestBuildError("busybox not found: install busybox-static")


def build(progress: Callable[[str], None] = lambda _msg: None, force: bool = False) -> Guest:
    """Build (or reuse from cache) the guest; returns paths to kernel and initramfs."""
    pkg = resolve_kernel_package()
    version = pkg.removeprefix("linux-image-")
    tool_paths = [_find_tool(t) for t in GUEST_TOOLS]
    busybox = _busybox()
    out_dir = cache_root() / version
    kernel = out_dir / "vmlinuz"
    initrd = out_dir / "initrd.cpio"
    stamp = out_dir / "stamp.json"
    digest = _inputs_digest(pkg, tool_paths)
    if not force and stamp.exists() and kernel.exists() and initrd.exists():
        try:
            if json.loads(stamp.read_text()).get("digest") == digest:
                progress(f"guest up to date in {out_dir}")
                return Guest(kernel, initrd, version)
        except (ValueError, OSError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guest-build-", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        deb = _download_kernel(pkg, out_dir, tmp, progress)
        progress(f"extracting {deb.name}")
        root = tmp / "pkg"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{deb.name} holds no boot/vmlinuz-*")
        mod_dirs = sorted((root / "lib" / "modules").iterdir())
        if not mod_dirs:
            raise GuestBuildError(f"{deb.name} holds no lib/modules/<version>")
        modules_dir = mod_dirs[0]
        mods = _module_order(modules_dir, GUEST_MODULES)
        progress(f"modules: {' '.join(name for name, _ in mods)}")
        cpio = _base_cpio(busybox, mods, tool_paths, progress)
        tmp_initrd = tmp / "initrd.cpio"
        tmp_initrd.write_bytes(cpio)
        shutil.copyfile(vmlinuz[0], tmp / "vmlinuz")
        os.replace(tmp / "vmlinuz", kernel)
        os.replace(tmp_initrd, initrd)
    stamp.write_text(
        json.dumps(
            {
                "digest": digest,
                "package": pkg,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    )
    progress(
        f"guest ready: {kernel} ({kernel.stat().st_size >> 20} MiB), "
        f"{initrd} ({initrd.stat().st_size >> 20} MiB)"
    )
    return Guest(kernel, initrd, version)


def _download_kernel(pkg: str, out_dir: Path, tmp: Path, progress: Callable[[str], None]) -> Path:
    cached = sorted(out_dir.glob(f"{pkg}_*.deb"))
    if cached:
        progress(f"using cached {cached[-1].name}")
        return cached[-1]
    progress(f"downloading {pkg} (apt-get download)")
    dl = tmp / "dl"
    dl.mkdir()
    _run(["apt-get", "download", "-q", pkg], cwd=dl)
    debs = sorted(dl.glob(f"{pkg}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {pkg} produced no .deb")
    dest = out_dir / debs[0].name
    os.replace(debs[0], dest)
    return dest


def _base_cpio(
    busybox: Path,
    mods: list[tuple[str, bytes]],
    tools: list[Path],
    progress: Callable[[str], None],
) -> bytes:
    w = CpioWriter()
    dirs = {
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "lib",
        "lib/modules",
        "etc",
        "dev",
        "proc",
        "sys",
        "tmp",
        "mnt",
        "root",
    }
    added_dirs: set[str] = set()

    def ensure_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in added_dirs:
                added_dirs.add(d)
                w.directory(d)

    for d in sorted(dirs):
        ensure_dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet.endswith("/busybox") or applet == "linuxrc":
            continue
        ensure_dir(str(Path(applet).parent))
        w.symlink(applet, "/bin/busybox")
    names = []
    for name, data in mods:
        w.file(f"lib/modules/{name}.ko", data)
        names.append(name)
    w.file("etc/guest-modules", ("\n".join(names) + "\n").encode())
    libs: dict[Path, None] = {}
    for tool in [busybox, *tools]:
        for lib in _ldd_libs(tool):
            libs[lib] = None
    size = 0
    seen_paths: set[str] = set()
    for path in [*tools, *libs]:
        rel = str(path).lstrip("/")
        # Debian 12 is merged-/usr: /lib -> usr/lib, /bin -> usr/bin. Put files at the path
        # the loader asks for; a symlinked prefix would clash with busybox's real /bin.
        if rel in seen_paths:
            continue
        seen_paths.add(rel)
        data = path.read_bytes()
        size += len(data)
        ensure_dir(str(Path(rel).parent))
        w.file(rel, data, 0o755)
    mke2fs_conf = Path("/etc/mke2fs.conf")
    if mke2fs_conf.exists():
        w.file("etc/mke2fs.conf", mke2fs_conf.read_bytes())
    progress(f"tools: {' '.join(t.name for t in tools)} + {len(libs)} libraries ({size >> 20} MiB)")
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    w.file("lib/testlib.sh", TESTLIB.encode(), 0o644)
    return w.getvalue()


def ensure_built(progress: Callable[[str], None] = lambda _msg: None) -> Guest:
    """Build the guest if needed (cheap when cached)."""
    return build(progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.guest", description=__doc__.split("\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached guest kernel + initramfs")
    b.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    sub.add_parser("path", help="print the kernel and initramfs paths (building if needed)")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[guest {time.monotonic() - start:5.1f}s] {msg}", flush=True)

    try:
        if args.cmd == "build":
            build(progress, force=args.force)
        else:
            g = build()
            print(g.kernel)
            print(g.initrd)
    except GuestBuildError as e:
        print(f"guest build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
