"""blkdev's C parts (cffi, API mode; ``build``): the virtio-blk fast path (``blk_fast.c``).

:func:`blk_fast` returns the compiled module, or None when it was not built; the device then
serves every request in Python (``blkdev.fastpath`` says so once).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def blk_fast() -> ModuleType | None:
    try:
        return importlib.import_module("blkdev.native._blk_fast")
    except ImportError:
        return None
