"""Hostile front-end messages shared by the connection and server tests: each case sets up
what it needs, then sends one message the backend must refuse by dropping the connection."""

from __future__ import annotations

import os

from tests.protocol.frontend import Frontend, FrontendMemory, MiB, ring_layout
from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF

HOSTILE: list[tuple[str, str]] = [
    ("vring index past the queues", "index 2 out of range"),
    ("vring num zero", "power of two"),
    ("vring num too big", "power of two"),
    ("vring addr before memory", "before memory table"),
    ("vring addr outside memory", "not in guest memory"),
    ("vring addr misaligned", "aligned"),
    ("vring base too big", "16-bit"),
    ("kick without fd (polling)", "polling"),
    ("kick with a pipe", "not an eventfd"),
    ("unknown request", "unsupported request 200"),
    ("overlapping regions", "memory table rejected"),
    ("region bigger than its memfd", "memory table rejected"),
    ("features never offered", "never offered"),
    ("protocol features never offered", "never offered"),
    ("backend channel not a socket", "not a socket"),
    ("remove unknown region", "no region"),
    ("log address not the used ring", "log address 0x0 is not the used ring"),
    ("log base of size zero", "dirty log size 0x0"),
    ("log base past its file", "past the end of its file"),
    ("log base on a pipe", "not a regular file"),
    ("log base offset huge", "dirty log offset"),
    ("log base without fd", "carries 0 fds, expected 1"),
    ("bad payload size", "payload is 12 bytes, expected 8"),
    ("too many regions", "9 regions"),
    ("kick missing its fd", "carries 0 fds, expected 1"),
    ("fds on a message that takes none", "carries 1 fds, expected 0"),
]


def _hostile_log_base(fe: Frontend, case: str) -> None:
    if case == "log base without fd":
        header = codec.HEADER.pack(codec.Request.SET_LOG_BASE, codec.VERSION, 16)
        fe.send_raw(header + codec.LOG.pack(4096, 0))
        return
    if case == "log base on a pipe":
        r, w = os.pipe()
        fe.send(codec.SetLogBase(4096, 0, r))
        os.close(r)
        os.close(w)
        return
    fd = os.memfd_create("hostile-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    size, offset = {
        "log base of size zero": (0, 0),
        "log base past its file": (8192, 4096),
        "log base offset huge": (4096, 1 << 62),
    }[case]
    fe.send(codec.SetLogBase(size, offset, fd))
    os.close(fd)


def hostile(fe: Frontend, memory: FrontendMemory, case: str) -> None:
    """Send the offending message of ``case`` (after whatever setup it needs)."""
    fe.handshake()
    lay = ring_layout(0)
    addr = codec.SetVringAddr(
        0, 0, memory.uva(lay.desc), memory.uva(lay.used), memory.uva(lay.avail), 0
    )
    if case == "vring index past the queues":
        fe.send(codec.SetVringNum(2, 64))
    elif case == "vring num zero":
        fe.send(codec.SetVringNum(0, 0))
    elif case == "vring num too big":
        fe.send(codec.SetVringNum(0, 512))
    elif case == "vring addr before memory":
        fe.send(codec.SetVringNum(0, 64))
        fe.send(addr)
    elif case == "vring addr outside memory":
        fe.set_mem_table(memory)
        fe.send(codec.SetVringNum(0, 64))
        fe.send(codec.SetVringAddr(0, 0, memory.uva(0), 0x1234_0000, memory.uva(0x1000), 0))
    elif case == "vring addr misaligned":
        fe.set_mem_table(memory)
        fe.send(codec.SetVringNum(0, 64))
        fe.send(codec.SetVringAddr(0, 0, memory.uva(8), memory.uva(0x2000), memory.uva(0x1000), 0))
    elif case == "vring base too big":
        fe.send(codec.SetVringBase(0, 0x10000))
    elif case == "kick without fd (polling)":
        fe.send(codec.SetVringKick(0, None))
    elif case == "kick with a pipe":
        r, w = os.pipe()
        fe.send(codec.SetVringKick(0, r))
        os.close(r)
        os.close(w)
    elif case == "unknown request":
        fe.send(codec.UnknownRequest(200, b"\0" * 8))
    elif case == "overlapping regions":
        regions = (
            codec.MemRegion(0, MiB, 0x1000_0000, 0),
            codec.MemRegion(MiB // 2, MiB, 0x2000_0000, 0),
        )
        fe.send(codec.SetMemTable(regions, (memory.fds[0], memory.fds[0])))
    elif case == "region bigger than its memfd":
        fe.send(
            codec.SetMemTable((codec.MemRegion(0, 64 * MiB, 0x1000_0000, 0),), (memory.fds[0],))
        )
    elif case == "features never offered":
        fe.send(codec.SetFeatures(1 << 5))
    elif case == "protocol features never offered":
        fe.send(codec.SetProtocolFeatures(int(PF.RARP)))
    elif case == "backend channel not a socket":
        r, w = os.pipe()
        fe.send(codec.SetBackendReqFd(r))
        os.close(r)
        os.close(w)
    elif case == "remove unknown region":
        fe.set_mem_table(memory)
        fe.send(codec.RemMemReg(codec.MemRegion(64 * MiB, MiB, 0x5000_0000, 0)))
    elif case.startswith("log base"):
        _hostile_log_base(fe, case)
    elif case == "log address not the used ring":
        fe.set_mem_table(memory)
        fe.send(codec.SetVringNum(0, 64))
        fe.send(
            codec.SetVringAddr(
                0,
                codec.VRING_F_LOG,
                addr.desc_user_addr,
                addr.used_user_addr,
                addr.avail_user_addr,
                0,
            )
        )
    elif case == "bad payload size":
        fe.send_raw(codec.HEADER.pack(codec.Request.SET_VRING_NUM, codec.VERSION, 12) + bytes(12))
    elif case == "too many regions":
        table = codec.MEMORY_TABLE_HEADER.pack(9, 0) + bytes(9 * codec.MEMORY_REGION.size)
        header = codec.HEADER.pack(codec.Request.SET_MEM_TABLE, codec.VERSION, len(table))
        fe.send_raw(header + table, [memory.fds[0]] * 8)
    elif case == "kick missing its fd":
        fe.send_raw(codec.HEADER.pack(codec.Request.SET_VRING_KICK, codec.VERSION, 8) + bytes(8))
    elif case == "fds on a message that takes none":
        fe.send_raw(codec.serialize(codec.SetVringNum(0, 64)), [memory.fds[0]])
    else:  # pragma: no cover
        raise AssertionError(case)
