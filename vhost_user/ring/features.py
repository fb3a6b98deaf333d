"""Transport feature bits a ring implementation must honour (virtio 1.2 §6), as bit numbers.

Device-type bits (virtio-blk's) live with their device; these change how the rings behave,
so the ring code and every device share one definition. A mask is ``1 << BIT``.
"""

from __future__ import annotations

from typing import Final

VIRTIO_RING_F_INDIRECT_DESC: Final = 28
"""Descriptors may point to indirect tables (§2.7.5.3)."""
VIRTIO_RING_F_EVENT_IDX: Final = 29
"""used_event / avail_event replace the flags for notification suppression (§2.7.7, §2.7.10)."""
VIRTIO_F_VERSION_1: Final = 32
"""The device is a virtio 1.x device: little-endian rings and config (§6)."""


def has(features: int, bit: int) -> bool:
    """True when feature ``bit`` is set in the bit mask ``features``."""
    return bool(features >> bit & 1)
