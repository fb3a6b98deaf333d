"""vhost_user.protocol.codec: wire layouts, round trips, the parser's refusal of bad payloads."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.errors import FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.protocol.codec import BackendRequest, Request
from vhost_user.protocol.messages import (
    BACKEND_REQUESTS,
    REQUESTS,
    U64_REPLY,
    Layout,
    ReplyRow,
    Row,
    layout_sizes,
)


def parse(data: bytes, fds: tuple[int, ...] = ()) -> codec.Message:
    header = codec.parse_header(data[: codec.HEADER.size])
    return codec.parse_request(header, data[codec.HEADER.size :], fds)


def frame(request: int, payload: bytes, flags: int = codec.VERSION) -> bytes:
    return codec.HEADER.pack(request, flags, len(payload)) + payload


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (codec.HEADER, 12),
        (codec.U64, 8),
        (codec.VRING_STATE, 8),
        (codec.VRING_ADDR, 40),
        (codec.MEMORY_REGION, 32),
        (codec.MEMORY_TABLE_HEADER, 8),
        (codec.SINGLE_MEMORY_REGION, 40),
        (codec.CONFIG_HEADER, 12),
        (codec.INFLIGHT, 24),
    ],
)
def test_layout_sizes_match_qemu(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


def test_header_bytes_are_little_endian_request_flags_size() -> None:
    data = codec.serialize(codec.SetVringNum(1, 256, need_reply=True))
    assert data[:12] == bytes.fromhex("080000000900000008000000")
    assert data[12:] == bytes.fromhex("0100000000010000")


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
fd = st.integers(3, 1000)
regions = st.builds(codec.MemRegion, u64, u64, u64, u64)


@st.composite
def mem_tables(draw: st.DrawFn) -> codec.SetMemTable:
    rs = tuple(draw(st.lists(regions, max_size=codec.MAX_MEM_TABLE_REGIONS)))
    return codec.SetMemTable(rs, tuple(draw(fd) for _ in rs))


config_flags = st.sampled_from([codec.CONFIG_FLAG_FRONTEND, codec.CONFIG_FLAG_MIGRATION])

EXAMPLES: dict[type[Any], st.SearchStrategy[Any]] = {
    codec.GetFeatures: st.builds(codec.GetFeatures),
    codec.SetFeatures: st.builds(codec.SetFeatures, u64),
    codec.GetProtocolFeatures: st.builds(codec.GetProtocolFeatures),
    codec.SetProtocolFeatures: st.builds(codec.SetProtocolFeatures, u64),
    codec.SetOwner: st.builds(codec.SetOwner),
    codec.ResetOwner: st.builds(codec.ResetOwner),
    codec.SetMemTable: mem_tables(),
    codec.SetLogBase: st.builds(codec.SetLogBase, u64, u64, fd),
    codec.SetLogFd: st.builds(codec.SetLogFd, fd),
    codec.GetMaxMemSlots: st.builds(codec.GetMaxMemSlots),
    codec.AddMemReg: st.builds(codec.AddMemReg, regions, fd),
    codec.RemMemReg: st.builds(codec.RemMemReg, regions, st.none() | fd),
    codec.SetVringNum: st.builds(codec.SetVringNum, u32, u32),
    codec.SetVringAddr: st.builds(codec.SetVringAddr, u32, u32, u64, u64, u64, u64),
    codec.SetVringBase: st.builds(codec.SetVringBase, u32, u32),
    codec.GetVringBase: st.builds(codec.GetVringBase, u32, u32),
    codec.SetVringKick: st.builds(codec.SetVringKick, u8, st.none() | fd),
    codec.SetVringCall: st.builds(codec.SetVringCall, u8, st.none() | fd),
    codec.SetVringErr: st.builds(codec.SetVringErr, u8, st.none() | fd),
    codec.SetVringEnable: st.builds(codec.SetVringEnable, u32, st.booleans()),
    codec.GetQueueNum: st.builds(codec.GetQueueNum),
    codec.GetConfig: st.builds(codec.GetConfig, u32, st.integers(0, 256), config_flags),
    codec.SetConfig: st.builds(codec.SetConfig, u32, st.binary(max_size=256), config_flags),
    codec.SetBackendReqFd: st.builds(codec.SetBackendReqFd, fd),
    codec.GetInflightFd: st.builds(codec.GetInflightFd, u64, u64, u16, u16),
    codec.SetInflightFd: st.builds(codec.SetInflightFd, u64, u64, u16, u16, fd),
    codec.ConfigChangeMsg: st.builds(codec.ConfigChangeMsg),
}
"""One strategy per message class of the table (requests and backend requests)."""

REPLY_EXAMPLES: dict[type[Any], Callable[[int], st.SearchStrategy[Any]]] = {
    codec.U64Reply: lambda code: st.builds(codec.U64Reply, st.just(code), u64),
    codec.VringStateReply: lambda code: st.builds(codec.VringStateReply, u32, u32, st.just(code)),
    # An empty ``data`` is the failure reply, which does not keep its offset and flags
    # (test_failed_get_config_reply_is_empty).
    codec.ConfigReply: lambda code: st.builds(
        codec.ConfigReply, u32, st.binary(min_size=1, max_size=256), config_flags, st.just(code)
    ),
    codec.InflightReply: lambda code: st.builds(
        codec.InflightReply, u64, u64, u16, u16, fd, st.just(code)
    ),
    codec.LogBaseReply: lambda code: st.builds(codec.LogBaseReply, st.just(code)),
}
"""One strategy per reply class, given the code of the request it answers."""

messages = st.one_of(
    *(EXAMPLES[row.message] for row in REQUESTS),
    st.builds(codec.UnknownRequest, st.integers(41, 2**32 - 1), st.binary(max_size=64)),
)


@given(messages, st.booleans())
def test_requests_round_trip(msg: codec.Message, need_reply: bool) -> None:
    msg = dataclasses.replace(msg, need_reply=need_reply)
    data = codec.serialize(msg)
    assert len(data) == codec.HEADER.size + codec.HEADER.unpack_from(data)[2]
    assert parse(data, msg.fds) == msg


@given(st.integers(0, 256), u32)
def test_get_config_round_trips(size: int, offset: int) -> None:
    msg = codec.GetConfig(offset, size, need_reply=False)
    assert parse(codec.serialize(msg)) == msg


replies = st.one_of(
    st.builds(codec.U64Reply, st.sampled_from(list(Request)), u64).filter(
        lambda r: (
            r.request
            not in (
                Request.GET_VRING_BASE,
                Request.GET_CONFIG,
                Request.GET_INFLIGHT_FD,
                Request.SET_LOG_BASE,
            )
        )
    ),
    st.builds(codec.LogBaseReply),
    st.builds(codec.VringStateReply, u32, u32),
    st.builds(codec.ConfigReply, u32, st.binary(min_size=1, max_size=256), st.sampled_from([0, 1])),
    st.builds(codec.InflightReply, u64, u64, u16, u16, fd),
)


@given(replies)
def test_replies_round_trip(reply: codec.Reply) -> None:
    data = codec.serialize_reply(reply)
    header = codec.parse_header(data[:12])
    assert header.is_reply
    fds = (reply.fd,) if isinstance(reply, codec.InflightReply) else ()
    assert codec.parse_reply(reply.request, header, data[12:], fds) == reply


def test_failed_get_config_reply_is_empty() -> None:
    data = codec.serialize_reply(codec.ConfigReply(0, b""))
    header = codec.parse_header(data[:12])
    assert header.size == 0
    assert codec.parse_reply(Request.GET_CONFIG, header, b"") == codec.ConfigReply(0, b"")


def test_backend_config_change_round_trips() -> None:
    data = codec.serialize(codec.ConfigChangeMsg(need_reply=True))
    assert codec.HEADER.unpack_from(data) == (2, codec.VERSION | codec.FLAG_NEED_REPLY, 0)
    header = codec.parse_header(data[:12])
    assert codec.parse_backend_request(header, b"") == codec.ConfigChangeMsg(need_reply=True)


def test_unknown_request_is_a_message_not_an_error() -> None:
    msg = parse(frame(9999, b"abc"), (7,))
    assert msg == codec.UnknownRequest(9999, b"abc", (7,))
    assert msg.fds == (7,)


def test_known_but_unimplemented_request_is_unknown() -> None:
    msg = parse(frame(Request.SEND_RARP, bytes(8)))
    assert isinstance(msg, codec.UnknownRequest)
    assert msg.request == Request.SEND_RARP


def test_set_log_base_needs_its_fd() -> None:
    with pytest.raises(FrontendProtocolError, match="SET_LOG_BASE: carries 0 fds"):
        parse(frame(Request.SET_LOG_BASE, codec.LOG.pack(4096, 0)))


def test_vring_fd_flag_bits() -> None:
    assert parse(frame(Request.SET_VRING_KICK, codec.U64.pack(3)), (9,)) == codec.SetVringKick(3, 9)
    nofd = parse(frame(Request.SET_VRING_CALL, codec.U64.pack(0x100 | 5)))
    assert nofd == codec.SetVringCall(5, None)


BAD = [
    ("size 8 for no-payload", frame(Request.GET_FEATURES, bytes(8)), (), "payload is 8 bytes"),
    ("short u64", frame(Request.SET_FEATURES, bytes(4)), (), "expected 8"),
    ("fd on SET_FEATURES", frame(Request.SET_FEATURES, bytes(8)), (5,), "carries 1 fds"),
    ("vring state 12 bytes", frame(Request.SET_VRING_NUM, bytes(12)), (), "expected 8"),
    ("vring addr short", frame(Request.SET_VRING_ADDR, bytes(32)), (), "expected 40"),
    (
        "too many regions",
        frame(Request.SET_MEM_TABLE, codec.MEMORY_TABLE_HEADER.pack(9, 0) + bytes(9 * 32)),
        tuple(range(3, 11)),
        "9 regions",
    ),
    (
        "region count vs payload",
        frame(Request.SET_MEM_TABLE, codec.MEMORY_TABLE_HEADER.pack(2, 0) + bytes(32)),
        (3, 4),
        "expected 72",
    ),
    (
        "region count vs fds",
        frame(Request.SET_MEM_TABLE, codec.MEMORY_TABLE_HEADER.pack(2, 0) + bytes(64)),
        (3,),
        "carries 1 fds, expected 2",
    ),
    ("mem table no header", frame(Request.SET_MEM_TABLE, bytes(4)), (), "no region count"),
    ("add region no fd", frame(Request.ADD_MEM_REG, bytes(40)), (), "expected 1"),
    ("rem region two fds", frame(Request.REM_MEM_REG, bytes(40)), (3, 4), "expected 0 or 1"),
    ("kick without fd", frame(Request.SET_VRING_KICK, codec.U64.pack(0)), (), "expected 1"),
    ("kick two fds", frame(Request.SET_VRING_KICK, codec.U64.pack(0)), (3, 4), "expected 1"),
    (
        "nofd flag with fd",
        frame(Request.SET_VRING_CALL, codec.U64.pack(0x100)),
        (3,),
        "no-fd flag set",
    ),
    (
        "reserved fd bits",
        frame(Request.SET_VRING_ERR, codec.U64.pack(1 << 9)),
        (3,),
        "reserved bits",
    ),
    (
        "config too big",
        frame(Request.GET_CONFIG, codec.CONFIG_HEADER.pack(0, 257, 0) + bytes(257)),
        (),
        "exceeds 256",
    ),
    (
        "config size mismatch",
        frame(Request.SET_CONFIG, codec.CONFIG_HEADER.pack(0, 8, 0) + bytes(4)),
        (),
        "expected 20",
    ),
    (
        "config flags",
        frame(Request.SET_CONFIG, codec.CONFIG_HEADER.pack(0, 1, 7) + bytes(1)),
        (),
        "config flags",
    ),
    ("config no header", frame(Request.GET_CONFIG, bytes(4)), (), "no config header"),
    ("enable 2", frame(Request.SET_VRING_ENABLE, codec.VRING_STATE.pack(0, 2)), (), "neither"),
    ("backend fd missing", frame(Request.SET_BACKEND_REQ_FD, b""), (), "expected 1"),
    ("reply flag", frame(Request.SET_OWNER, b"", codec.VERSION | codec.FLAG_REPLY), (), "REPLY"),
    ("too many fds", frame(9999, b""), tuple(range(3, 12)), "at most 8"),
]


@pytest.mark.parametrize(("data", "fds", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_payloads_are_protocol_errors(data: bytes, fds: tuple[int, ...], match: str) -> None:
    with pytest.raises(FrontendProtocolError, match=match):
        parse(data, fds)


@pytest.mark.parametrize("flags", [0, 2, 3])
def test_wrong_version_is_rejected(flags: int) -> None:
    with pytest.raises(FrontendProtocolError, match="version"):
        codec.parse_header(codec.HEADER.pack(1, flags, 0))


def test_oversized_payload_is_rejected_from_the_header() -> None:
    with pytest.raises(FrontendProtocolError, match="exceeds"):
        codec.parse_header(codec.HEADER.pack(1, 1, codec.MAX_PAYLOAD + 1))


def test_reply_to_other_request_is_rejected() -> None:
    data = codec.serialize_reply(codec.U64Reply(Request.GET_FEATURES, 1))
    with pytest.raises(FrontendProtocolError, match="reply is for request 1"):
        codec.parse_reply(Request.GET_QUEUE_NUM, codec.parse_header(data[:12]), data[12:])


@given(
    request=st.one_of(st.sampled_from(list(Request)), u32),
    flags=u32,
    payload=st.binary(max_size=600),
    nfds=st.integers(0, 10),
)
def test_parser_raises_only_protocol_errors(
    request: int, flags: int, payload: bytes, nfds: int
) -> None:
    data = codec.HEADER.pack(request, flags, len(payload))
    fds = tuple(range(100, 100 + nfds))
    try:
        header = codec.parse_header(data)
        msg = codec.parse_request(header, payload, fds)
    except FrontendProtocolError:
        return
    assert set(msg.fds) <= set(fds)


@given(
    request=st.sampled_from(list(Request)),
    payload=st.binary(max_size=300),
    nfds=st.integers(0, 3),
)
def test_reply_parser_raises_only_protocol_errors(request: int, payload: bytes, nfds: int) -> None:
    header = codec.Header(request, codec.VERSION | codec.FLAG_REPLY, len(payload))
    try:
        codec.parse_reply(request, header, payload, tuple(range(100, 100 + nfds)))
    except FrontendProtocolError:
        pass


@given(
    fields=st.tuples(u32, u32, u32, u32),
    extra=st.binary(max_size=8),
    nfds=st.integers(0, 2),
)
def test_structured_fuzz_of_fixed_layouts(
    fields: tuple[int, int, int, int], extra: bytes, nfds: int
) -> None:
    """Payloads that look almost right (valid-ish numbers, a few stray bytes) for every
    request with a fixed layout: still only protocol errors."""
    body = struct.pack("<IIII", *fields) + extra
    for request in Request:
        for cut in (4, 8, 16, len(body)):
            try:
                parse(frame(request, body[:cut]), tuple(range(50, 50 + nfds)))
            except FrontendProtocolError:
                pass


# -- the table: every row's layout, round trip and size checks ---------------------------------

ROWS = [*REQUESTS, *BACKEND_REQUESTS]
REPLY_ROWS = [(row, row.reply or U64_REPLY) for row in REQUESTS]
"""Every request with the body it is answered by: its natural reply, or REPLY_ACK's u64."""
DISTINCT_REPLY_ROWS = [pair for pair in REPLY_ROWS if pair[0].reply] + [
    next(pair for pair in REPLY_ROWS if not pair[0].reply)
]
"""The natural replies, and one REPLY_ACK (the ack layout is the same for every request)."""


