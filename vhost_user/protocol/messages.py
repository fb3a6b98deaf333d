"""vhost-user messages written once: wire layouts, codes, message classes and the table.

This module owns *what* is on the wire; :mod:`vhost_user.protocol.codec` owns *how* bytes
become messages and back, and derives all of it from :data:`REQUESTS` (one :class:`Row` per
request: code, message class, payload layout, fds, natural reply) and
:data:`BACKEND_REQUESTS`. Adding a request means adding its message class and its row here;
the codec needs no change unless the payload is a new irregular shape.

A payload layout is a :class:`struct.Struct` whose fields are the message's payload fields in
order, or, for the few irregular payloads, one small :class:`PayloadCodec` (memory table,
single memory region, vring fd u64 with the NOFD bit, vring enable, config access). Layout
sizes follow QEMU's docs/interop/vhost-user.rst ("Message Specification", "Payload"). Nothing
here does I/O.
"""

from __future__ import annotations

import abc
import enum
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

# -- wire layouts ------------------------------------------------------------------------------

HEADER = struct.Struct("<III")
"""request, flags, size."""
EMPTY = struct.Struct("")
"""No payload."""
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
"""SET_VRING_ADDR flags: log used-ring writes at ``log`` (a guest address), while VHOST_F_LOG_ALL
is on (live migration)."""
LOG = struct.Struct("<QQ")
"""SET_LOG_BASE: mmap size, mmap offset of the dirty log (the fd travels beside)."""

VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26
"""Feature bit: the front-end may ask for dirty logging of every guest-memory write (migration)."""

CONFIG_FLAG_FRONTEND = 0
CONFIG_FLAG_MIGRATION = 1


# -- codes -------------------------------------------------------------------------------------


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
    """Front-end to backend request codes (all the spec's, implemented or not)."""

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
#
# A message's fields, in order, are its payload fields (what its layout unpacks to) and then,
# for a request that carries fds, the fd field (see Fds); ``need_reply`` (requests) and
# ``request`` (replies) come from the header, not the payload.


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
class SetLogBase(Message):
    """The dirty log's shared memory (LOG_SHMFD): ``mmap_size`` bytes of ``fd`` from
    ``mmap_offset``."""

    mmap_size: int
    mmap_offset: int
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True, slots=True)
class SetLogFd(Message):
    """An eventfd the backend may signal after it updated the log (we never need to)."""

    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


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


@dataclass(frozen=True, slots=True)
class LogBaseReply:
    """SET_LOG_BASE's reply with LOG_SHMFD: no payload (QEMU reads a bare header, to know the
    log is mapped before it starts reading it)."""

    request: int = Request.SET_LOG_BASE


Reply = U64Reply | VringStateReply | ConfigReply | InflightReply | LogBaseReply


# -- irregular payloads ------------------------------------------------------------------------


class PayloadError(Exception):
    """A payload that does not fit its layout. Raised by the layouts without naming the request;
    the codec re-raises it as FrontendProtocolError with the request's name in front."""


class PayloadCodec(abc.ABC):
    """A payload one :class:`struct.Struct` does not describe: one small subclass per shape.

    ``unpack`` turns a payload into the message's payload fields, in field order, or raises
    :class:`PayloadError`; ``pack`` is its inverse. ``size`` is the fixed part and
    ``item_size`` the bytes per item after it; with ``item_size`` 0 the payload is exactly
    ``size`` bytes, which the codec checks before ``unpack`` sees it.
    """

    size: ClassVar[int]
    item_size: ClassVar[int] = 0

    @abc.abstractmethod
    def unpack(self, payload: bytes) -> tuple[Any, ...]: ...

    @abc.abstractmethod
    def pack(self, *values: Any) -> bytes: ...


Layout = struct.Struct | PayloadCodec


def layout_sizes(layout: Layout) -> tuple[int, int]:
    """``(fixed bytes, bytes per item)``: ``(40, 0)`` for SET_VRING_ADDR, ``(8, 32)`` for
    SET_MEM_TABLE (8 bytes, then 32 per region)."""
    if isinstance(layout, struct.Struct):
        return layout.size, 0
    return layout.size, layout.item_size


def _pack_region(region: MemRegion) -> tuple[int, int, int, int]:
    return region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset


class MemTableLayout(PayloadCodec):
    """SET_MEM_TABLE: :data:`MEMORY_TABLE_HEADER`, then ``nregions`` :data:`MEMORY_REGION`.

    Fields: ``(regions,)``. The fd count (one per region) is the row's :attr:`Fds.PER_REGION`.
    """

    size = MEMORY_TABLE_HEADER.size
    item_size = MEMORY_REGION.size

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        if len(payload) < self.size:
            raise PayloadError(f"payload of {len(payload)} bytes has no region count")
        nregions, _padding = MEMORY_TABLE_HEADER.unpack_from(payload)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise PayloadError(f"{nregions} regions, at most {MAX_MEM_TABLE_REGIONS} allowed")
        # QEMU sends exactly the regions in use, not the whole 8-slot array.
        expected = self.size + nregions * self.item_size
        if len(payload) != expected:
            raise PayloadError(f"payload is {len(payload)} bytes, expected {expected}")
        regions = MEMORY_REGION.iter_unpack(memoryview(payload)[self.size :])
        return (tuple(MemRegion(*fields) for fields in regions),)

    def pack(self, *values: Any) -> bytes:
        (regions,) = values
        header = MEMORY_TABLE_HEADER.pack(len(regions), 0)
        return header + b"".join(MEMORY_REGION.pack(*_pack_region(r)) for r in regions)


