"""Fields that another agent reads or writes while we do: one aligned access each, and fences.

The rings (virtio 1.2 §2.7), and later the inflight area and the dirty log, live in memory that
the guest driver or the front-end reads and writes *concurrently* with us. For each such field
the rule is:

    every load and every store is ONE naturally aligned access of the field's width.

A field written as two stores can be seen half-written. This is not hypothetical in CPython:
``struct.pack_into`` zero-fills its destination (``memset``) before it stores the value, so
``Struct("<H").pack_into(used, 2, idx)`` is two stores, and a driver that reads used->idx
between them sees 0 and consumes stale used entries (a Linux guest then reports "id N is not
a head!", or completes the wrong request). ``struct.unpack_from`` is a single load, but we
use one mechanism for both directions so that nobody has to remember which half is safe.

The mechanism is item access on a ``memoryview`` cast to ``"H"`` / ``"I"`` / ``"Q"``
(:func:`words`). CPython stores an item with a ``memcpy`` of the item's size from a local,
which compiles to one 2-, 4- or 8-byte move; loads likewise. The move is atomic on x86-64
when the address is naturally aligned. Alignment holds because:

- ``GuestMemory`` maps each region from a page boundary, so a guest address lies at a host
  address of the same alignment unless the front-end gave an unaligned mmap offset;
  ``GuestMemory.host_aligned`` tells, and its fixed-width accessors fall back to a byte copy
  (no single-store promise) where the host address is unaligned;
- the ring code checks each part's guest alignment (§2.7: 16, 2 and 4 bytes) and its host
  alignment, and refuses a ring that fails either;
- :func:`words` refuses a writable view whose host address is not aligned to the item size
  (a read-only view's address cannot be asked for from Python; the ring check covers it).

Fences. Python cannot emit barrier instructions, and only one kind matters on x86-64 (TSO),
the only host this backend targets:

- load-load and store-store order (the "read barrier" and "write barrier" of §2.7.13) is
  kept by the hardware, and each access here is a separate call into C that the compiler
  cannot move others across: they cost nothing, and the code marks where they are needed so
  that a C twin puts ``__atomic_thread_fence(__ATOMIC_ACQUIRE / __ATOMIC_RELEASE)`` there;
- store-load order is not kept (the store buffer lets a later load pass an earlier store):
  :func:`full_fence` is one. It takes and releases a ``threading.Lock``, whose fast paths
  in glibc are ``lock cmpxchg`` / ``lock xadd``; a LOCK-prefixed instruction drains the
  store buffer, a full fence on x86. (On weakly ordered hosts a lock round trip is not a full
  fence; a C twin uses ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``.)

Data that the other side reads only after such an index publishes it (a used element before
used->idx, the status byte of a request, the payload of an IN request) may be written with
any number of stores: the index store, made after them, is what makes them visible.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Final, Literal

ItemFormat = Literal["H", "I", "Q"]

_SIZES: Final[dict[str, int]] = {"H": 2, "I": 4, "Q": 8}

_fence_lock: Final = threading.Lock()

if sys.byteorder != "little":  # pragma: no cover - virtio 1.x rings are little-endian
    raise ImportError("memory.shared needs a little-endian host (native items are the ring's)")


def words(view: memoryview, fmt: ItemFormat) -> memoryview:
    """``view`` as native (little-endian) unsigned items of one width: ``w[i]`` is one load,
    ``w[i] = v`` one store (of the item at byte offset ``i * size``).

    ``view`` must be a contiguous byte view whose length is a multiple of the item size.
    Raises ``ValueError`` for a view that cannot be read that way, including a writable view
    whose host address is not aligned to the item size. Values outside the item's range
    raise ``ValueError`` on store and leave memory untouched (unlike ``struct.pack_into``).
    """
    size = _SIZES[fmt]
    if view.format not in ("B", "b", "c") or view.ndim != 1 or not view.c_contiguous:
        raise ValueError("shared fields need a contiguous one-dimensional byte view")
    if view.nbytes % size:
        raise ValueError(f"{view.nbytes} bytes are not a whole number of {size}-byte items")
    if not view.readonly and view.nbytes:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if address % size:
            raise ValueError(f"host address {address:#x} is not {size}-byte aligned")
    return view.cast("B").cast(fmt)


def full_fence() -> None:
    """A store-load fence (see the module docstring for why a lock round trip is one)."""
    _fence_lock.acquire()
    _fence_lock.release()