def row_name(row: Row) -> str:
    return (BackendRequest if row in BACKEND_REQUESTS else Request)(row.code).name


def parse_row(row: Row, wire: bytes, fds: tuple[int, ...]) -> codec.Message:
    header = codec.parse_header(wire[: codec.HEADER.size])
    parse_fn = codec.parse_backend_request if row in BACKEND_REQUESTS else codec.parse_request
    return parse_fn(header, wire[codec.HEADER.size :], fds)


def fits(layout: Layout, payload: bytes) -> bool:
    fixed, per_item = layout_sizes(layout)
    extra = len(payload) - fixed
    return extra == 0 if per_item == 0 else extra >= 0 and extra % per_item == 0


# QEMU's docs/interop/vhost-user.rst, "Message Specification" / "Payload": (fixed bytes, bytes
# per item after them). No payload: 0. "A single 64-bit integer": 8. "A vring state
# description": 2 x 32 bits. "A vring address description": 40, the size of QEMU's
# vhost_vring_addr (the table's "size" column is no field). "Memory regions description":
# 32-bit count and padding, then 4 x 64-bit regions. "Single memory region description": 64-bit
# padding and one region. "Virtio device config space": 3 x 32 bits, then "size" bytes.
# "Inflight description": 2 x 64 + 2 x 16 bits, which QEMU's unpacked VhostUserInflight pads
# to 24. "Log description": 2 x 64 bits (mmap size, offset); SET_LOG_BASE's reply has none.
SPEC_SIZES: dict[type[Any], tuple[int, int]] = {
    codec.GetFeatures: (0, 0),
    codec.SetFeatures: (8, 0),
    codec.SetOwner: (0, 0),
    codec.ResetOwner: (0, 0),
    codec.SetMemTable: (8, 32),
    codec.SetLogBase: (16, 0),
    codec.SetLogFd: (0, 0),
    codec.SetVringNum: (8, 0),
    codec.SetVringAddr: (40, 0),
    codec.SetVringBase: (8, 0),
    codec.GetVringBase: (8, 0),
    codec.SetVringKick: (8, 0),
    codec.SetVringCall: (8, 0),
    codec.SetVringErr: (8, 0),
    codec.GetProtocolFeatures: (0, 0),
    codec.SetProtocolFeatures: (8, 0),
    codec.GetQueueNum: (0, 0),
    codec.SetVringEnable: (8, 0),
    codec.SetBackendReqFd: (0, 0),
    codec.GetConfig: (12, 1),
    codec.SetConfig: (12, 1),
    codec.GetInflightFd: (24, 0),
    codec.SetInflightFd: (24, 0),
    codec.GetMaxMemSlots: (0, 0),
    codec.AddMemReg: (40, 0),
    codec.RemMemReg: (40, 0),
    codec.ConfigChangeMsg: (0, 0),
    codec.U64Reply: (8, 0),
    codec.VringStateReply: (8, 0),
    codec.ConfigReply: (12, 1),
    codec.InflightReply: (24, 0),
    codec.LogBaseReply: (0, 0),
}


