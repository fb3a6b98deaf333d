"""RequestBuffers / MultiRequestBuffers: readers, writers, locks and alignment on real memfd
regions, against the flat model of tests.unit.test_memory_support."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import (
    PAGE_SIZE,
    AccessError,
    BounceBuffer,
    GuestMemory,
    GuestMemoryError,
    GuestMemoryErrorKind,
    MemoryAccessError,
    MemoryReader,
    MemoryWriter,
    MultiRequestBuffers,
    OutOfRangeError,
    PagedRange,
    ReadOnlyError,
    RequestBuffers,
    request_buffers_from_buffers,
)
from memory.request_buffers import IoBuffers
from tests.unit.test_memory_support import HOLE, SPACE, SPACE_PAGES, Layout, layout


@pytest.fixture
def lay() -> Iterator[Layout]:
    with layout(seed=3, tag="rb") as lay:
        yield lay


def byte_gpas(r: PagedRange) -> list[int]:
    return [g for a in r.ranges() for g in range(a.start, a.end)]


def model_bytes(lay: Layout, gpas: list[int]) -> bytes:
    return bytes(lay.model[g] for g in gpas)


def concat(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


# Page numbers mostly inside the layout, sometimes in the hole or past the end.
gpns_in_layout = st.lists(
    st.one_of(
        st.integers(0, SPACE_PAGES + 1),
        st.sampled_from([0xF, 0x10, 0x1F, 0x20, 0x2F, 0x30, 0x37]),
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def ranges_in_layout(draw: st.DrawFn) -> PagedRange:
    gpns = draw(gpns_in_layout)
    if draw(st.booleans()):  # make runs of consecutive pages likely
        gpns = list(range(gpns[0], gpns[0] + len(gpns)))
    total = len(gpns) * PAGE_SIZE
    offset = draw(st.integers(0, total))
    length = draw(st.integers(0, total - offset))
    return PagedRange(offset, length, gpns)


ops = st.lists(
    st.tuples(st.sampled_from(["read", "readinto", "skip"]), st.integers(0, 2 * PAGE_SIZE + 3)),
    max_size=6,
)


# -- exact cases ---------------------------------------------------------------------------


def test_exact_reader_writer(lay: Layout) -> None:
    # Page 0x2f then 0x30: region 1 then adjacent region 2, one guest-contiguous run.
    rb = RequestBuffers(lay.mem, PagedRange(PAGE_SIZE - 2, 6, [0x2F, 0x30]), is_write=True)
    assert (len(rb), rb.is_write, rb.is_empty(), rb.range.gpns()) == (6, True, False, (0x2F, 0x30))
    assert rb.guest_memory is lay.mem
    assert rb.reader().read(6) == bytes(lay.model[0x2FFFE:0x30004])
    w = rb.writer()
    w.write(b"ab")
    w.fill(0x7E, 3)
    assert len(w) == 1
    w.zero(1)
    assert lay.file_bytes(0x2FFFE, 2) == b"ab"
    assert lay.file_bytes(0x30000, 4) == b"\x7e\x7e\x7e\x00"
    with rb.lock(True) as locked:
        views = locked.io_vecs()
        assert [len(v) for v in views] == [2, 4]  # split at the region boundary
        assert concat(views) == b"ab\x7e\x7e\x7e\x00"


def test_reader_errors_move_nothing(lay: Layout) -> None:
    # 8 bytes: 4 at the end of region 0, then 4 at the start of the hole.
    rb = RequestBuffers(lay.mem, PagedRange(PAGE_SIZE - 4, 8, [0xF, 0x10]), is_write=True)
    r = rb.reader()
    with pytest.raises(OutOfRangeError) as oor:
        r.read(9)
    assert (oor.value.available, oor.value.requested) == (8, 9)
    with pytest.raises(MemoryAccessError) as info:
        r.read(8)
    assert isinstance(info.value.__cause__, GuestMemoryError)
    assert info.value.error.gpa == HOLE[0]
    assert info.value.error.kind is GuestMemoryErrorKind.OUT_OF_RANGE
    assert len(r) == 8
    assert r.read(4) == bytes(lay.model[HOLE[0] - 4 : HOLE[0]])
    buf = bytearray(b"untouched")
    with pytest.raises(MemoryAccessError):
        r.readinto(memoryview(buf)[:1])
    assert buf == b"untouched" and len(r) == 4
    r.skip(4)  # skipping never touches memory
    assert len(r) == 0
    w = rb.writer()
    with pytest.raises(MemoryAccessError):
        w.write(b"x" * 8)
    with pytest.raises(MemoryAccessError):
        w.fill(1, 5)
    assert len(w) == 8
    assert lay.all_file_bytes() == bytes(lay.model)
    with pytest.raises(MemoryAccessError):
        rb.lock(True)
    with pytest.raises(MemoryAccessError):
        rb.subrange(4, 1).lock(False)
    with rb.subrange(0, 4).lock(False) as locked:
        assert concat(locked.io_vecs()) == bytes(lay.model[HOLE[0] - 4 : HOLE[0]])


def test_read_only_buffers(lay: Layout) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(0, 100, [0x20]), is_write=False)
    w = rb.writer()
    assert len(w) == 0
    for op in (
        lambda: w.write(b"x"),
        lambda: w.fill(0, 1),
        lambda: w.zero(100),
        lambda: w.skip(1),
        lambda: rb.lock(True),
    ):
        with pytest.raises(ReadOnlyError):
            op()
    w.write(b"")
    w.zero(0)
    assert rb.reader().read(100) == bytes(lay.model[0x20000:0x20064])
    with rb.lock(False) as locked:
        (view,) = locked.io_vecs()
        assert view.readonly and bytes(view) == bytes(lay.model[0x20000:0x20064])
    assert lay.all_file_bytes() == bytes(lay.model)


def test_lock_views_alias_guest_memory(lay: Layout) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(10, 3 * PAGE_SIZE, [0x21, 0x22, 0x05, 0x06]), True)
    with rb.lock(True) as locked:
        views = locked.io_vecs()
        assert [len(v) for v in views] == [2 * PAGE_SIZE - 10, PAGE_SIZE + 10]
        views[0][0] = 0xAB
        views[1][-1] = 0xCD
        assert not any(v.readonly for v in views)
    assert lay.file_bytes(0x2100A, 1) == b"\xab"
    assert lay.file_bytes(0x600A - 1, 1) == b"\xcd"
    with pytest.raises(ValueError):
        locked.io_vecs()


def test_lock_empty(lay: Layout) -> None:
    for rb in (
        RequestBuffers(lay.mem, PagedRange(0, 0, []), True),
        RequestBuffers(lay.mem, PagedRange(5, 0, [1 << 60]), False),
    ):
        with rb.lock(False) as locked:
            assert locked.io_vecs() == []
        assert rb.reader().read(0) == b"" and rb.is_empty()


def test_vectored_io_against_a_file(lay: Layout, tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "disk.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        buffers = [(0x3FF0, 0x10), (0x20000, 0x1000), (0x37000, 0x800)]
        write_req = request_buffers_from_buffers(lay.mem, buffers, is_write=False)
        expected = b"".join(bytes(lay.model[g : g + n]) for g, n in buffers)
        with write_req.lock(False) as locked:
            assert os.pwritev(fd, locked.io_vecs(), 512) == len(expected)
        assert os.pread(fd, len(expected), 512) == expected
        os.pwrite(fd, bytes(range(256)) * 32, 0)
        read_req = request_buffers_from_buffers(lay.mem, [(0x2000, 0x2000)], is_write=True)
        with read_req.lock(True) as locked:
            assert os.preadv(fd, locked.io_vecs(), 0) == 0x2000
        assert lay.file_bytes(0x2000, 0x2000) == bytes(range(256)) * 32
    finally:
        os.close(fd)


@pytest.mark.parametrize("alignment", [0, -1, 3, 6, 4095, 12288])
def test_is_aligned_rejects_non_powers_of_two(lay: Layout, alignment: int) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(0, PAGE_SIZE, [0]), True)
    mrb = MultiRequestBuffers(lay.mem, [PagedRange(0, PAGE_SIZE, [0])], True)
    for b in (rb, mrb):
        with pytest.raises(ValueError):
            b.is_aligned(alignment)


def test_is_aligned_exact(lay: Layout) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(512, 8192, [0, 1, 2]), True)
    assert rb.is_aligned(1) and rb.is_aligned(512) and not rb.is_aligned(1024)
    whole = RequestBuffers(lay.mem, PagedRange(0, 8192, [0, 1]), True)
    assert whole.is_aligned(4096) and not whole.is_aligned(8192)


def test_subrange(lay: Layout) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(100, 5000, [0x20, 0x30]), True)
    sub = rb.subrange(3990, 1000)
    assert isinstance(sub, RequestBuffers) and sub.is_write
    assert sub.reader().read(1000) == bytes(lay.model[0x20000 + 4090 : 0x21000]) + bytes(
        lay.model[0x30000 : 0x30000 + 994]
    )
    with pytest.raises(ValueError):
        rb.subrange(4001, 1000)


def test_bounce_buffer() -> None:
    import ctypes

    for size in (0, 1, 4096, 4097, 128 * 1024 + 512):
        bb = BounceBuffer(size)
        mv = bb.as_mut_bytes()
        assert len(bb) == size and mv.nbytes == size and not mv.readonly
        assert bytes(mv) == bytes(size)
        (vec,) = bb.io_vecs()
        assert vec.nbytes == size
        if size:
            mv[-1] = 0x5A
            assert vec[-1] == 0x5A
            address = ctypes.addressof(ctypes.c_char.from_buffer(vec))
            assert address % PAGE_SIZE == 0
    with pytest.raises(ValueError):
        BounceBuffer(-1)


def test_bounce_round_trip_through_request(lay: Layout) -> None:
    rb = request_buffers_from_buffers(lay.mem, [(0x100, 0x300), (0x20400, 0x100)], False)
    bb = BounceBuffer(len(rb))
    assert rb.reader().readinto(bb.as_mut_bytes()) == 0x400
    back = request_buffers_from_buffers(lay.mem, [(0x30000, 0x400)], True)
    back.writer().write(bb.as_mut_bytes())
    assert lay.file_bytes(0x30000, 0x400) == bytes(lay.model[0x100:0x400]) + bytes(
        lay.model[0x20400:0x20500]
    )


# -- multi-range ---------------------------------------------------------------------------


def test_request_buffers_from_buffers_picks_the_type(lay: Layout) -> None:
    one = request_buffers_from_buffers(lay.mem, [(0x1000, 0x800), (0x1800, 0x800)], True)
    assert isinstance(one, RequestBuffers)
    multi = request_buffers_from_buffers(lay.mem, [(0x1000, 0x10), (0x3008, 0x1000)], True)
    assert isinstance(multi, MultiRequestBuffers)
    assert [len(r) for r in multi.ranges] == [0x10, 0x1000]
    assert not multi.is_aligned(16) and multi.is_aligned(8)
    with multi.lock(True) as locked:
        assert [len(v) for v in locked.io_vecs()] == [0x10, 0x1000]
    empty = request_buffers_from_buffers(lay.mem, [], False)
    assert isinstance(empty, RequestBuffers) and empty.is_empty()
    # Above a page nothing is aligned, whatever the type and even with no parts.
    no_parts = MultiRequestBuffers(lay.mem, [], True)
    assert no_parts.is_aligned(4096) and not no_parts.is_aligned(8192)
    assert not empty.is_aligned(8192)


def io_buffers_protocol_check(b: IoBuffers) -> int:
    return len(b)


def test_both_types_satisfy_io_buffers(lay: Layout) -> None:
    rb = RequestBuffers(lay.mem, PagedRange(0, 1, [0]), True)
    mrb = MultiRequestBuffers(lay.mem, [PagedRange(0, 1, [0])], True)
    assert io_buffers_protocol_check(rb) == io_buffers_protocol_check(mrb) == 1
    assert isinstance(rb, IoBuffers) and isinstance(mrb, IoBuffers)
    assert not isinstance(rb.range, IoBuffers)


buffers_in_layout = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, SPACE - 1),
            st.integers(0, SPACE_PAGES - 1).map(lambda p: p * PAGE_SIZE),
        ),
        st.integers(0, 2 * PAGE_SIZE),
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(buffers_in_layout, st.booleans(), st.data())
def test_multi_buffers_match_model(
    buffers: list[tuple[int, int]], is_write: bool, data: st.DataObject
) -> None:
    with layout(seed=len(buffers), tag="multi") as lay:
        rb = request_buffers_from_buffers(lay.mem, buffers, is_write)
        gpas = [g for gpa, n in buffers for g in range(gpa, gpa + n)]
        valid = all(lay.valid(g) for g in gpas)
        assert len(rb) == len(gpas) and rb.is_write == is_write
        for alignment in (1, 2, 512, 4096, 8192):
            parts = rb.ranges if isinstance(rb, MultiRequestBuffers) else [rb.range]
            expected = alignment <= PAGE_SIZE and all(
                p.offset() % alignment == 0 and len(p) % alignment == 0
                for p in parts
                if not p.is_empty() or isinstance(rb, RequestBuffers)
            )
            assert rb.is_aligned(alignment) == expected
        if not valid:
            with pytest.raises(MemoryAccessError):
                rb.reader().read(len(rb))
            with pytest.raises(MemoryAccessError):
                rb.lock(False)
            return
        assert rb.reader().read(len(rb)) == model_bytes(lay, gpas)
        with rb.lock(False) as locked:
            assert concat(locked.io_vecs()) == model_bytes(lay, gpas)
        a = data.draw(st.integers(0, len(rb)))
        b = data.draw(st.integers(0, len(rb) - a))
        sub = rb.subrange(a, b)
        assert sub.reader().read(b) == model_bytes(lay, gpas[a : a + b])
        if is_write:
            payload = bytes((i * 7 + 1) & 0xFF for i in range(len(rb)))
            rb.writer().write(payload)
            for g, v in zip(gpas, payload, strict=True):
                lay.model[g] = v
            assert lay.all_file_bytes() == bytes(lay.model)


# -- properties on PagedRanges over the layout ---------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ranges_in_layout(), ops, st.booleans())
def test_reader_matches_model(r: PagedRange, script: list[tuple[str, int]], multi: bool) -> None:
    with layout(seed=len(r), tag="reader") as lay:
        rb: IoBuffers
        if multi and len(r) >= 2:
            half = len(r) // 2
            rb = MultiRequestBuffers(
                lay.mem, [r.subrange(0, half), r.subrange(half, len(r) - half)], True
            )
        else:
            rb = RequestBuffers(lay.mem, r, True)
        gpas = byte_gpas(r)
        reader = rb.reader()
        pos = 0
        for op, n in script:
            assert len(reader) == len(gpas) - pos
            if n > len(gpas) - pos:
                with pytest.raises(OutOfRangeError):
                    perform(reader, op, n)
            elif op != "skip" and not all(lay.valid(g) for g in gpas[pos : pos + n]):
                with pytest.raises(MemoryAccessError):
                    perform(reader, op, n)
            else:
                got = perform(reader, op, n)
                if op != "skip":
                    assert got == model_bytes(lay, gpas[pos : pos + n])
                pos += n
        assert len(reader) == len(gpas) - pos


def perform(reader: MemoryReader, op: str, n: int) -> bytes | None:
    if op == "read":
        return reader.read(n)
    if op == "readinto":
        buf = bytearray(b"\xee" * n)
        assert reader.readinto(buf) == n
        return bytes(buf)
    reader.skip(n)
    return None


def perform_write(writer: MemoryWriter, op: str, n: int, byte: int, data: bytes) -> None:
    if op == "write":
        writer.write(data)
    elif op == "fill":
        writer.fill(byte, n)
    elif op == "zero":
        writer.zero(n)
    else:
        writer.skip(n)


write_ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "fill", "zero", "skip"]),
        st.integers(0, 2 * PAGE_SIZE + 3),
        st.integers(0, 255),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(ranges_in_layout(), write_ops, st.booleans())
def test_writer_matches_model(
    r: PagedRange, script: list[tuple[str, int, int]], is_write: bool
) -> None:
    with layout(seed=len(r) + 1, tag="writer") as lay:
        rb = RequestBuffers(lay.mem, r, is_write)
        gpas = byte_gpas(r)
        writer = rb.writer()
        pos = 0
        size = len(gpas) if is_write else 0
        for op, n, byte in script:
            assert len(writer) == size - pos
            data = bytes((byte + i) & 0xFF for i in range(n))
            if n > size - pos:
                with pytest.raises(ReadOnlyError if not is_write else OutOfRangeError):
                    perform_write(writer, op, n, byte, data)
            elif op != "skip" and not all(lay.valid(g) for g in gpas[pos : pos + n]):
                with pytest.raises(MemoryAccessError):
                    perform_write(writer, op, n, byte, data)
            else:
                perform_write(writer, op, n, byte, data)
                expected = {"write": data, "fill": bytes([byte]) * n, "zero": bytes(n)}
                for g, v in zip(gpas[pos : pos + n], expected.get(op, b""), strict=False):
                    lay.model[g] = v
                pos += n
            assert lay.all_file_bytes() == bytes(lay.model)


@settings(max_examples=150, deadline=None)
@given(ranges_in_layout(), st.booleans(), st.booleans())
def test_lock_matches_model(r: PagedRange, is_write: bool, for_write: bool) -> None:
    with layout(seed=9, tag="lock") as lay:
        rb = RequestBuffers(lay.mem, r, is_write)
        gpas = byte_gpas(r)
        if for_write and not is_write:
            with pytest.raises(ReadOnlyError):
                rb.lock(for_write)
            return
        if not all(lay.valid(g) for g in gpas):
            with pytest.raises(MemoryAccessError):
                rb.lock(for_write)
            return
        with rb.lock(for_write) as locked:
            views = locked.io_vecs()
            assert concat(views) == model_bytes(lay, gpas)
            assert all(v.readonly != for_write for v in views)
            # one view per guest-contiguous run within a region
            runs = r.ranges()
            boundaries = sum(1 for a in runs for b in (0x30000,) if a.start < b < a.end)
            assert len(views) == len(runs) + boundaries
            if for_write and views:
                views[0][0] = lay.model[gpas[0]] ^ 0xFF
                lay.model[gpas[0]] ^= 0xFF
        assert lay.all_file_bytes() == bytes(lay.model)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(), min_size=1, max_size=4),
    st.data(),
    st.booleans(),
)
def test_any_page_numbers_only_raise_the_taxonomy(
    gpns: list[int], data: st.DataObject, is_write: bool
) -> None:
    with GuestMemory.allocate(4 * PAGE_SIZE) as mem:
        total = len(gpns) * PAGE_SIZE
        offset = data.draw(st.integers(0, total))
        length = data.draw(st.integers(0, total - offset))
        rb = RequestBuffers(mem, PagedRange(offset, length, gpns), is_write)
        n = data.draw(st.integers(0, length + 1))
        for action in (
            lambda: rb.reader().read(n),
            lambda: rb.reader().readinto(bytearray(n)),
            lambda: rb.writer().write(bytes(n)),
            lambda: rb.writer().zero(n),
            lambda: rb.lock(True).release(),
            lambda: rb.lock(False).release(),
            lambda: rb.range.ranges(),
        ):
            try:
                action()
            except AccessError:
                pass
        mem.close()
        for after_close in (lambda: rb.reader().read(n), lambda: rb.lock(False)):
            try:
                after_close()
            except AccessError as exc:
                if isinstance(exc, MemoryAccessError):
                    assert exc.error.kind in (
                        GuestMemoryErrorKind.CLOSED,
                        GuestMemoryErrorKind.OUT_OF_RANGE,
                    )
