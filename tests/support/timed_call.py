"""Run a call on a thread and time it (for calls that must not wait on a hostile peer)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TimedCall(Generic[T]):
    """``call()`` on a daemon thread, started at once; :meth:`result` waits for it."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._outcome: list[tuple[T, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        value = self._call()
        self._outcome.append((value, time.monotonic() - t0))

    def result(self, timeout: float = 10.0) -> tuple[T, float]:
        """The call's value and how long it took (AssertionError if still running)."""
        self._thread.join(timeout)
        assert self._outcome, f"still running after {timeout} s"
        return self._outcome[0]
