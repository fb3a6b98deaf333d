"""create / info / check against qemu-img's view of the same images."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from blkdev.disks.qcow import check_image, create_image, image_info
from blkdev.errors import ImageError
from tests.qcow.helpers import MiB, assert_clean, qemu_check, qemu_img, qemu_io

_SHARED_INFO_KEYS = (
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "actual-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "format-specific",
)


def _qemu_info(img: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads(qemu_img("info", "--output=json", img).stdout)
    return result


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
@pytest.mark.parametrize("size", [0, 1, 10 * MiB, 3 << 40])
def test_create_is_clean_and_matches_info(tmp_path: Path, cluster_size: int, size: int) -> None:
    img = tmp_path / "a.qcow2"
    if size == 3 << 40 and cluster_size == 512:
        size = 1 << 30  # 3 TiB needs a larger L1 than qcow2 allows with 512 B clusters
    create_image(str(img), size, cluster_size=cluster_size)
    assert_clean(img)
    ours, theirs = image_info(str(img)), _qemu_info(img)
    for key in _SHARED_INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key
    if size >= 4096:
        qemu_io(img, "write -P 5 0 4096")
    assert_clean(img)


def test_create_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * MiB)
    img = tmp_path / "o.qcow2"
    create_image(str(img), MiB, backing_file="base.raw", backing_format="raw")
    ours, theirs = image_info(str(img)), _qemu_info(img)
    for key in _SHARED_INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key
    assert ours["backing-filename-format"] == "raw"
    with pytest.raises(ImageError, match="never guessed"):
        create_image(str(tmp_path / "p.qcow2"), MiB, backing_file="base.raw")
    with pytest.raises(ImageError, match="exists"):
        create_image(str(img), MiB)
    with pytest.raises(ValueError):
        create_image(str(tmp_path / "q.qcow2"), MiB, cluster_size=1000)


@pytest.mark.parametrize(
    "options",
    ["compat=0.10", "refcount_bits=1", "refcount_bits=64", "cluster_size=512", "extended_l2=on"],
)
def test_info_matches_qemu(tmp_path: Path, options: str) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", options, img, "5M")
    ours, theirs = image_info(str(img)), _qemu_info(img)
    for key in _SHARED_INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key


def test_check_agrees_with_qemu(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    qemu_io(img, "write -P 1 0 1M", "write -z 512k 64k", "discard 768k 64k")
    qemu_img("snapshot", "-c", "snap", img)
    qemu_io(img, "write -P 2 0 128k")
    clean = check_image(str(img))
    theirs = qemu_check(img)
    assert (clean.corruptions, clean.leaks, clean.check_errors) == (0, 0, 0), clean.problems
    assert clean.to_json()["allocated-clusters"] == theirs["allocated-clusters"]
    assert clean.to_json()["total-clusters"] == theirs["total-clusters"]
    assert clean.to_json()["image-end-offset"] == theirs["image-end-offset"]

    data = bytearray(img.read_bytes())
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable)[0]
    # Leak: count a cluster past everything referenced (but inside the file).
    last = len(data) // 4096 - 1
    data += bytes(2 * 4096)
    struct.pack_into(">H", data, block + 2 * (last + 1), 1)
    # Corruption: drop the refcount of the header cluster.
    struct.pack_into(">H", data, block, 0)
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    ours = check_image(str(bad))
    theirs = qemu_check(bad)
    assert ours.leaks == theirs.get("leaks", 0) == 1, (ours.problems, theirs)
    assert ours.corruptions == theirs.get("corruptions", 0) == 1, (ours.problems, theirs)
    assert any("Leaked cluster" in p for p in ours.problems)
    assert ours.to_json()["leaks"] == 1


def test_check_compressed_image(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"".join(b"text %d\n" % i for i in range(300_000))[: 3 * MiB])
    img = tmp_path / "a.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, img)
    ours = check_image(str(img))
    theirs = qemu_check(img)
    assert (ours.corruptions, ours.leaks) == (0, 0), ours.problems
    assert ours.to_json().get("compressed-clusters") == theirs.get("compressed-clusters")
    assert ours.to_json()["allocated-clusters"] == theirs["allocated-clusters"]


def test_check_counts_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_img("bitmap", "--add", "-g", "65536", img, "b0")
    qemu_img("bitmap", "--add", img, "b1")
    qemu_io(img, "write -P 1 0 1M")  # bitmaps are stored at close, with data clusters
    ours = check_image(str(img))
    assert (ours.corruptions, ours.leaks) == (0, 0), ours.problems
    assert ours.to_json()["image-end-offset"] == qemu_check(img)["image-end-offset"]


def _image_with_data(tmp_path: Path) -> tuple[bytes, int, int, int, int]:
    """A 64 KiB-cluster image with one data cluster: its bytes and the offsets of the L1
    table, the L2 table, the refcount table and the first refcount block."""
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 1 0 64k")
    raw = img.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    block = struct.unpack_from(">Q", raw, reftable)[0]
    return raw, l1, l2, reftable, block


@pytest.mark.parametrize(
    ("table", "bit", "message"),
    [
        ("l1", 56, "L1 entry with reserved bits set"),
        ("l1", 3, "L1 entry with reserved bits set"),
        ("l2", 57, "l2 entry with reserved bits set"),
        ("l2", 4, "l2 entry with reserved bits set"),
        ("reftable", 3, "refcount table entry 0 has reserved bits set"),
    ],
)
def test_check_reports_reserved_bits(tmp_path: Path, table: str, bit: int, message: str) -> None:
    raw, l1, l2, reftable, _ = _image_with_data(tmp_path)
    data = bytearray(raw)
    pos = {"l1": l1, "l2": l2, "reftable": reftable}[table]
    struct.pack_into(">Q", data, pos, struct.unpack_from(">Q", data, pos)[0] | 1 << bit)
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    theirs = qemu_check(bad)
    ours = check_image(str(bad))
    assert ours.corruptions == theirs["corruptions"] == 1, (ours.problems, theirs)
    assert ours.leaks == theirs.get("leaks", 0), (ours.problems, theirs)
    assert any(message in p for p in ours.problems), ours.problems
    assert qemu_img("check", bad, check=False).returncode == 2


def test_check_reserved_bits_of_compressed_entries_are_data(tmp_path: Path) -> None:
    """Bits 56..61 of a compressed L2 entry are part of its offset and size fields."""
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"".join(b"line %d\n" % i for i in range(100_000))[:MiB])
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M", raw, img)
    ours, theirs = check_image(str(img)), qemu_check(img)
    assert (ours.corruptions, ours.leaks) == (0, 0), ours.problems
    assert theirs.get("corruptions", 0) == 0


def test_check_ignores_refcounts_past_the_end_of_the_file(tmp_path: Path) -> None:
    """A crash after a refcount block was written but before the data it counts: qemu-img
    walks only the file's clusters and finds the image clean."""
    raw, _, _, _, block = _image_with_data(tmp_path)
    data = bytearray(raw)
    past = len(raw) // 65536 + 5
    struct.pack_into(">H", data, block + 2 * past, 1)
    img = tmp_path / "p.qcow2"
    img.write_bytes(bytes(data))
    ours, theirs = check_image(str(img)), qemu_check(img)
    assert theirs.get("leaks", 0) == theirs.get("corruptions", 0) == 0, theirs
    assert (ours.corruptions, ours.leaks) == (0, 0), ours.problems
    assert ours.image_end_offset == theirs["image-end-offset"]
    # Inside the file, the same refcount is a leak (and extends the image end) for both.
    data += bytes((past + 1) * 65536 - len(data))
    img.write_bytes(bytes(data))
    ours, theirs = check_image(str(img)), qemu_check(img)
    assert ours.leaks == theirs["leaks"] == 1, (ours.problems, theirs)
    assert ours.image_end_offset == theirs["image-end-offset"] == (past + 1) * 65536