def test_rows_are_unique_and_named_after_their_codes() -> None:
    for table in (REQUESTS, BACKEND_REQUESTS):
        assert len({row.code for row in table}) == len(table)
    assert len({row.message for row in ROWS}) == len(ROWS)
    for row in ROWS:
        camel = "".join(word.capitalize() for word in row_name(row).split("_"))
        assert row.message.__name__ == camel


def test_natural_replies_are_the_rows_with_a_reply_body() -> None:
    assert codec.NATURAL_REPLIES == {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
        Request.SET_LOG_BASE,
    }


@pytest.mark.parametrize("row", ROWS, ids=row_name)
def test_row_layout_sizes_match_qemu(row: Row) -> None:
    assert layout_sizes(row.layout) == SPEC_SIZES[row.message]
    if row.reply is not None:
        assert layout_sizes(row.reply.layout) == SPEC_SIZES[row.reply.message]


@pytest.mark.parametrize("row", ROWS, ids=row_name)
@given(data=st.data(), need_reply=st.booleans())
def test_every_row_round_trips(row: Row, data: st.DataObject, need_reply: bool) -> None:
    msg = dataclasses.replace(data.draw(EXAMPLES[row.message]), need_reply=need_reply)
    wire = codec.serialize(msg)
    assert codec.HEADER.unpack_from(wire)[0] == row.code == codec.request_code(msg)
    assert fits(row.layout, wire[codec.HEADER.size :])
    assert parse_row(row, wire, msg.fds) == msg


