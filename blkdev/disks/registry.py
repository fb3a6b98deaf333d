"""The disk registry: which module opens an image, by format name or by URI scheme.

:func:`open_disk` is what the CLI calls. An image is named by a path (a file or a block device,
whose format is given or probed) or, later, by a URI whose scheme names a remote disk
(``rbd:pool/image``, ``nbd://host/export``). Each format is one :class:`DiskFormat` row in
:data:`FORMATS`; a new disk type is one module and one row here, and nothing above this module
changes.

Probing and trust. A guest can write a qcow2 header into a raw image, and the next probe would
then hand the guest the image's metadata: following its backing-file name would let the guest
read any host file the backend can, and its virtual size would let it grow the host file without
bound. So, as QEMU does, a probed qcow2 never opens a backing file (images with one need
``fmt="qcow2"``), and a probed raw image refuses a guest write that would make its first sector
probe as anything but raw (``fmt="raw"`` allows it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from blkdev.disks.disk import Disk
from blkdev.disks.probe import probe_format
from blkdev.disks.qcow import QcowDisk
from blkdev.disks.raw import RawDisk

Format = Literal["auto", "raw", "qcow2", "rbd"]
Cache = Literal["writeback", "none"]


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What the user asked for, as every opener receives it."""

    target: str
    """A path, or for a URI format what follows its scheme."""
    read_only: bool
    cache: Cache
    probed: bool
    """The format was guessed, not given: the opener must not trust the image's metadata."""
    lock: bool = True
    """False (read-only only): look without locking (a migration destination's first look)."""


@dataclass(frozen=True, slots=True)
class DiskFormat:
    name: str
    open: Callable[[OpenRequest], Disk]
    schemes: tuple[str, ...] = ()
    """URI schemes (``"rbd"``) whose images this format opens; empty for file formats."""


def _open_raw(req: OpenRequest) -> Disk:
    return RawDisk.open(
        req.target, read_only=req.read_only, cache=req.cache, probed=req.probed, lock=req.lock
    )


def _open_qcow2(req: OpenRequest) -> Disk:
    # cache="none" applies to raw images only: qcow2 metadata I/O is not aligned.
    return QcowDisk.open(
        req.target, read_only=req.read_only, allow_backing=not req.probed, lock=req.lock
    )


def _open_rbd(req: OpenRequest) -> Disk:
    # Imported here: only an rbd image needs the librbd binding. ``cache`` is for files
    # (librbd's own cache is an option of the spec); ``lock`` does not apply (RBD has no
    # lock we take: librbd's exclusive lock moves to whichever client writes).
    from blkdev.disks.rbd import RbdDisk

    return RbdDisk.open(req.target, read_only=req.read_only)


FORMATS: Mapping[str, DiskFormat] = {
    f.name: f
    for f in (
        DiskFormat("raw", _open_raw),
        DiskFormat("qcow2", _open_qcow2),
        DiskFormat("rbd", _open_rbd, schemes=("rbd",)),
    )
}
"""Every format, by name (``--format``)."""

SCHEMES: Mapping[str, DiskFormat] = {s: f for f in FORMATS.values() for s in f.schemes}
"""URI formats by scheme: ``scheme:rest`` opens ``rest`` with that format."""


def _split_scheme(image: str) -> tuple[DiskFormat, str] | None:
    scheme, sep, rest = image.partition(":")
    if sep and scheme in SCHEMES:
        return SCHEMES[scheme], rest
    return None


def open_disk(
    image: str,
    *,
    fmt: Format = "auto",
    read_only: bool = False,
    cache: Cache = "writeback",
    lock: bool = True,
) -> Disk:
    """Open ``image`` (a path, or ``scheme:...`` for a URI format); ``disk.format_name`` says
    which format was used. ``fmt="auto"`` probes a path (see the module docstring).
    ``lock=False`` needs ``read_only``: it looks at the image without locking it."""
    if not lock and not read_only:
        raise ValueError("an image opened for writing is always locked")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}")
    if cache not in ("writeback", "none"):
        raise ValueError(f"unknown cache mode {cache!r}")
    uri = _split_scheme(image)
    if uri is not None:
        chosen, target = uri
        if fmt not in ("auto", chosen.name):
            raise ValueError(f"{image!r} is a {chosen.name} image, not {fmt}")
        probed = False
    else:
        chosen = FORMATS[probe_format(image) if fmt == "auto" else fmt]
        if chosen.schemes:
            raise ValueError(f"{fmt} images are named {chosen.schemes[0]}:..., not {image!r}")
        target, probed = image, fmt == "auto"
    return chosen.open(
        OpenRequest(target, read_only=read_only, cache=cache, probed=probed, lock=lock)
    )
