"""vhost-user parse and serialize, derived from the message table. No I/O.

The messages are written once, in :mod:`vhost_user.protocol.messages`: wire layouts, codes,
message classes, and the table with one row per request (code, class, payload layout, fds,
natural reply). This module owns turning bytes and fds into those messages and back, and it
does so only from the rows: no request is named here. It re-exports the messages, so
``codec`` stays the one import for the rest of the tree.

A message is a 12-byte header (``request``, ``flags``, ``size``, all u32 in native byte order,
which is little endian on every host this runs on) followed by ``size`` payload bytes. File
descriptors travel beside the bytes in SCM_RIGHTS ancillary data, so parsing takes ``(header,
payload, fds)`` and message types carry their fds as plain ints.

fd ownership: :func:`parse_request` and :func:`parse_reply` never close anything. On success
the fds belong to the returned message (whoever handles the message closes them); when they
raise, the fds still belong to the caller (``vhost_user.transport`` closes them).

Every payload is checked before it becomes a message: exact size for fixed layouts, counts
within bounds, exactly the fds the request carries. Anything else is
:class:`~vhost_user.errors.FrontendProtocolError` naming the request and the problem; an
unknown request code is not an error here but an :class:`UnknownRequest` (the connection
decides what to do with it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, assert_never

from vhost_user.errors import FrontendProtocolError
from vhost_user.protocol.messages import (
    BACKEND_REQUESTS,
    CONFIG_FLAG_FRONTEND,
    CONFIG_FLAG_MIGRATION,
    CONFIG_HEADER,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    INFLIGHT,
    LOG,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_TABLE_REGIONS,
    MAX_PAYLOAD,
    MEMORY_REGION,
    MEMORY_TABLE_HEADER,
    REQUESTS,
    SET_SLAVE_REQ_FD,
    SINGLE_MEMORY_REGION,
    U64,
    U64_REPLY,
    VERSION,
    VERSION_MASK,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    AddMemReg,
    BackendRequest,
    ConfigChangeMsg,
    ConfigReply,
    Fds,
    GetConfig,
    GetFeatures,
    GetInflightFd,
    GetMaxMemSlots,
    GetProtocolFeatures,
    GetQueueNum,
    GetVringBase,
    Header,
    InflightReply,
    Layout,
    LogBaseReply,
    MemRegion,
    Message,
    PayloadError,
    ProtocolFeature,
    RemMemReg,
    Reply,
    ReplyRow,
    Request,
    ResetOwner,
    Row,
    SetBackendReqFd,
    SetConfig,
    SetFeatures,
    SetInflightFd,
    SetLogBase,
    SetLogFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    U64Reply,
    UnknownRequest,
    VringStateReply,
    layout_sizes,
)

__all__ = [
    "CONFIG_FLAG_FRONTEND",
    "CONFIG_FLAG_MIGRATION",
    "CONFIG_HEADER",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER",
    "INFLIGHT",
    "LOG",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_TABLE_REGIONS",
    "MAX_PAYLOAD",
    "MEMORY_REGION",
    "MEMORY_TABLE_HEADER",
    "NATURAL_REPLIES",
    "SET_SLAVE_REQ_FD",
    "SINGLE_MEMORY_REGION",
    "U64",
    "VERSION",
    "VERSION_MASK",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VRING_ADDR",
    "VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_NOFD_MASK",
    "VRING_STATE",
    "AddMemReg",
    "BackendRequest",
    "ConfigChangeMsg",
    "ConfigReply",
    "GetConfig",
    "GetFeatures",
    "GetInflightFd",
    "GetMaxMemSlots",
    "GetProtocolFeatures",
    "GetQueueNum",
    "GetVringBase",
    "Header",
    "InflightReply",
    "LogBaseReply",
    "MemRegion",
    "Message",
    "ProtocolFeature",
    "RemMemReg",
    "Reply",
    "Request",
    "ResetOwner",
    "SetBackendReqFd",
    "SetConfig",
    "SetFeatures",
    "SetInflightFd",
    "SetLogBase",
    "SetLogFd",
    "SetMemTable",
    "SetOwner",
    "SetProtocolFeatures",
    "SetVringAddr",
    "SetVringBase",
    "SetVringCall",
    "SetVringEnable",
    "SetVringErr",
    "SetVringKick",
    "SetVringNum",
    "U64Reply",
    "UnknownRequest",
    "VringStateReply",
    "parse_backend_request",
    "parse_header",
    "parse_reply",
    "parse_request",
    "request_code",
    "serialize",
    "serialize_reply",
]

# -- lookups derived from the table ------------------------------------------------------------

_REQUEST_ROWS: dict[int, Row] = {row.code: row for row in REQUESTS}
_BACKEND_ROWS: dict[int, Row] = {row.code: row for row in BACKEND_REQUESTS}
_ROW_OF: dict[type[Message], Row] = {row.message: row for row in (*REQUESTS, *BACKEND_REQUESTS)}
_REPLY_ROW_OF: dict[type[Reply], ReplyRow] = {
    shape.message: shape
    for shape in (U64_REPLY, *(row.reply for row in REQUESTS if row.reply is not None))
}

NATURAL_REPLIES = frozenset(row.code for row in REQUESTS if row.reply is not None)
"""Requests that always get a reply body; NEED_REPLY changes nothing for them (spec,
"REPLY_ACK")."""

_T = TypeVar("_T")


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _backend_name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"backend request {request}"


def _payload_fields(cls: type[Any], header_field: str) -> tuple[str, ...]:
    """``cls``'s fields in order, less the one the header carries (``need_reply`` of a request,
    ``request`` of a reply): the payload's fields, then the fd field if there is one."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != header_field)