@pytest.mark.parametrize(("row", "shape"), REPLY_ROWS, ids=[row_name(r) for r, _ in REPLY_ROWS])
@given(data=st.data())
def test_every_reply_round_trips(row: Row, shape: ReplyRow, data: st.DataObject) -> None:
    reply = data.draw(REPLY_EXAMPLES[shape.message](row.code))
    wire = codec.serialize_reply(reply)
    header = codec.parse_header(wire[: codec.HEADER.size])
    assert header.is_reply and header.request == row.code
    assert fits(shape.layout, wire[codec.HEADER.size :])
    fds = (reply.fd,) if isinstance(reply, codec.InflightReply) else ()
    assert codec.parse_reply(row.code, header, wire[codec.HEADER.size :], fds) == reply


def resized(data: st.DataObject, payload: bytes) -> bytes:
    """``payload`` cut short or padded: at least one byte off, either way."""
    cut = st.integers(0, len(payload) - 1).map(lambda n: payload[:n])
    pad = st.binary(min_size=1, max_size=16).map(lambda extra: payload + extra)
    return data.draw(st.one_of(cut, pad) if payload else pad)


FIXED_ROWS = [row for row in ROWS if layout_sizes(row.layout)[1] == 0]
FIXED_REPLY_ROWS = [
    (r, shape) for r, shape in DISTINCT_REPLY_ROWS if layout_sizes(shape.layout)[1] == 0
]