@pytest.mark.parametrize("cluster_size", [512, 4096])
def test_check_fragmentation_matches_qemu(tmp_path: Path, cluster_size: int) -> None:
    """Compressed clusters count as fragmented; plain ones when not contiguous within an L2
    table (512-byte clusters: one table per 32 KiB)."""
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"".join(b"text %d\n" % i for i in range(200_000))[: 2 * MiB])
    img = tmp_path / "f.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", raw, img)
    qemu_io(img, "write -P 2 1M 8k", "write -P 3 64k 4k", "write -P 4 300k 40k", "write -P 5 0 2k")
    ours, theirs = check_image(str(img)).to_json(), qemu_check(img)
    for key in ("fragmented-clusters", "compressed-clusters", "allocated-clusters"):
        assert ours.get(key) == theirs.get(key), key
    assert ours.get("fragmented-clusters", 0) > 0


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_info_lists_snapshots(tmp_path: Path, compat: str) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", img, "4M")
    assert "snapshots" not in image_info(str(img))
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", img)
    qemu_img("snapshot", "-c", "second one", img)
    qemu_img("snapshot", "-c", "third", img)
    qemu_img("snapshot", "-d", "second one", img)
    ours, theirs = image_info(str(img)), _qemu_info(img)
    assert ours["snapshots"] == theirs["snapshots"]
    assert [s["name"] for s in ours["snapshots"]] == ["first", "third"]
    assert list(ours) == list(theirs)