# -- parsing -----------------------------------------------------------------------------------


def parse_header(data: bytes) -> Header:
    """Decode and check a header (version, flags, payload bound)."""
    if len(data) != HEADER.size:
        raise FrontendProtocolError(f"header is {len(data)} bytes, expected {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise FrontendProtocolError(f"unsupported protocol version {flags & VERSION_MASK}")
    if size > MAX_PAYLOAD:
        raise FrontendProtocolError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD} limit")
    return Header(request, flags, size)


def _unpack(layout: Layout, payload: bytes) -> tuple[Any, ...]:
    fixed, per_item = layout_sizes(layout)
    if not per_item and len(payload) != fixed:
        raise PayloadError(f"payload is {len(payload)} bytes, expected {fixed}")
    return tuple(layout.unpack(payload))


def _expect_fds(fds: tuple[int, ...], count: int) -> None:
    if len(fds) != count:
        raise PayloadError(f"carries {len(fds)} fds, expected {count}")


def _attach_fds(rule: Fds, values: tuple[Any, ...], fds: tuple[int, ...]) -> tuple[Any, ...]:
    """The message's fields: the payload's ``values`` and the fds, as ``rule`` says."""
    match rule:
        case Fds.NONE:
            _expect_fds(fds, 0)
            return values
        case Fds.ONE:
            _expect_fds(fds, 1)
            return (*values, fds[0])
        case Fds.OPTIONAL:
            if len(fds) > 1:
                raise PayloadError(f"carries {len(fds)} fds, expected 0 or 1")
            return (*values, fds[0] if fds else None)
        case Fds.UNLESS_NOFD:
            *fields, nofd = values
            if nofd:
                if fds:
                    raise PayloadError(f"no-fd flag set but {len(fds)} fds attached")
                return (*fields, None)
            _expect_fds(fds, 1)
            return (*fields, fds[0])
        case Fds.PER_REGION:
            _expect_fds(fds, len(values[-1]))
            return (*values, fds)
        case _:
            assert_never(rule)


def _decode(
    cls: type[_T],
    layout: Layout,
    rule: Fds,
    name: str,
    payload: bytes,
    fds: tuple[int, ...],
    header_field: str,
    header_value: Any,
) -> _T:
    try:
        values = _attach_fds(rule, _unpack(layout, payload), fds)
    except PayloadError as error:
        raise FrontendProtocolError(f"{name}: {error}") from None
    fields = dict(zip(_payload_fields(cls, header_field), values, strict=True))
    return cls(**fields, **{header_field: header_value})


def _decode_request(
    row: Row, name: str, header: Header, payload: bytes, fds: tuple[int, ...]
) -> Message:
    return _decode(
        row.message, row.layout, row.fds, name, payload, fds, "need_reply", header.need_reply
    )


