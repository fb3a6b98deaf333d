"""vhost-user messages: wire layouts, typed messages, parse and serialize. No I/O.

A message is a 12-byte header (``request``, ``flags``, ``size``, all u32 in native byte order,
which is little endian on every host this runs on) followed by ``size`` payload bytes. File
descriptors travel beside the bytes in SCM_RIGHTS ancillary data, so parsing takes ``(header,
payload, fds)`` and message types carry their fds as plain ints.

fd ownership: :func:`parse_request` and :func:`parse_reply` never close anything. On success
the fds belong to the returned message (whoever handles the message closes them); when they
raise, the fds still belong to the caller (``vhost_user.transport`` closes them).

Every payload is checked before it becomes a message: exact size for fixed layouts, counts
within bounds, exactly the fds the request carries. Anything else is
:class:`~vhost_user.errors.FrontendProtocolError` naming the problem; an unknown request code is
not an error here but an :class:`UnknownRequest` (the connection decides what to do with it).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from vhost_user.errors import FrontendProtocolError

# -- wire layouts ------------------------------------------------------------------------------

HEADER = struct.Struct("<III")
"""request, flags, size."""
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
"""index, num."""
VRING_ADDR = struct.Struct("<IIQQQQ")
"""index, flags, descriptor, used, available, log (the "size" column of the spec's table is
not a field: QEMU's ``struct vhost_vring_addr`` has none, and it is 40 bytes)."""
MEMORY_REGION = struct.Struct("<QQQQ")
"""guest address, size, user address, mmap offset."""
MEMORY_TABLE_HEADER = struct.Struct("<II")
"""nregions, padding; followed by ``nregions`` :data:`MEMORY_REGION`."""
SINGLE_MEMORY_REGION = struct.Struct("<QQQQQ")
"""padding, then one :data:`MEMORY_REGION` (ADD_MEM_REG / REM_MEM_REG)."""
CONFIG_HEADER = struct.Struct("<III")
"""offset, size, flags; followed by ``size`` bytes of config space."""
INFLIGHT = struct.Struct("<QQHH4x")
"""mmap size, mmap offset, num queues, queue size. QEMU's ``VhostUserInflight`` is not packed,
so it ends with 4 bytes of alignment padding (sizeof == 24)."""

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

MAX_PAYLOAD = 4096
"""Largest payload accepted. The biggest real one is a config message (12 + 256 bytes)."""
MAX_FDS = 8
"""Most fds one message carries (SET_MEM_TABLE with 8 regions)."""
MAX_MEM_TABLE_REGIONS = 8
"""``VHOST_MEMORY_BASELINE_NREGIONS``: regions in one SET_MEM_TABLE."""
MAX_CONFIG_SIZE = 256
"""``VHOST_USER_MAX_CONFIG_SIZE``."""

VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
"""SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index, bit 8 says "no fd" (poll)."""
VRING_F_LOG = 1 << 0
"""SET_VRING_ADDR flags: log used-ring writes (only with VHOST_F_LOG_ALL, which we never offer)."""

VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

CONFIG_FLAG_FRONTEND = 0
CONFIG_FLAG_MIGRATION = 1


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class Request(enum.IntEnum):
    """Front-end to backend request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


SET_SLAVE_REQ_FD = Request.SET_BACKEND_REQ_FD
"""The spec's older name for request 21."""


class BackendRequest(enum.IntEnum):
    """Backend to front-end request codes (on the SET_BACKEND_REQ_FD channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every request; ``need_reply`` is the header's NEED_REPLY flag."""

    need_reply: bool = field(default=False, kw_only=True)

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds travelling with this message (owned by whoever holds the message)."""
        return ()


@dataclass(frozen=True, slots=True)
class GetFeatures(Message):
    pass


@dataclass(frozen=True, slots=True)
class SetFeatures(Message):
    features: int


@dataclass(frozen=True, slots=True)
class GetProtocolFeatures(Message):
    pass


@dataclass(frozen=True, slots=True)
class SetProtocolFeatures(Message):
    features: int


@dataclass(frozen=True, slots=True)
class SetOwner(Message):
    pass


@dataclass(frozen=True, slots=True)
class ResetOwner(Message):
    pass


@dataclass(frozen=True, slots=True)
class SetMemTable(Message):
    regions: tuple[MemRegion, ...]
    region_fds: tuple[int, ...]

    @property
    def fds(self) -> tuple[int, ...]:
        return self.region_fds


@dataclass(frozen=True, slots=True)
class GetMaxMemSlots(Message):
    pass


@dataclass(frozen=True, slots=True)
class AddMemReg(Message):
    region: MemRegion
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class RemMemReg(Message):
    """``fd`` is the stray fd some front-ends send (spec: the backend MUST close it unused)."""

    region: MemRegion
    fd: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@dataclass(frozen=True, slots=True)
class SetVringNum(Message):
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class SetVringAddr(Message):
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class SetVringBase(Message):
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class GetVringBase(Message):
    index: int
    num: int = 0


@dataclass(frozen=True, slots=True)
class _VringFd(Message):
    """SET_VRING_KICK/CALL/ERR: ``fd`` None is the spec's invalid-FD flag (bit 8)."""

    index: int
    fd: int | None

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@dataclass(frozen=True, slots=True)
class SetVringKick(_VringFd):
    pass


@dataclass(frozen=True, slots=True)
class SetVringCall(_VringFd):
    pass


@dataclass(frozen=True, slots=True)
class SetVringErr(_VringFd):
    pass


@dataclass(frozen=True, slots=True)
class SetVringEnable(Message):
    index: int
    enable: bool


@dataclass(frozen=True, slots=True)
class GetQueueNum(Message):
    pass


@dataclass(frozen=True, slots=True)
class GetConfig(Message):
    offset: int
    size: int
    flags: int = CONFIG_FLAG_FRONTEND


@dataclass(frozen=True, slots=True)
class SetConfig(Message):
    offset: int
    data: bytes
    flags: int = CONFIG_FLAG_FRONTEND


@dataclass(frozen=True, slots=True)
class SetBackendReqFd(Message):
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class GetInflightFd(Message):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class SetInflightFd(Message):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class UnknownRequest(Message):
    """A request code this backend does not implement, kept verbatim with its fds."""

    request: int
    payload: bytes
    raw_fds: tuple[int, ...] = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return self.raw_fds


# Backend channel requests (backend -> front-end).


@dataclass(frozen=True, slots=True)
class ConfigChangeMsg(Message):
    pass


# Replies (REPLY flag set). ``request`` is the code of the request being answered.


@dataclass(frozen=True, slots=True)
class U64Reply:
    """A u64 reply: GET_FEATURES & co., and the REPLY_ACK status (0 = success)."""

    request: int
    value: int


@dataclass(frozen=True, slots=True)
class VringStateReply:
    """GET_VRING_BASE's reply."""

    index: int
    num: int
    request: int = Request.GET_VRING_BASE


@dataclass(frozen=True, slots=True)
class ConfigReply:
    """GET_CONFIG's reply; an empty ``data`` with size 0 signals failure (spec)."""

    offset: int
    data: bytes
    flags: int = CONFIG_FLAG_FRONTEND
    request: int = Request.GET_CONFIG


@dataclass(frozen=True, slots=True)
class InflightReply:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int
    request: int = Request.GET_INFLIGHT_FD


Reply = U64Reply | VringStateReply | ConfigReply | InflightReply

NATURAL_REPLIES = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
    }
)
"""Requests that always get a reply body; NEED_REPLY changes nothing for them (spec,
"REPLY_ACK")."""


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


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _expect(header: Header, payload: bytes, fds: tuple[int, ...], size: int, nfds: int) -> None:
    if len(payload) != size:
        raise FrontendProtocolError(
            f"{_name(header.request)}: payload is {len(payload)} bytes, expected {size}"
        )
    if len(fds) != nfds:
        raise FrontendProtocolError(
            f"{_name(header.request)}: carries {len(fds)} fds, expected {nfds}"
        )


