"""blkdev's C parts (cffi, API mode; ``build``): the virtio-blk fast path (``blk_fast.c``) and
the librbd shim (``rbd_shim.c``).

:func:`blk_fast` returns the compiled module, or None when it was not built; the device then
serves every request in Python (``blkdev.fastpath`` says so once). :func:`rbd` likewise; without
it an ``rbd:`` image is refused with a message saying how to build it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def blk_fast() -> ModuleType | None:
    try:
        return importlib.import_module("blkdev.native._blk_fast")
    except ImportError:
        return None


def rbd() -> ModuleType | None:
    try:
        return importlib.import_module("blkdev.native._rbd")
    except ImportError:
        return None