def parse_request(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """Turn one front-end request into a message, or raise FrontendProtocolError.

    Does not close ``fds`` either way (see the module docstring for ownership).
    """
    name = _name(header.request)
    if header.is_reply:
        raise FrontendProtocolError(f"{name}: request has the REPLY flag set")
    if len(payload) != header.size:
        raise FrontendProtocolError(
            f"{name}: header says {header.size} payload bytes, got {len(payload)}"
        )
    if len(fds) > MAX_FDS:
        raise FrontendProtocolError(f"{len(fds)} fds attached, at most {MAX_FDS} allowed")
    row = _REQUEST_ROWS.get(header.request)
    if row is None:
        return UnknownRequest(header.request, bytes(payload), fds, need_reply=header.need_reply)
    return _decode_request(row, name, header, payload, fds)


def parse_backend_request(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """Decode a backend channel request (what a front-end receives on SET_BACKEND_REQ_FD)."""
    if header.is_reply:
        raise FrontendProtocolError(f"backend request {header.request} has the REPLY flag set")
    if len(payload) != header.size:
        raise FrontendProtocolError(
            f"backend request: header says {header.size} bytes, got {len(payload)}"
        )
    row = _BACKEND_ROWS.get(header.request)
    if row is None:
        return UnknownRequest(header.request, bytes(payload), fds, need_reply=header.need_reply)
    return _decode_request(row, _backend_name(header.request), header, payload, fds)


def parse_reply(request: int, header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Reply:
    """Decode the reply to ``request`` (front-end side, and backend channel acks).

    ``request`` is the code that was sent; a reply must echo it and carry the REPLY flag.
    A request without a natural reply is answered by REPLY_ACK's u64 status. The backend
    channel's codes overlap the front-end's (CONFIG_CHANGE_MSG is 2, like SET_FEATURES), so a
    backend request is passed as its :class:`BackendRequest` member: none has a natural reply.
    """
    backend = isinstance(request, BackendRequest)
    name = _backend_name(request) if backend else _name(request)
    if header.request != request:
        raise FrontendProtocolError(f"{name}: reply is for request {header.request}")
    if not header.is_reply:
        raise FrontendProtocolError(f"{name}: reply lacks the REPLY flag")
    if len(payload) != header.size:
        raise FrontendProtocolError(f"{name}: header says {header.size} bytes, got {len(payload)}")
    row = None if backend else _REQUEST_ROWS.get(request)
    shape = row.reply if row is not None and row.reply is not None else U64_REPLY
    return _decode(shape.message, shape.layout, shape.fds, name, payload, fds, "request", request)


# -- serializing -------------------------------------------------------------------------------


def _frame(request: int, payload: bytes, *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def _encode(layout: Layout, rule: Fds, obj: Any, header_field: str) -> bytes:
    """The payload of ``obj``: its fields less the header's and the fds (which travel beside),
    except that a vring fd's absence is the payload's NOFD bit."""
    fields = tuple(getattr(obj, name) for name in _payload_fields(type(obj), header_field))
    match rule:
        case Fds.NONE:
            values = fields
        case Fds.ONE | Fds.OPTIONAL | Fds.PER_REGION:
            values = fields[:-1]
        case Fds.UNLESS_NOFD:
            *values_, fd = fields
            values = (*values_, fd is None)
        case _:
            assert_never(rule)
    return layout.pack(*values)


def _row_of(msg: Message) -> Row:
    row = _ROW_OF.get(type(msg))
    if row is None:
        raise TypeError(f"not a request: {msg!r}")
    return row


def request_code(msg: Message) -> int:
    """The request code a message is sent with."""
    if isinstance(msg, UnknownRequest):
        return msg.request
    return _row_of(msg).code


def serialize(msg: Message) -> bytes:
    """Header + payload of a request; send ``msg.fds`` beside it."""
    if isinstance(msg, UnknownRequest):
        return _frame(msg.request, msg.payload, need_reply=msg.need_reply)
    row = _row_of(msg)
    payload = _encode(row.layout, row.fds, msg, "need_reply")
    return _frame(row.code, payload, need_reply=msg.need_reply)


def serialize_reply(reply: Reply) -> bytes:
    """Header + payload of a reply (REPLY flag set); an InflightReply's fd goes beside it."""
    shape = _REPLY_ROW_OF.get(type(reply))
    if shape is None:
        raise TypeError(f"not a reply: {reply!r}")
    return _frame(reply.request, _encode(shape.layout, shape.fds, reply, "request"), reply=True)
