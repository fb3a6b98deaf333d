"""C parts built with cffi (``build``), each with a pure-Python twin the same tests run.

:func:`bench_driver` returns the compiled module, or None when it was not built (no compiler,
or a checkout that never ran ``python -m vhost_user.native.build``); callers then use the
Python twin, and say so once.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def bench_driver() -> ModuleType | None:
    try:
        return importlib.import_module("vhost_user.native._bench_driver")
    except ImportError:
        return None