class OneRegionLayout(PayloadCodec):
    """ADD_MEM_REG / REM_MEM_REG: :data:`SINGLE_MEMORY_REGION`. Fields: ``(region,)``."""

    size = SINGLE_MEMORY_REGION.size

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        _padding, *fields = SINGLE_MEMORY_REGION.unpack(payload)
        return (MemRegion(*fields),)

    def pack(self, *values: Any) -> bytes:
        (region,) = values
        return SINGLE_MEMORY_REGION.pack(0, *_pack_region(region))


class VringFdLayout(PayloadCodec):
    """SET_VRING_KICK/CALL/ERR: a :data:`U64` of ring index (bits 0-7) and NOFD (bit 8).

    Fields: ``(index, nofd)``; the row's :attr:`Fds.UNLESS_NOFD` turns ``nofd`` into the
    message's ``fd`` (None, or the one fd attached). The spec ("VHOST_USER_SET_VRING_KICK")
    gives the other bits no meaning: refused rather than ignored.
    """

    size = U64.size

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        (value,) = U64.unpack(payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise PayloadError(f"reserved bits set in {value:#x}")
        return value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK)

    def pack(self, *values: Any) -> bytes:
        index, nofd = values
        return U64.pack(index | (VRING_NOFD_MASK if nofd else 0))


class VringEnableLayout(PayloadCodec):
    """SET_VRING_ENABLE: a :data:`VRING_STATE` whose ``num`` is 0 or 1. Fields:
    ``(index, enable)``."""

    size = VRING_STATE.size

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        index, num = VRING_STATE.unpack(payload)
        if num not in (0, 1):
            raise PayloadError(f"state {num} is neither 0 nor 1")
        return index, bool(num)

    def pack(self, *values: Any) -> bytes:
        index, enable = values
        return VRING_STATE.pack(index, int(enable))


