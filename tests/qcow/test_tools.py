"""create / info / check against qemu-img's view of the same images."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from blkdev.errors import ImageError
from blkdev.qcow import check_image, create_image, image_info
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
