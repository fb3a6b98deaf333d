"""The qcow2 metadata journal: its layout, parse (pure, property-tested), the writer, and the
replay's refusal of journals that do not belong to the image (forged, foreign, inconsistent).

The kill -9 end-to-end is ``test_crash.test_kill9_loses_no_completed_write_with_the_journal``;
with a real guest and QEMU, ``tests/integration/test_restart.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkdev.disks.qcow import QcowDisk, create_image
from blkdev.disks.qcow import journal as jnl
from memory import GuestMemory
from tests.qcow.helpers import MiB, assert_clean, guest_read, guest_write, read_all

CS = 4096
IDENTITY = {"st_dev": 7, "st_ino": 11, "cluster_bits": 12}


def test_the_layout_sizes() -> None:
    assert jnl.HEADER.size == 64
    assert jnl.ENTRY.size == 24
    assert jnl.SIZE == 64 + 2 * jnl.CAPACITY * 24


def test_a_fresh_region_is_an_empty_journal() -> None:
    assert jnl.parse(memoryview(bytearray(jnl.SIZE)), **IDENTITY) == []


_change = st.one_of(
    st.builds(
        jnl.Mapping,
        st.integers(0, (1 << 62) - 1),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
    ),
    st.builds(jnl.Free, st.integers(0, (1 << 62) - 1), st.integers(1, (1 << 64) - 1)),
)


@settings(max_examples=60, deadline=None)
@given(
    epochs=st.lists(st.lists(_change, max_size=8), min_size=1, max_size=4),
    frees=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 20)), max_size=4),
)
def test_what_the_writer_records_parses_back(
    epochs: list[list[jnl.Change]], frees: list[tuple[int, int]]
) -> None:
    region = memoryview(bytearray(jnl.SIZE))
    journal = jnl.Journal(region, **IDENTITY)
    expected: list[jnl.Change] = []
    for i, epoch in enumerate(epochs):
        if i:
            journal.checkpoint(frees)
            expected = [jnl.Free(o, n) for o, n in frees]
        for change in epoch:
            if isinstance(change, jnl.Mapping):
                journal.mapping(change.guest_cluster, change.old, change.new)
                expected.append(change)
    assert jnl.parse(region, **IDENTITY) == expected
    journal.close()


@settings(max_examples=200, deadline=None)
@given(
    header=st.binary(min_size=64, max_size=64),
    body=st.binary(max_size=512),
    size=st.sampled_from([64, 200, 4096]),
)
def test_parse_of_any_bytes_is_a_journal_or_refused(header: bytes, body: bytes, size: int) -> None:
    raw = bytearray(size)
    data = (header + body)[:size]
    raw[: len(data)] = data
    try:
        changes = jnl.parse(memoryview(raw), **IDENTITY)
    except jnl.JournalInvalid:
        return
    assert all(isinstance(c, (jnl.Mapping, jnl.Free)) for c in changes)


def test_a_journal_of_another_image_is_refused() -> None:
    region = memoryview(bytearray(jnl.SIZE))
    jnl.Journal(region, **IDENTITY).mapping(1, 0, 4096)
    with pytest.raises(jnl.JournalInvalid, match="another image"):
        jnl.parse(region, **{**IDENTITY, "st_ino": 12})


def test_an_uncommitted_entry_is_not_replayed() -> None:
    """The count is stored after the entry: an entry whose count store never happened (the
    process died between the two) is not part of the journal."""
    region = memoryview(bytearray(jnl.SIZE))
    journal = jnl.Journal(region, **IDENTITY)
    journal.mapping(1, 0, 4096)
    jnl.ENTRY.pack_into(region, jnl.HEADER.size + jnl.ENTRY.size, 2, 0, 8192)
    assert jnl.parse(region, **IDENTITY) == [jnl.Mapping(1, 0, 4096)]


# -- replay through QcowDisk ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(1 * MiB) as mem:
        yield mem


def _image(tmp_path: Path, name: str = "j.qcow2") -> Path:
    img = tmp_path / name
    create_image(str(img), 4 * MiB, cluster_size=CS)
    return img


def _crash(disk: QcowDisk) -> None:
    """What kill -9 does to a disk: its memory is gone, nothing is written back. (The journal
    region is released first, as the process's death would unmap it.)"""
    journal = disk._journal
    if journal is not None:
        journal.close()
    disk._file.close()


def test_a_dead_disks_unflushed_writes_are_replayed(tmp_path: Path, memory: GuestMemory) -> None:
    img = _image(tmp_path)
    region = memoryview(bytearray(jnl.SIZE))
    disk = QcowDisk.open(str(img), read_only=False)
    disk.attach_journal(region)
    guest_write(disk, memory, 0, b"a" * CS)
    guest_write(disk, memory, 3 * MiB + 512, b"b" * 1024)  # a partial cluster, a new L2 table
    disk.write_zeroes(0, CS, unmap=True)
    guest_write(disk, memory, CS, b"c" * CS)
    _crash(disk)
    disk = QcowDisk.open(str(img), read_only=False)
    assert guest_read(disk, memory, CS, CS) == bytes(CS)  # what the image alone holds
    disk.attach_journal(region)
    assert guest_read(disk, memory, 0, 2 * CS) == bytes(CS) + b"c" * CS
    assert guest_read(disk, memory, 3 * MiB, 2048) == bytes(512) + b"b" * 1024 + bytes(512)
    disk.close()
    assert_clean(img)
    disk = QcowDisk.open(str(img), read_only=True)
    assert read_all(disk)[CS : 2 * CS] == b"c" * CS
    disk.close()


def test_a_full_journal_writes_back_and_goes_on(
    tmp_path: Path, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jnl, "CAPACITY", 8)
    img = _image(tmp_path)
    region = memoryview(bytearray(jnl.SIZE))
    disk = QcowDisk.open(str(img), read_only=False)
    disk.attach_journal(region)
    for i in range(40):
        guest_write(disk, memory, i * CS, bytes([i + 1]) * CS)
    _crash(disk)
    disk = QcowDisk.open(str(img), read_only=False)
    disk.attach_journal(region)
    got = read_all(disk)
    disk.close()
    assert all(got[i * CS : (i + 1) * CS] == bytes([i + 1]) * CS for i in range(40))
    assert_clean(img)


def _forge(region: memoryview, img: Path, *changes: jnl.Mapping) -> None:
    st_ = os.stat(img)
    journal = jnl.Journal(region, st_dev=st_.st_dev, st_ino=st_.st_ino, cluster_bits=12)
    for c in changes:
        journal.mapping(c.guest_cluster, c.old, c.new)
    journal.close()


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(jnl.Mapping(9, 0, 0), id="l1-table-as-data"),  # new= filled in below
        pytest.param(jnl.Mapping(1 << 40, 0, 1 << 20), id="past-the-disk"),
        pytest.param(jnl.Mapping(9, 0, 3 * 512), id="unaligned"),
        pytest.param(jnl.Mapping(9, 0, 1 << 30), id="past-the-file"),
        pytest.param(jnl.Mapping(5, 1 << 20, 0), id="neither-end-on-disk"),
        pytest.param(jnl.Mapping(9, 1 << 20, 0), id="releases-what-it-never-had"),
    ],
)
def test_a_forged_journal_changes_nothing(
    tmp_path: Path, memory: GuestMemory, forged: jnl.Mapping
) -> None:
    img = _image(tmp_path)
    disk = QcowDisk.open(str(img), read_only=False)
    guest_write(disk, memory, 5 * CS, b"x" * CS)
    l1_offset = disk.header.l1_table_offset
    disk.close()
    if forged.new == 0 and forged.old == 0:
        forged = jnl.Mapping(9, 0, l1_offset | (1 << 63))  # metadata as a guest's cluster
    region = memoryview(bytearray(jnl.SIZE))
    _forge(region, img, forged)
    disk = QcowDisk.open(str(img), read_only=False)
    disk.attach_journal(region)
    assert guest_read(disk, memory, 5 * CS, CS) == b"x" * CS
    assert guest_read(disk, memory, 9 * CS, CS) == bytes(CS)
    disk.close()
    assert_clean(img)


def test_two_guest_clusters_claiming_one_host_cluster_are_refused(tmp_path: Path) -> None:
    img = _image(tmp_path)
    region = memoryview(bytearray(jnl.SIZE))
    size = img.stat().st_size
    with open(img, "ab") as f:
        f.write(bytes(CS))
    host = (size + CS - 1) // CS * CS
    _forge(region, img, jnl.Mapping(1, 0, host | (1 << 63)), jnl.Mapping(2, 0, host | (1 << 63)))
    disk = QcowDisk.open(str(img), read_only=False)
    disk.attach_journal(region)
    assert read_all(disk) == bytes(4 * MiB)
    disk.close()
    assert_clean(img)