def _no_fds(header: Header, fds: tuple[int, ...]) -> None:
    if fds:
        raise FrontendProtocolError(f"{_name(header.request)}: carries {len(fds)} fds, expected 0")


def _region(fields: tuple[int, ...]) -> MemRegion:
    return MemRegion(*fields)


def _vring_fd(header: Header, payload: bytes, fds: tuple[int, ...]) -> tuple[int, int | None]:
    if len(payload) != U64.size:
        raise FrontendProtocolError(
            f"{_name(header.request)}: payload is {len(payload)} bytes, expected {U64.size}"
        )
    (value,) = U64.unpack(payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise FrontendProtocolError(f"{_name(header.request)}: reserved bits set in {value:#x}")
    index = value & VRING_INDEX_MASK
    if value & VRING_NOFD_MASK:
        if fds:
            raise FrontendProtocolError(
                f"{_name(header.request)}: no-fd flag set but {len(fds)} fds attached"
            )
        return index, None
    if len(fds) != 1:
        raise FrontendProtocolError(f"{_name(header.request)}: carries {len(fds)} fds, expected 1")
    return index, fds[0]


def _config(header: Header, payload: bytes) -> tuple[int, int, int, bytes]:
    if len(payload) < CONFIG_HEADER.size:
        raise FrontendProtocolError(
            f"{_name(header.request)}: payload of {len(payload)} bytes has no config header"
        )
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise FrontendProtocolError(
            f"{_name(header.request)}: config size {size} exceeds {MAX_CONFIG_SIZE}"
        )
    if len(payload) != CONFIG_HEADER.size + size:
        raise FrontendProtocolError(
            f"{_name(header.request)}: payload is {len(payload)} bytes, "
            f"expected {CONFIG_HEADER.size + size} for a {size}-byte config access"
        )
    if flags not in (CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION):
        raise FrontendProtocolError(f"{_name(header.request)}: unknown config flags {flags:#x}")
    return offset, size, flags, bytes(payload[CONFIG_HEADER.size :])


def parse_request(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """Turn one front-end request into a message, or raise FrontendProtocolError.

    Does not close ``fds`` either way (see the module docstring for ownership).
    """
    if header.is_reply:
        raise FrontendProtocolError(f"{_name(header.request)}: request has the REPLY flag set")
    if len(payload) != header.size:
        raise FrontendProtocolError(
            f"{_name(header.request)}: header says {header.size} payload bytes, got {len(payload)}"
        )
    if len(fds) > MAX_FDS:
        raise FrontendProtocolError(f"{len(fds)} fds attached, at most {MAX_FDS} allowed")
    nr = header.need_reply
    r = header.request
    if r in _NO_PAYLOAD:
        _expect(header, payload, fds, 0, 0)
        return _NO_PAYLOAD[r](need_reply=nr)
    if r in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES):
        _expect(header, payload, fds, U64.size, 0)
        (value,) = U64.unpack(payload)
        if r == Request.SET_FEATURES:
            return SetFeatures(value, need_reply=nr)
        return SetProtocolFeatures(value, need_reply=nr)
    if r == Request.SET_MEM_TABLE:
        if len(payload) < MEMORY_TABLE_HEADER.size:
            raise FrontendProtocolError(
                f"SET_MEM_TABLE: payload of {len(payload)} bytes has no region count"
            )
        nregions, _padding = MEMORY_TABLE_HEADER.unpack_from(payload)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise FrontendProtocolError(
                f"SET_MEM_TABLE: {nregions} regions, at most {MAX_MEM_TABLE_REGIONS} allowed"
            )
        # QEMU sends exactly the regions in use, not the whole 8-slot array.
        _expect(
            header, payload, fds, MEMORY_TABLE_HEADER.size + nregions * MEMORY_REGION.size, nregions
        )
        regions = tuple(
            _region(
                MEMORY_REGION.unpack_from(
                    payload, MEMORY_TABLE_HEADER.size + i * MEMORY_REGION.size
                )
            )
            for i in range(nregions)
        )
        return SetMemTable(regions, fds, need_reply=nr)
    if r == Request.ADD_MEM_REG:
        _expect(header, payload, fds, SINGLE_MEMORY_REGION.size, 1)
        return AddMemReg(_region(SINGLE_MEMORY_REGION.unpack(payload)[1:]), fds[0], need_reply=nr)
    if r == Request.REM_MEM_REG:
        # Spec: "For compatibility with existing incorrect implementations, the backend MAY
        # accept messages with one file descriptor" (and must close it unused).
        _expect(header, payload, fds[:1], SINGLE_MEMORY_REGION.size, len(fds[:1]))
        if len(fds) > 1:
            raise FrontendProtocolError(f"REM_MEM_REG: carries {len(fds)} fds, expected 0 or 1")
        region = _region(SINGLE_MEMORY_REGION.unpack(payload)[1:])
        return RemMemReg(region, fds[0] if fds else None, need_reply=nr)
    if r in _VRING_STATE:
        _expect(header, payload, fds, VRING_STATE.size, 0)
        return _VRING_STATE[r](*VRING_STATE.unpack(payload), need_reply=nr)
    if r == Request.SET_VRING_ENABLE:
        _expect(header, payload, fds, VRING_STATE.size, 0)
        index, num = VRING_STATE.unpack(payload)
        if num not in (0, 1):
            raise FrontendProtocolError(f"SET_VRING_ENABLE: state {num} is neither 0 nor 1")
        return SetVringEnable(index, bool(num), need_reply=nr)
    if r == Request.SET_VRING_ADDR:
        _expect(header, payload, fds, VRING_ADDR.size, 0)
        return SetVringAddr(*VRING_ADDR.unpack(payload), need_reply=nr)
    if r in _VRING_FD:
        index, fd = _vring_fd(header, payload, fds)
        return _VRING_FD[r](index, fd, need_reply=nr)
    if r == Request.GET_CONFIG:
        _no_fds(header, fds)
        offset, size, flags, _data = _config(header, payload)
        return GetConfig(offset, size, flags, need_reply=nr)
    if r == Request.SET_CONFIG:
        _no_fds(header, fds)
        offset, _size, flags, data = _config(header, payload)
        return SetConfig(offset, data, flags, need_reply=nr)
    if r == Request.SET_BACKEND_REQ_FD:
        _expect(header, payload, fds, 0, 1)
        return SetBackendReqFd(fds[0], need_reply=nr)
    if r == Request.GET_INFLIGHT_FD:
        _expect(header, payload, fds, INFLIGHT.size, 0)
        return GetInflightFd(*INFLIGHT.unpack(payload), need_reply=nr)
    if r == Request.SET_INFLIGHT_FD:
        _expect(header, payload, fds, INFLIGHT.size, 1)
        size, offset, num_queues, queue_size = INFLIGHT.unpack(payload)
        return SetInflightFd(size, offset, num_queues, queue_size, fds[0], need_reply=nr)
    return UnknownRequest(r, bytes(payload), fds, need_reply=nr)


_NO_PAYLOAD: dict[int, type[Message]] = {
    Request.GET_FEATURES: GetFeatures,
    Request.GET_PROTOCOL_FEATURES: GetProtocolFeatures,
    Request.SET_OWNER: SetOwner,
    Request.RESET_OWNER: ResetOwner,
    Request.GET_QUEUE_NUM: GetQueueNum,
    Request.GET_MAX_MEM_SLOTS: GetMaxMemSlots,
}
_VRING_STATE: dict[int, type[SetVringNum | SetVringBase | GetVringBase]] = {
    Request.SET_VRING_NUM: SetVringNum,
    Request.SET_VRING_BASE: SetVringBase,
    Request.GET_VRING_BASE: GetVringBase,
}
_VRING_FD: dict[int, type[_VringFd]] = {
    Request.SET_VRING_KICK: SetVringKick,
    Request.SET_VRING_CALL: SetVringCall,
    Request.SET_VRING_ERR: SetVringErr,
}


def parse_backend_request(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """Decode a backend channel request (what a front-end receives on SET_BACKEND_REQ_FD)."""
    if header.is_reply:
        raise FrontendProtocolError(f"backend request {header.request} has the REPLY flag set")
    if len(payload) != header.size:
        raise FrontendProtocolError(
            f"backend request: header says {header.size} bytes, got {len(payload)}"
        )
    if header.request == BackendRequest.CONFIG_CHANGE_MSG:
        _expect(header, payload, fds, 0, 0)
        return ConfigChangeMsg(need_reply=header.need_reply)
    return UnknownRequest(header.request, bytes(payload), fds, need_reply=header.need_reply)


def parse_reply(request: int, header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Reply:
    """Decode the reply to ``request`` (front-end side, and backend channel acks).

    ``request`` is the code that was sent; a reply must echo it and carry the REPLY flag.
    A request without a natural reply is answered by REPLY_ACK's u64 status.
    """
    name = _name(request)
    if header.request != request:
        raise FrontendProtocolError(f"{name}: reply is for request {header.request}")
    if not header.is_reply:
        raise FrontendProtocolError(f"{name}: reply lacks the REPLY flag")
    if len(payload) != header.size:
        raise FrontendProtocolError(f"{name}: header says {header.size} bytes, got {len(payload)}")
    if request == Request.GET_VRING_BASE:
        _expect(header, payload, fds, VRING_STATE.size, 0)
        return VringStateReply(*VRING_STATE.unpack(payload))
    if request == Request.GET_CONFIG:
        _no_fds(header, fds)
        if not payload:
            return ConfigReply(0, b"")
        offset, _size, flags, data = _config(header, payload)
        return ConfigReply(offset, data, flags)
    if request == Request.GET_INFLIGHT_FD:
        _expect(header, payload, fds, INFLIGHT.size, 1)
        size, offset, num_queues, queue_size = INFLIGHT.unpack(payload)
        return InflightReply(size, offset, num_queues, queue_size, fds[0])
    _expect(header, payload, fds, U64.size, 0)
    return U64Reply(request, U64.unpack(payload)[0])


# -- serializing -------------------------------------------------------------------------------


def _frame(request: int, payload: bytes, *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def _pack_region(region: MemRegion) -> bytes:
    return MEMORY_REGION.pack(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    )


def _vring_fd_value(msg: _VringFd) -> int:
    return msg.index | (VRING_NOFD_MASK if msg.fd is None else 0)


def request_code(msg: Message) -> int:
    """The request code a message is sent with."""
    if isinstance(msg, UnknownRequest):
        return msg.request
    if isinstance(msg, ConfigChangeMsg):
        return BackendRequest.CONFIG_CHANGE_MSG
    return _CODES[type(msg)]


_CODES: dict[type[Message], int] = {
    GetFeatures: Request.GET_FEATURES,
    SetFeatures: Request.SET_FEATURES,
    GetProtocolFeatures: Request.GET_PROTOCOL_FEATURES,
    SetProtocolFeatures: Request.SET_PROTOCOL_FEATURES,
    SetOwner: Request.SET_OWNER,
    ResetOwner: Request.RESET_OWNER,
    SetMemTable: Request.SET_MEM_TABLE,
    GetMaxMemSlots: Request.GET_MAX_MEM_SLOTS,
    AddMemReg: Request.ADD_MEM_REG,
    RemMemReg: Request.REM_MEM_REG,
    SetVringNum: Request.SET_VRING_NUM,
    SetVringAddr: Request.SET_VRING_ADDR,
    SetVringBase: Request.SET_VRING_BASE,
    GetVringBase: Request.GET_VRING_BASE,
    SetVringKick: Request.SET_VRING_KICK,
    SetVringCall: Request.SET_VRING_CALL,
    SetVringErr: Request.SET_VRING_ERR,
    SetVringEnable: Request.SET_VRING_ENABLE,
    GetQueueNum: Request.GET_QUEUE_NUM,
    GetConfig: Request.GET_CONFIG,
    SetConfig: Request.SET_CONFIG,
    SetBackendReqFd: Request.SET_BACKEND_REQ_FD,
    GetInflightFd: Request.GET_INFLIGHT_FD,
    SetInflightFd: Request.SET_INFLIGHT_FD,
}


def _payload(msg: Message) -> bytes:
    match msg:
        case SetFeatures(features=v) | SetProtocolFeatures(features=v):
            return U64.pack(v)
        case SetMemTable(regions=regions):
            return MEMORY_TABLE_HEADER.pack(len(regions), 0) + b"".join(
                _pack_region(r) for r in regions
            )
        case AddMemReg(region=region) | RemMemReg(region=region):
            return U64.pack(0) + _pack_region(region)
        case (
            SetVringNum(index=i, num=n)
            | SetVringBase(index=i, num=n)
            | GetVringBase(index=i, num=n)
        ):
            return VRING_STATE.pack(i, n)
        case SetVringEnable(index=i, enable=e):
            return VRING_STATE.pack(i, int(e))
        case SetVringAddr():
            return VRING_ADDR.pack(
                msg.index,
                msg.flags,
                msg.desc_user_addr,
                msg.used_user_addr,
                msg.avail_user_addr,
                msg.log_guest_addr,
            )
        case _VringFd():
            return U64.pack(_vring_fd_value(msg))
        case GetConfig(offset=offset, size=size, flags=flags):
            return CONFIG_HEADER.pack(offset, size, flags) + bytes(size)
        case SetConfig(offset=offset, data=data, flags=flags):
            return CONFIG_HEADER.pack(offset, len(data), flags) + data
        case GetInflightFd() | SetInflightFd():
            return INFLIGHT.pack(msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size)
        case UnknownRequest(payload=payload):
            return payload
        case _:
            return b""


def serialize(msg: Message) -> bytes:
    """Header + payload of a request; send ``msg.fds`` beside it."""
    return _frame(request_code(msg), _payload(msg), need_reply=msg.need_reply)


def serialize_reply(reply: Reply) -> bytes:
    """Header + payload of a reply (REPLY flag set); an InflightReply's fd goes beside it."""
    match reply:
        case U64Reply(request=request, value=value):
            return _frame(request, U64.pack(value), reply=True)
        case VringStateReply(index=index, num=num, request=request):
            return _frame(request, VRING_STATE.pack(index, num), reply=True)
        case ConfigReply(offset=offset, data=data, flags=flags, request=request):
            body = CONFIG_HEADER.pack(offset, len(data), flags) + data if data else b""
            return _frame(request, body, reply=True)
        case InflightReply():
            body = INFLIGHT.pack(
                reply.mmap_size, reply.mmap_offset, reply.num_queues, reply.queue_size
            )
            return _frame(reply.request, body, reply=True)
    raise TypeError(f"not a reply: {reply!r}")
