"""vhost_user.protocol.codec: wire layouts, round trips, the parser's refusal of bad payloads."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.errors import FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.protocol.codec import Request


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


messages = st.one_of(
    st.builds(codec.GetFeatures),
    st.builds(codec.SetFeatures, u64),
    st.builds(codec.GetProtocolFeatures),
    st.builds(codec.SetProtocolFeatures, u64),
    st.builds(codec.SetOwner),
    st.builds(codec.ResetOwner),
    mem_tables(),
    st.builds(codec.GetMaxMemSlots),
    st.builds(codec.AddMemReg, regions, fd),
    st.builds(codec.RemMemReg, regions, st.none() | fd),
    st.builds(codec.SetVringNum, u32, u32),
    st.builds(codec.SetVringAddr, u32, u32, u64, u64, u64, u64),
    st.builds(codec.SetVringBase, u32, u32),
    st.builds(codec.GetVringBase, u32, u32),
    st.builds(codec.SetVringKick, u8, st.none() | fd),
    st.builds(codec.SetVringCall, u8, st.none() | fd),
    st.builds(codec.SetVringErr, u8, st.none() | fd),
    st.builds(codec.SetVringEnable, u32, st.booleans()),
    st.builds(codec.GetQueueNum),
    st.builds(codec.SetConfig, u32, st.binary(max_size=256), st.sampled_from([0, 1])),
    st.builds(codec.SetBackendReqFd, fd),
    st.builds(codec.GetInflightFd, u64, u64, u16, u16),
    st.builds(codec.SetInflightFd, u64, u64, u16, u16, fd),
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
            r.request not in (Request.GET_VRING_BASE, Request.GET_CONFIG, Request.GET_INFLIGHT_FD)
        )
    ),
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
    msg = parse(frame(Request.SET_LOG_BASE, bytes(16)))
    assert isinstance(msg, codec.UnknownRequest)
    assert msg.request == Request.SET_LOG_BASE


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
