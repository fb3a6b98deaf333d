"""PagedRange and paged_range_from_buffers: exact cases and properties against a byte model.

The model: byte ``i`` of a range over ``gpns`` starting ``offset`` bytes in lives at guest
address ``gpns[(offset+i) // 4096] * 4096 + (offset+i) % 4096``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memory import (
    PAGE_SIZE,
    AccessError,
    AddressRange,
    MemoryAccessError,
    PagedRange,
    paged_range_from_buffers,
    paged_ranges_from_buffers,
)


def byte_gpas(offset: int, length: int, gpns: list[int]) -> list[int]:
    return [
        gpns[(offset + i) // PAGE_SIZE] * PAGE_SIZE + (offset + i) % PAGE_SIZE
        for i in range(length)
    ]


def range_gpas(r: PagedRange) -> list[int]:
    return [gpa for a in r.ranges() for gpa in range(a.start, a.end)]


@st.composite
def paged_ranges(
    draw: st.DrawFn, max_pages: int = 6, gpn: st.SearchStrategy[int] | None = None
) -> tuple[int, int, list[int]]:
    """(offset, length, gpns) valid for PagedRange, with runs of consecutive pages likely."""
    gpn = gpn if gpn is not None else st.integers(0, 12)
    n = draw(st.integers(0, max_pages))
    gpns: list[int] = []
    for _ in range(n):
        extend = draw(st.booleans())
        if gpns and extend:
            gpns.append(gpns[-1] + 1)
        else:
            gpns.append(draw(gpn))
    total = n * PAGE_SIZE
    edge = st.sampled_from([0, 1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1])
    offset = draw(st.one_of(st.integers(0, total), edge.filter(lambda v: v <= total)))
    length = draw(
        st.one_of(st.integers(0, total - offset), edge.filter(lambda v: v <= total - offset))
    )
    return offset, length, gpns


# -- exact cases ---------------------------------------------------------------------------


def test_exact_shape() -> None:
    r = PagedRange(4000, 200, [7, 9, 11])
    assert (len(r), r.offset(), r.gpns(), r.is_empty()) == (200, 4000, (7, 9), False)
    assert r.ranges() == [
        AddressRange(7 * 4096 + 4000, 8 * 4096),
        AddressRange(9 * 4096, 9 * 4096 + 104),
    ]


def test_offset_beyond_first_page() -> None:
    r = PagedRange(2 * PAGE_SIZE + 5, 10, [1, 2, 3, 4])
    assert (r.offset(), r.gpns(), r.ranges()) == (5, (3,), [AddressRange(0x3005, 0x300F)])


def test_contiguous_pages_are_one_range() -> None:
    r = PagedRange(100, 3 * PAGE_SIZE, [5, 6, 7, 8])
    assert r.ranges() == [AddressRange(5 * 4096 + 100, 8 * 4096 + 100)]
    assert r.gpns() == (5, 6, 7, 8)
    assert len(r.ranges()[0]) == 3 * PAGE_SIZE


def test_empty_ranges() -> None:
    for r in (PagedRange(0, 0, []), PagedRange(PAGE_SIZE, 0, [3]), PagedRange(17, 0, [3])):
        assert r.is_empty() and len(r) == 0 and r.gpns() == () and r.ranges() == []
    assert PagedRange.empty().gpns() == ()


@pytest.mark.parametrize(
    ("offset", "length", "npages"),
    [(1, 0, 0), (0, 1, 0), (PAGE_SIZE + 1, 0, 1), (10, PAGE_SIZE - 9, 1), (-1, 0, 1), (0, -1, 1)],
)
def test_constructor_bounds(offset: int, length: int, npages: int) -> None:
    with pytest.raises(ValueError):
        PagedRange(offset, length, list(range(npages)))


def test_exact_bounds_accepted() -> None:
    assert len(PagedRange(PAGE_SIZE, 0, [1])) == 0
    assert len(PagedRange(1, 2 * PAGE_SIZE - 1, [1, 5])) == 2 * PAGE_SIZE - 1


def test_subrange_bounds() -> None:
    r = PagedRange(10, 100, [1])
    assert len(r.subrange(100, 0)) == 0
    assert r.subrange(40, 60).ranges() == [AddressRange(4096 + 50, 4096 + 110)]
    for off, n in ((101, 0), (0, 101), (50, 51), (-1, 1), (1, -1)):
        with pytest.raises(ValueError):
            r.subrange(off, n)


def test_ranges_reject_impossible_page_numbers() -> None:
    for gpns in ([-1], [1 << 52], [1 << 200]):
        with pytest.raises(MemoryAccessError):
            PagedRange(0, 1, gpns).ranges()
    assert PagedRange(0, PAGE_SIZE, [(1 << 52) - 1]).ranges()[0].end == 1 << 64


def test_from_buffers_exact() -> None:
    # contiguous but unaligned boundaries merge into the same pages
    r = paged_range_from_buffers([(0x1F00, 0x100), (0x2000, 0x80), (0x2080, 0x1000)])
    assert r is not None
    assert (r.offset(), len(r), r.gpns()) == (0xF00, 0x1180, (1, 2, 3))
    assert r.ranges() == [AddressRange(0x1F00, 0x3080)]
    # page-aligned boundaries between discontiguous buffers
    r = paged_range_from_buffers([(0x5800, 0x800), (0x9000, 0x2000), (0x3000, 0x10)])
    assert r is not None
    assert (r.offset(), len(r), r.gpns()) == (0x800, 0x2810, (5, 9, 10, 3))
    assert r.ranges() == [
        AddressRange(0x5800, 0x6000),
        AddressRange(0x9000, 0xB000),
        AddressRange(0x3000, 0x3010),
    ]
    # zero-length buffers are ignored, even where they would break alignment
    r = paged_range_from_buffers([(0x1000, 0x1000), (0x5555, 0), (0x2000, 4)])
    assert r is not None and r.ranges() == [AddressRange(0x1000, 0x2004)]
    assert paged_range_from_buffers([]) == PagedRange.empty()
    assert paged_range_from_buffers([(0x1234, 0)]) == PagedRange.empty()


@pytest.mark.parametrize(
    "buffers",
    [
        [(0x1000, 0x800), (0x3000, 0x100)],  # previous ends mid-page
        [(0x1000, 0x1000), (0x3100, 0x100)],  # next starts mid-page
        [(0x1000, 0x10), (0x1000, 0x10)],  # same bytes twice: not contiguous
    ],
)
def test_from_buffers_unmergeable(buffers: list[tuple[int, int]]) -> None:
    assert paged_range_from_buffers(buffers) is None
    parts = paged_ranges_from_buffers(buffers)
    assert [a for p in parts for a in p.ranges()] == [AddressRange(g, g + n) for g, n in buffers]


def test_from_buffers_huge_is_cheap() -> None:
    # A guest can claim 4 GiB per descriptor; nothing proportional to that is built.
    r = paged_range_from_buffers([(0x1000, 1 << 32), ((1 << 32) + 0x1000, 1 << 32)])
    assert r is not None and len(r) == 1 << 33
    assert r.ranges() == [AddressRange(0x1000, (1 << 33) + 0x1000)]
    assert r.subrange((1 << 33) - 10, 10).gpns() == ((1 << 21),)


# -- properties ----------------------------------------------------------------------------


@settings(deadline=None)
@given(paged_ranges())
def test_ranges_match_model_and_are_maximal(spec: tuple[int, int, list[int]]) -> None:
    offset, length, gpns = spec
    r = PagedRange(offset, length, gpns)
    ranges = r.ranges()
    assert sum(len(a) for a in ranges) == length == len(r)
    assert all(not a.is_empty() for a in ranges)
    assert range_gpas(r) == byte_gpas(offset, length, gpns)
    for a, b in itertools.pairwise(ranges):
        assert a.end != b.start  # maximal: adjacent runs are not guest-contiguous


@settings(deadline=None)
@given(paged_ranges())
def test_shape_matches_model(spec: tuple[int, int, list[int]]) -> None:
    offset, length, gpns = spec
    r = PagedRange(offset, length, gpns)
    assert 0 <= r.offset() < PAGE_SIZE and r.offset() == offset % PAGE_SIZE
    touched = list(dict.fromkeys((offset + i) // PAGE_SIZE for i in range(length)))
    assert r.gpns() == tuple(gpns[p] for p in touched)
    assert r.is_empty() == (length == 0)


@settings(deadline=None)
@given(paged_ranges(), st.data())
def test_subrange_composition(spec: tuple[int, int, list[int]], data: st.DataObject) -> None:
    offset, length, gpns = spec
    r = PagedRange(offset, length, gpns)
    a = data.draw(st.integers(0, length))
    b = data.draw(st.integers(0, length - a))
    s = r.subrange(a, b)
    assert range_gpas(s) == range_gpas(r)[a : a + b]
    c = data.draw(st.integers(0, b))
    d = data.draw(st.integers(0, b - c))
    assert range_gpas(s.subrange(c, d)) == range_gpas(r.subrange(a + c, d))
    assert s.subrange(c, d) == r.subrange(a + c, d)
    head, tail = r.split(a)
    assert range_gpas(head) + range_gpas(tail) == range_gpas(r)


@settings(deadline=None)
@given(paged_ranges(), st.integers(-5, 3 * PAGE_SIZE), st.integers(-5, 3 * PAGE_SIZE))
def test_subrange_out_of_bounds(spec: tuple[int, int, list[int]], a: int, b: int) -> None:
    r = PagedRange(*spec)
    if 0 <= a and 0 <= b and a + b <= len(r):
        assert len(r.subrange(a, b)) == b
    else:
        with pytest.raises(ValueError):
            r.subrange(a, b)


@settings(deadline=None)
@given(
    st.integers(-3 * PAGE_SIZE, 3 * PAGE_SIZE),
    st.integers(-3 * PAGE_SIZE, 3 * PAGE_SIZE),
    st.integers(0, 3),
)
def test_constructor_accepts_exactly_the_valid_bounds(offset: int, length: int, n: int) -> None:
    valid = 0 <= offset <= n * PAGE_SIZE and 0 <= length <= n * PAGE_SIZE - offset
    if valid:
        assert len(PagedRange(offset, length, list(range(n)))) == length
    else:
        with pytest.raises(ValueError):
            PagedRange(offset, length, list(range(n)))


buffer_lists = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 16 * PAGE_SIZE),
            st.integers(0, 16).map(lambda p: p * PAGE_SIZE),
        ),
        st.one_of(
            st.integers(0, 3 * PAGE_SIZE),
            st.integers(0, 3).map(lambda p: p * PAGE_SIZE),
        ),
    ),
    max_size=6,
)


def mergeable(buffers: list[tuple[int, int]]) -> bool:
    nonempty = [(g, n) for g, n in buffers if n]
    for (g0, n0), (g1, _) in itertools.pairwise(nonempty):
        end = g0 + n0
        if end != g1 and (end % PAGE_SIZE or g1 % PAGE_SIZE):
            return False
    return True


def chain_gpas(buffers: list[tuple[int, int]]) -> list[int]:
    return [g for gpa, n in buffers for g in range(gpa, gpa + n)]


@settings(max_examples=200, deadline=None)
@given(buffer_lists)
def test_from_buffers_model(buffers: list[tuple[int, int]]) -> None:
    r = paged_range_from_buffers(buffers)
    if not mergeable(buffers):
        assert r is None
    else:
        assert r is not None
        assert range_gpas(r) == chain_gpas(buffers)
        ranges = r.ranges()
        for a, b in itertools.pairwise(ranges):
            assert a.end != b.start
        # the same range rebuilt from its own page list is equal
        assert PagedRange(r.offset(), len(r), list(r.gpns())) == r


@settings(max_examples=200, deadline=None)
@given(buffer_lists)
def test_split_into_fewest_ranges(buffers: list[tuple[int, int]]) -> None:
    parts = paged_ranges_from_buffers(buffers)
    assert [g for p in parts for g in range_gpas(p)] == chain_gpas(buffers)
    assert len(parts) >= 1
    assert all(not p.is_empty() for p in parts) or len(parts) == 1
    # splitting only where needed: adjacent parts cannot be merged
    for a, b in itertools.pairwise(parts):
        end = a.ranges()[-1].end
        start = b.ranges()[0].start
        assert end != start and (end % PAGE_SIZE or start % PAGE_SIZE)


@settings(deadline=None)
@given(
    st.lists(st.integers(), max_size=5),
    st.integers(0, 5 * PAGE_SIZE),
    st.integers(0, 5 * PAGE_SIZE),
)
def test_any_page_numbers_only_raise_access_errors(gpns: list[int], offset: int, n: int) -> None:
    assume(offset <= len(gpns) * PAGE_SIZE and n <= len(gpns) * PAGE_SIZE - offset)
    r = PagedRange(offset, n, gpns)
    try:
        ranges = r.ranges()
    except AccessError:
        assert any(g < 0 or g >= 1 << 52 for g in r.gpns())
    else:
        assert sum(len(a) for a in ranges) == n
    r.gpns()
    r.subrange(0, n)