@pytest.mark.parametrize("row", FIXED_ROWS, ids=row_name)
@given(data=st.data())
def test_fixed_size_rows_refuse_truncated_or_padded_payloads(row: Row, data: st.DataObject) -> None:
    msg = data.draw(EXAMPLES[row.message])
    payload = resized(data, codec.serialize(msg)[codec.HEADER.size :])
    expected = f"^{row_name(row)}: payload is {len(payload)} bytes, expected {row.layout.size}$"
    with pytest.raises(FrontendProtocolError, match=expected):
        parse_row(row, frame(row.code, payload), msg.fds)


@pytest.mark.parametrize(
    ("row", "shape"), FIXED_REPLY_ROWS, ids=[row_name(r) for r, _ in FIXED_REPLY_ROWS]
)
@given(data=st.data())
def test_fixed_size_replies_refuse_truncated_or_padded_payloads(
    row: Row, shape: ReplyRow, data: st.DataObject
) -> None:
    reply = data.draw(REPLY_EXAMPLES[shape.message](row.code))
    payload = resized(data, codec.serialize_reply(reply)[codec.HEADER.size :])
    fds = (reply.fd,) if isinstance(reply, codec.InflightReply) else ()
    header = codec.Header(row.code, codec.VERSION | codec.FLAG_REPLY, len(payload))
    expected = f"^{row_name(row)}: payload is {len(payload)} bytes, expected {shape.layout.size}$"
    with pytest.raises(FrontendProtocolError, match=expected):
        codec.parse_reply(row.code, header, payload, fds)


def test_backend_channel_ack_is_named_after_the_backend_request() -> None:
    code = BackendRequest.CONFIG_CHANGE_MSG
    data = codec.serialize_reply(codec.U64Reply(code, 0))
    header = codec.parse_header(data[:12])
    assert codec.parse_reply(code, header, data[12:]) == codec.U64Reply(code, 0)
    with pytest.raises(FrontendProtocolError, match=r"^CONFIG_CHANGE_MSG: payload is 4 bytes"):
        codec.parse_reply(code, dataclasses.replace(header, size=4), bytes(4))