class ConfigLayout(PayloadCodec):
    """GET_CONFIG, SET_CONFIG and GET_CONFIG's reply: :data:`CONFIG_HEADER`, then ``size``
    bytes of config space.

    Fields: ``(offset, size, flags)`` for GET_CONFIG (``data=False``: its bytes are a
    placeholder, sent as zeros), ``(offset, data, flags)`` otherwise. With
    ``empty_is_failure`` (the reply) an empty payload is the failure reply, read as
    ``(0, b"", CONFIG_FLAG_FRONTEND)``, and an empty ``data`` is sent as one.
    """

    size = CONFIG_HEADER.size
    item_size = 1

    def __init__(self, *, data: bool, empty_is_failure: bool = False) -> None:
        self.data = data
        self.empty_is_failure = empty_is_failure

    def unpack(self, payload: bytes) -> tuple[Any, ...]:
        if self.empty_is_failure and not payload:
            return 0, b"", CONFIG_FLAG_FRONTEND
        if len(payload) < CONFIG_HEADER.size:
            raise PayloadError(f"payload of {len(payload)} bytes has no config header")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        if size > MAX_CONFIG_SIZE:
            raise PayloadError(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(payload) != CONFIG_HEADER.size + size:
            raise PayloadError(
                f"payload is {len(payload)} bytes, "
                f"expected {CONFIG_HEADER.size + size} for a {size}-byte config access"
            )
        if flags not in (CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION):
            raise PayloadError(f"unknown config flags {flags:#x}")
        return offset, bytes(payload[CONFIG_HEADER.size :]) if self.data else size, flags

    def pack(self, *values: Any) -> bytes:
        offset, data_or_size, flags = values
        if not self.data:
            return CONFIG_HEADER.pack(offset, data_or_size, flags) + bytes(data_or_size)
        data: bytes = data_or_size
        if self.empty_is_failure and not data:
            return b""
        return CONFIG_HEADER.pack(offset, len(data), flags) + data


MEM_TABLE = MemTableLayout()
ONE_REGION = OneRegionLayout()
VRING_FD = VringFdLayout()
VRING_ENABLE = VringEnableLayout()
CONFIG_READ = ConfigLayout(data=False)
CONFIG_DATA = ConfigLayout(data=True)
CONFIG_DATA_OR_FAILURE = ConfigLayout(data=True, empty_is_failure=True)


class Fds(enum.Enum):
    """How many fds a message carries beside its payload, and where they go.

    Except for NONE, the fds are the message's last field; any other count is refused.
    """

    NONE = "none"
    ONE = "exactly one"
    OPTIONAL = "0 or 1, the front-end's choice"
    """Field ``int | None``. REM_MEM_REG: "for compatibility with existing incorrect
    implementations, the backend MAY accept messages with one file descriptor" (spec)."""
    UNLESS_NOFD = "0 or 1, as the NOFD bit says"
    """Field ``int | None``, None exactly when the layout's last field (``nofd``) is set:
    SET_VRING_KICK/CALL/ERR. The ``nofd`` field is the layout's, not the message's."""
    PER_REGION = "one per region"
    """Field ``tuple[int, ...]``, one fd per item of the layout's last field: SET_MEM_TABLE."""


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyRow:
    """A reply body: its class, payload layout and fds (``request`` comes from the header)."""

    message: type[Reply]
    layout: Layout
    fds: Fds = Fds.NONE


@dataclass(frozen=True, slots=True)
class Row:
    """One request: code, message class, payload layout, fds, and its natural reply.

    ``reply`` is None for requests without a natural reply: those are answered only when
    NEED_REPLY asks for it, by REPLY_ACK's u64 status, :data:`U64_REPLY` (spec, "REPLY_ACK").
    """

    code: int
    message: type[Message]
    layout: Layout
    fds: Fds = Fds.NONE
    reply: ReplyRow | None = None


U64_REPLY = ReplyRow(U64Reply, U64)
"""A u64 body: GET_FEATURES & co., and REPLY_ACK's status for every other request."""
VRING_BASE_REPLY = ReplyRow(VringStateReply, VRING_STATE)
CONFIG_REPLY = ReplyRow(ConfigReply, CONFIG_DATA_OR_FAILURE)
INFLIGHT_REPLY = ReplyRow(InflightReply, INFLIGHT, Fds.ONE)
LOG_BASE_REPLY = ReplyRow(LogBaseReply, EMPTY)

REQUESTS: tuple[Row, ...] = (
    Row(Request.GET_FEATURES, GetFeatures, EMPTY, reply=U64_REPLY),
    Row(Request.SET_FEATURES, SetFeatures, U64),
    Row(Request.SET_OWNER, SetOwner, EMPTY),
    Row(Request.RESET_OWNER, ResetOwner, EMPTY),
    Row(Request.SET_MEM_TABLE, SetMemTable, MEM_TABLE, Fds.PER_REGION),
    Row(Request.SET_LOG_BASE, SetLogBase, LOG, Fds.ONE, reply=LOG_BASE_REPLY),
    Row(Request.SET_LOG_FD, SetLogFd, EMPTY, Fds.ONE),
    Row(Request.SET_VRING_NUM, SetVringNum, VRING_STATE),
    Row(Request.SET_VRING_ADDR, SetVringAddr, VRING_ADDR),
    Row(Request.SET_VRING_BASE, SetVringBase, VRING_STATE),
    Row(Request.GET_VRING_BASE, GetVringBase, VRING_STATE, reply=VRING_BASE_REPLY),
    Row(Request.SET_VRING_KICK, SetVringKick, VRING_FD, Fds.UNLESS_NOFD),
    Row(Request.SET_VRING_CALL, SetVringCall, VRING_FD, Fds.UNLESS_NOFD),
    Row(Request.SET_VRING_ERR, SetVringErr, VRING_FD, Fds.UNLESS_NOFD),
    Row(Request.GET_PROTOCOL_FEATURES, GetProtocolFeatures, EMPTY, reply=U64_REPLY),
    Row(Request.SET_PROTOCOL_FEATURES, SetProtocolFeatures, U64),
    Row(Request.GET_QUEUE_NUM, GetQueueNum, EMPTY, reply=U64_REPLY),
    Row(Request.SET_VRING_ENABLE, SetVringEnable, VRING_ENABLE),
    Row(Request.SET_BACKEND_REQ_FD, SetBackendReqFd, EMPTY, Fds.ONE),
    Row(Request.GET_CONFIG, GetConfig, CONFIG_READ, reply=CONFIG_REPLY),
    Row(Request.SET_CONFIG, SetConfig, CONFIG_DATA),
    Row(Request.GET_INFLIGHT_FD, GetInflightFd, INFLIGHT, reply=INFLIGHT_REPLY),
    Row(Request.SET_INFLIGHT_FD, SetInflightFd, INFLIGHT, Fds.ONE),
    Row(Request.GET_MAX_MEM_SLOTS, GetMaxMemSlots, EMPTY, reply=U64_REPLY),
    Row(Request.ADD_MEM_REG, AddMemReg, ONE_REGION, Fds.ONE),
    Row(Request.REM_MEM_REG, RemMemReg, ONE_REGION, Fds.OPTIONAL),
)
"""Every request this backend understands; any other code parses to :class:`UnknownRequest`."""

BACKEND_REQUESTS: tuple[Row, ...] = (Row(BackendRequest.CONFIG_CHANGE_MSG, ConfigChangeMsg, EMPTY),)
"""Backend channel requests (the ones we send, which a test front-end parses)."""
